//! `armd demo` end to end on a small configuration: two real daemons on librdkafka's in-process mock
//! cluster, simulated annotators, held-out scoring, summary and SVG. Nothing to install.

use armd::demo::{run, DemoConfig};

#[test]
fn small_demo_runs_end_to_end_and_armd_learns() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = DemoConfig::from_toml(
        r#"
[data]
n_prompts = 80
responses_per_prompt = 6
dim = 16
latent_dim = 8
[annotator]
beta = 2.0
latency_ms = 5
latency_jitter_ms = 10
[daemon]
warmup_samples = 64
batch_size = 8
max_in_flight = 16
refit_every = 40
[run]
label_budget = 80
eval_every = 10
timeout_secs = 120
metrics_listen = "127.0.0.1:0"
"#,
    )
    .unwrap();
    cfg.run.out_dir = out.path().to_path_buf();

    let report = run(&cfg, false).expect("demo runs");

    // Both runs are reported, each applied labels and has a learning curve.
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["armd", "random"]);
    assert_eq!(report.runs[0].strategy, "targeted-info");
    assert_eq!(report.runs[1].strategy, "random");
    for r in &report.runs {
        assert!(r.labels_sent > 0, "{}: no labels sent", r.name);
        assert!(r.labels_applied > 0, "{}: no labels applied", r.name);
        assert!(!r.curve.is_empty(), "{}: no model snapshot scored", r.name);
        assert!(r.final_spearman.is_finite());
    }
    assert!(!report.timed_out, "{}", report.summary);
    for needle in ["armd", "targeted", "random", "Spearman"] {
        assert!(report.summary.contains(needle), "{}", report.summary);
    }
    let summary_file = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    assert_eq!(summary_file, report.summary);
    assert!(report.metrics_url.starts_with("http://127.0.0.1:"));

    // The plot and the curves exist and are non-empty.
    let svg = std::fs::read_to_string(&report.svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("targeted"), "{svg}");
    let csv = std::fs::read_to_string(out.path().join("curves.csv")).unwrap();
    assert!(csv.lines().count() > 2, "{csv}");

    // armd's reward head ranks held-out responses better than chance.
    let armd = &report.runs[0];
    assert!(
        armd.final_spearman > 0.0,
        "armd held-out Spearman {} <= 0\n{}",
        armd.final_spearman,
        report.summary
    );
}

/// What the demo promises: with its shipped settings, armd's model ranks held-out responses better than
/// its random-selection twin's. Judged on the learning curve, not its last point: the mean, over labels
/// 100 to the budget, of armd's held-out Spearman minus random's, averaged over three data seeds. One
/// snapshot of one run is noisy (timing decides which pairs either daemon picks); the curve and the seeds
/// average that out. Measured with the release build, idle machine: +0.056, +0.025, +0.084 on seeds
/// 7, 8, 9 (+0.103, +0.048, +0.086 on 10-12).
#[test]
fn default_demo_keeps_armd_ahead_of_random_over_the_curve_and_seeds() {
    let mut gaps = Vec::new();
    for seed in [7, 8, 9] {
        let out = tempfile::tempdir().unwrap();
        let mut cfg = DemoConfig::from_toml("").unwrap();
        cfg.data.seed = seed;
        cfg.run.out_dir = out.path().to_path_buf();
        cfg.run.metrics_listen = "127.0.0.1:0".parse().unwrap();
        let report = run(&cfg, false).expect("demo runs");
        assert!(!report.timed_out, "{}", report.summary);
        let (armd, random) = (&report.runs[0], &report.runs[1]);
        for r in [armd, random] {
            assert!(
                r.labels_applied >= cfg.run.label_budget * 9 / 10,
                "{}: {} of {} labels applied",
                r.name,
                r.labels_applied,
                cfg.run.label_budget
            );
        }
        let grid: Vec<f64> = (100..=cfg.run.label_budget)
            .step_by(10)
            .map(|l| l as f64)
            .collect();
        let gap = grid
            .iter()
            .map(|&l| interpolate(&armd.curve, l) - interpolate(&random.curve, l))
            .sum::<f64>()
            / grid.len() as f64;
        eprintln!(
            "demo seed {seed}: final armd {:.3} random {:.3} at {} labels; mean gap over labels 100..{} {gap:+.3}",
            armd.final_spearman, random.final_spearman, armd.labels_applied, cfg.run.label_budget
        );
        gaps.push(gap);
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!(
        mean > 0.0,
        "armd's held-out Spearman minus random's, mean over the curve, per seed: {gaps:?} (mean {mean:+.3})"
    );
}

/// The curve's value at `labels` (linear between snapshots, flat beyond the ends).
fn interpolate(curve: &[(u64, f64)], labels: f64) -> f64 {
    let first = curve.first().expect("a scored snapshot");
    if labels <= first.0 as f64 {
        return first.1;
    }
    for w in curve.windows(2) {
        let ((l0, v0), (l1, v1)) = (w[0], w[1]);
        if labels <= l1 as f64 {
            let t = (labels - l0 as f64) / (l1 - l0).max(1) as f64;
            return v0 + t * (v1 - v0);
        }
    }
    curve.last().expect("non-empty").1
}
