//! Bad configuration and bad state at start: `armd run` must refuse to start with a message naming the
//! key or the file, exit with a non-zero code, and leave the existing checkpoint byte-for-byte as it was
//! (a refused start must never cost the operator the posterior their labels bought).
//!
//! These run the real binary as a child process. No broker is needed: configuration and checkpoint are
//! validated before armd connects to Kafka (the config points at a closed port to make sure of it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use armd::daemon::config::Config;
use armd::daemon::engine::Engine;
use armd::daemon::messages::Response;
use armd::daemon::telemetry::Telemetry;

/// A complete daemon configuration for `dim`, with its state in `dir` and an unreachable broker.
fn config_text(dir: &Path, dim: usize, instance: &str) -> String {
    format!(
        r#"
[daemon]
instance_id = "{instance}"
[kafka]
brokers = "127.0.0.1:1"
startup_timeout_secs = 2
[model]
dim = {dim}
warmup_samples = 4
[checkpoint]
path = "{ckpt}"
[export]
dir = "{export}"
[http]
listen = "127.0.0.1:0"
"#,
        ckpt = dir.join("armd.ckpt").display(),
        export = dir.join("model").display(),
    )
}

/// Writes a real checkpoint (scaler frozen from a few responses) as a daemon would, and returns its bytes.
fn write_checkpoint(dir: &Path, dim: usize, instance: &str) -> Vec<u8> {
    let cfg = Config::from_toml_with_env(&config_text(dir, dim, instance), &[]).unwrap();
    let mut engine = Engine::new(Arc::new(cfg.clone()), Telemetry::new().metrics, None).unwrap();
    for i in 0..6 {
        let x: Vec<f32> = (0..dim).map(|j| ((i * 7 + j * 3) % 11) as f32).collect();
        engine.on_response(
            Response {
                prompt_id: format!("p{}", i % 2).into(),
                response_id: format!("r{i}").into(),
                embedding: x,
                metadata: None,
            },
            0,
        );
    }
    engine.checkpoint(0).write(&cfg.checkpoint.path).unwrap();
    std::fs::read(&cfg.checkpoint.path).unwrap()
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn armd_run(config: &Path, env: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armd"));
    cmd.args(["run", "--config"]).arg(config);
    // Only the overrides of this case: an ARMD__* variable of the environment running the tests must
    // not leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("ARMD__") || k == "ARMD_CONFIG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run armd");
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Everything in `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, bytes, mtime)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts a refused start: exit code 1, a final `armd: error:` message containing every `needle`, and the
/// state directory exactly as before (no file changed, added or removed).
fn assert_refused(
    case: &str,
    out: &Outcome,
    needles: &[&str],
    dir: &Path,
    before: &[(PathBuf, Vec<u8>, SystemTime)],
) {
    assert_eq!(
        out.code,
        Some(1),
        "{case}: exit code {:?}\n{}",
        out.code,
        out.stderr
    );
    // Log lines may come first; the error (possibly several lines) is the last thing armd says.
    let error = out
        .stderr
        .find("armd: error:")
        .map(|i| &out.stderr[i..])
        .unwrap_or_else(|| panic!("{case}: no `armd: error:` message:\n{}", out.stderr));
    for n in needles {
        assert!(
            error.contains(n),
            "{case}: error does not mention {n:?}:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("panicked"), "{case}: {}", out.stderr);
    let after = snapshot(dir);
    assert_eq!(
        before.iter().map(|f| &f.0).collect::<Vec<_>>(),
        after.iter().map(|f| &f.0).collect::<Vec<_>>(),
        "{case}: files in the state directory changed"
    );
    for (b, a) in before.iter().zip(&after) {
        assert!(
            b.1 == a.1 && b.2 == a.2,
            "{case}: {} was modified",
            b.0.display()
        );
    }
}

#[test]
fn each_invalid_config_value_is_named_and_the_checkpoint_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("armd.toml");
    std::fs::write(&cfg_path, config_text(dir.path(), 16, "armd-0")).unwrap();
    write_checkpoint(dir.path(), 16, "armd-0");
    let before = snapshot(dir.path());
    // (override, value, what the message must say)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "ARMD__DAEMON__INSTANCE_ID",
            "",
            &["`daemon.instance_id`", "characters"],
        ),
        (
            "ARMD__DAEMON__INSTANCE_ID",
            "a b",
            &["`daemon.instance_id`"],
        ),
        (
            "ARMD__KAFKA__BROKERS",
            "",
            &["`kafka.brokers`", "must not be empty"],
        ),
        ("ARMD__KAFKA__GROUP_ID", "", &["`kafka.group_id`"]),
        (
            "ARMD__KAFKA__TOPICS__LABELS",
            "armd.responses",
            &["`kafka.topics.labels`", "same topic"],
        ),
        (
            "ARMD__KAFKA__STARTUP_TIMEOUT_SECS",
            "0",
            &["`kafka.startup_timeout_secs`"],
        ),
        ("ARMD__MODEL__DIM", "0", &["`model.dim`", "1..=65536"]),
        ("ARMD__MODEL__DIM", "abc", &["model.dim", "integer"]),
        (
            "ARMD__MODEL__PRIOR_PRECISION",
            "-1",
            &["`model.prior_precision`", "> 0"],
        ),
        (
            "ARMD__MODEL__PRIOR_PRECISION",
            "nan",
            &["`model.prior_precision`", "finite"],
        ),
        (
            "ARMD__MODEL__SCALING",
            "cubic",
            &["`model.scaling`", "standardize"],
        ),
        (
            "ARMD__MODEL__WARMUP_SAMPLES",
            "1",
            &["`model.warmup_samples`"],
        ),
        ("ARMD__MODEL__REFIT_EVERY", "-5", &["model.refit_every"]),
        ("ARMD__MODEL__MAX_LABELS", "0", &["`model.max_labels`"]),
        (
            "ARMD__SELECTION__STRATEGY",
            "magic",
            &["`selection.strategy`", "greedy-dopt"],
        ),
        (
            "ARMD__SELECTION__BATCH_SIZE",
            "0",
            &["`selection.batch_size`"],
        ),
        (
            "ARMD__SELECTION__MAX_IN_FLIGHT",
            "0",
            &["`selection.max_in_flight`"],
        ),
        (
            "ARMD__SELECTION__CANDIDATES",
            "all",
            &["`selection.candidates`", "within"],
        ),
        (
            "ARMD__SELECTION__LABELS_PER_REQUEST",
            "0",
            &["`selection.labels_per_request`"],
        ),
        (
            "ARMD__SELECTION__REQUEST_TTL_SECS",
            "0",
            &["`selection.request_ttl_secs`"],
        ),
        (
            "ARMD__SELECTION__EPSILON",
            "0",
            &["`selection.epsilon` = 0", "> 0"],
        ),
        ("ARMD__POOL__CAPACITY", "0", &["`pool.capacity`"]),
        (
            "ARMD__POOL__MAX_MESSAGE_BYTES",
            "10",
            &["`pool.max_message_bytes`", "base64 embedding"],
        ),
        (
            "ARMD__CHECKPOINT__EVERY_LABELS",
            "0",
            &["`checkpoint.every_labels`"],
        ),
        (
            "ARMD__CHECKPOINT__PATH",
            "",
            &["`checkpoint.path`", "must name a file"],
        ),
        (
            "ARMD__EXPORT__EVERY_LABELS",
            "0",
            &["`export.every_labels`"],
        ),
        (
            "ARMD__HTTP__LISTEN",
            "nowhere",
            &["`http.listen`", "IP:PORT"],
        ),
        ("ARMD__LOG__FORMAT", "xml", &["`log.format`"]),
        ("ARMD__LOG__LEVEL", "armd=[", &["`log.level`", "log filter"]),
    ];
    for (key, value, needles) in cases {
        let case = format!("{key}={value:?}");
        let out = armd_run(&cfg_path, &[(key, value)]);
        let mut want = vec![cfg_path.to_str().unwrap()];
        want.extend_from_slice(needles);
        assert_refused(&case, &out, &want, dir.path(), &before);
    }
    // Several bad values are all reported at once.
    let out = armd_run(
        &cfg_path,
        &[
            ("ARMD__MODEL__DIM", "0"),
            ("ARMD__LOG__FORMAT", "xml"),
            ("ARMD__SELECTION__BATCH_SIZE", "0"),
        ],
    );
    assert_refused(
        "three bad values",
        &out,
        &[
            "3 invalid configuration values",
            "`model.dim`",
            "`log.format`",
            "`selection.batch_size`",
        ],
        dir.path(),
        &before,
    );
}

#[test]
fn an_unreadable_or_malformed_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), 16, "armd-0");
    let before = snapshot(dir.path());
    let good = config_text(dir.path(), 16, "armd-0");

    let missing = dir.path().join("nope").join("armd.toml");
    let out = armd_run(&missing, &[]);
    assert_refused(
        "missing file",
        &out,
        &["cannot read config file", missing.to_str().unwrap()],
        dir.path(),
        &before,
    );

    let as_dir = tempfile::tempdir().unwrap();
    let out = armd_run(as_dir.path(), &[]);
    assert_refused(
        "a directory",
        &out,
        &["cannot read config file", as_dir.path().to_str().unwrap()],
        dir.path(),
        &before,
    );

    let other = tempfile::tempdir().unwrap();
    let cases: &[(&str, Vec<u8>, &[&str])] = &[
        (
            "syntax.toml",
            format!("{good}\n[model\n").into_bytes(),
            &["invalid configuration in", "syntax.toml"],
        ),
        (
            "unknown_key.toml",
            format!("{good}\n[pool]\ncapacty = 10\n").into_bytes(),
            &["capacty"],
        ),
        (
            "unknown_section.toml",
            format!("{good}\n[modle]\ndim = 3\n").into_bytes(),
            &["modle"],
        ),
        (
            "wrong_type.toml",
            good.replace("dim = 16", "dim = \"sixteen\"").into_bytes(),
            &["model.dim"],
        ),
        (
            "no_dim.toml",
            good.replace("dim = 16", "").into_bytes(),
            &["model.dim"],
        ),
        (
            "binary.toml",
            vec![0xff, 0xfe, 0x00, 0x80, 0x81],
            &["cannot read config file", "binary.toml"],
        ),
        ("empty.toml", Vec::new(), &["model.dim"]),
    ];
    for (name, bytes, needles) in cases {
        let p = other.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = armd_run(&p, &[]);
        let mut want = vec![p.to_str().unwrap()];
        want.extend_from_slice(needles);
        assert_refused(name, &out, &want, dir.path(), &before);
    }
}

#[test]
fn a_broken_or_foreign_checkpoint_stops_the_start_and_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("armd.toml");
    std::fs::write(&cfg_path, config_text(dir.path(), 16, "armd-0")).unwrap();
    let good = write_checkpoint(dir.path(), 16, "armd-0");
    let ckpt = dir.path().join("armd.ckpt");
    let ckpt_name = ckpt.to_str().unwrap().to_string();

    let mut tampered = good.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let mut magic = good.clone();
    magic[0] ^= 0xff;
    let other_dim = {
        let d = tempfile::tempdir().unwrap();
        write_checkpoint(d.path(), 8, "armd-0")
    };
    let other_instance = {
        let d = tempfile::tempdir().unwrap();
        write_checkpoint(d.path(), 16, "armd-7")
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "truncated to half",
            good[..good.len() / 2].to_vec(),
            &["unusable"],
        ),
        (
            "truncated by one byte",
            good[..good.len() - 1].to_vec(),
            &["unusable"],
        ),
        ("one bit flipped", tampered, &["unusable"]),
        ("bad magic", magic, &["unusable"]),
        ("empty file", Vec::new(), &["unusable"]),
        (
            "text garbage",
            b"{\"not\": \"a checkpoint\"}".to_vec(),
            &["unusable"],
        ),
        (
            "another dimension",
            other_dim,
            &["does not fit this configuration", "dimension"],
        ),
        (
            "another instance",
            other_instance,
            &["does not fit this configuration", "instance"],
        ),
    ];
    for (case, bytes, needles) in cases {
        std::fs::write(&ckpt, &bytes).unwrap();
        let before = snapshot(dir.path());
        let out = armd_run(&cfg_path, &[]);
        let mut want = vec![ckpt_name.as_str()];
        want.extend_from_slice(needles);
        assert_refused(case, &out, &want, dir.path(), &before);
    }

    // A checkpoint path that is a directory cannot be read either.
    std::fs::remove_file(&ckpt).unwrap();
    std::fs::create_dir(&ckpt).unwrap();
    let before = snapshot(dir.path());
    let out = armd_run(&cfg_path, &[]);
    assert_refused(
        "checkpoint is a directory",
        &out,
        &[&ckpt_name],
        dir.path(),
        &before,
    );
    std::fs::remove_dir(&ckpt).unwrap();

    // A good checkpoint and no broker: armd waits for Kafka (alive, not ready, saying why) instead of
    // exiting, and a SIGTERM while it waits exits 0 with the checkpoint exactly as it was.
    std::fs::write(&ckpt, &good).unwrap();
    let before = snapshot(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("wait.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_armd"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("ARMD__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = |path: &str| {
        let url = format!("http://127.0.0.1:{port}{path}");
        reqwest::blocking::get(url)
            .ok()
            .map(|r| r.status().as_u16())
    };
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("waiting for Kafka")
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "armd exited while waiting for the broker"
        );
        assert!(Instant::now() < deadline, "no 'waiting for Kafka' warning");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status("/healthz"), Some(200));
    assert_eq!(status("/readyz"), Some(503));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(e) = child.try_wait().unwrap() {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "armd ignored SIGTERM while waiting for Kafka"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        exit.success(),
        "exit {exit:?}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    std::fs::remove_file(&log).unwrap();
    let after = snapshot(dir.path());
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert!(
            b.0 == a.0 && b.1 == a.1 && b.2 == a.2,
            "{} was modified",
            b.0.display()
        );
    }
}
