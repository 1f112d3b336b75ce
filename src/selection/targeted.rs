//! `targeted`: pick the comparisons that most reduce the uncertainty of the reward gaps the model will be
//! judged on.
//!
//! A reward model is used to rank the responses to one prompt, so what matters is the posterior variance of
//! *within-prompt* gaps `uᵀθ`, `u = x_i − x_j`, not of every direction of θ. D-optimal selection
//! (`greedy-dopt`) spends labels on whatever directions are most uncertain; with a well-chosen prior those are
//! the large-norm directions of the pool (topic, length), which order prompts but not responses within one.
//! This rule aims at the target directions instead.
//!
//! With `Σ = H⁻¹` and `T = (1/m) Σ_j u_j u_jᵀ` over m target pairs, labelling pair v (Fisher weight w)
//! turns `Σ` into `Σ − w Σvvᵀ Σ / (1 + w vᵀΣv)` (Sherman–Morrison), which lowers the mean target variance
//! `tr(TΣ)` by
//!
//! `w · vᵀΣTΣv / (1 + w vᵀΣv) = w · mean_j (u_jᵀΣv)² / (1 + w vᵀΣv)`   ([`TargetScore::Variance`]),
//!
//! or, in information form (the expected information a label gives about each target gap, averaged),
//!
//! `mean_j −ln(1 − w (u_jᵀΣv)² / ((1 + w vᵀΣv) u_jᵀΣu_j))`   ([`TargetScore::Information`]).
//!
//! The Fisher weight does not depend on the label, so the batch is built greedily without labels: after each
//! pick `Σ` is conditioned on it exactly, and requests in flight are conditioned on first. The gain is not
//! submodular, so every step rescans every candidate (no lazy heap).
//!
//! **Cost.** In whitened coordinates (`z = Fᵀx`, `F Fᵀ = Σ`) the round keeps `G = UᵀΣ_t X` (m × N: every
//! target against every pooled response) and the candidates' variances `s_t`. A candidate's cross terms are
//! `G[:, a] − G[:, b]`, so it costs O(m) to score; conditioning on a pick is a rank-one update of G and of
//! `s_t`, plus one pass over the whitened pool (O(N d)). Targets are a uniform sample of at most
//! `SelectionParams::targeted_targets` within-prompt pairs of the pool, which estimates `T` without bias.

use faer::{Accum, Mat, Par};
use rand::Rng;
use rayon::prelude::*;

use super::{allowed, Pick, Round, SelectionParams};
use crate::candidates::Pair;
use crate::error::CoreError;
use crate::linalg::{self, dot, sigmoid};

/// How a candidate's effect on the target gaps is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetScore {
    /// Reduction of the mean posterior variance of the target gaps.
    Variance,
    /// Mean over targets of the information (nats) the label carries about the target gap.
    Information,
}

/// The round's conditioning state in whitened coordinates (see the module doc).
struct State {
    /// Whitened target differences, d × m.
    u: Mat<f64>,
    /// `G = Uᵀ Σ_t X`, m × N column-major (response i's m cross terms are `g[i m..(i + 1) m]`).
    g: Vec<f64>,
    /// Posterior variance `u_jᵀ Σ_t u_j` of each target gap.
    target_var: Vec<f64>,
    /// Conditioning directions `q` (whitened, scaled): `Σ_t = I − Σ q qᵀ` in whitened coordinates.
    q: Vec<Vec<f64>>,
}

impl State {
    /// `Σ_t u` for a whitened vector u: u minus its projections on the conditioning directions.
    fn conditioned(&self, u: &[f64]) -> Vec<f64> {
        let mut out = u.to_vec();
        for q in &self.q {
            let c = dot(q, u);
            out.iter_mut().zip(q).for_each(|(o, qi)| *o -= c * qi);
        }
        out
    }

    /// Conditions on a label with whitened difference `u` and Fisher weight `w`; returns `qᵀz_i` for every
    /// pooled response, which the caller uses to update candidate variances. `None` when the label carries
    /// no information (w·s = 0).
    fn condition(&mut self, z: &Mat<f64>, u: &[f64], w: f64) -> Option<Vec<f64>> {
        let mut q = self.conditioned(u);
        let s = dot(u, &q);
        if w * s <= 0.0 || (w * s).is_nan() {
            return None;
        }
        let scale = (w / (1.0 + w * s)).sqrt();
        q.iter_mut().for_each(|x| *x *= scale);
        // a = Uᵀq (m), b = Zᵀq (N); G −= a bᵀ, target variances −= a².
        // Uᵀq is small (m × d): one thread.
        let qm = faer::MatRef::from_column_major_slice(&q, q.len(), 1);
        let mut a = Mat::<f64>::zeros(self.u.ncols(), 1);
        faer::linalg::matmul::matmul(
            a.as_mut(),
            Accum::Replace,
            self.u.transpose(),
            qm,
            1.0,
            Par::Seq,
        );
        let mut b = Mat::<f64>::zeros(z.ncols(), 1);
        faer::linalg::matmul::matmul(b.as_mut(), Accum::Replace, z.transpose(), qm, 1.0, Par::Seq);
        let a: Vec<f64> = (0..a.nrows()).map(|j| a[(j, 0)]).collect();
        let b: Vec<f64> = (0..b.nrows()).map(|i| b[(i, 0)]).collect();
        let m = a.len();
        if m > 0 {
            self.g.par_chunks_mut(m).zip(&b).for_each(|(col, &bi)| {
                col.iter_mut().zip(&a).for_each(|(x, aj)| *x -= aj * bi);
            });
        }
        for (v, aj) in self.target_var.iter_mut().zip(&a) {
            *v = (*v - aj * aj).max(0.0);
        }
        self.q.push(q);
        Some(b)
    }
}

