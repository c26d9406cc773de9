//! `lowrank eval`: loss on a JSONL file, or generation metrics on a task / file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_tasks::evaluate::{
    eval_generation, examples_from_jsonl, examples_from_task, score_predictions,
};
use lowrank_tasks::{task_by_name, Metric};
use lowrank_train::loss::eval_loss_file;

use super::progress::Bars;
use super::{AdapterArgs, ComputeArg, ModelArg};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub compute: ComputeArg,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// JSONL data: loss mode, or generation mode with --metric.
    #[arg(long, conflicts_with = "task")]
    pub data: Option<PathBuf>,
    /// A built-in task's held-out set (generation metrics).
    #[arg(long)]
    pub task: Option<String>,
    /// exact | bleu | slot-error | accuracy (with --data: generation mode).
    #[arg(long)]
    pub metric: Option<String>,
    /// Held-out examples for --task.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Seed of the generated held-out set for --task.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences decoded together in generation mode.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Print K failures (expected vs got) to stderr.
    #[arg(long, default_value_t = 0)]
    pub show_errors: usize,
    /// Score answers made elsewhere (e.g. by llama.cpp) instead of generating: a JSONL file
    /// with one answer per held-out example, in order, each a JSON string or an object with
    /// a `prediction` string. No model is loaded.
    #[arg(long, conflicts_with_all = ["adapter", "merged"])]
    pub predictions: Option<PathBuf>,
}

/// The answers of a `--predictions` file (see [`EvalArgs::predictions`]).
fn read_predictions(path: &std::path::Path, want: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read predictions {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let p = match &v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => match o.get("prediction") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => anyhow::bail!("{}: field `prediction` must be a string", at()),
            },
            _ => anyhow::bail!(
                "{}: expected a JSON string or an object with `prediction`",
                at()
            ),
        };
        out.push(p);
    }
    if out.len() != want {
        anyhow::bail!(
            "{}: {} predictions for {want} held-out examples (one per example, in order)",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

pub fn run(a: EvalArgs, device: &Device) -> Result<()> {
    let metric = a.metric.as_deref().map(str::parse::<Metric>).transpose()?;
    if a.task.is_none() && a.data.is_none() {
        anyhow::bail!("give --data FILE or --task NAME");
    }
    let task = match &a.task {
        Some(t) => Some(task_by_name(t).with_context(|| {
            let names: Vec<_> = lowrank_tasks::all_tasks()
                .iter()
                .map(|t| t.name())
                .collect();
            format!("unknown task `{t}` (available: {})", names.join(", "))
        })?),
        None => None,
    };
    if let Some(p) = &a.predictions {
        let (examples, metrics) = match (&task, &a.data, metric) {
            (Some(t), _, m) => (
                examples_from_task(t.as_ref(), a.n, a.seed),
                m.map(|m| vec![m]).unwrap_or_else(|| t.metrics()),
            ),
            (None, Some(d), Some(m)) => (examples_from_jsonl(d)?, vec![m]),
            _ => anyhow::bail!("--predictions needs --task NAME, or --data FILE with --metric"),
        };
        let preds = read_predictions(p, examples.len())?;
        let r = score_predictions(&examples, &metrics, &preds);
        return report(&a, task.as_deref().map(|t| t.name()), &r);
    }
    let mut lm = a.compute.load(&a.model, device, a.adapters.merged)?;
    let set = a.adapters.apply(&mut lm)?;
    if let (Some(data), None) = (&a.data, metric) {
        let with = a.adapters.describe();
        let (loss, tokens) = eval_loss_file(&lm, data, set)
            .with_context(|| format!("evaluating {} with {with}", data.display()))?;
        // A NaN/inf loss means the logits overflowed (e.g. a huge adapter scale or lora_alpha):
        // an error, never a number in the output.
        if !loss.is_finite() {
            anyhow::bail!(
                "evaluating {} with {with}: the loss is {loss} (the model's logits are not \
                 finite; an adapter scale or lora_alpha this large overflows f32)",
                data.display()
            );
        }
        println!(
            "{}",
            serde_json::json!({"loss": loss, "tokens": tokens, "perplexity": loss.exp()})
        );
        return Ok(());
    }
    let (examples, metrics) = match (&task, &a.data) {
        (Some(t), _) => (
            examples_from_task(t.as_ref(), a.n, a.seed),
            metric.map(|m| vec![m]).unwrap_or_else(|| t.metrics()),
        ),
        (None, Some(d)) => (examples_from_jsonl(d)?, vec![metric.expect("metric")]),
        _ => unreachable!(),
    };
    let mut bars = Bars::new(true);
    let r = eval_generation(&lm, &examples, &metrics, set, a.batch, &mut |e| {
        bars.handle(e)
    })
    .with_context(|| format!("evaluating with {}", a.adapters.describe()))?;
    report(&a, task.as_deref().map(|t| t.name()), &r)
}

/// Print the failures asked for (stderr) and the scores (one JSON line on stdout).
fn report(a: &EvalArgs, task: Option<&str>, r: &lowrank_tasks::evaluate::GenEval) -> Result<()> {
    for f in r.failures.iter().take(a.show_errors) {
        eprintln!(
            "--- input: {}\n    expected: {}\n    got:      {}",
            f.input, f.expected, f.got
        );
    }
    let mut out = serde_json::Map::new();
    if let Some(t) = task {
        out.insert("task".into(), t.into());
    }
    for (m, v) in &r.scores {
        out.insert(m.clone(), serde_json::json!((v * 100.0).round() / 100.0));
    }
    out.insert("n".into(), r.n.into());
    out.insert(
        "wall_s".into(),
        serde_json::json!((r.wall_s * 100.0).round() / 100.0),
    );
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
