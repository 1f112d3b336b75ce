//! Hostile input against a running daemon (in-process, real broker): a corpus of bad messages on the
//! responses and labels topics, interleaved with valid ones.
//!
//! Every bad message must be dead-lettered exactly once with its expected reason code and its source
//! position (topic/partition/offset as the producer was told on delivery), counted in
//! `armd_responses_rejected_total{reason}` / `armd_labels_rejected_total{reason}` with exactly the expected
//! count per reason (zero for the others), while `/healthz` and `/readyz` stay 200 and the valid messages
//! around them are processed: every valid response is pooled and requests are issued from them; every
//! valid label is applied.
//!
//! The two tables below ([`response_corpus`], [`label_corpus`]) double as documentation of the reason
//! codes: each row is (case, payload, reason). "Label after expiry" is a label whose Kafka timestamp is
//! after its request's `expires_at_ms` (armd judges expiry by the label's timestamp, so the case needs no
//! waiting); the same request's next, timely label is still applied.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use armd::daemon::config::Config;
use armd::daemon::messages::{
    encode_f32_b64, request_id, LabelRequest, Reason, LABEL_SCHEMA, RESPONSE_SCHEMA,
};
use base64::Engine as _;
use common::inprocess::*;
use common::*;
use rdkafka::message::Message;
use serde_json::json;

const DIM: usize = 8;
const INSTANCE: &str = "armd-input";
/// Above the daemon's `pool.max_message_bytes` (1 MiB by default) and below the topics' raised limit.
const HUGE: usize = 3 << 20;
const TOPIC_LIMIT: usize = 8 << 20;

/// One row of a corpus: a bad message and the reason it must be rejected with.
struct Case {
    name: &'static str,
    /// `None`: a message without payload (a tombstone).
    payload: Option<Vec<u8>>,
    reason: &'static str,
    /// Kafka CreateTime to produce with (labels after expiry).
    timestamp_ms: Option<i64>,
}

fn case(name: &'static str, payload: impl AsRef<[u8]>, reason: &'static str) -> Case {
    Case {
        name,
        payload: Some(payload.as_ref().to_vec()),
        reason,
        timestamp_ms: None,
    }
}

/// A response with `embedding` = `vec![0.5; DIM]` and `fields` merged in (`null` removes a field).
fn response(fields: serde_json::Value) -> String {
    let mut m = json!({"schema": RESPONSE_SCHEMA, "prompt_id": "bad-p", "response_id": "bad-r",
                       "embedding": vec![0.5; DIM]});
    merge(&mut m, fields);
    m.to_string()
}

/// A label for `request` with outcome `a` and `fields` merged in (`null` removes a field).
fn label(request: &str, fields: serde_json::Value) -> String {
    let mut m = json!({"schema": LABEL_SCHEMA, "request_id": request, "outcome": "a"});
    merge(&mut m, fields);
    m.to_string()
}

fn merge(m: &mut serde_json::Value, fields: serde_json::Value) {
    for (k, v) in fields.as_object().expect("object").clone() {
        if v.is_null() {
            m.as_object_mut().unwrap().remove(&k);
        } else {
            m[k] = v;
        }
    }
}

fn b64_f32(values: &[f32]) -> String {
    encode_f32_b64(values)
}

