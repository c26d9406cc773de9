//! In-memory adapter: one (A, B, scale) per adapted projection.

use std::collections::BTreeMap;
use std::fmt;

use candle_core::Tensor;

use crate::config::LoraConfig;
// Re-exported so `adapter::Target`, where it used to live, keeps working.
pub use crate::target::Target;

/// Which projection of which layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleKey {
    pub layer: usize,
    pub target: Target,
}

impl ModuleKey {
    pub fn new(layer: usize, target: Target) -> Self {
        Self { layer, target }
    }

    /// PEFT's key prefix, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_prefix(&self) -> String {
        format!(
            "base_model.model.model.layers.{}.{}.{}",
            self.layer,
            self.target.parent(),
            self.target.peft_name()
        )
    }
}

impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layers.{}.{}", self.layer, self.target)
    }
}

/// One adapted projection: `ΔW = scale · B · A`, A: [r, in], B: [out, r].
///
/// Tensors are always in the HF (un-permuted) row layout, whatever file the base came from.
/// During training `a` and `b` are the tensors of candle `Var`s (they share storage).
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.a.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.b.dims()[0]
    }
    /// Trainable parameters: r·(in + out).
    pub fn num_params(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
    /// `ΔW = scale · B·A`, [out, in], f32.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let a = self.a.to_dtype(candle_core::DType::F32)?;
        let b = self.b.to_dtype(candle_core::DType::F32)?;
        b.matmul(&a)?.affine(self.scale, 0.0)
    }
}

/// Provenance stored in the safetensors header metadata of adapters lowrank writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Provenance {
    /// Fingerprint of the base weights the adapter was trained on (see `fingerprint`).
    pub base_fingerprint: Option<String>,
    pub lowrank_version: Option<String>,
    pub created: Option<String>,
}

/// A LoRA adapter: config + one module per adapted projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub modules: BTreeMap<ModuleKey, LoraModule>,
    pub provenance: Provenance,
}

impl Adapter {
    pub fn num_params(&self) -> usize {
        self.modules.values().map(|m| m.num_params()).sum()
    }
    pub fn get(&self, key: &ModuleKey) -> Option<&LoraModule> {
        self.modules.get(key)
    }
}

/// Outcome of comparing an adapter's recorded base fingerprint with the loaded base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FingerprintStatus {
    /// The adapter was trained on this base.
    Match,
    /// It was trained on a different base (only returned with `force`).
    Mismatch { adapter: String, base: String },
    /// The adapter records no fingerprint (e.g. it was made by PEFT): nothing to check.
    Absent,
}

impl Adapter {
    /// Compare the provenance fingerprint with the base model's (see `fingerprint`).
    /// A mismatch is an error unless `force`: an adapter applied to the wrong base produces
    /// plausible-looking but wrong output, so the user must opt in explicitly.
    pub fn check_fingerprint(
        &self,
        base: &str,
        force: bool,
    ) -> crate::error::Result<FingerprintStatus> {
        match &self.provenance.base_fingerprint {
            None => Ok(FingerprintStatus::Absent),
            Some(f) if f == base => Ok(FingerprintStatus::Match),
            Some(f) if force => Ok(FingerprintStatus::Mismatch { adapter: f.clone(), base: base.to_string() }),
            Some(f) => Err(crate::error::LoraError::Mismatch(format!(
                "the adapter was trained on base {f}, but the loaded base is {base} (use --force to apply it anyway)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_status() {
        let mut a = Adapter {
            config: LoraConfig::new(4, 8.0, &[Target::Q]),
            modules: BTreeMap::new(),
            provenance: Provenance::default(),
        };
        assert_eq!(
            a.check_fingerprint("sha256s:x", false).unwrap(),
            FingerprintStatus::Absent
        );
        a.provenance.base_fingerprint = Some("sha256s:x".into());
        assert_eq!(
            a.check_fingerprint("sha256s:x", false).unwrap(),
            FingerprintStatus::Match
        );
        let e = a
            .check_fingerprint("sha256s:y", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sha256s:x") && e.contains("sha256s:y"), "{e}");
        assert!(matches!(
            a.check_fingerprint("sha256s:y", true).unwrap(),
            FingerprintStatus::Mismatch { .. }
        ));
    }
}
