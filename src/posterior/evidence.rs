//! The prior precision set by the data: type-II maximum likelihood (evidence maximisation) under the
//! Laplace approximation.
//!
//! For an isotropic prior `θ ~ N(θ₀, α⁻¹ I)` the Laplace approximation of the log marginal likelihood is
//!
//! `ln Z(α) ≈ Σ_k ln p(y_k | θ̂) − (α/2)‖θ̂ − θ₀‖² + (d/2) ln α − ½ ln det H`,   `H = αI + Σ_k w_k v_k v_kᵀ`,
//!
//! with `θ̂` the MAP at α. Setting its derivative to zero (holding the Fisher weights fixed) gives MacKay's
//! fixed point `α ← γ / ‖θ̂ − θ₀‖²` with `γ = d − α·tr(H⁻¹)`, the number of directions the labels have
//! determined. Each iteration is a Newton refit warm-started at the previous mode plus `tr(H⁻¹) = ‖L⁻¹‖_F²`
//! (O(d³/3)); the step is damped in `ln α` and α stays inside a clamp, so a few labels cannot send it to
//! 0 or ∞. The daemon runs a few iterations at every refit, continuing from the previous value.
//!
//! Why it matters: on standardised features `‖x‖² ≈ d`, so a fixed λ₀ = 1 lets a few hundred labels
//! over-fit hundreds of dimensions; the right value depends on the data and the label count (on the
//! `realtext` set it is in the thousands). Evidence maximisation optimises likelihood, not ranking; the
//! strategy report measures where it lands against the best fixed prior chosen in hindsight.

use std::fmt;
use std::str::FromStr;

use crate::error::CoreError;

/// How the isotropic prior precision λ₀ is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PriorSetting {
    /// A fixed λ₀ (> 0).
    Fixed(f64),
    /// Evidence maximisation at every refit, starting from the data's scale.
    Auto,
}

impl PriorSetting {
    /// λ₀ before any label: the fixed value, or for `Auto` the mean squared norm of a difference
    /// vector (`2·mean ‖x − x̄‖²` of the scaled pool: a prior gap variance of one logit), which
    /// the first refit then corrects.
    pub fn initial(self, mean_sq_difference: f64) -> f64 {
        match self {
            Self::Fixed(l) => l,
            Self::Auto if mean_sq_difference.is_finite() && mean_sq_difference > 0.0 => {
                mean_sq_difference
            }
            Self::Auto => 1.0,
        }
    }

    pub fn is_auto(self) -> bool {
        self == Self::Auto
    }

    /// Rejects a fixed value that is not finite and positive.
    pub fn validate(self) -> Result<Self, CoreError> {
        match self {
            Self::Fixed(l) if !(l.is_finite() && l > 0.0) => Err(CoreError::Parameter {
                name: "prior_precision",
                value: l.to_string(),
                reason: "must be \"auto\" or a finite number > 0",
            }),
            s => Ok(s),
        }
    }
}

impl FromStr for PriorSetting {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        if s.trim() == "auto" {
            return Ok(Self::Auto);
        }
        let v: f64 = s.trim().parse().map_err(|_| CoreError::Parameter {
            name: "prior_precision",
            value: s.to_string(),
            reason: "must be \"auto\" or a finite number > 0",
        })?;
        Self::Fixed(v).validate()
    }
}

impl fmt::Display for PriorSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(l) => write!(f, "{l}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for PriorSetting {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(de)? {
            Raw::Number(v) => Ok(Self::Fixed(v)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Options of the evidence fixed point.
#[derive(Clone, Copy, Debug)]
pub struct EvidenceOptions {
    /// Fixed-point iterations per call (each a warm-started Newton refit plus `tr(H⁻¹)`).
    pub max_iterations: usize,
    /// Converged when one iteration would move `ln α` by less than this.
    pub tolerance: f64,
    /// Largest move of `ln α` per iteration (damping against oscillation while labels are few).
    pub max_log_step: f64,
    /// α is clamped to `[min, max]`.
    pub min: f64,
    pub max: f64,
}

impl Default for EvidenceOptions {
    fn default() -> Self {
        Self {
            max_iterations: 20,
            tolerance: 1e-2,
            max_log_step: 1.0,
            min: 1e-6,
            max: 1e9,
        }
    }
}

/// MacKay's update from α, given the MAP's squared distance from the prior mean and `tr(H⁻¹)`:
/// `γ/‖θ̂ − θ₀‖²`, clamped (undamped: [`FixedPoint`] damps and accelerates it).
pub fn mackay_target(
    alpha: f64,
    dim: usize,
    sq_norm: f64,
    trace_inverse: f64,
    opts: &EvidenceOptions,
) -> f64 {
    let gamma = (dim as f64 - alpha * trace_inverse).max(0.0);
    // θ̂ at the prior mean (no labels, or labels that cancel): nothing argues against a stronger prior.
    let target = if sq_norm > 0.0 {
        gamma.max(1e-300) / sq_norm
    } else {
        opts.max
    };
    target.clamp(opts.min, opts.max)
}

/// The search for `ln α = ln target(α)`. MacKay's plain iteration converges only linearly, and slowly
/// when few directions are determined (measured: 20 iterations without converging on 10,000 noisy labels
/// at d = 768); secant steps on `g(x) = ln target(eˣ) − x` converge superlinearly near the fixed point.
/// Every step is clamped to `max_log_step` and α to `[min, max]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FixedPoint {
    previous: Option<(f64, f64)>,
}

impl FixedPoint {
    /// The next α from α and its target; `None` once `|ln target − ln α| < tolerance` (converged).
    pub fn next(&mut self, alpha: f64, target: f64, opts: &EvidenceOptions) -> Option<f64> {
        let x = alpha.ln();
        let g = target.ln() - x;
        if g.abs() < opts.tolerance {
            return None;
        }
        let mut step = g;
        if let Some((xp, gp)) = self.previous {
            let slope = (g - gp) / (x - xp);
            // A stable fixed point has g decreasing through zero; otherwise take the plain step.
            if slope.is_finite() && slope < 0.0 {
                step = -g / slope;
            }
        }
        self.previous = Some((x, g));
        let step = step.clamp(-opts.max_log_step, opts.max_log_step);
        let next = (x + step).exp().clamp(opts.min, opts.max);
        // Pinned at a clamp bound: nothing left to move.
        (next != alpha).then_some(next)
    }
}
