//! Daemon configuration: a TOML file (`--config PATH`) with environment overrides
//! (`ARMD__SECTION__KEY=value`, e.g. `ARMD__SELECTION__BATCH_SIZE=16`), deserialised into a raw form that
//! rejects unknown keys, then validated once into [`Config`]. Every invalid value is reported with its key
//! and the reason; cross-field rules (e.g. `min_pool ≥ 2`, `every_secs > 0`) are checked here too, so the
//! rest of the daemon can trust its configuration.
//!
//! `config/armd.toml` documents every key with its default. Durations carry their unit in the key name
//! (`_ms`, `_secs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::candidates::CandidateMode;
use crate::error::{ConfigError, ConfigErrors};
use crate::features::Scaling;
use crate::posterior::PriorSetting;
use crate::selection::{SelectionParams, StrategyKind};

/// Environment variables with this prefix override file values (`ARMD__MODEL__DIM=768`).
pub const ENV_PREFIX: &str = "ARMD";
pub const ENV_SEPARATOR: &str = "__";

// ------------------------------------------------------------------------------------------------
// Raw form: exactly what the file may contain.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    daemon: RawDaemon,
    kafka: RawKafka,
    model: RawModel,
    selection: RawSelection,
    pool: RawPool,
    checkpoint: RawCheckpoint,
    export: RawExport,
    http: RawHttp,
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    instance_id: String,
    liveness_timeout_secs: u64,
}

