//! Fuzzing model loading as `lowrank info` does it (`LoadedModel::load_source`: config,
//! tokenizer, weights, model), from a GGUF file and from a HF directory: every mutation gives a
//! typed error or a model that runs; never a panic, an abort or an allocation sized by a
//! number in the file.
//!
//! Case counts are sized for a debug build (a few seconds per target); `PROPTEST_CASES=N`
//! runs N instead.

#[path = "support/gguf_builder.rs"]
mod gguf_builder;

use std::path::{Path, PathBuf};

use candle_core::Device;
use gguf_builder::{tiny_llama, TmpDir, V};
use lowrank_model::generate::{generate, SamplingParams};
use lowrank_model::{ForwardOpts, LoadedModel, LogitsMode, ModelSource, SeqInput};
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases(default: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = default;
    }
    c.failure_persistence = None;
    c
}

/// Load like `lowrank info`; on success run one forward (which may fail, typed). A load
/// error must name the file or directory.
fn load_and_run(source: ModelSource) -> Result<LoadedModel, String> {
    let name = source.path().display().to_string();
    let lm = LoadedModel::load_source(source, &Device::Cpu).map_err(|e| {
        let m = e.to_string();
        assert!(m.contains(&name), "error does not name {name}: {m}");
        m
    })?;
    let mut s = [SeqInput {
        tokens: &[0, 1, 2],
        cache: None,
        adapters: None,
        logits: LogitsMode::Last,
    }];
    let _ = lm.model.forward(&mut s, &mut ForwardOpts::infer());
    Ok(lm)
}

fn gguf_source(dir: &Path, bytes: &[u8]) -> ModelSource {
    let p = dir.join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    ModelSource::Gguf(p)
}

/// The name the harness gives the child test below.
const CONTEXT_CHILD: &str = "finding_huge_context_child";

/// Finding: `llama.context_length = 4294967295` aborted the process (RoPE tables were sized
/// by it). The declared context is a limit: the model loads and generates, using memory for
/// the positions it runs only. Run as a child process under an 8 GiB address-space limit, so
/// a regression fails this test (allocation failure) instead of exhausting the machine.
#[test]
fn finding_huge_context_is_a_limit_not_an_allocation() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 8388608 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([CONTEXT_CHILD, "--exact", "--ignored", "--nocapture"])
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("1 passed"),
        "the child test did not run:\n{log}"
    );
}

