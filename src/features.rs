//! Feature scaling of response embeddings, fitted once on a warm-up sample and then frozen with the model.
//!
//! Why (docs/design.md §2.2): LLM hidden states have norms of 50–100 and a few outlier dimensions, and the
//! prior precision λ₀ only means something on a known scale. Pair differences `v = x_a − x_b` cancel a mean
//! but not a scale. The statistics must never change after θ has been fitted on them, so a [`Scaler`] is
//! fitted once ([`Scaler::fit`], or [`Scaler::observe`] + [`Scaler::freeze`] while a warm-up sample streams
//! in), stored beside θ ([`Scaler::mean`], [`Scaler::inv_std`], [`Scaler::from_parts`]) and only read
//! afterwards.
//!
//! Exported models must score **raw** embeddings. For the linear scalings ([`Scaling::None`],
//! [`Scaling::Standardize`]) [`Scaler::fold_into_linear_head`] turns θ into `(w, b)` with
//! `θ·transform(x) = w·x + b`. L2 normalisation is not linear in `x`, so for [`Scaling::L2`] and
//! [`Scaling::StandardizeL2`] the exporter ships the scaler (mean, inverse std, scaling name) beside θ and the
//! user applies it before the dot product.

use std::fmt;
use std::str::FromStr;

use crate::error::{check_dim, check_finite, CoreError};

/// Names accepted by [`Scaling::from_str`], for error messages.
const SCALING_NAMES: &str = "none, l2, standardize, standardize+l2";

/// A dimension whose standard deviation is below this fraction of its |mean| only varies by f32 rounding
/// (f32 has ~1.2e-7 relative resolution), so it is treated as constant rather than amplified to unit scale.
const CONSTANT_DIM_REL_STD: f64 = 4.0 * f32::EPSILON as f64;

/// How embeddings are scaled before they reach the reward head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scaling {
    /// Raw embeddings. λ₀ must then be chosen for the embedding's own scale.
    #[default]
    None,
    /// Divide each embedding by its Euclidean norm (removes the per-response norm, keeps outlier dimensions).
    L2,
    /// Per-dimension `(x − mean) · inv_std` with warm-up statistics (tames outlier dimensions).
    Standardize,
    /// Standardise, then L2-normalise the result.
    StandardizeL2,
}

impl Scaling {
    /// Whether this scaling needs warm-up statistics.
    pub fn standardizes(self) -> bool {
        matches!(self, Scaling::Standardize | Scaling::StandardizeL2)
    }

    /// Whether the scaling ends with an L2 normalisation (and so cannot be folded into a linear head).
    pub fn normalizes(self) -> bool {
        matches!(self, Scaling::L2 | Scaling::StandardizeL2)
    }

    /// The configuration name (`none`, `l2`, `standardize`, `standardize+l2`).
    pub fn name(self) -> &'static str {
        match self {
            Scaling::None => "none",
            Scaling::L2 => "l2",
            Scaling::Standardize => "standardize",
            Scaling::StandardizeL2 => "standardize+l2",
        }
    }
}

impl fmt::Display for Scaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scaling {
    type Err = CoreError;

    /// Parses the configuration name; surrounding whitespace and ASCII case are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Scaling::None),
            "l2" => Ok(Scaling::L2),
            "standardize" => Ok(Scaling::Standardize),
            "standardize+l2" => Ok(Scaling::StandardizeL2),
            _ => Err(CoreError::UnknownName {
                what: "scaling",
                name: s.to_string(),
                expected: SCALING_NAMES,
            }),
        }
    }
}

/// Per-dimension scaling statistics plus the [`Scaling`] they serve.
///
/// Statistics are the population mean and standard deviation (divide by the sample count, like scikit-learn's
/// `StandardScaler`, so Python users can reproduce them), accumulated with Welford's update in f64, which
/// stays accurate when a dimension's mean is large relative to its spread (the outlier dimensions).
///
/// A dimension that is constant on the warm-up sample gets inverse std **0**, not 1: the warm-up says it
/// carries no information about responses, and 0 keeps it out of the model for good. With 1 a later drift of
/// that dimension would enter θ at the raw scale (often tens of units) that standardisation exists to remove,
/// and would be weighted as if it were a unit-variance feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    scaling: Scaling,
    mean: Vec<f64>,
    /// While unfrozen: Welford's running sum of squared deviations. Once frozen: inverse std.
    inv_std: Vec<f64>,
    count: u64,
    frozen: bool,
}

