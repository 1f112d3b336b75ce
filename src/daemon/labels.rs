//! The labels consumer. It does not use group management: its partitions are assigned explicitly and its
//! positions come from the checkpoint (the next offset after the last label the checkpointed posterior
//! contains), so after any crash the posterior sees every label exactly once. Each message — decoded or
//! rejected — goes to the engine, which advances the partition's offset for both, so the checkpointed
//! position always matches the posterior.
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
use super::driver::{now_ms, Input};
use super::kafka::{client_config, Context, Health, Role};
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

pub fn run(
    cfg: Arc<Config>,
    consumer: Arc<BaseConsumer<Context>>,
    tx: SyncSender<Input>,
    stop: Arc<AtomicBool>,
) {
    let decoder = Decoder::new(cfg.model.dim, cfg.pool.max_message_bytes);
    while !stop.load(Ordering::Relaxed) {
        let msg = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "labels consumer error");
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
        if tx.send(input).is_err() {
            break;
        }
    }
}
