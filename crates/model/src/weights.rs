//! The frozen base weights, in HF layout and f32, loaded from GGUF or HF safetensors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lowrank_lora::Target;

use std::sync::Arc;

use lowrank_lora::fingerprint::Sampled;
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::{self, QMatrix, QuantModel};

/// One decoder block's weights. Linear weights are [out, in] (HF orientation).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub mlp_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl LayerWeights {
    /// The layer's tensors with their HF names (layer `i`).
    pub fn named(&self, i: usize) -> Vec<(String, &Tensor)> {
        let p = format!("model.layers.{i}");
        let mut v: Vec<(String, &Tensor)> =
            vec![(format!("{p}.input_layernorm.weight"), &self.attn_norm)];
        for t in Target::ALL {
            v.push((LayerWeights::linear_name(i, t), self.linear(t)));
        }
        for (n, b) in [
            ("q_proj", &self.q_bias),
            ("k_proj", &self.k_bias),
            ("v_proj", &self.v_bias),
        ] {
            if let Some(b) = b {
                v.push((format!("{p}.self_attn.{n}.bias"), b));
            }
        }
        v.push((
            format!("{p}.post_attention_layernorm.weight"),
            &self.mlp_norm,
        ));
        v
    }

    /// The HF name of projection `t` of layer `i`.
    pub fn linear_name(i: usize, t: Target) -> String {
        format!("model.layers.{i}.{}.{}.weight", t.parent(), t.peft_name())
    }

    pub fn linear(&self, t: Target) -> &Tensor {
        match t {
            Target::Q => &self.q,
            Target::K => &self.k,
            Target::V => &self.v,
            Target::O => &self.o,
            Target::Gate => &self.gate,
            Target::Up => &self.up,
            Target::Down => &self.down,
        }
    }
    pub fn linear_mut(&mut self, t: Target) -> &mut Tensor {
        match t {
            Target::Q => &mut self.q,
            Target::K => &mut self.k,
            Target::V => &mut self.v,
            Target::O => &mut self.o,
            Target::Gate => &mut self.gate,
            Target::Up => &mut self.up,
            Target::Down => &mut self.down,
        }
    }
}

/// All weights of the model. Cloning shares storage (candle tensors are reference counted):
/// a merged copy replaces only the tensors it changes.
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// Every tensor with its HF name, in a stable order (for fingerprints and export).
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            v.extend(l.named(i));
        }
        v.push(("model.norm.weight".into(), &self.norm));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".into(), h));
        }
        v
    }

    pub fn num_params(&self) -> usize {
        self.named().iter().map(|(_, t)| t.elem_count()).sum()
    }
}

pub use lowrank_lora::permute::{gguf_to_hf_rows, hf_to_gguf_rows};

fn check_shape(path: &Path, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(ModelError::Tensor {
            path: path.into(),
            name: name.into(),
            msg: format!("shape {:?}, expected {:?}", t.dims(), want),
        });
    }
    Ok(())
}

