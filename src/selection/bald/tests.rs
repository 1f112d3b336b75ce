//! BALD and BatchBALD against independent computations: Gaussian moments for the quadrature, Monte
//! Carlo for the BALD integral, the small-variance limit, and brute-force enumeration of the joint label
//! distribution for BatchBALD.

use super::*;
use crate::linalg::{dot, solve_lower_transpose};
use crate::selection::testutil::{problem, Problem};
use crate::selection::{select, StrategyKind};
use rand::{rngs::StdRng, SeedableRng};

/// `∫ e^{-x²} x^{2j} dx = Γ(j + ½) = (2j − 1)!! √π / 2^j`.
fn gaussian_moment(j: u32) -> f64 {
    let mut g = PI.sqrt();
    for i in 0..j {
        g *= (2 * i + 1) as f64 / 2.0;
    }
    g
}

#[test]
fn gauss_hermite_integrates_polynomials_exactly() {
    for n in [1usize, 2, 3, 5, 10, 20, 32, 64, 100] {
        let rule = GaussHermite::new(n);
        assert_eq!(rule.nodes.len(), n);
        assert!(rule.weights.iter().all(|&w| w > 0.0), "n={n}");
        for j in 0..n as u32 {
            let q: f64 = rule
                .nodes
                .iter()
                .zip(&rule.weights)
                .map(|(&x, &w)| w * x.powi(2 * j as i32))
                .sum();
            let exact = gaussian_moment(j);
            assert!(
                (q - exact).abs() <= 1e-11 * exact,
                "n={n}, j={j}: {q} vs {exact}"
            );
            // Odd moments vanish by symmetry.
            let odd: f64 = rule
                .nodes
                .iter()
                .zip(&rule.weights)
                .map(|(&x, &w)| w * x.powi(2 * j as i32 + 1))
                .sum();
            assert!(
                odd.abs() <= 1e-11 * gaussian_moment(j + 1),
                "n={n}, odd {j}"
            );
        }
    }
    // Known closed forms.
    let r2 = GaussHermite::new(2);
    assert!((r2.nodes[0] - 0.5f64.sqrt()).abs() < 1e-15);
    assert!((r2.weights[0] - PI.sqrt() / 2.0).abs() < 1e-15);
    let r3 = GaussHermite::new(3);
    assert_eq!(r3.nodes[1], 0.0);
    assert!((r3.nodes[0] - 1.5f64.sqrt()).abs() < 1e-15);
    assert!((r3.weights[1] - 2.0 * PI.sqrt() / 3.0).abs() < 1e-15);
    assert!((r3.weights[0] - PI.sqrt() / 6.0).abs() < 1e-15);
    // Tabulated largest node of the 20-point rule (Abramowitz & Stegun 25.4.46).
    let r20 = GaussHermite::new(20);
    assert!((r20.nodes[0] - 5.387_480_890_011_233).abs() < 1e-13);
}

fn entropy_of(p: f64) -> f64 {
    -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

#[test]
fn bald_matches_monte_carlo() {
    let rule = GaussHermite::new(32);
    let mut rng = StdRng::seed_from_u64(11);
    let n = 1_000_000;
    for &(m, s) in &[(0.0, 1.0), (1.5, 4.0), (-3.0, 0.5), (0.3, 9.0), (4.0, 2.0)] {
        let q = bald_score(m, s, &rule);
        let p: Vec<f64> = (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                sigmoid(m + s.sqrt() * e)
            })
            .collect();
        let p_bar = p.iter().sum::<f64>() / n as f64;
        let mean_h = p.iter().map(|&x| entropy_of(x)).sum::<f64>() / n as f64;
        let mc = entropy_of(p_bar) - mean_h;
        // Standard error of the estimator from its linearisation: f_j = h'(p̄) p_j − H(p_j).
        let slope = ((1.0 - p_bar) / p_bar).ln();
        let f: Vec<f64> = p.iter().map(|&x| slope * x - entropy_of(x)).collect();
        let f_bar = f.iter().sum::<f64>() / n as f64;
        let var = f.iter().map(|x| (x - f_bar).powi(2)).sum::<f64>() / (n - 1) as f64;
        let se = (var / n as f64).sqrt();
        assert!(
            (q - mc).abs() <= 5.0 * se + 1e-6,
            "m={m}, s={s}: quadrature {q} vs Monte Carlo {mc} ± {se}"
        );
    }
}

