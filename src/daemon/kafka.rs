//! Thin Kafka plumbing shared by the daemon's clients: client configuration, the statistics/error context
//! that feeds `/readyz` and the lag gauges, the daemon's health flags, and the idempotent [`Publisher`]
//! for requests, model snapshots and dead letters.
//!
//! Every client is a librdkafka handle polled from a std thread (never from the async runtime); librdkafka
//! reconnects by itself after a broker outage, so nothing here exits on a connection error — it only marks
//! the broker as down until the next statistics report shows a connection up again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
use super::telemetry::Metrics;

/// Which client a context belongs to (for health and lag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Responses,
    Labels,
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
    responses_up: AtomicBool,
    labels_up: AtomicBool,
    producer_up: AtomicBool,
}

impl Health {
    fn flag(&self, role: Role) -> Option<&AtomicBool> {
        match role {
            Role::Responses => Some(&self.responses_up),
            Role::Labels => Some(&self.labels_up),
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
            && self.producer_up.load(Ordering::Relaxed)
    }

    /// Why the daemon is not ready (empty when ready).
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.model_loaded.load(Ordering::Relaxed) {
            r.push("model not loaded");
        }
        if !self.started.load(Ordering::Relaxed) {
            r.push("kafka clients starting");
        }
        if !self.broker_connected() {
            r.push("broker disconnected");
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            r.push("shutting down");
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
    delivered: Mutex<DeliveredRequests>,
}

/// Requests confirmed delivered. Offsets and ids are taken together under one lock, so a request not
/// among the ids of a snapshot is delivered (if ever) after the snapshot's offsets.
#[derive(Debug, Default)]
pub struct DeliveredRequests {
    /// Highest delivered offset per requests-topic partition since start.
    pub max_offset: BTreeMap<i32, i64>,
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
                    let e = d.max_offset.entry(msg.partition()).or_insert(-1);
                    *e = (*e).max(msg.offset());
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
            delivered: Mutex::new(DeliveredRequests::default()),
        };
        let producer = c
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        Ok(Self { producer })
    }

    /// Enqueues one message; waits while the local queue is full. Returns false when the message was
    /// refused for another reason (logged and counted by the caller's topic).
    pub fn send(&self, topic: &str, key: &str, payload: &[u8]) -> bool {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
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

    /// Highest delivered offset per requests-topic partition since start, and the ids delivered since
    /// the previous call (drained).
    pub fn delivered_requests(&self) -> DeliveredRequests {
        let mut d = self
            .producer
            .context()
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        DeliveredRequests {
            max_offset: d.max_offset.clone(),
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