impl Scaler {
    /// A scaler for `dim`-dimensional embeddings. Scalings without statistics (`none`, `l2`) are frozen at
    /// once; standardising ones wait for warm-up samples via [`Scaler::observe`] and [`Scaler::freeze`].
    pub fn new(scaling: Scaling, dim: usize) -> Result<Self, CoreError> {
        if dim == 0 {
            return Err(CoreError::Empty {
                what: "scaler dimension",
            });
        }
        let frozen = !scaling.standardizes();
        Ok(Scaler {
            scaling,
            mean: vec![0.0; dim],
            inv_std: vec![if frozen { 1.0 } else { 0.0 }; dim],
            count: 0,
            frozen,
        })
    }

    /// Fits and freezes a scaler on a warm-up sample of `dim`-dimensional embeddings. Standardising scalings
    /// need at least 2 samples; others ignore the samples (but still validate them).
    pub fn fit<'a>(
        scaling: Scaling,
        samples: impl IntoIterator<Item = &'a [f32]>,
        dim: usize,
    ) -> Result<Self, CoreError> {
        let mut scaler = Scaler::new(scaling, dim)?;
        if !scaling.standardizes() {
            for x in samples {
                check_embedding(x, dim)?;
                scaler.count += 1;
            }
            return Ok(scaler);
        }
        for x in samples {
            scaler.observe(x)?;
        }
        scaler.freeze()?;
        Ok(scaler)
    }

    /// Adds one warm-up embedding to the running statistics. Errors on a frozen scaler (the statistics are
    /// tied to θ), a wrong dimension, or a non-finite value; a rejected sample leaves the statistics unchanged.
    pub fn observe(&mut self, x: &[f32]) -> Result<(), CoreError> {
        if self.frozen {
            return Err(CoreError::Parameter {
                name: "scaler",
                value: self.scaling.to_string(),
                reason: "is frozen; its statistics are tied to the fitted model",
            });
        }
        check_embedding(x, self.dim())?;
        self.count += 1;
        let n = self.count as f64;
        for ((mean, m2), &xi) in self.mean.iter_mut().zip(&mut self.inv_std).zip(x) {
            let xi = f64::from(xi);
            let delta = xi - *mean;
            *mean += delta / n;
            *m2 += delta * (xi - *mean);
        }
        Ok(())
    }

    /// Ends the warm-up: turns the running statistics into inverse standard deviations and freezes them.
    /// Needs at least 2 observed samples for a standardising scaling; a no-op on a frozen scaler.
    pub fn freeze(&mut self) -> Result<(), CoreError> {
        if self.frozen {
            return Ok(());
        }
        if self.count < 2 {
            return Err(CoreError::Parameter {
                name: "warm-up sample count",
                value: self.count.to_string(),
                reason: "standardisation needs at least 2 samples to estimate a variance",
            });
        }
        let n = self.count as f64;
        for (mean, m2) in self.mean.iter().zip(&mut self.inv_std) {
            let std = (m2.max(0.0) / n).sqrt();
            let inv = 1.0 / std;
            *m2 = if std <= CONSTANT_DIM_REL_STD * mean.abs() || !inv.is_finite() {
                0.0
            } else {
                inv
            };
        }
        self.frozen = true;
        Ok(())
    }

    /// Rebuilds a frozen scaler from stored statistics (e.g. a checkpoint or an exported model).
    ///
    /// Validates: equal, non-zero lengths; finite means; finite, non-negative inverse stds (0 marks a dropped
    /// constant dimension). For `none`/`l2` the statistics must be the identity (mean 0, inverse std 1), so a
    /// mislabelled file is caught instead of silently ignored.
    pub fn from_parts(
        mean: Vec<f64>,
        inv_std: Vec<f64>,
        scaling: Scaling,
    ) -> Result<Self, CoreError> {
        if mean.is_empty() {
            return Err(CoreError::Empty {
                what: "scaler mean",
            });
        }
        check_dim("scaler inverse std", mean.len(), inv_std.len())?;
        check_finite("scaler mean", &mean)?;
        check_finite("scaler inverse std", &inv_std)?;
        if let Some(index) = inv_std.iter().position(|&s| s < 0.0) {
            return Err(CoreError::Parameter {
                name: "scaler inverse std",
                value: format!("{} at index {index}", inv_std[index]),
                reason: "must be non-negative",
            });
        }
        if !scaling.standardizes() {
            let identity = mean.iter().all(|&m| m == 0.0) && inv_std.iter().all(|&s| s == 1.0);
            if !identity {
                return Err(CoreError::Parameter {
                    name: "scaler statistics",
                    value: scaling.to_string(),
                    reason: "this scaling uses no statistics; expected mean 0 and inverse std 1",
                });
            }
        }
        Ok(Scaler {
            scaling,
            mean,
            inv_std,
            count: 0,
            frozen: true,
        })
    }

    /// The scaling this scaler applies.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Whether the statistics are fixed (always true after [`Scaler::fit`], [`Scaler::freeze`] or
    /// [`Scaler::from_parts`]); only a frozen scaler transforms.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The same scaler, not usable until its statistics are given (a daemon instance waits for the scaling
    /// its group adopts even when the scaling needs no statistics). Only for a scaler with no samples.
    pub fn unfrozen(mut self) -> Self {
        debug_assert_eq!(self.count, 0, "unfrozen() is for a new scaler");
        self.frozen = false;
        self
    }

    /// Warm-up samples observed by this instance (0 after [`Scaler::from_parts`]).
    pub fn samples(&self) -> u64 {
        self.count
    }

    /// Per-dimension mean (zeros for `none`/`l2`), for serialisation. Meaningful once frozen.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Per-dimension inverse std (ones for `none`/`l2`, 0 for constant dimensions), for serialisation.
    /// Meaningful once frozen.
    pub fn inv_std(&self) -> &[f64] {
        &self.inv_std
    }

    fn check_frozen(&self) -> Result<(), CoreError> {
        if self.frozen {
            Ok(())
        } else {
            Err(CoreError::Parameter {
                name: "scaler",
                value: self.scaling.to_string(),
                reason: "is still warming up; freeze it before use",
            })
        }
    }

    /// Scales one raw embedding into `out`. Errors (nothing written to a meaningful state) when the scaler is
    /// not frozen, `x` or `out` has the wrong dimension, or `x` holds NaN/Inf. An embedding that is all zeros
    /// after standardisation stays zero under L2 normalisation (it has no direction; its reward is 0).
    pub fn transform(&self, x: &[f32], out: &mut [f64]) -> Result<(), CoreError> {
        self.check_frozen()?;
        check_embedding(x, self.dim())?;
        check_dim("scaler output", self.dim(), out.len())?;
        if self.scaling.standardizes() {
            for (((o, &xi), &m), &s) in out.iter_mut().zip(x).zip(&self.mean).zip(&self.inv_std) {
                *o = (f64::from(xi) - m) * s;
            }
        } else {
            for (o, &xi) in out.iter_mut().zip(x) {
                *o = f64::from(xi);
            }
        }
        if self.scaling.normalizes() {
            let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                out.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok(())
    }

    /// [`Scaler::transform`] into a new vector.
    pub fn transform_vec(&self, x: &[f32]) -> Result<Vec<f64>, CoreError> {
        let mut out = vec![0.0; self.dim()];
        self.transform(x, &mut out)?;
        Ok(out)
    }

    /// Folds the scaler into a linear head so exported models score raw embeddings: returns `(w, b)` with
    /// `w·x + b = θ·transform(x)` for every raw `x`.
    ///
    /// `none`: `w = θ`, `b = 0`. `standardize`: `w_j = θ_j·inv_std_j`, `b = −Σ w_j·mean_j`.
    /// Errors for `l2` and `standardize+l2` (not linear in `x`: the exporter ships the scaler beside θ
    /// instead), for an unfrozen scaler, and for θ of the wrong dimension or with NaN/Inf.
    pub fn fold_into_linear_head(&self, theta: &[f64]) -> Result<(Vec<f64>, f64), CoreError> {
        self.check_frozen()?;
        check_dim("theta", self.dim(), theta.len())?;
        check_finite("theta", theta)?;
        match self.scaling {
            Scaling::None => Ok((theta.to_vec(), 0.0)),
            Scaling::Standardize => {
                let w: Vec<f64> = theta
                    .iter()
                    .zip(&self.inv_std)
                    .map(|(t, s)| t * s)
                    .collect();
                let b = -w.iter().zip(&self.mean).map(|(w, m)| w * m).sum::<f64>();
                Ok((w, b))
            }
            Scaling::L2 | Scaling::StandardizeL2 => Err(CoreError::Parameter {
                name: "scaling",
                value: self.scaling.to_string(),
                reason:
                    "L2 normalisation is not linear and cannot be folded into θ; export the scaler \
                         beside θ",
            }),
        }
    }
}

