//! Two daemon instances in one responses consumer group; one leaves and rejoins while labels flow.
//!
//! **How labels reach the posteriors when several instances run** (the design this test checks; see the
//! `daemon` module doc and README "Several instances"): the instances share the responses consumer group,
//! so each pools and selects from its share of the responses partitions, and each issues requests whose
//! ids carry its `daemon.instance_id`. Every instance reads *all* labels partitions from its own
//! checkpointed positions (no group management), applies the labels of its own requests and skips the
//! others' (`armd_labels_foreign_total`). Each instance is an independent learner of the pairs it chose;
//! there is no shared replica. A rebalance therefore moves only responses (soft state), never labels: a
//! label is applied by exactly the instance that issued its request, from that instance's checkpoint.
//!
//! The scenario: A and B start; the annotator answers every request; B shuts down gracefully (its
//! responses partition moves to A once B's static membership session expires — armd sets
//! `group.instance.id`, so a graceful leave does not rebalance before `session.timeout.ms`, 6 s here), A
//! issues requests from both partitions' new responses, B's in-flight requests get labelled while it is
//! down; B restarts from its checkpoint, rejoins (a second rebalance) and issues requests from new
//! responses of its partition.
//!
//! Checked per instance: labels applied == labels the annotator sent for requests with its instance id;
//! the checkpoint's stored labels are exactly those (multiset of scaled difference and outcome: none lost,
//! none twice); the foreign counter equals the other instance's labels it read; no request id is shared
//! between instances (nor published twice with different contents); both issued requests after the
//! rebalances.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::config::Config;
use armd::daemon::messages::{parse_request_id, LabelRequest};
use common::inprocess::*;
use common::*;
use rdkafka::message::Message;

const DIM: usize = 8;
const A: &str = "armd-ra";
const B: &str = "armd-rb";

fn instance_config(b: &str, t: &Topics, state: &Path, instance: &str) -> Config {
    let own_group = format!("group_id = \"{instance}-{}\"", t.responses);
    let text = config_text(b, t, state, DIM, instance)
        .replace(
            &own_group,
            &format!("group_id = \"shared-{}\"", t.responses),
        )
        .replace(
            "[log]",
            "[kafka.settings]\n\"session.timeout.ms\" = \"6000\"\n[log]",
        );
    assert!(text.contains("group_id = \"shared-"), "{text}");
    Config::from_toml_with_env(&text, &[]).unwrap()
}

/// Prompt id (`p<n>`) → responses partition, as the broker stored them.
fn prompt_partitions(b: &str, t: &Topics, n: usize) -> HashMap<String, i32> {
    let msgs = read_topic(b, &t.responses, n, Duration::from_secs(30));
    assert_eq!(msgs.len(), n, "responses on the topic");
    msgs.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            (v["prompt_id"].as_str().unwrap().to_string(), m.partition())
        })
        .collect()
}

fn prompts_of(samples: &[Sample]) -> BTreeSet<String> {
    samples.iter().map(|s| format!("p{}", s.prompt)).collect()
}

/// Requests of `instance` the annotator answered so far.
fn requests_of(annotator: &Annotator, instance: &str) -> Vec<LabelRequest> {
    annotator
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| r.instance_id == instance)
        .map(|(r, _)| r.clone())
        .collect()
}

