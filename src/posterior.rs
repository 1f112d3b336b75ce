//! Laplace posterior of a linear Bradley–Terry reward head.
//!
//! The reward of a response with (scaled) embedding `x` is `θᵀx`; for a pair with difference `v = x_a − x_b`,
//! `P(a ≻ b) = σ(θᵀv)`. The posterior is approximated by `N(θ̂, H⁻¹)` where `H` is the precision. We keep `H`
//! only as its lower Cholesky factor `L` (f64) and never form `H⁻¹`: every variance is a triangular solve.
//!
//! Labels enter in two ways:
//! - [`Posterior::update`]: the exact one-label step. The new mode lies on the line `θ + c·H⁻¹v`, where the
//!   scalar `c` solves `c = y − σ(m + c·s)` (`m = θᵀv`, `s = vᵀH⁻¹v`); then `H ← H + w′vvᵀ` with `w′` the Fisher
//!   weight at the new mode, a rank-one Cholesky update. O(d²) per label, in two passes over `L`
//!   ([`linalg::UpdateWork`]); labels that queued up can share the passes ([`Posterior::update_many`]).
//! - [`Posterior::refit`] / [`RefitJob`]: Newton/IRLS from the prior over every stored label. The online step
//!   linearises each label once, so old weights go stale as `θ` moves; the refit recomputes the exact MAP.
//!   It can run on another thread from a cheap snapshot; labels applied meanwhile are re-applied on top.

use std::sync::Arc;

use faer::{Mat, MatRef};

use crate::error::{check_dim, check_finite, CoreError};
use crate::linalg::{
    self, add_weighted_gram_lower, cholesky_lower, dot, label_nll, log_det_from_cholesky, sigmoid,
    solve_lower, solve_lower_transpose, BatchUpdate, UpdateWork,
};

/// Prior precision: isotropic `λ₀ I` (the usual case) or a dense matrix (warm start from an exported model,
/// or labels consolidated into the prior when the label store is full).
#[derive(Clone, Debug)]
pub enum PriorPrecision {
    Isotropic(f64),
    Dense(Mat<f64>),
}

/// Gaussian prior `N(mean, precision⁻¹)`.
#[derive(Clone, Debug)]
pub struct Prior {
    pub mean: Vec<f64>,
    pub precision: PriorPrecision,
}

impl Prior {
    /// `N(0, (1/λ₀) I)`.
    pub fn isotropic(dim: usize, lambda0: f64) -> Result<Self, CoreError> {
        if dim == 0 {
            return Err(CoreError::Empty {
                what: "model dimension",
            });
        }
        if !(lambda0.is_finite() && lambda0 > 0.0) {
            return Err(CoreError::Parameter {
                name: "prior_precision",
                value: lambda0.to_string(),
                reason: "must be finite and > 0",
            });
        }
        Ok(Self {
            mean: vec![0.0; dim],
            precision: PriorPrecision::Isotropic(lambda0),
        })
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// `H₀ (θ − θ₀)`.
    fn apply(&self, theta: &[f64]) -> Vec<f64> {
        let diff: Vec<f64> = theta.iter().zip(&self.mean).map(|(t, m)| t - m).collect();
        match &self.precision {
            PriorPrecision::Isotropic(l) => diff.iter().map(|x| x * l).collect(),
            PriorPrecision::Dense(h) => linalg::mat_vec(h.as_ref(), &diff),
        }
    }

    /// Dense lower-triangular copy of the precision, the starting point of every Hessian.
    fn dense_lower(&self) -> Mat<f64> {
        let d = self.dim();
        match &self.precision {
            PriorPrecision::Isotropic(l) => {
                Mat::from_fn(d, d, |i, j| if i == j { *l } else { 0.0 })
            }
            PriorPrecision::Dense(h) => {
                Mat::from_fn(d, d, |i, j| if i >= j { h[(i, j)] } else { 0.0 })
            }
        }
    }
}

/// One labelled comparison as the posterior stores it: the scaled difference `v = x_a − x_b` and the label
/// `y ∈ [0, 1]` (1: a wins, 0: b wins, 0.5: tie, anything between: a soft label or an annotator average).
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub v: Vec<f64>,
    pub y: f64,
}

impl Label {
    /// Validates a label against the model dimension.
    pub fn new(v: Vec<f64>, y: f64) -> Result<Self, CoreError> {
        if v.is_empty() {
            return Err(CoreError::Empty {
                what: "difference vector",
            });
        }
        check_finite("difference vector", &v)?;
        if !(y.is_finite() && (0.0..=1.0).contains(&y)) {
            return Err(CoreError::LabelOutOfRange { value: y });
        }
        Ok(Self { v, y })
    }
}

/// Predictive summary of a pair under the current posterior.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Posterior mean of the reward gap, `θ̂ᵀv`.
    pub mean: f64,
    /// Posterior variance of the reward gap, `vᵀH⁻¹v`.
    pub variance: f64,
    /// `σ(mean)`: the plug-in probability that a beats b.
    pub p: f64,
}

