//! Wire formats of every Kafka message armd reads or writes (JSON, UTF-8), and their decoders.
//!
//! Every message carries `"schema": "armd.<kind>.v1"`. A decoder either returns a typed message or a
//! [`Rejection`]: a [`Reason`] from a small, stable set of snake_case codes (used as a metric label and in
//! dead letters) plus a human-readable detail that says what is wrong and where.
//!
//! | topic | direction | schema | type |
//! |---|---|---|---|
//! | responses | in | `armd.response.v1` | [`Response`] |
//! | requests | out (and read back on recovery) | `armd.request.v1` | [`LabelRequest`] |
//! | labels | in | `armd.label.v1` | [`LabelMsg`] |
//! | models | out | `armd.model.v1` | [`ModelSnapshot`] |
//! | dead letters | out | `armd.dead_letter.v1` | [`DeadLetter`] |
//!
//! Embeddings travel either as a JSON number array (`embedding`) or as base64 of little-endian f32
//! (`embedding_b64`). The base64 path is the fast one: the string is borrowed from the payload, decoded in
//! one pass and reinterpreted four bytes at a time, with no number parsing.
//!
//! Unknown fields are rejected (`unknown_field`): a producer that sends a field armd ignores is almost
//! always a producer on another schema version, and silently ignoring it hides the mismatch.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

mod scan;

pub const RESPONSE_SCHEMA: &str = "armd.response.v1";
pub const REQUEST_SCHEMA: &str = "armd.request.v1";
pub const LABEL_SCHEMA: &str = "armd.label.v1";
pub const MODEL_SCHEMA: &str = "armd.model.v1";
pub const DEAD_LETTER_SCHEMA: &str = "armd.dead_letter.v1";

/// Longest accepted prompt, response, request or annotator id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Standard base64 alphabet; padding optional on input, always written on output.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a message was rejected. The codes are stable: they are metric label values and appear in dead
/// letters, so operators can alert on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Empty payload or a tombstone (no payload).
    EmptyPayload,
    /// Payload larger than `pool.max_message_bytes`.
    Oversized,
    /// Payload is not valid UTF-8.
    InvalidUtf8,
    /// Payload is not valid JSON (truncated, syntax error, not an object).
    InvalidJson,
    /// The `schema` field names another message kind or version.
    UnsupportedSchema,
    /// A required field is absent.
    MissingField,
    /// A field armd does not know.
    UnknownField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A field has the right type but an invalid value (empty or overlong id, both embedding encodings, a
    /// field given twice).
    InvalidValue,
    /// `embedding_b64` is not valid base64 or not a whole number of f32.
    InvalidBase64,
    /// The embedding's length differs from `model.dim`.
    WrongDimension,
    /// NaN, ±Inf, or a number that does not fit in f32 (responses) or in f64 (anywhere in a message, e.g.
    /// a label's `outcome` of `1e400`).
    NonFinite,
    /// A label for a request id this instance never issued (or has forgotten).
    UnknownRequest,
    /// A label timestamped after its request expired.
    ExpiredRequest,
    /// A second label from the same annotator, or a label for a request that has all its labels.
    DuplicateLabel,
    /// An outcome that is not `a`, `b`, `tie` or a probability in [0, 1].
    OutcomeOutOfRange,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::EmptyPayload,
        Reason::Oversized,
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::UnsupportedSchema,
        Reason::MissingField,
        Reason::UnknownField,
        Reason::WrongType,
        Reason::InvalidValue,
        Reason::InvalidBase64,
        Reason::WrongDimension,
        Reason::NonFinite,
        Reason::UnknownRequest,
        Reason::ExpiredRequest,
        Reason::DuplicateLabel,
        Reason::OutcomeOutOfRange,
    ];

    /// Reasons a response message can be rejected for.
    pub const RESPONSE: [Reason; 12] = [
        Reason::EmptyPayload,
        Reason::Oversized,
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::UnsupportedSchema,
        Reason::MissingField,
        Reason::UnknownField,
        Reason::WrongType,
        Reason::InvalidValue,
        Reason::InvalidBase64,
        Reason::WrongDimension,
        Reason::NonFinite,
    ];

    /// Reasons a label message can be rejected for.
    pub const LABEL: [Reason; 14] = [
        Reason::EmptyPayload,
        Reason::Oversized,
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::UnsupportedSchema,
        Reason::MissingField,
        Reason::UnknownField,
        Reason::WrongType,
        Reason::InvalidValue,
        // JSON numbers beyond f64 (`1e400`) fail in the parser, before any field is known.
        Reason::NonFinite,
        Reason::UnknownRequest,
        Reason::ExpiredRequest,
        Reason::DuplicateLabel,
        Reason::OutcomeOutOfRange,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::EmptyPayload => "empty_payload",
            Reason::Oversized => "oversized",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::UnsupportedSchema => "unsupported_schema",
            Reason::MissingField => "missing_field",
            Reason::UnknownField => "unknown_field",
            Reason::WrongType => "wrong_type",
            Reason::InvalidValue => "invalid_value",
            Reason::InvalidBase64 => "invalid_base64",
            Reason::WrongDimension => "wrong_dimension",
            Reason::NonFinite => "non_finite",
            Reason::UnknownRequest => "unknown_request",
            Reason::ExpiredRequest => "expired_request",
            Reason::DuplicateLabel => "duplicate_label",
            Reason::OutcomeOutOfRange => "outcome_out_of_range",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A rejected message: the reason code and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

// ---------------------------------------------------------------------------------------------------------
// Responses (in)

/// A decoded, validated response: ids, the raw embedding (exactly `dim` finite f32) and pass-through
/// metadata (a JSON object, or `None`).
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub prompt_id: Arc<str>,
    pub response_id: Arc<str>,
    pub embedding: Vec<f32>,
    pub metadata: Option<Metadata>,
}

