//! A from-scratch replay checker for a daemon's final checkpoint.
//!
//! It reads everything the daemon and its annotators left on the broker — every `armd.request.v1` on the
//! requests topic and every label on the labels topic, in topic order — and rebuilds the posterior with
//! nothing of the daemon but its frozen feature scaler (taken from the checkpoint, and checked to be the
//! first `armd.scaler.v1` proposal on the labels topic): for each label,
//! `v = scaler(a) − scaler(b)` from the request's raw base64 embeddings, applied to
//! `Posterior::new(dim, prior_precision)` with the engine's refit cadence (a synchronous refit at every
//! `refit_every` applied labels). θ and log det must match the checkpoint's posterior (after finishing a
//! refit the checkpoint recorded as pending, exactly as a restart would) within 1e-9 relative, and the
//! checkpoint's stored labels must be the replayed ones, in the same order, bit for bit.
//!
//! **One labels partition.** The online update is order-dependent. With several labels partitions the
//! order in which the daemon applies labels interleaves the partitions by arrival, and after a crash the
//! replay from the checkpointed offsets interleaves them differently, so "the topic order" is not defined.
//! Tests that use this checker must create the labels topic with one partition ([`check`] asserts it).
//!
//! Consolidation (`model.max_labels`) folds labels into the prior and is not replayed: keep `max_labels`
//! above the number of labels a test sends ([`check`] asserts that nothing was folded).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::config::Config;
use armd::daemon::messages::{decode_f32_b64, Decoder, LabelRequest, ScalerMsg};
use armd::features::Scaler;
use armd::posterior::{refit_due, Posterior, PriorSetting, RefitOptions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// One message read back from a topic.
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    /// Kafka timestamp (ms).
    pub timestamp_ms: i64,
}

/// Every message of every partition of `topic`, from the beginning to the high watermarks at the call,
/// in partition then offset order.
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<Record> {
    read_partitions(bootstrap, topic).1
}

/// The partition count of `topic` and [`read_topic`]'s messages.
fn read_partitions(bootstrap: &str, topic: &str) -> (usize, Vec<Record>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("replay-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("replay reader");
    let timeout = Duration::from_secs(20);
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .unwrap_or_else(|| panic!("topic {topic} not found"))
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, timeout)
            .unwrap_or_else(|e| panic!("watermarks of {topic}[{p}]: {e}"));
        if lo < hi {
            ends.insert(p, hi);
            tpl.add_partition_offset(topic, p, Offset::Offset(lo))
                .unwrap();
        }
    }
    c.assign(&tpl).expect("assign");
    drop(tpl);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut remaining = ends.clone();
    while !remaining.is_empty() {
        assert!(
            Instant::now() < deadline,
            "could not read {topic} to its end; partitions left (partition → end): {remaining:?}"
        );
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
        let (p, o) = (m.partition(), m.offset());
        if remaining.get(&p).is_some_and(|&hi| o < hi) {
            out.push(Record {
                partition: p,
                offset: o,
                payload: m.payload().map(<[u8]>::to_vec),
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            });
            if o + 1 >= remaining[&p] {
                remaining.remove(&p);
            }
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    (parts.len(), out)
}

/// The pair a request names: both response ids and both raw embeddings.
type Pair = (String, String, String, String);

fn pair_of(r: &LabelRequest) -> Pair {
    (
        r.a.response_id.clone(),
        r.b.response_id.clone(),
        r.a.embedding_b64.clone(),
        r.b.embedding_b64.clone(),
    )
}

/// The requests topic, checked: every request id maps to exactly one pair.
pub struct Requests {
    pub by_id: HashMap<String, LabelRequest>,
    /// Messages whose id was already on the topic (with the same pair): re-published requests.
    pub republished: usize,
    /// Sequence numbers that appear under more than one request id (a sequence used by a request that
    /// was never delivered before a crash may be used again for another pair; the id hash differs).
    pub sequences_reused: usize,
}

/// Reads the requests topic and asserts that no request id names two different pairs.
pub fn requests(bootstrap: &str, topic: &str) -> Requests {
    let mut by_id: HashMap<String, LabelRequest> = HashMap::new();
    let mut republished = 0;
    let mut ids_of_seq: HashMap<(String, u64), Vec<String>> = HashMap::new();
    for r in read_topic(bootstrap, topic) {
        let payload = r.payload.unwrap_or_else(|| {
            panic!(
                "{topic}[{}]@{}: empty request message",
                r.partition, r.offset
            )
        });
        let req: LabelRequest = serde_json::from_slice(&payload).unwrap_or_else(|e| {
            panic!(
                "{topic}[{}]@{}: not an armd.request.v1: {e}",
                r.partition, r.offset
            )
        });
        match by_id.get(&req.request_id) {
            Some(first) => {
                assert!(
                    pair_of(first) == pair_of(&req),
                    "request id {} names two different pairs: ({}, {}) and ({}, {}) (second at {topic}[{}]@{})",
                    req.request_id,
                    first.a.response_id,
                    first.b.response_id,
                    req.a.response_id,
                    req.b.response_id,
                    r.partition,
                    r.offset
                );
                republished += 1;
            }
            None => {
                let ids = ids_of_seq
                    .entry((req.instance_id.clone(), req.sequence))
                    .or_default();
                ids.push(req.request_id.clone());
                by_id.insert(req.request_id.clone(), req);
            }
        }
    }
    let sequences_reused = ids_of_seq.values().filter(|ids| ids.len() > 1).count();
    Requests {
        by_id,
        republished,
        sequences_reused,
    }
}

/// What [`check`] found.
#[derive(Debug)]
pub struct ReplayReport {
    /// Labels on the labels topic (= applied by the replay and by the daemon).
    pub labels: usize,
    /// Distinct request ids on the requests topic.
    pub requests: usize,
    pub republished: usize,
    pub sequences_reused: usize,
    /// Synchronous refits the replay ran.
    pub refits: usize,
    /// Whether the checkpoint had a refit pending (finished here before comparing).
    pub pending_refit: bool,
    pub theta_rel_diff: f64,
    pub log_det_rel_diff: f64,
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300);
    num / den
}

