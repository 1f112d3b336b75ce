//! D-optimal selection: the paper's one-shot rules (`xtx`, `dopt`, `past-aware-dopt`) and armd's exact
//! greedy maximiser of the log-determinant (`greedy-dopt`).
//!
//! The paper's rules score each candidate by the gradient of `log det M` with respect to its own weight at
//! the all-candidate design `M = [H] + Σ_pool w vvᵀ + εI`, i.e. `w·vᵀM⁻¹v`, and take the top k at once. We never
//! materialise the candidates' difference vectors: `Σ_pairs w vvᵀ = X·Lap(w)·Xᵀ` with `Lap` the weighted graph
//! Laplacian of the candidate pairs over pool responses, so `M` costs one sparse scatter plus one d×N×d
//! product, and the scores are pair distances in the pool whitened by `M`'s Cholesky factor.
//!
//! `greedy-dopt` picks one pair at a time, each maximising `log(1 + w·uᵀΣ_t u)` (u the whitened difference),
//! then conditions `Σ_{t+1} = Σ_t − w Σ_t u uᵀ Σ_t / (1 + w uᵀΣ_t u)`; the Fisher information does not depend on
//! the label, so this needs no label. `Σ_t = I − Σ_j q_j q_jᵀ` is kept as the list of `q_j`, so a candidate's
//! conditioned variance is its initial variance minus `Σ_j (q_jᵀz_a − q_jᵀz_b)²`, with the projections of
//! each response computed once and cached. Gains only shrink as picks accumulate (log det is submodular),
//! so stale gains are upper bounds and lazy evaluation with a max-heap picks exactly what eager greedy does.
//! In-flight requests are conditioned on first, as if already picked.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use faer::{Mat, MatRef, Par};
use rayon::prelude::*;

use super::{scoring, top_k, Pick, Round, SelectionParams};
use crate::candidates::Pair;
use crate::error::CoreError;
use crate::linalg::{self, cholesky_lower, dot, sigmoid};

/// `Σ_pairs w·(x_a − x_b)(x_a − x_b)ᵀ` (lower triangle) added into `acc`, via the graph Laplacian.
pub fn add_pair_gram_lower(acc: &mut Mat<f64>, x: MatRef<'_, f64>, pairs: &[Pair], w: &[f64]) {
    let (d, n) = (x.nrows(), x.ncols());
    let owned;
    let x = match x.try_as_col_major() {
        Some(_) => x,
        None => {
            owned = x.to_owned();
            owned.as_ref()
        }
    };
    let col = |j: usize| -> &[f64] {
        x.col(j)
            .try_as_col_major()
            .expect("column-major")
            .as_slice()
    };
    // Y = X·Lap, filled row-block by row-block in parallel (rows are independent; X is column-major so a
    // row block of a column is a contiguous slice and the inner loop vectorises).
    const ROWS: usize = 256;
    let mut y = Mat::<f64>::zeros(d, n);
    let blocks: Vec<(usize, Vec<f64>)> = (0..d.div_ceil(ROWS))
        .into_par_iter()
        .map(|blk| {
            let r0 = blk * ROWS;
            let rows = ROWS.min(d - r0);
            let mut out = vec![0.0; rows * n];
            for (p, &wi) in pairs.iter().zip(w) {
                // The Laplacian term is symmetric in (a, b); a self-pair contributes nothing.
                let (a, b) = match p.a.cmp(&p.b) {
                    Ordering::Less => (p.a as usize, p.b as usize),
                    Ordering::Greater => (p.b as usize, p.a as usize),
                    Ordering::Equal => continue,
                };
                let xa = &col(a)[r0..r0 + rows];
                let xb = &col(b)[r0..r0 + rows];
                let (lo, hi) = out.split_at_mut(b * rows);
                let ya = &mut lo[a * rows..a * rows + rows];
                let yb = &mut hi[..rows];
                for r in 0..rows {
                    let diff = wi * (xa[r] - xb[r]);
                    ya[r] += diff;
                    yb[r] -= diff;
                }
            }
            (r0, out)
        })
        .collect();
    for (r0, out) in blocks {
        let rows = out.len() / n.max(1);
        for j in 0..n {
            for r in 0..rows {
                y[(r0 + r, j)] = out[j * rows + r];
            }
        }
    }
    faer::linalg::matmul::triangular::matmul(
        acc.as_mut(),
        faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
        faer::Accum::Add,
        y.as_ref(),
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        x.transpose(),
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        1.0,
        linalg::matrix_par(),
    );
}