/// A message's `metadata`: a JSON object, kept as the text that arrived.
///
/// armd never looks inside metadata; it passes a response's metadata on to the label requests that
/// show the response. Keeping the text instead of a parsed tree gives it back byte for byte (key
/// order, number spelling) and costs one allocation per message instead of one per key and value
/// (at full ingest rate, building and freeing the tree cost more than pooling the response). It is
/// checked as strictly as the tree was: an object, numbers within f64, at most 128 levels deep.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(Box<RawValue>);

impl PartialEq for Metadata {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Metadata {
    /// The JSON text as received (no surrounding whitespace).
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The parsed value (for tools and tests; armd itself never needs it).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("metadata was validated as JSON")
    }

    /// Metadata holding `v`'s JSON text; `None` unless `v` is an object.
    pub fn from_value(v: &Value) -> Option<Self> {
        v.is_object()
            .then(|| Self(RawValue::from_string(v.to_string()).expect("a Value is valid JSON")))
    }
}

/// Walks any JSON value the way `serde_json::Value` does (numbers parsed, nesting counted) without
/// building it: what metadata must pass to be accepted.
struct StrictJson;

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictJson;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_i64<E>(self, _: i64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_u64<E>(self, _: u64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_f64<E>(self, _: f64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_str<E>(self, _: &str) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_unit<E>(self) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictJson, A::Error> {
                while seq.next_element::<StrictJson>()?.is_some() {}
                Ok(StrictJson)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<StrictJson, A::Error> {
                while map.next_key::<de::IgnoredAny>()?.is_some() {
                    map.next_value::<StrictJson>()?;
                }
                Ok(StrictJson)
            }
        }
        d.deserialize_any(V)
    }
}

/// Marker prefixed to errors raised inside serde visitors so they can be mapped back to a [`Reason`].
const MARK_NON_FINITE: &str = "armd-non-finite: ";
const MARK_OUTCOME: &str = "armd-outcome: ";

/// JSON number array decoded straight to f32, rejecting values that are not finite in f32.
struct F32Array(Vec<f32>);

impl<'de> Deserialize<'de> for F32Array {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = F32Array;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<F32Array, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1024).min(1 << 16));
                while let Some(x) = seq.next_element::<f64>()? {
                    let y = x as f32;
                    if !y.is_finite() {
                        return Err(de::Error::custom(format_args!(
                            "{MARK_NON_FINITE}embedding[{}] = {x} is not a finite f32",
                            out.len()
                        )));
                    }
                    out.push(y);
                }
                Ok(F32Array(out))
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    prompt_id: Cow<'a, str>,
    #[serde(borrow)]
    response_id: Cow<'a, str>,
    #[serde(default)]
    embedding: Option<F32Array>,
    #[serde(default, borrow)]
    embedding_b64: Option<Cow<'a, str>>,
    #[serde(default)]
    metadata: Option<Metadata>,
}

