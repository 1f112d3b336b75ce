//! Coreset sensitivities against their definition evaluated by brute force, k-means on separated
//! clusters, and the proportional sampler's frequencies.

use super::*;
use crate::selection::testutil::{problem, Problem};
use crate::selection::{select, StrategyKind};
use rand::{rngs::StdRng, SeedableRng};

fn diff(p: &Problem, c: usize) -> Vec<f64> {
    let pr = p.pairs[c];
    (0..p.x.nrows())
        .map(|i| p.x[(i, pr.a as usize)] - p.x[(i, pr.b as usize)])
        .collect()
}

/// The definition, with every difference vector materialised and every leave-one-out mean recomputed.
fn brute_sensitivities(vs: &[Vec<f64>], assign: &[usize], clusters: usize, r: f64) -> Vec<f64> {
    let n = vs.len();
    let d = vs[0].len();
    (0..n)
        .map(|me| {
            let mut sum = 0.0;
            for g in 0..clusters {
                let members: Vec<usize> = (0..n).filter(|&o| assign[o] == g && o != me).collect();
                if members.is_empty() {
                    continue;
                }
                let mean: Vec<f64> = (0..d)
                    .map(|i| members.iter().map(|&o| vs[o][i]).sum::<f64>() / members.len() as f64)
                    .collect();
                let dist = (0..d)
                    .map(|i| (mean[i] - vs[me][i]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                sum += members.len() as f64 * (-r * dist).exp();
            }
            n as f64 / (1.0 + sum)
        })
        .collect()
}

#[test]
fn sensitivities_match_the_definition() {
    for (seed, r) in [(1u64, 0.5), (2, 2.0), (3, 0.0), (4, 1.0)] {
        let p = problem(4, 20, 5, seed);
        let n = p.pairs.len();
        let vs: Vec<Vec<f64>> = (0..n).map(|c| diff(&p, c)).collect();
        let clusters = 5;
        let mut rng = StdRng::seed_from_u64(seed);
        // Clusters 0..3 random; cluster 3 a singleton; cluster 4 empty.
        let mut assign: Vec<usize> = (0..n).map(|_| rng.random_range(0..3)).collect();
        assign[n / 2] = 3;
        let got = sensitivities(p.x.as_ref(), &p.pairs, &assign, clusters, r).unwrap();
        let want = brute_sensitivities(&vs, &assign, clusters, r);
        for c in 0..n {
            assert!(
                (got[c] - want[c]).abs() <= 1e-9 * want[c],
                "seed {seed}, R={r}, candidate {c}: {} vs {}",
                got[c],
                want[c]
            );
        }
        if r == 0.0 {
            // Every other candidate counts fully: N / (1 + N − 1) = 1.
            assert!(got.iter().all(|&s| (s - 1.0).abs() < 1e-12));
        }
    }
    let p = problem(3, 8, 0, 1);
    let bad = vec![7; p.pairs.len()];
    assert!(matches!(
        sensitivities(p.x.as_ref(), &p.pairs, &bad, 3, 1.0),
        Err(CoreError::Index { index: 7, .. })
    ));
    assert!(sensitivities(p.x.as_ref(), &p.pairs, &[0], 3, 1.0).is_err());
}

/// Pool of `groups` tight clusters of "a" responses around far-apart centres plus `base` responses near 0;
/// candidates are all (a, base) pairs, so each difference vector sits near its a's centre.
fn separated(
    groups: usize,
    per_group: usize,
    base: usize,
    seed: u64,
) -> (Mat<f64>, Vec<Pair>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = 3;
    let na = groups * per_group;
    let x = Mat::<f64>::from_fn(d, na + base, |i, j| {
        let noise = rng.random_range(-0.05..0.05);
        if j < na {
            let g = j / per_group;
            noise
                + if i == g % d {
                    10.0 * (1.0 + (g / d) as f64)
                } else {
                    0.0
                }
        } else {
            noise
        }
    });
    let mut pairs = Vec::new();
    let mut truth = Vec::new();
    for a in 0..na {
        for b in na..na + base {
            pairs.push(Pair::new(a as u32, b as u32));
            truth.push(a / per_group);
        }
    }
    (x, pairs, truth)
}

fn same_partition(a: &[usize], b: &[usize]) -> bool {
    let mut map = std::collections::HashMap::new();
    let mut inv = std::collections::HashMap::new();
    a.iter()
        .zip(b)
        .all(|(&x, &y)| *map.entry(x).or_insert(y) == y && *inv.entry(y).or_insert(x) == x)
}

#[test]
fn kmeans_recovers_separated_clusters_with_and_without_subsampling() {
    // 4 × 5 × 8 = 160 candidates (all used), and 4 × 40 × 60 = 9600 > KMEANS_SAMPLE (subsampled).
    for (per_group, base) in [(5usize, 8usize), (40, 60)] {
        let (x, pairs, truth) = separated(4, per_group, base, 6);
        assert_eq!(pairs.len() > KMEANS_SAMPLE, per_group == 40);
        let assign = kmeans(x.as_ref(), &pairs, 4, &mut StdRng::seed_from_u64(2));
        assert_eq!(assign.len(), pairs.len());
        assert!(same_partition(&assign, &truth), "{per_group}×{base}");
    }
    // More clusters than candidates, or one cluster.
    let (x, pairs, _) = separated(1, 2, 1, 1);
    let a = kmeans(x.as_ref(), &pairs, 10, &mut StdRng::seed_from_u64(0));
    assert!(a.iter().all(|&g| g < 2));
    let a = kmeans(x.as_ref(), &pairs, 1, &mut StdRng::seed_from_u64(0));
    assert!(a.iter().all(|&g| g == 0));
}

#[test]
fn kmeans_assigns_every_candidate_to_its_nearest_cluster_mean_at_convergence() {
    // On a small random problem Lloyd converges within the iteration cap; then each candidate's own
    // cluster mean is (one of) its nearest.
    let p = problem(3, 24, 0, 9);
    let n = p.pairs.len();
    let k = 4;
    let assign = kmeans(p.x.as_ref(), &p.pairs, k, &mut StdRng::seed_from_u64(1));
    let vs: Vec<Vec<f64>> = (0..n).map(|c| diff(&p, c)).collect();
    let d = p.x.nrows();
    let means: Vec<Option<Vec<f64>>> = (0..k)
        .map(|g| {
            let m: Vec<usize> = (0..n).filter(|&c| assign[c] == g).collect();
            (!m.is_empty()).then(|| {
                (0..d)
                    .map(|i| m.iter().map(|&c| vs[c][i]).sum::<f64>() / m.len() as f64)
                    .collect()
            })
        })
        .collect();
    let dist = |v: &[f64], m: &[f64]| v.iter().zip(m).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
    let mut misplaced = 0;
    for c in 0..n {
        let own = dist(&vs[c], means[assign[c]].as_ref().unwrap());
        let best = means
            .iter()
            .flatten()
            .map(|m| dist(&vs[c], m))
            .fold(f64::INFINITY, f64::min);
        if own > best + 1e-9 {
            misplaced += 1;
        }
    }
    assert_eq!(misplaced, 0, "candidates not at their nearest mean");
}

#[test]
fn proportional_sampling_is_distinct_and_follows_the_weights() {
    let w = [1.0, 2.0, 3.0, 4.0, 10.0];
    let total: f64 = w.iter().sum();
    let mut rng = StdRng::seed_from_u64(12);
    let draws = 20_000;
    // First draw ∝ w.
    let mut first = [0u32; 5];
    // Ordered first two ∝ w_i/W · w_j/(W − w_i).
    let mut second = [[0u32; 5]; 5];
    for _ in 0..draws {
        let s = sample_proportional(&w, 2, &mut rng);
        assert_eq!(s.len(), 2);
        assert_ne!(s[0], s[1]);
        first[s[0]] += 1;
        second[s[0]][s[1]] += 1;
    }
    let chi1: f64 = (0..5)
        .map(|i| {
            let e = draws as f64 * w[i] / total;
            (first[i] as f64 - e).powi(2) / e
        })
        .sum();
    // 4 degrees of freedom: mean 4, sd √8; the bound is ~5 sd out.
    assert!(chi1 < 4.0 + 5.0 * 8f64.sqrt(), "chi-square {chi1}");
    let mut chi2 = 0.0;
    for i in 0..5 {
        for j in (0..5).filter(|&j| j != i) {
            let e = draws as f64 * w[i] / total * w[j] / (total - w[i]);
            chi2 += (second[i][j] as f64 - e).powi(2) / e;
        }
    }
    // 19 degrees of freedom.
    assert!(chi2 < 19.0 + 5.0 * 38f64.sqrt(), "chi-square {chi2}");
    // k beyond the length returns everything once; zero weights come last.
    let mut all = sample_proportional(&[0.0, 1.0, 2.0], 9, &mut rng);
    assert_eq!(all[2], 0);
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2]);
    assert!(sample_proportional(&w, 0, &mut rng).is_empty());
    assert!(sample_proportional(&[], 3, &mut rng).is_empty());
}

#[test]
fn coreset_strategy_samples_distinct_candidates_scored_by_sensitivity() {
    let p = problem(5, 40, 6, 14);
    let n = p.pairs.len();
    let params = SelectionParams {
        coreset_clusters: 4,
        ..Default::default()
    };
    let run = |seed| {
        select(
            StrategyKind::Coreset,
            p.input(15),
            &params,
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let picks = run(4);
    assert_eq!(picks, run(4), "seeded runs agree");
    assert_eq!(picks.len(), 15);
    let mut seen: Vec<usize> = picks.iter().map(|pk| pk.candidate).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 15);
    // Same rng stream as the strategy: the clustering, then the sensitivities of the picks.
    let mut rng = StdRng::seed_from_u64(4);
    let assign = kmeans(p.x.as_ref(), &p.pairs, 4, &mut rng);
    let sens = sensitivities(p.x.as_ref(), &p.pairs, &assign, 4, params.coreset_radius).unwrap();
    for pk in &picks {
        assert!((pk.score - sens[pk.candidate]).abs() < 1e-12);
        assert!(pk.score > 0.0 && pk.score <= n as f64);
    }
}
