//! `tools/report/strategy_report.py`, the fair comparison behind docs/strategies.md, run on real
//! `armd simulate` output: it must pick as "tuned random" the grid value whose curve has the lowest mean
//! 1 − Spearman (recomputed here from points.csv), and write the tables and plots.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use armd::posterior::PriorSetting;
use armd::simulate::{self, SimulateConfig};

fn small(out: &Path, strategies: &[&str], prior: PriorSetting) -> SimulateConfig {
    let mut c = SimulateConfig {
        out_dir: out.to_path_buf(),
        strategies: strategies.iter().map(|s| s.to_string()).collect(),
        seeds: vec![0, 1, 2],
        ..Default::default()
    };
    c.synthetic.n_prompts = 60;
    c.synthetic.responses_per_prompt = 5;
    c.synthetic.dim = 16;
    c.synthetic.latent_dim = 6;
    c.protocol.rounds = 4;
    c.protocol.k = 5;
    c.protocol.prompts_per_round = 20;
    c.protocol.seed_labels = 5;
    c.protocol.max_cross_pairs = 2000;
    c.protocol.prior_precision = prior;
    c.output.plots = false;
    c
}

/// Mean over budgets after the seed labels of the seed-mean 1 − Spearman of `random` in a run.
fn area(dir: &Path) -> f64 {
    let text = std::fs::read_to_string(dir.join("points.csv")).unwrap();
    let mut by_budget: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] == "random" && f[4] == "one_minus_spearman" {
            by_budget
                .entry(f[3].parse().unwrap())
                .or_default()
                .push(f[5].parse().unwrap());
        }
    }
    let means: Vec<f64> = by_budget
        .values()
        .skip(1)
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
        .collect();
    means.iter().sum::<f64>() / means.len() as f64
}

#[test]
fn strategy_report_picks_the_best_grid_prior_and_writes_tables_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let auto = tmp.path().join("auto");
    simulate::run(
        small(&auto, &["random", "targeted-info"], PriorSetting::Auto),
        false,
    )
    .unwrap();
    let mut grid = Vec::new();
    for lambda in [0.01, 1.0, 100.0] {
        let dir = tmp.path().join(format!("random-{lambda}"));
        simulate::run(small(&dir, &["random"], PriorSetting::Fixed(lambda)), false).unwrap();
        grid.push((lambda, area(&dir), dir));
    }
    let best = grid
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|g| g.0)
        .unwrap();

    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let plots = tmp.path().join("plots");
    let out = Command::new(python)
        .arg("tools/report/strategy_report.py")
        .args(["--name", "syn", "--runs"])
        .arg(&auto)
        .arg("--random-grid")
        .args(grid.iter().map(|g| &g.2))
        .arg("--plot-dir")
        .arg(&plots)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("`random` at λ₀ = {best}, the grid value")),
        "expected tuned λ₀ = {best}:\n{stdout}"
    );
    for row in ["| random (auto prior) |", "| targeted-info (auto prior) |"] {
        assert!(stdout.contains(row), "missing {row}:\n{stdout}");
    }
    for f in ["syn-spearman.svg", "syn-best-of-n.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("targeted-info"),
            "{f}"
        );
    }
}
