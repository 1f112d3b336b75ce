//! Engine rules without Kafka: the engine is driven with messages and a clock.

use super::*;
use crate::daemon::learner::precision_diagonal;
use crate::daemon::messages::{parse_request_id, Metadata, LABEL_SCHEMA};
use crate::daemon::telemetry::Telemetry;
use crate::posterior::{EvidenceOptions, RefitOptions};
use rand::Rng;

const D: usize = 6;

fn cfg(extra: &str) -> Arc<Config> {
    let base = format!(
        "[model]\ndim = {D}\nwarmup_samples = 12\nrefit_every = 0\nprior_precision = 1.0\n\
         [selection]\nbatch_size = 3\nmax_in_flight = 5\nmin_pool = 4\nround_interval_ms = 10\n\
         request_ttl_secs = 100\nexpiry_grace_secs = 50\ncandidates = \"both\"\n\
         [pool]\nttl_secs = 1000\n[export]\npublish = true\n"
    );
    // Later keys of the same section override: merge by appending the extra TOML as env-style overrides.
    let mut env = Vec::new();
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.split_once('=').expect("key = value");
        env.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Config::from_toml_with_env(&base, &env).unwrap();
    c.export.dir = None;
    Arc::new(c)
}

/// A fresh engine whose requests topic is read to its end for good (no label is held).
fn engine(c: &Arc<Config>) -> Engine {
    let mut e = Engine::new(c.clone(), Telemetry::new().metrics, None).unwrap();
    e.on_requests_caught_up(i64::MAX);
    e
}

/// Adopts the engine's own scaling proposal once it has one (a group of one).
fn settle(e: &mut Engine, now_ms: i64) {
    if !e.scaler_adopted() && e.learner.proposal().is_some() {
        adopt_own_proposal(e, now_ms);
    }
}

struct World {
    rng: StdRng,
    truth: Vec<f64>,
    next: u64,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let truth = (0..D).map(|_| rng.random_range(-2.0..2.0)).collect();
        Self {
            rng,
            truth,
            next: 0,
        }
    }
    fn response(&mut self, prompt: u64) -> Response {
        self.next += 1;
        Response {
            prompt_id: format!("p{prompt}").into(),
            response_id: format!("r{}", self.next).into(),
            embedding: (0..D)
                .map(|_| self.rng.random_range(-3.0f32..3.0) + 10.0)
                .collect(),
            metadata: Metadata::from_value(&serde_json::json!({"n": self.next})),
        }
    }
    fn reward(&self, x: &[f32]) -> f64 {
        x.iter()
            .zip(&self.truth)
            .map(|(a, b)| f64::from(*a) * b)
            .sum()
    }
    /// Bernoulli annotator on the golden reward gap.
    fn answer(&mut self, req: &LabelRequest) -> f64 {
        let a = messages::decode_f32_b64("a", &req.a.embedding_b64).unwrap();
        let b = messages::decode_f32_b64("b", &req.b.embedding_b64).unwrap();
        let p = crate::linalg::sigmoid(self.reward(&a) - self.reward(&b));
        if self.rng.random::<f64>() < p {
            1.0
        } else {
            0.0
        }
    }
}

fn requests(out: Vec<Output>) -> Vec<LabelRequest> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Request(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn dead_letters(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::DeadLetter(d) => Some(d.reason.clone()),
            _ => None,
        })
        .collect()
}

fn pos(offset: i64) -> SourcePosition {
    SourcePosition {
        topic: "labels".into(),
        partition: 0,
        offset,
    }
}

fn label(id: &str, y: f64, annotator: Option<&str>) -> std::result::Result<LabelMsg, Rejection> {
    Ok(LabelMsg {
        request_id: id.to_string(),
        y,
        annotator_id: annotator.map(str::to_string),
    })
}

/// Hands `r` to the engine as read from the requests topic; returns whether it was registered.
fn read_request(e: &mut Engine, r: &LabelRequest) -> bool {
    let before = e.in_flight_ids().len();
    e.on_request(Ok(r.clone()), 0, 0);
    e.in_flight_ids().len() > before
}

/// A labels-topic message for [`Engine::on_label`], read at its timestamp.
fn li(
    decoded: std::result::Result<LabelMsg, Rejection>,
    payload: Option<&[u8]>,
    pos: SourcePosition,
    timestamp_ms: i64,
) -> LabelInput {
    LabelInput {
        decoded,
        payload: payload.map(<[u8]>::to_vec),
        pos,
        timestamp_ms,
        read_at_ms: timestamp_ms,
    }
}

/// Feeds this engine's scaling proposal back as the first scaler message of the labels topic (what the
/// group does through Kafka), so the scaler is adopted.
fn adopt_own_proposal(e: &mut Engine, now_ms: i64) {
    e.maybe_propose_scaler(now_ms);
    let outs = e.take_outputs();
    let msg = outs
        .iter()
        .find_map(|o| match o {
            Output::Scaler(m) => Some(m.clone()),
            _ => None,
        })
        .expect("a scaling proposal");
    // Other outputs go back (the tests read them).
    e.outbox
        .extend(outs.into_iter().filter(|o| !matches!(o, Output::Scaler(_))));
    let bytes = serde_json::to_vec(&msg).unwrap();
    let decoded = ScalerMsg::decode(Some(&bytes), e.cfg.model.dim);
    e.on_scaler(decoded, None, pos(-1), now_ms);
}

/// Fills the pool past warm-up and returns the engine with the group's scaler adopted (its own proposal)
/// and the requests topic read to its end for good (no label is held).
fn warmed(c: &Arc<Config>, w: &mut World) -> Engine {
    warmed_with(c, w, Telemetry::new().metrics)
}

/// [`warmed`], reporting to the given metrics.
fn warmed_with(c: &Arc<Config>, w: &mut World, m: Arc<Metrics>) -> Engine {
    let mut e = Engine::new(c.clone(), m, None).unwrap();
    for i in 0..12 {
        assert!(e.on_response(w.response(i % 4), 0));
    }
    assert!(!e.scaler().is_frozen(), "waits for the group's scaler");
    adopt_own_proposal(&mut e, 0);
    assert!(e.scaler().is_frozen());
    e.on_requests_caught_up(i64::MAX);
    e
}

