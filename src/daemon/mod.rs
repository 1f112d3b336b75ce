//! `armd run`: the Kafka daemon.
//!
//! ```text
//! responses ─► ingest thread ─(decode)─► ┐                         ┌─► requests topic
//!                       └─► dead letters │ bounded channel          ├─► labels topic (scaler proposal)
//! labels ────► labels thread ─(decode)─► ┼─► engine thread ─────────┼─► models topic, model.npy/json
//! requests ──► requests thread ────────► ┘   (pool, ledger,         ├─► dead letters
//!   (every instance's)                        posterior, selection)  └─► checkpoint file
//! HTTP (tokio): /metrics /healthz /readyz
//! ```
//!
//! Modules:
//! - [`config`]: TOML + `ARMD__SECTION__KEY` overrides → validated [`config::Config`].
//! - [`messages`]: wire schemas (`armd.<kind>.v1`) and decoders with stable rejection reasons.
//! - [`engine`]: the single owner of model state (pool, in-flight requests, posterior, refits); pure logic.
//! - [`ledger`]: the group's requests in flight and closed, and the rules of the label join, expiry and
//!   recovery.
//! - [`learner`]: the feature scaler, the posterior and its update, refits and consolidation.
//! - [`pool`]: the bounded candidate pool.
//! - [`checkpoint`]: the atomic, versioned, checksummed state file; exactly-once for labels.
//! - [`export`]: `.npy` + JSON model files.
//! - [`kafka`], [`ingest`], [`labels`], [`requests`], [`recovery`], [`driver`]: thin Kafka I/O around
//!   the engine; [`input`] is what the consumer threads send the engine thread.
//! - [`http`], [`telemetry`]: the HTTP endpoints, the metric catalogue and logging.
//! - [`topics`]: `armd topics create` (the topics, their partitions and retention).
//! - [`alloc`]: glibc malloc tuning: large blocks always on mmap, so freed round matrices leave RSS.
//!
//! **Exactly-once labels.** The labels consumer has no group management; its positions are stored in the
//! same atomic checkpoint as the posterior they produced, and on start it is assigned at exactly those
//! positions. Each label message advances its partition's position in the engine whether it is applied
//! or rejected. Whatever happens between two checkpoints (crash, `kill -9`) is replayed from the topic
//! onto the checkpointed posterior, and replay is deterministic: label expiry is judged from the label's
//! Kafka timestamp and refits snapshot at fixed label counts (see [`engine`]).
//!
//! **Requests of the whole group, and recovery after a crash**: see [`recovery`] and [`requests`].
//!
//! **Several instances: one model.** Each instance needs its own `daemon.instance_id` and
//! `checkpoint.path`. They share the responses consumer group, so each pools (and selects from) its own
//! share of the responses partitions. Every instance reads *all* of the requests topic ([`requests`]) and
//! *all* of the labels topic and applies every label, in the labels topic's order, so every instance
//! holds the same posterior; the feature scaling is the group's (the first `armd.scaler.v1` proposal on
//! the labels topic, see [`engine`]); selection conditions on every instance's open requests. See
//! docs/design.md §7.5.
//!
//! **Shutdown** (the future passed to [`run`] resolves, e.g. on SIGTERM/SIGINT): `/readyz` turns 503,
//! the consumers stop fetching, the engine drains what they delivered, exports the model, flushes the
//! producer, writes the final checkpoint and commits, then `run` returns `Ok(())`.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod driver;
pub mod engine;
pub mod export;
pub mod http;
pub mod ingest;
pub mod input;
pub mod kafka;
pub mod labels;
pub mod learner;
pub mod ledger;
pub mod messages;
pub mod pool;
pub mod recovery;
pub mod requests;
pub mod telemetry;
pub mod topics;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;

use self::checkpoint::Checkpoint;
use self::config::Config;
use self::driver::Driver;
use self::engine::Engine;
use self::kafka::{Health, Publisher};
use self::telemetry::Telemetry;

/// Depth of the channel from the consumer threads to the engine thread, in messages (a label, or a batch
/// of up to `ingest::RESPONSE_BATCH` responses): bounds the responses buffered ahead of the engine to
/// 8192, about 64 MB of embeddings at d = 2048.
const INPUT_QUEUE: usize = 8192 / ingest::RESPONSE_BATCH;

/// Binds `http.listen` and runs the daemon until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let listener = TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("cannot listen on {} (http.listen)", cfg.http.listen))?;
    run_with_listener(cfg, listener, shutdown).await
}

