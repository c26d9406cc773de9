//! The HF safetensors path (bf16, untied head, HF names, un-permuted q/k) on the tiny fixture,
//! and a tiny random model built here: shapes, masks, KV cache.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowrank_model::config::ModelConfig;
use lowrank_model::weights::{LayerWeights, Weights};
use lowrank_model::{ForwardOpts, KvCache, Llama, LoadedModel, LogitsMode, SeqInput};

#[test]
fn tiny_hf_logits_match_transformers() {
    let dir = fixtures().join("tiny-llama-hf/model");
    let lm = LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert!(!lm.model.cfg.tie_word_embeddings);
    assert_eq!(lm.model.cfg.rope_theta, 10000.0);
    let st = load_st(fixtures().join("tiny-llama-hf/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let mut s = [SeqInput {
        tokens: &ids,
        cache: None,
        adapters: None,
        logits: LogitsMode::All,
    }];
    let got = lm
        .model
        .forward(&mut s, &mut ForwardOpts::infer())
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    let (d, same) = compare_logits(&got, &st["base"]);
    assert!(d <= 1e-3 && same, "max |Δ| = {d}");
    assert!(lm.tok.chat_template.is_some());
}

/// A random 2-layer model with GQA (4 heads over 2 KV heads) and q/k/v biases.
pub fn tiny_random(seed: u64) -> Llama {
    let cfg = ModelConfig {
        arch: "llama".into(),
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let dev = Device::Cpu;
    let mut k = seed;
    let mut r = |shape: &[usize]| {
        k += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + k * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let layers = (0..2)
        .map(|_| LayerWeights {
            attn_norm: (r(&[32]) + 1.0).unwrap(),
            q: r(&[32, 32]),
            k: r(&[16, 32]),
            v: r(&[16, 32]),
            o: r(&[32, 32]),
            q_bias: Some(r(&[32])),
            k_bias: Some(r(&[16])),
            v_bias: Some(r(&[16])),
            mlp_norm: (r(&[32]) + 1.0).unwrap(),
            gate: r(&[48, 32]),
            up: r(&[48, 32]),
            down: r(&[32, 48]),
        })
        .collect();
    let w = Weights {
        embed: r(&[97, 32]),
        layers,
        norm: (r(&[32]) + 1.0).unwrap(),
        lm_head: None,
    };
    Llama::new(cfg, w, &dev).unwrap()
}

fn run(m: &Llama, tokens: &[u32], cache: Option<&mut KvCache>, mode: LogitsMode) -> Tensor {
    let mut s = [SeqInput {
        tokens,
        cache,
        adapters: None,
        logits: mode,
    }];
    m.model_forward(&mut s)
}

trait Fwd {
    fn model_forward(&self, s: &mut [SeqInput]) -> Tensor;
}
impl Fwd for Llama {
    fn model_forward(&self, s: &mut [SeqInput]) -> Tensor {
        self.forward(s, &mut ForwardOpts::infer())
            .unwrap()
            .pop()
            .flatten()
            .unwrap()
    }
}

#[test]
fn tiny_random_shapes_masks_and_cache() {
    let m = tiny_random(1);
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
    let full = run(&m, &ids, None, LogitsMode::All);
    assert_eq!(full.dims(), &[12, 97]);
    assert_eq!(full.dtype(), DType::F32);
    // Causality: logits at position i depend only on tokens ≤ i.
    let mut changed = ids.clone();
    changed[8] = 50;
    let full2 = run(&m, &changed, None, LogitsMode::All);
    let d_prefix = (full.narrow(0, 0, 8).unwrap() - full2.narrow(0, 0, 8).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d_after = (full.narrow(0, 8, 4).unwrap() - full2.narrow(0, 8, 4).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d_prefix, 0.0);
    assert!(d_after > 1e-4);
    // Incremental decode with the KV cache equals the full forward.
    let mut cache = KvCache::new(2);
    let mut rows = vec![run(&m, &ids[..4], Some(&mut cache), LogitsMode::All)];
    for i in 4..12 {
        rows.push(run(&m, &ids[i..i + 1], Some(&mut cache), LogitsMode::Last));
    }
    let inc = Tensor::cat(&rows, 0).unwrap();
    let (d, same) = compare_logits(&full, &inc);
    assert!(d < 1e-5 && same, "{d}");
    // Training-mode (differentiable) ops compute the same function as the fused ones.
    let mut s = [SeqInput {
        tokens: &ids,
        cache: None,
        adapters: None,
        logits: LogitsMode::All,
    }];
    let tr = m
        .forward(
            &mut s,
            &mut ForwardOpts {
                train: true,
                dropout: None,
            },
        )
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    let (d, _) = compare_logits(&full, &tr);
    assert!(d < 1e-4, "{d}");
}

/// Loading the bf16 HF fixture for int8 packs its embedding and untied head from bf16 as
/// read (a chunk of rows at a time): bitwise the packing of the f32 load's weights, with the
/// f32 base's fingerprint, and logits that follow the f32 model's.
#[test]
fn tiny_hf_int8_load_packs_the_f32_weights() {
    use lowrank_model::quant::{Compute, QMatrix};
    let dir = fixtures().join("tiny-llama-hf/model");
    let f = LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let q = LoadedModel::load_for(dir.to_str().unwrap(), &Device::Cpu, Compute::Int8).unwrap();
    assert!(!q.model.has_f32_weights());
    let packed = q.model.int8().expect("packed");
    let bits = |m: &QMatrix| -> Vec<u32> { m.dequantize().iter().map(|v| v.to_bits()).collect() };
    let head = f.model.weights.lm_head.as_ref().expect("untied head");
    assert_eq!(
        bits(packed.head()),
        bits(&QMatrix::from_tensor(head).unwrap())
    );
    let embed = packed.embed().expect("packed embedding");
    assert_eq!(
        bits(embed),
        bits(&QMatrix::from_tensor(&f.model.weights.embed).unwrap())
    );
    assert_eq!(
        q.model.fingerprint().unwrap(),
        f.model.fingerprint().unwrap()
    );
    let st = load_st(fixtures().join("tiny-llama-hf/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let want = run(&f.model, &ids, None, LogitsMode::All);
    let got = run(&q.model, &ids, None, LogitsMode::All);
    let scale = max_abs(&want);
    let (d, _) = compare_logits(&got, &want);
    assert!(
        d <= 0.05 * scale,
        "int8 logits off the f32 model's by {d} (max |logit| {scale})"
    );
}

/// Loading the bf16 HF fixture for int4 packs bitwise what int4 compute packs from the f32
/// load's weights: every projection group in 4-bit nibbles (all rounded: the file is bf16),
/// the untied embedding in 4 bits, the head in 8 (`Bits::head`, int8's head). Its logits
/// follow those of the f32 model of the rounded weights (`Llama::dequantized`) as int8's
/// follow the f32 model's.
#[test]
fn tiny_hf_int4_load_packs_the_f32_weights() {
    use lowrank_model::quant::{Bits, Compute, QMatrix, PACKS};
    let dir = fixtures().join("tiny-llama-hf/model");
    let f = LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let q = LoadedModel::load_for(dir.to_str().unwrap(), &Device::Cpu, Compute::Int4).unwrap();
    assert_eq!(q.model.compute(), Compute::Int4);
    let packed = q.model.int8().expect("packed");
    let mut f4 = f.model.clone();
    f4.set_compute(Compute::Int4).unwrap();
    let mut f8 = f.model.clone();
    f8.set_compute(Compute::Int8).unwrap();
    let (want, eight) = (f4.int8().unwrap(), f8.int8().unwrap());
    let bits = |m: &QMatrix| -> Vec<u32> { m.dequantize().iter().map(|v| v.to_bits()).collect() };
    for l in 0..f.model.cfg.num_layers {
        for ts in PACKS {
            let got = packed.pack(l, ts).unwrap();
            assert!(got.nibble_packed(), "layer {l} {ts:?}");
            assert_eq!(got.rounded_blocks(), got.blocks(), "layer {l} {ts:?}");
            assert_eq!(
                bits(got),
                bits(want.pack(l, ts).unwrap()),
                "layer {l} {ts:?}"
            );
        }
    }
    assert_eq!(bits(packed.head()), bits(want.head()));
    assert_eq!(bits(packed.head()), bits(eight.head()));
    let embed = packed.embed().expect("packed embedding");
    assert!(embed.nibble_packed());
    assert_eq!(
        bits(embed),
        bits(&QMatrix::from_tensor_bits(&f.model.weights.embed, Bits::Four).unwrap())
    );
    let st = load_st(fixtures().join("tiny-llama-hf/logits.safetensors"));
    let ids = ids_of(&st["input_ids"]);
    let rounded = q.model.dequantized().unwrap().expect("dequantized");
    let want = run(&rounded, &ids, None, LogitsMode::All);
    let got = run(&q.model, &ids, None, LogitsMode::All);
    let scale = max_abs(&want);
    let (d, _) = compare_logits(&got, &want);
    assert!(
        d <= 0.05 * scale,
        "int4 logits off the rounded f32 model's by {d} (max |logit| {scale})"
    );
}

/// A NaN in a bf16 checkpoint's weight fails an int8 or int4 load with the tensor, row and
/// columns named (packing used to turn it into its block's minimum, silently).
#[test]
fn tiny_hf_packed_load_names_a_nan_weight() {
    use lowrank_model::quant::Compute;
    let src = fixtures().join("tiny-llama-hf/model");
    let dir = std::env::temp_dir().join(format!("lowrank-nan-weight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let (start, cols) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        let start = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
        (start, t.shape()[1])
    };
    // Row 3, column 40: a bf16 NaN.
    let at = start + 2 * (3 * cols + 40);
    bytes[at..at + 2].copy_from_slice(&0x7FC0u16.to_le_bytes());
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    for compute in [Compute::Int8, Compute::Int4] {
        let e = match LoadedModel::load_for(dir.to_str().unwrap(), &Device::Cpu, compute) {
            Ok(_) => panic!("{compute:?}: a NaN weight loaded"),
            Err(e) => e.to_string(),
        };
        for want in [
            "model.layers.1",
            "k_proj",
            "not finite",
            "row 3, columns 32..64",
        ] {
            assert!(e.contains(want), "{compute:?}: {e:?} lacks {want:?}");
        }
    }
    // The f32 load keeps the NaN, for its output to show (and error on).
    assert!(LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
