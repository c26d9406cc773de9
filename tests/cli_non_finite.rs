//! Non-finite logits are an error, never output: a huge (finite) adapter scale or `lora_alpha`
//! overflows the activations, and every command that samples or scores from the logits exits
//! non-zero naming the adapter and its scale instead of printing `<|endoftext|>` or a NaN loss.

use std::path::PathBuf;
use std::process::{Command, Output};

fn lowrank() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowrank"))
}

fn tiny() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama-hf"
    ))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    lowrank().args(args).output().unwrap()
}

/// Fails (no panic, nothing on stdout but the newline-free empty completion) with every needle
/// in stderr.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "{args:?} should fail; stdout: {stdout}\nstderr: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in {err}");
    }
    assert!(
        !stdout.contains("endoftext") && !stdout.contains("NaN") && !stdout.contains("null"),
        "{args:?} printed output from non-finite logits: {stdout}"
    );
}

#[test]
fn huge_adapter_scales_are_errors_not_output() {
    let model = tiny().join("model");
    let model = model.to_str().unwrap();
    let adapter = tiny().join("peft_adapter");
    let huge = format!("{}:1e30", adapter.display());
    let d = tmpdir("non-finite");
    // The same adapter at scale 1 works: the failure below is the scale's, not the fixture's.
    let ok = run(&[
        "generate",
        "--model",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let named = ["non-finite logits", "peft_adapter", "1e30"];
    for extra in [
        &["--prompt", "Hello"][..],
        &["--chat", "Hello"],
        &["--prompt", "Hello", "--merged"],
    ] {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--adapter",
            &huge,
            "--max-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        fails_with(&args, &named);
    }
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--adapter",
        &huge,
        "--prompt",
        "Hi",
    ];
    args.extend_from_slice(&["--temperature", "0.8", "--seed", "3"]);
    fails_with(&args, &named);

    // `lora_alpha: 1e30` in the adapter's own config, at the CLI's scale 1.
    let alpha = d.join("alpha");
    std::fs::create_dir_all(&alpha).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), alpha.join(f)).unwrap();
    }
    let cfg_path = alpha.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = serde_json::json!(1e30);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            model,
            "--adapter",
            alpha.to_str().unwrap(),
            "--prompt",
            "Hi",
        ],
        &["non-finite logits", "alpha", "lora_alpha 1e30"],
    );

    // eval: the loss mode and the generation mode.
    let data = d.join("data.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"Hello\",\"completion\":\" world\"}\n{\"prompt\":\"1 2\",\"completion\":\" 3\"}\n",
    )
    .unwrap();
    let data = data.to_str().unwrap();
    let ok = run(&[
        "eval",
        "--model",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    fails_with(
        &["eval", "--model", model, "--adapter", &huge, "--data", data],
        &["not finite", "peft_adapter", "1e30"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            model,
            "--adapter",
            &huge,
            "--data",
            data,
            "--metric",
            "exact",
        ],
        &named,
    );

    // Scales that are not finite (in f64, or in the f32 the delta is computed in) are refused
    // before anything runs.
    for (scale, needle) in [("inf", "finite"), ("NaN", "finite"), ("1e39", "1e39")] {
        let spec = format!("{}:{scale}", adapter.display());
        fails_with(
            &[
                "generate",
                "--model",
                model,
                "--adapter",
                &spec,
                "--prompt",
                "Hi",
            ],
            &[needle],
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
