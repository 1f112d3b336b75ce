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
/// its random-selection twin's at the end of the run. Over seeds, not per seed: on one seed the two can
/// finish level (measured with the debug build: final Spearman differences +0.028, +0.028, −0.003 on
/// data seeds 7, 8, 9; +0.019 on 10). The mean over the three seeds must be positive.
#[test]
fn default_demo_ends_with_armd_ahead_of_random_on_average_over_seeds() {
    let mut diffs = Vec::new();
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
        eprintln!(
            "demo seed {seed}: armd {:.3} random {:.3} at {} labels",
            armd.final_spearman, random.final_spearman, armd.labels_applied
        );
        diffs.push(armd.final_spearman - random.final_spearman);
    }
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(
        mean > 0.0,
        "armd's final held-out Spearman minus random's, per seed: {diffs:?} (mean {mean:+.3})"
    );
}