/// Waits until `instance` has had a request answered that pairs responses of `prompts` from each of
/// `partitions`; the check that responses reached it after a rebalance.
fn wait_requests_from(
    annotator: &Annotator,
    instance: &str,
    prompts: &BTreeSet<String>,
    part_of: &HashMap<String, i32>,
    partitions: &[i32],
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got: BTreeSet<i32> = requests_of(annotator, instance)
            .iter()
            .filter(|r| prompts.contains(&r.a.prompt_id))
            .map(|r| part_of[&r.a.prompt_id])
            .collect();
        if partitions.iter().all(|p| got.contains(p)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{instance} issued requests from partitions {got:?} of the new responses, expected {partitions:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends batches of 5 prompts × 6 responses (their prompt ids added to `fed`) until `done(fed)`, checking
/// every 200 ms and sending the next batch every 3 s.
fn feed_until(
    b: &str,
    t: &Topics,
    world: &mut World,
    sent: &mut usize,
    fed: &mut BTreeSet<String>,
    mut done: impl FnMut(&BTreeSet<String>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let batch = world.prompts(5, 6);
        send_responses(b, &t.responses, &batch);
        *sent += batch.len();
        fed.extend(prompts_of(&batch));
        let next = Instant::now() + Duration::from_secs(3);
        while Instant::now() < next {
            if done(fed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            Instant::now() < deadline,
            "condition not met after feeding {sent} responses"
        );
    }
}

fn assert_counts(text: &str, want: &[(&str, usize)]) {
    for &(series, n) in want {
        assert_eq!(metric(text, series), Some(n as f64), "{series}");
    }
}

fn labels_for(log: &[(LabelRequest, f64)], instance: &str) -> Vec<(LabelRequest, f64)> {
    log.iter()
        .filter(|(r, _)| r.instance_id == instance)
        .cloned()
        .collect()
}

#[test]
fn two_instances_one_leaves_and_rejoins_every_label_applied_once_by_its_issuer() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "rebalance");
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cfg_a, cfg_b) = (
        instance_config(b, &t, state_a.path(), A),
        instance_config(b, &t, state_b.path(), B),
    );
    let da = start_in_process(cfg_a.clone()).wait_ready(Duration::from_secs(60));
    let db = start_in_process(cfg_b.clone()).wait_ready(Duration::from_secs(60));
    let mut world = World::new(DIM, 11);
    let mut sent = 0;

    // Phase 1: both instances share the responses; the annotator answers everything. Responses are fed in
    // small batches until both have applied labels (B's first assignment may come after A's).
    let mut annotator = Annotator::start(b, &t.requests, &t.labels, world.golden.clone(), 1.0);
    let applied = |d: &InProcess| {
        get(&format!("{}/metrics", d.base))
            .and_then(|(_, text)| metric(&text, "armd_model_labels_applied"))
            .unwrap_or(0.0)
    };
    feed_until(b, &t, &mut world, &mut sent, &mut BTreeSet::new(), |_| {
        applied(&da) >= 10.0 && applied(&db) >= 10.0
    });

    // Phase 2: B leaves (graceful); its partition moves to A once its session expires.
    db.shutdown().expect("B shuts down cleanly");
    let ck_b = Checkpoint::read(&cfg_b.checkpoint.path)
        .unwrap()
        .expect("B's checkpoint");
    let b_positions: BTreeMap<i32, i64> = ck_b.label_offsets.iter().copied().collect();
    let batch2 = world.prompts(20, 6);
    send_responses(b, &t.responses, &batch2);
    sent += batch2.len();
    let part_of = prompt_partitions(b, &t, sent);
    wait_requests_from(&annotator, A, &prompts_of(&batch2), &part_of, &[0, 1]);

    // Phase 3: B rejoins from its checkpoint; a second rebalance gives it a partition back. Responses are
    // fed until B pooled and paired some of them (A may take the first ones before the rebalance ends).
    let db = start_in_process(cfg_b.clone()).wait_ready(Duration::from_secs(60));
    let mut p3 = BTreeSet::new();
    feed_until(b, &t, &mut world, &mut sent, &mut p3, |new| {
        requests_of(&annotator, B)
            .iter()
            .any(|r| new.contains(&r.a.prompt_id))
    });
    // 20 more prompts, so that both partitions surely got new responses (5 could all hash to one).
    let more = world.prompts(20, 6);
    send_responses(b, &t.responses, &more);
    sent += more.len();
    p3.extend(prompts_of(&more));
    let part_of = prompt_partitions(b, &t, sent);
    let b_parts: Vec<i32> = requests_of(&annotator, B)
        .iter()
        .filter(|r| p3.contains(&r.a.prompt_id))
        .map(|r| part_of[&r.a.prompt_id])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        b_parts.len(),
        1,
        "after rejoining, B owns one of the two partitions"
    );
    let a_parts: Vec<i32> = (0..2).filter(|p| !b_parts.contains(p)).collect();
    wait_requests_from(&annotator, A, &p3, &part_of, &a_parts);
    annotator.stop();

    // Every label the annotator sent reaches exactly its issuer.
    let log = annotator.log.lock().unwrap().clone();
    let (mine_a, mine_b) = (labels_for(&log, A), labels_for(&log, B));
    assert_eq!(
        mine_a.len() + mine_b.len(),
        log.len(),
        "every request came from A or B"
    );
    wait_metric(
        &da.base,
        "armd_labels_received_total",
        Duration::from_secs(60),
        |v| v >= log.len() as f64,
    );
    let ta = wait_metric(
        &da.base,
        "armd_model_labels_applied",
        Duration::from_secs(30),
        |v| v >= mine_a.len() as f64,
    );
    let tb = wait_metric(
        &db.base,
        "armd_model_labels_applied",
        Duration::from_secs(60),
        |v| v >= mine_b.len() as f64,
    );
    assert_counts(&tb, &[("armd_model_labels_applied", mine_b.len())]);
    // A ran throughout: it read every label, applied its own and skipped B's.
    assert_counts(
        &ta,
        &[
            ("armd_model_labels_applied", mine_a.len()),
            ("armd_labels_received_total", log.len()),
            ("armd_labels_applied_total", mine_a.len()),
            ("armd_labels_foreign_total", mine_b.len()),
        ],
    );
    // B's second life read the labels from its checkpointed positions on: its own are applied (those
    // answered while it was down included), A's are foreign.
    let labels = read_topic(b, &t.labels, log.len(), Duration::from_secs(30));
    assert_eq!(labels.len(), log.len(), "labels on the topic");
    let (mut after_b_own, mut after_b_foreign) = (0u64, 0u64);
    for m in &labels {
        if m.offset() < b_positions.get(&m.partition()).copied().unwrap_or(0) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let id = v["request_id"].as_str().unwrap();
        match parse_request_id(id) {
            Some((i, _)) if i == B => after_b_own += 1,
            Some((i, _)) if i == A => after_b_foreign += 1,
            other => panic!("label for {id} ({other:?})"),
        }
    }
    let tb = wait_metric(
        &db.base,
        "armd_labels_received_total",
        Duration::from_secs(30),
        |v| v >= (after_b_own + after_b_foreign) as f64,
    );
    assert_counts(
        &tb,
        &[
            (
                "armd_labels_received_total",
                (after_b_own + after_b_foreign) as usize,
            ),
            ("armd_labels_applied_total", after_b_own as usize),
            ("armd_labels_foreign_total", after_b_foreign as usize),
        ],
    );
    for text in [&ta, &tb] {
        for line in text
            .lines()
            .filter(|l| l.starts_with("armd_labels_rejected_total{"))
        {
            assert!(line.ends_with(" 0"), "unexpected label rejection: {line}");
        }
    }

    // The checkpoints hold exactly each instance's labels.
    da.shutdown().expect("A shuts down cleanly");
    db.shutdown().expect("B shuts down cleanly");
    for (cfg, mine, name) in [(&cfg_a, &mine_a, A), (&cfg_b, &mine_b, B)] {
        let ck = Checkpoint::read(&cfg.checkpoint.path)
            .unwrap()
            .expect("checkpoint");
        assert_eq!(ck.posterior.labels_applied, mine.len() as u64, "{name}");
        if let Some(diff) = stored_labels_differ(&ck, mine) {
            panic!("{name}: stored labels differ from the labels sent for its requests: {diff}");
        }
    }

    // Request ids: each names its issuer, none is shared, none was published twice with other contents.
    let requests = read_topic(b, &t.requests, log.len(), Duration::from_secs(30));
    let mut by_id: HashMap<String, (String, Vec<u8>)> = HashMap::new();
    for m in &requests {
        let r: LabelRequest = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(
            parse_request_id(&r.request_id).map(|p| p.0),
            Some(r.instance_id.as_str())
        );
        let body = m.payload().unwrap().to_vec();
        if let Some((inst, old)) =
            by_id.insert(r.request_id.clone(), (r.instance_id.clone(), body.clone()))
        {
            assert_eq!(
                (inst.as_str(), &old),
                (r.instance_id.as_str(), &body),
                "{} republished differently",
                r.request_id
            );
        }
    }
    let ids = |i: &str| -> BTreeSet<&String> {
        by_id
            .iter()
            .filter(|(_, v)| v.0 == i)
            .map(|(k, _)| k)
            .collect()
    };
    assert!(ids(A).is_disjoint(&ids(B)));
    assert!(log.iter().all(|(r, _)| by_id.contains_key(&r.request_id)));
    eprintln!(
        "A applied {} labels (skipped {} foreign), B applied {} ({} after its restart); {} requests",
        mine_a.len(),
        mine_b.len(),
        mine_b.len(),
        after_b_own,
        by_id.len()
    );
}
