//! The LoRA paper's experiments on our model: `sweep`, `budget`, `similarity`, `amplify`,
//! `compare`, and adapter arithmetic (`combine`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use lowrank_experiments::analysis::{amplify, parse_module, similarity};
use lowrank_experiments::compare::{compare, CompareOptions};
use lowrank_experiments::report::heatmap;
use lowrank_experiments::sweep::{budget, rank_for_budget, sweep, BUDGET_TYPES};
use lowrank_experiments::{
    parse_ranks, parse_target_sets, targets_of, weight_label, DataSpec, RunSettings,
};
use lowrank_lora::CombineMethod;
use lowrank_train::TrainConfig;

use super::progress::Bars;
use super::ModelArg;

/// Where the data comes from.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// A built-in task (training and held-out sets are generated).
    #[arg(long, conflicts_with = "data")]
    pub task: Option<String>,
    /// Training JSONL (with --eval and --metric).
    #[arg(long, requires = "eval")]
    pub data: Option<PathBuf>,
    /// Held-out JSONL ({"messages"} whose last message is the expected answer, or prompt/completion).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// exact | bleu | slot-error | accuracy (default: the task's first metric).
    #[arg(long)]
    pub metric: Option<String>,
    /// Training examples generated for --task.
    #[arg(long)]
    pub n_train: Option<usize>,
    /// Held-out examples scored by greedy generation.
    #[arg(long)]
    pub n_eval: Option<usize>,
    /// Held-out examples for the eval loss (0: none).
    #[arg(long)]
    pub n_eval_loss: Option<usize>,
}

/// Training budget and settings shared by every configuration.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Output directory (report.md, JSON, one sub-directory per run).
    #[arg(long)]
    pub out: PathBuf,
    /// Time box per configuration, seconds (0: none).
    #[arg(long)]
    pub budget_s: Option<f64>,
    /// Step limit per configuration.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longer sequences are truncated to this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Seed of the generated data, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generation batch for scoring (default 32; --quick: 40).
    #[arg(long)]
    pub eval_batch: Option<usize>,
    /// A tiny budget (a few steps, ~40 held-out examples): a smoke run for CI.
    #[arg(long)]
    pub quick: bool,
    /// Arithmetic of the frozen base in training: f32, int8 or int4 (QLoRA-style, see
    /// `train`).
    #[arg(long, value_enum, default_value_t = super::ComputeKind::F32)]
    pub compute: super::ComputeKind,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

struct Budget {
    max_steps: usize,
    budget_s: f64,
    n_train: usize,
    n_eval: usize,
    n_eval_loss: usize,
}

impl RunArgs {
    fn resolve(
        &self,
        d: &DataArgs,
        full: Budget,
        quick: Budget,
    ) -> Result<(DataSpec, TrainConfig)> {
        let b = if self.quick { quick } else { full };
        let max_steps = self.max_steps.unwrap_or(b.max_steps);
        let cfg = TrainConfig {
            max_steps: Some(max_steps),
            time_budget_s: self.budget_s.unwrap_or(b.budget_s),
            lr: self.lr,
            batch_size: self.batch_size,
            max_seq_len: self.max_seq_len,
            seed: self.seed,
            compute: self.compute.into(),
            ..TrainConfig::default()
        };
        if cfg.time_budget_s < 0.0 || !cfg.time_budget_s.is_finite() {
            anyhow::bail!("--budget-s must be ≥ 0");
        }
        cfg.validate().map_err(anyhow::Error::msg)?;
        if self.eval_batch == Some(0) {
            anyhow::bail!("--eval-batch must be ≥ 1");
        }
        let spec = DataSpec {
            task: d.task.clone(),
            data: d.data.clone(),
            eval: d.eval.clone(),
            metric: d.metric.clone(),
            n_train: d.n_train.unwrap_or(b.n_train),
            n_eval: d.n_eval.unwrap_or(b.n_eval),
            n_eval_loss: d.n_eval_loss.unwrap_or(b.n_eval_loss),
            seed: self.seed,
        };
        if spec.n_eval == 0 {
            anyhow::bail!("--n-eval must be ≥ 1");
        }
        Ok((spec, cfg))
    }

    fn settings(&self, base: TrainConfig) -> RunSettings {
        RunSettings {
            base,
            eval_batch: self.eval_batch(),
        }
    }

    /// Progress output, unless --quiet.
    fn bars(&self) -> Bars {
        Bars::new(!self.quiet)
    }

    fn eval_batch(&self) -> usize {
        self.eval_batch.unwrap_or(if self.quick { 40 } else { 32 })
    }
}

const SWEEP_FULL: Budget = Budget {
    max_steps: 300,
    budget_s: 600.0,
    n_train: 1200,
    n_eval: 100,
    n_eval_loss: 32,
};
const SWEEP_QUICK: Budget = Budget {
    max_steps: 3,
    budget_s: 60.0,
    n_train: 64,
    n_eval: 40,
    n_eval_loss: 0,
};

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Ranks (columns of the table). Default 1,2,4,8,64 (--quick: 1,4).
    #[arg(long)]
    pub ranks: Option<String>,
    /// Weight-type sets (rows), separated by `|` or repeated: q|q,v|q,k,v,o (--quick: q,v).
    #[arg(long)]
    pub targets: Vec<String>,
}

