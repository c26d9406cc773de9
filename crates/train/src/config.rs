//! Training settings: CLI flags and the same keys in a TOML file (`--config`; flags override).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::optim::Schedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lora,
    Full,
}

impl Method {
    /// `lora` or `full` (the flag's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Full => "full",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lora" => Ok(Method::Lora),
            "full" => Ok(Method::Full),
            _ => Err(format!("unknown method `{s}` (lora or full)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: Option<PathBuf>,
    pub eval: Option<PathBuf>,
    pub out: Option<PathBuf>,
    /// q_proj,k_proj,... or all-linear (short names q,k,v,o,gate,up,down accepted).
    pub targets: Vec<String>,
    pub rank: usize,
    /// Default: 2 × rank.
    pub alpha: Option<f64>,
    pub dropout: f64,
    pub rslora: bool,
    /// default (kaiming A, zero B) | gaussian | pissa
    pub init: String,
    pub lr: f64,
    /// LoRA+: B's learning rate = lr × this ratio.
    pub lr_b_ratio: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    /// Fill micro-batches up to batch_size × max_seq_len tokens (sequences stay separate:
    /// attention never crosses documents).
    pub pack: bool,
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: never, except on Ctrl-C).
    pub save_every: usize,
    pub keep_checkpoints: usize,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    pub method: Method,
    pub skip_bad: bool,
    /// Stop after this many seconds of training (a time box; 0: none).
    pub time_budget_s: f64,
    /// dtype of the saved adapter tensors: f32 (default), f16 or bf16.
    pub save_dtype: String,
    /// How the frozen base is multiplied in the forward and the backward's dX: `f32`, `int8`
    /// (packed 8-bit blocks, QLoRA-style; LoRA, norms, attention and the loss stay f32) or
    /// `int4` (the same on 4-bit blocks: weights not already 4-bit are rounded).
    pub compute: lowrank_model::quant::Compute,
    /// Layer checkpointing for LoRA: keep only each block's input and replay the block in the
    /// backward — activation memory of [tokens, hidden] per layer instead of the full tape,
    /// for about one more forward pass of time. The gradients are bitwise the same.
    pub checkpoint_layers: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: None,
            eval: None,
            out: None,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rank: 8,
            alpha: None,
            dropout: 0.0,
            rslora: false,
            init: "default".into(),
            lr: 1e-3,
            lr_b_ratio: 1.0,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            pack: false,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            grad_clip: 1.0,
            method: Method::Lora,
            skip_bad: false,
            time_budget_s: 0.0,
            save_dtype: "f32".into(),
            compute: lowrank_model::quant::Compute::default(),
            checkpoint_layers: false,
        }
    }
}

impl TrainConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    /// Reject settings that cannot work, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |flag: &str, msg: &str| Err(format!("--{flag}: {msg}"));
        if self.rank == 0 && self.method == Method::Lora {
            return bad("rank", "must be ≥ 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if self.batch_size == 0 {
            return bad("batch-size", "must be ≥ 1");
        }
        if self.grad_accum == 0 {
            return bad("grad-accum", "must be ≥ 1");
        }
        if self.max_seq_len < 2 {
            return bad("max-seq-len", "must be ≥ 2");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be ≥ 1 (or give --max-steps)");
        }
        if self.max_steps == Some(0) {
            return bad("max-steps", "must be ≥ 1");
        }
        if self.lr_b_ratio <= 0.0 {
            return bad("lr-b-ratio", "must be positive");
        }
        if self.weight_decay < 0.0 {
            return bad("weight-decay", "must be ≥ 0");
        }
        if !matches!(
            self.init.as_str(),
            "default" | "true" | "gaussian" | "pissa"
        ) {
            return bad("init", "must be default, gaussian or pissa");
        }
        if !matches!(self.save_dtype.as_str(), "f32" | "f16" | "bf16") {
            return bad("save-dtype", "must be f32, f16 or bf16");
        }
        if self.targets.is_empty() {
            return bad("targets", "give at least one module");
        }
        self.target_names()?;
        Ok(())
    }

    /// PEFT module names for the targets (short names expanded).
    pub fn target_names(&self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for t in &self.targets {
            let full = match t.trim() {
                "q" => "q_proj",
                "k" => "k_proj",
                "v" => "v_proj",
                "o" => "o_proj",
                "gate" => "gate_proj",
                "up" => "up_proj",
                "down" => "down_proj",
                "all-linear" | "all" => return Ok(vec!["all-linear".into()]),
                other => other,
            };
            if lowrank_lora::Target::from_peft_name(full).is_none() {
                return Err(format!("--targets: unknown module `{t}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear)"));
            }
            out.push(full.to_string());
        }
        Ok(out)
    }
}
