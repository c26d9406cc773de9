//! `lowrank train`: flags and `--config FILE.toml` (same keys; flags override).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_train::optim::Schedule;
use lowrank_train::{Method, TrainConfig, Trainer};

use super::ModelArg;

#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// TOML file with the same settings (keys as below, with underscores).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training JSONL ({"text"}, {"prompt","completion"}, {"messages"} or alpaca records).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Output directory (the final PEFT adapter, metrics.jsonl, checkpoints).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Comma-separated modules: q_proj,v_proj (default), ..., or all-linear.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    #[arg(long)]
    pub rank: Option<usize>,
    /// Default 2 × rank.
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Scale α/√r instead of α/r.
    #[arg(long)]
    pub rslora: bool,
    /// default | gaussian | pissa
    #[arg(long)]
    pub init: Option<String>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// LoRA+: B's learning rate is lr × ratio.
    #[arg(long)]
    pub lr_b_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// cosine | linear | constant
    #[arg(long)]
    pub schedule: Option<Schedule>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Fill micro-batches by tokens (batch-size × max-seq-len) instead of by count.
    #[arg(long)]
    pub pack: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Max global gradient norm (0: off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// lora | full
    #[arg(long)]
    pub method: Option<Method>,
    /// Skip (and count) bad records instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Stop after this many seconds.
    #[arg(long)]
    pub time_budget: Option<f64>,
    /// dtype of the saved adapter: f32 (default), f16 or bf16.
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Continue from a checkpoint directory (DIR/checkpoint-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml(p).map_err(anyhow::Error::msg)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident => $g:ident),*) => { $( if let Some(v) = &self.$f { c.$g = v.clone().into(); } )* };
        }
        set!(targets => targets, rank => rank, dropout => dropout, init => init, lr => lr, lr_b_ratio => lr_b_ratio,
             weight_decay => weight_decay, warmup_steps => warmup_steps, schedule => schedule, epochs => epochs,
             batch_size => batch_size, grad_accum => grad_accum, max_seq_len => max_seq_len, seed => seed,
             eval_every => eval_every, save_every => save_every, keep_checkpoints => keep_checkpoints,
             grad_clip => grad_clip, method => method, time_budget => time_budget_s, save_dtype => save_dtype);
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        if self.eval.is_some() {
            c.eval = self.eval.clone();
        }
        if self.out.is_some() {
            c.out = self.out.clone();
        }
        if self.alpha.is_some() {
            c.alpha = self.alpha;
        }
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        c.rslora |= self.rslora;
        c.pack |= self.pack;
        c.skip_bad |= self.skip_bad;
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

pub fn run(a: TrainArgs, device: &Device) -> Result<()> {
    let cfg = a.to_config()?;
    let lm = super::load(&a.model, device)?;
    let mut t = Trainer::new(&lm, cfg.clone()).context("preparing training")?;
    t.show_progress = !a.quiet;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let s = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if s.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step; saving a checkpoint (Ctrl-C again to abort)");
        });
    }
    eprintln!(
        "training {} ({} trainable parameters, {} steps) on {}",
        match cfg.method {
            Method::Lora => format!("LoRA r={} on {}", cfg.rank, cfg.targets.join(",")),
            Method::Full => "all weights".into(),
        },
        t.trainable_params(),
        t.total_steps(),
        cfg.data
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let s = t.run(a.resume.as_deref(), &stop)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    if s.interrupted {
        std::process::exit(130);
    }
    Ok(())
}
