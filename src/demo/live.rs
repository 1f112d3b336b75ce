//! `armd demo --label-studio URL`: the demo with a person answering armd's requests in Label Studio.
//!
//! ```text
//! synthetic generator ──► armd.responses ──► armd (strategy) ──► armd.requests ──► armd-labelstudio ──► Label Studio
//!   (each response's metadata states its hidden                                     (child process)       ▲ a person
//!    quality score, so a person can judge it)    ▲                                                        │
//!                                                 └───────── armd.labels ◄──────── armd-labelstudio ◄──────┘
//! armd.models ──► held-out Spearman of each snapshot vs the golden reward ──► progress, summary, SVG
//! ```
//!
//! Only the strategy instance runs (people label only armd's requests) and no simulated annotator
//! answers. Each synthetic response carries `metadata.text` ("Synthetic response p3-r7. Its hidden
//! quality score is 0.73 (higher is better).") and `metadata.prompt` (what to do), so a person who picks
//! the higher score teaches armd the golden reward: a demo of the loop, not of text quality.
//!
//! The bridge is started against the mock cluster's bootstrap servers and the demo's topics, with its
//! state in `<out_dir>/state/labelstudio` and a project of its own per run; its output is copied to
//! stderr, prefixed. The run stops when armd has applied `run.label_budget` labels or on Ctrl-C (SIGINT);
//! `run.timeout_secs` does not apply (a person sets the pace). The summary has armd's curve only.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use super::*;

/// Where the bridge's output lines are prefixed with on stderr.
const PREFIX: &str = "[armd-labelstudio]";

/// `armd demo --label-studio ...` settings.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Label Studio base URL.
    pub url: String,
    /// API key handed to the bridge (in its environment, not on its command line).
    pub token: String,
    /// The bridge command: a name looked up on PATH, or a path.
    pub bridge: String,
}

/// The text a person sees for one synthetic response.
pub(crate) fn response_text(response_id: &str, reward: f64) -> String {
    format!("Synthetic response {response_id}. Its hidden quality score is {reward:.2} (higher is better).")
}

/// The prompt a person sees above a synthetic response.
pub(crate) fn prompt_text(prompt_id: &str) -> String {
    format!(
        "Synthetic prompt {prompt_id} (armd demo: the responses are not real text, each states its \
         hidden quality score). Choose the response with the higher score; Tie only if they are equal."
    )
}

/// The bridge command as a path, when it exists and is executable.
fn find_command(cmd: &str) -> Option<PathBuf> {
    fn executable(p: &Path) -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        }
        #[cfg(not(unix))]
        {
            p.is_file()
        }
    }
    if cmd.contains(std::path::MAIN_SEPARATOR) || cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(cmd))
        .find(|p| executable(p))
}

fn not_found(cmd: &str) -> anyhow::Error {
    anyhow!(
        "the Label Studio bridge command {cmd:?} was not found{}. Install it with \
         `pip install ./integrations/labelstudio` (Python >= 3.10; from the armd repository), or use \
         the virtual environment integrations/labelstudio/ci.sh makes: \
         --label-studio-bridge ~/.cache/armd/labelstudio-venv/bin/armd-labelstudio",
        if cmd.contains('/') { "" } else { " on PATH" }
    )
}

/// A project title of its own for each run (UTC time), so no task of an earlier run is in its queue.
fn project_title() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "armd demo {year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The bridge child process: output copied to stderr, killed when dropped.
struct Bridge {
    child: Child,
    project_url: Arc<Mutex<Option<String>>>,
    pumps: Vec<JoinHandle<()>>,
}

