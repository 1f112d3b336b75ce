//! The metric catalogue and logging set-up. Every metric armd exports is declared in [`CATALOGUE`] (name,
//! kind, unit, help) and registered here; the rest of the daemon only touches the typed handles in
//! [`Metrics`], never a raw `metrics::counter!` macro, so names and label values stay in one place.
//!
//! Naming: prefix `armd_`, base units in the name (`_seconds`, `_bytes`, `_nats`, `_ratio`, `_messages`),
//! counters end in `_total`, and label values come from bounded sets (reason codes, topic roles) — never
//! ids. Each daemon owns its own recorder (no process-global state), so tests can run several daemons in
//! one process and each `/metrics` shows only its own series.

use std::collections::BTreeMap;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::config::{LogConfig, LogFormat};
use super::messages::Reason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    /// Label key, if the metric is split by one (values are listed in the help).
    pub label: Option<&'static str>,
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    label: Option<&'static str>,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        label,
        help,
    }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every metric armd exports.
pub const CATALOGUE: &[MetricDef] = &[
    def("armd_responses_received_total", C, Some(Unit::Count), None, "Response messages consumed from the responses topic."),
    def("armd_responses_accepted_total", C, Some(Unit::Count), None, "Responses that passed validation and entered the candidate pool."),
    def("armd_responses_rejected_total", C, Some(Unit::Count), Some("reason"), "Response messages rejected and dead-lettered, by reason code."),
    def("armd_responses_duplicate_total", C, Some(Unit::Count), None, "Responses ignored because the same prompt/response id is already pooled (redelivery)."),
    def("armd_pool_responses", G, Some(Unit::Count), None, "Responses currently in the candidate pool."),
    def("armd_pool_evictions_total", C, Some(Unit::Count), Some("cause"), "Responses that left the pool without being used: cause=capacity|ttl."),
    def("armd_scaler_warmup_samples", G, Some(Unit::Count), None, "Warm-up samples this instance has seen for its scaling proposal (stays at its final value)."),
    def("armd_scaler_frozen", G, None, None, "1 once the group's feature scaler is adopted (the first armd.scaler.v1 on the labels topic) and selection can run."),
    def("armd_scaler_proposals_total", C, Some(Unit::Count), None, "Scaling proposals this instance published to the labels topic."),
    def("armd_candidate_pairs_scored_total", C, Some(Unit::Count), None, "Candidate pairs scored by selection rounds."),
    def("armd_selection_rounds_total", C, Some(Unit::Count), None, "Selection rounds run."),
    def("armd_selection_errors_total", C, Some(Unit::Count), None, "Selection rounds that failed (see logs)."),
    def("armd_selection_duration_seconds", H, Some(Unit::Seconds), None, "Wall time of a selection round (candidates, scoring, picking)."),
    def("armd_selection_batch_gain_nats", G, None, None, "Summed score of the last batch (for greedy-dopt: the log det gain in nats)."),
    def("armd_requests_emitted_total", C, Some(Unit::Count), None, "Label requests published."),
    def("armd_requests_in_flight", G, Some(Unit::Count), None, "Requests this instance issued, not fully labelled and not expired (bounded by selection.max_in_flight)."),
    def("armd_requests_open_group", G, Some(Unit::Count), None, "Open requests of every instance of the group (selection conditions on all of them)."),
    def("armd_requests_other_instances_total", C, Some(Unit::Count), None, "Requests of other instances read from the requests topic and registered (their labels are applied here too)."),
    def("armd_requests_unreadable_total", C, Some(Unit::Count), None, "Messages on the requests topic that are not a usable armd.request.v1 (skipped; their labels are rejected)."),
    def("armd_requests_expired_total", C, Some(Unit::Count), None, "Requests that reached their TTL before collecting all labels."),
    def("armd_requests_recovered_total", C, Some(Unit::Count), None, "Requests of this instance read back from the requests topic that it did not hold (issued after the last checkpoint)."),
    def("armd_labels_received_total", C, Some(Unit::Count), None, "Label messages consumed from the labels topic."),
    def("armd_labels_applied_total", C, Some(Unit::Count), None, "Labels applied to the posterior by this process."),
    def("armd_labels_rejected_total", C, Some(Unit::Count), Some("reason"), "Label messages rejected, by reason code (dead-lettered by the instance that issued the request)."),
    def("armd_labels_foreign_total", C, Some(Unit::Count), None, "Labels applied whose request another instance of the group issued."),
    def("armd_labels_held", G, Some(Unit::Count), None, "Labels-topic messages waiting for a label's request to be read from the requests topic (applied in order once it is)."),
    def("armd_label_latency_seconds", H, Some(Unit::Seconds), None, "Time from a request's issue to its label's timestamp."),
    def("armd_label_apply_delay_seconds", H, Some(Unit::Seconds), None, "Time from a label's Kafka timestamp to the end of its posterior update (how stale the model is relative to the labels)."),
    def("armd_update_duration_seconds", H, Some(Unit::Seconds), None, "Time to apply one label to the posterior."),
    def("armd_refit_duration_seconds", H, Some(Unit::Seconds), None, "Wall time of an off-thread MAP refit."),
    def("armd_refits_total", C, Some(Unit::Count), None, "Refits installed."),
    def("armd_consolidations_total", C, Some(Unit::Count), None, "Times the label store was folded into the prior (model.max_labels)."),
    def("armd_posterior_log_det", G, None, None, "log det of the posterior precision H."),
    def("armd_prior_precision", G, None, None, "Isotropic prior precision λ₀ in force (set by the evidence at each refit when model.prior_precision = \"auto\")."),
    def("armd_prequential_log_loss_nats", G, None, None, "Mean log-loss of each label's prediction made before the label was applied (model lifetime)."),
    def("armd_prequential_accuracy_ratio", G, Some(Unit::Percent), None, "Fraction of decided labels whose winner the model predicted before seeing them (model lifetime)."),
    def("armd_model_version", G, None, None, "Posterior version (one per applied label or installed refit)."),
    def("armd_model_labels_applied", G, Some(Unit::Count), None, "Labels applied over the model's lifetime (survives restarts)."),
    def("armd_model_labels_stored", G, Some(Unit::Count), None, "Labels currently stored for refits."),
    def("armd_checkpoint_age_seconds", G, Some(Unit::Seconds), None, "Time since the last successful checkpoint write."),
    def("armd_checkpoint_duration_seconds", H, Some(Unit::Seconds), None, "Time to encode and durably write a checkpoint."),
    def("armd_checkpoint_failures_total", C, Some(Unit::Count), None, "Checkpoint writes that failed (the previous checkpoint stays valid)."),
    def("armd_exports_total", C, Some(Unit::Count), None, "Model exports (files and/or models topic)."),
    def("armd_consumer_lag_messages", G, Some(Unit::Count), Some("topic"), "Consumer lag summed over partitions: topic=responses|labels|requests."),
    def("armd_broker_up", G, None, None, "1 while at least one broker connection is up."),
    def("armd_dead_letters_total", C, Some(Unit::Count), None, "Messages published to the dead-letter topic."),
    def("armd_publish_failures_total", C, Some(Unit::Count), Some("topic"), "Messages that could not be delivered: topic=requests|models|dead_letter|labels (scaling proposals)."),
];