#[test]
fn no_round_before_the_scaler_is_frozen() {
    let c = cfg("");
    let mut w = World::new(1);
    let mut e = engine(&c);
    for i in 0..11 {
        e.on_response(w.response(i % 3), 0);
    }
    assert!(!e.scaler().is_frozen());
    assert_eq!(e.maybe_round(1000), 0);
    e.maybe_propose_scaler(0);
    assert!(
        e.take_outputs().is_empty(),
        "no proposal before the warm-up is done"
    );
    e.on_response(w.response(0), 0);
    // The warm-up is done, but the scaler is the group's: nothing is selected until a proposal is read
    // back from the labels topic.
    assert!(!e.scaler().is_frozen());
    assert_eq!(e.maybe_round(1000), 0);
    adopt_own_proposal(&mut e, 0);
    assert!(e.scaler().is_frozen());
    // Freezing asks for an immediate checkpoint (the scaler is part of the model).
    assert!(e.checkpoint_due(std::time::Duration::ZERO));
    assert_eq!(e.maybe_round(1000), 3);
}

#[test]
fn rounds_respect_batch_size_budget_interval_and_use_up_responses() {
    let c = cfg("");
    let mut w = World::new(2);
    let mut e = warmed(&c, &mut w);
    assert_eq!(e.maybe_round(0), 3);
    let reqs = requests(e.take_outputs());
    assert_eq!(reqs.len(), 3);
    assert_eq!(e.pool_len(), 12 - 6);
    // Interval not elapsed.
    assert_eq!(e.maybe_round(5), 0);
    // Budget: 5 in flight max, 3 used.
    assert_eq!(e.maybe_round(10), 2);
    assert_eq!(e.active_in_flight(), 5);
    for _ in 0..10 {
        e.on_response(w.response(7), 20);
    }
    assert_eq!(e.maybe_round(100), 0, "budget exhausted");
    // Ids are unique, parseable, sequence-ordered; metadata is passed through.
    let mut all = reqs;
    all.extend(requests(e.take_outputs()));
    let ids: std::collections::HashSet<_> = all.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(ids.len(), 5);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(parse_request_id(&r.request_id), Some(("armd-0", i as u64)));
        assert!(r.a.metadata.is_some() && r.b.metadata.is_some());
        assert_eq!(r.expires_at_ms - r.issued_at_ms, 100_000);
        assert!(r.predicted_p > 0.0 && r.predicted_p < 1.0);
        assert!(r.gain > 0.0);
    }
}

#[test]
fn label_join_applies_once_and_rejects_each_bad_case() {
    let c = cfg("ARMD__SELECTION__LABELS_PER_REQUEST = 2");
    let mut w = World::new(3);
    let mut e = warmed(&c, &mut w);
    e.maybe_round(0);
    let reqs = requests(e.take_outputs());
    let id = reqs[0].request_id.clone();
    let ts = reqs[0].issued_at_ms + 1;
    let o = e.on_label(li(label(&id, 1.0, Some("ann1")), None, pos(0), ts), ts);
    assert_eq!(
        o,
        LabelOutcome::Applied {
            request_id: id.clone(),
            closed: false
        }
    );
    // Same annotator again: duplicate.
    let o = e.on_label(
        li(label(&id, 0.0, Some("ann1")), Some(b"x"), pos(1), ts),
        ts,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::DuplicateLabel));
    // Second annotator closes it.
    let o = e.on_label(li(label(&id, 0.5, Some("ann2")), None, pos(2), ts), ts);
    assert_eq!(
        o,
        LabelOutcome::Applied {
            request_id: id.clone(),
            closed: true
        }
    );
    // Closed: any further label is a duplicate.
    let o = e.on_label(li(label(&id, 1.0, Some("ann3")), None, pos(3), ts), ts);
    assert_eq!(o, LabelOutcome::Rejected(Reason::DuplicateLabel));
    // Unknown id of this instance or of another (the requests topic was read to its end), malformed
    // message.
    let o = e.on_label(
        li(
            label("armd-0-999-0123456789abcdef", 1.0, None),
            None,
            pos(4),
            ts,
        ),
        ts,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::UnknownRequest));
    let o = e.on_label(
        li(
            label("armd-7-1-0123456789abcdef", 1.0, None),
            None,
            pos(5),
            ts,
        ),
        ts,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::UnknownRequest));
    let o = e.on_label(li(label("garbage", 1.0, None), None, pos(6), ts), ts);
    assert_eq!(o, LabelOutcome::Rejected(Reason::UnknownRequest));
    let bad = Err(Rejection::new(Reason::InvalidJson, "x"));
    assert_eq!(
        e.on_label(li(bad, Some(b"{"), pos(7), ts), ts),
        LabelOutcome::Rejected(Reason::InvalidJson)
    );
    // Label stamped after expiry.
    let late = reqs[1].expires_at_ms + 1;
    let o = e.on_label(
        li(label(&reqs[1].request_id, 1.0, None), None, pos(8), late),
        late,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::ExpiredRequest));
    assert_eq!(e.posterior().labels_applied(), 2);
    // Every message advanced the partition's offset; every rejection became a dead letter.
    assert_eq!(e.label_offsets().get(&0), Some(&9));
    let dl = dead_letters(&e.take_outputs());
    assert_eq!(
        dl,
        [
            "duplicate_label",
            "duplicate_label",
            "unknown_request",
            "unknown_request",
            "invalid_json",
            "expired_request"
        ]
    );
}

