//! The engine thread: feeds consumer input to the [`Engine`], runs its timers (rounds, expiry, refit
//! installation, export, checkpoint cadence) and publishes what it produces. It is the only thread that
//! touches model state. On shutdown (both consumers stopped and their channel drained) it exports the
//! model, flushes the producer, writes the final checkpoint and commits the label positions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode};

use super::config::Config;
use super::engine::{Engine, Output};
use super::ingest;
use super::input::{now_ms, Input};
use super::kafka::{Context, Health, Publisher, Worker};
use super::labels;
use super::telemetry::Metrics;

/// A checkpoint being written on its own thread.
struct PendingWrite {
    handle: std::thread::JoinHandle<Result<Duration>>,
    label_offsets: Vec<(i32, i64)>,
}

pub struct Driver {
    pub cfg: Arc<Config>,
    pub engine: Engine,
    pub rx: Receiver<Input>,
    pub publisher: Arc<Publisher>,
    pub labels: Arc<BaseConsumer<Context>>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub stop: Arc<AtomicBool>,
    /// When the last checkpoint was started (the cadence clock).
    pub last_checkpoint: Instant,
    /// When the last checkpoint was durably written (the age gauge).
    pub last_success: Instant,
    writing: Option<PendingWrite>,
    fault: Option<Fault>,
}

/// Fault injection for the liveness tests (debug builds only): `ARMD_DEBUG_ENGINE_FAULT` =
/// `panic-after-labels:N` or `stall-after-labels:N` makes the engine thread panic, or stop iterating for
/// good, once N labels have been applied.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Panic(u64),
    Stall(u64),
}

impl Fault {
    fn from_env() -> Option<Self> {
        if !cfg!(debug_assertions) {
            return None;
        }
        let v = std::env::var("ARMD_DEBUG_ENGINE_FAULT").ok()?;
        let (kind, n) = v.split_once(':')?;
        let n = n.parse().ok()?;
        match kind {
            "panic-after-labels" => Some(Fault::Panic(n)),
            "stall-after-labels" => Some(Fault::Stall(n)),
            _ => None,
        }
    }
}

/// The Kafka side of the engine thread: its input channel, the producer and the labels consumer (for
/// position commits).
pub struct DriverIo {
    pub rx: Receiver<Input>,
    pub publisher: Arc<Publisher>,
    pub labels: Arc<BaseConsumer<Context>>,
}

impl Driver {
    pub fn new(
        cfg: Arc<Config>,
        engine: Engine,
        io: DriverIo,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let DriverIo {
            rx,
            publisher,
            labels,
        } = io;
        let fault = Fault::from_env();
        if let Some(f) = fault {
            tracing::warn!(
                ?f,
                "ARMD_DEBUG_ENGINE_FAULT set: the engine thread will fail on purpose"
            );
        }
        Self {
            cfg,
            engine,
            rx,
            publisher,
            labels,
            metrics,
            health,
            stop,
            last_checkpoint: Instant::now(),
            last_success: Instant::now(),
            writing: None,
            fault,
        }
    }