/// What one online update did, for metrics and tests.
#[derive(Clone, Copy, Debug)]
pub struct UpdateReport {
    /// Prediction before the label was applied (the prequential record).
    pub predicted: Prediction,
    /// Step length along `H⁻¹v`.
    pub step: f64,
    /// Fisher weight `p′(1 − p′)` added to the precision.
    pub weight: f64,
    /// True when the rank-one update hit a non-positive pivot and the factor was rebuilt.
    pub refactored: bool,
}

/// Running prequential scores: each label is predicted before it updates the model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prequential {
    pub labels: u64,
    pub log_loss_sum: f64,
    /// Labels with a winner (ties and soft 0.5 labels have no winner to predict).
    pub decided: u64,
    pub correct: u64,
}

impl Prequential {
    pub fn record(&mut self, p: f64, y: f64) {
        let p = p.clamp(1e-15, 1.0 - 1e-15);
        self.labels += 1;
        self.log_loss_sum += -(y * p.ln() + (1.0 - y) * (1.0 - p).ln());
        if y != 0.5 {
            self.decided += 1;
            if (p > 0.5) == (y > 0.5) {
                self.correct += 1;
            }
        }
    }

    /// Mean log-loss (nats) over all recorded labels.
    pub fn log_loss(&self) -> Option<f64> {
        (self.labels > 0).then(|| self.log_loss_sum / self.labels as f64)
    }

    /// Fraction of decided labels whose winner was predicted.
    pub fn accuracy(&self) -> Option<f64> {
        (self.decided > 0).then(|| self.correct as f64 / self.decided as f64)
    }
}

/// Options of the Newton/IRLS refit.
#[derive(Clone, Copy, Debug)]
pub struct RefitOptions {
    pub max_iterations: usize,
    /// Stop when the Newton step is this small relative to θ (∞-norms). Newton converges quadratically,
    /// so a tight tolerance costs about one extra iteration.
    pub relative_step: f64,
}

impl Default for RefitOptions {
    fn default() -> Self {
        Self {
            max_iterations: 100,
            relative_step: 1e-12,
        }
    }
}

/// Summary of a finished refit.
#[derive(Clone, Copy, Debug)]
pub struct RefitReport {
    pub iterations: usize,
    /// Infinity norm of the gradient of the negative log posterior at the returned mode.
    pub gradient_norm: f64,
    pub labels: usize,
}

/// Newton steps per α while the evidence fixed point is still moving α ([`RefitJob::run_evidence`]).
const EVIDENCE_NEWTON_STEPS: usize = 3;

/// A snapshot for an off-thread refit: the prior and the labels stored at snapshot time (shared, not copied).
#[derive(Clone, Debug)]
pub struct RefitJob {
    prior: Prior,
    labels: Vec<Arc<Label>>,
    start: Vec<f64>,
}

/// The result of [`RefitJob::run`], to hand back to [`Posterior::install_refit`].
#[derive(Clone, Debug)]
pub struct RefitOutcome {
    theta: Vec<f64>,
    chol: Mat<f64>,
    weights: Vec<f64>,
    /// The prior the mode was fitted under, when the refit chose a new one ([`RefitJob::run_evidence`]).
    prior: Option<Prior>,
    pub report: RefitReport,
}

impl RefitOutcome {
    /// The isotropic prior precision the refit chose, if it chose one.
    pub fn prior_precision(&self) -> Option<f64> {
        match self.prior.as_ref().map(|p| &p.precision) {
            Some(PriorPrecision::Isotropic(l)) => Some(*l),
            _ => None,
        }
    }
}

impl RefitJob {
    /// [`Self::run`] with the isotropic prior precision chosen by evidence maximisation (MacKay's fixed
    /// point, see [`evidence`]), starting from the snapshot's current λ₀ and mode. The outcome is the MAP
    /// under the returned prior, which [`Posterior::install_refit`] installs. A dense prior (a warm start
    /// or consolidated labels) is kept as it is: this is then a plain refit.
    pub fn run_evidence(
        &self,
        opts: RefitOptions,
        ev: &EvidenceOptions,
    ) -> Result<RefitOutcome, CoreError> {
        let PriorPrecision::Isotropic(mut alpha) = self.prior.precision else {
            return self.run(opts);
        };
        let d = self.prior.dim();
        let mut job = self.clone();
        let mut iterations = 0;
        // While α moves, a few warm-started Newton steps per α are enough (the two alternate, as in EM);
        // the mode returned is converged at the final α.
        let inner = RefitOptions {
            max_iterations: opts.max_iterations.min(EVIDENCE_NEWTON_STEPS),
            ..opts
        };
        let mut search = evidence::FixedPoint::default();
        for round in 1.. {
            job.prior.precision = PriorPrecision::Isotropic(alpha);
            let outcome = job.run(inner)?;
            iterations += outcome.report.iterations;
            let sq_norm: f64 = outcome
                .theta
                .iter()
                .zip(&job.prior.mean)
                .map(|(t, m)| (t - m) * (t - m))
                .sum();
            let tr = linalg::trace_inverse_from_cholesky(outcome.chol.as_ref());
            let target = evidence::mackay_target(alpha, d, sq_norm, tr, ev);
            job.start.clone_from(&outcome.theta);
            let next = search.next(alpha, target, ev);
            if next.is_none() || round >= ev.max_iterations.max(1) {
                let mut outcome = job.run(opts)?;
                outcome.prior = Some(job.prior.clone());
                outcome.report.iterations += iterations;
                return Ok(outcome);
            }
            alpha = next.expect("checked above");
        }
        unreachable!("the loop returns")
    }

