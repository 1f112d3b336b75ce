//! The two per-message CPU costs of ingest, at d = 768 and 2048 (the broker-level throughput report in
//! BENCHMARKS.md compares the whole pipeline with the raw consume rate):
//! - `decode_response`: decoding and validating a response message, JSON number array vs base64
//!   little-endian f32 (the responses thread);
//! - `pool_insert`: pooling a decoded response into a full pool (default capacity 4096), which evicts
//!   the oldest one (the engine thread's work per response under a backlog).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use armd::daemon::messages::{encode_f32_b64, Decoder, Metadata};
use armd::daemon::pool::{Evicted, Pool, PoolEntry};

fn message(d: usize, base64: bool) -> Vec<u8> {
    // Values like LLM hidden states: mostly O(1), a few large.
    let x: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 1000) as f32 / 97.0 - 5.0 + if i % 97 == 0 { 60.0 } else { 0.0 })
        .collect();
    let mut m = serde_json::json!({
        "schema": "armd.response.v1",
        "prompt_id": "prompt-000123",
        "response_id": "prompt-000123-resp-07",
        "metadata": {"model": "gemma-2b", "temperature": 0.7},
    });
    if base64 {
        m["embedding_b64"] = encode_f32_b64(&x).into();
    } else {
        m["embedding"] = serde_json::to_value(&x).unwrap();
    }
    serde_json::to_vec(&m).unwrap()
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_response");
    for d in [768usize, 2048] {
        let decoder = Decoder::new(d, 1 << 22);
        for (name, b64) in [("json_array", false), ("base64", true)] {
            let msg = message(d, b64);
            assert!(decoder.response(Some(&msg)).is_ok());
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, d), &msg, |b, msg| {
                b.iter(|| decoder.response(Some(std::hint::black_box(msg))).unwrap())
            });
        }
    }
    g.finish();
}

/// A decoded response as the engine receives it (ids, d floats, a small metadata object).
fn entry(i: u64, d: usize) -> PoolEntry {
    PoolEntry {
        prompt_id: format!("prompt-{:06}", i / 8).into(),
        response_id: format!("prompt-{:06}-resp-{}", i / 8, i % 8).into(),
        raw: vec![0.25; d],
        metadata: Metadata::from_value(&serde_json::json!({"model": "gemma-2b", "i": i})),
        arrived_ms: i as i64,
        uses: 0,
    }
}

fn pool_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_insert");
    for d in [768usize, 2048] {
        let capacity = 4096;
        let mut pool = Pool::new(capacity, i64::MAX / 4);
        let mut ev = Evicted::default();
        let mut next = 0u64;
        for _ in 0..capacity {
            pool.insert(entry(next, d), &mut ev);
            next += 1;
        }
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(d), |b| {
            b.iter_batched(
                || {
                    next += 1;
                    entry(next, d)
                },
                |e| assert!(pool.insert(e, &mut ev)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, decode, pool_insert);
criterion_main!(benches);
