//! SVG charts (plotters): loss curves from metrics.jsonl.

use std::path::Path;

use plotters::prelude::*;

/// Training (and eval) loss by step, as one SVG.
pub fn loss_curves_svg(
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    path: &Path,
) -> Result<(), String> {
    let all: Vec<&(f64, f64)> = series.iter().flat_map(|(_, v)| v.iter()).collect();
    if all.is_empty() {
        return Err("no points to plot".into());
    }
    let xmax = all.iter().map(|p| p.0).fold(1.0f64, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(0.0f64, f64::max) * 1.05 + 1e-9;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if pts.len() <= 12 {
            chart
                .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// (step, loss) points of one curve.
pub type Curve = Vec<(f64, f64)>;

/// (train loss by step, eval loss by step) from a metrics.jsonl.
pub fn read_metrics(path: &Path) -> (Curve, Curve) {
    let mut train = vec![];
    let mut eval = vec![];
    if let Ok(text) = std::fs::read_to_string(path) {
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            let Some(step) = v["step"].as_f64() else {
                continue;
            };
            if let Some(x) = v["loss"].as_f64() {
                train.push((step, x));
            }
            if let Some(x) = v["eval_loss"].as_f64() {
                eval.push((step, x));
            }
        }
    }
    (train, eval)
}