/// Score of a candidate whose target cross terms are `ga − gb`, variance `s` and Fisher weight `w`.
fn score(kind: TargetScore, ga: &[f64], gb: &[f64], target_var: &[f64], w: f64, s: f64) -> f64 {
    let m = ga.len() as f64;
    let denom = 1.0 + w * s;
    match kind {
        TargetScore::Variance => {
            let num: f64 = ga.iter().zip(gb).map(|(x, y)| (x - y) * (x - y)).sum();
            w * num / (m * denom)
        }
        TargetScore::Information => {
            // −Σ ln(1 − r_j), taking one logarithm per 16 targets: the product of 16 factors in
            // [1e-12, 1] cannot underflow, and logarithms dominated the cost of this form.
            let mut total = 0.0;
            let mut product = 1.0;
            for (j, ((x, y), &tv)) in ga.iter().zip(gb).zip(target_var).enumerate() {
                if tv > 0.0 {
                    let c = x - y;
                    // ≤ w s / (1 + w s) < 1 by Cauchy–Schwarz; the clamp only guards rounding.
                    let r = (w * c * c / (denom * tv)).min(1.0 - 1e-12);
                    product *= 1.0 - r;
                }
                if j % 16 == 15 {
                    total -= product.ln();
                    product = 1.0;
                }
            }
            (total - product.ln()) / m
        }
    }
}

/// `targeted` (see the module doc). Each pick's score is its gain at the time it was picked.
pub fn targeted(
    round: &mut Round<'_>,
    params: &SelectionParams,
    kind: TargetScore,
    rng: &mut impl Rng,
) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let n = round.len();
    let k = input.k.min(n);
    let weights: Vec<f64> = (0..n).map(|c| round.weight(c)).collect();
    let pool_targets = if input.targets.is_empty() {
        input.candidates
    } else {
        input.targets
    };
    let m = pool_targets.len().min(params.targeted_targets);
    let targets: Vec<Pair> = rand::seq::index::sample(rng, pool_targets.len(), m)
        .into_iter()
        .map(|j| pool_targets[j])
        .collect();
    let in_flight = round.whitened_in_flight();
    let mut budget = round.budget();
    let mut s = round.variances().to_vec();
    let (z, _) = round.whitened();
    let d = z.nrows();
    let u = Mat::<f64>::from_fn(d, m, |r, j| {
        let p = targets[j];
        z[(r, p.a as usize)] - z[(r, p.b as usize)]
    });
    let mut gm = Mat::<f64>::zeros(m, z.ncols());
    faer::linalg::matmul::matmul(
        gm.as_mut(),
        Accum::Replace,
        u.transpose(),
        z.as_ref(),
        1.0,
        linalg::matrix_par(),
    );
    let mut g = Vec::with_capacity(m * z.ncols());
    for i in 0..z.ncols() {
        g.extend(gm.col(i).iter());
    }
    drop(gm);
    let target_var = (0..m)
        .map(|j| u.col(j).iter().map(|x| x * x).sum())
        .collect();
    let mut state = State {
        u,
        g,
        target_var,
        q: Vec::with_capacity(k + in_flight.len()),
    };
    let update_variances = |s: &mut Vec<f64>, b: &[f64]| {
        s.par_iter_mut().enumerate().for_each(|(c, sc)| {
            let p = input.candidates[c];
            let t = b[p.a as usize] - b[p.b as usize];
            *sc = (*sc - t * t).max(0.0);
        })
    };
    for (v, uf) in input.in_flight.iter().zip(&in_flight) {
        let p = sigmoid(dot(input.posterior.theta(), v));
        if let Some(b) = state.condition(z, uf, p * (1.0 - p)) {
            update_variances(&mut s, &b);
        }
    }

    let mut taken = vec![false; n];
    let mut chosen = Vec::with_capacity(k);
    while chosen.len() < k {
        let g = &state.g;
        let col = |i: usize| -> &[f64] { &g[i * m..(i + 1) * m] };
        let best = (0..n)
            .into_par_iter()
            .filter(|&c| !taken[c] && allowed(&budget, input.candidates[c]))
            .map(|c| {
                let p = input.candidates[c];
                let sc = score(
                    kind,
                    col(p.a as usize),
                    col(p.b as usize),
                    &state.target_var,
                    weights[c],
                    s[c],
                );
                (c, sc)
            })
            // Highest score; ties to the lower index, so the result does not depend on the threads.
            .reduce_with(|x, y| match x.1.total_cmp(&y.1) {
                std::cmp::Ordering::Less => y,
                std::cmp::Ordering::Greater => x,
                std::cmp::Ordering::Equal => {
                    if x.0 <= y.0 {
                        x
                    } else {
                        y
                    }
                }
            });
        let Some((c, gain)) = best else { break };
        taken[c] = true;
        let p = input.candidates[c];
        if let Some(b) = &mut budget {
            b.take(p);
        }
        chosen.push((c, gain));
        if chosen.len() == k {
            break;
        }
        let uc: Vec<f64> = (0..d)
            .map(|r| z[(r, p.a as usize)] - z[(r, p.b as usize)])
            .collect();
        if let Some(b) = state.condition(z, &uc, weights[c]) {
            update_variances(&mut s, &b);
        }
    }
    Ok(round.picks(chosen))
}

#[cfg(test)]
mod tests;
