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
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::config::Config;
use super::input::{now_ms, Input, LabelInput};
use super::kafka::{client_config, Context, Health, Role, Tail, Worker};
use super::messages::{Decoder, ScalerMsg, SourcePosition};
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

/// Polls until `stop`, starting at `positions` (where the consumer was assigned, `kafka::assign_at`).
/// `armd.scaler.v1` messages (the group's scaling, see `engine`) go to the engine as such; everything
/// else is a label.
pub fn run(
    cfg: Arc<Config>,
    consumer: Arc<BaseConsumer<Context>>,
    tx: SyncSender<Input>,
    health: Arc<Health>,
    positions: BTreeMap<i32, i64>,
    stop: Arc<AtomicBool>,
) {
    let decoder = Decoder::new(cfg.model.dim, cfg.pool.max_message_bytes);
    let tail = Tail {
        topic: &cfg.kafka.topics.labels,
        worker: Worker::Labels,
        check_every: CATCH_UP_CHECK,
    };
    tail.run(
        &consumer,
        positions,
        (&health, &stop, &tx),
        |as_of_ms| Input::LabelsCaughtUp { as_of_ms },
        |msg| {
            let pos = SourcePosition {
                topic: msg.topic().to_string(),
                partition: msg.partition(),
                offset: msg.offset(),
            };
            if ScalerMsg::is_scaler(msg.payload()) {
                let decoded = ScalerMsg::decode(msg.payload(), cfg.model.dim);
                return Input::Scaler {
                    payload: decoded
                        .is_err()
                        .then(|| msg.payload().map(<[u8]>::to_vec))
                        .flatten(),
                    decoded,
                    pos,
                };
            }
            let decoded = decoder.label(msg.payload());
            Input::Label(LabelInput {
                payload: if decoded.is_err() || msg.payload().is_some_and(|p| p.len() <= 4096) {
                    msg.payload().map(<[u8]>::to_vec)
                } else {
                    None
                },
                decoded,
                pos,
                timestamp_ms: msg.timestamp().to_millis().unwrap_or_else(now_ms),
                read_at_ms: now_ms(),
            })
        },
    );
}
