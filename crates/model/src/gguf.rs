//! GGUF files: header and metadata, model config, tensors dequantized to f32.
//!
//! GGUF stores `attn_q` / `attn_k` rows permuted for llama.cpp's interleaved RoPE. We undo the
//! permutation at load time so the model (and every adapter) always sees HF's half-split
//! layout; only a GGUF *export* permutes back.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub file_size: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::File {
            path: path.into(),
            msg: format!("cannot open: {e}"),
        })?;
        let file_size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("magic") {
                ModelError::NotGguf {
                    path: path.into(),
                    msg,
                }
            } else {
                ModelError::File {
                    path: path.into(),
                    msg: format!("corrupt or truncated GGUF header: {msg}"),
                }
            }
        })?;
        let g = GgufFile {
            path: path.into(),
            content,
            file_size,
        };
        g.check_tensor_extents()?;
        Ok(g)
    }

    /// A truncated download is the commonest bad file: check every tensor's bytes are there
    /// before spending time loading any of them.
    fn check_tensor_extents(&self) -> Result<()> {
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            let bytes = (elems / bs.max(1) * info.ggml_dtype.type_size()) as u64;
            let end = self.content.tensor_data_offset + info.offset + bytes;
            if end > self.file_size {
                return Err(ModelError::Tensor {
                    path: self.path.clone(),
                    name: name.clone(),
                    msg: format!(
                        "file is truncated: tensor needs bytes up to {end}, the file has {}",
                        self.file_size
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn field_err(&self, field: &str, msg: &str) -> ModelError {
        ModelError::Field {
            path: self.path.clone(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.field_err(key, "missing"))?;
        value_u64(v).ok_or_else(|| self.field_err(key, "expected an integer"))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key)
            .and_then(|v| v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok())
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self
            .meta_str("general.architecture")
            .ok_or_else(|| self.field_err("general.architecture", "missing"))?;
        if !ModelConfig::SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArch {
                path: self.path.clone(),
                arch,
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_u64(&k("embedding_length"))? as usize;
        let num_heads = self.meta_u64(&k("attention.head_count"))? as usize;
        let num_kv_heads = self
            .meta_u64(&k("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = self
            .meta_u64(&k("attention.key_length"))
            .or_else(|_| self.meta_u64(&k("rope.dimension_count")))
            .map(|x| x as usize)
            .unwrap_or(hidden / num_heads.max(1));
        let vocab_size = match self.meta_u64(&k("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| self.field_err(&k("vocab_size"), "missing"))?,
            },
        };
        let eos = self
            .meta("tokenizer.ggml.eos_token_id")
            .and_then(value_u64)
            .map(|x| x as u32);
        let cfg = ModelConfig {
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.meta_u64(&k("feed_forward_length"))? as usize,
            num_layers: self.meta_u64(&k("block_count"))? as usize,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rms_norm_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            max_position_embeddings: self.meta_u64(&k("context_length")).unwrap_or(2048) as usize,
            bos_token_id: self
                .meta("tokenizer.ggml.bos_token_id")
                .and_then(value_u64)
                .map(|x| x as u32),
            eos_token_ids: eos.into_iter().collect(),
            arch,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Dequantize one tensor to f32 on `device`. candle returns GGUF shapes in row-major
    /// order ([out, in] for a linear weight).
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let file = File::open(&self.path).map_err(|e| ModelError::File {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        let mut reader = BufReader::new(file);
        let q = self
            .content
            .tensor(&mut reader, name, device)
            .map_err(|e| ModelError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                msg: e.to_string(),
            })?;
        let t = q.dequantize(device).map_err(|e| ModelError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            msg: format!("cannot dequantize {:?}: {e}", q.dtype()),
        })?;
        Ok(t)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor storage types present, e.g. {"Q4_1": 211, "Q8_0": 1, "F32": 61}.
    pub fn dtype_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
        m
    }
}

pub fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::U64(x) => Some(*x),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}