/// Decodes the messages of the input topics against the deployment's dimension and size limit.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    pub dim: usize,
    pub max_message_bytes: usize,
}

impl Decoder {
    pub fn new(dim: usize, max_message_bytes: usize) -> Self {
        Self {
            dim,
            max_message_bytes,
        }
    }

    /// Checks the envelope shared by all input messages: present, not too large, UTF-8, an object.
    fn envelope<'p>(&self, payload: Option<&'p [u8]>) -> Result<&'p str, Rejection> {
        text_of(self.size_checked(payload)?)
    }

    /// The first checks of [`Self::envelope`]: present and not too large.
    fn size_checked<'p>(&self, payload: Option<&'p [u8]>) -> Result<&'p [u8], Rejection> {
        let bytes = match payload {
            None => {
                return Err(Rejection::new(
                    Reason::EmptyPayload,
                    "message has no payload",
                ))
            }
            Some([]) => return Err(Rejection::new(Reason::EmptyPayload, "payload is empty")),
            Some(b) => b,
        };
        if bytes.len() > self.max_message_bytes {
            return Err(Rejection::new(
                Reason::Oversized,
                format!(
                    "payload is {} bytes, limit is {} (pool.max_message_bytes)",
                    bytes.len(),
                    self.max_message_bytes
                ),
            ));
        }
        Ok(bytes)
    }

    /// Decodes and validates one message of the responses topic.
    pub fn response(&self, payload: Option<&[u8]>) -> Result<Response, Rejection> {
        let bytes = self.size_checked(payload)?;
        self.response_fast(bytes)
            .unwrap_or_else(|| self.response_plain(text_of(bytes)?))
    }

    /// [`Self::response`] without the base64 fast path (the reference the fast path is tested against).
    #[cfg(test)]
    fn response_reference(&self, payload: Option<&[u8]>) -> Result<Response, Rejection> {
        self.response_plain(self.envelope(payload)?)
    }

    /// The plain parse: serde_json reads the whole message, its errors become the rejection.
    fn response_plain(&self, text: &str) -> Result<Response, Rejection> {
        let raw: RawResponse<'_> =
            serde_json::from_str(text).map_err(|e| json_rejection(text, e))?;
        self.validate_response(raw, None)
    }

    /// The fast path of [`Self::response`] (see [`scan`]): `None` when it does not apply, and then the
    /// plain parse decides.
    fn response_fast(&self, bytes: &[u8]) -> Option<Result<Response, Rejection>> {
        let f = scan::scan(bytes)?;
        let embedding = decode_f32_b64_fast(f.embedding_b64)?;
        let raw = RawResponse {
            schema: Cow::Borrowed(f.schema),
            prompt_id: Cow::Borrowed(f.prompt_id),
            response_id: Cow::Borrowed(f.response_id),
            embedding: None,
            embedding_b64: None,
            metadata: f.metadata.map(Metadata),
        };
        Some(self.validate_response(raw, Some(embedding)))
    }

    /// The checks after parsing. `decoded` is `embedding_b64` already decoded by the fast path.
    fn validate_response(
        &self,
        raw: RawResponse<'_>,
        decoded: Option<Vec<f32>>,
    ) -> Result<Response, Rejection> {
        enum B64<'a> {
            Text(Cow<'a, str>),
            Decoded(Vec<f32>),
        }
        let b64 = decoded
            .map(B64::Decoded)
            .or(raw.embedding_b64.map(B64::Text));
        check_schema(&raw.schema, RESPONSE_SCHEMA)?;
        check_id("prompt_id", &raw.prompt_id)?;
        check_id("response_id", &raw.response_id)?;
        let embedding = match (raw.embedding, b64) {
            (Some(_), Some(_)) => {
                return Err(Rejection::new(
                    Reason::InvalidValue,
                    "both `embedding` and `embedding_b64` are set; send exactly one",
                ))
            }
            (None, None) => {
                return Err(Rejection::new(
                    Reason::MissingField,
                    "missing field `embedding` (or `embedding_b64`)",
                ))
            }
            (Some(F32Array(v)), None) => v,
            (None, Some(B64::Text(s))) => decode_f32_b64("embedding_b64", &s)?,
            (None, Some(B64::Decoded(v))) => v,
        };
        if embedding.len() != self.dim {
            return Err(Rejection::new(
                Reason::WrongDimension,
                format!(
                    "embedding has {} values, model.dim is {}",
                    embedding.len(),
                    self.dim
                ),
            ));
        }
        if !all_finite(&embedding) {
            let i = embedding
                .iter()
                .position(|x| !x.is_finite())
                .expect("one is not finite");
            return Err(Rejection::new(
                Reason::NonFinite,
                format!("embedding[{i}] = {} is not finite", embedding[i]),
            ));
        }
        let metadata = check_metadata(raw.metadata)?;
        Ok(Response {
            prompt_id: Arc::from(&*raw.prompt_id),
            response_id: Arc::from(&*raw.response_id),
            embedding,
            metadata,
        })
    }

    /// Decodes and validates one message of the labels topic (the join with its request happens in the
    /// engine, which owns the in-flight requests).
    pub fn label(&self, payload: Option<&[u8]>) -> Result<LabelMsg, Rejection> {
        let text = self.envelope(payload)?;
        let raw: RawLabel = serde_json::from_str(text).map_err(|e| json_rejection(text, e))?;
        check_schema(&raw.schema, LABEL_SCHEMA)?;
        check_id("request_id", &raw.request_id)?;
        if let Some(a) = &raw.annotator_id {
            check_id("annotator_id", a)?;
        }
        check_metadata(raw.metadata)?;
        Ok(LabelMsg {
            request_id: raw.request_id,
            y: raw.outcome.0,
            annotator_id: raw.annotator_id,
        })
    }
}

