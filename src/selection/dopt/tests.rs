//! D-optimal strategies against dense references: finite-difference gradients of log det, brute-force
//! greedy argmax, and the gains-sum identity.

// Dense references are written in index notation, mirroring the math.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::selection::testutil::{problem, Problem};
use crate::selection::{select, SelectionInput, StrategyKind};
use rand::{rngs::StdRng, SeedableRng};

fn diff(p: &Problem, pair: Pair) -> Vec<f64> {
    (0..p.x.nrows())
        .map(|i| p.x[(i, pair.a as usize)] - p.x[(i, pair.b as usize)])
        .collect()
}

fn dense_h(p: &Problem) -> Mat<f64> {
    let l = p.posterior.cholesky();
    l * l.transpose()
}

fn log_det(m: &Mat<f64>) -> f64 {
    m.as_ref().determinant().ln()
}

fn add_outer(m: &mut Mat<f64>, v: &[f64], w: f64) {
    for i in 0..v.len() {
        for j in 0..v.len() {
            m[(i, j)] += w * v[i] * v[j];
        }
    }
}

fn weight(p: &Problem, v: &[f64]) -> f64 {
    let pr = sigmoid(dot(p.posterior.theta(), v));
    pr * (1.0 - pr)
}

/// Scores of all candidates (k = all) in candidate order.
fn all_scores(kind: StrategyKind, p: &Problem, eps: f64) -> Vec<f64> {
    let params = SelectionParams {
        epsilon: eps,
        ..Default::default()
    };
    let picks = select(
        kind,
        p.input(p.pairs.len()),
        &params,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    let mut s = vec![f64::NAN; p.pairs.len()];
    for pk in picks {
        s[pk.candidate] = pk.score;
    }
    s
}

#[test]
fn paper_rules_are_gradients_of_log_det() {
    let p = problem(5, 16, 6, 3);
    let eps = 1e-3;
    let h = dense_h(&p);
    for (kind, past, unit_w) in [
        (StrategyKind::Dopt, false, false),
        (StrategyKind::PastAwareDopt, true, false),
        (StrategyKind::Xtx, false, true),
    ] {
        let scores = all_scores(kind, &p, eps);
        let vs: Vec<Vec<f64>> = p.pairs.iter().map(|&pr| diff(&p, pr)).collect();
        let ws: Vec<f64> = vs
            .iter()
            .map(|v| if unit_w { 1.0 } else { weight(&p, v) })
            .collect();
        let f = |alpha_i: usize, delta: f64| {
            let d = p.x.nrows();
            let mut m = if past {
                h.clone()
            } else {
                Mat::<f64>::zeros(d, d)
            };
            for i in 0..d {
                m[(i, i)] += eps;
            }
            for (c, v) in vs.iter().enumerate() {
                let a = if c == alpha_i { 1.0 + delta } else { 1.0 };
                add_outer(&mut m, v, a * ws[c]);
            }
            log_det(&m)
        };
        for c in 0..p.pairs.len() {
            let hstep = 1e-5;
            let fd = (f(c, hstep) - f(c, -hstep)) / (2.0 * hstep);
            assert!(
                (scores[c] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{kind}: candidate {c}: score {} vs finite difference {fd}",
                scores[c]
            );
        }
    }
}

#[test]
fn naive_paper_rule_agrees_with_laplacian_form() {
    let p = problem(6, 40, 5, 8);
    let params = SelectionParams::default();
    let mut round = Round::new(p.input(10)).unwrap();
    let naive = dopt_naive(&mut round, &params).unwrap();
    let fast = select(
        StrategyKind::Dopt,
        p.input(10),
        &params,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    for (a, b) in naive.iter().zip(&fast) {
        assert_eq!(a.candidate, b.candidate);
        assert!((a.score - b.score).abs() < 1e-9 * a.score.abs().max(1e-12));
    }
}

fn greedy_picks(p: &Problem, k: usize, eval: Evaluation) -> Vec<Pick> {
    let mut round = Round::new(p.input(k)).unwrap();
    greedy(&mut round, eval).unwrap()
}

#[test]
fn greedy_gains_sum_to_log_det_increase_and_each_pick_is_the_argmax() {
    // (seed, in-flight, d, labels): the last three whiten with the low-rank map (fewer than d/8 labels
    // under the isotropic prior), the first three with the Cholesky factor.
    for (seed, with_in_flight, d, labels) in [
        (1u64, false, 6, 10),
        (2, true, 6, 10),
        (4, true, 6, 10),
        (5, true, 32, 3),
        (6, false, 32, 3),
        (7, true, 8, 0),
    ] {
        let mut p = problem(d, 24, labels, seed);
        assert_eq!(p.posterior.whitener().is_low_rank(), 8 * labels < d);
        if with_in_flight {
            p.in_flight = vec![diff(&p, p.pairs[3]), diff(&p, p.pairs[17])];
        }
        let k = 8;
        let picks = greedy_picks(&p, k, Evaluation::Lazy);
        assert_eq!(picks.len(), k);
        // Dense: start from H + in-flight, add picks one by one; each must be the brute-force argmax.
        let mut m = dense_h(&p);
        for v in &p.in_flight {
            add_outer(&mut m, v, weight(&p, v));
        }
        let start = log_det(&m);
        let mut taken = vec![false; p.pairs.len()];
        for pk in &picks {
            let base = log_det(&m);
            let gains: Vec<f64> = p
                .pairs
                .iter()
                .map(|&pr| {
                    let v = diff(&p, pr);
                    let mut m2 = m.clone();
                    add_outer(&mut m2, &v, weight(&p, &v));
                    log_det(&m2) - base
                })
                .collect();
            let best = (0..gains.len())
                .filter(|&c| !taken[c])
                .max_by(|&a, &b| gains[a].total_cmp(&gains[b]))
                .unwrap();
            assert!(
                gains[pk.candidate] >= gains[best] - 1e-9,
                "seed {seed}: picked gain {} < best {}",
                gains[pk.candidate],
                gains[best]
            );
            assert!((pk.score - gains[pk.candidate]).abs() < 1e-9);
            assert!(pk.score >= 0.0);
            taken[pk.candidate] = true;
            let v = diff(&p, pk.pair);
            add_outer(&mut m, &v, weight(&p, &v));
        }
        let total: f64 = picks.iter().map(|p| p.score).sum();
        let increase = log_det(&m) - start;
        assert!(
            (total - increase).abs() <= 1e-9 * increase.abs().max(1.0),
            "sum of gains {total} vs log det increase {increase}"
        );
    }
}

#[test]
fn lazy_and_eager_greedy_pick_the_same_pairs() {
    for seed in 0..5 {
        let mut p = problem(8, 60, 15, 100 + seed);
        p.in_flight = vec![diff(&p, p.pairs[0])];
        let lazy = greedy_picks(&p, 20, Evaluation::Lazy);
        let eager = greedy_picks(&p, 20, Evaluation::Eager);
        let l: Vec<usize> = lazy.iter().map(|p| p.candidate).collect();
        let e: Vec<usize> = eager.iter().map(|p| p.candidate).collect();
        assert_eq!(l, e, "seed {seed}");
        for (a, b) in lazy.iter().zip(&eager) {
            assert!((a.score - b.score).abs() < 1e-12);
        }
    }
}

#[test]
fn greedy_avoids_near_duplicates_that_one_shot_dopt_takes() {
    // Two copies of the most informative direction: after taking one, the copy's conditioned gain
    // (ln 1.69) falls below a fresh direction's (ln 2), so the greedy takes the fresh one.
    let d = 3;
    let x = Mat::<f64>::from_fn(d, 6, |i, j| match (i, j) {
        (0, 0) => 3.0,
        (0, 2) => 3.0,
        (1, 4) => 2.0,
        (2, 5) => 0.5,
        _ => 0.0,
    });
    let pairs = vec![
        Pair::new(0, 1),
        Pair::new(2, 3),
        Pair::new(4, 1),
        Pair::new(5, 3),
    ];
    let post = crate::posterior::Posterior::new(d, 1.0).unwrap();
    let input = SelectionInput {
        posterior: &post,
        embeddings: x.as_ref(),
        candidates: &pairs,
        in_flight: &[],
        k: 2,
        targets: &[],
        uses_left: &[],
    };
    let mut round = Round::new(input).unwrap();
    let g: Vec<usize> = greedy(&mut round, Evaluation::Lazy)
        .unwrap()
        .iter()
        .map(|p| p.candidate)
        .collect();
    assert_eq!(g, vec![0, 2]);
}

#[test]
fn greedy_with_k_beyond_candidates_returns_all_once() {
    let p = problem(4, 8, 3, 5);
    let picks = greedy_picks(&p, 1000, Evaluation::Lazy);
    assert_eq!(picks.len(), p.pairs.len());
    let mut seen: Vec<usize> = picks.iter().map(|p| p.candidate).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), p.pairs.len());
}

#[test]
fn greedy_under_a_use_limit_conditions_only_on_its_picks() {
    // With each response usable once, every greedy pick must be the brute-force argmax of the log-det gain
    // among pairs whose responses are still unused, the precision built from the earlier picks alone.
    for seed in [21u64, 22] {
        let mut p = problem(6, 24, 10, seed);
        p.uses_left = vec![1; 24];
        let picks = greedy_picks(&p, 6, Evaluation::Lazy);
        assert_eq!(picks.len(), 6);
        let mut m = dense_h(&p);
        let mut used = [false; 24];
        for pk in &picks {
            let base = log_det(&m);
            let gain = |pr: Pair| {
                let v = diff(&p, pr);
                let mut m2 = m.clone();
                add_outer(&mut m2, &v, weight(&p, &v));
                log_det(&m2) - base
            };
            let best = p
                .pairs
                .iter()
                .filter(|pr| !used[pr.a as usize] && !used[pr.b as usize])
                .map(|&pr| gain(pr))
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(!used[pk.pair.a as usize] && !used[pk.pair.b as usize]);
            assert!(
                (gain(pk.pair) - best).abs() < 1e-9,
                "seed {seed}: {} vs {best}",
                gain(pk.pair)
            );
            used[pk.pair.a as usize] = true;
            used[pk.pair.b as usize] = true;
            let v = diff(&p, pk.pair);
            add_outer(&mut m, &v, weight(&p, &v));
        }
    }
}
