//! Baselines against brute-force sorts, plus the edge cases every strategy must handle.

use super::*;
use crate::candidates::Pair;
use crate::linalg::dot;
use crate::selection::testutil::{problem, Problem};
use crate::selection::{select, SelectionInput, SelectionParams, StrategyKind};
use rand::{rngs::StdRng, SeedableRng};

/// `θ̂ᵀ(x_a − x_b)` of every candidate, from the difference vectors directly.
fn margins(p: &Problem) -> Vec<f64> {
    p.pairs
        .iter()
        .map(|pr| {
            let v: Vec<f64> = (0..p.x.nrows())
                .map(|i| p.x[(i, pr.a as usize)] - p.x[(i, pr.b as usize)])
                .collect();
            dot(p.posterior.theta(), &v)
        })
        .collect()
}

fn run(kind: StrategyKind, p: &Problem, k: usize, seed: u64) -> Vec<Pick> {
    select(
        kind,
        p.input(k),
        &SelectionParams::default(),
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

#[test]
fn entropy_and_max_diff_match_a_brute_force_sort() {
    for seed in 0..4 {
        let p = problem(5, 40, 10, 30 + seed);
        let m = margins(&p);
        let mut order: Vec<usize> = (0..m.len()).collect();
        order.sort_by(|&a, &b| m[a].abs().total_cmp(&m[b].abs()));
        let k = 7;

        let picks = run(StrategyKind::Entropy, &p, k, 0);
        let got: Vec<usize> = picks.iter().map(|pk| pk.candidate).collect();
        assert_eq!(got, order[..k].to_vec(), "entropy, seed {seed}");
        for pk in &picks {
            let q = 1.0 / (1.0 + (-m[pk.candidate]).exp());
            let naive = -(q * q.ln() + (1.0 - q) * (1.0 - q).ln());
            assert!((pk.score - naive).abs() < 1e-12, "{} vs {naive}", pk.score);
            assert!((pk.prediction.mean - m[pk.candidate]).abs() < 1e-9);
            assert!(pk.prediction.variance > 0.0);
        }

        let picks = run(StrategyKind::MaxDiff, &p, k, 0);
        let got: Vec<usize> = picks.iter().map(|pk| pk.candidate).collect();
        let largest: Vec<usize> = order.iter().rev().take(k).copied().collect();
        assert_eq!(got, largest, "max-diff, seed {seed}");
        for pk in &picks {
            assert!((pk.score - m[pk.candidate].abs()).abs() < 1e-9);
        }
    }
}

#[test]
fn logit_entropy_is_stable() {
    assert!((logit_entropy(0.0) - std::f64::consts::LN_2).abs() < 1e-15);
    assert!((logit_entropy(3.0) - logit_entropy(-3.0)).abs() < 1e-15);
    for m in [40.0, 800.0, -800.0] {
        let h = logit_entropy(m);
        assert!(h.is_finite() && (0.0..1e-15).contains(&h), "{m}: {h}");
    }
}

#[test]
fn random_is_distinct_seeded_and_uniform() {
    let p = problem(3, 12, 2, 4);
    let n = p.pairs.len();
    let k = 5;
    let a = run(StrategyKind::Random, &p, k, 77);
    let b = run(StrategyKind::Random, &p, k, 77);
    let c = run(StrategyKind::Random, &p, k, 78);
    assert_eq!(a, b, "same seed, same picks");
    assert_ne!(
        a.iter().map(|x| x.candidate).collect::<Vec<_>>(),
        c.iter().map(|x| x.candidate).collect::<Vec<_>>()
    );
    assert_eq!(a.len(), k);
    let mut seen: Vec<usize> = a.iter().map(|x| x.candidate).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), k);
    assert!(a.iter().all(|x| x.score == 0.0));

    // Inclusion frequencies: each candidate is in a draw with probability k/n.
    let draws = 4000;
    let mut hits = vec![0u32; n];
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..draws {
        for pk in select(
            StrategyKind::Random,
            p.input(k),
            &SelectionParams::default(),
            &mut rng,
        )
        .unwrap()
        {
            hits[pk.candidate] += 1;
        }
    }
    let q = k as f64 / n as f64;
    let expect = draws as f64 * q;
    let sd = (draws as f64 * q * (1.0 - q)).sqrt();
    for (c, &h) in hits.iter().enumerate() {
        assert!(
            (h as f64 - expect).abs() < 5.0 * sd,
            "candidate {c}: {h} vs {expect} ± {sd}"
        );
    }
}

#[test]
fn every_strategy_handles_k_zero_k_too_large_and_no_candidates() {
    let p = problem(4, 8, 3, 6);
    let n = p.pairs.len();
    for kind in StrategyKind::ALL {
        let all = run(kind, &p, n + 50, 1);
        assert_eq!(all.len(), n, "{kind}: k > #candidates returns all");
        let mut seen: Vec<usize> = all.iter().map(|x| x.candidate).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n, "{kind}: each candidate once");
        for pk in &all {
            assert!(pk.score.is_finite(), "{kind}: score {}", pk.score);
            assert_eq!(pk.pair, p.pairs[pk.candidate]);
            assert!(pk.prediction.variance.is_finite());
        }
        assert!(run(kind, &p, 0, 1).is_empty(), "{kind}: k = 0");
        let none: [Pair; 0] = [];
        let input = SelectionInput {
            candidates: &none,
            ..p.input(5)
        };
        let picks = select(
            kind,
            input,
            &SelectionParams::default(),
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        assert!(picks.is_empty(), "{kind}: no candidates");
        // One candidate, k = 3.
        let one = [p.pairs[0]];
        let input = SelectionInput {
            candidates: &one,
            ..p.input(3)
        };
        let picks = select(
            kind,
            input,
            &SelectionParams::default(),
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        assert_eq!(picks.len(), 1, "{kind}: single candidate");
    }
}

#[test]
fn every_strategy_honours_the_use_limit() {
    // Each response may be used once (the daemon's default `pool.max_uses`), a few not at all: no pick
    // may reuse a response or touch an exhausted one, and the batch is still as full as the limit allows.
    for kind in StrategyKind::ALL {
        let mut p = problem(5, 40, 10, 11);
        p.uses_left = (0..40).map(|i| u32::from(i % 7 != 0)).collect();
        let picks = run(kind, &p, 12, 2);
        let mut used = [0u32; 40];
        for pk in &picks {
            used[pk.pair.a as usize] += 1;
            used[pk.pair.b as usize] += 1;
        }
        for (i, (&u, &left)) in used.iter().zip(&p.uses_left).enumerate() {
            assert!(
                u <= left,
                "{kind}: response {i} used {u} times, {left} allowed"
            );
        }
        // 34 usable responses: at least 12 disjoint usable pairs exist among the candidates.
        assert_eq!(
            picks.len(),
            12,
            "{kind}: a use limit must not shrink a feasible batch"
        );
    }
}
