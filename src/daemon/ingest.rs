//! The responses consumer: a consumer-group member on the responses topic, polled on its own std thread.
//!
//! Each message is decoded and validated here (off the engine thread, so decoding runs in parallel with
//! model work); valid responses go to the engine through a bounded channel (a full channel blocks this
//! thread: back-pressure instead of unbounded memory), rejected ones go to the dead-letter topic. The
//! message's offset is stored only after that hand-off and committed by librdkafka's auto-commit, so a
//! response counts as consumed once it reached the engine. The pool itself is soft state (not
//! checkpointed): after a crash, responses that were pooled but not yet used are not re-offered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};

use super::config::Config;
use super::input::{now_ms, Input};
use super::kafka::{client_config, Context, Health, Publisher, Role, Worker};
use super::messages::{DeadLetter, Decoder, Rejection, SourcePosition};
use super::telemetry::Metrics;

/// The librdkafka setting armd lowers for the responses consumer unless `kafka.settings` sets it.
const FETCH_QUEUE_BACKOFF: &str = "fetch.queue.backoff.ms";

pub fn consumer(
    cfg: &Config,
    health: Arc<Health>,
    m: Arc<Metrics>,
) -> Result<BaseConsumer<Context>> {
    let mut c = client_config(cfg, "responses");
    // Static membership: a restarted instance takes its partitions back at once instead of waiting for
    // the crashed member's session to time out; two instances with the same id fence each other.
    c.set("group.id", &cfg.kafka.group_id)
        .set("group.instance.id", &cfg.daemon.instance_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    // librdkafka postpones the next fetch by `fetch.queue.backoff.ms` (default 1 s) once its local queue
    // is over `queued.max.messages.kbytes`. When armd works through a backlog (a restart, an outage, a
    // burst) it drains that queue in a fraction of a second and then sat idle for the rest of the second:
    // a catch-up rate of ~64 MB/s whatever the CPU. 10 ms keeps the fetcher close behind.
    if !cfg.kafka.settings.contains_key(FETCH_QUEUE_BACKOFF) {
        c.set(FETCH_QUEUE_BACKOFF, "10");
    }
    let consumer: BaseConsumer<Context> = c
        .create_with_context(Context::new(Role::Responses, health, m))
        .map_err(|e| anyhow::anyhow!("cannot create the responses consumer: {e}"))?;
    consumer
        .subscribe(&[&cfg.kafka.topics.responses])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {}: {e}", cfg.kafka.topics.responses))?;
    Ok(consumer)
}

/// Most responses handed to the engine in one message. Batching matters on a busy stream: one channel
/// hand-off per response cost a thread wake-up (and often a preemption) per message, more than the
/// decode itself at d = 768 (docs/bench/history.md, "Daemon" §1). At most this many payloads are held
/// at once.
pub const RESPONSE_BATCH: usize = 128;

/// Polls until `stop`; then commits the stored offsets.
///
/// Messages are taken in batches: after a blocking poll, whatever librdkafka already holds is drained
/// without waiting, up to [`RESPONSE_BATCH`]; the valid responses go to the engine together and only then
/// are the batch's offsets stored (a response counts as consumed once it reached the engine).
///
/// A consumer that hit a fatal error is replaced by a new one. The case seen: after a broker outage longer
/// than the group session timeout, the member rejoins with its static `group.instance.id` and the
/// broker fences the old member's pending offset commit; librdkafka then reports a fatal error and the
/// consumer never delivers again. The new consumer resumes from the committed offsets (responses handed
/// over since the last commit come again; the pool drops duplicates).
pub fn run(
    cfg: Arc<Config>,
    mut consumer: BaseConsumer<Context>,
    health: Arc<Health>,
    tx: SyncSender<Input>,
    publisher: Arc<Publisher>,
    m: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) {
    let decoder = Decoder::new(cfg.model.dim, cfg.pool.max_message_bytes);
    let mut last_error_log = None;
    while !stop.load(Ordering::Relaxed) {
        health.beat(Worker::Responses);
        let mut failure = None;
        let mut engine_gone = false;
        {
            let mut msgs = Vec::new();
            match consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => failure = Some(e),
                Some(Ok(msg)) => msgs.push(msg),
            }
            while failure.is_none() && !msgs.is_empty() && msgs.len() < RESPONSE_BATCH {
                match consumer.poll(Duration::ZERO) {
                    None => break,
                    Some(Err(e)) => failure = Some(e),
                    Some(Ok(msg)) => msgs.push(msg),
                }
            }
            let mut batch = Vec::with_capacity(msgs.len());
            m.responses_received.increment(msgs.len() as u64);
            for msg in &msgs {
                match decoder.response(msg.payload()) {
                    Ok(r) => batch.push(r),
                    Err(rej) => dead_letter(&cfg, &publisher, &m, msg, &rej),
                }
            }
            if !batch.is_empty() && tx.send(Input::Responses(batch, now_ms())).is_err() {
                engine_gone = true; // shutting down: leave the batch's offsets unstored
            } else {
                // Offsets grow within a partition: storing each partition's last message covers the
                // batch (one locked librdkafka call per partition instead of one per message).
                let mut last: Vec<&BorrowedMessage<'_>> = Vec::new();
                for msg in msgs.iter().rev() {
                    if !last.iter().any(|l| l.partition() == msg.partition()) {
                        last.push(msg);
                    }
                }
                for msg in last {
                    if let Err(e) = consumer.store_offset_from_message(msg) {
                        tracing::warn!(error = %e, "cannot store response offset");
                    }
                }
            }
        }
        if engine_gone {
            break;
        }
        let Some(e) = failure else { continue };
        if let Some((code, reason)) = consumer.client().fatal_error() {
            tracing::error!(
                ?code,
                reason,
                "responses consumer failed fatally; replacing it"
            );
            match self::consumer(&cfg, health.clone(), m.clone()) {
                Ok(c) => consumer = c,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot recreate the responses consumer; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            continue;
        }
        // During an outage every poll reports the same error; log it at most every 10 s.
        if last_error_log.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10))
        {
            last_error_log = Some(std::time::Instant::now());
            tracing::warn!(error = %e, "responses consumer error (librdkafka keeps retrying)");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored yet, or the broker is down: the next start re-reads a few responses.
        tracing::debug!(error = %e, "final responses commit");
    }
}

/// Sends a rejected response to the dead-letter topic with its reason and position.
fn dead_letter(
    cfg: &Config,
    publisher: &Publisher,
    m: &Metrics,
    msg: &BorrowedMessage<'_>,
    rej: &Rejection,
) {
    m.responses_rejected.get(rej.reason).increment(1);
    let pos = SourcePosition {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    tracing::debug!(reason = %rej.reason, detail = %rej.detail, ?pos, "response rejected");
    let dl = DeadLetter::new(
        rej,
        pos,
        msg.payload(),
        cfg.pool.dead_letter_payload_bytes,
        now_ms(),
    );
    publisher.send_dead_letter(&cfg.kafka.topics.dead_letter, &dl, m);
}
