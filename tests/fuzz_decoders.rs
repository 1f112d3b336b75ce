//! Property-based fuzzing of the input decoders (`Decoder::response`, `Decoder::label`), bounded so it runs
//! in CI (`PROPTEST_CASES=n` raises the number of cases of each property locally).
//!
//! Inputs: arbitrary bytes; arbitrary bytes behind a `{"` prefix (past the envelope checks); and
//! structure-aware mutations of valid messages — truncation at every byte, field deletion, field
//! duplication, type swaps, extreme numbers written as JSON text, random base64, huge arrays.
//!
//! Properties, for every input:
//! - the decoder returns (no panic);
//! - `Ok` only for a message that re-validates: the decoded value satisfies every documented limit and
//!   its canonical re-encoding decodes to the same value;
//! - a rejection's reason is one of the topic's documented codes (`Reason::RESPONSE` / `Reason::LABEL`,
//!   the series of `armd_*_rejected_total`), and its detail is non-empty and, for field-specific reasons,
//!   names a field of the message;
//! - mutations with a known outcome (a proper prefix, a deleted required field, a duplicated field, a
//!   wrong length, a number beyond f32) get exactly the expected reason.

use armd::daemon::messages::{
    encode_f32_b64, Decoder, LabelMsg, Reason, Rejection, Response, LABEL_SCHEMA, MAX_ID_BYTES,
    RESPONSE_SCHEMA,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};

const DIM: usize = 6;
const MAX_BYTES: usize = 1 << 20;

fn decoder() -> Decoder {
    Decoder::new(DIM, MAX_BYTES)
}

/// Fields of each schema, for "the detail names a field".
const RESPONSE_FIELDS: [&str; 6] = [
    "schema",
    "prompt_id",
    "response_id",
    "embedding",
    "embedding_b64",
    "metadata",
];
const LABEL_FIELDS: [&str; 5] = [
    "schema",
    "request_id",
    "outcome",
    "annotator_id",
    "metadata",
];

/// Reasons whose detail must name the field concerned.
fn field_specific(r: Reason) -> bool {
    !matches!(
        r,
        Reason::EmptyPayload | Reason::Oversized | Reason::InvalidUtf8 | Reason::InvalidJson
    )
}

