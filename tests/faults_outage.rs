//! Broker outage: the `armd` binary runs as a child process against a broker this test owns (not the
//! shared CI broker), with responses flowing and an annotator answering. The broker is stopped for
//! [`OUTAGE_SECS`] mid-run. Throughout the outage the daemon process must stay alive, `/healthz` answer 200,
//! and — once the clients noticed — `/readyz` answer 503 and `armd_broker_up` read 0 at every poll. The
//! broker is then started again on the same port with the same data: `/readyz` must return to 200,
//! labels must keep being applied, and at the end (SIGTERM, exit 0) every label sent was applied
//! exactly once and the posterior equals a from-scratch replay of the labels topic (`common::replay`:
//! the same check as without an outage; one labels partition, see there).

mod common;

use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::config::Config;
use armd::daemon::messages::DeadLetter;
use common::process::{child_setup, Armd, ChildSetup, OwnedBroker};
use common::replay;
use common::stream::{stop_and_wait_until_all_applied, Feeder, SlowAnnotator};
use common::*;

const DIM: usize = 32;
/// Longer than librdkafka's default consumer-group session timeout (45 s): the responses consumer's
/// session expires during the outage (which once left it fenced for good, see `ingest::run`).
const OUTAGE_SECS: u64 = 50;
/// How long the clients may take to notice that the broker is gone.
const NOTICE: Duration = Duration::from_secs(20);

#[test]
fn broker_outage_keeps_the_daemon_up_not_ready_and_loses_no_label() {
    let started = Instant::now();
    // `ARMD_OUTAGE_SECS` lengthens the outage (e.g. past the 45 s consumer-group session timeout).
    let outage_len = Duration::from_secs(
        std::env::var("ARMD_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(OUTAGE_SECS)
            .max(OUTAGE_SECS),
    );
    let broker = OwnedBroker::start();
    let b = broker.bootstrap.as_str();
    let ChildSetup {
        topics: t,
        state,
        config_text: text,
        config_path: cfg_path,
        port,
    } = child_setup(b, "outage", DIM, "armd-outage");
    let cfg = Config::from_toml_with_env(&text, &[]).unwrap();
    let log = state.path().join("armd.log");

    let mut d = Armd::spawn(&cfg_path, port, &log, &[]);
    d.wait_ready(Duration::from_secs(60));
    let world = World::new(DIM, 7);
    let golden = world.golden.clone();
    let mut feeder = Feeder::start(b, &t.responses, world, 4, Duration::from_millis(100));
    let mut annotator = SlowAnnotator::start(
        b,
        &t,
        golden,
        Duration::from_millis(50)..Duration::from_millis(500),
        7,
    );
    let before = wait_metric(
        &d.base,
        "armd_model_labels_applied",
        Duration::from_secs(60),
        |v| v >= 30.0,
    );
    let applied_before = metric(&before, "armd_model_labels_applied").unwrap();

    // Outage.
    let stop_began = Instant::now();
    broker.stop();
    let broker_stop = stop_began.elapsed();
    let down_at = Instant::now();
    let (mut polls, mut not_ready_polls) = (0, 0);
    let mut noticed: Option<Duration> = None;
    while down_at.elapsed() < outage_len {
        assert!(
            d.exited().is_none(),
            "armd exited during the broker outage; log:\n{}",
            d.log_text()
        );
        let health = get(&format!("{}/healthz", d.base));
        assert!(
            matches!(health, Some((200, _))),
            "/healthz during the outage: {health:?}"
        );
        let ready = get(&format!("{}/readyz", d.base)).expect("/readyz answers");
        let up = get(&format!("{}/metrics", d.base))
            .and_then(|(_, m)| metric(&m, "armd_broker_up"))
            .expect("armd_broker_up");
        polls += 1;
        if noticed.is_none() && ready.0 == 503 {
            noticed = Some(down_at.elapsed());
        }
        if noticed.is_some() {
            // Once noticed, not ready at every poll until the broker is back.
            assert_eq!(
                ready.0,
                503,
                "/readyz during the outage ({:?} in): {}",
                down_at.elapsed(),
                ready.1
            );
            assert!(
                ready.1.contains("broker disconnected"),
                "/readyz reason: {}",
                ready.1
            );
            assert_eq!(up, 0.0, "armd_broker_up during the outage");
            not_ready_polls += 1;
        } else {
            assert!(
                down_at.elapsed() < NOTICE,
                "/readyz still {} {NOTICE:?} into the outage",
                ready.0
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let outage = down_at.elapsed();

    // Back.
    let restart_began = Instant::now();
    broker.restart();
    let broker_start = restart_began.elapsed();
    let back_at = Instant::now();
    d.wait_ready(Duration::from_secs(90));
    let reconnect = back_at.elapsed();
    wait_metric(&d.base, "armd_broker_up", Duration::from_secs(10), |v| {
        v == 1.0
    });
    // Labels keep being applied after the outage.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let m = get(&format!("{}/metrics", d.base)).map(|(_, m)| m);
        let applied = m
            .as_deref()
            .and_then(|m| metric(m, "armd_model_labels_applied"));
        if applied.is_some_and(|v| v >= applied_before + 30.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "labels stopped after the outage: {applied:?} applied ({applied_before} before it), the \
             annotator sent {}; metrics:\n{}\nlog:\n{}",
            annotator.sent(),
            m.unwrap_or_default(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let (sent, text) = stop_and_wait_until_all_applied(&d.base, &mut feeder, &mut annotator);
    for line in text
        .lines()
        .filter(|l| l.starts_with("armd_labels_rejected_total{"))
    {
        assert!(line.ends_with(" 0"), "a label was rejected: {line}");
    }
    let exit = d.terminate(Duration::from_secs(60));
    assert!(
        exit.success(),
        "armd exited with {exit} after SIGTERM; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let label_dead_letters = replay::read_topic(b, &t.dead_letter)
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<DeadLetter>(&r.payload?).ok())
        .filter(|dl| dl.source.topic == t.labels)
        .count();
    assert_eq!(label_dead_letters, 0, "labels dead-lettered");

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let replaced = log_text
        .matches("responses consumer failed fatally; replacing it")
        .count();
    let ck = Checkpoint::read(&cfg.checkpoint.path)
        .unwrap()
        .expect("final checkpoint");
    let sent_log = annotator.log.lock().unwrap().clone();
    let report = replay::check(b, &t.requests, &t.labels, &cfg, &ck, &sent_log);
    assert_eq!(report.labels as u64, sent);
    eprintln!(
        "faults_outage: broker stop took {:.1} s, then down {:.1} s; /readyz 503 after {:.1} s and at all {not_ready_polls} of \
         {polls} polls from then on; broker restart took {:.1} s, armd ready {:.1} s after that; responses consumer replaced after a fatal error {replaced} time(s); {applied_before} labels \
         before the outage, {sent} sent and applied once in all; replay θ rel diff {:e}, log det rel diff \
         {:e}; {:.0} s",
        broker_stop.as_secs_f64(),
        outage.as_secs_f64(),
        noticed.expect("noticed").as_secs_f64(),
        broker_start.as_secs_f64(),
        reconnect.as_secs_f64(),
        report.theta_rel_diff,
        report.log_det_rel_diff,
        started.elapsed().as_secs_f64()
    );
}