    /// Runs until the consumers are gone, then shuts down cleanly. Errors only when the final checkpoint
    /// cannot be written.
    pub fn run(mut self) -> Result<()> {
        loop {
            self.health.beat(Worker::Engine);
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(input) => {
                    self.handle(input);
                    // Drain a bounded burst (≤ 4096 responses) before housekeeping, so timers still
                    // run under load.
                    for _ in 0..4096 / ingest::RESPONSE_BATCH {
                        match self.rx.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.housekeeping();
        }
        self.finish()
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Responses(batch, t) => {
                self.engine.on_responses(batch, t);
            }
            Input::Label(label) => {
                self.engine.on_label(label, now_ms());
                self.inject_fault();
            }
            Input::Scaler {
                decoded,
                payload,
                pos,
            } => self
                .engine
                .on_scaler(decoded, payload.as_deref(), pos, now_ms()),
            Input::Request {
                request,
                partition,
                offset,
            } => {
                self.engine.on_request(request, partition, offset);
                self.inject_fault();
            }
            Input::RequestsCaughtUp { as_of_ms } => {
                self.engine.on_requests_caught_up(as_of_ms);
                self.inject_fault();
            }
            Input::LabelsCaughtUp { as_of_ms } => {
                self.engine.on_labels_caught_up(as_of_ms);
                if !self.health.labels_replayed.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        labels_applied = self.engine.posterior().labels_applied(),
                        "labels topic read to its end"
                    );
                }
            }
        }
    }

    fn inject_fault(&self) {
        let applied = self.engine.posterior().labels_applied();
        match self.fault {
            Some(Fault::Panic(n)) if applied >= n => {
                panic!("injected engine fault after {applied} labels (ARMD_DEBUG_ENGINE_FAULT)")
            }
            Some(Fault::Stall(n)) if applied >= n => {
                tracing::warn!(applied, "injected engine stall (ARMD_DEBUG_ENGINE_FAULT)");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            _ => {}
        }
    }

    fn housekeeping(&mut self) {
        let now = now_ms();
        self.engine.poll_refit();
        self.engine.expire(now);
        self.engine.maybe_propose_scaler(now);
        if !self.stop.load(Ordering::Relaxed) {
            self.engine.maybe_round_timed(now, now_ms);
        }
        if self.engine.export_due() {
            self.export(now);
        }
        self.publish_outputs();
        self.poll_write(false);
        if self.writing.is_none() && self.engine.checkpoint_due(self.last_checkpoint.elapsed()) {
            self.start_checkpoint();
        }
        self.metrics
            .checkpoint_age
            .set(self.last_success.elapsed().as_secs_f64());
    }

    /// Exports the model: the snapshot from the engine, its files written here (a failed write is logged
    /// and the daemon goes on; the next export writes them again).
    fn export(&mut self, now: i64) {
        let snap = self.engine.export(now);
        if let Some(dir) = &self.cfg.export.dir {
            if let Err(e) = super::export::write_model_files(dir, &snap) {
                tracing::error!(error = %format!("{e:#}"), "model export failed");
            }
        }
    }

    fn publish_outputs(&mut self) {
        let t = &self.cfg.kafka.topics;
        let mut requests = 0;
        for o in self.engine.take_outputs() {
            match o {
                Output::Request(r) => {
                    let json = serde_json::to_vec(&r).expect("serialisable");
                    if !self.publisher.send(&t.requests, &r.request_id, &json) {
                        self.metrics.publish_failures_requests.increment(1);
                    }
                    requests += 1;
                }
                Output::DeadLetter(d) => {
                    self.publisher
                        .send_dead_letter(&t.dead_letter, &d, &self.metrics)
                }
                Output::Scaler(s) => {
                    let json = serde_json::to_vec(&s).expect("serialisable");
                    // Partition 0: with several labels partitions, "first" is defined on one of them.
                    if !self
                        .publisher
                        .send_to_partition(&t.labels, 0, "armd.scaler", &json)
                    {
                        self.metrics.publish_failures_labels.increment(1);
                    }
                }
                Output::Model(s) => {
                    let json = serde_json::to_vec(&s).expect("serialisable");
                    if !self
                        .publisher
                        .send(&t.models, &self.cfg.daemon.instance_id, &json)
                    {
                        self.metrics.publish_failures_models.increment(1);
                    }
                }
            }
        }
        if requests > 0 {
            tracing::debug!(requests, "requests published");
        }
    }

    /// Tells the engine which requests reached the requests topic, before a checkpoint.
    fn confirm_deliveries(&mut self) {
        let d = self.publisher.delivered_requests();
        self.engine.on_requests_delivered(d.ids);
    }

    /// Snapshots the state and writes it on a background thread, so the engine keeps applying labels
    /// while a large checkpoint (d² factor plus stored labels) goes to disk. One write at a time.
    fn start_checkpoint(&mut self) {
        self.confirm_deliveries();
        let ck = self.engine.checkpoint(now_ms());
        tracing::debug!(
            labels_applied = ck.posterior.labels_applied,
            in_flight = ck.in_flight.len(),
            "checkpoint started"
        );
        self.last_checkpoint = Instant::now();
        let label_offsets = ck.label_offsets.clone();
        let path = self.cfg.checkpoint.path.clone();
        let spawned = std::thread::Builder::new()
            .name("armd-checkpoint".into())
            .spawn(move || {
                let started = Instant::now();
                ck.write(&path).map(|()| started.elapsed())
            });
        match spawned {
            Ok(handle) => {
                self.writing = Some(PendingWrite {
                    handle,
                    label_offsets,
                })
            }
            Err(e) => {
                self.metrics.checkpoint_failures.increment(1);
                self.engine.mark_dirty();
                tracing::error!(error = %e, "cannot start the checkpoint thread");
            }
        }
    }

    /// Collects a finished background write (with `wait`, waits for it).
    fn poll_write(&mut self, wait: bool) {
        let done = self
            .writing
            .as_ref()
            .is_some_and(|w| wait || w.handle.is_finished());
        if !done {
            return;
        }
        let w = self.writing.take().expect("checked");
        let result = w
            .handle
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("checkpoint thread panicked")));
        self.record_write(result, &w.label_offsets, CommitMode::Async);
    }

    fn record_write(
        &mut self,
        result: Result<Duration>,
        offsets: &[(i32, i64)],
        mode: CommitMode,
    ) -> bool {
        match result {
            Ok(took) => {
                self.metrics.checkpoint_duration.record(took.as_secs_f64());
                self.last_success = Instant::now();
                labels::commit_positions(
                    &self.labels,
                    &self.cfg.kafka.topics.labels,
                    offsets,
                    mode,
                );
                tracing::debug!(took_ms = took.as_millis() as u64, "checkpoint written");
                true
            }
            Err(e) => {
                self.metrics.checkpoint_failures.increment(1);
                // Try again at the next cadence; the previous checkpoint stays valid meanwhile.
                self.engine.mark_dirty();
                tracing::error!(error = %format!("{e:#}"), "checkpoint failed; the previous one stays valid");
                false
            }
        }
    }

    fn finish(mut self) -> Result<()> {
        let now = now_ms();
        self.engine.poll_refit();
        self.engine.expire(now);
        if self.cfg.export.dir.is_some() || self.cfg.export.publish {
            self.export(now);
        }
        self.publish_outputs();
        if let Err(e) = self.publisher.flush(Duration::from_secs(10)) {
            tracing::warn!(error = %e, "not every message was delivered before shutdown");
        }
        self.poll_write(true);
        self.confirm_deliveries();
        let ck = self.engine.checkpoint(now_ms());
        let started = Instant::now();
        let result = ck
            .write(&self.cfg.checkpoint.path)
            .map(|()| started.elapsed());
        let failure = result.as_ref().err().map(|e| format!("{e:#}"));
        if !self.record_write(result, &ck.label_offsets, CommitMode::Sync) {
            anyhow::bail!("final checkpoint failed: {}", failure.unwrap_or_default());
        }
        tracing::info!(
            labels_applied = self.engine.posterior().labels_applied(),
            "engine stopped; final checkpoint written"
        );
        Ok(())
    }
}