fn check_schema(got: &str, want: &str) -> Result<(), Rejection> {
    if got == want {
        Ok(())
    } else {
        Err(Rejection::new(
            Reason::UnsupportedSchema,
            format!("schema is {got:?}, expected {want:?}"),
        ))
    }
}

fn check_id(field: &str, id: &str) -> Result<(), Rejection> {
    if id.is_empty() {
        return Err(Rejection::new(
            Reason::InvalidValue,
            format!("`{field}` is empty"),
        ));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(Rejection::new(
            Reason::InvalidValue,
            format!("`{field}` is {} bytes, limit is {MAX_ID_BYTES}", id.len()),
        ));
    }
    Ok(())
}

/// `metadata` must be JSON that [`StrictJson`] accepts (checked first: a JSON error is `invalid_json` or
/// `non_finite` whatever the type, as when the whole message fails to parse), and an object (or null:
/// absent).
fn check_metadata(m: Option<Metadata>) -> Result<Option<Metadata>, Rejection> {
    let Some(m) = m else { return Ok(None) };
    if let Err(e) = serde_json::from_str::<StrictJson>(m.get()) {
        let msg = e.to_string();
        let reason = if msg.starts_with("number out of range") {
            Reason::NonFinite
        } else {
            Reason::InvalidJson
        };
        return Err(Rejection::new(reason, format!("`metadata`: {msg}")));
    }
    let kind = match m.get().as_bytes().first() {
        Some(b'{') => return Ok(Some(m)),
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    };
    Err(Rejection::new(
        Reason::WrongType,
        format!("`metadata` must be a JSON object, got {kind}"),
    ))
}