/// `v_iᵀ M⁻¹ v_i` for every candidate, where `M = base + Σ_pairs w vvᵀ + εI`.
fn design_variances(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    w: &[f64],
    base: Option<MatRef<'_, f64>>,
    epsilon: f64,
) -> Result<Vec<f64>, CoreError> {
    let d = x.nrows();
    let mut m = match base {
        Some(h) => Mat::from_fn(d, d, |i, j| if i >= j { h[(i, j)] } else { 0.0 }),
        None => Mat::zeros(d, d),
    };
    for i in 0..d {
        m[(i, i)] += epsilon;
    }
    add_pair_gram_lower(&mut m, x, pairs, w);
    let l = cholesky_lower(m.as_ref()).ok_or(CoreError::NotPositiveDefinite {
        context: "candidate design matrix (raise epsilon)",
    })?;
    let z = scoring::whiten(l.as_ref(), x);
    let norms = scoring::column_sq_norms(z.as_ref());
    Ok(scoring::pair_sq_distances(z.as_ref(), &norms, pairs))
}

/// `xtx`: top-k of `vᵀ(Σ_pool vvᵀ + εI)⁻¹v` (D-optimal design ignoring the logistic weights).
pub fn xtx(round: &mut Round<'_>, params: &SelectionParams) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let ones = vec![1.0; input.candidates.len()];
    let scores = design_variances(
        input.embeddings,
        input.candidates,
        &ones,
        None,
        params.epsilon,
    )?;
    Ok(round.picks(top_k(&scores, round.ranking_len())))
}

/// `dopt` (`past_aware = false`) and `past-aware-dopt` (`true`): top-k of `w·vᵀM⁻¹v`.
pub fn dopt(
    round: &mut Round<'_>,
    params: &SelectionParams,
    past_aware: bool,
) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let w: Vec<f64> = (0..round.len()).map(|c| round.weight(c)).collect();
    let h = past_aware.then(|| {
        let l = input.posterior.cholesky();
        let mut h = Mat::<f64>::zeros(l.nrows(), l.nrows());
        faer::linalg::matmul::matmul(
            h.as_mut(),
            faer::Accum::Replace,
            l,
            l.transpose(),
            1.0,
            linalg::matrix_par(),
        );
        h
    });
    let s = design_variances(
        input.embeddings,
        input.candidates,
        &w,
        h.as_ref().map(|h| h.as_ref()),
        params.epsilon,
    )?;
    let scores: Vec<f64> = s.iter().zip(&w).map(|(s, w)| s * w).collect();
    Ok(round.picks(top_k(&scores, round.ranking_len())))
}

/// Lazy (max-heap of stale upper bounds) or eager (rescan every step) greedy; both pick the same pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evaluation {
    Lazy,
    Eager,
}

/// Conditioning state of the greedy: `Σ_t = I − Σ_j q_j q_jᵀ` in whitened coordinates, with cached
/// projections `q_jᵀ z_r` of pool responses.
struct Conditioner<'z> {
    z: MatRef<'z, f64>,
    /// `q_j` as columns; the first `steps` are in use.
    q: Mat<f64>,
    steps: usize,
    proj: Vec<Vec<f64>>,
}

impl<'z> Conditioner<'z> {
    fn new(z: MatRef<'z, f64>, capacity: usize) -> Self {
        Self {
            z,
            q: Mat::zeros(z.nrows(), capacity.max(1)),
            steps: 0,
            proj: vec![Vec::new(); z.ncols()],
        }
    }

    fn column(&self, r: usize) -> &[f64] {
        self.z
            .col(r)
            .try_as_col_major()
            .expect("whitened pool is column-major")
            .as_slice()
    }

    fn q_col(&self, j: usize) -> &[f64] {
        self.q
            .col(j)
            .try_as_col_major()
            .expect("column-major")
            .as_slice()
    }

    /// Brings the cached projections of response `r` up to date with every `q_j`.
    fn ensure(&mut self, r: usize) {
        while self.proj[r].len() < self.steps {
            let j = self.proj[r].len();
            let p = dot(self.q_col(j), self.column(r));
            self.proj[r].push(p);
        }
    }