/// Runs the daemon with an already bound HTTP listener (tests bind `127.0.0.1:0`).
pub async fn run_with_listener(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let cfg = Arc::new(cfg);
    let telemetry = Telemetry::new();
    let metrics = telemetry.metrics.clone();
    let health = Arc::new(Health::default());
    let stop = Arc::new(AtomicBool::new(false));
    let addr = listener.local_addr()?;

    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(http::serve(
        listener,
        telemetry.handle(),
        health.clone(),
        cfg.daemon.liveness_timeout,
        async move {
            let _ = http_stop_rx.await;
        },
    ));
    tracing::info!(%addr, "http listening (/metrics, /healthz, /readyz)");

    let mut shutdown = std::pin::pin!(shutdown);
    // Start-up runs on a blocking thread (file and broker I/O); a shutdown request interrupts it.
    let startup = {
        let (cfg, metrics, health, stop) =
            (cfg.clone(), metrics.clone(), health.clone(), stop.clone());
        tokio::task::spawn_blocking(move || start(cfg, metrics, health, stop))
    };
    let mut startup = std::pin::pin!(startup);
    let started = tokio::select! {
        r = &mut startup => Some(r.context("start-up task panicked")?),
        () = &mut shutdown => None,
    };
    let parts = match started {
        Some(r) => r,
        None => {
            tracing::info!("shutdown requested during start-up");
            stop.store(true, Ordering::Relaxed);
            health.shutting_down.store(true, Ordering::Relaxed);
            // Let start-up notice the stop flag; its result no longer matters unless it failed oddly.
            let _ = startup.await;
            let _ = http_stop_tx.send(());
            let _ = http.await;
            return Ok(());
        }
    };
    let parts = match parts {
        Ok(p) => p,
        Err(e) => {
            let _ = http_stop_tx.send(());
            let _ = http.await;
            return Err(e);
        }
    };
    health.mark_started();
    tracing::info!(
        labels_applied = parts.driver.engine.posterior().labels_applied(),
        "armd running"
    );

    let Started {
        driver,
        ingest,
        labels,
        requests,
    } = parts;
    let engine_thread = std::thread::Builder::new()
        .name("armd-engine".into())
        .spawn(move || driver.run())
        .context("cannot start the engine thread")?;

    // Until shutdown is requested, watch the worker threads: one that ended or stalled is fatal.
    let timeout = cfg.daemon.liveness_timeout;
    let failure = {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                () = &mut shutdown => break None,
                _ = tick.tick() => {
                    if let Some(why) = worker_failure(&engine_thread, &[&ingest, &labels, &requests], &health, timeout) {
                        break Some(why);
                    }
                }
            }
        }
    };
    if let Some(why) = failure {
        return die(why, engine_thread, &health, &stop, http_stop_tx, http).await;
    }
    tracing::info!("shutting down: stopping consumers, finishing the round, checkpointing");
    health.shutting_down.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let joined = tokio::task::spawn_blocking(move || {
        let _ = ingest.join();
        let _ = labels.join();
        let _ = requests.join();
        engine_thread.join()
    })
    .await
    .context("shutdown task panicked")?;
    let _ = http_stop_tx.send(());
    let _ = http.await;
    // Keep the registry alive until the HTTP server is gone.
    drop(telemetry);
    match joined {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the engine thread panicked"),
    }
}

/// How long a dying daemon keeps answering `/healthz` 503 before it exits, so a probe or a person sees why.
const DYING_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the daemon cannot go on, if it cannot: a worker thread ended (only the shutdown ends them) or has
/// not iterated for `timeout`.
fn worker_failure(
    engine: &std::thread::JoinHandle<Result<()>>,
    consumers: &[&std::thread::JoinHandle<()>],
    health: &Health,
    timeout: std::time::Duration,
) -> Option<String> {
    if engine.is_finished() {
        return Some("the engine thread ended".into());
    }
    if let Some(t) = consumers.iter().find(|t| t.is_finished()) {
        return Some(format!(
            "the {} thread ended",
            t.thread().name().unwrap_or("consumer")
        ));
    }
    health
        .stalled(timeout)
        .first()
        .map(|w| format!("the {} thread has not iterated for {timeout:?}", w.name()))
}

/// A worker thread failed: report it on `/healthz`, stop what can stop, and return the error (armd exits
/// non-zero). Nothing is written: the last checkpoint and the labels topic restore the state on restart,
/// exactly as after a crash.
async fn die(
    why: String,
    engine: std::thread::JoinHandle<Result<()>>,
    health: &Health,
    stop: &AtomicBool,
    http_stop_tx: tokio::sync::oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<()> {
    let detail = if engine.is_finished() {
        match engine.join() {
            Err(panic) => format!(
                ": panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            ),
            Ok(Err(e)) => format!(": {e:#}"),
            Ok(Ok(())) => String::new(),
        }
    } else {
        String::new()
    };
    let why = format!("{why}{detail}");
    tracing::error!(reason = %why, "a worker thread failed; exiting non-zero so that armd is restarted (labels since the last checkpoint are replayed)");
    health.set_fatal(why.clone());
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(DYING_LINGER).await;
    let _ = http_stop_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), http).await;
    anyhow::bail!("{why}")
}

