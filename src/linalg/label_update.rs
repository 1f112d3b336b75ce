//! The one-label update's two passes over the Cholesky factor, with reusable buffers.
//!
//! A label with difference `v` needs `s = ‖L⁻¹v‖²` (before the Fisher weight `w` is known), `H⁻¹v`, and the
//! factor of `H + w v vᵀ`. With `u = L⁻¹v`, `H + w v vᵀ = L (I + w u uᵀ) Lᵀ`, and `I + w u uᵀ = M Mᵀ` has a
//! lower factor `M` known in closed form from `u` and `w`; with `t_j = 1/w + Σ_{i<j} u_i²`,
//!
//! ```text
//! M_jj = √(t_{j+1}/t_j),  M_ij = M_jj · u_i u_j / t_{j+1}  (i > j),
//! so  (L M)[:, j] = M_jj · (L[:, j] + (u_j / t_{j+1}) · Σ_{i>j} u_i L[:, i]).
//! ```
//!
//! Every pivot `M_jj ≥ 1` is a ratio of sums of positive terms: no cancellation, no non-positive pivot for
//! finite input. The sum `z_j = Σ_{i>j} u_i L[:, i]` accumulates when the columns are visited last to first,
//! the order of the backward solve `Lᵀh = u` in its column (dot-product) form. So:
//!
//! 1. [`UpdateWork::forward`]: forward solve `u = L⁻¹v` (column-oriented, reads the lower triangle once) and
//!    the prefix sums of `u²`; returns `s`.
//! 2. [`UpdateWork::backward_update`]: for `j = d−1, …, 0`, one read and one write of column `j`: `h_j` of
//!    `h = L⁻ᵀu = H⁻¹v` from the old column, the new column `(L M)[:, j]`, then `z ← z + u_j L[:, j]`.
//!
//! Two passes over the factor instead of four (two solves and a rank-one update that re-does the forward
//! substitution), and nothing allocated once the buffers have grown to `d`. Both passes take a block of
//! columns at a time (8 forward, 4 backward), so the running vectors (`x`; `z` and `h`) are read and written
//! once per block rather than once per column, and the rows below each block go through AVX2+FMA
//! intrinsics, chosen at run time (the crate ships a generic build; the baseline code is the fallback).
//! [`BatchUpdate`] applies several queued labels with the same two passes for all of them.

use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Mat, MatRef, Par};

/// Calls `avx2::name(args)` when the CPU has AVX2 and FMA, `generic::name(args)` otherwise.
macro_rules! dispatch {
    ($name:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the `avx2` variant is compiled for.
                return unsafe { avx2::$name($($arg),*) };
            }
        }
        generic::$name($($arg),*)
    }};
}

/// Buffers of one label update; keep one per posterior so an update allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct UpdateWork {
    /// `u = L⁻¹v`.
    u: Vec<f64>,
    /// `prefix[j] = Σ_{i<j} u_i²`, `d + 1` entries (`prefix[d] = s`).
    prefix: Vec<f64>,
    /// `z_j = Σ_{i>j} u_i L[:, i]` during the backward pass.
    z: Vec<f64>,
    /// `h = L⁻ᵀu = H⁻¹v` after the backward pass.
    h: Vec<f64>,
}

impl UpdateWork {
    /// Forward solve `u = L⁻¹v` with the lower factor `l`; returns `s = ‖u‖² = vᵀH⁻¹v`. Must precede
    /// [`Self::backward_update`] / [`Self::backward`] with the same factor.
    pub fn forward(&mut self, l: MatRef<'_, f64>, v: &[f64]) -> f64 {
        let d = v.len();
        assert_eq!(l.nrows(), d, "factor and vector dimensions differ");
        self.u.clear();
        self.u.extend_from_slice(v);
        self.prefix.resize(d + 1, 0.0);
        self.z.resize(d, 0.0);
        self.h.resize(d, 0.0);
        dispatch!(forward_pass(l, &mut self.u, &mut self.prefix))
    }

    /// `h = L⁻ᵀu` (so `h = H⁻¹v`) and, in the same pass, `L ← chol(L Lᵀ + w v vᵀ)` for `w > 0`. Returns
    /// `false` when an updated pivot is not a positive finite number (only possible for non-finite input);
    /// `l` is then partly updated and must be rebuilt, while `h` is complete (it only reads the old factor).
    pub fn backward_update(&mut self, l: &mut Mat<f64>, w: f64) -> bool {
        assert!(w > 0.0, "rank-one update weight must be positive");
        assert_eq!(l.nrows(), self.u.len(), "call forward first");
        let mut step = [generic::Step {
            u: &self.u,
            prefix: &self.prefix,
            inv_w: Some(1.0 / w),
            z: &mut self.z,
            h: &mut self.h,
        }];
        dispatch!(backward_pass(l, &mut step))
    }

