//! `targeted` against a dense reference: explicit `Σ = H⁻¹` and target matrix `T`, conditioned by dense
//! Sherman–Morrison after every pick, each pick checked to be the exhaustive argmax.

// Dense references are written in index notation, mirroring the math.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::selection::testutil::{problem, Problem};
use crate::selection::{select, StrategyKind};
use faer::prelude::Solve;
use rand::{rngs::StdRng, SeedableRng};

fn diff(p: &Problem, pair: Pair) -> Vec<f64> {
    (0..p.x.nrows())
        .map(|i| p.x[(i, pair.a as usize)] - p.x[(i, pair.b as usize)])
        .collect()
}

fn weight(p: &Problem, v: &[f64]) -> f64 {
    let pr = sigmoid(dot(p.posterior.theta(), v));
    pr * (1.0 - pr)
}

/// Dense `Σ = H⁻¹`.
fn dense_sigma(p: &Problem) -> Mat<f64> {
    let l = p.posterior.cholesky();
    let h = l * l.transpose();
    let d = h.nrows();
    h.as_ref()
        .llt(faer::Side::Lower)
        .unwrap()
        .solve(Mat::<f64>::identity(d, d))
}

fn quad(s: &Mat<f64>, a: &[f64], b: &[f64]) -> f64 {
    let mut t = 0.0;
    for i in 0..a.len() {
        for j in 0..b.len() {
            t += a[i] * s[(i, j)] * b[j];
        }
    }
    t
}

/// `Σ ← Σ − w Σvvᵀ Σ / (1 + w vᵀΣv)`.
fn condition(s: &mut Mat<f64>, v: &[f64], w: f64) {
    let d = v.len();
    let sv: Vec<f64> = (0..d)
        .map(|i| (0..d).map(|j| s[(i, j)] * v[j]).sum())
        .collect();
    let c = w / (1.0 + w * quad(s, v, v));
    for i in 0..d {
        for j in 0..d {
            s[(i, j)] -= c * sv[i] * sv[j];
        }
    }
}

/// Brute-force score of pair v under Σ for the explicit targets.
fn brute(kind: TargetScore, s: &Mat<f64>, targets: &[Vec<f64>], v: &[f64], w: f64) -> f64 {
    let var = quad(s, v, v);
    let m = targets.len() as f64;
    match kind {
        TargetScore::Variance => {
            // w vᵀΣTΣv / (1 + w vᵀΣv) with T = mean u uᵀ
            let num: f64 = targets.iter().map(|u| quad(s, u, v).powi(2)).sum::<f64>() / m;
            w * num / (1.0 + w * var)
        }
        TargetScore::Information => {
            targets
                .iter()
                .map(|u| {
                    let before = quad(s, u, u);
                    let after = before - w * quad(s, u, v).powi(2) / (1.0 + w * var);
                    (before / after).ln()
                })
                .sum::<f64>()
                / m
        }
    }
}

fn trace_t_sigma(s: &Mat<f64>, targets: &[Vec<f64>]) -> f64 {
    targets.iter().map(|u| quad(s, u, u)).sum::<f64>() / targets.len() as f64
}

fn run(kind: TargetScore, p: &Problem, k: usize) -> Vec<Pick> {
    let strategy = match kind {
        TargetScore::Variance => StrategyKind::Targeted,
        TargetScore::Information => StrategyKind::TargetedInfo,
    };
    select(
        strategy,
        p.input(k),
        &SelectionParams::default(),
        &mut StdRng::seed_from_u64(3),
    )
    .unwrap()
}

#[test]
fn each_pick_is_the_exhaustive_argmax_of_the_dense_score() {
    // (seed, in-flight, d, labels): both whitening forms (low-rank while 8·labels < d, else Cholesky).
    for kind in [TargetScore::Variance, TargetScore::Information] {
        for (seed, with_in_flight, d, labels) in [
            (1u64, false, 6, 10),
            (2, true, 6, 10),
            (3, true, 32, 3),
            (4, false, 8, 0),
        ] {
            let mut p = problem(d, 24, labels, seed);
            if with_in_flight {
                p.in_flight = vec![diff(&p, p.pairs[3]), diff(&p, p.pairs[17])];
            }
            // Fewer targets than the sample size: T is exact, so the reference can be too.
            assert!(p.targets.len() <= SelectionParams::default().targeted_targets);
            let targets: Vec<Vec<f64>> = p.targets.iter().map(|&t| diff(&p, t)).collect();
            let k = 8;
            let picks = run(kind, &p, k);
            assert_eq!(picks.len(), k);
            let mut s = dense_sigma(&p);
            for v in &p.in_flight {
                condition(&mut s, v, weight(&p, v));
            }
            let start = trace_t_sigma(&s, &targets);
            let mut taken = vec![false; p.pairs.len()];
            for (step, pk) in picks.iter().enumerate() {
                let scores: Vec<f64> = p
                    .pairs
                    .iter()
                    .map(|&pr| {
                        let v = diff(&p, pr);
                        brute(kind, &s, &targets, &v, weight(&p, &v))
                    })
                    .collect();
                let best = (0..scores.len())
                    .filter(|&c| !taken[c])
                    .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                    .unwrap();
                let tol = 1e-9 * scores[best].abs().max(1e-12);
                assert!(
                    scores[pk.candidate] >= scores[best] - tol,
                    "{kind:?} seed {seed} step {step}: picked {} < best {}",
                    scores[pk.candidate],
                    scores[best]
                );
                assert!(
                    (pk.score - scores[pk.candidate]).abs() <= tol,
                    "{kind:?} seed {seed} step {step}: score {} vs dense {}",
                    pk.score,
                    scores[pk.candidate]
                );
                taken[pk.candidate] = true;
                let v = diff(&p, pk.pair);
                condition(&mut s, &v, weight(&p, &v));
            }
            if kind == TargetScore::Variance {
                // The variance-form gains add up to the drop of the mean target variance tr(TΣ).
                let total: f64 = picks.iter().map(|p| p.score).sum();
                let drop = start - trace_t_sigma(&s, &targets);
                assert!(
                    (total - drop).abs() <= 1e-9 * drop.abs().max(1e-12),
                    "sum of gains {total} vs drop of tr(TΣ) {drop}"
                );
            }
        }
    }
}

#[test]
fn target_sample_is_used_when_targets_are_many() {
    // 96 responses in prompts of 4: 144 within pairs; a sample of 16 must still give a valid batch of
    // distinct pairs, reproducible for a seed.
    let p = problem(6, 96, 12, 9);
    let params = SelectionParams {
        targeted_targets: 16,
        ..Default::default()
    };
    let pick = |seed| {
        select(
            StrategyKind::Targeted,
            p.input(10),
            &params,
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap()
        .iter()
        .map(|p| p.candidate)
        .collect::<Vec<_>>()
    };
    let a = pick(1);
    assert_eq!(a.len(), 10);
    assert_eq!(a, pick(1));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 10);
}

#[test]
fn no_targets_means_the_candidates_are_the_targets() {
    let mut p = problem(5, 24, 6, 4);
    p.targets.clear();
    let picks = run(TargetScore::Variance, &p, 5);
    assert_eq!(picks.len(), 5);
    assert!(picks
        .iter()
        .all(|pk| pk.score.is_finite() && pk.score >= 0.0));
}
