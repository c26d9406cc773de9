//! `merge`, `export` and `inspect`.

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
    /// --format gguf in one of llama.cpp's block formats (q8_0, q4_0, q4_1): the merged model
    /// at its base's size and speed (norms stay f32). Overrides --gguf-type.
    #[arg(long)]
    pub quant: Option<String>,
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
    let gguf_type = match (&a.quant, a.format.as_str()) {
        (Some(q), "gguf") if matches!(q.as_str(), "q8_0" | "q4_0" | "q4_1") => q.clone(),
        (Some(q), "gguf") => anyhow::bail!("--quant `{q}`: use q8_0, q4_0 or q4_1"),
        (Some(_), _) => anyhow::bail!("--quant applies to --format gguf"),
        (None, _) => a.gguf_type.clone(),
    };
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
            lowrank_model::export::save_gguf(&merged, &lm.tok, src, &a.out, &gguf_type)
                .with_context(|| format!("writing {}", a.out.display()))?;
            if a.quant.is_some() {
                let keys: Vec<_> = set
                    .iter()
                    .flat_map(|(ad, _)| ad.modules.keys().copied())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let pairs: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        (
                            lm.model.weights.layers[k.layer].linear(k.target),
                            merged.weights.layers[k.layer].linear(k.target),
                        )
                    })
                    .collect();
                let (kept, noise) = lowrank_model::export::requant_retention(&pairs, &gguf_type)?;
                eprintln!(
                    "{gguf_type}: the merged weights keep {:.0} % of the adapters' change (rounding \
                     error {noise:.2}× the change)",
                    kept * 100.0
                );
                if kept < 0.8 || noise > 2.0 {
                    eprintln!(
                        "warning: {gguf_type} does not hold this adapter faithfully (the delta is \
                         small against a {gguf_type} step): expect the merged model to lose much of \
                         what the adapter learned. llama.cpp runs the adapter exactly over the base \
                         GGUF with `lowrank export ADAPTER --format gguf-lora` (`--lora`, or Ollama's \
                         ADAPTER), or merge with --quant q8_0"
                    );
                }
            }
        }
    }
    eprintln!("merged model written to {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// The PEFT adapter directory (or object store URL) to export.
    pub adapter: PathBuf,
    /// The base the adapter belongs to (checked by shapes and fingerprint; its q/k row order
    /// and architecture go into the file).
    #[command(flatten)]
    pub model: ModelArg,
    /// gguf-lora: llama.cpp's LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora OUT`), with an
    /// Ollama `Modelfile` beside it (`FROM` the base, `ADAPTER` the file).
    #[arg(long, default_value = "gguf-lora")]
    pub format: String,
    /// The output file (.gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// Export even if the adapter's recorded base fingerprint differs from this base.
    #[arg(long)]
    pub force: bool,
}

pub fn export(a: ExportArgs, device: &Device) -> Result<()> {
    if a.format != "gguf-lora" {
        anyhow::bail!("--format: `{}` is not supported (gguf-lora)", a.format);
    }
    let lm = super::load(&a.model, device)?;
    let dir = super::local_adapter_dir(&a.adapter)?;
    let (adapter, _) = lowrank_model::adapters::load_adapter(&lm.model, &dir, a.force)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    lowrank_model::export::save_gguf_lora(&lm.model, &adapter, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    // Ollama: FROM the base (a GGUF file or a safetensors directory), ADAPTER beside it.
    let base = match &lm.source {
        lowrank_model::ModelSource::Gguf(p) => p.clone(),
        lowrank_model::ModelSource::HfDir(d) => d.clone(),
    };
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    let file = a
        .out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let modelfile = format!(
        "# Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME`.\n\
         FROM {}\nADAPTER ./{file}\n",
        base.display()
    );
    let dir = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mf = dir.join("Modelfile");
    lowrank_lora::peft::write_file_atomically(&mf, modelfile.as_bytes())
        .with_context(|| format!("writing {}", mf.display()))?;
    eprintln!(
        "llama.cpp LoRA adapter written to {} ({} modules); Ollama Modelfile: {}",
        a.out.display(),
        adapter.modules.len(),
        mf.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// The PEFT adapter directory (or object store URL) to inspect.
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
    let dir = super::local_adapter_dir(&a.adapter)?;
    let (adapter, status) = lowrank_model::adapters::load_adapter(&lm.model, &dir, true)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let disk = lowrank_train::trainer::dir_bytes(&dir);
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
