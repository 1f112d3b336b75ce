//! Model files for Python users, written into `export.dir` so that a reader never mixes versions:
//!
//! - `model-v<version>.npy`: 1-D float64 array of length `dim`, written once and never changed. For
//!   scalings `none` and `standardize` it holds the raw-space weights `w`, so `reward = x @ w + bias`
//!   scores raw embeddings as they arrive on the responses topic. For `l2` and `standardize+l2` (not
//!   linear in x) it holds θ of the scaled space. The newest [`KEEP_VERSIONS`] are kept.
//! - `model.json`: the full [`ModelSnapshot`] (version, label count, `bias`, `scaling`, scaler statistics
//!   when needed, `log_det`, precision diagonal, prequential scores) and `npy_file`, the name of the
//!   `.npy` written with it. It is replaced atomically *after* that file exists: it is the pointer.
//! - `model.npy`: a copy of the newest weights for quick looks; read alone it is consistent, but read
//!   next to `model.json` it may be one export ahead of it.
//!
//! ```python
//! import json, numpy as np, os
//! meta = json.load(open(os.path.join(d, "model.json")))      # one atomic read …
//! w = np.load(os.path.join(d, meta["npy_file"]))             # … names the matching weights
//! reward = embeddings @ w + meta["bias"]                     # scalings none / standardize
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use npyz::WriterBuilder;

use super::checkpoint::write_atomic;
use super::messages::ModelSnapshot;

pub const NPY_FILE: &str = "model.npy";
pub const JSON_FILE: &str = "model.json";
/// Versioned weight files kept: a reader that read `model.json` up to this many exports ago still finds
/// its `.npy`.
pub const KEEP_VERSIONS: usize = 3;

/// The versioned weights file of a snapshot version.
pub fn versioned_npy(version: u64) -> String {
    format!("model-v{version}.npy")
}

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

/// Writes `model-v<version>.npy`, then `model.json` naming it (the atomic pointer), then the `model.npy`
/// copy, and removes versioned files beyond the newest [`KEEP_VERSIONS`]. Each write is atomic.
pub fn write_model_files(dir: &Path, snap: &ModelSnapshot) -> Result<()> {
    let ctx = || format!("cannot export the model to {}", dir.display());
    let head = snap.weights.as_deref().unwrap_or(&snap.theta);
    let npy = npy_f64(head)?;
    let name = versioned_npy(snap.version);
    write_atomic(&dir.join(&name), &npy).with_context(ctx)?;
    let mut meta = snap.clone();
    meta.npy_file = Some(name);
    write_atomic(&dir.join(JSON_FILE), &serde_json::to_vec_pretty(&meta)?).with_context(ctx)?;
    write_atomic(&dir.join(NPY_FILE), &npy).with_context(ctx)?;
    prune_versions(dir, snap.version).with_context(ctx)
}

/// Removes temporary files of export writes interrupted by a crash (`.model*.tmp-<pid>` of other
/// processes) from `dir`. Returns how many.
pub fn remove_stale_temp_files(dir: &Path) -> Result<usize> {
    super::checkpoint::remove_stale_temp_files_in(dir, |name| {
        name.starts_with(".model") && name.contains(".tmp-")
    })
}

/// Removes `model-v<n>.npy` files older than the newest [`KEEP_VERSIONS`] (and any newer than `current`,
/// left by a model that was replaced, e.g. a fresh start in the same directory).
fn prune_versions(dir: &Path, current: u64) -> Result<()> {
    let mut versions: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("model-v")?
                .strip_suffix(".npy")?
                .parse::<u64>()
                .ok()
        })
        .collect();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    let keep: Vec<u64> = versions
        .iter()
        .copied()
        .filter(|&v| v <= current)
        .take(KEEP_VERSIONS)
        .collect();
    for v in versions {
        if !keep.contains(&v) {
            match std::fs::remove_file(dir.join(versioned_npy(v))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
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

    fn snap(version: u64, dim: usize) -> ModelSnapshot {
        let mut s: ModelSnapshot = serde_json::from_value(serde_json::json!({
            "schema": "armd.model.v1", "instance_id": "t", "version": version,
            "labels_applied": version, "labels_stored": version, "dim": dim, "scaling": "none",
            "theta": vec![0.0; dim], "log_det": 0.0, "precision_diagonal": vec![1.0; dim],
            "prequential": {"labels": 0}, "created_at_ms": 0
        }))
        .unwrap();
        s.weights = Some(vec![version as f64; dim]);
        s.bias = Some(version as f64);
        s
    }

    fn read_pair(dir: &Path) -> Option<(u64, f64, Vec<f64>)> {
        let meta: ModelSnapshot =
            serde_json::from_slice(&std::fs::read(dir.join(JSON_FILE)).ok()?).ok()?;
        let bytes = std::fs::read(dir.join(meta.npy_file.as_deref()?)).ok()?;
        let w: Vec<f64> = npyz::NpyFile::new(&bytes[..]).ok()?.into_vec().ok()?;
        Some((meta.version, meta.bias?, w))
    }

    #[test]
    fn json_names_its_weights_and_old_versions_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        for v in 1..=6 {
            write_model_files(dir.path(), &snap(v, 4)).unwrap();
            let (version, bias, w) = read_pair(dir.path()).unwrap();
            assert_eq!((version, bias), (v, v as f64));
            assert_eq!(w, vec![v as f64; 4]);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "model-v4.npy",
                "model-v5.npy",
                "model-v6.npy",
                "model.json",
                "model.npy"
            ]
        );
        // Temporary files of interrupted writes (another pid) are cleaned at start.
        std::fs::write(dir.path().join(".model-v7.npy.tmp-4294967295"), b"x").unwrap();
        std::fs::write(dir.path().join(".model.json.tmp-4294967295"), b"x").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 2);
        // A fresh model in the same directory (version restarts at 1): the newer leftovers go.
        write_model_files(dir.path(), &snap(1, 4)).unwrap();
        assert_eq!(read_pair(dir.path()).unwrap().0, 1);
        assert!(!dir.path().join("model-v6.npy").exists());
    }

    /// A reader polling while the writer exports never sees weights of one version with the metadata of
    /// another (with `model.npy` + `model.json` read side by side it does, within a few hundred reads).
    #[test]
    fn a_concurrent_reader_never_mixes_versions() {
        let dir = tempfile::tempdir().unwrap();
        write_model_files(dir.path(), &snap(1, 64)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let (mut reads, mut mixed_legacy) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some((version, bias, w)) = read_pair(&dir) {
                        assert_eq!(bias, version as f64);
                        assert!(w.iter().all(|&x| x == version as f64), "mixed versions");
                        reads += 1;
                    }
                    // The legacy pair, for contrast (not asserted: it may mix).
                    let legacy = std::fs::read(dir.join(NPY_FILE))
                        .ok()
                        .and_then(|b| npyz::NpyFile::new(&b[..]).ok()?.into_vec::<f64>().ok());
                    let meta = std::fs::read(dir.join(JSON_FILE))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<ModelSnapshot>(&b).ok());
                    if let (Some(w), Some(m)) = (legacy, meta) {
                        mixed_legacy += u64::from(w[0] != m.version as f64);
                    }
                }
                (reads, mixed_legacy)
            })
        };
        for v in 2..=400 {
            write_model_files(dir.path(), &snap(v, 64)).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (reads, mixed_legacy) = reader.join().unwrap();
        assert!(reads > 10, "the reader read only {reads} pairs");
        eprintln!(
            "{reads} consistent reads; model.npy beside model.json mixed {mixed_legacy} times"
        );
    }
}
