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
    let st = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    let config = serde_json::to_vec_pretty(&hf_config(model)).expect("json");
    let tokenizer = tok
        .inner
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
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

/// Save `model` as a GGUF file that llama.cpp can load: tensors in llama.cpp's names and q/k
/// row layout, f32 or f16 (norms stay f32), metadata and tokenizer carried over from the
/// source GGUF. Written to a temp file, fsynced, renamed.
pub fn save_gguf(
    model: &Llama,
    _tok: &Tok,
    source: Option<&Path>,
    out: &Path,
    ty: &str,
) -> Result<()> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let src = source.ok_or_else(|| {
        ModelError::Invalid("GGUF export carries the tokenizer and metadata over from a GGUF base: use a GGUF --model".into())
    })?;
    let g = crate::gguf::GgufFile::open(src)?;
    let (dtype, file_type) = match ty {
        "f32" => (GgmlDType::F32, 0u32),
        "f16" => (GgmlDType::F16, 1u32),
        other => {
            return Err(ModelError::Invalid(format!(
                "--gguf-type `{other}`: use f32 or f16"
            )))
        }
    };
    let c = &model.cfg;
    let w = &model.weights;
    let mut tensors: Vec<(String, Tensor)> = vec![("token_embd.weight".into(), w.embed.clone())];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}");
        tensors.push((n("attn_norm.weight"), l.attn_norm.clone()));
        tensors.push((
            n("attn_q.weight"),
            crate::weights::hf_to_gguf_rows(&l.q, c.num_heads)?,
        ));
        tensors.push((
            n("attn_k.weight"),
            crate::weights::hf_to_gguf_rows(&l.k, c.num_kv_heads)?,
        ));
        tensors.push((n("attn_v.weight"), l.v.clone()));
        tensors.push((n("attn_output.weight"), l.o.clone()));
        if let Some(b) = &l.q_bias {
            tensors.push((
                n("attn_q.bias"),
                crate::weights::hf_to_gguf_rows(&b.unsqueeze(1)?, c.num_heads)?.squeeze(1)?,
            ));
        }
        if let Some(b) = &l.k_bias {
            tensors.push((
                n("attn_k.bias"),
                crate::weights::hf_to_gguf_rows(&b.unsqueeze(1)?, c.num_kv_heads)?.squeeze(1)?,
            ));
        }
        if let Some(b) = &l.v_bias {
            tensors.push((n("attn_v.bias"), b.clone()));
        }
        tensors.push((n("ffn_norm.weight"), l.mlp_norm.clone()));
        tensors.push((n("ffn_gate.weight"), l.gate.clone()));
        tensors.push((n("ffn_up.weight"), l.up.clone()));
        tensors.push((n("ffn_down.weight"), l.down.clone()));
    }
    tensors.push(("output_norm.weight".into(), w.norm.clone()));
    if let Some(h) = &w.lm_head {
        tensors.push(("output.weight".into(), h.clone()));
    }
    let mut qs = Vec::with_capacity(tensors.len());
    for (name, t) in &tensors {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        qs.push((name.clone(), QTensor::quantize(&t, d)?));
    }
    let mut meta: Vec<(String, gguf_file::Value)> = g
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.push(("general.file_type".into(), gguf_file::Value::U32(file_type)));
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = out.with_extension("gguf.tmp");
    let io = |e: std::io::Error| ModelError::File {
        path: out.into(),
        msg: e.to_string(),
    };
    if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).map_err(io)?;
    }
    let res = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        gguf_file::write(&mut f, &meta_refs, &t_refs)?;
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(())
}