    /// Newton's method with backtracking on the negative log posterior
    /// `½(θ−θ₀)ᵀH₀(θ−θ₀) + Σ_k nll(θᵀv_k, y_k)`, which is strictly convex, so the MAP is unique and the
    /// result does not depend on the start or on label order.
    pub fn run(&self, opts: RefitOptions) -> Result<RefitOutcome, CoreError> {
        let d = self.prior.dim();
        let n = self.labels.len();
        let par = linalg::matrix_par();
        // Vt: d×n, one label per column, for GEMM-class products.
        let vt = Mat::<f64>::from_fn(d, n, |i, j| self.labels[j].v[i]);
        let ys: Vec<f64> = self.labels.iter().map(|l| l.y).collect();
        let objective = |theta: &[f64], margins: &[f64]| -> f64 {
            let prior_term = 0.5
                * dot(
                    &theta
                        .iter()
                        .zip(&self.prior.mean)
                        .map(|(t, m)| t - m)
                        .collect::<Vec<_>>(),
                    &self.prior.apply(theta),
                );
            prior_term
                + margins
                    .iter()
                    .zip(&ys)
                    .map(|(&m, &y)| label_nll(m, y))
                    .sum::<f64>()
        };
        let margins_of = |theta: &[f64]| -> Vec<f64> {
            let t = faer::MatRef::from_column_major_slice(theta, d, 1);
            let m = vt.transpose() * t;
            (0..n).map(|j| m[(j, 0)]).collect()
        };

        let mut theta = self.start.clone();
        let mut margins = margins_of(&theta);
        let mut f = objective(&theta, &margins);
        let mut iterations = 0;
        loop {
            let probs: Vec<f64> = margins.iter().map(|&m| sigmoid(m)).collect();
            let weights: Vec<f64> = probs.iter().map(|p| p * (1.0 - p)).collect();
            // gradient g = H₀(θ−θ₀) − Σ (y − p) v
            let resid = Mat::<f64>::from_fn(n, 1, |j, _| ys[j] - probs[j]);
            let vr = &vt * &resid;
            let mut g = self.prior.apply(&theta);
            for (i, gi) in g.iter_mut().enumerate() {
                *gi -= vr[(i, 0)];
            }
            let mut hess = self.prior.dense_lower();
            if n > 0 {
                add_weighted_gram_lower(hess.as_mut(), vt.as_ref(), &weights, par);
            }
            let chol = cholesky_lower(hess.as_ref()).ok_or(CoreError::NotPositiveDefinite {
                context: "refit Hessian",
            })?;
            let mut step = g.clone();
            solve_lower(chol.as_ref(), &mut step);
            solve_lower_transpose(chol.as_ref(), &mut step);
            let decrement = 0.5 * dot(&g, &step);
            let gnorm = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            let step_norm = step.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            let theta_norm = theta.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            let converged = step_norm <= opts.relative_step * theta_norm || decrement <= 1e-300;
            if converged || iterations >= opts.max_iterations {
                return Ok(RefitOutcome {
                    theta,
                    chol,
                    weights,
                    prior: None,
                    report: RefitReport {
                        iterations,
                        gradient_norm: gnorm,
                        labels: n,
                    },
                });
            }
            // Near the mode (small decrement) the full Newton step is safe and converges quadratically,
            // while f can no longer resolve the decrease in floating point: take it unconditionally.
            if decrement < 1e-6 {
                theta.iter_mut().zip(&step).for_each(|(a, s)| *a -= s);
                margins = margins_of(&theta);
                f = objective(&theta, &margins);
                iterations += 1;
                continue;
            }
            // Otherwise backtracking (Armijo) line search along the Newton direction −step.
            let mut t = 1.0;
            loop {
                let cand: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
                let cm = margins_of(&cand);
                let cf = objective(&cand, &cm);
                if cf <= f - 0.25 * t * 2.0 * decrement || t < 1e-12 {
                    // Accept (or give up shrinking: we are at numerical precision).
                    if cf <= f {
                        theta = cand;
                        margins = cm;
                        f = cf;
                    }
                    break;
                }
                t *= 0.5;
            }
            iterations += 1;
            if t < 1e-12 {
                // No further progress possible in floating point; finish with the current point.
                let probs: Vec<f64> = margins.iter().map(|&m| sigmoid(m)).collect();
                let weights: Vec<f64> = probs.iter().map(|p| p * (1.0 - p)).collect();
                let mut hess = self.prior.dense_lower();
                if n > 0 {
                    add_weighted_gram_lower(hess.as_mut(), vt.as_ref(), &weights, par);
                }
                let chol = cholesky_lower(hess.as_ref()).ok_or(CoreError::NotPositiveDefinite {
                    context: "refit Hessian",
                })?;
                return Ok(RefitOutcome {
                    theta,
                    chol,
                    weights,
                    prior: None,
                    report: RefitReport {
                        iterations,
                        gradient_norm: gnorm,
                        labels: n,
                    },
                });
            }
        }
    }
}

