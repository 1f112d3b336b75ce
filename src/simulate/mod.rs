//! `armd simulate`: the paper's experiment (docs/design.md §9), offline, on a dataset of embeddings with
//! golden rewards — to compare selection strategies and tune armd before spending money on labels.
//!
//! Layout:
//! - [`config`]: the TOML configuration (`config/simulate.toml` documents every key), validation naming the
//!   bad key, and the CLI overrides.
//! - [`dataset`]: the `.npy` directory layout, its loader and its validation.
//! - [`synthetic`]: the built-in generator (clustered, anisotropic, outlier dimensions; golden reward partly
//!   non-linear).
//! - [`protocol`]: one (strategy, seed) replicate — split, scaling, seed labels, rounds of
//!   candidates → `selection::select` → simulated annotator → `Posterior::update`, held-out evaluation.
//!   It calls the same functions as the daemon, never copies of them. `[scale_out]` splits each round's
//!   pool across several instances, with shared or independent learners (docs/scale-out.md).
//! - [`report`]: `points.csv`, curves over seeds, the summary table.
//! - [`plot`]: SVG curves like the paper's Figure 3.
//!
//! [`run`] is the testable entry point; [`cli_main`] is what `armd simulate` calls.

pub mod config;
pub mod dataset;
pub mod plot;
pub mod protocol;
pub mod report;
pub mod synthetic;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

pub use config::{ConfigError, Learners, Plan, ScaleOut, SimulateConfig, Source};
pub use dataset::{Dataset, DatasetError};
pub use protocol::Timings;
pub use report::{Curve, MeanSd, Metric, Point, StrategySummary};

use crate::selection::StrategyKind;

/// What a run produced (the same numbers that went into the files).
#[derive(Debug)]
pub struct Summary {
    /// The header line of the table: dataset, protocol and seeds.
    pub header: String,
    pub rows: Vec<StrategySummary>,
    pub curves: Vec<Curve>,
    pub points: Vec<Point>,
    /// Summed over all replicates (wall time of each phase within a replicate).
    pub timings: Timings,
    /// Wall time of the whole run.
    pub wall: std::time::Duration,
    /// Files written to `out_dir`.
    pub files: Vec<PathBuf>,
}

impl Summary {
    /// The summary table in markdown.
    pub fn markdown(&self) -> String {
        report::summary_markdown(&self.header, &self.rows)
    }

    /// The row of one strategy.
    pub fn row(&self, s: StrategyKind) -> Option<&StrategySummary> {
        self.rows.iter().find(|r| r.strategy == s)
    }

    /// Where the time went, one line per phase.
    pub fn timing_report(&self) -> String {
        let t = &self.timings;
        let total = t.total().as_secs_f64().max(1e-9);
        let mut s = format!(
            "wall time {:.2} s; summed over replicates:\n",
            self.wall.as_secs_f64()
        );
        for (name, d) in [
            ("prepare (split, scaler, scaling)", t.prepare),
            ("candidates (prompt draw, pool, pairs)", t.candidates),
            ("select (whitening, scoring, strategy)", t.select),
            ("update (annotator, Posterior::update)", t.update),
            ("refit", t.refit),
            ("evaluate (held-out metrics)", t.evaluate),
        ] {
            let _ = writeln!(
                s,
                "  {name:<40} {:>9.3} s  {:>5.1}%",
                d.as_secs_f64(),
                100.0 * d.as_secs_f64() / total
            );
        }
        s
    }
}

/// Loads the configured dataset.
pub fn load_dataset(source: &Source) -> anyhow::Result<Dataset> {
    let data = match source {
        Source::Synthetic(cfg) => synthetic::generate(cfg)?,
        Source::Npy {
            dir,
            drop_single_response_prompts,
        } => Dataset::load_npy_dir(dir, *drop_single_response_prompts)?,
    };
    if data.dropped_prompts > 0 {
        eprintln!(
            "warning: dropped {} prompt(s) with a single response (dataset.single_response_prompts = \"drop\")",
            data.dropped_prompts
        );
    }
    Ok(data)
}