impl Default for RawDaemon {
    fn default() -> Self {
        Self {
            instance_id: "armd-0".into(),
            liveness_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKafka {
    brokers: String,
    group_id: String,
    topics: RawTopics,
    settings: BTreeMap<String, String>,
    stats_interval_ms: u64,
    startup_timeout_secs: u64,
}

impl Default for RawKafka {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "armd".into(),
            topics: RawTopics::default(),
            settings: BTreeMap::new(),
            stats_interval_ms: 1000,
            startup_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTopics {
    responses: String,
    requests: String,
    labels: String,
    models: String,
    dead_letter: String,
}

impl Default for RawTopics {
    fn default() -> Self {
        Self {
            responses: "armd.responses".into(),
            requests: "armd.requests".into(),
            labels: "armd.labels".into(),
            models: "armd.models".into(),
            dead_letter: "armd.dead-letter".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawModel {
    dim: usize,
    prior_precision: PriorSetting,
    scaling: String,
    warmup_samples: u64,
    refit_every: u64,
    max_labels: usize,
}

impl Default for RawModel {
    fn default() -> Self {
        Self {
            dim: 0,
            prior_precision: PriorSetting::Auto,
            scaling: "standardize".into(),
            warmup_samples: 256,
            refit_every: 500,
            max_labels: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSelection {
    strategy: String,
    batch_size: usize,
    max_in_flight: usize,
    request_ttl_secs: u64,
    expiry_grace_secs: u64,
    round_interval_ms: u64,
    min_pool: usize,
    candidates: String,
    max_cross_pairs: usize,
    max_within_pairs: usize,
    labels_per_request: u32,
    closed_history: usize,
    seed: u64,
    epsilon: f64,
    gauss_hermite_nodes: usize,
    batch_bald_samples: usize,
    batch_bald_shortlist: usize,
    coreset_clusters: usize,
    coreset_radius: f64,
    targeted_targets: usize,
}

impl Default for RawSelection {
    fn default() -> Self {
        let p = SelectionParams::default();
        Self {
            strategy: "targeted-info".into(),
            batch_size: 8,
            max_in_flight: 64,
            request_ttl_secs: 600,
            expiry_grace_secs: 600,
            round_interval_ms: 1000,
            min_pool: 16,
            candidates: "cross".into(),
            max_cross_pairs: 20_000,
            max_within_pairs: 20_000,
            labels_per_request: 1,
            closed_history: 100_000,
            seed: 0,
            epsilon: p.epsilon,
            gauss_hermite_nodes: p.gauss_hermite_nodes,
            batch_bald_samples: p.batch_bald_samples,
            batch_bald_shortlist: p.batch_bald_shortlist,
            coreset_clusters: p.coreset_clusters,
            coreset_radius: p.coreset_radius,
            targeted_targets: p.targeted_targets,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    capacity: usize,
    ttl_secs: u64,
    max_uses: u32,
    max_message_bytes: usize,
    dead_letter_payload_bytes: usize,
}

impl Default for RawPool {
    fn default() -> Self {
        Self {
            capacity: 4096,
            ttl_secs: 3600,
            max_uses: 1,
            max_message_bytes: 1 << 20,
            dead_letter_payload_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCheckpoint {
    path: PathBuf,
    every_labels: u64,
    every_secs: u64,
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        Self {
            path: PathBuf::from("armd-state/armd.ckpt"),
            every_labels: 200,
            every_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawExport {
    dir: Option<PathBuf>,
    every_labels: u64,
    publish: bool,
}

impl Default for RawExport {
    fn default() -> Self {
        Self {
            dir: Some(PathBuf::from("armd-state/model")),
            every_labels: 200,
            publish: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Validated form.

/// The validated configuration. Construct with [`Config::load`] or [`Config::from_toml_str`].
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub kafka: KafkaConfig,
    pub model: ModelConfig,
    pub selection: SelectionConfig,
    pub pool: PoolConfig,
    pub checkpoint: CheckpointConfig,
    pub export: ExportConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Names this instance in request ids; distinct per instance sharing the topics.
    pub instance_id: String,
    /// A worker thread (engine, responses or labels consumer) that has not finished a loop iteration for
    /// this long counts as stalled: `/healthz` turns 503 and the daemon exits non-zero.
    pub liveness_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Topics,
    /// Extra librdkafka settings applied to every client (e.g. `security.protocol`).
    pub settings: BTreeMap<String, String>,
    pub stats_interval: Duration,
    pub startup_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub responses: String,
    pub requests: String,
    pub labels: String,
    pub models: String,
    pub dead_letter: String,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub dim: usize,
    /// A fixed λ₀, or `auto`: evidence maximisation at every refit.
    pub prior_precision: PriorSetting,
    pub scaling: Scaling,
    pub warmup_samples: u64,
    /// 0 disables the periodic refit.
    pub refit_every: u64,
    pub max_labels: usize,
}

#[derive(Clone, Debug)]
pub struct SelectionConfig {
    pub strategy: StrategyKind,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub request_ttl: Duration,
    pub expiry_grace: Duration,
    pub round_interval: Duration,
    pub min_pool: usize,
    pub candidates: CandidateMode,
    pub max_cross_pairs: usize,
    pub max_within_pairs: usize,
    pub labels_per_request: u32,
    pub closed_history: usize,
    pub seed: u64,
    pub params: SelectionParams,
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub capacity: usize,
    pub ttl: Duration,
    pub max_uses: u32,
    pub max_message_bytes: usize,
    pub dead_letter_payload_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    pub path: PathBuf,
    pub every_labels: u64,
    pub every: Duration,
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub dir: Option<PathBuf>,
    pub every_labels: u64,
    pub publish: bool,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Collects every validation failure (a [`ConfigError`] naming its key) so one run of `armd run` reports
/// all bad keys at once.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn bad(&mut self, key: &str, got: impl std::fmt::Display, reason: &str) {
        self.0.push(ConfigError::new(key, reason).with_value(got));
    }
    fn check(&mut self, ok: bool, key: &str, got: impl std::fmt::Display, reason: &str) {
        if !ok {
            self.bad(key, got, reason);
        }
    }
    /// Keeps a section's problems with the others; its value when it has none.
    fn take<T>(&mut self, section: Result<T, ConfigErrors>) -> Option<T> {
        match section {
            Ok(value) => Some(value),
            Err(ConfigErrors(problems)) => {
                self.0.extend(problems);
                None
            }
        }
    }
    /// The validated value, or every problem at once. A value is missing only when a problem explains it.
    fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ if self.0.is_empty() => Err(ConfigErrors(vec![ConfigError::new(
                "(internal)",
                "validated value missing",
            )])),
            _ => Err(ConfigErrors(self.0)),
        }
    }
}

impl Config {
    /// Reads `path` (TOML) and applies `ARMD__SECTION__KEY` overrides from the process environment.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_sources(&text, None)
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// Parses TOML text with the process environment's overrides.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::from_sources(text, None)
    }

    /// Parses TOML text with the given overrides instead of the process environment (for tests), as
    /// `ARMD__SECTION__KEY` → value pairs.
    pub fn from_toml_with_env(text: &str, env: &[(&str, &str)]) -> Result<Self> {
        let map = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::from_sources(text, Some(map))
    }

    fn from_sources(text: &str, env: Option<config::Map<String, String>>) -> Result<Self> {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator(ENV_SEPARATOR)
                    .separator(ENV_SEPARATOR)
                    .try_parsing(true)
                    .source(env),
            )
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        let raw: RawConfig = settings.try_deserialize().map_err(|e| anyhow!("{e}"))?;
        Ok(Self::validate(raw)?)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigErrors> {
        let mut p = Problems::default();
        // Cross-section rules read these before the sections are consumed.
        let (dim, min_pool) = (raw.model.dim, raw.selection.min_pool);
        let daemon = p.take(raw.daemon.validate());
        let kafka = p.take(raw.kafka.validate());
        let model = p.take(raw.model.validate());
        let selection = p.take(raw.selection.validate());
        let pool = p.take(raw.pool.validate(dim, min_pool));
        let checkpoint = p.take(raw.checkpoint.validate());
        let export = p.take(raw.export.validate());
        let http = p.take(raw.http.validate());
        let log = p.take(raw.log.validate());
        let config = match (
            daemon, kafka, model, selection, pool, checkpoint, export, http, log,
        ) {
            (
                Some(daemon),
                Some(kafka),
                Some(model),
                Some(selection),
                Some(pool),
                Some(checkpoint),
                Some(export),
                Some(http),
                Some(log),
            ) => Some(Config {
                daemon,
                kafka,
                model,
                selection,
                pool,
                checkpoint,
                export,
                http,
                log,
            }),
            _ => None,
        };
        p.finish(config)
    }
}

// ------------------------------------------------------------------------------------------------
// Validation, one section at a time: each returns its part of the configuration, or every problem it
// found (each naming its key).

impl RawDaemon {
    fn validate(self) -> Result<DaemonConfig, ConfigErrors> {
        let mut p = Problems::default();
        let d = &self;
        p.check(
            !d.instance_id.is_empty()
                && d.instance_id.len() <= 64
                && d.instance_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
            "daemon.instance_id",
            format!("{:?}", d.instance_id),
            "must be 1-64 characters of [A-Za-z0-9._-]",
        );
        p.check(
        (1..=86_400).contains(&d.liveness_timeout_secs),
        "daemon.liveness_timeout_secs",
        d.liveness_timeout_secs,
        "must be 1-86400 (seconds without a loop iteration before a worker thread counts as stalled)",
    );

        p.finish(Some(DaemonConfig {
            liveness_timeout: Duration::from_secs(self.liveness_timeout_secs),
            instance_id: self.instance_id,
        }))
    }
}

impl RawKafka {
    fn validate(self) -> Result<KafkaConfig, ConfigErrors> {
        let mut p = Problems::default();
        let k = &self;
        p.check(
            !k.brokers.trim().is_empty(),
            "kafka.brokers",
            "\"\"",
            "must not be empty",
        );
        p.check(
            !k.group_id.is_empty(),
            "kafka.group_id",
            "\"\"",
            "must not be empty",
        );
        let t = &k.topics;
        let topics = [
            ("kafka.topics.responses", &t.responses),
            ("kafka.topics.requests", &t.requests),
            ("kafka.topics.labels", &t.labels),
            ("kafka.topics.models", &t.models),
            ("kafka.topics.dead_letter", &t.dead_letter),
        ];
        for (i, (key, name)) in topics.iter().enumerate() {
            let valid = !name.is_empty()
                && name.len() <= 249
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
            p.check(
                valid,
                key,
                format!("{name:?}"),
                "must be a valid Kafka topic name ([A-Za-z0-9._-], 1-249 chars)",
            );
            if let Some((other, _)) = topics[..i].iter().find(|(_, n)| n == name) {
                p.bad(
                    key,
                    format!("{name:?}"),
                    &format!("is the same topic as `{other}`; every role needs its own topic"),
                );
            }
        }
        for key in k.settings.keys() {
            const OWNED: [&str; 6] = [
                "bootstrap.servers",
                "group.id",
                "enable.auto.commit",
                "enable.auto.offset.store",
                "enable.idempotence",
                "statistics.interval.ms",
            ];
            if OWNED.contains(&key.as_str()) {
                p.bad(
                &format!("kafka.settings.\"{key}\""),
                "(set)",
                "is managed by armd (use kafka.brokers / kafka.group_id / kafka.stats_interval_ms)",
            );
            }
        }
        p.check(
            (100..=60_000).contains(&k.stats_interval_ms),
            "kafka.stats_interval_ms",
            k.stats_interval_ms,
            "must be in 100..=60000",
        );
        p.check(
            k.startup_timeout_secs >= 1,
            "kafka.startup_timeout_secs",
            k.startup_timeout_secs,
            "must be >= 1",
        );

        p.finish(Some(KafkaConfig {
            brokers: self.brokers,
            group_id: self.group_id,
            topics: Topics {
                responses: self.topics.responses,
                requests: self.topics.requests,
                labels: self.topics.labels,
                models: self.topics.models,
                dead_letter: self.topics.dead_letter,
            },
            settings: self.settings,
            stats_interval: Duration::from_millis(self.stats_interval_ms),
            startup_timeout: Duration::from_secs(self.startup_timeout_secs),
        }))
    }
}

impl RawModel {
    fn validate(self) -> Result<ModelConfig, ConfigErrors> {
        let mut p = Problems::default();
        let m = &self;
        p.check(
            m.dim >= 1 && m.dim <= 65_536,
            "model.dim",
            m.dim,
            "must be in 1..=65536 (the embedding dimension; required)",
        );
        p.check(
            m.prior_precision.validate().is_ok(),
            "model.prior_precision",
            m.prior_precision,
            "must be \"auto\" or a finite number > 0",
        );
        let scaling = match m.scaling.parse::<Scaling>() {
            Ok(s) => Some(s),
            Err(e) => {
                p.bad("model.scaling", format!("{:?}", m.scaling), &e.to_string());
                None
            }
        };
        if scaling.is_some_and(|s| s.standardizes()) {
            p.check(
                m.warmup_samples >= 2,
                "model.warmup_samples",
                m.warmup_samples,
                "must be >= 2 when model.scaling standardizes",
            );
        }
        p.check(
            m.max_labels >= 1,
            "model.max_labels",
            m.max_labels,
            "must be >= 1",
        );
        if m.refit_every > 0 {
            p.check(
                m.refit_every as usize <= m.max_labels,
                "model.refit_every",
                m.refit_every,
                "must be <= model.max_labels (a refit covers the stored labels)",
            );
        }

        p.finish(scaling.map(|scaling| ModelConfig {
            dim: m.dim,
            prior_precision: m.prior_precision,
            scaling,
            warmup_samples: m.warmup_samples,
            refit_every: m.refit_every,
            max_labels: m.max_labels,
        }))
    }
}

impl RawSelection {
    fn validate(self) -> Result<SelectionConfig, ConfigErrors> {
        let mut p = Problems::default();
        let s = &self;
        let strategy = match s.strategy.parse::<StrategyKind>() {
            Ok(k) => Some(k),
            Err(e) => {
                p.bad(
                    "selection.strategy",
                    format!("{:?}", s.strategy),
                    &e.to_string(),
                );
                None
            }
        };
        p.check(
            s.batch_size >= 1,
            "selection.batch_size",
            s.batch_size,
            "must be >= 1",
        );
        p.check(
            s.max_in_flight >= 1,
            "selection.max_in_flight",
            s.max_in_flight,
            "must be >= 1",
        );
        p.check(
            s.batch_size <= s.max_in_flight,
            "selection.batch_size",
            s.batch_size,
            "must be <= selection.max_in_flight",
        );
        p.check(
            s.request_ttl_secs >= 1,
            "selection.request_ttl_secs",
            s.request_ttl_secs,
            "must be >= 1",
        );
        p.check(
            (10..=3_600_000).contains(&s.round_interval_ms),
            "selection.round_interval_ms",
            s.round_interval_ms,
            "must be in 10..=3600000",
        );
        p.check(
            s.min_pool >= 2,
            "selection.min_pool",
            s.min_pool,
            "must be >= 2 (a pair needs two responses)",
        );
        let candidates = match s.candidates.parse::<CandidateMode>() {
            Ok(c) => Some(c),
            Err(e) => {
                p.bad(
                    "selection.candidates",
                    format!("{:?}", s.candidates),
                    &e.to_string(),
                );
                None
            }
        };
        if matches!(candidates, Some(CandidateMode::Cross | CandidateMode::Both)) {
            p.check(
                s.max_cross_pairs >= 1,
                "selection.max_cross_pairs",
                s.max_cross_pairs,
                "must be >= 1 when cross-prompt candidates are used",
            );
        }
        if matches!(
            candidates,
            Some(CandidateMode::Within | CandidateMode::Both)
        ) {
            p.check(
                s.max_within_pairs >= 1,
                "selection.max_within_pairs",
                s.max_within_pairs,
                "must be >= 1 when within-prompt candidates are used",
            );
        }
        p.check(
            (1..=100).contains(&s.labels_per_request),
            "selection.labels_per_request",
            s.labels_per_request,
            "must be in 1..=100",
        );
        p.check(
            s.closed_history >= 1,
            "selection.closed_history",
            s.closed_history,
            "must be >= 1",
        );
        let params = SelectionParams {
            epsilon: s.epsilon,
            gauss_hermite_nodes: s.gauss_hermite_nodes,
            batch_bald_samples: s.batch_bald_samples,
            batch_bald_shortlist: s.batch_bald_shortlist,
            coreset_clusters: s.coreset_clusters,
            coreset_radius: s.coreset_radius,
            targeted_targets: s.targeted_targets,
        };
        if let Err(e) = params.validate() {
            match &e {
                crate::CoreError::Parameter {
                    name,
                    value,
                    reason,
                } => p.bad(&format!("selection.{name}"), value, reason),
                other => p.bad("selection", "(parameters)", &other.to_string()),
            }
        }

        let both = strategy.zip(candidates);
        p.finish(both.map(|(strategy, candidates)| SelectionConfig {
            strategy,
            batch_size: s.batch_size,
            max_in_flight: s.max_in_flight,
            request_ttl: Duration::from_secs(s.request_ttl_secs),
            expiry_grace: Duration::from_secs(s.expiry_grace_secs),
            round_interval: Duration::from_millis(s.round_interval_ms),
            min_pool: s.min_pool,
            candidates,
            max_cross_pairs: s.max_cross_pairs,
            max_within_pairs: s.max_within_pairs,
            labels_per_request: s.labels_per_request,
            closed_history: s.closed_history,
            seed: s.seed,
            params,
        }))
    }
}

impl RawPool {
    /// `dim` (model.dim) and `min_pool` (selection.min_pool) bound the pool's settings.
    fn validate(self, dim: usize, min_pool: usize) -> Result<PoolConfig, ConfigErrors> {
        let mut p = Problems::default();
        let pl = &self;
        p.check(
            pl.capacity >= 2,
            "pool.capacity",
            pl.capacity,
            "must be >= 2",
        );
        p.check(
            pl.capacity >= min_pool,
            "pool.capacity",
            pl.capacity,
            "must be >= selection.min_pool",
        );
        p.check(
            pl.ttl_secs >= 1,
            "pool.ttl_secs",
            pl.ttl_secs,
            "must be >= 1",
        );
        p.check(
            pl.max_uses >= 1,
            "pool.max_uses",
            pl.max_uses,
            "must be >= 1",
        );
        if dim >= 1 {
            // A base64 embedding takes ⌈4d/3⌉ bytes; anything smaller than that could never be accepted.
            let need = (4 * dim).div_ceil(3) + 64;
            p.check(
                pl.max_message_bytes >= need,
                "pool.max_message_bytes",
                pl.max_message_bytes,
                &format!("must be >= {need} to fit one base64 embedding of model.dim"),
            );
        }
        p.check(
            pl.max_message_bytes <= 256 << 20,
            "pool.max_message_bytes",
            pl.max_message_bytes,
            "must be <= 268435456",
        );
        p.check(
            pl.dead_letter_payload_bytes <= 16 << 20,
            "pool.dead_letter_payload_bytes",
            pl.dead_letter_payload_bytes,
            "must be <= 16777216",
        );

        p.finish(Some(PoolConfig {
            capacity: pl.capacity,
            ttl: Duration::from_secs(pl.ttl_secs),
            max_uses: pl.max_uses,
            max_message_bytes: pl.max_message_bytes,
            dead_letter_payload_bytes: pl.dead_letter_payload_bytes,
        }))
    }
}

impl RawCheckpoint {
    fn validate(self) -> Result<CheckpointConfig, ConfigErrors> {
        let mut p = Problems::default();
        let c = &self;
        p.check(
            !c.path.as_os_str().is_empty() && c.path.file_name().is_some(),
            "checkpoint.path",
            format!("{:?}", c.path.display().to_string()),
            "must name a file",
        );
        p.check(
            c.every_labels >= 1,
            "checkpoint.every_labels",
            c.every_labels,
            "must be >= 1",
        );
        p.check(
            c.every_secs >= 1,
            "checkpoint.every_secs",
            c.every_secs,
            "must be >= 1",
        );

        p.finish(Some(CheckpointConfig {
            every_labels: c.every_labels,
            every: Duration::from_secs(c.every_secs),
            path: self.path,
        }))
    }
}

impl RawExport {
    fn validate(self) -> Result<ExportConfig, ConfigErrors> {
        let mut p = Problems::default();
        let e = &self;
        if e.dir.is_some() || e.publish {
            p.check(
                e.every_labels >= 1,
                "export.every_labels",
                e.every_labels,
                "must be >= 1",
            );
        }
        if let Some(dir) = &e.dir {
            p.check(
                !dir.as_os_str().is_empty(),
                "export.dir",
                "\"\"",
                "must not be empty (omit it to disable file export)",
            );
        }

        p.finish(Some(ExportConfig {
            every_labels: e.every_labels,
            publish: e.publish,
            dir: self.dir,
        }))
    }
}

impl RawHttp {
    fn validate(self) -> Result<HttpConfig, ConfigErrors> {
        let mut p = Problems::default();
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(err) => {
                p.bad(
                    "http.listen",
                    format!("{:?}", self.listen),
                    &format!("must be IP:PORT ({err})"),
                );
                None
            }
        };

        p.finish(listen.map(|listen| HttpConfig { listen }))
    }
}

impl RawLog {
    fn validate(self) -> Result<LogConfig, ConfigErrors> {
        let mut p = Problems::default();
        let format = match self.format.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            other => {
                p.bad(
                    "log.format",
                    format!("{other:?}"),
                    "must be \"text\" or \"json\"",
                );
                None
            }
        };
        if let Err(err) = self.level.parse::<tracing_subscriber::EnvFilter>() {
            p.bad(
                "log.level",
                format!("{:?}", self.level),
                &format!("is not a log filter ({err})"),
            );
        }

        p.finish(format.map(|format| LogConfig {
            format,
            level: self.level,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\ndim = 8\n";

    fn err(text: &str) -> String {
        format!("{:#}", Config::from_toml_with_env(text, &[]).unwrap_err())
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_toml_with_env(MIN, &[]).unwrap();
        assert_eq!(c.model.dim, 8);
        assert_eq!(c.selection.strategy, StrategyKind::TargetedInfo);
        assert_eq!(c.model.prior_precision, PriorSetting::Auto);
        assert_eq!(c.selection.batch_size, 8);
        assert_eq!(c.kafka.topics.labels, "armd.labels");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.model.scaling, Scaling::Standardize);
    }

    #[test]
    fn shipped_config_file_is_valid() {
        let text = include_str!("../../config/armd.toml");
        let c = Config::from_toml_with_env(text, &[]).unwrap();
        assert_eq!(c.model.dim, 768);
        // The shipped file spells out the defaults: they must agree with the code.
        let d = Config::from_toml_with_env("[model]\ndim = 768", &[]).unwrap();
        assert_eq!(format!("{:?}", c.selection), format!("{:?}", d.selection));
        assert_eq!(format!("{:?}", c.pool), format!("{:?}", d.pool));
        assert_eq!(format!("{:?}", c.checkpoint), format!("{:?}", d.checkpoint));
        assert_eq!(format!("{:?}", c.export), format!("{:?}", d.export));
        assert_eq!(
            format!("{:?}", c.kafka.topics),
            format!("{:?}", d.kafka.topics)
        );
        assert_eq!(format!("{:?}", c.model), format!("{:?}", d.model));
    }

    #[test]
    fn env_overrides_file() {
        let c = Config::from_toml_with_env(
            MIN,
            &[
                ("ARMD__SELECTION__BATCH_SIZE", "3"),
                ("ARMD__KAFKA__BROKERS", "10.0.0.1:9092"),
                ("ARMD__MODEL__SCALING", "l2"),
                ("ARMD__EXPORT__PUBLISH", "false"),
            ],
        )
        .unwrap();
        assert_eq!(c.selection.batch_size, 3);
        assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(c.model.scaling, Scaling::L2);
        assert!(!c.export.publish);
        let e = format!(
            "{:#}",
            Config::from_toml_with_env(MIN, &[("ARMD__SELECTION__BATCH_SIZE", "many")])
                .unwrap_err()
        );
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = err("[model]\ndim = 8\nbatch = 3\n");
        assert!(e.contains("batch"), "{e}");
        let e = err("[model]\ndim = 8\n[selectionn]\n");
        assert!(e.contains("selectionn"), "{e}");
        let e = format!(
            "{:#}",
            Config::from_toml_with_env(MIN, &[("ARMD__POOL__CAPACTY", "3")]).unwrap_err()
        );
        assert!(e.contains("capacty"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err("[model]\ndim = \"big\"\n");
        assert!(e.contains("dim"), "{e}");
        let e = err("[model]\ndim = 8\n[selection]\nbatch_size = -1\n");
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn each_invalid_value_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("[model]\ndim = 0", "model.dim"),
            (
                "[model]\ndim = 8\nprior_precision = 0.0",
                "model.prior_precision",
            ),
            (
                "[model]\ndim = 8\nprior_precision = -2.0",
                "model.prior_precision",
            ),
            ("[model]\ndim = 8\nscaling = \"zscore\"", "model.scaling"),
            (
                "[model]\ndim = 8\nwarmup_samples = 1",
                "model.warmup_samples",
            ),
            ("[model]\ndim = 8\nmax_labels = 0", "model.max_labels"),
            (
                "[model]\ndim = 8\nmax_labels = 10\nrefit_every = 11",
                "model.refit_every",
            ),
            (
                "[model]\ndim = 8\n[selection]\nstrategy = \"best\"",
                "selection.strategy",
            ),
            (
                "[model]\ndim = 8\n[selection]\nbatch_size = 0",
                "selection.batch_size",
            ),
            (
                "[model]\ndim = 8\n[selection]\nbatch_size = 100\nmax_in_flight = 10",
                "selection.batch_size",
            ),
            (
                "[model]\ndim = 8\n[selection]\nmax_in_flight = 0",
                "selection.max_in_flight",
            ),
            (
                "[model]\ndim = 8\n[selection]\nrequest_ttl_secs = 0",
                "selection.request_ttl_secs",
            ),
            (
                "[model]\ndim = 8\n[selection]\nround_interval_ms = 1",
                "selection.round_interval_ms",
            ),
            (
                "[model]\ndim = 8\n[selection]\nmin_pool = 1",
                "selection.min_pool",
            ),
            (
                "[model]\ndim = 8\n[selection]\ncandidates = \"all\"",
                "selection.candidates",
            ),
            (
                "[model]\ndim = 8\n[selection]\nmax_cross_pairs = 0",
                "selection.max_cross_pairs",
            ),
            (
                "[model]\ndim = 8\n[selection]\ncandidates = \"within\"\nmax_within_pairs = 0",
                "selection.max_within_pairs",
            ),
            (
                "[model]\ndim = 8\n[selection]\nlabels_per_request = 0",
                "selection.labels_per_request",
            ),
            (
                "[model]\ndim = 8\n[selection]\nclosed_history = 0",
                "selection.closed_history",
            ),
            (
                "[model]\ndim = 8\n[selection]\nepsilon = 0.0",
                "selection.epsilon",
            ),
            (
                "[model]\ndim = 8\n[selection]\ngauss_hermite_nodes = 0",
                "selection.gauss_hermite_nodes",
            ),
            ("[model]\ndim = 8\n[pool]\ncapacity = 1", "pool.capacity"),
            ("[model]\ndim = 8\n[pool]\ncapacity = 10", "pool.capacity"),
            ("[model]\ndim = 8\n[pool]\nttl_secs = 0", "pool.ttl_secs"),
            ("[model]\ndim = 8\n[pool]\nmax_uses = 0", "pool.max_uses"),
            (
                "[model]\ndim = 800\n[pool]\nmax_message_bytes = 100",
                "pool.max_message_bytes",
            ),
            (
                "[model]\ndim = 8\n[checkpoint]\npath = \"\"",
                "checkpoint.path",
            ),
            (
                "[model]\ndim = 8\n[checkpoint]\nevery_labels = 0",
                "checkpoint.every_labels",
            ),
            (
                "[model]\ndim = 8\n[checkpoint]\nevery_secs = 0",
                "checkpoint.every_secs",
            ),
            (
                "[model]\ndim = 8\n[export]\nevery_labels = 0",
                "export.every_labels",
            ),
            (
                "[model]\ndim = 8\n[http]\nlisten = \"localhost\"",
                "http.listen",
            ),
            ("[model]\ndim = 8\n[log]\nformat = \"xml\"", "log.format"),
            ("[model]\ndim = 8\n[log]\nlevel = \"[[[\"", "log.level"),
            (
                "[model]\ndim = 8\n[daemon]\ninstance_id = \"a b\"",
                "daemon.instance_id",
            ),
            (
                "[model]\ndim = 8\n[daemon]\nliveness_timeout_secs = 0",
                "daemon.liveness_timeout_secs",
            ),
            ("[model]\ndim = 8\n[kafka]\nbrokers = \"\"", "kafka.brokers"),
            (
                "[model]\ndim = 8\n[kafka]\ngroup_id = \"\"",
                "kafka.group_id",
            ),
            (
                "[model]\ndim = 8\n[kafka]\nstats_interval_ms = 5",
                "kafka.stats_interval_ms",
            ),
            (
                "[model]\ndim = 8\n[kafka.topics]\nlabels = \"bad topic\"",
                "kafka.topics.labels",
            ),
            (
                "[model]\ndim = 8\n[kafka.topics]\nlabels = \"armd.responses\"",
                "kafka.topics.labels",
            ),
            (
                "[model]\ndim = 8\n[kafka.settings]\n\"group.id\" = \"x\"",
                "group.id",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(
                e.contains(key),
                "config {text:?}: error does not name {key}: {e}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = err("[model]\ndim = 0\n[selection]\nbatch_size = 0\n");
        assert!(
            e.contains("model.dim") && e.contains("selection.batch_size"),
            "{e}"
        );
        assert!(e.starts_with("2 invalid"), "{e}");
    }

    #[test]
    fn a_section_returns_typed_errors_naming_their_keys() {
        let raw = RawPool {
            capacity: 1,
            ..RawPool::default()
        };
        let e = raw.validate(8, 16).unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["pool.capacity", "pool.capacity"]);
        assert_eq!(e.0[0].value.as_deref(), Some("1"));
        assert_eq!(
            e.to_string(),
            "2 invalid configuration values:\n  `pool.capacity` = 1: must be >= 2\n  \
             `pool.capacity` = 1: must be >= selection.min_pool"
        );
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let e = format!(
            "{:#}",
            Config::load(Path::new("/nonexistent/armd.toml")).unwrap_err()
        );
        assert!(e.contains("/nonexistent/armd.toml"), "{e}");
    }
}