/// Checks an embedding's dimension and finiteness, naming the first bad index.
fn check_embedding(x: &[f32], dim: usize) -> Result<(), CoreError> {
    check_dim("embedding", dim, x.len())?;
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(CoreError::NonFinite {
            what: "embedding",
            index,
            value: f64::from(x[index]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn slices(rows: &[Vec<f32>]) -> impl Iterator<Item = &[f32]> {
        rows.iter().map(Vec::as_slice)
    }

    #[test]
    fn scaling_names_round_trip() {
        for s in [
            Scaling::None,
            Scaling::L2,
            Scaling::Standardize,
            Scaling::StandardizeL2,
        ] {
            assert_eq!(s.to_string().parse::<Scaling>(), Ok(s));
        }
        assert_eq!(
            " Standardize+L2 ".parse::<Scaling>(),
            Ok(Scaling::StandardizeL2)
        );
        let err = "zscore".parse::<Scaling>().expect_err("unknown name");
        assert!(matches!(
            err,
            CoreError::UnknownName {
                what: "scaling",
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("zscore") && msg.contains("standardize+l2"),
            "{msg}"
        );
    }

    #[test]
    fn standardize_matches_hand_computation() {
        // Columns [1, 2, 3] and [10, 20, 30]: means 2 and 20, population variances 2/3 and 200/3.
        let rows = vec![vec![1.0f32, 10.0], vec![2.0, 20.0], vec![3.0, 30.0]];
        let s = Scaler::fit(Scaling::Standardize, slices(&rows), 2).expect("valid");
        assert!(s.is_frozen());
        assert_eq!(s.samples(), 3);
        assert!((s.mean()[0] - 2.0).abs() < 1e-15 && (s.mean()[1] - 20.0).abs() < 1e-13);
        assert!((s.inv_std()[0] - 1.5f64.sqrt()).abs() < 1e-14);
        assert!((s.inv_std()[1] - 0.015f64.sqrt()).abs() < 1e-14);
        // x = [4, 0]: (4 − 2)·sqrt(3/2) = sqrt(6); (0 − 20)·sqrt(3/200) = −sqrt(6).
        let out = s.transform_vec(&[4.0, 0.0]).expect("valid");
        assert!((out[0] - 6f64.sqrt()).abs() < 1e-13);
        assert!((out[1] + 6f64.sqrt()).abs() < 1e-13);
        // standardize+l2 normalises the same vector: [1, −1]/sqrt(2).
        let sl2 = Scaler::fit(Scaling::StandardizeL2, slices(&rows), 2).expect("valid");
        let out = sl2.transform_vec(&[4.0, 0.0]).expect("valid");
        let h = 0.5f64.sqrt();
        assert!((out[0] - h).abs() < 1e-15 && (out[1] + h).abs() < 1e-15);
    }

    #[test]
    fn none_and_l2_by_hand() {
        let none = Scaler::new(Scaling::None, 2).expect("valid");
        assert!(none.is_frozen());
        assert_eq!(
            none.transform_vec(&[3.0, -4.0]).expect("valid"),
            vec![3.0, -4.0]
        );
        let l2 = Scaler::new(Scaling::L2, 2).expect("valid");
        assert_eq!(
            l2.transform_vec(&[3.0, -4.0]).expect("valid"),
            vec![0.6, -0.8]
        );
        assert_eq!(
            l2.transform_vec(&[0.0, 0.0]).expect("valid"),
            vec![0.0, 0.0]
        );
        // fit on a non-standardising scaling validates samples but keeps the identity statistics.
        let rows = vec![vec![1.0f32, 2.0], vec![5.0, 7.0]];
        let fitted = Scaler::fit(Scaling::L2, slices(&rows), 2).expect("valid");
        assert_eq!(
            (fitted.mean(), fitted.inv_std()),
            (&[0.0, 0.0][..], &[1.0, 1.0][..])
        );
    }

    #[test]
    fn welford_is_accurate_with_large_offsets() {
        // Mean 1e4, spread ~1: naive Σx² − (Σx)²/n in f32 would lose all digits. Compare with a two-pass
        // computation on the same f32 values.
        let mut rng = StdRng::seed_from_u64(7);
        let rows: Vec<Vec<f32>> = (0..500)
            .map(|_| {
                vec![
                    1.0e4 + rng.random_range(-1.0f32..1.0),
                    rng.random_range(-3.0f32..3.0),
                ]
            })
            .collect();
        let s = Scaler::fit(Scaling::Standardize, slices(&rows), 2).expect("valid");
        for j in 0..2 {
            let col: Vec<f64> = rows.iter().map(|r| f64::from(r[j])).collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / col.len() as f64;
            assert!((s.mean()[j] - mean).abs() < 1e-9 * mean.abs().max(1.0));
            assert!((s.inv_std()[j] * var.sqrt() - 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn fold_matches_transform_then_dot() {
        let mut rng = StdRng::seed_from_u64(8);
        let dim = 16;
        // Outlier-style dimensions: varied offsets and scales, plus one constant dimension.
        let offsets: Vec<f32> = (0..dim).map(|_| rng.random_range(-50.0..50.0)).collect();
        let scales: Vec<f32> = (0..dim).map(|_| rng.random_range(0.01..20.0)).collect();
        let rows: Vec<Vec<f32>> = (0..200)
            .map(|_| {
                (0..dim)
                    .map(|j| {
                        if j == 3 {
                            7.5
                        } else {
                            offsets[j] + scales[j] * rng.random_range(-1.0f32..1.0)
                        }
                    })
                    .collect()
            })
            .collect();
        for scaling in [Scaling::None, Scaling::Standardize] {
            let s = Scaler::fit(scaling, slices(&rows), dim).expect("valid");
            for _ in 0..100 {
                let theta: Vec<f64> = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
                let (w, b) = s.fold_into_linear_head(&theta).expect("linear scaling");
                let x: Vec<f32> = (0..dim)
                    .map(|j| offsets[j] + 2.0 * scales[j] * rng.random_range(-1.0f32..1.0))
                    .collect();
                let z = s.transform_vec(&x).expect("valid");
                let scaled: f64 = theta.iter().zip(&z).map(|(t, z)| t * z).sum();
                let terms: Vec<f64> = w.iter().zip(&x).map(|(w, &x)| w * f64::from(x)).collect();
                let folded = terms.iter().sum::<f64>() + b;
                // Relative to the size of the summed terms: the sum itself may cancel to near zero.
                let magnitude = terms.iter().map(|t| t.abs()).sum::<f64>() + b.abs();
                assert!(
                    (folded - scaled).abs() <= 1e-10 * magnitude.max(f64::MIN_POSITIVE),
                    "{scaling}: {folded} vs {scaled}"
                );
            }
        }
    }

    #[test]
    fn fold_rejects_nonlinear_and_bad_theta() {
        let rows = vec![vec![1.0f32, 2.0], vec![3.0, 5.0]];
        for scaling in [Scaling::L2, Scaling::StandardizeL2] {
            let s = Scaler::fit(scaling, slices(&rows), 2).expect("valid");
            assert!(matches!(
                s.fold_into_linear_head(&[1.0, 1.0]),
                Err(CoreError::Parameter {
                    name: "scaling",
                    ..
                })
            ));
        }
        let s = Scaler::fit(Scaling::Standardize, slices(&rows), 2).expect("valid");
        assert!(matches!(
            s.fold_into_linear_head(&[1.0]),
            Err(CoreError::Dimension {
                what: "theta",
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            s.fold_into_linear_head(&[1.0, f64::NAN]),
            Err(CoreError::NonFinite {
                what: "theta",
                index: 1,
                ..
            })
        ));
    }

    #[test]
    fn bad_embeddings_give_typed_errors() {
        let s = Scaler::new(Scaling::None, 3).expect("valid");
        let mut out = [0.0; 3];
        assert_eq!(
            s.transform(&[1.0, 2.0], &mut out),
            Err(CoreError::Dimension {
                what: "embedding",
                expected: 3,
                got: 2
            })
        );
        assert!(matches!(
            s.transform(&[1.0, f32::NAN, 2.0], &mut out),
            Err(CoreError::NonFinite {
                what: "embedding",
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            s.transform(&[1.0, 2.0, f32::NEG_INFINITY], &mut out),
            Err(CoreError::NonFinite {
                what: "embedding",
                index: 2,
                ..
            })
        ));
        assert!(matches!(
            s.transform(&[1.0, 2.0, 3.0], &mut [0.0; 2]),
            Err(CoreError::Dimension {
                what: "scaler output",
                ..
            })
        ));
        // Warm-up rejects bad samples without touching the statistics.
        let mut w = Scaler::new(Scaling::Standardize, 2).expect("valid");
        assert!(!w.is_frozen());
        assert!(w.transform(&[1.0, 2.0], &mut [0.0; 2]).is_err());
        assert!(w.observe(&[1.0, f32::INFINITY]).is_err());
        assert!(w.observe(&[1.0]).is_err());
        assert_eq!(w.samples(), 0);
        w.observe(&[1.0, 2.0]).expect("valid");
        assert!(matches!(w.freeze(), Err(CoreError::Parameter { .. })));
        w.observe(&[3.0, 2.0]).expect("valid");
        w.freeze().expect("two samples");
        assert!(w.observe(&[1.0, 2.0]).is_err());
        assert!(matches!(
            Scaler::fit(Scaling::Standardize, std::iter::empty(), 2),
            Err(CoreError::Parameter { .. })
        ));
        assert!(matches!(
            Scaler::new(Scaling::None, 0),
            Err(CoreError::Empty { .. })
        ));
    }

    #[test]
    fn constant_dimensions_stay_finite() {
        // Dimension 0 exactly constant, dimension 1 constant up to f32 rounding of a large value, 2 varies.
        let rows: Vec<Vec<f32>> = (0..50)
            .map(|i| {
                vec![
                    3.25,
                    1000.0 + if i % 2 == 0 { 0.0 } else { 6.1e-5 },
                    i as f32,
                ]
            })
            .collect();
        for scaling in [Scaling::Standardize, Scaling::StandardizeL2] {
            let s = Scaler::fit(scaling, slices(&rows), 3).expect("valid");
            assert!(s.inv_std().iter().all(|v| v.is_finite()));
            assert_eq!(&s.inv_std()[..2], &[0.0, 0.0]);
            assert!(s.inv_std()[2] > 0.0);
            let out = s.transform_vec(&[100.0, -5.0, 7.0]).expect("valid");
            assert!(out.iter().all(|v| v.is_finite()));
            assert_eq!(&out[..2], &[0.0, 0.0]);
        }
        // All dimensions constant: the output is the zero vector, also under L2.
        let flat = vec![vec![1.0f32, 2.0]; 5];
        let s = Scaler::fit(Scaling::StandardizeL2, slices(&flat), 2).expect("valid");
        assert_eq!(s.transform_vec(&[9.0, 9.0]).expect("valid"), vec![0.0, 0.0]);
    }

    #[test]
    fn from_parts_round_trips_and_validates() {
        let rows = vec![vec![1.0f32, 2.0], vec![3.0, 7.0], vec![4.0, 1.0]];
        let s = Scaler::fit(Scaling::StandardizeL2, slices(&rows), 2).expect("valid");
        let back = Scaler::from_parts(s.mean().to_vec(), s.inv_std().to_vec(), s.scaling())
            .expect("valid");
        assert!(back.is_frozen());
        let x = [2.0f32, -1.0];
        assert_eq!(back.transform_vec(&x), s.transform_vec(&x));

        let std = Scaling::Standardize;
        assert!(matches!(
            Scaler::from_parts(vec![], vec![], std),
            Err(CoreError::Empty { .. })
        ));
        assert!(matches!(
            Scaler::from_parts(vec![0.0, 1.0], vec![1.0], std),
            Err(CoreError::Dimension { .. })
        ));
        assert!(matches!(
            Scaler::from_parts(vec![0.0, f64::NAN], vec![1.0, 1.0], std),
            Err(CoreError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            Scaler::from_parts(vec![0.0, 0.0], vec![1.0, f64::INFINITY], std),
            Err(CoreError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            Scaler::from_parts(vec![0.0, 0.0], vec![1.0, -1.0], std),
            Err(CoreError::Parameter { .. })
        ));
        assert!(matches!(
            Scaler::from_parts(vec![0.5, 0.0], vec![1.0, 1.0], Scaling::L2),
            Err(CoreError::Parameter { .. })
        ));
        assert!(Scaler::from_parts(vec![0.0, 0.0], vec![1.0, 1.0], Scaling::None).is_ok());
    }
}
