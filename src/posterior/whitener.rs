//! Whitening: a map `F` with `F Fᵀ = H⁻¹`, so that `‖Fᵀx‖² = xᵀH⁻¹x` and inner products of whitened
//! vectors are inner products under the posterior covariance.
//!
//! Selection whitens the whole pool every round (d × N, N = 4096 by default), and with the Cholesky
//! factor that is a triangular solve of d² N flops: ≈ 17 GFlop, a third of a second of both cores, at
//! d = 2048. But while the label store is small next to `d` and the prior is isotropic, the precision is
//! an identity plus a low-rank term, `H = λ₀ I + U Uᵀ` with `U = V W^{1/2}` (d × K, one stored label per
//! column, `W` their Fisher weights), and its symmetric inverse square root needs only `U`:
//!
//! `H^{-1/2} = λ₀^{-1/2} I + U M Uᵀ`, with `M = P diag(g(σ)) Pᵀ` from the eigendecomposition
//! `UᵀU = P diag(σ) Pᵀ` and `g(σ) = ((λ₀ + σ)^{-1/2} − λ₀^{-1/2}) / σ`.
//!
//! (On the range of `U = Q S Pᵀ` that is `Q diag((λ₀ + s²)^{-1/2}) Qᵀ`, elsewhere `λ₀^{-1/2}`.) Applying
//! it costs 4 d K flops a column instead of d², but the flops are not the whole cost: whitening the
//! default pool at d = 2048 took 74 / 140 / 160 / 301 ms with K = 0 / 64 / 128 / 255 against 378–442 ms
//! for the triangular solve, and 502 against 422 ms at K = 511 (`cargo bench --bench core -- whitening`,
//! BENCHMARKS.md). So the low-rank form is used while `8 K < d` ([`Whitener::prefers_low_rank`]): at
//! d = 2048 the first 255 labels. The two maps differ by a rotation (`L⁻¹ = R H^{-1/2}`, `R`
//! orthogonal), so every vector of one round must be whitened by the same [`Whitener`]; norms and inner
//! products agree.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::linalg::{self, solve_lower};

/// The whitening map of one posterior state (see the module doc). Build it once per selection round.
pub enum Whitener<'a> {
    /// `F = L⁻ᵀ`: whitened `z = L⁻¹x` (a triangular solve).
    Cholesky(MatRef<'a, f64>),
    /// `F = λ₀^{-1/2} I + U M Uᵀ` (symmetric).
    LowRank {
        /// `λ₀^{-1/2}`.
        scale: f64,
        /// `U = V W^{1/2}`, d × K.
        u: Mat<f64>,
        /// K × K.
        m: Mat<f64>,
    },
}

impl<'a> Whitener<'a> {
    /// The low-rank form for the precision `λ₀ I + Σ_k w_k v_k v_kᵀ`; `None` when the eigensolver fails
    /// (the caller then falls back to the Cholesky factor).
    pub fn low_rank<'v>(
        lambda0: f64,
        dim: usize,
        labels: impl ExactSizeIterator<Item = (&'v [f64], f64)>,
    ) -> Option<Self> {
        let k = labels.len();
        let root = lambda0.sqrt();
        if k == 0 {
            // The prior alone (faer's eigensolver does not take an empty matrix).
            return Some(Self::LowRank {
                scale: 1.0 / root,
                u: Mat::zeros(dim, 0),
                m: Mat::zeros(0, 0),
            });
        }
        let mut u = Mat::<f64>::zeros(dim, k);
        for (j, (v, w)) in labels.enumerate() {
            let s = w.max(0.0).sqrt();
            for (i, &x) in v.iter().enumerate() {
                u[(i, j)] = s * x;
            }
        }
        let mut gram = Mat::<f64>::zeros(k, k);
        matmul(
            gram.as_mut(),
            Accum::Replace,
            u.transpose(),
            u.as_ref(),
            1.0,
            par(dim * k * k),
        );
        let eig = gram.self_adjoint_eigen(Side::Lower).ok()?;
        let (p, sigma) = (eig.U(), eig.S().column_vector());
        // g(σ) without the cancellation of its definition: (λ₀+σ)^{-1/2} − λ₀^{-1/2} equals
        // −σ / (√(λ₀+σ) √λ₀ (√(λ₀+σ) + √λ₀)), so g(σ) = −1 / (√(λ₀+σ) √λ₀ (√(λ₀+σ) + √λ₀)).
        let g = |s: f64| {
            let r = (lambda0 + s.max(0.0)).sqrt();
            -1.0 / (r * root * (r + root))
        };
        let scaled = Mat::<f64>::from_fn(k, k, |i, j| p[(i, j)] * g(sigma[j]));
        let mut m = Mat::<f64>::zeros(k, k);
        matmul(
            m.as_mut(),
            Accum::Replace,
            scaled.as_ref(),
            p.transpose(),
            1.0,
            Par::Seq,
        );
        Some(Self::LowRank {
            scale: 1.0 / root,
            u,
            m,
        })
    }

    /// Whitened copy of a d × N block, one vector per column.
    pub fn whiten(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        match self {
            Self::Cholesky(l) => {
                let mut z = x.to_owned();
                linalg::whiten_in_place(*l, z.as_mut(), linalg::matrix_par());
                z
            }
            Self::LowRank { scale, u, m } => {
                let (d, n, k) = (x.nrows(), x.ncols(), u.ncols());
                let mut z = Mat::<f64>::from_fn(d, n, |i, j| scale * x[(i, j)]);
                if k == 0 {
                    return z;
                }
                let mut a = Mat::<f64>::zeros(k, n);
                matmul(
                    a.as_mut(),
                    Accum::Replace,
                    u.transpose(),
                    x,
                    1.0,
                    par(d * k * n),
                );
                let mut b = Mat::<f64>::zeros(k, n);
                matmul(
                    b.as_mut(),
                    Accum::Replace,
                    m.as_ref(),
                    a.as_ref(),
                    1.0,
                    par(k * k * n),
                );
                matmul(
                    z.as_mut(),
                    Accum::Add,
                    u.as_ref(),
                    b.as_ref(),
                    1.0,
                    par(d * k * n),
                );
                z
            }
        }
    }

    /// Whitens one vector in place.
    pub fn whiten_vec(&self, v: &mut [f64]) {
        match self {
            Self::Cholesky(l) => solve_lower(*l, v),
            Self::LowRank { .. } => {
                let z = self.whiten(MatRef::from_column_major_slice(v, v.len(), 1));
                for (i, x) in v.iter_mut().enumerate() {
                    *x = z[(i, 0)];
                }
            }
        }
    }

    /// Whether the low-rank form is the cheaper one for `k` stored labels at dimension `d`.
    pub fn prefers_low_rank(k: usize, d: usize) -> bool {
        8 * k < d
    }

    /// Whether this is the low-rank form (for metrics and tests).
    pub fn is_low_rank(&self) -> bool {
        matches!(self, Self::LowRank { .. })
    }
}

/// Threads for a product of about `work` multiply-adds: below ≈ 2²⁰ the rayon hand-off costs more.
fn par(work: usize) -> Par {
    if work > 1 << 20 {
        linalg::matrix_par()
    } else {
        Par::Seq
    }
}
