//! `lowrank train`: flags and `--config FILE.toml` (same keys; flags override).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_train::optim::Schedule;
use lowrank_train::{Method, TrainConfig, Trainer};

use super::progress::Bars;
use super::ModelArg;

// Every setting is an `Option` (or a `false` switch) rather than a clap default, so that a
// value from `--config` is only overridden by a flag actually given; the defaults shown in
// the help are `TrainConfig::default()`'s, which a test below keeps in step.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Arithmetic of the frozen base: f32, int8 (the base packed in 8-bit blocks, never held
    /// in f32; LoRA, norms, attention and the loss stay f32) or int4 (4-bit blocks, QLoRA's
    /// base: weights not on a 16-level grid are rounded) [default: f32]
    #[arg(long, value_enum)]
    pub compute: Option<super::ComputeKind>,
    /// TOML file with the same settings (keys as below, with underscores); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training JSONL ({"text"}, {"prompt","completion"}, {"messages"} or alpaca records).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out JSONL (same formats) for the eval loss; none: no evaluation.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Output directory (the final PEFT adapter, metrics.jsonl, checkpoints).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Comma-separated modules (q_proj … down_proj, short q … down) or all-linear [default: q_proj,v_proj]
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// LoRA rank r [default: 8]
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA α; the update is scaled by α/r [default: 2 × rank]
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input during training [default: 0]
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Scale α/√r instead of α/r (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    /// Initialisation of A and B: default (kaiming A, zero B), gaussian or pissa [default: default]
    #[arg(long)]
    pub init: Option<String>,
    /// Peak learning rate (AdamW) [default: 0.001]
    #[arg(long)]
    pub lr: Option<f64>,
    /// LoRA+: B's learning rate is lr × ratio [default: 1]
    #[arg(long)]
    pub lr_b_ratio: Option<f64>,
    /// AdamW decoupled weight decay [default: 0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Optimizer steps of linear warm-up from 0 to lr [default: 0]
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning-rate decay after warm-up: cosine, linear or constant [default: cosine]
    #[arg(long)]
    pub schedule: Option<Schedule>,
    /// Passes over the training data (ignored with --max-steps) [default: 1]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps, instead of after --epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch [default: 4]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Longer sequences are truncated to this many tokens [default: 512]
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Fill micro-batches by tokens (batch-size × max-seq-len) instead of by count.
    #[arg(long)]
    pub pack: bool,
    /// Seed of initialisation, shuffling and dropout [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate on --eval every N steps (0: only at the end) [default: 0]
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N steps (0: never, except on Ctrl-C) [default: 0]
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Checkpoints kept on disk (older ones are deleted) [default: 2]
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Max global gradient norm (0: off) [default: 1]
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// lora (adapters on a frozen base) or full (every weight) [default: lora]
    #[arg(long)]
    pub method: Option<Method>,
    /// Skip (and count) bad records instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Keep only each block's input and replay the block in the backward: activation memory
    /// of [tokens, hidden] per layer instead of the whole tape, for about one more forward
    /// pass of time; the same gradients bit for bit (LoRA only).
    #[arg(long)]
    pub checkpoint_layers: bool,
    /// How the backward multiplies dX = dY·W₀ through the packed base (int8/int4 compute):
    /// bf16 (CPUs with AVX-512 BF16: about twice that product's speed, dY and W₀ rounded to
    /// bf16, and the LM head's forward too, see the README) or f32 (both off bf16)
    /// [default: bf16 where the CPU has AVX-512 BF16, else f32]
    #[arg(long)]
    pub backward_dx: Option<String>,
    /// Stop after this many seconds of training (0: no limit) [default: 0]
    #[arg(long)]
    pub time_budget: Option<f64>,
    /// dtype of the saved adapter: f32, f16 or bf16 [default: f32]
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Continue a run: a checkpoint directory (OUT/checkpoint-N), or a run's output directory
    /// (its newest complete checkpoint is taken, and named).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// With --resume: continue even if settings that change the run's numbers (seed, lr,
    /// schedule, warm-up, steps, batch size, grad-accum, max-seq-len, dropout, α, the data or
    /// the base model ...) differ from the checkpoint's; the new values apply from the resumed
    /// step, so the result matches neither run. Without it such a resume is refused, naming
    /// each change. Output dir, eval/save frequency, keep-checkpoints and threads may always change.
    #[arg(long)]
    pub allow_changed_config: bool,
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
             grad_clip => grad_clip, method => method, time_budget => time_budget_s, save_dtype => save_dtype,
             compute => compute);
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
        c.checkpoint_layers |= self.checkpoint_layers;
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

