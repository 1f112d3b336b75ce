//! `armd demo`: the real daemon, end to end, with nothing to install.
//!
//! ```text
//! synthetic generator ──► armd.responses ──► armd (strategy)  ──► armd.requests ──► annotator ─┐
//!   (held-out prompts      random.responses ─► armd (random)  ──► random.requests ─► annotator ─┤
//!    kept for scoring)                           ▲                                               │
//!                                                └──────── *.labels ◄────────────────────────────┘
//! *.models ──► held-out Spearman of each snapshot vs the golden reward ──► progress, summary, SVG
//! ```
//!
//! Everything runs in one process against librdkafka's in-process mock cluster
//! (`rdkafka::mocking::MockCluster`): two instances of [`crate::daemon::run_with_listener`] on their own
//! topics — the configured strategy and the `random` baseline — are fed the same responses, and two
//! simulated annotators with the same noise model answer their label requests. Each model snapshot the
//! daemons publish on their models topic is scored on held-out prompts (mean per-prompt Spearman of
//! `x·w + b` against the golden reward, [`crate::evaluation::mean_prompt_spearman`]).
//!
//! Outputs in `run.out_dir`: `summary.txt`, `curves.csv`, `spearman.svg`, and `state/<run>/` (each
//! daemon's checkpoint and exported `model.npy`/`model.json`; cleared at the start of a run).
//!
//! Settings: `config/demo.toml` (every key documented there; [`DemoConfig::default`] is the same).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::daemon::config::Config;
use crate::daemon::messages::{encode_f32_b64, LabelRequest, ModelSnapshot};
use crate::selection::StrategyKind;
use crate::simulate::config::SyntheticConfig;
use crate::simulate::plot::{Chart, Series, SeriesLabelPosition};
use crate::simulate::{Dataset, MeanSd};

mod live;

// ------------------------------------------------------------------------------------------------
// Configuration

/// The demo's settings (`config/demo.toml`). Unknown keys are an error.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    pub data: DataConfig,
    pub annotator: AnnotatorConfig,
    pub daemon: DaemonConfig,
    pub run: RunConfig,
}

/// The synthetic response stream (see `simulate::synthetic`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub n_prompts: usize,
    pub responses_per_prompt: usize,
    pub dim: usize,
    pub latent_dim: usize,
    /// Share of the golden reward's variance that is non-linear in the latent, in [0, 1].
    pub nonlinearity: f64,
    pub held_out_fraction: f64,
    pub seed: u64,
}

/// The simulated annotators (one per daemon, same model and seed).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotatorConfig {
    pub beta: f64,
    pub latency_ms: u64,
    pub latency_jitter_ms: u64,
    pub seed: u64,
}

/// The daemon settings that matter for the demo (the rest keep their `armd run` defaults).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub strategy: String,
    pub baseline: String,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub candidates: String,
    pub round_interval_ms: u64,
    pub warmup_samples: usize,
    pub refit_every: usize,
    pub seed: u64,
}

/// Budget, cadence and outputs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub label_budget: u64,
    pub eval_every: u64,
    pub timeout_secs: u64,
    pub out_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub progress_interval_ms: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            n_prompts: 400,
            responses_per_prompt: 8,
            dim: 64,
            latent_dim: 32,
            nonlinearity: 0.0,
            held_out_fraction: 0.25,
            seed: 7,
        }
    }
}

impl Default for AnnotatorConfig {
    fn default() -> Self {
        Self {
            beta: 1.0,
            latency_ms: 20,
            latency_jitter_ms: 40,
            seed: 99,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            strategy: "targeted-info".into(),
            baseline: "random".into(),
            batch_size: 8,
            max_in_flight: 16,
            candidates: "cross".into(),
            round_interval_ms: 50,
            warmup_samples: 256,
            refit_every: 100,
            seed: 0,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            label_budget: 400,
            eval_every: 10,
            timeout_secs: 50,
            out_dir: PathBuf::from("demo-out"),
            metrics_listen: "127.0.0.1:9464".parse().expect("valid address"),
            progress_interval_ms: 1000,
        }
    }
}