/// Plain-data form of a posterior, for checkpoints and model files (faer has no serde support).
#[derive(Clone, Debug, PartialEq)]
pub struct PosteriorParts {
    pub prior_mean: Vec<f64>,
    /// `None`: isotropic with `prior_lambda`; `Some`: dense d×d column-major.
    pub prior_dense: Option<Vec<f64>>,
    pub prior_lambda: f64,
    pub theta: Vec<f64>,
    /// Lower Cholesky factor, d×d column-major.
    pub chol: Vec<f64>,
    pub labels: Vec<Label>,
    pub weights: Vec<f64>,
    pub version: u64,
    pub labels_applied: u64,
    pub refactorizations: u64,
    pub prequential: Prequential,
}

/// The posterior `N(θ̂, (L Lᵀ)⁻¹)` with its stored labels.
#[derive(Clone, Debug)]
pub struct Posterior {
    prior: Prior,
    theta: Vec<f64>,
    chol: Mat<f64>,
    labels: Vec<Arc<Label>>,
    /// Fisher weight each stored label currently contributes to `H`; lets us rebuild `H` exactly.
    weights: Vec<f64>,
    version: u64,
    labels_applied: u64,
    refactorizations: u64,
    prequential: Prequential,
    /// Buffers of the one-label update (not part of the model's state).
    work: UpdateWork,
}

impl Posterior {
    /// Posterior equal to the isotropic prior `N(0, (1/λ₀) I)`.
    pub fn new(dim: usize, lambda0: f64) -> Result<Self, CoreError> {
        Self::from_prior(Prior::isotropic(dim, lambda0)?)
    }

    /// Posterior equal to a given prior (e.g. a warm start `(θ, H)` from an exported model).
    pub fn from_prior(prior: Prior) -> Result<Self, CoreError> {
        let d = prior.dim();
        if d == 0 {
            return Err(CoreError::Empty {
                what: "model dimension",
            });
        }
        check_finite("prior mean", &prior.mean)?;
        if let PriorPrecision::Dense(h) = &prior.precision {
            if h.nrows() != d || h.ncols() != d {
                return Err(CoreError::Dimension {
                    what: "prior precision",
                    expected: d,
                    got: h.nrows(),
                });
            }
        }
        let chol =
            cholesky_lower(prior.dense_lower().as_ref()).ok_or(CoreError::NotPositiveDefinite {
                context: "prior precision",
            })?;
        Ok(Self {
            theta: prior.mean.clone(),
            prior,
            chol,
            labels: Vec::new(),
            weights: Vec::new(),
            version: 0,
            labels_applied: 0,
            refactorizations: 0,
            prequential: Prequential::default(),
            work: UpdateWork::default(),
        })
    }

    /// Warm start from an exported mean and precision.
    pub fn warm_start(theta: Vec<f64>, precision: Mat<f64>) -> Result<Self, CoreError> {
        check_dim("warm-start precision", theta.len(), precision.nrows())?;
        Self::from_prior(Prior {
            mean: theta,
            precision: PriorPrecision::Dense(precision),
        })
    }

