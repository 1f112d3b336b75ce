//! `armd.scaler.v1`: the feature scaling of a group of instances, carried on the labels topic.
//!
//! Every instance of a group must score a pair the same way, so the scaling cannot be each instance's own
//! warm-up (each sees only its share of the responses). An instance whose warm-up finishes *proposes* its
//! scaling by appending this message to partition 0 of the labels topic; every instance, the proposer
//! included, adopts the **first** proposal it reads there and ignores later ones. Because every instance
//! reads the labels topic from the same start in the same order, they all adopt the same scaling, and a
//! from-scratch replay of the labels topic reproduces it. Statistics travel as base64 of little-endian
//! f64, so the adopted values are bit-identical to the proposer's.

use super::*;

/// The scaling proposal (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerMsg {
    pub schema: String,
    /// The proposing instance.
    pub instance_id: String,
    /// `model.scaling` of the proposer (an instance with another setting refuses the proposal).
    pub scaling: String,
    /// Warm-up responses the statistics come from.
    pub samples: u64,
    /// Per-dimension mean, base64 of little-endian f64.
    pub mean_b64: String,
    /// Per-dimension 1/std (1 where the scaling does not standardise), base64 of little-endian f64.
    pub inv_std_b64: String,
    /// Mean squared norm of a random scaled difference over the proposer's pool: where
    /// `model.prior_precision = "auto"` starts, so every instance starts from the same prior.
    pub pair_spread: f64,
    pub proposed_at_ms: i64,
}

/// Encodes f64 values as base64 of their little-endian bytes.
pub fn encode_f64_b64(values: &[f64]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 8);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    B64.encode(bytes)
}

/// Decodes base64 of little-endian f64 (`field` names it in the error).
pub fn decode_f64_b64(field: &str, s: &str) -> Result<Vec<f64>, Rejection> {
    let bytes = B64
        .decode(s)
        .map_err(|e| Rejection::new(Reason::InvalidBase64, format!("{field}: {e}")))?;
    if bytes.len() % 8 != 0 {
        return Err(Rejection::new(
            Reason::InvalidBase64,
            format!(
                "{field}: {} bytes is not a whole number of f64 values",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

impl ScalerMsg {
    /// Whether `payload` is meant to be a scaler message (its schema is `armd.scaler.v1`); such a message
    /// on the labels topic is decoded with [`ScalerMsg::decode`] instead of as a label.
    pub fn is_scaler(payload: Option<&[u8]>) -> bool {
        #[derive(Deserialize)]
        struct Peek<'a> {
            #[serde(borrow)]
            schema: Option<Cow<'a, str>>,
        }
        let Some(p) = payload else { return false };
        // Cheap filter first: labels are small and never contain the schema name.
        if !p
            .windows(SCALER_SCHEMA.len())
            .any(|w| w == SCALER_SCHEMA.as_bytes())
        {
            return false;
        }
        serde_json::from_slice::<Peek>(p).is_ok_and(|v| v.schema.as_deref() == Some(SCALER_SCHEMA))
    }

    /// Decodes and checks a scaler message for a model of dimension `dim`: returns it with the decoded
    /// mean and 1/std.
    pub fn decode(
        payload: Option<&[u8]>,
        dim: usize,
    ) -> Result<(ScalerMsg, Vec<f64>, Vec<f64>), Rejection> {
        let p = payload.ok_or_else(|| Rejection::new(Reason::EmptyPayload, "no payload"))?;
        let text = std::str::from_utf8(p)
            .map_err(|e| Rejection::new(Reason::InvalidUtf8, format!("payload: {e}")))?;
        let msg: ScalerMsg = serde_json::from_str(text).map_err(|e| json_rejection(text, e))?;
        check_schema(&msg.schema, SCALER_SCHEMA)?;
        let mean = decode_f64_b64("mean_b64", &msg.mean_b64)?;
        let inv_std = decode_f64_b64("inv_std_b64", &msg.inv_std_b64)?;
        if mean.len() != dim || inv_std.len() != dim {
            return Err(Rejection::new(
                Reason::WrongDimension,
                format!(
                    "scaler has {}/{} values (mean/inv_std), model.dim is {dim}",
                    mean.len(),
                    inv_std.len()
                ),
            ));
        }
        if !mean.iter().chain(&inv_std).all(|x| x.is_finite()) || !msg.pair_spread.is_finite() {
            return Err(Rejection::new(
                Reason::NonFinite,
                "scaler statistics must be finite",
            ));
        }
        Ok((msg, mean, inv_std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dim: usize) -> ScalerMsg {
        let mean: Vec<f64> = (0..dim).map(|i| i as f64 * 0.1 - 1.0 / 3.0).collect();
        let inv: Vec<f64> = (0..dim).map(|i| 1.0 / (1.0 + i as f64).sqrt()).collect();
        ScalerMsg {
            schema: SCALER_SCHEMA.into(),
            instance_id: "armd-1".into(),
            scaling: "standardize".into(),
            samples: 64,
            mean_b64: encode_f64_b64(&mean),
            inv_std_b64: encode_f64_b64(&inv),
            pair_spread: 12.5,
            proposed_at_ms: 1,
        }
    }

    #[test]
    fn round_trips_bit_for_bit_and_is_told_apart_from_labels() {
        let m = msg(5);
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(ScalerMsg::is_scaler(Some(&bytes)));
        let (back, mean, inv) = ScalerMsg::decode(Some(&bytes), 5).unwrap();
        assert_eq!(back, m);
        for (i, x) in mean.iter().enumerate() {
            assert_eq!(x.to_bits(), (i as f64 * 0.1 - 1.0 / 3.0).to_bits());
        }
        assert_eq!(inv[3].to_bits(), (1.0 / 2.0f64).to_bits());
        let label = br#"{"schema":"armd.label.v1","request_id":"x","outcome":"a"}"#;
        assert!(!ScalerMsg::is_scaler(Some(label)));
        // A label that merely mentions the schema name in its metadata is still a label.
        let sneaky = br#"{"schema":"armd.label.v1","request_id":"x","outcome":"a","metadata":{"n":"armd.scaler.v1"}}"#;
        assert!(!ScalerMsg::is_scaler(Some(sneaky)));
        assert!(!ScalerMsg::is_scaler(None));
    }

    #[test]
    fn bad_proposals_are_refused_with_the_reason() {
        let m = msg(5);
        let bytes = serde_json::to_vec(&m).unwrap();
        let e = ScalerMsg::decode(Some(&bytes), 6).unwrap_err();
        assert_eq!(e.reason, Reason::WrongDimension);
        let mut bad = m.clone();
        bad.mean_b64 = "AAA".into();
        let e = ScalerMsg::decode(Some(&serde_json::to_vec(&bad).unwrap()), 5).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidBase64, "{e}");
        let mut nan = m.clone();
        nan.mean_b64 = encode_f64_b64(&[f64::NAN, 0.0, 0.0, 0.0, 0.0]);
        let e = ScalerMsg::decode(Some(&serde_json::to_vec(&nan).unwrap()), 5).unwrap_err();
        assert_eq!(e.reason, Reason::NonFinite);
        let extra = br#"{"schema":"armd.scaler.v1","surprise":1}"#;
        assert!(ScalerMsg::decode(Some(extra), 5).is_err());
    }
}
