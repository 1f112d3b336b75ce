//! `bald` and `batch-bald`: mutual information between labels and θ under the Gaussian posterior.
//!
//! **BALD** (Houlsby et al. 2011). For one pair the reward gap is `t = θᵀv ~ N(m, s)` (`m = θ̂ᵀv`,
//! `s = vᵀH⁻¹v`) and the label is Bernoulli(σ(t)). The information the label carries about θ is
//! `I = H[E σ(t)] − E[H(σ(t))]` (nats). Both expectations are 1-D Gaussian integrals, computed with an
//! n-node Gauss–Hermite rule: `E f(t) ≈ π^{-1/2} Σ_i w_i f(m + √(2s) x_i)`. We evaluate the equivalent form
//! `I = E_t KL(Bern(σ(t)) ‖ Bern(p̄))`, `p̄ = E σ(t)` (the same number under the same rule, since the rule's
//! weights sum to one and reproduce `p̄`), because its terms are ≥ 0 and do not cancel catastrophically when
//! `s` is small. For small `s`, `I ≈ ½·w·s` with `w = σ(m)(1 − σ(m))`: half the D-optimal gain
//! `log(1 + w s) ≈ w s`.
//!
//! **BatchBALD** (Kirsch, van Amersfoort & Gal 2019) picks the batch greedily by the joint mutual
//! information `I(y_1..y_n; θ) = H(y_1..y_n) − Σ_i E[H(y_i | θ)]`. The expectation over θ uses `S` posterior
//! samples shared by all candidates (`params.batch_bald_samples`): with `θ = θ̂ + L⁻ᵀε`, `ε ~ N(0, I_d)`,
//! the gap of pair (a, b) is `t = m + εᵀ(z_a − z_b)` where `z = L⁻¹x` is the whitened pool, so one product
//! `Eᵀ Z` gives every candidate's samples. The greedy runs over the top `params.batch_bald_shortlist`
//! candidates by BALD (raised to k when k is larger): joint MI of a pair set is expensive to evaluate, and a
//! pair outside the BALD shortlist carries little information on its own, which upper-bounds its marginal
//! gain (the gain of adding y to a batch never exceeds its own BALD).
//!
//! The marginal gain of candidate c given the batch A is `H(y_c | y_A) − E H(y_c | θ)`. [`JointMi`] keeps
//! the label configurations `y_A` of the batch: for each one, its probability `ω_r` and the posterior over
//! the S samples given it, so `p(y_c = 1 | y_r) = Σ_j P(θ_j | y_r) σ(t_cj)`. While the configurations number
//! at most [`MAX_EXACT_CONFIGURATIONS`] (2^10) all are enumerated and the joint entropy is exact for the
//! empirical measure over the S samples. Beyond it, [`SAMPLED_CONFIGURATIONS`] configurations are drawn from
//! the joint label distribution (first from the enumerated ones by their probability, then extended by
//! ancestral sampling of each new label given its configuration) and `H(y_c | y_A)` is their average — the
//! Monte Carlo estimator of Kirsch et al. In the exact regime the gains shrink as the batch grows (joint MI of
//! conditionally independent labels is submodular), so lazy evaluation with a max-heap picks exactly what
//! eager greedy would; in the sampled regime the gains are estimates and lazy evaluation is a (standard)
//! approximation. Stale candidates are re-evaluated `EVAL_BATCH` (32) at a time with one matrix product. A
//! pick's score is its marginal gain (clamped at 0, which only matters for sampled estimates); the scores
//! add up to the batch's joint MI estimate. Unlike `greedy-dopt`, in-flight requests are not part of the
//! batch.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::f64::consts::PI;

use faer::{Accum, Mat, MatRef, Par};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::{top_k, Pick, Round, SelectionParams};
use crate::error::CoreError;
use crate::linalg::sigmoid;

