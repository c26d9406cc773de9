//! Adapters on the real base against PEFT's logits: unmerged, merged, merged-and-exported.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::*;
use lowrank_model::adapters::load_adapter;
use lowrank_model::{ForwardOpts, LoadedModel, LogitsMode, SeqInput};

/// PEFT's adapter of the fixture (every projection of every layer) for the default model.
fn fixture_adapter() -> lowrank_lora::Adapter {
    let dir = fixtures().join("smollm2-135m/peft_adapter");
    load_adapter(&smollm().model, &dir, false).unwrap().0
}

#[test]
fn peft_fixture_adapter_unmerged_merged_and_gguf_export() {
    let m = smollm();
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let a = fixture_adapter();
    assert_eq!(a.modules.len(), 210);
    let set = Arc::new(vec![(Arc::new(a), 1.0)]);
    let got = logits(&m.model, &ids, Some(set.clone()));
    let (d, same) = compare_logits(&got, &st["adapter"]);
    assert!(d <= 1e-3 && same, "adapter: max |Δ| = {d}");
    let merged = m.model.merged(&set).unwrap();
    let got_m = logits(&merged, &ids, None);
    let (d, same) = compare_logits(&got_m, &st["merged"]);
    assert!(d <= 1e-3 && same, "merged: max |Δ| = {d}");
    // The base is untouched by merging (the copy owns the merged tensors).
    let (d, _) = compare_logits(&logits(&m.model, &ids, None), &st["base"]);
    assert!(d <= 1e-3);
    // Export as GGUF (llama.cpp's q/k layout, f32), load back: equals the unmerged adapter.
    let dir = std::env::temp_dir().join(format!("lowrank-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("merged.gguf");
    let src = lowrank_model::fetch::ensure_default(false).unwrap();
    lowrank_model::export::save_gguf(&merged, &m.tok, Some(&src), &out, "f32").unwrap();
    let back = LoadedModel::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let (d, same) = compare_logits(&logits(&back.model, &ids, None), &got);
    assert!(d <= 1e-3 && same, "gguf round trip: max |Δ| = {d}");
    assert_eq!(
        back.tok.encode("Hello world!").unwrap(),
        vec![19556, 905, 17]
    );
    // And as a HF directory.
    let hf = dir.join("hf");
    lowrank_model::export::save_hf_dir(&merged, &m.tok, &hf).unwrap();
    let back = LoadedModel::load(hf.to_str().unwrap(), &Device::Cpu).unwrap();
    let (d, same) = compare_logits(&logits(&back.model, &ids, None), &got);
    assert!(d <= 1e-3 && same, "hf dir round trip: max |Δ| = {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_b_adapter_is_bit_identical_and_mixtures_add() {
    let m = smollm();
    let ids = m
        .tok
        .encode("Serving many adapters from one base model saves memory.")
        .unwrap();
    let a = fixture_adapter();
    let mut zero = a.clone();
    for md in zero.modules.values_mut() {
        md.b = md.b.zeros_like().unwrap();
    }
    let base = logits(&m.model, &ids, None);
    let z = logits(&m.model, &ids, Some(Arc::new(vec![(Arc::new(zero), 1.0)])));
    let d = (&base - &z)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        d, 0.0,
        "an adapter with B = 0 must leave logits bit-identical"
    );
    // A 0.5/0.5 mixture of one adapter equals that adapter at scale 1 (up to rounding).
    let aa = Arc::new(a);
    let full = logits(&m.model, &ids, Some(Arc::new(vec![(aa.clone(), 1.0)])));
    let half = logits(
        &m.model,
        &ids,
        Some(Arc::new(vec![(aa.clone(), 0.5), (aa, 0.5)])),
    );
    let (d, same) = compare_logits(&full, &half);
    assert!(d < 1e-3 && same, "{d}");
}

#[test]
fn tiny_hf_adapter_matches_peft() {
    let dir = fixtures().join("tiny-llama-hf/model");
    let lm = LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let st = load_st(fixtures().join("tiny-llama-hf/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let (a, _) = load_adapter(
        &lm.model,
        &fixtures().join("tiny-llama-hf/peft_adapter"),
        false,
    )
    .unwrap();
    let got = logits(&lm.model, &ids, Some(Arc::new(vec![(Arc::new(a), 1.0)])));
    let (d, same) = compare_logits(&got, &st["adapter"]);
    assert!(d <= 1e-3 && same, "max |Δ| = {d}");
}

/// Groups of one batch whose adapters adapt different projections (q only; down only; both
/// as a two-adapter mixture): every row gets exactly its own adapters' projections. Each row
/// equals its sequence run alone, bitwise; the mixture equals one adapter holding both
/// module sets (the per-group target skip must look at every adapter of a mixture); and each
/// part alone moves the logits (neither is skipped).
#[test]
fn groups_adapting_different_projections_each_get_theirs() {
    use lowrank_lora::Target;
    let m = smollm();
    let ids = m
        .tok
        .encode("Each sequence is served under its own adapter.")
        .unwrap();
    let a = fixture_adapter();
    let only = |ts: &[Target]| {
        let mut p = a.clone();
        p.modules.retain(|k, _| ts.contains(&k.target));
        Arc::new(p)
    };
    let (q, down, both) = (
        only(&[Target::Q]),
        only(&[Target::Down]),
        only(&[Target::Q, Target::Down]),
    );
    let sets = [
        Some(Arc::new(vec![(q.clone(), 1.0)])),
        Some(Arc::new(vec![(down.clone(), 1.0)])),
        Some(Arc::new(vec![(q, 1.0), (down, 1.0)])),
        None,
    ];
    let mut seqs: Vec<SeqInput> = sets
        .iter()
        .map(|s| SeqInput {
            tokens: &ids,
            cache: None,
            adapters: s.clone(),
            logits: LogitsMode::All,
        })
        .collect();
    let batch = m
        .model
        .forward(&mut seqs, &mut ForwardOpts::infer())
        .unwrap();
    let base = logits(&m.model, &ids, None);
    for (i, (s, got)) in sets.iter().zip(&batch).enumerate() {
        let alone = logits(&m.model, &ids, s.clone());
        let got = got.as_ref().unwrap();
        let (d, _) = compare_logits(got, &alone);
        assert_eq!(d, 0.0, "sequence {i} differs in the batch from alone");
        let (moved, _) = compare_logits(got, &base);
        assert_eq!(
            moved > 1e-3,
            s.is_some(),
            "sequence {i}: |Δ| from base {moved}"
        );
    }
    let one = logits(&m.model, &ids, Some(Arc::new(vec![(both, 1.0)])));
    let (d, same) = compare_logits(batch[2].as_ref().unwrap(), &one);
    assert!(
        d < 1e-4 && same,
        "mixture of q and down vs one adapter of both: {d}"
    );
}
