//! Decoders and wire types against hand-written messages, and the fast base64 path against the
//! reference one.

use super::*;
use serde_json::json;

const D: usize = 4;

fn dec() -> Decoder {
    Decoder::new(D, 10_000)
}

fn resp(v: Value) -> Result<Response, Rejection> {
    dec().response(Some(v.to_string().as_bytes()))
}

fn good() -> Value {
    json!({"schema": RESPONSE_SCHEMA, "prompt_id": "p", "response_id": "r",
           "embedding": [1.0, -2.5, 0.0, 3.25]})
}

fn reason_of(r: Result<impl fmt::Debug, Rejection>) -> Reason {
    r.unwrap_err().reason
}

/// One `"key": value` member of a response message, from a menu of valid and troublesome ones.
fn response_part() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let b64 = |v: &[f32]| encode_f32_b64(v);
    let good4 = b64(&[1.0, -2.5, 0.0, 3.25]);
    prop_oneof![
        Just(format!("\"schema\": \"{RESPONSE_SCHEMA}\"")),
        Just("\"schema\":\"armd.response.v2\"".to_string()),
        Just("\"prompt_id\": \"p1\"".to_string()),
        Just("\"prompt_id\": \"p\\u00e9\"".to_string()),
        Just("\"response_id\":\"r1\"".to_string()),
        Just("\"response_id\": 7".to_string()),
        Just(format!("\"embedding_b64\": \"{good4}\"")),
        Just(format!(
            "\"embedding_b64\" :\"{}\"",
            good4.trim_end_matches('=')
        )),
        Just(format!("\"embedding_b64\": \"{}\"", b64(&[1.0, 2.0, 3.0]))),
        Just(format!(
            "\"embedding_b64\": \"{}\"",
            b64(&[1.0, f32::NAN, 3.0, 4.0])
        )),
        Just(format!(
            "\"embedding_b64\": \"{}\\u0041\"",
            &good4[..good4.len() - 4]
        )),
        Just(
            "\"embedding_b64\": \"AAAA*AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"".to_string()
        ),
        Just("\"embedding_b64\": \"\"".to_string()),
        Just("\"embedding_b64\": null".to_string()),
        Just("\"embedding_b64\": [1,2]".to_string()),
        Just(format!("\"embedding_b\\u0036\\u0034\": \"{good4}\"")),
        Just("\"embedding\": [1.0, -2.5, 0.0, 3.25]".to_string()),
        Just(format!(
            "\"metadata\": {{\"embedding_b64\": \"{good4}\", \"k\": [1, {{}}]}}"
        )),
        Just("\"metadata\": {\"note\": \"embedding_b64\"}".to_string()),
        Just("\"metadata\": \"embedding_b64\"".to_string()),
        Just("\"metadata\": {\"k\": \"a\\\"}\\\\\", \"n\": [1.5e3, null, true]}".to_string()),
        Just("\"metadata\": {\"n\": -1e999}".to_string()),
        Just("\"metadata\" : null".to_string()),
        Just("\"metadata\": {\"k\": \"tab\there\"}".to_string()),
        Just(format!(
            "\"metadata\": {{\"k\": {}{}}}",
            "[".repeat(130),
            "]".repeat(130)
        )),
        Just("\"prompt_id\": \"p\tq\"".to_string()),
        Just("\"schema\": \"armd.response.v\\u0031\"".to_string()),
        Just("\"response_id\": \"\"".to_string()),
        Just("\"extra\": 1".to_string()),
    ]
}

