//! `coreset`: the logistic-regression coreset of Huggins, Campbell & Broderick (2016) as a selection rule.
//!
//! 1. **Clusters.** k-means (`k = params.coreset_clusters`, capped at the number of candidates) on the
//!    candidates' difference vectors `v = x_a − x_b`, in the pool's embedding space (not whitened). Seeding
//!    is k-means++ with the round's rng, followed by at most [`LLOYD_ITERATIONS`] Lloyd iterations (stopping
//!    early when no assignment changes). When there are more than [`KMEANS_SAMPLE`] candidates the seeding
//!    and the Lloyd iterations run on a uniform subsample of that size; every candidate is then assigned to
//!    its nearest final centre. Difference vectors are never materialised: with the centres C (d×k),
//!    `‖v − c‖² = ‖v‖² − 2(x_aᵀc − x_bᵀc) + ‖c‖²`, so one product `CᵀX` over the pool gives every candidate's
//!    distances, and a cluster mean is `X·coef` with `coef` holding ±1/|G| at the member pairs' endpoints.
//! 2. **Sensitivities.** With clusters `G_1..G_k` of the N candidates (means `Ḡ_i`), candidate n gets
//!    `m_n = N / (1 + Σ_i |G_i^(−n)| exp(−R ‖Ḡ_i^(−n) − v_n‖))`, `R = params.coreset_radius`, where `G^(−n)`
//!    removes n from its own cluster: count `|G| − 1`, mean `(|G|Ḡ − v_n)/(|G| − 1)`, hence
//!    `‖Ḡ^(−n) − v_n‖ = |G|/(|G| − 1)·‖Ḡ − v_n‖` (a singleton's own cluster contributes nothing). Isolated
//!    candidates, far from every cluster, get sensitivities near N; those in dense clusters near N/|G|.
//! 3. **Sampling.** `k` distinct candidates drawn sequentially without replacement with probability
//!    ∝ sensitivity (Efraimidis–Spirakis keys `ln(u)/m_n`, top k, which is the same distribution as
//!    successive draws). A pick's score is its sensitivity.

use faer::{Accum, Mat, MatRef};
use rand::Rng;
use rayon::prelude::*;

use super::{scoring, top_k, Pick, Round, SelectionParams};
use crate::candidates::Pair;
use crate::error::CoreError;
use crate::linalg;

/// Largest number of candidates k-means runs on; larger candidate sets are subsampled uniformly.
pub const KMEANS_SAMPLE: usize = 8192;
/// Maximum number of Lloyd iterations after k-means++ seeding.
pub const LLOYD_ITERATIONS: usize = 10;

/// `‖x_a − x_b‖²` of every pair.
fn difference_sq_norms(x: MatRef<'_, f64>, pairs: &[Pair]) -> Vec<f64> {
    let norms = scoring::column_sq_norms(x);
    scoring::pair_sq_distances(x, &norms, pairs)
}

/// `CᵀX`: projection of every pool response onto every centre (k×N).
fn projections(x: MatRef<'_, f64>, centres: MatRef<'_, f64>) -> Mat<f64> {
    let mut p = Mat::<f64>::zeros(centres.ncols(), x.ncols());
    faer::linalg::matmul::matmul(
        p.as_mut(),
        Accum::Replace,
        centres.transpose(),
        x,
        1.0,
        linalg::matrix_par(),
    );
    p
}

/// Means (d×k) and sizes of the clusters of `members` (candidate indices) under `assign` (one cluster per
/// member). Empty clusters get a zero mean and size 0.
fn cluster_means(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    members: &[usize],
    assign: &[usize],
    k: usize,
) -> (Mat<f64>, Vec<usize>) {
    let mut counts = vec![0usize; k];
    for &g in assign {
        counts[g] += 1;
    }
    let mut coef = Mat::<f64>::zeros(x.ncols(), k);
    for (&c, &g) in members.iter().zip(assign) {
        let inv = 1.0 / counts[g] as f64;
        coef[(pairs[c].a as usize, g)] += inv;
        coef[(pairs[c].b as usize, g)] -= inv;
    }
    let mut means = Mat::<f64>::zeros(x.nrows(), k);
    faer::linalg::matmul::matmul(
        means.as_mut(),
        Accum::Replace,
        x,
        coef.as_ref(),
        1.0,
        linalg::matrix_par(),
    );
    (means, counts)
}

