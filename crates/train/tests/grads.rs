//! The training step against PEFT's loss and LoRA gradients (tests/fixtures), and against
//! finite differences on a tiny random model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Target};
use lowrank_model::config::ModelConfig;
use lowrank_model::quant::{DxProduct, HeadProduct, TrainProduct};
use lowrank_model::weights::{LayerWeights, Weights};
use lowrank_model::{ForwardOpts, Llama, LoadedModel};
use lowrank_train::data::Sample;
use lowrank_train::loss::{batch_loss, lora_batch_grads};
use rand::SeedableRng;

fn set_adapter(set: &lowrank_model::AdapterSet) -> Adapter {
    (*set[0].0).clone()
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// Replace an adapter's tensors by variables; returns (adapter, name → var).
fn as_vars(a: &Adapter) -> (Adapter, BTreeMap<String, Var>) {
    let mut out = a.clone();
    let mut vars = BTreeMap::new();
    for (k, m) in out.modules.iter_mut() {
        let va = Var::from_tensor(&m.a).unwrap();
        let vb = Var::from_tensor(&m.b).unwrap();
        m.a = va.as_tensor().clone();
        m.b = vb.as_tensor().clone();
        vars.insert(format!("{}.lora_A.weight", k.peft_prefix()), va);
        vars.insert(format!("{}.lora_B.weight", k.peft_prefix()), vb);
    }
    (out, vars)
}

fn rel_frob(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (d / n.max(1e-30)).sqrt()
}

/// PEFT's reference step (tests/fixtures): its tensors (gradients by PEFT name), the sample
/// and the loss.
fn peft_case() -> (std::collections::HashMap<String, Tensor>, Sample, f64) {
    peft_case_of("grads.safetensors")
}

/// PEFT's step of 154 tokens (`make_long_grads.py`): long enough (≥ `MIN_ROWS` rows) for
/// our own products, the packed base's input gradient among them; the gradients of nine
/// layers (0–5, 14, 28, 29: the fixtures' size budget).
fn peft_long_case() -> (std::collections::HashMap<String, Tensor>, Sample, f64) {
    let case = peft_case_of("grads_long.safetensors");
    assert!(case.1.ids.len() >= lowrank_model::ops::gemm::MIN_ROWS);
    case
}

/// The pairs (name, ours, PEFT's) of every gradient the case holds: all 420 in the short case,
/// the kept layers' (`make_long_grads.py`'s KEEP_LAYERS, nine of 30) in the long one. Each of
/// the case's gradients must be among ours (a name we do not produce fails).
fn compared<'a>(
    ours: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    st: &'a std::collections::HashMap<String, Tensor>,
) -> Vec<(&'a String, &'a Tensor, &'a Tensor)> {
    let pairs: Vec<_> = ours
        .into_iter()
        .filter_map(|(k, g)| st.get(k).map(|w| (k, g, w)))
        .collect();
    let held = st.keys().filter(|k| k.contains("lora_")).count();
    assert_eq!(
        pairs.len(),
        held,
        "the case holds gradients we did not compute"
    );
    assert!(held >= 9 * 14, "only {held} gradients in the case");
    pairs
}

