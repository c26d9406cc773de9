//! `LoraConfig` with PEFT's semantics and field names (adapter_config.json).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::target::Target;

/// PEFT's `init_lora_weights`: `true` (kaiming-uniform A, zero B), `false` (both random,
/// for tests), `"gaussian"`, `"pissa"` (and PEFT's `"pissa_niter_K"` spelling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Bool(bool),
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// `target_modules`: a list of names or a single string ("all-linear" or a regex in PEFT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// `layers_to_transform`: an int or a list of ints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    One(usize),
    List(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Other PEFT fields are carried through untouched.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

impl LoraConfig {
    /// A fresh config: PEFT defaults, CAUSAL_LM.
    pub fn new(r: usize, lora_alpha: f64, targets: &[Target]) -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(
                targets.iter().map(|t| t.peft_name().to_string()).collect(),
            ),
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            use_dora: false,
            bias: default_bias(),
            init_lora_weights: InitLoraWeights::Bool(true),
            fan_in_fan_out: false,
            modules_to_save: None,
            inference_mode: true,
            base_model_name_or_path: None,
            extra: BTreeMap::new(),
        }
    }

    /// The projections this config targets ("all-linear" = all seven).
    pub fn targets(&self) -> Result<Vec<Target>, String> {
        let names: Vec<String> = match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => {
                return Ok(Target::ALL.to_vec());
            }
            TargetModules::One(s) => vec![s.clone()],
            TargetModules::List(v) => v.clone(),
        };
        let mut out = Vec::new();
        for n in names {
            // PEFT matches on the module name's suffix: accept "self_attn.q_proj" too.
            let leaf = n.rsplit('.').next().unwrap_or(&n);
            match Target::from_peft_name(leaf) {
                Some(t) => {
                    if !out.contains(&t) {
                        out.push(t)
                    }
                }
                None => {
                    return Err(format!(
                        "unknown target module `{n}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)"
                    ))
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether layer `i` is adapted.
    pub fn applies_to_layer(&self, layer: usize) -> bool {
        match &self.layers_to_transform {
            None => true,
            Some(LayersToTransform::One(l)) => *l == layer,
            Some(LayersToTransform::List(v)) => v.contains(&layer),
        }
    }

    /// PEFT's pattern lookup: the first key that matches the module's full name suffix.
    fn pattern_lookup<T: Copy>(
        map: &BTreeMap<String, T>,
        layer: usize,
        target: Target,
    ) -> Option<T> {
        let full = format!(
            "model.layers.{layer}.{}.{}",
            target.parent(),
            target.peft_name()
        );
        map.iter().find_map(|(k, v)| {
            let hit = full == *k || full.ends_with(&format!(".{k}")) || k == target.peft_name();
            hit.then_some(*v)
        })
    }

    /// Rank of one module (rank_pattern overrides r).
    pub fn rank_for(&self, layer: usize, target: Target) -> usize {
        Self::pattern_lookup(&self.rank_pattern, layer, target).unwrap_or(self.r)
    }

    /// Alpha of one module (alpha_pattern overrides lora_alpha).
    pub fn alpha_for(&self, layer: usize, target: Target) -> f64 {
        Self::pattern_lookup(&self.alpha_pattern, layer, target).unwrap_or(self.lora_alpha)
    }

    /// Scale s: α/r, or α/√r with rsLoRA.
    pub fn scale_for(&self, layer: usize, target: Target) -> f64 {
        let r = self.rank_for(layer, target) as f64;
        let a = self.alpha_for(layer, target);
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }
}
