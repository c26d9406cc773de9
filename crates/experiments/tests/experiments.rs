//! The experiment drivers on the tiny HF fixture: a sweep and a budget run end to end (train,
//! score, reports), the φ grid on constructed adapters, amplification on a constructed case.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use lowrank_experiments::analysis::{amplify, similarity, similarity_grid};
use lowrank_experiments::sweep::{budget, rank_for_budget, sweep};
use lowrank_experiments::{parse_target_sets, DataSpec, RunSettings};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Provenance, Target};
use lowrank_model::LoadedModel;
use lowrank_train::progress::silent;
use lowrank_train::TrainConfig;

fn tiny() -> LoadedModel {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/model"
    ));
    LoadedModel::load(p.to_str().unwrap(), &Device::Cpu).expect("tiny model")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-exp-lib-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn settings() -> RunSettings {
    RunSettings {
        base: TrainConfig {
            max_steps: Some(2),
            time_budget_s: 30.0,
            batch_size: 2,
            max_seq_len: 128,
            ..TrainConfig::default()
        },
        eval_batch: 8,
    }
}

fn spec() -> DataSpec {
    DataSpec {
        task: Some("sql".into()),
        n_train: 8,
        n_eval: 4,
        n_eval_loss: 2,
        ..DataSpec::default()
    }
}

