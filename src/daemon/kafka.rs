//! Thin Kafka plumbing shared by the daemon's clients: client configuration, the statistics/error context
//! that feeds `/readyz` and the lag gauges, the daemon's health flags, and the idempotent [`Publisher`]
//! for requests, model snapshots and dead letters.
//!
//! Every client is a librdkafka handle polled from a std thread (never from the async runtime); librdkafka
//! reconnects by itself after a broker outage, so nothing here exits on a connection error — it only marks
//! the broker as down until the next statistics report shows a connection up again.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use super::config::Config;
use super::messages::DeadLetter;
use super::telemetry::Metrics;

/// Which client a context belongs to (for health and lag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Responses,
    Labels,
    Requests,
    Producer,
    /// Short-lived start-up clients (metadata, request recovery): they report nothing.
    Startup,
}

/// Liveness and readiness flags shared by the clients, the engine and the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    pub model_loaded: AtomicBool,
    /// Kafka clients created and positioned; consumers running.
    pub started: AtomicBool,
    pub shutting_down: AtomicBool,
    /// The labels topic has been read to its end once since start (labels published after the checkpoint,
    /// e.g. during a downtime, are applied).
    pub labels_replayed: AtomicBool,
    responses_up: AtomicBool,
    labels_up: AtomicBool,
    requests_up: AtomicBool,
    producer_up: AtomicBool,
    /// Monotonic ms (see [`Health::beat`]) of each worker thread's last loop iteration.
    beats: [AtomicI64; 4],
    /// Why the daemon is dying (a worker thread ended or stalled); `/healthz` reports it.
    fatal: Mutex<Option<String>>,
}

/// A long-lived worker thread whose liveness `/healthz` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Worker {
    Engine = 0,
    Responses = 1,
    Labels = 2,
    Requests = 3,
}

impl Worker {
    pub const ALL: [Worker; 4] = [
        Worker::Engine,
        Worker::Responses,
        Worker::Labels,
        Worker::Requests,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Worker::Engine => "engine",
            Worker::Responses => "responses consumer",
            Worker::Labels => "labels consumer",
            Worker::Requests => "requests consumer",
        }
    }
}

/// Milliseconds on a monotonic clock (since the first call in this process).
pub fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

impl Health {
    fn flag(&self, role: Role) -> Option<&AtomicBool> {
        match role {
            Role::Responses => Some(&self.responses_up),
            Role::Labels => Some(&self.labels_up),
            Role::Requests => Some(&self.requests_up),
            Role::Producer => Some(&self.producer_up),
            Role::Startup => None,
        }
    }

    pub fn set_broker_up(&self, role: Role, up: bool) {
        if let Some(f) = self.flag(role) {
            f.store(up, Ordering::Relaxed);
        }
    }

    /// Every long-lived client has a broker connection.
    pub fn broker_connected(&self) -> bool {
        self.responses_up.load(Ordering::Relaxed)
            && self.labels_up.load(Ordering::Relaxed)
            && self.requests_up.load(Ordering::Relaxed)
            && self.producer_up.load(Ordering::Relaxed)
    }

    /// Start-up finished and the worker threads are about to run: their liveness clocks start now.
    pub fn mark_started(&self) {
        for w in Worker::ALL {
            self.beat(w);
        }
        self.started.store(true, Ordering::Relaxed);
    }

