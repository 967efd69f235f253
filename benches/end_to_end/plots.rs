//! The plots of BENCHMARKS.md, drawn with `plotters` into PNG files:
//! throughput against clients (log–log, one line per implementation and
//! configuration) and the latency distribution (the fraction of tasks within
//! a latency, per offered rate). Text is drawn with `ab_glyph` from a
//! TrueType font read at run time, so no system font library is needed.

use crate::procs::Outcome;
use crate::report::Results;
use crate::stats::sorted;
use plotters::prelude::*;
use std::path::Path;

/// Where Debian's and other distributions' packages put a sans-serif font.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the first font found (or `explicit`) as plotters' sans-serif.
pub fn load_font(explicit: Option<&Path>) -> Outcome<()> {
    let candidates: Vec<&Path> = match explicit {
        Some(p) => vec![p],
        None => FONTS.iter().map(Path::new).collect(),
    };
    for path in &candidates {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a TrueType font", path.display()));
        }
    }
    Err(format!(
        "no TrueType font for the plots (looked for {}): install fonts-dejavu-core, or give --font FILE",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

const SIZE: (u32, u32) = (900, 560);

/// Line colours, distinct on white.
const COLOURS: &[RGBColor] = &[
    RGBColor(0, 0, 0),
    RGBColor(128, 128, 128),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn err(e: impl std::fmt::Display) -> String {
    format!("drawing a plot: {e}")
}

/// Throughput (median results/s) against clients, every implementation.
pub fn throughput(r: &Results, path: &Path) -> Outcome<()> {
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = vec![];
    let points = |list: &mut dyn Iterator<Item = &crate::report::Series>| {
        list.map(|s| ((s.clients as f64).log2(), s.rate()))
            .collect::<Vec<_>>()
    };
    lines.push((
        "bare grpcio (ceiling)".into(),
        points(&mut r.ceiling.iter()),
    ));
    lines.push(("seed Python pair".into(), points(&mut r.python.iter())));
    let mut labels: Vec<String> = vec![];
    for c in &r.contact {
        if !labels.contains(&c.label()) {
            labels.push(c.label());
        }
    }
    for label in labels {
        let mut it = r
            .contact
            .iter()
            .filter(|c| c.label() == label)
            .map(|c| &c.series);
        lines.push((format!("contact {label}"), points(&mut it)));
    }
    lines.retain(|(_, p)| !p.is_empty());
    if lines.is_empty() {
        return Ok(());
    }
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|(_, p)| p.clone()).collect();
    // x is log2(clients), labelled with the client counts 1, 2, 4, ...
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max).ceil() + 0.3;
    let min_y = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) / 2.0;
    let max_y = all.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Round trip: results/s against clients", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3..max_x, (min_y..max_y).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("clients")
        .y_desc("results/s (median)")
        .x_labels(max_x as usize + 1)
        .y_labels(8)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .y_label_formatter(&|y| crate::report::group(*y))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in lines.iter().enumerate() {
        let color = colour(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    finish(chart, &root)
}

/// The fraction of tasks within a latency, per offered rate: producer →
/// result back at the server and producer → result durable.
pub fn latency(r: &Results, path: &Path) -> Outcome<()> {
    let mut curves: Vec<(String, Vec<f64>)> = vec![];
    for l in &r.latency {
        let rate = crate::report::group(l.rate as f64);
        curves.push((format!("{rate}/s: → result back"), sorted(&l.back)));
        curves.push((format!("{rate}/s: → durable"), sorted(&l.durable)));
    }
    curves.retain(|(_, v)| !v.is_empty());
    if curves.is_empty() {
        return Ok(());
    }
    let min_x = curves
        .iter()
        .map(|(_, v)| v[0])
        .fold(f64::INFINITY, f64::min)
        .max(0.01)
        / 1.5;
    let max_x = curves
        .iter()
        .map(|(_, v)| v[v.len() - 1])
        .fold(0.0, f64::max)
        .max(min_x * 10.0)
        * 1.5;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency at a fixed offered rate (open loop)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((min_x..max_x).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency from the scheduled time (ms)")
        .y_desc("fraction of tasks within")
        .x_label_formatter(&|x| format!("{x}"))
        .draw()
        .map_err(err)?;
    for (i, (label, v)) in curves.iter().enumerate() {
        let color = colour(i);
        let n = v.len() as f64;
        let step = (v.len() / 2000).max(1);
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k == v.len() - 1)
            .map(|(k, &x)| (x.max(min_x), (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    finish(chart, &root)
}

/// Draws the legend and writes the file.
fn finish<'a, X, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
) -> Outcome<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
