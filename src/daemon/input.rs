//! What the consumer threads hand to the engine thread, and the clock they stamp it with. Its own module
//! so that the consumer threads (`ingest`, `labels`) and the engine thread (`driver`) depend on it, not on
//! each other.

use std::time::{SystemTime, UNIX_EPOCH};

use super::messages::{LabelMsg, Rejection, Response, SourcePosition};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the consumer threads send to the engine thread.
pub enum Input {
    /// Validated responses (one consumer batch) and their arrival time (ms).
    Responses(Vec<Response>, i64),
    /// One labels-topic message: decoded or rejected, with its position and Kafka timestamp (ms).
    Label {
        decoded: std::result::Result<LabelMsg, Rejection>,
        payload: Option<Vec<u8>>,
        pos: SourcePosition,
        timestamp_ms: i64,
    },
    /// The labels consumer has handed over every label appended to the labels topic before `as_of_ms`
    /// (wall clock).
    LabelsCaughtUp { as_of_ms: i64 },
}
