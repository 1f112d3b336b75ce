//! Start-up: wait for the broker, find the labels partitions, and recover requests issued after the
//! last checkpoint.
//!
//! **Recovery of in-flight requests.** A checkpoint holds the requests in flight when it was written whose
//! delivery was confirmed, and for each requests-topic partition the offset after the last request of
//! ours known delivered at that time. Requests issued later, or not yet confirmed then, are not in the
//! checkpoint; if they were delivered at all they are on the requests topic past that offset — and each
//! request message carries both raw embeddings, so the pair's difference vector can be rebuilt with the
//! frozen scaler. On start we read every requests partition from the checkpointed offset to its current
//! end, register our instance's requests that we do not know yet, and advance the sequence counter past
//! the highest one seen. Together with the labels offsets in the checkpoint this makes every label that
//! annotators send for such a request joinable after a crash, and no request id is ever issued twice
//! (ids also hash the pair, so even a request lost before delivery cannot alias another pair).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::config::Config;
use super::engine::Engine;
use super::kafka::{client_config, Context, Health, Role};
use super::messages::LabelRequest;
use super::telemetry::Metrics;

/// Partition ids of `topic`, retrying (with a log line) until the topic exists or `stop` is set.
pub fn wait_for_partitions(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Vec<i32>> {
    let mut last_log: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("shutdown requested while waiting for topic {topic}");
        }
        let problem = match consumer.fetch_metadata(Some(topic), timeout) {
            Ok(md) => match md.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                    ps.sort_unstable();
                    return Ok(ps);
                }
                Some(t) => format!("topic {topic} is not available ({:?})", t.error()),
                None => format!("topic {topic} not found"),
            },
            Err(e) => format!("cannot reach the broker: {e}"),
        };
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_log = Some(Instant::now());
            tracing::warn!(topic, problem = %problem, "waiting for Kafka (armd does not create topics: `armd topics create --config <file>` does)");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Low and high watermarks of every partition, retrying transient errors (e.g. a topic created a moment
/// ago whose leader is not elected yet, or a broker outage) until `stop` is set.
pub fn watermarks(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<BTreeMap<i32, (i64, i64)>> {
    let mut last_log: Option<Instant> = None;
    loop {
        let r: Result<BTreeMap<i32, (i64, i64)>> = partitions
            .iter()
            .map(|&p| {
                consumer
                    .fetch_watermarks(topic, p, timeout)
                    .map(|w| (p, w))
                    .map_err(|e| anyhow::anyhow!("watermarks of {topic}[{p}]: {e}"))
            })
            .collect();
        match r {
            Ok(m) => return Ok(m),
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(e.context("shutdown requested"));
                }
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_log = Some(Instant::now());
                    tracing::warn!(error = %e, "waiting for Kafka");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Reads the requests topic from the engine's scan offsets to the current end and registers our requests
/// the engine does not know. Returns how many were recovered.
pub fn recover_requests(
    cfg: &Config,
    engine: &mut Engine,
    consumer: &BaseConsumer<Context>,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    stop: &AtomicBool,
) -> Result<usize> {
    let topic = &cfg.kafka.topics.requests;
    let timeout = cfg.kafka.startup_timeout;
    let partitions = wait_for_partitions(consumer, topic, timeout, stop)?;
    let marks = watermarks(consumer, topic, &partitions, timeout, stop)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for (&p, &(lo, hi)) in &marks {
        let from = engine
            .request_scan_from()
            .get(&p)
            .copied()
            .unwrap_or(lo)
            .max(lo);
        if from < hi {
            tpl.add_partition_offset(topic, p, Offset::Offset(from))
                .map_err(|e| anyhow::anyhow!("{topic}[{p}]: {e}"))?;
            remaining.insert(p, hi);
        }
    }
    let mut recovered = 0;
    if !remaining.is_empty() {
        let reader: BaseConsumer<Context> = {
            let mut c = client_config(cfg, "recovery");
            c.set("enable.auto.commit", "false")
                .set("group.id", format!("{}.recovery", cfg.kafka.group_id));
            c.create_with_context(Context::new(Role::Startup, health.clone(), metrics.clone()))
                .map_err(|e| anyhow::anyhow!("cannot create the recovery consumer: {e}"))?
        };
        reader
            .assign(&tpl)
            .map_err(|e| anyhow::anyhow!("cannot assign {topic} for recovery: {e}"))?;
        let deadline = Instant::now() + timeout * 4;
        while !remaining.is_empty() {
            if stop.load(Ordering::Relaxed) {
                bail!("shutdown requested during request recovery");
            }
            if Instant::now() > deadline {
                bail!(
                    "request recovery did not reach the end of {topic} within {:?} (partitions left: {:?})",
                    timeout * 4,
                    remaining
                );
            }
            let Some(msg) = reader.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "request recovery read error (retrying)");
                    continue;
                }
            };
            let (p, o) = (msg.partition(), msg.offset());
            if let Some(payload) = msg.payload() {
                match serde_json::from_slice::<LabelRequest>(payload) {
                    Ok(req) => match engine.recover_request(req) {
                        Ok(true) => recovered += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(partition = p, offset = o, error = %e, "request on the requests topic cannot be recovered")
                        }
                    },
                    Err(e) => {
                        tracing::debug!(partition = p, offset = o, error = %e, "not an armd request; skipped")
                    }
                }
            }
            if remaining.get(&p).is_some_and(|&hi| o + 1 >= hi) {
                remaining.remove(&p);
            }
        }
    }
    for (&p, &(_, hi)) in &marks {
        engine.set_request_scan_from(p, hi);
    }
    Ok(recovered)
}