/// Histogram buckets (seconds) shared by the duration metrics: 100 µs to 10 min.
const BUCKETS_SECONDS: &[f64] = &[
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Counters split by reason code.
#[derive(Clone)]
pub struct ByReason(BTreeMap<Reason, Counter>);

impl ByReason {
    pub fn get(&self, r: Reason) -> &Counter {
        // Every reason of the topic is registered up front (see Metrics::new); fall back to the first.
        // A reason outside the topic's list would be miscounted there: catch it in tests.
        debug_assert!(
            self.0.contains_key(&r),
            "reason {r} is not registered for this counter"
        );
        self.0
            .get(&r)
            .unwrap_or_else(|| self.0.values().next().expect("non-empty"))
    }
}

/// Typed handles for every metric in [`CATALOGUE`].
#[derive(Clone)]
pub struct Metrics {
    pub responses_received: Counter,
    pub responses_accepted: Counter,
    pub responses_rejected: ByReason,
    pub responses_duplicate: Counter,
    pub pool_responses: Gauge,
    pub pool_evicted_capacity: Counter,
    pub pool_evicted_ttl: Counter,
    pub scaler_warmup_samples: Gauge,
    pub scaler_frozen: Gauge,
    pub scaler_proposals: Counter,
    pub candidate_pairs_scored: Counter,
    pub selection_rounds: Counter,
    pub selection_errors: Counter,
    pub selection_duration: Histogram,
    pub selection_batch_gain: Gauge,
    pub requests_emitted: Counter,
    pub requests_in_flight: Gauge,
    pub requests_open_group: Gauge,
    pub requests_other_instances: Counter,
    pub requests_unreadable: Counter,
    pub requests_expired: Counter,
    pub requests_recovered: Counter,
    pub labels_received: Counter,
    pub labels_applied: Counter,
    pub labels_rejected: ByReason,
    pub labels_foreign: Counter,
    pub labels_held: Gauge,
    pub label_latency: Histogram,
    pub label_apply_delay: Histogram,
    pub update_duration: Histogram,
    pub refit_duration: Histogram,
    pub refits: Counter,
    pub consolidations: Counter,
    pub log_det: Gauge,
    pub prior_precision: Gauge,
    pub prequential_log_loss: Gauge,
    pub prequential_accuracy: Gauge,
    pub model_version: Gauge,
    pub model_labels_applied: Gauge,
    pub model_labels_stored: Gauge,
    pub checkpoint_age: Gauge,
    pub checkpoint_duration: Histogram,
    pub checkpoint_failures: Counter,
    pub exports: Counter,
    pub lag_responses: Gauge,
    pub lag_labels: Gauge,
    pub lag_requests: Gauge,
    pub broker_up: Gauge,
    pub dead_letters: Counter,
    pub publish_failures_requests: Counter,
    pub publish_failures_models: Counter,
    pub publish_failures_dead_letter: Counter,
    pub publish_failures_labels: Counter,
}

/// A daemon's private metric registry and its handles.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub metrics: Arc<Metrics>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS_SECONDS)
            .expect("static non-empty buckets")
            .build_recorder();
        for d in CATALOGUE {
            let name = metrics::KeyName::from_const_str(d.name);
            match d.kind {
                Kind::Counter => recorder.describe_counter(name, d.unit, d.help.into()),
                Kind::Gauge => recorder.describe_gauge(name, d.unit, d.help.into()),
                Kind::Histogram => recorder.describe_histogram(name, d.unit, d.help.into()),
            }
        }
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let check = |name: &'static str, kind: Kind, label: Option<&str>| {
            debug_assert!(
                CATALOGUE
                    .iter()
                    .any(|d| d.name == name && d.kind == kind && d.label == label),
                "{name} is not in the catalogue"
            );
        };
        let c = |name: &'static str| {
            check(name, Kind::Counter, None);
            recorder.register_counter(&Key::from_name(name), &meta)
        };
        let cl = |name: &'static str, k: &'static str, v: &'static str| {
            check(name, Kind::Counter, Some(k));
            recorder.register_counter(&Key::from_parts(name, vec![Label::new(k, v)]), &meta)
        };
        let g = |name: &'static str| {
            check(name, Kind::Gauge, None);
            recorder.register_gauge(&Key::from_name(name), &meta)
        };
        let gl = |name: &'static str, k: &'static str, v: &'static str| {
            check(name, Kind::Gauge, Some(k));
            recorder.register_gauge(&Key::from_parts(name, vec![Label::new(k, v)]), &meta)
        };
        let h = |name: &'static str| {
            check(name, Kind::Histogram, None);
            recorder.register_histogram(&Key::from_name(name), &meta)
        };
        let by_reason = |name: &'static str, reasons: &[Reason]| {
            ByReason(
                reasons
                    .iter()
                    .map(|&r| (r, cl(name, "reason", r.code())))
                    .collect(),
            )
        };
        let metrics = Metrics {
            responses_received: c("armd_responses_received_total"),
            responses_accepted: c("armd_responses_accepted_total"),
            responses_rejected: by_reason("armd_responses_rejected_total", &Reason::RESPONSE),
            responses_duplicate: c("armd_responses_duplicate_total"),
            pool_responses: g("armd_pool_responses"),
            pool_evicted_capacity: cl("armd_pool_evictions_total", "cause", "capacity"),
            pool_evicted_ttl: cl("armd_pool_evictions_total", "cause", "ttl"),
            scaler_warmup_samples: g("armd_scaler_warmup_samples"),
            scaler_frozen: g("armd_scaler_frozen"),
            scaler_proposals: c("armd_scaler_proposals_total"),
            candidate_pairs_scored: c("armd_candidate_pairs_scored_total"),
            selection_rounds: c("armd_selection_rounds_total"),
            selection_errors: c("armd_selection_errors_total"),
            selection_duration: h("armd_selection_duration_seconds"),
            selection_batch_gain: g("armd_selection_batch_gain_nats"),
            requests_emitted: c("armd_requests_emitted_total"),
            requests_in_flight: g("armd_requests_in_flight"),
            requests_open_group: g("armd_requests_open_group"),
            requests_other_instances: c("armd_requests_other_instances_total"),
            requests_unreadable: c("armd_requests_unreadable_total"),
            requests_expired: c("armd_requests_expired_total"),
            requests_recovered: c("armd_requests_recovered_total"),
            labels_received: c("armd_labels_received_total"),
            labels_applied: c("armd_labels_applied_total"),
            labels_rejected: by_reason("armd_labels_rejected_total", &Reason::LABEL),
            labels_foreign: c("armd_labels_foreign_total"),
            labels_held: g("armd_labels_held"),
            label_latency: h("armd_label_latency_seconds"),
            label_apply_delay: h("armd_label_apply_delay_seconds"),
            update_duration: h("armd_update_duration_seconds"),
            refit_duration: h("armd_refit_duration_seconds"),
            refits: c("armd_refits_total"),
            consolidations: c("armd_consolidations_total"),
            log_det: g("armd_posterior_log_det"),
            prior_precision: g("armd_prior_precision"),
            prequential_log_loss: g("armd_prequential_log_loss_nats"),
            prequential_accuracy: g("armd_prequential_accuracy_ratio"),
            model_version: g("armd_model_version"),
            model_labels_applied: g("armd_model_labels_applied"),
            model_labels_stored: g("armd_model_labels_stored"),
            checkpoint_age: g("armd_checkpoint_age_seconds"),
            checkpoint_duration: h("armd_checkpoint_duration_seconds"),
            checkpoint_failures: c("armd_checkpoint_failures_total"),
            exports: c("armd_exports_total"),
            lag_responses: gl("armd_consumer_lag_messages", "topic", "responses"),
            lag_labels: gl("armd_consumer_lag_messages", "topic", "labels"),
            lag_requests: gl("armd_consumer_lag_messages", "topic", "requests"),
            broker_up: g("armd_broker_up"),
            dead_letters: c("armd_dead_letters_total"),
            publish_failures_requests: cl("armd_publish_failures_total", "topic", "requests"),
            publish_failures_models: cl("armd_publish_failures_total", "topic", "models"),
            publish_failures_dead_letter: cl("armd_publish_failures_total", "topic", "dead_letter"),
            publish_failures_labels: cl("armd_publish_failures_total", "topic", "labels"),
        };
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            metrics: Arc::new(metrics),
        }
    }

    /// Prometheus text exposition of this daemon's metrics.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// A cheap clonable handle for the HTTP server.
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }

    /// Keeps the recorder alive as long as the telemetry (the handle alone does not own the registry's
    /// description table).
    pub fn recorder(&self) -> &PrometheusRecorder {
        &self.recorder
    }
}