#[test]
fn expiry_frees_budget_reoffers_pairs_and_late_labels_follow_timestamps() {
    let c = cfg("");
    let mut w = World::new(4);
    let mut e = warmed(&c, &mut w);
    e.maybe_round(0);
    let reqs = requests(e.take_outputs());
    let pool_before = e.pool_len();
    let exp = reqs[0].expires_at_ms;
    e.expire(exp);
    assert_eq!(e.active_in_flight(), 0);
    assert_eq!(e.pool_len(), pool_before + 6, "pairs re-offered");
    // In the grace period a label stamped before the expiry still counts.
    let o = e.on_label(
        li(label(&reqs[0].request_id, 1.0, None), None, pos(0), exp - 1),
        exp + 10,
    );
    assert!(matches!(o, LabelOutcome::Applied { closed: true, .. }));
    // Past the grace by the wall clock, but the labels topic has not been read that far: kept, and a
    // label stamped before the expiry that is read now still counts.
    e.expire(exp + 50_000);
    assert_eq!(e.in_flight_ids().len(), 2);
    e.on_labels_caught_up(exp + 49_999);
    e.expire(exp + 60_000);
    assert_eq!(
        e.in_flight_ids().len(),
        2,
        "read up to 1 ms before the grace ends"
    );
    let o = e.on_label(
        li(label(&reqs[2].request_id, 0.0, None), None, pos(1), exp),
        exp + 60_000,
    );
    assert!(matches!(o, LabelOutcome::Applied { closed: true, .. }));
    // Once the topic was read up to the end of the grace, the id is forgotten as expired.
    e.on_labels_caught_up(exp + 50_000);
    e.expire(exp + 60_000);
    assert!(e.in_flight_ids().is_empty());
    let o = e.on_label(
        li(label(&reqs[1].request_id, 1.0, None), None, pos(2), exp - 1),
        exp + 60_001,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::ExpiredRequest));
}

/// A crash followed by a downtime longer than TTL + grace: the restored requests must still take the
/// labels published before their expiry (which the labels consumer replays after the restart), however
/// late the wall clock says it is.
#[test]
fn restored_requests_outlive_any_downtime_until_the_labels_are_replayed() {
    let c = cfg("ARMD__SELECTION__LABELS_PER_REQUEST = 2");
    let mut w = World::new(41);
    let mut e = warmed(&c, &mut w);
    e.maybe_round(0);
    let reqs = requests(e.take_outputs());
    assert_eq!(reqs.len(), 3);
    e.on_requests_delivered(reqs.iter().map(|r| r.request_id.clone()));
    let ck = e.checkpoint(1);
    let exp = reqs[0].expires_at_ms;
    // Restart a day later; housekeeping runs before the labels consumer has caught up.
    let day = 86_400_000;
    let mut e = Engine::new(c.clone(), Telemetry::new().metrics, Some(ck)).unwrap();
    e.expire(exp + day);
    assert!(!e.labels_caught_up());
    assert_eq!(
        e.active_in_flight(),
        0,
        "lapsed by the wall clock: no budget held"
    );
    assert_eq!(
        e.in_flight_ids().len(),
        3,
        "but not forgotten before the replay"
    );
    for (i, r) in reqs.iter().enumerate() {
        let y = w.answer(r);
        let o = e.on_label(
            li(
                label(&r.request_id, y, Some("first")),
                None,
                pos(i as i64),
                exp - 10,
            ),
            exp + day,
        );
        assert!(matches!(o, LabelOutcome::Applied { .. }), "{o:?}");
        e.expire(exp + day);
    }
    assert_eq!(e.posterior().labels_applied(), 3);
    // A label stamped after the expiry is still rejected, replay or not.
    let late = e.on_label(
        li(
            label(&reqs[0].request_id, 1.0, Some("other")),
            None,
            pos(3),
            exp + 1,
        ),
        exp + day,
    );
    assert_eq!(late, LabelOutcome::Rejected(Reason::ExpiredRequest));
    e.on_labels_caught_up(exp + day);
    assert!(e.labels_caught_up());
    e.expire(exp + day);
    assert!(e.in_flight_ids().is_empty());
}

#[test]
fn pool_evicts_at_capacity_and_ttl() {
    let c = cfg("ARMD__POOL__CAPACITY = 20\nARMD__POOL__TTL_SECS = 10");
    let mut w = World::new(5);
    let mut e = engine(&c);
    for i in 0..25 {
        e.on_response(w.response(i % 5), 0);
    }
    assert_eq!(e.pool_len(), 20);
    // A redelivered response is not pooled twice.
    let r = w.response(1);
    assert!(e.on_response(r.clone(), 1));
    assert!(!e.on_response(r, 1));
    e.maybe_round(10_002); // purges everything older than 10 s
    assert_eq!(e.pool_len(), 0);
}

/// Runs a labelled stream: rounds, annotator answers, labels. Returns the engine.
fn run_stream(e: &mut Engine, w: &mut World, rounds: usize, t0: i64) -> i64 {
    let mut t = t0;
    let mut offset = e.label_offsets().get(&0).copied().unwrap_or(0);
    for r in 0..rounds {
        for _ in 0..6 {
            let resp = w.response(r as u64 % 7);
            e.on_response(resp, t);
        }
        settle(e, t);
        t += 20;
        e.maybe_round(t);
        for req in requests(e.take_outputs()) {
            let y = w.answer(&req);
            e.on_label(
                li(label(&req.request_id, y, None), None, pos(offset), t + 1),
                t + 1,
            );
            offset += 1;
        }
        e.poll_refit();
    }
    t
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300);
    num / den
}

#[test]
fn the_model_learns_the_golden_reward() {
    let c = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 8\nARMD__MODEL__REFIT_EVERY = 50");
    let mut w = World::new(6);
    let mut e = engine(&c);
    run_stream(&mut e, &mut w, 120, 0);
    e.wait_refit();
    assert!(
        e.posterior().labels_applied() >= 300,
        "{}",
        e.posterior().labels_applied()
    );
    // θ in scaled space folds to raw-space weights; compare the direction with the truth.
    let snap = e.snapshot(0);
    let wts = snap.weights.unwrap();
    let cos = crate::linalg::dot(&wts, &w.truth)
        / (crate::linalg::dot(&wts, &wts).sqrt() * crate::linalg::dot(&w.truth, &w.truth).sqrt());
    assert!(cos > 0.9, "cosine to the golden reward {cos}");
    let acc = e.posterior().prequential().accuracy().unwrap();
    assert!(acc > 0.6, "prequential accuracy {acc}");
}

