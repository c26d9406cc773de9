//! The training loop: LoRA (A, B trainable; base frozen, no dW) or full fine-tuning through
//! the same data path; AdamW, schedule, clipping, accumulation; metrics, evaluation,
//! atomic checkpoints, exact resume, Ctrl-C.
//!
//! [`Trainer::run`] is a sequence of named steps: `begin` (a fresh start or a resumed
//! checkpoint), then per optimizer step `optimizer_step` (micro-batch `gradients` → clipping →
//! AdamW) and `log_step`, and when due `evaluate` and `save_checkpoint`; at the end `finish`
//! (final eval, the saved adapter, the summary). The trainable side is set up in `init.rs`,
//! checkpoints are in `checkpoint.rs`, the other files a run writes in `files.rs`.
//!
//! Resuming (`resume`: a checkpoint, or an output directory whose newest complete checkpoint
//! is taken) refuses a checkpoint whose settings or inputs would change the run's numbers
//! unless [`Trainer::allow_changed_config`] is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use lowrank_lora::adapter::Provenance;
use lowrank_lora::Adapter;
use lowrank_model::model::AdapterSet;
use lowrank_model::quant::Compute;
use lowrank_model::{ForwardOpts, Llama, LoadedModel};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Method, TrainConfig};
use crate::data::{self, LoadOptions, LoadStats, Sample};
use crate::loss::{batch_loss, dataset_nll, lora_batch_grads};
use crate::optim::{clip_grad_norm, lr_at, AdamW, Param};
use crate::parallel::{share, sum_f32, sum_f64, Collective};
use crate::progress::{silent, Event};

mod card;
mod checkpoint;
mod files;
mod init;

use checkpoint::{
    list_checkpoints, pick, remove_dir_atomically, sweep_leftovers, truncate_metrics, FileId,
    RunInputs,
};
use files::{append_line, round3, write_atomic};
pub use files::{created_stamp, dir_bytes, peak_rss};

pub use crate::error::TrainError;

type Result<T> = std::result::Result<T, TrainError>;

fn io<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// What a run produced, for the summary line, the demo table and the reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub method: String,
    pub steps: usize,
    pub trainable_params: usize,
    pub wall_s: f64,
    pub tokens: usize,
    pub tok_per_s: f64,
    pub peak_rss_bytes: u64,
    /// Bytes of the saved adapter (or model) files.
    pub output_bytes: u64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    pub interrupted: bool,
    pub records: usize,
    pub truncated: usize,
    pub skipped_bad: usize,
    /// The checkpoint this run continued from (`None`: a fresh start).
    #[serde(default)]
    pub resumed_from: Option<PathBuf>,
    /// Processes of a data-parallel job (1: alone).
    #[serde(default = "one")]
    pub ranks: usize,
    /// Seconds spent exchanging gradients with the other ranks.
    #[serde(default)]
    pub comm_s: f64,
    /// sha256 of the trainable tensors' f32 values (the same on every rank of a job).
    #[serde(default)]
    pub params_sha256: String,
}

fn one() -> usize {
    1
}

/// The trainable side of a run. One per trainer, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Trainable {
    Lora { adapter: Adapter, set: AdapterSet },
    Full,
}

pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    base: &'a LoadedModel,
    /// The model that runs: the base itself (LoRA) or a copy whose weights are variables.
    model: Llama,
    trainable: Trainable,
    params: Vec<Param>,
    train: Vec<Sample>,
    eval: Vec<Sample>,
    stats: LoadStats,
    /// Why each bad record of the training and eval files was skipped (`--skip-bad`).
    skipped: Vec<String>,
    /// Micro-batches of one epoch, before shuffling (indices into `train`).
    epoch_batches: usize,
    total_steps: usize,
    out: PathBuf,
    /// The data files and base model as read, recorded in checkpoints and compared on resume.
    inputs: RunInputs,
    /// Resume even if the checkpoint's settings or inputs differ (the new ones apply).
    allow_changed_config: bool,
    /// The other ranks of a data-parallel job (none: this process trains alone).
    collective: Option<Box<dyn Collective>>,
    /// Seconds spent exchanging gradients (data-parallel jobs).
    comm_s: std::cell::Cell<f64>,
}