struct Started {
    driver: Driver,
    ingest: std::thread::JoinHandle<()>,
    labels: std::thread::JoinHandle<()>,
    requests: std::thread::JoinHandle<()>,
}

/// Loads the checkpoint, connects to Kafka, recovers requests, positions the labels consumer and starts
/// the consumer threads (blocking).
fn start(
    cfg: Arc<Config>,
    metrics: Arc<telemetry::Metrics>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
) -> Result<Started> {
    let path = &cfg.checkpoint.path;
    // A crash during a checkpoint or export write leaves its temporary file behind.
    let mut stale = checkpoint::remove_stale_temp_files(path)?;
    if let Some(dir) = &cfg.export.dir {
        stale += export::remove_stale_temp_files(dir)?;
    }
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temporary files of writes interrupted by a crash"
        );
    }
    let checkpoint = Checkpoint::read(path)?;
    let fresh = checkpoint.is_none();
    match &checkpoint {
        Some(c) => tracing::info!(
            path = %path.display(),
            labels_applied = c.posterior.labels_applied,
            in_flight = c.in_flight.len(),
            "checkpoint loaded"
        ),
        None => tracing::info!(path = %path.display(), "no checkpoint; starting from the prior"),
    }
    let mut engine = Engine::new(cfg.clone(), metrics.clone(), checkpoint).with_context(|| {
        format!(
            "checkpoint {} does not fit this configuration",
            path.display()
        )
    })?;
    health.model_loaded.store(true, Ordering::Relaxed);

    let publisher = Arc::new(Publisher::new(&cfg, health.clone(), metrics.clone())?);
    let labels_consumer = Arc::new(labels::consumer(&cfg, health.clone(), metrics.clone())?);
    let timeout = cfg.kafka.startup_timeout;
    let label_parts =
        recovery::wait_for_partitions(&labels_consumer, &cfg.kafka.topics.labels, timeout, &stop)?;
    let read = recovery::read_requests(
        &cfg,
        &mut engine,
        &labels_consumer,
        &health,
        &metrics,
        &stop,
    )?;
    if read > 0 {
        tracing::info!(
            messages = read,
            open_requests = engine.in_flight_ids().len(),
            "requests topic read to its end"
        );
    }
    // Labels partitions the checkpoint does not know start at their beginning: a new instance learns
    // every label its group has (and the group's scaler, the first message), like the others did.
    let marks = recovery::watermarks(
        &labels_consumer,
        &cfg.kafka.topics.labels,
        &label_parts,
        timeout,
        &stop,
    )?;
    for (&p, &(lo, _)) in &marks {
        engine.init_label_offset(p, lo);
    }
    kafka::assign_at(
        &labels_consumer,
        &cfg.kafka.topics.labels,
        engine.label_offsets(),
    )?;
    if fresh || read > 0 {
        // Pin the start positions (fresh) or the requests read before anything else happens.
        let ck = engine.checkpoint(input::now_ms());
        ck.write(path)?;
    }
    let responses_consumer = ingest::consumer(&cfg, health.clone(), metrics.clone())?;

    let (tx, rx) = sync_channel(INPUT_QUEUE);
    let ingest = {
        let (cfg, health, tx, publisher, metrics, stop) = (
            cfg.clone(),
            health.clone(),
            tx.clone(),
            publisher.clone(),
            metrics.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("armd-responses".into())
            .spawn(move || {
                ingest::run(
                    cfg,
                    responses_consumer,
                    health,
                    tx,
                    publisher,
                    metrics,
                    stop,
                )
            })
            .context("cannot start the responses thread")?
    };
    let requests_consumer = Arc::new(requests::consumer(&cfg, health.clone(), metrics.clone())?);
    kafka::assign_at(
        &requests_consumer,
        &cfg.kafka.topics.requests,
        engine.request_scan_from(),
    )?;
    let requests_thread = {
        let (cfg, consumer, health, stop, tx) = (
            cfg.clone(),
            requests_consumer,
            health.clone(),
            stop.clone(),
            tx.clone(),
        );
        let positions = engine.request_scan_from().clone();
        std::thread::Builder::new()
            .name("armd-requests".into())
            .spawn(move || requests::run(cfg, consumer, tx, health, positions, stop))
            .context("cannot start the requests thread")?
    };
    let labels_thread = {
        let (cfg, consumer, health, stop) = (
            cfg.clone(),
            labels_consumer.clone(),
            health.clone(),
            stop.clone(),
        );
        let positions = engine.label_offsets().clone();
        std::thread::Builder::new()
            .name("armd-labels".into())
            .spawn(move || labels::run(cfg, consumer, tx, health, positions, stop))
            .context("cannot start the labels thread")?
    };
    Ok(Started {
        driver: Driver::new(
            cfg,
            engine,
            driver::DriverIo {
                rx,
                publisher,
                labels: labels_consumer,
            },
            metrics,
            health,
            stop,
        ),
        ingest,
        labels: labels_thread,
        requests: requests_thread,
    })
}