/// The checkpoint's posterior as a restart would hold it: a refit recorded as pending is run on the same
/// label prefix and installed (newer labels re-applied), as `Engine::restore` does.
fn settled_posterior(ck: &Checkpoint) -> Posterior {
    let mut p = Posterior::from_parts(ck.posterior.clone()).expect("checkpoint posterior");
    if let Some(at) = ck.pending_refit {
        let at = at as usize;
        let mut snap = ck.posterior.clone();
        snap.labels.truncate(at);
        snap.weights.truncate(at);
        let outcome = Posterior::from_parts(snap)
            .expect("checkpoint posterior (refit snapshot)")
            .refit_job()
            .run(RefitOptions::default())
            .expect("pending refit");
        p.install_refit(outcome).expect("install the pending refit");
    }
    p
}

/// Replays the labels topic from scratch and compares with `ck` (see the module doc). `sent` is every
/// label the annotators sent, as `(request id, y)`: the labels topic must hold exactly that multiset.
pub fn check(
    bootstrap: &str,
    requests_topic: &str,
    labels_topic: &str,
    cfg: &Config,
    ck: &Checkpoint,
    sent: &[(String, f64)],
) -> ReplayReport {
    let reqs = requests(bootstrap, requests_topic);
    let (partitions, labels) = read_partitions(bootstrap, labels_topic);
    assert_eq!(
        partitions, 1,
        "the replay checker needs a labels topic with ONE partition (the online update is order-dependent)"
    );
    let decoder = Decoder::new(cfg.model.dim, cfg.pool.max_message_bytes);
    let s = ck
        .scaler
        .as_ref()
        .expect("the checkpoint has no frozen scaler");
    let scaler = Scaler::from_parts(s.mean.clone(), s.inv_std.clone(), s.scaling)
        .expect("checkpoint scaler");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let scaled = |b64: &str, what: &str, id: &str| {
        let raw = decode_f32_b64(what, b64)
            .unwrap_or_else(|e| panic!("request {id}: {what} does not decode: {e}"));
        scaler
            .transform_vec(&raw)
            .unwrap_or_else(|e| panic!("request {id}: {what} cannot be scaled: {e}"))
    };

    // The labels topic holds the group's scaling (the first `armd.scaler.v1`, adopted by the checkpoint's
    // daemon bit for bit) and exactly what the annotators sent: no label lost on the way, none extra.
    let mut on_topic: Vec<(String, f64)> = Vec::new();
    let mut first_scaler = true;
    for r in &labels {
        if ScalerMsg::is_scaler(r.payload.as_deref()) {
            let (_, mean, inv_std) = ScalerMsg::decode(r.payload.as_deref(), cfg.model.dim)
                .unwrap_or_else(|e| panic!("{labels_topic}@{}: invalid scaler: {e}", r.offset));
            if std::mem::take(&mut first_scaler) {
                assert!(
                    bits(&mean) == bits(&s.mean) && bits(&inv_std) == bits(&s.inv_std),
                    "the checkpoint's scaler is not the first proposal on {labels_topic}"
                );
            }
            continue;
        }
        let l = decoder
            .label(r.payload.as_deref())
            .unwrap_or_else(|e| panic!("{labels_topic}@{}: invalid label: {e}", r.offset));
        on_topic.push((l.request_id, l.y));
    }
    let key = |(id, y): &(String, f64)| (id.clone(), y.to_bits());
    let mut want: HashMap<(String, u64), i64> = HashMap::new();
    for l in sent {
        *want.entry(key(l)).or_default() += 1;
    }
    for l in &on_topic {
        *want.entry(key(l)).or_default() -= 1;
    }
    let off: Vec<_> = want.iter().filter(|(_, &c)| c != 0).take(5).collect();
    assert!(
        off.is_empty(),
        "labels on {labels_topic} differ from the labels sent ((id, y bits) → sent − on topic): {off:?}"
    );

    // Replay from scratch with the engine's cadence.
    let d = cfg.model.dim;
    let every = cfg.model.refit_every as usize;
    let PriorSetting::Fixed(lambda0) = cfg.model.prior_precision else {
        panic!("the replay check needs a fixed model.prior_precision (auto starts from the pool's scale)")
    };
    let mut replay = Posterior::new(d, lambda0).unwrap();
    let mut labelled: HashMap<&str, usize> = HashMap::new();
    let mut refits = 0;
    for (i, (id, y)) in on_topic.iter().enumerate() {
        let req = reqs.by_id.get(id).unwrap_or_else(|| {
            panic!("label {i} names request {id}, which is not on {requests_topic}")
        });
        let n = labelled.entry(id.as_str()).or_default();
        *n += 1;
        assert!(
            *n <= req.labels_wanted as usize,
            "request {id} has more labels on {labels_topic} than it wants ({})",
            req.labels_wanted
        );
        let xa = scaled(&req.a.embedding_b64, "a.embedding_b64", id);
        let xb = scaled(&req.b.embedding_b64, "b.embedding_b64", id);
        let v: Vec<f64> = xa.iter().zip(&xb).map(|(p, q)| p - q).collect();
        replay.update(&v, *y).unwrap();
        if refit_due(i as u64 + 1, every as u64) {
            replay.refit(RefitOptions::default()).unwrap();
            refits += 1;
        }
    }

    // The checkpoint applied exactly these labels, in this order.
    let parts = &ck.posterior;
    assert_eq!(
        parts.labels_applied,
        on_topic.len() as u64,
        "labels applied by the daemon vs labels on {labels_topic}"
    );
    assert_eq!(
        parts.labels.len(),
        on_topic.len(),
        "the checkpoint folded labels into its prior (consolidation); raise model.max_labels in the test"
    );
    let mine = replay.to_parts();
    for (i, (a, b)) in parts.labels.iter().zip(&mine.labels).enumerate() {
        assert!(
            a.y.to_bits() == b.y.to_bits()
                && a.v.len() == b.v.len()
                && a.v
                    .iter()
                    .zip(&b.v)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
            "stored label {i} of the checkpoint differs from label {i} of the replay ({})",
            on_topic[i].0
        );
    }
    let settled = settled_posterior(ck);
    let theta_rel_diff = rel_diff(settled.theta(), replay.theta());
    let log_det_rel_diff =
        (settled.log_det() - replay.log_det()).abs() / replay.log_det().abs().max(1e-300);
    assert!(
        theta_rel_diff <= 1e-9 && log_det_rel_diff <= 1e-9,
        "checkpoint vs from-scratch replay of {} labels: θ relative difference {theta_rel_diff:e}, \
         log det relative difference {log_det_rel_diff:e} (limit 1e-9)",
        on_topic.len()
    );
    ReplayReport {
        labels: on_topic.len(),
        requests: reqs.by_id.len(),
        republished: reqs.republished,
        sequences_reused: reqs.sequences_reused,
        refits,
        pending_refit: ck.pending_refit.is_some(),
        theta_rel_diff,
        log_det_rel_diff,
    }
}

/// Asserts that no message of the labels topic `t.labels` reached the dead-letter topic: no label was
/// lost (`unknown_request`, `expired_request`) or doubled (`duplicate_label`).
pub fn assert_no_label_dead_letters(bootstrap: &str, t: &super::Topics) {
    use armd::daemon::messages::DeadLetter;
    let label_dead_letters: Vec<DeadLetter> = read_topic(bootstrap, &t.dead_letter)
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<DeadLetter>(&r.payload?).ok())
        .filter(|dl| dl.source.topic == t.labels)
        .collect();
    assert!(
        label_dead_letters.is_empty(),
        "{} labels were dead-lettered, e.g. {:?}",
        label_dead_letters.len(),
        label_dead_letters.first().map(|d| (&d.reason, &d.detail))
    );
}
