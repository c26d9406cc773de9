//! Fuzzing the PEFT adapter loader: mutations of adapter_config.json and of the safetensors
//! file (header length, header bytes, shapes, dtypes, offsets, truncation) give a typed error
//! naming the file, or an adapter that fits the base with finite scales; never a panic, an
//! abort or an allocation sized by a number in the file.
//!
//! Case counts are sized for a debug build (a few seconds per target); `PROPTEST_CASES=N`
//! runs N instead.

use std::path::{Path, PathBuf};

use candle_core::Device;
use lowrank_lora::peft::{load_peft, CONFIG_FILE, WEIGHTS_FILE};
use lowrank_lora::shapes::BaseShapes;
use lowrank_lora::Adapter;
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

/// The tiny Llama's PEFT adapter (r 4, α 8, q/k/v/o of 2 layers) and its base's shapes.
fn fixture() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/peft_adapter"
    ));
    assert!(
        p.join(WEIGHTS_FILE).is_file(),
        "fixture {} missing (tests/fixtures is part of the repository)",
        p.display()
    );
    p
}

fn shapes() -> BaseShapes {
    BaseShapes::llama(2, 64, 32, 160)
}

struct TmpDir(PathBuf);

impl TmpDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "lowrank-peft-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> Value {
    serde_json::from_slice(&std::fs::read(fixture().join(CONFIG_FILE)).unwrap()).unwrap()
}

fn weights() -> Vec<u8> {
    std::fs::read(fixture().join(WEIGHTS_FILE)).unwrap()
}

/// Write an adapter directory with the given config and weights.
fn adapter_dir(dir: &Path, config: &Value, weights: &[u8]) -> PathBuf {
    let a = dir.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join(CONFIG_FILE), serde_json::to_vec(config).unwrap()).unwrap();
    std::fs::write(a.join(WEIGHTS_FILE), weights).unwrap();
    a
}

/// Load; an error must name a file of the adapter. A loaded adapter must fit the base, with
/// finite f32 scales.
fn load(dir: &Path) -> Result<Adapter, String> {
    match load_peft(dir, &shapes(), &Device::Cpu) {
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains(&dir.display().to_string()),
                "error does not name the adapter: {m}"
            );
            Err(m)
        }
        Ok(a) => {
            let s = shapes();
            for (k, m) in &a.modules {
                let (out, inp) = s.dims_of(k.target).unwrap();
                assert!(k.layer < s.num_layers, "{k}");
                assert_eq!(m.a.dims(), [m.rank(), inp], "{k}");
                assert_eq!(m.b.dims(), [out, m.rank()], "{k}");
                assert!((m.scale as f32).is_finite(), "{k}: scale {}", m.scale);
            }
            Ok(a)
        }
    }
}

