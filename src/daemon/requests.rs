//! The requests consumer: every instance reads **every** partition of the requests topic, so it knows
//! every request of its group — the pair and both raw embeddings — and can apply every label.
//!
//! Like the labels consumer it has no group management: its partitions are assigned explicitly at the
//! positions of the checkpoint (everything before them is in the checkpoint's ledger), and start-up
//! ([`super::recovery`]) reads them to the end before selection starts. Between messages the thread
//! checks (at most every [`CATCH_UP_CHECK`]) whether it has read the topic to its end and then sends
//! [`Input::RequestsCaughtUp`]: a label read before that moment whose request is still unknown names no
//! request on the topic.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;

use super::config::Config;
use super::input::Input;
use super::kafka::{client_config, Context, Health, Role, Tail, Worker};
use super::messages::LabelRequest;
use super::telemetry::Metrics;

/// How often the thread checks whether it has read the requests topic to its end.
pub const CATCH_UP_CHECK: Duration = Duration::from_millis(200);

/// A consumer of the requests topic for this instance (group `<group_id>.requests`, used only for
/// monitoring tools; positions come from the checkpoint).
pub fn consumer(
    cfg: &Config,
    health: Arc<Health>,
    m: Arc<Metrics>,
) -> Result<BaseConsumer<Context>> {
    let mut c = client_config(cfg, "requests");
    c.set(
        "group.id",
        format!("{}.requests.{}", cfg.kafka.group_id, cfg.daemon.instance_id),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("auto.offset.reset", "earliest");
    c.create_with_context(Context::new(Role::Requests, health, m))
        .map_err(|e| anyhow::anyhow!("cannot create the requests consumer: {e}"))
}

/// Decodes one requests-topic message (any instance's request), or says why it is not one.
pub fn decode(payload: Option<&[u8]>) -> std::result::Result<LabelRequest, String> {
    let p = payload.ok_or_else(|| "empty message".to_string())?;
    serde_json::from_slice::<LabelRequest>(p).map_err(|e| format!("not an armd.request.v1: {e}"))
}

/// Polls until `stop`, starting at `positions` (where the consumer was assigned, `kafka::assign_at`).
pub fn run(
    cfg: Arc<Config>,
    consumer: Arc<BaseConsumer<Context>>,
    tx: SyncSender<Input>,
    health: Arc<Health>,
    positions: BTreeMap<i32, i64>,
    stop: Arc<AtomicBool>,
) {
    let tail = Tail {
        topic: &cfg.kafka.topics.requests,
        worker: Worker::Requests,
        check_every: CATCH_UP_CHECK,
    };
    tail.run(
        &consumer,
        positions,
        (&health, &stop, &tx),
        |as_of_ms| Input::RequestsCaughtUp { as_of_ms },
        |msg| Input::Request {
            request: decode(msg.payload()),
            partition: msg.partition(),
            offset: msg.offset(),
        },
    );
}
