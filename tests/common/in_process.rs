//! The daemon run in-process (`armd::daemon::run_with_listener` on its own tokio runtime, HTTP on a free
//! port): tests and the daemon bench drive it and read its `/metrics`.

use std::time::{Duration, Instant};

use armd::daemon::config::Config;

use super::get;

/// A running in-process daemon.
pub struct InProcess {
    pub rt: tokio::runtime::Runtime,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub base: String,
}

pub fn start_in_process(cfg: Config) -> InProcess {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = rt.spawn(armd::daemon::run_with_listener(cfg, listener, async move {
        let _ = rx.await;
    }));
    InProcess {
        rt,
        handle,
        stop,
        base,
    }
}

impl InProcess {
    pub fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let r = self.rt.block_on(self.handle).expect("daemon task");
        self.rt.shutdown_timeout(Duration::from_secs(5));
        r
    }
}

impl InProcess {
    /// Waits for /readyz; if the daemon stopped instead, fails with its error.
    pub fn wait_ready(self, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = get(&format!("{}/readyz", self.base)) {
                return self;
            }
            if self.handle.is_finished() {
                let r = self.rt.block_on(self.handle).expect("daemon task");
                panic!("daemon stopped during start-up: {r:?}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
