//! Shared helpers of the Kafka integration tests: a real broker, unique topics, a synthetic response
//! stream with a golden linear reward, a simulated annotator, and `/metrics` scraping.
#![allow(dead_code)]

pub mod inprocess;
pub mod process;
pub mod replay;
pub mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use armd::daemon::config::Config;
use armd::daemon::messages::{encode_f32_b64, LabelRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

// ------------------------------------------------------------------------------------------------
// Broker

/// A broker this test binary started itself (when `ARMD_TEST_BROKERS` is unset), shared by the tests
/// that run concurrently and stopped when the last of them ends.
struct OwnBroker {
    dir: tempfile::TempDir,
    bootstrap: String,
    users: usize,
}

static OWN: Mutex<Option<OwnBroker>> = Mutex::new(None);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/kafka.sh")
}

/// A lease on a broker; dropping the last lease of a self-started broker stops it.
pub struct Broker {
    pub bootstrap: String,
    owned: bool,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let mut own = OWN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = own.as_mut() {
            b.users -= 1;
            if b.users == 0 {
                let b = own.take().expect("present");
                let _ = std::process::Command::new("bash")
                    .arg(script())
                    .arg("stop")
                    .arg(b.dir.path())
                    .status();
            }
        }
    }
}

/// `ARMD_TEST_BROKERS`, or a broker started with `.ci/kafka.sh start`. Also installs a log subscriber
/// whose output the test harness shows for failing tests (`RUST_LOG` overrides the filter).
pub fn broker() -> Broker {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "armd=info,warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
    if let Ok(b) = std::env::var("ARMD_TEST_BROKERS") {
        if !b.is_empty() {
            return Broker {
                bootstrap: b,
                owned: false,
            };
        }
    }
    let mut own = OWN.lock().unwrap_or_else(|p| p.into_inner());
    if own.is_none() {
        let dir = tempfile::Builder::new()
            .prefix("armd-test-kafka")
            .tempdir()
            .expect("temp dir");
        let out = std::process::Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run .ci/kafka.sh");
        assert!(
            out.status.success(),
            "cannot start a Kafka broker with .ci/kafka.sh (set ARMD_TEST_BROKERS to use another):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string();
        *own = Some(OwnBroker {
            dir,
            bootstrap,
            users: 0,
        });
    }
    let b = own.as_mut().expect("started");
    b.users += 1;
    Broker {
        bootstrap: b.bootstrap.clone(),
        owned: true,
    }
}

static TOPIC_SEQ: AtomicU64 = AtomicU64::new(0);

/// Topic names unique to one test run.
pub struct Topics {
    pub responses: String,
    pub requests: String,
    pub labels: String,
    pub models: String,
    pub dead_letter: String,
}

/// An admin client for `bootstrap` and a runtime to wait on its futures.
pub fn admin(bootstrap: &str) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (admin, rt)
}

/// Names for the five topics of one test, unique to this run (nothing is created).
pub fn topic_names(name: &str) -> Topics {
    let n = TOPIC_SEQ.fetch_add(1, Ordering::Relaxed);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("t{}-{n}-{stamp}.{name}", std::process::id());
    Topics {
        responses: format!("{prefix}.responses"),
        requests: format!("{prefix}.requests"),
        labels: format!("{prefix}.labels"),
        models: format!("{prefix}.models"),
        dead_letter: format!("{prefix}.dead-letter"),
    }
}

/// Creates the five topics of one test (responses and labels with 2 partitions).
pub fn create_topics(bootstrap: &str, name: &str) -> Topics {
    create_topics_with(bootstrap, name, 2)
}

/// [`create_topics`] with `responses_partitions` responses partitions.
pub fn create_topics_with(bootstrap: &str, name: &str, responses_partitions: i32) -> Topics {
    let t = topic_names(name);
    let (admin, rt) = admin(bootstrap);
    let new = [
        NewTopic::new(
            &t.responses,
            responses_partitions,
            TopicReplication::Fixed(1),
        ),
        NewTopic::new(&t.requests, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&t.labels, 2, TopicReplication::Fixed(1)),
        NewTopic::new(&t.models, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&t.dead_letter, 1, TopicReplication::Fixed(1)),
    ];
    let results = rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
    t
}

/// Deletes the topics of [`create_topics`] (the benches' topics hold gigabytes).
pub fn delete_topics(bootstrap: &str, t: &Topics) {
    let (admin, rt) = admin(bootstrap);
    let names = [
        t.responses.as_str(),
        t.requests.as_str(),
        t.labels.as_str(),
        t.models.as_str(),
        t.dead_letter.as_str(),
    ];
    let results = rt
        .block_on(admin.delete_topics(&names, &AdminOptions::new()))
        .expect("delete topics");
    for r in results {
        if let Err((topic, e)) = r {
            eprintln!("cannot delete topic {topic}: {e}");
        }
    }
}

