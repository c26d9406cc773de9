//! The model card (README.md) written beside every adapter `train` saves, as PEFT does: what
//! it was trained from and how, what it reached, and the loss curve — the facts someone who
//! finds the adapter directory needs before using it.

use std::fmt::Write;
use std::path::Path;

use super::checkpoint::RunInputs;
use crate::config::TrainConfig;

/// Where the run stands when the card is written.
pub(super) struct CardMetrics {
    pub(super) steps: usize,
    pub(super) tokens: usize,
    pub(super) wall_s: f64,
    pub(super) first_loss: Option<f64>,
    pub(super) last_loss: Option<f64>,
    pub(super) eval_before: Option<f64>,
    pub(super) eval_after: Option<f64>,
    pub(super) trainable_params: usize,
    /// "final adapter" or "checkpoint at step N"
    pub(super) what: String,
}

/// (step, value) points of a curve.
type Curve = Vec<(u64, f64)>;

/// (step, loss) and (step, eval loss) from metrics.jsonl (unreadable lines are skipped: the
/// card reports, it does not validate).
fn curves(metrics: &Path) -> (Curve, Curve) {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let (mut train, mut eval) = (vec![], vec![]);
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let Some(step) = v["step"].as_u64() else {
            continue;
        };
        if let Some(x) = v["loss"].as_f64().filter(|x| x.is_finite()) {
            train.push((step, x));
        }
        if let Some(x) = v["eval_loss"].as_f64().filter(|x| x.is_finite()) {
            eval.push((step, x));
        }
    }
    (train, eval)
}

/// A one-line picture of a series: ▁…█ scaled between its min and max.
fn sparkline(ys: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let (lo, hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
            (a.min(y), b.max(y))
        });
    ys.iter()
        .map(|&y| {
            let f = if hi > lo { (y - lo) / (hi - lo) } else { 0.5 };
            BARS[((f * 7.0).round() as usize).min(7)]
        })
        .collect()
}

fn num(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{x:.4}"))
}

/// The card's markdown.
pub(super) fn render(
    cfg: &TrainConfig,
    inputs: &RunInputs,
    base: &str,
    m: &CardMetrics,
    metrics: &Path,
) -> String {
    let mut s = String::new();
    let targets = cfg
        .target_names()
        .unwrap_or_else(|_| cfg.targets.clone())
        .join(", ");
    let _ = writeln!(
        s,
        "---\nlibrary_name: peft\nbase_model: {base}\ntags:\n- lora\n- lowrank\n---\n"
    );
    let _ = writeln!(s, "# LoRA adapter ({})\n", m.what);
    let _ = writeln!(
        s,
        "Trained with lowrank {} (`lowrank train`). Load it with PEFT (`PeftModel.from_pretrained`), \
         `lowrank generate --adapter DIR`, `lowrank serve`, or convert it for llama.cpp and Ollama \
         with `lowrank export DIR --format gguf-lora --out A.gguf`.\n",
        lowrank_lora::VERSION
    );
    let _ = writeln!(
        s,
        "## Base\n\n- model: `{base}`\n- fingerprint: `{}`\n",
        inputs.base_fingerprint
    );
    let _ = writeln!(s, "## Data\n");
    let _ = writeln!(
        s,
        "- training: `{}` ({} bytes, sha256 `{}`)",
        inputs.data.name, inputs.data.bytes, inputs.data.sha256
    );
    match &inputs.eval {
        Some(e) => {
            let _ = writeln!(
                s,
                "- held-out: `{}` ({} bytes, sha256 `{}`)\n",
                e.name, e.bytes, e.sha256
            );
        }
        None => s.push_str("- held-out: none\n\n"),
    }
    let _ = writeln!(s, "## Settings\n");
    let rows = [
        ("method", cfg.method.name().to_string()),
        ("targets", targets),
        ("rank", cfg.rank.to_string()),
        (
            "alpha",
            format!(
                "{}{}",
                cfg.alpha(),
                if cfg.rslora {
                    " (rsLoRA: scale α/√r)"
                } else {
                    ""
                }
            ),
        ),
        ("dropout", cfg.dropout.to_string()),
        ("init", cfg.init.clone()),
        (
            "learning rate",
            format!(
                "{} ({:?} schedule, {} warm-up steps)",
                cfg.lr, cfg.schedule, cfg.warmup_steps
            ),
        ),
        (
            "batch",
            format!(
                "{} × {} accumulation, ≤ {} tokens per sequence",
                cfg.batch_size, cfg.grad_accum, cfg.max_seq_len
            ),
        ),
        (
            "weight decay, grad clip",
            format!("{}, {}", cfg.weight_decay, cfg.grad_clip),
        ),
        ("compute", cfg.compute.name().to_string()),
        ("seed", cfg.seed.to_string()),
        ("trainable parameters", m.trainable_params.to_string()),
    ];
    s.push_str("| setting | value |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n## Results\n");
    let _ = writeln!(
        s,
        "| steps | tokens | wall time | first loss | last loss | held-out loss before | after |\n|---|---|---|---|---|---|---|\n| {} | {} | {:.1} s | {} | {} | {} | {} |\n",
        m.steps,
        m.tokens,
        m.wall_s,
        num(m.first_loss),
        num(m.last_loss),
        num(m.eval_before),
        num(m.eval_after)
    );
    let (train, eval) = curves(metrics);
    if !train.is_empty() {
        let ys: Vec<f64> = train.iter().map(|p| p.1).collect();
        let _ = writeln!(
            s,
            "## Loss curve\n\nTraining loss per step ({} steps): `{}`\n",
            ys.len(),
            sparkline(&ys)
        );
        s.push_str("| step | training loss |\n|---|---|\n");
        // About ten rows, always the first and the last step.
        let every = train.len().div_ceil(10).max(1);
        for (k, (step, y)) in train.iter().enumerate() {
            if k % every == 0 || k + 1 == train.len() {
                let _ = writeln!(s, "| {step} | {y:.4} |");
            }
        }
        if !eval.is_empty() {
            s.push_str("\n| step | held-out loss |\n|---|---|\n");
            for (step, y) in &eval {
                let _ = writeln!(s, "| {step} | {y:.4} |");
            }
        }
        s.push('\n');
    }
    s.push_str("Every number comes from this run's `metrics.jsonl` and `summary.json`.\n");
    s
}
