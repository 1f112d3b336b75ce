//! The daemon's performance report (issue 4, BENCHMARKS.md "Daemon"), each figure next to the baseline it
//! is reported against, measured in the same run:
//!
//! 1. `ingest`: armd's ingest rate (responses decoded, validated and pooled per second: the slope of
//!    `armd_responses_accepted_total`) against the raw rdkafka consume rate of the same pre-produced
//!    messages on the same broker (armd's own responses-consumer settings, fresh group, from the
//!    beginning, touching each payload), at d = 768 and 2048, JSON number array and base64 embeddings.
//!    armd runs twice per case: with the default configuration and with selection rounds held off
//!    (`round_interval_ms` = 1 h: one early round on a small pool), to show whether the engine thread
//!    limits ingest.
//! 2. `label_delay`: label → posterior-updated delay at d = 2048 under the default configuration while
//!    responses stream in at a steady rate and a simulated annotator answers every request: from the
//!    label's Kafka CreateTime to the end of its rank-one update, exact per label (the engine's debug
//!    event `label applied` carries `apply_delay_ms`; this bench captures it with a tracing layer).
//! 3. `round`: `Engine::run_round` at the default configuration (pool full at its default capacity of
//!    4096, greedy-dopt, 20,000 cross-prompt candidates, batch 8), d = 768 and 2048, against the `random`
//!    strategy's round on the same engine state, and (select call only) against the paper-exact naive
//!    D-optimal rule on an equal-sized pool.
//! 4. `ingest_instances`: aggregate ingest of 1, 2 and 3 armd instances in one consumer group (in-process,
//!    distinct `daemon.instance_id` and state directories, no selection rounds) on one pre-produced
//!    6-partition topic (d = 768 base64), against raw rdkafka consumption of the same topic in the same
//!    repeat by 1, 2 and 3 consumers, each assigned its 1/k of the partitions (the range assignor's split;
//!    assigned directly, without the group protocol). Rate = messages per second over the window where
//!    every member consumed (after the group's last rebalance, before the first member ran out; armd:
//!    the sum of each instance's own `armd_responses_accepted_total`, scraped every 50 ms); CPU per
//!    message = this process's CPU time in the window (the bench's own main thread excluded) per message,
//!    and the broker's where its pid is known. Ratios to raw ×1 and to raw with as many consumers.
//!    The armd members should join before the group's first assignment: give the broker Kafka's default
//!    `group.initial.rebalance.delay.ms` (3000); `.ci/kafka.sh` sets 0, and then the first instance takes
//!    every partition and may drain much of the topic before the others get any (the output's `split`
//!    column shows it, and a note is printed).
//!
//! Parts 1, 2 and 4 need a Kafka broker: `ARMD_BENCH_BROKERS=host:port`, otherwise one is started with
//! `.ci/kafka.sh start` (and stopped at the end); if neither works they are skipped with a message.
//! Part 3 is a criterion bench and needs no broker.
//!
//! Run: `cargo bench --bench daemon` (one part: `-- ingest`, `-- label_delay`, `-- round`,
//! `-- ingest_instances`).
//! Sizes: `ARMD_BENCH_INGEST_MB` (payload megabytes pre-produced per ingest case, default 1000; the topics are deleted after each case),
//! `ARMD_BENCH_REPEATS` (raw/armd measurements per case, default 5; a summary gives medians), `ARMD_BENCH_INGEST_CASES` (e.g.
//! `2048-base64,768-json`: only these ingest cases), `ARMD_BENCH_INGEST_CONFIGS` (`default` or
//! `no-rounds`: only that armd configuration), `ARMD_BENCH_KAFKA_SETTINGS` (`key=value,...`: librdkafka
//! settings for every client, raw consumer included), `ARMD_BENCH_DELAY_SECS` (length of
//! the label-delay run, default 45). Part 4: `ARMD_BENCH_INSTANCES_MB` (payload megabytes pre-produced
//! once for the whole part, default 2000; deleted at the end), `ARMD_BENCH_REPEATS` (default 3 here),
//! `ARMD_BENCH_INSTANCES_MAX` (most members, default 3), `ARMD_BENCH_BROKER_PID` (the broker's process
//! id, for its CPU time per message when `ARMD_BENCH_BROKERS` is given).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use armd::daemon::config::Config;
use armd::daemon::engine::Engine;
use armd::daemon::engine::Output;
use armd::daemon::input::LabelInput;
use armd::daemon::kafka::Health;
use armd::daemon::messages::{encode_f32_b64, LabelMsg, Response, SourcePosition};
use armd::daemon::telemetry::Telemetry;
use armd::posterior::Posterior;
use armd::selection::{self, dopt, Round, SelectionInput, SelectionParams, StrategyKind};
use criterion::{BenchmarkId, Criterion};
use faer::Mat;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::Producer;

use common::inprocess::start_in_process;
use common::{create_topics, get, metric, Annotator, Topics, World};

const DEFAULT_CONFIG: &str = include_str!("../config/armd.toml");

// ------------------------------------------------------------------------------------------------
// Broker

/// The broker of this run: `ARMD_BENCH_BROKERS`, or one this bench started (stopped on drop).
struct BenchBroker {
    bootstrap: String,
    own: Option<tempfile::TempDir>,
}

impl Drop for BenchBroker {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = std::process::Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/kafka.sh"))
                .arg("stop")
                .arg(dir.path())
                .status();
        }
    }
}

impl BenchBroker {
    /// The broker's process id, for its CPU time: `ARMD_BENCH_BROKER_PID`, or the pid file of the broker
    /// this bench started.
    fn pid(&self) -> Option<String> {
        if let Ok(p) = std::env::var("ARMD_BENCH_BROKER_PID") {
            return Some(p.trim().to_string()).filter(|p| !p.is_empty());
        }
        let dir = self.own.as_ref()?;
        std::fs::read_to_string(dir.path().join("broker.pid"))
            .ok()
            .map(|p| p.trim().to_string())
    }
}

fn bench_broker() -> Result<BenchBroker, String> {
    if let Ok(b) = std::env::var("ARMD_BENCH_BROKERS") {
        if !b.is_empty() {
            return Ok(BenchBroker {
                bootstrap: b,
                own: None,
            });
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("armd-bench-kafka")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir for the broker: {e}"))?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/kafka.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg("start")
        .arg(dir.path())
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        // The script may have left a half-started broker behind.
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(dir.path())
            .status();
        return Err(format!(
            "`{script} start` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(BenchBroker {
        bootstrap: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        own: Some(dir),
    })
}

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "uptime unavailable".into())
}

