//! Checkpoints: `checkpoint-N/` holds the trainable tensors (a PEFT adapter, or a safetensors
//! file for full fine-tuning), the AdamW moments and the trainer state, written atomically;
//! resuming from one continues with exactly the loss sequence of an uninterrupted run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{io, Result, RunState, TrainError, Trainable, Trainer};
use crate::config::TrainConfig;
use crate::optim::AdamW;

/// Persisted with each checkpoint: everything needed to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TrainerState {
    pub(super) step: usize,
    pub(super) opt_t: u64,
    pub(super) dropout_rng_word_pos: u128,
    pub(super) elapsed_s: f64,
    pub(super) tokens: usize,
    pub(super) first_loss: Option<f64>,
    pub(super) eval_loss_before: Option<f64>,
    pub(super) config: TrainConfig,
}

impl TrainerState {
    /// What to persist of `run` after `elapsed` seconds of training.
    fn of(run: &RunState, cfg: &TrainConfig, elapsed: f64) -> Self {
        TrainerState {
            step: run.step,
            opt_t: run.opt.t,
            dropout_rng_word_pos: run.dropout_rng.get_word_pos(),
            elapsed_s: elapsed,
            tokens: run.tokens,
            first_loss: run.first_loss,
            eval_loss_before: run.eval_before,
            config: cfg.clone(),
        }
    }
}

impl Trainer<'_> {
    /// Write `checkpoint-N/` atomically (a `.partial` sibling renamed into place): the trainable
    /// tensors, the optimizer moments and the trainer state; then prune old checkpoints.
    pub(super) fn save_checkpoint(&self, run: &RunState, elapsed: f64) -> Result<PathBuf> {
        let st = &TrainerState::of(run, &self.cfg, elapsed);
        let opt = &run.opt;
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

    /// Restore the trainable tensors and the optimizer from `dir`; its trainer state is returned.
    pub(super) fn load_checkpoint(&mut self, dir: &Path, opt: &mut AdamW) -> Result<TrainerState> {
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

/// Keep only records up to `step` (a resumed run rewrites what follows).
pub(super) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
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