    pub fn dim(&self) -> usize {
        self.theta.len()
    }
    pub fn theta(&self) -> &[f64] {
        &self.theta
    }
    /// Lower Cholesky factor `L` of the precision.
    pub fn cholesky(&self) -> MatRef<'_, f64> {
        self.chol.as_ref()
    }
    pub fn prior(&self) -> &Prior {
        &self.prior
    }
    pub fn labels(&self) -> impl ExactSizeIterator<Item = &Label> {
        self.labels.iter().map(|l| l.as_ref())
    }
    pub fn label_count(&self) -> usize {
        self.labels.len()
    }
    /// Increases by one with every applied label and every installed refit.
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Labels applied over the model's life (including those consolidated into the prior).
    pub fn labels_applied(&self) -> u64 {
        self.labels_applied
    }
    /// How often a non-positive pivot forced a rebuild of the factor.
    pub fn refactorizations(&self) -> u64 {
        self.refactorizations
    }
    pub fn prequential(&self) -> &Prequential {
        &self.prequential
    }

    /// The whitening map of the current state ([`Whitener`]): the low-rank form while the prior is
    /// isotropic and fewer than d/8 labels are stored (there `H = λ₀ I + Σ_k w_k v_k v_kᵀ` exactly: the
    /// stored weights are the ones the factor holds), otherwise the Cholesky factor.
    pub fn whitener(&self) -> Whitener<'_> {
        if let PriorPrecision::Isotropic(lambda0) = self.prior.precision {
            if Whitener::prefers_low_rank(self.labels.len(), self.dim()) {
                let labels = self
                    .labels
                    .iter()
                    .zip(&self.weights)
                    .map(|(l, &w)| (l.v.as_slice(), w));
                if let Some(w) = Whitener::low_rank(lambda0, self.dim(), labels) {
                    return w;
                }
            }
        }
        Whitener::Cholesky(self.chol.as_ref())
    }

    /// `log det H = 2 Σ log L_ii`.
    pub fn log_det(&self) -> f64 {
        log_det_from_cholesky(self.chol.as_ref())
    }

    /// Diagonal of `H⁻¹` (posterior marginal variances), O(d³/3) by solving for each unit vector's
    /// whitened image; used for model summaries, not on the hot path.
    pub fn marginal_variances(&self) -> Vec<f64> {
        let d = self.dim();
        // diag(H⁻¹)_i = ‖L⁻¹ e_i‖²: whiten the identity once.
        let mut eye = Mat::<f64>::identity(d, d);
        linalg::whiten_in_place(self.chol.as_ref(), eye.as_mut(), linalg::matrix_par());
        (0..d)
            .map(|j| (0..d).map(|i| eye[(i, j)] * eye[(i, j)]).sum())
            .collect()
    }

    /// Predictive mean, variance and probability of the pair with difference `v`.
    pub fn predict(&self, v: &[f64]) -> Result<Prediction, CoreError> {
        self.check_vector(v)?;
        let mean = dot(&self.theta, v);
        let mut u = v.to_vec();
        solve_lower(self.chol.as_ref(), &mut u);
        let variance = dot(&u, &u);
        Ok(Prediction {
            mean,
            variance,
            p: sigmoid(mean),
        })
    }

    fn check_vector(&self, v: &[f64]) -> Result<(), CoreError> {
        if v.is_empty() {
            return Err(CoreError::Empty {
                what: "difference vector",
            });
        }
        check_dim("difference vector", self.dim(), v.len())?;
        check_finite("difference vector", v)
    }

    /// Applies one label exactly (see the module doc). `y ∈ [0, 1]`.
    pub fn update(&mut self, v: &[f64], y: f64) -> Result<UpdateReport, CoreError> {
        self.check_vector(v)?;
        let label = Label::new(v.to_vec(), y)?;
        let report = self.apply_online(&label)?;
        self.record(label, &report);
        Ok(report)
    }

    /// Applies several labels in order, exactly as one [`Self::update`] after another (to rounding), but in
    /// batches of up to [`MAX_BATCH`] with two passes over the factor per batch instead of per label
    /// ([`BatchUpdate`]). Stops at the first invalid label (the earlier ones stay applied).
    pub fn update_many<'a>(
        &mut self,
        labels: impl IntoIterator<Item = (&'a [f64], f64)>,
    ) -> Result<Vec<UpdateReport>, CoreError> {
        let mut reports = Vec::new();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        for (v, y) in labels {
            let label = self
                .check_vector(v)
                .and_then(|()| Label::new(v.to_vec(), y));
            match label {
                Ok(label) => batch.push(label),
                Err(e) => {
                    self.apply_batch(batch, &mut reports)?;
                    return Err(e);
                }
            }
            if batch.len() == MAX_BATCH {
                self.apply_batch(std::mem::take(&mut batch), &mut reports)?;
            }
        }
        self.apply_batch(batch, &mut reports)?;
        Ok(reports)
    }

    /// Applies validated labels in order with one [`BatchUpdate`] (one label: [`Self::apply_online`]).
    fn apply_batch(
        &mut self,
        batch: Vec<Label>,
        reports: &mut Vec<UpdateReport>,
    ) -> Result<(), CoreError> {
        let first = reports.len();
        if batch.len() <= 1 {
            for label in batch {
                let report = self.apply_online(&label)?;
                self.record(label, &report);
                reports.push(report);
            }
            return Ok(());
        }
        let vs: Vec<&[f64]> = batch.iter().map(|l| l.v.as_slice()).collect();
        let mut work = BatchUpdate::forward(self.chol.as_ref(), &vs);
        for label in &batch {
            let (shift, s) = work.whiten_next();
            // The margin under the mode after the earlier labels of the batch.
            let m = dot(&self.theta, &label.v) + shift;
            let c = solve_step(m, s, label.y);
            let p_new = sigmoid(m + c * s);
            let weight = p_new * (1.0 - p_new);
            work.set_step(c, weight);
            reports.push(UpdateReport {
                predicted: Prediction {
                    mean: m,
                    variance: s,
                    p: sigmoid(m),
                },
                step: c,
                weight,
                refactored: false,
            });
        }
        let updated = work.backward_update(&mut self.chol) && !pivot_failure_injected();
        for (c, h) in work.directions() {
            for (t, h) in self.theta.iter_mut().zip(h) {
                *t += c * h;
            }
        }
        for (label, report) in batch.into_iter().zip(&reports[first..]) {
            self.record(label, report);
        }
        if !updated {
            // As in `apply_online`; the factor now holds every label of the batch.
            self.refactorizations += 1;
            reports.last_mut().expect("a batch has labels").refactored = true;
            self.chol = self.rebuild_factor(None)?;
        }
        Ok(())
    }

    /// The label store's and the counters' side of an applied label.
    fn record(&mut self, label: Label, report: &UpdateReport) {
        self.prequential.record(report.predicted.p, label.y);
        self.labels.push(Arc::new(label));
        self.weights.push(report.weight);
        self.labels_applied += 1;
        self.version += 1;
    }

    /// The exact mode step plus rank-one update; does not touch the label store. Two passes over the
    /// factor ([`UpdateWork`]): the forward solve gives `s` (hence the step and the Fisher weight), then one
    /// backward pass gives `H⁻¹v` from the old factor while it writes the updated one.
    fn apply_online(&mut self, label: &Label) -> Result<UpdateReport, CoreError> {
        let v = &label.v;
        let y = label.y;
        let m = dot(&self.theta, v);
        let s = self.work.forward(self.chol.as_ref(), v);
        let predicted = Prediction {
            mean: m,
            variance: s,
            p: sigmoid(m),
        };
        let c = solve_step(m, s, y);
        let p_new = sigmoid(m + c * s);
        let weight = p_new * (1.0 - p_new);
        let updated = if weight > 0.0 {
            self.work.backward_update(&mut self.chol, weight) && !pivot_failure_injected()
        } else {
            self.work.backward(self.chol.as_ref());
            true
        };
        for (t, h) in self.theta.iter_mut().zip(self.work.direction()) {
            *t += c * h; // work.direction() = H⁻¹v with the factor before this label
        }
        let mut refactored = false;
        if !updated {
            // Every pivot of the fused update is ≥ the old one for finite input; a non-finite or
            // non-positive one means the factor was already unusable. Rebuild H from the prior and the
            // stored weights, then factor afresh.
            self.refactorizations += 1;
            refactored = true;
            self.chol = self.rebuild_factor(Some((v, weight)))?;
        }
        Ok(UpdateReport {
            predicted,
            step: c,
            weight,
            refactored,
        })
    }

    /// `H = H₀ + Σ w_k v_k v_kᵀ (+ w v vᵀ)` over the labels the factor holds (the first `weights.len()`
    /// stored labels: fewer than stored while a refit's later labels are being re-applied), factored.
    fn rebuild_factor(&self, extra: Option<(&[f64], f64)>) -> Result<Mat<f64>, CoreError> {
        let d = self.dim();
        let mut h = self.prior.dense_lower();
        let held = &self.labels[..self.weights.len()];
        let n = held.len() + usize::from(extra.is_some());
        let vt = Mat::<f64>::from_fn(d, n, |i, j| match held.get(j) {
            Some(l) => l.v[i],
            None => extra.map(|(v, _)| v[i]).unwrap_or(0.0),
        });
        let mut w = self.weights.clone();
        if let Some((_, we)) = extra {
            w.push(we);
        }
        add_weighted_gram_lower(h.as_mut(), vt.as_ref(), &w, linalg::matrix_par());
        cholesky_lower(h.as_ref()).ok_or(CoreError::NotPositiveDefinite {
            context: "rebuilding the precision after a non-positive pivot",
        })
    }

    /// A snapshot to refit on another thread (labels are shared, not copied).
    pub fn refit_job(&self) -> RefitJob {
        RefitJob {
            prior: self.prior.clone(),
            labels: self.labels.clone(),
            start: self.theta.clone(),
        }
    }

    /// Installs a refit computed from [`Self::refit_job`]; labels applied after the snapshot are re-applied
    /// online on top of the new mode, so no label is lost or counted twice.
    pub fn install_refit(&mut self, outcome: RefitOutcome) -> Result<(), CoreError> {
        let at = outcome.report.labels;
        if at > self.labels.len() || outcome.theta.len() != self.dim() {
            return Err(CoreError::Parameter {
                name: "refit outcome",
                value: format!("{at} labels"),
                reason: "does not belong to this posterior",
            });
        }
        if let Some(prior) = outcome.prior {
            if prior.dim() != self.dim() {
                return Err(CoreError::Parameter {
                    name: "refit outcome",
                    value: format!("prior of dimension {}", prior.dim()),
                    reason: "does not belong to this posterior",
                });
            }
            self.prior = prior;
        }
        self.theta = outcome.theta;
        self.chol = outcome.chol;
        let later: Vec<Arc<Label>> = self.labels[at..].to_vec();
        // Until the later labels are re-applied, the factor holds the first `at` labels only; the weights
        // say so, and a rebuild after a non-positive pivot reads the labels the weights cover.
        self.weights.truncate(0);
        self.weights.extend_from_slice(&outcome.weights);
        for label in &later {
            let report = self.apply_online(label)?;
            self.weights.push(report.weight);
        }
        self.version += 1;
        Ok(())
    }

    /// Refits in place (synchronously).
    pub fn refit(&mut self, opts: RefitOptions) -> Result<RefitReport, CoreError> {
        let outcome = self.refit_job().run(opts)?;
        let report = outcome.report;
        self.install_refit(outcome)?;
        Ok(report)
    }

    /// Refits in place with the prior precision chosen by evidence maximisation
    /// ([`RefitJob::run_evidence`]).
    pub fn refit_evidence(
        &mut self,
        opts: RefitOptions,
        ev: &EvidenceOptions,
    ) -> Result<RefitReport, CoreError> {
        let outcome = self.refit_job().run_evidence(opts, ev)?;
        let report = outcome.report;
        self.install_refit(outcome)?;
        Ok(report)
    }

    /// The isotropic prior precision λ₀, or `None` for a dense prior.
    pub fn prior_precision(&self) -> Option<f64> {
        match self.prior.precision {
            PriorPrecision::Isotropic(l) => Some(l),
            PriorPrecision::Dense(_) => None,
        }
    }

    /// Replaces the isotropic prior precision of a posterior that holds no label yet (the daemon sets the
    /// `auto` prior's starting value once the feature scale is known).
    pub fn reset_prior_precision(&mut self, lambda0: f64) -> Result<(), CoreError> {
        if self.labels_applied > 0 || !matches!(self.prior.precision, PriorPrecision::Isotropic(_))
        {
            return Err(CoreError::Parameter {
                name: "prior_precision",
                value: lambda0.to_string(),
                reason: "can only be reset on an isotropic prior before any label",
            });
        }
        let prior = Prior::isotropic(self.dim(), lambda0)?;
        *self = Self::from_prior(Prior {
            mean: self.prior.mean.clone(),
            ..prior
        })?;
        Ok(())
    }

    /// Laplace approximation of the log marginal likelihood of the stored labels under an isotropic
    /// prior, evaluated at the current mode and factor (exact after a refit):
    /// `Σ ln p(y|θ̂) − (λ₀/2)‖θ̂ − θ₀‖² + (d/2) ln λ₀ − ½ ln det H` (constant `−(d/2) ln 2π` cancels).
    /// `None` for a dense prior.
    pub fn log_evidence(&self) -> Option<f64> {
        let lambda0 = self.prior_precision()?;
        let fit: f64 = self
            .labels
            .iter()
            .map(|l| label_nll(dot(&self.theta, &l.v), l.y))
            .sum();
        let sq: f64 = self
            .theta
            .iter()
            .zip(&self.prior.mean)
            .map(|(t, m)| (t - m) * (t - m))
            .sum();
        Some(
            -fit - 0.5 * lambda0 * sq + 0.5 * self.dim() as f64 * lambda0.ln()
                - 0.5 * self.log_det(),
        )
    }

    /// `tr(H⁻¹)`, the summed posterior variance (O(d³/3)).
    pub fn trace_inverse(&self) -> f64 {
        linalg::trace_inverse_from_cholesky(self.chol.as_ref())
    }

    /// Folds every stored label into the prior: the prior becomes the current Laplace posterior and the
    /// label store is emptied. Bounds memory for long runs; later refits re-linearise only newer labels.
    pub fn consolidate(&mut self) {
        let d = self.dim();
        let h = &self.chol * self.chol.transpose();
        self.prior = Prior {
            mean: self.theta.clone(),
            precision: PriorPrecision::Dense(Mat::from_fn(d, d, |i, j| h[(i, j)])),
        };
        self.labels.clear();
        self.weights.clear();
        self.version += 1;
    }

    /// Gradient of the negative log posterior at the current θ (for tests and diagnostics).
    pub fn gradient(&self) -> Vec<f64> {
        let mut g = self.prior.apply(&self.theta);
        for l in &self.labels {
            let r = l.y - sigmoid(dot(&self.theta, &l.v));
            for (gi, vi) in g.iter_mut().zip(&l.v) {
                *gi -= r * vi;
            }
        }
        g
    }

    /// Plain-data copy for checkpoints.
    pub fn to_parts(&self) -> PosteriorParts {
        let d = self.dim();
        let (prior_dense, prior_lambda) = match &self.prior.precision {
            PriorPrecision::Isotropic(l) => (None, *l),
            PriorPrecision::Dense(h) => {
                (Some((0..d * d).map(|k| h[(k % d, k / d)]).collect()), 0.0)
            }
        };
        PosteriorParts {
            prior_mean: self.prior.mean.clone(),
            prior_dense,
            prior_lambda,
            theta: self.theta.clone(),
            chol: (0..d * d).map(|k| self.chol[(k % d, k / d)]).collect(),
            labels: self.labels.iter().map(|l| (**l).clone()).collect(),
            weights: self.weights.clone(),
            version: self.version,
            labels_applied: self.labels_applied,
            refactorizations: self.refactorizations,
            prequential: self.prequential,
        }
    }

    /// Rebuilds a posterior from [`PosteriorParts`], validating every shape and value.
    pub fn from_parts(p: PosteriorParts) -> Result<Self, CoreError> {
        let d = p.theta.len();
        if d == 0 {
            return Err(CoreError::Empty {
                what: "model dimension",
            });
        }
        check_dim("prior mean", d, p.prior_mean.len())?;
        check_dim("cholesky factor", d * d, p.chol.len())?;
        check_finite("theta", &p.theta)?;
        check_finite("cholesky factor", &p.chol)?;
        check_dim("label weights", p.labels.len(), p.weights.len())?;
        let precision = match p.prior_dense {
            None => {
                if !(p.prior_lambda.is_finite() && p.prior_lambda > 0.0) {
                    return Err(CoreError::Parameter {
                        name: "prior_precision",
                        value: p.prior_lambda.to_string(),
                        reason: "must be finite and > 0",
                    });
                }
                PriorPrecision::Isotropic(p.prior_lambda)
            }
            Some(h) => {
                check_dim("prior precision", d * d, h.len())?;
                check_finite("prior precision", &h)?;
                PriorPrecision::Dense(Mat::from_fn(d, d, |i, j| h[i + j * d]))
            }
        };
        let chol = Mat::from_fn(d, d, |i, j| if i >= j { p.chol[i + j * d] } else { 0.0 });
        if (0..d).any(|i| chol[(i, i)] <= 0.0) {
            return Err(CoreError::NotPositiveDefinite {
                context: "stored cholesky factor",
            });
        }
        let mut labels = Vec::with_capacity(p.labels.len());
        for l in p.labels {
            check_dim("stored label", d, l.v.len())?;
            labels.push(Arc::new(Label::new(l.v, l.y)?));
        }
        Ok(Self {
            prior: Prior {
                mean: p.prior_mean,
                precision,
            },
            theta: p.theta,
            chol,
            labels,
            weights: p.weights,
            version: p.version,
            labels_applied: p.labels_applied,
            refactorizations: p.refactorizations,
            prequential: p.prequential,
            work: UpdateWork::default(),
        })
    }
}

