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
use rdkafka::message::Message;

use super::config::Config;
use super::driver::{now_ms, Input};
use super::kafka::{client_config, Context, Health, Publisher, Role};
use super::messages::{DeadLetter, Decoder, SourcePosition};
use super::telemetry::Metrics;

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
    let consumer: BaseConsumer<Context> = c
        .create_with_context(Context::new(Role::Responses, health, m))
        .map_err(|e| anyhow::anyhow!("cannot create the responses consumer: {e}"))?;
    consumer
        .subscribe(&[&cfg.kafka.topics.responses])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {}: {e}", cfg.kafka.topics.responses))?;
    Ok(consumer)
}

/// Polls until `stop`; then commits the stored offsets.
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
    let dlq = &cfg.kafka.topics.dead_letter;
    let mut last_error_log = None;
    while !stop.load(Ordering::Relaxed) {
        let msg = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
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
                if last_error_log
                    .is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10))
                {
                    last_error_log = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, "responses consumer error (librdkafka keeps retrying)");
                }
                continue;
            }
            Some(Ok(msg)) => msg,
        };
        m.responses_received.increment(1);
        match decoder.response(msg.payload()) {
            Ok(r) => {
                if tx.send(Input::Response(r, now_ms())).is_err() {
                    break; // engine gone: shutting down
                }
            }
            Err(rej) => {
                m.responses_rejected.get(rej.reason).increment(1);
                let pos = SourcePosition {
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                };
                tracing::debug!(reason = %rej.reason, detail = %rej.detail, ?pos, "response rejected");
                let dl = DeadLetter::new(
                    &rej,
                    pos,
                    msg.payload(),
                    cfg.pool.dead_letter_payload_bytes,
                    now_ms(),
                );
                let json = serde_json::to_vec(&dl).expect("serialisable");
                let key = format!(
                    "{}-{}-{}",
                    dl.source.topic, dl.source.partition, dl.source.offset
                );
                if publisher.send(dlq, &key, &json) {
                    m.dead_letters.increment(1);
                }
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&msg) {
            tracing::warn!(error = %e, "cannot store response offset");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored yet, or the broker is down: the next start re-reads a few responses.
        tracing::debug!(error = %e, "final responses commit");
    }
}