/// A daemon configuration for a test (small dimension, fast cadences).
pub fn config_text(
    bootstrap: &str,
    t: &Topics,
    state: &Path,
    dim: usize,
    instance: &str,
) -> String {
    format!(
        r#"
[daemon]
instance_id = "{instance}"
[kafka]
brokers = "{bootstrap}"
group_id = "{instance}-{resp}"
stats_interval_ms = 500
[kafka.topics]
responses = "{resp}"
requests = "{req}"
labels = "{lab}"
models = "{mod_}"
dead_letter = "{dlq}"
[model]
dim = {dim}
warmup_samples = 40
refit_every = 40
prior_precision = 1.0
[selection]
batch_size = 8
max_in_flight = 16
round_interval_ms = 50
min_pool = 8
candidates = "cross"
request_ttl_secs = 300
[checkpoint]
path = "{ckpt}"
every_labels = 15
every_secs = 1
[export]
dir = "{export}"
every_labels = 10
[http]
listen = "127.0.0.1:0"
[log]
level = "armd=info,warn"
"#,
        resp = t.responses,
        req = t.requests,
        lab = t.labels,
        mod_ = t.models,
        dlq = t.dead_letter,
        ckpt = state.join("armd.ckpt").display(),
        export = state.join("model").display(),
    )
}

pub fn config(bootstrap: &str, t: &Topics, state: &Path, dim: usize, instance: &str) -> Config {
    Config::from_toml_with_env(&config_text(bootstrap, t, state, dim, instance), &[]).unwrap()
}

// ------------------------------------------------------------------------------------------------
// Synthetic world

/// Responses with a golden reward `r(x) = w·x + noise`, embeddings with an offset and scale like LLM
/// hidden states.
pub struct World {
    pub dim: usize,
    pub golden_w: Vec<f64>,
    rng: StdRng,
    next_prompt: u64,
    /// response id → golden reward
    pub golden: Arc<Mutex<HashMap<String, f64>>>,
}

pub struct Sample {
    pub prompt: u64,
    pub response_id: String,
    pub x: Vec<f32>,
    pub reward: f64,
}

impl World {
    pub fn new(dim: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let golden_w = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        Self {
            dim,
            golden_w,
            rng,
            next_prompt: 0,
            golden: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// `n` prompts with `per` responses each (not sent anywhere).
    pub fn prompts(&mut self, n: usize, per: usize) -> Vec<Sample> {
        let mut out = Vec::new();
        for _ in 0..n {
            let p = self.next_prompt;
            self.next_prompt += 1;
            let centre: Vec<f32> = (0..self.dim)
                .map(|_| self.rng.random_range(-1.0f32..1.0))
                .collect();
            for j in 0..per {
                let x: Vec<f32> = centre
                    .iter()
                    .map(|c| 20.0 + 4.0 * (c + self.rng.random_range(-1.0f32..1.0)))
                    .collect();
                let reward = x
                    .iter()
                    .zip(&self.golden_w)
                    .map(|(a, b)| f64::from(*a) * b)
                    .sum::<f64>()
                    + 0.1 * self.rng.random_range(-1.0..1.0);
                let response_id = format!("p{p}-r{j}");
                self.golden
                    .lock()
                    .unwrap()
                    .insert(response_id.clone(), reward);
                out.push(Sample {
                    prompt: p,
                    response_id,
                    x,
                    reward,
                });
            }
        }
        out
    }
}

pub fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

pub fn send(p: &BaseProducer, topic: &str, key: &str, payload: &[u8]) {
    let mut rec = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                p.poll(Duration::from_millis(50));
            }
        }
    }
}

/// Sends samples as response messages, alternating base64 and JSON-array embeddings.
pub fn send_responses(bootstrap: &str, topic: &str, samples: &[Sample]) {
    let p = producer(bootstrap);
    for (i, s) in samples.iter().enumerate() {
        let mut m = serde_json::json!({
            "schema": "armd.response.v1",
            "prompt_id": format!("p{}", s.prompt),
            "response_id": s.response_id,
            "metadata": {"i": i},
        });
        if i % 2 == 0 {
            m["embedding_b64"] = encode_f32_b64(&s.x).into();
        } else {
            m["embedding"] = serde_json::to_value(&s.x).unwrap();
        }
        send(
            &p,
            topic,
            &format!("p{}", s.prompt),
            m.to_string().as_bytes(),
        );
    }
    p.flush(Duration::from_secs(30)).expect("flush responses");
}

// ------------------------------------------------------------------------------------------------
// Annotator

