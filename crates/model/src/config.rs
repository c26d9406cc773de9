//! Model hyper-parameters, read from GGUF metadata or a HF `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// A Llama-family decoder's shape. Covers Llama, Mistral, Qwen2 (q/k/v bias) and SmolLM.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Architectures whose blocks are the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
    pub const SUPPORTED: [&'static str; 5] = ["llama", "mistral", "qwen2", "smollm", "smollm2"];

    /// Bounds checked by [`validate`](Self::validate), far above any released Llama-family
    /// model (Llama 3.1 405B: 126 layers, hidden 16384, MLP 53248, 128 heads, vocabulary
    /// 128256).
    pub const MAX_LAYERS: usize = 1 << 12;
    pub const MAX_HEADS: usize = 1 << 12;
    /// hidden, intermediate, head_dim and heads·head_dim.
    pub const MAX_WIDTH: usize = 1 << 20;
    pub const MAX_VOCAB: usize = 1 << 24;
    /// The largest declared context: positions are carried as `u32`.
    pub const MAX_POSITIONS: usize = u32::MAX as usize;

    pub fn q_out(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_out(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parse a HF `config.json`. Accepts both `rope_theta` at the top level (older
    /// checkpoints) and transformers 5's `rope_parameters.rope_theta`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::File {
            path: path.into(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let field_err = |field: &str, msg: &str| ModelError::Field {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        };
        let get_usize = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| field_err(k, "expected a positive integer"))
        };
        // Optional fields: absent or null takes the default; present with the wrong type is
        // an error, never silently the default.
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| field_err(k, "expected a non-negative integer")),
            }
        };
        let opt_f64 = |ptr: &str| -> Result<Option<f64>> {
            match v.pointer(ptr) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| field_err(&ptr[1..].replace('/', "."), "expected a number")),
            }
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| field_err("model_type", "expected a string"))?
            .to_string();
        if !Self::SUPPORTED.contains(&model_type.as_str()) {
            return Err(ModelError::UnsupportedArch {
                path: path.into(),
                arch: model_type,
            });
        }
        let hidden_size = get_usize("hidden_size")?;
        let num_heads = get_usize("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        let rope_theta = match opt_f64("/rope_theta")? {
            Some(t) => t,
            None => opt_f64("/rope_parameters/rope_theta")?.unwrap_or(10000.0),
        };
        if let Some(rt) = v
            .pointer("/rope_parameters/rope_type")
            .and_then(Value::as_str)
        {
            if rt != "default" {
                return Err(field_err(
                    "rope_parameters.rope_type",
                    &format!("rope type `{rt}` is not supported (only default)"),
                ));
            }
        }
        if let Some(rs) = v.get("rope_scaling") {
            if !rs.is_null() {
                return Err(field_err("rope_scaling", "RoPE scaling is not supported"));
            }
        }
        // Token ids are u32: a larger value is an error, never silently wrapped.
        let token_id = |k: &str, x: u64| -> Result<u32> {
            u32::try_from(x).map_err(|_| field_err(k, "token id beyond u32"))
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(x) => vec![token_id("eos_token_id", x)?],
                None => vec![],
            },
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| token_id("eos_token_id", x))
                .collect::<Result<_>>()?,
            _ => vec![],
        };
        let cfg = ModelConfig {
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(model_type == "qwen2"),
            arch: model_type,
            vocab_size: get_usize("vocab_size")?,
            hidden_size,
            intermediate_size: get_usize("intermediate_size")?,
            num_layers: get_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: opt_f64("/rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| token_id("bos_token_id", x))
                .transpose()?,
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Check the hyper-parameters before anything is sized by them: each within a bound far
    /// above any released Llama-family model (so products such as heads·head_dim·hidden
    /// cannot overflow and nothing absurd is allocated before the weights are checked
    /// against them), and mutually consistent. `max_position_embeddings` is only a limit
    /// that requests are checked against (nothing is sized by it), so any 32-bit value is
    /// accepted.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(ModelError::Field {
                path: path.into(),
                field: field.into(),
                msg,
            })
        };
        for (field, v, max) in [
            ("num_hidden_layers", self.num_layers, Self::MAX_LAYERS),
            ("hidden_size", self.hidden_size, Self::MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, Self::MAX_WIDTH),
            ("num_attention_heads", self.num_heads, Self::MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, Self::MAX_HEADS),
            ("head_dim", self.head_dim, Self::MAX_WIDTH),
            ("vocab_size", self.vocab_size, Self::MAX_VOCAB),
        ] {
            if v == 0 || v > max {
                return bad(field, format!("{v} is outside 1..={max}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} heads cannot be grouped over {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!(
                    "head dim {} must be even (RoPE rotates pairs)",
                    self.head_dim
                ),
            );
        }
        // Both ≤ MAX_HEADS · MAX_WIDTH: no overflow.
        if self.q_out() > Self::MAX_WIDTH {
            return bad(
                "head_dim",
                format!(
                    "{} heads × head dim {} = {} exceeds {}",
                    self.num_heads,
                    self.head_dim,
                    self.q_out(),
                    Self::MAX_WIDTH
                ),
            );
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > Self::MAX_POSITIONS {
            return bad(
                "max_position_embeddings",
                format!(
                    "{} is outside 1..={} (positions are 32-bit)",
                    self.max_position_embeddings,
                    Self::MAX_POSITIONS
                ),
            );
        }
        // RoPE computes θ^(−2i/d) in f32: θ must be a positive finite f32.
        let theta = self.rope_theta as f32;
        if !(theta.is_finite() && theta > 0.0) {
            return bad(
                "rope_theta",
                format!("{} must be positive and finite", self.rope_theta),
            );
        }
        // 1/√(mean(x²) + eps): eps = 0 turns an all-zero row into NaN.
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} must be positive and finite", self.rms_norm_eps),
            );
        }
        Ok(())
    }

    /// Trainable parameter count of the dense model (embeddings, blocks, norms, head).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.q_out() * 2
            + h * self.kv_out() * 2
            + if self.attention_bias {
                self.q_out() + 2 * self.kv_out()
            } else {
                0
            };
        let mlp = 3 * h * self.intermediate_size;
        let block = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * block + h + head
    }
}