/// (all, stolen) CPU ticks of the machine so far, from /proc/stat (`None` where unavailable). On a VM,
/// time stolen by the host's other guests slows the raw consumer and armd alike but not equally (the raw
/// rate is latency-bound): the ingest table gives the share of each repeat.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((f.iter().sum(), *f.get(7)?))
}

/// Stolen share of the CPU time between two [`cpu_ticks`] readings, in percent.
fn steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => 100.0 * (s1 - s0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{key}={s:?} is not a valid number")),
        Err(_) => default,
    }
}

/// `config/armd.toml` (every default) pointed at this run's broker, topics and state directory, with
/// `extra` overrides as `ARMD__SECTION__KEY` pairs.
fn default_config(
    bootstrap: &str,
    t: &Topics,
    state: &std::path::Path,
    dim: usize,
    group: &str,
    extra: &[(&str, &str)],
) -> Config {
    let (dim, ckpt, export) = (
        dim.to_string(),
        state.join("armd.ckpt").display().to_string(),
        state.join("model").display().to_string(),
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("ARMD__KAFKA__BROKERS", bootstrap),
        ("ARMD__KAFKA__GROUP_ID", group),
        ("ARMD__KAFKA__TOPICS__RESPONSES", &t.responses),
        ("ARMD__KAFKA__TOPICS__REQUESTS", &t.requests),
        ("ARMD__KAFKA__TOPICS__LABELS", &t.labels),
        ("ARMD__KAFKA__TOPICS__MODELS", &t.models),
        ("ARMD__KAFKA__TOPICS__DEAD_LETTER", &t.dead_letter),
        ("ARMD__MODEL__DIM", &dim),
        ("ARMD__CHECKPOINT__PATH", &ckpt),
        ("ARMD__EXPORT__DIR", &export),
        ("ARMD__HTTP__LISTEN", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra);
    let mut cfg = Config::from_toml_with_env(DEFAULT_CONFIG, &env).expect("bench configuration");
    // `ARMD_BENCH_KAFKA_SETTINGS=key=value,...`: librdkafka settings for every client of the run (the raw
    // consumer's included, since it takes armd's settings), as `kafka.settings` would give them.
    if let Ok(extra) = std::env::var("ARMD_BENCH_KAFKA_SETTINGS") {
        for kv in extra.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("ARMD_BENCH_KAFKA_SETTINGS: {kv:?} is not key=value"));
            cfg.kafka.settings.insert(k.to_string(), v.to_string());
        }
    }
    cfg
}

/// Polls `series` on the daemon's `/metrics` (`None` while it cannot be scraped).
fn scrape(base: &str, series: &str) -> Option<f64> {
    match get(&format!("{base}/metrics")) {
        Some((200, text)) => metric(&text, series),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Ingest throughput

/// One response message of `d` values: JSON number array or base64 little-endian f32.
fn response_payload(i: usize, x: &[f32], base64: bool) -> Vec<u8> {
    let prompt = i / 8;
    let mut m = serde_json::json!({
        "schema": "armd.response.v1",
        "prompt_id": format!("p{prompt}"),
        "response_id": format!("p{prompt}-r{}", i % 8),
        "metadata": {"model": "bench", "i": i},
    });
    if base64 {
        m["embedding_b64"] = encode_f32_b64(x).into();
    } else {
        m["embedding"] = serde_json::to_value(x).expect("f32 array");
    }
    serde_json::to_vec(&m).expect("json")
}

/// Produces `n` responses of dimension `d`; returns the total payload bytes.
fn produce_responses(bootstrap: &str, topic: &str, n: usize, d: usize, base64: bool) -> u64 {
    let mut rng = StdRng::seed_from_u64(d as u64);
    // 64 distinct embeddings, like LLM hidden states (offset and scale), reused across messages.
    let xs: Vec<Vec<f32>> = (0..64)
        .map(|_| {
            (0..d)
                .map(|_| 20.0 + 4.0 * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let p = common::producer(bootstrap);
    let mut bytes = 0u64;
    for i in 0..n {
        let payload = response_payload(i, &xs[i % xs.len()], base64);
        bytes += payload.len() as u64;
        common::send(&p, topic, &format!("p{}", i / 8), &payload);
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(120)).expect("flush responses");
    bytes
}

/// Messages per second over the span from the first to the last of `n` messages.
struct Rate {
    msgs_per_s: f64,
    span_s: f64,
    /// CPU time of the consuming threads per message over the span (µs).
    cpu_us_per_msg: f64,
}

/// The raw consume rate: armd's responses-consumer settings (same function), fresh group, every payload
/// read (one byte per cache line summed), offsets neither stored nor committed.
fn raw_consume(bootstrap: &str, t: &Topics, d: usize, n: usize, group: &str) -> Rate {
    let state = tempfile::tempdir().expect("temp dir");
    let cfg = default_config(
        bootstrap,
        t,
        state.path(),
        d,
        group,
        &[("ARMD__DAEMON__INSTANCE_ID", group)],
    );
    let consumer =
        armd::daemon::ingest::consumer(&cfg, Arc::new(Health::default()), Telemetry::new().metrics)
            .expect("raw consumer");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut first, mut count, mut touched) = (None, 0usize, 0u64);
    let mut times0 = ThreadTimes::new();
    while count < n {
        assert!(
            Instant::now() < deadline,
            "raw consumer: {count}/{n} messages in 300 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                if first.is_none() {
                    times0 = thread_times();
                    first = Some(Instant::now());
                }
                if let Some(p) = msg.payload() {
                    touched =
                        touched.wrapping_add(p.iter().step_by(64).map(|&b| u64::from(b)).sum());
                }
                count += 1;
            }
            Some(Err(e)) => eprintln!("raw consumer error: {e}"),
            None => {}
        }
    }
    let span = first.expect("n >= 1").elapsed().as_secs_f64();
    let pid = std::process::id();
    // This thread (the consuming one: the main thread) and librdkafka's threads.
    let cpu = thread_delta(&times0, &thread_times(), |tid, name| {
        tid == pid || name.starts_with("rdk:")
    });
    std::hint::black_box(touched);
    consumer.unsubscribe();
    Rate {
        msgs_per_s: (n - 1) as f64 / span,
        span_s: span,
        cpu_us_per_msg: cpu.values().map(|c| c.0).sum::<f64>() * 1e6 / (n - 1) as f64,
    }
}

/// Per thread of this process (by id): name, seconds on a CPU and seconds runnable but waiting for
/// one, so far (from /proc/self/task/*/schedstat; empty where unavailable).
type ThreadTimes = std::collections::BTreeMap<u32, (String, f64, f64)>;

fn thread_times() -> ThreadTimes {
    let mut out = ThreadTimes::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // schedstat: ns on a CPU, ns runnable but waiting for a CPU, timeslices.
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let f: Vec<f64> = stat
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let (Some(run), Some(wait)) = (f.first(), f.get(1)) {
            out.insert(tid, (name.trim().to_string(), run / 1e9, wait / 1e9));
        }
    }
    out
}

/// CPU and wait seconds between two snapshots, summed by thread name, for threads `pick` selects.
fn thread_delta(
    before: &ThreadTimes,
    after: &ThreadTimes,
    pick: impl Fn(u32, &str) -> bool,
) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut out = std::collections::BTreeMap::new();
    for (tid, (name, run1, wait1)) in after {
        if !pick(*tid, name) {
            continue;
        }
        let (run0, wait0) = before.get(tid).map_or((0.0, 0.0), |b| (b.1, b.2));
        let e = out.entry(name.clone()).or_insert((0.0, 0.0));
        e.0 += run1 - run0;
        e.1 += wait1 - wait0;
    }
    out
}

