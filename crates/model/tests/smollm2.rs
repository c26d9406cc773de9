//! The embedded default model against HF transformers' outputs (tests/fixtures).

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use common::*;
use lowrank_model::chat::ChatMessage;
use lowrank_model::generate::{generate, greedy_batch, SamplingParams};
use lowrank_model::{ForwardOpts, KvCache, LogitsMode, SeqInput};
use serde_json::Value;

fn cases() -> Value {
    let p = fixtures().join("smollm2-135m/text_cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn logits_all(tokens: &[u32]) -> Tensor {
    let m = smollm();
    let mut seqs = [SeqInput {
        tokens,
        cache: None,
        adapters: None,
        logits: LogitsMode::All,
    }];
    m.model
        .forward(&mut seqs, &mut ForwardOpts::infer())
        .unwrap()
        .pop()
        .flatten()
        .unwrap()
}

#[test]
fn tokenize_cases_match_hf() {
    let m = smollm();
    for c in cases()["tokenize"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(m.tok.encode(text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn chat_template_renders_identically() {
    let m = smollm();
    for c in cases()["chat"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let rendered = m.tok.render_chat(&msgs, true).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap());
        let want: Vec<u32> = c["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(m.tok.encode(&rendered).unwrap(), want);
    }
}

#[test]
fn logits_match_hf_base() {
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let got = logits_all(&ids);
    let (d, same_argmax) = compare_logits(&got, &st["base"]);
    assert!(d <= 1e-3, "max |Δ| = {d}");
    assert!(same_argmax);
}

#[test]
fn greedy_reproduces_hf() {
    let m = smollm();
    let eos = m.eos_ids();
    for c in cases()["chat"].as_array().unwrap() {
        let prompt: Vec<u32> = c["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = c["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let params = SamplingParams {
            max_tokens: 24,
            ..Default::default()
        };
        let g = generate(&m.model, &m.tok, &prompt, None, &params, &eos, &mut |_| {}).unwrap();
        assert_eq!(g.ids, want);
        // Batched greedy decoding gives the same tokens (EOS excluded there).
        let b = greedy_batch(&m.model, std::slice::from_ref(&prompt), &[None], 24, &eos).unwrap();
        let want_no_eos: Vec<u32> = want.iter().copied().filter(|t| !eos.contains(t)).collect();
        assert_eq!(b[0], want_no_eos);
    }
}

#[test]
fn batch_of_different_lengths_equals_each_alone() {
    let m = smollm();
    let prompts: Vec<Vec<u32>> = [
        "Hello world!",
        "The quick brown fox jumps over the lazy dog.",
        "SELECT name FROM users WHERE id = 7;",
    ]
    .iter()
    .map(|t| m.tok.encode(t).unwrap())
    .collect();
    let mut seqs: Vec<SeqInput> = prompts
        .iter()
        .map(|p| SeqInput {
            tokens: p,
            cache: None,
            adapters: None,
            logits: LogitsMode::All,
        })
        .collect();
    let batched = m
        .model
        .forward(&mut seqs, &mut ForwardOpts::infer())
        .unwrap();
    for (p, b) in prompts.iter().zip(batched) {
        let alone = logits_all(p);
        let (d, same) = compare_logits(&alone, &b.unwrap());
        assert!(d <= 1e-4 && same, "max |Δ| = {d}");
    }
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let m = smollm();
    let ids = m
        .tok
        .encode("LoRA freezes the pretrained weights and trains a low-rank update.")
        .unwrap();
    let full = logits_all(&ids);
    let mut cache = KvCache::new(m.model.cfg.num_layers);
    let split = 5;
    let mut rows = Vec::new();
    {
        let mut s = [SeqInput {
            tokens: &ids[..split],
            cache: Some(&mut cache),
            adapters: None,
            logits: LogitsMode::All,
        }];
        rows.push(
            m.model
                .forward(&mut s, &mut ForwardOpts::infer())
                .unwrap()
                .pop()
                .flatten()
                .unwrap(),
        );
    }
    for i in split..ids.len() {
        let mut s = [SeqInput {
            tokens: &ids[i..i + 1],
            cache: Some(&mut cache),
            adapters: None,
            logits: LogitsMode::Last,
        }];
        rows.push(
            m.model
                .forward(&mut s, &mut ForwardOpts::infer())
                .unwrap()
                .pop()
                .flatten()
                .unwrap(),
        );
    }
    let inc = Tensor::cat(&rows, 0).unwrap();
    let (d, same) = compare_logits(&full, &inc);
    assert!(d <= 1e-4 && same, "max |Δ| = {d}");
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let m = smollm();
    let n = m.model.cfg.max_position_embeddings + 1;
    let ids = vec![42u32; n];
    let err = generate(
        &m.model,
        &m.tok,
        &ids,
        None,
        &SamplingParams::default(),
        &[2],
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("does not fit the context"),
        "{err}"
    );
    let _ = Arc::new(0);
}

/// One forward mixing three decode steps (caches of different lengths, taking the fused
/// batched-decode attention) with a prefill: every sequence's logits equal its own full
/// forward.
#[test]
fn batched_decode_mixed_with_prefill_equals_each_alone() {
    let m = smollm();
    let texts = [
        "The capital of France is",
        "Low-rank adapters are small matrices that",
        "1, 2, 3,",
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| m.tok.encode(t).unwrap()).collect();
    let mut caches: Vec<KvCache> = (0..2)
        .map(|_| KvCache::new(m.model.cfg.num_layers))
        .collect();
    // Prefill all but the last token of the first two prompts, each alone.
    for (c, t) in caches.iter_mut().zip(&ids) {
        let mut s = [SeqInput {
            tokens: &t[..t.len() - 1],
            cache: Some(c),
            adapters: None,
            logits: LogitsMode::None,
        }];
        m.model.forward(&mut s, &mut ForwardOpts::infer()).unwrap();
    }
    let (c0, c1) = caches.split_at_mut(1);
    let mut seqs = vec![
        SeqInput {
            tokens: &ids[0][ids[0].len() - 1..],
            cache: Some(&mut c0[0]),
            adapters: None,
            logits: LogitsMode::Last,
        },
        SeqInput {
            tokens: &ids[2],
            cache: None,
            adapters: None,
            logits: LogitsMode::Last,
        },
        SeqInput {
            tokens: &ids[1][ids[1].len() - 1..],
            cache: Some(&mut c1[0]),
            adapters: None,
            logits: LogitsMode::Last,
        },
    ];
    let out = m
        .model
        .forward(&mut seqs, &mut ForwardOpts::infer())
        .unwrap();
    for (got, i) in out.into_iter().zip([0usize, 2, 1]) {
        let full = logits_all(&ids[i]);
        let want = full.narrow(0, ids[i].len() - 1, 1).unwrap();
        let (d, same) = compare_logits(&want, &got.unwrap());
        assert!(d <= 1e-4 && same, "sequence {i}: max |Δ| = {d}");
    }
}

/// What rounding K and V to f16 alone costs (f32 compute, so nothing else is rounded): logits
/// decoded from an f16 cache (a prefill, then one token per step) stay close to HF's f32
/// reference, with the same arg-max everywhere, while the f32 cache matches it as tightly as
/// the uncached forward does.
#[test]
fn f16_cache_costs_little_against_the_hf_reference() {
    let st = load_st(fixtures().join("smollm2-135m/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let mut m16 = smollm().model.clone();
    m16.set_kv_dtype(lowrank_model::KvDtype::F16);
    let f32_kv = cached_logits(&smollm().model, &ids, None);
    let f16_kv = cached_logits(&m16, &ids, None);
    let want = &st["base"];
    let (d32, same32) = compare_logits(want, &f32_kv);
    let (d16, same16) = compare_logits(want, &f16_kv);
    eprintln!("max |Δ logit| against HF: f32 cache {d32:.2e}, f16 cache {d16:.2e}");
    assert!(d32 <= 1e-3 && same32, "f32 cache: max |Δ| = {d32}");
    // 11 significant bits of K and V: logits move by ~1e-2 at most on this model, which
    // keeps every arg-max; a cache read with the wrong element type is off by whole logits.
    assert!(d16 <= 5e-2 && same16, "f16 cache: max |Δ| = {d16}");
    assert!(d16 > d32, "the f16 cache rounded nothing: {d16} vs {d32}");
}
