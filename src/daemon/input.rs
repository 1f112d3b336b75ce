//! What the consumer threads hand to the engine thread, and the clock they stamp it with. Its own module
//! so that the consumer threads (`ingest`, `labels`, `requests`) and the engine thread (`driver`, `engine`)
//! depend on it, not on each other.

use std::time::{SystemTime, UNIX_EPOCH};

use super::messages::{LabelMsg, LabelRequest, Rejection, Response, ScalerMsg, SourcePosition};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A decoded scaler message: the message and its mean and 1/std.
pub type DecodedScaler = (ScalerMsg, Vec<f64>, Vec<f64>);

/// A labels-topic message as handed to the engine.
pub struct LabelInput {
    pub decoded: std::result::Result<LabelMsg, Rejection>,
    pub payload: Option<Vec<u8>>,
    pub pos: SourcePosition,
    /// Kafka timestamp of the message (the expiry decision).
    pub timestamp_ms: i64,
    /// Wall time at which the labels consumer read it (how far the requests topic must have been read
    /// before its request can be called unknown).
    pub read_at_ms: i64,
}

/// What the consumer threads send to the engine thread.
pub enum Input {
    /// Validated responses (one consumer batch) and their arrival time (ms).
    Responses(Vec<Response>, i64),
    /// One label message of the labels topic: decoded or rejected.
    Label(LabelInput),
    /// An `armd.scaler.v1` message of the labels topic (decoded or rejected), with its raw payload.
    Scaler {
        decoded: std::result::Result<DecodedScaler, Rejection>,
        payload: Option<Vec<u8>>,
        pos: SourcePosition,
    },
    /// The labels consumer has handed over every message appended to the labels topic before `as_of_ms`
    /// (wall clock).
    LabelsCaughtUp { as_of_ms: i64 },
    /// One message of the requests topic at `partition`/`offset`: a request, or why it is not one.
    Request {
        request: std::result::Result<LabelRequest, String>,
        partition: i32,
        offset: i64,
    },
    /// The requests consumer has handed over every message appended to the requests topic before
    /// `as_of_ms` (wall clock).
    RequestsCaughtUp { as_of_ms: i64 },
}
