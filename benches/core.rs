//! Numeric-core benchmarks, each next to the baseline it is reported against (BENCHMARKS.md):
//! - one-label update vs one dense d×d matrix–vector product (its memory-bound floor), and queued labels
//!   applied as one exact batch (`update_many`, `MAX_BATCH` labels per iteration);
//! - greedy-dopt selection vs the single triangular solve that whitens the pool (its floor), and the paper's
//!   dopt rule implemented naively (materialised candidate Fisher matrix) on the same candidates;
//! - whitening the default pool (N = 4096): the low-rank form the posterior uses while fewer than d/8
//!   labels are stored, against the triangular solve with the Cholesky factor it replaces;
//! - `targeted` vs `greedy-dopt` on one daemon-sized round (d = 2048, pool 4096, 20,000 candidates, k = 8, 64);
//! - refit with n labels, plain and with the evidence-chosen (`auto`) prior.
//!
//! Run: `cargo bench --bench core` (filter with e.g. `-- update`).

mod shared;

use armd::posterior::{EvidenceOptions, RefitOptions, Whitener};
use armd::selection::{self, dopt, Round, SelectionParams, StrategyKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::Mat;
use rand::{rngs::StdRng, SeedableRng};
use shared::{input, pool, random_vec, trained};
use std::hint::black_box;
use std::time::Duration;

fn bench_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    g.measurement_time(Duration::from_secs(8));
    for &d in &[768usize, 2048, 4096] {
        let mut rng = StdRng::seed_from_u64(1);
        let mut post = trained(d, 4, &mut rng);
        let vs: Vec<Vec<f64>> = (0..64).map(|_| random_vec(d, &mut rng)).collect();
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("one_label", d), &d, |b, _| {
            b.iter(|| {
                i = (i + 1) % vs.len();
                black_box(post.update(&vs[i], (i % 2) as f64).unwrap());
            })
        });
        // Queued labels applied as one exact batch (`update_many`): the time of MAX_BATCH labels.
        let n = armd::posterior::MAX_BATCH;
        let mut j = 0;
        g.bench_with_input(BenchmarkId::new(format!("batch{n}"), d), &d, |b, _| {
            b.iter(|| {
                j = (j + n) % (vs.len() - n);
                let labels = vs[j..j + n]
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (v.as_slice(), (k % 2) as f64));
                black_box(post.update_many(labels).unwrap());
            })
        });
        let a = Mat::<f64>::from_fn(d, d, |i, j| ((i * 31 + j * 17) % 97) as f64);
        let x = faer::Col::<f64>::from_fn(d, |i| vs[0][i]);
        g.bench_with_input(BenchmarkId::new("dense_matvec_baseline", d), &d, |b, _| {
            b.iter(|| black_box(&a * &x))
        });
    }
    g.finish();
}

/// `ARMD_BENCH_D`, default 2048: the dimension of the selection and whitening benches.
fn bench_dim() -> usize {
    std::env::var("ARMD_BENCH_D")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048)
}