/// Largest number of label configurations BatchBALD enumerates exactly (2^10).
pub const MAX_EXACT_CONFIGURATIONS: usize = 1 << 10;
/// Number of label configurations BatchBALD samples once enumeration would exceed the cap.
pub const SAMPLED_CONFIGURATIONS: usize = 1 << 10;

/// An n-node Gauss–Hermite rule for `∫ e^{-x²} f(x) dx ≈ Σ w_i f(x_i)`, exact for polynomials of degree
/// `≤ 2n − 1`.
#[derive(Clone, Debug)]
pub struct GaussHermite {
    /// Nodes, in decreasing order (symmetric about 0).
    pub nodes: Vec<f64>,
    /// Weights (positive, summing to √π).
    pub weights: Vec<f64>,
}

impl GaussHermite {
    /// Nodes by Newton's method on the orthonormal Hermite polynomials (three-term recurrence), starting
    /// from the asymptotic guesses of Numerical Recipes' `gauher`; weights `2 / H̃'_n(x_i)²`. Accurate to a
    /// few ulps for `n ≤ 100`.
    pub fn new(n: usize) -> Self {
        let mut x = vec![0.0; n];
        let mut w = vec![0.0; n];
        let pim4 = PI.powf(-0.25);
        let nf = n as f64;
        for i in 0..n.div_ceil(2) {
            let mut z = match i {
                0 => (2.0 * nf + 1.0).sqrt() - 1.85575 * (2.0 * nf + 1.0).powf(-0.16667),
                1 => x[0] - 1.14 * nf.powf(0.426) / x[0],
                2 => 1.86 * x[1] - 0.86 * x[0],
                3 => 1.91 * x[2] - 0.91 * x[1],
                _ => 2.0 * x[i - 1] - x[i - 2],
            };
            let mut pp = 1.0;
            for _ in 0..100 {
                // p1 = H̃_n(z), p2 = H̃_{n−1}(z) (orthonormal w.r.t. e^{-x²}).
                let (mut p1, mut p2) = (pim4, 0.0);
                for j in 0..n {
                    let p3 = p2;
                    p2 = p1;
                    let jf = j as f64;
                    p1 = z * (2.0 / (jf + 1.0)).sqrt() * p2 - (jf / (jf + 1.0)).sqrt() * p3;
                }
                pp = (2.0 * nf).sqrt() * p2;
                let dz = p1 / pp;
                z -= dz;
                if dz.abs() <= 4.0 * f64::EPSILON * z.abs().max(1.0) {
                    break;
                }
            }
            x[i] = z;
            x[n - 1 - i] = -z;
            w[i] = 2.0 / (pp * pp);
            w[n - 1 - i] = w[i];
        }
        if n % 2 == 1 {
            x[n / 2] = 0.0; // exact by symmetry
        }
        Self {
            nodes: x,
            weights: w,
        }
    }

    /// `E f(t)` for `t ~ N(mean, var)`.
    pub fn expect(&self, mean: f64, var: f64, f: impl Fn(f64) -> f64) -> f64 {
        let scale = (2.0 * var.max(0.0)).sqrt();
        let sum: f64 = self
            .nodes
            .iter()
            .zip(&self.weights)
            .map(|(&x, &w)| w * f(mean + scale * x))
            .sum();
        sum / PI.sqrt()
    }
}

