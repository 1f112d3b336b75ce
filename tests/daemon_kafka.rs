//! `armd run` against a real Kafka broker (ARMD_TEST_BROKERS, or one started with `.ci/kafka.sh`).
//!
//! - In-process daemon: responses in → requests out → simulated annotator → labels applied; the model's
//!   per-prompt Spearman against the golden reward improves; bad input is dead-lettered and counted; a
//!   graceful restart resumes from the checkpoint and every label is applied exactly once.
//! - Child process: `kill -9` mid-run, restart; the final checkpoint holds exactly the labels the
//!   annotator sent (no loss, no double application); SIGTERM exits 0.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::messages::{decode_f32_b64, DeadLetter};
use armd::features::Scaler;
use common::in_process::start_in_process;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn wait_ready(base: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, _)) = get(&format!("{base}/readyz")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon at {base} not ready within {timeout:?}: {:?}",
            get(&format!("{base}/readyz"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dead_letters(bootstrap: &str, topic: &str, n: usize) -> Vec<DeadLetter> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("dlq-reader-{topic}"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    drop(tpl);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
        }
    }
    out
}

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_armd(config: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_armd"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn armd")
}

#[test]
fn kill_9_mid_run_loses_no_label_and_applies_none_twice() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "crash");
    let state = tempfile::tempdir().unwrap();
    let dim = 12;
    let port = free_port();
    let text = config_text(b, &t, state.path(), dim, "armd-crash").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let cfg_path = state.path().join("armd.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let log = state.path().join("armd.log");
    let base = format!("http://127.0.0.1:{port}");
    let mut world = World::new(dim, 2);

    let mut child = spawn_armd(&cfg_path, &log);
    wait_ready(&base, Duration::from_secs(60));
    send_responses(b, &t.responses, &world.prompts(40, 6));
    let mut annotator = Annotator::start(b, &t.requests, &t.labels, world.golden.clone(), 1.0);
    wait_metric(
        &base,
        "armd_model_labels_applied",
        Duration::from_secs(60),
        |v| v >= 40.0,
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = spawn_armd(&cfg_path, &log);
    wait_ready(&base, Duration::from_secs(60));
    send_responses(b, &t.responses, &world.prompts(40, 6));
    let deadline = Instant::now() + Duration::from_secs(90);
    while annotator.sent() < 120 {
        assert!(
            Instant::now() < deadline,
            "annotator only sent {} labels",
            annotator.sent()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    annotator.stop();
    let sent = annotator.sent();
    wait_metric(
        &base,
        "armd_model_labels_applied",
        Duration::from_secs(30),
        |v| v >= sent as f64,
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "armd exited with {exit:?}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The checkpoint holds exactly the labels sent: same count, and the same (v, y) multiset.
    let ck = Checkpoint::read(&state.path().join("armd.ckpt"))
        .unwrap()
        .unwrap();
    assert_eq!(ck.posterior.labels_applied, sent);
    assert_eq!(ck.posterior.labels.len() as u64, sent);
    let s = ck.scaler.as_ref().unwrap();
    let scaler = Scaler::from_parts(s.mean.clone(), s.inv_std.clone(), s.scaling).unwrap();
    let key = |v: &[f64], y: f64| {
        let mut k: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
        k.push(y.to_bits());
        k
    };
    let mut want: HashMap<Vec<u64>, i32> = HashMap::new();
    for (req, y) in annotator.log.lock().unwrap().iter() {
        let xa = scaler
            .transform_vec(&decode_f32_b64("a", &req.a.embedding_b64).unwrap())
            .unwrap();
        let xb = scaler
            .transform_vec(&decode_f32_b64("b", &req.b.embedding_b64).unwrap())
            .unwrap();
        let v: Vec<f64> = xa.iter().zip(&xb).map(|(p, q)| p - q).collect();
        *want.entry(key(&v, *y)).or_default() += 1;
    }
    for l in &ck.posterior.labels {
        *want.entry(key(&l.v, l.y)).or_default() -= 1;
    }
    assert!(
        want.values().all(|&c| c == 0),
        "stored labels differ from the labels sent"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("checkpoint loaded"), "{log_text}");
}

/// The live `/metrics` scrape (counters, gauges and histograms with real observations) must pass
/// `promtool check metrics`. promtool comes from `.ci/run`; locally the check is skipped without it.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI"
        );
        eprintln!("promtool not found: skipping the exposition check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the live scrape (exit {:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