/// Whether a refit is due after the `applied`-th label with cadence `every` (0: never): at every multiple
/// of `every`, and early at 32, 64, 128, … labels below it, because the first labels' Fisher weights go
/// stale fastest and an `auto` prior is re-chosen at each refit. The daemon and anything that replays its
/// labels use this one rule.
pub fn refit_due(applied: u64, every: u64) -> bool {
    every > 0
        && applied > 0
        && (applied % every == 0 || (applied >= 32 && applied < every && applied.is_power_of_two()))
}

/// Largest batch [`Posterior::update_many`] applies with one [`BatchUpdate`]: the factor is read and written
/// once per batch, while the work done in cache per label (its step on each column, O(n·d) vector work)
/// and the `2n` work vectors grow with `n`.
pub const MAX_BATCH: usize = 16;

// Tests set this to send the next label updates down the refactorisation path (which finite input
// cannot reach otherwise).
#[cfg(test)]
thread_local! {
    static INJECT_PIVOT_FAILURE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn pivot_failure_injected() -> bool {
    INJECT_PIVOT_FAILURE.with(|f| f.get())
}

#[cfg(not(test))]
#[inline(always)]
fn pivot_failure_injected() -> bool {
    false
}

/// Solves `c = y − σ(m + c·s)` for the step length. The left side minus the right is strictly increasing in
/// `c` and changes sign on `[y − 1, y]`, so a Newton iteration safeguarded by bisection always converges.
pub fn solve_step(m: f64, s: f64, y: f64) -> f64 {
    let g = |c: f64| c - y + sigmoid(m + c * s);
    let (mut lo, mut hi) = (y - 1.0, y);
    let mut c = y - sigmoid(m); // exact when s = 0, a good start otherwise
    for _ in 0..100 {
        let gc = g(c);
        if gc == 0.0 {
            return c;
        }
        if gc > 0.0 {
            hi = c;
        } else {
            lo = c;
        }
        let p = sigmoid(m + c * s);
        let dg = 1.0 + s * p * (1.0 - p);
        let mut next = c - gc / dg;
        if !(next > lo && next < hi) {
            next = 0.5 * (lo + hi);
        }
        if (next - c).abs() <= 1e-16 * (1.0 + c.abs()) {
            return next;
        }
        c = next;
    }
    c
}

pub mod evidence;
mod whitener;
pub use evidence::{EvidenceOptions, PriorSetting};
pub use whitener::Whitener;

#[cfg(test)]
mod tests;
