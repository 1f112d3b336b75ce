//! Scale-out: three `armd run` processes in one consumer group hold **one** model.
//!
//! The design under test (README "Scale-out"): responses are partitioned across the instances (each pools
//! and selects from its share), but every instance reads the whole requests topic and the whole labels
//! topic and applies every label, in the labels topic's order, to its own replica of the posterior. The
//! feature scaling is the group's: the first `armd.scaler.v1` proposal on the labels topic.
//!
//! One scenario, against Apache Kafka: a six-partition responses topic, three requests partitions, one
//! labels partition, a response feeder and an annotator answering every instance's requests after a
//! random delay. While labels flow, instance C is killed with `kill -9` and restarted; later instance B is
//! killed with `kill -9` and never comes back. At the end (≥ 1,000 labels):
//! - A and C each applied every label sent — B's included, also those answered after B died — exactly
//!   once, and each one's θ equals a from-scratch replay of all labels within 1e-9 relative
//!   (`replay::check`: same scaler as the first proposal on the topic, same stored labels bit for bit);
//! - B's responses partitions were taken over: the survivors' consumer group committed every one of the
//!   six partitions past where it stood after B's session expired;
//! - no two requests were ever open on the same pair at once (a pair asked again only after the earlier
//!   request closed), no request id names two pairs, no label was dead-lettered.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::config::Config;
use armd::daemon::messages::LabelRequest;
use common::process::*;
use common::replay;
use common::stream::*;
use common::*;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const DIM: usize = 8;
const RESPONSE_PARTITIONS: i32 = 6;
const SESSION_TIMEOUT_MS: u64 = 6000;
const LABELS_WANTED: u64 = 1000;