/// Selection rounds run so far and their summed wall time in seconds (zeros if `/metrics` fails).
fn selection_rounds(base: &str) -> (f64, f64) {
    match get(&format!("{base}/metrics")) {
        Some((200, text)) => (
            metric(&text, "armd_selection_rounds_total").unwrap_or(0.0),
            metric(&text, "armd_selection_duration_seconds_sum").unwrap_or(0.0),
        ),
        _ => (0.0, 0.0),
    }
}

/// armd's ingest rate: the slope of `armd_responses_accepted_total` from its first non-zero scrape to
/// the scrape where it reaches `n` (group join and start-up excluded). Scraped every 20 ms.
fn armd_ingest(cfg: Config, n: usize) -> Rate {
    let d = start_in_process(cfg);
    let series = "armd_responses_accepted_total";
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut start: Option<(Instant, f64)> = None;
    let mut times0 = ThreadTimes::new();
    let mut rounds0 = (0.0, 0.0);
    // Each scrape renders the whole exposition on one of the daemon's tokio workers: polling every 20 ms
    // kept that worker 2–3 % busy in the d = 768 no-rounds window, paced 1–2 % (docs/bench/history.md,
    // "Daemon" §1).
    // Once the rate is known, the bench sleeps half the predicted remaining time (at most 500 ms), so
    // the end is still caught within 20 ms.
    let fine = Duration::from_millis(20);
    let end = loop {
        assert!(!d.finished(), "the daemon stopped while ingesting");
        assert!(Instant::now() < deadline, "armd ingest: not done in 600 s");
        let mut pause = fine;
        if let Some(v) = scrape(&d.base, series) {
            let now = Instant::now();
            if v > 0.0 && start.is_none() {
                start = Some((now, v));
                times0 = thread_times();
                rounds0 = selection_rounds(&d.base);
            }
            if v >= n as f64 {
                break now;
            }
            if let Some((t0, c0)) = start.filter(|&(_, c0)| v > c0) {
                let rate = (v - c0) / now.duration_since(t0).as_secs_f64();
                let half_left = Duration::from_secs_f64(0.5 * (n as f64 - v) / rate);
                pause = half_left.clamp(fine, Duration::from_millis(500));
            }
        }
        std::thread::sleep(pause);
    };
    let times1 = thread_times();
    let rounds1 = selection_rounds(&d.base);
    let (t0, c0) = start.expect("started before finishing");
    let span = end.duration_since(t0).as_secs_f64();
    d.shutdown().expect("daemon shutdown");
    // The daemon's threads: engine, responses, labels, checkpoint writer, librdkafka's, and the
    // tokio/rayon workers (HTTP; the parallel linear algebra of selection rounds).
    let cpu = thread_delta(&times0, &times1, |_, name| {
        name.starts_with("armd-") || name.starts_with("rdk:") || name.starts_with("tokio-rt")
    });
    // Share of the window each thread ran, and waited runnable: near 100 % together is the limit.
    let busy: Vec<String> = cpu
        .iter()
        .filter(|(_, &(run, _))| run > 0.01 * span)
        .map(|(name, &(run, wait))| {
            format!(
                "{name} {:.0}% (+{:.0}% waiting for a CPU)",
                100.0 * run / span,
                100.0 * wait / span
            )
        })
        .collect();
    eprintln!(
        "  armd threads busy: {}; selection rounds in the window: {} ({:.2} s)",
        busy.join(", "),
        rounds1.0 - rounds0.0,
        rounds1.1 - rounds0.1
    );
    Rate {
        msgs_per_s: (n as f64 - c0) / span,
        span_s: span,
        cpu_us_per_msg: cpu.values().map(|c| c.0).sum::<f64>() * 1e6 / (n as f64 - c0),
    }
}

