//! `--model`: the alias `smollm2-135m`, a GGUF file, or a HF model directory.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::fetch;
use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::quant::{Bits, Compute};
use crate::tokenizer::Tok;
use crate::weights::{self, Packer};

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    /// Resolve a `--model` value. The alias fetches the default model on first use.
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec == fetch::DEFAULT_ALIAS {
            return Ok(ModelSource::Gguf(fetch::ensure_default(true)?));
        }
        let p = Path::new(spec);
        if p.is_dir() {
            if !p.join("config.json").exists() {
                return Err(ModelError::File {
                    path: p.into(),
                    msg: "a model directory needs config.json, *.safetensors and tokenizer.json"
                        .into(),
                });
            }
            return Ok(ModelSource::HfDir(p.into()));
        }
        if p.is_file() {
            return Ok(ModelSource::Gguf(p.into()));
        }
        Err(ModelError::File {
            path: p.into(),
            msg: format!(
                "no such file or directory (expected `{}`, a GGUF file or a HF model directory)",
                fetch::DEFAULT_ALIAS
            ),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p,
        }
    }
}

/// A model ready to run: weights, tokenizer, and facts for `info`.
pub struct LoadedModel {
    pub source: ModelSource,
    pub model: Llama,
    pub tok: Tok,
    /// Bytes of the model file(s) on disk.
    pub file_bytes: u64,
    /// Storage dtypes in the file, e.g. "Q4_1×211, Q8_0×1, F32×61".
    pub file_dtypes: String,
}

impl LoadedModel {
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::load_source(ModelSource::resolve(spec)?, device)
    }

    /// Load for `compute`. Int8 on the CPU packs each weight as it is read and never holds
    /// the f32 copy of the base (peak memory: the packed weights plus one layer's f32), so
    /// such a model cannot switch to f32 compute or merge adapters; f32 loads as [`Self::load`].
    pub fn load_for(spec: &str, device: &Device, compute: Compute) -> Result<Self> {
        let source = ModelSource::resolve(spec)?;
        match compute.bits() {
            Some(bits) if device.is_cpu() => Self::load_packed(source, device, bits),
            Some(_) => Err(ModelError::Invalid(format!(
                "{} compute is implemented for the CPU only",
                compute.name()
            ))),
            None => Self::load_source(source, device),
        }
    }

    pub fn load_source(source: ModelSource, device: &Device) -> Result<Self> {
        Self::load_inner(source, device, None)
    }

    fn load_packed(source: ModelSource, device: &Device, bits: Bits) -> Result<Self> {
        let mut p = Packer::new(bits);
        Self::load_inner(source, device, Some(&mut p))
    }

    fn load_inner(
        source: ModelSource,
        device: &Device,
        mut packer: Option<&mut Packer>,
    ) -> Result<Self> {
        // The model from its weights: plain, or from what the packer packed while loading.
        let build = |cfg: ModelConfig, w, packer: Option<&mut Packer>| -> Result<Llama> {
            match packer {
                Some(p) => {
                    let (q, fp) = std::mem::replace(p, Packer::new(p.bits())).finish()?;
                    Llama::from_packed(cfg, w, q, fp, device)
                }
                None => Llama::new(cfg, w, device),
            }
        };
        match &source {
            ModelSource::Gguf(p) => {
                let g = GgufFile::open(p)?;
                let cfg = g.config()?;
                let tok = Tok::from_gguf(&g)?;
                let w = weights::load_gguf_with(&g, &cfg, device, packer.as_deref_mut())?;
                let dtypes = g
                    .dtype_counts()
                    .iter()
                    .map(|(k, v)| format!("{k}×{v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let model = build(cfg, w, packer)?;
                Ok(LoadedModel {
                    file_bytes: g.file_size,
                    file_dtypes: dtypes,
                    source,
                    model,
                    tok,
                })
            }
            ModelSource::HfDir(d) => {
                let cfg = ModelConfig::from_hf_json(&d.join("config.json"))?;
                let tok = Tok::from_hf_dir(d, &cfg.eos_token_ids)?;
                let w = weights::load_hf_with(d, &cfg, device, packer.as_deref_mut())?;
                let (bytes, dtypes) = hf_file_facts(d);
                let model = build(cfg, w, packer)?;
                Ok(LoadedModel {
                    file_bytes: bytes,
                    file_dtypes: dtypes,
                    source,
                    model,
                    tok,
                })
            }
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        let mut v = self.tok.eos_ids.clone();
        for id in &self.model.cfg.eos_token_ids {
            if !v.contains(id) {
                v.push(*id);
            }
        }
        v
    }
}

fn hf_file_facts(dir: &Path) -> (u64, String) {
    let mut bytes = 0;
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                for dt in safetensors_dtypes(&p).unwrap_or_default() {
                    *dtypes.entry(dt).or_insert(0) += 1;
                }
            }
        }
    }
    (
        bytes,
        dtypes
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The dtype of each tensor of a safetensors file, from its JSON header alone (the weights
/// are already loaded; reading the whole file again would double the memory for a fact).
/// `None` when the header is unreadable; its length is checked against the file and the
/// format's 100 MB limit before it is read.
fn safetensors_dtypes(p: &Path) -> Option<Vec<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).ok()?;
    let len = f.metadata().ok()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let h: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    Some(
        h.iter()
            .filter(|(k, _)| *k != "__metadata__")
            .filter_map(|(_, t)| t.get("dtype")?.as_str().map(String::from))
            .collect(),
    )
}