#[test]
fn bald_tends_to_half_the_dopt_gain_for_small_variance() {
    let rule = GaussHermite::new(32);
    for m in [-3.0, -1.0, 0.0, 0.5, 2.0] {
        let s = 1e-4;
        let p = sigmoid(m);
        let w = p * (1.0 - p);
        let q = bald_score(m, s, &rule);
        let ratio = q / (w * s);
        assert!((ratio - 0.5).abs() < 1e-4, "m={m}: ratio {ratio}");
        let ratio_log = q / (w * s).ln_1p();
        assert!((ratio_log - 0.5).abs() < 1e-4, "m={m}: ratio {ratio_log}");
        // And the ratio is approached monotonically as s shrinks.
        let r_big = bald_score(m, 1e-2, &rule) / (w * 1e-2);
        assert!((r_big - 0.5).abs() >= (ratio - 0.5).abs() - 1e-9);
    }
}

#[test]
fn bald_is_nonnegative_and_bounded_by_ln2() {
    let rule = GaussHermite::new(32);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..20_000 {
        let m = rng.random_range(-60.0..60.0);
        let s = 10f64.powf(rng.random_range(-14.0..4.0));
        let q = bald_score(m, s, &rule);
        assert!(
            q.is_finite() && (0.0..=std::f64::consts::LN_2 + 1e-12).contains(&q),
            "m={m}, s={s}: {q}"
        );
    }
    assert_eq!(bald_score(0.3, 0.0, &rule), 0.0);
}

/// Difference vector of a candidate.
fn diff(p: &Problem, c: usize) -> Vec<f64> {
    let pr = p.pairs[c];
    (0..p.x.nrows())
        .map(|i| p.x[(i, pr.a as usize)] - p.x[(i, pr.b as usize)])
        .collect()
}

/// BALD of every candidate with the variance from the posterior's own `predict` (no whitened pool).
fn direct_bald(p: &Problem, nodes: usize) -> Vec<f64> {
    let rule = GaussHermite::new(nodes);
    (0..p.pairs.len())
        .map(|c| {
            let pr = p.posterior.predict(&diff(p, c)).unwrap();
            bald_score(pr.mean, pr.variance, &rule)
        })
        .collect()
}

#[test]
fn bald_strategy_ranks_by_the_score() {
    let p = problem(5, 24, 12, 21);
    let scores = direct_bald(&p, 32);
    let picks = select(
        StrategyKind::Bald,
        p.input(6),
        &SelectionParams::default(),
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    for (pk, &c) in picks.iter().zip(&order) {
        assert_eq!(pk.candidate, c);
        assert!((pk.score - scores[c]).abs() < 1e-10);
    }
}

#[test]
fn batch_bald_with_one_pick_is_bald_up_to_sampling_error() {
    let samples = 20_000;
    let params = SelectionParams {
        batch_bald_samples: samples,
        ..Default::default()
    };
    for seed in 0..3 {
        let p = problem(4, 24, 20, 40 + seed);
        let scores = direct_bald(&p, 32);
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        let picks = select(
            StrategyKind::BatchBald,
            p.input(1),
            &params,
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap();
        assert_eq!(picks.len(), 1);
        let c = picks[0].candidate;
        // Standard error of a `samples`-sample BALD estimate of candidate c (Monte Carlo, own draws).
        let pr = p.posterior.predict(&diff(&p, c)).unwrap();
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let ps: Vec<f64> = (0..samples)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                sigmoid(pr.mean + pr.variance.sqrt() * e)
            })
            .collect();
        let p_bar = ps.iter().sum::<f64>() / samples as f64;
        let slope = ((1.0 - p_bar) / p_bar).ln();
        let f: Vec<f64> = ps.iter().map(|&x| slope * x - entropy_of(x)).collect();
        let f_bar = f.iter().sum::<f64>() / samples as f64;
        let var = f.iter().map(|x| (x - f_bar).powi(2)).sum::<f64>() / (samples - 1) as f64;
        let tol = 5.0 * (var / samples as f64).sqrt() + 1e-4;
        assert!(
            (picks[0].score - scores[c]).abs() <= tol,
            "seed {seed}: batch score {} vs BALD {} (tol {tol})",
            picks[0].score,
            scores[c]
        );
        assert!(
            scores[c] >= scores[best] - 2.0 * tol,
            "seed {seed}: picked BALD {} vs best {}",
            scores[c],
            scores[best]
        );
    }
}

