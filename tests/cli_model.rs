//! The CLI on bad input: clear errors, non-zero exit, no panic; and its happy paths.

use std::path::PathBuf;
use std::process::Command;

fn lowrank() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowrank"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs and expects failure with `needle` in stderr and no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = lowrank().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

fn default_model() -> String {
    let out = lowrank().arg("fetch").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn bad_model_inputs() {
    let d = tmpdir("bad-model");
    fails_with(
        &["info", "--model", d.join("missing.gguf").to_str().unwrap()],
        "no such file",
    );
    let not = d.join("not.gguf");
    std::fs::write(&not, b"this is not a gguf file at all").unwrap();
    fails_with(&["info", "--model", not.to_str().unwrap()], "not a GGUF");
    // Truncated: the real header, most tensor bytes missing.
    let model = default_model();
    let bytes = std::fs::read(&model).unwrap();
    let trunc = d.join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(&["info", "--model", trunc.to_str().unwrap()], "truncated");
    // Unsupported architecture: a HF directory claiming another model type.
    let hf = d.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 8}"#,
    )
    .unwrap();
    fails_with(
        &["info", "--model", hf.to_str().unwrap()],
        "unsupported architecture `gpt_neox`",
    );
    // Prompt longer than the context (the tiny model has 512 positions).
    let tiny = fixtures().join("tiny-llama-hf/model");
    let long = "word ".repeat(600);
    fails_with(
        &[
            "generate",
            "--model",
            tiny.to_str().unwrap(),
            "--prompt",
            &long,
        ],
        "does not fit the context",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn tokenize_generate_info() {
    let model = default_model();
    let out = lowrank()
        .args(["tokenize", "--model", &model, "Hello world!"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[19556,905,17]"
    );
    let out = lowrank()
        .args([
            "generate",
            "--model",
            &model,
            "--chat",
            "What is the capital of France?",
            "--max-tokens",
            "24",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
    let out = lowrank()
        .args(["info", "--model", &model])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layers"], 30);
    assert_eq!(v["kv_heads"], 3);
    assert_eq!(v["parameters"], 134_515_008);
}