    /// Records a loop iteration of `worker` (it is alive and not stuck).
    pub fn beat(&self, worker: Worker) {
        self.beats[worker as usize].store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Marks the daemon as dying with `why` (first reason wins).
    pub fn set_fatal(&self, why: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }

    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The worker threads that have not beaten for `timeout` (only once they run: before start-up
    /// finished nothing is checked, and start-up waits for the broker as long as it takes).
    pub fn stalled(&self, timeout: Duration) -> Vec<Worker> {
        if !self.started.load(Ordering::Relaxed) || self.shutting_down.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let now = monotonic_ms();
        let limit = timeout.as_millis() as i64;
        Worker::ALL
            .into_iter()
            .filter(|&w| now - self.beats[w as usize].load(Ordering::Relaxed) > limit)
            .collect()
    }

    /// Why the daemon is not live (empty when live): a fatal error, or a stalled worker thread.
    pub fn not_live_reasons(&self, timeout: Duration) -> Vec<String> {
        let mut r: Vec<String> = self.fatal().into_iter().collect();
        for w in self.stalled(timeout) {
            r.push(format!(
                "{} thread stalled for more than {timeout:?}",
                w.name()
            ));
        }
        r
    }

    /// Why the daemon is not ready (empty when ready).
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.model_loaded.load(Ordering::Relaxed) {
            r.push("model not loaded");
        }
        if !self.started.load(Ordering::Relaxed) {
            r.push("kafka clients starting");
        } else if !self.labels_replayed.load(Ordering::Relaxed) {
            r.push("replaying the labels topic");
        }
        if !self.broker_connected() {
            r.push("broker disconnected");
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            r.push("shutting down");
        }
        if self.fatal().is_some() {
            r.push("a worker thread failed");
        }
        r
    }
}

/// Client context: statistics → broker health and consumer lag; errors → logs (rate-limited) and health.
pub struct Context {
    role: Role,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    last_error_log: Mutex<Option<Instant>>,
}

impl Context {
    pub fn new(role: Role, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        Self {
            role,
            health,
            metrics,
            last_error_log: Mutex::new(None),
        }
    }

    fn update_broker_gauge(&self) {
        self.metrics
            .broker_up
            .set(if self.health.broker_connected() {
                1.0
            } else {
                0.0
            });
    }
}

impl ClientContext for Context {
    fn stats(&self, s: Statistics) {
        if self.role == Role::Startup {
            return;
        }
        let up = s.brokers.values().any(|b| b.state == "UP");
        self.health.set_broker_up(self.role, up);
        self.update_broker_gauge();
        let lag: i64 = s
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        match self.role {
            Role::Responses => self.metrics.lag_responses.set(lag as f64),
            Role::Labels => self.metrics.lag_labels.set(lag as f64),
            Role::Requests => self.metrics.lag_requests.set(lag as f64),
            _ => {}
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_broker_up(self.role, false);
            self.update_broker_gauge();
        }
        // During an outage librdkafka reports every reconnect attempt; log at most every 10 s per client.
        let mut last = self
            .last_error_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(client = ?self.role, error = %error, reason, "kafka client error (librdkafka retries)");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(client = ?self.role, fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(client = ?self.role, fac, "{log_message}"),
            _ => tracing::debug!(client = ?self.role, fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for Context {}

/// Base client settings: brokers, statistics, user extras.
pub fn client_config(cfg: &Config, client_suffix: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set(
            "client.id",
            format!("{}-{client_suffix}", cfg.daemon.instance_id),
        )
        .set(
            "statistics.interval.ms",
            cfg.kafka.stats_interval.as_millis().to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &cfg.kafka.settings {
        c.set(k, v);
    }
    c
}

// -------------------------------------------------------------------------------------------------
// Publisher

/// Delivery bookkeeping: the highest delivered offset of each requests-topic partition (for the
/// recovery scan start stored in checkpoints), the ids of requests delivered since the last
/// [`Publisher::delivered_requests`], and failure counts.
pub struct PublishContext {
    inner: Context,
    requests_topic: String,
    models_topic: String,
    labels_topic: String,
    delivered: Mutex<DeliveredRequests>,
}

/// Requests confirmed delivered.
#[derive(Debug, Default)]
pub struct DeliveredRequests {
    /// Request ids delivered since the previous snapshot.
    pub ids: Vec<String>,
}

impl ClientContext for PublishContext {
    fn stats(&self, s: Statistics) {
        self.inner.stats(s)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.error(error, reason)
    }
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.inner.log(level, fac, log_message)
    }
}

impl ProducerContext for PublishContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(msg) => {
                if msg.topic() == self.requests_topic {
                    let mut d = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(key) = msg.key() {
                        d.ids.push(String::from_utf8_lossy(key).into_owned());
                    }
                }
            }
            Err((e, msg)) => {
                let m = &self.inner.metrics;
                let counter = if msg.topic() == self.requests_topic {
                    &m.publish_failures_requests
                } else if msg.topic() == self.models_topic {
                    &m.publish_failures_models
                } else if msg.topic() == self.labels_topic {
                    &m.publish_failures_labels
                } else {
                    &m.publish_failures_dead_letter
                };
                counter.increment(1);
                tracing::error!(topic = msg.topic(), error = %e, "message could not be delivered");
            }
        }
    }
}

/// Idempotent producer for everything armd writes. `send` only enqueues (librdkafka batches, retries
/// and delivers on its own thread); when the local queue is full it waits, which back-pressures the
/// engine instead of dropping messages.
pub struct Publisher {
    producer: ThreadedProducer<PublishContext>,
}

impl Publisher {
    pub fn new(cfg: &Config, health: Arc<Health>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut c = client_config(cfg, "producer");
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4");
        let ctx = PublishContext {
            inner: Context::new(Role::Producer, health, metrics),
            requests_topic: cfg.kafka.topics.requests.clone(),
            models_topic: cfg.kafka.topics.models.clone(),
            labels_topic: cfg.kafka.topics.labels.clone(),
            delivered: Mutex::new(DeliveredRequests::default()),
        };
        let producer = c
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        Ok(Self { producer })
    }