#[test]
#[ignore = "run under a memory limit by finding_huge_context_is_a_limit_not_an_allocation"]
fn finding_huge_context_child() {
    let d = TmpDir::new("ctx-max");
    let lm = load_and_run(gguf_source(&d.0, &tiny_llama(1, u32::MAX).build().bytes)).unwrap();
    assert_eq!(lm.model.cfg.max_position_embeddings, u32::MAX as usize);
    let params = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    let g = generate(
        &lm.model,
        &lm.tok,
        &[0, 1, 2],
        None,
        &params,
        &[],
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(g.ids.len(), 4);
    // A longer prompt: memory grows with the positions used, not the declared context.
    let prompt: Vec<u32> = (0..300).map(|i| i % 16).collect();
    let g = generate(&lm.model, &lm.tok, &prompt, None, &params, &[], &mut |_| {}).unwrap();
    assert_eq!(g.prompt_tokens, 300);
}

/// The tiny model with its real context loads and generates (the fuzz targets' base case).
#[test]
fn tiny_gguf_loads_and_generates() {
    let d = TmpDir::new("tiny-ok");
    let lm = load_and_run(gguf_source(&d.0, &tiny_llama(2, 64).build().bytes)).unwrap();
    let g = generate(
        &lm.model,
        &lm.tok,
        &[3, 4],
        None,
        &SamplingParams {
            max_tokens: 8,
            ..Default::default()
        },
        &[],
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(g.ids.len(), 8);
    // The context is the limit requests are checked against.
    let long: Vec<u32> = vec![1; 64];
    let e = generate(
        &lm.model,
        &lm.tok,
        &long,
        None,
        &SamplingParams::default(),
        &[],
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("64"), "{e}");
}

/// Metadata and tensors that disagree: named errors before any tensor is read.
#[test]
fn gguf_config_against_tensors() {
    let d = TmpDir::new("gguf-layout");
    let e = |g: &gguf_builder::Gguf| load_and_run(gguf_source(&d.0, &g.build().bytes)).err();
    let mut g = tiny_llama(2, 64);
    g.set("llama.block_count", V::U32(1));
    let m = e(&g).expect("a block beyond block_count was accepted");
    assert!(m.contains("blk.1.") && m.contains("block_count"), "{m}");
    let mut g = tiny_llama(1, 64);
    g.set("llama.block_count", V::U32(4000));
    let m = e(&g).expect("missing blocks were accepted");
    assert!(
        m.contains("blk.1.attn_norm.weight") && m.contains("missing"),
        "{m}"
    );
    let mut g = tiny_llama(1, 64);
    g.set("llama.feed_forward_length", V::U32(1 << 20));
    let m = e(&g).expect("a wrong MLP width was accepted");
    assert!(
        m.contains("ffn_gate.weight") && m.contains("1048576"),
        "{m}"
    );
    let mut g = tiny_llama(1, 64);
    g.set("llama.embedding_length", V::U64(u64::MAX));
    let m = e(&g).expect("a huge hidden size was accepted");
    assert!(m.contains("hidden_size"), "{m}");
    let mut g = tiny_llama(1, 64);
    g.set("llama.context_length", V::Str("long".into()));
    let m = e(&g).expect("a string context length was accepted");
    assert!(m.contains("llama.context_length"), "{m}");
    let mut g = tiny_llama(1, 64);
    g.set("tokenizer.ggml.eos_token_id", V::U64(1 << 32));
    let m = e(&g).expect("an eos id beyond u32 was accepted");
    assert!(m.contains("tokenizer.ggml.eos_token_id"), "{m}");
    let mut g = tiny_llama(1, 64);
    g.set("llama.rope.freq_base", V::F32(f32::NAN));
    assert!(e(&g).unwrap().contains("rope_theta"));
    let mut g = tiny_llama(1, 64);
    g.set("llama.attention.layer_norm_rms_epsilon", V::F32(0.0));
    assert!(e(&g).unwrap().contains("rms_norm_eps"));
}

proptest! {
    #![proptest_config(cases(500))]

    /// Byte flips anywhere in the tiny model (header mostly), loaded and run.
    #[test]
    fn gguf_model_byte_flips(flips in prop::collection::vec((any::<u64>(), 1u8..=255), 1..6)) {
        let d = TmpDir::new("load-flips");
        let built = tiny_llama(1, 64).build();
        let mut b = built.bytes.clone();
        for (sel, mask) in flips {
            let at = if sel % 4 == 0 { sel / 4 % b.len() as u64 } else { sel / 4 % built.header_end as u64 };
            b[at as usize] ^= mask;
        }
        let _ = load_and_run(gguf_source(&d.0, &b));
    }

    /// Config metadata set to any integer: a model or a named error.
    #[test]
    fn gguf_model_config_values(key in prop::sample::select(vec![
        "llama.block_count", "llama.context_length", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.attention.key_length",
        "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.eos_token_id",
    ]), v in prop_oneof![
        0u64..70,
        any::<u64>(),
        (0u64..64).prop_map(|s| 1u64 << s),
        Just(u32::MAX as u64),
    ]) {
        let d = TmpDir::new("load-config");
        let mut g = tiny_llama(1, 64);
        g.set(key, V::U64(v));
        let _ = load_and_run(gguf_source(&d.0, &g.build().bytes));
    }
}

// ---- HF directories ----

fn hf_fixture() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/model"
    ));
    assert!(
        p.join("config.json").is_file(),
        "fixture {} missing (tests/fixtures is part of the repository)",
        p.display()
    );
    p
}

/// A copy of the tiny HF model in `dir`, with config.json and/or model.safetensors replaced.
fn hf_copy(dir: &Path, config: Option<&Value>, st: Option<&[u8]>) -> ModelSource {
    let m = dir.join("model");
    let _ = std::fs::remove_dir_all(&m);
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(hf_fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    if let Some(c) = config {
        std::fs::write(m.join("config.json"), serde_json::to_vec(c).unwrap()).unwrap();
    }
    if let Some(b) = st {
        std::fs::write(m.join("model.safetensors"), b).unwrap();
    }
    ModelSource::HfDir(m)
}

fn hf_config() -> Value {
    serde_json::from_slice(&std::fs::read(hf_fixture().join("config.json")).unwrap()).unwrap()
}

fn hf_weights() -> Vec<u8> {
    std::fs::read(hf_fixture().join("model.safetensors")).unwrap()
}

/// Rewrite the safetensors header (JSON) with `f`, keeping the data.
fn edit_header(st: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut h: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    f(&mut h);
    let mut hb = serde_json::to_vec(&h).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&st[8 + n..]);
    out
}

