//! The learner: the frozen feature scaler and the posterior over θ, the label update, and the refit
//! cadence. It knows nothing of requests or Kafka; the engine hands it difference vectors and labels.
//!
//! - **Scaler**: the instance's own warm-up ([`Learner::observe`]) only makes a *proposal*; the scaler the
//!   model uses is the one the group adopted ([`Learner::adopt`], the first `armd.scaler.v1` on the labels
//!   topic), so every instance of a group scales alike. Part of the model from then on (a scaled
//!   difference is only meaningful under the scaler that made it).
//! - **Refit** (docs/design.md §3.3): at deterministic label counts ([`crate::posterior::refit_due`]) a
//!   [`RefitJob`] snapshot runs on its own thread; [`Learner::poll_refit`] installs it, re-applying newer
//!   labels on top. The result does not depend on *when* it is installed (the same labels are re-applied
//!   in the same order), so a replay of the same labels reproduces the posterior. A second refit waits for
//!   the first. With `model.prior_precision = "auto"` each refit also chooses λ₀ by the evidence.
//! - **Consolidation**: beyond `max_labels` stored labels the store is folded into the prior (after any
//!   pending refit).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use faer::MatRef;

use super::checkpoint::ScalerState;
use super::config::Config;
use super::messages::{ModelSnapshot, PrequentialSummary, MODEL_SCHEMA};
use super::telemetry::Metrics;
use crate::error::CoreError;
use crate::features::Scaler;
use crate::posterior::{
    EvidenceOptions, Posterior, PosteriorParts, PriorSetting, RefitJob, RefitOptions, RefitOutcome,
    UpdateReport,
};

struct PendingRefit {
    /// Label-store length at the snapshot.
    at: usize,
    started: Instant,
    rx: mpsc::Receiver<std::result::Result<RefitOutcome, CoreError>>,
}

/// See the module doc.
pub struct Learner {
    cfg: Arc<Config>,
    m: Arc<Metrics>,
    posterior: Posterior,
    /// The adopted scaler (unfrozen until [`Learner::adopt`]).
    scaler: Scaler,
    /// This instance's warm-up statistics: the proposal it makes.
    warmup: Scaler,
    warmup_samples: u64,
    refit: Option<PendingRefit>,
}

impl Learner {
    /// The prior and an unfrozen scaler. `auto` starts at 1 and is set from the data's scale when the
    /// scaler freezes ([`Learner::start_auto_prior`]).
    pub fn new(cfg: Arc<Config>, m: Arc<Metrics>) -> Result<Self> {
        let d = cfg.model.dim;
        Ok(Self {
            posterior: Posterior::new(d, cfg.model.prior_precision.initial(f64::NAN))?,
            scaler: Scaler::new(cfg.model.scaling, d)?.unfrozen(),
            warmup: Scaler::new(cfg.model.scaling, d)?,
            warmup_samples: 0,
            refit: None,
            cfg,
            m,
        })
    }

    /// Restores a checkpointed scaler and posterior, and re-runs the refit that was in progress (on the
    /// same labels: the result is the unique MAP).
    pub fn restore(
        &mut self,
        scaler: Option<&ScalerState>,
        parts: PosteriorParts,
        pending_refit: Option<u64>,
    ) -> Result<()> {
        if let Some(s) = scaler {
            if s.scaling != self.cfg.model.scaling {
                bail!(
                    "checkpoint's model was fitted with scaling {:?}, but model.scaling is {:?}",
                    s.scaling.name(),
                    self.cfg.model.scaling.name()
                );
            }
            self.scaler = Scaler::from_parts(s.mean.clone(), s.inv_std.clone(), s.scaling)
                .context("checkpoint scaler")?;
        }
        self.posterior = Posterior::from_parts(parts.clone()).context("checkpoint posterior")?;
        if let Some(at) = pending_refit {
            let at = usize::try_from(at).unwrap_or(usize::MAX);
            if at > parts.labels.len() {
                bail!(
                    "checkpoint's pending refit covers {at} labels but only {} are stored",
                    parts.labels.len()
                );
            }
            let mut snap = parts;
            snap.labels.truncate(at);
            snap.weights.truncate(at);
            let job = Posterior::from_parts(snap)
                .context("checkpoint posterior (refit snapshot)")?
                .refit_job();
            self.spawn_refit(job, at);
        }
        Ok(())
    }