/// Runs every (strategy, seed) replicate of `config`, writes `points.csv`, `summary.md` and the plots to
/// `config.out_dir`, and returns the summary. `progress` shows a bar on stderr when stderr is a terminal.
pub fn run(config: SimulateConfig, progress: bool) -> anyhow::Result<Summary> {
    let plan = config.plan()?;
    let data = load_dataset(&plan.source)?;
    run_plan(&plan, &data, progress)
}

/// [`run`] on an already loaded dataset (lets callers reuse one dataset across plans).
pub fn run_plan(plan: &Plan, data: &Dataset, progress: bool) -> anyhow::Result<Summary> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&plan.out_dir)
        .with_context(|| format!("creating out_dir {}", plan.out_dir.display()))?;
    let proto = &plan.protocol;
    let total = (plan.seeds.len() * plan.strategies.len() * (proto.rounds + 1)) as u64;
    let bar = if progress && std::io::stderr().is_terminal() {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} rounds ({msg}) eta {eta}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        ProgressBar::hidden()
    };

    let mut points = Vec::new();
    let mut timings = Timings::default();
    for &seed in &plan.seeds {
        bar.set_message(format!("seed {seed}"));
        let prep = protocol::Prepared::new(data, plan, seed)?;
        timings.prepare += prep.prepare_time;
        let tick = || bar.inc(1);
        let one = |&kind: &StrategyKind| protocol::run_replicate(kind, &prep, plan, &tick);
        let results: Vec<anyhow::Result<protocol::Replicate>> = if plan.output.parallel {
            plan.strategies.par_iter().map(one).collect()
        } else {
            plan.strategies.iter().map(one).collect()
        };
        for r in results {
            let r = r?;
            timings.add(&r.timings);
            points.extend(r.points);
        }
    }
    bar.finish_and_clear();

    // CSV order: strategy (config order), seed (config order), round, metric.
    let key = |p: &Point| {
        (
            plan.strategies.iter().position(|&s| s == p.strategy),
            plan.seeds.iter().position(|&s| s == p.seed),
            p.round,
            p.metric,
        )
    };
    points.sort_by_key(key);
    let curves = report::curves(&points, &plan.strategies);
    let rows = report::summarise(&curves, &plan.strategies);
    let mut header = format!(
        "## {} — {} responses, {} prompts, d = {}; candidates {}, k = {}, {} rounds + {} seed labels, {} prompts/round, β = {}, λ₀ = {}, scaling {}, refit every {}; seeds {:?}",
        data.name,
        data.len(),
        data.groups().len(),
        data.dim(),
        plan.candidates.mode,
        proto.k,
        proto.rounds,
        proto.seed_labels,
        proto.prompts_per_round,
        proto.beta,
        proto.prior_precision,
        plan.scaling,
        if proto.refit_every == 0 { "never".to_string() } else { format!("{} labels", proto.refit_every) },
        plan.seeds,
    );
    if !plan.scale_out.single() {
        let _ = write!(
            header,
            "; scale-out: {} instances, {} learners",
            plan.scale_out.instances, plan.scale_out.learners
        );
    }
    let mut files = Vec::new();
    let csv = plan.out_dir.join("points.csv");
    std::fs::write(&csv, report::points_csv(&points))
        .with_context(|| format!("writing {}", csv.display()))?;
    files.push(csv);
    let md_path = plan.out_dir.join("summary.md");
    std::fs::write(&md_path, report::summary_markdown(&header, &rows))
        .with_context(|| format!("writing {}", md_path.display()))?;
    files.push(md_path);
    if plan.output.plots {
        let title = if plan.output.title.is_empty() {
            format!(
                "{} — {} candidates, k = {}",
                data.name, plan.candidates.mode, proto.k
            )
        } else {
            plan.output.title.clone()
        };
        files.extend(plot::write_plots(&plan.out_dir, &curves, &title)?);
    }
    Ok(Summary {
        header,
        rows,
        curves,
        points,
        timings,
        wall: started.elapsed(),
        files,
    })
}

