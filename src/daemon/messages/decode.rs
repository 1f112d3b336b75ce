//! The decoders of the input topics: raw serde shapes of responses and labels, validated into
//! [`Response`] and [`LabelMsg`] against the deployment's dimension and size limit.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse<'a> {
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
    pub(super) fn response_reference(&self, payload: Option<&[u8]>) -> Result<Response, Rejection> {
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
    pub(super) fn response_fast(&self, bytes: &[u8]) -> Option<Result<Response, Rejection>> {
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

/// `"a"` → 1, `"b"` → 0, `"tie"` → 0.5, or a probability that a wins.
pub(super) struct Outcome(f64);

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
pub(super) struct RawLabel {
    schema: String,
    request_id: String,
    outcome: Outcome,
    #[serde(default)]
    annotator_id: Option<String>,
    /// Accepted and ignored (annotation tools like to attach context).
    #[serde(default)]
    metadata: Option<Metadata>,
}