fn b64_bits(bits: &[u32]) -> String {
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn with_b64(b64: impl Into<String>) -> String {
    response(json!({"embedding": null, "embedding_b64": b64.into()}))
}

/// Bad messages on the responses topic and the reason code each must be dead-lettered with.
#[rustfmt::skip]
fn response_corpus() -> Vec<Case> {
    let valid = response(json!({}));
    let mut huge = String::from(
        r#"{"schema":"armd.response.v1","prompt_id":"p","response_id":"r","embedding":["#,
    );
    while huge.len() < HUGE {
        huge.push_str("0.125,");
    }
    huge.push_str("0.125]}");
    let nan = f32::NAN.to_bits();
    vec![
        // Envelope.
        Case { name: "tombstone (no payload)", payload: None, reason: "empty_payload", timestamp_ms: None },
        case("empty payload", "", "empty_payload"),
        case("3 MiB message (> pool.max_message_bytes)", &huge, "oversized"),
        case("invalid UTF-8 in a string", b"{\"schema\": \"armd.response.v1\xff\"}", "invalid_utf8"),
        case("lone UTF-16 surrogate encoded as UTF-8", b"{\"prompt_id\": \"\xed\xa0\x80\"}", "invalid_utf8"),
        case("Latin-1 text", b"{\"prompt_id\": \"caf\xe9\"}", "invalid_utf8"),
        // Not a JSON object.
        case("truncated JSON", &valid[..valid.len() / 2], "invalid_json"),
        case("truncated by one byte", &valid[..valid.len() - 1], "invalid_json"),
        case("trailing comma", valid.replace('}', ",}"), "invalid_json"),
        case("trailing garbage", format!("{valid} x"), "invalid_json"),
        case("two objects", format!("{valid}{valid}"), "invalid_json"),
        case("plain text", "hello", "invalid_json"),
        case("whitespace only", "   \n", "invalid_json"),
        case("JSON array", "[1, 2, 3]", "invalid_json"),
        case("JSON string", "\"armd.response.v1\"", "invalid_json"),
        case("JSON number", "42", "invalid_json"),
        case("JSON null", "null", "invalid_json"),
        case("UTF-8 byte order mark", format!("\u{feff}{valid}"), "invalid_json"),
        case("bare NaN token", valid.replace("0.5,", "NaN,"), "invalid_json"),
        case("bare Infinity token", valid.replace("0.5,", "Infinity,"), "invalid_json"),
        case(
            "metadata nested 1000 deep",
            response(json!({})).replacen(
                '}',
                &format!(r#","metadata":{}{}}}"#, "[".repeat(1000), "]".repeat(1000)),
                1,
            ),
            "invalid_json",
        ),
        // Schema and fields.
        case("schema of another version", response(json!({"schema": "armd.response.v2"})), "unsupported_schema"),
        case("schema of another kind", response(json!({"schema": "armd.label.v1"})), "unsupported_schema"),
        case("missing schema", response(json!({"schema": null})), "missing_field"),
        case("missing prompt_id", response(json!({"prompt_id": null})), "missing_field"),
        case("missing response_id", response(json!({"response_id": null})), "missing_field"),
        case("no embedding at all", response(json!({"embedding": null})), "missing_field"),
        case("unknown field", response(json!({"score": 0.9})), "unknown_field"),
        case("misspelt field", response(json!({"embedding": null, "embeding": vec![0.5; DIM]})), "unknown_field"),
        case("schema is a number", response(json!({"schema": 1})), "wrong_type"),
        case("prompt_id is a number", response(json!({"prompt_id": 7})), "wrong_type"),
        case("response_id is an object", response(json!({"response_id": {"id": "r"}})), "wrong_type"),
        case("embedding is a string", response(json!({"embedding": "0.5 0.5"})), "wrong_type"),
        case("embedding holds a string", response(json!({"embedding": [0.5, 0.5, 0.5, "0.5", 0.5, 0.5, 0.5, 0.5]})), "wrong_type"),
        case("NaN as a JSON string", response(json!({"embedding": ["NaN", 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]})), "wrong_type"),
        case("Infinity as a JSON string", response(json!({"embedding": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, "Infinity"]})), "wrong_type"),
        case("embedding of booleans", response(json!({"embedding": vec![true; DIM]})), "wrong_type"),
        case("nested embedding", response(json!({"embedding": [vec![0.5; DIM]]})), "wrong_type"),
        case("embedding_b64 is a number", response(json!({"embedding": null, "embedding_b64": 12})), "wrong_type"),
        case("metadata is an array", response(json!({"metadata": [1, 2]})), "wrong_type"),
        case("metadata is a string", response(json!({"metadata": "m"})), "wrong_type"),
        case("empty response_id", response(json!({"response_id": ""})), "invalid_value"),
        case("prompt_id over 256 bytes", response(json!({"prompt_id": "p".repeat(257)})), "invalid_value"),
        case("both embedding encodings", response(json!({"embedding_b64": b64_f32(&[0.5; DIM])})), "invalid_value"),
        case("field given twice", valid.replacen('{', r#"{"prompt_id":"a","#, 1), "invalid_value"),
        // Embedding contents.
        case("embedding too short", response(json!({"embedding": vec![0.5; DIM - 1]})), "wrong_dimension"),
        case("embedding too long", response(json!({"embedding": vec![0.5; DIM + 1]})), "wrong_dimension"),
        case("empty embedding", response(json!({"embedding": []})), "wrong_dimension"),
        case("100k-value embedding", response(json!({"embedding": vec![0.5; 100_000]})), "wrong_dimension"),
        case("base64 of the wrong dimension", with_b64(b64_f32(&[0.5; DIM * 2])), "wrong_dimension"),
        case("1e308 (overflows f32)", response(json!({"embedding": [0.5, 1e308, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]})), "non_finite"),
        case("-3.5e38 (just past f32)", valid.replacen("0.5", "-3.5e38", 1), "non_finite"),
        case("1e400 (overflows f64)", valid.replacen("0.5", "1e400", 1), "non_finite"),
        case("NaN bit pattern in base64", with_b64(b64_bits(&[0, nan, 0, 0, 0, 0, 0, 0])), "non_finite"),
        case("+Inf bit pattern in base64", with_b64(b64_f32(&[f32::INFINITY; DIM])), "non_finite"),
        case(
            "-Inf bit pattern in base64",
            with_b64(b64_f32(&[
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
                f32::NEG_INFINITY,
            ])),
            "non_finite",
        ),
        case("signalling NaN bit pattern in base64", with_b64(b64_bits(&[0x7f80_0001; DIM])), "non_finite"),
        case("not base64", with_b64("!!!not base64!!!"), "invalid_base64"),
        case("URL-safe base64 alphabet", with_b64("____________________________________________"), "invalid_base64"),
        case("base64 of 31 bytes (not whole f32)", with_b64(base64::engine::general_purpose::STANDARD.encode([0u8; 31])), "invalid_base64"),
        case("base64 with a space", with_b64(format!("{} ", b64_f32(&[0.5; DIM]))), "invalid_base64"),
    ]
}

/// Bad messages on the labels topic. `reqs` are requests the daemon issued: [0] and [1] get a valid label
/// first (sent before this corpus, see the test), [2] gets a label timestamped after its expiry.
#[rustfmt::skip]
fn label_corpus(reqs: &[LabelRequest]) -> Vec<Case> {
    let (r0, r1, r2) = (
        &reqs[0].request_id,
        &reqs[1].request_id,
        &reqs[2].request_id,
    );
    let ok = label("q", json!({}));
    let huge = label(
        &"q".repeat(8),
        json!({"metadata": {"blob": "x".repeat(HUGE)}}),
    );
    let never_issued = request_id(INSTANCE, 1_000_000, "p0-r0", "p0-r1");
    let mut expired = case("label after its request expired", label(r2, json!({})), "expired_request");
    expired.timestamp_ms = Some(reqs[2].expires_at_ms + 1);
    vec![
        // Envelope.
        Case { name: "tombstone (no payload)", payload: None, reason: "empty_payload", timestamp_ms: None },
        case("empty payload", "", "empty_payload"),
        case("3 MiB label (> pool.max_message_bytes)", &huge, "oversized"),
        case("invalid UTF-8", b"{\"request_id\": \"\xc3\x28\"}", "invalid_utf8"),
        // Not a JSON object.
        case("truncated JSON", &ok[..ok.len() - 3], "invalid_json"),
        case("plain text", "a", "invalid_json"),
        case("JSON array", r#"["armd.label.v1", "q", "a"]"#, "invalid_json"),
        case("JSON true", "true", "invalid_json"),
        case("trailing garbage", format!("{ok}}}"), "invalid_json"),
        case("NaN probability token", ok.replace("\"a\"", "NaN"), "invalid_json"),
        // Schema and fields.
        case("schema of another version", label("q", json!({"schema": "armd.label.v2"})), "unsupported_schema"),
        case("a request message's schema", label("q", json!({"schema": "armd.request.v1"})), "unsupported_schema"),
        case("a response on the labels topic", response(json!({})), "unknown_field"),
        case("unknown field", label("q", json!({"confidence": 0.7})), "unknown_field"),
        case("missing schema", label("q", json!({"schema": null})), "missing_field"),
        case("missing request_id", label("q", json!({"request_id": null})), "missing_field"),
        case("missing outcome", label("q", json!({"outcome": null})), "missing_field"),
        case("request_id is a number", label("q", json!({"request_id": 17})), "wrong_type"),
        case("annotator_id is a number", label("q", json!({"annotator_id": 42})), "wrong_type"),
        case("annotator_id is an object", label("q", json!({"annotator_id": {"name": "x"}})), "wrong_type"),
        case("outcome is a boolean", label("q", json!({"outcome": true})), "wrong_type"),
        case("outcome is an array", label("q", json!({"outcome": ["a"]})), "wrong_type"),
        case("outcome is an object", label("q", json!({"outcome": {"winner": "a"}})), "wrong_type"),
        case("metadata is an array", label("q", json!({"metadata": [1]})), "wrong_type"),
        case("empty request_id", label("", json!({})), "invalid_value"),
        case("request_id over 256 bytes", label(&"q".repeat(300), json!({})), "invalid_value"),
        case("empty annotator_id", label("q", json!({"annotator_id": ""})), "invalid_value"),
        case("field given twice", ok.replacen('{', r#"{"outcome":"b","#, 1), "invalid_value"),
        case("outcome 1e400 (overflows f64)", ok.replace("\"a\"", "1e400"), "non_finite"),
        case("unknown outcome word", label("q", json!({"outcome": "c"})), "outcome_out_of_range"),
        case("outcome in upper case", label("q", json!({"outcome": "A"})), "outcome_out_of_range"),
        case("outcome with a space", label("q", json!({"outcome": "tie "})), "outcome_out_of_range"),
        case("probability as a string", label("q", json!({"outcome": "0.5"})), "outcome_out_of_range"),
        case("NaN probability as a string", label("q", json!({"outcome": "NaN"})), "outcome_out_of_range"),
        case("probability above 1", label("q", json!({"outcome": 1.5})), "outcome_out_of_range"),
        case("negative probability", label("q", json!({"outcome": -0.1})), "outcome_out_of_range"),
        case("probability 1e308", label("q", json!({"outcome": 1e308})), "outcome_out_of_range"),
        case("integer outcome 2", label("q", json!({"outcome": 2})), "outcome_out_of_range"),
        // Joined with the daemon's requests.
        case("unknown request id", label("no-such-request", json!({})), "unknown_request"),
        case("own id shape, never issued (label before its request)", label(&never_issued, json!({})), "unknown_request"),
        case("second anonymous label for a request", label(r0, json!({"outcome": "b"})), "duplicate_label"),
        case("same annotator labels again", label(r1, json!({"annotator_id": "ann-1", "outcome": "tie"})), "duplicate_label"),
        expired,
    ]
}

fn expect_code(name: &str, reason: &str) {
    assert!(
        Reason::ALL.iter().any(|r| r.code() == reason),
        "case {name:?}: {reason:?} is not a reason code"
    );
}

fn assert_healthy(d: &InProcess) {
    assert!(d.is_running(), "the daemon stopped");
    for path in ["healthz", "readyz"] {
        let got = get(&format!("{}/{path}", d.base)).map(|(s, _)| s);
        assert_eq!(got, Some(200), "/{path}");
    }
}

/// Waits until the daemon emitted at least `n` requests and reads them from the requests topic.
fn issued_requests(d: &InProcess, b: &str, t: &Topics, n: usize) -> Vec<LabelRequest> {
    wait_metric(
        &d.base,
        "armd_requests_emitted_total",
        Duration::from_secs(60),
        |v| v >= n as f64,
    );
    read_topic(b, &t.requests, n, Duration::from_secs(30))
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect()
}

/// Waits until the counter `series` reaches `n` and checks it did not overshoot; returns the exposition.
fn wait_exact(base: &str, series: &str, n: f64, timeout: Duration) -> String {
    let text = wait_metric(base, series, timeout, |v| v >= n);
    assert_eq!(metric(&text, series), Some(n), "{series}");
    text
}

/// Each series `family{reason=…}` of the topic's `codes` counts exactly the cases expecting that reason.
/// Rejection counters equal the cases' reasons plus `extra` (rejections that another instance
/// dead-letters).
fn assert_rejected_counts(
    text: &str,
    family: &str,
    cases: &[Case],
    codes: &[Reason],
    extra: &[&'static str],
) {
    let mut want: BTreeMap<&'static str, usize> = codes.iter().map(|r| (r.code(), 0)).collect();
    for code in extra {
        *want.get_mut(code).expect("a reason of this topic") += 1;
    }
    for c in cases {
        *want.get_mut(c.reason).unwrap_or_else(|| {
            panic!("{:?}: {} is not a reason of this topic", c.name, c.reason)
        }) += 1;
    }
    for (code, n) in want {
        let series = format!("{family}{{reason=\"{code}\"}}");
        assert_eq!(metric(text, &series), Some(n as f64), "{series}");
    }
}

#[test]
fn hostile_messages_are_dead_lettered_with_their_reason_and_valid_ones_around_them_are_processed() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "input");
    allow_large_messages(b, &[&t.responses, &t.labels], TOPIC_LIMIT);
    let state = tempfile::tempdir().unwrap();
    let text = config_text(b, &t, state.path(), DIM, INSTANCE);
    let cfg = Config::from_toml_with_env(&text, &[]).unwrap();
    let d = start_in_process(cfg).wait_ready(Duration::from_secs(60));
    let p = Positioned::new(b, TOPIC_LIMIT);

    // Responses: each bad message follows a valid one; one valid response is sent twice.
    let mut world = World::new(DIM, 5);
    let valid = world.prompts(40, 4);
    let bad = response_corpus();
    for c in &bad {
        expect_code(c.name, c.reason);
    }
    let names: std::collections::BTreeSet<&str> = bad.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), bad.len(), "case names are distinct");
    assert!(bad.len() >= 30);
    let mut sources = BTreeMap::new(); // (topic, partition, offset) → case
    let mut sent_responses = 0;
    for (i, s) in valid.iter().enumerate() {
        let m = json!({"schema": RESPONSE_SCHEMA, "prompt_id": format!("p{}", s.prompt),
                       "response_id": s.response_id, "embedding_b64": encode_f32_b64(&s.x)});
        let key = format!("p{}", s.prompt);
        p.send(&t.responses, &key, Some(m.to_string().as_bytes()), None);
        sent_responses += 1;
        if i == 2 {
            // A redelivered response (same ids, same partition) is ignored, not dead-lettered.
            let first = &valid[0];
            let m = json!({"schema": RESPONSE_SCHEMA, "prompt_id": format!("p{}", first.prompt),
                           "response_id": first.response_id, "embedding_b64": encode_f32_b64(&first.x)});
            p.send(
                &t.responses,
                &format!("p{}", first.prompt),
                Some(m.to_string().as_bytes()),
                None,
            );
            sent_responses += 1;
        }
        if let Some(c) = bad.get(i) {
            let (part, off) = p.send(&t.responses, c.name, c.payload.as_deref(), None);
            sources.insert((t.responses.clone(), part, off), c);
            sent_responses += 1;
        }
    }
    assert!(valid.len() >= bad.len());
    let text = wait_exact(
        &d.base,
        "armd_responses_received_total",
        sent_responses as f64,
        Duration::from_secs(60),
    );
    assert_eq!(
        metric(&text, "armd_responses_accepted_total"),
        Some(valid.len() as f64 + 1.0)
    );
    assert_eq!(metric(&text, "armd_responses_duplicate_total"), Some(1.0));
    assert_rejected_counts(
        &text,
        "armd_responses_rejected_total",
        &bad,
        &Reason::RESPONSE,
        &[],
    );
    assert_healthy(&d);

    // The valid responses were pooled and paired: the in-flight budget (16) fills up.
    let reqs = issued_requests(&d, b, &t, 16);
    assert!(reqs.len() >= 16, "only {} requests", reqs.len());
    assert!(reqs.iter().all(|r| r.instance_id == INSTANCE));

    // Labels: the originals of the duplicate cases, then the corpus with one valid label after each bad one
    // while valid labels last; request [2] gets its timely label after the expired one.
    let bad_labels = label_corpus(&reqs);
    for c in &bad_labels {
        expect_code(c.name, c.reason);
    }
    assert!(bad_labels.len() >= 30);
    let names: std::collections::BTreeSet<&str> = bad_labels.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), bad_labels.len(), "case names are distinct");
    let key_of = |c: &Case| -> String {
        // Labels of real requests are keyed by request id, so they stay in order with their originals.
        match c
            .payload
            .as_deref()
            .map(serde_json::from_slice::<serde_json::Value>)
        {
            Some(Ok(v)) => v["request_id"].as_str().unwrap_or(c.name).to_string(),
            _ => c.name.to_string(),
        }
    };
    let mut applied = 0u64;
    let mut send_valid = |r: &LabelRequest, extra: serde_json::Value| {
        let l = label(&r.request_id, extra);
        p.send(&t.labels, &r.request_id, Some(l.as_bytes()), None);
        applied += 1;
    };
    send_valid(&reqs[0], json!({}));
    send_valid(&reqs[1], json!({"annotator_id": "ann-1"}));
    let mut sent_labels = 2u64;
    let mut rest = reqs[3..].iter();
    for c in &bad_labels {
        let (part, off) = p.send(&t.labels, &key_of(c), c.payload.as_deref(), c.timestamp_ms);
        sources.insert((t.labels.clone(), part, off), c);
        sent_labels += 1;
        if let Some(r) = rest.next() {
            send_valid(r, json!({"outcome": 0.25}));
            sent_labels += 1;
        }
    }
    send_valid(&reqs[2], json!({"outcome": "tie"}));
    // A label for a request of another instance that is not on the requests topic: rejected as unknown
    // here too, but the dead letter is that instance's to write (one per bad label in a group).
    let foreign = label(&request_id("armd-other", 3, "x", "y"), json!({}));
    p.send(&t.labels, "foreign", Some(foreign.as_bytes()), None);
    sent_labels += 2;

    wait_exact(
        &d.base,
        "armd_labels_received_total",
        sent_labels as f64,
        Duration::from_secs(60),
    );
    let text = wait_exact(
        &d.base,
        "armd_model_labels_applied",
        applied as f64,
        Duration::from_secs(30),
    );
    assert_eq!(
        metric(&text, "armd_labels_applied_total"),
        Some(applied as f64)
    );
    assert_eq!(metric(&text, "armd_labels_foreign_total"), Some(0.0));
    assert_rejected_counts(
        &text,
        "armd_labels_rejected_total",
        &bad_labels,
        &Reason::LABEL,
        &["unknown_request"],
    );
    assert_healthy(&d);

    // Every bad message has exactly one dead letter, at its source position, with its reason.
    let n_bad = bad.len() + bad_labels.len();
    let dls = dead_letters(b, &t.dead_letter, n_bad);
    wait_exact(
        &d.base,
        "armd_dead_letters_total",
        n_bad as f64,
        Duration::from_secs(10),
    );
    assert_eq!(
        dls.len(),
        n_bad,
        "dead letters: {:?}",
        dls.iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
    let mut seen = std::collections::BTreeSet::new();
    for dl in &dls {
        let at = (
            dl.source.topic.clone(),
            dl.source.partition,
            dl.source.offset,
        );
        let c = sources.get(&at).unwrap_or_else(|| {
            panic!("dead letter for a message that is not in the corpus: {dl:?}")
        });
        assert!(seen.insert(at), "{:?} dead-lettered twice", c.name);
        assert_eq!(dl.reason, c.reason, "case {:?}: {}", c.name, dl.detail);
        assert!(!dl.detail.is_empty(), "case {:?}", c.name);
        let bytes = c.payload.as_deref().unwrap_or(&[]);
        assert_eq!(dl.payload_bytes, bytes.len(), "case {:?}", c.name);
        assert_eq!(
            dl.payload_truncated,
            bytes.len() > (64 << 10),
            "case {:?}",
            c.name
        );
        if !dl.payload_truncated {
            match std::str::from_utf8(bytes) {
                Ok(s) => assert_eq!(dl.payload.as_deref(), Some(s), "case {:?}", c.name),
                Err(_) => assert_eq!(
                    dl.payload_b64.as_deref(),
                    Some(
                        base64::engine::general_purpose::STANDARD
                            .encode(bytes)
                            .as_str()
                    ),
                    "case {:?}",
                    c.name
                ),
            }
        }
    }
    assert_healthy(&d);
    d.shutdown().expect("clean shutdown after hostile input");
    eprintln!(
        "{} bad responses and {} bad labels dead-lettered; {} valid responses pooled, {applied} labels applied",
        bad.len(),
        bad_labels.len(),
        valid.len()
    );
}

/// "Label after expiry" with a real short TTL (1 s, no grace): labels that arrive after their requests
/// expired — whether the daemon still holds the lapsed request or has already forgotten it into its
/// closed set — are dead-lettered as `expired_request` and never applied, and the expired requests'
/// responses go back to the pool and are paired again.
#[test]
fn labels_after_a_short_request_ttl_are_dead_lettered_as_expired() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "expiry");
    let state = tempfile::tempdir().unwrap();
    let text = config_text(b, &t, state.path(), DIM, INSTANCE).replace(
        "request_ttl_secs = 300",
        "request_ttl_secs = 1\nexpiry_grace_secs = 0",
    );
    assert!(text.contains("request_ttl_secs = 1\n"));
    let cfg = Config::from_toml_with_env(&text, &[]).unwrap();
    let d = start_in_process(cfg).wait_ready(Duration::from_secs(60));
    let mut world = World::new(DIM, 6);
    send_responses(b, &t.responses, &world.prompts(12, 4));
    let reqs = issued_requests(&d, b, &t, 8);
    // Wait (not assert) until every one of them is past its expiry, then answer them all.
    let last_expiry = reqs.iter().map(|r| r.expires_at_ms).max().unwrap();
    while armd::daemon::input::now_ms() <= last_expiry + 200 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = Positioned::new(b, 1 << 20);
    let mut sources = BTreeMap::new();
    for r in &reqs {
        let at = p.send(
            &t.labels,
            &r.request_id,
            Some(label(&r.request_id, json!({})).as_bytes()),
            None,
        );
        sources.insert(at, r.request_id.clone());
    }
    let n = reqs.len() as f64;
    let text = wait_exact(
        &d.base,
        "armd_labels_received_total",
        n,
        Duration::from_secs(60),
    );
    assert_eq!(
        metric(
            &text,
            "armd_labels_rejected_total{reason=\"expired_request\"}"
        ),
        Some(n)
    );
    assert_eq!(metric(&text, "armd_labels_applied_total"), Some(0.0));
    assert_eq!(metric(&text, "armd_model_labels_applied"), Some(0.0));
    wait_metric(
        &d.base,
        "armd_requests_expired_total",
        Duration::from_secs(10),
        |v| v >= n,
    );
    let dls = dead_letters(b, &t.dead_letter, reqs.len());
    assert_eq!(dls.len(), reqs.len());
    for dl in &dls {
        assert_eq!(
            (dl.reason.as_str(), dl.source.topic.as_str()),
            ("expired_request", t.labels.as_str())
        );
        let id = sources
            .get(&(dl.source.partition, dl.source.offset))
            .expect("a label we sent");
        assert!(
            dl.detail.contains(id.as_str()) || dl.detail.contains("expir"),
            "{}",
            dl.detail
        );
    }
    // The expired pairs' responses were re-offered and paired again.
    wait_metric(
        &d.base,
        "armd_requests_emitted_total",
        Duration::from_secs(30),
        |v| v > n,
    );
    assert_healthy(&d);
    d.shutdown().expect("clean shutdown");
}
