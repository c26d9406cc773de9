#![allow(dead_code)]
//! Helpers: the tiny HF model, random adapters saved with `save_peft`, temp dirs, and calling
//! the router in process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device, Tensor};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Provenance, Target};
use lowrank_model::{Llama, LoadedModel};
use lowrank_serve::{AppState, ServeConfig};
use serde_json::Value;
use tower::ServiceExt;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf"
    ))
}

pub fn tiny() -> LoadedModel {
    LoadedModel::load(fixtures().join("model").to_str().unwrap(), &Device::Cpu).expect("tiny model")
}

/// A fresh, empty directory under the system temp dir (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lowrank-serve-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random rank-4 adapter on every projection (A and B both random, so ΔW ≠ 0), saved in
/// PEFT format at `dir`.
pub fn random_adapter(model: &Llama, dir: &Path, amp: f64) -> Adapter {
    let shapes = model.base_shapes();
    let r = 4;
    let config = LoraConfig::new(r, 8.0, &Target::ALL);
    let mut modules = BTreeMap::new();
    for l in 0..shapes.num_layers {
        for t in Target::ALL {
            let (out, inp) = shapes.dims_of(t).unwrap();
            let a = Tensor::rand(-amp as f32, amp as f32, (r, inp), &Device::Cpu).unwrap();
            let b = Tensor::rand(-amp as f32, amp as f32, (out, r), &Device::Cpu).unwrap();
            modules.insert(
                ModuleKey::new(l, t),
                LoraModule {
                    a,
                    b,
                    scale: config.scale_for(l, t),
                },
            );
        }
    }
    let a = Adapter {
        config,
        modules,
        provenance: Provenance::default(),
    };
    lowrank_lora::save_peft(&a, dir, DType::F32).unwrap();
    a
}

pub fn copy_fixture_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("peft_adapter").join(f), dir.join(f)).unwrap();
    }
}

pub fn state(lm: LoadedModel, cfg: ServeConfig) -> AppState {
    AppState::new(lm, cfg).expect("state")
}

pub struct Resp {
    pub status: StatusCode,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    /// `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(String::from)
            .collect()
    }
    pub fn error_message(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e.is_object(), "not an OpenAI error: {v}");
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error object lacks `{k}`: {v}");
        }
        e["message"].as_str().unwrap().to_string()
    }
}

pub fn request(method: &str, uri: &str, body: Option<&str>, auth: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    if let Some(k) = auth {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(
        body.map(|s| Body::from(s.to_string()))
            .unwrap_or_else(Body::empty),
    )
    .unwrap()
}

pub async fn call(
    s: &AppState,
    method: &str,
    uri: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> Resp {
    let resp = lowrank_serve::app(s.clone())
        .oneshot(request(method, uri, body, auth))
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Resp {
        status,
        text: String::from_utf8_lossy(&bytes).to_string(),
    }
}

/// POST a streaming request and wait for its first chunk (the request is then running); the
/// rest of the body.
pub async fn open_stream(s: &AppState, uri: &str, body: &Value) -> axum::body::BodyDataStream {
    use futures_util::StreamExt;
    let resp = lowrank_serve::app(s.clone())
        .oneshot(request("POST", uri, Some(&body.to_string()), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body().into_data_stream();
    let _ = stream.next().await.unwrap().unwrap();
    stream
}

pub async fn post(s: &AppState, uri: &str, body: &Value) -> Resp {
    call(s, "POST", uri, Some(&body.to_string()), None).await
}

/// Greedy chat completion text.
pub async fn chat_text(s: &AppState, model: &str, prompt: &str, max_tokens: usize) -> String {
    let r = post(
        s,
        "/v1/chat/completions",
        &serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[path = "../../../model/tests/support/int8_paths.rs"]
mod int8_paths;
// Used by serve.rs only; the other test binaries share this module.
#[allow(unused_imports)]
pub use int8_paths::rerun_on_every_int8_path;
