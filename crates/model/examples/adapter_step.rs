//! What distinct adapters cost a batched decode step, without the server around it:
//! `cargo run --release -p lowrank-model --example adapter_step -- MODEL [STEPS]`.
//!
//! 32 sequences (a 64-token prompt each, f16 KV cache, int8 compute) decode one token per step
//! under r = 8 q,v adapters: (a) one adapter shared by every sequence, (b) each sequence its own
//! adapter out of 100, a new mix every step as requests come and go. The two alternate step by
//! step, so a drifting machine speed falls on both alike; prints each one's median step time
//! and (a)/(b), the decode-rate ratio of `bench serve`'s "100 adapters over one".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Provenance, Target};
use lowrank_model::quant::Compute;
use lowrank_model::{AdapterSet, ForwardOpts, KvDtype, LoadedModel, LogitsMode, SeqInput};

const STREAMS: usize = 32;
const ADAPTERS: usize = 100;
const PROMPT: usize = 64;

fn adapter(model: &lowrank_model::Llama, seed: u64) -> candle_core::Result<Adapter> {
    let shapes = model.base_shapes();
    let targets = [Target::Q, Target::V];
    let config = LoraConfig::new(8, 16.0, &targets);
    let mut state = seed.wrapping_mul(6364136223846793005) | 1;
    let mut draw = |n: usize, bound: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    };
    let mut modules = BTreeMap::new();
    for l in 0..shapes.num_layers {
        for t in targets {
            let (out, inp) = shapes.dims_of(t).expect("q and v exist");
            let a = Tensor::from_vec(draw(8 * inp, 0.04), (8, inp), &Device::Cpu)?;
            let b = Tensor::from_vec(draw(out * 8, 0.05), (out, 8), &Device::Cpu)?;
            let scale = config.scale_for(l, t);
            modules.insert(ModuleKey::new(l, t), LoraModule { a, b, scale });
        }
    }
    Ok(Adapter {
        config,
        modules,
        provenance: Provenance::default(),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let spec = args.get(1).ok_or("usage: adapter_step MODEL [STEPS]")?;
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let lm = LoadedModel::load_for(spec, &Device::Cpu, Compute::Int8)?;
    let mut model = lm.model;
    model.set_kv_dtype(KvDtype::F16);
    let sets: Vec<AdapterSet> = (0..ADAPTERS as u64)
        .map(|i| Ok(Arc::new(vec![(Arc::new(adapter(&model, i + 1)?), 1.0)])))
        .collect::<candle_core::Result<_>>()?;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 100 + i * 7).collect();
    // Per scenario: its own 32 caches, filled by one prefill.
    let mut caches: Vec<Vec<_>> = (0..2)
        .map(|_| (0..STREAMS).map(|_| model.new_cache()).collect())
        .collect();
    let pick = |shared: bool, row: usize, step: usize| match shared {
        true => sets[0].clone(),
        false => sets[(row + 7 * step) % ADAPTERS].clone(),
    };
    let mut times = [Vec::new(), Vec::new()];
    for step in 0..=steps {
        for (sc, shared) in [true, false].into_iter().enumerate() {
            let toks: Vec<Vec<u32>> = (0..STREAMS)
                .map(|r| match step {
                    0 => prompt.clone(),
                    _ => vec![(step * 31 + r) as u32 % 1000 + 50],
                })
                .collect();
            let mut seqs: Vec<SeqInput> = caches[sc]
                .iter_mut()
                .zip(&toks)
                .enumerate()
                .map(|(r, (c, t))| SeqInput {
                    tokens: t,
                    cache: Some(c),
                    adapters: Some(pick(shared, r, step)),
                    logits: LogitsMode::Last,
                })
                .collect();
            let t = Instant::now();
            let out = model.forward(&mut seqs, &mut ForwardOpts::infer())?;
            std::hint::black_box(out);
            if step > 0 {
                times[sc].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, own) = (median(&mut times[0]), median(&mut times[1]));
    println!("median decode step, {STREAMS} streams, {steps} steps each, alternated:");
    println!("  one adapter shared:          {one:7.2} ms");
    println!("  each its own (of {ADAPTERS}):      {own:7.2} ms");
    println!("  decode rate, own over one:   {:.3}x", one / own);
    Ok(())
}