    /// Publishes a dead letter (of a response or a label: one path for both) to `topic`, keyed by its
    /// source position, and counts it in `armd_dead_letters_total` (or the publish failure).
    pub fn send_dead_letter(&self, topic: &str, dl: &DeadLetter, m: &Metrics) {
        let json = serde_json::to_vec(dl).expect("serialisable");
        let key = format!(
            "{}-{}-{}",
            dl.source.topic, dl.source.partition, dl.source.offset
        );
        if self.send(topic, &key, &json) {
            m.dead_letters.increment(1);
        } else {
            m.publish_failures_dead_letter.increment(1);
        }
    }

    /// Enqueues one message; waits while the local queue is full. Returns false when the message was
    /// refused for another reason (logged and counted by the caller's topic).
    pub fn send(&self, topic: &str, key: &str, payload: &[u8]) -> bool {
        self.send_record(topic, BaseRecord::to(topic).key(key).payload(payload))
    }

    /// [`Publisher::send`] to one partition of `topic`.
    pub fn send_to_partition(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
    ) -> bool {
        self.send_record(
            topic,
            BaseRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload),
        )
    }

    fn send_record(&self, topic: &str, mut record: BaseRecord<'_, str, [u8]>) -> bool {
        let mut waited = Duration::ZERO;
        loop {
            match self.producer.send(record) {
                Ok(()) => return true,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                    waited += Duration::from_millis(10);
                    if waited.as_secs() % 10 == 0 && waited.subsec_millis() == 0 {
                        tracing::warn!(
                            topic,
                            waited_s = waited.as_secs(),
                            "producer queue full; waiting"
                        );
                    }
                }
                Err((e, _)) => {
                    tracing::error!(topic, error = %e, "cannot enqueue message");
                    return false;
                }
            }
        }
    }

    /// The request ids delivered since the previous call (drained).
    pub fn delivered_requests(&self) -> DeliveredRequests {
        let mut d = self
            .producer
            .context()
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        DeliveredRequests {
            ids: std::mem::take(&mut d.ids),
        }
    }

    /// Waits until everything enqueued is delivered (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.producer
            .flush(timeout)
            .map_err(|e| anyhow::anyhow!("producer flush: {e}"))
    }
}

/// Assigns every partition of `topic` at the given next offsets (the labels and requests consumers: no
/// group management, positions from the checkpoint).
pub fn assign_at(
    consumer: &rdkafka::consumer::BaseConsumer<Context>,
    topic: &str,
    offsets: &std::collections::BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (&p, &o) in offsets {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(o))
            .map_err(|e| anyhow::anyhow!("{topic}[{p}]: {e}"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| anyhow::anyhow!("cannot assign the partitions of {topic}: {e}"))
}

/// A consumer thread that reads whole topics at explicit positions (labels, requests): what it is.
pub struct Tail<'a> {
    pub topic: &'a str,
    pub worker: Worker,
    /// How often to check whether the read positions reached the topic's end.
    pub check_every: Duration,
}

