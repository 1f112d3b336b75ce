//! Why a message was rejected: stable reason codes (metric labels, dead letters) and a human detail.

use super::*;

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