pub fn run(a: TrainArgs, device: &Device) -> Result<()> {
    #[cfg(feature = "mpi")]
    {
        if let Some(m) = super::mpi::Mpi::init() {
            use lowrank_train::parallel::Collective;
            let (rank, size) = (m.rank(), m.size());
            let abort = super::mpi::Mpi::abort_handle();
            return match run_with(a, device, Some(Box::new(m))) {
                Ok(()) => Ok(()),
                Err(e) if size > 1 => {
                    // The other ranks would wait for this one forever: stop the whole job.
                    eprintln!("error on rank {rank} of {size}: {e:#}");
                    abort(2)
                }
                Err(e) => Err(e),
            };
        }
    }
    #[cfg(not(feature = "mpi"))]
    if super::mpi_world_size().is_some_and(|n| n > 1) {
        anyhow::bail!(
            "started by an MPI launcher, but this lowrank was built without MPI: every rank \
             would train alone into the same directory (build with `cargo build --release \
             --features mpi`)"
        );
    }
    run_with(a, device, None)
}

fn run_with(
    a: TrainArgs,
    device: &Device,
    collective: Option<Box<dyn lowrank_train::parallel::Collective>>,
) -> Result<()> {
    let cfg = a.to_config()?;
    let dx = super::backward_dx(a.backward_dx.as_deref(), cfg.compute)?;
    let mut lm = super::load_for(&a.model, device, cfg.compute)?;
    if let Some(dx) = dx {
        lm.model.set_train_dx(dx);
    }
    let mut t = Trainer::new(&lm, cfg.clone()).context("preparing training")?;
    t.allow_changed_config(a.allow_changed_config);
    let (rank, size) = collective.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
    if let Some(c) = collective {
        t.set_collective(c)?;
    }
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
    if rank == 0 {
        let ranks = if size > 1 {
            format!(", data-parallel over {size} ranks")
        } else {
            String::new()
        };
        eprintln!(
            "training {} ({} trainable parameters, {} steps{ranks}) on {}",
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
    }
    let mut bars = Bars::new(!a.quiet && rank == 0);
    let s = t.run_with_progress(a.resume.as_deref(), &stop, &mut |e| bars.handle(e))?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    if s.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use lowrank_train::TrainConfig;
    use serde_json::Value;

    /// Each `train` flag with a configured default shows `TrainConfig::default()`'s value as
    /// `[default: …]` at the end of its help (the flags are `Option`s, so clap cannot show it).
    #[test]
    fn train_help_shows_the_config_defaults() {
        let cli = crate::cli::Cli::command();
        let train = cli.find_subcommand("train").expect("train subcommand");
        let defaults = serde_json::to_value(TrainConfig::default()).unwrap();
        let mut checked = Vec::new();
        for arg in train.get_arguments() {
            let id = arg.get_id().as_str();
            let key = if id == "time_budget" {
                "time_budget_s"
            } else {
                id
            };
            let shown = match defaults.get(key) {
                // No config key, no default (data, out, max_steps, alpha) or an off switch.
                None | Some(Value::Null) | Some(Value::Bool(false)) => continue,
                Some(Value::Array(xs)) => xs
                    .iter()
                    .map(|x| x.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(","),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.as_f64().unwrap().to_string(),
                Some(other) => panic!("--{id}: no rendering for {other}"),
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let want = format!("[default: {shown}]");
            assert!(
                help.ends_with(&want),
                "--{id}: help {help:?} should end with {want}"
            );
            checked.push(id);
        }
        assert_eq!(checked.len(), 22, "{checked:?}");
    }
}