impl Bridge {
    fn spawn(live: &LiveOptions, path: &Path, args: &[String]) -> Result<Self> {
        let mut cmd = Command::new(path);
        cmd.args(args)
            .env("LABEL_STUDIO_API_KEY", &live.token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C in the terminal reaches the demo, which stops the bridge.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_found(&live.bridge))
            }
            Err(e) => return Err(anyhow!("cannot start {}: {e}", path.display())),
        };
        let project_url = Arc::new(Mutex::new(None));
        let mut pumps = Vec::new();
        let outs: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ];
        for out in outs {
            let url = project_url.clone();
            pumps.push(
                std::thread::Builder::new()
                    .name("demo-bridge-log".into())
                    .spawn(move || {
                        for line in BufReader::new(out).lines() {
                            let Ok(line) = line else { break };
                            eprintln!("{PREFIX} {line}");
                            // "project 5: http://host:8080/projects/5/data (annotators: ...)"
                            if line.contains("project ") && line.contains("/projects/") {
                                if let Some(i) = line.find("http") {
                                    let u = line[i..].split_whitespace().next().unwrap_or("");
                                    *url.lock().expect("not poisoned") = Some(u.to_string());
                                }
                            }
                        }
                    })
                    .context("cannot start a thread")?,
            );
        }
        Ok(Self {
            child,
            project_url,
            pumps,
        })
    }

    fn project_url(&self) -> Option<String> {
        self.project_url.lock().expect("not poisoned").clone()
    }

    /// SIGTERM (the bridge stops cleanly), then SIGKILL after 10 s.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            #[cfg(unix)]
            {
                let _ = Command::new("kill")
                    .args(["-TERM", &self.child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts the `armd.label.v1` messages on the labels topic (what the bridge sent).
struct LabelCounter {
    consumer: BaseConsumer,
    count: u64,
}

impl LabelCounter {
    fn new(brokers: &str, topic: &str, partitions: i32) -> Result<Self> {
        let consumer = watch_consumer(brokers, topic, partitions)?;
        Ok(Self { consumer, count: 0 })
    }

    fn drain(&mut self) -> u64 {
        while let Some(Ok(m)) = self.consumer.poll(Duration::ZERO) {
            let is_label = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .is_some_and(|v| v.get("schema").and_then(|s| s.as_str()) == Some("armd.label.v1"));
            self.count += u64::from(is_label);
        }
        self.count
    }
}

/// Runs the live demo (see the module doc) and writes its outputs to `cfg.run.out_dir`.
pub fn run(cfg: &DemoConfig, live: &LiveOptions, progress: bool) -> Result<DemoReport> {
    cfg.validate()?;
    // Fail at once when the bridge cannot run.
    let bridge_path = find_command(&live.bridge).ok_or_else(|| not_found(&live.bridge))?;
    if live.token.trim().is_empty() {
        bail!(
            "live mode needs a Label Studio API key: --label-studio-token TOKEN or LS_API_TOKEN \
             (Label Studio > Account & Settings > Personal Access Token)"
        );
    }
    let started = Instant::now();
    let say = |msg: String| {
        if progress {
            eprintln!("{msg}");
        }
    };

    let rt = runtime()?;
    // Ctrl-C (SIGINT) ends the run with the usual summary.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Registered here, before anything else starts (the handler exists once the stream does).
        #[cfg(unix)]
        let mut sigint = {
            let _guard = rt.enter();
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("cannot handle SIGINT")?
        };
        rt.spawn(async move {
            #[cfg(unix)]
            let got = sigint.recv().await.is_some();
            #[cfg(not(unix))]
            let got = tokio::signal::ctrl_c().await.is_ok();
            if got {
                flag.store(true, Ordering::Relaxed);
            }
        });
    }

    let data = synthetic(cfg)?;
    let (stream, held_out, golden) = split(cfg, &data);
    say(format!(
        "armd demo (live, Label Studio at {}): {} prompts × {} responses (dim {}), {} streamed responses, {} held-out prompts",
        live.url,
        cfg.data.n_prompts,
        cfg.data.responses_per_prompt,
        cfg.data.dim,
        stream.len(),
        cfg.held_out_prompts()
    ));

    let name = "armd";
    let labels_partitions = 2;
    let (cluster, brokers) = embedded_kafka(&[name], labels_partitions)?;
    say(format!(
        "embedded Kafka (librdkafka mock cluster) at {brokers}"
    ));

    let state = fresh_state(&cfg.run.out_dir)?;

    // The strategy instance only.
    let strategy = cfg.daemon.strategy.clone();
    let mut inst = start_instance(&rt, cfg, &brokers, (name, strategy, 0), &state)?;
    say(format!(
        "{name:>6}: strategy {}, metrics at {}",
        inst.strategy, inst.url
    ));

    // The bridge, on the demo's topics.
    let bridge_state = state.join("labelstudio");
    let title = project_title();
    let args: Vec<String> = [
        "--brokers",
        &brokers,
        "--requests-topic",
        &format!("{name}.requests"),
        "--labels-topic",
        &format!("{name}.labels"),
        "--group",
        "armd-demo-labelstudio",
        "--ls-url",
        &live.url,
        "--project-title",
        &title,
        "--state-dir",
        &bridge_state.display().to_string(),
        "--poll-interval",
        "1",
        "--kafka-setting",
        "fetch.wait.max.ms=100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    say(format!(
        "starting the bridge: {} (project {title:?}, state in {})",
        bridge_path.display(),
        bridge_state.display()
    ));
    let mut bridge = Bridge::spawn(live, &bridge_path, &args)?;
    let mut labels = LabelCounter::new(&brokers, &format!("{name}.labels"), labels_partitions)?;

    // The responses, with texts a person can judge.
    let producer = producer(&brokers)?;
    for s in &stream {
        let reward = golden.get(&s.response_id).copied().unwrap_or(0.0);
        let msg = serde_json::json!({
            "schema": "armd.response.v1",
            "prompt_id": s.prompt_id,
            "response_id": s.response_id,
            "embedding_b64": encode_f32_b64(&s.x),
            "metadata": {
                "prompt": prompt_text(&s.prompt_id),
                "text": response_text(&s.response_id, reward),
            },
        })
        .to_string();
        send(&producer, &format!("{name}.responses"), &s.prompt_id, &msg);
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| anyhow!("cannot produce the responses: {e}"))?;
    let budget = cfg.run.label_budget;
    say(format!(
        "streamed {} responses; answer armd's requests in Label Studio until {budget} labels are applied (Ctrl-C stops earlier)",
        stream.len()
    ));

    // Watch until the budget is applied, Ctrl-C, or the bridge or the daemon stops.
    let mut shown_url = false;
    let mut last_line = String::new();
    let mut last_print = Instant::now();
    let mut failure: Option<anyhow::Error> = None;
    loop {
        drain_models(&mut inst, &held_out, Duration::from_millis(20));
        if let Some(text) = scrape(&inst.url) {
            inst.applied = metric(&text, "armd_labels_applied_total").unwrap_or(0.0) as u64;
            inst.accuracy = metric(&text, "armd_prequential_accuracy_ratio");
        }
        let sent = labels.drain();
        if !shown_url {
            if let Some(u) = bridge.project_url() {
                say(format!(
                    "Label Studio project: {u}  (open it, press \"Label All Tasks\", pick the higher score)"
                ));
                shown_url = true;
            }
        }
        if progress {
            let rho = inst.curve.last().map(|p| p.1);
            let key = format!("{} {sent} {rho:?}", inst.applied);
            if key != last_line || last_print.elapsed() >= Duration::from_secs(30) {
                eprintln!(
                    "{}  (labels from Label Studio {sent})",
                    progress_line(started, budget, std::slice::from_ref(&inst))
                );
                last_line = key;
                last_print = Instant::now();
            }
        }
        if inst.applied >= budget {
            say(format!(
                "label budget reached: armd applied {} labels",
                inst.applied
            ));
            break;
        }
        if interrupted.load(Ordering::Relaxed) {
            say(format!(
                "Ctrl-C: stopping at {} labels applied",
                inst.applied
            ));
            break;
        }
        if let Ok(Some(status)) = bridge.child.try_wait() {
            failure = Some(anyhow!(
                "the Label Studio bridge exited ({status}); its output is above, prefixed {PREFIX}"
            ));
            break;
        }
        if inst.handle.as_ref().is_some_and(|h| h.is_finished()) {
            break; // the daemon stopped on its own: its error is reported below
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Shutdown: the bridge first (no more labels), then the daemon (exports its final model).
    bridge.stop();
    if let Some(stop) = inst.stop.take() {
        let _ = stop.send(());
    }
    let handle = inst.handle.take().expect("the daemon is stopped once");
    rt.block_on(handle)
        .context("daemon task panicked")?
        .context("the armd daemon failed")?;
    if let Some(e) = failure {
        return Err(e);
    }
    drain_models(&mut inst, &held_out, Duration::from_millis(300));
    if let Some(snap) = read_export(&inst.export_dir) {
        record(&mut inst, &held_out, snap);
    }
    let sent = labels.drain();
    let project_url = bridge.project_url();
    let last = inst.last.as_ref();
    let run = RunResult {
        name: inst.name.to_string(),
        strategy: inst.strategy.clone(),
        labels_applied: last.map_or(0, |s| s.labels_applied),
        labels_sent: sent,
        prequential_accuracy: last.and_then(|s| s.prequential.accuracy),
        final_spearman: inst.curve.last().map_or(0.0, |p| p.1),
        curve: inst.curve,
    };
    let metrics_url = inst.url;
    rt.shutdown_timeout(Duration::from_secs(5));
    // Every client goes before the cluster (else librdkafka logs connection errors).
    drop((labels, inst.models, producer));
    drop(cluster);

    let wall = started.elapsed();
    let mut summary = summary_table(std::slice::from_ref(&run), wall, false);
    summary.push_str(&format!(
        "\nlive mode: labels answered in Label Studio ({}); no random baseline\n\
         labels applied by armd: {} of {budget}{}\n",
        project_url.as_deref().unwrap_or(&live.url),
        run.labels_applied,
        if interrupted.load(Ordering::Relaxed) {
            " (stopped by Ctrl-C)"
        } else {
            ""
        }
    ));
    write_outputs(cfg, vec![run], summary, metrics_url, wall, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_state_the_score_and_the_task() {
        assert_eq!(
            response_text("p3-r7", 0.734),
            "Synthetic response p3-r7. Its hidden quality score is 0.73 (higher is better)."
        );
        assert!(prompt_text("p3").contains("higher score"));
    }

    #[test]
    fn missing_bridge_is_reported_with_how_to_install_it() {
        assert!(find_command("armd-labelstudio-does-not-exist").is_none());
        assert!(find_command("/nonexistent/armd-labelstudio").is_none());
        assert!(find_command("sh").is_some());
        let msg = not_found("armd-labelstudio").to_string();
        assert!(
            msg.contains("pip install ./integrations/labelstudio"),
            "{msg}"
        );
    }

    #[test]
    fn project_title_has_a_utc_date() {
        let t = project_title();
        assert!(t.starts_with("armd demo 20") && t.ends_with(" UTC"), "{t}");
    }
}
