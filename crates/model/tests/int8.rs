//! Int8 inference compute (`Compute::Int8`) on the embedded default model: close to HF's f32
//! reference, and every row of a mixed batch bitwise equal to the same sequence run alone.

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::{Tensor, D};
use common::*;
use lowrank_model::adapters::load_adapter;
use lowrank_model::quant::Compute;
use lowrank_model::{AdapterSet, ForwardOpts, KvCache, KvDtype, Llama, LogitsMode, SeqInput};

fn int8_model() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = smollm().model.clone();
        m.set_compute(Compute::Int8).unwrap();
        m
    })
}

/// The int8 model with f16 KV caches (what `--compute int8` serves with by default).
fn int8_model_f16_kv() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = int8_model().clone();
        m.set_kv_dtype(KvDtype::F16);
        m
    })
}

fn fixture_adapter() -> AdapterSet {
    let (a, _) = load_adapter(
        &smollm().model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
    Arc::new(vec![(Arc::new(a), 1.0)])
}

/// Mean next-token NLL of `ids` under `logits` [T, vocab].
fn mean_nll(logits: &Tensor, ids: &[u32]) -> f64 {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    let n = ids.len() - 1;
    (0..n)
        .map(|t| -(lp[t][ids[t + 1] as usize] as f64))
        .sum::<f64>()
        / n as f64
}

/// Mean KL(p_ref ‖ p) over positions.
fn mean_kl(reference: &Tensor, got: &Tensor) -> f64 {
    let a = candle_nn::ops::log_softmax(reference, D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = candle_nn::ops::log_softmax(got, D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let kl: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(&p, &q)| (p as f64).exp() * (p as f64 - q as f64))
                .sum::<f64>()
        })
        .sum();
    kl / a.len() as f64
}

/// Positions where the reference's top-1 leads its runner-up by more than `margin` logits
/// (rounding noise can only flip near-ties), and how many of them `got` also ranks first.
fn confident_top1(reference: &Tensor, got: &Tensor, margin: f32) -> (usize, usize) {
    let r = reference.to_vec2::<f32>().unwrap();
    let g = got.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let mut n = 0;
    let mut same = 0;
    for (row, &gi) in r.iter().zip(&g) {
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        let second = (0..row.len())
            .filter(|&i| i != best)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        if row[best] - row[second] > margin {
            n += 1;
            same += usize::from(best == gi as usize);
        }
    }
    (n, same)
}

#[test]
fn packing_the_q4_1_weights_is_exact() {
    let q = int8_model().int8().expect("packed");
    assert_eq!(q.rounded().0, 0, "Q4_1/Q8_0 blocks must be kept exactly");
}

#[test]
fn int8_logits_track_the_hf_reference() {
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    for (name, set) in [("base", None), ("adapter", Some(fixture_adapter()))] {
        let got = logits(int8_model(), &ids, set);
        let want = &st[name];
        let (nll_q, nll_ref) = (mean_nll(&got, &ids), mean_nll(want, &ids));
        let (n, same) = confident_top1(want, &got, 0.5);
        let kl = mean_kl(want, &got);
        eprintln!(
            "{name}: nll int8 {nll_q:.4} vs f32 {nll_ref:.4}; KL {kl:.5}; top-1 {same}/{n} where \
             the reference leads by > 0.5"
        );
        // Activation rounding costs < 2 % of the NLL and a KL of ~0.007 nats here (the
        // range of llama.cpp's Q8 activations); a broken kernel is off by orders of magnitude.
        assert!(kl < 0.02, "{name}: KL {kl}");
        assert!(
            (nll_q - nll_ref).abs() < 0.02 * nll_ref,
            "{name}: nll {nll_q} vs {nll_ref}"
        );
        assert!(n >= 5 && same == n, "{name}: top-1 {same}/{n}");
    }
}

#[test]
fn int8_mixed_batch_rows_equal_each_alone_bitwise() {
    mixed_batch_rows_equal_each_alone(int8_model());
}

/// The same with f16 KV caches: a row's cache is rounded when it is appended, whatever the
/// batch, so batched rows still equal the sequence run alone bit for bit.
#[test]
fn int8_f16_cache_rows_equal_each_alone_bitwise() {
    mixed_batch_rows_equal_each_alone(int8_model_f16_kv());
}