/// Where a run stands between optimizer steps: what a checkpoint records, and the clock.
struct RunState {
    opt: AdamW,
    dropout_rng: ChaCha8Rng,
    /// Optimizer steps done.
    step: usize,
    tokens: usize,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    eval_before: Option<f64>,
    metrics: PathBuf,
    /// The checkpoint resumed from.
    resumed_from: Option<PathBuf>,
    /// Seconds trained before this process (a resumed run), and when this process's first step began.
    elapsed0: f64,
    t0: Instant,
}

impl RunState {
    /// Seconds of training so far, across resumes.
    fn elapsed(&self) -> f64 {
        self.elapsed0 + self.t0.elapsed().as_secs_f64()
    }
}

/// What one optimizer step measured.
struct StepStats {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// Tokens of the step's micro-batches.
    tokens: usize,
    /// Seconds of training after the step.
    elapsed: f64,
}

/// Micro-batches for epoch `e` (deterministic in seed and epoch).
fn epoch_order(n: usize, cfg: &TrainConfig, e: usize, train: &[Sample]) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(
        cfg.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(e as u64),
    );
    idx.shuffle(&mut rng);
    if cfg.pack {
        let budget = cfg.batch_size * cfg.max_seq_len;
        let mut out = vec![];
        let mut cur = vec![];
        let mut len = 0;
        for i in idx {
            let l = train[i].ids.len();
            if len + l > budget && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                len = 0;
            }
            len += l;
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    } else {
        idx.chunks(cfg.batch_size).map(|c| c.to_vec()).collect()
    }
}

impl<'a> Trainer<'a> {
    pub fn new(base: &'a LoadedModel, cfg: TrainConfig) -> Result<Self> {
        cfg.validate().map_err(TrainError::Config)?;
        let data_path = cfg
            .data
            .clone()
            .ok_or_else(|| TrainError::Config("--data: required".into()))?;
        let out = cfg
            .out
            .clone()
            .ok_or_else(|| TrainError::Config("--out: required".into()))?;
        let eos = base.eos_ids().first().copied();
        let lo = LoadOptions {
            max_seq_len: cfg.max_seq_len,
            skip_bad: cfg.skip_bad,
        };
        let (train, stats) = data::load_jsonl(&data_path, &base.tok, eos, &lo)?;
        let mut skipped = stats.skipped.clone();
        let eval = match &cfg.eval {
            Some(p) => {
                let (eval, eval_stats) = data::load_jsonl(p, &base.tok, eos, &lo)?;
                skipped.extend(eval_stats.skipped);
                eval
            }
            None => vec![],
        };
        let epoch_batches = epoch_order(train.len(), &cfg, 0, &train).len();
        let total_steps = cfg
            .max_steps
            .unwrap_or(cfg.epochs * epoch_batches.div_ceil(cfg.grad_accum));
        let inputs = RunInputs {
            data: FileId::of(&data_path)?,
            eval: cfg.eval.as_deref().map(FileId::of).transpose()?,
            base_fingerprint: base.model.fingerprint()?,
        };
        let (mut model, trainable, params) = match cfg.method {
            Method::Lora => Self::init_lora(base, &cfg)?,
            Method::Full if cfg.compute != Compute::F32 => {
                return Err(TrainError::Config(format!(
                    "--compute {}: full fine-tuning trains every weight in f32; use --compute f32",
                    cfg.compute.name()
                )))
            }
            Method::Full if cfg.checkpoint_layers => return Err(TrainError::Config(
                "--checkpoint-layers applies to LoRA training (full fine-tuning runs on autograd)"
                    .into(),
            )),
            Method::Full => Self::init_full(base)?,
        };
        // The base's own compute is reused when it matches (a model loaded for int8 keeps
        // its packing); otherwise the trainer's copy switches.
        if model.compute() != cfg.compute {
            model.set_compute(cfg.compute)?;
        }
        Ok(Trainer {
            cfg,
            base,
            model,
            trainable,
            params,
            train,
            eval,
            stats,
            skipped,
            epoch_batches,
            total_steps,
            out,
            inputs,
            allow_changed_config: false,
            collective: None,
            comm_s: std::cell::Cell::new(0.0),
        })
    }

    /// Train as one rank of a data-parallel job: every global batch is split across the
    /// ranks, their gradients summed (the same on every rank), and only rank 0 writes
    /// (metrics, checkpoints, the adapter, the card). Every rank must run the same
    /// settings and data; LoRA only (full fine-tuning would exchange the whole model).
    pub fn set_collective(&mut self, c: Box<dyn Collective>) -> Result<()> {
        if self.cfg.method == Method::Full && c.size() > 1 {
            return Err(TrainError::Config(
                "data-parallel training exchanges the LoRA gradients; --method full is not supported"
                    .into(),
            ));
        }
        self.collective = Some(c);
        Ok(())
    }

