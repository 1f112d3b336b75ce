//! The engine thread: feeds consumer input to the [`Engine`], runs its timers (rounds, expiry, refit
//! installation, export, checkpoint cadence) and publishes what it produces. It is the only thread that
//! touches model state. On shutdown (both consumers stopped and their channel drained) it exports the
//! model, flushes the producer, writes the final checkpoint and commits the label positions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode};

use super::config::Config;
use super::engine::{Engine, Output};
use super::kafka::{Context, Publisher};
use super::labels;
use super::messages::{LabelMsg, Rejection, Response, SourcePosition};
use super::telemetry::Metrics;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the consumer threads send to the engine thread.
pub enum Input {
    /// A validated response and its arrival time (ms).
    Response(Response, i64),
    /// One labels-topic message: decoded or rejected, with its position and Kafka timestamp (ms).
    Label {
        decoded: std::result::Result<LabelMsg, Rejection>,
        payload: Option<Vec<u8>>,
        pos: SourcePosition,
        timestamp_ms: i64,
    },
}

pub struct Driver {
    pub cfg: Arc<Config>,
    pub engine: Engine,
    pub rx: Receiver<Input>,
    pub publisher: Arc<Publisher>,
    pub labels: Arc<BaseConsumer<Context>>,
    pub metrics: Arc<Metrics>,
    pub stop: Arc<AtomicBool>,
    pub last_checkpoint: Instant,
}

impl Driver {
    /// Runs until the consumers are gone, then shuts down cleanly. Errors only when the final checkpoint
    /// cannot be written.
    pub fn run(mut self) -> Result<()> {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(input) => {
                    self.handle(input);
                    // Drain a bounded burst before housekeeping, so timers still run under load.
                    for _ in 0..4096 {
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
            Input::Response(r, t) => {
                self.engine.on_response(r, t);
            }
            Input::Label {
                decoded,
                payload,
                pos,
                timestamp_ms,
            } => {
                self.engine
                    .on_label(decoded, payload.as_deref(), pos, timestamp_ms, now_ms());
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = now_ms();
        self.engine.poll_refit();
        self.engine.expire(now);
        if !self.stop.load(Ordering::Relaxed) {
            self.engine.maybe_round(now);
        }
        if self.engine.export_due() {
            self.export(now);
        }
        self.publish_outputs();
        if self.engine.checkpoint_due(self.last_checkpoint.elapsed()) {
            let _ = self.checkpoint();
        }
        self.metrics
            .checkpoint_age
            .set(self.last_checkpoint.elapsed().as_secs_f64());
    }

    fn export(&mut self, now: i64) {
        if let Err(e) = self.engine.export(now) {
            tracing::error!(error = %format!("{e:#}"), "model export failed");
        }
    }

    fn publish_outputs(&mut self) {
        let t = &self.cfg.kafka.topics;
        for o in self.engine.take_outputs() {
            match o {
                Output::Request(r) => {
                    let json = serde_json::to_vec(&r).expect("serialisable");
                    if !self.publisher.send(&t.requests, &r.request_id, &json) {
                        self.metrics.publish_failures_requests.increment(1);
                    }
                }
                Output::DeadLetter(d) => {
                    let json = serde_json::to_vec(&d).expect("serialisable");
                    let key = format!(
                        "{}-{}-{}",
                        d.source.topic, d.source.partition, d.source.offset
                    );
                    if self.publisher.send(&t.dead_letter, &key, &json) {
                        self.metrics.dead_letters.increment(1);
                    } else {
                        self.metrics.publish_failures_dead_letter.increment(1);
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
    }

    /// Writes a checkpoint now (synchronously, on this thread).
    fn checkpoint(&mut self) -> Result<()> {
        for (p, o) in self.publisher.delivered_requests() {
            self.engine.on_request_delivered(p, o);
        }
        let ck = self.engine.checkpoint(now_ms());
        let started = Instant::now();
        self.last_checkpoint = started;
        match ck.write(&self.cfg.checkpoint.path) {
            Ok(()) => {
                self.metrics
                    .checkpoint_duration
                    .record(started.elapsed().as_secs_f64());
                labels::commit_positions(
                    &self.labels,
                    &self.cfg.kafka.topics.labels,
                    &ck.label_offsets,
                    CommitMode::Async,
                );
                tracing::debug!(
                    labels_applied = ck.posterior.labels_applied,
                    in_flight = ck.in_flight.len(),
                    "checkpoint written"
                );
                Ok(())
            }
            Err(e) => {
                self.metrics.checkpoint_failures.increment(1);
                tracing::error!(error = %format!("{e:#}"), "checkpoint failed; the previous one stays valid");
                Err(e)
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
        self.checkpoint()?;
        let ck_offsets: Vec<(i32, i64)> = self
            .engine
            .label_offsets()
            .iter()
            .map(|(&p, &o)| (p, o))
            .collect();
        labels::commit_positions(
            &self.labels,
            &self.cfg.kafka.topics.labels,
            &ck_offsets,
            CommitMode::Sync,
        );
        tracing::info!(
            labels_applied = self.engine.posterior().labels_applied(),
            "engine stopped; final checkpoint written"
        );
        Ok(())
    }
}
