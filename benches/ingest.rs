//! Decode throughput of response messages: JSON number array vs base64 little-endian f32, at d = 768 and
//! 2048. This is the per-message CPU cost of ingest (the broker-level throughput report compares it with
//! the raw consume rate).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use armd::daemon::messages::{encode_f32_b64, Decoder};

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

criterion_group!(benches, decode);
criterion_main!(benches);
