//! `lowrank serve`'s flags reach the running server: `--compute int8` packs while loading and
//! still caches K and V in f16 (`--kv-cache auto`), which the start-up line names, and the
//! `--kv-cache-bytes` budget admits requests by the cache type's bytes per token.

mod common;

use std::time::Duration;

fn post(port: u16, body: &str) -> (u16, String) {
    common::http(port, "POST", "/v1/completions", body)
}

#[test]
fn int8_serve_caches_in_f16_within_its_kv_budget() {
    let model = common::fixtures().join("tiny-llama-hf/model");
    // The tiny model: 2 layers, 2 KV heads of 16 → 2·2·2·16 values a token, 256 bytes in f16
    // (512 in f32). 25 600 bytes hold 100 tokens in f16, 50 in f32.
    let mut server = common::Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--compute",
        "int8",
        "--kv-cache-bytes",
        "25600",
    ]);
    let line = server.stderr_line("lowrank serve: model", Duration::from_secs(30));
    assert!(
        line.contains("int8 compute, f16 KV cache: 100 tokens"),
        "{line}"
    );
    let port = server.port;
    // About 63 tokens: within the f16 budget, beyond an f32 one.
    let (st, body) = post(
        port,
        r#"{"model": "model", "prompt": "Hi", "max_tokens": 60, "temperature": 0}"#,
    );
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(
        port,
        r#"{"model": "model", "prompt": "Hi", "max_tokens": 150, "temperature": 0}"#,
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("budget of 25600 bytes"), "{body}");
    // A zero budget is refused before anything loads.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--kv-cache-bytes",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-cache-bytes"), "{err}");
}