/// Maps a serde_json error to a reason. serde's data-error messages are stable ("missing field `x`",
/// "unknown field `x`", "invalid type: ..."), and our own visitors prefix theirs with a marker. Errors that
/// only carry a position ("invalid type: integer `7`, expected a string at line 1 column 40") get the
/// name of the top-level field at that position prefixed, so the detail says which field is wrong.
fn json_rejection(text: &str, e: serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    let msg = e.to_string();
    let located = || match field_at(text, e.line(), e.column()) {
        Some(field) => format!("`{field}`: {msg}"),
        None => msg.clone(),
    };
    let (reason, detail) = match e.classify() {
        Category::Io | Category::Syntax | Category::Eof => {
            if msg.starts_with("number out of range") {
                (Reason::NonFinite, located())
            } else {
                (Reason::InvalidJson, msg)
            }
        }
        Category::Data => {
            if let Some(rest) = msg.strip_prefix(MARK_NON_FINITE) {
                (Reason::NonFinite, rest.to_string())
            } else if let Some(rest) = msg.strip_prefix(MARK_OUTCOME) {
                (Reason::OutcomeOutOfRange, rest.to_string())
            } else if msg.starts_with("missing field") {
                (Reason::MissingField, msg)
            } else if msg.starts_with("unknown field") {
                (Reason::UnknownField, msg)
            } else if msg.starts_with("invalid type") && msg.contains("expected struct") {
                // The top level is not an object (e.g. an array or a bare number).
                (Reason::InvalidJson, msg)
            } else if msg.starts_with("invalid type") || msg.starts_with("invalid length") {
                (Reason::WrongType, located())
            } else if msg.starts_with("duplicate field") {
                (Reason::InvalidValue, msg)
            } else {
                (Reason::InvalidValue, located())
            }
        }
    };
    Rejection::new(reason, detail)
}

/// The top-level object key whose value contains the 1-based `line`/`column` position of `text` (the last
/// key opened at nesting depth 1 before it), if any.
fn field_at(text: &str, line: usize, column: usize) -> Option<&str> {
    let line_start = if line <= 1 {
        0
    } else {
        text.match_indices('\n').nth(line - 2)?.0 + 1
    };
    let end = line_start.saturating_add(column).min(text.len());
    let bytes = text.as_bytes();
    let (mut depth, mut i, mut key) = (0usize, 0usize, None);
    while i < end {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                let close = i.min(bytes.len());
                let after = bytes.get(close + 1..).unwrap_or(&[]);
                let colon = after.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
                if depth == 1 && colon {
                    key = text.get(start..close);
                }
            }
            _ => {}
        }
        i += 1;
    }
    key
}

/// The last checks of [`Decoder::envelope`]: UTF-8, and a JSON object.
fn text_of(bytes: &[u8]) -> Result<&str, Rejection> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Rejection::new(Reason::InvalidUtf8, format!("payload is not UTF-8: {e}")))?;
    // serde's derived structs also accept JSON arrays (fields by position); armd's schemas are objects.
    if !text.trim_start().starts_with('{') {
        return Err(Rejection::new(
            Reason::InvalidJson,
            "payload is not a JSON object",
        ));
    }
    Ok(text)
}

/// Whether no value is infinite or NaN, on the bits: adding one to the exponent field carries into the
/// sign bit exactly when the exponent is all ones. Three integer operations per four values with plain
/// SSE2 and no branch. In profiles of the d = 768 decode microbench the previous `fold(is_finite)` took
/// about a tenth of the decoding, and a first integer-max version a seventh (SSE2 has no unsigned max).
fn all_finite(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    const ONE: u32 = 0x0080_0000;
    x.iter()
        .fold(0u32, |acc, v| acc | ((v.to_bits() & EXPONENT) + ONE))
        & 0x8000_0000
        == 0
}

