//! End to end with a third-party client on the other side: `examples/labeler.py` (Python,
//! confluent-kafka) answers armd's requests as a simulated annotator, and the exported model is loaded
//! and used from Python with numpy only. Needs `python3 -m pip install -r examples/requirements.txt`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::inprocess::start_in_process;
use common::replay;
use common::*;

#[test]
fn python_labeler_drives_the_daemon_and_python_scores_with_the_export() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "python");
    let state = tempfile::tempdir().unwrap();
    let dim = 16;
    let cfg = config(b, &t, state.path(), dim, "armd-py");
    let mut world = World::new(dim, 3);
    let train = world.prompts(40, 6);
    let test = world.prompts(30, 6);
    let golden = state.path().join("golden.npy");
    std::fs::write(
        &golden,
        armd::daemon::export::npy_f64(&world.golden_w).unwrap(),
    )
    .unwrap();

    let daemon = start_in_process(cfg);
    send_responses(b, &t.responses, &train);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/labeler.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([
            "--brokers",
            b,
            "--requests-topic",
            &t.requests,
            "--labels-topic",
            &t.labels,
        ])
        .args([
            "--group",
            &format!("py-{}", t.requests),
            "--annotator-id",
            "py-1",
        ])
        .arg("--oracle-weights")
        .arg(&golden)
        .args(["--beta", "1.0", "--max-labels", "60", "--idle-exit", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("labeler.py did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    assert!(
        status.success(),
        "labeler.py failed ({status:?}); is confluent-kafka installed? {out}"
    );
    assert!(out.contains("\"labels_sent\": 60"), "{out}");
    let text = wait_metric(
        &daemon.base,
        "armd_model_labels_applied",
        Duration::from_secs(30),
        |v| v >= 60.0,
    );
    assert_eq!(metric(&text, "armd_model_labels_applied"), Some(60.0));
    daemon.shutdown().expect("clean shutdown");

    // Score held-out responses in Python with the exported files only.
    let xs: Vec<f64> = test
        .iter()
        .flat_map(|s| s.x.iter().map(|&v| f64::from(v)))
        .collect();
    let ys: Vec<f64> = test.iter().map(|s| s.reward).collect();
    let xs_path = state.path().join("x.npy");
    let ys_path = state.path().join("y.npy");
    std::fs::write(&xs_path, armd::daemon::export::npy_f64(&xs).unwrap()).unwrap();
    std::fs::write(&ys_path, armd::daemon::export::npy_f64(&ys).unwrap()).unwrap();
    let snippet = format!(
        r#"
import json, numpy as np
meta = json.load(open("{dir}/model/model.json")); w = np.load("{dir}/model/" + meta["npy_file"])
x = np.load("{x}").reshape(-1, {dim}); y = np.load("{y}")
reward = x @ w + meta["bias"]
print(json.dumps({{"labels": meta["labels_applied"], "corr": float(np.corrcoef(reward, y)[0, 1])}}))
"#,
        dir = state.path().display(),
        x = xs_path.display(),
        y = ys_path.display(),
    );
    let out = Command::new("python3")
        .args(["-c", &snippet])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["labels"], 60);
    let corr = v["corr"].as_f64().unwrap();
    assert!(
        corr > 0.8,
        "correlation of Python-scored rewards with the golden reward: {corr}"
    );
    // The same numbers from Rust: the export scores raw embeddings.
    let (w, bias, _) = exported_model(&state.path().join("model")).unwrap();
    assert!(spearman_of(&w, bias, &test) > 0.5);
}

/// `examples/generator.py` (the compose stack's demo producer) writes responses armd accepts, with a
/// prompt and a text in their metadata, and a golden weights file the simulated annotator can load.
#[test]
fn python_generator_writes_responses_armd_accepts() {
    let broker = broker();
    let b = broker.bootstrap.as_str();
    let t = create_topics(b, "generator");
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden.npy");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/generator.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--brokers", b, "--topic", &t.responses, "--dim", "8"])
        .args(["--per-prompt", "3", "--rate", "0", "--max-responses", "12"])
        .arg("--golden")
        .arg(&golden)
        .output()
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "generator.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = armd::daemon::messages::Decoder::new(8, 1 << 20);
    let records = replay::read_topic(b, &t.responses);
    assert_eq!(records.len(), 12);
    let mut prompts = std::collections::BTreeSet::new();
    for r in &records {
        let resp = decoder
            .response(r.payload.as_deref())
            .unwrap_or_else(|e| panic!("armd rejects a generated response: {e}"));
        assert_eq!(resp.embedding.len(), 8);
        prompts.insert(resp.prompt_id.to_string());
        let meta = String::from_utf8_lossy(r.payload.as_deref().unwrap()).to_string();
        assert!(
            meta.contains("\"text\"") && meta.contains("\"prompt\""),
            "{meta}"
        );
    }
    assert_eq!(prompts.len(), 4);
    let bytes = std::fs::read(&golden).unwrap();
    let w: Vec<f64> = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap();
    assert_eq!(w.len(), 8);
}
