//! The `armd` binary as a child process: a config on a free HTTP port, spawn, readiness, SIGTERM and
//! `kill -9`. A [`Armd`] left running (a failing test) is killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::get;

/// A free TCP port on 127.0.0.1 (free when this returns; the daemon binds it shortly after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rewrites a test config (`listen = "127.0.0.1:0"`) to a fixed free port, so restarts keep the URL.
/// Returns the config text and the port.
pub fn with_fixed_port(config_text: &str) -> (String, u16) {
    let port = free_port();
    let text = config_text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "the config has no `listen = \"127.0.0.1:0\"` line to rewrite"
    );
    (text, port)
}

/// What a replay-checked child-process test starts from: its topics (one labels partition, see
/// `stream::one_labels_partition`), a state directory, and a config written there with a fixed port.
pub struct ChildSetup {
    pub topics: super::Topics,
    pub state: tempfile::TempDir,
    pub config_text: String,
    pub config_path: PathBuf,
    pub port: u16,
}

/// Creates a [`ChildSetup`] for daemon `instance` on the topics named after `name`.
pub fn child_setup(bootstrap: &str, name: &str, dim: usize, instance: &str) -> ChildSetup {
    let mut topics = super::create_topics(bootstrap, name);
    super::stream::one_labels_partition(bootstrap, &mut topics);
    let state = tempfile::tempdir().unwrap();
    let (config_text, port) = with_fixed_port(&super::config_text(
        bootstrap,
        &topics,
        state.path(),
        dim,
        instance,
    ));
    let config_path = state.path().join("armd.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    ChildSetup {
        topics,
        state,
        config_text,
        config_path,
        port,
    }
}

/// Starts `armd run --config <config>`, its stderr (the log) appended to `log`. `env` is added to the
/// child's environment (e.g. `RUST_LOG`).
pub fn spawn_armd(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open the daemon log {}: {e}", log.display()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armd"));
    cmd.args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn armd")
}

/// Waits for `GET {base}/readyz` to answer 200.
pub fn wait_ready(base: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, _)) = get(&format!("{base}/readyz")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon at {base} not ready within {timeout:?}: {:?}",
            get(&format!("{base}/readyz"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `armd` child process with a fixed HTTP port.
pub struct Armd {
    child: Option<Child>,
    pub base: String,
    pub log: PathBuf,
}

impl Armd {
    pub fn spawn(config: &Path, port: u16, log: &Path, env: &[(&str, &str)]) -> Self {
        Self {
            child: Some(spawn_armd(config, log, env)),
            base: format!("http://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon was already stopped")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The daemon's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().expect("try_wait")
    }

    /// Waits for `/readyz` 200; fails with the log if the process exits first or the time runs out.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = get(&format!("{}/readyz", self.base)) {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "armd exited with {status} during start-up; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "armd not ready within {timeout:?}: {:?}; log:\n{}",
                get(&format!("{}/readyz", self.base)),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` and reap.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait after SIGKILL");
    }

    /// SIGTERM, then waits up to `timeout` for the exit status (SIGKILL and a panic past it).
    pub fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "armd did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Armd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Kafka broker one test owns (`.ci/kafka.sh start` in a temporary directory), for tests that stop
/// and restart it. Dropping it stops the broker, also when the test panics.
pub struct OwnedBroker {
    dir: tempfile::TempDir,
    pub bootstrap: String,
}

fn kafka_sh(cmd: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/kafka.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(cmd)
        .arg(dir)
        .output()
        .expect("run .ci/kafka.sh");
    assert!(
        out.status.success(),
        ".ci/kafka.sh {cmd} {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl OwnedBroker {
    /// A fresh broker on free ports.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("armd-owned-kafka")
            .tempdir()
            .expect("temp dir");
        let bootstrap = kafka_sh("start", dir.path());
        Self { dir, bootstrap }
    }

    /// Stops the broker (SIGTERM; SIGKILL after 30 s). Its data and ports are kept for [`Self::restart`].
    pub fn stop(&self) {
        kafka_sh("stop", self.dir.path());
    }

    /// Starts the stopped broker again: same ports, same data.
    pub fn restart(&self) {
        let b = kafka_sh("restart", self.dir.path());
        assert_eq!(b, self.bootstrap, "the restarted broker moved");
    }
}

impl Drop for OwnedBroker {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/kafka.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}