/// The SIMD fast path and the reference decoder, as (bits of the values) or an error marker.
fn both_b64(s: &str) -> (Option<Vec<u32>>, Option<Vec<u32>>) {
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    (
        decode_f32_b64_fast(s.as_bytes()).map(bits),
        decode_f32_b64_reference("x", s).ok().map(bits),
    )
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 2048, failure_persistence: None, ..Default::default() })]

    /// Near-valid inputs (encodings of random bytes, padding kept or stripped, one symbol replaced, the
    /// last symbol's unused bits set): the fast path accepts exactly what the reference accepts and
    /// decodes to the same bits, so it changes speed, not behaviour.
    #[test]
    fn fast_base64_matches_reference_on_near_valid_input(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        strip_padding in proptest::prelude::any::<bool>(),
        replace in proptest::option::of((proptest::prelude::any::<proptest::sample::Index>(), proptest::sample::select(b"A/+=-_ \n\"\x00\xc3az09".to_vec()))),
        dirty_tail in proptest::prelude::any::<bool>(),
        insert in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::sample::select(b" \n\r\t\x0c=A".to_vec())), 0..5),
    ) {
        let mut s = B64.encode(&bytes).into_bytes();
        if strip_padding {
            while s.last() == Some(&b'=') { s.pop(); }
        }
        if dirty_tail {
            let body = s.iter().rposition(|&c| c != b'=');
            if let Some(i) = body { if s[i] == b'A' { s[i] = b'B'; } else if s[i] == b'Q' { s[i] = b'R'; } }
        }
        if let Some((at, c)) = replace {
            if !s.is_empty() { let i = at.index(s.len()); s[i] = c; }
        }
        // Inserted symbols: whitespace (which `simdutf` would skip) or extra characters, one to four
        // of them, so the length can stay a multiple of four.
        for (at, c) in insert {
            let i = at.index(s.len() + 1);
            s.insert(i, c);
        }
        let Ok(s) = String::from_utf8(s) else { return Ok(()) };
        let (fast, reference) = both_b64(&s);
        proptest::prop_assert_eq!(fast, reference, "input {:?}", s);
    }

    /// Whole response messages, valid and not (fields in any order, spacing, duplicates, unknown
    /// fields, `embedding_b64` also inside metadata or spelled with an escape, wrong lengths, bad
    /// symbols, a truncation or a flipped byte): `response` with its fast path gives exactly what the
    /// plain parse gives, value or rejection (reason and detail).
    #[test]
    fn response_fast_path_matches_plain_parse(
        core in proptest::collection::vec(proptest::prelude::any::<bool>(), 3),
        extra in proptest::collection::vec(response_part(), 0..4),
        order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 7),
        space in proptest::sample::select(vec!["", " ", "\n  ", "\t"]),
        damage in proptest::option::of((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>())),
    ) {
        // Mostly near-valid: the usual fields (each kept with probability 1/2), then up to three
        // members from the menu.
        let usual = [
            format!("\"schema\": \"{RESPONSE_SCHEMA}\""),
            "\"prompt_id\": \"p1\"".to_string(),
            "\"response_id\": \"r1\"".to_string(),
        ];
        let mut parts: Vec<String> = usual
            .into_iter()
            .zip(&core)
            .filter(|(_, keep)| **keep)
            .map(|(p, _)| p)
            .collect();
        parts.extend(extra);
        for (i, ix) in order.iter().enumerate().take(parts.len()) {
            let j = ix.index(parts.len());
            parts.swap(i, j);
        }
        let body = parts.join(&format!(",{space}"));
        let mut text = format!("{{{space}{body}{space}}}").into_bytes();
        if let Some((at, byte, truncate)) = damage {
            let i = at.index(text.len());
            if truncate { text.truncate(i); } else { text[i] = byte; }
        }
        let d = dec();
        proptest::prop_assert_eq!(d.response(Some(&text)), d.response_reference(Some(&text)), "input {:?}", String::from_utf8_lossy(&text));
    }

    /// Arbitrary strings over the alphabet and its neighbours: the fast path never accepts what the
    /// reference refuses, and never decodes differently.
    #[test]
    fn fast_base64_never_accepts_more(s in "[A-Za-z0-9+/=_ -]{0,80}") {
        let (fast, reference) = both_b64(&s);
        if fast.is_some() {
            proptest::prop_assert_eq!(fast, reference, "input {:?}", s);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]

    /// The bit test agrees with `f32::is_finite` on any values (NaNs of every payload, ±infinity,
    /// subnormals, the largest finite values).
    #[test]
    fn all_finite_matches_is_finite(bits in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..40), edge in proptest::option::of(proptest::sample::select(vec![0x7f80_0000u32, 0xff80_0000, 0x7f7f_ffff, 0xff7f_ffff, 0x7fc0_0000, 0xffff_ffff, 0x8000_0000, 1]))) {
        let mut x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        if let Some(e) = edge { x.push(f32::from_bits(e)); }
        proptest::prop_assert_eq!(all_finite(&x), x.iter().all(|v| v.is_finite()), "{:?}", x);
    }
}

