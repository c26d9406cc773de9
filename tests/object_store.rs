//! `serve --adapters s3://…` against an S3-compatible server started here on loopback
//! (moto, from PyPI; `.ci/run` installs it): listing, lazy load, a cache hit without a second
//! download (a fresh server over the same cache), a corrupted object refused with a clear
//! error while the other adapters keep serving, and a new version hot-loaded with
//! `POST /v1/adapters`. The steps that talk HTTP are in tests/scripts/object_store.py.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{copy_fixture_adapter, fixtures, Server};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn script(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/object_store.py"
        ))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "object_store.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The fixture adapter with lora_B tripled: another valid adapter, other answers.
fn scaled_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(
        from.join("adapter_config.json"),
        to.join("adapter_config.json"),
    )
    .unwrap();
    let ts = candle_core::safetensors::load(from.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let ts: HashMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                (t * 3.0).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&ts, to.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapters_from_an_s3_compatible_store() {
    common::require_python("moto.server, boto3", "moto[server]");
    let root = std::env::temp_dir().join(format!("lowrank-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let local = root.join("local");
    copy_fixture_adapter(&local.join("tiny-lora"));
    scaled_copy(&local.join("tiny-lora"), &local.join("two"));
    std::fs::create_dir_all(local.join("broken")).unwrap();
    std::fs::copy(
        local.join("tiny-lora/adapter_config.json"),
        local.join("broken/adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        local.join("broken/adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}",
    )
    .unwrap();

    // The S3 server, on a free loopback port.
    let s3_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _s3 = Killed(
        Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &s3_port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
        assert!(Instant::now() < deadline, "the S3 server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    script(&["upload", &endpoint, local.to_str().unwrap()]);

    let env = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let cache = root.join("cache");
    let model = fixtures().join("tiny-llama-hf/model");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--adapters",
        "s3://lowrank/adapters",
        "--adapter-cache",
        cache.to_str().unwrap(),
        "--api-key",
        "sk-s3",
        "--admin-key",
        "adm-s3",
    ];
    let server = Server::start_env(&args, &env);
    let base = format!("http://127.0.0.1:{}", server.port);
    let first: serde_json::Value = serde_json::from_str(script(&["first", &base]).trim()).unwrap();
    drop(server);

    // A fresh server over the same cache: the adapter comes from the cache.
    let server = Server::start_env(&args, &env);
    let base = format!("http://127.0.0.1:{}", server.port);
    script(&["restart", &base, first["text"].as_str().unwrap()]);

    // A new version under the same name, hot-loaded.
    script(&[
        "upload",
        &endpoint,
        local.to_str().unwrap(),
        &format!("tiny-lora={}", local.join("two").display()),
    ]);
    script(&["reload", &base, first["two"].as_str().unwrap()]);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

/// `--adapter http://…/NAME` (a plain web server: no listing needed for one adapter) gives the
/// same completion as the directory it serves, from a verified cached copy.
#[test]
fn an_adapter_from_a_plain_web_server() {
    let root = std::env::temp_dir().join(format!("lowrank-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    copy_fixture_adapter(&root.join("www/tiny-lora"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _web = Killed(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(root.join("www"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the web server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let model = fixtures().join("tiny-llama-hf/model");
    let gen = |adapter: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_lowrank"))
            .env("LOWRANK_HOME", root.join("home"))
            .args(["generate", "--model", model.to_str().unwrap()])
            .args([
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "8",
                "--adapter",
                adapter,
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{adapter}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let local = gen(root.join("www/tiny-lora").to_str().unwrap());
    let url = format!("http://127.0.0.1:{port}/tiny-lora");
    assert_eq!(gen(&url), local);
    // Cached: the same answer again, and an absent adapter is a clear error.
    assert_eq!(gen(&format!("{url}:1")), local);
    let o = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .env("LOWRANK_HOME", root.join("home"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
        ])
        .args(["--adapter", &format!("http://127.0.0.1:{port}/nope")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("nope") && err.contains("no adapter there"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