pub fn run_sweep(a: SweepArgs, device: &Device) -> Result<()> {
    let ranks =
        parse_ranks(
            a.ranks
                .as_deref()
                .unwrap_or(if a.run.quick { "1,4" } else { "1,2,4,8,64" }),
        )?;
    let targets = if a.targets.is_empty() {
        vec![if a.run.quick {
            "q,v".to_string()
        } else {
            "q|q,v|q,k,v,o".to_string()
        }]
    } else {
        a.targets.clone()
    };
    let sets = parse_target_sets(&targets)?;
    let (spec, cfg) = a.run.resolve(&a.data, SWEEP_FULL, SWEEP_QUICK)?;
    let p = spec.prepare(&a.run.out)?;
    let mut lm = super::load_for(&a.model, device, cfg.compute)?;
    let s = a.run.settings(cfg);
    let mut bars = a.run.bars();
    let rep = sweep(
        &mut lm,
        &p,
        &s,
        &sets,
        &ranks,
        &a.run.out,
        &AtomicBool::new(false),
        &mut |e| bars.handle(e),
    )
    .context("sweep")?;
    println!("{}", rep.table());
    if let Some(r) = &rep.recommended {
        println!(
            "recommended: {} r={} ({} = {:.1})",
            r.label, r.rank, rep.metric, r.metric
        );
    }
    eprintln!(
        "wrote {} and {}",
        a.run.out.join("report.md").display(),
        a.run.out.join("sweep.json").display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Trainable-parameter budget shared by every weight type.
    #[arg(long)]
    pub params: usize,
    /// Weight-type sets compared (default: the paper's Wq; Wk; Wv; Wo; Wq,Wk; Wq,Wv; Wq,Wk,Wv,Wo).
    #[arg(long)]
    pub types: Vec<String>,
}

pub fn run_budget(a: BudgetArgs, device: &Device) -> Result<()> {
    let types = if a.types.is_empty() {
        vec![BUDGET_TYPES.to_string()]
    } else {
        a.types.clone()
    };
    let sets = parse_target_sets(&types)?;
    if a.params == 0 {
        anyhow::bail!("--params must be ≥ 1");
    }
    let (spec, cfg) = a.run.resolve(&a.data, SWEEP_FULL, SWEEP_QUICK)?;
    let mut lm = super::load_for(&a.model, device, cfg.compute)?;
    // Check the budget before generating data or training anything.
    let shapes = lm.model.base_shapes();
    for t in &sets {
        if rank_for_budget(&shapes, t, a.params) == 0 {
            let need = shapes.lora_params(1, &targets_of(t));
            anyhow::bail!(
                "--params {}: too small for {} (r = 1 needs {need} trainable parameters)",
                a.params,
                weight_label(t)
            );
        }
    }
    let p = spec.prepare(&a.run.out)?;
    let s = a.run.settings(cfg);
    let mut bars = a.run.bars();
    let rep = budget(
        &mut lm,
        &p,
        &s,
        &sets,
        a.params,
        &a.run.out,
        &AtomicBool::new(false),
        &mut |e| bars.handle(e),
    )
    .context("budget")?;
    println!("{}", rep.table());
    eprintln!(
        "wrote {} and {}",
        a.run.out.join("report.md").display(),
        a.run.out.join("budget.json").display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// First adapter directory.
    pub a1: PathBuf,
    /// Second adapter directory.
    pub a2: PathBuf,
    /// Module type compared (q_proj, v_proj, … or q, v, …).
    #[arg(long, default_value = "q_proj")]
    pub module: String,
    /// One layer (default: the mean over every layer both adapters adapt).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Write the heatmap (SVG).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run_similarity(a: SimilarityArgs, device: &Device) -> Result<()> {
    let module = parse_module(&a.module)?;
    let lm = super::load(&a.model, device)?;
    let shapes = lm.model.base_shapes();
    let load = |d: &PathBuf| {
        lowrank_lora::peft::load_peft(d, &shapes, device)
            .with_context(|| format!("loading adapter {}", d.display()))
    };
    let (x, y) = (load(&a.a1)?, load(&a.a2)?);
    let rep = similarity(&x, &y, module, a.layer)?;
    if let Some(p) = &a.out {
        let layers = if rep.layers.len() == 1 {
            format!("layer {}", rep.layers[0])
        } else {
            format!("mean of {} layers", rep.layers.len())
        };
        let title = format!("φ(A1, A2, i, j), {} ({layers})", rep.module);
        heatmap(
            p,
            &title,
            &rep.grid,
            &format!("i (A1, r = {})", rep.r1),
            &format!("j (A2, r = {})", rep.r2),
        )
        .map_err(anyhow::Error::msg)?;
        eprintln!("wrote {}", p.display());
    }
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

#[derive(Args, Debug)]
pub struct AmplifyArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Adapter directory.
    pub adapter: PathBuf,
    /// One module type (default: all adapted).
    #[arg(long)]
    pub module: Option<String>,
    /// One layer (default: mean over layers).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Analyse even if the adapter was trained on another base.
    #[arg(long)]
    pub force: bool,
}

pub fn run_amplify(a: AmplifyArgs, device: &Device) -> Result<()> {
    let module = a.module.as_deref().map(parse_module).transpose()?;
    let lm = super::load(&a.model, device)?;
    let (ad, _) = lowrank_model::adapters::load_adapter(&lm.model, &a.adapter, a.force)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let mut bars = Bars::new(!a.json);
    let rep = amplify(&lm.model, &ad, module, a.layer, &mut |e| bars.handle(e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!("{}", rep.table());
    }
    Ok(())
}

const CMP_FULL: Budget = Budget {
    max_steps: 100,
    budget_s: 1800.0,
    n_train: 1200,
    n_eval: 100,
    n_eval_loss: 32,
};
const CMP_QUICK: Budget = Budget {
    max_steps: 2,
    budget_s: 600.0,
    n_train: 32,
    n_eval: 20,
    n_eval_loss: 0,
};

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA target modules.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Learning rate of full fine-tuning (--lr is LoRA's).
    #[arg(long, default_value_t = 5e-5)]
    pub full_lr: f64,
}

pub fn run_compare(a: CompareArgs, device: &Device) -> Result<()> {
    let targets = parse_target_sets(std::slice::from_ref(&a.targets))?;
    if targets.len() != 1 {
        anyhow::bail!("--targets: give one module set, e.g. q,v");
    }
    if a.rank == 0 {
        anyhow::bail!("--rank must be ≥ 1");
    }
    if !(a.full_lr > 0.0 && a.full_lr.is_finite()) {
        anyhow::bail!("--full-lr must be a positive number");
    }
    let (spec, cfg) = a.run.resolve(&a.data, CMP_FULL, CMP_QUICK)?;
    let p = spec.prepare(&a.run.out)?;
    let mut lm = super::load(&a.model, device)?;
    let o = CompareOptions {
        exe: std::env::current_exe().context("locating the lowrank executable")?,
        model: a.model.model.clone(),
        threads: None,
        rank: a.rank,
        targets: targets[0].clone(),
        lora_lr: cfg.lr,
        full_lr: a.full_lr,
        max_steps: cfg.max_steps.unwrap_or(1),
        budget_s: cfg.time_budget_s,
        batch_size: cfg.batch_size,
        max_seq_len: cfg.max_seq_len,
        seed: cfg.seed,
        eval_batch: a.run.eval_batch(),
        compute: cfg.compute,
    };
    let mut bars = a.run.bars();
    let rep = compare(&mut lm, &p, &o, &a.run.out, &mut |e| bars.handle(e)).context("compare")?;
    println!("{}", rep.table());
    println!("{}", rep.storage_table());
    eprintln!("wrote {}", a.run.out.join("report.md").display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct CombineArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Adapter directories, each optionally with `:weight` (default 1).
    #[arg(required = true)]
    pub adapters: Vec<String>,
    /// linear | cat | svd (PEFT's add_weighted_adapter).
    #[arg(long, default_value = "svd")]
    pub method: String,
    /// Rank of the svd result (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Output adapter directory (PEFT format).
    #[arg(long)]
    pub out: PathBuf,
    /// Combine adapters even if one was trained on another base.
    #[arg(long)]
    pub force: bool,
}

pub fn run_combine(a: CombineArgs, device: &Device) -> Result<()> {
    let method: CombineMethod = a.method.parse()?;
    if a.rank == Some(0) {
        anyhow::bail!("--rank must be ≥ 1");
    }
    if a.rank.is_some() && method != CombineMethod::Svd {
        anyhow::bail!("--rank applies to --method svd only");
    }
    let lm = super::load(&a.model, device)?;
    let mut parts = Vec::new();
    for spec in &a.adapters {
        let (dir, w) = lowrank_model::adapters::parse_adapter_spec(spec)?;
        let (ad, _) = lowrank_model::adapters::load_adapter(&lm.model, &dir, a.force)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        parts.push((ad, w));
    }
    let refs: Vec<(&lowrank_lora::Adapter, f64)> = parts.iter().map(|(ad, w)| (ad, *w)).collect();
    let out = lowrank_lora::combine(&refs, method, a.rank)?;
    lowrank_lora::save_peft(&out, &a.out, DType::F32)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "method": a.method,
            "rank": out.config.r,
            "modules": out.modules.len(),
            "trainable_params": out.num_params(),
            "weights": parts.iter().map(|p| p.1).collect::<Vec<_>>(),
        })
    );
    Ok(())
}
