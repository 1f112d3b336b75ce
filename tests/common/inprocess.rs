//! An `armd run` daemon inside the test process (its own tokio runtime and HTTP listener), and helpers the
//! fault tests share: positioned produce, dead-letter reading, topic configuration and the comparison of
//! a checkpoint's stored labels with what an annotator sent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use armd::daemon::checkpoint::Checkpoint;
use armd::daemon::config::Config;
use armd::daemon::messages::{decode_f32_b64, DeadLetter, LabelRequest};
use armd::features::Scaler;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::get;

pub struct InProcess {
    rt: tokio::runtime::Runtime,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// `http://127.0.0.1:<port>` of its HTTP listener.
    pub base: String,
}

impl InProcess {
    /// Whether the daemon task has ended (failed start-up or a fatal error).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Starts `armd run` with `cfg` on its own runtime, listening on a free local port.
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
    /// Graceful shutdown (as on SIGTERM); returns the daemon's result.
    pub fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let r = self.rt.block_on(self.handle).expect("daemon task");
        self.rt.shutdown_timeout(Duration::from_secs(5));
        r
    }

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

    /// Whether the daemon task is still running.
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }
}

/// Every message of `topic` (all partitions) from the beginning, waiting until there are at least `n`
/// or `timeout` passed; then one more short poll so a surplus message would show.
pub fn read_topic(bootstrap: &str, topic: &str, n: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// The dead letters on `topic` (at least `n`, waiting up to 20 s).
pub fn dead_letters(bootstrap: &str, topic: &str, n: usize) -> Vec<DeadLetter> {
    read_topic(bootstrap, topic, n, Duration::from_secs(20))
        .iter()
        .map(|m| serde_json::from_slice(m.payload().expect("dead letter payload")).unwrap())
        .collect()
}

/// A producer that reports where each message landed (sends are sequential, so order is kept).
pub struct Positioned {
    producer: FutureProducer,
    rt: tokio::runtime::Runtime,
}

impl Positioned {
    /// `max_message_bytes` raises the producer's limit (the topic must accept it too).
    pub fn new(bootstrap: &str, max_message_bytes: usize) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("message.max.bytes", max_message_bytes.to_string())
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self { producer, rt }
    }

    /// Sends one message (`payload` `None`: a tombstone) and returns its (partition, offset). A
    /// `timestamp_ms` sets the message's CreateTime.
    pub fn send(
        &self,
        topic: &str,
        key: &str,
        payload: Option<&[u8]>,
        timestamp_ms: Option<i64>,
    ) -> (i32, i64) {
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
        if let Some(p) = payload {
            rec = rec.payload(p);
        }
        if let Some(t) = timestamp_ms {
            rec = rec.timestamp(t);
        }
        let d = self
            .rt
            .block_on(self.producer.send(rec, Duration::from_secs(30)))
            .map_err(|(e, _)| e)
            .expect("delivered");
        (d.partition, d.offset)
    }
}

/// Sets `max.message.bytes` of `topics` (so multi-megabyte test messages are accepted by the broker).
pub fn allow_large_messages(bootstrap: &str, topics: &[&str], bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let value = bytes.to_string();
    let configs: Vec<AlterConfig<'_>> = topics
        .iter()
        .map(|t| AlterConfig::new(ResourceSpecifier::Topic(t)).set("max.message.bytes", &value))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for r in rt
        .block_on(admin.alter_configs(&configs, &AdminOptions::new()))
        .expect("alter configs")
    {
        r.expect("max.message.bytes set");
    }
}

/// Compares the labels stored in a checkpoint with `sent` (request, y) pairs as multisets of the scaled
/// difference vector and outcome (bit-exact). Returns a description of the difference, if any.
pub fn stored_labels_differ(ck: &Checkpoint, sent: &[(LabelRequest, f64)]) -> Option<String> {
    let s = ck
        .scaler
        .as_ref()
        .expect("a checkpoint with labels has a frozen scaler");
    let scaler = Scaler::from_parts(s.mean.clone(), s.inv_std.clone(), s.scaling).unwrap();
    let key = |v: &[f64], y: f64| {
        let mut k: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
        k.push(y.to_bits());
        k
    };
    let mut want: HashMap<Vec<u64>, i64> = HashMap::new();
    for (req, y) in sent {
        let side = |b64: &str| {
            scaler
                .transform_vec(&decode_f32_b64("embedding_b64", b64).unwrap())
                .unwrap()
        };
        let (xa, xb) = (side(&req.a.embedding_b64), side(&req.b.embedding_b64));
        let v: Vec<f64> = xa.iter().zip(&xb).map(|(p, q)| p - q).collect();
        *want.entry(key(&v, *y)).or_default() += 1;
    }
    for l in &ck.posterior.labels {
        *want.entry(key(&l.v, l.y)).or_default() -= 1;
    }
    let missing: i64 = want.values().filter(|&&c| c > 0).sum();
    let extra: i64 = -want.values().filter(|&&c| c < 0).sum::<i64>();
    (missing != 0 || extra != 0).then(|| {
        format!(
            "{} labels sent, {} stored: {missing} sent but not stored, {extra} stored but not sent (or twice)",
            sent.len(),
            ck.posterior.labels.len()
        )
    })
}