    /// `h = L⁻ᵀu` only (a label whose Fisher weight is zero leaves the factor as it is).
    pub fn backward(&mut self, l: MatRef<'_, f64>) {
        assert_eq!(l.nrows(), self.u.len(), "call forward first");
        dispatch!(backward_solve(l, &self.u, &mut self.h))
    }

    /// `H⁻¹v` after [`Self::backward_update`] or [`Self::backward`].
    pub fn direction(&self) -> &[f64] {
        &self.h
    }

    /// `L⁻¹v` after [`Self::forward`].
    pub fn whitened(&self) -> &[f64] {
        &self.u
    }
}

/// Labels that queued up, applied in order as one batch with two passes over the factor for all of them,
/// exactly as the same labels one at a time (up to rounding).
///
/// Label `k` needs `u_k = L_k⁻¹v_k` with `L_k = L₀ M₀ ⋯ M_{k−1}` the factor after the earlier labels, and
/// its margin under the mode they moved. Both come from `L₀⁻¹v_k` (one forward solve with all the labels as
/// right-hand sides): `L_{i+1}⁻¹v_k = M_i⁻¹ (L_i⁻¹v_k)`, O(d) per earlier label since `M_i` is the
/// structured factor of the module doc, and label `i` moved the mode by `c_i L_i⁻ᵀu_i`, which changes the
/// margin of `v_k` by `c_i u_iᵀ(L_i⁻¹v_k)`. So the scalar steps run label by label on O(d) vectors
/// ([`Self::whiten_next`], [`Self::set_step`]: once label `i`'s step is known, every later label's vector
/// moves from `L_i⁻¹v_k` to `L_{i+1}⁻¹v_k` together), and one backward pass then applies every update and
/// solves every `h_i = L_i⁻ᵀu_i` ([`Self::backward_update`]).
#[derive(Clone, Debug)]
pub struct BatchUpdate {
    n: usize,
    /// Row-major d×n: `xt[r·n + k]` is row `r` of `L_i⁻¹v_k`, where `i` is the number of steps set (for
    /// `k ≥ i`; earlier columns are spent).
    xt: Vec<f64>,
    /// `Σ_{i<k} c_i u_iᵀ(L_i⁻¹v_k)` over the steps set so far.
    shift: Vec<f64>,
    /// Per whitened label: `u_k`, the prefix sums of `u_k²`, then (after `set_step`) its step and weight.
    u: Vec<Vec<f64>>,
    prefix: Vec<Vec<f64>>,
    step: Vec<f64>,
    weight: Vec<f64>,
    /// `h_k = L_k⁻ᵀu_k = H_k⁻¹v_k` after the backward pass.
    h: Vec<Vec<f64>>,
}

impl BatchUpdate {
    /// Forward solve of every label's difference with the factor before the batch.
    pub fn forward(l: MatRef<'_, f64>, vs: &[&[f64]]) -> Self {
        let (d, n) = (l.nrows(), vs.len());
        let mut x = Mat::<f64>::from_fn(d, n, |i, k| vs[k][i]);
        solve_lower_triangular_in_place(l, x.as_mut(), Par::Seq);
        let mut xt = vec![0.0; d * n];
        for k in 0..n {
            for (r, &v) in x.col_as_slice(k).iter().enumerate() {
                xt[r * n + k] = v;
            }
        }
        Self {
            n,
            xt,
            shift: vec![0.0; n],
            u: Vec::with_capacity(n),
            prefix: Vec::with_capacity(n),
            step: Vec::with_capacity(n),
            weight: Vec::with_capacity(n),
            h: Vec::new(),
        }
    }

    /// Whitens the next label by the factor after the labels before it; returns `(Σ_{i<k} c_i h_iᵀv_k, s_k)`:
    /// the change of its margin by the earlier labels' steps, and `s_k = v_kᵀH_k⁻¹v_k`. The previous label's
    /// step must have been set.
    pub fn whiten_next(&mut self) -> (f64, f64) {
        let k = self.u.len();
        assert_eq!(self.step.len(), k, "set the previous label's step first");
        let x: Vec<f64> = self.xt.iter().skip(k).step_by(self.n).copied().collect();
        let mut prefix = Vec::with_capacity(x.len() + 1);
        let mut acc = 0.0;
        for xj in &x {
            prefix.push(acc);
            acc += xj * xj;
        }
        prefix.push(acc);
        self.u.push(x);
        self.prefix.push(prefix);
        (self.shift[k], acc)
    }