    pub fn posterior(&self) -> &Posterior {
        &self.posterior
    }
    pub fn scaler(&self) -> &Scaler {
        &self.scaler
    }
    pub fn refit_pending(&self) -> bool {
        self.refit.is_some()
    }
    /// Label-store length of the pending refit's snapshot (checkpointed, re-run on restore).
    pub fn pending_refit_at(&self) -> Option<u64> {
        self.refit.as_ref().map(|p| p.at as u64)
    }

    /// The frozen scaler's statistics (None before it froze).
    pub fn scaler_state(&self) -> Option<ScalerState> {
        self.scaler.is_frozen().then(|| ScalerState {
            scaling: self.scaler.scaling(),
            mean: self.scaler.mean().to_vec(),
            inv_std: self.scaler.inv_std().to_vec(),
        })
    }

    /// Feeds a warm-up sample while no scaler is adopted; returns whether this instance's proposal is now
    /// ready ([`Learner::proposal`]): after `model.warmup_samples` responses (at least one).
    pub fn observe(&mut self, raw: &[f32]) -> bool {
        let want = self.cfg.model.warmup_samples.max(1);
        if self.scaler.is_frozen() || self.warmup_samples >= want {
            return false;
        }
        if self.warmup.scaling().standardizes() {
            if let Err(e) = self.warmup.observe(raw) {
                // Cannot happen for a decoded response (dimension and finiteness are checked); keep going.
                tracing::warn!(error = %e, "warm-up sample rejected by the scaler");
                return false;
            }
        }
        self.warmup_samples += 1;
        self.m.scaler_warmup_samples.set(self.warmup_samples as f64);
        if self.warmup_samples < want {
            return false;
        }
        match self.warmup.freeze() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot freeze the warm-up scaler yet");
                self.warmup_samples -= 1;
                false
            }
        }
    }

    /// This instance's frozen warm-up scaler and its sample count, once [`Learner::observe`] said so.
    pub fn proposal(&self) -> Option<(&Scaler, u64)> {
        (self.warmup.is_frozen() && self.warmup_samples >= self.cfg.model.warmup_samples.max(1))
            .then_some((&self.warmup, self.warmup_samples))
    }

    /// Adopts the group's scaler (the first proposal on the labels topic) and, with `auto`, starts the prior
    /// from the proposal's `pair_spread`. Returns false (and changes nothing) when a scaler is already
    /// adopted: later proposals are ignored.
    pub fn adopt(&mut self, mean: Vec<f64>, inv_std: Vec<f64>, pair_spread: f64) -> Result<bool> {
        if self.scaler.is_frozen() {
            return Ok(false);
        }
        self.scaler = Scaler::from_parts(mean, inv_std, self.cfg.model.scaling)
            .context("the group's scaler")?;
        self.start_auto_prior(pair_spread);
        tracing::info!(
            scaling = %self.scaler.scaling(),
            "feature scaler adopted; selection can start"
        );
        self.m.scaler_frozen.set(1.0);
        Ok(true)
    }

    /// With `auto`, before any label: starts the evidence iteration at the data's scale (`spread`, the
    /// mean squared norm of a random difference vector).
    fn start_auto_prior(&mut self, spread: f64) {
        if !self.cfg.model.prior_precision.is_auto() || self.posterior.labels_applied() > 0 {
            return;
        }
        let start = self.cfg.model.prior_precision.initial(spread);
        match self.posterior.reset_prior_precision(start) {
            Ok(()) => tracing::info!(
                prior_precision = start,
                "auto prior starts from the data's scale"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot set the auto prior's starting value"),
        }
    }

    /// The scaled difference `x_a − x_b` of two raw embeddings.
    pub fn difference(&self, raw_a: &[f32], raw_b: &[f32]) -> Result<Vec<f64>, CoreError> {
        let va = self.scaler.transform_vec(raw_a)?;
        let vb = self.scaler.transform_vec(raw_b)?;
        Ok(va.iter().zip(&vb).map(|(x, y)| x - y).collect())
    }

    /// Applies one label to difference `v` exactly, then runs the consolidation and refit cadence.
    pub fn apply(&mut self, v: &[f64], y: f64) -> Result<UpdateReport, CoreError> {
        let started = Instant::now();
        let report = self.posterior.update(v, y)?;
        self.m
            .update_duration
            .record(started.elapsed().as_secs_f64());
        if report.refactored {
            tracing::warn!("rank-one update hit a non-positive pivot; factor rebuilt");
        }
        self.after_label();
        Ok(report)
    }

    /// Consolidation and refit cadence, at deterministic label counts.
    fn after_label(&mut self) {
        if self.posterior.label_count() > self.cfg.model.max_labels {
            self.finish_refit(true);
            self.posterior.consolidate();
            self.m.consolidations.increment(1);
            tracing::info!(
                labels_applied = self.posterior.labels_applied(),
                "label store folded into the prior"
            );
        }
        if crate::posterior::refit_due(self.posterior.labels_applied(), self.cfg.model.refit_every)
        {
            self.finish_refit(true);
            if self.posterior.label_count() > 0 {
                let at = self.posterior.label_count();
                self.spawn_refit(self.posterior.refit_job(), at);
            }
        }
        self.update_gauges();
    }

    fn spawn_refit(&mut self, job: RefitJob, at: usize) {
        let (tx, rx) = mpsc::channel();
        let prior = self.cfg.model.prior_precision;
        let spawned = std::thread::Builder::new()
            .name("armd-refit".into())
            .spawn(move || {
                let _ = tx.send(match prior {
                    PriorSetting::Auto => {
                        job.run_evidence(RefitOptions::default(), &EvidenceOptions::default())
                    }
                    PriorSetting::Fixed(_) => job.run(RefitOptions::default()),
                });
            });
        match spawned {
            Ok(_) => {
                self.refit = Some(PendingRefit {
                    at,
                    started: Instant::now(),
                    rx,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the refit thread; skipping this refit")
            }
        }
    }

    /// Installs a finished refit. With `wait`, blocks until the pending one finishes. Returns whether one
    /// was installed.
    fn finish_refit(&mut self, wait: bool) -> bool {
        let Some(p) = &self.refit else { return false };
        let result = if wait {
            p.rx.recv().map_err(|_| ())
        } else {
            match p.rx.try_recv() {
                Ok(r) => Ok(r),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            }
        };
        let p = self.refit.take().expect("checked above");
        let mut installed = false;
        match result {
            Ok(Ok(outcome)) => {
                let report = outcome.report;
                match self.posterior.install_refit(outcome) {
                    Ok(()) => {
                        self.m.refits.increment(1);
                        self.m
                            .refit_duration
                            .record(p.started.elapsed().as_secs_f64());
                        installed = true;
                        tracing::debug!(
                            labels = report.labels,
                            iterations = report.iterations,
                            at = p.at,
                            "refit installed"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "refit could not be installed"),
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "refit failed; the online posterior stays"),
            Err(()) => tracing::error!("refit thread died"),
        }
        self.update_gauges();
        installed
    }

    /// Installs a finished refit, if any (never blocks); returns whether one was installed.
    pub fn poll_refit(&mut self) -> bool {
        self.finish_refit(false)
    }

    /// Blocks until a pending refit is installed (tests, replays, shutdown).
    pub fn wait_refit(&mut self) -> bool {
        self.finish_refit(true)
    }

    /// The current model as a snapshot (raw-space weights when the scaling folds).
    pub fn snapshot(&self, instance_id: &str, now_ms: i64) -> ModelSnapshot {
        let p = &self.posterior;
        let theta = p.theta().to_vec();
        let folded = if self.scaler.is_frozen() {
            self.scaler.fold_into_linear_head(&theta).ok()
        } else {
            None
        };
        let (weights, bias, mean, inv_std) = match folded {
            Some((w, b)) => (Some(w), Some(b), None, None),
            None => (
                None,
                None,
                Some(self.scaler.mean().to_vec()),
                Some(self.scaler.inv_std().to_vec()),
            ),
        };
        let l = p.cholesky();
        let d = p.dim();
        let precision_diagonal = precision_diagonal(l);
        let pq = p.prequential();
        ModelSnapshot {
            schema: MODEL_SCHEMA.to_string(),
            instance_id: instance_id.to_string(),
            version: p.version(),
            labels_applied: p.labels_applied(),
            labels_stored: p.label_count() as u64,
            dim: d,
            scaling: self.scaler.scaling().name().to_string(),
            theta,
            weights,
            bias,
            scaler_mean: mean,
            scaler_inv_std: inv_std,
            prior_precision: p.prior_precision(),
            log_det: p.log_det(),
            precision_diagonal,
            prequential: PrequentialSummary {
                labels: pq.labels,
                log_loss: pq.log_loss(),
                accuracy: pq.accuracy(),
            },
            created_at_ms: now_ms,
            npy_file: None,
        }
    }

    /// Refreshes the model gauges.
    pub fn update_gauges(&self) {
        let p = &self.posterior;
        self.m.log_det.set(p.log_det());
        if let Some(l) = p.prior_precision() {
            self.m.prior_precision.set(l);
        }
        self.m.model_version.set(p.version() as f64);
        self.m.model_labels_applied.set(p.labels_applied() as f64);
        self.m.model_labels_stored.set(p.label_count() as f64);
        self.m
            .scaler_frozen
            .set(if self.scaler.is_frozen() { 1.0 } else { 0.0 });
        if let Some(l) = p.prequential().log_loss() {
            self.m.prequential_log_loss.set(l);
        }
        if let Some(a) = p.prequential().accuracy() {
            self.m.prequential_accuracy.set(a);
        }
    }
}

/// diag(H)_i = Σ_j L_ij², the squared row norms of the Cholesky factor, summed column by column: the
/// factor is column-major, and walking its rows took a cache miss per element. At d = 2048 that was
/// 17–18 ms of the engine thread per export, by columns 1.8–2.5 ms (both loops timed in one release
/// test run on this project's 2-core machine, 2026-11-27).
pub fn precision_diagonal(l: MatRef<'_, f64>) -> Vec<f64> {
    let mut diag = vec![0.0; l.nrows()];
    for j in 0..l.ncols() {
        for (i, h) in diag.iter_mut().enumerate().skip(j) {
            *h += l[(i, j)] * l[(i, j)];
        }
    }
    diag
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::telemetry::Telemetry;
    use crate::posterior::RefitOptions;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const D: usize = 5;

    fn cfg(refit_every: u64) -> Arc<Config> {
        let text = format!(
            "[model]\ndim = {D}\nwarmup_samples = 10\nrefit_every = {refit_every}\nprior_precision = 2.0\n"
        );
        Arc::new(Config::from_toml_with_env(&text, &[]).unwrap())
    }

    fn warmed(c: &Arc<Config>, rng: &mut StdRng) -> Learner {
        let mut l = Learner::new(c.clone(), Telemetry::new().metrics).unwrap();
        let mut froze = 0;
        for _ in 0..15 {
            let x: Vec<f32> = (0..D).map(|_| rng.random_range(5.0f32..9.0)).collect();
            froze += usize::from(l.observe(&x));
        }
        assert_eq!(
            froze, 1,
            "the proposal is ready exactly once, at warmup_samples"
        );
        assert!(
            !l.scaler().is_frozen(),
            "a proposal is not adopted by itself"
        );
        let (s, n) = l.proposal().unwrap();
        assert_eq!(n, 10);
        let (mean, inv) = (s.mean().to_vec(), s.inv_std().to_vec());
        assert!(l.adopt(mean.clone(), inv.clone(), f64::NAN).unwrap());
        assert!(l.scaler().is_frozen());
        assert!(!l.adopt(mean, inv, f64::NAN).unwrap(), "only the first one");
        l
    }

    #[test]
    fn labels_and_refits_give_the_posterior_a_direct_replay_gives() {
        let c = cfg(8);
        let mut rng = StdRng::seed_from_u64(3);
        let mut l = warmed(&c, &mut rng);
        let mut direct = Posterior::new(D, 2.0).unwrap();
        for k in 0..20 {
            let a: Vec<f32> = (0..D).map(|_| rng.random_range(5.0f32..9.0)).collect();
            let b: Vec<f32> = (0..D).map(|_| rng.random_range(5.0f32..9.0)).collect();
            let v = l.difference(&a, &b).unwrap();
            let y = f64::from(k % 3 == 0);
            l.apply(&v, y).unwrap();
            l.wait_refit();
            direct.update(&v, y).unwrap();
            if crate::posterior::refit_due(direct.labels_applied(), 8) {
                direct.refit(RefitOptions::default()).unwrap();
            }
        }
        assert!(!l.refit_pending());
        for (x, y) in l.posterior().theta().iter().zip(direct.theta()) {
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{x} vs {y}");
        }
        let snap = l.snapshot("t", 0);
        assert_eq!(snap.labels_applied, 20);
        assert_eq!(snap.precision_diagonal.len(), D);
    }

    #[test]
    fn restore_refuses_another_scaling_and_a_refit_past_the_stored_labels() {
        let c = cfg(0);
        let mut rng = StdRng::seed_from_u64(4);
        let l = warmed(&c, &mut rng);
        let mut state = l.scaler_state().unwrap();
        let parts = l.posterior().to_parts();
        let mut fresh = Learner::new(c.clone(), Telemetry::new().metrics).unwrap();
        let e = fresh
            .restore(Some(&state), parts.clone(), Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pending refit covers 1 labels"), "{e}");
        state.scaling = crate::features::Scaling::None;
        let e = fresh
            .restore(Some(&state), parts, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("scaling"), "{e}");
    }
}