fn bench_selection(c: &mut Criterion) {
    let d = bench_dim();
    let mut g = c.benchmark_group("selection");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let params = SelectionParams::default();
    // Full size: N = 10,000 responses, ≥ 1M cross-prompt candidates, k = 256.
    let big = pool(d, 10_000, 1_000_000, 16);
    eprintln!("selection: d={d} N=10000 candidates={}", big.pairs.len());
    g.bench_function(BenchmarkId::new("whiten_floor", d), |b| {
        b.iter(|| {
            black_box(armd::selection::scoring::whiten(
                big.posterior.cholesky(),
                big.x.as_ref(),
            ))
        })
    });
    g.bench_function(BenchmarkId::new("greedy_dopt_k256_1M", d), |b| {
        b.iter(|| {
            let mut rng = StdRng::seed_from_u64(0);
            black_box(
                selection::select(
                    StrategyKind::GreedyDopt,
                    input(&big, 256),
                    &params,
                    &mut rng,
                )
                .unwrap(),
            )
        })
    });
    g.bench_function(BenchmarkId::new("dopt_laplacian_k256_1M", d), |b| {
        b.iter(|| {
            let mut rng = StdRng::seed_from_u64(0);
            black_box(
                selection::select(StrategyKind::Dopt, input(&big, 256), &params, &mut rng).unwrap(),
            )
        })
    });
    drop(big);
    // The naive paper rule cannot hold 1M difference vectors of d = 2048 in memory (16 GB); compare it on
    // 50k candidates, where all three run, and report per-candidate cost.
    let small = pool(d, 10_000, 50_000, 16);
    g.bench_function(BenchmarkId::new("dopt_naive_k256_50k", d), |b| {
        b.iter(|| {
            let mut round = Round::new(input(&small, 256)).unwrap();
            black_box(dopt::dopt_naive(&mut round, &params).unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("greedy_dopt_k256_50k", d), |b| {
        b.iter(|| {
            let mut rng = StdRng::seed_from_u64(0);
            black_box(
                selection::select(
                    StrategyKind::GreedyDopt,
                    input(&small, 256),
                    &params,
                    &mut rng,
                )
                .unwrap(),
            )
        })
    });
    g.finish();
}

fn bench_whitening(c: &mut Criterion) {
    let d = bench_dim();
    let mut g = c.benchmark_group("whitening");
    g.sample_size(10);
    let mut rng = StdRng::seed_from_u64(5);
    let x = Mat::<f64>::from_fn(d, 4096, |_, _| {
        rand::Rng::random_range(&mut rng, -1.0..1.0) / (d as f64).sqrt()
    });
    let mut ks: Vec<usize> = [0, 64, 128, d / 8 - 1]
        .into_iter()
        .filter(|&k| Whitener::prefers_low_rank(k, d))
        .collect();
    ks.sort_unstable();
    ks.dedup();
    for k in ks {
        let post = trained(d, k, &mut rng);
        g.bench_with_input(BenchmarkId::new(format!("cholesky_{d}"), k), &k, |b, _| {
            b.iter(|| black_box(Whitener::Cholesky(post.cholesky()).whiten(x.as_ref())))
        });
        // Includes building the map (K × K Gram and eigendecomposition), as every round does.
        g.bench_with_input(BenchmarkId::new(format!("low_rank_{d}"), k), &k, |b, _| {
            b.iter(|| {
                let w = post.whitener();
                assert!(w.is_low_rank());
                black_box(w.whiten(x.as_ref()))
            })
        });
    }
    g.finish();
}

fn bench_refit(c: &mut Criterion) {
    let mut g = c.benchmark_group("refit");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    for &d in &[768usize, 2048] {
        let mut rng = StdRng::seed_from_u64(3);
        let post = trained(d, 10_000, &mut rng);
        g.bench_with_input(BenchmarkId::new("n10000", d), &d, |b, _| {
            b.iter(|| black_box(post.refit_job().run(RefitOptions::default()).unwrap()))
        });
        if d > 768 {
            continue;
        }
        // The `auto` prior's refit: from λ₀ = 1, far from the evidence optimum (the first refit of a
        // deployment that changed `model.prior_precision` to auto), and warm, from the λ₀ the previous
        // refit chose (every later refit of a running daemon).
        let ev = EvidenceOptions::default();
        g.bench_with_input(BenchmarkId::new("n10000_evidence_cold", d), &d, |b, _| {
            b.iter(|| {
                black_box(
                    post.refit_job()
                        .run_evidence(RefitOptions::default(), &ev)
                        .unwrap(),
                )
            })
        });
        let mut warm = post.clone();
        warm.refit_evidence(RefitOptions::default(), &ev).unwrap();
        eprintln!("refit: evidence λ₀ = {:?}", warm.prior_precision());
        g.bench_with_input(BenchmarkId::new("n10000_evidence_warm", d), &d, |b, _| {
            b.iter(|| {
                black_box(
                    warm.refit_job()
                        .run_evidence(RefitOptions::default(), &ev)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

/// One selection round the size of the daemon's defaults at d = 2048 (`ARMD_BENCH_D` to change): pool 4096,
/// 20,000 cross-prompt candidates, k = 8 (the default `selection.batch_size`) and k = 64; `targeted` against
/// `greedy-dopt` on the same round. Both whiten the pool the same way; `targeted` also passes over the
/// whitened pool once per pick (conditioning), which is what grows with k.
fn bench_targeted(c: &mut Criterion) {
    let d = bench_dim();
    let mut g = c.benchmark_group("targeted");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let p = pool(d, 4096, 20_000, 64);
    let params = SelectionParams::default();
    for k in [8usize, 64] {
        for kind in [
            StrategyKind::GreedyDopt,
            StrategyKind::Targeted,
            StrategyKind::TargetedInfo,
        ] {
            g.bench_function(BenchmarkId::new(format!("{}_k{k}", kind.name()), d), |b| {
                b.iter(|| {
                    let mut rng = StdRng::seed_from_u64(0);
                    black_box(selection::select(kind, input(&p, k), &params, &mut rng).unwrap())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_update,
    bench_selection,
    bench_whitening,
    bench_refit,
    bench_targeted
);
criterion_main!(benches);