/// BALD score (nats) of a pair whose reward gap is `N(m, s)`: `H[E σ(t)] − E[H(σ(t))]`, ≥ 0.
pub fn bald_score(m: f64, s: f64, rule: &GaussHermite) -> f64 {
    if s <= 0.0 || !s.is_finite() {
        return 0.0;
    }
    let scale = (2.0 * s).sqrt();
    let norm = PI.sqrt();
    // Per node: σ(t), σ(−t), log σ(t), log σ(−t) from one exp and one log (nodes ≤ 100, see
    // `SelectionParams::validate`; larger rules fall back to a heap buffer).
    let mut stack = [[0.0f64; 4]; 100];
    let mut heap = Vec::new();
    let vals: &mut [[f64; 4]] = if rule.nodes.len() <= stack.len() {
        &mut stack[..rule.nodes.len()]
    } else {
        heap.resize(rule.nodes.len(), [0.0; 4]);
        &mut heap
    };
    // p̄ and 1 − p̄ summed separately, so neither loses digits when p̄ is near 0 or 1.
    let (mut p_bar, mut q_bar) = (0.0, 0.0);
    for ((v, &x), &w) in vals.iter_mut().zip(&rule.nodes).zip(&rule.weights) {
        let t = m + scale * x;
        let e = (-t.abs()).exp();
        let l = e.ln_1p();
        let (big, small) = (1.0 / (1.0 + e), e / (1.0 + e));
        *v = if t >= 0.0 {
            [big, small, -l, -t - l]
        } else {
            [small, big, t - l, -l]
        };
        p_bar += w * v[0];
        q_bar += w * v[1];
    }
    let (ln_p, ln_q) = ((p_bar / norm).ln(), (q_bar / norm).ln());
    let mut i = 0.0;
    for (v, &w) in vals.iter().zip(&rule.weights) {
        // KL(Bern(σ(t)) ‖ Bern(p̄)); a zero probability contributes nothing.
        let [p, q, lp, lq] = *v;
        let mut kl = 0.0;
        if p > 0.0 {
            kl += p * (lp - ln_p);
        }
        if q > 0.0 {
            kl += q * (lq - ln_q);
        }
        i += w * kl;
    }
    (i / norm).max(0.0)
}

/// BALD scores of every candidate of the round (computes the pair variances).
pub fn bald_scores(round: &mut Round<'_>, params: &SelectionParams) -> Vec<f64> {
    let rule = GaussHermite::new(params.gauss_hermite_nodes);
    let m: Vec<f64> = (0..round.len()).map(|c| round.margin(c)).collect();
    let s = round.variances();
    m.par_iter()
        .zip(s.par_iter())
        .map(|(&m, &s)| bald_score(m, s, &rule))
        .collect()
}

/// `bald`: top-k candidates by BALD score.
pub fn bald(round: &mut Round<'_>, params: &SelectionParams) -> Vec<Pick> {
    let scores = bald_scores(round, params);
    round.picks(top_k(&scores, round.ranking_len()))
}

/// Binary entropy (nats) of probability `p`.
fn binary_entropy(p: f64) -> f64 {
    let mut h = 0.0;
    if p > 0.0 {
        h -= p * p.ln();
    }
    if p < 1.0 {
        h -= (1.0 - p) * (1.0 - p).ln();
    }
    h.max(0.0)
}

/// Joint label distribution of a growing batch, over a fixed set of `S` posterior samples (see the module
/// doc). Each label enters as its vector of `p(y = 1 | θ_j)` over the samples.
#[derive(Clone, Debug)]
pub struct JointMi {
    samples: usize,
    /// One row per configuration: `P(θ_j | y_r)` (sums to 1), row-major `configurations × samples`.
    rows: Vec<f64>,
    /// `ω_r`: probability of configuration r (exact) or `1/M` (sampled).
    weights: Vec<f64>,
    exact: bool,
    max_exact: usize,
    sampled: usize,
    total: f64,
}

impl JointMi {
    /// The empty batch over `samples` posterior samples; enumerates while configurations `≤ max_exact`,
    /// then keeps `sampled` sampled configurations.
    pub fn new(samples: usize, max_exact: usize, sampled: usize) -> Self {
        assert!(samples > 0 && max_exact > 0 && sampled > 0);
        Self {
            samples,
            rows: vec![1.0 / samples as f64; samples],
            weights: vec![1.0],
            exact: true,
            max_exact,
            sampled,
            total: 0.0,
        }
    }

