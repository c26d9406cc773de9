//! The real binary on hostile model files (issue 16's findings): a clean non-zero exit with a
//! message naming the file and field, never a panic or an abort; and a huge declared context
//! is legal (a limit, not an allocation).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 8 GiB of address space: the binary with the default model needs well under that, and a
/// regression that allocates by a number in the file fails here instead of exhausting the
/// machine.
const ADDRESS_SPACE_KIB: u64 = 8 << 20;

/// `lowrank ARGS` under the address-space limit.
fn lowrank(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_lowrank"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

struct TmpDir(PathBuf);

impl TmpDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lowrank-hostile-{tag}-{}", std::process::id()));
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

fn default_model() -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .arg("fetch")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A clean failure: exit code 1 (not a panic's 101 or a signal), the message on stderr.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let (_, err) = text(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "not a clean exit: {:?}\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

/// Finding: GGUF v3, zero tensors, `general.alignment = 0` made `info` panic (exit 101).
#[test]
fn info_on_alignment_zero_fails_cleanly() {
    let d = TmpDir::new("align0");
    let key = b"general.alignment";
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes()); // version
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&4u32.to_le_bytes()); // u32
    b.extend_from_slice(&0u32.to_le_bytes());
    let p = d.0.join("align0.gguf");
    std::fs::write(&p, &b).unwrap();
    let o = lowrank(&["info", "--model", p.to_str().unwrap()]);
    assert_clean_failure(&o, &["align0.gguf", "general.alignment", "power of two"]);
}

/// A copy of `model` with the u32 metadata value of `key` replaced.
fn patch_u32(model: &Path, key: &str, value: u32, out: &Path) {
    let mut b = std::fs::read(model).unwrap();
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    pat.extend_from_slice(&4u32.to_le_bytes()); // value type u32
    let hits: Vec<usize> = b
        .windows(pat.len())
        .enumerate()
        .filter(|(_, w)| *w == pat.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{key} as a u32 in {}", model.display());
    let at = hits[0] + pat.len();
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(out, b).unwrap();
}

/// Finding: the default model with `llama.context_length = 4294967295` aborted the process
/// (`memory allocation of 4294967296 bytes failed`: RoPE tables sized by it). A declared
/// context that large is legal, so `info` reports it and `generate` runs, with the same
/// greedy completion as the unpatched model (nothing but the limit changed), all within the
/// address-space limit.
#[test]
fn huge_declared_context_is_a_limit_not_an_allocation() {
    let d = TmpDir::new("ctx");
    let model = default_model();
    let patched = d.0.join("ctx.gguf");
    patch_u32(&model, "llama.context_length", u32::MAX, &patched);
    let p = patched.to_str().unwrap();

    let o = lowrank(&["info", "--model", p]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{:?}\n{err}", o.status);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["context_length"], 4294967295u64, "{out}");

    let gen = |m: &str| {
        let o = lowrank(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
        ]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{m}: {:?}\n{err}", o.status);
        out
    };
    let a = gen(p);
    assert!(!a.trim().is_empty());
    assert_eq!(a, gen(model.to_str().unwrap()));
}

/// Relatives of the findings on the real file: a context length of 0, a block count beyond
/// the tensors, a truncated tensor table: named errors, clean exits.
#[test]
fn info_on_patched_real_models_fails_cleanly() {
    let d = TmpDir::new("patched");
    let model = default_model();
    let cases = [
        ("llama.context_length", 0, "max_position_embeddings"),
        ("llama.block_count", 31, "blk.30.attn_norm.weight"),
        ("llama.block_count", u32::MAX, "num_hidden_layers"),
        ("llama.embedding_length", 1 << 30, "hidden_size"),
        ("llama.attention.head_count", 7, "num_key_value_heads"),
    ];
    for (key, v, needle) in cases {
        let p = d.0.join("m.gguf");
        patch_u32(&model, key, v, &p);
        let o = lowrank(&["info", "--model", p.to_str().unwrap()]);
        assert_clean_failure(&o, &["m.gguf", needle]);
    }
}