/// Every tensor [`load_gguf`] reads, with the (row-major) shape `cfg` implies for it.
fn gguf_expected(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qo, kvo) = (cfg.q_out(), cfg.kv_out());
    let mut v = vec![("token_embd.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_layers {
        let mut push = |s: &str, shape: Vec<usize>| v.push((format!("blk.{l}.{s}"), shape));
        push("attn_norm.weight", vec![h]);
        push("attn_q.weight", vec![qo, h]);
        push("attn_k.weight", vec![kvo, h]);
        push("attn_v.weight", vec![kvo, h]);
        push("attn_output.weight", vec![h, qo]);
        if cfg.attention_bias {
            push("attn_q.bias", vec![qo]);
            push("attn_k.bias", vec![kvo]);
            push("attn_v.bias", vec![kvo]);
        }
        push("ffn_norm.weight", vec![h]);
        push("ffn_gate.weight", vec![i, h]);
        push("ffn_up.weight", vec![i, h]);
        push("ffn_down.weight", vec![h, i]);
    }
    v.push(("output_norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("output.weight".into(), vec![cfg.vocab_size, h]));
    }
    v
}

/// The header's tensors against the config, before any tensor is read: every tensor the model
/// needs is there with the shape the config implies, and no block lies beyond `block_count`
/// (a file with more blocks than its config says would otherwise half-load).
fn check_gguf_layout(g: &GgufFile, cfg: &ModelConfig) -> Result<()> {
    let err = |name: &str, msg: String| ModelError::Tensor {
        path: g.path.clone(),
        name: name.into(),
        msg,
    };
    for (name, want) in gguf_expected(cfg) {
        match g.tensor_dims(&name) {
            None => return Err(err(&name, "missing".into())),
            Some(d) if d != want.as_slice() => {
                return Err(err(
                    &name,
                    format!("shape {d:?}, but the model's metadata implies {want:?}"),
                ))
            }
            Some(_) => {}
        }
    }
    for name in g.content.tensor_infos.keys() {
        let block = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(b) = block.filter(|&b| b >= cfg.num_layers) {
            return Err(err(
                name,
                format!(
                    "block {b}, but {}.block_count says {} blocks",
                    cfg.arch, cfg.num_layers
                ),
            ));
        }
    }
    Ok(())
}

/// Load and dequantize every weight of a GGUF model.
pub fn load_gguf(g: &GgufFile, cfg: &ModelConfig, device: &Device) -> Result<Weights> {
    load_gguf_with(g, cfg, device, None)
}

/// [`load_gguf`]; with a [`Packer`], each weight is packed as soon as it is read and only
/// placeholders of the f32 projections stay.
pub(crate) fn load_gguf_with(
    g: &GgufFile,
    cfg: &ModelConfig,
    device: &Device,
    mut packer: Option<&mut Packer>,
) -> Result<Weights> {
    check_gguf_layout(g, cfg)?;
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        if !g.has_tensor(name) {
            return Err(ModelError::Tensor {
                path: g.path.clone(),
                name: name.into(),
                msg: "missing".into(),
            });
        }
        let t = g.tensor_f32(name, device)?;
        check_shape(&g.path, name, &t, shape)?;
        Ok(t)
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qo, kvo) = (cfg.q_out(), cfg.kv_out());
    let embed_shape = [cfg.vocab_size, h];
    // Raw blocks are read in place from the mapped file (packing only).
    let file_map = match packer {
        Some(_) => Some(g.map()?),
        None => None,
    };
    let embed = match (packer.as_mut(), g.block_format("token_embd.weight")) {
        (Some(p), Some(_)) => {
            let map = file_map.as_deref().expect("mapped with a packer");
            let r = raw_weight(g, map, "token_embd.weight", &embed_shape)?;
            p.embed_raw(r, cfg.tie_word_embeddings, device)?
        }
        (Some(p), None) => p.embed(
            get("token_embd.weight", &embed_shape)?,
            cfg.tie_word_embeddings,
        )?,
        (None, _) => get("token_embd.weight", &embed_shape)?,
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        let bias = |s: &str, len: usize| -> Result<Option<Tensor>> {
            if cfg.attention_bias {
                Ok(Some(get(&n(s), &[len])?))
            } else {
                Ok(None)
            }
        };
        // With a packer, the projections of a group whose every weight is stored in a block
        // format it packs as is (Q4_1, Q8_0) are never dequantized: their raw blocks are
        // packed, their fingerprint samples read out of the blocks, and a placeholder stands
        // in. Other groups load as f32 and are packed from that.
        let mut raw: Vec<RawWeight> = Vec::new();
        let mut linear = |t: Target, s: &str, shape: &[usize]| -> Result<Tensor> {
            let name = n(s);
            let direct = packer.is_some()
                && quant::PACKS
                    .iter()
                    .find(|p| p.contains(&t))
                    .and_then(|p| {
                        let fmts: Vec<_> = p
                            .iter()
                            .map(|&pt| g.block_format(&n(gguf_linear_name(pt))))
                            .collect();
                        fmts[0].filter(|f| fmts.iter().all(|x| *x == Some(*f)))
                    })
                    .is_some();
            if !direct {
                let w = get(&name, shape)?;
                return Ok(match t {
                    Target::Q => gguf_to_hf_rows(&w, cfg.num_heads)?,
                    Target::K => gguf_to_hf_rows(&w, cfg.num_kv_heads)?,
                    _ => w,
                });
            }
            let map = file_map.as_deref().expect("mapped with a packer");
            let mut r = raw_weight(g, map, &name, shape)?;
            r.target = t;
            r.map = match t {
                Target::Q => Some(row_map(shape[0], cfg.num_heads)?),
                Target::K => Some(row_map(shape[0], cfg.num_kv_heads)?),
                _ => None,
            };
            let ph = Tensor::zeros((), DType::F32, device)?.broadcast_as(shape)?;
            raw.push(r);
            Ok(ph)
        };
        let q = linear(Target::Q, "attn_q.weight", &[qo, h])?;
        let k = linear(Target::K, "attn_k.weight", &[kvo, h])?;
        let v = linear(Target::V, "attn_v.weight", &[kvo, h])?;
        let o = linear(Target::O, "attn_output.weight", &[h, qo])?;
        let gate = linear(Target::Gate, "ffn_gate.weight", &[i, h])?;
        let up = linear(Target::Up, "ffn_up.weight", &[i, h])?;
        let down = linear(Target::Down, "ffn_down.weight", &[h, i])?;
        let q_bias = bias("attn_q.bias", qo)?
            .map(|b| gguf_to_hf_rows(&b, cfg.num_heads))
            .transpose()?;
        let k_bias = bias("attn_k.bias", kvo)?
            .map(|b| gguf_to_hf_rows(&b, cfg.num_kv_heads))
            .transpose()?;
        let lw = LayerWeights {
            attn_norm: get(&n("attn_norm.weight"), &[h])?,
            q,
            k,
            v,
            o,
            q_bias,
            k_bias,
            v_bias: bias("attn_v.bias", kvo)?,
            mlp_norm: get(&n("ffn_norm.weight"), &[h])?,
            gate,
            up,
            down,
        };
        layers.push(match packer.as_mut() {
            Some(p) => p.layer_gguf(l, lw, raw)?,
            None => lw,
        });
    }
    let norm = get("output_norm.weight", &[h])?;
    let mut lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(get("output.weight", &[cfg.vocab_size, h])?)
    };
    if let Some(p) = packer.as_mut() {
        p.sample("model.norm.weight", &norm)?;
        lm_head = lm_head.map(|t| p.head(t)).transpose()?;
    }
    Ok(Weights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

/// Load a HF model directory's `*.safetensors` (any float dtype → f32).
pub fn load_hf(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Weights> {
    load_hf_with(dir, cfg, device, None)
}

/// Tensor `name` of an HF directory's files, checked against `shape`; in f32 when `f32`,
/// else in its file's dtype.
fn take_hf(
    all: &mut crate::st::StFiles,
    dir: &Path,
    device: &Device,
    name: &str,
    shape: &[usize],
    f32: bool,
) -> Result<Tensor> {
    let (p, t) = all.take(name, device)?.ok_or_else(|| ModelError::Tensor {
        path: dir.into(),
        name: name.into(),
        msg: "missing from the safetensors files".into(),
    })?;
    let t = if f32 { t.to_dtype(DType::F32)? } else { t };
    check_shape(&p, name, &t, shape)?;
    Ok(t)
}

/// [`load_hf`], packing as it goes with a [`Packer`] (see [`load_gguf_with`]).
pub(crate) fn load_hf_with(
    dir: &Path,
    cfg: &ModelConfig,
    device: &Device,
    mut packer: Option<&mut Packer>,
) -> Result<Weights> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::File {
            path: dir.into(),
            msg: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::File {
            path: dir.into(),
            msg: "no *.safetensors weights in this directory".into(),
        });
    }
    // Tensor by tensor: never the whole file in memory (see `st`).
    let mut all = crate::st::StFiles::open(&files)?;
    let has_head = all.contains("lm_head.weight");
    // The packer takes the embedding and the head in their file's dtype and converts them a
    // chunk of rows at a time (`QMatrix::from_tensor`): whole f32 copies of a 1.1 B base's
    // 49152 × 2048 head were 400 MB at once.
    let packing = packer.is_some();
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qo, kvo) = (cfg.q_out(), cfg.kv_out());
    // Untied in the config but without a head in the files: HF ties (see below).
    let tied = cfg.tie_word_embeddings || !has_head;
    let embed_shape = [cfg.vocab_size, h];
    let mut embed = take_hf(
        &mut all,
        dir,
        device,
        "model.embed_tokens.weight",
        &embed_shape,
        !packing,
    )?;
    if let Some(p) = packer.as_mut() {
        embed = p.embed(embed, tied)?;
    }
    let mut take = |name: &str, shape: &[usize]| take_hf(&mut all, dir, device, name, shape, true);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut bias = |s: &str, len: usize| -> Result<Option<Tensor>> {
            if cfg.attention_bias {
                Ok(Some(take(&format!("{p}.self_attn.{s}.bias"), &[len])?))
            } else {
                Ok(None)
            }
        };
        let (q_bias, k_bias, v_bias) = (
            bias("q_proj", qo)?,
            bias("k_proj", kvo)?,
            bias("v_proj", kvo)?,
        );
        let lw = LayerWeights {
            attn_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
            q: take(&format!("{p}.self_attn.q_proj.weight"), &[qo, h])?,
            k: take(&format!("{p}.self_attn.k_proj.weight"), &[kvo, h])?,
            v: take(&format!("{p}.self_attn.v_proj.weight"), &[kvo, h])?,
            o: take(&format!("{p}.self_attn.o_proj.weight"), &[h, qo])?,
            q_bias,
            k_bias,
            v_bias,
            mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate: take(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
            up: take(&format!("{p}.mlp.up_proj.weight"), &[i, h])?,
            down: take(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
        };
        layers.push(match packer.as_mut() {
            Some(pk) => pk.layer(l, lw)?,
            None => lw,
        });
    }
    let norm = take("model.norm.weight", &[h])?;
    let mut lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        // Some checkpoints omit the head although config says untied; HF then ties. A head
        // that is there but does not fit is an error, not a reason to tie.
        if has_head {
            let name = "lm_head.weight";
            Some(take_hf(
                &mut all,
                dir,
                device,
                name,
                &embed_shape,
                !packing,
            )?)
        } else {
            None
        }
    };
    if let Some(p) = packer.as_mut() {
        p.sample("model.norm.weight", &norm)?;
        lm_head = lm_head.map(|t| p.head(t)).transpose()?;
    }
    Ok(Weights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

/// Packs weights for int8 compute while they load, keeping no f32 copy of the projections,
/// the embedding or the head: each is sampled for the base fingerprint (under the name
/// [`Weights::named`] gives it), packed, and replaced by a placeholder of its shape that
/// holds one value (a broadcast zero). A model built from these weights must never multiply
/// by a placeholder: [`crate::Llama`] refuses every f32 use of them.
pub(crate) struct Packer {
    layers: Vec<[Arc<QMatrix>; 4]>,
    samples: Vec<Sampled>,
    embed: Option<Arc<QMatrix>>,
    head: Option<Arc<QMatrix>>,
    bits: quant::Bits,
}

impl Packer {
    pub(crate) fn new(bits: quant::Bits) -> Packer {
        Packer {
            layers: Vec::new(),
            samples: Vec::new(),
            embed: None,
            head: None,
            bits,
        }
    }

    pub(crate) fn bits(&self) -> quant::Bits {
        self.bits
    }

    fn sample(&mut self, name: &str, t: &Tensor) -> Result<()> {
        self.samples
            .push(lowrank_lora::fingerprint::sample_tensor(name, t)?);
        Ok(())
    }

    /// The embedding (also the head when `tied`) → its placeholder.
    fn embed(&mut self, t: Tensor, tied: bool) -> Result<Tensor> {
        self.sample("model.embed_tokens.weight", &t)?;
        let bits = if tied { self.bits.head() } else { self.bits };
        let q = Arc::new(
            QMatrix::from_tensor_bits(&t, bits)
                .map_err(|e| named("model.embed_tokens.weight", e))?,
        );
        if tied {
            self.head = Some(q.clone());
        }
        self.embed = Some(q);
        placeholder(&t)
    }

    /// An untied head → its placeholder.
    fn head(&mut self, t: Tensor) -> Result<Tensor> {
        self.sample("lm_head.weight", &t)?;
        self.head = Some(Arc::new(
            QMatrix::from_tensor_bits(&t, self.bits.head())
                .map_err(|e| named("lm_head.weight", e))?,
        ));
        placeholder(&t)
    }

    /// Layer `i` (HF layout) → the same with placeholder projections.
    fn layer(&mut self, i: usize, lw: LayerWeights) -> Result<LayerWeights> {
        self.layer_packed(i, lw, None, &[])
    }

    /// A GGUF layer: the groups whose projections came as raw blocks (placeholders in `lw`)
    /// are packed from the blocks and sampled from them; the rest from the f32 weights.
    fn layer_gguf(
        &mut self,
        i: usize,
        lw: LayerWeights,
        raw: Vec<RawWeight>,
    ) -> Result<LayerWeights> {
        let samples: Vec<Sampled> = raw
            .par_iter()
            .map(|r| r.sample(&LayerWeights::linear_name(i, r.target)))
            .collect();
        self.samples.extend(samples);
        let packs = quant::PACKS
            .iter()
            .map(|ts| {
                let parts: Option<Vec<&RawWeight>> = ts
                    .iter()
                    .map(|t| raw.iter().find(|r| r.target == *t))
                    .collect();
                match parts {
                    Some(parts) => {
                        let v: Vec<_> = parts
                            .iter()
                            .map(|r| (r.bytes, r.rows, r.map.as_deref()))
                            .collect();
                        QMatrix::from_gguf_blocks(parts[0].fmt, &v, parts[0].cols, self.bits)
                            .map(Arc::new)
                            .map_err(|e| quant::name_part(e, ts))
                    }
                    None => quant::pack_group(&lw, ts, self.bits),
                }
                .map_err(|e| named(&format!("model.layers.{i}"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        let packs: [Arc<QMatrix>; 4] = packs.try_into().expect("four packs");
        let sampled: Vec<Target> = raw.iter().map(|r| r.target).collect();
        drop(raw);
        self.layer_packed(i, lw, Some(packs), &sampled)
    }

    /// An embedding read as raw blocks → its placeholder (also the head when `tied`).
    fn embed_raw(&mut self, r: RawWeight, tied: bool, device: &Device) -> Result<Tensor> {
        self.samples.push(r.sample("model.embed_tokens.weight"));
        let bits = if tied { self.bits.head() } else { self.bits };
        let q = Arc::new(
            QMatrix::from_gguf_blocks(r.fmt, &[(r.bytes, r.rows, None)], r.cols, bits)
                .map_err(|e| named("model.embed_tokens.weight", e))?,
        );
        if tied {
            self.head = Some(q.clone());
        }
        self.embed = Some(q);
        Ok(Tensor::zeros((), DType::F32, device)?.broadcast_as((r.rows, r.cols))?)
    }

    /// `sampled`: projections already sampled for the fingerprint (placeholders in `lw`).
    fn layer_packed(
        &mut self,
        i: usize,
        mut lw: LayerWeights,
        packs: Option<[Arc<QMatrix>; 4]>,
        sampled: &[Target],
    ) -> Result<LayerWeights> {
        if i != self.layers.len() {
            return Err(ModelError::Invalid(format!(
                "int8 packing: layer {i} arrived out of order"
            )));
        }
        let skip: Vec<String> = sampled
            .iter()
            .map(|&t| LayerWeights::linear_name(i, t))
            .collect();
        for (n, t) in lw.named(i) {
            if !skip.contains(&n) {
                self.samples
                    .push(lowrank_lora::fingerprint::sample_tensor(&n, t)?);
            }
        }
        self.layers.push(match packs {
            Some(p) => p,
            None => quant::pack_layer(&lw, self.bits)
                .map_err(|e| named(&format!("model.layers.{i}"), e))?,
        });
        for t in Target::ALL {
            let w = lw.linear_mut(t);
            *w = placeholder(w)?;
        }
        Ok(lw)
    }

    /// The packed model and the fingerprint of the f32 weights it came from.
    pub(crate) fn finish(self) -> Result<(QuantModel, String)> {
        let missing = || ModelError::Invalid("int8 packing: no embedding was loaded".into());
        let embed = self.embed.ok_or_else(missing)?;
        let head = self.head.ok_or_else(missing)?;
        let fp = lowrank_lora::fingerprint::fingerprint_sampled(self.samples)?;
        Ok((
            QuantModel::from_packs(self.layers, head, embed, self.bits),
            fp,
        ))
    }
}

/// A GGUF weight read as its raw blocks (packed as they are, never dequantized).
struct RawWeight<'m> {
    target: Target,
    fmt: quant::BlockFormat,
    /// In the mapped file.
    bytes: &'m [u8],
    /// HF-layout shape (rows = outputs).
    rows: usize,
    cols: usize,
    /// HF row → file row, for q and k (see [`row_map`]).
    map: Option<Vec<usize>>,
}

impl RawWeight<'_> {
    /// Fingerprint samples of the f32 tensor this would dequantize to (HF layout), read out
    /// of the blocks with the GGUF readers' own formulas.
    fn sample(&self, name: &str) -> Sampled {
        let (cols, bytes) = (self.cols, self.fmt.bytes());
        let nb = cols / quant::QK;
        lowrank_lora::fingerprint::sample_with(name, &[self.rows, cols], |k| {
            let (r, c) = (k / cols, k % cols);
            let r = self.map.as_ref().map_or(r, |m| m[r]);
            let at = (r * nb + c / quant::QK) * bytes;
            self.fmt.value(&self.bytes[at..at + bytes], c % quant::QK)
        })
    }
}

/// The embedding (or another unpermuted weight) as raw blocks.
fn raw_weight<'m>(
    g: &GgufFile,
    map: &'m [u8],
    name: &str,
    shape: &[usize],
) -> Result<RawWeight<'m>> {
    if g.tensor_dims(name) != Some(shape) {
        return Err(ModelError::Tensor {
            path: g.path.clone(),
            name: name.into(),
            msg: format!("shape {:?}, expected {shape:?}", g.tensor_dims(name)),
        });
    }
    let (fmt, bytes) = g.tensor_blocks(map, name)?;
    Ok(RawWeight {
        target: Target::Q, // set by the caller for projections
        fmt,
        bytes,
        rows: shape[0],
        cols: shape[1],
        map: None,
    })
}

/// A projection's GGUF tensor name within its block.
fn gguf_linear_name(t: Target) -> &'static str {
    match t {
        Target::Q => "attn_q.weight",
        Target::K => "attn_k.weight",
        Target::V => "attn_v.weight",
        Target::O => "attn_output.weight",
        Target::Gate => "ffn_gate.weight",
        Target::Up => "ffn_up.weight",
        Target::Down => "ffn_down.weight",
    }
}

/// HF row r of a q/k projection ← GGUF row `map[r]` (the permutation `gguf_to_hf_rows`
/// applies, read off by applying it to the row numbers).
fn row_map(rows: usize, n_head: usize) -> Result<Vec<usize>> {
    let idx = Tensor::from_vec(
        (0..rows).map(|r| r as f32).collect::<Vec<_>>(),
        (rows, 1),
        &candle_core::Device::Cpu,
    )?;
    Ok(gguf_to_hf_rows(&idx, n_head)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|r| r as usize)
        .collect())
}

/// An f32 tensor of `t`'s shape and device that holds a single zero (stride-0 broadcast):
/// f32 whatever `t`'s dtype, as the embedding and head are packed from bf16 as read.
fn placeholder(t: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros((), DType::F32, t.device())?.broadcast_as(t.shape())?)
}

/// A packing error with the tensor (or layer) it came from in front.
fn named(what: &str, e: ModelError) -> ModelError {
    ModelError::Invalid(format!("packing {what}: {e}"))
}