    /// Number of configurations currently held.
    pub fn configurations(&self) -> usize {
        self.weights.len()
    }

    /// Whether the joint entropy is still enumerated exactly.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Joint MI of the labels added so far (sum of the gains returned by [`JointMi::add`]).
    pub fn total(&self) -> f64 {
        self.total
    }

    /// `E H(y | θ)` over the samples for a label with sample probabilities `p`.
    pub fn conditional_entropy(p: &[f64]) -> f64 {
        p.iter().map(|&x| binary_entropy(x)).sum::<f64>() / p.len() as f64
    }

    /// `H(y | y_A)`: the label's entropy given the batch's labels.
    fn entropy_given_batch(&self, p: &[f64]) -> f64 {
        self.rows
            .chunks_exact(self.samples)
            .zip(&self.weights)
            .map(|(row, &w)| {
                let (q1, q0) = row_split(row, p);
                w * binary_entropy(q1 / (q1 + q0).max(f64::MIN_POSITIVE))
            })
            .sum()
    }

    /// Marginal joint-MI gain of a label with sample probabilities `p` (length `samples`); `cond` is
    /// [`JointMi::conditional_entropy`] of `p`.
    pub fn gain_with(&self, p: &[f64], cond: f64) -> f64 {
        debug_assert_eq!(p.len(), self.samples);
        self.entropy_given_batch(p) - cond
    }

    /// Marginal joint-MI gains of several labels at once (`conds[i]` is the conditional entropy of
    /// `probs[i]`): one matrix product of the configurations' sample posteriors with `[P, 1 − P]`.
    pub fn gains(&self, probs: &[&[f64]], conds: &[f64]) -> Vec<f64> {
        let (r, s, b) = (self.configurations(), self.samples, probs.len());
        let rows = MatRef::from_row_major_slice(&self.rows, r, s);
        let p = Mat::<f64>::from_fn(s, 2 * b, |j, c| {
            if c < b {
                probs[c][j]
            } else {
                1.0 - probs[c - b][j]
            }
        });
        let mut q = Mat::<f64>::zeros(r, 2 * b);
        let par = if r * s * b > 1 << 22 {
            crate::linalg::matrix_par()
        } else {
            Par::Seq
        };
        faer::linalg::matmul::matmul(q.as_mut(), Accum::Replace, rows, p.as_ref(), 1.0, par);
        (0..b)
            .map(|c| {
                let h: f64 = (0..r)
                    .map(|row| {
                        let (q1, q0) = (q[(row, c)], q[(row, b + c)]);
                        self.weights[row] * binary_entropy(q1 / (q1 + q0).max(f64::MIN_POSITIVE))
                    })
                    .sum();
                h - conds[c]
            })
            .collect()
    }

    /// Marginal joint-MI gain of a label with sample probabilities `p`.
    pub fn gain(&self, p: &[f64]) -> f64 {
        self.gain_with(p, Self::conditional_entropy(p))
    }