fn ingest(bootstrap: &str) {
    let target_mb: f64 = env_or("ARMD_BENCH_INGEST_MB", 1000.0);
    let repeats: usize = env_or("ARMD_BENCH_REPEATS", 5);
    println!("\n## ingest (payload {target_mb} MB per case, {repeats} repeats)\n");
    println!("load before: {}", uptime());
    println!("| d | encoding | N | bytes/msg | run | raw msgs/s | raw MB/s | armd default msgs/s | ratio | armd no-rounds msgs/s | ratio | CPU µs/msg raw / default / no-rounds | spans s raw / default / no-rounds | steal % |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Consumer groups (and static member ids) unique to this run.
    let tag = std::process::id();
    let mut case = 0;
    let mut summary: std::collections::BTreeMap<String, Vec<[f64; 7]>> = Default::default();
    for d in [768usize, 2048] {
        for (name, b64) in [("json", false), ("base64", true)] {
            case += 1;
            let id = format!("{d}-{name}");
            if let Ok(only) = std::env::var("ARMD_BENCH_INGEST_CASES") {
                if !only.split(',').any(|c| c.trim() == id) {
                    continue;
                }
            }
            let t = create_topics(bootstrap, &format!("ingest-{d}-{name}"));
            let one = response_payload(0, &vec![21.234_567_f32; d], b64).len() as f64;
            let n = ((target_mb * 1e6 / one) as usize).max(1000);
            let t_prod = Instant::now();
            let bytes = produce_responses(bootstrap, &t.responses, n, d, b64);
            let per_msg = bytes as f64 / n as f64;
            // Let the kernel write the new log segments back before measuring: right after a 1 GB
            // produce, writeback competes with the first consumers (raw rates halved in repeat 1–2).
            let _ = std::process::Command::new("sync").status();
            eprintln!(
                "ingest d={d} {name}: produced {n} messages ({:.0} MB) in {:.1} s",
                bytes as f64 / 1e6,
                t_prod.elapsed().as_secs_f64()
            );
            for run in 1..=repeats {
                let ticks = cpu_ticks();
                let raw = raw_consume(bootstrap, &t, d, n, &format!("raw-{tag}-{case}-{run}"));
                let mut rates = Vec::new();
                for (label, extra) in [
                    ("default", &[][..]),
                    (
                        "no-rounds",
                        &[("ARMD__SELECTION__ROUND_INTERVAL_MS", "3600000")][..],
                    ),
                ] {
                    if std::env::var("ARMD_BENCH_INGEST_CONFIGS")
                        .is_ok_and(|only| !only.split(',').any(|c| c.trim() == label))
                    {
                        rates.push(Rate {
                            msgs_per_s: f64::NAN,
                            span_s: f64::NAN,
                            cpu_us_per_msg: f64::NAN,
                        });
                        continue;
                    }
                    let state = tempfile::tempdir().expect("temp dir");
                    let group = format!("armd-{tag}-{case}-{run}-{label}");
                    let mut env = vec![("ARMD__DAEMON__INSTANCE_ID", group.as_str())];
                    env.extend_from_slice(extra);
                    let cfg = default_config(bootstrap, &t, state.path(), d, &group, &env);
                    rates.push(armd_ingest(cfg, n));
                }
                let steal = steal_percent(ticks, cpu_ticks());
                println!(
                    "| {d} | {name} | {n} | {per_msg:.0} | {run} | {:.0} | {:.1} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} / {:.1} / {:.1} | {:.2} / {:.1} / {:.1} | {steal:.0} |",
                    raw.msgs_per_s,
                    raw.msgs_per_s * per_msg / 1e6,
                    rates[0].msgs_per_s,
                    rates[0].msgs_per_s / raw.msgs_per_s,
                    rates[1].msgs_per_s,
                    rates[1].msgs_per_s / raw.msgs_per_s,
                    raw.cpu_us_per_msg,
                    rates[0].cpu_us_per_msg,
                    rates[1].cpu_us_per_msg,
                    raw.span_s,
                    rates[0].span_s,
                    rates[1].span_s,
                );
                let row = summary.entry(id.clone()).or_default();
                row.push([
                    raw.msgs_per_s,
                    rates[0].msgs_per_s,
                    rates[1].msgs_per_s,
                    raw.cpu_us_per_msg,
                    rates[0].cpu_us_per_msg,
                    rates[1].cpu_us_per_msg,
                    steal,
                ]);
            }
            common::delete_topics(bootstrap, &t);
        }
    }
    println!("\nload after: {}", uptime());
    // The rates of one case move with the broker and the scheduler from one repeat to the next (raw
    // spans are under a second): the summary gives medians over the repeats, and the ratios per repeat
    // (each raw run next to the armd runs that follow it) as median and range.
    println!("\nsummary (medians over {repeats} repeats; ratio = armd / raw of the same repeat: median, min–max)\n");
    println!("| case | raw msgs/s | armd default msgs/s | ratio | armd no-rounds msgs/s | ratio | CPU µs/msg raw / default / no-rounds | steal % |");
    println!("|---|---|---|---|---|---|---|---|");
    for (id, rows) in &summary {
        let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        let ratios = |i: usize| median_range(rows.iter().map(|r| r[i] / r[0]).collect());
        println!(
            "| {id} | {:.0} | {:.0} | {} | {:.0} | {} | {:.1} / {:.1} / {:.1} | {:.0} |",
            col(0),
            col(1),
            ratios(1),
            col(2),
            ratios(2),
            col(3),
            col(4),
            col(5),
            col(6)
        );
    }
}

/// Median (mean of the middle two for an even count; NaN for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `**median** (min–max)` of ratios, for the summary tables.
fn median_range(v: Vec<f64>) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    format!("**{:.2}** ({lo:.2}–{hi:.2})", median(v))
}

// ------------------------------------------------------------------------------------------------
// 2. Label → posterior-updated delay

/// Captures `apply_delay_ms` of the engine's `label applied` debug events (exact per-label delays).
struct DelayCapture {
    values: Arc<Mutex<Vec<f64>>>,
    recording: Arc<AtomicBool>,
}

struct DelayField(Option<f64>);

