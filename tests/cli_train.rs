//! `lowrank train` / `eval` through the binary: resume, determinism, bad input, Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lowrank() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lowrank"));
    c.env("SOURCE_DATE_EPOCH", "1700000000");
    c
}

fn tiny() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama-hf/model"
    )
    .to_string()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-cli-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_data(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..24 {
        s.push_str(
            &serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is {i} plus {i}?")},
            {"role": "assistant", "content": format!("{i} plus {i} is {}.", 2 * i)}]})
            .to_string(),
        );
        s.push('\n');
        s.push_str(&serde_json::json!({"prompt": format!("Count to {}:", i % 5 + 2), "completion": " 1 2 3"}).to_string());
        s.push('\n');
        s.push_str(&serde_json::json!({"text": format!("Plain text record number {i} for language modelling.")}).to_string());
        s.push('\n');
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        &tiny(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--max-steps",
        "8",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--save-every",
        "4",
        "--quiet",
        "--dropout",
        "0.1",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn losses(path: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn resume_after_interrupt_equals_uninterrupted_and_is_deterministic() {
    let d = tmpdir("resume");
    let data = write_data(&d);
    let full = d.join("full");
    ok(&lowrank().args(train_args(&data, &full)).output().unwrap());
    // Same seed, same data, same threads → identical adapter bytes.
    let again = d.join("again");
    ok(&lowrank().args(train_args(&data, &again)).output().unwrap());
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(again.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "same seed must give identical adapter bytes");
    // Layer checkpointing replays each block (with its dropout masks): the same bytes.
    let ck = d.join("ck");
    let mut args = train_args(&data, &ck);
    args.push("--checkpoint-layers".into());
    ok(&lowrank().args(args).output().unwrap());
    let c = std::fs::read(ck.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, c, "--checkpoint-layers must not change the adapter");
    // Interrupted after step 5 (the Ctrl-C path): a checkpoint is written, exit 130.
    let part = d.join("part");
    let o = lowrank()
        .args(train_args(&data, &part))
        .env("LOWRANK_TEST_INTERRUPT_AT_STEP", "5")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(part.join("checkpoint-5/trainer_state.json").exists());
    assert!(part.join("checkpoint-5/adapter_model.safetensors").exists());
    assert!(part.join("checkpoint-5/optimizer.safetensors").exists());
    // A model card beside every saved adapter: the checkpoint's so far, the final one's.
    let card = std::fs::read_to_string(part.join("checkpoint-5/README.md")).unwrap();
    assert!(
        card.contains("checkpoint at step 5") && card.contains("| 5 | "),
        "{card}"
    );
    let mut args = train_args(&data, &part);
    args.extend([
        "--resume".into(),
        part.join("checkpoint-5").to_str().unwrap().into(),
    ]);
    ok(&lowrank().args(args).output().unwrap());
    let l_full = losses(&full.join("metrics.jsonl"));
    let l_res = losses(&part.join("metrics.jsonl"));
    assert_eq!(l_full.len(), 8);
    assert_eq!(
        l_full, l_res,
        "resumed run must reproduce the uninterrupted losses"
    );
    assert_eq!(
        std::fs::read(part.join("adapter_model.safetensors")).unwrap(),
        a
    );
    // keep-checkpoints (default 2) pruned older ones; the final adapter loads with PEFT keys + provenance.
    let out = lowrank()
        .args(["inspect", full.to_str().unwrap(), "--model", &tiny()])
        .output()
        .unwrap();
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fingerprint"], "match");
    let card = std::fs::read_to_string(full.join("README.md")).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    let last = format!("{:.4}", summary["final_loss"].as_f64().unwrap());
    for want in [
        "# LoRA adapter (final)",
        "fingerprint: `sha256",
        "train.jsonl",
        "q_proj, v_proj, down_proj",
        "## Loss curve",
        "| 8 | ",
        &last,
    ] {
        assert!(card.contains(want), "model card lacks {want:?}:\n{card}");
    }
    assert_eq!(v["provenance"]["created"], "2023-11-14T22:13:20Z");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_records_and_flags_are_clear_errors() {
    let d = tmpdir("bad");
    let data = d.join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"messages\": [{\"role\": \"user\"}]}\nnot json\n{\"prompt\": 3, \"completion\": \"x\"}\n",
    )
    .unwrap();
    let out = d.join("out");
    let o = lowrank()
        .args([
            "train",
            "--model",
            &tiny(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--quiet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bad.jsonl:2: messages[0].content"), "{err}");
    assert!(!err.contains("panicked"));
    // --skip-bad counts them and trains on the rest.
    let o = lowrank()
        .args([
            "train",
            "--model",
            &tiny(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--quiet",
            "--skip-bad",
        ])
        .output()
        .unwrap();
    ok(&o);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["skipped_bad"], 3);
    assert_eq!(s["records"], 1);
    for (flag, val, needle) in [
        ("--rank", "0", "--rank"),
        ("--lr", "-1", "--lr"),
        ("--targets", "foo_proj", "unknown module `foo_proj`"),
        ("--dropout", "1.5", "--dropout"),
        ("--schedule", "weird", "unknown schedule"),
        ("--backward-dx", "fp8", "unknown backward product \"fp8\""),
        // (the default f32 compute has no packed base to multiply through)
        (
            "--backward-dx",
            "bf16",
            "--backward-dx bf16 needs --compute int8 or int4",
        ),
    ] {
        let o = lowrank()
            .args([
                "train",
                "--model",
                &tiny(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                &format!("{flag}={val}"),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {val}");
        assert!(err.contains(needle), "{flag} {val}: {err}");
    }
    let o = lowrank()
        .args([
            "train",
            "--model",
            &tiny(),
            "--data",
            d.join("nope.jsonl").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.jsonl"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn toml_config_with_flag_override() {
    let d = tmpdir("toml");
    let data = write_data(&d);
    let cfg = d.join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = {:?}\nrank = 2\nmax_steps = 2\nbatch_size = 2\ntargets = [\"q_proj\"]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = d.join("out");
    let o = lowrank()
        .args([
            "train",
            "--model",
            &tiny(),
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "3",
            "--quiet",
            "--save-dtype",
            "bf16",
        ])
        .output()
        .unwrap();
    ok(&o);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(c["r"], 3);
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj"]));
    // Saved as bf16: the header says so, and it loads back.
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&st[8..8 + n]);
    assert!(
        header.contains("\"BF16\"") && !header.contains("\"F32\""),
        "{header}"
    );
    ok(&lowrank()
        .args(["inspect", out.to_str().unwrap(), "--model", &tiny()])
        .output()
        .unwrap());
    std::fs::write(&cfg, "rnak = 2\n").unwrap();
    let o = lowrank()
        .args([
            "train",
            "--model",
            &tiny(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("rnak"));
    let _ = std::fs::remove_dir_all(&d);
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn default_model() -> String {
    let out = lowrank().arg("fetch").output().unwrap();
    ok(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn eval_loss_mode_matches_peft_loss() {
    // The grads fixture's example as a chat record: masking and loss must equal PEFT's.
    let d = tmpdir("evalloss");
    let data = d.join("conv.jsonl");
    std::fs::write(
        &data,
        serde_json::json!({"messages": [{"role": "user", "content": "What is two plus two?"},
                                         {"role": "assistant", "content": "Two plus two is four."}]})
        .to_string(),
    )
    .unwrap();
    let model = default_model();
    let ad = fixtures().join("smollm2-135m/peft_adapter");
    let o = lowrank()
        .args([
            "eval",
            "--model",
            &model,
            "--adapter",
            ad.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let st = candle_core::safetensors::load(
        fixtures().join("smollm2-135m/grads.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want = st["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    let got = v["loss"].as_f64().unwrap();
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "loss {got} vs PEFT {want}"
    );
    assert_eq!(v["tokens"], 7);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn lora_on_a_fixed_task_lowers_eval_loss_and_merge_runs() {
    let d = tmpdir("realtask");
    let model = default_model();
    ok(&lowrank()
        .args([
            "tasks",
            "make",
            "sql",
            "--out",
            d.to_str().unwrap(),
            "--train",
            "48",
            "--eval",
            "16",
        ])
        .output()
        .unwrap());
    let out = d.join("ad");
    let o = lowrank()
        .args([
            "train",
            "--model",
            &model,
            "--data",
            d.join("train.jsonl").to_str().unwrap(),
            "--eval",
            d.join("eval.jsonl").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
            "--quiet",
        ])
        .output()
        .unwrap();
    ok(&o);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (b, a) = (
        s["eval_loss_before"].as_f64().unwrap(),
        s["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(a < 0.6 * b, "eval loss {b} → {a}");
    assert_eq!(s["trainable_params"], 460_800);
    // Merge into a HF directory and generate from it; the adapter itself inspects with --svd.
    let merged = d.join("merged");
    ok(&lowrank()
        .args([
            "merge",
            "--model",
            &model,
            "--adapter",
            out.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let g1 = lowrank()
        .args([
            "generate",
            "--model",
            merged.to_str().unwrap(),
            "--chat",
            "Count the employees in Paris.",
            "--max-tokens",
            "12",
        ])
        .output()
        .unwrap();
    ok(&g1);
    let g2 = lowrank()
        .args([
            "generate",
            "--model",
            &model,
            "--adapter",
            out.to_str().unwrap(),
            "--chat",
            "Count the employees in Paris.",
            "--max-tokens",
            "12",
        ])
        .output()
        .unwrap();
    ok(&g2);
    assert_eq!(
        g1.stdout, g2.stdout,
        "merged and unmerged greedy outputs differ"
    );
    let o = lowrank()
        .args(["inspect", out.to_str().unwrap(), "--model", &model, "--svd"])
        .output()
        .unwrap();
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trainable_parameters"], 460_800);
    assert_eq!(v["svd"].as_array().unwrap().len(), 60);
    assert!(v["hundred_tasks"]
        .as_str()
        .unwrap()
        .starts_with("100 tasks: base + 100 × adapter"));
    // Applying it to a different base is refused unless --force.
    let o = lowrank()
        .args([
            "generate",
            "--model",
            &tiny(),
            "--adapter",
            out.to_str().unwrap(),
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&d);
}