/// Top-level keys of `payload` when it parses as a JSON object (unknown fields are named by key).
fn top_level_keys(payload: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn check_rejection(rej: &Rejection, allowed: &[Reason], fields: &[&str], payload: &[u8]) {
    assert!(
        allowed.contains(&rej.reason),
        "reason {} is not a documented code of this topic ({}) for {:?}",
        rej.reason,
        rej.detail,
        String::from_utf8_lossy(payload)
    );
    assert!(
        !rej.detail.trim().is_empty(),
        "empty detail for {}",
        rej.reason
    );
    if field_specific(rej.reason) {
        let keys = top_level_keys(payload);
        let named = fields
            .iter()
            .copied()
            .chain(keys.iter().map(String::as_str))
            .any(|f| rej.detail.contains(f));
        assert!(
            named,
            "{} detail {:?} names no field of {:?}",
            rej.reason,
            rej.detail,
            String::from_utf8_lossy(payload)
        );
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

/// An accepted response satisfies the limits and its canonical re-encodings (array and base64) decode to
/// the same value.
fn check_response_ok(r: &Response) {
    let d = decoder();
    assert!(valid_id(&r.prompt_id) && valid_id(&r.response_id), "{r:?}");
    assert_eq!(r.embedding.len(), DIM);
    assert!(r.embedding.iter().all(|x| x.is_finite()), "{r:?}");
    let meta = r.metadata.as_ref().map(|m| m.to_value());
    assert!(matches!(meta, None | Some(Value::Object(_))), "{r:?}");
    let mut m = json!({"schema": RESPONSE_SCHEMA, "prompt_id": &*r.prompt_id,
                       "response_id": &*r.response_id, "embedding": r.embedding});
    if let Some(meta) = &meta {
        m["metadata"] = meta.clone();
    }
    let again = d
        .response(Some(m.to_string().as_bytes()))
        .expect("re-validates");
    assert_eq!(
        (&again.prompt_id, &again.response_id, &again.embedding),
        (&r.prompt_id, &r.response_id, &r.embedding)
    );
    assert!(
        json_close(
            again.metadata.as_ref().map(|m| m.to_value()).as_ref(),
            meta.as_ref()
        ),
        "{again:?} {r:?}"
    );
    let mut b = m.clone();
    b.as_object_mut().unwrap().remove("embedding");
    b["embedding_b64"] = encode_f32_b64(&r.embedding).into();
    let again = d
        .response(Some(b.to_string().as_bytes()))
        .expect("re-validates");
    assert_eq!(
        again
            .embedding
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        r.embedding.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

/// Equal JSON up to the last bits of floats: serde_json (without its `float_roundtrip` feature) does not
/// parse every float correctly rounded, so pass-through metadata may change in the last ulp.
fn json_close(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(Value::Number(x)), Some(Value::Number(y))) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => p == q || (p - q).abs() <= 1e-14 * p.abs().max(q.abs()),
            _ => x == y,
        },
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_close(Some(p), Some(q)))
        }
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            x.len() == y.len() && x.iter().all(|(k, v)| json_close(Some(v), y.get(k)))
        }
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn check_label_ok(l: &LabelMsg) {
    assert!(valid_id(&l.request_id), "{l:?}");
    assert!(l.y.is_finite() && (0.0..=1.0).contains(&l.y), "{l:?}");
    assert!(l.annotator_id.as_deref().is_none_or(valid_id), "{l:?}");
    let mut m = json!({"schema": LABEL_SCHEMA, "request_id": l.request_id, "outcome": l.y});
    if let Some(a) = &l.annotator_id {
        m["annotator_id"] = a.clone().into();
    }
    let again = decoder()
        .label(Some(m.to_string().as_bytes()))
        .expect("re-validates");
    assert_eq!(&again, l);
}

/// Decodes `payload` as both kinds and checks the general properties; returns the two results.
fn decode_both(payload: &[u8]) -> (Result<Response, Rejection>, Result<LabelMsg, Rejection>) {
    let d = decoder();
    let r = d.response(Some(payload));
    match &r {
        Ok(ok) => check_response_ok(ok),
        Err(rej) => check_rejection(rej, &Reason::RESPONSE, &RESPONSE_FIELDS, payload),
    }
    let l = d.label(Some(payload));
    match &l {
        Ok(ok) => check_label_ok(ok),
        Err(rej) => check_rejection(rej, &Reason::LABEL, &LABEL_FIELDS, payload),
    }
    (r, l)
}

// -------------------------------------------------------------------------------------------------
// Generators

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,24}",
        "\\PC{1,12}",                           // any printable Unicode
        Just("x".repeat(MAX_ID_BYTES)),         // at the limit
        Just("é".repeat(MAX_ID_BYTES / 2 + 1)), // over it in bytes, not in chars
        Just(String::new()),                    // empty
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1e6f32..1e6f32,
        any::<f32>().prop_filter("finite", |x| x.is_finite()),
        Just(f32::MAX),
        Just(f32::MIN_POSITIVE),
        Just(-0.0f32),
    ]
}

/// A valid response as an ordered list of (key, JSON text) fields.
fn valid_response() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        "[a-z0-9]{1,12}",
        "[a-z0-9]{1,12}",
        prop::collection::vec(finite_f32(), DIM),
        any::<bool>(),
        prop::option::of(any_json().prop_map(|v| json!({"ctx": v}))),
    )
        .prop_map(|(p, r, x, b64, meta)| {
            let mut f = vec![
                ("schema".to_string(), json!(RESPONSE_SCHEMA).to_string()),
                ("prompt_id".to_string(), json!(p).to_string()),
                ("response_id".to_string(), json!(r).to_string()),
            ];
            if b64 {
                f.push((
                    "embedding_b64".into(),
                    json!(encode_f32_b64(&x)).to_string(),
                ));
            } else {
                f.push(("embedding".into(), json!(x).to_string()));
            }
            if let Some(m) = meta {
                f.push(("metadata".into(), m.to_string()));
            }
            f
        })
}

fn valid_label() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        "[a-z0-9-]{1,40}",
        prop_oneof![
            Just(json!("a")),
            Just(json!("b")),
            Just(json!("tie")),
            (0.0f64..=1.0).prop_map(Value::from),
            Just(json!(0)),
            Just(json!(1)),
        ],
        prop::option::of("[a-z0-9]{1,12}"),
        prop::option::of(any_json().prop_map(|v| json!({"ctx": v}))),
    )
        .prop_map(|(rid, outcome, ann, meta)| {
            let mut f = vec![
                ("schema".to_string(), json!(LABEL_SCHEMA).to_string()),
                ("request_id".to_string(), json!(rid).to_string()),
                ("outcome".to_string(), outcome.to_string()),
            ];
            if let Some(a) = ann {
                f.push(("annotator_id".into(), json!(a).to_string()));
            }
            if let Some(m) = meta {
                f.push(("metadata".into(), m.to_string()));
            }
            f
        })
}

