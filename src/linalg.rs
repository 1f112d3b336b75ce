//! Thin wrappers over the faer calls the core needs, so the rest of the crate speaks in slices and
//! `Mat<f64>` and the faer module paths (which move between faer releases) live in one place.
//!
//! Conventions: a Cholesky factor is lower triangular with a zero strict upper triangle; embeddings of a
//! pool are stored as a d×N column-major matrix (one response per column) so whitening is one solve.

use faer::linalg::cholesky::llt::update::rank_r_update_clobber;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

mod label_update;
pub use label_update::{BatchUpdate, UpdateWork};

/// Parallelism for matrix–matrix work (whitening a pool, Gram products, refits). Single-vector work is
/// memory bound and runs sequentially (faer is 1.3–1.9× slower with two threads there).
pub fn matrix_par() -> Par {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if n > 1 {
        Par::rayon(n)
    } else {
        Par::Seq
    }
}

/// Numerically stable logistic function.
#[inline]
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x)` without overflow or cancellation.
#[inline]
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// Cross-entropy term of a (soft) label: `-(y log p + (1-y) log(1-p))` with `p = σ(m)`, stable in `m`.
#[inline]
pub fn label_nll(m: f64, y: f64) -> f64 {
    -(y * log_sigmoid(m) + (1.0 - y) * log_sigmoid(-m))
}

/// Lower Cholesky factor of a symmetric positive-definite matrix (only the lower triangle is read).
/// Returns `None` when the matrix is not numerically positive definite.
pub fn cholesky_lower(h: MatRef<'_, f64>) -> Option<Mat<f64>> {
    let llt = h.llt(Side::Lower).ok()?;
    let mut l = llt.L().to_owned();
    zero_strict_upper(l.as_mut());
    Some(l)
}

/// Sets the strict upper triangle to zero (faer leaves it untouched after an in-place factorisation).
pub fn zero_strict_upper(mut m: MatMut<'_, f64>) {
    let n = m.ncols();
    for j in 1..n {
        for i in 0..j.min(m.nrows()) {
            m[(i, j)] = 0.0;
        }
    }
}

/// `L Lᵀ ← L Lᵀ + w v vᵀ` in place with faer's rank-one update, O(d²). Returns `false` on a non-positive
/// pivot, in which case `l` is partly modified and must be rebuilt by the caller. The posterior's label
/// update uses the fused [`UpdateWork`] passes; this is the reference they are tested against.
pub fn rank_one_update(l: &mut Mat<f64>, v: &[f64], w: f64) -> bool {
    let d = l.nrows();
    let mut work = Mat::<f64>::from_fn(d, 1, |i, _| v[i]);
    let mut alpha = faer::Col::<f64>::from_fn(1, |_| w);
    rank_r_update_clobber(l.as_mut(), work.as_mut(), alpha.as_diagonal_mut()).is_ok()
}

/// Solves `L x = b` in place (forward substitution), sequentially: single vectors are memory bound.
pub fn solve_lower(l: MatRef<'_, f64>, b: &mut [f64]) {
    let n = b.len();
    let x = MatMut::from_column_major_slice_mut(b, n, 1);
    solve_lower_triangular_in_place(l, x, Par::Seq);
}

/// Solves `Lᵀ x = b` in place (backward substitution) without forming the transpose.
pub fn solve_lower_transpose(l: MatRef<'_, f64>, b: &mut [f64]) {
    let n = b.len();
    let x = MatMut::from_column_major_slice_mut(b, n, 1);
    solve_upper_triangular_in_place(l.transpose(), x, Par::Seq);
}

/// Whitens a d×N block in place: `X ← L⁻¹ X`. One triangular solve with N right-hand sides
/// (GEMM-class work), after which `vᵀH⁻¹v = ‖L⁻¹v‖²` for every difference of columns.
pub fn whiten_in_place(l: MatRef<'_, f64>, x: MatMut<'_, f64>, par: Par) {
    solve_lower_triangular_in_place(l, x, par);
}

/// `tr((L Lᵀ)⁻¹) = ‖L⁻¹‖_F²`, by whitening the identity (O(d³/3)); the posterior's total variance.
pub fn trace_inverse_from_cholesky(l: MatRef<'_, f64>) -> f64 {
    let d = l.nrows();
    let mut eye = Mat::<f64>::identity(d, d);
    whiten_in_place(l, eye.as_mut(), matrix_par());
    (0..d)
        .map(|j| eye.col(j).iter().map(|x| x * x).sum::<f64>())
        .sum()
}

/// `log det (L Lᵀ) = 2 Σ log L_ii`.
pub fn log_det_from_cholesky(l: MatRef<'_, f64>) -> f64 {
    (0..l.nrows()).map(|i| l[(i, i)].ln()).sum::<f64>() * 2.0
}

/// Lower triangle of `acc + Vᵀ diag(w) V` for V an n×d row-per-observation matrix given column-major as
/// `vt` (d×n, one observation per column): `acc ← acc + Vt diag(w) Vtᵀ`. Half the flops of a full GEMM.
pub fn add_weighted_gram_lower(acc: MatMut<'_, f64>, vt: MatRef<'_, f64>, w: &[f64], par: Par) {
    let d = vt.nrows();
    let n = vt.ncols();
    // Scale columns by w (kept separate so the caller's matrix is not modified).
    let scaled = Mat::<f64>::from_fn(d, n, |i, j| vt[(i, j)] * w[j]);
    faer::linalg::matmul::triangular::matmul(
        acc,
        BlockStructure::TriangularLower,
        Accum::Add,
        scaled.as_ref(),
        BlockStructure::Rectangular,
        vt.transpose(),
        BlockStructure::Rectangular,
        1.0,
        par,
    );
}

/// Dense `y = A x` for a column-major A; used by tests and the dense baselines.
pub fn mat_vec(a: MatRef<'_, f64>, x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; a.nrows()];
    for (j, &xj) in x.iter().enumerate() {
        if xj == 0.0 {
            continue;
        }
        for (i, yi) in y.iter_mut().enumerate() {
            *yi += a[(i, j)] * xj;
        }
    }
    y
}

/// Dot product.
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Largest absolute difference relative to the largest entry of `b`.
    pub(crate) fn max_rel(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// A random SPD matrix `Q diag(λ) Qᵀ` with eigenvalues log-spaced from `lo` to `hi`.
    pub(crate) fn spd_with_spectrum(d: usize, lo: f64, hi: f64, rng: &mut StdRng) -> Mat<f64> {
        let a = Mat::<f64>::from_fn(d, d, |_, _| rng.random_range(-1.0..1.0));
        let q = a.qr().compute_Q();
        let e: Vec<f64> = (0..d)
            .map(|i| lo * (hi / lo).powf(i as f64 / (d.max(2) - 1) as f64))
            .collect();
        Mat::<f64>::from_fn(d, d, |i, j| {
            (0..d).map(|k| q[(i, k)] * e[k] * q[(j, k)]).sum()
        })
    }

    /// A random SPD matrix `A Aᵀ + d I`.
    pub(crate) fn random_spd(d: usize, rng: &mut StdRng) -> Mat<f64> {
        let a = Mat::<f64>::from_fn(d, d, |_, _| rng.random_range(-1.0..1.0));
        let mut h = &a * a.transpose();
        for i in 0..d {
            h[(i, i)] += d as f64;
        }
        h
    }

    fn rel_err(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
        (a - b).norm_l2() / b.norm_l2()
    }

    #[test]
    fn rank_one_update_equals_fresh_factorisation() {
        let mut rng = StdRng::seed_from_u64(7);
        for &d in &[1usize, 2, 8, 64, 256] {
            let h = random_spd(d, &mut rng);
            let mut l = cholesky_lower(h.as_ref()).unwrap();
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let w = rng.random_range(0.01..0.25);
            assert!(rank_one_update(&mut l, &v, w));
            let vm = Mat::<f64>::from_fn(d, 1, |i, _| v[i]);
            let h2 = &h + (&vm * vm.transpose()) * faer::Scale(w);
            let fresh = cholesky_lower(h2.as_ref()).unwrap();
            let err = rel_err(l.as_ref(), fresh.as_ref());
            assert!(err <= 1e-10, "d={d}: relative error {err}");
        }
    }

    #[test]
    fn solves_invert_the_factor() {
        let mut rng = StdRng::seed_from_u64(3);
        let d = 17;
        let h = random_spd(d, &mut rng);
        let l = cholesky_lower(h.as_ref()).unwrap();
        let b: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut x = b.clone();
        solve_lower(l.as_ref(), &mut x);
        solve_lower_transpose(l.as_ref(), &mut x);
        let hb = mat_vec(h.as_ref(), &x);
        for i in 0..d {
            assert!((hb[i] - b[i]).abs() < 1e-10);
        }
        let ld = log_det_from_cholesky(l.as_ref());
        let dense = h.as_ref().determinant().ln();
        assert!((ld - dense).abs() < 1e-9 * dense.abs().max(1.0));
    }

    #[test]
    fn weighted_gram_lower_matches_dense() {
        let mut rng = StdRng::seed_from_u64(5);
        let (d, n) = (9, 31);
        let vt = Mat::<f64>::from_fn(d, n, |_, _| rng.random_range(-1.0..1.0));
        let w: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..0.25)).collect();
        let mut acc = Mat::<f64>::zeros(d, d);
        add_weighted_gram_lower(acc.as_mut(), vt.as_ref(), &w, Par::Seq);
        for i in 0..d {
            for j in 0..=i {
                let dense: f64 = (0..n).map(|k| vt[(i, k)] * vt[(j, k)] * w[k]).sum();
                assert!((acc[(i, j)] - dense).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn stable_logistic() {
        assert_eq!(sigmoid(800.0), 1.0);
        assert_eq!(sigmoid(-800.0), 0.0);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-12);
        assert!((label_nll(0.0, 1.0) - std::f64::consts::LN_2).abs() < 1e-15);
        assert!(label_nll(1000.0, 1.0).is_finite());
    }
}