/// A simulated annotator: answers each request with a Bernoulli draw on the golden reward gap.
pub struct Annotator {
    stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    /// (request, y) per label sent, in send order.
    pub log: Arc<Mutex<Vec<(LabelRequest, f64)>>>,
    handle: Option<JoinHandle<()>>,
}

impl Annotator {
    pub fn start(
        bootstrap: &str,
        requests: &str,
        labels: &str,
        golden: Arc<Mutex<HashMap<String, f64>>>,
        beta: f64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("annotator-{requests}"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("annotator consumer");
        consumer.subscribe(&[requests]).expect("subscribe");
        let producer = producer(bootstrap);
        let labels = labels.to_string();
        let handle = {
            let (stop, sent, log) = (stop.clone(), sent.clone(), log.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(99);
                let mut seen = std::collections::HashSet::new();
                while !stop.load(Ordering::Relaxed) {
                    producer.poll(Duration::ZERO);
                    let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Some(payload) = msg.payload() else {
                        continue;
                    };
                    let req: LabelRequest = serde_json::from_slice(payload).expect("request json");
                    if !seen.insert(req.request_id.clone()) {
                        continue; // redelivered after a rebalance
                    }
                    let g = golden.lock().unwrap();
                    let gap = g[&req.a.response_id] - g[&req.b.response_id];
                    drop(g);
                    let y = if rng.random::<f64>() < 1.0 / (1.0 + (-beta * gap).exp()) {
                        1.0
                    } else {
                        0.0
                    };
                    let label = serde_json::json!({
                        "schema": "armd.label.v1",
                        "request_id": req.request_id,
                        "outcome": if y == 1.0 { "a" } else { "b" },
                    });
                    send(
                        &producer,
                        &labels,
                        &req.request_id,
                        label.to_string().as_bytes(),
                    );
                    log.lock().unwrap().push((req, y));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                producer
                    .flush(Duration::from_secs(30))
                    .expect("flush labels");
            })
        };
        Self {
            stop,
            sent,
            log,
            handle: Some(handle),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops and waits until every label is flushed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("annotator thread");
        }
    }
}

impl Drop for Annotator {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------------------------------
// Metrics

pub fn get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let r = client.get(url).send().ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().ok()?))
}

/// Value of one series (exact name including labels) in an exposition text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/metrics` until `series` satisfies `pred` or `timeout`; returns the last exposition text.
pub fn wait_metric(
    base: &str,
    series: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some((200, text)) = get(&format!("{base}/metrics")) {
            if metric(&text, series).is_some_and(&pred) {
                return text;
            }
            last = text;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {series}: last value {:?}",
                metric(&last, series)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Mean per-prompt Spearman between `x·w + b` and the golden rewards of `samples`.
pub fn spearman_of(weights: &[f64], bias: f64, samples: &[Sample]) -> f64 {
    let pred: Vec<f64> = samples
        .iter()
        .map(|s| {
            s.x.iter()
                .zip(weights)
                .map(|(a, b)| f64::from(*a) * b)
                .sum::<f64>()
                + bias
        })
        .collect();
    let gold: Vec<f64> = samples.iter().map(|s| s.reward).collect();
    let prompts: Vec<u64> = samples.iter().map(|s| s.prompt).collect();
    armd::evaluation::mean_prompt_spearman(&pred, &gold, &prompts)
        .unwrap()
        .mean
        .unwrap_or(0.0)
}

/// Reads the exported model: `model.json`, then the weights file it names.
pub fn exported_model(dir: &Path) -> Option<(Vec<f64>, f64, u64)> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.json")).ok()?).ok()?;
    let bytes = std::fs::read(dir.join(meta["npy_file"].as_str()?)).ok()?;
    let w: Vec<f64> = npyz::NpyFile::new(&bytes[..]).ok()?.into_vec().ok()?;
    Some((w, meta["bias"].as_f64()?, meta["labels_applied"].as_u64()?))
}

/// Whether missing external tools (promtool, Python packages) fail the tests instead of skipping them:
/// under `.ci/run` (which installs them and sets `ARMD_REQUIRE_TOOLS`) and in CI.
pub fn tools_required() -> bool {
    std::env::var_os("ARMD_REQUIRE_TOOLS").is_some() || std::env::var_os("CI").is_some()
}

/// An exposition text (a live `/metrics` scrape or the recorder's render) must pass
/// `promtool check metrics`. promtool comes from `.ci/run`; locally the check is skipped without it.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            !tools_required(),
            "promtool is required under .ci/run (ARMD_REQUIRE_TOOLS) and in CI"
        );
        eprintln!("promtool not found: skipping the exposition check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the live scrape (exit {:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
