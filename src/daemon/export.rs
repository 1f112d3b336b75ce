//! Model files for Python users, written atomically into `export.dir`:
//!
//! - `model.npy`: 1-D float64 array of length `dim`. For scalings `none` and `standardize` it holds the
//!   raw-space weights `w`, so `reward = x @ w + bias` scores raw embeddings as they arrive on the
//!   responses topic. For `l2` and `standardize+l2` (not linear in x) it holds θ of the scaled space.
//! - `model.json`: the full [`ModelSnapshot`] (version, label count, `bias`, `scaling`, scaler statistics
//!   when needed, `log_det`, precision diagonal, prequential scores).
//!
//! ```python
//! import json, numpy as np
//! w = np.load("model.npy"); meta = json.load(open("model.json"))
//! reward = embeddings @ w + meta["bias"]          # scalings none / standardize
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use npyz::WriterBuilder;

use super::checkpoint::write_atomic;
use super::messages::ModelSnapshot;

pub const NPY_FILE: &str = "model.npy";
pub const JSON_FILE: &str = "model.json";

/// Encodes a 1-D float64 `.npy` file in memory.
pub fn npy_f64(values: &[f64]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut w = npyz::WriteOptions::<f64>::new()
            .default_dtype()
            .shape(&[values.len() as u64])
            .writer(&mut buf)
            .begin_nd()?;
        w.extend(values.iter().copied())?;
        w.finish()?;
    }
    Ok(buf)
}

/// Writes `model.npy` then `model.json` (each atomically) under `dir`.
pub fn write_model_files(dir: &Path, snap: &ModelSnapshot) -> Result<()> {
    let head = snap.weights.as_deref().unwrap_or(&snap.theta);
    write_atomic(&dir.join(NPY_FILE), &npy_f64(head)?)
        .with_context(|| format!("cannot export the model to {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(snap)?;
    write_atomic(&dir.join(JSON_FILE), &json)
        .with_context(|| format!("cannot export the model to {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips() {
        let vals = [1.5, -2.0, 1e-300, f64::MAX];
        let bytes = npy_f64(&vals).unwrap();
        assert!(bytes.starts_with(b"\x93NUMPY"));
        let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
        assert_eq!(npy.shape(), &[4]);
        let back: Vec<f64> = npy.into_vec().unwrap();
        assert_eq!(back, vals);
    }
}