fn render(fields: &[(String, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// JSON number texts around and beyond the f32 and f64 limits, with whether they fit in f32.
const EXTREME_NUMBERS: [(&str, bool); 14] = [
    ("1e308", false),
    ("-1e308", false),
    ("1.7976931348623157e308", false),
    ("1e400", false),
    ("-1e400", false),
    ("3.5e38", false),
    ("-3.5e38", false),
    ("3.4028234e38", true),
    ("-3.4028234e38", true),
    ("1e-46", true),
    ("5e-324", true),
    ("-0.0", true),
    ("0", true),
    ("123456789012345678901234567890", true),
];

/// Replacement values of the wrong (or right) JSON type for a field.
fn swap_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any_json().prop_map(|v| v.to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("null".to_string()),
        Just("\"\"".to_string()),
        prop::sample::select(EXTREME_NUMBERS.map(|(n, _)| n.to_string()).to_vec()),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
}

// -------------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_reject_with_documented_codes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        object_prefix in any::<bool>(),
    ) {
        let mut payload = if object_prefix { b"{\"".to_vec() } else { Vec::new() };
        payload.extend_from_slice(&bytes);
        let _ = decode_both(&payload);
    }

    #[test]
    fn arbitrary_json_objects_with_schema_keys(
        fields in prop::collection::vec(
            (prop::sample::select(RESPONSE_FIELDS.iter().chain(&LABEL_FIELDS).copied().collect::<Vec<_>>()), any_json()),
            0..7,
        ),
    ) {
        let text = render(&fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>());
        let _ = decode_both(text.as_bytes());
    }

    #[test]
    fn truncating_a_valid_message_at_every_byte_is_rejected_as_malformed(
        resp in valid_response(),
        label in valid_label(),
    ) {
        for (fields, is_response) in [(&resp, true), (&label, false)] {
            let text = render(fields);
            let (r, l) = decode_both(text.as_bytes());
            let whole = if is_response { r.map(drop) } else { l.map(drop) };
            prop_assert!(whole.is_ok(), "the valid message itself is rejected: {text} {whole:?}");
            for cut in 0..text.len() {
                // The general properties hold for both decoders; the reason is fixed for the matching one
                // (the other may stop earlier, at the first field it does not know).
                let (r, l) = decode_both(&text.as_bytes()[..cut]);
                let rej = if is_response { r.map(drop) } else { l.map(drop) }
                    .expect_err("a proper prefix of an object is never a message");
                let want = match cut {
                    0 => Reason::EmptyPayload,
                    _ if !text.is_char_boundary(cut) => Reason::InvalidUtf8,
                    _ => Reason::InvalidJson,
                };
                prop_assert_eq!(rej.reason, want, "cut at {} of {}: {}", cut, text, rej.detail);
            }
        }
    }

    #[test]
    fn deleting_duplicating_or_swapping_a_field(
        resp in valid_response(),
        label in valid_label(),
        pick in any::<prop::sample::Index>(),
        swap in swap_value(),
        extra_key in "[a-z]{1,8}",
    ) {
        let d = decoder();
        for (fields, is_response) in [(&resp, true), (&label, false)] {
            let i = pick.index(fields.len());
            let key = fields[i].0.clone();
            let decode = |t: &str| -> Result<(), Rejection> {
                if is_response { d.response(Some(t.as_bytes())).map(drop) } else { d.label(Some(t.as_bytes())).map(drop) }
            };
            // Deleted: a required field is missing (the embedding is required in one of its two forms).
            let mut del = fields.clone();
            del.remove(i);
            let text = render(&del);
            let _ = decode_both(text.as_bytes());
            match decode(&text) {
                Ok(()) => prop_assert!(key == "metadata" || key == "annotator_id", "{text} accepted without {key}"),
                Err(rej) => {
                    prop_assert_eq!(rej.reason, Reason::MissingField, "{}: {}", text, rej.detail);
                    let named = rej.detail.contains(key.as_str());
                    prop_assert!(named, "{}", rej.detail);
                }
            }
            // Duplicated: never accepted, the detail names the field.
            let mut dup = fields.clone();
            dup.push(fields[i].clone());
            let text = render(&dup);
            let _ = decode_both(text.as_bytes());
            let rej = decode(&text).expect_err("a duplicated field is rejected");
            prop_assert_eq!(rej.reason, Reason::InvalidValue, "{}: {}", text, rej.detail);
            prop_assert!(rej.detail.contains(&format!("`{key}`")), "{}", rej.detail);
            // Swapped to another value: accepted only if it re-validates (checked in decode_both).
            let mut sw = fields.clone();
            sw[i].1 = swap.clone();
            let _ = decode_both(render(&sw).as_bytes());
            // An unknown field is named.
            let mut unk = fields.clone();
            unk.insert(i, (format!("x_{extra_key}"), "1".into()));
            let text = render(&unk);
            let rej = decode(&text).expect_err("unknown field");
            prop_assert_eq!(rej.reason, Reason::UnknownField);
            prop_assert!(rej.detail.contains(&format!("x_{extra_key}")), "{}", rej.detail);
        }
    }

    #[test]
    fn ids_are_accepted_exactly_when_non_empty_and_within_the_limit(
        resp in valid_response(),
        label in valid_label(),
        new_id in id(),
    ) {
        let d = decoder();
        for (fields, is_response) in [(&resp, true), (&label, false)] {
            for (i, (key, _)) in fields.iter().enumerate().filter(|(_, (k, _))| k.ends_with("_id")) {
                let mut f = fields.clone();
                f[i].1 = json!(new_id).to_string();
                let text = render(&f);
                let _ = decode_both(text.as_bytes());
                let got = if is_response { d.response(Some(text.as_bytes())).map(drop) } else { d.label(Some(text.as_bytes())).map(drop) };
                match got {
                    Ok(()) => prop_assert!(valid_id(&new_id), "{key} = {new_id:?} accepted"),
                    Err(rej) => {
                        prop_assert!(!valid_id(&new_id), "{}: {}", key, rej.detail);
                        prop_assert_eq!(rej.reason, Reason::InvalidValue);
                        prop_assert!(rej.detail.contains(&format!("`{key}`")), "{}", rej.detail);
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_numbers_in_the_embedding_and_the_outcome(
        x in prop::collection::vec(finite_f32(), DIM),
        at in 0..DIM,
        n in prop::sample::select(EXTREME_NUMBERS.to_vec()),
    ) {
        let (number, fits_f32) = n;
        let mut parts: Vec<String> = x.iter().map(|v| json!(v).to_string()).collect();
        parts[at] = number.to_string();
        let text = format!(
            r#"{{"schema":"{RESPONSE_SCHEMA}","prompt_id":"p","response_id":"r","embedding":[{}]}}"#,
            parts.join(",")
        );
        let (r, _) = decode_both(text.as_bytes());
        match r {
            Ok(ok) => prop_assert!(fits_f32, "{number} accepted as {}", ok.embedding[at]),
            Err(rej) => {
                prop_assert!(!fits_f32, "{}: {}", number, rej.detail);
                prop_assert_eq!(rej.reason, Reason::NonFinite, "{}", rej.detail);
                prop_assert!(rej.detail.contains("embedding"), "{}", rej.detail);
            }
        }
        let text = format!(r#"{{"schema":"{LABEL_SCHEMA}","request_id":"q","outcome":{number}}}"#);
        let (_, l) = decode_both(text.as_bytes());
        let v: f64 = number.parse().unwrap();
        match l {
            Ok(ok) => prop_assert_eq!(ok.y, v),
            Err(rej) => {
                prop_assert!(!(0.0..=1.0).contains(&v), "{}: {}", number, rej.detail);
                let want = if v.is_finite() { Reason::OutcomeOutOfRange } else { Reason::NonFinite };
                prop_assert_eq!(rej.reason, want, "{}", rej.detail);
                prop_assert!(rej.detail.contains("outcome"), "{}", rej.detail);
            }
        }
    }

    #[test]
    fn random_base64_and_huge_arrays(
        b64 in prop_oneof![
            "[A-Za-z0-9+/]{0,64}={0,3}",
            "[A-Za-z0-9+/=\\-_ .!]{0,40}",
            prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| encode_bytes(&b)),
        ],
        n in prop_oneof![Just(0usize), Just(DIM - 1), Just(DIM + 1), 0usize..100_000],
    ) {
        let text = format!(
            r#"{{"schema":"{RESPONSE_SCHEMA}","prompt_id":"p","response_id":"r","embedding_b64":{}}}"#,
            json!(b64)
        );
        let (r, _) = decode_both(text.as_bytes());
        if let Ok(ok) = r {
            // Accepted base64 is canonical: re-encoding gives the same string up to padding.
            let again = encode_f32_b64(&ok.embedding);
            prop_assert_eq!(again.trim_end_matches('='), b64.trim_end_matches('='));
        }
        let text = format!(
            r#"{{"schema":"{RESPONSE_SCHEMA}","prompt_id":"p","response_id":"r","embedding":[{}]}}"#,
            vec!["0.5"; n].join(",")
        );
        let (r, _) = decode_both(text.as_bytes());
        match r {
            Ok(_) => prop_assert_eq!(n, DIM),
            Err(rej) => {
                let want = if text.len() > MAX_BYTES { Reason::Oversized } else { Reason::WrongDimension };
                prop_assert_eq!(rej.reason, want, "{}", rej.detail);
            }
        }
    }
}

/// Standard padded base64 of arbitrary bytes (any length, so often not whole f32).
fn encode_bytes(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
