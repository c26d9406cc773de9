//! Writing a model out: a HF-style directory (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json) that `--model DIR` loads, written atomically.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::error::{ModelError, Result};
use crate::model::Llama;
use crate::tokenizer::Tok;

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// HF `config.json` for this model.
pub fn hf_config(model: &Llama) -> serde_json::Value {
    let c = &model.cfg;
    json!({
        "architectures": [if c.arch == "qwen2" { "Qwen2ForCausalLM" } else if c.arch == "mistral" { "MistralForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if c.arch == "qwen2" || c.arch == "mistral" { c.arch.as_str() } else { "llama" },
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}

/// Save `model` (its current weights: merged or fine-tuned) as a HF model directory.
pub fn save_hf_dir(model: &Llama, tok: &Tok, dir: &Path) -> Result<()> {
    let named = model.weights.named();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (n, t) in &named {
        data.push((n.clone(), t.dims().to_vec(), f32_bytes(t)?));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Invalid(format!("{n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| ModelError::Invalid(e.to_string()))?;
    let config = serde_json::to_vec_pretty(&hf_config(model)).expect("json");
    let tokenizer = tok.inner.to_string(false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let tc = json!({
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": tok.chat_template,
        "model_max_length": model.cfg.max_position_embeddings,
    });
    let tc = serde_json::to_vec_pretty(&tc).expect("json");
    lowrank_lora::peft::write_dir_atomically(
        dir,
        &[
            ("config.json", &config),
            ("model.safetensors", &st),
            ("tokenizer.json", tokenizer.as_bytes()),
            ("tokenizer_config.json", &tc),
        ],
    )?;
    Ok(())
}
