//! The labels consumer. It does not use group management: its partitions are assigned explicitly and its
//! positions come from the checkpoint (the next offset after the last label the checkpointed posterior
//! contains), so after any crash the posterior sees every label exactly once. Each message — decoded or
//! rejected — goes to the engine, which advances the partition's offset for both, so the checkpointed
//! position always matches the posterior.
//!
//! **Caught up.** Between messages the thread checks (at most every [`CATCH_UP_CHECK`]) whether its read
//! positions reached the high watermarks it fetches from the broker; when they did, it sends
//! [`Input::LabelsCaughtUp`] with the wall time taken *before* the fetch: every label appended to the topic
//! before that moment has been handed to the engine. The engine forgets expired requests only behind that
//! mark (see `engine`), so a downtime or a lagging consumer never turns a timely label into a late one.
//!
//! The positions are also committed to the consumer group `<group_id>.labels` after each checkpoint, for
//! monitoring tools only; armd never reads them back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::config::Config;
use super::input::{now_ms, Input};
use super::kafka::{client_config, Context, Health, Role, Worker};
use super::messages::{Decoder, SourcePosition};
use super::telemetry::Metrics;

pub fn consumer(
    cfg: &Config,
    health: Arc<Health>,
    m: Arc<Metrics>,
) -> Result<BaseConsumer<Context>> {
    let mut c = client_config(cfg, "labels");
    c.set("group.id", format!("{}.labels", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    c.create_with_context(Context::new(Role::Labels, health, m))
        .map_err(|e| anyhow::anyhow!("cannot create the labels consumer: {e}"))
}

/// Assigns every partition of the labels topic at the given next offsets.
pub fn assign(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))
            .map_err(|e| anyhow::anyhow!("labels partition {p}: {e}"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| anyhow::anyhow!("cannot assign the labels partitions: {e}"))
}

/// Commits checkpointed positions to `<group_id>.labels` (monitoring only; failures are harmless).
pub fn commit_positions(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in offsets {
        if tpl
            .add_partition_offset(topic, p, Offset::Offset(o))
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::debug!(error = %e, "labels position commit (monitoring only)");
    }
}

/// How often the labels thread checks whether it has read the labels topic to its end.
pub const CATCH_UP_CHECK: Duration = Duration::from_millis(500);

/// Polls until `stop`, starting at `positions` (the offsets [`assign`] was given).
pub fn run(
    cfg: Arc<Config>,
    consumer: Arc<BaseConsumer<Context>>,
    tx: SyncSender<Input>,
    health: Arc<Health>,
    mut positions: BTreeMap<i32, i64>,
    stop: Arc<AtomicBool>,
) {
    let decoder = Decoder::new(cfg.model.dim, cfg.pool.max_message_bytes);
    let topic = cfg.kafka.topics.labels.as_str();
    let mut last_error_log = None;
    let mut last_check: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        health.beat(Worker::Labels);
        if last_check.is_none_or(|t| t.elapsed() >= CATCH_UP_CHECK) {
            last_check = Some(std::time::Instant::now());
            if let Some(as_of) = caught_up(&consumer, topic, &positions) {
                if tx.send(Input::LabelsCaughtUp { as_of_ms: as_of }).is_err() {
                    break;
                }
            }
        }
        let msg = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
                // During an outage every poll reports the same error; log it at most every 10 s.
                if last_error_log
                    .is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10))
                {
                    last_error_log = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, "labels consumer error (librdkafka keeps retrying)");
                }
                continue;
            }
            Some(Ok(msg)) => msg,
        };
        let decoded = decoder.label(msg.payload());
        let input = Input::Label {
            payload: if decoded.is_err() || msg.payload().is_some_and(|p| p.len() <= 4096) {
                msg.payload().map(<[u8]>::to_vec)
            } else {
                None
            },
            decoded,
            pos: SourcePosition {
                topic: msg.topic().to_string(),
                partition: msg.partition(),
                offset: msg.offset(),
            },
            timestamp_ms: msg.timestamp().to_millis().unwrap_or_else(now_ms),
        };
        positions.insert(msg.partition(), msg.offset() + 1);
        if tx.send(input).is_err() {
            break;
        }
    }
}

/// The wall time (ms) as of which every message of `topic` has been read, if the read `positions` are at
/// the high watermarks fetched now; `None` when behind or when the broker does not answer.
fn caught_up(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> Option<i64> {
    let as_of = now_ms();
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
