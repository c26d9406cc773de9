//! The web playground at `/` of `lowrank serve`, in headless Chromium (Debian's chromium and
//! chromium-driver, driven by Selenium; `.ci/run` installs all three): it asks for the API
//! key, lists the adapters, shows a trained adapter's card, streams answers of the base, two
//! adapters and a slider-set mixture side by side, and each text equals the API's answer to
//! the same request. The screenshot is kept at target/tmp/playground.png.

mod common;

use common::{copy_fixture_adapter, fixtures, Server};
use std::process::Command;

#[test]
fn playground_in_headless_chromium() {
    common::require_python("selenium", "selenium");
    let chromium = std::env::var("LOWRANK_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let driver = std::env::var("LOWRANK_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
    for p in [&chromium, &driver] {
        assert!(
            std::path::Path::new(p).is_file(),
            "{p} is required (Debian: apt-get install chromium chromium-driver; bash .ci/run installs them)"
        );
    }

    let root = std::env::temp_dir().join(format!("lowrank-playground-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let model = fixtures().join("tiny-llama-hf/model");
    // A PEFT adapter without a card, and one trained here, whose card `train` writes.
    copy_fixture_adapter(&root.join("adapters/peft-tiny"));
    let mut data = String::new();
    for i in 0..16 {
        data.push_str(&format!(
            "{}\n",
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{i} plus {i} is {}.", 2 * i)}]})
        ));
    }
    std::fs::write(root.join("train.jsonl"), data).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["train", "--model", model.to_str().unwrap(), "--data"])
        .arg(root.join("train.jsonl"))
        .arg("--out")
        .arg(root.join("adapters/sums"))
        .args(["--rank", "4", "--targets", "q_proj,v_proj,down_proj"])
        .args([
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "5e-3",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.join("adapters/sums/README.md").is_file());

    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--adapters",
        root.join("adapters").to_str().unwrap(),
        "--api-key",
        "sk-play",
    ]);
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("playground.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/browser/playground.py"
        ))
        .arg(format!("http://127.0.0.1:{}", server.port))
        .arg("sk-play")
        .arg(&shot)
        .args(["peft-tiny", "sums"])
        .env("LOWRANK_CHROMIUM", &chromium)
        .env("LOWRANK_CHROMEDRIVER", &driver)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "ok"),
        "the playground check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("no screenshot was saved");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    eprintln!("{stdout}screenshot: {}", shot.display());
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