impl DemoConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).context("invalid demo configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        if d.n_prompts < 4 || d.responses_per_prompt < 2 || d.dim < 2 || d.latent_dim < 1 {
            bail!(
                "data: need n_prompts >= 4, responses_per_prompt >= 2, dim >= 2, latent_dim >= 1"
            );
        }
        if !(0.0..=1.0).contains(&d.nonlinearity) {
            bail!("data.nonlinearity must be in [0, 1]");
        }
        if !(d.held_out_fraction > 0.0 && d.held_out_fraction < 1.0) {
            bail!("data.held_out_fraction must be in (0, 1)");
        }
        let streamed = self.stream_prompts() * d.responses_per_prompt;
        if streamed < self.daemon.warmup_samples.max(2) {
            bail!(
                "daemon.warmup_samples ({}) exceeds the {streamed} streamed responses",
                self.daemon.warmup_samples
            );
        }
        if !(self.annotator.beta.is_finite() && self.annotator.beta > 0.0) {
            bail!("annotator.beta must be a positive number");
        }
        if self.run.label_budget == 0 || self.run.eval_every == 0 {
            bail!("run.label_budget and run.eval_every must be at least 1");
        }
        if self.run.label_budget as usize * 2 > streamed {
            bail!(
                "run.label_budget ({}) needs {} responses but only {streamed} are streamed",
                self.run.label_budget,
                self.run.label_budget * 2
            );
        }
        // The daemon validates its own keys (strategy names, batch sizes, ...).
        for s in [&self.daemon.strategy, &self.daemon.baseline] {
            self.daemon_config("127.0.0.1:1", "x", s, Path::new("x"), 0)
                .with_context(|| format!("daemon settings with strategy {s:?}"))?;
        }
        Ok(())
    }

    fn held_out_prompts(&self) -> usize {
        let n = self.data.n_prompts;
        ((n as f64 * self.data.held_out_fraction).round() as usize).clamp(1, n - 1)
    }

    fn stream_prompts(&self) -> usize {
        self.data.n_prompts - self.held_out_prompts()
    }

    /// The `armd run` configuration of one demo instance.
    fn daemon_config(
        &self,
        brokers: &str,
        name: &str,
        strategy: &str,
        state: &Path,
        instance: usize,
    ) -> Result<Config> {
        let d = &self.daemon;
        let text = format!(
            r#"
[daemon]
instance_id = "demo-{name}"
[kafka]
brokers = "{brokers}"
group_id = "demo-{name}"
stats_interval_ms = 500
startup_timeout_secs = 20
[kafka.topics]
responses = "{name}.responses"
requests = "{name}.requests"
labels = "{name}.labels"
models = "{name}.models"
dead_letter = "{name}.dead-letter"
[model]
dim = {dim}
warmup_samples = {warmup}
refit_every = {refit}
[selection]
strategy = "{strategy}"
batch_size = {batch}
max_in_flight = {inflight}
round_interval_ms = {interval}
min_pool = {min_pool}
candidates = "{candidates}"
seed = {seed}
[checkpoint]
path = "{ckpt}"
every_labels = 100
every_secs = 5
[export]
dir = "{export}"
every_labels = {every}
publish = true
[kafka.settings]
# The mock broker answers an empty fetch only after fetch.wait.max.ms: keep label round trips short.
"fetch.wait.max.ms" = "10"
[http]
listen = "127.0.0.1:0"
[log]
level = "warn"
"#,
            dim = self.data.dim,
            warmup = d.warmup_samples,
            refit = d.refit_every,
            batch = d.batch_size,
            inflight = d.max_in_flight,
            interval = d.round_interval_ms,
            min_pool = (2 * d.batch_size).max(2),
            candidates = d.candidates,
            seed = d.seed + instance as u64,
            ckpt = toml_path(&state.join("armd.ckpt")),
            export = toml_path(&state.join("model")),
            every = self.run.eval_every,
        );
        Config::from_toml_with_env(&text, &[])
    }
}