fn load_err(config: &Value, weights: &[u8]) -> String {
    let d = TmpDir::new("err");
    load(&adapter_dir(&d.0, config, weights)).expect_err("a hostile adapter was accepted")
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

#[test]
fn fixture_loads() {
    let d = TmpDir::new("ok");
    let a = load(&adapter_dir(&d.0, &config(), &weights())).unwrap();
    assert_eq!(a.modules.len(), 8);
}

/// Config values that would make outputs non-finite: dropout 1 (inverted dropout scales by
/// 1/(1 − p)), a rank_pattern of 0 (α/0), an α whose scale overflows f32. And ranks beyond
/// any useful LoRA.
#[test]
fn config_values_that_break_the_math_are_errors() {
    for (k, v, needle) in [
        ("lora_dropout", json!(1.0), "lora_dropout"),
        ("lora_dropout", json!(-0.5), "lora_dropout"),
        ("lora_dropout", json!(7), "lora_dropout"),
        ("lora_alpha", json!(1e300), "beyond f32"),
        ("lora_alpha", json!(-1e300), "beyond f32"),
        ("alpha_pattern", json!({"q_proj": 1e300}), "beyond f32"),
        ("r", json!(1u64 << 20), "r = 1048576 is outside"),
        ("r", json!(u64::MAX), "is outside"),
        (
            "rank_pattern",
            json!({"q_proj": 1u64 << 40}),
            "rank_pattern",
        ),
    ] {
        let mut c = config();
        c[k] = v.clone();
        let e = load_err(&c, &weights());
        assert!(
            e.contains(needle) && e.contains(CONFIG_FILE),
            "{k} = {v}: {e}"
        );
    }
    // rank_pattern 0 with matching empty tensors: the scale would be α/0 = inf.
    let mut c = config();
    c["rank_pattern"] = json!({"q_proj": 0});
    let st = edit_header(&weights(), |h| {
        for (name, t) in h.as_object_mut().unwrap() {
            if name.contains("q_proj.lora_A") {
                t["shape"] = json!([0, 64]);
                t["data_offsets"] = json!([0, 0]);
            } else if name.contains("q_proj.lora_B") {
                t["shape"] = json!([64, 0]);
                t["data_offsets"] = json!([0, 0]);
            }
        }
    });
    let e = load_err(&c, &st);
    assert!(e.contains("rank_pattern") && e.contains("q_proj"), "{e}");
}

/// A weights file larger than any adapter of this config for this base could be is refused
/// before it is read (it would be read whole into memory): here a sparse 1 TiB file.
#[test]
fn oversized_weights_file_is_refused_unread() {
    let d = TmpDir::new("huge");
    let a = adapter_dir(&d.0, &config(), &weights());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(a.join(WEIGHTS_FILE))
        .unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    let e = load(&a).expect_err("a 1 TiB adapter was accepted");
    assert!(
        e.contains(WEIGHTS_FILE) && e.contains("1099511627776 bytes"),
        "{e}"
    );
}

/// A safetensors header length beyond the file: named as such.
#[test]
fn header_length_beyond_the_file() {
    let st = weights();
    for n in [u64::MAX, 1 << 40, st.len() as u64 - 7, 99_999_999] {
        let mut b = st.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        let e = load_err(&config(), &b);
        assert!(
            e.contains(WEIGHTS_FILE) && e.contains("header length") && e.contains("past the end"),
            "{n}: {e}"
        );
    }
}

proptest! {
    #![proptest_config(cases(500))]

    /// adapter_config.json fields set to any JSON value.
    #[test]
    fn config_mutations(key in prop::sample::select(vec![
        "r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern",
        "layers_to_transform", "target_modules", "use_rslora", "peft_type", "bias",
        "init_lora_weights", "use_dora", "modules_to_save",
    ]), v in prop_oneof![
        (0u64..10).prop_map(|x| json!(x)),
        any::<u64>().prop_map(|x| json!(x)),
        any::<i64>().prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        (any::<u64>(), 0u64..3).prop_map(|(x, l)| json!({"q_proj": x % 8, "layers.1.self_attn.k_proj": l})),
        any::<f64>().prop_map(|x| json!({"q_proj": x})),
        prop::collection::vec(any::<u64>().prop_map(|x| x % 4), 0..4).prop_map(|v| json!(v)),
        Just(json!(null)),
        Just(json!("all-linear")),
        Just(json!(["q_proj"])),
        Just(json!(true)),
    ]) {
        let d = TmpDir::new("cfg");
        let mut c = config();
        c[key] = v;
        let _ = load(&adapter_dir(&d.0, &c, &weights()));
    }

    /// The safetensors file: header length, header bytes, one tensor's shape / dtype /
    /// offsets, or a truncation.
    #[test]
    fn weights_mutations(kind in 0u8..5, a in any::<u64>(), b in any::<u64>(), mask in 1u8..=255) {
        let d = TmpDir::new("st");
        let mut st = weights();
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
            2 => st.truncate((a % st.len() as u64) as usize),
            _ => {
                st = edit_header(&st, |h| {
                    let names: Vec<String> = h.as_object().unwrap().keys()
                        .filter(|k| *k != "__metadata__").cloned().collect();
                    let name = &names[(a % names.len() as u64) as usize];
                    match (kind, b % 3) {
                        (3, 0) => h[name]["shape"] = json!([a % 300, b % 300]),
                        (3, 1) => h[name]["shape"] = json!([a % 8, 64, b % 3]),
                        (3, _) => h[name]["shape"] = json!([a, b]),
                        (_, 0) => h[name]["dtype"] = json!(["F16", "BF16", "F64", "I8", "U8", "BOOL"][(a % 6) as usize]),
                        (_, _) => h[name]["data_offsets"] = json!([a % 20_000, b % 20_000]),
                    }
                });
            }
        }
        let _ = load(&adapter_dir(&d.0, &config(), &st));
    }
}