impl tracing::field::Visit for DelayField {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "apply_delay_ms" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DelayCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let mut f = DelayField(None);
        event.record(&mut f);
        if let Some(v) = f.0 {
            self.values
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(v);
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    // Nearest rank.
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn label_delay(bootstrap: &str, values: &Arc<Mutex<Vec<f64>>>, recording: &Arc<AtomicBool>) {
    let d = 2048;
    let secs: u64 = env_or("ARMD_BENCH_DELAY_SECS", 45);
    let rate: u64 = env_or("ARMD_BENCH_DELAY_RATE", 500);
    let warm = Duration::from_secs(12);
    println!(
        "\n## label_delay (d = {d}, default config, responses at {rate}/s base64, {secs} s, first {} s not measured)\n",
        warm.as_secs()
    );
    println!("load before: {}", uptime());
    let t = create_topics(bootstrap, "label-delay");
    let state = tempfile::tempdir().expect("temp dir");
    let cfg = default_config(
        bootstrap,
        &t,
        state.path(),
        d,
        &format!("armd-delay-{}", std::process::id()),
        &[("ARMD__DAEMON__INSTANCE_ID", "armd-delay")],
    );
    let mut world = World::new(d, 11);
    let golden = world.golden.clone();
    // Steady response stream (base64), paced to `rate` per second, 8 responses per prompt.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let streamer = {
        let (bootstrap, topic, stop, produced) = (
            bootstrap.to_string(),
            t.responses.clone(),
            stop.clone(),
            produced.clone(),
        );
        std::thread::spawn(move || {
            let p = common::producer(&bootstrap);
            let started = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for s in world.prompts(1, 8) {
                    let payload = serde_json::json!({
                        "schema": "armd.response.v1",
                        "prompt_id": format!("p{}", s.prompt),
                        "response_id": s.response_id,
                        "embedding_b64": encode_f32_b64(&s.x),
                    })
                    .to_string();
                    common::send(&p, &topic, &format!("p{}", s.prompt), payload.as_bytes());
                    i += 1;
                }
                p.poll(Duration::ZERO);
                produced.store(i, Ordering::Relaxed);
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let _ = p.flush(Duration::from_secs(30));
        })
    };
    let daemon = start_in_process(cfg).wait_ready(Duration::from_secs(90));
    let mut annotator = Annotator::start(bootstrap, &t.requests, &t.labels, golden, 1.0);
    std::thread::sleep(warm);
    values.lock().unwrap().clear();
    recording.store(true, Ordering::Relaxed);
    let measured_from = Instant::now();
    let base = daemon.base.clone();
    let (mut pool_min, mut pool_max) = (f64::INFINITY, 0.0f64);
    while measured_from.elapsed() < Duration::from_secs(secs.saturating_sub(warm.as_secs())) {
        if let Some(v) = scrape(&base, "armd_pool_responses") {
            pool_min = pool_min.min(v);
            pool_max = pool_max.max(v);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    recording.store(false, Ordering::Relaxed);
    let text = get(&format!("{base}/metrics"))
        .map(|(_, t)| t)
        .unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    streamer.join().expect("streamer");
    annotator.stop();
    let labels_sent = annotator.sent();
    daemon.shutdown().expect("daemon shutdown");
    let mut v = values.lock().unwrap().clone();
    v.sort_by(f64::total_cmp);
    let m = |s: &str| metric(&text, s).unwrap_or(f64::NAN);
    let rounds = m("armd_selection_rounds_total");
    let round_mean =
        m("armd_selection_duration_seconds_sum") / m("armd_selection_duration_seconds_count");
    let update_mean =
        m("armd_update_duration_seconds_sum") / m("armd_update_duration_seconds_count");
    println!(
        "responses produced {} ({:.0}/s), labels sent {labels_sent}, labels measured {}, pool {pool_min:.0}..{pool_max:.0}",
        produced.load(Ordering::Relaxed),
        produced.load(Ordering::Relaxed) as f64 / secs as f64,
        v.len()
    );
    println!(
        "selection rounds {rounds} (mean {:.3} s), one-label update mean {:.2} ms (whole run, from /metrics)",
        round_mean,
        update_mean * 1e3
    );
    if v.is_empty() {
        println!("no label was applied during the measured window");
    } else {
        println!("| labels | p50 ms | p90 ms | p99 ms | max ms | mean ms |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            v.len(),
            quantile(&v, 0.5),
            quantile(&v, 0.9),
            quantile(&v, 0.99),
            v[v.len() - 1],
            v.iter().sum::<f64>() / v.len() as f64
        );
    }
    println!("load after: {}", uptime());
}

// ------------------------------------------------------------------------------------------------
// 3. Selection round at the default configuration

/// Engine state at the default configuration (dimension `d`, strategy `strategy`) with the pool filled
/// to its capacity; `refit_every = 0` so no background refit competes for the cores.
struct RoundBench {
    engine: Engine,
    rng: StdRng,
    next: usize,
    offset: i64,
    now: i64,
}

impl RoundBench {
    fn new(d: usize, strategy: &str) -> Self {
        let dim = d.to_string();
        let cfg = Config::from_toml_with_env(
            DEFAULT_CONFIG,
            &[
                ("ARMD__MODEL__DIM", &dim),
                ("ARMD__MODEL__REFIT_EVERY", "0"),
                ("ARMD__SELECTION__STRATEGY", strategy),
            ],
        )
        .expect("default configuration");
        let engine = Engine::new(Arc::new(cfg), Telemetry::new().metrics, None).expect("engine");
        let mut b = RoundBench {
            engine,
            rng: StdRng::seed_from_u64(5),
            next: 0,
            offset: 0,
            now: 1_000_000,
        };
        b.refill();
        b
    }

    fn refill(&mut self) {
        let d = self.engine.posterior().dim();
        while self.engine.pool_len() < 4096 {
            let i = self.next;
            self.next += 1;
            let r = Response {
                prompt_id: format!("p{}", i / 8).into(),
                response_id: format!("p{}-r{}", i / 8, i % 8).into(),
                embedding: (0..d)
                    .map(|_| 20.0 + 4.0 * self.rng.random_range(-1.0f32..1.0))
                    .collect(),
                metadata: None,
            };
            self.engine.on_response(r, self.now);
            self.engine.adopt_own_proposal(self.now);
        }
    }

    /// Labels every request of the last round (so the in-flight budget stays free) and refills the pool.
    fn settle(&mut self) {
        for o in self.engine.take_outputs() {
            if let Output::Request(r) = o {
                let y = if self.rng.random::<bool>() { 1.0 } else { 0.0 };
                let pos = SourcePosition {
                    topic: "labels".into(),
                    partition: 0,
                    offset: self.offset,
                };
                self.offset += 1;
                let label = LabelMsg {
                    request_id: r.request_id.clone(),
                    y,
                    annotator_id: None,
                };
                self.engine.on_label(
                    LabelInput {
                        decoded: Ok(label),
                        payload: None,
                        pos,
                        timestamp_ms: self.now,
                        read_at_ms: self.now,
                    },
                    self.now,
                );
            }
        }
        self.refill();
    }
}

/// The select call alone on a pool of the same size (N = 4096, 20,000 cross pairs, k = 8): greedy-dopt vs
/// the paper's naive D-optimal rule (materialised candidate Fisher matrix).
struct SelectOnly {
    posterior: Posterior,
    x: Mat<f64>,
    pairs: Vec<armd::candidates::Pair>,
}

impl SelectOnly {
    fn new(d: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(9);
        let mut posterior = Posterior::new(d, 1.0).expect("posterior");
        for _ in 0..64 {
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            posterior
                .update(&v, f64::from(rng.random::<bool>()))
                .expect("update");
        }
        let x = Mat::<f64>::from_fn(d, 4096, |_, _| rng.random_range(-2.0..2.0));
        let prompts: Vec<u64> = (0..4096u64).map(|i| i / 8).collect();
        let opts = armd::candidates::CandidateOptions {
            mode: armd::candidates::CandidateMode::Cross,
            max_cross_pairs: 20_000,
            max_within_pairs: 20_000,
        };
        let pairs = armd::candidates::generate(&prompts, &opts, &mut rng);
        Self {
            posterior,
            x,
            pairs,
        }
    }
    fn input(&self) -> SelectionInput<'_> {
        SelectionInput {
            posterior: &self.posterior,
            embeddings: self.x.as_ref(),
            candidates: &self.pairs,
            in_flight: &[],
            k: 8,
            targets: &[],
            uses_left: &[],
        }
    }
}

fn rounds(c: &mut Criterion) {
    let mut g = c.benchmark_group("round");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    eprintln!("round: load {}", uptime());
    for d in [768usize, 2048] {
        for strategy in ["greedy-dopt", "random"] {
            let mut b = RoundBench::new(d, strategy);
            g.bench_function(BenchmarkId::new(format!("engine_{strategy}"), d), |bench| {
                bench.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        b.settle();
                        let started = Instant::now();
                        let issued = b.engine.run_round(b.now).expect("round");
                        total += started.elapsed();
                        // Up to batch_size: a pick reusing a response of an earlier pick is dropped.
                        assert!((1..=8).contains(&issued), "round issued {issued} requests");
                    }
                    total
                })
            });
            // The posterior whitens with its low-rank form while fewer than d/8 labels are stored
            // (`armd::posterior::Whitener`): say which regime the samples ran in.
            eprintln!(
                "round: engine_{strategy}/{d} ended with {} stored labels (low-rank whitening below {})",
                b.engine.posterior().label_count(),
                d.div_ceil(8)
            );
        }
        let s = SelectOnly::new(d);
        let params = SelectionParams::default();
        g.bench_function(BenchmarkId::new("select_greedy-dopt", d), |bench| {
            bench.iter(|| {
                let mut rng = StdRng::seed_from_u64(0);
                std::hint::black_box(
                    selection::select(StrategyKind::GreedyDopt, s.input(), &params, &mut rng)
                        .expect("select"),
                )
            })
        });
        if d == 768 {
            // At d = 2048 the naive rule's 20,000 materialised differences and their Fisher products take
            // minutes per round; it is compared at 768 only.
            g.bench_function(BenchmarkId::new("select_dopt_naive", d), |bench| {
                bench.iter(|| {
                    let mut round = Round::new(s.input()).expect("round");
                    std::hint::black_box(dopt::dopt_naive(&mut round, &params).expect("naive"))
                })
            });
        }
    }
    g.finish();
    eprintln!("round: load {}", uptime());
}