/// `samples` draws of `σ(θᵀv)` for the given candidates, θ = θ̂ + L⁻ᵀε drawn directly from the posterior.
fn posterior_probs(p: &Problem, cands: &[usize], samples: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = p.x.nrows();
    let thetas: Vec<Vec<f64>> = (0..samples)
        .map(|_| {
            let mut e: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
            solve_lower_transpose(p.posterior.cholesky(), &mut e);
            e.iter()
                .zip(p.posterior.theta())
                .map(|(a, b)| a + b)
                .collect()
        })
        .collect();
    cands
        .iter()
        .map(|&c| {
            let v = diff(p, c);
            thetas.iter().map(|t| sigmoid(dot(t, &v))).collect()
        })
        .collect()
}

/// Joint MI of labels with the given sample probabilities, by enumerating every configuration.
fn brute_joint_mi(probs: &[&[f64]]) -> f64 {
    let n = probs.len();
    let s = probs[0].len();
    let mut joint = 0.0;
    for config in 0..1usize << n {
        let pr: f64 = (0..s)
            .map(|j| {
                (0..n)
                    .map(|i| {
                        if config >> i & 1 == 1 {
                            probs[i][j]
                        } else {
                            1.0 - probs[i][j]
                        }
                    })
                    .product::<f64>()
            })
            .sum::<f64>()
            / s as f64;
        if pr > 0.0 {
            joint -= pr * pr.ln();
        }
    }
    let cond: f64 = probs
        .iter()
        .map(|p| p.iter().map(|&x| binary_entropy(x)).sum::<f64>() / s as f64)
        .sum();
    joint - cond
}

#[test]
fn exact_joint_mi_matches_brute_force_enumeration() {
    let mut rng = StdRng::seed_from_u64(8);
    let s = 50;
    let probs: Vec<Vec<f64>> = (0..8)
        .map(|i| {
            (0..s)
                .map(|_| {
                    // Mix of confident and uncertain labels, including extreme ones.
                    let t: f64 = rng.random_range(-4.0..4.0) * (1.0 + i as f64);
                    sigmoid(t)
                })
                .collect()
        })
        .collect();
    let mut state = JointMi::new(s, MAX_EXACT_CONFIGURATIONS, SAMPLED_CONFIGURATIONS);
    for n in 1..=probs.len() {
        state.add(&probs[n - 1], &mut rng);
        assert!(state.is_exact());
        let refs: Vec<&[f64]> = probs[..n].iter().map(|p| p.as_slice()).collect();
        let brute = brute_joint_mi(&refs);
        assert!(
            (state.total() - brute).abs() <= 1e-12 * brute.max(1.0),
            "n={n}: {} vs brute force {brute}",
            state.total()
        );
    }
}

#[test]
fn batched_gains_equal_single_gains() {
    let mut rng = StdRng::seed_from_u64(15);
    let s = 40;
    let probs: Vec<Vec<f64>> = (0..12)
        .map(|_| {
            (0..s)
                .map(|_| sigmoid(rng.random_range(-5.0..5.0)))
                .collect()
        })
        .collect();
    let refs: Vec<&[f64]> = probs.iter().map(|p| p.as_slice()).collect();
    let conds: Vec<f64> = probs
        .iter()
        .map(|p| JointMi::conditional_entropy(p))
        .collect();
    // Exact regime up to 8 configurations, then 50 sampled ones.
    let mut state = JointMi::new(s, 8, 50);
    for step in 0..6 {
        let batched = state.gains(&refs, &conds);
        for (c, p) in probs.iter().enumerate() {
            let single = state.gain(p);
            assert!(
                (batched[c] - single).abs() < 1e-12,
                "step {step}, label {c}: {} vs {single}",
                batched[c]
            );
        }
        state.add(&probs[step], &mut rng);
    }
    assert!(!state.is_exact());
}

