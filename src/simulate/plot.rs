//! SVG learning curves in the style of the paper's Figure 3: a metric against labels used, one line per
//! strategy (the mean over seeds) with a shaded ±1 sd band. Each strategy keeps one colour in every figure.
//! [`Chart`] draws any such lines; `armd demo` uses it for its Spearman curves too.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
pub use plotters::prelude::{RGBColor, SeriesLabelPosition};

use super::report::{Curve, MeanSd, Metric};
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

/// The colour of `s` in every figure (`armd simulate`'s and `armd demo`'s).
pub fn colour(s: StrategyKind) -> RGBColor {
    let i = StrategyKind::ALL.iter().position(|&k| k == s).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

/// One line of a chart: the mean at each x, with a shaded ±1 sd band when any sd is positive.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend entry.
    pub label: String,
    pub colour: RGBColor,
    pub width: u32,
    /// (x, mean and sd of y).
    pub points: Vec<(f64, MeanSd)>,
}

impl Series {
    /// A strategy's line in its colour; greedy-dopt (armd's candidate default) is drawn wider.
    pub fn strategy(s: StrategyKind, label: impl Into<String>, points: Vec<(f64, MeanSd)>) -> Self {
        Self {
            label: label.into(),
            colour: colour(s),
            width: if s == StrategyKind::GreedyDopt { 3 } else { 2 },
            points,
        }
    }
}

/// One chart: its caption, axis descriptions, legend position and lines.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub legend: SeriesLabelPosition,
    pub series: Vec<Series>,
}

impl Chart {
    /// Draws the chart into `area`: axes fitted to every series' mean ± sd (unit ranges when there is no
    /// point), the lines and bands, and the legend.
    pub fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let err =
            |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e:?}", self.y_desc);
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for c in &self.series {
            for (x, s) in &c.points {
                x0 = x0.min(*x);
                x1 = x1.max(*x);
                y0 = y0.min(s.mean - s.sd);
                y1 = y1.max(s.mean + s.sd);
            }
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let (y0, y1) = (y0 - pad, y1 + pad);
        area.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(&self.y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for c in &self.series {
            let col = c.colour;
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
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().map(|(x, s)| (*x, s.mean)),
                    col.stroke_width(c.width),
                ))
                .map_err(err)?
                .label(&c.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(self.legend.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(err)?;
        Ok(())
    }

    /// Writes the chart alone to the SVG file `path`, `size` pixels (width, height).
    pub fn write_svg(&self, path: &Path, size: (u32, u32)) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, size).into_drawing_area();
        self.draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e:?}", path.display()))
    }
}

/// One metric's curves, one line per strategy, as in the paper's Figure 3.
fn metric_chart(curves: &[&Curve], metric: Metric, title: &str) -> Chart {
    Chart {
        title: title.to_string(),
        x_desc: "labels".into(),
        y_desc: metric.label(),
        legend: if metric == Metric::OneMinusSpearman {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        },
        series: curves
            .iter()
            .map(|c| Series::strategy(c.strategy, c.strategy.name(), c.points.clone()))
            .collect(),
    }
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
    let chart = |m: Metric| {
        let of: Vec<&Curve> = curves.iter().filter(|c| c.metric == m).collect();
        metric_chart(&of, m, title)
    };
    let mut written = Vec::new();
    for &m in &metrics {
        let path = out_dir.join(format!("{m}.svg"));
        chart(m).write_svg(&path, (900, 560))?;
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
                    chart(Metric::OneMinusSpearman).draw(&left)?;
                    chart(b).draw(&right)?;
                }
                None => chart(Metric::OneMinusSpearman).draw(&root)?,
            }
            root.present()
                .map_err(|e| anyhow!("writing {}: {e:?}", path.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}
