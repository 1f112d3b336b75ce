//! Wire formats of every Kafka message armd reads or writes (JSON, UTF-8), and their decoders.
//!
//! Every message carries `"schema": "armd.<kind>.v1"`. A decoder either returns a typed message or a
//! [`Rejection`]: a [`Reason`] from a small, stable set of snake_case codes (used as a metric label and in
//! dead letters) plus a human-readable detail that says what is wrong and where.
//!
//! | topic | direction | schema | type |
//! |---|---|---|---|
//! | responses | in | `armd.response.v1` | [`Response`] |
//! | requests | out, and read back by every instance | `armd.request.v1` | [`LabelRequest`] |
//! | labels | in | `armd.label.v1` | [`LabelMsg`] |
//! | labels, partition 0 | out and in | `armd.scaler.v1` | [`ScalerMsg`] (the group's feature scaling) |
//! | models | out | `armd.model.v1` | [`ModelSnapshot`] |
//! | dead letters | out | `armd.dead_letter.v1` | [`DeadLetter`] |
//!
//! Embeddings travel either as a JSON number array (`embedding`) or as base64 of little-endian f32
//! (`embedding_b64`). The base64 path is the fast one: the string is borrowed from the payload, decoded in
//! one pass and reinterpreted four bytes at a time, with no number parsing.
//!
//! Unknown fields are rejected (`unknown_field`): a producer that sends a field armd ignores is almost
//! always a producer on another schema version, and silently ignoring it hides the mismatch.
//!
//! This file holds the wire types; by concern: [`reason`] (rejection codes), `strict` (the checks every
//! input passes and serde-error mapping), `embedding` (base64 f32: a SIMD fast path, plus the reference
//! decoder that defines the accepted language and is checked against it), `decode` (the input-topic
//! decoders), `scan` (the hand-written scanner behind the fast response path).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

mod decode;
mod embedding;
pub mod reason;
mod scaler;
mod scan;
mod strict;
#[cfg(test)]
mod tests;

pub use self::decode::Decoder;
use self::embedding::*;
pub use self::embedding::{decode_f32_b64, encode_f32_b64};
pub use self::reason::{Reason, Rejection};
pub use self::scaler::{decode_f64_b64, encode_f64_b64, ScalerMsg};
use self::strict::*;

pub const RESPONSE_SCHEMA: &str = "armd.response.v1";
pub const REQUEST_SCHEMA: &str = "armd.request.v1";
pub const LABEL_SCHEMA: &str = "armd.label.v1";
pub const MODEL_SCHEMA: &str = "armd.model.v1";
pub const DEAD_LETTER_SCHEMA: &str = "armd.dead_letter.v1";
pub const SCALER_SCHEMA: &str = "armd.scaler.v1";

/// Longest accepted prompt, response, request or annotator id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

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

// ---------------------------------------------------------------------------------------------------------
// Labels (in)

/// A decoded label: which request, the outcome as `y ∈ [0, 1]` (1: a wins), and who gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMsg {
    pub request_id: String,
    pub y: f64,
    pub annotator_id: Option<String>,
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
    /// In `model.json` only: the versioned `.npy` file written with this snapshot (see `export`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npy_file: Option<String>,
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