/// config.json values out of bounds or of the wrong type, and safetensors headers that lie:
/// named errors.
#[test]
fn hf_hostile_values_are_named_errors() {
    let d = TmpDir::new("hf-hostile");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("num_hidden_layers", json!(u64::MAX), "num_hidden_layers"),
        ("num_hidden_layers", json!(1u64 << 40), "num_hidden_layers"),
        ("hidden_size", json!(1u64 << 62), "hidden_size"),
        ("vocab_size", json!(1u64 << 40), "vocab_size"),
        ("intermediate_size", json!(0), "intermediate_size"),
        (
            "num_attention_heads",
            json!(1u64 << 33),
            "num_attention_heads",
        ),
        ("num_key_value_heads", json!(3), "num_key_value_heads"),
        ("num_key_value_heads", json!("2"), "num_key_value_heads"),
        ("head_dim", json!(1u64 << 21), "head_dim"),
        ("head_dim", json!(15), "head_dim"),
        ("head_dim", json!(-16), "head_dim"),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
        (
            "max_position_embeddings",
            json!(1u64 << 32),
            "max_position_embeddings",
        ),
        (
            "max_position_embeddings",
            json!(512.5),
            "max_position_embeddings",
        ),
        ("rms_norm_eps", json!("small"), "rms_norm_eps"),
        ("rms_norm_eps", json!(-1.0), "rms_norm_eps"),
        ("eos_token_id", json!(1u64 << 32), "eos_token_id"),
        ("eos_token_id", json!([2, 1u64 << 33]), "eos_token_id"),
        ("bos_token_id", json!(u64::MAX), "bos_token_id"),
    ];
    for (k, v, needle) in cases {
        let mut c = hf_config();
        c[k] = v.clone();
        let src = hf_copy(&d.0, Some(&c), None);
        let e = load_and_run(src)
            .err()
            .unwrap_or_else(|| panic!("{k} = {v} accepted"));
        assert!(
            e.contains(needle) && e.contains("config.json"),
            "{k} = {v}: {e}"
        );
    }
    let mut c = hf_config();
    c["rope_parameters"]["rope_theta"] = json!(1e300);
    let e = load_and_run(hf_copy(&d.0, Some(&c), None))
        .err()
        .expect("accepted");
    assert!(e.contains("rope_theta"), "{e}");
    // The config and the tensors disagree.
    let mut c = hf_config();
    c["intermediate_size"] = json!(128);
    let e = load_and_run(hf_copy(&d.0, Some(&c), None))
        .err()
        .expect("accepted");
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("128"),
        "{e}"
    );
    // An untied head that is there but does not fit: an error, not silently tied.
    let st = edit_header(&hf_weights(), |h| {
        h["lm_head.weight"]["shape"] = json!([64, 4096]);
    });
    let e = load_and_run(hf_copy(&d.0, None, Some(&st)))
        .err()
        .expect("accepted");
    assert!(
        e.contains("lm_head.weight") && e.contains("[64, 4096]"),
        "{e}"
    );
    // A huge declared context is only a limit.
    let mut c = hf_config();
    c["max_position_embeddings"] = json!(u32::MAX);
    let lm = load_and_run(hf_copy(&d.0, Some(&c), None)).unwrap();
    // The file facts `info` shows come from the safetensors header alone.
    assert_eq!(lm.file_dtypes, "BF16×21");
    // Safetensors header length larger than the file, and larger than any header.
    for n in [u64::MAX, 1 << 40, 99_999_999, hf_weights().len() as u64] {
        let mut st = hf_weights();
        st[..8].copy_from_slice(&n.to_le_bytes());
        let e = load_and_run(hf_copy(&d.0, None, Some(&st)))
            .err()
            .expect("accepted");
        assert!(e.contains("model.safetensors"), "{n}: {e}");
    }
    // A tensor whose shape claims more data than it has.
    let st = edit_header(&hf_weights(), |h| {
        h["model.norm.weight"]["shape"] = json!([1u64 << 40, 1u64 << 40]);
    });
    let e = load_and_run(hf_copy(&d.0, None, Some(&st)))
        .err()
        .expect("accepted");
    assert!(e.contains("model.safetensors"), "{e}");
}

proptest! {
    #![proptest_config(cases(200))]

    /// config.json fields set to any JSON value.
    #[test]
    fn hf_config_values(key in prop::sample::select(vec![
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    ]), v in prop_oneof![
        (0u64..600).prop_map(|x| json!(x)),
        any::<u64>().prop_map(|x| json!(x)),
        any::<i64>().prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        Just(json!(null)),
        Just(json!("7")),
        Just(json!([1, 2])),
    ]) {
        let d = TmpDir::new("hf-config");
        let mut c = hf_config();
        c[key] = v;
        let _ = load_and_run(hf_copy(&d.0, Some(&c), None));
    }

    /// Safetensors: the header length, header bytes, or one tensor's shape and offsets.
    #[test]
    fn hf_safetensors_mutations(kind in 0u8..3, a in any::<u64>(), b in any::<u64>(), mask in 1u8..=255) {
        let d = TmpDir::new("hf-st");
        let mut st = hf_weights();
        let n = u64::from_le_bytes(st[..8].try_into().unwrap());
        match kind {
            0 => {
                let v = [a, n + a % 64, a % (n + 64), 1 << (a % 64)][(b % 4) as usize];
                st[..8].copy_from_slice(&v.to_le_bytes());
            }
            1 => {
                let at = 8 + (a % n) as usize;
                st[at] ^= mask;
            }
            _ => {
                st = edit_header(&st, |h| {
                    let names: Vec<String> = h.as_object().unwrap().keys()
                        .filter(|k| *k != "__metadata__").cloned().collect();
                    let name = &names[(a % names.len() as u64) as usize];
                    if b % 2 == 0 {
                        h[name]["shape"] = json!([a % 1000, b % 1000]);
                    } else {
                        h[name]["data_offsets"] = json!([a % (1 << 21), b % (1 << 21)]);
                    }
                });
            }
        }
        let _ = load_and_run(hf_copy(&d.0, None, Some(&st)));
    }
}