/// Column `r` of a column-major matrix as a slice.
#[inline]
fn col(m: &Mat<f64>, r: usize) -> &[f64] {
    m.col(r)
        .try_as_col_major()
        .expect("owned matrices are column-major")
        .as_slice()
}

/// Squared distance of a candidate (with `‖v‖² = v2` and centre projections `pa`, `pb` of its endpoints)
/// to centre `i`.
#[inline]
fn sq_dist(pa: &[f64], pb: &[f64], c2: &[f64], v2: f64, i: usize) -> f64 {
    (v2 - 2.0 * (pa[i] - pb[i]) + c2[i]).max(0.0)
}

/// Index of the nearest centre to pair `p` (lowest index on ties).
fn nearest(proj: &Mat<f64>, c2: &[f64], p: Pair, v2: f64) -> usize {
    let (pa, pb) = (col(proj, p.a as usize), col(proj, p.b as usize));
    let mut best = (0, f64::INFINITY);
    for i in 0..c2.len() {
        let d = sq_dist(pa, pb, c2, v2, i);
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

/// Cluster of every candidate's difference vector: k-means++ seeding and Lloyd iterations on (a
/// subsample of) the candidates, then nearest-centre assignment of all. Returns one cluster index in
/// `0..min(clusters, N)` per candidate.
pub fn kmeans(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    clusters: usize,
    rng: &mut impl Rng,
) -> Vec<usize> {
    kmeans_with_norms(x, pairs, &difference_sq_norms(x, pairs), clusters, rng)
}

/// [`kmeans`] given `‖v‖²` of every candidate.
fn kmeans_with_norms(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    v2_all: &[f64],
    clusters: usize,
    rng: &mut impl Rng,
) -> Vec<usize> {
    let n = pairs.len();
    let k = clusters.min(n);
    if k <= 1 {
        return vec![0; n];
    }
    let members: Vec<usize> = if n > KMEANS_SAMPLE {
        let mut s = rand::seq::index::sample(rng, n, KMEANS_SAMPLE).into_vec();
        s.sort_unstable();
        s
    } else {
        (0..n).collect()
    };
    let sub: Vec<Pair> = members.iter().map(|&c| pairs[c]).collect();
    let v2: Vec<f64> = members.iter().map(|&c| v2_all[c]).collect();
    let d = x.nrows();

    // k-means++: each new centre is a member drawn ∝ squared distance to the nearest chosen centre.
    let mut centres = Mat::<f64>::zeros(d, k);
    let mut d2 = vec![f64::INFINITY; sub.len()];
    let mut next = rng.random_range(0..sub.len());
    for i in 0..k {
        let p = sub[next];
        for r in 0..d {
            centres[(r, i)] = x[(r, p.a as usize)] - x[(r, p.b as usize)];
        }
        let ci = centres.subcols(i, 1);
        let proj = projections(x, ci);
        let c2 = [v2[next]];
        for (j, &q) in sub.iter().enumerate() {
            let (pa, pb) = (col(&proj, q.a as usize), col(&proj, q.b as usize));
            d2[j] = d2[j].min(sq_dist(pa, pb, &c2, v2[j], 0));
        }
        if i + 1 < k {
            let total: f64 = d2.iter().sum();
            next = if total > 0.0 && total.is_finite() {
                let u = rng.random::<f64>() * total;
                let mut acc = 0.0;
                let mut pick = sub.len() - 1;
                for (j, &w) in d2.iter().enumerate() {
                    acc += w;
                    if acc > u && w > 0.0 {
                        pick = j;
                        break;
                    }
                }
                pick
            } else {
                rng.random_range(0..sub.len())
            };
        }
    }

    // Lloyd iterations on the members.
    let mut assign = vec![usize::MAX; sub.len()];
    for _ in 0..LLOYD_ITERATIONS {
        let proj = projections(x, centres.as_ref());
        let c2 = scoring::column_sq_norms(centres.as_ref());
        let new: Vec<usize> = sub
            .par_iter()
            .zip(v2.par_iter())
            .map(|(&p, &v)| nearest(&proj, &c2, p, v))
            .collect();
        if new == assign {
            break;
        }
        assign = new;
        let (means, counts) = cluster_means(x, pairs, &members, &assign, k);
        for i in (0..k).filter(|&i| counts[i] > 0) {
            for r in 0..d {
                centres[(r, i)] = means[(r, i)];
            }
        }
    }

    // Every candidate to its nearest final centre.
    let proj = projections(x, centres.as_ref());
    let c2 = scoring::column_sq_norms(centres.as_ref());
    pairs
        .par_iter()
        .zip(v2_all.par_iter())
        .map(|(&p, &v)| nearest(&proj, &c2, p, v))
        .collect()
}

/// Huggins et al. sensitivity of every candidate given its cluster (see the module doc). `assignment`
/// holds one cluster index `< clusters` per candidate; `radius` is `R`.
pub fn sensitivities(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    assignment: &[usize],
    clusters: usize,
    radius: f64,
) -> Result<Vec<f64>, CoreError> {
    sensitivities_with_norms(
        x,
        pairs,
        &difference_sq_norms(x, pairs),
        assignment,
        clusters,
        radius,
    )
}

/// [`sensitivities`] given `‖v‖²` of every candidate.
fn sensitivities_with_norms(
    x: MatRef<'_, f64>,
    pairs: &[Pair],
    v2: &[f64],
    assignment: &[usize],
    clusters: usize,
    radius: f64,
) -> Result<Vec<f64>, CoreError> {
    crate::error::check_dim("cluster assignment", pairs.len(), assignment.len())?;
    if let Some(&bad) = assignment.iter().find(|&&g| g >= clusters) {
        return Err(CoreError::Index {
            what: "cluster assignment",
            index: bad,
            len: clusters,
        });
    }
    let n = pairs.len();
    let all: Vec<usize> = (0..n).collect();
    let (means, counts) = cluster_means(x, pairs, &all, assignment, clusters);
    let proj = projections(x, means.as_ref());
    let c2 = scoring::column_sq_norms(means.as_ref());
    Ok((0..n)
        .into_par_iter()
        .map(|c| {
            let own = assignment[c];
            let p = pairs[c];
            let (pa, pb) = (col(&proj, p.a as usize), col(&proj, p.b as usize));
            let mut sum = 0.0;
            for (i, &size) in counts.iter().enumerate() {
                // Leave-one-out size of cluster i and the distance to its leave-one-out mean.
                let count = if i == own {
                    size.saturating_sub(1)
                } else {
                    size
                };
                if count == 0 {
                    continue;
                }
                let mut dist = sq_dist(pa, pb, &c2, v2[c], i).sqrt();
                if i == own {
                    dist *= size as f64 / count as f64;
                }
                sum += count as f64 * (-radius * dist).exp();
            }
            n as f64 / (1.0 + sum)
        })
        .collect())
}

/// `min(k, N)` distinct indices drawn sequentially without replacement with probability ∝ `weights`
/// (Efraimidis–Spirakis: the k largest keys `ln(u)/w`). Zero or negative weights are drawn last.
pub fn sample_proportional(weights: &[f64], k: usize, rng: &mut impl Rng) -> Vec<usize> {
    let keys: Vec<f64> = weights
        .iter()
        .map(|&w| {
            // 1 − u ∈ (0, 1], so the logarithm is finite.
            let u = 1.0 - rng.random::<f64>();
            if w > 0.0 {
                u.ln() / w
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    top_k(&keys, k).into_iter().map(|(i, _)| i).collect()
}

/// `coreset`: k candidates sampled ∝ their Huggins et al. sensitivity.
pub fn coreset(
    round: &mut Round<'_>,
    params: &SelectionParams,
    rng: &mut impl Rng,
) -> Result<Vec<Pick>, CoreError> {
    let input = round.input;
    let k = params.coreset_clusters.min(round.len()).max(1);
    let v2 = difference_sq_norms(input.embeddings, input.candidates);
    let assignment = kmeans_with_norms(input.embeddings, input.candidates, &v2, k, rng);
    let sens = sensitivities_with_norms(
        input.embeddings,
        input.candidates,
        &v2,
        &assignment,
        k,
        params.coreset_radius,
    )?;
    let chosen = sample_proportional(&sens, round.ranking_len(), rng);
    Ok(round.picks(chosen.into_iter().map(|c| (c, sens[c]))))
}

#[cfg(test)]
mod tests;
