//! Shared per-round quantities: predicted reward gaps, whitened embeddings and pair variances.
//!
//! With `H = L Lᵀ`, the posterior variance of the gap of pair (a, b) is `‖L⁻¹x_a − L⁻¹x_b‖²`. Whitening the
//! pool once (`Z = L⁻¹X`, one triangular solve with N right-hand sides) turns every pair's variance into
//! `‖z_a‖² + ‖z_b‖² − 2 z_aᵀz_b`. Candidates are processed in tiles of [`TILE`]×[`TILE`] responses: a dense
//! tile is one small matrix product (cache friendly), a sparse one a few direct dot products.

use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::candidates::Pair;

/// Tile edge of the pair scorer.
pub const TILE: usize = 64;

/// Below this many pairs in a tile, direct dot products beat a tile-sized matrix product.
const DENSE_TILE_PAIRS: usize = TILE * TILE / 10;

/// Column `j` as a slice, for vectorisable inner loops (the pool matrices here are column-major).
fn col(z: MatRef<'_, f64>, j: usize) -> &[f64] {
    z.col(j)
        .try_as_col_major()
        .expect("pool matrices are column-major")
        .as_slice()
}

/// Squared Euclidean column norms of a d×N matrix.
pub fn column_sq_norms(z: MatRef<'_, f64>) -> Vec<f64> {
    if z.try_as_col_major().is_none() {
        return column_sq_norms(z.to_owned().as_ref());
    }
    (0..z.ncols())
        .into_par_iter()
        .map(|j| col(z, j).iter().map(|x| x * x).sum())
        .collect()
}

/// `‖z_a − z_b‖²` for every pair, computed tile by tile (see the module doc).
pub fn pair_sq_distances(z: MatRef<'_, f64>, norms: &[f64], pairs: &[Pair]) -> Vec<f64> {
    if z.try_as_col_major().is_none() {
        return pair_sq_distances(z.to_owned().as_ref(), norms, pairs);
    }
    let mut order: Vec<u32> = (0..pairs.len() as u32).collect();
    let key = |p: &Pair| ((p.a as u64 / TILE as u64) << 32) | (p.b as u64 / TILE as u64);
    order.sort_unstable_by_key(|&i| key(&pairs[i as usize]));
    // Split the sorted order into runs of equal tile key.
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=order.len() {
        if i == order.len() || key(&pairs[order[i] as usize]) != key(&pairs[order[start] as usize])
        {
            runs.push(start..i);
            start = i;
        }
    }
    let n = z.ncols();
    let results: Vec<Vec<(u32, f64)>> = runs
        .into_par_iter()
        .map(|run| {
            let idx = &order[run];
            let first = pairs[idx[0] as usize];
            let (ta, tb) = (first.a as usize / TILE, first.b as usize / TILE);
            if idx.len() >= DENSE_TILE_PAIRS {
                let (a0, b0) = (ta * TILE, tb * TILE);
                let (na, nb) = (TILE.min(n - a0), TILE.min(n - b0));
                let za = z.subcols(a0, na);
                let zb = z.subcols(b0, nb);
                let mut g = Mat::<f64>::zeros(na, nb);
                faer::linalg::matmul::matmul(
                    g.as_mut(),
                    Accum::Replace,
                    za.transpose(),
                    zb,
                    1.0,
                    Par::Seq,
                );
                idx.iter()
                    .map(|&i| {
                        let p = pairs[i as usize];
                        let (a, b) = (p.a as usize, p.b as usize);
                        let s = norms[a] + norms[b] - 2.0 * g[(a - a0, b - b0)];
                        (i, s.max(0.0))
                    })
                    .collect()
            } else {
                idx.iter()
                    .map(|&i| {
                        let p = pairs[i as usize];
                        let (ca, cb) = (col(z, p.a as usize), col(z, p.b as usize));
                        let s: f64 = ca.iter().zip(cb).map(|(x, y)| (x - y) * (x - y)).sum();
                        (i, s)
                    })
                    .collect()
            }
        })
        .collect();
    let mut out = vec![0.0; pairs.len()];
    for chunk in results {
        for (i, s) in chunk {
            out[i as usize] = s;
        }
    }
    out
}

/// `Z = L⁻¹ X` for a d×N pool and any lower Cholesky factor `L` (a design matrix's as well as the
/// posterior's): the Cholesky form of [`Whitener`](crate::posterior::Whitener).
pub fn whiten(l: MatRef<'_, f64>, x: MatRef<'_, f64>) -> Mat<f64> {
    crate::posterior::Whitener::Cholesky(l).whiten(x)
}

/// Per-response predicted reward `θᵀx_i`.
pub fn rewards(theta: &[f64], x: MatRef<'_, f64>) -> Vec<f64> {
    if x.try_as_col_major().is_none() {
        return rewards(theta, x.to_owned().as_ref());
    }
    (0..x.ncols())
        .into_par_iter()
        .map(|j| crate::linalg::dot(theta, col(x, j)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candidates::{cross_prompt, within_prompt};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn tiled_distances_match_direct_computation() {
        let mut rng = StdRng::seed_from_u64(9);
        let (d, n) = (13, 300);
        let z = Mat::<f64>::from_fn(d, n, |_, _| rng.random_range(-1.0..1.0));
        let norms = column_sq_norms(z.as_ref());
        let prompts: Vec<u64> = (0..n as u64).map(|i| i / 5).collect();
        // Dense tiles (all cross pairs) and sparse ones (within pairs) both go through the checks.
        let mut pairs = cross_prompt(&prompts, 20_000, &mut rng);
        pairs.extend(within_prompt(&prompts));
        let s = pair_sq_distances(z.as_ref(), &norms, &pairs);
        for (p, &si) in pairs.iter().zip(&s) {
            let direct: f64 = (0..d)
                .map(|r| (z[(r, p.a as usize)] - z[(r, p.b as usize)]).powi(2))
                .sum();
            assert!(
                (si - direct).abs() < 1e-12 * (1.0 + direct),
                "{si} vs {direct}"
            );
        }
    }
}
