//! Benchmarks of the paper-baseline strategies (`random`, `entropy`, `max-diff`, `bald`, `batch-bald`,
//! `coreset`), each a whole `selection::select` call, next to the round's floor in the same run: validating
//! the input and computing every candidate's posterior variance (one whitening solve of the pool plus the
//! tiled pair distances), which `bald` and `batch-bald` need and the others do not.
//!
//! Needs `[[bench]] name = "strategies"`, `harness = false` in Cargo.toml. Run: `cargo bench --bench
//! strategies` (filter with e.g. `-- bald`). Size: `ARMD_BENCH_D` (default 768), N = 5,000 pooled
//! responses, 500k cross-prompt candidates, k = 64.

mod shared;

use armd::selection::{self, Round, SelectionParams, StrategyKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{rngs::StdRng, SeedableRng};
use shared::{input, pool};
use std::hint::black_box;
use std::time::Duration;

fn bench_strategies(c: &mut Criterion) {
    let d: usize = std::env::var("ARMD_BENCH_D")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(768);
    let k = 64;
    let mut g = c.benchmark_group("strategies");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    let params = SelectionParams::default();
    let p = pool(d, 5_000, 500_000, 16);
    eprintln!(
        "strategies: d={d} N=5000 candidates={} k={k}",
        p.pairs.len()
    );
    g.bench_function(BenchmarkId::new("variances_floor", d), |b| {
        b.iter(|| {
            let mut round = Round::new(input(&p, k)).unwrap();
            black_box(round.variances().len())
        })
    });
    for kind in [
        StrategyKind::Random,
        StrategyKind::Entropy,
        StrategyKind::MaxDiff,
        StrategyKind::Bald,
        StrategyKind::BatchBald,
        StrategyKind::Coreset,
    ] {
        g.bench_function(BenchmarkId::new(kind.name(), d), |b| {
            b.iter(|| {
                let mut rng = StdRng::seed_from_u64(0);
                black_box(selection::select(kind, input(&p, k), &params, &mut rng).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_strategies);
criterion_main!(benches);
