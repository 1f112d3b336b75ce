//! The Python side users plug in: `examples/score_model.py` loads armd's exported model files and scores raw
//! embeddings exactly as armd's own feature scaling + θ does, for every scaling.

use std::process::Command;

use armd::daemon::export::write_model_files;
use armd::daemon::messages::{ModelSnapshot, PrequentialSummary};
use armd::features::{Scaler, Scaling};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn snapshot(scaler: &Scaler, theta: &[f64]) -> ModelSnapshot {
    let folded = scaler.fold_into_linear_head(theta).ok();
    let needs_stats = folded.is_none();
    ModelSnapshot {
        schema: "armd.model.v1".into(),
        instance_id: "test".into(),
        version: 7,
        labels_applied: 42,
        labels_stored: 42,
        dim: theta.len(),
        scaling: scaler.scaling().name().into(),
        theta: theta.to_vec(),
        weights: folded.as_ref().map(|(w, _)| w.clone()),
        bias: folded.as_ref().map(|(_, b)| *b),
        scaler_mean: needs_stats.then(|| scaler.mean().to_vec()),
        scaler_inv_std: needs_stats.then(|| scaler.inv_std().to_vec()),
        prior_precision: Some(1536.0),
        log_det: 1.0,
        precision_diagonal: vec![1.0; theta.len()],
        prequential: PrequentialSummary {
            labels: 42,
            log_loss: Some(0.6),
            accuracy: Some(0.7),
        },
        created_at_ms: 0,
        npy_file: None,
    }
}

#[test]
fn score_model_py_matches_armd_for_every_scaling() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has_numpy = Command::new(&python)
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_numpy {
        assert!(
            std::env::var_os("ARMD_REQUIRE_TOOLS").is_none() && std::env::var_os("CI").is_none(),
            "numpy is required under .ci/run (it installs it in a virtual environment) and in CI"
        );
        eprintln!("skipping: {python} with numpy not available");
        return;
    }
    let (d, n) = (12usize, 30usize);
    let mut rng = StdRng::seed_from_u64(5);
    // LLM-like raw embeddings: offset and uneven scales.
    let raw: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            (0..d)
                .map(|j| 3.0 + (j as f32 + 1.0) * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let theta: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for scaling in [
        Scaling::None,
        Scaling::Standardize,
        Scaling::L2,
        Scaling::StandardizeL2,
    ] {
        let scaler = Scaler::fit(scaling, raw.iter().map(|r| r.as_slice()), d).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(&scaler, &theta);
        write_model_files(dir.path(), &snap).unwrap();
        // Embeddings as float64 .npy [n, d] (row-major), the same file a user would np.save.
        let flat: Vec<f64> = raw
            .iter()
            .flat_map(|r| r.iter().map(|&x| x as f64))
            .collect();
        let mut bytes = Vec::new();
        {
            use npyz::WriterBuilder;
            let mut w = npyz::WriteOptions::<f64>::new()
                .default_dtype()
                .shape(&[n as u64, d as u64])
                .writer(&mut bytes)
                .begin_nd()
                .unwrap();
            w.extend(flat.iter().copied()).unwrap();
            w.finish().unwrap();
        }
        let emb = dir.path().join("emb.npy");
        std::fs::write(&emb, bytes).unwrap();

        let out = Command::new(&python)
            .arg("examples/score_model.py")
            .arg("--model-dir")
            .arg(dir.path())
            .arg("--embeddings")
            .arg(&emb)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{scaling}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<f64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(got.len(), n);
        for (r, g) in raw.iter().zip(&got) {
            let z = scaler.transform_vec(r).unwrap();
            let want: f64 = z.iter().zip(&theta).map(|(a, b)| a * b).sum();
            assert!(
                (g - want).abs() <= 1e-9 * (1.0 + want.abs()),
                "{scaling}: python {g} vs armd {want}"
            );
        }
    }
}
