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
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                v.pointer("/rope_parameters/rope_theta")
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
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
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
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
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(ModelError::Field {
                path: path.into(),
                field: field.into(),
                msg,
            })
        };
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} heads cannot be grouped over {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!("head dim {} must be even and positive", self.head_dim),
            );
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad(
                "num_hidden_layers",
                "layers, hidden size and vocab must be positive".into(),
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