impl Tail<'_> {
    /// Polls until `stop` from `positions` (where `consumer` was assigned), sending `message(msg)` for
    /// each message and, whenever the positions are at the high watermarks, `caught_up(as_of_ms)` (see
    /// [`read_to_end`]). Ends when the engine's channel is gone.
    pub fn run(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Context>,
        mut positions: std::collections::BTreeMap<i32, i64>,
        (health, stop, tx): (
            &Health,
            &AtomicBool,
            &std::sync::mpsc::SyncSender<super::input::Input>,
        ),
        caught_up: impl Fn(i64) -> super::input::Input,
        mut message: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> super::input::Input,
    ) {
        use rdkafka::message::Message;
        let mut last_error_log: Option<Instant> = None;
        let mut last_check: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            health.beat(self.worker);
            if last_check.is_none_or(|t| t.elapsed() >= self.check_every) {
                last_check = Some(Instant::now());
                if let Some(as_of) = read_to_end(consumer, self.topic, &positions) {
                    if tx.send(caught_up(as_of)).is_err() {
                        break;
                    }
                }
            }
            let msg = match consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => {
                    // During an outage every poll reports the same error; log it at most every 10 s.
                    if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        last_error_log = Some(Instant::now());
                        tracing::warn!(error = %e, consumer = self.worker.name(), "consumer error (librdkafka keeps retrying)");
                    }
                    continue;
                }
                Some(Ok(msg)) => msg,
            };
            let input = message(&msg);
            positions.insert(msg.partition(), msg.offset() + 1);
            if tx.send(input).is_err() {
                break;
            }
        }
    }
}

/// The wall time (ms) as of which every message of `topic` has been read, if the read `positions` are at
/// the high watermarks fetched now; `None` when behind or when the broker does not answer. The time is
/// taken *before* the fetch: every message appended before it is below the watermarks.
pub fn read_to_end(
    consumer: &rdkafka::consumer::BaseConsumer<Context>,
    topic: &str,
    positions: &std::collections::BTreeMap<i32, i64>,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let as_of = super::input::now_ms();
    for (&p, &pos) in positions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(2))
            .ok()?;
        if pos < high {
            return None;
        }
    }
    Some(as_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_worker_beats_and_fatal_errors() {
        let h = Health::default();
        // Before start-up finished nothing can be stalled (start-up may wait for the broker for long).
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.stalled(Duration::from_millis(1)).is_empty());
        h.mark_started();
        assert!(h.not_live_reasons(Duration::from_secs(3600)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(h.stalled(Duration::from_millis(10)), Worker::ALL);
        h.beat(Worker::Engine);
        assert_eq!(
            h.stalled(Duration::from_millis(10)),
            [Worker::Responses, Worker::Labels, Worker::Requests]
        );
        let reasons = h.not_live_reasons(Duration::from_millis(10));
        assert!(
            reasons[0].contains("responses consumer thread stalled"),
            "{reasons:?}"
        );
        // A graceful shutdown stops the beats on purpose.
        h.shutting_down.store(true, Ordering::Relaxed);
        assert!(h.stalled(Duration::from_millis(10)).is_empty());
        h.set_fatal("the engine thread ended".into());
        h.set_fatal("second reason".into());
        assert_eq!(
            h.not_live_reasons(Duration::from_secs(1)),
            ["the engine thread ended"]
        );
        assert!(h.not_ready_reasons().contains(&"a worker thread failed"));
    }

    #[test]
    fn not_ready_until_the_labels_topic_was_replayed() {
        let h = Health::default();
        h.model_loaded.store(true, Ordering::Relaxed);
        for role in [
            Role::Responses,
            Role::Labels,
            Role::Requests,
            Role::Producer,
        ] {
            h.set_broker_up(role, true);
        }
        h.mark_started();
        assert_eq!(h.not_ready_reasons(), ["replaying the labels topic"]);
        h.labels_replayed.store(true, Ordering::Relaxed);
        assert!(h.not_ready_reasons().is_empty());
    }
}
