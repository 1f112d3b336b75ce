//! Results: every evaluated point as CSV, and the per-strategy summary (markdown and stdout).
//!
//! `points.csv` columns: `strategy,seed,round,labels,metric,value`. Rows are ordered by strategy (config
//! order), seed (config order), round, then metric; floats use Rust's shortest round-trip formatting, so the
//! file is byte-identical for identical runs. Metrics:
//! `one_minus_spearman` (1 − mean per-prompt Spearman on test prompts), `best_of_<N>` (expected golden
//! reward of the predicted best of N random responses, test prompts), `prequential_log_loss` and
//! `prequential_accuracy` (each training label predicted before it was applied). Scale-out runs
//! (`scale_out.instances` > 1) add `model_labels` (labels applied to the reported model) and, with
//! independent learners, `instance_<i>_labels`, `instance_<i>_one_minus_spearman` per instance model and
//! `instance_mean_one_minus_spearman`; `labels` is then what the whole deployment paid for.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use crate::selection::StrategyKind;

/// One evaluated quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    OneMinusSpearman,
    BestOfN(usize),
    PrequentialLogLoss,
    PrequentialAccuracy,
    /// The isotropic prior precision λ₀ in force (chosen by the evidence with `auto`).
    PriorPrecision,
    /// Scale-out: labels applied to the reported model (all of them with shared learners; instance 0's
    /// own plus the seed labels with independent ones).
    ModelLabels,
    /// Scale-out, independent learners: labels applied to instance i's model.
    InstanceLabels(usize),
    /// Scale-out, independent learners: 1 − Spearman of instance i's model.
    InstanceOneMinusSpearman(usize),
    /// Scale-out, independent learners: 1 − Spearman averaged over the instance models.
    InstanceMeanOneMinusSpearman,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::OneMinusSpearman => f.write_str("one_minus_spearman"),
            Metric::BestOfN(n) => write!(f, "best_of_{n}"),
            Metric::PrequentialLogLoss => f.write_str("prequential_log_loss"),
            Metric::PrequentialAccuracy => f.write_str("prequential_accuracy"),
            Metric::PriorPrecision => f.write_str("prior_precision"),
            Metric::ModelLabels => f.write_str("model_labels"),
            Metric::InstanceLabels(i) => write!(f, "instance_{i}_labels"),
            Metric::InstanceOneMinusSpearman(i) => write!(f, "instance_{i}_one_minus_spearman"),
            Metric::InstanceMeanOneMinusSpearman => f.write_str("instance_mean_one_minus_spearman"),
        }
    }
}

impl Metric {
    /// Axis label for plots.
    pub fn label(&self) -> String {
        match self {
            Metric::OneMinusSpearman => "1 − Spearman (test prompts, lower is better)".into(),
            Metric::BestOfN(n) => format!("Best-of-{n} golden reward (higher is better)"),
            Metric::PrequentialLogLoss => "prequential log-loss".into(),
            Metric::PrequentialAccuracy => "prequential accuracy".into(),
            Metric::PriorPrecision => "prior precision λ₀".into(),
            Metric::ModelLabels => "labels applied to the reported model".into(),
            Metric::InstanceLabels(i) => format!("labels applied to instance {i}'s model"),
            Metric::InstanceOneMinusSpearman(i) => {
                format!("1 − Spearman of instance {i}'s model (lower is better)")
            }
            Metric::InstanceMeanOneMinusSpearman => {
                "1 − Spearman, mean over instance models (lower is better)".into()
            }
        }
    }
}

/// One row of `points.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub strategy: StrategyKind,
    pub seed: u64,
    pub round: usize,
    /// Labels paid for so far (seed labels included): the labels applied to the model, or, with
    /// independent scale-out learners, every instance's labels (seed labels counted once).
    pub labels: usize,
    pub metric: Metric,
    pub value: f64,
}

/// The CSV text of `points`, in the given order.
pub fn points_csv(points: &[Point]) -> String {
    let mut s = String::from("strategy,seed,round,labels,metric,value\n");
    for p in points {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{}",
            p.strategy, p.seed, p.round, p.labels, p.metric, p.value
        );
    }
    s
}

/// Mean and sample standard deviation over seeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl MeanSd {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { mean, sd, n })
    }
}

impl fmt::Display for MeanSd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.4} ± {:.4}", self.mean, self.sd)
    }
}

/// A curve aggregated over seeds: per round, the mean label count and the metric's mean ± sd.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub strategy: StrategyKind,
    pub metric: Metric,
    /// (mean labels, statistics over seeds), by round.
    pub points: Vec<(f64, MeanSd)>,
}

/// Groups points into per-(strategy, metric) curves, strategies in `order`.
pub fn curves(points: &[Point], order: &[StrategyKind]) -> Vec<Curve> {
    /// (strategy position, metric, round) → (label counts, values) over seeds.
    type Cell = (Vec<f64>, Vec<f64>);
    let mut by: BTreeMap<(usize, Metric, usize), Cell> = BTreeMap::new();
    for p in points {
        let Some(si) = order.iter().position(|&s| s == p.strategy) else {
            continue;
        };
        let e = by.entry((si, p.metric, p.round)).or_default();
        e.0.push(p.labels as f64);
        e.1.push(p.value);
    }
    let mut out: Vec<Curve> = Vec::new();
    for ((si, metric, _round), (labels, values)) in by {
        let Some(stats) = MeanSd::of(&values) else {
            continue;
        };
        let x = labels.iter().sum::<f64>() / labels.len() as f64;
        match out.last_mut() {
            Some(c) if c.strategy == order[si] && c.metric == metric => c.points.push((x, stats)),
            _ => out.push(Curve {
                strategy: order[si],
                metric,
                points: vec![(x, stats)],
            }),
        }
    }
    out
}

