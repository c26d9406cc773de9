//! `lowrank eval`: loss on a JSONL file, or generation metrics on a task / file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_tasks::evaluate::{eval_generation, examples_from_jsonl, examples_from_task};
use lowrank_tasks::{task_by_name, Metric};
use lowrank_train::loss::eval_loss_file;

use super::progress::Bars;
use super::{AdapterArgs, ModelArg};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
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
    let mut lm = super::load(&a.model, device)?;
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
    for f in r.failures.iter().take(a.show_errors) {
        eprintln!(
            "--- input: {}\n    expected: {}\n    got:      {}",
            f.input, f.expected, f.got
        );
    }
    let mut out = serde_json::Map::new();
    if let Some(t) = &task {
        out.insert("task".into(), t.name().into());
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
