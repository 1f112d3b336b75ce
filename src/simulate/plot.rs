//! SVG learning curves in the style of the paper's Figure 3: a metric against labels used, one line per
//! strategy (the mean over seeds) with a shaded ±1 sd band. Each strategy keeps one colour in every figure.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{Curve, Metric};
use crate::selection::StrategyKind;

/// Tableau-10, indexed by the strategy's position in `StrategyKind::ALL`.
const PALETTE: [RGBColor; 10] = [
    RGBColor(127, 127, 127), // random: grey, the baseline
    RGBColor(188, 189, 34),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(227, 119, 194),
    RGBColor(148, 103, 189),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40), // greedy-dopt: red, armd's candidate default
];

fn colour(s: StrategyKind) -> RGBColor {
    let i = StrategyKind::ALL.iter().position(|&k| k == s).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

/// Draws one metric's curves into `area`.
fn draw_metric<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[&Curve],
    metric: Metric,
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {metric}: {e:?}");
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for c in curves {
        for (x, s) in &c.points {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(s.mean - s.sd);
            y1 = y1.max(s.mean + s.sd);
        }
    }
    if x0 > x1 {
        return Ok(());
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    area.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("labels")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(metric.label())
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for c in curves {
        let col = colour(c.strategy);
        if c.points.iter().any(|p| p.1.sd > 0.0) {
            let band: Vec<(f64, f64)> = c
                .points
                .iter()
                .map(|(x, s)| (*x, s.mean + s.sd))
                .chain(c.points.iter().rev().map(|(x, s)| (*x, s.mean - s.sd)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, col.mix(0.15).filled())))
                .map_err(err)?;
        }
        let width = if c.strategy == StrategyKind::GreedyDopt {
            3
        } else {
            2
        };
        chart
            .draw_series(LineSeries::new(
                c.points.iter().map(|(x, s)| (*x, s.mean)),
                col.stroke_width(width),
            ))
            .map_err(err)?
            .label(c.strategy.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3)));
    }
    let position = if metric == Metric::OneMinusSpearman {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::LowerRight
    };
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Writes `one_minus_spearman.svg`, one `best_of_<N>.svg` per N, and `figure.svg` (1 − Spearman beside the
/// largest Best-of-N, like the paper's Figure 3). Returns the files written.
pub fn write_plots(out_dir: &Path, curves: &[Curve], title: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut metrics: Vec<Metric> = curves
        .iter()
        .map(|c| c.metric)
        .filter(|m| matches!(m, Metric::OneMinusSpearman | Metric::BestOfN(_)))
        .collect();
    metrics.sort_unstable();
    metrics.dedup();
    let of = |m: Metric| curves.iter().filter(|c| c.metric == m).collect::<Vec<_>>();
    let mut written = Vec::new();
    for &m in &metrics {
        let path = out_dir.join(format!("{m}.svg"));
        {
            let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
            draw_metric(&root, &of(m), m, title)?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e:?}", path.display()))?;
        }
        written.push(path);
    }
    let largest_bon = metrics
        .iter()
        .filter(|m| matches!(m, Metric::BestOfN(_)))
        .max()
        .copied();
    if metrics.contains(&Metric::OneMinusSpearman) {
        let path = out_dir.join("figure.svg");
        {
            let root = SVGBackend::new(&path, (1500, 560)).into_drawing_area();
            match largest_bon {
                Some(b) => {
                    let (left, right) = root.split_horizontally(750);
                    draw_metric(
                        &left,
                        &of(Metric::OneMinusSpearman),
                        Metric::OneMinusSpearman,
                        title,
                    )?;
                    draw_metric(&right, &of(b), b, title)?;
                }
                None => draw_metric(
                    &root,
                    &of(Metric::OneMinusSpearman),
                    Metric::OneMinusSpearman,
                    title,
                )?,
            }
            root.present()
                .map_err(|e| anyhow!("writing {}: {e:?}", path.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}
