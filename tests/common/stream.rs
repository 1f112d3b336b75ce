//! A steady labelled stream for fault tests: responses keep arriving ([`Feeder`]) and an annotator
//! answers each request after a random delay ([`SlowAnnotator`]), so that at any moment some requests
//! are in flight and labels keep arriving while the daemon is down.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use armd::daemon::messages::{encode_f32_b64, LabelRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;

use super::{metric, producer, send, wait_metric, Topics, World};

/// Replaces `t.labels` with a new topic of ONE partition (the replay checker needs the topic order to be
/// the applied order; see `replay`). The two-partition labels topic of `create_topics` stays unused.
pub fn one_labels_partition(bootstrap: &str, t: &mut Topics) {
    let name = format!("{}-1p", t.labels);
    let (admin, rt) = super::admin(bootstrap);
    let new = [NewTopic::new(&name, 1, TopicReplication::Fixed(1))];
    for r in rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create the labels topic")
    {
        r.expect("labels topic created");
    }
    t.labels = name;
}

/// Sends `per` responses of one new prompt every `every` until stopped.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Feeder {
    pub fn start(
        bootstrap: &str,
        topic: &str,
        mut world: World,
        per: usize,
        every: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (stop, bootstrap, topic) = (stop.clone(), bootstrap.to_string(), topic.to_string());
            std::thread::spawn(move || {
                // One long-lived producer that never gives up: while the broker is down, messages wait in
                // its queue (librdkafka's default message timeout is 5 minutes).
                let p = producer(&bootstrap);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    for s in world.prompts(1, per) {
                        let m = serde_json::json!({
                            "schema": "armd.response.v1",
                            "prompt_id": format!("p{}", s.prompt),
                            "response_id": s.response_id,
                            "embedding_b64": encode_f32_b64(&s.x),
                        });
                        send(&p, &topic, &s.response_id, m.to_string().as_bytes());
                        sent += 1;
                    }
                    p.poll(Duration::ZERO);
                    std::thread::sleep(every);
                }
                let _ = p.flush(Duration::from_secs(60));
                sent
            })
        };
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns how many responses were sent.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| join_quietly(h, "feeder").unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An annotator that answers each request (once per request id) after a delay drawn from `delay`, with
/// a Bernoulli draw on the golden reward gap. On [`SlowAnnotator::stop`] it answers every request it
/// has read at once and flushes.
pub struct SlowAnnotator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    /// Requests whose id starts with this prefix are answered only once it is cleared ([`Self::hold`]).
    hold: Arc<Mutex<Option<String>>>,
    /// How many answers are being held back.
    held: Arc<AtomicU64>,
    /// `(request id, y)` per label sent, in send order.
    pub log: Arc<Mutex<Vec<(String, f64)>>>,
    handle: Option<JoinHandle<()>>,
}