fn toml_path(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

// ------------------------------------------------------------------------------------------------
// CLI

/// `armd demo` flags. Flags override the matching keys of the configuration file.
#[derive(Args, Debug, Default)]
pub struct DemoArgs {
    /// Demo configuration (TOML); see config/demo.toml for every key. Without it the built-in defaults
    /// (identical to config/demo.toml) are used.
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Output directory for summary.txt, curves.csv and spearman.svg [run.out_dir, default demo-out].
    #[arg(long, short, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Labels each annotator answers before the demo stops [run.label_budget].
    #[arg(long, value_name = "N")]
    pub labels: Option<u64>,
    /// Selection strategy of the armd instance, compared against `random` [daemon.strategy].
    #[arg(long, value_name = "NAME")]
    pub strategy: Option<String>,
    /// Annotator noise: P(a preferred) = σ(β·(r*(a) − r*(b))); smaller is noisier [annotator.beta].
    #[arg(long, value_name = "BETA")]
    pub beta: Option<f64>,
    /// Base annotator latency in milliseconds (uniform jitter is added on top) [annotator.latency_ms].
    #[arg(long, value_name = "MS")]
    pub latency_ms: Option<u64>,
    /// Seed of the synthetic data set [data.seed].
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Address of the armd instance's /metrics server; falls back to a free port when taken
    /// [run.metrics_listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Live mode: send armd's requests to the Label Studio server at this URL, where a person answers
    /// them (no random baseline, no simulated annotator; stops at the label budget or on Ctrl-C).
    /// Runs the bridge (`armd-labelstudio`, integrations/labelstudio) as a child process.
    #[arg(long, value_name = "URL", help_heading = "Live mode (Label Studio)")]
    pub label_studio: Option<String>,
    /// Label Studio API key for the bridge (personal access token or legacy token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "LS_API_TOKEN",
        hide_env_values = true,
        help_heading = "Live mode (Label Studio)"
    )]
    pub label_studio_token: Option<String>,
    /// The bridge command (a name on PATH or a path).
    #[arg(
        long,
        value_name = "CMD",
        default_value = "armd-labelstudio",
        help_heading = "Live mode (Label Studio)"
    )]
    pub label_studio_bridge: String,
}

/// Entry point of `armd demo`.
pub fn cli_main(args: DemoArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(p) => DemoConfig::load(p)?,
        None => DemoConfig::default(),
    };
    if let Some(v) = args.out_dir {
        cfg.run.out_dir = v;
    }
    if let Some(v) = args.labels {
        cfg.run.label_budget = v;
    }
    if let Some(v) = args.strategy {
        cfg.daemon.strategy = v;
    }
    if let Some(v) = args.beta {
        cfg.annotator.beta = v;
    }
    if let Some(v) = args.latency_ms {
        cfg.annotator.latency_ms = v;
    }
    if let Some(v) = args.seed {
        cfg.data.seed = v;
    }
    if let Some(v) = args.metrics_listen {
        cfg.run.metrics_listen = v;
    }
    cfg.validate()?;
    crate::daemon::telemetry::init_logging(&crate::daemon::config::LogConfig {
        format: crate::daemon::config::LogFormat::Text,
        level: "warn,armd::daemon::kafka=error".into(),
    })?;
    let report = match args.label_studio {
        Some(url) => live::run(
            &cfg,
            &live::LiveOptions {
                url,
                token: args.label_studio_token.unwrap_or_default(),
                bridge: args.label_studio_bridge,
            },
            true,
        )?,
        None => run(&cfg, true)?,
    };
    println!("{}", report.summary);
    println!("wrote {}", report.svg.display());
    println!("wrote {}", report.out_dir.join("curves.csv").display());
    println!("wrote {}", report.out_dir.join("summary.txt").display());
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Run

/// One daemon's results.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// `armd` or `random`.
    pub name: String,
    pub strategy: String,
    /// Labels applied by the daemon's final model.
    pub labels_applied: u64,
    /// Labels the annotator sent.
    pub labels_sent: u64,
    pub prequential_accuracy: Option<f64>,
    /// Held-out Spearman of the final model.
    pub final_spearman: f64,
    /// (labels applied, held-out Spearman) per model snapshot.
    pub curve: Vec<(u64, f64)>,
}

/// What `armd demo` produced.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub runs: Vec<RunResult>,
    /// The summary table (also in `summary.txt`).
    pub summary: String,
    pub svg: PathBuf,
    pub out_dir: PathBuf,
    pub metrics_url: String,
    pub wall: Duration,
    /// The run stopped at `run.timeout_secs` before the label budget was reached.
    pub timed_out: bool,
}

/// Held-out responses with their golden reward.
struct HeldOut {
    x: Vec<Vec<f32>>,
    reward: Vec<f64>,
    prompt: Vec<u64>,
}

impl HeldOut {
    fn spearman(&self, snap: &ModelSnapshot) -> f64 {
        let w = snap.weights.as_deref().unwrap_or(&snap.theta);
        let bias = snap.bias.unwrap_or(0.0);
        let pred: Vec<f64> = self
            .x
            .iter()
            .map(|x| x.iter().zip(w).map(|(a, b)| f64::from(*a) * b).sum::<f64>() + bias)
            .collect();
        crate::evaluation::mean_prompt_spearman(&pred, &self.reward, &self.prompt)
            .ok()
            .and_then(|m| m.mean)
            .unwrap_or(0.0)
    }
}