/// Per-strategy summary row.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategySummary {
    pub strategy: StrategyKind,
    /// Mean labels at the last round.
    pub final_labels: f64,
    /// 1 − Spearman at the last round over seeds.
    pub final_one_minus_spearman: Option<MeanSd>,
    /// Best-of-N at the last round, per N.
    pub final_best_of_n: Vec<(usize, MeanSd)>,
    /// First evaluated label count at which the seed-mean 1 − Spearman is at or below `random`'s final
    /// seed-mean; `None` when never reached or `random` was not run.
    pub labels_to_reach_random: Option<f64>,
    /// `labels_to_reach_random` as a fraction of random's final label count.
    pub fraction_of_random: Option<f64>,
}

/// Builds the summary rows from the curves.
pub fn summarise(curves: &[Curve], order: &[StrategyKind]) -> Vec<StrategySummary> {
    let find =
        |s: StrategyKind, m: Metric| curves.iter().find(|c| c.strategy == s && c.metric == m);
    let random_final =
        find(StrategyKind::Random, Metric::OneMinusSpearman).and_then(|c| c.points.last().copied());
    order
        .iter()
        .map(|&s| {
            let sp = find(s, Metric::OneMinusSpearman);
            let last = sp.and_then(|c| c.points.last().copied());
            let mut bon: Vec<(usize, MeanSd)> = curves
                .iter()
                .filter(|c| c.strategy == s)
                .filter_map(|c| match c.metric {
                    Metric::BestOfN(n) => c.points.last().map(|p| (n, p.1)),
                    _ => None,
                })
                .collect();
            bon.sort_by_key(|b| b.0);
            let reach = match (sp, random_final) {
                (Some(c), Some((_, target))) => c
                    .points
                    .iter()
                    .find(|(_, st)| st.mean <= target.mean)
                    .map(|p| p.0),
                _ => None,
            };
            StrategySummary {
                strategy: s,
                final_labels: last.map(|p| p.0).unwrap_or(0.0),
                final_one_minus_spearman: last.map(|p| p.1),
                final_best_of_n: bon,
                labels_to_reach_random: reach,
                fraction_of_random: match (reach, random_final) {
                    (Some(r), Some((l, _))) if l > 0.0 => Some(r / l),
                    _ => None,
                },
            }
        })
        .collect()
}

/// The summary as a markdown table (also printed to stdout).
pub fn summary_markdown(header: &str, rows: &[StrategySummary]) -> String {
    let mut ns: Vec<usize> = rows
        .iter()
        .flat_map(|r| r.final_best_of_n.iter().map(|b| b.0))
        .collect();
    ns.sort_unstable();
    ns.dedup();
    let mut s = String::new();
    let _ = writeln!(s, "{header}\n");
    let _ = write!(
        s,
        "| strategy | labels | final 1−Spearman (mean ± sd) | labels to reach random's final (share of random's budget) |"
    );
    for n in &ns {
        let _ = write!(s, " Best-of-{n} |");
    }
    s.push('\n');
    s.push_str("|---|---:|---|---|");
    for _ in &ns {
        s.push_str("---|");
    }
    s.push('\n');
    for r in rows {
        let sp = r
            .final_one_minus_spearman
            .map(|m| m.to_string())
            .unwrap_or_else(|| "—".into());
        let reach = match (r.labels_to_reach_random, r.fraction_of_random) {
            (Some(l), Some(f)) => format!("{l:.0} ({:.0}%)", 100.0 * f),
            (Some(l), None) => format!("{l:.0}"),
            _ => "not reached".into(),
        };
        let _ = write!(
            s,
            "| {} | {:.0} | {} | {} |",
            r.strategy, r.final_labels, sp, reach
        );
        for n in &ns {
            match r.final_best_of_n.iter().find(|b| b.0 == *n) {
                Some((_, m)) => {
                    let _ = write!(s, " {m} |");
                }
                None => s.push_str(" — |"),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(s: StrategyKind, seed: u64, round: usize, labels: usize, v: f64) -> Point {
        Point {
            strategy: s,
            seed,
            round,
            labels,
            metric: Metric::OneMinusSpearman,
            value: v,
        }
    }

    #[test]
    fn labels_to_reach_random_uses_seed_means() {
        use StrategyKind::*;
        let mut pts = Vec::new();
        for seed in 0..2 {
            for (r, (vr, vg)) in [(0.9, 0.9), (0.7, 0.4), (0.5, 0.35), (0.4, 0.3)]
                .into_iter()
                .enumerate()
            {
                pts.push(pt(Random, seed, r, 10 * (r + 1), vr + seed as f64 * 0.01));
                pts.push(pt(GreedyDopt, seed, r, 10 * (r + 1), vg));
            }
        }
        let order = [Random, GreedyDopt];
        let c = curves(&pts, &order);
        let s = summarise(&c, &order);
        // random's final mean is 0.405; greedy first gets there at round 1 (20 labels), random at 40.
        assert_eq!(s[0].labels_to_reach_random, Some(40.0));
        assert_eq!(s[1].labels_to_reach_random, Some(20.0));
        assert_eq!(s[1].fraction_of_random, Some(0.5));
        let sd = s[0].final_one_minus_spearman.unwrap();
        assert!((sd.mean - 0.405).abs() < 1e-12 && sd.sd > 0.0);
        let md = summary_markdown("# t", &s);
        assert!(
            md.contains("| greedy-dopt | 40 |") && md.contains("20 (50%)"),
            "{md}"
        );
        assert!(points_csv(&pts[..1]).ends_with("random,0,0,10,one_minus_spearman,0.9\n"));
    }
}
