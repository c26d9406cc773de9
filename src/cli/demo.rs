//! `lowrank demo`: the seed's story end to end on the embedded default model — one base,
//! one small adapter per niche task, each evaluated against the base on held-out data
//! (flags → `lowrank_experiments::demo`, with progress bars).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_experiments::demo::{demo, DemoOptions};
use lowrank_tasks::{all_tasks, task_by_name};

use super::progress::Bars;
use super::ModelArg;

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Where the report, data and adapters go.
    #[arg(long, default_value = "demo-report")]
    pub out: PathBuf,
    /// A reduced CI-sized run.
    #[arg(long)]
    pub quick: bool,
    /// Comma-separated subset of tasks (default: all).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// Optimizer steps per task (batch 8; default 16, quick 8).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Safety time box for training, seconds per task (default 100; 0 = none).
    #[arg(long)]
    pub train_seconds: Option<f64>,
    /// Held-out examples per task (default 40, quick 20).
    #[arg(long)]
    pub eval_n: Option<usize>,
    /// Seed of the generated data, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Arithmetic of the frozen base (training and scoring): f32, int8 (the base packed in
    /// 8-bit blocks and never held in f32) or int4 (4-bit blocks).
    #[arg(long, value_enum, default_value_t = super::ComputeKind::F32)]
    pub compute: super::ComputeKind,
}

pub fn run(a: DemoArgs, device: &Device) -> Result<bool> {
    let lm = super::load_for(&a.model, device, a.compute.into())?;
    let steps = a.steps.unwrap_or(if a.quick { 8 } else { 16 });
    if steps == 0 {
        anyhow::bail!("--steps must be ≥ 1");
    }
    let tasks = match &a.tasks {
        Some(names) => names
            .iter()
            .map(|n| {
                task_by_name(n)
                    .with_context(|| format!("unknown task `{n}` (see `lowrank tasks list`)"))
            })
            .collect::<Result<Vec<_>>>()?,
        None => all_tasks(),
    };
    let o = DemoOptions {
        out: a.out.clone(),
        tasks,
        steps,
        train_seconds: a.train_seconds.unwrap_or(if a.quick { 0.0 } else { 100.0 }),
        n_train: if a.quick { 200 } else { 400 },
        eval_n: a.eval_n.unwrap_or(if a.quick { 20 } else { 40 }),
        seed: a.seed,
        compute: a.compute.into(),
    };
    let mut bars = Bars::new(true);
    let rep = demo(&lm, &o, &mut |e| bars.handle(e))?;
    println!("{}", rep.markdown);
    let all_better = rep.all_better();
    if !all_better {
        eprintln!("warning: not every adapter beat the base on its metric");
    }
    Ok(all_better)
}
