//! Writing a model out: a HF-style directory (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json) that `--model DIR` loads, written atomically.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use lowrank_lora::{Adapter, Target};

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
/// How much of an adapter's change to the weights survives re-quantizing the merged matrices
/// to `ty` (a llama.cpp block format): (kept, noise), where kept = ⟨Q(W₀+ΔW) − W₀, ΔW⟩ / ‖ΔW‖²
/// (1: all of it, 0: rounded away) and noise = ‖Q(W₀+ΔW) − (W₀+ΔW)‖ / ‖ΔW‖, over the
/// (W₀, W₀+ΔW) `pairs`. A small LoRA delta under a 4-bit step is mostly rounded away; the
/// numbers let `merge` say so before anyone deploys the file.
pub fn requant_retention(pairs: &[(&Tensor, &Tensor)], ty: &str) -> Result<(f64, f64)> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dtype = match ty {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q8_0" => GgmlDType::Q8_0,
        "f16" => GgmlDType::F16,
        _ => return Ok((1.0, 0.0)),
    };
    let sum =
        |t: Tensor| -> Result<f64> { Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let (mut dot, mut dd, mut err) = (0f64, 0f64, 0f64);
    for (w0, w) in pairs {
        let q = QTensor::quantize(w, dtype)?.dequantize(w.device())?;
        let delta = (*w - *w0)?;
        dot += sum(((&q - *w0)? * &delta)?)?;
        dd += sum(delta.sqr()?)?;
        err += sum((&q - *w)?.sqr()?)?;
    }
    if dd == 0.0 {
        return Ok((1.0, 0.0));
    }
    Ok((dot / dd, (err / dd).sqrt()))
}

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
    // llama.cpp's block formats (and its `general.file_type` numbers for them).
    let (dtype, file_type) = match ty {
        "f32" => (GgmlDType::F32, 0u32),
        "f16" => (GgmlDType::F16, 1u32),
        "q4_0" => (GgmlDType::Q4_0, 2),
        "q4_1" => (GgmlDType::Q4_1, 3),
        "q8_0" => (GgmlDType::Q8_0, 7),
        other => {
            return Err(ModelError::Invalid(format!(
                "GGUF tensor type `{other}`: use f32, f16, q8_0, q4_0 or q4_1"
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
        let row = t.dims().last().copied().unwrap_or(0);
        if row % d.block_size() != 0 {
            return Err(ModelError::Invalid(format!(
                "{name}: rows of {row} values are not whole {ty} blocks of {}; use f16 or f32",
                d.block_size()
            )));
        }
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
    write_gguf(out, &meta, &qs)
}

/// Write a GGUF file atomically: a temp file beside `out`, fsynced, renamed over it.
fn write_gguf(
    out: &Path,
    meta: &[(String, candle_core::quantized::gguf_file::Value)],
    tensors: &[(String, candle_core::quantized::QTensor)],
) -> Result<()> {
    use candle_core::quantized::gguf_file;
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
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

/// llama.cpp's name of a projection's weight in block `layer`.
fn gguf_linear(layer: usize, t: Target) -> String {
    let n = match t {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    };
    format!("blk.{layer}.{n}.weight")
}

/// Save `adapter` as llama.cpp's LoRA adapter GGUF, the file its `convert_lora_to_gguf.py`
/// writes and `llama-cli --lora`, `llama_adapter_lora_init` and Ollama's `ADAPTER` load:
/// metadata `general.architecture` (the base's), `general.type = adapter`, `adapter.type =
/// lora`, `adapter.lora.alpha`; per adapted projection `blk.N.<tensor>.weight.lora_a` (A, [r,
/// in]) and `.lora_b` (B, [out, r]) in f32, B's rows of q and k in the GGUF row order of the
/// base's weights. llama.cpp scales every pair by α / r (r from A's shape): one α for the
/// file, so a module whose own scale differs (rsLoRA, rank or alpha patterns) has the
/// difference folded into its B — the product is the same.
pub fn save_gguf_lora(model: &Llama, adapter: &Adapter, out: &Path) -> Result<()> {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    let c = &model.cfg;
    let first = adapter
        .modules
        .values()
        .next()
        .ok_or_else(|| ModelError::Invalid("the adapter has no modules".into()))?;
    let alpha = first.scale * first.a.dim(0)? as f64;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ModelError::Invalid(format!(
            "LoRA scale {} cannot be written as llama.cpp's alpha",
            first.scale
        )));
    }
    let mut tensors = Vec::with_capacity(2 * adapter.modules.len());
    for (k, m) in &adapter.modules {
        let r = m.a.dim(0)?;
        let mut b = m.b.to_dtype(DType::F32)?;
        let fold = m.scale * r as f64 / alpha;
        if (fold - 1.0).abs() > 1e-12 {
            b = (b * fold)?;
        }
        b = match k.target {
            Target::Q => crate::weights::hf_to_gguf_rows(&b, c.num_heads)?,
            Target::K => crate::weights::hf_to_gguf_rows(&b, c.num_kv_heads)?,
            _ => b,
        };
        let a = m.a.to_dtype(DType::F32)?;
        let name = gguf_linear(k.layer, k.target);
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(ModelError::Invalid(format!(
                    "{}: non-finite values in lora_{}",
                    k.peft_prefix(),
                    &suffix[5..]
                )));
            }
            let t = t.contiguous()?;
            tensors.push((
                format!("{name}.{suffix}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
    }
    let arch = match c.arch.as_str() {
        "mistral" => "llama", // llama.cpp runs Mistral as llama
        a => a,
    };
    let meta = vec![
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ("adapter.type".to_string(), Value::String("lora".into())),
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
    ];
    write_gguf(out, &meta, &tensors)
}

#[cfg(test)]
mod requant_tests {
    use super::requant_retention;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A base already on the Q4_1 grid (as in a Q4_1 GGUF) plus a delta of `amp`.
    fn pair(amp: f32) -> (Tensor, Tensor) {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (64, 256), &d).unwrap();
        let w0 = QTensor::quantize(&w, GgmlDType::Q4_1)
            .unwrap()
            .dequantize(&d)
            .unwrap();
        let delta = Tensor::randn(0f32, amp, (64, 256), &d).unwrap();
        let w1 = (&w0 + delta).unwrap();
        (w0, w1)
    }

    #[test]
    fn small_deltas_are_rounded_away_by_4_bits_and_kept_by_8() {
        // A Q4_1 step here is ~0.2/15 ≈ 0.013; a LoRA-sized delta is ~0.001.
        let (w0, w) = pair(0.001);
        let (kept, noise) = requant_retention(&[(&w0, &w)], "q4_1").unwrap();
        assert!(
            kept < 0.3 && noise > 0.5,
            "q4_1: kept {kept}, noise {noise}"
        );
        let (kept, noise) = requant_retention(&[(&w0, &w)], "q8_0").unwrap();
        assert!(
            kept > 0.95 && noise < 0.5,
            "q8_0: kept {kept}, noise {noise}"
        );
        // A delta of many steps survives even 4 bits.
        let (w0, w) = pair(0.2);
        let (kept, _) = requant_retention(&[(&w0, &w)], "q4_1").unwrap();
        assert!(kept > 0.9, "large delta, q4_1: kept {kept}");
        assert_eq!(
            requant_retention(&[(&w0, &w0)], "q4_1").unwrap(),
            (1.0, 0.0)
        );
    }
}