/// Decodes base64 of little-endian f32.
///
/// The hot path of ingest: a SIMD decoder (`simdutf`, or `base64-simd` for unpadded input; both choose
/// AVX2/SSSE3/NEON at run time) writes straight into the `f32` buffer. Whatever it refuses goes through
/// the `base64` crate instead, which gives the precise error (symbol and offset) and defines the accepted
/// language: padding optional, no whitespace, non-zero trailing bits refused. A differential test checks
/// that the fast path accepts nothing the reference refuses and decodes identically.
pub fn decode_f32_b64(field: &str, s: &str) -> Result<Vec<f32>, Rejection> {
    decode_f32_b64_fast(s.as_bytes()).map_or_else(|| decode_f32_b64_reference(field, s), Ok)
}

/// The fast path of [`decode_f32_b64`]: `None` for anything that is not canonical base64 of a whole
/// number of f32 (the caller then asks the reference decoder for the error).
///
/// Padded input (what standard encoders such as Python's `base64.b64encode` send) goes through
/// `simdutf`, whose decoder is about twice as fast as `base64-simd`'s on this project's bench host
/// (BENCHMARKS.md, "Daemon" §1); unpadded input through `base64-simd`.
fn decode_f32_b64_fast(src: &[u8]) -> Option<Vec<f32>> {
    if src.len() % 4 != 0 {
        return decode_unpadded(src);
    }
    // The exact length canonical input decodes to. `simdutf` follows WHATWG forgiving-base64 and
    // skips ASCII whitespace, which armd refuses: whitespace makes it decode fewer bytes than this.
    let padding = src.iter().rev().take(2).take_while(|&&c| c == b'=').count();
    let bytes = (src.len() / 4 * 3).checked_sub(padding)?;
    if bytes % 4 != 0 {
        return None;
    }
    let n = bytes / 4;
    let mut out: Vec<f32> = Vec::with_capacity(n + 1);
    // SAFETY: `simdutf` needs `maximal_binary_length_from_base64` writable bytes: for a length that is a
    // multiple of four that is `3 len / 4` minus the padding, i.e. `bytes`, and `out` has
    // `4 (n + 1) > bytes` bytes of capacity (the extra float covers any rounding in that bound, which
    // is checked against the capacity before the call anyway).
    let result = unsafe {
        let max = simdutf::maximal_binary_length_from_base64(src.as_ptr(), src.len());
        if max > 4 * out.capacity() {
            return None;
        }
        simdutf::base64_to_binary(
            src.as_ptr(),
            src.len(),
            out.as_mut_ptr().cast::<u8>(),
            simdutf::Base64Options::Default,
            simdutf::LastChunkHandlingOptions::Strict,
        )
    };
    if result.error != simdutf::ErrorCode::Success || result.count != bytes {
        return None;
    }
    // SAFETY: the decoder wrote exactly `bytes = 4 n` bytes (checked just above), so the first `n`
    // floats are initialised, and every bit pattern is a valid f32.
    unsafe { out.set_len(n) };
    Some(from_le(out))
}

/// Unpadded base64 (`len % 4` is 2 or 3), decoded by `base64-simd`.
fn decode_unpadded(src: &[u8]) -> Option<Vec<f32>> {
    use base64_simd::AsOut as _;
    let engine = &base64_simd::STANDARD_NO_PAD;
    let bytes = engine.decoded_length(src).ok()?;
    if bytes % 4 != 0 {
        return None;
    }
    // Decoded straight into uninitialised capacity: zeroing the buffer first cost about a tenth of the
    // decode (a 3–8 kB memset per message).
    let n = bytes / 4;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    // SAFETY: `MaybeUninit<f32>` has no validity requirement and the size and alignment of four
    // `MaybeUninit<u8>`, so the `n` reserved floats are exactly `4 n` writable bytes.
    let spare: &mut [std::mem::MaybeUninit<u8>] =
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), 4 * n) };
    if engine.decode(src, spare.as_out()).ok()?.len() != 4 * n {
        return None;
    }
    // SAFETY: the decoder wrote all `4 n` bytes (checked just above), so the first `n` floats are
    // initialised, and every bit pattern is a valid f32.
    unsafe { out.set_len(n) };
    Some(from_le(out))
}