#[test]
fn export_weights_score_raw_embeddings() {
    let c = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 8");
    let mut w = World::new(7);
    let mut e = engine(&c);
    run_stream(&mut e, &mut w, 10, 0);
    let snap = e.snapshot(5);
    let (wts, b) = (snap.weights.clone().unwrap(), snap.bias.unwrap());
    for _ in 0..5 {
        let x = w.response(0).embedding;
        let scaled = e.scaler().transform_vec(&x).unwrap();
        let want = crate::linalg::dot(&scaled, e.posterior().theta());
        let got: f64 = x
            .iter()
            .zip(&wts)
            .map(|(a, b)| f64::from(*a) * b)
            .sum::<f64>()
            + b;
        assert!(
            (want - got).abs() <= 1e-9 * (1.0 + want.abs()),
            "{want} vs {got}"
        );
    }
    assert!(snap.log_det > 0.0 && snap.precision_diagonal.iter().all(|&h| h >= 1.0));
    // Files: npy + json.
    let dir = tempfile::tempdir().unwrap();
    crate::daemon::export::write_model_files(dir.path(), &snap).unwrap();
    let bytes = std::fs::read(dir.path().join("model.npy")).unwrap();
    let back: Vec<f64> = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap();
    assert_eq!(back, wts);
    let meta: ModelSnapshot =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
    assert_eq!(meta.version, snap.version);
}

#[test]
fn labels_applied_before_a_checkpoint_stay_applied_once_after_restart() {
    let c = cfg("");
    let mut w = World::new(8);
    let mut a = warmed(&c, &mut w);
    a.maybe_round(0);
    let reqs = requests(a.take_outputs());
    let id = reqs[0].request_id.clone();
    a.on_requests_delivered(reqs.iter().map(|r| r.request_id.clone()));
    a.on_label(li(label(&id, 1.0, None), None, pos(0), 1), 1);
    let ck = Checkpoint::decode(&a.checkpoint(1).encode()).unwrap();
    let mut b = Engine::new(c.clone(), Telemetry::new().metrics, Some(ck)).unwrap();
    assert_eq!(b.posterior().labels_applied(), 1);
    assert_eq!(b.label_offsets()[&0], 1);
    // The other two requests survived the restart and accept their labels; the closed one does not.
    assert_eq!(b.in_flight_ids().len(), 2);
    assert_eq!(
        b.on_label(li(label(&id, 1.0, None), None, pos(1), 2), 2),
        LabelOutcome::Rejected(Reason::DuplicateLabel)
    );
    let o = b.on_label(
        li(label(&reqs[1].request_id, 0.0, None), None, pos(2), 2),
        2,
    );
    assert!(matches!(o, LabelOutcome::Applied { closed: true, .. }));
    assert_eq!(b.posterior().labels_applied(), 2);
    // The sequence continues: no id is reused.
    assert_eq!(b.next_sequence(), 3);
}

#[test]
fn restart_with_recovered_requests_reproduces_the_posterior() {
    let c = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 8\nARMD__MODEL__REFIT_EVERY = 16");
    let mut w = World::new(9);
    let mut a = engine(&c);
    let mut issued: Vec<LabelRequest> = Vec::new();
    let mut labels: Vec<(String, f64, i64)> = Vec::new();
    let mut t = 0;
    let mut ckpt: Option<(Checkpoint, usize, usize)> = None;
    for r in 0..40 {
        for _ in 0..6 {
            let resp = w.response(r % 5);
            a.on_response(resp, t);
        }
        settle(&mut a, t);
        t += 20;
        a.maybe_round(t);
        for req in requests(a.take_outputs()) {
            let y = w.answer(&req);
            a.on_label(
                li(
                    label(&req.request_id, y, None),
                    None,
                    pos(labels.len() as i64),
                    t + 1,
                ),
                t + 1,
            );
            labels.push((req.request_id.clone(), y, t + 1));
            issued.push(req);
        }
        a.poll_refit();
        if r == 17 {
            ckpt = Some((a.checkpoint(t), issued.len(), labels.len()));
        }
    }
    a.wait_refit();
    let (ckpt, n_issued, n_labels) = ckpt.unwrap();
    let restored = Checkpoint::decode(&ckpt.encode()).unwrap();
    let mut b = Engine::new(c.clone(), Telemetry::new().metrics, Some(restored)).unwrap();
    // Start-up recovery: requests issued after the checkpoint, read back from the topic.
    for req in &issued[n_issued..] {
        assert!(read_request(&mut b, req));
    }
    // Requests already in the checkpoint are not recovered twice.
    for req in &issued[..n_issued] {
        assert!(!read_request(&mut b, req));
    }
    assert_eq!(b.next_sequence(), a.next_sequence());
    // Replay the labels topic from the checkpointed offset.
    let from = b.label_offsets()[&0] as usize;
    assert_eq!(from, n_labels);
    for (i, (id, y, ts)) in labels.iter().enumerate().skip(from) {
        let o = b.on_label(li(label(id, *y, None), None, pos(i as i64), *ts), *ts);
        assert!(matches!(o, LabelOutcome::Applied { .. }), "{o:?}");
    }
    b.wait_refit();
    let (pa, pb) = (a.posterior(), b.posterior());
    assert_eq!(pa.labels_applied(), pb.labels_applied());
    let rd = rel_diff(pb.theta(), pa.theta());
    assert!(rd < 1e-9, "theta relative difference {rd}");
    let ld = (pa.log_det() - pb.log_det()).abs() / pa.log_det().abs();
    assert!(ld < 1e-9, "log det relative difference {ld}");
    // A fresh replay of the same labels from scratch agrees too.
    let mut replay = Posterior::new(D, 1.0).unwrap();
    let by_id: HashMap<_, _> = issued.iter().map(|r| (r.request_id.clone(), r)).collect();
    for (i, (id, y, _)) in labels.iter().enumerate() {
        let req = by_id[id];
        let xa = a
            .scaler()
            .transform_vec(&messages::decode_f32_b64("a", &req.a.embedding_b64).unwrap())
            .unwrap();
        let xb = a
            .scaler()
            .transform_vec(&messages::decode_f32_b64("b", &req.b.embedding_b64).unwrap())
            .unwrap();
        let v: Vec<f64> = xa.iter().zip(&xb).map(|(p, q)| p - q).collect();
        replay.update(&v, *y).unwrap();
        if (i + 1) % 16 == 0 {
            replay.refit(RefitOptions::default()).unwrap();
        }
    }
    let rd = rel_diff(replay.theta(), pa.theta());
    assert!(rd < 1e-9, "replay theta relative difference {rd}");
}

