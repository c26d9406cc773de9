//! The trainable side of a run: LoRA modules initialised on the targeted projections (A and B
//! as variables; PiSSA rewrites a private copy of the base), or every weight of a copy of the
//! model as a variable (full fine-tuning). The base's own tensors are never touched.

use lowrank_model::quant::Compute;
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use lowrank_lora::adapter::Provenance;
use lowrank_lora::config::{InitLoraWeights, TargetModules};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey};
use lowrank_model::model::AdapterSet;
use lowrank_model::weights::Weights;
use lowrank_model::{Llama, LoadedModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Result, TrainError, Trainable, Trainer};
use crate::config::TrainConfig;
use crate::optim::Param;

impl Trainer<'_> {
    pub(super) fn lora_config(cfg: &TrainConfig) -> Result<LoraConfig> {
        let targets = cfg.target_names().map_err(TrainError::Config)?;
        let mut lc = LoraConfig::new(cfg.rank, cfg.alpha(), &[]);
        lc.target_modules = if targets == ["all-linear"] {
            TargetModules::One("all-linear".into())
        } else {
            TargetModules::List(targets)
        };
        lc.lora_dropout = cfg.dropout;
        lc.use_rslora = cfg.rslora;
        lc.init_lora_weights = match cfg.init.as_str() {
            "default" | "true" => InitLoraWeights::Bool(true),
            other => InitLoraWeights::Named(other.into()),
        };
        Ok(lc)
    }

    pub(super) fn init_lora(
        base: &LoadedModel,
        cfg: &TrainConfig,
    ) -> Result<(Llama, Trainable, Vec<Param>)> {
        let lc = Self::lora_config(cfg)?;
        let targets = lc.targets().map_err(TrainError::Config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut model = base.model.clone();
        let mut modules = BTreeMap::new();
        let mut params = Vec::new();
        let dev = base.model.device().clone();
        let mut changed_base = false;
        for layer in 0..model.cfg.num_layers {
            if !lc.applies_to_layer(layer) {
                continue;
            }
            for (t, o, i) in model.lora_shapes() {
                if !targets.contains(&t) {
                    continue;
                }
                // A model loaded for int8 only holds placeholders: inits that read the base
                // (PiSSA) then say they need it.
                let w = model
                    .has_f32_weights()
                    .then(|| model.weights.layers[layer].linear(t).clone());
                let (m, residual) = lowrank_lora::init::init_module(
                    &lc,
                    layer,
                    t,
                    o,
                    i,
                    w.as_ref(),
                    &mut rng,
                    &dev,
                )?;
                if let Some(r) = residual {
                    // PiSSA: the frozen base becomes W − s·B·A (a private copy).
                    *model.weights.layers[layer].linear_mut(t) = r;
                    changed_base = true;
                }
                let key = ModuleKey::new(layer, t);
                let va = Var::from_tensor(&m.a)?;
                let vb = Var::from_tensor(&m.b)?;
                params.push(Param {
                    name: format!("{}.lora_A.weight", key.peft_prefix()),
                    var: va.clone(),
                    lr_mult: 1.0,
                });
                params.push(Param {
                    name: format!("{}.lora_B.weight", key.peft_prefix()),
                    var: vb.clone(),
                    lr_mult: cfg.lr_b_ratio,
                });
                modules.insert(
                    key,
                    LoraModule {
                        a: va.as_tensor().clone(),
                        b: vb.as_tensor().clone(),
                        scale: m.scale,
                    },
                );
            }
        }
        if modules.is_empty() {
            return Err(TrainError::Config("no module matches --targets".into()));
        }
        if changed_base && model.int8().is_some() {
            // The packing was made from the weights before the residual: pack them again.
            let packed = model.compute();
            model.set_compute(Compute::F32)?;
            model.set_compute(packed)?;
        }
        let adapter = Adapter {
            config: lc,
            modules,
            provenance: Provenance::default(),
        };
        let set: AdapterSet = Arc::new(vec![(Arc::new(adapter.clone()), 1.0)]);
        Ok((model, Trainable::Lora { adapter, set }, params))
    }

    pub(super) fn init_full(base: &LoadedModel) -> Result<(Llama, Trainable, Vec<Param>)> {
        let mut w: Weights = base.model.weights.clone();
        let mut params = Vec::new();
        let mut mk = |name: String, t: &mut Tensor| -> Result<()> {
            // A fresh copy: the base's own tensors must stay bit-identical.
            let v = Var::from_tensor(&t.copy()?)?;
            *t = v.as_tensor().clone();
            params.push(Param {
                name,
                var: v,
                lr_mult: 1.0,
            });
            Ok(())
        };
        mk("model.embed_tokens.weight".into(), &mut w.embed)?;
        for (i, l) in w.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            mk(format!("{p}.input_layernorm.weight"), &mut l.attn_norm)?;
            mk(
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.mlp_norm,
            )?;
            for t in lowrank_lora::Target::ALL {
                mk(
                    format!("{p}.{}.{}.weight", t.parent(), t.peft_name()),
                    l.linear_mut(t),
                )?;
            }
            for (n, b) in [
                ("q_proj", &mut l.q_bias),
                ("k_proj", &mut l.k_bias),
                ("v_proj", &mut l.v_bias),
            ] {
                if let Some(b) = b {
                    mk(format!("{p}.self_attn.{n}.bias"), b)?;
                }
            }
        }
        mk("model.norm.weight".into(), &mut w.norm)?;
        if let Some(h) = w.lm_head.as_mut() {
            mk("lm_head.weight".into(), h)?;
        }
        let model = Llama::new(base.model.cfg.clone(), w, base.model.device())?;
        Ok((model, Trainable::Full, params))
    }
}
