//! Benchmarks of the paper-baseline strategies (`random`, `entropy`, `max-diff`, `bald`, `batch-bald`,
//! `coreset`), each a whole `selection::select` call, next to the round's floor in the same run: validating
//! the input and computing every candidate's posterior variance (one whitening solve of the pool plus the
//! tiled pair distances), which `bald` and `batch-bald` need and the others do not.
//!
//! Needs `[[bench]] name = "strategies"`, `harness = false` in Cargo.toml. Run: `cargo bench --bench
//! strategies` (filter with e.g. `-- bald`). Size: `ARMD_BENCH_D` (default 768), N = 5,000 pooled
//! responses, 500k cross-prompt candidates, k = 64.

use armd::candidates::{self, CandidateMode, CandidateOptions};
use armd::posterior::Posterior;
use armd::selection::{self, Round, SelectionInput, SelectionParams, StrategyKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::Mat;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::hint::black_box;
use std::time::Duration;

struct Pool {
    posterior: Posterior,
    x: Mat<f64>,
    pairs: Vec<candidates::Pair>,
}

fn pool(d: usize, n: usize, max_cross: usize, labels: usize) -> Pool {
    let mut rng = StdRng::seed_from_u64(7);
    let scale = 1.0 / (d as f64).sqrt();
    let mut posterior = Posterior::new(d, 1.0).unwrap();
    for _ in 0..labels {
        let v: Vec<f64> = (0..d)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect();
        let y = if rng.random::<bool>() { 1.0 } else { 0.0 };
        posterior.update(&v, y).unwrap();
    }
    let x = Mat::<f64>::from_fn(d, n, |_, _| rng.random_range(-1.0..1.0) * scale);
    let prompts: Vec<u64> = (0..n as u64).map(|i| i / 10).collect();
    let opts = CandidateOptions {
        mode: CandidateMode::Cross,
        max_cross_pairs: max_cross,
        max_within_pairs: 0,
    };
    let pairs = candidates::generate(&prompts, &opts, &mut rng);
    Pool {
        posterior,
        x,
        pairs,
    }
}

fn input(p: &Pool, k: usize) -> SelectionInput<'_> {
    SelectionInput {
        posterior: &p.posterior,
        embeddings: p.x.as_ref(),
        candidates: &p.pairs,
        in_flight: &[],
        k,
    }
}

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