/// Flags of `armd simulate`. Each named flag overrides one key of the TOML file; `--set` reaches any key.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct SimulateArgs {
    /// TOML configuration (see config/simulate.toml); built-in defaults when omitted.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Strategies to compare, comma-separated (`strategies`).
    #[arg(long, value_delimiter = ',')]
    pub strategies: Option<Vec<String>>,
    /// Seeds: a comma list `0,1,2` or a half-open range `0..5` (`seeds`).
    #[arg(long)]
    pub seeds: Option<String>,
    /// Selection rounds after the seed labels (`protocol.rounds`).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Pairs labelled per round (`protocol.k`).
    #[arg(long, short = 'k')]
    pub k: Option<usize>,
    /// Candidate pairs: within, cross or both (`protocol.candidates`).
    #[arg(long)]
    pub candidates: Option<String>,
    /// `synthetic`, or a directory holding embeddings.npy, reward.npy, prompt.npy (`dataset.*`).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Output directory (`out_dir`).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Annotator rationality β; `inf` for noiseless labels (`protocol.beta`).
    #[arg(long)]
    pub beta: Option<String>,
    /// Prior precision λ₀, a number or `auto` (`protocol.prior_precision`).
    #[arg(long)]
    pub prior_precision: Option<String>,
    /// Refit the MAP every N labels, 0 = never (`protocol.refit_every`).
    #[arg(long)]
    pub refit_every: Option<usize>,
    /// Daemon instances in one consumer group, each pooling its share of the responses (`scale_out.instances`).
    #[arg(long)]
    pub instances: Option<usize>,
    /// How the instances learn: shared or independent (`scale_out.learners`).
    #[arg(long)]
    pub learners: Option<String>,
    /// Any key, as `dotted.key=TOML value` (e.g. `--set synthetic.dim=2048`); repeatable, applied last.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Do not draw the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Parses a `--seeds` value: `0,1,2` or `0..5`.
fn parse_seeds(s: &str) -> anyhow::Result<Vec<u64>> {
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (
            a.trim().parse().context("--seeds: range start")?,
            b.trim().parse().context("--seeds: range end")?,
        );
        anyhow::ensure!(a < b, "--seeds: empty range {s}");
        return Ok((a..b).collect());
    }
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u64>()
                .with_context(|| format!("--seeds: '{t}' is not a seed"))
        })
        .collect()
}

