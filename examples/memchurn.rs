//! Memory experiment: the engine's allocation pattern (responses from another thread, selection rounds,
//! labels, background refits and checkpoints) at full speed, without Kafka, printing RSS next to glibc's
//! own accounting (in-use vs free-but-retained arena bytes).
//!
//!   cargo run --release --example memchurn -- SECONDS
//!   env: MEMCHURN_GLIBC_DEFAULTS=1 (skip `daemon::alloc::fix_mmap_threshold`, as armd did before),
//!        MEMCHURN_TRIM=1 (`malloc_trim(0)` after every round), glibc's MALLOC_* variables.
//!
//! Measured (2 cores, d = 768, max_labels = 2000, refit_every = 250): glibc defaults: RSS 6.47 GB after
//! 35 s and flat afterwards, 80 MB in use and 6.4 GB free in the arenas; with the fixed threshold: RSS
//! about 100 MB throughout. The price is fresh pages for every large block: round p50 125-150 ms with the
//! fixed threshold vs 113 ms with the defaults (idle machine; 192-204 vs 122-146 ms with a soak running).

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use armd::daemon::alloc::malloc_stats;
use armd::daemon::config::Config;
use armd::daemon::engine::{Engine, Output};
use armd::daemon::input::LabelInput;
use armd::daemon::messages::{LabelMsg, Response, SourcePosition};
use armd::daemon::telemetry::Telemetry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_CONFIG: &str = include_str!("../config/armd.toml");

extern "C" {
    fn malloc_trim(pad: usize) -> i32;
}

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1048576.0
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let trim = std::env::var("MEMCHURN_TRIM").is_ok();
    if std::env::var("MEMCHURN_GLIBC_DEFAULTS").is_err() {
        eprintln!(
            "fixed mmap threshold: {}",
            armd::daemon::alloc::fix_mmap_threshold()
        );
    }
    let dir = std::env::temp_dir().join(format!("memchurn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("armd.ckpt");
    let cfg = Config::from_toml_with_env(
        DEFAULT_CONFIG,
        &[
            ("ARMD__MODEL__DIM", "768"),
            ("ARMD__MODEL__MAX_LABELS", "2000"),
            ("ARMD__MODEL__REFIT_EVERY", "250"),
        ],
    )
    .expect("config");
    let d = 768;
    let mut engine = Engine::new(Arc::new(cfg), Telemetry::new().metrics, None).expect("engine");
    // Responses are decoded on another thread, as in the daemon.
    let (tx, rx) = sync_channel::<Response>(8192);
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(5);
        for i in 0usize.. {
            let r = Response {
                prompt_id: format!("p{}", i / 4).into(),
                response_id: format!("p{}-r{}", i / 4, i % 4).into(),
                embedding: (0..d)
                    .map(|_| 20.0 + 4.0 * rng.random_range(-1.0f32..1.0))
                    .collect(),
                metadata: None,
            };
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    let mut rng = StdRng::seed_from_u64(7);
    let mut now: i64 = 1_000_000;
    let mut offset = 0i64;
    let mut pending: Vec<String> = Vec::new();
    let mut writer: Option<std::thread::JoinHandle<()>> = None;
    let start = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_labels_ck = 0u64;
    let mut round_secs: Vec<f64> = Vec::new();
    println!("t_s,labels,stored,rss_mb,inuse_arena_mb,free_arena_mb,mmapped_mb");
    while start.elapsed().as_secs() < secs {
        // ~100 responses per round (200/s at 2 rounds/s).
        for _ in 0..100 {
            let r = rx.recv().unwrap();
            engine.on_response(r, now);
        }
        engine.adopt_own_proposal(now);
        // Label the previous round's requests.
        for id in pending.drain(..) {
            let pos = SourcePosition {
                topic: "labels".into(),
                partition: 0,
                offset,
            };
            offset += 1;
            let label = LabelMsg {
                request_id: id,
                y: if rng.random::<bool>() { 1.0 } else { 0.0 },
                annotator_id: None,
            };
            engine.on_label(
                LabelInput {
                    decoded: Ok(label),
                    payload: None,
                    pos,
                    timestamp_ms: now,
                    read_at_ms: now,
                },
                now,
            );
        }
        engine.poll_refit();
        now += 600;
        let t = Instant::now();
        if engine.maybe_round(now) > 0 {
            round_secs.push(t.elapsed().as_secs_f64());
        }
        for o in engine.take_outputs() {
            if let Output::Request(r) = o {
                let json = serde_json::to_vec(&r).unwrap();
                std::hint::black_box(&json);
                pending.push(r.request_id.clone());
            }
        }
        let labels = engine.posterior().labels_applied();
        if labels >= last_labels_ck + 200 && writer.as_ref().is_none_or(|w| w.is_finished()) {
            if let Some(w) = writer.take() {
                w.join().unwrap();
            }
            last_labels_ck = labels;
            let c = engine.checkpoint(now);
            let path = ck.clone();
            writer = Some(std::thread::spawn(move || c.write(&path).unwrap()));
        }
        if trim {
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { malloc_trim(0) };
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            let mi = malloc_stats().expect("glibc malloc");
            let mb = |x: usize| x as f64 / 1048576.0;
            println!(
                "{:.0},{},{},{:.0},{:.0},{:.0},{:.0}",
                start.elapsed().as_secs_f64(),
                labels,
                engine.posterior().label_count(),
                rss_mb(),
                mb(mi.in_use),
                mb(mi.free_retained),
                mb(mi.mapped_bytes)
            );
        }
    }
    round_secs.sort_by(f64::total_cmp);
    let q = |p: f64| round_secs[((round_secs.len() - 1) as f64 * p) as usize] * 1000.0;
    eprintln!(
        "rounds {}: p50 {:.1} ms, p90 {:.1} ms, mean {:.1} ms",
        round_secs.len(),
        q(0.5),
        q(0.9),
        round_secs.iter().sum::<f64>() * 1000.0 / round_secs.len() as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