#[test]
fn checkpoint_of_another_dimension_or_instance_is_refused() {
    let c = cfg("");
    let mut w = World::new(10);
    let mut e = warmed(&c, &mut w);
    let ck = e.checkpoint(0);
    let other = cfg("ARMD__DAEMON__INSTANCE_ID = armd-9");
    let err = Engine::new(other, Telemetry::new().metrics, Some(ck.clone()))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("instance"), "{err:#}");
    let mut c8 = (*cfg("")).clone();
    c8.model.dim = D + 1;
    let err = Engine::new(Arc::new(c8), Telemetry::new().metrics, Some(ck.clone()))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("dimension"), "{err:#}");
    let l2 = cfg("ARMD__MODEL__SCALING = l2");
    let err = Engine::new(l2, Telemetry::new().metrics, Some(ck))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("scaling"), "{err:#}");
}

#[test]
fn consolidation_bounds_the_label_store() {
    let c = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 8\nARMD__MODEL__MAX_LABELS = 20\nARMD__MODEL__REFIT_EVERY = 10");
    let mut w = World::new(11);
    let mut e = engine(&c);
    run_stream(&mut e, &mut w, 20, 0);
    assert!(e.posterior().labels_applied() > 40);
    assert!(e.posterior().label_count() <= 20);
}

#[test]
fn label_schema_constant_is_versioned() {
    assert!(LABEL_SCHEMA.ends_with(".v1"));
}

#[test]
fn requests_not_confirmed_delivered_are_left_out_of_the_checkpoint() {
    let c = cfg("");
    let mut w = World::new(11);
    let mut a = warmed(&c, &mut w);
    a.maybe_round(0);
    let reqs = requests(a.take_outputs());
    assert_eq!(reqs.len(), 3);
    // Only the first reached the topic before the crash; the others died in the producer's queue.
    a.on_requests_delivered([reqs[0].request_id.clone(), "not-ours-or-closed".to_string()]);
    let ck = Checkpoint::decode(&a.checkpoint(1).encode()).unwrap();
    assert_eq!(ck.in_flight.len(), 1);
    let mut b = Engine::new(c.clone(), Telemetry::new().metrics, Some(ck)).unwrap();
    assert_eq!(b.in_flight_ids(), vec![reqs[0].request_id.clone()]);
    // The lost ones hold no budget: a round can issue a full batch again (the sequence goes on).
    assert_eq!(b.active_in_flight(), 1);
    assert_eq!(b.next_sequence(), 3);
    // A request that was delivered after all is read back from the topic at start-up.
    assert!(read_request(&mut b, &reqs[1]));
    let ck = b.checkpoint(2);
    assert_eq!(ck.in_flight.len(), 2);
    // A request with a label stays in the checkpoint even if its delivery report is still pending.
    let mut c2 = (*cfg("")).clone();
    c2.selection.labels_per_request = 2;
    let c2 = Arc::new(c2);
    let mut e = warmed(&c2, &mut World::new(12));
    e.maybe_round(0);
    let r = requests(e.take_outputs());
    let o = e.on_label(
        li(label(&r[0].request_id, 1.0, Some("x")), None, pos(0), 1),
        1,
    );
    assert!(
        matches!(o, LabelOutcome::Applied { closed: false, .. }),
        "{o:?}"
    );
    let ck = e.checkpoint(2);
    assert_eq!(ck.in_flight.len(), 1);
}

#[test]
fn label_apply_delay_is_measured_from_the_label_timestamp() {
    let c = cfg("");
    let t = Telemetry::new();
    let mut w = World::new(5);
    let mut e = warmed_with(&c, &mut w, t.metrics.clone());
    // Requests issued on the wall clock, so labels stamped 2 s ago are within their TTL.
    let now = now_ms_f64() as i64;
    assert!(e.run_round(now - 3000).unwrap() >= 2);
    let reqs = requests(e.take_outputs());
    // Labels stamped 2 s ago, applied now: each delay is at least 2 s (and far below a minute).
    for (i, r) in reqs.iter().take(2).enumerate() {
        let ts = now - 2000;
        let o = e.on_label(
            li(label(&r.request_id, 1.0, None), None, pos(i as i64), ts),
            now,
        );
        assert!(matches!(o, LabelOutcome::Applied { .. }), "{o:?}");
    }
    // A rejected label is not counted.
    let o = e.on_label(
        li(
            label("armd-0-999-0123456789abcdef", 1.0, None),
            None,
            pos(9),
            now,
        ),
        now,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::UnknownRequest));
    let text = t.render();
    let value = |series: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(value("armd_label_apply_delay_seconds_count"), 2.0);
    let sum = value("armd_label_apply_delay_seconds_sum");
    assert!((4.0..120.0).contains(&sum), "sum of two delays {sum}");
    assert_eq!(
        value("armd_label_apply_delay_seconds_bucket{le=\"1\"}"),
        0.0
    );
    // A label stamped by a clock ahead of ours counts as no delay, not a negative one.
    assert_eq!(apply_delay_ms(now + 5000, now as f64), 0.0);
    assert_eq!(apply_delay_ms(now, now as f64 + 12.5), 12.5);
}

