//! Subspace similarity between two adapters (the LoRA paper's Figures 3–4) and feature
//! amplification of an adapter against its base (Table 7).

use lowrank_lora::analysis::amplification;
use lowrank_lora::linalg::{self, Mat};
use lowrank_lora::{Adapter, ModuleKey, Target};
use lowrank_model::Llama;
use serde::{Deserialize, Serialize};

use lowrank_train::progress::Event;

use crate::report::md_table;
use crate::runs::{err, ExpError, Result};

/// Parse `q_proj` or `q`.
pub fn parse_module(s: &str) -> Result<Target> {
    let full = match s.trim() {
        "q" | "k" | "v" | "o" | "gate" | "up" | "down" => format!("{}_proj", s.trim()),
        other => other.to_string(),
    };
    Target::from_peft_name(&full).ok_or_else(|| {
        ExpError(format!(
            "--module `{s}`: use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"
        ))
    })
}

/// φ(A1, A2, i, j) for every i ≤ r1, j ≤ r2: ‖U_iᵀ U_j‖²_F / min(i, j), U the top right-singular
/// vectors of each A (one SVD each, then prefix sums of the squared Gram matrix).
pub fn similarity_grid(
    a1: &candle_core::Tensor,
    a2: &candle_core::Tensor,
) -> Result<Vec<Vec<f64>>> {
    let m1 = Mat::from_tensor(a1)?;
    let m2 = Mat::from_tensor(a2)?;
    if m1.cols != m2.cols {
        return err(format!(
            "A matrices have {} and {} columns: not the same module",
            m1.cols, m2.cols
        ));
    }
    let v1 = linalg::svd(&m1)?.vt;
    let v2 = linalg::svd(&m2)?.vt;
    let (r1, r2) = (v1.rows, v2.rows);
    let g = v1.matmul(&v2.transpose())?;
    // p[i][j] = Σ_{a<i, b<j} g_ab²
    let mut p = vec![vec![0.0; r2 + 1]; r1 + 1];
    for i in 1..=r1 {
        for j in 1..=r2 {
            let x = g.get(i - 1, j - 1);
            p[i][j] = x * x + p[i - 1][j] + p[i][j - 1] - p[i - 1][j - 1];
        }
    }
    Ok((1..=r1)
        .map(|i| {
            (1..=r2)
                .map(|j| (p[i][j] / i.min(j) as f64).clamp(0.0, 1.0))
                .collect()
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerGrid {
    pub layer: usize,
    pub grid: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilarityReport {
    pub module: String,
    pub layers: Vec<usize>,
    pub r1: usize,
    pub r2: usize,
    /// grid[i-1][j-1] = φ(A1, A2, i, j), averaged over `layers`.
    pub grid: Vec<Vec<f64>>,
    pub per_layer: Vec<LayerGrid>,
}

/// φ grids for one module type over the layers both adapters adapt (or one `layer`).
pub fn similarity(
    a1: &Adapter,
    a2: &Adapter,
    module: Target,
    layer: Option<usize>,
) -> Result<SimilarityReport> {
    let layers_of = |a: &Adapter| -> Vec<usize> {
        a.modules
            .keys()
            .filter(|k| k.target == module)
            .map(|k| k.layer)
            .collect()
    };
    let (l1, l2) = (layers_of(a1), layers_of(a2));
    if l1.is_empty() || l2.is_empty() {
        let which = if l1.is_empty() {
            "the first"
        } else {
            "the second"
        };
        return err(format!(
            "{which} adapter does not adapt {module} (use --module)"
        ));
    }
    let layers: Vec<usize> = match layer {
        Some(l) => {
            if !l1.contains(&l) || !l2.contains(&l) {
                return err(format!("--layer {l}: not adapted by both adapters ({module} layers: {l1:?} and {l2:?})"));
            }
            vec![l]
        }
        None => l1.iter().copied().filter(|l| l2.contains(l)).collect(),
    };
    if layers.is_empty() {
        return err(format!("the adapters share no layer for {module}"));
    }
    let mut per_layer = Vec::new();
    for &l in &layers {
        let k = ModuleKey::new(l, module);
        let g = similarity_grid(&a1.modules[&k].a, &a2.modules[&k].a)
            .map_err(|e| ExpError(format!("layer {l} {module}: {e}")))?;
        per_layer.push(LayerGrid { layer: l, grid: g });
    }
    let (r1, r2) = (
        per_layer[0].grid.len(),
        per_layer[0].grid.first().map(|r| r.len()).unwrap_or(0),
    );
    if per_layer
        .iter()
        .any(|p| p.grid.len() != r1 || p.grid.first().map(|r| r.len()).unwrap_or(0) != r2)
    {
        return err(format!("{module}: the adapters' ranks differ between layers (rank_pattern); pick one with --layer"));
    }
    let n = per_layer.len() as f64;
    let grid = (0..r1)
        .map(|i| {
            (0..r2)
                .map(|j| per_layer.iter().map(|p| p.grid[i][j]).sum::<f64>() / n)
                .collect()
        })
        .collect();
    Ok(SimilarityReport {
        module: module.peft_name().into(),
        layers,
        r1,
        r2,
        grid,
        per_layer,
    })
}

/// Table 7 for one module type: means over the layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmplifyRow {
    pub module: String,
    pub rank: usize,
    pub layers: Vec<usize>,
    /// ‖ΔW‖_F
    pub delta_norm: f64,
    /// ‖W‖_F
    pub w_norm: f64,
    /// ‖UᵀWVᵀ‖_F with ΔW's, W's own and random top-r directions.
    pub proj_delta_dirs: f64,
    pub proj_w_dirs: f64,
    pub proj_random: f64,
    /// ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (ΔW's directions).
    pub factor: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmplifyReport {
    pub rows: Vec<AmplifyRow>,
    /// Per layer and module, unaveraged.
    pub per_module: Vec<AmplifyRow>,
}

impl AmplifyReport {
    pub fn table(&self) -> String {
        let header: Vec<String> = [
            "module",
            "r",
            "layers",
            "‖ΔW‖_F",
            "‖UᵀWVᵀ‖ (ΔW dirs)",
            "‖UᵀWVᵀ‖ (W dirs)",
            "‖UᵀWVᵀ‖ (random)",
            "‖W‖_F",
            "factor ‖ΔW‖/‖UᵀWVᵀ‖",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.module.clone(),
                    r.rank.to_string(),
                    r.layers.len().to_string(),
                    format!("{:.4}", r.delta_norm),
                    format!("{:.4}", r.proj_delta_dirs),
                    format!("{:.3}", r.proj_w_dirs),
                    format!("{:.4}", r.proj_random),
                    format!("{:.2}", r.w_norm),
                    format!("{:.3}", r.factor),
                ]
            })
            .collect();
        md_table(&header, &rows)
    }
}

/// Amplification of each adapted module (optionally one module type / layer) against `model`;
/// the modules analysed go to `progress`.
pub fn amplify(
    model: &Llama,
    adapter: &Adapter,
    module: Option<Target>,
    layer: Option<usize>,
    progress: &mut dyn FnMut(&Event),
) -> Result<AmplifyReport> {
    let keys: Vec<ModuleKey> = adapter
        .modules
        .keys()
        .copied()
        .filter(|k| module.is_none_or(|m| k.target == m) && layer.is_none_or(|l| k.layer == l))
        .collect();
    if keys.is_empty() {
        let what = match (module, layer) {
            (Some(m), Some(l)) => format!("{m} in layer {l}"),
            (Some(m), None) => m.to_string(),
            (None, Some(l)) => format!("layer {l}"),
            (None, None) => "any module".into(),
        };
        return err(format!("the adapter does not adapt {what}"));
    }
    progress(&Event::Begin {
        label: "amplify".into(),
        total: Some(keys.len()),
    });
    let mut per_module = Vec::new();
    for (done, k) in keys.iter().enumerate() {
        progress(&Event::Advance {
            done,
            item: Some(k.to_string()),
        });
        let m = &adapter.modules[k];
        let layer_w = model.weights.layers.get(k.layer).ok_or_else(|| {
            ExpError(format!(
                "the adapter adapts layer {} but the model has {}",
                k.layer, model.cfg.num_layers
            ))
        })?;
        let w = layer_w.linear(k.target).to_dtype(candle_core::DType::F32)?;
        let delta = m.delta()?;
        let r = m.rank();
        let a = amplification(&w, &delta, r).map_err(|e| ExpError(format!("{k}: {e}")))?;
        let w_norm = w.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
        per_module.push(AmplifyRow {
            module: k.target.peft_name().into(),
            rank: r,
            layers: vec![k.layer],
            delta_norm: a.delta_norm,
            w_norm,
            proj_delta_dirs: a.proj_norm_delta_dirs,
            proj_w_dirs: a.proj_norm_w_dirs,
            proj_random: a.proj_norm_random,
            factor: a.factor,
        });
    }
    progress(&Event::End);
    let mut rows = Vec::new();
    for t in Target::ALL {
        let ms: Vec<&AmplifyRow> = per_module
            .iter()
            .filter(|r| r.module == t.peft_name())
            .collect();
        if ms.is_empty() {
            continue;
        }
        let n = ms.len() as f64;
        let mean = |f: &dyn Fn(&AmplifyRow) -> f64| ms.iter().map(|r| f(r)).sum::<f64>() / n;
        let mut ranks: Vec<usize> = ms.iter().map(|r| r.rank).collect();
        ranks.dedup();
        rows.push(AmplifyRow {
            module: t.peft_name().into(),
            rank: ranks[0],
            layers: ms.iter().map(|r| r.layers[0]).collect(),
            delta_norm: mean(&|r| r.delta_norm),
            w_norm: mean(&|r| r.w_norm),
            proj_delta_dirs: mean(&|r| r.proj_delta_dirs),
            proj_w_dirs: mean(&|r| r.proj_w_dirs),
            proj_random: mean(&|r| r.proj_random),
            factor: mean(&|r| r.factor),
        });
    }
    Ok(AmplifyReport { rows, per_module })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn grid_matches_pairwise_similarity() {
        let dev = Device::Cpu;
        let a1 = Tensor::randn(0f32, 1., (4, 20), &dev).unwrap();
        let a2 = Tensor::randn(0f32, 1., (3, 20), &dev).unwrap();
        let g = similarity_grid(&a1, &a2).unwrap();
        assert_eq!((g.len(), g[0].len()), (4, 3));
        for i in 1..=4 {
            for j in 1..=3 {
                let want = lowrank_lora::subspace_similarity(&a1, &a2, i, j).unwrap();
                assert!((g[i - 1][j - 1] - want).abs() < 1e-9, "{i} {j}");
            }
        }
        assert!(parse_module("q").unwrap() == Target::Q && parse_module("zz").is_err());
    }
}
