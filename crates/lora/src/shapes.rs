//! Shapes of the base model's adaptable projections, used to validate adapters.

use std::collections::BTreeMap;

use crate::target::Target;

/// The base model as far as LoRA cares: how many layers and each projection's `(out, in)`.
/// The model crate builds this from its config; adapters are checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShapes {
    pub num_layers: usize,
    /// `(out_features, in_features)` of each projection (HF layout: weight is [out, in]).
    pub dims: BTreeMap<Target, (usize /* out */, usize /* in */)>,
}

impl BaseShapes {
    /// A Llama-family block: q/o [hidden, hidden], k/v [kv_dim, hidden],
    /// gate/up [intermediate, hidden], down [hidden, intermediate].
    pub fn llama(num_layers: usize, hidden: usize, kv_dim: usize, intermediate: usize) -> Self {
        let dims = BTreeMap::from([
            (Target::Q, (hidden, hidden)),
            (Target::K, (kv_dim, hidden)),
            (Target::V, (kv_dim, hidden)),
            (Target::O, (hidden, hidden)),
            (Target::Gate, (intermediate, hidden)),
            (Target::Up, (intermediate, hidden)),
            (Target::Down, (hidden, intermediate)),
        ]);
        BaseShapes { num_layers, dims }
    }

    /// SmolLM2-135M: 30 layers, hidden 576, 3 KV heads × 64, MLP 1536.
    pub fn smollm2_135m() -> Self {
        Self::llama(30, 576, 192, 1536)
    }

    /// `(out, in)` of a projection, if the base has it.
    pub fn dims_of(&self, target: Target) -> Option<(usize, usize)> {
        self.dims.get(&target).copied()
    }

    /// Trainable LoRA parameters for rank `r` on `targets` in every layer: Σ r·(in + out).
    pub fn lora_params(&self, r: usize, targets: &[Target]) -> usize {
        let per_layer: usize = targets
            .iter()
            .filter_map(|t| self.dims_of(*t))
            .map(|(o, i)| r * (o + i))
            .sum();
        per_layer * self.num_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_r8_qv_param_count() {
        // 30 layers × [8·(576+576) + 8·(192+576)] = 30 × (9216 + 6144) = 460,800.
        let s = BaseShapes::smollm2_135m();
        assert_eq!(s.lora_params(8, &[Target::Q, Target::V]), 460_800);
        assert_eq!(s.dims_of(Target::Down), Some((576, 1536)));
    }
}