    /// Adds a label to the batch; returns its marginal gain. `rng` drives the configuration sampling once
    /// enumeration would exceed the cap.
    pub fn add(&mut self, p: &[f64], rng: &mut impl Rng) -> f64 {
        let gain = self.gain(p);
        let s = self.samples;
        if self.exact && 2 * self.configurations() > self.max_exact {
            self.resample(rng);
        }
        let mut rows = Vec::with_capacity(self.rows.len() * if self.exact { 2 } else { 1 });
        let mut weights = Vec::with_capacity(self.weights.len() * 2);
        for (row, &w) in self.rows.chunks_exact(s).zip(&self.weights) {
            let (q1, q0) = row_split(row, p);
            if self.exact {
                for (label, q) in [(true, q1), (false, q0)] {
                    if w * q > 0.0 {
                        weights.push(w * q);
                        push_conditioned(&mut rows, row, p, label, q);
                    }
                }
            } else {
                let label = rng.random::<f64>() * (q1 + q0) < q1;
                let q = if label { q1 } else { q0 };
                weights.push(w);
                push_conditioned(&mut rows, row, p, label, q);
            }
        }
        if self.exact {
            // Renormalise against rounding drift (the weights sum to 1 mathematically).
            let total: f64 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= total);
        }
        self.rows = rows;
        self.weights = weights;
        self.total += gain;
        gain
    }

    /// Replaces the enumerated configurations by `sampled` draws from their distribution.
    fn resample(&mut self, rng: &mut impl Rng) {
        let s = self.samples;
        let mut cdf = Vec::with_capacity(self.weights.len());
        let mut acc = 0.0;
        for &w in &self.weights {
            acc += w;
            cdf.push(acc);
        }
        let mut rows = Vec::with_capacity(self.sampled * s);
        for _ in 0..self.sampled {
            let u = rng.random::<f64>() * acc;
            let r = cdf.partition_point(|&c| c <= u).min(cdf.len() - 1);
            rows.extend_from_slice(&self.rows[r * s..(r + 1) * s]);
        }
        self.rows = rows;
        self.weights = vec![1.0 / self.sampled as f64; self.sampled];
        self.exact = false;
    }
}

/// `(Σ_j row_j p_j, Σ_j row_j (1 − p_j))`: the unnormalised `p(y = 1 | y_r)` and `p(y = 0 | y_r)`.
fn row_split(row: &[f64], p: &[f64]) -> (f64, f64) {
    row.iter().zip(p).fold((0.0, 0.0), |(a, b), (&r, &pj)| {
        (a + r * pj, b + r * (1.0 - pj))
    })
}

/// Appends the row conditioned on the new label: `row_j p(label | θ_j) / q`.
fn push_conditioned(rows: &mut Vec<f64>, row: &[f64], p: &[f64], label: bool, q: f64) {
    if q > 0.0 {
        rows.extend(row.iter().zip(p).map(|(&r, &pj)| {
            let l = if label { pj } else { 1.0 - pj };
            r * l / q
        }));
    } else {
        // Only reached for a sampled configuration whose label had probability 0 (cannot be drawn).
        rows.extend_from_slice(row);
    }
}

/// Sample probabilities `σ(θ_jᵀv_c)` (rows: candidates of `shortlist`, columns: `samples` draws of θ).
fn sample_probabilities(
    round: &mut Round<'_>,
    shortlist: &[usize],
    samples: usize,
    rng: &mut impl Rng,
) -> Vec<Vec<f64>> {
    let pairs = round.input.candidates;
    let margins: Vec<f64> = shortlist.iter().map(|&c| round.margin(c)).collect();
    // Responses the shortlist touches, and their column in the gathered block.
    let mut col = std::collections::HashMap::new();
    let mut responses = Vec::new();
    for &c in shortlist {
        for r in [pairs[c].a, pairs[c].b] {
            col.entry(r).or_insert_with(|| {
                responses.push(r as usize);
                responses.len() - 1
            });
        }
    }
    let (z, _) = round.whitened();
    let d = z.nrows();
    let eps = Mat::<f64>::from_fn(d, samples, |_, _| StandardNormal.sample(rng));
    let zs = Mat::<f64>::from_fn(d, responses.len(), |i, j| z[(i, responses[j])]);
    // g[j, r] = ε_jᵀ z_r.
    let mut g = Mat::<f64>::zeros(samples, responses.len());
    faer::linalg::matmul::matmul(
        g.as_mut(),
        Accum::Replace,
        eps.transpose(),
        zs.as_ref(),
        1.0,
        if d * samples * responses.len() > 1 << 20 {
            crate::linalg::matrix_par()
        } else {
            Par::Seq
        },
    );
    shortlist
        .par_iter()
        .zip(margins.par_iter())
        .map(|(&c, &m)| {
            let (a, b) = (col[&pairs[c].a], col[&pairs[c].b]);
            (0..samples)
                .map(|j| sigmoid(m + g[(j, a)] - g[(j, b)]))
                .collect()
        })
        .collect()
}