/// The wire's little-endian floats in native order (a no-op on little-endian hosts).
fn from_le(mut v: Vec<f32>) -> Vec<f32> {
    if cfg!(target_endian = "big") {
        for x in &mut v {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    v
}

/// The reference decoder (`base64` crate): the accepted language and the error messages.
fn decode_f32_b64_reference(field: &str, s: &str) -> Result<Vec<f32>, Rejection> {
    let bytes = B64.decode(s.as_bytes()).map_err(|e| {
        Rejection::new(
            Reason::InvalidBase64,
            format!("`{field}` is not valid base64: {e}"),
        )
    })?;
    if bytes.len() % 4 != 0 {
        return Err(Rejection::new(
            Reason::InvalidBase64,
            format!(
                "`{field}` decodes to {} bytes, not a whole number of f32 (4 bytes each)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Encodes f32 values as base64 of their little-endian bytes.
pub fn encode_f32_b64(values: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    B64.encode(bytes)
}

// ---------------------------------------------------------------------------------------------------------
// Labels (in)

/// A decoded label: which request, the outcome as `y ∈ [0, 1]` (1: a wins), and who gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMsg {
    pub request_id: String,
    pub y: f64,
    pub annotator_id: Option<String>,
}

/// `"a"` → 1, `"b"` → 0, `"tie"` → 0.5, or a probability that a wins.
struct Outcome(f64);

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Outcome;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"a\", \"b\", \"tie\" or a probability in [0, 1]")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Outcome, E> {
                match s {
                    "a" => Ok(Outcome(1.0)),
                    "b" => Ok(Outcome(0.0)),
                    "tie" => Ok(Outcome(0.5)),
                    _ => Err(E::custom(format_args!(
                        "{MARK_OUTCOME}outcome {s:?} is not \"a\", \"b\", \"tie\" or a probability"
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, y: f64) -> Result<Outcome, E> {
                if y.is_finite() && (0.0..=1.0).contains(&y) {
                    Ok(Outcome(y))
                } else {
                    Err(E::custom(format_args!(
                        "{MARK_OUTCOME}outcome {y} is outside [0, 1]"
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, y: u64) -> Result<Outcome, E> {
                self.visit_f64(y as f64)
            }
            fn visit_i64<E: de::Error>(self, y: i64) -> Result<Outcome, E> {
                self.visit_f64(y as f64)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    schema: String,
    request_id: String,
    outcome: Outcome,
    #[serde(default)]
    annotator_id: Option<String>,
    /// Accepted and ignored (annotation tools like to attach context).
    #[serde(default)]
    metadata: Option<Metadata>,
}

// ---------------------------------------------------------------------------------------------------------
// Label requests (out)

/// One side of a requested comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSide {
    pub prompt_id: String,
    pub response_id: String,
    /// The response's metadata as it arrived (or absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// The raw embedding, base64 of little-endian f32. Lets a restarted daemon rebuild the pair from the
    /// requests topic alone (see `daemon` module doc, "Recovery").
    pub embedding_b64: String,
}

/// A comparison request for annotators: "which of a and b is better?".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    pub schema: String,
    /// Deterministic and unique: `<instance>-<sequence>-<hash of instance, sequence and both response ids>`.
    pub request_id: String,
    pub instance_id: String,
    pub sequence: u64,
    pub a: RequestSide,
    pub b: RequestSide,
    pub strategy: String,
    /// The score the strategy ranked this pair by (for `greedy-dopt`: the log-det gain in nats).
    pub gain: f64,
    /// Model's probability that a beats b when the request was issued.
    pub predicted_p: f64,
    pub model_version: u64,
    /// How many labels (from distinct annotators) the request wants.
    pub labels_wanted: u32,
    /// Milliseconds since the Unix epoch.
    pub issued_at_ms: i64,
    /// Labels timestamped after this are rejected as `expired_request`.
    pub expires_at_ms: i64,
}

/// Splits a request id into (instance, sequence) when it has armd's shape.
pub fn parse_request_id(id: &str) -> Option<(&str, u64)> {
    let (rest, hash) = id.rsplit_once('-')?;
    if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (instance, seq) = rest.rsplit_once('-')?;
    Some((instance, seq.parse().ok()?))
}

/// Builds the request id of `sequence` for the pair (`a`, `b`) (response ids): FNV-1a over the parts, so
/// the id is stable across versions and platforms, and never the same for two different pairs issued with
/// the same sequence number (e.g. a request lost in a crash before it was checkpointed).
pub fn request_id(instance: &str, sequence: u64, a: &str, b: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        instance.as_bytes(),
        &sequence.to_le_bytes(),
        a.as_bytes(),
        b.as_bytes(),
    ] {
        for &byte in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{instance}-{sequence}-{h:016x}")
}

// ---------------------------------------------------------------------------------------------------------
// Model snapshots (out)

/// Running prequential scores in a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrequentialSummary {
    pub labels: u64,
    pub log_loss: Option<f64>,
    pub accuracy: Option<f64>,
}

/// The posterior as published on the models topic and written next to the `.npy` export.
///
/// `reward(x) = x · weights + bias` scores a **raw** embedding when `weights` is present (scalings `none`
/// and `standardize` fold into a linear head). For `l2` and `standardize+l2`, `weights` is absent and the
/// user computes `z = (x − scaler_mean) · scaler_inv_std` (standardising scalings only), `z /= ‖z‖`, then
/// `reward = z · theta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSnapshot {
    pub schema: String,
    pub instance_id: String,
    pub version: u64,
    pub labels_applied: u64,
    pub labels_stored: u64,
    pub dim: usize,
    pub scaling: String,
    /// θ in the scaled feature space.
    pub theta: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler_mean: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler_inv_std: Option<Vec<f64>>,
    /// Isotropic prior precision λ₀ in force (chosen by the evidence when `model.prior_precision = "auto"`);
    /// absent for a dense prior (a warm start, or labels folded into the prior).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_precision: Option<f64>,
    /// `log det H` of the posterior precision.
    pub log_det: f64,
    /// Diagonal of the precision `H` (in the scaled space).
    pub precision_diagonal: Vec<f64>,
    pub prequential: PrequentialSummary,
    pub created_at_ms: i64,
}

// ---------------------------------------------------------------------------------------------------------
// Dead letters (out)

/// Where a rejected message came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A rejected input message with the reason and its origin. The payload is kept as a string when it is
/// UTF-8 and as base64 otherwise, truncated to a bound so a multi-megabyte input cannot make an oversized
/// dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema: String,
    pub reason: String,
    pub detail: String,
    pub source: SourcePosition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
    /// Size of the original payload in bytes.
    pub payload_bytes: usize,
    pub payload_truncated: bool,
    pub rejected_at_ms: i64,
}

impl DeadLetter {
    pub fn new(
        rejection: &Rejection,
        source: SourcePosition,
        payload: Option<&[u8]>,
        max_payload_bytes: usize,
        now_ms: i64,
    ) -> Self {
        let bytes = payload.unwrap_or(&[]);
        let mut cut = bytes.len().min(max_payload_bytes);
        let (text, b64) = match std::str::from_utf8(bytes) {
            Ok(s) => {
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                (Some(s[..cut].to_string()), None)
            }
            Err(_) => (None, Some(B64.encode(&bytes[..cut]))),
        };
        Self {
            schema: DEAD_LETTER_SCHEMA.to_string(),
            reason: rejection.reason.code().to_string(),
            detail: rejection.detail.clone(),
            source,
            payload: text,
            payload_b64: b64,
            payload_bytes: bytes.len(),
            payload_truncated: cut < bytes.len(),
            rejected_at_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
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
                "\"embedding_b64\": \"AAAA*AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\""
                    .to_string()
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
        let head = format!(
            "\"schema\": \"{RESPONSE_SCHEMA}\", \"prompt_id\": \"p\", \"response_id\": \"r\""
        );
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
        let text = r#"{"schema":"armd.label.v1","request_id":"q","outcome":"a","annotator_id":{"x\"y":1}}"#;
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
}