    /// [`Self::ensure`] for many responses at once, as one small matrix product: reading each `q_j` once
    /// per batch instead of once per response is what keeps the lazy greedy off the memory bus.
    fn ensure_many(&mut self, responses: &mut Vec<usize>) {
        responses.sort_unstable();
        responses.dedup();
        responses.retain(|&r| self.proj[r].len() < self.steps);
        let Some(from) = responses.iter().map(|&r| self.proj[r].len()).min() else {
            return;
        };
        let d = self.z.nrows();
        let mut zs = Mat::<f64>::zeros(d, responses.len());
        for (c, &r) in responses.iter().enumerate() {
            zs.col_as_slice_mut(c).copy_from_slice(self.column(r));
        }
        let rows = self.steps - from;
        let mut p = Mat::<f64>::zeros(rows, responses.len());
        faer::linalg::matmul::matmul(
            p.as_mut(),
            faer::Accum::Replace,
            self.q.subcols(from, rows).transpose(),
            zs.as_ref(),
            1.0,
            Par::Seq,
        );
        for (c, &r) in responses.iter().enumerate() {
            for j in self.proj[r].len()..self.steps {
                let v = p[(j - from, c)];
                self.proj[r].push(v);
            }
        }
    }

    /// Conditioned variance of pair (a, b) given its variance `s` after the first `from` directions.
    fn variance(&mut self, a: usize, b: usize, s: f64, from: usize) -> f64 {
        self.ensure(a);
        self.ensure(b);
        let (pa, pb) = (&self.proj[a], &self.proj[b]);
        let mut s = s;
        for j in from..self.steps {
            let t = pa[j] - pb[j];
            s -= t * t;
        }
        s.max(0.0)
    }

    /// Adds the direction of whitened difference `u` with Fisher weight `w` and conditioned variance `s`;
    /// `qu[j] = q_jᵀu` for every existing direction.
    fn condition(&mut self, mut u: Vec<f64>, qu: &[f64], w: f64, s: f64) {
        for (j, &c) in qu.iter().enumerate().take(self.steps) {
            for (ui, qi) in u.iter_mut().zip(self.q_col(j)) {
                *ui -= c * qi;
            }
        }
        let scale = (w / (1.0 + w * s)).sqrt();
        if self.steps == self.q.ncols() {
            // Grow geometrically (only when k was underestimated).
            let mut bigger = Mat::<f64>::zeros(self.q.nrows(), 2 * self.q.ncols());
            bigger.subcols_mut(0, self.steps).copy_from(self.q.as_ref());
            self.q = bigger;
        }
        let col = self.q.col_as_slice_mut(self.steps);
        for (dst, x) in col.iter_mut().zip(&u) {
            *dst = x * scale;
        }
        self.steps += 1;
    }
}

/// Stale heap entries re-evaluated together (one matrix product for their endpoints' projections).
const LAZY_BATCH: usize = 64;

#[derive(PartialEq)]
struct HeapEntry {
    gain: f64,
    candidate: usize,
    /// Number of conditioning directions the gain accounts for.
    step: usize,
    variance: f64,
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.gain
            .total_cmp(&other.gain)
            .then(other.candidate.cmp(&self.candidate))
    }
}