/// Creates `<name>-<n>p` with `n` partitions and returns its name.
fn topic_with_partitions(b: &str, name: &str, n: i32) -> String {
    let topic = format!("{name}-{n}p");
    let (admin, rt) = admin(b);
    for r in rt
        .block_on(admin.create_topics(
            &[NewTopic::new(&topic, n, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .expect("create topic")
    {
        r.expect("topic created");
    }
    topic
}

struct Instance {
    id: String,
    cfg: Config,
    config_path: PathBuf,
    port: u16,
    log: PathBuf,
}

fn instance(b: &str, t: &Topics, dir: &std::path::Path, id: &str, group: &str) -> Instance {
    std::fs::create_dir_all(dir).unwrap();
    let text = config_text(b, t, dir, DIM, id)
        .replace(
            &format!("group_id = \"{id}-{}\"", t.responses),
            &format!("group_id = \"{group}\""),
        )
        .replace(
            "[log]",
            &format!("[kafka.settings]\n\"session.timeout.ms\" = \"{SESSION_TIMEOUT_MS}\"\n[log]"),
        );
    assert!(text.contains(&format!("group_id = \"{group}\"")));
    let (text, port) = with_fixed_port(&text);
    let config_path = dir.join("armd.toml");
    std::fs::write(&config_path, &text).unwrap();
    Instance {
        id: id.to_string(),
        cfg: Config::from_toml_with_env(&text, &[]).unwrap(),
        config_path,
        port,
        log: dir.join("armd.log"),
    }
}

fn spawn(i: &Instance) -> Armd {
    let mut d = Armd::spawn(
        &i.config_path,
        i.port,
        &i.log,
        &[("RUST_LOG", "armd=info,warn")],
    );
    d.wait_ready(Duration::from_secs(60));
    d
}

fn applied(d: &Armd) -> f64 {
    get(&format!("{}/metrics", d.base))
        .and_then(|(_, text)| metric(&text, "armd_model_labels_applied"))
        .unwrap_or(0.0)
}

/// The metrics a failure report needs.
fn snapshot(d: &Armd) -> String {
    let text = get(&format!("{}/metrics", d.base))
        .map(|r| r.1)
        .unwrap_or_default();
    [
        "armd_model_labels_applied",
        "armd_labels_held",
        "armd_requests_in_flight",
        "armd_requests_open_group",
        "armd_requests_emitted_total",
        "armd_pool_responses",
        "armd_labels_foreign_total",
    ]
    .iter()
    .map(|m| format!("{m}={:?}", metric(&text, m)))
    .collect::<Vec<_>>()
    .join(" ")
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Committed offsets of the responses consumer group, per partition (-1 when none).
fn committed(b: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", group)
        .create()
        .expect("offsets reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..RESPONSE_PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..RESPONSE_PARTITIONS)
        .map(|p| {
            let o = match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            };
            (p, o)
        })
        .collect()
}

fn high_watermarks(b: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .create()
        .expect("watermarks reader");
    (0..RESPONSE_PARTITIONS)
        .map(|p| {
            let (_, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, hi)
        })
        .collect()
}

#[test]
fn three_instances_hold_one_model_through_a_crash_and_the_loss_of_one() {
    let started = Instant::now();
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let mut t = create_topics(b, "scale-out");
    t.responses = topic_with_partitions(b, &t.responses, RESPONSE_PARTITIONS);
    t.requests = topic_with_partitions(b, &t.requests, 3);
    one_labels_partition(b, &mut t);
    let state = tempfile::tempdir().unwrap();
    let group = format!("shared-{}", t.responses);
    let inst: Vec<Instance> = ["armd-sa", "armd-sb", "armd-sc"]
        .iter()
        .map(|id| instance(b, &t, &state.path().join(id), id, &group))
        .collect();
    let a = spawn(&inst[0]);
    let bb = spawn(&inst[1]);
    let mut c = spawn(&inst[2]);

    let (mut feeder, mut annotator) = labelled_stream(
        b,
        &t,
        DIM,
        31,
        Duration::from_millis(200)..Duration::from_millis(800),
    );
    // Phase 1: all three select and learn.
    wait_until(
        "labels applied on every instance",
        Duration::from_secs(120),
        || annotator.sent() >= 250 && [&a, &bb, &c].iter().all(|d| applied(d) >= 100.0),
    );

    // Phase 2: C is killed mid-stream and restarted from its checkpoint.
    c.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    c = spawn(&inst[2]);
    wait_until("more labels", Duration::from_secs(120), || {
        annotator.sent() >= 500
    });

    // Phase 3: B is killed for good while the annotator holds back answers to some of its requests;
    // they are answered after B died, and A and C must apply those labels. B's partitions move to A and
    // C once its session expires.
    annotator.hold(Some("armd-sb-"));
    wait_until(
        "answers to B's requests held back",
        Duration::from_secs(60),
        || annotator.held() >= 3,
    );
    let b_requests_before = annotator
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| id.starts_with("armd-sb-"))
        .count();
    for d in [&a, &bb, &c] {
        eprintln!("before the kill: {} {}", d.base, snapshot(d));
    }
    bb.kill9();
    let killed_at = Instant::now();
    annotator.hold(None);
    std::thread::sleep(Duration::from_millis(SESSION_TIMEOUT_MS + 4000));
    let marks_after_takeover = high_watermarks(b, &t.responses);
    wait_until(
        &format!("{LABELS_WANTED} labels"),
        Duration::from_secs(240),
        || annotator.sent() >= LABELS_WANTED,
    );
    // The survivors consume all six partitions: the group's committed offsets pass the ends that were
    // current after B's session expired.
    wait_until(
        "the survivors to consume every responses partition",
        Duration::from_secs(60),
        || {
            let now = committed(b, &group, &t.responses);
            marks_after_takeover
                .iter()
                .all(|(p, hi)| now.get(p).is_some_and(|&o| o >= *hi))
        },
    );

    // The end: every label sent is applied once by A and by C.
    feeder.stop();
    annotator.stop();
    let sent = annotator.sent();
    let log = annotator.log.lock().unwrap().clone();
    let for_b = log
        .iter()
        .filter(|(id, _)| id.starts_with("armd-sb-"))
        .count();
    assert!(
        for_b > b_requests_before,
        "some of B's requests were answered after B died ({b_requests_before} before, {for_b} in all)"
    );
    for d in [&a, &c] {
        let text = wait_all_applied(&d.base, sent);
        assert!(metric(&text, "armd_labels_foreign_total").unwrap_or(0.0) > 0.0);
    }
    let status_a = a.terminate(Duration::from_secs(60));
    let status_c = c.terminate(Duration::from_secs(60));
    assert!(
        status_a.success() && status_c.success(),
        "{status_a:?} {status_c:?}"
    );

    // One model: each survivor's checkpoint equals a from-scratch replay of every label on the topic.
    let sent_pairs: Vec<(String, f64)> = log.clone();
    let mut thetas = Vec::new();
    for i in [&inst[0], &inst[2]] {
        let ck = Checkpoint::read(&i.cfg.checkpoint.path)
            .unwrap()
            .expect("checkpoint");
        let r = replay::check(b, &t.requests, &t.labels, &i.cfg, &ck, &sent_pairs);
        eprintln!("{}: {r:?}", i.id);
        assert_eq!(r.labels as u64, sent);
        thetas.push(ck.posterior.theta.clone());
    }
    let diff: f64 = thetas[0]
        .iter()
        .zip(&thetas[1])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    eprintln!("max |θ_A − θ_C| = {diff:e}");
    replay::assert_no_label_dead_letters(b, &t);

    // No pair was open twice at once: a pair asked again only after its earlier request closed.
    let requests: Vec<(LabelRequest, i64)> = replay::read_topic(b, &t.requests)
        .into_iter()
        .map(|r| {
            (
                serde_json::from_slice::<LabelRequest>(&r.payload.unwrap()).unwrap(),
                r.timestamp_ms,
            )
        })
        .collect();
    let mut closed_at: HashMap<String, i64> = HashMap::new();
    for r in replay::read_topic(b, &t.labels) {
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        if let Some(id) = v["request_id"].as_str() {
            closed_at.entry(id.to_string()).or_insert(r.timestamp_ms);
        }
    }
    let mut by_pair: HashMap<[String; 2], Vec<&LabelRequest>> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for (r, _) in &requests {
        if !ids.insert(r.request_id.clone()) {
            continue; // re-published (same id, same pair: checked by replay::check)
        }
        let mut k = [
            format!("{}/{}", r.a.prompt_id, r.a.response_id),
            format!("{}/{}", r.b.prompt_id, r.b.response_id),
        ];
        k.sort();
        by_pair.entry(k).or_default().push(r);
    }
    let mut asked_again = 0;
    for (pair, mut rs) in by_pair {
        rs.sort_by_key(|r| r.issued_at_ms);
        for w in rs.windows(2) {
            asked_again += 1;
            let end = closed_at
                .get(&w[0].request_id)
                .copied()
                .unwrap_or(w[0].expires_at_ms);
            assert!(
                w[1].issued_at_ms >= end,
                "pair {pair:?} open twice: {} (closed at {end}) and {} (issued at {})",
                w[0].request_id,
                w[1].request_id,
                w[1].issued_at_ms
            );
        }
    }
    let per_instance = |p: &str| ids.iter().filter(|id| id.starts_with(p)).count();
    eprintln!(
        "scale_out: {sent} labels, {} requests (A {}, B {}, C {}), {asked_again} pairs asked again after closing, \
         B killed {:.0} s before the end, {:.0} s in all",
        ids.len(),
        per_instance("armd-sa-"),
        per_instance("armd-sb-"),
        per_instance("armd-sc-"),
        killed_at.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