#[test]
fn response_json_array_and_base64_agree() {
    let a = resp(good()).unwrap();
    assert_eq!(a.embedding, vec![1.0, -2.5, 0.0, 3.25]);
    let mut v = good();
    v.as_object_mut().unwrap().remove("embedding");
    v["embedding_b64"] = json!(encode_f32_b64(&[1.0, -2.5, 0.0, 3.25]));
    v["metadata"] = json!({"model": "m1", "n": 3});
    let b = resp(v).unwrap();
    assert_eq!(a.embedding, b.embedding);
    assert_eq!(
        b.metadata.map(|m| m.to_value()),
        Some(json!({"model": "m1", "n": 3}))
    );
    // Unpadded base64 is accepted too.
    let s = encode_f32_b64(&[1.0, 2.0, 3.0, 4.5]);
    let v = decode_f32_b64("x", s.trim_end_matches('=')).unwrap();
    assert_eq!(v, vec![1.0, 2.0, 3.0, 4.5]);
}

#[test]
fn metadata_passes_through_verbatim_and_is_checked_like_a_json_value() {
    let meta =
        r#"{ "z": 1.50, "a": [true, null, "\u00e9"], "big": 123456789012345678901234567890 }"#;
    let b = encode_f32_b64(&[1.0, -2.5, 0.0, 3.25]);
    let head = format!(r#""schema":"{RESPONSE_SCHEMA}","prompt_id":"p","response_id":"r""#);
    let plain = |m: &str| format!(r#"{{{head},"embedding":[1,-2.5,0,3.25],"metadata":{m}}}"#);
    let fast = |m: &str| format!(r#"{{"embedding_b64":"{b}",{head},"metadata":{m}}}"#);
    for text in [plain(meta), fast(meta)] {
        let r = dec().response(Some(text.as_bytes())).unwrap();
        assert_eq!(r.metadata.as_ref().map(Metadata::get), Some(meta), "{text}");
        assert_eq!(
            dec()
                .response(Some(plain("null").as_bytes()))
                .unwrap()
                .metadata,
            None
        );
    }
    let deep = format!(r#"{{"k":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    let deep_array = format!("{}{}", "[".repeat(200), "]".repeat(200));
    for (m, reason, detail) in [
        (
            r#"{"n": -1e999}"#,
            Reason::NonFinite,
            "`metadata`: number out of range",
        ),
        (
            deep.as_str(),
            Reason::InvalidJson,
            "`metadata`: recursion limit exceeded",
        ),
        (
            deep_array.as_str(),
            Reason::InvalidJson,
            "`metadata`: recursion limit exceeded",
        ),
        (
            "[1]",
            Reason::WrongType,
            "`metadata` must be a JSON object, got an array",
        ),
        (
            "7",
            Reason::WrongType,
            "`metadata` must be a JSON object, got a number",
        ),
        (
            r#""m""#,
            Reason::WrongType,
            "`metadata` must be a JSON object, got a string",
        ),
        (
            "false",
            Reason::WrongType,
            "`metadata` must be a JSON object, got a boolean",
        ),
    ] {
        for text in [plain(m), fast(m)] {
            let r = dec().response(Some(text.as_bytes())).unwrap_err();
            assert_eq!(r.reason, reason, "{text}");
            assert!(r.detail.starts_with(detail), "{}", r.detail);
        }
    }
}

#[test]
fn fast_path_rejects_invalid_utf8_before_and_after_the_value() {
    let b = encode_f32_b64(&[1.0, -2.5, 0.0, 3.25]);
    let text = format!(
        r#"{{"schema":"{RESPONSE_SCHEMA}","prompt_id":"pX","embedding_b64":"{b}","response_id":"rX"}}"#
    );
    assert!(dec().response(Some(text.as_bytes())).is_ok());
    for (nth, byte) in [(0, 0xff), (1, 0xff), (0, 0xc3), (1, 0x80)] {
        let mut bytes = text.clone().into_bytes();
        let at = text.match_indices('X').nth(nth).unwrap().0;
        bytes[at] = byte;
        let got = dec().response(Some(&bytes));
        assert_eq!(
            reason_of(got.clone()),
            Reason::InvalidUtf8,
            "{nth} {byte:#x}"
        );
        assert_eq!(got, dec().response_reference(Some(&bytes)));
    }
}

#[test]
fn base64_fast_path_is_taken_only_for_the_plain_shape() {
    let b = encode_f32_b64(&[1.0, -2.5, 0.0, 3.25]);
    let head =
        format!("\"schema\": \"{RESPONSE_SCHEMA}\", \"prompt_id\": \"p\", \"response_id\": \"r\"");
    let taken = |t: String| {
        dec()
            .response_fast(t.as_bytes())
            .map(|r| r.expect("a valid response").embedding)
    };
    let x = Some(vec![1.0, -2.5, 0.0, 3.25]);
    assert_eq!(taken(format!("{{{head}, \"embedding_b64\" : \"{b}\"}}")), x);
    assert_eq!(
        taken(format!(
            "{{\"embedding_b64\":\"{b}\", {head}, \"metadata\": {{\"k\": 1}}}}"
        )),
        x
    );
    // Escapes inside metadata are serde_json's business: still the fast path.
    assert_eq!(
        taken(format!(
            "{{{head}, \"embedding_b64\": \"{b}\", \"metadata\": {{\"k\": \"\\n\"}}}}"
        )),
        x
    );
    // Only inside metadata; twice; an escape in a key or an id; not a string: the plain parse decides.
    assert_eq!(
        taken(format!(
            "{{{head}, \"metadata\": {{\"embedding_b64\": \"{b}\"}}}}"
        )),
        None
    );
    assert_eq!(
        taken(format!(
            "{{{head}, \"embedding_b64\": \"{b}\", \"embedding_b64\": \"{b}\"}}"
        )),
        None
    );
    assert_eq!(
        taken(format!(
            "{{{head}, \"embedding_b\\u0036\\u0034\": \"{b}\"}}"
        )),
        None
    );
    assert_eq!(taken(format!("{{{head}, \"embedding_b64\": null}}")), None);
}

#[test]
fn base64_round_trips_bit_for_bit() {
    let vals = [f32::MIN_POSITIVE, -0.0, 1e-30, 123.456, f32::MAX];
    let back = decode_f32_b64("x", &encode_f32_b64(&vals)).unwrap();
    assert_eq!(
        vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

/// `simdutf` skips ASCII whitespace (WHATWG forgiving-base64); armd's language has none. Here a
/// space after each symbol doubles the length, which then looks like a padding-free encoding of six
/// floats: only the decoded length tells the fast path that something was skipped.
#[test]
fn base64_with_whitespace_is_refused_with_its_position() {
    let good = encode_f32_b64(&[1.0, -2.0, 3.5]);
    assert_eq!(good.len(), 16);
    let spaced: String = good.chars().flat_map(|c| [c, ' ']).collect();
    let err = decode_f32_b64("embedding_b64", &spaced).unwrap_err();
    assert_eq!(err.reason, Reason::InvalidBase64);
    assert!(err.detail.contains("offset 1"), "{}", err.detail);
    assert_eq!(
        decode_f32_b64("embedding_b64", &good).unwrap(),
        [1.0, -2.0, 3.5]
    );
}

#[test]
fn every_response_reason_is_reachable() {
    let d = dec();
    assert_eq!(reason_of(d.response(None)), Reason::EmptyPayload);
    assert_eq!(reason_of(d.response(Some(b""))), Reason::EmptyPayload);
    let big = vec![b' '; 10_001];
    assert_eq!(reason_of(d.response(Some(&big))), Reason::Oversized);
    assert_eq!(
        reason_of(d.response(Some(b"{\"schema\": \"\xff\"}"))),
        Reason::InvalidUtf8
    );
    assert_eq!(
        reason_of(d.response(Some(b"{\"schema\": "))),
        Reason::InvalidJson
    );
    assert_eq!(reason_of(d.response(Some(b"[1,2]"))), Reason::InvalidJson);
    assert_eq!(
        reason_of(d.response(Some(b"{\"embedding\": [NaN]}"))),
        Reason::InvalidJson
    );
    let mut v = good();
    v["schema"] = json!("armd.response.v2");
    assert_eq!(reason_of(resp(v)), Reason::UnsupportedSchema);
    let mut v = good();
    v.as_object_mut().unwrap().remove("prompt_id");
    assert_eq!(reason_of(resp(v)), Reason::MissingField);
    let mut v = good();
    v.as_object_mut().unwrap().remove("embedding");
    assert_eq!(reason_of(resp(v)), Reason::MissingField);
    let mut v = good();
    v["extra"] = json!(1);
    assert_eq!(reason_of(resp(v)), Reason::UnknownField);
    let mut v = good();
    v["prompt_id"] = json!(7);
    assert_eq!(reason_of(resp(v)), Reason::WrongType);
    let mut v = good();
    v["embedding"] = json!([1.0, "2", 3.0, 4.0]);
    assert_eq!(reason_of(resp(v)), Reason::WrongType);
    let mut v = good();
    v["embedding"] = json!("not an array");
    assert_eq!(reason_of(resp(v)), Reason::WrongType);
    let mut v = good();
    v["metadata"] = json!([1]);
    assert_eq!(reason_of(resp(v)), Reason::WrongType);
    let mut v = good();
    v["response_id"] = json!("");
    assert_eq!(reason_of(resp(v)), Reason::InvalidValue);
    let mut v = good();
    v["response_id"] = json!("x".repeat(MAX_ID_BYTES + 1));
    assert_eq!(reason_of(resp(v)), Reason::InvalidValue);
    let mut v = good();
    v["embedding_b64"] = json!(encode_f32_b64(&[0.0; D]));
    assert_eq!(reason_of(resp(v)), Reason::InvalidValue);
    let mut v = good();
    v.as_object_mut().unwrap().remove("embedding");
    v["embedding_b64"] = json!("!!!not base64!!!");
    assert_eq!(reason_of(resp(v.clone())), Reason::InvalidBase64);
    v["embedding_b64"] = json!("AAAAAAA="); // 5 bytes
    assert_eq!(reason_of(resp(v.clone())), Reason::InvalidBase64);
    v["embedding_b64"] = json!(encode_f32_b64(&[1.0; D + 1]));
    assert_eq!(reason_of(resp(v.clone())), Reason::WrongDimension);
    v["embedding_b64"] = json!(encode_f32_b64(&[1.0, f32::NAN, 0.0, 0.0]));
    assert_eq!(reason_of(resp(v.clone())), Reason::NonFinite);
    v["embedding_b64"] = json!(encode_f32_b64(&[1.0, f32::INFINITY, 0.0, 0.0]));
    assert_eq!(reason_of(resp(v)), Reason::NonFinite);
    let mut v = good();
    v["embedding"] = json!([1.0, 2.0]);
    assert_eq!(reason_of(resp(v)), Reason::WrongDimension);
    let mut v = good();
    v["embedding"] = json!([1.0, 1e308, 0.0, 0.0]);
    let r = resp(v).unwrap_err();
    assert_eq!(r.reason, Reason::NonFinite);
    assert!(r.detail.contains("embedding[1]"), "{}", r.detail);
    let text = br#"{"schema":"armd.response.v1","prompt_id":"p","response_id":"r","embedding":[1e400,0,0,0]}"#;
    assert_eq!(reason_of(d.response(Some(text))), Reason::NonFinite);
}

#[test]
fn position_only_errors_are_prefixed_with_their_field() {
    let mut v = good();
    v["prompt_id"] = json!(7);
    let r = resp(v).unwrap_err();
    assert!(
        r.detail.starts_with("`prompt_id`: invalid type"),
        "{}",
        r.detail
    );
    let text = "{\"schema\": \"armd.response.v1\",\n \"prompt_id\": \"p\", \"response_id\": \"r\",\n \"embedding\": [1, 2, \"3\", 4]}";
    let r = dec().response(Some(text.as_bytes())).unwrap_err();
    assert_eq!(r.reason, Reason::WrongType);
    assert!(r.detail.starts_with("`embedding`: "), "{}", r.detail);
    let text =
        r#"{"schema":"armd.label.v1","request_id":"q","outcome":"a","metadata":{"n":1e999}}"#;
    let r = dec().label(Some(text.as_bytes())).unwrap_err();
    assert!(
        r.detail.starts_with("`metadata`: number out of range"),
        "{}",
        r.detail
    );
    let text =
        r#"{"schema":"armd.label.v1","request_id":"q","outcome":"a","annotator_id":{"x\"y":1}}"#;
    let r = dec().label(Some(text.as_bytes())).unwrap_err();
    assert!(r.detail.starts_with("`annotator_id`: "), "{}", r.detail);
    assert_eq!(field_at("{}", 9, 1), None);
    assert_eq!(field_at("{\"a\": 1}", 1, 100), Some("a"));
}

#[test]
fn rejection_details_name_the_field() {
    let mut v = good();
    v.as_object_mut().unwrap().remove("response_id");
    let r = resp(v).unwrap_err();
    assert!(r.detail.contains("response_id"), "{}", r.detail);
    let mut v = good();
    v["bogus"] = json!(true);
    assert!(resp(v).unwrap_err().detail.contains("bogus"));
}

fn label(v: Value) -> Result<LabelMsg, Rejection> {
    dec().label(Some(v.to_string().as_bytes()))
}

#[test]
fn labels_decode_outcomes() {
    for (o, y) in [
        (json!("a"), 1.0),
        (json!("b"), 0.0),
        (json!("tie"), 0.5),
        (json!(0.25), 0.25),
        (json!(1), 1.0),
    ] {
        let l = label(
            json!({"schema": LABEL_SCHEMA, "request_id": "x-1-0123456789abcdef", "outcome": o}),
        )
        .unwrap();
        assert_eq!(l.y, y);
        assert_eq!(l.annotator_id, None);
    }
    let l = label(
        json!({"schema": LABEL_SCHEMA, "request_id": "q", "outcome": "a",
                         "annotator_id": "ann-7", "metadata": {"t": 1}}),
    )
    .unwrap();
    assert_eq!(l.annotator_id.as_deref(), Some("ann-7"));
}

#[test]
fn every_label_decode_reason_is_reachable() {
    let base = json!({"schema": LABEL_SCHEMA, "request_id": "q", "outcome": "a"});
    let with = |k: &str, val: Value| {
        let mut v = base.clone();
        v[k] = val;
        label(v)
    };
    assert_eq!(
        reason_of(with("outcome", json!("c"))),
        Reason::OutcomeOutOfRange
    );
    assert_eq!(
        reason_of(with("outcome", json!(1.5))),
        Reason::OutcomeOutOfRange
    );
    assert_eq!(
        reason_of(with("outcome", json!(-1))),
        Reason::OutcomeOutOfRange
    );
    assert_eq!(reason_of(with("outcome", json!(null))), Reason::WrongType);
    assert_eq!(reason_of(with("outcome", json!([1]))), Reason::WrongType);
    assert_eq!(
        reason_of(with("request_id", json!(""))),
        Reason::InvalidValue
    );
    assert_eq!(reason_of(with("annotator_id", json!(3))), Reason::WrongType);
    assert_eq!(
        reason_of(with("schema", json!("armd.label.v0"))),
        Reason::UnsupportedSchema
    );
    assert_eq!(reason_of(with("more", json!(0))), Reason::UnknownField);
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("outcome");
    assert_eq!(reason_of(label(v)), Reason::MissingField);
    assert_eq!(
        reason_of(dec().label(Some(b"{\"schema\":"))),
        Reason::InvalidJson
    );
    assert_eq!(
        reason_of(dec().label(Some(b"\xc3\x28"))),
        Reason::InvalidUtf8
    );
    assert_eq!(reason_of(dec().label(None)), Reason::EmptyPayload);
    let big = vec![b'{'; 20_000];
    assert_eq!(reason_of(dec().label(Some(&big))), Reason::Oversized);
    // Numbers beyond f64 fail in the parser; the reason must still be a label reason (it is a metric
    // label of `armd_labels_rejected_total`; an unregistered one used to be counted as `empty_payload`).
    for text in [
        &br#"{"schema":"armd.label.v1","request_id":"q","outcome":1e400}"#[..],
        br#"{"schema":"armd.label.v1","request_id":"q","outcome":"a","metadata":{"n":-1e999}}"#,
    ] {
        let r = reason_of(dec().label(Some(text)));
        assert_eq!(r, Reason::NonFinite);
        assert!(Reason::LABEL.contains(&r));
    }
}

#[test]
fn reason_codes_are_unique_snake_case() {
    let mut seen = std::collections::HashSet::new();
    for r in Reason::ALL {
        let c = r.code();
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{c}"
        );
        assert!(seen.insert(c), "{c}");
    }
    for r in Reason::RESPONSE.iter().chain(&Reason::LABEL) {
        assert!(Reason::ALL.contains(r));
    }
}

#[test]
fn request_ids_are_deterministic_parseable_and_pair_specific() {
    let a = request_id("armd-0", 17, "r1", "r2");
    assert_eq!(a, request_id("armd-0", 17, "r1", "r2"));
    assert_ne!(a, request_id("armd-0", 17, "r1", "r3"));
    assert_ne!(a, request_id("armd-0", 18, "r1", "r2"));
    assert_ne!(a, request_id("armd-1", 17, "r1", "r2"));
    // Part boundaries matter: ("ab", "c") is not ("a", "bc").
    assert_ne!(request_id("i", 1, "ab", "c"), request_id("i", 1, "a", "bc"));
    assert_eq!(parse_request_id(&a), Some(("armd-0", 17)));
    assert_eq!(parse_request_id("nonsense"), None);
    assert_eq!(parse_request_id("a-b-c"), None);
}

#[test]
fn request_round_trips_through_json() {
    let side = |r: &str| RequestSide {
        prompt_id: "p".into(),
        response_id: r.into(),
        metadata: Metadata::from_value(&json!({"k": 1})),
        embedding_b64: encode_f32_b64(&[1.0, 2.0]),
    };
    let req = LabelRequest {
        schema: REQUEST_SCHEMA.into(),
        request_id: request_id("i", 0, "a", "b"),
        instance_id: "i".into(),
        sequence: 0,
        a: side("a"),
        b: side("b"),
        strategy: "greedy-dopt".into(),
        gain: 0.5,
        predicted_p: 0.4,
        model_version: 3,
        labels_wanted: 1,
        issued_at_ms: 1,
        expires_at_ms: 2,
    };
    let text = serde_json::to_string(&req).unwrap();
    assert_eq!(serde_json::from_str::<LabelRequest>(&text).unwrap(), req);
}

#[test]
fn dead_letters_keep_text_or_base64_and_truncate() {
    let src = SourcePosition {
        topic: "t".into(),
        partition: 2,
        offset: 9,
    };
    let rej = Rejection::new(Reason::InvalidJson, "bad");
    let dl = DeadLetter::new(&rej, src.clone(), Some(b"{oops"), 100, 5);
    assert_eq!(dl.payload.as_deref(), Some("{oops"));
    assert_eq!(dl.reason, "invalid_json");
    assert!(!dl.payload_truncated);
    let dl = DeadLetter::new(&rej, src.clone(), Some(b"\xff\xfe"), 100, 5);
    assert_eq!(dl.payload_b64.as_deref(), Some("//4="));
    let long = "é".repeat(100);
    let dl = DeadLetter::new(&rej, src, Some(long.as_bytes()), 51, 5);
    assert!(dl.payload_truncated && dl.payload.as_ref().unwrap().len() == 50);
    assert_eq!(dl.payload_bytes, 200);
}