/// A TOML value from a command-line string: a TOML literal when it parses as one, else a string.
fn toml_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Sets `dotted.key` in a TOML table, creating intermediate tables.
fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|s| !s.is_empty()).context("empty key")?;
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .with_context(|| format!("config key `{key}`: `{p}` is not a table"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

impl SimulateArgs {
    /// The configuration: file (or defaults), then the named flags, then `--set`.
    pub fn config(&self) -> anyhow::Result<SimulateConfig> {
        let mut table: toml::Table = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        if let Some(s) = &self.strategies {
            let v = s
                .iter()
                .map(|x| toml::Value::String(x.trim().into()))
                .collect();
            set_key(&mut table, "strategies", toml::Value::Array(v))?;
        }
        if let Some(s) = &self.seeds {
            let v = parse_seeds(s)?
                .into_iter()
                .map(|x| toml::Value::Integer(x as i64))
                .collect();
            set_key(&mut table, "seeds", toml::Value::Array(v))?;
        }
        let int = |x: usize| toml::Value::Integer(x as i64);
        if let Some(x) = self.rounds {
            set_key(&mut table, "protocol.rounds", int(x))?;
        }
        if let Some(x) = self.k {
            set_key(&mut table, "protocol.k", int(x))?;
        }
        if let Some(x) = self.refit_every {
            set_key(&mut table, "protocol.refit_every", int(x))?;
        }
        if let Some(x) = self.instances {
            set_key(&mut table, "scale_out.instances", int(x))?;
        }
        if let Some(x) = &self.learners {
            set_key(
                &mut table,
                "scale_out.learners",
                toml::Value::String(x.clone()),
            )?;
        }
        if let Some(x) = &self.candidates {
            set_key(
                &mut table,
                "protocol.candidates",
                toml::Value::String(x.clone()),
            )?;
        }
        if let Some(x) = &self.beta {
            set_key(&mut table, "protocol.beta", toml::Value::String(x.clone()))?;
        }
        if let Some(x) = &self.prior_precision {
            let value = match x.trim().parse::<f64>() {
                Ok(v) => toml::Value::Float(v),
                Err(_) => toml::Value::String(x.clone()),
            };
            set_key(&mut table, "protocol.prior_precision", value)?;
        }
        if let Some(x) = &self.dataset {
            if x == "synthetic" {
                set_key(&mut table, "dataset.source", toml::Value::String(x.clone()))?;
            } else {
                set_key(
                    &mut table,
                    "dataset.source",
                    toml::Value::String("npy".into()),
                )?;
                set_key(&mut table, "dataset.path", toml::Value::String(x.clone()))?;
            }
        }
        if let Some(x) = &self.out {
            set_key(
                &mut table,
                "out_dir",
                toml::Value::String(x.to_string_lossy().into_owned()),
            )?;
        }
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
            set_key(&mut table, k.trim(), toml_value(v.trim()))?;
        }
        SimulateConfig::deserialize_table(table)
    }
}

impl SimulateConfig {
    /// Deserialises from an already parsed TOML table.
    pub fn deserialize_table(table: toml::Table) -> anyhow::Result<Self> {
        use serde::Deserialize;
        SimulateConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("invalid simulate config: {e}"))
    }
}

/// `armd simulate`: builds the configuration from the flags, runs, prints the summary table to stdout and
/// the timing breakdown to stderr.
pub fn cli_main(args: SimulateArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let summary = run(config, !args.no_progress)?;
    println!("{}", summary.markdown());
    for f in &summary.files {
        eprintln!("wrote {}", f.display());
    }
    eprint!("{}", summary.timing_report());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_keys_and_set_reaches_any_key() {
        let args = SimulateArgs {
            strategies: Some(vec!["random".into(), "greedy-dopt".into()]),
            seeds: Some("3..6".into()),
            k: Some(7),
            beta: Some("inf".into()),
            dataset: Some("data/x".into()),
            set: vec!["synthetic.dim=12".into(), "output.title=\"hello\"".into()],
            instances: Some(3),
            learners: Some("independent".into()),
            ..Default::default()
        };
        let c = args.config().unwrap();
        assert_eq!(c.strategies, vec!["random", "greedy-dopt"]);
        assert_eq!(c.seeds, vec![3, 4, 5]);
        assert_eq!(c.protocol.k, 7);
        assert_eq!(c.protocol.beta, f64::INFINITY);
        assert_eq!(c.dataset.source, "npy");
        assert_eq!(c.dataset.path, PathBuf::from("data/x"));
        assert_eq!(c.synthetic.dim, 12);
        assert_eq!(c.output.title, "hello");
        assert_eq!(c.scale_out.instances, 3);
        assert_eq!(c.scale_out.learners, "independent");
        let bad = SimulateArgs {
            set: vec!["protocol.kk=1".into()],
            ..Default::default()
        };
        assert!(bad.config().unwrap_err().to_string().contains("kk"));
        assert_eq!(parse_seeds("1, 4,2").unwrap(), vec![1, 4, 2]);
        assert!(parse_seeds("5..5").is_err());
    }
}