/// With the f16 cache, logits computed from the cache (a prefill, then one token per step)
/// stay within the int8 bounds of HF's f32 reference. (The f16 rounding alone is measured on
/// the f32 model, `f16_cache_costs_little_against_the_hf_reference`: under int8 activations any
/// perturbation flips roundings downstream, so the two caches differ by int8 noise.)
#[test]
fn int8_f16_cache_tracks_the_hf_reference() {
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    for (name, set) in [("base", None), ("adapter", Some(fixture_adapter()))] {
        let got = cached_logits(int8_model_f16_kv(), &ids, set);
        let want = &st[name];
        let (nll_q, nll_ref) = (mean_nll(&got, &ids), mean_nll(want, &ids));
        let (n, same) = confident_top1(want, &got, 0.5);
        let kl = mean_kl(want, &got);
        eprintln!(
            "{name}, f16 cache: nll {nll_q:.4} vs f32 {nll_ref:.4}; KL {kl:.5}; top-1 {same}/{n} \
             where the reference leads by > 0.5"
        );
        assert!(kl < 0.02, "{name}: KL {kl}");
        assert!(
            (nll_q - nll_ref).abs() < 0.02 * nll_ref,
            "{name}: nll {nll_q} vs {nll_ref}"
        );
        assert!(n >= 5 && same == n, "{name}: top-1 {same}/{n}");
    }
}

/// Sequences 0 and 1 decode their last token from a cache, sequence 2 is a prefill, all in
/// one batch with different adapters: each row's logits equal the sequence run alone, bit
/// for bit (alone: the same cached decode for 0 and 1, one uncached forward for 2). With f32
/// caches the cached decode also equals the uncached forward bitwise.
fn mixed_batch_rows_equal_each_alone(model: &Llama) {
    let m = smollm();
    let adapter = fixture_adapter();
    let half: AdapterSet = Arc::new(vec![(adapter[0].0.clone(), 0.5)]);
    let texts = [
        "The capital of France is",
        "Low-rank adapters are small matrices that",
        "1, 2, 3,",
    ];
    let sets = [Some(adapter.clone()), None, Some(half)];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| m.tok.encode(t).unwrap()).collect();
    let prefill = |i: usize| {
        let mut c = model.new_cache();
        let t = &ids[i];
        let mut s = [SeqInput {
            tokens: &t[..t.len() - 1],
            cache: Some(&mut c),
            adapters: sets[i].clone(),
            logits: LogitsMode::None,
        }];
        model.forward(&mut s, &mut ForwardOpts::infer()).unwrap();
        c
    };
    let decode_alone = |i: usize| {
        let mut c = prefill(i);
        let mut s = [SeqInput {
            tokens: &ids[i][ids[i].len() - 1..],
            cache: Some(&mut c),
            adapters: sets[i].clone(),
            logits: LogitsMode::Last,
        }];
        let out = model.forward(&mut s, &mut ForwardOpts::infer()).unwrap();
        out.into_iter().next().flatten().unwrap()
    };
    let mut caches: Vec<KvCache> = (0..2).map(prefill).collect();
    let (c0, c1) = caches.split_at_mut(1);
    let mut seqs = vec![
        SeqInput {
            tokens: &ids[0][ids[0].len() - 1..],
            cache: Some(&mut c0[0]),
            adapters: sets[0].clone(),
            logits: LogitsMode::Last,
        },
        SeqInput {
            tokens: &ids[2],
            cache: None,
            adapters: sets[2].clone(),
            logits: LogitsMode::Last,
        },
        SeqInput {
            tokens: &ids[1][ids[1].len() - 1..],
            cache: Some(&mut c1[0]),
            adapters: sets[1].clone(),
            logits: LogitsMode::Last,
        },
    ];
    let out = model.forward(&mut seqs, &mut ForwardOpts::infer()).unwrap();
    for (got, i) in out.into_iter().zip([0usize, 2, 1]) {
        let got = got.unwrap();
        let full = logits(model, &ids[i], sets[i].clone());
        let uncached = full.narrow(0, ids[i].len() - 1, 1).unwrap();
        let alone = if i == 2 {
            uncached.clone()
        } else {
            decode_alone(i)
        };
        let (d, same) = compare_logits(&alone, &got);
        assert!(
            d == 0.0 && same,
            "sequence {i}: max |Δ| = {d} against it alone"
        );
        if model.kv_dtype() == KvDtype::F32 {
            let (d, same) = compare_logits(&uncached, &got);
            assert!(
                d == 0.0 && same,
                "sequence {i}: max |Δ| = {d} against no cache"
            );
        }
    }
}

#[test]
fn int8_merged_copy_repacks_the_merged_weights() {
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let set = fixture_adapter();
    let merged = int8_model().merged(&set).unwrap();
    assert!(merged.int8().is_some());
    let got = logits(&merged, &ids, None);
    let nll = mean_nll(&got, &ids);
    let nll_ref = mean_nll(&st["merged"], &ids);
    let kl = mean_kl(&st["merged"], &got);
    eprintln!("merged int8: nll {nll:.4} vs f32 {nll_ref:.4}; KL {kl:.5}");
    assert!(kl < 0.02, "KL {kl}");
    assert!(
        (nll - nll_ref).abs() < 0.02 * nll_ref,
        "nll {nll} vs {nll_ref}"
    );
    // Merged weights are off the 4-bit grid, so they are rounded to 8 bits as well.
    let (n, same) = confident_top1(&st["merged"], &got, 0.5);
    assert!(n >= 5 && same == n, "top-1 {same}/{n}");
    // The base stays as it was (only the merged copy's matrices were repacked).
    let base = logits(int8_model(), &ids, None);
    assert!(mean_kl(&st["base"], &base) < 0.02);
}