// ------------------------------------------------------------------------------------------------
// 4. Ingest with 1, 2 and 3 instances

/// Responses partitions of `ingest_instances`: 6, so that 1, 2 and 3 members each get an equal share
/// (librdkafka's default range assignor: 6, 3 and 2 partitions per member).
const INSTANCE_PARTITIONS: i32 = 6;

/// CPU seconds (user + system) of process `pid` so far, exited threads included (from /proc/PID/stat,
/// in clock ticks of 10 ms; the kernel scales their sum to the precise runtime). `None` if unavailable.
fn process_cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the 3rd field, utime the 14th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ
}

/// CPU seconds of the consuming side so far: this process minus its main thread (the bench's sampling
/// loop, which scrapes on that thread).
fn consumers_cpu_s() -> f64 {
    let pid = std::process::id();
    let main = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9);
    process_cpu_s("self").unwrap_or(f64::NAN) - main
}

/// `armd_responses_accepted_total` and `armd_selection_rounds_total` of the daemon at `base`, fetched on
/// this thread (plain HTTP/1.0, so the bench's own scraping stays on the main thread and out of the
/// measured CPU; the daemon renders the exposition on one of its tokio workers, which counts).
fn scrape_accepted(base: &str) -> Option<(f64, f64)> {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    Some((
        metric(body, "armd_responses_accepted_total")?,
        metric(body, "armd_selection_rounds_total").unwrap_or(0.0),
    ))
}

/// One reading of a group's members: per-member message counts and the consuming side's CPU seconds.
struct Sample {
    t: Instant,
    counts: Vec<f64>,
    /// Selection rounds run by each member so far (zeros for raw consumers).
    rounds: Vec<f64>,
    cpu_s: f64,
    broker_cpu_s: f64,
}

/// A group's aggregate consume rate.
struct GroupRate {
    /// Messages per second over the window where every member was consuming: from the first reading
    /// where all members had counted a message (the group's last rebalance is behind it) and had run all
    /// the selection rounds they would (with rounds held off, each armd instance runs one early round on
    /// a small pool), to the reading before the first member reached its final count.
    msgs_per_s: f64,
    window_s: f64,
    /// Share of all messages counted inside that window.
    window_share: f64,
    /// Messages per second from the first reading with a message to the one with all of them (start-up
    /// rebalances and the uneven tail included).
    whole_msgs_per_s: f64,
    /// CPU time of the consuming side per message in the window (µs), and the broker's (NaN if unknown).
    cpu_us_per_msg: f64,
    broker_cpu_us_per_msg: f64,
    /// Messages counted by each member.
    split: Vec<f64>,
    /// Selection rounds run by all members.
    rounds: f64,
    /// armd: CPU µs per message by thread kind over the whole run (empty for raw consumers).
    breakdown: String,
}

fn group_rate(samples: &[Sample]) -> GroupRate {
    let sum = |s: &Sample| s.counts.iter().sum::<f64>();
    let last = samples.last().expect("samples");
    let total = sum(last);
    let first_any = samples
        .iter()
        .position(|s| sum(s) > 0.0)
        .expect("a message");
    let first_all = samples
        .iter()
        .position(|s| s.counts.iter().all(|&c| c > 0.0) && s.rounds == last.rounds)
        .unwrap_or(first_any);
    // The reading before the first member stopped counting.
    let first_done = (0..last.counts.len())
        .map(|i| {
            samples
                .iter()
                .position(|s| s.counts[i] >= last.counts[i])
                .unwrap_or(samples.len() - 1)
        })
        .min()
        .unwrap_or(samples.len() - 1);
    let (a, b) = if first_done > first_all + 1 {
        (&samples[first_all], &samples[first_done - 1])
    } else {
        (&samples[first_any], last)
    };
    let msgs = sum(b) - sum(a);
    let window = b.t.duration_since(a.t).as_secs_f64();
    let all_end = samples
        .iter()
        .position(|s| sum(s) >= total)
        .unwrap_or(samples.len() - 1);
    let s0 = &samples[first_any];
    GroupRate {
        msgs_per_s: msgs / window,
        window_s: window,
        window_share: msgs / total,
        whole_msgs_per_s: (total - sum(s0)) / samples[all_end].t.duration_since(s0.t).as_secs_f64(),
        cpu_us_per_msg: (b.cpu_s - a.cpu_s) * 1e6 / msgs,
        broker_cpu_us_per_msg: (b.broker_cpu_s - a.broker_cpu_s) * 1e6 / msgs,
        split: last.counts.clone(),
        rounds: last.rounds.iter().sum(),
        breakdown: String::new(),
    }
}

/// Broker CPU seconds so far: `ARMD_BENCH_BROKER_PID`, or the pid file of the broker this bench started.
fn broker_cpu_s(pid: Option<&str>) -> f64 {
    pid.and_then(process_cpu_s).unwrap_or(f64::NAN)
}