/// Installs the global `tracing` subscriber (text or JSON, filtered by `log.level`, overridable with
/// `RUST_LOG`). Call once, from `main`.
pub fn init_logging(cfg: &LogConfig) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(s)?,
        _ => EnvFilter::try_new(&cfg.level)?,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_follows_the_naming_rules() {
        let mut seen = std::collections::HashSet::new();
        for d in CATALOGUE {
            assert!(d.name.starts_with("armd_"), "{}", d.name);
            assert!(seen.insert(d.name), "duplicate {}", d.name);
            assert!(
                d.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                d.name
            );
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}",
                d.name
            );
            if d.unit == Some(Unit::Seconds) {
                assert!(d.name.contains("_seconds"), "{}", d.name);
            }
            assert!(d.help.ends_with('.') && d.help.len() > 10, "{}", d.name);
        }
    }

    #[test]
    fn every_catalogued_series_is_exported_with_help() {
        let t = Telemetry::new();
        t.metrics.labels_applied.increment(3);
        t.metrics
            .responses_rejected
            .get(Reason::WrongDimension)
            .increment(1);
        t.metrics.update_duration.record(0.002);
        t.metrics.log_det.set(12.5);
        let text = t.render();
        for d in CATALOGUE {
            assert!(
                text.contains(&format!("# HELP {} ", d.name)),
                "{} missing:\n{text}",
                d.name
            );
        }
        assert!(text.contains("armd_labels_applied_total 3"), "{text}");
        assert!(
            text.contains("armd_responses_rejected_total{reason=\"wrong_dimension\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("armd_responses_rejected_total{reason=\"non_finite\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("armd_update_duration_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
        // Two registries do not share state.
        let other = Telemetry::new();
        assert!(other.render().contains("armd_labels_applied_total 0"));
    }
}