#[test]
fn round_interval_counts_from_the_round_end() {
    let c = cfg("ARMD__SELECTION__BATCH_SIZE = 1");
    let mut w = World::new(4);
    let mut e = warmed(&c, &mut w);
    // A round started at 0 that ended at 900 on the clock: the 10 ms interval runs from 900.
    assert_eq!(e.maybe_round_timed(0, || 900), 1);
    assert_eq!(
        e.maybe_round_timed(905, || 905),
        0,
        "interval counts from the end"
    );
    assert_eq!(e.maybe_round_timed(910, || 910), 1);
    // A clock behind the start time cannot move the interval back.
    assert_eq!(e.maybe_round_timed(920, || 0), 1);
    assert_eq!(e.maybe_round_timed(925, || 925), 0);
}

/// The exported precision diagonal is diag(L Lᵀ) of the posterior's factor (a dense product here),
/// on a factor with no structure to hide an index slip (rectangular blocks of distinct values).
#[test]
fn precision_diagonal_is_the_diagonal_of_the_dense_precision() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for d in [1usize, 2, 7, 33] {
        let l = Mat::<f64>::from_fn(d, d, |i, j| {
            if j <= i {
                rng.random_range(-2.0..2.0)
            } else {
                0.0
            }
        });
        let h = &l * l.transpose();
        let got = precision_diagonal(l.as_ref());
        for (i, g) in got.iter().enumerate() {
            let want = h[(i, i)];
            assert!(
                (g - want).abs() <= 1e-12 * (1.0 + want),
                "d {d}, i {i}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn auto_prior_starts_from_the_data_scale_and_is_chosen_by_the_evidence_at_refits() {
    let c = cfg(
        "ARMD__MODEL__PRIOR_PRECISION = auto\nARMD__MODEL__REFIT_EVERY = 50\n\
                 ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 8",
    );
    assert!(c.model.prior_precision.is_auto());
    let mut w = World::new(9);
    let mut e = warmed(&c, &mut w);
    // Standardised features: ‖x − x̄‖² ≈ d on the warm-up sample, so the start is about 2d.
    let start = e.posterior().prior_precision().unwrap();
    assert!(
        start > 0.5 * D as f64 && start < 4.0 * D as f64,
        "starting λ₀ {start} for d = {D}"
    );
    run_stream(&mut e, &mut w, 60, 100);
    e.wait_refit();
    assert!(e.posterior().labels_applied() >= 100);
    // Refits ran (at 32, 64, then every 50) and each chose λ₀ by the evidence: the installed mode is the
    // MAP under the installed prior, and the value is in the snapshot.
    let chosen = e.posterior().prior_precision().unwrap();
    assert_ne!(chosen, start);
    let mut check = e.posterior().clone();
    let ev = EvidenceOptions::default();
    check.refit_evidence(RefitOptions::default(), &ev).unwrap();
    let again = check.prior_precision().unwrap();
    assert!(
        (again.ln() - chosen.ln()).abs() < 0.5,
        "a further evidence refit moves λ₀ from {chosen} to {again}"
    );
    assert_eq!(e.snapshot(0).prior_precision, Some(chosen));
}

#[test]
fn refit_cadence_has_early_refits_below_refit_every() {
    use crate::posterior::refit_due;
    let due: Vec<u64> = (1..=1200).filter(|&n| refit_due(n, 500)).collect();
    assert_eq!(due, vec![32, 64, 128, 256, 500, 1000]);
    assert!(!(1..=1000).any(|n| refit_due(n, 0)));
    let due: Vec<u64> = (1..=100).filter(|&n| refit_due(n, 40)).collect();
    assert_eq!(due, vec![32, 40, 80]);
}

/// A group of two instances: each pools its own responses, reads every request and every label in topic
/// order. Returns (requests topic, labels topic as (request id, y)).
fn run_group(
    a: &mut Engine,
    b: &mut Engine,
    w: &mut World,
    rounds: usize,
) -> (Vec<LabelRequest>, Vec<(String, f64)>) {
    let mut requests_topic: Vec<LabelRequest> = Vec::new();
    let mut labels_topic: Vec<(String, f64)> = Vec::new();
    let mut t = 0;
    for r in 0..rounds {
        // Responses are partitioned: prompts 0..3 to `a`, 3..6 to `b`.
        for i in 0..8 {
            a.on_response(w.response((r * 8 + i) as u64 % 3), t);
            b.on_response(w.response(3 + (r * 8 + i) as u64 % 3), t);
        }
        // Scaling proposals go to the labels topic; both read the first one.
        for e in [&mut *a, &mut *b] {
            e.maybe_propose_scaler(t);
        }
        let proposals: Vec<Box<ScalerMsg>> = [&mut *a, &mut *b]
            .into_iter()
            .flat_map(|e| {
                let outs = e.take_outputs();
                let (scalers, rest): (Vec<_>, Vec<_>) = outs
                    .into_iter()
                    .partition(|o| matches!(o, Output::Scaler(_)));
                e.outbox.extend(rest);
                scalers.into_iter().map(|o| match o {
                    Output::Scaler(m) => m,
                    _ => unreachable!(),
                })
            })
            .collect();
        for m in proposals {
            let bytes = serde_json::to_vec(&m).unwrap();
            for e in [&mut *a, &mut *b] {
                let d = ScalerMsg::decode(Some(&bytes), D);
                e.on_scaler(d, None, pos(-1), t);
            }
        }
        t += 20;
        a.maybe_round(t);
        let from_a = requests(a.take_outputs());
        // `b` selects knowing `a`'s new requests (read from the topic first).
        for req in &from_a {
            b.on_request(Ok(req.clone()), 0, requests_topic.len() as i64);
            a.on_request(Ok(req.clone()), 0, requests_topic.len() as i64);
            requests_topic.push(req.clone());
        }
        b.maybe_round(t);
        let from_b = requests(b.take_outputs());
        for req in &from_b {
            a.on_request(Ok(req.clone()), 0, requests_topic.len() as i64);
            b.on_request(Ok(req.clone()), 0, requests_topic.len() as i64);
            requests_topic.push(req.clone());
        }
        for req in from_a.iter().chain(&from_b) {
            let y = w.answer(req);
            let off = labels_topic.len() as i64;
            for e in [&mut *a, &mut *b] {
                let o = e.on_label(
                    li(label(&req.request_id, y, None), None, pos(off), t + 1),
                    t + 1,
                );
                assert!(matches!(o, LabelOutcome::Applied { .. }), "{o:?}");
            }
            labels_topic.push((req.request_id.clone(), y));
        }
        a.poll_refit();
        b.poll_refit();
    }
    a.wait_refit();
    b.wait_refit();
    (requests_topic, labels_topic)
}

/// `to` reads `from`'s adopted scaler as the first proposal on the labels topic.
fn adopt_scaler_of(from: &Engine, to: &mut Engine) {
    let s = from.scaler();
    let msg = ScalerMsg {
        schema: SCALER_SCHEMA.into(),
        instance_id: from.cfg.daemon.instance_id.clone(),
        scaling: s.scaling().name().into(),
        samples: 12,
        mean_b64: encode_f64_b64(s.mean()),
        inv_std_b64: encode_f64_b64(s.inv_std()),
        pair_spread: 1.0,
        proposed_at_ms: 0,
    };
    let bytes = serde_json::to_vec(&msg).unwrap();
    to.on_scaler(ScalerMsg::decode(Some(&bytes), D), None, pos(0), 0);
}

#[test]
fn instances_of_a_group_apply_every_label_and_hold_one_posterior() {
    let extra = "ARMD__SELECTION__MAX_IN_FLIGHT = 8\nARMD__SELECTION__BATCH_SIZE = 4\nARMD__MODEL__REFIT_EVERY = 16";
    let ca = cfg(extra);
    let cb = cfg(&format!("{extra}\nARMD__DAEMON__INSTANCE_ID = armd-1"));
    let (ma, mb) = (Telemetry::new().metrics, Telemetry::new().metrics);
    let mut a = Engine::new(ca.clone(), ma, None).unwrap();
    let mut b = Engine::new(cb.clone(), mb, None).unwrap();
    let mut w = World::new(21);
    let (reqs, labels) = run_group(&mut a, &mut b, &mut w, 30);
    let own_a = reqs.iter().filter(|r| r.instance_id == "armd-0").count();
    assert!(
        own_a >= 20 && reqs.len() - own_a >= 20,
        "both selected: {own_a} of {}",
        reqs.len()
    );
    // One scaler (the first proposal, `a`'s) and one posterior.
    assert_eq!(a.scaler().mean(), b.scaler().mean());
    assert_eq!(a.scaler().inv_std(), b.scaler().inv_std());
    assert_eq!(a.posterior().labels_applied(), labels.len() as u64);
    assert_eq!(b.posterior().labels_applied(), labels.len() as u64);
    let (ta, tb) = (a.posterior().theta(), b.posterior().theta());
    assert!(
        ta.iter().zip(tb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "θ differs"
    );
    // And it is the posterior a from-scratch replay of every label gives.
    let mut replay = Posterior::new(D, 1.0).unwrap();
    let by_id: HashMap<&str, &LabelRequest> =
        reqs.iter().map(|r| (r.request_id.as_str(), r)).collect();
    for (i, (id, y)) in labels.iter().enumerate() {
        let r = by_id[id.as_str()];
        let xa = a
            .scaler()
            .transform_vec(&messages::decode_f32_b64("a", &r.a.embedding_b64).unwrap())
            .unwrap();
        let xb = a
            .scaler()
            .transform_vec(&messages::decode_f32_b64("b", &r.b.embedding_b64).unwrap())
            .unwrap();
        let v: Vec<f64> = xa.iter().zip(&xb).map(|(p, q)| p - q).collect();
        replay.update(&v, *y).unwrap();
        if crate::posterior::refit_due(i as u64 + 1, 16) {
            replay.refit(RefitOptions::default()).unwrap();
        }
    }
    assert!(
        rel_diff(ta, replay.theta()) < 1e-9,
        "{}",
        rel_diff(ta, replay.theta())
    );
    // No pair was asked twice.
    let pairs: std::collections::HashSet<_> = reqs
        .iter()
        .map(|r| {
            let mut k = [r.a.response_id.clone(), r.b.response_id.clone()];
            k.sort();
            k
        })
        .collect();
    assert_eq!(pairs.len(), reqs.len());
}

#[test]
fn selection_conditions_on_other_instances_requests_and_never_repeats_their_pairs() {
    let c = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 50\nARMD__SELECTION__BATCH_SIZE = 6");
    let cb = cfg("ARMD__SELECTION__MAX_IN_FLIGHT = 50\nARMD__SELECTION__BATCH_SIZE = 6\nARMD__DAEMON__INSTANCE_ID = armd-1");
    let mut w = World::new(22);
    let mut a = warmed(&c, &mut w);
    // `b` pools exactly the same responses (a rebalance moved a partition): the pairs `a` has open must not
    // be asked again, and `b`'s budget does not count `a`'s requests.
    let mut b = Engine::new(cb, Telemetry::new().metrics, None).unwrap();
    let responses: Vec<(String, String)> = a
        .pool
        .iter()
        .map(|(_, e)| (e.prompt_id.to_string(), e.response_id.to_string()))
        .collect();
    for (_, e) in a.pool.iter() {
        b.on_response(
            Response {
                prompt_id: e.prompt_id.clone(),
                response_id: e.response_id.clone(),
                embedding: e.raw.clone(),
                metadata: None,
            },
            0,
        );
    }
    assert_eq!(responses.len(), 12);
    adopt_scaler_of(&a, &mut b);
    assert!(b.scaler_adopted());
    b.on_requests_caught_up(i64::MAX);
    a.maybe_round(0);
    let from_a = requests(a.take_outputs());
    assert_eq!(from_a.len(), 6);
    for (i, r) in from_a.iter().enumerate() {
        b.on_request(Ok(r.clone()), 0, i as i64);
    }
    assert_eq!(
        b.active_in_flight(),
        0,
        "another instance's requests use its own budget"
    );
    assert_eq!(
        b.ledger.open_vectors().len(),
        6,
        "but selection conditions on them"
    );
    b.maybe_round(100);
    let from_b = requests(b.take_outputs());
    assert!(!from_b.is_empty());
    let key = |r: &LabelRequest| {
        let mut k = [
            format!("{}/{}", r.a.prompt_id, r.a.response_id),
            format!("{}/{}", r.b.prompt_id, r.b.response_id),
        ];
        k.sort();
        k
    };
    let open: std::collections::HashSet<_> = from_a.iter().map(key).collect();
    for r in &from_b {
        assert!(
            !open.contains(&key(r)),
            "b asked a pair a has open: {:?}",
            key(r)
        );
    }
}

#[test]
fn a_label_read_before_its_request_waits_and_keeps_the_topic_order() {
    let c = cfg("");
    let cb = cfg("ARMD__DAEMON__INSTANCE_ID = armd-1");
    let mut w = World::new(23);
    let mut a = warmed(&c, &mut w);
    a.maybe_round(0);
    let reqs = requests(a.take_outputs());
    assert_eq!(reqs.len(), 3);
    let m = Telemetry::new().metrics;
    let mut b = Engine::new(cb, m.clone(), None).unwrap();
    adopt_scaler_of(&a, &mut b);
    // `b` has read request 0 only, and not yet to the end of the requests topic.
    b.on_request(Ok(reqs[0].clone()), 0, 0);
    // Labels for request 1 (unknown to b yet), then 0 (known): both wait, in order; so does the labels
    // consumer's "caught up" mark behind them.
    assert_eq!(
        b.on_label(
            li(label(&reqs[1].request_id, 1.0, None), None, pos(1), 10),
            10
        ),
        LabelOutcome::Held
    );
    assert_eq!(
        b.on_label(
            li(label(&reqs[0].request_id, 0.0, None), None, pos(2), 11),
            11
        ),
        LabelOutcome::Held
    );
    b.on_labels_caught_up(12);
    assert_eq!(b.held(), 3);
    assert_eq!(
        b.label_offsets().get(&0),
        Some(&1),
        "held labels are not past the checkpoint position"
    );
    // A label for a request nobody issued, read at 13.
    let ghost = messages::request_id("armd-1", 77, "x", "y");
    assert_eq!(
        b.on_label(li(label(&ghost, 1.0, None), None, pos(3), 13), 13),
        LabelOutcome::Held
    );
    // Request 1 arrives: the two labels before the ghost are applied, in topic order.
    b.on_request(Ok(reqs[1].clone()), 0, 1);
    assert_eq!(b.posterior().labels_applied(), 2);
    assert_eq!(
        b.posterior().to_parts().labels[0].y,
        1.0,
        "request 1's label first"
    );
    assert_eq!(b.held(), 1);
    // The requests topic read to its end as of 12 (before the ghost was read) does not decide it; as of 13 it does.
    b.on_requests_caught_up(12);
    assert_eq!(b.held(), 1);
    b.on_requests_caught_up(13);
    assert_eq!(b.held(), 0);
    assert_eq!(b.label_offsets().get(&0), Some(&4));
    // Rejected as unknown; `b` is the issuer named in the id, so it writes the dead letter.
    assert_eq!(dead_letters(&b.take_outputs()), ["unknown_request"]);
    // A bad label for another instance's request is that instance's to dead-letter.
    let o = b.on_label(
        li(label(&reqs[0].request_id, 1.0, None), None, pos(4), 14),
        14,
    );
    assert_eq!(o, LabelOutcome::Rejected(Reason::DuplicateLabel));
    assert!(dead_letters(&b.take_outputs()).is_empty());
}

#[test]
fn the_first_scaling_proposal_on_the_labels_topic_wins() {
    let c = cfg("");
    let mut w = World::new(24);
    let mut e = engine(&c);
    for i in 0..12 {
        e.on_response(w.response(i % 4), 0);
    }
    e.maybe_propose_scaler(0);
    let own = match e.take_outputs().pop() {
        Some(Output::Scaler(m)) => m,
        o => panic!("expected a proposal, got {o:?}"),
    };
    // Not read back within the retry interval: proposed again.
    e.maybe_propose_scaler(PROPOSAL_RETRY_MS - 1);
    assert!(e.take_outputs().is_empty());
    e.maybe_propose_scaler(PROPOSAL_RETRY_MS);
    assert!(matches!(e.take_outputs().as_slice(), [Output::Scaler(_)]));
    // Another instance's proposal lands first.
    let mut theirs = (*own).clone();
    theirs.instance_id = "armd-9".into();
    theirs.mean_b64 = encode_f64_b64(&[1.0; D]);
    let enc = |m: &ScalerMsg| serde_json::to_vec(m).unwrap();
    // A proposal for another scaling is refused (this instance keeps waiting) ...
    let mut other = theirs.clone();
    other.scaling = "l2".into();
    e.on_scaler(ScalerMsg::decode(Some(&enc(&other)), D), None, pos(0), 1);
    assert!(!e.scaler_adopted());
    // ... a broken one is dead-lettered ...
    e.on_scaler(
        ScalerMsg::decode(Some(b"{\"schema\":\"armd.scaler.v1\"}"), D),
        Some(b"x"),
        pos(1),
        1,
    );
    assert_eq!(dead_letters(&e.take_outputs()).len(), 1);
    assert!(!e.scaler_adopted());
    e.on_scaler(ScalerMsg::decode(Some(&enc(&theirs)), D), None, pos(2), 1);
    e.on_scaler(ScalerMsg::decode(Some(&enc(&own)), D), None, pos(3), 1);
    assert!(e.scaler_adopted());
    assert_eq!(e.scaler().mean(), &[1.0; D], "the first one read");
    assert_eq!(e.label_offsets().get(&0), Some(&4));
    assert!(
        e.checkpoint_due(std::time::Duration::ZERO),
        "the scaler is checkpointed at once"
    );
    e.maybe_propose_scaler(10 * PROPOSAL_RETRY_MS);
    assert!(e.take_outputs().is_empty(), "no proposal once adopted");
}