    /// (rank, ranks) of this process's job.
    fn rank_size(&self) -> (usize, usize) {
        self.collective
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.size()))
    }

    /// Does this process write the run's files (rank 0, or a lone process)?
    fn writer(&self) -> bool {
        self.rank_size().0 == 0
    }

    /// Is each flag set on any rank? The same answer on every rank.
    fn agreed(&self, mine: &[bool]) -> Vec<bool> {
        match &self.collective {
            Some(c) if c.size() > 1 => {
                let v: Vec<f64> = mine.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
                sum_f64(c.as_ref(), &v).iter().map(|&x| x > 0.0).collect()
            }
            _ => mine.to_vec(),
        }
    }

    /// Let a resume continue from a checkpoint made with other settings or inputs (seed,
    /// learning rate, data, ...; the new ones apply from the resumed step). Off by default:
    /// such a resume no longer reproduces either run.
    pub fn allow_changed_config(&mut self, yes: bool) {
        self.allow_changed_config = yes;
    }

    pub fn trainable_params(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.var.as_tensor().elem_count())
            .sum()
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    fn adapter_set(&self) -> Option<AdapterSet> {
        match &self.trainable {
            Trainable::Lora { set, .. } => Some(set.clone()),
            Trainable::Full => None,
        }
    }

    /// Micro-batches of optimizer step `step` (the data stream is a pure function of the
    /// seed, so resuming at a step needs no other position).
    fn step_batches(&self, step: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::with_capacity(self.cfg.grad_accum);
        let mut cache: Option<(usize, Vec<Vec<usize>>)> = None;
        for k in 0..self.cfg.grad_accum {
            let g = step * self.cfg.grad_accum + k;
            let (e, i) = (g / self.epoch_batches, g % self.epoch_batches);
            if cache.as_ref().map(|c| c.0) != Some(e) {
                cache = Some((e, epoch_order(self.train.len(), &self.cfg, e, &self.train)));
            }
            out.push(cache.as_ref().unwrap().1[i].clone());
        }
        out
    }

    /// Mean next-token loss over a dataset (no gradients).
    pub fn eval_loss(&self, samples: &[Sample]) -> Result<Option<f64>> {
        if samples.is_empty() {
            return Ok(None);
        }
        let (nll, n) = dataset_nll(&self.model, samples, self.adapter_set())?;
        Ok((n > 0).then(|| nll / n as f64))
    }

    /// Train to the end (or until `stop` is set / the time box ends); returns the summary.
    /// `resume`: a checkpoint directory, or an output directory (its newest complete checkpoint).
    pub fn run(&mut self, resume: Option<&Path>, stop: &AtomicBool) -> Result<TrainSummary> {
        self.run_with_progress(resume, stop, &mut silent)
    }

    /// [`run`](Self::run), reporting steps, evaluations and an interruption to `progress`.
    pub fn run_with_progress(
        &mut self,
        resume: Option<&Path>,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(&Event),
    ) -> Result<TrainSummary> {
        for e in &self.skipped {
            progress(&Event::Warning(format!("skipping bad record: {e}")));
        }
        let mut run = self.begin(resume, progress)?;
        progress(&Event::TrainStart {
            method: self.cfg.method,
            step: run.step,
            total: self.total_steps,
        });
        let mut interrupted = false;
        while run.step < self.total_steps {
            let stopping = stop.load(Ordering::SeqCst);
            let over = self.cfg.time_budget_s > 0.0 && run.elapsed() > self.cfg.time_budget_s;
            // Every rank leaves at the same step (one would otherwise wait for the others).
            let any = self.agreed(&[stopping, over]);
            if any[0] || any[1] {
                interrupted = any[0];
                break;
            }
            let s = self.optimizer_step(&mut run)?;
            test_interrupt_hook(run.step, stop);
            test_crash_hook(self.rank_size().0, run.step);
            self.log_step(&run, &s, progress)?;
            if self.due(self.cfg.eval_every, run.step) {
                self.evaluate(&run, progress)?;
            }
            if self.due(self.cfg.save_every, run.step) {
                self.save_checkpoint(&run, s.elapsed)?;
            }
        }
        progress(&Event::TrainEnd);
        self.finish(run, interrupted, progress)
    }

    /// A fresh start (metrics.jsonl reset, checkpoints of an earlier run removed, the eval loss
    /// before training) or the state of the checkpoint `resume` (tensors, optimizer, data
    /// position, RNG, metrics up to its step). Leftovers of a killed run are swept first.
    fn begin(
        &mut self,
        resume: Option<&Path>,
        progress: &mut dyn FnMut(&Event),
    ) -> Result<RunState> {
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        let swept = if self.writer() {
            sweep_leftovers(&self.out)?
        } else {
            vec![]
        };
        if !swept.is_empty() {
            progress(&Event::Note(format!(
                "removed what an interrupted run left in {}: {}",
                self.out.display(),
                swept.join(", ")
            )));
        }
        let mut run = RunState {
            opt: AdamW::new(self.cfg.lr, self.cfg.weight_decay),
            dropout_rng: ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_add(1)),
            step: 0,
            tokens: 0,
            first_loss: None,
            last_loss: None,
            eval_before: None,
            metrics: self.out.join("metrics.jsonl"),
            resumed_from: None,
            elapsed0: 0.0,
            t0: Instant::now(),
        };
        if let Some(dir) = resume {
            let picked = pick(dir)?;
            for why in &picked.passed_over {
                progress(&Event::Warning(format!(
                    "passing over an incomplete checkpoint: {why}"
                )));
            }
            let changed = self.check_resume_config(&picked)?;
            if !changed.is_empty() {
                progress(&Event::Warning(format!(
                    "resuming with changed settings (allowed): {}",
                    changed.join("; ")
                )));
            }
            let st = picked.state;
            self.load_checkpoint(&picked.dir, &st, &mut run.opt)?;
            progress(&Event::Note(format!(
                "resuming from {} (step {})",
                picked.dir.display(),
                st.step
            )));
            run.resumed_from = Some(picked.dir);
            run.step = st.step;
            run.elapsed0 = st.elapsed_s;
            run.tokens = st.tokens;
            run.first_loss = st.first_loss;
            run.eval_before = st.eval_loss_before;
            run.dropout_rng.set_word_pos(st.dropout_rng_word_pos);
            if self.writer() {
                truncate_metrics(&run.metrics, run.step)?;
                self.prune_checkpoints_through(run.step)?;
            }
        } else if !self.writer() {
            run.eval_before = self.eval_loss(&self.eval)?;
        } else {
            // A fresh start owns the directory: an earlier run's checkpoints would be kept
            // by pruning over this run's own (higher steps) and picked by a later resume.
            let earlier = list_checkpoints(&self.out)?;
            for (_, name) in &earlier {
                remove_dir_atomically(&self.out, name)?;
            }
            if !earlier.is_empty() {
                let names: Vec<&str> = earlier.iter().map(|(_, n)| n.as_str()).collect();
                progress(&Event::Warning(format!(
                    "starting afresh in {}: removed the checkpoints of an earlier run there ({}); resume to continue a run instead",
                    self.out.display(),
                    names.join(", ")
                )));
            }
            let _ = std::fs::remove_file(&run.metrics);
            run.eval_before = self.eval_loss(&self.eval)?;
            if let Some(l) = run.eval_before {
                append_line(&run.metrics, &json!({"step": 0, "eval_loss": l}))?;
            }
        }
        // The clock runs from the first step (the eval before training is not timed).
        run.t0 = Instant::now();
        Ok(run)
    }

    /// One optimizer step: the gradients of its micro-batches summed, clipped, applied by AdamW.
    fn optimizer_step(&self, run: &mut RunState) -> Result<StepStats> {
        let batches = self.step_batches(run.step);
        let total_targets: usize = batches
            .iter()
            .flat_map(|b| b.iter())
            .map(|&i| self.train[i].num_targets())
            .sum::<usize>()
            .max(1);
        let (mut grads, nll, tokens) = match &self.collective {
            Some(c) if c.size() > 1 => {
                let mine: Vec<Vec<usize>> = batches
                    .iter()
                    .map(|b| share(b, c.rank(), c.size()))
                    .collect();
                // Each rank's dropout masks come from its own stream, a function of (seed,
                // step, rank): nothing to carry between steps, so a resume is exact.
                let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_add(1));
                rng.set_stream((run.step as u64) << 16 | c.rank() as u64);
                let (g, nll, tokens) = self.gradients(&mine, total_targets, &mut rng)?;
                self.exchange(c.as_ref(), g, nll, tokens)?
            }
            _ => self.gradients(&batches, total_targets, &mut run.dropout_rng)?,
        };
        let loss = nll / total_targets as f64;
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.grad_clip)?;
        let lr = lr_at(
            self.cfg.lr,
            self.cfg.schedule,
            run.step,
            self.cfg.warmup_steps,
            self.total_steps,
        );
        run.opt.step(&self.params, &grads, lr)?;
        run.step += 1;
        run.tokens += tokens;
        run.first_loss.get_or_insert(loss);
        run.last_loss = Some(loss);
        Ok(StepStats {
            loss,
            lr,
            grad_norm,
            tokens,
            elapsed: run.elapsed(),
        })
    }

    /// Sum this rank's gradients, NLL and tokens with the other ranks' (in rank order: the
    /// same bits on every rank). A parameter this rank has no gradient for (an empty share)
    /// counts as zeros.
    fn exchange(
        &self,
        c: &dyn Collective,
        grads: BTreeMap<String, Tensor>,
        nll: f64,
        tokens: usize,
    ) -> Result<(BTreeMap<String, Tensor>, f64, usize)> {
        let t = Instant::now();
        let mut flat: Vec<f32> = Vec::new();
        for p in &self.params {
            let n = p.var.as_tensor().elem_count();
            match grads.get(&p.name) {
                Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0.0f32, n)),
            }
        }
        let sum = sum_f32(c, &flat);
        let totals = sum_f64(c, &[nll, tokens as f64]);
        let mut out = BTreeMap::new();
        let mut at = 0;
        for p in &self.params {
            let v = p.var.as_tensor();
            let n = v.elem_count();
            let g =
                Tensor::from_slice(&sum[at..at + n], v.shape(), v.device())?.to_dtype(v.dtype())?;
            out.insert(p.name.clone(), g);
            at += n;
        }
        self.comm_s
            .set(self.comm_s.get() + t.elapsed().as_secs_f64());
        Ok((out, totals[0], totals[1] as usize))
    }

    /// The gradients of (Σ NLL / `total_targets`) summed over `batches`, the Σ NLL, and the
    /// tokens seen.
    fn gradients(
        &self,
        batches: &[Vec<usize>],
        total_targets: usize,
        dropout_rng: &mut ChaCha8Rng,
    ) -> Result<(BTreeMap<String, Tensor>, f64, usize)> {
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut nll = 0.0;
        let mut step_tokens = 0;
        for b in batches.iter().filter(|b| !b.is_empty()) {
            let refs: Vec<&Sample> = b.iter().map(|&i| &self.train[i]).collect();
            step_tokens += refs.iter().map(|s| s.ids.len()).sum::<usize>();
            let dropout = (self.cfg.dropout > 0.0).then_some((self.cfg.dropout, &mut *dropout_rng));
            let scale = 1.0 / total_targets as f64;
            let gs: BTreeMap<String, Tensor> = match &self.trainable {
                // LoRA: the hand-written backward (dX only through the frozen base).
                Trainable::Lora { adapter, .. } => {
                    // On a pool worker, so the step's many parallel kernels do not each
                    // hand off from this thread and back (see `on_pool`).
                    let (model, ckpt) = (&self.model, self.cfg.checkpoint_layers);
                    let (n, _, gs) = lowrank_model::model::on_pool(false, || {
                        lora_batch_grads(model, &refs, adapter, dropout, scale, ckpt)
                    })?;
                    nll += n;
                    gs
                }
                // Full fine-tuning: every weight is a variable; candle's autograd.
                Trainable::Full => {
                    let mut fo = ForwardOpts {
                        train: true,
                        dropout,
                    };
                    let hl = batch_loss(&self.model, &refs, None, &mut fo, true, scale)?;
                    nll += hl.nll_sum;
                    let Some(s) = hl.surrogate else { continue };
                    let store = s.backward()?;
                    self.params
                        .iter()
                        .filter_map(|p| {
                            store
                                .get(p.var.as_tensor())
                                .map(|g| (p.name.clone(), g.detach()))
                        })
                        .collect()
                }
            };
            for (name, g) in gs {
                match grads.get_mut(&name) {
                    Some(acc) => *acc = (&*acc + g)?,
                    None => {
                        grads.insert(name, g);
                    }
                }
            }
        }
        Ok((grads, nll, step_tokens))
    }

    /// The step's line in metrics.jsonl, and its progress event.
    fn log_step(
        &self,
        run: &RunState,
        s: &StepStats,
        progress: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        if self.writer() {
            append_line(
                &run.metrics,
                &json!({"step": run.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens": s.tokens, "elapsed": round3(s.elapsed)}),
            )?;
        }
        progress(&Event::TrainStep {
            step: run.step,
            loss: s.loss,
            lr: s.lr,
            tok_per_s: run.tokens as f64 / s.elapsed.max(1e-9),
        });
        Ok(())
    }

    /// Is an action every `every` steps (0: never) due after `step`? Never after the last
    /// step: `finish` evaluates and saves at the end.
    fn due(&self, every: usize, step: usize) -> bool {
        every > 0 && step.is_multiple_of(every) && step < self.total_steps
    }

    /// The eval loss now, into metrics.jsonl and to `progress`.
    fn evaluate(&self, run: &RunState, progress: &mut dyn FnMut(&Event)) -> Result<()> {
        if let Some(l) = self.eval_loss(&self.eval)? {
            if self.writer() {
                append_line(&run.metrics, &json!({"step": run.step, "eval_loss": l}))?;
            }
            progress(&Event::TrainEval {
                step: run.step,
                loss: l,
            });
        }
        Ok(())
    }

    /// After the loop: a checkpoint if interrupted, else the final eval loss and the saved
    /// adapter (or model); then the summary, also written to summary.json.
    fn finish(
        &self,
        run: RunState,
        interrupted: bool,
        progress: &mut dyn FnMut(&Event),
    ) -> Result<TrainSummary> {
        let elapsed = run.elapsed();
        self.check_ranks_agree()?;
        if interrupted {
            let dir = self.save_checkpoint(&run, elapsed)?;
            progress(&Event::Interrupted {
                step: run.step,
                checkpoint: dir,
            });
        }
        let eval_after = if interrupted {
            None
        } else {
            self.eval_loss(&self.eval)?
        };
        if !self.writer() {
            return Ok(self.summary(&run, elapsed, interrupted, eval_after, 0));
        }
        if let Some(l) = eval_after {
            append_line(&run.metrics, &json!({"step": run.step, "eval_loss": l}))?;
        }
        let output_bytes = if interrupted { 0 } else { self.save_final()? };
        let summary = self.summary(&run, elapsed, interrupted, eval_after, output_bytes);
        let s = serde_json::to_string_pretty(&summary).expect("json");
        write_atomic(&self.out.join("summary.json"), s.as_bytes())?;
        if !interrupted {
            self.write_card(&self.out, &run, elapsed, eval_after, "final".into())?;
        }
        Ok(summary)
    }

    /// Every rank must hold bitwise the same trainable tensors (they took the same steps from
    /// the same gradients): compared through a hash, so a broken job fails loudly instead of
    /// saving one rank's diverged adapter.
    fn check_ranks_agree(&self) -> Result<()> {
        let Some(c) = self.collective.as_ref().filter(|c| c.size() > 1) else {
            return Ok(());
        };
        let h = self.params_hash()?;
        let all = c.all_gather_u64(&h);
        let n = h.len();
        for r in 1..c.size() {
            if all[r * n..(r + 1) * n] != all[..n] {
                return Err(TrainError::Config(format!(
                    "data-parallel ranks diverged: rank {r}'s trainable tensors differ from rank 0's"
                )));
            }
        }
        Ok(())
    }

    /// sha256 of every trainable tensor's f32 bytes, in parameter order, as 4 words.
    pub fn params_hash(&self) -> Result<Vec<u64>> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in &self.params {
            h.update(p.name.as_bytes());
            for x in p
                .var
                .as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
            {
                h.update(x.to_le_bytes());
            }
        }
        let d = h.finalize();
        Ok(d.chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn summary(
        &self,
        run: &RunState,
        elapsed: f64,
        interrupted: bool,
        eval_after: Option<f64>,
        output_bytes: u64,
    ) -> TrainSummary {
        TrainSummary {
            method: self.cfg.method.name().into(),
            steps: run.step,
            trainable_params: self.trainable_params(),
            wall_s: round3(elapsed),
            tokens: run.tokens,
            tok_per_s: round3(run.tokens as f64 / elapsed.max(1e-9)),
            peak_rss_bytes: peak_rss(),
            output_bytes,
            first_loss: run.first_loss,
            final_loss: run.last_loss,
            eval_loss_before: run.eval_before,
            eval_loss_after: eval_after,
            interrupted,
            records: self.stats.records,
            truncated: self.stats.truncated,
            skipped_bad: self.stats.skipped_bad,
            resumed_from: run.resumed_from.clone(),
            ranks: self.rank_size().1,
            comm_s: round3(self.comm_s.get()),
            params_sha256: self
                .params_hash()
                .map(|h| {
                    h.iter()
                        .map(|w| format!("{:016x}", w.swap_bytes()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The model card (README.md) in `dir`, beside the adapter (see `card`): `what` it is,
    /// and where the run stands.
    fn write_card(
        &self,
        dir: &Path,
        run: &RunState,
        elapsed: f64,
        eval_after: Option<f64>,
        what: String,
    ) -> Result<()> {
        let m = card::CardMetrics {
            steps: run.step,
            tokens: run.tokens,
            wall_s: elapsed,
            first_loss: run.first_loss,
            last_loss: run.last_loss,
            eval_before: run.eval_before,
            eval_after,
            trainable_params: self.trainable_params(),
            what,
        };
        let base = match &self.base.source {
            lowrank_model::ModelSource::Gguf(p) | lowrank_model::ModelSource::HfDir(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        };
        let text = card::render(&self.cfg, &self.inputs, &base, &m, &run.metrics);
        write_atomic(&dir.join("README.md"), text.as_bytes())
    }

    /// The adapter with the current values of the trainable tensors and lowrank provenance.
    pub fn current_adapter(&self) -> Result<Option<Adapter>> {
        let Trainable::Lora { adapter, .. } = &self.trainable else {
            return Ok(None);
        };
        let mut a = adapter.clone();
        for m in a.modules.values_mut() {
            m.a = m.a.detach().copy()?;
            m.b = m.b.detach().copy()?;
        }
        a.provenance = Provenance {
            base_fingerprint: Some(self.inputs.base_fingerprint.clone()),
            lowrank_version: Some(lowrank_lora::VERSION.to_string()),
            created: Some(created_stamp()),
        };
        Ok(Some(a))
    }

    /// Write the final adapter (PEFT) or full model (HF directory) into the output dir.
    fn save_final(&self) -> Result<u64> {
        match self.cfg.method {
            Method::Lora => {
                let a = self.current_adapter()?.expect("lora");
                // save_peft replaces its directory as a whole: write to a sibling, then move
                // the two files in (each rename is atomic).
                let tmp = self.out.join(".adapter.tmp");
                let dtype = match self.cfg.save_dtype.as_str() {
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    _ => DType::F32,
                };
                lowrank_lora::peft::save_peft(&a, &tmp, dtype)?;
                let mut bytes = 0;
                for f in [
                    lowrank_lora::peft::CONFIG_FILE,
                    lowrank_lora::peft::WEIGHTS_FILE,
                ] {
                    let dst = self.out.join(f);
                    std::fs::rename(tmp.join(f), &dst).map_err(io(&dst))?;
                    bytes += std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
                }
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(bytes)
            }
            Method::Full => {
                let dir = self.out.join("model");
                lowrank_model::export::save_hf_dir(&self.model, &self.base.tok, &dir)?;
                Ok(dir_bytes(&dir))
            }
        }
    }
}

/// Test hook: `LOWRANK_TEST_CRASH=RANK:STEP` kills this process (SIGABRT, no clean-up) right
/// after optimizer step STEP when it is rank RANK of its job (0 when alone): a machine lost
/// in the middle of a run.
fn test_crash_hook(rank: usize, step: usize) {
    let Ok(v) = std::env::var("LOWRANK_TEST_CRASH") else {
        return;
    };
    if let Some((r, s)) = v.split_once(':') {
        if r.parse() == Ok(rank) && s.parse() == Ok(step) {
            std::process::abort();
        }
    }
}

/// Test hook: behave exactly as if Ctrl-C arrived after optimizer step `step`.
fn test_interrupt_hook(step: usize, stop: &AtomicBool) {
    if std::env::var("LOWRANK_TEST_INTERRUPT_AT_STEP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(step)
    {
        stop.store(true, Ordering::SeqCst);
    }
}