/// `k` raw consumers (armd's responses-consumer settings, each payload touched as in [`raw_consume`]),
/// each assigned a contiguous 1/k of the partitions from the beginning (the split librdkafka's range
/// assignor gives a group of k; assigned directly, so no group protocol and no rebalance), until they
/// have read `n` messages together.
fn raw_group(
    bootstrap: &str,
    t: &Topics,
    d: usize,
    n: usize,
    k: usize,
    tag: &str,
    broker: Option<&str>,
) -> GroupRate {
    let counters: Vec<Arc<AtomicU64>> = (0..k).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let parts = INSTANCE_PARTITIONS as usize;
    let threads: Vec<_> = (0..k)
        .map(|j| {
            let state = tempfile::tempdir().expect("temp dir");
            let id = format!("{tag}-{j}");
            let cfg = default_config(
                bootstrap,
                t,
                state.path(),
                d,
                tag,
                &[("ARMD__DAEMON__INSTANCE_ID", id.as_str())],
            );
            let consumer = armd::daemon::ingest::consumer(
                &cfg,
                Arc::new(Health::default()),
                Telemetry::new().metrics,
            )
            .expect("raw consumer");
            consumer.unsubscribe();
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in j * parts / k..(j + 1) * parts / k {
                tpl.add_partition_offset(&t.responses, p as i32, rdkafka::Offset::Beginning)
                    .expect("partition");
            }
            consumer.assign(&tpl).expect("assign");
            let (count, stop) = (counters[j].clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("raw-{j}"))
                .spawn(move || {
                    let _state = state;
                    let mut touched = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(100)) {
                            Some(Ok(msg)) => {
                                if let Some(p) = msg.payload() {
                                    touched = touched.wrapping_add(
                                        p.iter().step_by(64).map(|&b| u64::from(b)).sum(),
                                    );
                                }
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Err(e)) => eprintln!("raw consumer error: {e}"),
                            None => {}
                        }
                    }
                    std::hint::black_box(touched);
                })
                .expect("raw consumer thread")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut samples = Vec::new();
    loop {
        let counts: Vec<f64> = counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed) as f64)
            .collect();
        let done = counts.iter().sum::<f64>() >= n as f64;
        samples.push(Sample {
            t: Instant::now(),
            counts,
            rounds: vec![0.0; k],
            cpu_s: consumers_cpu_s(),
            broker_cpu_s: broker_cpu_s(broker),
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "raw ×{k}: not done in 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().expect("raw consumer thread");
    }
    group_rate(&samples)
}