/// `greedy-dopt`: exact greedy maximisation of `log det(H + Σ_in-flight + Σ_batch)`. Each pick's score
/// is its marginal gain in nats; the gains add up to the increase of the log determinant.
pub fn greedy(round: &mut Round<'_>, eval: Evaluation) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let n = round.len();
    let k = input.k.min(n);
    let weights: Vec<f64> = (0..n).map(|c| round.weight(c)).collect();
    let in_flight = round.whitened_in_flight();
    let mut budget = round.budget();
    let s0 = round.variances().to_vec();
    let (z, _) = round.whitened();
    let z = z.as_ref();
    let mut cond = Conditioner::new(z, k + input.in_flight.len());

    // In-flight pairs first: condition on each.
    for (v, u) in input.in_flight.iter().zip(in_flight) {
        let p = sigmoid(dot(input.posterior.theta(), v));
        let w = p * (1.0 - p);
        let qu: Vec<f64> = (0..cond.steps).map(|j| dot(cond.q_col(j), &u)).collect();
        let s = (dot(&u, &u) - qu.iter().map(|c| c * c).sum::<f64>()).max(0.0);
        if w * s > 0.0 {
            cond.condition(u, &qu, w, s);
        }
    }

    let mut chosen = Vec::with_capacity(k);
    match eval {
        Evaluation::Lazy => {
            let mut heap: BinaryHeap<HeapEntry> = (0..n)
                .map(|c| HeapEntry {
                    gain: (weights[c] * s0[c]).ln_1p(),
                    candidate: c,
                    step: 0,
                    variance: s0[c],
                })
                .collect();
            let mut stale = Vec::with_capacity(LAZY_BATCH);
            let mut endpoints = Vec::with_capacity(2 * LAZY_BATCH);
            while chosen.len() < k {
                let Some(top) = heap.pop() else { break };
                let p = input.candidates[top.candidate];
                if !super::allowed(&budget, p) {
                    // A response of this pair is used up: the pair can never be picked this round.
                    continue;
                }
                let steps = cond.steps;
                if top.step == steps {
                    if let Some(b) = &mut budget {
                        b.take(p);
                    }
                    pick(
                        &mut cond,
                        p.a as usize,
                        p.b as usize,
                        weights[top.candidate],
                        top.variance,
                    );
                    chosen.push((top.candidate, top.gain));
                    continue;
                }
                // Re-evaluate the top and the next stale entries together. Evaluating more than strictly
                // needed is harmless: a fresh gain is exact and no larger than the bound it replaces.
                stale.push(top);
                while stale.len() < LAZY_BATCH && heap.peek().is_some_and(|e| e.step != steps) {
                    stale.push(heap.pop().expect("peeked"));
                }
                endpoints.clear();
                for e in &stale {
                    let p = input.candidates[e.candidate];
                    endpoints.extend([p.a as usize, p.b as usize]);
                }
                cond.ensure_many(&mut endpoints);
                for e in stale.drain(..) {
                    let p = input.candidates[e.candidate];
                    let s = cond.variance(p.a as usize, p.b as usize, e.variance, e.step);
                    heap.push(HeapEntry {
                        gain: (weights[e.candidate] * s).ln_1p(),
                        candidate: e.candidate,
                        step: steps,
                        variance: s,
                    });
                }
            }
        }
        Evaluation::Eager => {
            let mut taken = vec![false; n];
            while chosen.len() < k {
                let mut best: Option<(usize, f64, f64)> = None;
                for c in (0..n).filter(|&c| !taken[c]) {
                    let p = input.candidates[c];
                    if !super::allowed(&budget, p) {
                        continue;
                    }
                    let s = cond.variance(p.a as usize, p.b as usize, s0[c], 0);
                    let g = (weights[c] * s).ln_1p();
                    if best.is_none_or(|(_, bg, _)| g > bg) {
                        best = Some((c, g, s));
                    }
                }
                let Some((c, g, s)) = best else { break };
                let p = input.candidates[c];
                if let Some(b) = &mut budget {
                    b.take(p);
                }
                pick(&mut cond, p.a as usize, p.b as usize, weights[c], s);
                taken[c] = true;
                chosen.push((c, g));
            }
        }
    }
    Ok(round.picks(chosen))
}

/// Conditions on a picked pair (its projections are fresh: the caller just evaluated it).
fn pick(cond: &mut Conditioner<'_>, a: usize, b: usize, w: f64, s: f64) {
    cond.ensure(a);
    cond.ensure(b);
    let qu: Vec<f64> = cond.proj[a]
        .iter()
        .zip(&cond.proj[b])
        .map(|(x, y)| x - y)
        .collect();
    let u: Vec<f64> = cond
        .column(a)
        .iter()
        .zip(cond.column(b))
        .map(|(x, y)| x - y)
        .collect();
    if w * s > 0.0 {
        cond.condition(u, &qu, w, s);
    }
}

/// The paper's rule computed the obvious way: every candidate's difference vector materialised, the
/// Fisher matrix summed pair by pair, then one solve per candidate. The benchmark baseline for `dopt`.
pub fn dopt_naive(round: &mut Round<'_>, params: &SelectionParams) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let d = input.embeddings.nrows();
    let n = round.len();
    let vt = Mat::<f64>::from_fn(d, n, |i, c| {
        let p = input.candidates[c];
        input.embeddings[(i, p.a as usize)] - input.embeddings[(i, p.b as usize)]
    });
    let w: Vec<f64> = (0..n).map(|c| round.weight(c)).collect();
    let mut m = Mat::<f64>::identity(d, d) * faer::Scale(params.epsilon);
    linalg::add_weighted_gram_lower(m.as_mut(), vt.as_ref(), &w, linalg::matrix_par());
    let l = cholesky_lower(m.as_ref()).ok_or(CoreError::NotPositiveDefinite {
        context: "candidate design matrix",
    })?;
    let mut u = vt;
    linalg::whiten_in_place(l.as_ref(), u.as_mut(), Par::Seq);
    let scores: Vec<f64> = (0..n)
        .map(|c| w[c] * (0..d).map(|i| u[(i, c)] * u[(i, c)]).sum::<f64>())
        .collect();
    Ok(round.picks(top_k(&scores, round.ranking_len())))
}

#[cfg(test)]
mod tests;