fn peft_case_of(file: &str) -> (std::collections::HashMap<String, Tensor>, Sample, f64) {
    let st =
        candle_core::safetensors::load(fixtures().join("smollm2-135m").join(file), &Device::Cpu)
            .unwrap();
    let ids: Vec<u32> = st["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let labels: Vec<i64> = st["labels"].to_vec1::<i64>().unwrap();
    let want_loss = st["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    let s = Sample {
        ids,
        labels,
        line: 1,
    };
    (st, s, want_loss)
}

/// The default model (f32, training's thread set-up) and PEFT's adapter of the fixtures.
fn default_model_and_peft_adapter() -> (LoadedModel, Adapter) {
    default_model_and_peft_adapter_for(lowrank_model::quant::Compute::F32)
}

/// [`default_model_and_peft_adapter`] loaded for `compute` (int8: the base packed).
fn default_model_and_peft_adapter_for(
    compute: lowrank_model::quant::Compute,
) -> (LoadedModel, Adapter) {
    lowrank_model::init_threads_for(None, lowrank_model::Workload::Training);
    let p = lowrank_model::fetch::ensure_default(false).unwrap();
    let lm = LoadedModel::load_for(p.to_str().unwrap(), &Device::Cpu, compute).unwrap();
    assert_eq!(lm.model.compute(), compute);
    let (adapter, _) = lowrank_model::adapters::load_adapter(
        &lm.model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
    (lm, adapter)
}

#[test]
fn loss_and_lora_grads_match_peft() {
    let (lm, adapter) = default_model_and_peft_adapter();
    let (adapter, vars) = as_vars(&adapter);
    let (st, s, want_loss) = peft_case();
    let m = s.num_targets();
    let set = Arc::new(vec![(Arc::new(adapter), 1.0)]);
    let mut fo = ForwardOpts {
        train: true,
        dropout: None,
    };
    let hl = batch_loss(
        &lm.model,
        &[&s],
        Some(set.clone()),
        &mut fo,
        true,
        1.0 / m as f64,
    )
    .unwrap();
    let loss = hl.nll_sum / hl.targets as f64;
    assert!(
        ((loss - want_loss) / want_loss).abs() <= 1e-4,
        "loss {loss} vs PEFT {want_loss}"
    );
    let grads = hl.surrogate.unwrap().backward().unwrap();
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (name, var) in &vars {
        let want = &st[name];
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = rel_frob(got, want);
        worst = worst.max(e);
        assert!(e <= 1e-3, "{name}: relative Frobenius error {e}");
        checked += 1;
    }
    assert_eq!(checked, 420);
    eprintln!("loss {loss:.6} (PEFT {want_loss:.6}); worst gradient rel. error {worst:.2e}");
    // The hand-written backward the trainer uses: same loss, same gradients.
    let (nll, targets, hand) = lora_batch_grads(
        &lm.model,
        &[&s],
        &set_adapter(&set),
        None,
        1.0 / m as f64,
        false,
    )
    .unwrap();
    let loss2 = nll / targets as f64;
    assert!(
        ((loss2 - want_loss) / want_loss).abs() <= 1e-4,
        "hand-written loss {loss2} vs PEFT {want_loss}"
    );
    assert_eq!(hand.len(), 420);
    let mut worst2 = 0.0f64;
    for (name, got) in &hand {
        let e = rel_frob(got, &st[name]);
        worst2 = worst2.max(e);
        assert!(
            e <= 1e-3,
            "hand-written {name}: relative Frobenius error {e}"
        );
    }
    eprintln!("hand-written backward: loss {loss2:.6}; worst gradient rel. error {worst2:.2e}");
    // The frozen base got no gradient at all.
    for (n, t) in lm.model.weights.named() {
        assert!(grads.get(t).is_none(), "{n} received a gradient");
    }
}

fn tiny_model() -> Llama {
    let cfg = ModelConfig {
        arch: "llama".into(),
        vocab_size: 23,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let dev = Device::Cpu;
    let mut k = 0u64;
    let mut r = |shape: &[usize], s: f32| {
        k += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((((i as u64 + 3) * 2654435761 + k * 40503) % 2000) as f32 / 1000.0 - 1.0) * s)
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let layers = (0..2)
        .map(|_| LayerWeights {
            attn_norm: (r(&[16], 0.1) + 1.0).unwrap(),
            q: r(&[16, 16], 0.4),
            k: r(&[8, 16], 0.4),
            v: r(&[8, 16], 0.4),
            o: r(&[16, 16], 0.4),
            q_bias: None,
            k_bias: None,
            v_bias: None,
            mlp_norm: (r(&[16], 0.1) + 1.0).unwrap(),
            gate: r(&[24, 16], 0.4),
            up: r(&[24, 16], 0.4),
            down: r(&[16, 24], 0.4),
        })
        .collect();
    let w = Weights {
        embed: r(&[23, 16], 1.0),
        layers,
        norm: (r(&[16], 0.1) + 1.0).unwrap(),
        lm_head: None,
    };
    Llama::new(cfg, w, &dev).unwrap()
}

/// A deterministic adapter on every projection of the tiny model: rank r, α = r·scale.
fn tiny_adapter(model: &Llama, r: usize, scale: f64) -> Adapter {
    let dev = Device::Cpu;
    let mut modules = BTreeMap::new();
    for l in 0..2 {
        for (t, o, i) in model.lora_shapes() {
            let n = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|j| ((((j + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5) * 0.3)
                    .collect()
            };
            let a = Tensor::from_vec(n(r * i, l * 10 + t as usize), (r, i), &dev).unwrap();
            let b = Tensor::from_vec(n(o * r, l * 10 + t as usize + 5), (o, r), &dev).unwrap();
            modules.insert(ModuleKey::new(l, t), LoraModule { a, b, scale });
        }
    }
    Adapter {
        config: LoraConfig::new(r, r as f64 * scale, &Target::ALL),
        modules,
        provenance: Default::default(),
    }
}

/// Two training sequences for the tiny model, one with a masked prompt.
fn tiny_samples() -> Vec<Sample> {
    vec![
        Sample {
            ids: vec![1, 5, 7, 2, 9, 11, 4],
            labels: vec![-100, -100, -100, 2, 9, 11, 4],
            line: 1,
        },
        Sample {
            ids: vec![3, 8, 13, 21, 6],
            labels: vec![3, 8, 13, 21, 6],
            line: 2,
        },
    ]
}

/// Mean loss of two sequences (one with masked prompt) under `adapter`.
fn loss_of(model: &Llama, adapter: &Adapter, samples: &[Sample]) -> (f64, Option<Tensor>) {
    let refs: Vec<&Sample> = samples.iter().collect();
    let m: usize = samples.iter().map(|s| s.num_targets()).sum();
    let set = Arc::new(vec![(Arc::new(adapter.clone()), 1.0)]);
    let hl = batch_loss(
        model,
        &refs,
        Some(set),
        &mut ForwardOpts {
            train: true,
            dropout: None,
        },
        true,
        1.0 / m as f64,
    )
    .unwrap();
    (hl.nll_sum / hl.targets as f64, hl.surrogate)
}

#[test]
fn backward_agrees_with_finite_differences() {
    let model = tiny_model();
    let dev = Device::Cpu;
    let adapter = tiny_adapter(&model, 2, 1.5);
    let samples = tiny_samples();
    let (adapter_v, vars) = as_vars(&adapter);
    let (_, sur) = loss_of(&model, &adapter_v, &samples);
    let grads = sur.unwrap().backward().unwrap();
    // Check a few coordinates of several A and B tensors with central differences (f32: h = 1e-2).
    let mut checked = 0;
    for (name, var) in vars.iter().step_by(5) {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for coord in [0usize, 3] {
            let h = 1e-2f32;
            let mut plus = adapter.clone();
            let mut minus = adapter.clone();
            for (ad, sign) in [(&mut plus, 1.0f32), (&mut minus, -1.0f32)] {
                for (k, m) in ad.modules.iter_mut() {
                    let t = if name == &format!("{}.lora_A.weight", k.peft_prefix()) {
                        &mut m.a
                    } else if name == &format!("{}.lora_B.weight", k.peft_prefix()) {
                        &mut m.b
                    } else {
                        continue;
                    };
                    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v[coord] += sign * h;
                    *t = Tensor::from_vec(v, t.shape(), &dev).unwrap();
                }
            }
            let fd = (loss_of(&model, &plus, &samples).0 - loss_of(&model, &minus, &samples).0)
                / (2.0 * h as f64);
            let an = g[coord] as f64;
            assert!(
                (fd - an).abs() <= 2e-3 + 2e-2 * an.abs(),
                "{name}[{coord}]: autograd {an} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
}

/// The hand-written backward equals candle's autograd on the tiny model: every projection
/// adapted, ragged batch with a masked prompt, with and without LoRA dropout (same masks),
/// with and without layer checkpointing (bitwise).
#[test]
fn hand_written_backward_equals_autograd() {
    let model = tiny_model();
    let adapter = tiny_adapter(&model, 3, 0.7);
    let mut samples = tiny_samples();
    samples.push(Sample {
        ids: vec![17],
        labels: vec![17],
        line: 3,
    });
    let refs: Vec<&Sample> = samples.iter().collect();
    let m: usize = samples.iter().map(|s| s.num_targets()).sum();
    for p in [0.0, 0.25] {
        let (adapter_v, vars) = as_vars(&adapter);
        let set = Arc::new(vec![(Arc::new(adapter_v), 1.0)]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut fo = ForwardOpts {
            train: true,
            dropout: (p > 0.0).then_some((p, &mut rng)),
        };
        let hl = batch_loss(&model, &refs, Some(set), &mut fo, true, 1.0 / m as f64).unwrap();
        let auto = hl.surrogate.unwrap().backward().unwrap();
        let hand_with = |checkpoint: bool| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let d = (p > 0.0).then_some((p, &mut rng));
            lora_batch_grads(&model, &refs, &adapter, d, 1.0 / m as f64, checkpoint).unwrap()
        };
        let (nll, _, hand) = hand_with(false);
        // Layer checkpointing replays each block (and its dropout masks): bitwise the same.
        let (nll_ck, _, hand_ck) = hand_with(true);
        assert_eq!(nll.to_bits(), nll_ck.to_bits(), "p={p}: checkpointed loss");
        for (name, g) in &hand {
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                v(g),
                v(&hand_ck[name]),
                "p={p} {name}: checkpointed gradient differs"
            );
        }
        assert!(
            (nll - hl.nll_sum).abs() <= 1e-5 * hl.nll_sum.abs(),
            "p={p}: nll {nll} vs {}",
            hl.nll_sum
        );
        assert_eq!(hand.len(), vars.len());
        for (name, var) in &vars {
            let want = auto.get(var.as_tensor()).unwrap();
            let e = rel_frob(&hand[name], want);
            assert!(
                e <= 1e-4,
                "p={p} {name}: hand-written vs autograd rel. error {e}"
            );
        }
    }
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let s = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let ab = s((a * b).unwrap());
    let aa = s(a.sqr().unwrap());
    let bb = s(b.sqr().unwrap());
    ab / (aa * bb).sqrt().max(1e-30)
}

/// QLoRA on the CPU: the base loaded for int8 compute (packed while loading, no f32 copy),
/// the hand-written backward's dX through the dequantized packs. Against PEFT's f32
/// gradients: loss within 1 %, every LoRA gradient with cosine ≥ 0.99 and relative
/// Frobenius error ≤ 5 %.
#[test]
fn int8_lora_grads_match_peft() {
    packed_lora_grads_match_peft(lowrank_model::quant::Compute::Int8);
}

/// Int4 compute on weights that are not 4-bit (the tiny model's f32 projections, rounded to
/// 16 levels per block; its tied head stays 8-bit) adapts another base than f32 does. Its
/// LoRA gradients are the f32 backward's (PEFT's to 2e-4, above) on the base the packing
/// holds (`Llama::dequantized`), up to the activations' rounding: int8's bounds against PEFT.
#[test]
fn int4_lora_grads_match_f32_on_the_rounded_base() {
    use lowrank_model::quant::{Compute, PACKS};
    let original = tiny_model();
    let mut q = original.clone();
    q.set_compute(Compute::Int4).unwrap();
    assert_eq!(q.compute(), Compute::Int4);
    let packed = q.int8().expect("packed");
    for l in 0..2 {
        for ts in PACKS {
            let m = packed.pack(l, ts).unwrap();
            assert!(
                m.nibble_packed() && m.rounded_blocks() == m.blocks(),
                "{l} {ts:?}"
            );
        }
    }
    assert!(!packed.head().nibble_packed(), "the head stays 8-bit");
    let rounded = q.dequantized().unwrap().expect("a packed model");
    let adapter = tiny_adapter(&q, 2, 0.5);
    let samples = tiny_samples();
    let refs: Vec<&Sample> = samples.iter().collect();
    let scale = 1.0 / samples.iter().map(|s| s.num_targets()).sum::<usize>() as f64;
    let grads = |m: &Llama| {
        let (nll, targets, g) = lora_batch_grads(m, &refs, &adapter, None, scale, false).unwrap();
        (nll / targets as f64, g)
    };
    let (want_loss, want) = grads(&rounded);
    let (loss, got) = grads(&q);
    let (orig_loss, orig) = grads(&original);
    let loss_err = ((loss - want_loss) / want_loss).abs();
    assert!(
        loss_err <= 0.01,
        "int4 loss {loss} vs f32 on the rounded base {want_loss}"
    );
    assert_eq!(got.len(), 2 * 7 * 2);
    let (mut worst_cos, mut worst_rel, mut moved) = (1.0f64, 0.0f64, 0.0f64);
    for (key, g) in &got {
        let (c, e) = (cosine(g, &want[key]), rel_frob(g, &want[key]));
        worst_cos = worst_cos.min(c);
        worst_rel = worst_rel.max(e);
        moved = moved.max(rel_frob(&want[key], &orig[key]));
        assert!(c >= 0.99, "int4 {key}: cosine {c}");
        assert!(e <= 0.05, "int4 {key}: relative Frobenius error {e}");
    }
    eprintln!(
        "int4: loss {loss:.6} (f32 on the rounded base {want_loss:.6}, on the original \
         {orig_loss:.6}); worst gradient cosine {worst_cos:.5}, worst rel. error {worst_rel:.4}; \
         rounding the base moved a gradient by up to {moved:.3}"
    );
    // The reference is another model than the original: comparing with the original's
    // gradients would not have passed.
    assert!(
        moved > 4.0 * worst_rel,
        "rounding moved gradients by only {moved}"
    );
}

fn packed_lora_grads_match_peft(compute: lowrank_model::quant::Compute) {
    lowrank_model::init_threads_for(None, lowrank_model::Workload::Training);
    let p = lowrank_model::fetch::ensure_default(false).unwrap();
    let lm = LoadedModel::load_for(p.to_str().unwrap(), &Device::Cpu, compute).unwrap();
    let name = compute.name();
    assert!(
        !lm.model.has_f32_weights(),
        "{name} loading kept the f32 base"
    );
    assert_eq!(lm.model.compute(), compute);
    // The fingerprint taken while packing is the f32 base's: PEFT adapters trained on either
    // load the same way (the fixture adapter records none, so compare with an f32 load).
    let f32_lm = LoadedModel::load(p.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(
        lm.model.fingerprint().unwrap(),
        f32_lm.model.fingerprint().unwrap()
    );
    drop(f32_lm);
    let (adapter, _) = lowrank_model::adapters::load_adapter(
        &lm.model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
    let mut lm = lm;
    // The short case takes candle's products below MIN_ROWS; the long one our own, and with
    // each dX product this CPU runs (bf16 rounds dY and W₀ but o_proj's: `quant::DxProduct`),
    // each held to the same bounds; also, far inside, to PEFT's own bf16 mode's error on
    // the same step (the fixture's manifest: 37 %, cosine 0.929).
    let dx_products: Vec<DxProduct> = [DxProduct::F32, DxProduct::Bf16]
        .into_iter()
        .filter(|p| p.supported())
        .collect();
    if dx_products.len() == 1 {
        eprintln!("{name}: the bf16 dX skipped: this CPU has no AVX-512 BF16");
    }
    for (case, dxs) in [("short", &dx_products[..1]), ("long", &dx_products[..])] {
        let (st, s, want_loss) = match case {
            "short" => peft_case(),
            _ => peft_long_case(),
        };
        let m = s.num_targets();
        for &dx in dxs {
            lm.model.set_train_dx(dx);
            assert_eq!(lm.model.train_dx(), dx);
            // The head's forward on the projections' product, and where the dX runs in
            // bf16, on the bf16 product as well (`quant::HeadProduct`); f32 dX keeps the
            // head off bf16 whatever its own setting.
            let heads: &[HeadProduct] = match dx {
                DxProduct::Bf16 => &[HeadProduct::Packed, HeadProduct::Bf16],
                DxProduct::F32 => &[HeadProduct::Packed],
            };
            lm.model.set_train_head(HeadProduct::Bf16);
            if dx == DxProduct::F32 {
                assert_eq!(lm.model.train_head(), HeadProduct::Packed);
            }
            for &head in heads {
                lm.model.set_train_head(head);
                assert_eq!(lm.model.train_head(), head);
                // Both forward products (each CPU path picks the faster one), each within
                // the bounds.
                let mut losses = vec![];
                for product in [TrainProduct::Limbs, TrainProduct::Dequantized] {
                    lm.model.set_train_product(product);
                    let (nll, targets, hand) =
                        lora_batch_grads(&lm.model, &[&s], &adapter, None, 1.0 / m as f64, false)
                            .unwrap();
                    let loss = nll / targets as f64;
                    let loss_err = ((loss - want_loss) / want_loss).abs();
                    let name = format!(
                        "{name} {case} ({}, head {}, dX {})",
                        product.name(),
                        head.name(),
                        dx.name()
                    );
                    assert!(loss_err <= 0.01, "{name} loss {loss} vs PEFT {want_loss}");
                    assert_eq!(hand.len(), 420);
                    let (rel, cos) = peft_bf16_error();
                    let (cos_min, rel_max) = (cos.max(0.99), rel.min(0.05));
                    let (mut worst_cos, mut worst_rel) = (1.0f64, 0.0f64);
                    for (key, got, want) in compared(&hand, &st) {
                        let (c, e) = (cosine(got, want), rel_frob(got, want));
                        worst_cos = worst_cos.min(c);
                        worst_rel = worst_rel.max(e);
                        assert!(
                            c >= cos_min,
                            "{name} {key}: cosine {c} with PEFT's gradient"
                        );
                        assert!(e <= rel_max, "{name} {key}: relative Frobenius error {e}");
                    }
                    eprintln!(
                        "{name}: loss {loss:.6} (PEFT {want_loss:.6}, {:.3} %); worst gradient \
                         cosine {worst_cos:.5}, worst rel. error {worst_rel:.3}",
                        100.0 * loss_err
                    );
                    losses.push(loss);
                }
                // The two products are different arithmetic (the limbs round the
                // activations).
                assert_ne!(losses[0], losses[1], "both products gave the same loss");
            }
        }
    }
}

/// How far PEFT's bf16 mode lands from its f32 gradients on the long case (the fixture's
/// manifest, `make_long_grads.py`): the worst relative Frobenius error and cosine.
fn peft_bf16_error() -> (f64, f64) {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &m["grads_long"]["peft_bfloat16"];
    let rel = p["worst_rel_frobenius"]
        .as_f64()
        .expect("PEFT bf16's error in the manifest");
    let cos = p["worst_cosine"]
        .as_f64()
        .expect("PEFT bf16's cosine in the manifest");
    (rel, cos)
}

/// On PEFT's long case (our own f32 products throughout: every projection, its dX, the
/// head), f32 training keeps the short case's bounds.
#[test]
fn long_batch_lora_grads_match_peft() {
    let (lm, adapter) = default_model_and_peft_adapter();
    let (st, s, want_loss) = peft_long_case();
    let m = s.num_targets();
    let (nll, targets, hand) =
        lora_batch_grads(&lm.model, &[&s], &adapter, None, 1.0 / m as f64, false).unwrap();
    let loss = nll / targets as f64;
    assert!(
        ((loss - want_loss) / want_loss).abs() <= 1e-4,
        "loss {loss} vs PEFT {want_loss}"
    );
    assert_eq!(hand.len(), 420);
    let mut worst = 0.0f64;
    for (name, got, want) in compared(&hand, &st) {
        let e = rel_frob(got, want);
        worst = worst.max(e);
        assert!(e <= 1e-3, "{name}: relative Frobenius error {e}");
    }
    eprintln!(
        "long case: loss {loss:.6} (PEFT {want_loss:.6}); worst gradient rel. error {worst:.2e}"
    );
}

/// The training tape grows linearly with the sequence: no per-sequence t × t attention
/// matrix is kept (the backward recomputes the probabilities block by block from q, k and
/// each row's log-sum-exp). With the default model, one layer's probabilities for 1024
/// tokens would be 9 heads × 1024² × 4 B = 36 MiB, 1.1 GiB over 30 layers.
#[test]
fn training_tape_grows_linearly_with_the_sequence() {
    use lowrank_model::quant::Compute;
    lowrank_model::init_threads_for(None, lowrank_model::Workload::Training);
    let p = lowrank_model::fetch::ensure_default(false).unwrap();
    let lm = LoadedModel::load_for(p.to_str().unwrap(), &Device::Cpu, Compute::Int8).unwrap();
    let (adapter, _) = lowrank_model::adapters::load_adapter(
        &lm.model,
        &fixtures().join("smollm2-135m/peft_adapter"),
        false,
    )
    .unwrap();
    let c = &lm.model.cfg;
    let tape_of = |t: usize, checkpoint: bool| {
        let ids: Vec<u32> = (0..t as u32).map(|i| 3 + (i * 7919) % 40000).collect();
        let (_, tape) = lm
            .model
            .forward_tape(&[&ids], &adapter, None, checkpoint)
            .unwrap();
        (tape.bytes(), tape.largest_tensor())
    };
    let (b512, _) = tape_of(512, false);
    let (b1024, largest) = tape_of(1024, false);
    let t = 1024usize;
    // Everything kept per token and layer: x, x2, q, k, v, gate, up, the two 1/rms, the
    // log-sum-exps, o_proj's input (the fixture adapts o_proj) and the LoRA projections
    // u = x·Aᵀ of the 7 adapted modules — all linear in t; per token also the rotary tables
    // and the final norm's input.
    let (h, qd, kvd) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    let r = adapter.config.r;
    let per_token_layer =
        2 * h + 2 * qd + 2 * kvd + 2 * c.intermediate_size + 2 + c.num_heads + 7 * r;
    let linear_bound = 4 * t * (per_token_layer * c.num_layers + c.head_dim + h + 1);
    let probs = 4 * c.num_heads * t * t; // one layer's attention probabilities
    assert!(
        b1024 <= linear_bound,
        "tape {b1024} B exceeds the linear bound {linear_bound} B"
    );
    assert!(
        b1024 < linear_bound + probs,
        "a t × t tensor would not fit under this bound"
    );
    assert!(
        largest < c.num_heads * t * t / 4,
        "largest tape tensor has {largest} elements"
    );
    // Int8 compute keeps x, x2, gate and up in bf16: half their f32 bytes less than the
    // bound (an f32 tape sits within a few KB of it).
    let bf16_saving = 2 * t * (2 * h + 2 * c.intermediate_size) * c.num_layers;
    assert!(
        b1024 <= linear_bound - bf16_saving,
        "int8 tape {b1024} B: not {bf16_saving} B below the f32 bound {linear_bound} B"
    );
    // Twice the tokens, twice the tape (a t² term would make this ≥ 2.5 here).
    let ratio = b1024 as f64 / b512 as f64;
    assert!(
        (1.99..=2.01).contains(&ratio),
        "tape grew ×{ratio:.3} from 512 to 1024 tokens"
    );
    // Layer checkpointing keeps each block's input only: [t, H] per layer.
    let (ck, ck_largest) = tape_of(1024, true);
    let ck_bound = 4 * t * (h * c.num_layers + c.head_dim + h + 1);
    assert!(
        ck <= ck_bound,
        "checkpointed tape {ck} B exceeds {ck_bound} B"
    );
    assert!(ck_largest <= t * h);
}

/// The child of [`f32_gemm_paths_agree_on_a_long_batch`] that it runs once per path.
const GEMM_CHILD: &str = "f32_gemm_path_child";

/// The f32 gemm paths (`LOWRANK_F32_GEMM=candle|avx2|avx512`, each this CPU runs) give the
/// same loss and LoRA gradients, to f32 accumulation error, on batches long enough (≥
/// `ops::gemm::MIN_ROWS` rows) to take our product in every frozen projection, its dX and
/// the head: 149 and 75 tokens (a ragged last register tile; hidden 576 is two depth blocks, the vocabulary
/// many column blocks). The PEFT case above is too short to reach it. Each path runs in
/// its own process (the path is chosen once per process), writing what it computed.
///
/// Both computes: with int8 the base's dX and the head's input gradient decode the packs a
/// chunk of rows at a time into our gemm's depth (`quant::dequantized_input_grad`, several
/// targets per pack, the head in several chunks), where candle's path multiplies the whole
/// dequantized pack.
#[test]
fn f32_gemm_paths_agree_on_a_long_batch() {
    if own_gemm_paths().is_empty() {
        eprintln!("skipped: this CPU runs only candle's f32 path (nothing to compare)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lowrank-gemm-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for compute in ["f32", "int8"] {
        gemm_paths_agree(&dir, compute);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Our own f32 gemm paths this CPU runs (`LOWRANK_ISA`, in `lowrank_model::isa`, caps them
/// as a CPU without them would), by the names `LOWRANK_F32_GEMM` takes.
fn own_gemm_paths() -> Vec<&'static str> {
    lowrank_model::ops::gemm::GemmKernel::supported_list()
        .into_iter()
        .filter(|k| k.is_own())
        .map(|k| k.name())
        .collect()
}

/// One compute's half of [`f32_gemm_paths_agree_on_a_long_batch`].
fn gemm_paths_agree(dir: &std::path::Path, compute: &str) {
    let run = |path: &str| -> std::collections::HashMap<String, Tensor> {
        let file = dir.join(format!("{compute}-{path}.safetensors"));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([GEMM_CHILD, "--exact", "--ignored", "--nocapture"])
            .env("LOWRANK_F32_GEMM", path)
            // The packed base's dX on the f32 gemm too (bf16 is compared with PEFT above).
            .env("LOWRANK_TRAIN_DX", "f32")
            .env("LOWRANK_GEMM_CHILD_COMPUTE", compute)
            .env("LOWRANK_GEMM_CHILD_OUT", &file)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{path}: {log}");
        assert!(
            log.contains("1 passed"),
            "{path}: the child did not run:\n{log}"
        );
        candle_core::safetensors::load(&file, &Device::Cpu).unwrap()
    };
    let candle = run("candle");
    let ours = own_gemm_paths();
    if !ours.contains(&"avx512") {
        eprintln!("{compute}: the avx512 path skipped: this CPU has no AVX-512");
    }
    for path in ours {
        let ours = run(path);
        paths_agree(compute, path, &ours, &candle);
    }
}

/// The loss and every LoRA gradient of our path's run against candle's.
fn paths_agree(
    compute: &str,
    path: &str,
    ours: &std::collections::HashMap<String, Tensor>,
    candle: &std::collections::HashMap<String, Tensor>,
) {
    assert_eq!(ours.len(), candle.len());
    let l = |m: &std::collections::HashMap<String, Tensor>| m["loss"].to_vec1::<f64>().unwrap()[0];
    let (lo, lc) = (l(ours), l(candle));
    assert!(
        ((lo - lc) / lc).abs() <= 1e-6,
        "{compute}: loss {lo} ({path}) vs {lc} (candle)"
    );
    // int8 stores the tape in bf16: where the paths' f32 sums differ in the last bits, a
    // stored activation near a bf16 rounding boundary rounds the other way (2⁻⁹ relative),
    // so its paths differ more (measured 2.8e-4 worst; f32 8.6e-6) — still 20× below what
    // separates int8's gradients from f32's (6.8e-3), and far below a wrong product's.
    let bound = if compute == "int8" { 1e-3 } else { 1e-4 };
    let mut worst = 0f64;
    for (name, want) in candle.iter().filter(|(n, _)| *n != "loss") {
        let e = rel_frob(&ours[name], want);
        worst = worst.max(e);
        assert!(
            e <= bound,
            "{compute}: {name}: relative Frobenius error {e} between {path} and candle"
        );
    }
    eprintln!("{compute} {path}: loss {lo:.7} vs {lc:.7}; worst gradient difference {worst:.2e}");
}

#[test]
#[ignore = "run in its own process by f32_gemm_paths_agree_on_a_long_batch"]
fn f32_gemm_path_child() {
    use lowrank_model::ops::gemm::GemmKernel;
    let want = std::env::var("LOWRANK_F32_GEMM").unwrap();
    assert_eq!(
        GemmKernel::detect().name(),
        want,
        "the forced path did not run"
    );
    let (lm, adapter) = match std::env::var("LOWRANK_GEMM_CHILD_COMPUTE")
        .unwrap()
        .as_str()
    {
        "f32" => default_model_and_peft_adapter(),
        "int8" => default_model_and_peft_adapter_for(lowrank_model::quant::Compute::Int8),
        other => panic!("unknown compute {other}"),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let sample = |len: usize, rng: &mut rand::rngs::StdRng| {
        let ids: Vec<u32> = (0..len)
            .map(|_| rand::Rng::random_range(rng, 0..49152u32))
            .collect();
        let labels = ids.iter().map(|&t| t as i64).collect();
        Sample {
            ids,
            labels,
            line: 1,
        }
    };
    let (a, b) = (sample(149, &mut rng), sample(75, &mut rng));
    let (nll, targets, grads) =
        lora_batch_grads(&lm.model, &[&a, &b], &adapter, None, 1.0 / 224.0, false).unwrap();
    let mut out: std::collections::HashMap<String, Tensor> = grads.into_iter().collect();
    out.insert(
        "loss".into(),
        Tensor::new(&[nll / targets as f64], &Device::Cpu).unwrap(),
    );
    let file = std::env::var("LOWRANK_GEMM_CHILD_OUT").unwrap();
    candle_core::safetensors::save(&out, file).unwrap();
}