/// `k` armd daemons in-process in one consumer group (distinct instance ids and state directories), no
/// selection rounds, until their `armd_responses_accepted_total` sum to `n` (each scraped every 50 ms).
fn armd_group(
    bootstrap: &str,
    t: &Topics,
    d: usize,
    n: usize,
    k: usize,
    group: &str,
    broker: Option<&str>,
) -> GroupRate {
    let states: Vec<tempfile::TempDir> = (0..k)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let daemons: Vec<_> = states
        .iter()
        .enumerate()
        .map(|(i, state)| {
            let id = format!("{group}-{i}");
            let cfg = default_config(
                bootstrap,
                t,
                state.path(),
                d,
                group,
                &[
                    ("ARMD__DAEMON__INSTANCE_ID", id.as_str()),
                    ("ARMD__SELECTION__ROUND_INTERVAL_MS", "3600000"),
                ],
            );
            start_in_process(cfg)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut samples: Vec<Sample> = Vec::new();
    let (mut counts, mut rounds) = (vec![0.0; k], vec![0.0; k]);
    let mut last_change = Instant::now();
    // Per-thread CPU from the first accepted message to the end (rounds included), for the breakdown.
    let mut times0: Option<(ThreadTimes, f64)> = None;
    loop {
        for (i, dm) in daemons.iter().enumerate() {
            assert!(!dm.finished(), "a daemon stopped while ingesting");
            if let Some((c, r)) = scrape_accepted(&dm.base) {
                (counts[i], rounds[i]) = (c, r);
            }
        }
        let now = Instant::now();
        let total: f64 = counts.iter().sum();
        if times0.is_none() && total > 0.0 {
            times0 = Some((thread_times(), total));
        }
        if samples
            .last()
            .is_some_and(|s| s.counts.iter().sum::<f64>() != total)
        {
            last_change = now;
        }
        samples.push(Sample {
            t: now,
            counts: counts.clone(),
            rounds: rounds.clone(),
            cpu_s: consumers_cpu_s(),
            broker_cpu_s: broker_cpu_s(broker),
        });
        if total >= n as f64 {
            break;
        }
        if total > 0.0 && now.duration_since(last_change) > Duration::from_secs(10) {
            eprintln!(
                "  armd ×{k}: stuck at {total}/{n} accepted for 10 s; measuring what arrived"
            );
            break;
        }
        assert!(Instant::now() < deadline, "armd ×{k}: not done in 600 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let times1 = thread_times();
    for dm in daemons {
        dm.shutdown().expect("daemon shutdown");
    }
    let mut r = group_rate(&samples);
    // CPU per message by thread kind (names without digits), over the whole run.
    if let Some((times0, c0)) = times0 {
        let msgs = r.split.iter().sum::<f64>() - c0;
        let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
        for (name, (run, _)) in thread_delta(&times0, &times1, |tid, _| tid != std::process::id()) {
            let kind: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
            *by_kind.entry(kind).or_default() += run;
        }
        let parts: Vec<String> = by_kind
            .iter()
            .filter(|(_, &run)| run * 1e6 / msgs >= 0.05)
            .map(|(kind, run)| format!("{kind} {:.2}", run * 1e6 / msgs))
            .collect();
        r.breakdown = parts.join(", ");
    }
    r
}

fn ingest_instances(bootstrap: &str, broker_pid: Option<&str>) {
    let target_mb: f64 = env_or("ARMD_BENCH_INSTANCES_MB", 2000.0);
    let repeats: usize = env_or("ARMD_BENCH_REPEATS", 3);
    let max_k: usize = env_or("ARMD_BENCH_INSTANCES_MAX", 3);
    let (d, b64) = (768usize, true);
    println!(
        "\n## ingest_instances (d = {d} base64, {INSTANCE_PARTITIONS} partitions, payload {target_mb} MB, {repeats} repeats, 1..={max_k} members)\n"
    );
    println!("load before: {}", uptime());
    println!(
        "cores: {}; broker CPU: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if broker_pid.is_some() {
            "measured"
        } else {
            "unknown (set ARMD_BENCH_BROKER_PID)"
        }
    );
    let t = common::create_topics_with(bootstrap, "ingest-instances", INSTANCE_PARTITIONS);
    let one = response_payload(0, &vec![21.234_567_f32; d], b64).len() as f64;
    let n = ((target_mb * 1e6 / one) as usize).max(1000);
    let t_prod = Instant::now();
    let bytes = produce_responses(bootstrap, &t.responses, n, d, b64);
    let _ = std::process::Command::new("sync").status();
    println!(
        "produced {n} messages ({:.0} MB, {:.0} bytes/msg) in {:.1} s",
        bytes as f64 / 1e6,
        bytes as f64 / n as f64,
        t_prod.elapsed().as_secs_f64()
    );
    println!("\nper measurement: rate = messages per second while every member consumed, after the last rebalance and selection round (window); ratio ×1 = over raw ×1 of the same repeat, ratio ×k = over raw with as many consumers; CPU = this process (all consuming threads, librdkafka's included), per message in the window; per core = 1 / CPU per message; cores = rate × CPU per message\n");
    println!("| run | members | rate msgs/s | per member msgs/s | ratio ×1 | ratio ×k | whole-run msgs/s | window s (share) | CPU µs/msg | msgs/s per core | cores busy | broker CPU µs/msg | split (messages per member) | rounds | steal % |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let tag = std::process::id();
    let mut notes = Vec::new();
    // (config, members) → per repeat: rate, ratio ×1, ratio ×k, CPU µs/msg, broker µs/msg, whole rate, steal.
    let mut summary: std::collections::BTreeMap<(u8, usize), Vec<[f64; 7]>> = Default::default();
    for run in 1..=repeats {
        let mut raw1 = f64::NAN;
        for k in 1..=max_k {
            let mut rawk = f64::NAN;
            for (config, label) in [(0u8, "raw"), (1u8, "armd")] {
                let ticks = cpu_ticks();
                let r = if config == 0 {
                    raw_group(
                        bootstrap,
                        &t,
                        d,
                        n,
                        k,
                        &format!("raw-{tag}-{run}-{k}"),
                        broker_pid,
                    )
                } else {
                    armd_group(
                        bootstrap,
                        &t,
                        d,
                        n,
                        k,
                        &format!("armd-{tag}-{run}-{k}"),
                        broker_pid,
                    )
                };
                let steal = steal_percent(ticks, cpu_ticks());
                if config == 0 {
                    rawk = r.msgs_per_s;
                    if k == 1 {
                        raw1 = r.msgs_per_s;
                    }
                }
                let split: Vec<String> = r.split.iter().map(|c| format!("{c:.0}")).collect();
                let (lo, hi) = r
                    .split
                    .iter()
                    .fold((f64::INFINITY, 0.0f64), |(lo, hi), &c| {
                        (lo.min(c), hi.max(c))
                    });
                if hi > 1.5 * lo {
                    notes.push(format!(
                        "run {run}, {label} ×{k}: uneven split (members joined after the first assignment? \
                         see group.initial.rebalance.delay.ms in the module doc)"
                    ));
                }
                if !r.breakdown.is_empty() {
                    notes.push(format!("run {run}, armd ×{k}: {}", r.breakdown));
                }
                println!(
                    "| {run} | {label} ×{k} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} ({:.0}%) | {:.2} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {steal:.0} |",
                    r.msgs_per_s,
                    r.msgs_per_s / k as f64,
                    r.msgs_per_s / raw1,
                    r.msgs_per_s / rawk,
                    r.whole_msgs_per_s,
                    r.window_s,
                    100.0 * r.window_share,
                    r.cpu_us_per_msg,
                    1e6 / r.cpu_us_per_msg,
                    r.msgs_per_s * r.cpu_us_per_msg / 1e6,
                    r.broker_cpu_us_per_msg,
                    split.join(" / "),
                    r.rounds,
                );
                summary.entry((config, k)).or_default().push([
                    r.msgs_per_s,
                    r.msgs_per_s / raw1,
                    r.msgs_per_s / rawk,
                    r.cpu_us_per_msg,
                    r.broker_cpu_us_per_msg,
                    r.whole_msgs_per_s,
                    steal,
                ]);
            }
        }
    }
    common::delete_topics(bootstrap, &t);
    println!("\nnotes; armd CPU µs per message by thread (names without digits; whole run from the first accepted message, the early round included):\n");
    for n in &notes {
        println!("- {n}");
    }
    println!("\nload after: {}", uptime());
    println!("\nsummary (medians over {repeats} repeats; ratios per repeat: median, min–max; per core = 1 / median CPU per message)\n");
    println!("| members | rate msgs/s | per member msgs/s | ratio ×1 | ratio ×k | whole-run msgs/s | CPU µs/msg | msgs/s per core | broker CPU µs/msg | steal % |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ((config, k), rows) in &summary {
        let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        let ratio = |i: usize| median_range(rows.iter().map(|r| r[i]).collect());
        println!(
            "| {} ×{k} | {:.0} | {:.0} | {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            if *config == 0 { "raw" } else { "armd" },
            col(0),
            col(0) / *k as f64,
            ratio(1),
            ratio(2),
            col(5),
            col(3),
            1e6 / col(3),
            col(4),
            col(6),
        );
    }
}

// ------------------------------------------------------------------------------------------------

fn main() {
    // Positional arguments (not flags) filter the parts, like criterion's own filter.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted =
        |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f.as_str()));

    let values = Arc::new(Mutex::new(Vec::new()));
    let recording = Arc::new(AtomicBool::new(false));
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let capture = DelayCapture {
            values: values.clone(),
            recording: recording.clone(),
        }
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("armd::daemon::engine", tracing::Level::DEBUG),
        );
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ));
        let _ = tracing_subscriber::registry()
            .with(capture)
            .with(log)
            .try_init();
    }

    // `-- ingest` alone keeps meaning part 1.
    let wanted_instances = filters.is_empty()
        || filters
            .iter()
            .any(|f| f != "ingest" && "ingest_instances".contains(f.as_str()));
    if wanted("ingest") || wanted_instances || wanted("label_delay") {
        match bench_broker() {
            Err(why) => println!(
                "SKIPPED ingest, ingest_instances and label_delay: no Kafka broker ({why}). Set ARMD_BENCH_BROKERS=host:port \
                 or make `.ci/kafka.sh start` work (Java + the jars from `.ci/kafka.sh fetch`)."
            ),
            Ok(broker) => {
                println!("broker {}", broker.bootstrap);
                if wanted("ingest") {
                    ingest(&broker.bootstrap);
                }
                if wanted_instances {
                    ingest_instances(&broker.bootstrap, broker.pid().as_deref());
                }
                if wanted("label_delay") {
                    label_delay(&broker.bootstrap, &values, &recording);
                }
            }
        }
    }
    if wanted("round") {
        let mut c = Criterion::default().configure_from_args();
        rounds(&mut c);
        c.final_summary();
    }
}