struct Instance {
    name: &'static str,
    strategy: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<()>>>,
    url: String,
    export_dir: PathBuf,
    models: BaseConsumer,
    /// The simulated annotator (none in live mode: people answer in Label Studio).
    annotator: Option<Annotator>,
    curve: Vec<(u64, f64)>,
    last: Option<ModelSnapshot>,
    /// From the daemon's /metrics: labels applied, prequential accuracy.
    applied: u64,
    accuracy: Option<f64>,
    seen_sent: u64,
    last_progress: Instant,
}

/// Runs the demo (see the module doc) and writes its outputs to `cfg.run.out_dir`. `progress` prints
/// live progress lines on stderr.
pub fn run(cfg: &DemoConfig, progress: bool) -> Result<DemoReport> {
    cfg.validate()?;
    let started = Instant::now();
    let say = |msg: String| {
        if progress {
            eprintln!("{msg}");
        }
    };

    // Data: a synthetic set; some prompts are held out for scoring, the rest are streamed.
    let data = synthetic(cfg)?;
    let (stream, held_out, golden) = split(cfg, &data);
    say(format!(
        "armd demo: {} prompts × {} responses (dim {}), {} streamed responses, {} held-out prompts",
        cfg.data.n_prompts,
        cfg.data.responses_per_prompt,
        cfg.data.dim,
        stream.len(),
        cfg.held_out_prompts()
    ));

    // Broker: librdkafka's in-process mock cluster, with the topics of both instances.
    let (cluster, brokers) = embedded_kafka(&["armd", "random"], 2)?;
    say(format!(
        "embedded Kafka (librdkafka mock cluster) at {brokers}"
    ));

    let state = fresh_state(&cfg.run.out_dir)?;
    let rt = runtime()?;

    let golden = Arc::new(golden);
    let mut instances = Vec::new();
    for (i, (name, strategy)) in [
        ("armd", cfg.daemon.strategy.clone()),
        ("random", cfg.daemon.baseline.clone()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut inst = start_instance(&rt, cfg, &brokers, (name, strategy, i), &state)?;
        let annotator = Annotator::start(
            &brokers,
            &format!("{name}.requests"),
            &format!("{name}.labels"),
            golden.clone(),
            &cfg.annotator,
            cfg.run.label_budget,
        )?;
        say(format!(
            "{name:>6}: strategy {}, metrics at {}",
            inst.strategy, inst.url
        ));
        inst.annotator = Some(annotator);
        instances.push(inst);
    }

    // The same stream to both instances.
    let producer = producer(&brokers)?;
    for s in &stream {
        let msg = serde_json::json!({
            "schema": "armd.response.v1",
            "prompt_id": s.prompt_id,
            "response_id": s.response_id,
            "embedding_b64": encode_f32_b64(&s.x),
        })
        .to_string();
        for name in ["armd", "random"] {
            send(&producer, &format!("{name}.responses"), &s.prompt_id, &msg);
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| anyhow!("cannot produce the responses: {e}"))?;
    say(format!(
        "streamed {} responses to each instance; annotators answer up to {} requests each (β = {}, latency {}+U(0,{}) ms)",
        stream.len(),
        cfg.run.label_budget,
        cfg.annotator.beta,
        cfg.annotator.latency_ms,
        cfg.annotator.latency_jitter_ms
    ));

    // Watch the models topics until both budgets are applied (or the timeout).
    let budget = cfg.run.label_budget;
    let deadline = started + Duration::from_secs(cfg.run.timeout_secs);
    let mut next_progress = Instant::now();
    let timed_out = loop {
        for inst in &mut instances {
            drain_models(inst, &held_out, Duration::from_millis(20));
        }
        if progress && Instant::now() >= next_progress {
            eprintln!("{}", progress_line(started, budget, &instances));
            next_progress = Instant::now() + Duration::from_millis(cfg.run.progress_interval_ms);
        }
        let mut done = true;
        for inst in &mut instances {
            if let Some(text) = scrape(&inst.url) {
                inst.applied = metric(&text, "armd_labels_applied_total").unwrap_or(0.0) as u64;
                inst.accuracy = metric(&text, "armd_prequential_accuracy_ratio");
            }
            let sent = inst.annotator.as_ref().map_or(0, Annotator::sent);
            if sent > inst.seen_sent {
                inst.seen_sent = sent;
                inst.last_progress = Instant::now();
            }
            // Every label sent was applied, or the last one was sent a while ago (rejected labels).
            let settled =
                inst.applied >= budget || inst.last_progress.elapsed() > Duration::from_secs(3);
            done &= sent >= budget && settled;
        }
        if done {
            break false;
        }
        if instances
            .iter()
            .any(|i| i.handle.as_ref().is_some_and(|h| h.is_finished()))
        {
            break false; // a daemon stopped on its own: report its error below
        }
        if Instant::now() >= deadline {
            say(format!(
                "timeout ({} s) before the label budget was reached; stopping",
                cfg.run.timeout_secs
            ));
            break true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    // Graceful shutdown: each daemon drains, exports its final model and checkpoints.
    let mut runs = Vec::new();
    let mut metrics_url = String::new();
    for mut inst in instances {
        if let Some(a) = inst.annotator.as_mut() {
            a.stop();
        }
        if let Some(stop) = inst.stop.take() {
            let _ = stop.send(());
        }
        let handle = inst.handle.take().expect("each daemon is stopped once");
        rt.block_on(handle)
            .context("daemon task panicked")?
            .with_context(|| format!("the {} daemon failed", inst.name))?;
        drain_models(&mut inst, &held_out, Duration::from_millis(300));
        if let Some(snap) = read_export(&inst.export_dir) {
            record(&mut inst, &held_out, snap);
        }
        if inst.name == "armd" {
            metrics_url = inst.url.clone();
        }
        let last = inst.last.as_ref();
        runs.push(RunResult {
            name: inst.name.to_string(),
            strategy: inst.strategy.clone(),
            labels_applied: last.map_or(0, |s| s.labels_applied),
            labels_sent: inst.annotator.as_ref().map_or(0, Annotator::sent),
            prequential_accuracy: last.and_then(|s| s.prequential.accuracy),
            final_spearman: inst.curve.last().map_or(0.0, |p| p.1),
            curve: inst.curve,
        });
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(cluster);

    let wall = started.elapsed();
    let summary = summary_table(&runs, wall, timed_out);
    write_outputs(cfg, runs, summary, metrics_url, wall, timed_out)
}

struct Streamed {
    prompt_id: String,
    response_id: String,
    x: Vec<f32>,
}

/// The synthetic data set of `cfg.data`.
fn synthetic(cfg: &DemoConfig) -> Result<Dataset> {
    crate::simulate::synthetic::generate(&SyntheticConfig {
        n_prompts: cfg.data.n_prompts,
        responses_per_prompt: cfg.data.responses_per_prompt,
        dim: cfg.data.dim,
        latent_dim: cfg.data.latent_dim,
        nonlinearity: cfg.data.nonlinearity,
        seed: cfg.data.seed,
        ..SyntheticConfig::default()
    })
    .map_err(|e| anyhow!("cannot generate the synthetic data: {e}"))
}

/// librdkafka's in-process mock cluster with the five topics of each daemon in `names`
/// (`<name>.responses`, …; `labels_partitions` labels partitions), and its bootstrap address.
fn embedded_kafka(
    names: &[&str],
    labels_partitions: i32,
) -> Result<(
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
)> {
    let cluster = MockCluster::new(1).map_err(|e| anyhow!("cannot start the mock cluster: {e}"))?;
    let brokers = cluster.bootstrap_servers();
    for name in names {
        for (topic, parts) in [
            ("responses", 2),
            ("requests", 1),
            ("labels", labels_partitions),
            ("models", 1),
            ("dead-letter", 1),
        ] {
            cluster
                .create_topic(&format!("{name}.{topic}"), parts, 1)
                .map_err(|e| anyhow!("cannot create topic {name}.{topic}: {e}"))?;
        }
    }
    Ok((cluster, brokers))
}

/// Creates `out_dir` and returns its `state` directory, emptied: each run starts fresh (the daemons'
/// checkpoints and model exports live there).
fn fresh_state(out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let state = out_dir.join("state");
    if state.exists() {
        std::fs::remove_dir_all(&state)
            .with_context(|| format!("cannot clear {}", state.display()))?;
    }
    Ok(state)
}

/// The async runtime the daemons run on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("armd-demo-io")
        .build()
        .context("cannot start the async runtime")
}

/// Starts daemon `name` (index `i`) with `strategy` on the embedded Kafka, its state under `state`; its
/// `/metrics` on `run.metrics_listen` for the first instance (a free port when that is taken or for the
/// others). No annotator yet.
fn start_instance(
    rt: &tokio::runtime::Runtime,
    cfg: &DemoConfig,
    brokers: &str,
    (name, strategy, i): (&'static str, String, usize),
    state: &Path,
) -> Result<Instance> {
    let dir = state.join(name);
    let dcfg = cfg.daemon_config(brokers, name, &strategy, &dir, i)?;
    let listener = rt.block_on(async {
        if i == 0 {
            match tokio::net::TcpListener::bind(cfg.run.metrics_listen).await {
                Ok(l) => return Ok(l),
                Err(e) => tracing::warn!(
                    addr = %cfg.run.metrics_listen, error = %e,
                    "metrics address taken; using a free port"
                ),
            }
        }
        tokio::net::TcpListener::bind("127.0.0.1:0").await
    })?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = rt.spawn(crate::daemon::run_with_listener(
        dcfg,
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    let models = watch_consumer(brokers, &format!("{name}.models"), 1)?;
    Ok(Instance {
        name,
        strategy,
        stop: Some(stop),
        handle: Some(handle),
        url,
        export_dir: dir.join("model"),
        models,
        annotator: None,
        curve: Vec::new(),
        last: None,
        applied: 0,
        accuracy: None,
        seen_sent: 0,
        last_progress: Instant::now(),
    })
}

/// Splits prompts into streamed and held-out ones (seeded), and maps response ids to golden rewards.
fn split(cfg: &DemoConfig, data: &Dataset) -> (Vec<Streamed>, HeldOut, HashMap<String, f64>) {
    let mut prompts: Vec<u64> = (0..cfg.data.n_prompts as u64).collect();
    prompts.shuffle(&mut StdRng::seed_from_u64(cfg.data.seed ^ 0x5eed));
    let held: std::collections::HashSet<u64> =
        prompts[..cfg.held_out_prompts()].iter().copied().collect();
    let mut stream = Vec::new();
    let mut held_out = HeldOut {
        x: Vec::new(),
        reward: Vec::new(),
        prompt: Vec::new(),
    };
    let mut golden = HashMap::new();
    let mut count: HashMap<u64, usize> = HashMap::new();
    for i in 0..data.len() {
        let p = data.prompt()[i];
        let j = count.entry(p).or_default();
        let response_id = format!("p{p}-r{j}");
        *j += 1;
        if held.contains(&p) {
            held_out.x.push(data.embedding(i).to_vec());
            held_out.reward.push(data.reward()[i]);
            held_out.prompt.push(p);
        } else {
            golden.insert(response_id.clone(), data.reward()[i]);
            stream.push(Streamed {
                prompt_id: format!("p{p}"),
                response_id,
                x: data.embedding(i).to_vec(),
            });
        }
    }
    // Interleave prompts so the stream looks like live traffic rather than prompt blocks.
    stream.shuffle(&mut StdRng::seed_from_u64(cfg.data.seed ^ 0x57ea));
    (stream, held_out, golden)
}

fn producer(brokers: &str) -> Result<BaseProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .map_err(|e| anyhow!("cannot create a producer: {e}"))
}

fn send(p: &BaseProducer, topic: &str, key: &str, payload: &str) {
    let mut rec = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                p.poll(Duration::from_millis(20));
            }
        }
    }
}

/// A consumer that watches partitions `0..partitions` of `topic` from the beginning (models, labels).
fn watch_consumer(brokers: &str, topic: &str, partitions: i32) -> Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("demo-watch-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| anyhow!("cannot create a consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// Reads every model snapshot available within `wait`.
fn drain_models(inst: &mut Instance, held_out: &HeldOut, wait: Duration) {
    let mut timeout = wait;
    while let Some(Ok(m)) = inst.models.poll(timeout) {
        timeout = Duration::ZERO;
        if let Some(snap) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<ModelSnapshot>(p).ok())
        {
            record(inst, held_out, snap);
        }
    }
}

fn record(inst: &mut Instance, held_out: &HeldOut, snap: ModelSnapshot) {
    if inst
        .curve
        .last()
        .is_some_and(|p| p.0 >= snap.labels_applied)
    {
        return;
    }
    inst.curve
        .push((snap.labels_applied, held_out.spearman(&snap)));
    inst.last = Some(snap);
}

/// `GET /metrics` over plain HTTP/1.0 (the daemon's own server on loopback).
fn scrape(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    let addr: SocketAddr = host.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, text) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then_some(())
        .or_else(|| head.starts_with("HTTP/1.1 200").then_some(()))?;
    Some(text.to_string())
}

/// Value of an unlabelled series in a Prometheus exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn read_export(dir: &Path) -> Option<ModelSnapshot> {
    let bytes = std::fs::read(dir.join(crate::daemon::export::JSON_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn progress_line(started: Instant, budget: u64, instances: &[Instance]) -> String {
    let mut line = format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
    for inst in instances {
        let labels = inst.applied;
        let acc = inst
            .accuracy
            .map_or("  -  ".to_string(), |a| format!("{a:.3}"));
        let rho = inst
            .curve
            .last()
            .map_or("  -  ".to_string(), |p| format!("{:+.3}", p.1));
        line.push_str(&format!(
            "  {}: labels {labels:>4}/{budget} preq.acc {acc} held-out ρ {rho}",
            inst.name
        ));
    }
    line
}

/// Held-out Spearman of a curve at `labels` (the last snapshot at or before it).
fn at(curve: &[(u64, f64)], labels: u64) -> Option<f64> {
    curve.iter().rev().find(|p| p.0 <= labels).map(|p| p.1)
}

fn summary_table(runs: &[RunResult], wall: Duration, timed_out: bool) -> String {
    let mut s = String::new();
    s.push_str(
        "armd demo — held-out mean per-prompt Spearman of the reward head vs the golden reward\n\n",
    );
    s.push_str(&format!(
        "{:<8} {:<14} {:>12} {:>12} {:>10} {:>10}\n",
        "run", "strategy", "labels sent", "applied", "preq.acc", "Spearman"
    ));
    for r in runs {
        s.push_str(&format!(
            "{:<8} {:<14} {:>12} {:>12} {:>10} {:>10.3}\n",
            r.name,
            r.strategy,
            r.labels_sent,
            r.labels_applied,
            r.prequential_accuracy
                .map_or("-".into(), |a| format!("{a:.3}")),
            r.final_spearman
        ));
    }
    // Side by side at a few label counts both runs reached.
    let max = runs.iter().map(|r| r.labels_applied).min().unwrap_or(0);
    if max > 0 && runs.len() == 2 {
        s.push_str("\nSpearman by labels applied:\n");
        s.push_str(&format!(
            "{:>8} {:>10} {:>10} {:>10}\n",
            "labels", runs[0].name, runs[1].name, "diff"
        ));
        for q in [1, 2, 3, 4] {
            let l = max * q / 4;
            if let (Some(a), Some(b)) = (at(&runs[0].curve, l), at(&runs[1].curve, l)) {
                s.push_str(&format!("{l:>8} {a:>10.3} {b:>10.3} {:>+10.3}\n", a - b));
            }
        }
    }
    s.push_str(&format!("\nwall time {:.1} s", wall.as_secs_f64()));
    if timed_out {
        s.push_str(" (stopped at run.timeout_secs before the label budget)");
    }
    s.push('\n');
    s
}

fn write_csv(path: &Path, runs: &[RunResult]) -> Result<()> {
    let mut s = String::from("run,strategy,labels,spearman\n");
    for r in runs {
        for (l, rho) in &r.curve {
            s.push_str(&format!("{},{},{l},{rho:.6}\n", r.name, r.strategy));
        }
    }
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}

/// The held-out Spearman curves, one line per run in its strategy's colour (as in `armd simulate`'s plots).
fn spearman_chart(runs: &[RunResult], cfg: &DemoConfig) -> Chart {
    let first = runs.first().map(|r| r.strategy.clone());
    let series = runs.iter().enumerate().map(|(i, r)| {
        let points = r.curve.iter().map(|&(labels, rho)| {
            let y = MeanSd {
                mean: rho,
                sd: 0.0,
                n: 1,
            };
            (labels as f64, y)
        });
        // Names were validated with the configuration; an unknown one only loses its colour.
        let strategy = r.strategy.parse().unwrap_or(StrategyKind::Random);
        let label = format!("{} ({})", r.name, r.strategy);
        let mut line = Series::strategy(strategy, label, points.collect());
        // `--strategy random` runs random twice: the twin is drawn black so the two lines differ.
        if i > 0 && first.as_deref() == Some(r.strategy.as_str()) {
            line.colour = plotters::style::RGBColor(0, 0, 0);
        }
        line
    });
    Chart {
        title: format!(
            "held-out Spearman vs labels (d={}, β={})",
            cfg.data.dim, cfg.annotator.beta
        ),
        x_desc: "labels applied".into(),
        y_desc: "mean per-prompt Spearman".into(),
        legend: SeriesLabelPosition::LowerRight,
        series: series.collect(),
    }
}

/// Writes `summary.txt`, `curves.csv` and `spearman.svg` to `cfg.run.out_dir` (simulated and live mode)
/// and returns the report.
fn write_outputs(
    cfg: &DemoConfig,
    runs: Vec<RunResult>,
    summary: String,
    metrics_url: String,
    wall: Duration,
    timed_out: bool,
) -> Result<DemoReport> {
    let out_dir = cfg.run.out_dir.clone();
    let text = out_dir.join("summary.txt");
    std::fs::write(&text, &summary).with_context(|| format!("cannot write {}", text.display()))?;
    write_csv(&out_dir.join("curves.csv"), &runs)?;
    let svg = out_dir.join("spearman.svg");
    spearman_chart(&runs, cfg).write_svg(&svg, (800, 500))?;
    Ok(DemoReport {
        runs,
        summary,
        svg,
        out_dir,
        metrics_url,
        wall,
        timed_out,
    })
}

// ------------------------------------------------------------------------------------------------
// Annotator

/// A simulated annotator: answers each request of `requests` on `labels` with a Bernoulli draw on
/// σ(β·(r*(a) − r*(b))) after a latency of `latency_ms + U(0, latency_jitter_ms)`, up to `budget` labels.
struct Annotator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Annotator {
    fn start(
        brokers: &str,
        requests: &str,
        labels: &str,
        golden: Arc<HashMap<String, f64>>,
        cfg: &AnnotatorConfig,
        budget: u64,
    ) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("demo-annotator-{requests}"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(|e| anyhow!("cannot create the annotator's consumer: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(requests, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let producer = producer(brokers)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (labels, cfg) = (labels.to_string(), cfg.clone());
        let handle = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name("demo-annotator".into())
                .spawn(move || {
                    let mut rng = StdRng::seed_from_u64(cfg.seed);
                    let mut answered = 0u64;
                    let mut pending: Vec<(Instant, String, String)> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(Duration::ZERO);
                        let now = Instant::now();
                        pending.retain(|(due, id, label)| {
                            if *due <= now {
                                send(&producer, &labels, id, label);
                                sent.fetch_add(1, Ordering::Relaxed);
                                false
                            } else {
                                true
                            }
                        });
                        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(5)) else {
                            continue;
                        };
                        if answered >= budget {
                            continue;
                        }
                        let Some(req) = msg
                            .payload()
                            .and_then(|p| serde_json::from_slice::<LabelRequest>(p).ok())
                        else {
                            continue;
                        };
                        let (Some(a), Some(b)) = (
                            golden.get(&req.a.response_id),
                            golden.get(&req.b.response_id),
                        ) else {
                            continue;
                        };
                        let p_a = 1.0 / (1.0 + (-cfg.beta * (a - b)).exp());
                        let outcome = if rng.random::<f64>() < p_a { "a" } else { "b" };
                        let label = serde_json::json!({
                            "schema": "armd.label.v1",
                            "request_id": req.request_id,
                            "annotator_id": "demo-annotator",
                            "outcome": outcome,
                        })
                        .to_string();
                        let jitter = if cfg.latency_jitter_ms > 0 {
                            rng.random_range(0..=cfg.latency_jitter_ms)
                        } else {
                            0
                        };
                        let due = Instant::now() + Duration::from_millis(cfg.latency_ms + jitter);
                        pending.push((due, req.request_id, label));
                        answered += 1;
                    }
                    let _ = producer.flush(Duration::from_secs(10));
                })
                .context("cannot start the annotator thread")?
        };
        Ok(Self {
            stop,
            sent,
            handle: Some(handle),
        })
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Annotator {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_demo_config_is_the_default() {
        let text = include_str!("../config/demo.toml");
        assert_eq!(DemoConfig::from_toml(text).unwrap(), DemoConfig::default());
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert!(DemoConfig::from_toml("[run]\nlabel_budgett = 3\n").is_err());
        assert!(DemoConfig::from_toml("[daemon]\nstrategy = \"nope\"\n").is_err());
        assert!(DemoConfig::from_toml("[run]\nlabel_budget = 100000\n").is_err());
    }
}
