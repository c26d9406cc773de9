#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use lowrank_model::{AdapterSet, ForwardOpts, KvCache, Llama, LoadedModel, LogitsMode, SeqInput};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// The default model, loaded once per test binary (fetched if absent).
pub fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        lowrank_model::init_threads(None);
        let p = lowrank_model::fetch::ensure_default(false).expect("default model");
        LoadedModel::load(p.to_str().unwrap(), &Device::Cpu).expect("load")
    })
}

pub fn load_st(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// max |t|
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// (max |a-b|, argmax agree at every row)
pub fn compare_logits(a: &Tensor, b: &Tensor) -> (f32, bool) {
    let d = max_abs(&(a - b).unwrap());
    let am = a.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let bm = b.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    (d, am == bm)
}

/// Logits at every position of `ids` (no cache) under an optional adapter mixture.
pub fn logits(model: &Llama, ids: &[u32], set: Option<AdapterSet>) -> Tensor {
    let mut s = [SeqInput {
        tokens: ids,
        cache: None,
        adapters: set,
        logits: LogitsMode::All,
    }];
    model
        .forward(&mut s, &mut ForwardOpts::infer())
        .unwrap()
        .pop()
        .flatten()
        .unwrap()
}

/// Logits at every position of `ids` as a server computes them: the first half prefilled
/// into a cache of the model's KV type, then one token per step from that cache.
pub fn cached_logits(model: &Llama, ids: &[u32], set: Option<AdapterSet>) -> Tensor {
    let mut cache = model.new_cache();
    let split = ids.len() / 2;
    let mut rows = Vec::new();
    let mut run = |tokens: &[u32], cache: &mut KvCache, mode: LogitsMode| {
        let mut s = [SeqInput {
            tokens,
            cache: Some(cache),
            adapters: set.clone(),
            logits: mode,
        }];
        let out = model.forward(&mut s, &mut ForwardOpts::infer()).unwrap();
        rows.push(out.into_iter().next().flatten().unwrap());
    };
    run(&ids[..split], &mut cache, LogitsMode::All);
    for i in split..ids.len() {
        run(&ids[i..i + 1], &mut cache, LogitsMode::Last);
    }
    assert_eq!(cache.len(), ids.len());
    Tensor::cat(&rows, 0).unwrap()
}

#[path = "support/int8_paths.rs"]
mod int8_paths;
#[allow(unused_imports)] // used by the int8 test binary only
pub use int8_paths::rerun_on_every_int8_path;