#[derive(PartialEq)]
struct HeapEntry {
    gain: f64,
    /// Position in the shortlist.
    slot: usize,
    /// Batch size the gain was computed at.
    step: usize,
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
            .then(other.slot.cmp(&self.slot))
    }
}

/// Stale candidates re-evaluated together by the lazy greedy (one matrix product instead of as many
/// matrix–vector products; re-evaluating a few extra candidates never changes the picks).
const EVAL_BATCH: usize = 32;

/// Lazy greedy maximisation of joint MI over labels given by their sample probabilities; returns
/// `(index into probs, marginal gain)` in pick order. A candidate is picked only when its gain is fresh
/// and still on top of the heap of (stale) upper bounds.
pub fn greedy_joint_mi(
    probs: &[Vec<f64>],
    k: usize,
    state: &mut JointMi,
    rng: &mut impl Rng,
    mut admit: impl FnMut(usize, bool) -> bool,
) -> Vec<(usize, f64)> {
    let cond: Vec<f64> = probs
        .par_iter()
        .map(|p| JointMi::conditional_entropy(p))
        .collect();
    let mut heap: BinaryHeap<HeapEntry> = (0..probs.len())
        .map(|slot| HeapEntry {
            gain: state.gain_with(&probs[slot], cond[slot]),
            slot,
            step: 0,
        })
        .collect();
    let mut chosen = Vec::with_capacity(k.min(probs.len()));
    while chosen.len() < k {
        let Some(top) = heap.pop() else { break };
        if !admit(top.slot, false) {
            continue;
        }
        let step = chosen.len();
        if top.step == step {
            admit(top.slot, true);
            let gain = state.add(&probs[top.slot], rng);
            chosen.push((top.slot, gain.max(0.0)));
            continue;
        }
        let mut batch = vec![top.slot];
        while batch.len() < EVAL_BATCH && heap.peek().is_some_and(|e| e.step != step) {
            batch.push(heap.pop().expect("peeked").slot);
        }
        let refs: Vec<&[f64]> = batch.iter().map(|&c| probs[c].as_slice()).collect();
        let conds: Vec<f64> = batch.iter().map(|&c| cond[c]).collect();
        for (slot, gain) in batch.into_iter().zip(state.gains(&refs, &conds)) {
            heap.push(HeapEntry { gain, slot, step });
        }
    }
    chosen
}

/// `batch-bald`: greedy joint-MI batch over the BALD shortlist (see the module doc).
pub fn batch_bald(
    round: &mut Round<'_>,
    params: &SelectionParams,
    rng: &mut impl Rng,
) -> Result<Vec<Pick>, CoreError> {
    let k = round.input.k.min(round.len());
    let scores = bald_scores(round, params);
    let shortlist: Vec<usize> = top_k(&scores, params.batch_bald_shortlist.max(k))
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let probs = sample_probabilities(round, &shortlist, params.batch_bald_samples, rng);
    let mut state = JointMi::new(
        params.batch_bald_samples,
        MAX_EXACT_CONFIGURATIONS,
        SAMPLED_CONFIGURATIONS,
    );
    // The use limit: `admit(slot, false)` asks, `admit(slot, true)` takes.
    let mut budget = round.budget();
    let pairs = round.input.candidates;
    let admit = |slot: usize, take: bool| match &mut budget {
        None => true,
        Some(b) if take => b.take(pairs[shortlist[slot]]),
        Some(b) => b.allows(pairs[shortlist[slot]]),
    };
    let chosen = greedy_joint_mi(&probs, k, &mut state, rng, admit);
    Ok(round.picks(chosen.into_iter().map(|(slot, g)| (shortlist[slot], g))))
}

#[cfg(test)]
mod tests;
