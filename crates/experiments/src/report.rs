//! Report building blocks: Markdown tables and SVG charts (plotters' SVG backend) for the
//! experiment commands — line charts (loss curves), heatmaps (subspace similarity) and bar
//! panels (side-by-side comparisons).

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// A named (x, y) series for [`line_chart`].
pub type Series = (String, Vec<(f64, f64)>);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn e<T: std::fmt::Display>(path: &Path) -> impl Fn(T) -> String + '_ {
    move |err| format!("{}: cannot draw chart: {err}", path.display())
}

fn ensure_parent(path: &Path) -> Result<(), String> {
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).map_err(|err| format!("{}: {err}", p.display()))?;
    }
    Ok(())
}

/// A Markdown table.
pub fn md_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n", header.join(" | "));
    s.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Value range with a margin; a flat or empty range is widened.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let m = (hi - lo) * 0.05;
    (lo - m, hi + m)
}

/// Lines of several series on shared axes (e.g. training loss per step).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    ensure_parent(path)?;
    let (x0, x1) = padded_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let (y0, y1) = padded_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(e(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e(path))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(e(path))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = pts
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(e(path))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if pts.len() <= 40 {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                .map_err(e(path))?;
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e(path))?;
    }
    root.present().map_err(e(path))?;
    Ok(())
}

/// White (0) → dark red (1).
fn heat(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(255.0, 140.0), lerp(255.0, 10.0), lerp(255.0, 20.0))
}

/// A heatmap of `grid[row][col]` with values in [0, 1]; rows and columns are numbered from 1
/// (row 1 at the top), like the LoRA paper's subspace-similarity figures.
pub fn heatmap(
    path: &Path,
    title: &str,
    grid: &[Vec<f64>],
    row_label: &str,
    col_label: &str,
) -> Result<(), String> {
    ensure_parent(path)?;
    let rows = grid.len();
    let cols = grid.first().map(|r| r.len()).unwrap_or(0);
    if rows == 0 || cols == 0 {
        return Err(format!("{}: empty grid", path.display()));
    }
    let root = SVGBackend::new(path, (720, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e(path))?;
    let (main, bar) = root.split_horizontally(620);
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..cols as f64 + 0.5, rows as f64 + 0.5..0.5f64)
        .map_err(e(path))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .disable_mesh()
        .x_desc(col_label)
        .y_desc(row_label)
        .x_labels(cols.min(16))
        .y_labels(rows.min(16))
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{}", v.round() as i64))
        .draw()
        .map_err(e(path))?;
    chart
        .draw_series(grid.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, v)| {
                let (x, y) = (j as f64 + 1.0, i as f64 + 1.0);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat(*v).filled())
            })
        }))
        .map_err(e(path))?;
    // Colour bar 0..1.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(44)
        .margin_bottom(52)
        .margin_right(10)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e(path))?;
    cb.configure_mesh()
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .draw()
        .map_err(e(path))?;
    let steps = 50;
    cb.draw_series((0..steps).map(|k| {
        let (a, b) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
        Rectangle::new([(0.0, a), (1.0, b)], heat((a + b) / 2.0).filled())
    }))
    .map_err(e(path))?;
    root.present().map_err(e(path))?;
    Ok(())
}

/// One small bar chart per quantity (e.g. LoRA vs full fine-tuning), in a grid of panels.
/// Each panel: (title, [(bar name, value)]).
pub fn bar_panels(
    path: &Path,
    title: &str,
    panels: &[(String, Vec<(String, f64)>)],
) -> Result<(), String> {
    ensure_parent(path)?;
    if panels.is_empty() {
        return Err(format!("{}: no panels", path.display()));
    }
    let ncols = panels.len().min(3);
    let nrows = panels.len().div_ceil(ncols);
    let root =
        SVGBackend::new(path, (320 * ncols as u32, 260 * nrows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(e(path))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(e(path))?;
    let areas = root.split_evenly((nrows, ncols));
    for ((ptitle, bars), area) in panels.iter().zip(areas.iter()) {
        let n = bars.len().max(1) as i32;
        let max = bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let top = if max > 0.0 { max * 1.2 } else { 1.0 };
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(ptitle, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d((0..n).into_segmented(), 0f64..top)
            .map_err(e(path))?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 14))
            .disable_x_mesh()
            .x_labels(n as usize + 1)
            .x_label_formatter(&fmt)
            .y_label_formatter(&|v| short_num(*v))
            .draw()
            .map_err(e(path))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i as i32), 0.0),
                        (SegmentValue::Exact(i as i32 + 1), v),
                    ],
                    color(i).filled(),
                );
                r.set_margin(0, 0, 14, 14);
                r
            }))
            .map_err(e(path))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    short_num(*v),
                    (SegmentValue::CenterOf(i as i32), v.max(0.0) + top * 0.02),
                    ("sans-serif", 12),
                )
            }))
            .map_err(e(path))?;
    }
    root.present().map_err(e(path))?;
    Ok(())
}

/// 1234567 → "1.23M" (for axis labels and bar annotations).
pub fn short_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".into()
    } else if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Human-readable bytes (binary units).
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg() {
        let d = std::env::temp_dir().join(format!("lowrank-report-{}", std::process::id()));
        let p = d.join("l.svg");
        line_chart(
            &p,
            "loss",
            "step",
            "loss",
            &[
                ("a".into(), vec![(1.0, 2.0), (2.0, 1.5)]),
                ("b".into(), vec![(1.0, 2.2)]),
            ],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("<svg"));
        let h = d.join("h.svg");
        heatmap(&h, "phi", &[vec![1.0, 0.5], vec![0.2, 0.0]], "i", "j").unwrap();
        assert!(std::fs::read_to_string(&h).unwrap().contains("<rect"));
        let b = d.join("b.svg");
        bar_panels(
            &b,
            "cmp",
            &[(
                "params".into(),
                vec![("lora".into(), 1e5), ("full".into(), 1e8)],
            )],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&b).unwrap().contains("lora"));
        assert!(heatmap(&h, "x", &[], "i", "j").is_err());
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(short_num(1_234_567.0), "1.23M");
        assert_eq!(human_bytes(2048.0), "2.0 KiB");
        assert!(
            md_table(&["a".into(), "b".into()], &[vec!["1".into(), "2".into()]])
                .contains("| 1 | 2 |")
        );
    }
}