    /// The step `c` and Fisher weight `w ≥ 0` of the label just whitened; moves every later label's vector
    /// past this label's update.
    pub fn set_step(&mut self, c: f64, w: f64) {
        let i = self.step.len();
        assert_eq!(i + 1, self.u.len(), "whiten the label first");
        self.step.push(c);
        self.weight.push(w);
        if i + 1 < self.n {
            let label = generic::Spent {
                u: &self.u[i],
                prefix: &self.prefix[i],
                inv_w: (w > 0.0).then(|| 1.0 / w),
                c,
            };
            dispatch!(advance(
                &mut self.xt,
                self.n,
                i + 1,
                &label,
                &mut self.shift
            ))
        }
    }

    /// One backward pass: every label's `h_k`, and `L ← L₀ M₀ ⋯ M_{n−1}` (labels of weight zero leave it).
    /// Returns `false` when an updated pivot is not a positive finite number; `l` must then be rebuilt
    /// (the directions are complete).
    pub fn backward_update(&mut self, l: &mut Mat<f64>) -> bool {
        let d = l.nrows();
        assert_eq!(self.step.len(), self.n, "every label needs its step");
        self.h = vec![vec![0.0; d]; self.n];
        let mut z = vec![vec![0.0; d]; self.n];
        let mut steps: Vec<generic::Step<'_>> = self
            .u
            .iter()
            .zip(&self.prefix)
            .zip(&self.weight)
            .zip(self.h.iter_mut().zip(z.iter_mut()))
            .map(|(((u, prefix), &w), (h, z))| generic::Step {
                u,
                prefix,
                inv_w: (w > 0.0).then(|| 1.0 / w),
                z,
                h,
            })
            .collect();
        dispatch!(backward_pass(l, &mut steps))
    }

    /// `(c_k, H_k⁻¹v_k)` per label, in order, after [`Self::backward_update`]: the mode moves by `Σ c_k h_k`.
    pub fn directions(&self) -> impl Iterator<Item = (f64, &[f64])> {
        self.step
            .iter()
            .copied()
            .zip(self.h.iter().map(|h| h.as_slice()))
    }
}

/// Columns handled together by the forward pass (the running vector is read and written once per block).
const FORWARD_BLOCK: usize = 8;
/// Columns handled together by the backward pass (`z` is read and written once per block).
const BLOCK: usize = 4;
/// Independent accumulators of the dot products (lets the compiler vectorise without reassociating).
const LANES: usize = 8;

mod generic {
    use super::{BLOCK, FORWARD_BLOCK, LANES};
    use faer::{Mat, MatRef};

    #[inline(always)]
    fn col(l: MatRef<'_, f64>, j: usize) -> &[f64] {
        l.col(j)
            .try_as_col_major()
            .expect("faer columns are contiguous")
            .as_slice()
    }

    /// `x ← L⁻¹x` in place (column-oriented, `FORWARD_BLOCK` columns at a time: the block's small triangle,
    /// then the rows below it with all the block's columns at once, intrinsics when `AVX2`);
    /// `prefix[j] = Σ_{i<j} x_i²` of the solution; returns `Σ x_i²`.
    #[inline(always)]
    pub fn forward_pass_with<const AVX2: bool>(
        l: MatRef<'_, f64>,
        x: &mut [f64],
        prefix: &mut [f64],
    ) -> f64 {
        let d = x.len();
        let mut j0 = 0;
        while j0 < d {
            let bs = FORWARD_BLOCK.min(d - j0);
            for k in 0..bs {
                let j = j0 + k;
                let cj = col(l, j);
                let uj = x[j] / cj[j];
                x[j] = uj;
                for r in j + 1..j0 + bs {
                    x[r] -= uj * cj[r];
                }
            }
            let below = j0 + bs;
            let cols: [&[f64]; FORWARD_BLOCK] = std::array::from_fn(|c| {
                if c < bs {
                    &col(l, j0 + c)[below..]
                } else {
                    &[]
                }
            });
            let mut us = [0.0f64; FORWARD_BLOCK];
            us[..bs].copy_from_slice(&x[j0..below]);
            let rest = &mut x[below..];
            #[cfg(target_arch = "x86_64")]
            if AVX2 && bs == FORWARD_BLOCK {
                // SAFETY: `AVX2` is true only in the `avx2` variants, called after the feature check.
                unsafe { super::avx2::forward_sweep(&cols, &us, rest) };
                j0 = below;
                continue;
            }
            for (c, cj) in cols.iter().enumerate().take(bs) {
                let uj = us[c];
                for (xr, a) in rest.iter_mut().zip(*cj) {
                    *xr -= uj * a;
                }
            }
            j0 = below;
        }
        let mut acc = 0.0;
        for (j, xj) in x.iter().enumerate() {
            prefix[j] = acc;
            acc += xj * xj;
        }
        prefix[d] = acc;
        acc
    }

