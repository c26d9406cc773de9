//! The training loop: LoRA (A, B trainable; base frozen, no dW) or full fine-tuning through
//! the same data path; AdamW, schedule, clipping, accumulation; metrics, evaluation,
//! atomic checkpoints, exact resume, Ctrl-C.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use lowrank_lora::adapter::Provenance;
use lowrank_lora::config::{InitLoraWeights, TargetModules};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey};
use lowrank_model::model::AdapterSet;
use lowrank_model::weights::Weights;
use lowrank_model::{ForwardOpts, Llama, LoadedModel};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Method, TrainConfig};
use crate::data::{self, LoadOptions, LoadStats, Sample};
use crate::loss::{batch_loss, lora_batch_grads};
use crate::optim::{clip_grad_norm, lr_at, AdamW, Param};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Model(#[from] lowrank_model::ModelError),
    #[error(transparent)]
    Lora(#[from] lowrank_lora::LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
}

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
}

/// Persisted with each checkpoint: everything needed to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    opt_t: u64,
    dropout_rng_word_pos: u128,
    elapsed_s: f64,
    tokens: usize,
    first_loss: Option<f64>,
    eval_loss_before: Option<f64>,
    config: TrainConfig,
}

/// The trainable side of a run.
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
    /// Micro-batches of one epoch, before shuffling (indices into `train`).
    epoch_batches: usize,
    total_steps: usize,
    out: PathBuf,
    pub show_progress: bool,
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
        let eval = match &cfg.eval {
            Some(p) => {
                data::load_jsonl(
                    p,
                    &base.tok,
                    eos,
                    &LoadOptions {
                        max_seq_len: cfg.max_seq_len,
                        skip_bad: cfg.skip_bad,
                    },
                )?
                .0
            }
            None => vec![],
        };
        let epoch_batches = epoch_order(train.len(), &cfg, 0, &train).len();
        let total_steps = cfg
            .max_steps
            .unwrap_or(cfg.epochs * epoch_batches.div_ceil(cfg.grad_accum));
        let (model, trainable, params) = match cfg.method {
            Method::Lora => Self::init_lora(base, &cfg)?,
            Method::Full => Self::init_full(base)?,
        };
        Ok(Trainer {
            cfg,
            base,
            model,
            trainable,
            params,
            train,
            eval,
            stats,
            epoch_batches,
            total_steps,
            out,
            show_progress: true,
        })
    }

    fn lora_config(cfg: &TrainConfig) -> Result<LoraConfig> {
        let targets = cfg.target_names().map_err(TrainError::Config)?;
        let mut lc = LoraConfig::new(cfg.rank, cfg.alpha(), &[]);
        lc.target_modules = if targets == ["all-linear"] {
            TargetModules::One("all-linear".into())
        } else {
            TargetModules::List(targets)
        };
        lc.lora_dropout = cfg.dropout;
        lc.use_rslora = cfg.rslora;
        lc.init_lora_weights = match cfg.init.as_str() {
            "default" | "true" => InitLoraWeights::Bool(true),
            other => InitLoraWeights::Named(other.into()),
        };
        Ok(lc)
    }

    fn init_lora(base: &LoadedModel, cfg: &TrainConfig) -> Result<(Llama, Trainable, Vec<Param>)> {
        let lc = Self::lora_config(cfg)?;
        let targets = lc.targets().map_err(TrainError::Config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut model = base.model.clone();
        let mut modules = BTreeMap::new();
        let mut params = Vec::new();
        let dev = base.model.device().clone();
        for layer in 0..model.cfg.num_layers {
            if !lc.applies_to_layer(layer) {
                continue;
            }
            for (t, o, i) in model.lora_shapes() {
                if !targets.contains(&t) {
                    continue;
                }
                let w = model.weights.layers[layer].linear(t).clone();
                let (m, residual) =
                    lowrank_lora::init::init_module(&lc, layer, t, o, i, Some(&w), &mut rng, &dev)?;
                if let Some(r) = residual {
                    // PiSSA: the frozen base becomes W − s·B·A (a private copy).
                    *model.weights.layers[layer].linear_mut(t) = r;
                }
                let key = ModuleKey::new(layer, t);
                let va = Var::from_tensor(&m.a)?;
                let vb = Var::from_tensor(&m.b)?;
                params.push(Param {
                    name: format!("{}.lora_A.weight", key.peft_prefix()),
                    var: va.clone(),
                    lr_mult: 1.0,
                });
                params.push(Param {
                    name: format!("{}.lora_B.weight", key.peft_prefix()),
                    var: vb.clone(),
                    lr_mult: cfg.lr_b_ratio,
                });
                modules.insert(
                    key,
                    LoraModule {
                        a: va.as_tensor().clone(),
                        b: vb.as_tensor().clone(),
                        scale: m.scale,
                    },
                );
            }
        }
        if modules.is_empty() {
            return Err(TrainError::Config("no module matches --targets".into()));
        }
        let adapter = Adapter {
            config: lc,
            modules,
            provenance: Provenance::default(),
        };
        let set: AdapterSet = Arc::new(vec![(Arc::new(adapter.clone()), 1.0)]);
        Ok((model, Trainable::Lora { adapter, set }, params))
    }

    fn init_full(base: &LoadedModel) -> Result<(Llama, Trainable, Vec<Param>)> {
        let mut w: Weights = base.model.weights.clone();
        let mut params = Vec::new();
        let mut mk = |name: String, t: &mut Tensor| -> Result<()> {
            // A fresh copy: the base's own tensors must stay bit-identical.
            let v = Var::from_tensor(&t.copy()?)?;
            *t = v.as_tensor().clone();
            params.push(Param {
                name,
                var: v,
                lr_mult: 1.0,
            });
            Ok(())
        };
        mk("model.embed_tokens.weight".into(), &mut w.embed)?;
        for (i, l) in w.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            mk(format!("{p}.input_layernorm.weight"), &mut l.attn_norm)?;
            mk(
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.mlp_norm,
            )?;
            for t in lowrank_lora::Target::ALL {
                mk(
                    format!("{p}.{}.{}.weight", t.parent(), t.peft_name()),
                    l.linear_mut(t),
                )?;
            }
            for (n, b) in [
                ("q_proj", &mut l.q_bias),
                ("k_proj", &mut l.k_bias),
                ("v_proj", &mut l.v_bias),
            ] {
                if let Some(b) = b {
                    mk(format!("{p}.self_attn.{n}.bias"), b)?;
                }
            }
        }
        mk("model.norm.weight".into(), &mut w.norm)?;
        if let Some(h) = w.lm_head.as_mut() {
            mk("lm_head.weight".into(), h)?;
        }
        let model = Llama::new(base.model.cfg.clone(), w, base.model.device())?;
        Ok((model, Trainable::Full, params))
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
        let mut nll = 0.0;
        let mut n = 0;
        for chunk in samples.chunks(8) {
            let refs: Vec<&Sample> = chunk.iter().collect();
            let hl = batch_loss(
                &self.model,
                &refs,
                self.adapter_set(),
                &mut ForwardOpts::infer(),
                false,
                0.0,
            )?;
            nll += hl.nll_sum;
            n += hl.targets;
        }
        Ok((n > 0).then(|| nll / n as f64))
    }

    /// Train to the end (or until `stop` is set / the time box ends); returns the summary.
    pub fn run(&mut self, resume: Option<&Path>, stop: &AtomicBool) -> Result<TrainSummary> {
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        let mut opt = AdamW::new(self.cfg.lr, self.cfg.weight_decay);
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_add(1));
        let mut start_step = 0;
        let mut elapsed0 = 0.0;
        let mut tokens = 0usize;
        let mut first_loss = None;
        let eval_before;
        let metrics_path = self.out.join("metrics.jsonl");
        if let Some(dir) = resume {
            let st = self.load_checkpoint(dir, &mut opt)?;
            start_step = st.step;
            elapsed0 = st.elapsed_s;
            tokens = st.tokens;
            first_loss = st.first_loss;
            eval_before = st.eval_loss_before;
            dropout_rng.set_word_pos(st.dropout_rng_word_pos);
            truncate_metrics(&metrics_path, start_step)?;
        } else {
            let _ = std::fs::remove_file(&metrics_path);
            eval_before = self.eval_loss(&self.eval.clone())?;
            if let Some(l) = eval_before {
                append_line(&metrics_path, &json!({"step": 0, "eval_loss": l}))?;
            }
        }
        let bar = if self.show_progress {
            indicatif::ProgressBar::new(self.total_steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:25} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!(
            "train {}",
            match self.cfg.method {
                Method::Lora => "lora",
                Method::Full => "full",
            }
        ));
        bar.set_position(start_step as u64);
        let t0 = Instant::now();
        let mut step = start_step;
        let mut last_loss = None;
        let mut interrupted = false;
        while step < self.total_steps {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            if self.cfg.time_budget_s > 0.0
                && elapsed0 + t0.elapsed().as_secs_f64() > self.cfg.time_budget_s
            {
                break;
            }
            let batches = self.step_batches(step);
            let total_targets: usize = batches
                .iter()
                .flat_map(|b| b.iter())
                .map(|&i| self.train[i].num_targets())
                .sum::<usize>()
                .max(1);
            let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
            let mut nll = 0.0;
            let mut step_tokens = 0;
            for b in &batches {
                let refs: Vec<&Sample> = b.iter().map(|&i| &self.train[i]).collect();
                step_tokens += refs.iter().map(|s| s.ids.len()).sum::<usize>();
                let dropout =
                    (self.cfg.dropout > 0.0).then_some((self.cfg.dropout, &mut dropout_rng));
                let scale = 1.0 / total_targets as f64;
                let gs: BTreeMap<String, Tensor> = match &self.trainable {
                    // LoRA: the hand-written backward (dX only through the frozen base).
                    Trainable::Lora { adapter, .. } => {
                        let (n, _, gs) =
                            lora_batch_grads(&self.model, &refs, adapter, dropout, scale)?;
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
            let loss = nll / total_targets as f64;
            let grad_norm = clip_grad_norm(&mut grads, self.cfg.grad_clip)?;
            let lr = lr_at(
                self.cfg.lr,
                self.cfg.schedule,
                step,
                self.cfg.warmup_steps,
                self.total_steps,
            );
            opt.step(&self.params, &grads, lr)?;
            step += 1;
            tokens += step_tokens;
            first_loss.get_or_insert(loss);
            last_loss = Some(loss);
            let elapsed = elapsed0 + t0.elapsed().as_secs_f64();
            // Test hook: behave exactly as if Ctrl-C arrived after this step.
            if std::env::var("LOWRANK_TEST_INTERRUPT_AT_STEP")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                == Some(step)
            {
                stop.store(true, Ordering::SeqCst);
            }
            append_line(
                &metrics_path,
                &json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens, "elapsed": round3(elapsed)}),
            )?;
            let tps = tokens as f64 / elapsed.max(1e-9);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            bar.set_position(step as u64);
            if self.cfg.eval_every > 0 && step % self.cfg.eval_every == 0 && step < self.total_steps
            {
                if let Some(l) = self.eval_loss(&self.eval.clone())? {
                    append_line(&metrics_path, &json!({"step": step, "eval_loss": l}))?;
                    bar.println(format!("step {step}: eval loss {l:.4}"));
                }
            }
            if self.cfg.save_every > 0 && step % self.cfg.save_every == 0 && step < self.total_steps
            {
                let st = TrainerState {
                    step,
                    opt_t: opt.t,
                    dropout_rng_word_pos: dropout_rng.get_word_pos(),
                    elapsed_s: elapsed,
                    tokens,
                    first_loss,
                    eval_loss_before: eval_before,
                    config: self.cfg.clone(),
                };
                self.save_checkpoint(&st, &opt)?;
            }
        }
        bar.finish_and_clear();
        let elapsed = elapsed0 + t0.elapsed().as_secs_f64();
        if interrupted {
            let st = TrainerState {
                step,
                opt_t: opt.t,
                dropout_rng_word_pos: dropout_rng.get_word_pos(),
                elapsed_s: elapsed,
                tokens,
                first_loss,
                eval_loss_before: eval_before,
                config: self.cfg.clone(),
            };
            let dir = self.save_checkpoint(&st, &opt)?;
            eprintln!(
                "interrupted at step {step}: checkpoint saved to {} (continue with --resume {})",
                dir.display(),
                dir.display()
            );
        }
        let eval_after = if interrupted {
            None
        } else {
            self.eval_loss(&self.eval.clone())?
        };
        if let Some(l) = eval_after {
            append_line(&metrics_path, &json!({"step": step, "eval_loss": l}))?;
        }
        let output_bytes = if interrupted { 0 } else { self.save_final()? };
        let summary = TrainSummary {
            method: match self.cfg.method {
                Method::Lora => "lora".into(),
                Method::Full => "full".into(),
            },
            steps: step,
            trainable_params: self.trainable_params(),
            wall_s: round3(elapsed),
            tokens,
            tok_per_s: round3(tokens as f64 / elapsed.max(1e-9)),
            peak_rss_bytes: peak_rss(),
            output_bytes,
            first_loss,
            final_loss: last_loss,
            eval_loss_before: eval_before,
            eval_loss_after: eval_after,
            interrupted,
            records: self.stats.records,
            truncated: self.stats.truncated,
            skipped_bad: self.stats.skipped_bad,
        };
        let s = serde_json::to_string_pretty(&summary).expect("json");
        std::fs::write(self.out.join("summary.json"), s).map_err(io(&self.out))?;
        Ok(summary)
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
            base_fingerprint: Some(self.base.model.fingerprint()?),
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

    fn save_checkpoint(&self, st: &TrainerState, opt: &AdamW) -> Result<PathBuf> {
        let name = format!("checkpoint-{}", st.step);
        let final_dir = self.out.join(&name);
        let tmp = self.out.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        // Trainable tensors: a PEFT adapter (LoRA) or a plain safetensors file (full).
        match self.current_adapter()? {
            Some(a) => lowrank_lora::peft::save_peft(&a, &tmp, DType::F32)?,
            None => {
                std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
                let ts: std::collections::HashMap<String, Tensor> = self
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
                    .collect();
                candle_core::safetensors::save(&ts, tmp.join("model.safetensors"))?;
            }
        }
        let mut ostate: std::collections::HashMap<String, Tensor> =
            std::collections::HashMap::new();
        for (k, (m, v)) in &opt.state {
            ostate.insert(format!("m.{k}"), m.clone());
            ostate.insert(format!("v.{k}"), v.clone());
        }
        let op = tmp.join("optimizer.safetensors");
        if !ostate.is_empty() {
            candle_core::safetensors::save(&ostate, &op)?;
        }
        let sp = tmp.join("trainer_state.json");
        let mut f = std::fs::File::create(&sp).map_err(io(&sp))?;
        f.write_all(serde_json::to_string_pretty(st).expect("json").as_bytes())
            .map_err(io(&sp))?;
        f.sync_all().map_err(io(&sp))?;
        for p in [&op, &tmp.join("model.safetensors")] {
            if let Ok(f) = std::fs::File::open(p) {
                let _ = f.sync_all();
            }
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        if let Ok(d) = std::fs::File::open(&self.out) {
            let _ = d.sync_all();
        }
        self.prune_checkpoints()?;
        Ok(final_dir)
    }

    fn prune_checkpoints(&self) -> Result<()> {
        let keep = self.cfg.keep_checkpoints.max(1);
        let mut steps: Vec<usize> = std::fs::read_dir(&self.out)
            .map_err(io(&self.out))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        if steps.len() > keep {
            for s in &steps[..steps.len() - keep] {
                let _ = std::fs::remove_dir_all(self.out.join(format!("checkpoint-{s}")));
            }
        }
        Ok(())
    }

    fn load_checkpoint(&mut self, dir: &Path, opt: &mut AdamW) -> Result<TrainerState> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(io(&sp))?;
        let st: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: sp.clone(),
            msg: format!("invalid: {e}"),
        })?;
        if st.config.method != self.cfg.method
            || st.config.rank != self.cfg.rank
            || st.config.targets != self.cfg.targets
        {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint was made with different --method/--rank/--targets",
                sp.display()
            )));
        }
        let values: BTreeMap<String, Tensor> = match &self.trainable {
            Trainable::Lora { .. } => {
                let a = lowrank_lora::peft::load_peft(
                    dir,
                    &self.model.base_shapes(),
                    self.model.device(),
                )?;
                let mut v = BTreeMap::new();
                for (k, m) in a.modules {
                    v.insert(format!("{}.lora_A.weight", k.peft_prefix()), m.a);
                    v.insert(format!("{}.lora_B.weight", k.peft_prefix()), m.b);
                }
                v
            }
            Trainable::Full => {
                candle_core::safetensors::load(dir.join("model.safetensors"), self.model.device())?
                    .into_iter()
                    .collect()
            }
        };
        for p in &self.params {
            let t = values.get(&p.name).ok_or_else(|| TrainError::Io {
                path: dir.into(),
                msg: format!("checkpoint lacks `{}`", p.name),
            })?;
            p.var.set(t)?;
        }
        let op = dir.join("optimizer.safetensors");
        if op.exists() {
            let os = candle_core::safetensors::load(&op, self.model.device())?;
            for p in &self.params {
                if let (Some(m), Some(v)) = (
                    os.get(&format!("m.{}", p.name)),
                    os.get(&format!("v.{}", p.name)),
                ) {
                    opt.state.insert(p.name.clone(), (m.clone(), v.clone()));
                }
            }
        }
        opt.t = st.opt_t;
        Ok(st)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn append_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{v}").map_err(io(path))
}

/// Keep only records up to `step` (a resumed run rewrites what follows).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| (s as usize) <= step)
        })
        .collect();
    // A final eval line at `step` belongs to the interrupted run's end, not to this run.
    let mut out = String::new();
    for l in kept {
        out.push_str(l);
        out.push('\n');
    }
    std::fs::write(path, out).map_err(io(path))
}

/// `SOURCE_DATE_EPOCH` (reproducible builds) if set, else now, as an RFC 3339 UTC stamp.
pub fn created_stamp() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
