//! The demo (`lowrank demo`): one base, one small LoRA adapter (r = 8 on q, v) per built-in
//! task, each scored against the base on held-out examples with greedy decoding. Writes
//! `out/README.md` (the table), `out/loss-<task>.svg`, the generated data (`out/data/<task>/`)
//! and the PEFT adapters (`out/adapters/<task>/`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use lowrank_model::model::AdapterSet;
use lowrank_model::LoadedModel;
use lowrank_tasks::evaluate::{eval_generation, examples_from_task};
use lowrank_tasks::Task;
use lowrank_train::progress::Event;
use lowrank_train::{TrainConfig, Trainer};

use crate::plot::{loss_curves_svg, read_metrics};
use crate::report::human_bytes;
use crate::runs::{io_err, ExpError, Result};

/// What to run: the tasks and the budget per task.
pub struct DemoOptions {
    /// Where the report, data and adapters go.
    pub out: PathBuf,
    pub tasks: Vec<Box<dyn Task>>,
    /// Optimizer steps per task (batch 8).
    pub steps: usize,
    /// Time box for training, seconds per task (0: none).
    pub train_seconds: f64,
    /// Generated training examples per task.
    pub n_train: usize,
    /// Held-out examples per task.
    pub eval_n: usize,
    /// Arithmetic of the frozen base in training.
    pub compute: lowrank_model::quant::Compute,
    /// Seed of the generated data, initialisation and shuffling.
    pub seed: u64,
}

/// One task's result.
#[derive(Debug, Clone)]
pub struct DemoRow {
    pub task: String,
    /// The task's first metric, and its direction.
    pub metric: String,
    pub higher_better: bool,
    pub base: f64,
    pub adapter: f64,
    /// The task's other metrics: (name, base, adapter).
    pub extra: Vec<(String, f64, f64)>,
    pub params: usize,
    pub adapter_bytes: u64,
    pub train_s: f64,
    pub tok_s: f64,
    pub steps: usize,
}

impl DemoRow {
    /// Does the adapter beat the base on the task's first metric?
    pub fn improved(&self) -> bool {
        if self.higher_better {
            self.adapter > self.base
        } else {
            self.adapter < self.base
        }
    }
}

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rows: Vec<DemoRow>,
    /// The report written to `out/README.md`.
    pub markdown: String,
}

impl DemoReport {
    /// Did every adapter beat the base on its task's metric?
    pub fn all_better(&self) -> bool {
        self.rows.iter().all(DemoRow::improved)
    }
}

/// Train, score and report every task of `o`; progress (training steps, evaluation, one line
/// per task) goes to `progress`.
pub fn demo(
    lm: &LoadedModel,
    o: &DemoOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<DemoReport> {
    let t_all = Instant::now();
    std::fs::create_dir_all(&o.out).map_err(io_err(&o.out))?;
    progress(&Event::Note(format!(
        "lowrank demo: {} tasks, one rank-8 q,v adapter each, {} steps × 8 examples per task, {} held-out examples",
        o.tasks.len(),
        o.steps,
        o.eval_n
    )));
    let mut rows = Vec::new();
    for task in &o.tasks {
        rows.push(run_task(lm, o, task.as_ref(), progress)?);
    }
    let markdown = report(lm, o, &rows, t_all.elapsed().as_secs_f64())?;
    let path = o.out.join("README.md");
    std::fs::write(&path, &markdown).map_err(io_err(&path))?;
    Ok(DemoReport { rows, markdown })
}

/// One task: generate its data, train its adapter, score base and adapter, plot the losses.
fn run_task(
    lm: &LoadedModel,
    o: &DemoOptions,
    task: &dyn Task,
    progress: &mut dyn FnMut(&Event),
) -> Result<DemoRow> {
    let name = task.name();
    progress(&Event::Note(format!("\n== {name}: {}", task.description())));
    let data = o.out.join("data").join(name);
    lowrank_tasks::make_task_files(task, &data, o.seed, o.n_train, o.eval_n)
        .map_err(io_err(&data))?;
    let ad_dir = o.out.join("adapters").join(name);
    let cfg = TrainConfig {
        data: Some(data.join("train.jsonl")),
        out: Some(ad_dir.clone()),
        rank: 8,
        targets: vec!["q_proj".into(), "v_proj".into()],
        lr: 2e-3,
        warmup_steps: 2,
        batch_size: 8,
        max_steps: Some(o.steps),
        time_budget_s: o.train_seconds,
        seed: o.seed,
        compute: o.compute,
        ..Default::default()
    };
    let mut t = Trainer::new(lm, cfg)?;
    let stop = AtomicBool::new(false);
    let s = t.run_with_progress(None, &stop, progress)?;
    let adapter = t
        .current_adapter()?
        .ok_or_else(|| ExpError("adapter".into()))?;
    let set: AdapterSet = Arc::new(vec![(Arc::new(adapter), 1.0)]);
    let ex = examples_from_task(task, o.eval_n, o.seed);
    let metrics = task.metrics();
    let base = eval_generation(lm, &ex, &metrics, None, 16, progress)?;
    let tuned = eval_generation(lm, &ex, &metrics, Some(set), 16, progress)?;
    let m0 = metrics[0];
    let row = DemoRow {
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
    progress(&Event::Note(format!(
        "{name}: {} {:.1} → {:.1} ({} steps, {:.0} s, {:.0} tok/s)",
        row.metric, row.base, row.adapter, row.steps, row.train_s, row.tok_s
    )));
    let (tr, ev) = read_metrics(&ad_dir.join("metrics.jsonl"));
    loss_curves_svg(
        &format!("{name}: LoRA r=8 on q,v"),
        &[
            ("train loss".to_string(), tr),
            ("eval loss".to_string(), ev),
        ],
        &o.out.join(format!("loss-{name}.svg")),
    )
    .map_err(ExpError)?;
    Ok(row)
}

/// The README: the table (base vs adapter per task), storage, links.
fn report(lm: &LoadedModel, o: &DemoOptions, rows: &[DemoRow], total_s: f64) -> Result<String> {
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
    for r in rows {
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
    writeln!(md, "\nAdapters (PEFT format) are in `adapters/<task>/`; try `lowrank generate --adapter {}/adapters/sql --chat ...` or `lowrank serve --adapters {}/adapters`.", o.out.display(), o.out.display())?;
    writeln!(md, "\nTotal demo time: {total_s:.0} s.")?;
    Ok(md)
}
