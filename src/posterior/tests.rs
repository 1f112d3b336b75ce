//! Posterior tests: every result is checked against an independent dense computation.

// Dense references are written in index notation, mirroring the math.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::linalg::tests::{max_rel, spd_with_spectrum};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Gaussian elimination with partial pivoting: an independent dense solver for the checks.
fn dense_solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(r, &bi)| {
            let mut r = r.clone();
            r.push(bi);
            r
        })
        .collect();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .unwrap();
        m.swap(col, piv);
        for row in col + 1..n {
            let f = m[row][col] / m[col][col];
            for k in col..=n {
                m[row][k] -= f * m[col][k];
            }
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| m[i][k] * x[k]).sum();
        x[i] = (m[i][n] - s) / m[i][i];
    }
    x
}

fn dense_h(p: &Posterior) -> Vec<Vec<f64>> {
    let l = p.cholesky();
    let d = p.dim();
    (0..d)
        .map(|i| {
            (0..d)
                .map(|j| (0..d).map(|k| l[(i, k)] * l[(j, k)]).sum())
                .collect()
        })
        .collect()
}

fn random_vec(d: usize, scale: f64, rng: &mut StdRng) -> Vec<f64> {
    (0..d).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A posterior with some labels already applied, so H is not isotropic and θ ≠ 0.
fn trained(d: usize, n: usize, seed: u64) -> (Posterior, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p = Posterior::new(d, 0.7).unwrap();
    let truth = random_vec(d, 1.0, &mut rng);
    for _ in 0..n {
        let v = random_vec(d, 1.0, &mut rng);
        let y = if rng.random::<f64>() < sigmoid(dot(&truth, &v)) {
            1.0
        } else {
            0.0
        };
        p.update(&v, y).unwrap();
    }
    (p, rng)
}

#[test]
fn one_label_update_equals_dense_newton_mode() {
    for &(d, seed) in &[(1usize, 1u64), (3, 2), (8, 3), (20, 4)] {
        for &y in &[1.0, 0.0, 0.5, 0.8] {
            let (mut p, mut rng) = trained(d, 5, seed);
            let theta0 = p.theta().to_vec();
            let h = dense_h(&p);
            let v = random_vec(d, 2.0, &mut rng);
            p.update(&v, y).unwrap();
            // Damped dense Newton on f(θ) = ½(θ−θ0)ᵀH(θ−θ0) + nll(θᵀv, y) in all d coordinates.
            let f = |t: &[f64]| {
                let diff: Vec<f64> = t.iter().zip(&theta0).map(|(a, b)| a - b).collect();
                let hd: Vec<f64> = (0..d).map(|i| dot(&h[i], &diff)).collect();
                0.5 * dot(&diff, &hd) + crate::linalg::label_nll(dot(t, &v), y)
            };
            let mut theta = theta0.clone();
            for _ in 0..200 {
                let pr = sigmoid(dot(&theta, &v));
                let diff: Vec<f64> = theta.iter().zip(&theta0).map(|(a, b)| a - b).collect();
                let grad: Vec<f64> = (0..d)
                    .map(|i| dot(&h[i], &diff) - (y - pr) * v[i])
                    .collect();
                let w = pr * (1.0 - pr);
                let hess: Vec<Vec<f64>> = (0..d)
                    .map(|i| (0..d).map(|j| h[i][j] + w * v[i] * v[j]).collect())
                    .collect();
                let step = dense_solve(&hess, &grad);
                let mut t = 1.0;
                let f0 = f(&theta);
                loop {
                    let cand: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
                    if f(&cand) <= f0 || t < 1e-10 {
                        theta = cand;
                        break;
                    }
                    t *= 0.5;
                }
            }
            let err = max_rel(p.theta(), &theta);
            assert!(err <= 1e-8, "d={d} y={y}: relative error {err}");
            // H' = H + w' v vᵀ at the new mode.
            let pr = sigmoid(dot(&theta, &v));
            let w = pr * (1.0 - pr);
            let h2 = dense_h(&p);
            for i in 0..d {
                for j in 0..d {
                    let want = h[i][j] + w * v[i] * v[j];
                    assert!((h2[i][j] - want).abs() <= 1e-10 * (1.0 + want.abs()));
                }
            }
        }
    }
}

#[test]
fn step_solver_satisfies_its_equation() {
    for &(m, s, y) in &[
        (0.0, 0.0, 1.0),
        (3.0, 100.0, 0.0),
        (-40.0, 1e4, 1.0),
        (5.0, 1e-9, 0.5),
        (0.3, 7.0, 0.2),
    ] {
        let c = solve_step(m, s, y);
        assert!(
            (c - (y - sigmoid(m + c * s))).abs() < 1e-12,
            "m={m} s={s} y={y}"
        );
    }
}

#[test]
fn predict_matches_dense_inverse() {
    let (p, mut rng) = trained(6, 10, 11);
    let v = random_vec(6, 1.0, &mut rng);
    let pred = p.predict(&v).unwrap();
    let hinv_v = dense_solve(&dense_h(&p), &v);
    assert!((pred.variance - dot(&v, &hinv_v)).abs() < 1e-10 * pred.variance);
    assert!((pred.mean - dot(p.theta(), &v)).abs() < 1e-12);
    let diag = p.marginal_variances();
    for (i, &dv) in diag.iter().enumerate() {
        let mut e = vec![0.0; 6];
        e[i] = 1.0;
        let col = dense_solve(&dense_h(&p), &e);
        assert!((dv - col[i]).abs() < 1e-10 * col[i]);
    }
}

#[test]
fn refit_reaches_zero_gradient_and_matches_from_scratch() {
    let (mut online, _) = trained(12, 80, 21);
    let labels: Vec<Label> = online.labels().cloned().collect();
    online.refit(RefitOptions::default()).unwrap();
    let g = online.gradient();
    let gn = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(gn < 1e-9, "gradient at MAP {gn}");

    // From scratch: a fresh prior and one refit over the same labels, started at θ = 0.
    let mut scratch = Posterior::new(12, 0.7).unwrap();
    for l in &labels {
        scratch.labels.push(Arc::new(l.clone()));
        scratch.weights.push(0.0);
    }
    scratch.refit(RefitOptions::default()).unwrap();
    assert!(max_rel(online.theta(), scratch.theta()) < 1e-9);
    assert!((online.log_det() - scratch.log_det()).abs() < 1e-9 * scratch.log_det().abs());
    // The factor is the Hessian at the MAP: H₀ + Σ p(1−p) v vᵀ computed densely.
    let d = 12;
    let h = dense_h(&scratch);
    for i in 0..d {
        for j in 0..d {
            let mut want = if i == j { 0.7 } else { 0.0 };
            for l in &labels {
                let pr = sigmoid(dot(scratch.theta(), &l.v));
                want += pr * (1.0 - pr) * l.v[i] * l.v[j];
            }
            assert!((h[i][j] - want).abs() < 1e-9 * (1.0 + want.abs()));
        }
    }
}

#[test]
fn off_thread_refit_reapplies_later_labels() {
    let (mut p, mut rng) = trained(5, 30, 5);
    let job = p.refit_job();
    let later: Vec<(Vec<f64>, f64)> = (0..4)
        .map(|_| (random_vec(5, 1.0, &mut rng), 1.0))
        .collect();
    for (v, y) in &later {
        p.update(v, *y).unwrap();
    }
    let outcome = std::thread::spawn(move || job.run(RefitOptions::default()).unwrap())
        .join()
        .unwrap();
    p.install_refit(outcome).unwrap();
    assert_eq!(p.label_count(), 34);
    // Equivalent sequential computation: refit on the first 30, then the same 4 online updates.
    let (mut q, _) = trained(5, 30, 5);
    q.refit(RefitOptions::default()).unwrap();
    for (v, y) in &later {
        q.update(v, *y).unwrap();
    }
    assert!(max_rel(p.theta(), q.theta()) < 1e-12);
    assert!((p.log_det() - q.log_det()).abs() < 1e-10);
}

#[test]
fn rebuilt_factor_equals_incremental_factor() {
    let (p, _) = trained(7, 25, 8);
    let rebuilt = p.rebuild_factor(None).unwrap();
    let err = (&rebuilt - p.cholesky()).norm_l2() / rebuilt.norm_l2();
    assert!(err < 1e-10, "{err}");
}

#[test]
fn prequential_records_prediction_before_update() {
    let mut p = Posterior::new(2, 1.0).unwrap();
    let r = p.update(&[1.0, 0.0], 1.0).unwrap();
    assert_eq!(r.predicted.p, 0.5);
    assert_eq!(p.prequential().labels, 1);
    assert!((p.prequential().log_loss().unwrap() - std::f64::consts::LN_2).abs() < 1e-12);
    // p = 0.5 predicts b, so the first decided label counts as a miss.
    assert_eq!(p.prequential().accuracy(), Some(0.0));
    p.update(&[1.0, 0.0], 1.0).unwrap();
    assert_eq!(p.prequential().accuracy(), Some(0.5));
    p.update(&[1.0, 0.0], 0.5).unwrap();
    assert_eq!(p.prequential().decided, 2);
}

#[test]
fn parts_round_trip_and_warm_start() {
    let (mut p, mut rng) = trained(4, 9, 13);
    let q = Posterior::from_parts(p.to_parts()).unwrap();
    assert_eq!(q.to_parts(), p.to_parts());
    p.consolidate();
    let r = Posterior::from_parts(p.to_parts()).unwrap();
    assert_eq!(r.to_parts(), p.to_parts());
    // A warm start from the exported (θ, H) predicts like the original.
    let h = p.cholesky() * p.cholesky().transpose();
    let w = Posterior::warm_start(p.theta().to_vec(), h).unwrap();
    let v = random_vec(4, 1.0, &mut rng);
    let (a, b) = (p.predict(&v).unwrap(), w.predict(&v).unwrap());
    assert!((a.mean - b.mean).abs() < 1e-12 && (a.variance - b.variance).abs() < 1e-10);
}

#[test]
fn consolidation_keeps_the_posterior() {
    let (mut p, mut rng) = trained(6, 20, 17);
    p.refit(RefitOptions::default()).unwrap();
    let (theta, ld) = (p.theta().to_vec(), p.log_det());
    p.consolidate();
    assert_eq!(p.label_count(), 0);
    assert!(max_rel(p.theta(), &theta) < 1e-14);
    assert!((p.log_det() - ld).abs() < 1e-9);
    // A refit of an empty store keeps the consolidated mode.
    p.refit(RefitOptions::default()).unwrap();
    assert!(max_rel(p.theta(), &theta) < 1e-10);
    let v = random_vec(6, 1.0, &mut rng);
    p.update(&v, 1.0).unwrap();
    assert_eq!(p.labels_applied(), 21);
}

#[test]
fn bad_numeric_input_is_a_typed_error() {
    let mut p = Posterior::new(3, 1.0).unwrap();
    assert!(matches!(
        p.update(&[1.0, 2.0], 1.0),
        Err(CoreError::Dimension {
            expected: 3,
            got: 2,
            ..
        })
    ));
    assert!(matches!(
        p.update(&[1.0, f64::NAN, 0.0], 1.0),
        Err(CoreError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        p.update(&[1.0, f64::INFINITY, 0.0], 1.0),
        Err(CoreError::NonFinite { .. })
    ));
    assert!(matches!(p.update(&[], 1.0), Err(CoreError::Empty { .. })));
    assert!(matches!(
        p.update(&[1.0, 0.0, 0.0], 1.5),
        Err(CoreError::LabelOutOfRange { .. })
    ));
    assert!(matches!(
        p.update(&[1.0, 0.0, 0.0], f64::NAN),
        Err(CoreError::LabelOutOfRange { .. })
    ));
    assert!(matches!(
        p.predict(&[0.0; 4]),
        Err(CoreError::Dimension { .. })
    ));
    assert!(Posterior::new(0, 1.0).is_err());
    assert!(Posterior::new(3, 0.0).is_err());
    assert!(Posterior::new(3, f64::NAN).is_err());
    // Nothing above changed the model.
    assert_eq!(p.labels_applied(), 0);
    assert_eq!(p.version(), 0);
    let msg = p.update(&[1.0, 2.0], 1.0).unwrap_err().to_string();
    assert!(msg.contains("expected dimension 3, got 2"), "{msg}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// H stays positive definite and log det never decreases as labels arrive.
    #[test]
    fn log_det_grows_and_h_stays_pd(seed in 0u64..1000, d in 1usize..10, n in 1usize..25) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = Posterior::new(d, rng.random_range(0.01..10.0)).unwrap();
        let mut last = p.log_det();
        for _ in 0..n {
            let scale = rng.random_range(0.01..20.0);
            let v = random_vec(d, scale, &mut rng);
            let y = [0.0, 1.0, 0.5, rng.random::<f64>()][rng.random_range(0..4)];
            p.update(&v, y).unwrap();
            let ld = p.log_det();
            prop_assert!(ld >= last - 1e-9 * last.abs().max(1.0));
            last = ld;
            for i in 0..d {
                prop_assert!(p.cholesky()[(i, i)] > 0.0);
            }
        }
    }

    /// The refitted posterior does not depend on label order.
    #[test]
    fn refit_is_order_independent(seed in 0u64..1000, d in 1usize..6, n in 2usize..20) {
        let mut rng = StdRng::seed_from_u64(seed);
        let data: Vec<(Vec<f64>, f64)> = (0..n)
            .map(|_| (random_vec(d, 2.0, &mut rng), [0.0, 1.0, 0.5][rng.random_range(0..3)]))
            .collect();
        let mut a = Posterior::new(d, 1.0).unwrap();
        let mut b = Posterior::new(d, 1.0).unwrap();
        for (v, y) in &data { a.update(v, *y).unwrap(); }
        for (v, y) in data.iter().rev() { b.update(v, *y).unwrap(); }
        a.refit(RefitOptions::default()).unwrap();
        b.refit(RefitOptions::default()).unwrap();
        prop_assert!(max_rel(a.theta(), b.theta()) < 1e-8);
        prop_assert!((a.log_det() - b.log_det()).abs() < 1e-8 * a.log_det().abs().max(1.0));
    }
}

/// `Xᵀ H⁻¹ X` by the independent dense solver, with `H = L Lᵀ` of the posterior's own factor.
fn dense_covariance_gram(p: &Posterior, x: &Mat<f64>) -> Vec<Vec<f64>> {
    let h = dense_h(p);
    let solved: Vec<Vec<f64>> = (0..x.ncols())
        .map(|j| dense_solve(&h, &(0..x.nrows()).map(|i| x[(i, j)]).collect::<Vec<_>>()))
        .collect();
    (0..x.ncols())
        .map(|a| {
            (0..x.ncols())
                .map(|b| (0..x.nrows()).map(|i| x[(i, a)] * solved[b][i]).sum())
                .collect()
        })
        .collect()
}

/// Both whitening maps against a dense `H⁻¹`: whitened inner products are `x_aᵀ H⁻¹ x_b`, one vector
/// whitens like a column of a block, and the low-rank form holds through online updates, a refit with
/// later labels re-applied, and a checkpoint round trip (all of which must keep the stored weights
/// equal to the ones in the factor).
#[test]
fn whitening_maps_give_the_posterior_covariance() {
    // (d, labels before the refit, refit): the first four end with fewer than d/8 labels (low-rank
    // form), the last two with more.
    for (d, labels, refit) in [
        (8, 0, false),
        (16, 1, false),
        (24, 1, true),
        (33, 3, true),
        (9, 5, false),
        (12, 6, true),
    ] {
        let (mut p, mut rng) = trained(d, labels, 40 + d as u64);
        if refit {
            let job = p.refit_job();
            p.update(&random_vec(d, 1.0, &mut rng), 1.0).unwrap();
            p.install_refit(job.run(RefitOptions::default()).unwrap())
                .unwrap();
            p = Posterior::from_parts(p.to_parts()).unwrap();
        }
        let k = p.label_count();
        let x = Mat::<f64>::from_fn(d, 6, |_, _| rng.random_range(-2.0..2.0));
        let want = dense_covariance_gram(&p, &x);
        let scale = want.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        let own = p.whitener();
        assert_eq!(own.is_low_rank(), 8 * k < d, "d {d}, {k} labels");
        for w in [own, Whitener::Cholesky(p.cholesky())] {
            let z = w.whiten(x.as_ref());
            for a in 0..6 {
                for b in 0..6 {
                    let got: f64 = (0..d).map(|i| z[(i, a)] * z[(i, b)]).sum();
                    assert!(
                        (got - want[a][b]).abs() <= 1e-10 * scale,
                        "d {d}, {k} labels, low-rank {}: ({a}, {b}) {got} vs {}",
                        w.is_low_rank(),
                        want[a][b]
                    );
                }
            }
            let mut v: Vec<f64> = (0..d).map(|i| x[(i, 2)]).collect();
            w.whiten_vec(&mut v);
            assert!(max_rel(&v, &(0..d).map(|i| z[(i, 2)]).collect::<Vec<_>>()) < 1e-12);
        }
    }
}

#[test]
fn low_rank_whitening_only_under_an_isotropic_prior_with_few_labels() {
    let (mut p, mut rng) = trained(24, 2, 3);
    assert!(p.whitener().is_low_rank());
    p.update(&random_vec(24, 1.0, &mut rng), 0.0).unwrap();
    assert!(!p.whitener().is_low_rank(), "3 labels at d = 24");
    let (mut p, _) = trained(24, 2, 3);
    p.consolidate();
    assert_eq!(p.label_count(), 0);
    assert!(
        !p.whitener().is_low_rank(),
        "dense prior after consolidation"
    );
    let warm = Posterior::warm_start(vec![0.0; 24], Mat::<f64>::identity(24, 24)).unwrap();
    assert!(
        !warm.whitener().is_low_rank(),
        "dense prior of a warm start"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Evidence (auto prior)

/// Labels from a true θ of scale `scale` (so the evidence-optimal prior is finite and interior).
fn labelled(d: usize, n: usize, scale: f64, seed: u64) -> Vec<(Vec<f64>, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let truth = random_vec(d, scale, &mut rng);
    (0..n)
        .map(|_| {
            let v = random_vec(d, 1.0, &mut rng);
            let y = if rng.random::<f64>() < sigmoid(dot(&truth, &v)) {
                1.0
            } else {
                0.0
            };
            (v, y)
        })
        .collect()
}

fn fitted(d: usize, lambda0: f64, labels: &[(Vec<f64>, f64)]) -> Posterior {
    let mut p = Posterior::new(d, lambda0).unwrap();
    for (v, y) in labels {
        p.update(v, *y).unwrap();
    }
    p.refit(RefitOptions::default()).unwrap();
    p
}

#[test]
fn trace_inverse_and_log_evidence_match_dense_computations() {
    let (p, _) = trained(6, 40, 3);
    let h = dense_h(&p);
    let d = p.dim();
    // tr(H⁻¹) column by column with the independent solver.
    let tr: f64 = (0..d)
        .map(|j| {
            let e: Vec<f64> = (0..d).map(|i| f64::from(u8::from(i == j))).collect();
            dense_solve(&h, &e)[j]
        })
        .sum();
    assert!(
        (p.trace_inverse() - tr).abs() < 1e-10 * tr,
        "{} vs {tr}",
        p.trace_inverse()
    );
    // Laplace evidence from its definition, with log det H by Gaussian elimination.
    let mut m = h.clone();
    let mut log_det = 0.0;
    for c in 0..d {
        for r in c + 1..d {
            let f = m[r][c] / m[c][c];
            for k in c..d {
                m[r][k] -= f * m[c][k];
            }
        }
        log_det += m[c][c].ln();
    }
    let lambda0 = p.prior_precision().unwrap();
    let fit: f64 = p
        .labels()
        .map(|l| label_nll(dot(p.theta(), &l.v), l.y))
        .sum();
    let sq: f64 = p.theta().iter().map(|t| t * t).sum();
    let want = -fit - 0.5 * lambda0 * sq + 0.5 * d as f64 * lambda0.ln() - 0.5 * log_det;
    assert!((p.log_evidence().unwrap() - want).abs() < 1e-9 * want.abs().max(1.0));
}

#[test]
fn evidence_fixed_point_finds_the_grid_maximum_of_the_laplace_evidence() {
    // MacKay's fixed point holds the Fisher weights fixed, so it lands next to (not exactly on) the
    // maximiser of the Laplace evidence: within a few grid steps, and no more than a small fraction of a
    // nat below the grid's best.
    for (d, n, scale, seed) in [(5, 300, 0.8, 1u64), (8, 300, 1.0, 2), (4, 600, 2.0, 3)] {
        let labels = labelled(d, n, scale, seed);
        let grid: Vec<f64> = (0..=160)
            .map(|i| 10f64.powf(-3.0 + i as f64 * 0.05))
            .collect();
        let (best_lambda, best_ev) = grid
            .iter()
            .map(|&l| (l, fitted(d, l, &labels).log_evidence().unwrap()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert!(
            best_lambda > 1e-3 && best_lambda < 1e5,
            "grid maximum {best_lambda} on the edge: the case is not interior"
        );
        // Start far from the answer; the fixed point must still get there.
        for start in [best_lambda * 1e-3, best_lambda * 1e3] {
            let mut p = Posterior::new(d, start).unwrap();
            for (v, y) in &labels {
                p.update(v, *y).unwrap();
            }
            let ev = EvidenceOptions {
                tolerance: 1e-6,
                max_iterations: 200,
                ..Default::default()
            };
            p.refit_evidence(RefitOptions::default(), &ev).unwrap();
            let lambda = p.prior_precision().unwrap();
            assert!(
                (lambda.ln() - best_lambda.ln()).abs() < 0.25,
                "d {d} seed {seed}: fixed point {lambda} vs grid maximum {best_lambda}"
            );
            let here = fitted(d, lambda, &labels).log_evidence().unwrap();
            assert!(
                here >= best_ev - 0.02,
                "evidence {here} at the fixed point vs {best_ev} at the grid's best"
            );
            // The installed mode is the MAP under the chosen prior.
            let g = p.gradient();
            assert!(g.iter().all(|x| x.abs() < 1e-8), "gradient {g:?}");
        }
    }
}

#[test]
fn evidence_keeps_a_dense_prior_and_clamps_without_labels() {
    // No labels: θ̂ stays at the prior mean, so the step only moves α up, by at most the damping per
    // iteration, and never past the clamp.
    let mut p = Posterior::new(4, 2.0).unwrap();
    let ev = EvidenceOptions {
        max_iterations: 3,
        ..Default::default()
    };
    p.refit_evidence(RefitOptions::default(), &ev).unwrap();
    let l = p.prior_precision().unwrap();
    assert!(
        l > 2.0 && l <= 2.0 * (3.0 * ev.max_log_step).exp() * (1.0 + 1e-12),
        "{l}"
    );
    // A consolidated (dense) prior is kept as it is.
    let (mut q, _) = trained(4, 20, 6);
    q.consolidate();
    q.refit_evidence(RefitOptions::default(), &ev).unwrap();
    assert!(q.prior_precision().is_none());
}

#[test]
fn prior_setting_parses_auto_and_numbers_and_names_bad_values() {
    assert_eq!("auto".parse::<PriorSetting>().unwrap(), PriorSetting::Auto);
    assert_eq!(
        "2.5".parse::<PriorSetting>().unwrap(),
        PriorSetting::Fixed(2.5)
    );
    for bad in ["0", "-1", "inf", "NaN", "automatic", ""] {
        let e = bad.parse::<PriorSetting>().unwrap_err().to_string();
        assert!(
            e.contains("prior_precision") && e.contains("auto"),
            "{bad}: {e}"
        );
    }
    assert_eq!(PriorSetting::Auto.initial(1152.0), 1152.0);
    assert_eq!(PriorSetting::Fixed(3.0).initial(1152.0), 3.0);
}

#[test]
fn factor_rebuild_while_a_refit_is_reinstalled_reads_only_the_labels_it_holds() {
    // While a refit's later labels are re-applied, the factor holds the refit's labels only and the
    // weights say so; a non-positive pivot there rebuilds H from those labels plus the one being applied.
    // (A pivot failure cannot be provoked with w > 0, so the state is set up directly.)
    let (mut p, mut rng) = trained(5, 30, 12);
    let outcome = p.refit_job().run(RefitOptions::default()).unwrap();
    let later: Vec<Vec<f64>> = (0..3).map(|_| random_vec(5, 1.0, &mut rng)).collect();
    for v in &later {
        p.update(v, 1.0).unwrap();
    }
    p.weights.truncate(30);
    p.weights.copy_from_slice(&outcome.weights);
    let extra = (later[0].as_slice(), 0.2);
    let rebuilt = p.rebuild_factor(Some(extra)).unwrap();
    // Dense reference: prior + the 30 refit labels at their weights + the extra label.
    let d = 5;
    let mut h = Mat::<f64>::identity(d, d) * faer::Scale(0.7);
    let labels: Vec<&Label> = p.labels().take(30).collect();
    for (l, w) in labels.iter().zip(&outcome.weights) {
        for i in 0..d {
            for j in 0..d {
                h[(i, j)] += w * l.v[i] * l.v[j];
            }
        }
    }
    for i in 0..d {
        for j in 0..d {
            h[(i, j)] += 0.2 * later[0][i] * later[0][j];
        }
    }
    let got = &rebuilt * rebuilt.transpose();
    let err = (&got - &h).norm_l2() / h.norm_l2();
    assert!(
        err < 1e-12,
        "rebuilt H differs from the dense reference: {err}"
    );
}

// ---- The fused one-label update against the implementation it replaced ----

/// The one-label update as it was before the fused passes over the factor: two faer triangular solves,
/// then faer's rank-one update, refactorising from the stored weights on a non-positive pivot (or always,
/// with `force_refactor`). `update` is checked against it.
fn update_reference(p: &mut Posterior, v: &[f64], y: f64, force_refactor: bool) -> UpdateReport {
    let label = Label::new(v.to_vec(), y).unwrap();
    let m = dot(&p.theta, v);
    let mut hv = v.to_vec();
    solve_lower(p.chol.as_ref(), &mut hv);
    let s = dot(&hv, &hv);
    solve_lower_transpose(p.chol.as_ref(), &mut hv); // hv = H⁻¹ v
    let predicted = Prediction {
        mean: m,
        variance: s,
        p: sigmoid(m),
    };
    let c = solve_step(m, s, y);
    for (t, h) in p.theta.iter_mut().zip(&hv) {
        *t += c * h;
    }
    let p_new = sigmoid(m + c * s);
    let weight = p_new * (1.0 - p_new);
    let mut refactored = false;
    if weight > 0.0 && (!crate::linalg::rank_one_update(&mut p.chol, v, weight) || force_refactor) {
        p.refactorizations += 1;
        refactored = true;
        p.chol = p.rebuild_factor(Some((v, weight))).unwrap();
    }
    p.prequential.record(predicted.p, y);
    p.labels.push(Arc::new(label));
    p.weights.push(weight);
    p.labels_applied += 1;
    p.version += 1;
    UpdateReport {
        predicted,
        step: c,
        weight,
        refactored,
    }
}

fn rel_diff(a: f64, b: f64, scale: f64) -> f64 {
    (a - b).abs() / scale.max(1e-300)
}

/// θ, the factor and the predictions of `new` equal those of `old` to `tol` relative.
fn assert_same_posterior(
    new: &Posterior,
    old: &Posterior,
    probes: &[Vec<f64>],
    tol: f64,
    what: &str,
) {
    let e = max_rel(new.theta(), old.theta());
    assert!(e <= tol, "{what}: θ differs by {e:e}");
    let e = (&new.chol - &old.chol).norm_l2() / old.chol.norm_l2();
    assert!(e <= tol, "{what}: factor differs by {e:e}");
    let e = max_rel(&new.weights, &old.weights);
    assert!(e <= tol, "{what}: Fisher weights differ by {e:e}");
    assert_eq!(new.refactorizations, old.refactorizations, "{what}");
    let theta_norm = old.theta().iter().map(|x| x * x).sum::<f64>().sqrt();
    for v in probes {
        let (a, b) = (new.predict(v).unwrap(), old.predict(v).unwrap());
        let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let e = rel_diff(a.mean, b.mean, theta_norm * v_norm);
        assert!(e <= tol, "{what}: predicted mean differs by {e:e}");
        let e = rel_diff(a.variance, b.variance, b.variance);
        assert!(e <= tol, "{what}: predicted variance differs by {e:e}");
    }
}

/// `‖θ‖·‖v‖`, at least 1: the scale of a margin `θᵀv` and of its rounding error.
fn margin_scale(p: &Posterior, v: &[f64]) -> f64 {
    let norm = |x: &[f64]| x.iter().map(|t| t * t).sum::<f64>().sqrt();
    (norm(p.theta()) * norm(v)).max(1.0)
}

/// The reports of one label agree; `scale` is [`margin_scale`] before the label.
fn assert_same_report(a: &UpdateReport, b: &UpdateReport, scale: f64, tol: f64, what: &str) {
    assert_eq!(a.refactored, b.refactored, "{what}");
    let e = rel_diff(a.predicted.mean, b.predicted.mean, scale);
    assert!(e <= tol, "{what}: margin differs by {e:e}");
    let e = rel_diff(
        a.predicted.variance,
        b.predicted.variance,
        b.predicted.variance,
    );
    assert!(e <= tol, "{what}: s differs by {e:e}");
    let e = rel_diff(a.step, b.step, b.step.abs().max(1e-3));
    assert!(e <= tol, "{what}: step differs by {e:e}");
    // The weight relative to its largest value, ¼. (Relative to itself it is only as accurate as the
    // new margin m + c·s, and the step solver stops at |Δc| ≈ 1e-16, which is Δ(c·s) ≈ 1e-10 at s = 1e6.)
    let e = rel_diff(a.weight, b.weight, 0.25);
    assert!(e <= tol, "{what}: weight differs by {e:e}");
}

/// A dense prior `Q diag(λ) Qᵀ` with eigenvalues from `lo` to `hi` (log-spaced).
fn dense_prior(d: usize, lo: f64, hi: f64, rng: &mut StdRng) -> Prior {
    let h = spd_with_spectrum(d, lo, hi, rng);
    Prior {
        mean: random_vec(d, 0.5, rng),
        precision: PriorPrecision::Dense(h),
    }
}

/// Applies the same labels through `update` and through [`update_reference`], comparing every report and,
/// every few labels, the whole posterior. Returns the condition number of the final precision.
fn compare_with_reference(
    start: Posterior,
    labels: &[(Vec<f64>, f64)],
    tol: f64,
    what: &str,
) -> f64 {
    let d = start.dim();
    let mut rng = StdRng::seed_from_u64(d as u64);
    let probes: Vec<Vec<f64>> = (0..4).map(|_| random_vec(d, 1.0, &mut rng)).collect();
    let (mut new, mut old) = (start.clone(), start);
    for (k, (v, y)) in labels.iter().enumerate() {
        let scale = margin_scale(&old, v);
        let a = new.update(v, *y).unwrap();
        let b = update_reference(&mut old, v, *y, false);
        let what = format!("{what}, d={d}, label {k}");
        assert_same_report(&a, &b, scale, tol, &what);
        if k % 7 == 6 || k + 1 == labels.len() {
            assert_same_posterior(&new, &old, &probes, tol, &what);
        }
    }
    let (a, b) = (new.prequential, old.prequential);
    assert_eq!(
        (a.labels, a.decided, a.correct),
        (b.labels, b.decided, b.correct)
    );
    assert!(rel_diff(a.log_loss_sum, b.log_loss_sum, b.log_loss_sum) <= tol);
    assert_eq!(new.labels_applied, old.labels_applied);
    condition_number(&old)
}

/// Labels with mixed outcomes: hard, tied and soft.
fn mixed_labels(d: usize, n: usize, scale: f64, rng: &mut StdRng) -> Vec<(Vec<f64>, f64)> {
    (0..n)
        .map(|k| {
            let v = random_vec(d, scale, rng);
            let y = [1.0, 0.0, 0.5, 0.3, 1.0, 0.0][k % 6];
            (v, y)
        })
        .collect()
}

#[test]
fn fused_update_equals_the_previous_update_on_random_problems() {
    let mut rng = StdRng::seed_from_u64(21);
    for &(d, n) in &[
        (1usize, 30usize),
        (2, 30),
        (5, 40),
        (8, 40),
        (33, 40),
        (128, 30),
        (300, 20),
        (768, 8),
    ] {
        let labels = mixed_labels(d, n, 1.0, &mut rng);
        compare_with_reference(Posterior::new(d, 0.7).unwrap(), &labels, 1e-10, "isotropic");
        let prior = dense_prior(d, 0.1, 10.0, &mut rng);
        compare_with_reference(
            Posterior::from_prior(prior).unwrap(),
            &labels,
            1e-10,
            "dense prior",
        );
    }
}

/// Labels whose coordinates are scaled by `10^U(−span, span)`.
fn spread_labels(d: usize, n: usize, span: f64, rng: &mut StdRng) -> Vec<(Vec<f64>, f64)> {
    mixed_labels(d, n, 1.0, rng)
        .into_iter()
        .map(|(v, y)| {
            let v = v
                .iter()
                .map(|x| x * 10f64.powf(rng.random_range(-span..span)))
                .collect();
            (v, y)
        })
        .collect()
}

/// Condition number of the precision `p` holds.
fn condition_number(p: &Posterior) -> f64 {
    let h = &p.chol * p.chol.transpose();
    let ev = h.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
    ev[ev.len() - 1] / ev[0]
}

#[test]
fn fused_update_equals_the_previous_update_when_ill_conditioned() {
    let mut rng = StdRng::seed_from_u64(22);
    for &d in &[3usize, 16, 64, 200] {
        // Up to cond(H) ≈ 1e6 both implementations are accurate to well under 1e-10, so they must agree
        // to 1e-10: a vague prior (λ₀ = 1e-3) with label coordinates spanning two decades (s ≫ 1, so
        // ties, w = ¼ at m = 0, add w·s ≫ 1), and a dense prior with condition number 1e6.
        let labels = spread_labels(d, 30, 1.0, &mut rng);
        let start = Posterior::new(d, 1e-3).unwrap();
        let cond = compare_with_reference(start, &labels, 1e-10, "vague prior");
        assert!(cond > 1e3 || d < 16, "d={d}: cond(H) = {cond:e}");
        let prior = dense_prior(d, 1e-3, 1e3, &mut rng);
        let labels = mixed_labels(d, 30, 1.0, &mut rng);
        compare_with_reference(
            Posterior::from_prior(prior).unwrap(),
            &labels,
            1e-10,
            "cond 1e6",
        );
        // Beyond that neither is accurate to 1e-10 (both are about 1e-15·cond(H) from a dense solve);
        // they must agree to that accuracy: λ₀ = 1e-6, coordinates spanning six decades, cond ≈ 1e10.
        let labels = spread_labels(d, 30, 3.0, &mut rng);
        let start = Posterior::new(d, 1e-6).unwrap();
        let mut end = start.clone();
        for (v, y) in &labels {
            end.update(v, *y).unwrap();
        }
        let cond = condition_number(&end);
        assert!(
            cond > 1e7 || d < 16,
            "d={d}: cond(H) = {cond:e} is not ill-conditioned"
        );
        compare_with_reference(start, &labels, (1e-15 * cond).max(1e-10), "cond ≈ 1e10");
    }
}

#[test]
fn refactorisation_path_equals_the_previous_update() {
    let mut rng = StdRng::seed_from_u64(23);
    for &d in &[1usize, 4, 17, 64] {
        let (start, _) = trained(d, 12, d as u64);
        let probes: Vec<Vec<f64>> = (0..4).map(|_| random_vec(d, 1.0, &mut rng)).collect();
        let (mut new, mut old) = (start.clone(), start);
        for (k, (v, y)) in mixed_labels(d, 9, 1.0, &mut rng).iter().enumerate() {
            // Every third label goes down the fallback path in both implementations.
            let fail = k % 3 == 1;
            INJECT_PIVOT_FAILURE.with(|f| f.set(fail));
            let a = new.update(v, *y);
            INJECT_PIVOT_FAILURE.with(|f| f.set(false));
            let a = a.unwrap();
            let scale = margin_scale(&old, v);
            let b = update_reference(&mut old, v, *y, fail);
            let what = format!("d={d}, label {k}");
            assert_eq!(a.refactored, fail && a.weight > 0.0, "{what}");
            assert_same_report(&a, &b, scale, 1e-10, &what);
            assert_same_posterior(&new, &old, &probes, 1e-10, &what);
        }
        assert_eq!(new.refactorizations(), 3);
    }
}

/// Lower Cholesky factor by the textbook algorithm (independent of faer).
fn dense_cholesky(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = a.len();
    let mut l = vec![vec![0.0; n]; n];
    for j in 0..n {
        let s: f64 = (0..j).map(|k| l[j][k] * l[j][k]).sum();
        l[j][j] = (a[j][j] - s).sqrt();
        for i in j + 1..n {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            l[i][j] = (a[i][j] - s) / l[j][j];
        }
    }
    l
}

/// `H₀ + Σ w_k v_k v_kᵀ` over the stored labels, densely.
fn dense_precision(p: &Posterior) -> Vec<Vec<f64>> {
    let d = p.dim();
    let h0 = p.prior.dense_lower();
    let mut h: Vec<Vec<f64>> = (0..d)
        .map(|i| (0..d).map(|j| h0[(i.max(j), i.min(j))]).collect())
        .collect();
    for (l, w) in p.labels.iter().zip(&p.weights) {
        for i in 0..d {
            for j in 0..d {
                h[i][j] += w * l.v[i] * l.v[j];
            }
        }
    }
    h
}

#[test]
fn fused_update_matches_dense_linear_algebra() {
    let mut rng = StdRng::seed_from_u64(24);
    for d in 1..=7usize {
        let mut p = Posterior::from_prior(dense_prior(d, 0.05, 5.0, &mut rng)).unwrap();
        for (k, (v, y)) in mixed_labels(d, 25, 1.5, &mut rng).iter().enumerate() {
            let what = format!("d={d}, label {k}");
            let h = dense_precision(&p);
            let theta0 = p.theta().to_vec();
            let hv = dense_solve(&h, v);
            let report = p.update(v, *y).unwrap();
            // s = vᵀH⁻¹v, θ' = θ + c H⁻¹v, and the factor of H + w v vᵀ.
            let s = dot(v, &hv);
            let e = rel_diff(report.predicted.variance, s, s);
            assert!(e <= 1e-12, "{what}: s differs by {e:e}");
            let want: Vec<f64> = theta0
                .iter()
                .zip(&hv)
                .map(|(t, h)| t + report.step * h)
                .collect();
            let e = max_rel(p.theta(), &want);
            assert!(e <= 1e-12, "{what}: θ differs by {e:e}");
            let m = dot(&want, v);
            let e = (report.step - (*y - sigmoid(m))).abs();
            assert!(e <= 1e-12, "{what}: step equation off by {e:e}");
            let l = dense_cholesky(&dense_precision(&p));
            let scale = l.iter().flatten().fold(0.0f64, |a, x| a.max(x.abs()));
            for i in 0..d {
                for j in 0..d {
                    let e = (p.cholesky()[(i, j)] - l[i][j]).abs() / scale;
                    assert!(e <= 1e-12, "{what}: L[{i},{j}] differs by {e:e}");
                }
            }
        }
    }
}

// ---- update_many: queued labels as one exact batch ----

/// `update_many` against the previous one-at-a-time update, for batch sizes below, at and across
/// `MAX_BATCH`.
fn compare_batch_with_reference(
    start: Posterior,
    labels: &[(Vec<f64>, f64)],
    tol: f64,
    what: &str,
) {
    let d = start.dim();
    let mut rng = StdRng::seed_from_u64(d as u64 + 1);
    let probes: Vec<Vec<f64>> = (0..4).map(|_| random_vec(d, 1.0, &mut rng)).collect();
    let mut old = start.clone();
    let (want, scales): (Vec<UpdateReport>, Vec<f64>) = labels
        .iter()
        .map(|(v, y)| {
            let scale = margin_scale(&old, v);
            (update_reference(&mut old, v, *y, false), scale)
        })
        .unzip();
    for chunk in [2usize, 3, MAX_BATCH, labels.len()] {
        let mut new = start.clone();
        let mut got = Vec::new();
        for part in labels.chunks(chunk) {
            got.extend(
                new.update_many(part.iter().map(|(v, y)| (v.as_slice(), *y)))
                    .unwrap(),
            );
        }
        let what = format!("{what}, d={d}, chunks of {chunk}");
        assert_eq!(got.len(), want.len());
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_same_report(a, b, scales[k], tol, &format!("{what}, label {k}"));
        }
        assert_same_posterior(&new, &old, &probes, tol, &what);
        assert_eq!(new.labels_applied(), old.labels_applied());
        assert_eq!(new.version(), old.version());
    }
}

#[test]
fn batch_update_equals_the_previous_update_one_label_at_a_time() {
    let mut rng = StdRng::seed_from_u64(31);
    for &(d, n) in &[
        (1usize, 20usize),
        (2, 20),
        (7, 40),
        (33, 40),
        (128, 24),
        (400, 20),
    ] {
        let labels = mixed_labels(d, n, 1.0, &mut rng);
        compare_batch_with_reference(Posterior::new(d, 0.7).unwrap(), &labels, 1e-10, "isotropic");
        let (trained_start, _) = trained(d, 10, d as u64);
        compare_batch_with_reference(trained_start, &labels, 1e-10, "trained");
        // Ill-conditioned, as in the one-label test: vague prior, coordinates over two decades; and a
        // dense prior with condition number 1e6.
        let labels = spread_labels(d, n, 1.0, &mut rng);
        compare_batch_with_reference(Posterior::new(d, 1e-3).unwrap(), &labels, 1e-10, "vague");
        let prior = dense_prior(d, 1e-3, 1e3, &mut rng);
        let labels = mixed_labels(d, n, 1.0, &mut rng);
        compare_batch_with_reference(
            Posterior::from_prior(prior).unwrap(),
            &labels,
            1e-10,
            "cond 1e6",
        );
    }
}

#[test]
fn batch_update_with_zero_weight_labels_and_an_invalid_label() {
    // A prior mean far along e₀: a label along e₀ won by the favourite has p′ = 1 exactly, weight 0.
    let d = 9;
    let mut rng = StdRng::seed_from_u64(32);
    let mut mean = vec![0.0; d];
    mean[0] = 100.0;
    let start = Posterior::from_prior(Prior {
        mean,
        precision: PriorPrecision::Isotropic(0.5),
    })
    .unwrap();
    let mut e0 = vec![0.0; d];
    e0[0] = 1.0;
    let mut labels = mixed_labels(d, 6, 1.0, &mut rng);
    labels.insert(2, (e0.clone(), 1.0));
    labels.insert(5, (e0, 1.0));
    let mut old = start.clone();
    for (v, y) in &labels {
        update_reference(&mut old, v, *y, false);
    }
    assert!(old.weights.iter().filter(|&&w| w == 0.0).count() >= 2);
    let mut new = start.clone();
    new.update_many(labels.iter().map(|(v, y)| (v.as_slice(), *y)))
        .unwrap();
    assert_same_posterior(
        &new,
        &old,
        &[random_vec(d, 1.0, &mut rng)],
        1e-10,
        "zero weights",
    );

    // An invalid label: the ones before it are applied, the error is returned, none after it is applied.
    let mut new = start.clone();
    let bad = vec![f64::NAN; d];
    let mut with_bad: Vec<(&[f64], f64)> = labels.iter().map(|(v, y)| (v.as_slice(), *y)).collect();
    with_bad.insert(4, (&bad, 1.0));
    assert!(new.update_many(with_bad).is_err());
    let mut old = start;
    for (v, y) in &labels[..4] {
        update_reference(&mut old, v, *y, false);
    }
    assert_eq!(new.labels_applied(), 4);
    assert_same_posterior(&new, &old, &[], 1e-10, "prefix before an invalid label");
}

#[test]
fn batch_update_refactorisation_path() {
    let mut rng = StdRng::seed_from_u64(33);
    let d = 12;
    let (start, _) = trained(d, 8, 5);
    let labels = mixed_labels(d, 5, 1.0, &mut rng);
    // The batch rebuilds once after its last label; so does the reference when that label fails.
    let mut old = start.clone();
    for (k, (v, y)) in labels.iter().enumerate() {
        update_reference(&mut old, v, *y, k + 1 == labels.len());
    }
    let mut new = start;
    INJECT_PIVOT_FAILURE.with(|f| f.set(true));
    let reports = new.update_many(labels.iter().map(|(v, y)| (v.as_slice(), *y)));
    INJECT_PIVOT_FAILURE.with(|f| f.set(false));
    let reports = reports.unwrap();
    let flags: Vec<bool> = reports.iter().map(|r| r.refactored).collect();
    assert_eq!(flags, [false, false, false, false, true]);
    assert_eq!(new.refactorizations(), 1);
    let probes: Vec<Vec<f64>> = (0..3).map(|_| random_vec(d, 1.0, &mut rng)).collect();
    assert_same_posterior(&new, &old, &probes, 1e-10, "batch refactorisation");
}
