//! `armd run` against a real Kafka broker (ARMD_TEST_BROKERS, or one started with `.ci/kafka.sh`).
//!
//! - In-process daemon: responses in → requests out → simulated annotator → labels applied; the model's
//!   per-prompt Spearman against the golden reward improves; bad input is dead-lettered and counted; a
//!   graceful restart resumes from the checkpoint and every label is applied exactly once.
//!
//! The child-process crash test (`kill -9` at many moments, replay from scratch) is `tests/faults_crash.rs`.

mod common;

use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use common::inprocess::*;
use common::*;

#[test]
fn daemon_learns_from_annotators_dead_letters_bad_input_and_resumes_after_restart() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "learn");
    let state = tempfile::tempdir().unwrap();
    let dim = 16;
    let cfg = config(b, &t, state.path(), dim, "armd-learn");
    let mut world = World::new(dim, 1);
    let train = world.prompts(50, 6);
    let test = world.prompts(40, 6);

    let d = start_in_process(cfg.clone()).wait_ready(Duration::from_secs(60));
    send_responses(b, &t.responses, &train);
    let p = producer(b);
    send(
        &p,
        &t.responses,
        "bad",
        b"{\"schema\": \"armd.response.v1\", ",
    );
    let wrong_dim = serde_json::json!({"schema": "armd.response.v1", "prompt_id": "x", "response_id": "y", "embedding": [1.0, 2.0]});
    send(&p, &t.responses, "bad", wrong_dim.to_string().as_bytes());
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(10)).unwrap();

    let mut annotator = Annotator::start(b, &t.requests, &t.labels, world.golden.clone(), 1.0);
    let export_dir = state.path().join("model");
    // Early model: the first export after at least 10 labels.
    let deadline = Instant::now() + Duration::from_secs(60);
    let early = loop {
        if let Some((w, bias, n)) = exported_model(&export_dir) {
            if n >= 10 {
                break spearman_of(&w, bias, &test);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no model exported after 10 labels"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = wait_metric(
        &d.base,
        "armd_model_labels_applied",
        Duration::from_secs(60),
        |v| v >= 60.0,
    );
    assert_eq!(
        metric(
            &text,
            "armd_responses_rejected_total{reason=\"invalid_json\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "armd_responses_rejected_total{reason=\"wrong_dimension\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "armd_responses_received_total"), Some(302.0));
    assert!(metric(&text, "armd_requests_emitted_total").unwrap() >= 60.0);
    assert!(metric(&text, "armd_candidate_pairs_scored_total").unwrap() > 0.0);
    assert!(metric(&text, "armd_requests_in_flight").unwrap() <= 16.0);
    assert_eq!(metric(&text, "armd_scaler_frozen"), Some(1.0));
    assert_eq!(metric(&text, "armd_broker_up"), Some(1.0));
    promtool_check_metrics(&text);
    assert!(text.contains("armd_label_latency_seconds_count"));
    let dls = dead_letters(b, &t.dead_letter, 2);
    let mut reasons: Vec<&str> = dls.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["invalid_json", "wrong_dimension"]);
    assert!(dls
        .iter()
        .all(|d| d.source.topic == t.responses && d.payload.is_some()));

    // Graceful restart mid-run: the annotator keeps answering while the daemon is down.
    d.shutdown().expect("clean shutdown");
    let ck = Checkpoint::read(&cfg.checkpoint.path)
        .unwrap()
        .expect("final checkpoint");
    let applied_before = ck.posterior.labels_applied;
    assert!(applied_before >= 60);
    let d = start_in_process(cfg.clone()).wait_ready(Duration::from_secs(60));
    let text = wait_metric(
        &d.base,
        "armd_model_labels_applied",
        Duration::from_secs(5),
        |v| v >= applied_before as f64,
    );
    assert!(metric(&text, "armd_labels_applied_total").unwrap() <= annotator.sent() as f64);
    // The pool is soft state: new responses feed the restarted daemon.
    let more = world.prompts(50, 6);
    send_responses(b, &t.responses, &more);
    let deadline = Instant::now() + Duration::from_secs(90);
    while annotator.sent() < 180 {
        assert!(
            Instant::now() < deadline,
            "annotator only sent {} labels",
            annotator.sent()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    annotator.stop();
    let sent = annotator.sent() as f64;
    // Exactly once: the model's lifetime label count equals what the annotator sent.
    let text = wait_metric(
        &d.base,
        "armd_model_labels_applied",
        Duration::from_secs(30),
        |v| v >= sent,
    );
    assert_eq!(
        metric(&text, "armd_model_labels_applied"),
        Some(sent),
        "{text}"
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("armd_labels_rejected_total{"))
    {
        assert!(line.ends_with(" 0"), "unexpected label rejection: {line}");
    }
    d.shutdown().expect("clean shutdown");
    let (w, bias, n) = exported_model(&export_dir).unwrap();
    assert_eq!(n as f64, sent);
    let fin = spearman_of(&w, bias, &test);
    assert!(
        fin > 0.7 && fin > early + 0.1,
        "held-out Spearman early {early:.3}, final {fin:.3}"
    );
    eprintln!(
        "held-out per-prompt Spearman: early {early:.3} → final {fin:.3} after {sent} labels"
    );
}

/// The quick start on a fresh broker: `armd topics create` makes the five topics with the documented
/// partitions and retention (a second run leaves them alone and says so), and `armd run` then becomes
/// ready instead of waiting for its topics.
#[test]
fn topics_create_prepares_a_fresh_broker_for_armd_run() {
    use rdkafka::admin::{AdminOptions, ResourceSpecifier};
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = topic_names("topics-cli");
    let state = tempfile::tempdir().unwrap();
    let (text, port) =
        common::process::with_fixed_port(&config_text(b, &t, state.path(), 8, "armd-topics"));
    let cfg_path = state.path().join("armd.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let create = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_armd"))
            .args(["topics", "create", "--response-partitions", "3", "--config"])
            .arg(&cfg_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "armd topics create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = create();
    assert_eq!(first.lines().count(), 5, "{first}");
    assert!(first.lines().all(|l| l.ends_with("created")), "{first}");

    let md_client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", b)
        .create()
        .unwrap();
    let partitions = |topic: &str| {
        let md = md_client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0].partitions().len()
    };
    assert_eq!(partitions(&t.responses), 3);
    assert_eq!(partitions(&t.labels), 1);
    assert_eq!(partitions(&t.models), 1);
    let (admin, rt) = admin(b);
    let setting = |topic: &str, key: &str| -> String {
        let r = rt
            .block_on(
                admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new()),
            )
            .unwrap();
        let res = r.into_iter().next().unwrap().unwrap();
        res.get(key)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        setting(&t.labels, "retention.ms"),
        "-1",
        "labels are kept forever"
    );
    assert_eq!(setting(&t.models, "cleanup.policy"), "compact");
    assert_eq!(
        setting(&t.requests, "retention.ms"),
        "-1",
        "requests are kept as long as the labels that need them"
    );

    let second = create();
    assert!(
        second.lines().all(|l| l.contains("exists (left as is)")),
        "{second}"
    );

    let log = state.path().join("armd.log");
    let mut d = common::process::Armd::spawn(&cfg_path, port, &log, &[]);
    d.wait_ready(Duration::from_secs(60));
    let exit = d.terminate(Duration::from_secs(30));
    assert!(exit.success(), "armd exited with {exit}");
}