    pub fn forward_pass(l: MatRef<'_, f64>, x: &mut [f64], prefix: &mut [f64]) -> f64 {
        forward_pass_with::<false>(l, x, prefix)
    }

    /// `Σ a_i b_i` with `LANES` independent partial sums.
    #[inline(always)]
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len().min(b.len());
        let split = n - n % LANES;
        let mut acc = [0.0f64; LANES];
        for (ca, cb) in a[..split]
            .chunks_exact(LANES)
            .zip(b[..split].chunks_exact(LANES))
        {
            for k in 0..LANES {
                acc[k] += ca[k] * cb[k];
            }
        }
        let mut sum = acc.iter().sum::<f64>();
        for i in split..n {
            sum += a[i] * b[i];
        }
        sum
    }

    /// `h ← L⁻ᵀu` (column / dot-product form, last column first).
    #[inline(always)]
    pub fn backward_solve(l: MatRef<'_, f64>, u: &[f64], h: &mut [f64]) {
        let d = u.len();
        for j in (0..d).rev() {
            let cj = col(l, j);
            let acc = dot(&cj[j + 1..], &h[j + 1..]);
            h[j] = (u[j] - acc) / cj[j];
        }
    }

    /// A label of a batch whose step is set: its whitened vector and prefix sums, `1/w` (`None` for weight
    /// zero) and step `c`.
    #[derive(Clone, Copy)]
    pub struct Spent<'a> {
        pub u: &'a [f64],
        pub prefix: &'a [f64],
        pub inv_w: Option<f64>,
        pub c: f64,
    }

    /// Label `i`'s step is known ([`Spent`]): for every later
    /// label `k ≥ first` (row-major `xt`, `n` per row), `shift_k += c·uᵀx_k` and, for a nonzero weight,
    /// `x_k ← M⁻¹x_k` by forward substitution: row `r` of `M` below the diagonal is `u_r` times
    /// `M_jj β_j` (`β_j = u_j/t_{j+1}`), so with `acc = Σ_{j<r} M_jj β_j y_j`,
    /// `y_r = (x_r − u_r·acc)/M_rr` and `M_rr β_r y_r = β_r (x_r − u_r·acc)`. The labels go together, so the
    /// recurrences of different labels overlap.
    #[inline(always)]
    pub fn advance(xt: &mut [f64], n: usize, first: usize, label: &Spent<'_>, shift: &mut [f64]) {
        let Spent {
            u,
            prefix,
            inv_w,
            c,
        } = *label;
        let m = n - first;
        let mut dots = vec![0.0f64; m];
        let mut acc = vec![0.0f64; m];
        for (r, row) in xt.chunks_exact_mut(n).enumerate() {
            let row = &mut row[first..];
            let ur = u[r];
            for (dk, &xk) in dots.iter_mut().zip(row.iter()) {
                *dk += ur * xk;
            }
            if let Some(inv_w) = inv_w {
                let t_next = inv_w + prefix[r + 1];
                let inv_g = (inv_w + prefix[r]) / t_next;
                let inv_g = inv_g.sqrt();
                let beta = ur / t_next;
                for (xk, ak) in row.iter_mut().zip(acc.iter_mut()) {
                    let rest = *xk - ur * *ak;
                    *xk = rest * inv_g;
                    *ak += beta * rest;
                }
            }
        }
        for (sk, dk) in shift[first..].iter_mut().zip(&dots) {
            *sk += c * dk;
        }
    }

    /// One rank-one update of the backward pass: the whitened vector `u` and prefix sums of `u²` of its
    /// label (by the factor before it), `1/w` (`None`: weight zero, the factor is left as it is), and its
    /// accumulator `z` and solution `h` (length d).
    pub struct Step<'a> {
        pub u: &'a [f64],
        pub prefix: &'a [f64],
        pub inv_w: Option<f64>,
        pub z: &'a mut [f64],
        pub h: &'a mut [f64],
    }

    /// What column `j` of a block needs from one step: `u_j`, `M_jj = √(t_{j+1}/t_j)` and
    /// `M_jj · u_j / t_{j+1}` (module doc).
    #[derive(Clone, Copy, Default)]
    pub struct Coef {
        pub u: f64,
        pub g: f64,
        pub gb: f64,
    }

    /// Rows below a block of `bs ≤ BLOCK` columns (`cols[c]`, column `jb + c`, rows `jb + bs..`): returns the
    /// old columns' dot products with `h`, and when `update`, writes the new columns, last column first,
    /// while `z` accumulates `u_c · L[:, c]` (old). All `BLOCK` columns share one load and store of `z`.
    #[inline(always)]
    pub fn sweep(
        cols: &mut [&mut [f64]; BLOCK],
        bs: usize,
        coef: &[Coef; BLOCK],
        update: bool,
        z: &mut [f64],
        h: &[f64],
    ) -> [f64; BLOCK] {
        let mut dots = [0.0f64; BLOCK];
        for c in 0..bs {
            dots[c] = dot(cols[c], h);
        }
        if update {
            for (r, zr) in z.iter_mut().enumerate() {
                let mut zv = *zr;
                for c in (0..bs).rev() {
                    let old = cols[c][r];
                    cols[c][r] = coef[c].g * old + coef[c].gb * zv;
                    zv += coef[c].u * old;
                }
                *zr = zv;
            }
        }
        dots
    }

    /// The fused backward pass (module doc) for one or several labels in order, `BLOCK` columns at a time
    /// from the last: the block's rows below it go through [`sweep`] (intrinsics when `AVX2`), then its small
    /// triangle column by column. Step `i` sees the block as the steps before it left it, so its `h` is
    /// `L_i⁻ᵀu_i` with `L_i` the factor before label `i`. Returns whether every new pivot is positive and
    /// finite.
    #[inline(always)]
    pub fn backward_pass_with<const AVX2: bool>(l: &mut Mat<f64>, steps: &mut [Step<'_>]) -> bool {
        let d = l.nrows();
        assert_eq!(l.ncols(), d);
        let stride = usize::try_from(l.col_stride()).expect("column-major factor");
        assert!(d <= 1 || stride >= d, "columns overlap");
        let base = l.as_ptr_mut();
        let mut ok = true;
        let mut end = d;
        while end > 0 {
            let bs = BLOCK.min(end);
            let jb = end - bs;
            for step in steps.iter_mut() {
                // SAFETY: column `jb + c` rows `end..d` lie inside the d×d matrix, columns `stride ≥ d`
                // apart, so the slices are in bounds and disjoint; `l` is borrowed mutably throughout.
                let mut cols: [&mut [f64]; BLOCK] = std::array::from_fn(|c| {
                    if c < bs {
                        unsafe {
                            std::slice::from_raw_parts_mut(
                                base.add((jb + c) * stride + end),
                                d - end,
                            )
                        }
                    } else {
                        &mut []
                    }
                });
                let coef: [Coef; BLOCK] = std::array::from_fn(|c| match step.inv_w {
                    Some(inv_w) if c < bs => {
                        let j = jb + c;
                        let t_next = inv_w + step.prefix[j + 1];
                        let g = (t_next / (inv_w + step.prefix[j])).sqrt();
                        Coef {
                            u: step.u[j],
                            g,
                            gb: g * (step.u[j] / t_next),
                        }
                    }
                    _ => Coef::default(),
                });
                let update = step.inv_w.is_some();
                let (z, h) = (&mut step.z[end..], &step.h[end..]);
                #[cfg(target_arch = "x86_64")]
                let dots = if AVX2 && bs == BLOCK && update {
                    // SAFETY: `AVX2` is true only in the `avx2` variants, called after the feature check.
                    unsafe { super::avx2::sweep(&mut cols, &coef, z, h) }
                } else {
                    sweep(&mut cols, bs, &coef, update, z, h)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let dots = sweep(&mut cols, bs, &coef, update, z, h);
                // The block's triangle, last column first.
                for c in (0..bs).rev() {
                    let j = jb + c;
                    // SAFETY: as above, rows `j..end` of column `j`.
                    let cj = unsafe {
                        std::slice::from_raw_parts_mut(base.add(j * stride + j), end - j)
                    };
                    let (diag, tri) = cj.split_first_mut().expect("column j has row j");
                    let ljj = *diag;
                    let tri_dot: f64 = tri
                        .iter()
                        .zip(&step.h[j + 1..end])
                        .map(|(a, b)| a * b)
                        .sum();
                    step.h[j] = (step.u[j] - (dots[c] + tri_dot)) / ljj;
                    if update {
                        let Coef { u, g, gb } = coef[c];
                        for (lr, zr) in tri.iter_mut().zip(&mut step.z[j + 1..end]) {
                            let old = *lr;
                            *lr = g * old + gb * *zr;
                            *zr += u * old;
                        }
                        // Row j of z_j is zero (L is lower triangular): the pivot is only scaled.
                        let new = g * ljj;
                        ok &= new.is_finite() && new > 0.0;
                        *diag = new;
                        step.z[j] = u * ljj;
                    }
                }
            }
            end = jb;
        }
        ok
    }

    pub fn backward_pass(l: &mut Mat<f64>, steps: &mut [Step<'_>]) -> bool {
        backward_pass_with::<false>(l, steps)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::generic::{Coef, Spent};
    use super::{BLOCK, FORWARD_BLOCK};
    use faer::{Mat, MatRef};

    #[target_feature(enable = "avx2,fma")]
    pub fn forward_pass(l: MatRef<'_, f64>, x: &mut [f64], prefix: &mut [f64]) -> f64 {
        super::generic::forward_pass_with::<true>(l, x, prefix)
    }

    /// `x ← x − Σ_c us_c · cols_c` over a full forward block, four rows at a time with FMAs.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn forward_sweep(
        cols: &[&[f64]; FORWARD_BLOCK],
        us: &[f64; FORWARD_BLOCK],
        x: &mut [f64],
    ) {
        use std::arch::x86_64::*;
        let n = x.len();
        assert!(cols.iter().all(|c| c.len() == n));
        let p: [*const f64; FORWARD_BLOCK] = std::array::from_fn(|c| cols[c].as_ptr());
        let vu: [__m256d; FORWARD_BLOCK] = std::array::from_fn(|c| _mm256_set1_pd(us[c]));
        let px = x.as_mut_ptr();
        const HALF: usize = FORWARD_BLOCK / 2;
        let mut r = 0;
        // SAFETY: every access is below `n`, the length of every slice.
        unsafe {
            while r + 4 <= n {
                let mut a = _mm256_mul_pd(vu[0], _mm256_loadu_pd(p[0].add(r)));
                let mut b = _mm256_mul_pd(vu[HALF], _mm256_loadu_pd(p[HALF].add(r)));
                for c in 1..HALF {
                    a = _mm256_fmadd_pd(vu[c], _mm256_loadu_pd(p[c].add(r)), a);
                    b = _mm256_fmadd_pd(vu[HALF + c], _mm256_loadu_pd(p[HALF + c].add(r)), b);
                }
                let xv = _mm256_loadu_pd(px.add(r));
                _mm256_storeu_pd(px.add(r), _mm256_sub_pd(xv, _mm256_add_pd(a, b)));
                r += 4;
            }
        }
        for r in r..n {
            let sum: f64 = (0..FORWARD_BLOCK).map(|c| us[c] * cols[c][r]).sum();
            x[r] -= sum;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn backward_solve(l: MatRef<'_, f64>, u: &[f64], h: &mut [f64]) {
        super::generic::backward_solve(l, u, h)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn advance(xt: &mut [f64], n: usize, first: usize, label: &Spent<'_>, shift: &mut [f64]) {
        super::generic::advance(xt, n, first, label, shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn backward_pass(l: &mut Mat<f64>, steps: &mut [super::generic::Step<'_>]) -> bool {
        super::generic::backward_pass_with::<true>(l, steps)
    }

    /// [`super::generic::sweep`] for a full block with an update, with intrinsics: four rows at a time,
    /// the four columns' new values and the running `z` in registers (the compiler does not vectorise the
    /// fused loop: four reductions and five stores per row).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn sweep(
        cols: &mut [&mut [f64]; BLOCK],
        coef: &[Coef; BLOCK],
        z: &mut [f64],
        h: &[f64],
    ) -> [f64; BLOCK] {
        use std::arch::x86_64::*;
        let n = z.len();
        assert!(h.len() >= n && cols.iter().all(|c| c.len() == n));
        let p: [*mut f64; BLOCK] = std::array::from_fn(|c| cols[c].as_mut_ptr());
        let (pz, ph) = (z.as_mut_ptr(), h.as_ptr());
        let vg: [__m256d; BLOCK] = std::array::from_fn(|c| _mm256_set1_pd(coef[c].g));
        let vgb: [__m256d; BLOCK] = std::array::from_fn(|c| _mm256_set1_pd(coef[c].gb));
        let vu: [__m256d; BLOCK] = std::array::from_fn(|c| _mm256_set1_pd(coef[c].u));
        let mut acc = [_mm256_setzero_pd(); BLOCK];
        let mut r = 0;
        // SAFETY: every access is below `n`, the length of every slice.
        unsafe {
            while r + 4 <= n {
                let hv = _mm256_loadu_pd(ph.add(r));
                let mut zv = _mm256_loadu_pd(pz.add(r));
                for c in (0..BLOCK).rev() {
                    let old = _mm256_loadu_pd(p[c].add(r));
                    acc[c] = _mm256_fmadd_pd(old, hv, acc[c]);
                    let new = _mm256_fmadd_pd(vgb[c], zv, _mm256_mul_pd(vg[c], old));
                    _mm256_storeu_pd(p[c].add(r), new);
                    zv = _mm256_fmadd_pd(vu[c], old, zv);
                }
                _mm256_storeu_pd(pz.add(r), zv);
                r += 4;
            }
        }
        let mut dots = [0.0f64; BLOCK];
        for c in 0..BLOCK {
            let mut lanes = [0.0f64; 4];
            // SAFETY: `lanes` holds four f64.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), acc[c]) };
            dots[c] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        }
        for r in r..n {
            let mut zv = z[r];
            for c in (0..BLOCK).rev() {
                let old = cols[c][r];
                dots[c] += old * h[r];
                cols[c][r] = coef[c].g * old + coef[c].gb * zv;
                zv += coef[c].u * old;
            }
            z[r] = zv;
        }
        dots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::{
        cholesky_lower, rank_one_update, solve_lower, solve_lower_transpose,
        tests::{max_rel as rel, random_spd, spd_with_spectrum},
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A factor with condition number about `10^decades` (of `H`): `Q diag(10^k) Qᵀ`.
    fn ill_conditioned_factor(d: usize, decades: f64, rng: &mut StdRng) -> Mat<f64> {
        let h = spd_with_spectrum(d, 10f64.powf(-decades), 1.0, rng);
        cholesky_lower(h.as_ref()).expect("SPD by construction")
    }

    /// `(L⁻¹v, L⁻ᵀL⁻¹v, chol(LLᵀ + w v vᵀ))` by faer's solves and rank-one update.
    fn faer_reference(l: &Mat<f64>, v: &[f64], w: f64) -> (Vec<f64>, Vec<f64>, Mat<f64>) {
        let mut u = v.to_vec();
        solve_lower(l.as_ref(), &mut u);
        let mut h = u.clone();
        solve_lower_transpose(l.as_ref(), &mut h);
        let mut updated = l.clone();
        assert!(rank_one_update(&mut updated, v, w));
        (u, h, updated)
    }

    /// The fused passes against faer's solves and rank-one update, on well- and ill-conditioned factors and
    /// at sizes around the block and lane widths.
    #[test]
    fn fused_passes_equal_faer_solves_and_rank_one_update() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut work = UpdateWork::default();
        for &d in &[1usize, 2, 3, 4, 5, 7, 8, 9, 16, 31, 64, 100, 257] {
            for decades in [0.0, 6.0, 10.0] {
                let l0 = if decades == 0.0 {
                    cholesky_lower(random_spd(d, &mut rng).as_ref()).unwrap()
                } else {
                    ill_conditioned_factor(d, decades, &mut rng)
                };
                let v: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let w = rng.random_range(0.01..0.25);
                let (u, h, want) = faer_reference(&l0, &v, w);

                let s = work.forward(l0.as_ref(), &v);
                let tol = 1e-12 * 10f64.powf(decades / 2.0);
                assert!(rel(work.whitened(), &u) <= tol, "d={d} 1e{decades}: u");
                assert!(
                    (s - crate::linalg::dot(&u, &u)).abs() <= tol * s,
                    "d={d}: s"
                );
                let mut l = l0.clone();
                work.backward(l.as_ref());
                assert!(rel(work.direction(), &h) <= tol, "d={d} 1e{decades}: solve");
                assert!(work.backward_update(&mut l, w));
                assert!(rel(work.direction(), &h) <= tol, "d={d} 1e{decades}: h");
                let err = (&l - &want).norm_l2() / want.norm_l2();
                assert!(err <= 1e-13, "d={d} 1e{decades}: factor {err}");
                for j in 1..d {
                    for i in 0..j {
                        assert_eq!(l[(i, j)], 0.0, "upper triangle touched");
                    }
                }
            }
        }
    }

    /// A zero pivot makes `L⁻¹v` infinite: the update must say the factor is unusable.
    #[test]
    fn non_finite_input_reports_a_failed_update() {
        let mut l = Mat::<f64>::identity(4, 4);
        l[(2, 2)] = 0.0;
        let mut work = UpdateWork::default();
        let s = work.forward(l.as_ref(), &[1.0, 1.0, 1.0, 1.0]);
        assert!(!s.is_finite());
        assert!(!work.backward_update(&mut l, 0.2));
    }

    /// The buffers shrink and grow with the dimension they are used at.
    #[test]
    fn work_buffers_follow_the_dimension() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut work = UpdateWork::default();
        for &d in &[9usize, 3, 12] {
            let mut l = cholesky_lower(random_spd(d, &mut rng).as_ref()).unwrap();
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut want = l.clone();
            assert!(rank_one_update(&mut want, &v, 0.1));
            work.forward(l.as_ref(), &v);
            assert!(work.backward_update(&mut l, 0.1));
            assert_eq!(work.direction().len(), d);
            assert!((&l - &want).norm_l2() <= 1e-13 * want.norm_l2());
        }
    }

    /// Each label of a batch is whitened by the factor after the earlier ones, its `h` solves with that
    /// factor, and the final factor is the sequence of faer rank-one updates (weights given; one is zero).
    #[test]
    fn batch_equals_sequential_faer_updates() {
        let mut rng = StdRng::seed_from_u64(12);
        for &d in &[1usize, 5, 8, 40, 130] {
            for decades in [0.0, 6.0] {
                let l0 = if decades == 0.0 {
                    cholesky_lower(random_spd(d, &mut rng).as_ref()).unwrap()
                } else {
                    ill_conditioned_factor(d, decades, &mut rng)
                };
                let n = 6;
                let vs: Vec<Vec<f64>> = (0..n)
                    .map(|_| (0..d).map(|_| rng.random_range(-2.0..2.0)).collect())
                    .collect();
                let ws = [0.2, 0.05, 0.0, 0.25, 1e-3, 0.1];
                let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
                let mut batch = BatchUpdate::forward(l0.as_ref(), &refs);
                let mut seq = l0.clone();
                let mut hs = Vec::new();
                let tol = 1e-12 * 10f64.powf(decades / 2.0);
                for (k, v) in vs.iter().enumerate() {
                    let mut u = v.clone();
                    solve_lower(seq.as_ref(), &mut u);
                    let mut h = u.clone();
                    solve_lower_transpose(seq.as_ref(), &mut h);
                    // The margin shift of v_k by the earlier steps c_i = i + 1: Σ c_i h_iᵀ v_k.
                    let shift: f64 = hs
                        .iter()
                        .enumerate()
                        .map(|(i, h): (usize, &Vec<f64>)| (i + 1) as f64 * crate::linalg::dot(h, v))
                        .sum();
                    let (got_shift, s) = batch.whiten_next();
                    let s_want = crate::linalg::dot(&u, &u);
                    assert!((s - s_want).abs() <= tol * s_want, "d={d} label {k}: s");
                    let scale = 1.0 + shift.abs() + hs.len() as f64;
                    assert!(
                        (got_shift - shift).abs() <= tol * scale,
                        "d={d} label {k}: shift"
                    );
                    batch.set_step((k + 1) as f64, ws[k]);
                    if ws[k] > 0.0 {
                        assert!(rank_one_update(&mut seq, v, ws[k]));
                    }
                    hs.push(h);
                }
                let mut l = l0.clone();
                assert!(batch.backward_update(&mut l));
                let err = (&l - &seq).norm_l2() / seq.norm_l2();
                assert!(err <= 1e-13, "d={d} 1e{decades}: factor {err}");
                for (k, (c, h)) in batch.directions().enumerate() {
                    assert_eq!(c, (k + 1) as f64);
                    assert!(rel(h, &hs[k]) <= tol, "d={d} 1e{decades}: h of label {k}");
                }
            }
        }
    }

    /// The baseline kernels (the fallback on CPUs without AVX2) against faer, called directly: the
    /// dispatching tests above run the intrinsics on this machine.
    #[test]
    fn baseline_kernels_equal_faer() {
        let mut rng = StdRng::seed_from_u64(13);
        for &d in &[1usize, 3, 4, 8, 9, 31, 100] {
            let l0 = ill_conditioned_factor(d, 4.0, &mut rng);
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let w = 0.15;
            let (u, h, want) = faer_reference(&l0, &v, w);

            let (mut x, mut prefix) = (v.clone(), vec![0.0; d + 1]);
            let s = generic::forward_pass(l0.as_ref(), &mut x, &mut prefix);
            assert!(rel(&x, &u) <= 1e-11, "d={d}: u");
            assert!((s - prefix[d]).abs() <= 1e-15 * s);
            let mut got_h = vec![0.0; d];
            generic::backward_solve(l0.as_ref(), &x, &mut got_h);
            assert!(rel(&got_h, &h) <= 1e-11, "d={d}: solve");
            let (mut z, mut got_h) = (vec![0.0; d], vec![0.0; d]);
            let mut l = l0.clone();
            let mut step = [generic::Step {
                u: &x,
                prefix: &prefix,
                inv_w: Some(1.0 / w),
                z: &mut z,
                h: &mut got_h,
            }];
            assert!(generic::backward_pass(&mut l, &mut step));
            assert!(rel(&got_h, &h) <= 1e-11, "d={d}: h");
            let err = (&l - &want).norm_l2() / want.norm_l2();
            assert!(err <= 1e-13, "d={d}: factor {err}");
        }
    }
}
