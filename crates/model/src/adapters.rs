//! Adapters meet the base: shapes to validate against, the base fingerprint, loading with the
//! provenance check, and `DIR[:scale]` specs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lowrank_lora::adapter::FingerprintStatus;
use lowrank_lora::shapes::BaseShapes;
use lowrank_lora::Adapter;

use crate::error::{ModelError, Result};
use crate::model::{AdapterSet, Llama};

impl Llama {
    /// The adaptable projections' shapes, for `lowrank_lora` validation.
    pub fn base_shapes(&self) -> BaseShapes {
        BaseShapes {
            num_layers: self.cfg.num_layers,
            dims: self
                .lora_shapes()
                .into_iter()
                .map(|(t, o, i)| (t, (o, i)))
                .collect(),
        }
    }

    /// Fingerprint of the base weights (sampled sha256; see `lowrank_lora::fingerprint`).
    pub fn fingerprint(&self) -> Result<String> {
        if let Some(fp) = self.load_fingerprint() {
            return Ok(fp.to_string()); // taken from the f32 weights while packing them
        }
        let named = self.weights.named();
        Ok(lowrank_lora::fingerprint::fingerprint(
            named.iter().map(|(n, t)| (n.as_str(), *t)),
        )?)
    }
}

/// Load a PEFT adapter directory for `model`: shape checks always, fingerprint check when
/// the adapter records one (refused on mismatch unless `force`).
pub fn load_adapter(
    model: &Llama,
    dir: &Path,
    force: bool,
) -> Result<(Adapter, FingerprintStatus)> {
    let a = lowrank_lora::peft::load_peft(dir, &model.base_shapes(), model.device())?;
    let status = match &a.provenance.base_fingerprint {
        None => FingerprintStatus::Absent,
        Some(_) => a
            .check_fingerprint(&model.fingerprint()?, force)
            .map_err(|e| match e {
                lowrank_lora::LoraError::Mismatch(m) => {
                    ModelError::Invalid(format!("{}: {m}", dir.display()))
                }
                e => ModelError::Lora(e),
            })?,
    };
    Ok((a, status))
}

/// `DIR[:scale]` → (DIR, scale). A trailing `:number` is the scale; otherwise the whole
/// string is the path (so paths containing ':' still work).
pub fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((p, s)) = spec.rsplit_once(':') {
        if let Ok(x) = s.parse::<f64>() {
            if !x.is_finite() {
                return Err(ModelError::Invalid(format!(
                    "adapter scale in `{spec}` must be finite"
                )));
            }
            return Ok((PathBuf::from(p), x));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Load every `DIR[:scale]` spec into one weighted mixture.
pub fn load_mixture(model: &Llama, specs: &[String], force: bool) -> Result<Option<AdapterSet>> {
    if specs.is_empty() {
        return Ok(None);
    }
    let mut set = Vec::new();
    for s in specs {
        let (dir, scale) = parse_adapter_spec(s)?;
        let (a, _) = load_adapter(model, &dir, force)?;
        set.push((Arc::new(a), scale));
    }
    Ok(Some(Arc::new(set)))
}