impl SlowAnnotator {
    pub fn start(
        bootstrap: &str,
        t: &Topics,
        golden: Arc<Mutex<HashMap<String, f64>>>,
        delay: Range<Duration>,
        seed: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let hold: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let held = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("slow-annotator-{}", t.requests))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("annotator consumer");
        consumer.subscribe(&[&t.requests]).expect("subscribe");
        let producer = producer(bootstrap);
        let labels = t.labels.clone();
        let handle = {
            let (stop, sent, log) = (stop.clone(), sent.clone(), log.clone());
            let (hold, held) = (hold.clone(), held.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut seen = HashSet::new();
                // (due, request id, y)
                let mut queue: Vec<(Instant, String, f64)> = Vec::new();
                let answer = |id: &str, y: f64| {
                    let label = serde_json::json!({
                        "schema": "armd.label.v1",
                        "request_id": id,
                        "outcome": if y == 1.0 { "a" } else { "b" },
                    });
                    send(&producer, &labels, id, label.to_string().as_bytes());
                    log.lock().unwrap().push((id.to_string(), y));
                    sent.fetch_add(1, Ordering::Relaxed);
                };
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    let now = Instant::now();
                    let prefix = hold.lock().unwrap().clone().filter(|_| !stopping);
                    let held_back = |id: &str| prefix.as_deref().is_some_and(|p| id.starts_with(p));
                    // Held answers go last and wait; the others are sorted by due time.
                    queue.sort_by_key(|q| (held_back(&q.1), q.0));
                    let due =
                        queue.partition_point(|q| !held_back(&q.1) && (stopping || q.0 <= now));
                    for (_, id, y) in queue.drain(..due) {
                        answer(&id, y);
                    }
                    held.store(
                        queue.iter().filter(|q| held_back(&q.1)).count() as u64,
                        Ordering::Relaxed,
                    );
                    if stopping {
                        break;
                    }
                    producer.poll(Duration::ZERO);
                    let Some(Ok(msg)) = consumer.poll(Duration::from_millis(20)) else {
                        continue;
                    };
                    let Some(payload) = msg.payload() else {
                        continue;
                    };
                    let req: LabelRequest = serde_json::from_slice(payload).expect("request json");
                    if !seen.insert(req.request_id.clone()) {
                        continue; // re-published or redelivered: already answered
                    }
                    let g = golden.lock().unwrap();
                    let gap = g[&req.a.response_id] - g[&req.b.response_id];
                    drop(g);
                    let y = if rng.random::<f64>() < 1.0 / (1.0 + (-gap).exp()) {
                        1.0
                    } else {
                        0.0
                    };
                    let wait = rng.random_range(delay.clone());
                    queue.push((Instant::now() + wait, req.request_id, y));
                }
                producer
                    .flush(Duration::from_secs(60))
                    .expect("flush labels");
            })
        };
        Self {
            stop,
            sent,
            hold,
            held,
            log,
            handle: Some(handle),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Holds back the answers to requests whose id starts with `prefix` (`None`: answer them again, at
    /// once when due).
    pub fn hold(&self, prefix: Option<&str>) {
        *self.hold.lock().unwrap() = prefix.map(str::to_string);
    }

    /// Answers held back now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Answers what it has read, flushes and stops.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            join_quietly(h, "annotator");
        }
    }
}

impl Drop for SlowAnnotator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Joins a helper thread; its panic is re-raised unless this thread is already panicking (a drop during
/// a failing test must not abort the process).
fn join_quietly<T>(h: JoinHandle<T>, what: &str) -> Option<T> {
    match h.join() {
        Ok(v) => Some(v),
        Err(_) if std::thread::panicking() => None,
        Err(_) => panic!("the {what} thread panicked"),
    }
}

/// Stops the response stream and the annotator, waits until the daemon at `base` applied every label
/// the annotator sent, and asserts the count is exactly that (none lost, none twice). Returns the number
/// sent and the last `/metrics` text.
pub fn stop_and_wait_until_all_applied(
    base: &str,
    feeder: &mut Feeder,
    annotator: &mut SlowAnnotator,
) -> (u64, String) {
    feeder.stop();
    annotator.stop();
    let sent = annotator.sent();
    (sent, wait_all_applied(base, sent))
}

/// Waits until the daemon at `base` applied `sent` labels and asserts it applied exactly that many (none
/// lost, none twice); returns the `/metrics` text.
pub fn wait_all_applied(base: &str, sent: u64) -> String {
    let text = wait_metric(
        base,
        "armd_model_labels_applied",
        Duration::from_secs(60),
        |v| v >= sent as f64,
    );
    assert_eq!(
        metric(&text, "armd_model_labels_applied"),
        Some(sent as f64),
        "{base}: labels applied vs sent"
    );
    text
}

/// A [`Feeder`] (4 responses per prompt every 100 ms) and a [`SlowAnnotator`] answering after a delay
/// drawn from `delay`, on one synthetic world: the labelled stream most fault tests run under.
pub fn labelled_stream(
    bootstrap: &str,
    t: &Topics,
    dim: usize,
    seed: u64,
    delay: Range<Duration>,
) -> (Feeder, SlowAnnotator) {
    let world = World::new(dim, seed);
    let golden = world.golden.clone();
    let feeder = Feeder::start(
        bootstrap,
        &t.responses,
        world,
        4,
        Duration::from_millis(100),
    );
    let annotator = SlowAnnotator::start(bootstrap, t, golden, delay, seed ^ 0x5eed);
    (feeder, annotator)
}