#[test]
fn sweep_on_the_tiny_model_writes_table6() {
    let mut lm = tiny();
    let d = tmpdir("sweep");
    let p = spec().prepare(&d).unwrap();
    assert_eq!(p.examples.len(), 4);
    let sets = parse_target_sets(&["q|q,v".into()]).unwrap();
    let rep = sweep(
        &mut lm,
        &p,
        &settings(),
        &sets,
        &[1, 2],
        &d,
        &AtomicBool::new(false),
        &mut silent,
    )
    .unwrap();
    assert_eq!(rep.cells.len(), 4);
    assert_eq!(rep.rows, ["Wq", "Wq,Wv"]);
    for c in &rep.cells {
        assert_eq!(c.steps, 2);
        assert!(c.metric.is_finite() && (0.0..=100.0).contains(&c.metric));
        assert!(c.eval_loss_after.is_some());
        // Tiny model: q 64×64, v 32×64, two layers.
        let per_rank = if c.targets.len() == 1 {
            2 * 128
        } else {
            2 * (128 + 96)
        };
        assert_eq!(c.trainable_params, per_rank * c.rank);
        assert!(d.join(&c.dir).join("adapter_config.json").is_file());
    }
    let r = rep.recommended.clone().unwrap();
    let best = rep
        .cells
        .iter()
        .map(|c| c.metric)
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(r.metric, best);
    let ties: Vec<usize> = rep
        .cells
        .iter()
        .filter(|c| c.metric == best)
        .map(|c| c.rank)
        .collect();
    assert_eq!(
        r.rank,
        *ties.iter().min().unwrap(),
        "ties go to the smaller r"
    );
    let md = std::fs::read_to_string(d.join("report.md")).unwrap();
    assert!(md.contains("| Weight type | r=1 | r=2 | best r |"), "{md}");
    assert!(md.contains("| Wq | ") && md.contains("| Wq,Wv | "));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(v["cells"].as_array().unwrap().len(), 4);
    assert_eq!(v["recommended"]["rank"], r.rank);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn budget_picks_the_largest_rank_that_fits() {
    let mut lm = tiny();
    let d = tmpdir("budget");
    let shapes = lm.model.base_shapes();
    let sets = parse_target_sets(&["q|k|q,k,v,o".into()]).unwrap();
    // Two layers: Wq costs 2·(64+64) = 256 per rank, Wk 2·(32+64) = 192, all four 896.
    let n = 1000;
    let ranks: Vec<usize> = sets
        .iter()
        .map(|s| rank_for_budget(&shapes, s, n))
        .collect();
    assert_eq!(ranks, [3, 5, 1]);
    let p = spec().prepare(&d).unwrap();
    let rep = budget(
        &mut lm,
        &p,
        &settings(),
        &sets,
        n,
        &d,
        &AtomicBool::new(false),
        &mut silent,
    )
    .unwrap();
    let got: Vec<(usize, usize)> = rep
        .sweep
        .cells
        .iter()
        .map(|c| (c.rank, c.trainable_params))
        .collect();
    assert_eq!(got, [(3, 768), (5, 960), (1, 896)]);
    assert!(got.iter().all(|(_, p)| *p <= n));
    let md = std::fs::read_to_string(d.join("report.md")).unwrap();
    assert!(md.contains("| Rank r | 3 | 5 | 1 |"), "{md}");
    assert!(md.contains("| Params | 768 | 960 | 896 |"), "{md}");
    assert!(d.join("budget.json").is_file());
    let _ = std::fs::remove_dir_all(&d);
}

fn adapter(r: usize, a_of: impl Fn(usize) -> Tensor) -> Adapter {
    let mut modules = BTreeMap::new();
    for layer in 0..2 {
        let b = Tensor::randn(0f32, 1.0, (64, r), &Device::Cpu).unwrap();
        modules.insert(
            ModuleKey::new(layer, Target::Q),
            LoraModule {
                a: a_of(layer),
                b,
                scale: 2.0,
            },
        );
    }
    Adapter {
        config: LoraConfig::new(r, 2.0 * r as f64, &[Target::Q]),
        modules,
        provenance: Provenance::default(),
    }
}

#[test]
fn similarity_and_amplification_on_constructed_adapters() {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
    let a1 = adapter(8, |_| a.clone());
    // A 2-row subspace of A1's span: φ(8, j) = 1 for every j (one contains the other).
    let mix = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
    let a2 = adapter(2, |_| mix.matmul(&a).unwrap());
    let rep = similarity(&a1, &a2, Target::Q, None).unwrap();
    assert_eq!((rep.r1, rep.r2, rep.layers.len()), (8, 2, 2));
    assert!(
        (rep.grid[7][0] - 1.0).abs() < 1e-6 && (rep.grid[7][1] - 1.0).abs() < 1e-6,
        "{:?}",
        rep.grid
    );
    assert!(similarity(&a1, &a2, Target::V, None).is_err());
    // Orthogonal complements: rows of an orthonormal basis split between the two.
    let eye = Tensor::eye(64, candle_core::DType::F32, &dev).unwrap();
    let g = similarity_grid(&eye.narrow(0, 0, 4).unwrap(), &eye.narrow(0, 4, 3).unwrap()).unwrap();
    assert!(g.iter().flatten().all(|x| x.abs() < 1e-12));

    // Amplification: ΔW along W's own top singular direction ⇒ ‖UᵀWV‖ = σ1(W), factor ‖ΔW‖/σ1.
    let lm = tiny();
    let w = lm.model.weights.layers[0]
        .linear(Target::Q)
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let svd = lowrank_lora::linalg::svd(&lowrank_lora::Mat::from_tensor(&w).unwrap()).unwrap();
    let v1 = svd.vt.first_rows(1).to_tensor(&dev).unwrap(); // [1, 64]
    let u1 = svd.u.first_cols(1).to_tensor(&dev).unwrap(); // [64, 1]
    let mut modules = BTreeMap::new();
    modules.insert(
        ModuleKey::new(0, Target::Q),
        LoraModule {
            a: v1,
            b: (u1 * 3.0).unwrap(),
            scale: 0.5,
        },
    );
    let ad = Adapter {
        config: LoraConfig::new(1, 0.5, &[Target::Q]),
        modules,
        provenance: Provenance::default(),
    };
    let rep = amplify(&lm.model, &ad, None, None, &mut silent).unwrap();
    let row = &rep.rows[0];
    assert_eq!(row.module, "q_proj");
    assert!((row.delta_norm - 1.5).abs() < 1e-5, "{row:?}");
    assert!(
        (row.proj_delta_dirs - svd.s[0]).abs() < 1e-4 * svd.s[0],
        "{row:?}"
    );
    assert!(
        (row.proj_w_dirs - svd.s[0]).abs() < 1e-4 * svd.s[0],
        "{row:?}"
    );
    assert!((row.factor - 1.5 / svd.s[0]).abs() < 1e-4);
    assert!(row.proj_random < row.proj_w_dirs);
    assert!(rep.table().contains("| q_proj | 1 | 1 |"));
    assert!(amplify(&lm.model, &ad, Some(Target::V), None, &mut silent).is_err());
}
