//! Adapters on the real base against PEFT's logits: unmerged, merged, merged-and-exported.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::*;
use lowrank_model::adapters::load_adapter;
use lowrank_model::LoadedModel;

#[test]
fn peft_fixture_adapter_unmerged_merged_and_gguf_export() {
    let m = smollm();
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let (a, _) = load_adapter(
        &m.model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
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
    let (a, _) = load_adapter(
        &m.model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
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
