//! `lowrank demo`: the seed's story end to end on the embedded default model — one base,
//! one small adapter per niche task, each evaluated against the base on held-out data.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_model::model::AdapterSet;
use lowrank_train::evaluate::{eval_generation, examples_from_task};
use lowrank_train::experiments::report::human_bytes;
use lowrank_train::tasks::{all_tasks, make_task_files, task_by_name};
use lowrank_train::{TrainConfig, Trainer};

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
}

struct Row {
    task: String,
    metric: String,
    higher_better: bool,
    base: f64,
    adapter: f64,
    extra: Vec<(String, f64, f64)>,
    params: usize,
    adapter_bytes: u64,
    train_s: f64,
    tok_s: f64,
    steps: usize,
}

pub fn run(a: DemoArgs, device: &Device) -> Result<bool> {
    let t_all = Instant::now();
    let lm = super::load(&a.model, device)?;
    let train_s = a.train_seconds.unwrap_or(if a.quick { 0.0 } else { 100.0 });
    let steps = a.steps.unwrap_or(if a.quick { 8 } else { 16 });
    if steps == 0 {
        anyhow::bail!("--steps must be ≥ 1");
    }
    let eval_n = a.eval_n.unwrap_or(if a.quick { 20 } else { 40 });
    let n_train = if a.quick { 200 } else { 400 };
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
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    eprintln!(
        "lowrank demo: {} tasks, one rank-8 q,v adapter each, {steps} steps × 8 examples per task, {eval_n} held-out examples",
        tasks.len()
    );
    let mut rows = Vec::new();
    for task in &tasks {
        let name = task.name();
        eprintln!("\n== {name}: {}", task.description());
        let data = a.out.join("data").join(name);
        make_task_files(task.as_ref(), &data, a.seed, n_train, eval_n)?;
        let ad_dir = a.out.join("adapters").join(name);
        let cfg = TrainConfig {
            data: Some(data.join("train.jsonl")),
            out: Some(ad_dir.clone()),
            rank: 8,
            targets: vec!["q_proj".into(), "v_proj".into()],
            lr: 2e-3,
            warmup_steps: 2,
            batch_size: 8,
            max_steps: Some(steps),
            time_budget_s: train_s,
            seed: a.seed,
            ..Default::default()
        };
        let mut t = Trainer::new(&lm, cfg)?;
        let stop = AtomicBool::new(false);
        let s = t.run(None, &stop)?;
        let adapter = t.current_adapter()?.context("adapter")?;
        let set: AdapterSet = Arc::new(vec![(Arc::new(adapter), 1.0)]);
        let ex = examples_from_task(task.as_ref(), eval_n, a.seed);
        let metrics = task.metrics();
        let base = eval_generation(&lm, &ex, &metrics, None, 16, true)?;
        let tuned = eval_generation(&lm, &ex, &metrics, Some(set), 16, true)?;
        let m0 = metrics[0];
        let row = Row {
            task: name.into(),
            metric: m0.name().into(),
            higher_better: m0.higher_is_better(),
            base: base.scores[0].1,
            adapter: tuned.scores[0].1,
            extra: metrics[1..]
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        m.name().to_string(),
                        base.scores[i + 1].1,
                        tuned.scores[i + 1].1,
                    )
                })
                .collect(),
            params: s.trainable_params,
            adapter_bytes: s.output_bytes,
            train_s: s.wall_s,
            tok_s: s.tok_per_s,
            steps: s.steps,
        };
        eprintln!(
            "{name}: {} {:.1} → {:.1} ({} steps, {:.0} s, {:.0} tok/s)",
            row.metric, row.base, row.adapter, row.steps, row.train_s, row.tok_s
        );
        let (tr, ev) = lowrank_train::plot::read_metrics(&ad_dir.join("metrics.jsonl"));
        let svg = a.out.join(format!("loss-{name}.svg"));
        lowrank_train::plot::loss_curves_svg(
            &format!("{name}: LoRA r=8 on q,v"),
            &[
                ("train loss".to_string(), tr),
                ("eval loss".to_string(), ev),
            ],
            &svg,
        )
        .map_err(anyhow::Error::msg)?;
        rows.push(row);
    }
    // The table, for the terminal and the report.
    let base_bytes = lm.file_bytes;
    let mut md = String::new();
    writeln!(md, "# lowrank demo\n")?;
    writeln!(
        md,
        "Base model: `{}` ({} parameters, {} on disk). One LoRA adapter (r=8, α=16, q_proj+v_proj) per task, \
         evaluated on held-out examples (entities and phrasings not seen in training) with greedy decoding.\n",
        lm.source.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        lm.model.weights.num_params(),
        human_bytes(base_bytes as f64)
    )?;
    writeln!(md, "| task | metric | base | adapter | other metrics (base → adapter) | trainable params | adapter size | steps | train time | tok/s |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    let mut all_better = true;
    for r in &rows {
        let better = if r.higher_better {
            r.adapter > r.base
        } else {
            r.adapter < r.base
        };
        all_better &= better;
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(m, b, t)| format!("{m} {b:.1} → {t:.1}"))
            .collect();
        writeln!(
            md,
            "| {} | {}{} | {:.1} | **{:.1}** | {} | {} ({:.2} % of base) | {} ({:.2} % of base file) | {} | {:.0} s | {:.0} |",
            r.task,
            r.metric,
            if r.higher_better { " ↑" } else { " ↓" },
            r.base,
            r.adapter,
            if extra.is_empty() { "–".into() } else { extra.join(", ") },
            r.params,
            100.0 * r.params as f64 / lm.model.weights.num_params() as f64,
            human_bytes(r.adapter_bytes as f64),
            100.0 * r.adapter_bytes as f64 / base_bytes as f64,
            r.steps,
            r.train_s,
            r.tok_s
        )?;
    }
    let n = rows.len() as u64;
    let ad_total: u64 = rows.iter().map(|r| r.adapter_bytes).sum();
    writeln!(
        md,
        "\n**{n} tasks with LoRA:** one base + {n} adapters = {} + {} = **{}**, instead of {n} full fine-tuned copies = **{}**.",
        human_bytes(base_bytes as f64),
        human_bytes(ad_total as f64),
        human_bytes((base_bytes + ad_total) as f64),
        human_bytes((n * base_bytes) as f64)
    )?;
    if let Some(r) = rows.first() {
        writeln!(
            md,
            "At 100 tasks: base + 100 × adapter = {} instead of 100 × base = {}.",
            human_bytes((base_bytes + 100 * r.adapter_bytes) as f64),
            human_bytes((100 * base_bytes) as f64)
        )?;
    }
    writeln!(
        md,
        "\nLoss curves: {}",
        rows.iter()
            .map(|r| format!("[{0}](loss-{0}.svg)", r.task))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(md, "\nAdapters (PEFT format) are in `adapters/<task>/`; try `lowrank generate --adapter {}/adapters/sql --chat ...` or `lowrank serve --adapters {}/adapters`.", a.out.display(), a.out.display())?;
    writeln!(
        md,
        "\nTotal demo time: {:.0} s.",
        t_all.elapsed().as_secs_f64()
    )?;
    let report = a.out.join("README.md");
    std::fs::write(&report, &md).with_context(|| format!("writing {}", report.display()))?;
    println!("{md}");
    if !all_better {
        eprintln!("warning: not every adapter beat the base on its metric");
    }
    Ok(all_better)
}
