//! `merge` and `inspect`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use lowrank_experiments::report::human_bytes;
use lowrank_lora::analysis::module_stats;

use super::{AdapterArgs, ModelArg};

#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Output: a HF model directory (safetensors) or a .gguf file.
    #[arg(long)]
    pub out: PathBuf,
    /// safetensors (a HF model directory) or gguf (one file; f16 or f32 tensors).
    #[arg(long, default_value = "safetensors")]
    pub format: String,
    /// Tensor type for --format gguf: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub gguf_type: String,
}

pub fn merge(a: MergeArgs, device: &Device) -> Result<()> {
    if a.adapters.adapter.is_empty() {
        anyhow::bail!("--adapter: give at least one adapter to merge");
    }
    if !matches!(a.format.as_str(), "safetensors" | "gguf") {
        anyhow::bail!(
            "--format: `{}` is not supported (safetensors or gguf)",
            a.format
        );
    }
    let lm = super::load(&a.model, device)?;
    let set = a.adapters.mixture(&lm)?.expect("non-empty");
    let merged = lm.model.merged(&set)?;
    match a.format.as_str() {
        "safetensors" => lowrank_model::export::save_hf_dir(&merged, &lm.tok, &a.out)
            .with_context(|| format!("writing {}", a.out.display()))?,
        _ => {
            let src = match &lm.source {
                lowrank_model::ModelSource::Gguf(p) => Some(p.as_path()),
                _ => None,
            };
            lowrank_model::export::save_gguf(&merged, &lm.tok, src, &a.out, &a.gguf_type)
                .with_context(|| format!("writing {}", a.out.display()))?
        }
    }
    eprintln!("merged model written to {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// The PEFT adapter directory to inspect.
    pub adapter: PathBuf,
    /// The base to check the adapter against (shapes, fingerprint, sizes).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Per-module ‖ΔW‖_F, singular values and effective rank.
    #[arg(long)]
    pub svd: bool,
}

pub fn inspect(a: InspectArgs, device: &Device) -> Result<()> {
    let lm = super::load(
        &ModelArg {
            model: a.model.clone(),
        },
        device,
    )?;
    let (adapter, status) = lowrank_model::adapters::load_adapter(&lm.model, &a.adapter, true)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let disk = lowrank_train::trainer::dir_bytes(&a.adapter);
    let base = lm.file_bytes;
    let params = adapter.num_params();
    let targets = adapter.config.targets().map_err(anyhow::Error::msg)?;
    let mut modules = Vec::new();
    let mut by_target: std::collections::BTreeMap<String, (usize, usize, f64, f64)> =
        Default::default();
    for (k, m) in &adapter.modules {
        let e = by_target.entry(k.target.to_string()).or_insert((
            0,
            m.rank(),
            adapter.config.alpha_for(k.layer, k.target),
            m.scale,
        ));
        e.0 += 1;
        if a.svd {
            let s = module_stats(m)?;
            modules.push(serde_json::json!({
                "module": k.to_string(), "rank": m.rank(), "scale": m.scale,
                "delta_frobenius": s.frobenius,
                "singular_values": s.singular_values,
                "effective_rank_threshold": s.effective_rank_threshold,
                "effective_rank_entropy": s.effective_rank_entropy,
            }));
        }
    }
    let fp = match &status {
        lowrank_lora::adapter::FingerprintStatus::Match => "match".to_string(),
        lowrank_lora::adapter::FingerprintStatus::Absent => {
            "absent (not recorded; shapes checked)".to_string()
        }
        lowrank_lora::adapter::FingerprintStatus::Mismatch { adapter, base } => {
            format!("MISMATCH: adapter {adapter} vs base {base}")
        }
    };
    let out = serde_json::json!({
        "adapter": a.adapter.display().to_string(),
        "targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "layers": adapter.modules.keys().map(|k| k.layer).collect::<std::collections::BTreeSet<_>>().len(),
        "modules": by_target.iter().map(|(t, (n, r, alpha, s))| serde_json::json!({"target": t, "count": n, "r": r, "alpha": alpha, "scale": s})).collect::<Vec<_>>(),
        "use_rslora": adapter.config.use_rslora,
        "trainable_parameters": params,
        "base_parameters": lm.model.weights.num_params(),
        "percent_of_base": 100.0 * params as f64 / lm.model.weights.num_params() as f64,
        "adapter_bytes": disk,
        "base_bytes": base,
        "hundred_tasks": format!(
            "100 tasks: base + 100 × adapter = {} instead of 100 × base = {}",
            human_bytes((base + 100 * disk) as f64), human_bytes((100 * base) as f64)
        ),
        "fingerprint": fp,
        "provenance": {
            "base_fingerprint": adapter.provenance.base_fingerprint,
            "lowrank_version": adapter.provenance.lowrank_version,
            "created": adapter.provenance.created,
        },
        "svd": if a.svd { serde_json::Value::Array(modules) } else { serde_json::Value::Null },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
