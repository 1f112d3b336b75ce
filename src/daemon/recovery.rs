//! Start-up: wait for the broker, find the labels partitions, and read the requests topic up to its end.
//!
//! **Reading the requests topic before selection.** Every instance registers every request of its group
//! ([`super::requests`]); a checkpoint holds the ones that could still take labels when it was written and,
//! per requests-topic partition, the position up to which the topic had been read. Requests published
//! later — by this instance (issued after the checkpoint, or not yet confirmed then) or by others — are
//! on the topic past that position, and each carries both raw embeddings, so its difference vector can be
//! rebuilt with the group's scaler. Start-up reads every partition from there to its current end before
//! anything else runs: this instance's sequence counter moves past the highest of its own ids seen (no
//! request id is ever issued twice; ids also hash the pair, so even a request lost before delivery cannot
//! alias another pair), and the labels replayed after the checkpoint find their requests. The requests
//! consumer thread then goes on from the end.

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

/// Reads the requests topic from the engine's read positions to the current end, registering every request
/// the engine does not know (see the module doc). Returns how many messages were read.
pub fn read_requests(
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
            engine.on_request(super::requests::decode(msg.payload()), p, o);
            recovered += 1;
            if remaining.get(&p).is_some_and(|&hi| o + 1 >= hi) {
                remaining.remove(&p);
            }
        }
    }
    for (&p, &(_, hi)) in &marks {
        engine.advance_request_scan(p, hi);
    }
    Ok(recovered)
}