#[test]
fn sampled_joint_entropy_estimates_the_exact_one() {
    let p = problem(4, 32, 6, 12);
    let cands: Vec<usize> = (0..10).map(|i| i * 7 % p.pairs.len()).collect();
    let s = 64;
    let probs = posterior_probs(&p, &cands, s, 3);
    let refs: Vec<&[f64]> = probs.iter().map(|p| p.as_slice()).collect();
    let brute = brute_joint_mi(&refs);
    let m = 40_000;
    let mut state = JointMi::new(s, 4, m);
    let mut rng = StdRng::seed_from_u64(4);
    for pr in &probs {
        state.add(pr, &mut rng);
    }
    assert!(!state.is_exact());
    assert_eq!(state.configurations(), m);
    // 8 of the 10 gains are estimates, each an average of m conditional entropies in [0, ln 2]
    // (standard deviation ≤ ln2/2); 5 standard errors each, summed.
    let tol = 5.0 * 8.0 * (std::f64::consts::LN_2 / 2.0) / (m as f64).sqrt();
    assert!(
        (state.total() - brute).abs() <= tol,
        "sampled {} vs exact {brute} (tol {tol})",
        state.total()
    );
}

#[test]
fn greedy_joint_mi_picks_the_argmax_and_is_bounded_by_singles() {
    let p = problem(5, 40, 8, 17);
    let cands: Vec<usize> = (0..p.pairs.len()).step_by(3).collect();
    let s = 200;
    let probs = posterior_probs(&p, &cands, s, 9);
    let k = 8;
    let mut state = JointMi::new(s, MAX_EXACT_CONFIGURATIONS, SAMPLED_CONFIGURATIONS);
    let chosen = greedy_joint_mi(
        &probs,
        k,
        &mut state,
        &mut StdRng::seed_from_u64(0),
        |_, _| true,
    );
    assert_eq!(chosen.len(), k);
    // Each pick is the brute-force argmax of the joint MI given the picks before it.
    let mut taken: Vec<usize> = Vec::new();
    for &(slot, gain) in &chosen {
        let base = if taken.is_empty() {
            0.0
        } else {
            let refs: Vec<&[f64]> = taken.iter().map(|&t| probs[t].as_slice()).collect();
            brute_joint_mi(&refs)
        };
        let gains: Vec<f64> = (0..probs.len())
            .map(|c| {
                if taken.contains(&c) {
                    return f64::NEG_INFINITY;
                }
                let mut refs: Vec<&[f64]> = taken.iter().map(|&t| probs[t].as_slice()).collect();
                refs.push(&probs[c]);
                brute_joint_mi(&refs) - base
            })
            .collect();
        let best = gains.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert!(gains[slot] >= best - 1e-10, "{} < {best}", gains[slot]);
        assert!((gain - gains[slot]).abs() < 1e-10);
        taken.push(slot);
    }
    // Joint MI of the batch: at least each member's own MI, at most their sum.
    let joint: f64 = chosen.iter().map(|c| c.1).sum();
    let singles: Vec<f64> = chosen
        .iter()
        .map(|&(slot, _)| JointMi::new(s, 2, 2).gain(&probs[slot]))
        .collect();
    for &single in &singles {
        assert!(joint >= single - 1e-12, "joint {joint} < single {single}");
    }
    let sum: f64 = singles.iter().sum();
    assert!(joint <= sum + 1e-12, "joint {joint} > sum of singles {sum}");
    assert!(joint < sum - 1e-6, "redundant labels should overlap");
}

#[test]
fn batch_bald_strategy_returns_a_distinct_shortlisted_batch() {
    let p = problem(6, 48, 10, 5);
    let params = SelectionParams {
        batch_bald_samples: 128,
        batch_bald_shortlist: 20,
        ..Default::default()
    };
    let scores = direct_bald(&p, params.gauss_hermite_nodes);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let shortlist = &order[..20];
    let run = |seed| {
        select(
            StrategyKind::BatchBald,
            p.input(12),
            &params,
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let picks = run(3);
    assert_eq!(picks, run(3), "seeded runs agree");
    assert_eq!(picks.len(), 12);
    let mut seen: Vec<usize> = picks.iter().map(|pk| pk.candidate).collect();
    assert!(seen.iter().all(|c| shortlist.contains(c)));
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 12);
    assert!(picks.iter().all(|pk| pk.score >= 0.0));
    // Diminishing returns: the greedy's gains do not increase (exact regime, 2^12 > cap only at the end).
    for w in picks.windows(2).take(9) {
        assert!(w[1].score <= w[0].score + 1e-12);
    }
    // Shortlist smaller than k: raised to k.
    let small = SelectionParams {
        batch_bald_shortlist: 2,
        ..params
    };
    let picks = select(
        StrategyKind::BatchBald,
        p.input(5),
        &small,
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(picks.len(), 5);
}