/// The accuracy bounds and the bitwise batch isolation above hold on every int8 kernel path
/// this CPU can run (portable, AVX2, AVX-512 VNNI), not only on the one it picks by default.
#[test]
fn int8_tests_pass_on_every_kernel_path() {
    let ran = rerun_on_every_int8_path(&[
        "packing_the_q4_1_weights_is_exact",
        "int8_logits_track_the_hf_reference",
        "int8_mixed_batch_rows_equal_each_alone_bitwise",
        "int8_f16_cache_rows_equal_each_alone_bitwise",
        "int8_f16_cache_tracks_the_hf_reference",
        "int8_merged_copy_repacks_the_merged_weights",
    ]);
    // The portable path exists everywhere, so at least one other path ran (unless portable
    // was forced for this whole process, in which case every vector path the CPU has ran).
    assert!(
        !ran.is_empty() || lowrank_model::quant::supported_kernels().len() == 1,
        "no other int8 path ran"
    );
}

/// Loading for int8 packs each weight as it is read — Q4_1 projections straight from their
/// blocks, with q/k rows permuted to HF order — and never holds the f32 base. Its logits
/// follow the HF reference as closely as packing the f32 weights does, its exact weights
/// equal the f32 load's values (dequantized: the same numbers up to the last bit of d·q + m),
/// and its fingerprint is the f32 base's.
#[test]
fn packed_loading_matches_packing_the_f32_weights() {
    let p = lowrank_model::fetch::ensure_default(false).unwrap();
    let lm = lowrank_model::LoadedModel::load_for(
        p.to_str().unwrap(),
        &candle_core::Device::Cpu,
        Compute::Int8,
    )
    .unwrap();
    assert!(!lm.model.has_f32_weights());
    let q = lm.model.int8().expect("packed");
    assert_eq!(q.rounded().0, 0, "Q4_1/Q8_0 blocks must be kept exactly");
    assert_eq!(
        lm.model.fingerprint().unwrap(),
        smollm().model.fingerprint().unwrap()
    );
    // Every pack of layer 3 against the f32 weights it came from (q and k permuted).
    let lw = &smollm().model.weights.layers[3];
    for ts in lowrank_model::quant::PACKS {
        let got = q.pack(3, ts).unwrap().dequantize();
        let want: Vec<f32> = ts
            .iter()
            .flat_map(|t| {
                lw.linear(*t)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{ts:?}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "{ts:?}: packed weights off the file's by {worst}"
        );
    }
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let got = logits(&lm.model, &ids, None);
    let kl = mean_kl(&st["base"], &got);
    let (n, same) = confident_top1(&st["base"], &got, 0.5);
    assert!(kl < 0.02, "KL {kl}");
    assert!(n >= 5 && same == n, "top-1 {same}/{n}");
    // The f32 operations refuse cleanly instead of multiplying placeholders.
    let mut m = lm.model.clone();
    let e = m.set_compute(Compute::F32).unwrap_err().to_string();
    assert!(e.contains("int8 compute only"), "{e}");
}

/// Int4 on the default model packs exactly what int8 does: its Q4_1 projections are 4-bit
/// already (kept exactly) and its Q8_0 embedding is the tied head, which stays 8-bit
/// (`Bits::head`). So nothing is rounded and the logits are int8's, bitwise.
#[test]
fn int4_keeps_the_default_model_exact() {
    let p = lowrank_model::fetch::ensure_default(false).unwrap();
    let load = |c| {
        lowrank_model::LoadedModel::load_for(p.to_str().unwrap(), &candle_core::Device::Cpu, c)
            .unwrap()
    };
    let (lm, lm8) = (load(Compute::Int4), load(Compute::Int8));
    assert_eq!(lm.model.compute(), Compute::Int4);
    let q = lm.model.int8().expect("packed");
    assert_eq!(q.rounded().0, 0, "nothing rounded");
    let q8 = lm8.model.int8().expect("packed");
    for l in 0..lm.model.cfg.num_layers {
        for ts in lowrank_model::quant::PACKS {
            let (a, b) = (q.pack(l, ts).unwrap(), q8.pack(l, ts).unwrap());
            assert!(a.nibble_packed(), "layer {l} {ts:?}");
            assert!(a.dequantize() == b.dequantize(), "layer {l} {ts:?}");
        }
    }
    assert!(q.head().dequantize() == q8.head().dequantize(), "head");
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let (a, b) = (
        logits(&lm.model, &ids, None),
        logits(&lm8.model, &ids, None),
    );
    assert!(bits(&a) == bits(&b), "int4 logits differ from int8's");
}
