//! The server end to end on the tiny HF model: endpoints, streaming, errors, batching
//! isolation, the adapter registry, limits, and one real TCP round trip.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use futures_util::StreamExt;
use lowrank_serve::ServeConfig;
use serde_json::json;
use tower::ServiceExt;

fn chat_body(model: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
}

/// Adapters dir with `a0..a{n-1}` random adapters and the fixture adapter as `fixture`.
fn adapters_dir(lm: &lowrank_model::LoadedModel, n: usize) -> TempDir {
    let d = TempDir::new("adapters");
    for i in 0..n {
        random_adapter(&lm.model, &d.path().join(format!("a{i}")), 0.3);
    }
    copy_fixture_adapter(&d.path().join("fixture"));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_and_shapes() {
    let lm = tiny();
    let dir = adapters_dir(&lm, 1);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            ..Default::default()
        },
    );

    let h = call(&s, "GET", "/health", None, None).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.json()["status"], "ok");

    let m = call(&s, "GET", "/v1/models", None, None).await;
    assert_eq!(m.status, StatusCode::OK);
    let v = m.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data[0]["id"], "model");
    let ids: Vec<&str> = data.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["model", "a0", "fixture"]);
    for d in &data[1..] {
        assert_eq!(d["parent"], "model");
        assert_eq!(d["object"], "model");
        assert_eq!(d["owned_by"], "lowrank");
    }

    // Chat, non-streaming.
    let r = post(&s, "/v1/chat/completions", &chat_body("model", "Hello", 8)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "model");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fr == "stop" || fr == "length");
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=8).contains(&c));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    if fr == "length" {
        assert_eq!(c, 8);
    }

    // Completions, with an adapter by name, as base:adapter, and with max_completion_tokens.
    for model in ["a0", "model:a0", "fixture"] {
        let r = post(&s, "/v1/completions", &json!({"model": model, "prompt": "Once upon", "max_completion_tokens": 5, "temperature": 0})).await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text);
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        assert!(v["choices"][0]["text"].is_string());
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    }
    // Same request under its two names gives the same text; the adapter changes the output.
    let a = chat_text(&s, "a0", "Tell me a story", 12).await;
    assert_eq!(a, chat_text(&s, "model:a0", "Tell me a story", 12).await);
    assert_ne!(a, chat_text(&s, "model", "Tell me a story", 12).await);
    // The `adapters` extension: a0 at scale 1 via the mixture equals a0 by name.
    let r = post(
        &s,
        "/v1/chat/completions",
        &json!({"model": "model", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
                "temperature": 0, "adapters": [{"name": "a0", "scale": 1.0}]}),
    )
    .await;
    assert_eq!(
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        a
    );
    // Mixture with the fixture too: accepted.
    let r = post(
        &s,
        "/v1/chat/completions",
        &json!({"model": "a0", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "adapters": [{"name": "fixture", "scale": 0.5}], "seed": 7, "temperature": 0.8, "top_p": 0.9, "stop": ["\n"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Seeded sampling is reproducible.
    let sampled = |seed: u64| {
        let s = s.clone();
        async move {
            post(&s, "/v1/completions", &json!({"model": "model", "prompt": "abc", "max_tokens": 10, "temperature": 1.0, "seed": seed}))
                .await
                .json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(sampled(42).await, sampled(42).await);

    let m = call(&s, "GET", "/metrics", None, None).await;
    assert_eq!(m.status, StatusCode::OK);
    for name in [
        "lowrank_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "lowrank_prompt_tokens_total",
        "lowrank_completion_tokens_total",
        "lowrank_queue_depth",
        "lowrank_batch_size_bucket",
        "lowrank_time_to_first_token_seconds_bucket",
        "lowrank_inter_token_latency_seconds_count",
        "lowrank_resident_adapters 2",
        "lowrank_adapter_requests_total{adapter=\"a0\"}",
    ] {
        assert!(m.text.contains(name), "metrics lack {name}:\n{}", m.text);
    }
    let l = call(&s, "GET", "/v1/adapters", None, None).await;
    assert_eq!(l.status, StatusCode::OK);
    assert_eq!(l.json()["data"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streaming_matches_non_streaming() {
    let lm = tiny();
    let dir = adapters_dir(&lm, 1);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            ..Default::default()
        },
    );
    for model in ["model", "a0"] {
        let full = chat_text(&s, model, "Write a poem", 16).await;
        let mut body = chat_body(model, "Write a poem", 16);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = post(&s, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, StatusCode::OK);
        let events = r.sse();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let mut text = String::new();
        let mut finish = None;
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], chunks[0]["id"]);
            if let Some(ch) = c["choices"].as_array().unwrap().first() {
                text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
                if !ch["finish_reason"].is_null() {
                    finish = Some(ch["finish_reason"].as_str().unwrap().to_string());
                }
            }
        }
        assert_eq!(text, full);
        assert!(finish.is_some());
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"].as_array().unwrap().len(), 0);
        assert!(last["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

        // Completions stream.
        let r = post(&s, "/v1/completions", &json!({"model": model, "prompt": "The sky", "max_tokens": 10, "temperature": 0, "stream": true})).await;
        let events = r.sse();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let mut text = String::new();
        for e in &events[..events.len() - 1] {
            let c: serde_json::Value = serde_json::from_str(e).unwrap();
            assert_eq!(c["object"], "text_completion");
            text.push_str(c["choices"][0]["text"].as_str().unwrap());
        }
        let full = post(
            &s,
            "/v1/completions",
            &json!({"model": model, "prompt": "The sky", "max_tokens": 10, "temperature": 0}),
        )
        .await;
        assert_eq!(text, full.json()["choices"][0]["text"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_cases() {
    let lm = tiny();
    let s = state(
        lm,
        ServeConfig {
            api_key: Some("sk-test".into()),
            body_limit: 4096,
            max_tokens_limit: 64,
            ..Default::default()
        },
    );
    let key = Some("sk-test");
    let good = chat_body("model", "Hi", 2).to_string();

    let r = call(&s, "POST", "/v1/chat/completions", Some(&good), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    r.error_message();
    let r = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(&good),
        Some("wrong"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&s, "GET", "/v1/models", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s, "POST", "/v1/chat/completions", Some(&good), key)
            .await
            .status,
        StatusCode::OK
    );
    // Health and metrics stay open.
    assert_eq!(
        call(&s, "GET", "/health", None, None).await.status,
        StatusCode::OK
    );

    let cases: Vec<(String, StatusCode, &str)> = vec![
        (chat_body("nope", "Hi", 2).to_string(), StatusCode::NOT_FOUND, "nope"),
        (chat_body("model:nope", "Hi", 2).to_string(), StatusCode::NOT_FOUND, "model:nope"),
        ("{not json".into(), StatusCode::BAD_REQUEST, "invalid JSON"),
        ("[1,2]".into(), StatusCode::BAD_REQUEST, "JSON object"),
        (json!({"messages": [{"role": "user", "content": "x"}]}).to_string(), StatusCode::BAD_REQUEST, "model"),
        (json!({"model": "model"}).to_string(), StatusCode::BAD_REQUEST, "messages"),
        (json!({"model": "model", "messages": []}).to_string(), StatusCode::BAD_REQUEST, "messages"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "n": 2}).to_string(), StatusCode::BAD_REQUEST, "n = 2"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}).to_string(), StatusCode::BAD_REQUEST, "limit"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(), StatusCode::BAD_REQUEST, "at least 1"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "temperature": 3}).to_string(), StatusCode::BAD_REQUEST, "temperature"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(), StatusCode::BAD_REQUEST, "top_p"),
        (json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "adapters": [{"name": "ghost"}]}).to_string(), StatusCode::NOT_FOUND, "ghost"),
        (json!({"model": "model", "messages": "hello"}).to_string(), StatusCode::BAD_REQUEST, "invalid request"),
        ("x".repeat(5000), StatusCode::PAYLOAD_TOO_LARGE, "limit"),
    ];
    for (body, status, needle) in cases {
        let r = call(&s, "POST", "/v1/chat/completions", Some(&body), key).await;
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            &body[..body.len().min(80)],
            r.text
        );
        let msg = r.error_message();
        assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
    }
    let r = call(
        &s,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "model", "prompt": ["a", "b"]}).to_string()),
        key,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = call(
        &s,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "model", "prompt": [1, 999999]}).to_string()),
        key,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let long = "word ".repeat(600); // fits the body limit, not the 512-token context
    let r = call(
        &s,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "model", "prompt": long}).to_string()),
        key,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.error_message().contains("context"));
    let r = call(&s, "GET", "/v1/nothing", None, key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.error_message();
    // Unknown model on the chat endpoint counts in the metrics; the server still serves.
    assert!(s.metrics.requests_of("/v1/chat/completions", 404) >= 2);
    assert_eq!(
        call(&s, "POST", "/v1/chat/completions", Some(&good), key)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn context_overflow_and_timeout() {
    let s = state(
        tiny(),
        ServeConfig {
            body_limit: 1 << 20,
            ..Default::default()
        },
    );
    let long = "word ".repeat(2000);
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "model", "prompt": long}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error_message().contains("context"));
    let s = state(
        tiny(),
        ServeConfig {
            request_timeout: Duration::from_millis(0),
            ..Default::default()
        },
    );
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "model", "prompt": "x", "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    r.error_message();
}

/// The KV budget counts the cache's element type: a request that an f32 cache could not hold
/// within the budget is admitted when the server caches K and V in f16 (half the bytes a token),
/// and the refusal names the bytes it needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_budget_counts_the_cache_element_type() {
    let lm = tiny();
    let c = &lm.model.cfg;
    let f32_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4;
    let cfg = ServeConfig {
        kv_cache_bytes: 100 * f32_token,
        ..Default::default()
    };
    let body = json!({"model": "model", "prompt": "x", "max_tokens": 150, "temperature": 0});
    let s = state(lm, cfg.clone());
    let r = post(&s, "/v1/completions", &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let m = r.error_message();
    assert!(
        m.contains(&format!("budget of {} bytes", 100 * f32_token)),
        "{m}"
    );
    let mut lm = tiny();
    lm.model.set_kv_dtype(lowrank_model::KvDtype::F16);
    let prompt = lm.tok.encode("x").unwrap().len();
    let s = state(lm, cfg);
    // Streamed: while it runs, /metrics shows its reservation (at 2 bytes a value) and the
    // budget; after it, nothing stays reserved.
    // 190 tokens fit the f16 budget (≤ 200); greedy on the tiny model runs them all.
    let sbody = json!({"model": "model", "prompt": "x", "max_tokens": 190, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}});
    let mut stream = open_stream(&s, "/v1/completions", &sbody).await;
    let gauge = |text: &str, name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line[name.len() + 1..].trim().parse().unwrap()
    };
    let m = call(&s, "GET", "/metrics", None, None).await;
    let reserved = gauge(&m.text, "lowrank_kv_cache_reserved_bytes");
    assert_eq!(
        reserved as usize,
        (prompt + 190) * f32_token / 2,
        "{}",
        m.text
    );
    assert_eq!(
        gauge(&m.text, "lowrank_kv_cache_budget_bytes") as usize,
        100 * f32_token
    );
    // The caches hold no more than was reserved.
    assert!(
        gauge(&m.text, "lowrank_kv_cache_bytes") <= reserved,
        "{}",
        m.text
    );
    let mut rest = Vec::new();
    while let Some(c) = stream.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"completion_tokens\":190"), "{rest}");
    let mut left = u64::MAX;
    for _ in 0..400 {
        let m = call(&s, "GET", "/metrics", None, None).await;
        left = gauge(&m.text, "lowrank_kv_cache_reserved_bytes");
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(left, 0, "a finished request's KV reservation stayed");
    let r = post(&s, "/v1/completions", &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Past 200 tokens even f16 does not fit; the need is counted at 2 bytes a value.
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "model", "prompt": "x", "max_tokens": 250}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let m = r.error_message();
    let need: usize = m
        .split("need ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {m}"));
    assert_eq!(need % (f32_token / 2), 0, "{m}");
    assert!((251..=260).contains(&(need / (f32_token / 2))), "{m}");
}

/// Greedy completions in mixed batches (3 adapters, a mixture and the base; different prompt
/// lengths and max_tokens, so prefills and decodes share forwards) equal each request alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn batched_equals_alone() {
    batched_equals_alone_with(lowrank_model::quant::Compute::F32).await;
}

/// The same with int8 compute, where a one-ulp difference anywhere could flip an activation's
/// rounding: rows must be computed identically whatever shares their batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn batched_equals_alone_int8() {
    batched_equals_alone_with(lowrank_model::quant::Compute::Int8).await;
}

/// The int8 batch isolation holds on every int8 kernel path this CPU can run.
#[test]
fn batched_equals_alone_int8_on_every_kernel_path() {
    rerun_on_every_int8_path(&["batched_equals_alone_int8"]);
}

async fn batched_equals_alone_with(compute: lowrank_model::quant::Compute) {
    let mut lm = tiny();
    lm.model.set_compute(compute).unwrap();
    let dir = adapters_dir(&lm, 3);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            prefill_tokens_per_step: 24,
            ..Default::default()
        },
    );
    let prompts = [
        "Hi",
        "Tell me about the weather in Paris today please",
        "1 2 3",
        "What is LoRA?",
        "Write a long story about a dragon and a knight",
    ];
    let models = ["a0", "a1", "a2", "model", "fixture"];
    let mut reqs = Vec::new();
    for i in 0..12 {
        let mut b = chat_body(
            models[i % models.len()],
            prompts[(i * 3) % prompts.len()],
            6 + (i * 5) % 17,
        );
        if i % 4 == 3 {
            b["model"] = json!("model");
            b["adapters"] = json!([{"name": "a0", "scale": 0.5}, {"name": "a2", "scale": 0.7}]);
        }
        reqs.push(b);
    }
    // Each alone, one at a time.
    let mut alone = Vec::new();
    for b in &reqs {
        let r = post(&s, "/v1/chat/completions", b).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        alone.push(
            r.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let distinct: std::collections::BTreeSet<_> = alone.iter().collect();
    assert!(
        distinct.len() >= 4,
        "adapters should give different outputs: {alone:?}"
    );
    let before = s.metrics.batch_rows.max();
    assert_eq!(before, 1.0);
    // All at once, twice (different interleavings).
    for _ in 0..2 {
        let handles: Vec<_> = reqs
            .iter()
            .map(|b| {
                let s = s.clone();
                let b = b.clone();
                tokio::spawn(async move { post(&s, "/v1/chat/completions", &b).await })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let r = h.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap(),
                alone[i],
                "request {i} differs in a batch"
            );
        }
    }
    assert!(
        s.metrics.batch_rows.max() >= 4.0,
        "requests were not batched (max batch {})",
        s.metrics.batch_rows.max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_full_gives_429() {
    let s = state(
        tiny(),
        ServeConfig {
            max_batch: 1,
            max_queue: 1,
            ..Default::default()
        },
    );
    // A long streaming request occupies the only batch slot...
    let mut body = chat_body("model", "Go on", 400);
    body["stream"] = json!(true);
    let stream = open_stream(&s, "/v1/chat/completions", &body).await;
    for _ in 0..400 {
        if s.metrics.running.load(std::sync::atomic::Ordering::Relaxed) == 1
            && s.scheduler.queued() == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...a second one waits in the queue...
    let s2 = s.clone();
    let waiting = tokio::spawn(async move {
        post(
            &s2,
            "/v1/completions",
            &json!({"model": "model", "prompt": "x", "max_tokens": 2}),
        )
        .await
    });
    for _ in 0..200 {
        if s.scheduler.queued() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.scheduler.queued(), 1);
    // ...and a third is refused.
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "model", "prompt": "y", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    r.error_message();
    // Abandoning the stream frees the slot; the queued request completes.
    drop(stream);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_load_unload_and_confinement() {
    let lm = tiny();
    let root = TempDir::new("root");
    random_adapter(&lm.model, &root.path().join("x"), 0.3);
    random_adapter(&lm.model, &root.path().join("nested/y"), 0.3);
    let outside = TempDir::new("outside");
    random_adapter(&lm.model, &outside.path().join("evil"), 0.3);
    std::os::unix::fs::symlink(outside.path().join("evil"), root.path().join("link")).unwrap();

    // No admin key: 403.
    let s = state(
        tiny(),
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            ..Default::default()
        },
    );
    let body = json!({"name": "y", "path": "nested/y"}).to_string();
    let r = call(&s, "POST", "/v1/adapters", Some(&body), Some("anything")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    r.error_message();
    assert_eq!(
        call(&s, "DELETE", "/v1/adapters/x", None, Some("anything"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // The symlink escaping the root was not picked up by the scan.
    let names: Vec<String> = s.registry.names();
    assert_eq!(names, ["x"]);

    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            admin_key: Some("adm".into()),
            ..Default::default()
        },
    );
    let admin = Some("adm");
    assert_eq!(
        call(&s, "POST", "/v1/adapters", Some(&body), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s, "POST", "/v1/adapters", Some(&body), Some("bad"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let r = call(&s, "POST", "/v1/adapters", Some(&body), admin).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g1 = r.json()["generation"].as_u64().unwrap();
    assert!(r.json()["bytes"].as_u64().unwrap() > 0);
    let ids: Vec<String> = call(&s, "GET", "/v1/models", None, None).await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"y".to_string()));
    let y_text = chat_text(&s, "y", "Hello there", 8).await;

    // Traversal, absolute paths outside, symlink escape, bad names.
    let bad = [
        json!({"name": "z", "path": "../outside"}),
        json!({"name": "z", "path": "nested/../../x"}),
        json!({"name": "z", "path": outside.path().join("evil").to_str().unwrap()}),
        json!({"name": "z", "path": "link"}),
        json!({"name": "z", "path": "missing"}),
        json!({"name": "../z", "path": "x"}),
        json!({"name": "model", "path": "x"}),
    ];
    for b in bad {
        let r = call(&s, "POST", "/v1/adapters", Some(&b.to_string()), admin).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{b}: {}", r.text);
        r.error_message();
    }
    // An absolute path inside the root is fine.
    let b = json!({"name": "x2", "path": root.path().join("x").to_str().unwrap()});
    let r = call(&s, "POST", "/v1/adapters", Some(&b.to_string()), admin).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json()["generation"].as_u64().unwrap() > g1);

    // Unload.
    let r = call(&s, "DELETE", "/v1/adapters/y", None, admin).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(
        post(
            &s,
            "/v1/chat/completions",
            &chat_body("y", "Hello there", 8)
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&s, "DELETE", "/v1/adapters/y", None, admin)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Load again: same output, new generation.
    let r = call(&s, "POST", "/v1/adapters", Some(&body), admin).await;
    assert!(r.json()["generation"].as_u64().unwrap() > g1);
    assert_eq!(chat_text(&s, "y", "Hello there", 8).await, y_text);
}

/// Reloading an adapter under the same name while a request streams with it: the stream
/// finishes with the version it started with; new requests get the new version. To make the
/// overlap certain, the streaming request first waits behind a blocker (max_batch = 1) holding
/// its resolved adapter, the reload happens, and only then does it generate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_while_streaming_keeps_old_version() {
    use std::sync::atomic::Ordering::Relaxed;
    let lm = tiny();
    let root = TempDir::new("reload");
    random_adapter(&lm.model, &root.path().join("v1"), 0.3);
    random_adapter(&lm.model, &root.path().join("v2"), 0.3);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            admin_key: Some("adm".into()),
            max_batch: 1,
            ..Default::default()
        },
    );
    let reg = |path: &str| json!({"name": "live", "path": path}).to_string();
    let r = call(&s, "POST", "/v1/adapters", Some(&reg("v1")), Some("adm")).await;
    assert_eq!(r.status, StatusCode::OK);
    let g1 = r.json()["generation"].as_u64().unwrap();
    let n = 60;
    let old = chat_text(&s, "live", "Count with me", n).await;
    assert_eq!(old, chat_text(&s, "v1", "Count with me", n).await);

    let open_stream = |model: &str, max_tokens: usize| {
        let mut body = chat_body(model, "Count with me", max_tokens);
        body["stream"] = json!(true);
        let s = s.clone();
        async move {
            let resp = lowrank_serve::app(s)
                .oneshot(request(
                    "POST",
                    "/v1/chat/completions",
                    Some(&body.to_string()),
                    None,
                ))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().into_data_stream()
        }
    };
    let wait_for = |what: &'static str, f: Box<dyn Fn() -> bool + Send>| async move {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    };
    let blocker = open_stream("model", 450).await;
    let m = s.metrics.clone();
    let sc = s.clone();
    wait_for(
        "the blocker to run",
        Box::new(move || m.running.load(Relaxed) == 1 && sc.scheduler.queued() == 0),
    )
    .await;
    let mut stream = open_stream("live", n).await;
    let sc = s.clone();
    wait_for(
        "the request to queue",
        Box::new(move || sc.scheduler.queued() == 1),
    )
    .await;
    let info = s
        .registry
        .list()
        .into_iter()
        .find(|a| a.name == "live")
        .unwrap();
    assert_eq!(
        info.in_use, 1,
        "the queued streaming request holds the adapter"
    );
    let r = call(&s, "POST", "/v1/adapters", Some(&reg("v2")), Some("adm")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["generation"].as_u64().unwrap() > g1);
    assert!(
        s.registry.resident_bytes() > r.json()["bytes"].as_u64().unwrap(),
        "the old version is still resident (retired, in use)"
    );
    drop(blocker);
    let mut raw = String::new();
    while let Some(b) = stream.next().await {
        raw.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
    }
    let streamed: String = Resp {
        status: StatusCode::OK,
        text: raw,
    }
    .sse()
    .iter()
    .filter(|e| *e != "[DONE]")
    .map(|e| {
        serde_json::from_str::<serde_json::Value>(e).unwrap()["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string()
    })
    .collect();
    assert_eq!(streamed, old);
    let new = chat_text(&s, "live", "Count with me", n).await;
    assert_eq!(new, chat_text(&s, "v2", "Count with me", n).await);
    assert_ne!(new, old);
    // The old version is released once its last request ended.
    assert_eq!(
        s.registry.resident_bytes(),
        3 * r.json()["bytes"].as_u64().unwrap(),
        "live (v2), v1 and v2 by name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_and_foreign_adapters_are_refused() {
    let lm = tiny();
    let root = adapters_dir(&lm, 1);
    // Garbage weights.
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        root.path().join("a0/adapter_config.json"),
        broken.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        broken.join("adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}",
    )
    .unwrap();
    // Trained on another base (fingerprint mismatch).
    let mut foreign = random_adapter(&lm.model, &root.path().join("foreign"), 0.3);
    foreign.provenance.base_fingerprint = Some("sha256s:0000".into());
    lowrank_lora::save_peft(
        &foreign,
        &root.path().join("foreign"),
        candle_core::DType::F32,
    )
    .unwrap();
    // Wrong shapes (an adapter for a bigger model).
    let cfg = std::fs::read_to_string(root.path().join("a0/adapter_config.json")).unwrap();
    let wrong = root.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(wrong.join("adapter_config.json"), cfg).unwrap();
    let t = candle_core::Tensor::zeros((4, 65), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let tb =
        candle_core::Tensor::zeros((64, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
                t,
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
                tb,
            ),
        ]),
        wrong.join("adapter_model.safetensors"),
    )
    .unwrap();

    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            admin_key: Some("adm".into()),
            preload: true,
            ..Default::default()
        },
    );
    for (name, needle) in [
        ("broken", "safetensors"),
        ("foreign", "sha256s:0000"),
        ("wrong", "shape"),
    ] {
        let r = post(&s, "/v1/chat/completions", &chat_body(name, "Hi", 4)).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{name}: {}",
            r.text
        );
        let m = r.error_message();
        assert!(m.contains(name) && m.contains(needle), "{m}");
        // Others keep serving.
        assert_eq!(
            post(&s, "/v1/chat/completions", &chat_body("a0", "Hi", 4))
                .await
                .status,
            StatusCode::OK
        );
        let r = call(
            &s,
            "POST",
            "/v1/adapters",
            Some(&json!({"name": "again", "path": name}).to_string()),
            Some("adm"),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    }
    assert_eq!(
        post(&s, "/v1/chat/completions", &chat_body("fixture", "Hi", 4))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, "GET", "/health", None, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_budget_evicts_idle_lru() {
    let lm = tiny();
    let root = adapters_dir(&lm, 3);
    let one = lowrank_serve::registry::adapter_bytes(
        &lowrank_lora::load_peft(
            &root.path().join("a0"),
            &lm.model.base_shapes(),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            max_adapter_bytes: 2 * one + one / 2,
            ..Default::default()
        },
    );
    let first = chat_text(&s, "a0", "Hi", 6).await;
    for name in ["a1", "a2", "a0", "a1"] {
        chat_text(&s, name, "Hi", 6).await;
        assert!(s.registry.resident_bytes() <= 2 * one + one / 2);
    }
    let loaded: Vec<String> = s
        .registry
        .list()
        .into_iter()
        .filter(|a| a.loaded)
        .map(|a| a.name)
        .collect();
    assert_eq!(loaded, ["a0", "a1"], "a2 was least recently used");
    assert_eq!(chat_text(&s, "a0", "Hi", 6).await, first);
    // An adapter larger than the whole budget is refused clearly.
    let s = state(
        tiny(),
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            max_adapter_bytes: one / 2,
            ..Default::default()
        },
    );
    let r = post(&s, "/v1/chat/completions", &chat_body("a0", "Hi", 4)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error_message().contains("budget"));
}

/// A real socket: raw HTTP/1.1 over loopback, SSE, then graceful shutdown while a request is
/// in flight (it completes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_round_trip_and_graceful_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = state(tiny(), ServeConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lowrank_serve::serve_on(listener, s.clone(), async move {
        let _ = stop_rx.await;
    }));
    let send = |body: String| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).to_string()
    };
    let r = send(chat_body("model", "Hello", 5).to_string()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"chat.completion\""));
    let mut b = chat_body("model", "Hello", 200);
    b["stream"] = json!(true);
    let inflight = tokio::spawn(send(b.to_string()));
    for _ in 0..400 {
        if s.metrics
            .completion_tokens
            .load(std::sync::atomic::Ordering::Relaxed)
            > 5
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_tx.send(()).unwrap();
    let r = inflight.await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("text/event-stream"));
    assert!(r.contains("data: [DONE]"), "stream was cut: {r}");
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    assert!(!s.scheduler.is_alive());
}

/// The load generator runs end to end on the tiny model (small and quick).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_runs() {
    let cfg = lowrank_serve::BenchConfig {
        adapter_counts: vec![1, 3],
        requests: 8,
        concurrency: 4,
        max_tokens: 6,
        time_limit: Duration::from_secs(30),
        rank: 4,
        ..Default::default()
    };
    let rows = lowrank_serve::bench_serve(tiny(), cfg).await.unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    assert_eq!(
        names,
        [
            "base (no adapter)",
            "unmerged, 1 adapter(s)",
            "unmerged, 3 adapter(s)",
            "merged, 1 adapter"
        ]
    );
    for r in &rows {
        assert_eq!(r.requests, 8, "{r:?}");
        assert_eq!(r.failed, 0, "{r:?}");
        assert!(
            r.completion_tokens > 0 && r.tokens_per_s > 0.0 && r.ttft_p50_ms > 0.0,
            "{r:?}"
        );
        assert!(r.ttft_p95_ms >= r.ttft_p50_ms);
        assert_eq!(r.round, 1, "{r:?}");
    }
}

/// `rounds` runs the scenario list round-robin: each round every scenario once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_alternates_rounds() {
    let cfg = lowrank_serve::BenchConfig {
        adapter_counts: vec![1, 2],
        base: false,
        merged: false,
        rounds: 2,
        requests: 2,
        concurrency: 2,
        max_tokens: 3,
        time_limit: Duration::from_secs(30),
        rank: 4,
        ..Default::default()
    };
    let rows = lowrank_serve::bench_serve(tiny(), cfg).await.unwrap();
    let got: Vec<(&str, usize)> = rows
        .iter()
        .map(|r| (r.scenario.as_str(), r.round))
        .collect();
    let (one, two) = ("unmerged, 1 adapter(s)", "unmerged, 2 adapter(s)");
    assert_eq!(got, [(one, 1), (two, 1), (one, 2), (two, 2)]);
    assert!(
        rows.iter()
            .all(|r| r.failed == 0 && r.completion_tokens > 0),
        "{rows:?}"
    );
    let summary = lowrank_serve::format_summary(&rows);
    assert!(summary.contains("median over 2 rounds"), "{summary}");
    assert!(
        summary.contains("unmerged, 2 adapter(s) / 1 adapter"),
        "{summary}"
    );
}

/// The full benchmark on SmolLM2-135M (fetched on first use): 1 / 10 / 100 adapters, merged
/// vs unmerged. Slow; run with `cargo test -p lowrank-serve --release -- --ignored bench_smollm2 --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn bench_smollm2() {
    lowrank_model::init_threads(None);
    let lm = tokio::task::spawn_blocking(|| {
        lowrank_model::LoadedModel::load("smollm2-135m", &candle_core::Device::Cpu).unwrap()
    })
    .await
    .unwrap();
    let cfg = lowrank_serve::BenchConfig {
        serve: ServeConfig {
            model_id: Some("smollm2-135m".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let rows = lowrank_serve::bench_serve(lm, cfg).await.unwrap();
    assert!(rows.iter().all(|r| r.failed == 0), "{rows:?}");
}

/// Text of a non-streaming chat response, or panic with the body.
fn content(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A request's own huge (finite) adapter scale overflows the activations: that request gets a
/// 400 `non_finite_logits` error naming the adapter and scale (streaming: an error event, then
/// `[DONE]`), never text sampled from NaN logits; requests batched with it get bitwise what
/// they get alone, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn non_finite_logits_are_a_request_error() {
    non_finite_logits_with(lowrank_model::quant::Compute::F32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn non_finite_logits_are_a_request_error_int8() {
    non_finite_logits_with(lowrank_model::quant::Compute::Int8).await;
}

async fn non_finite_logits_with(compute: lowrank_model::quant::Compute) {
    let mut lm = tiny();
    lm.model.set_compute(compute).unwrap();
    let dir = adapters_dir(&lm, 2);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            // Small prefill chunks: the bad row's long prompt shares several forwards with the
            // good rows' prefills and decodes before its first logits.
            prefill_tokens_per_step: 6,
            ..Default::default()
        },
    );
    let long = "Write a long story about a dragon and a knight who meet in a dark forest";
    let mut bad = chat_body("model", long, 8);
    bad["adapters"] = json!([{"name": "a1", "scale": 1e30}]);
    let mut bad_stream = bad.clone();
    bad_stream["stream"] = json!(true);
    let good: Vec<serde_json::Value> = vec![
        chat_body("a0", "Hi", 12),
        chat_body("model", "What is LoRA?", 10),
        {
            let mut b = chat_body("model", "Tell me about Paris", 9);
            b["adapters"] = json!([{"name": "a1", "scale": 0.5}]);
            b
        },
        chat_body("fixture", "1 2 3", 14),
    ];

    let check_error = |r: &Resp| {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let v = r.json();
        assert_eq!(v["error"]["code"], "non_finite_logits", "{v}");
        assert_eq!(v["error"]["param"], "adapters", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let m = r.error_message();
        assert!(m.contains("a1") && m.contains("1e30"), "{m}");
        assert!(v.get("choices").is_none());
    };
    let check_stream = |r: &Resp| {
        assert_eq!(r.status, StatusCode::OK);
        let ev = r.sse();
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
        let err: serde_json::Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], "non_finite_logits", "{err}");
        // Nothing but the opening role chunk came before the error.
        for e in &ev[..ev.len() - 2] {
            let c: serde_json::Value = serde_json::from_str(e).unwrap();
            assert!(
                c["choices"][0]["delta"]
                    .get("content")
                    .is_none_or(|t| t == ""),
                "{c}"
            );
        }
    };

    // Alone.
    check_error(&post(&s, "/v1/chat/completions", &bad).await);
    check_stream(&post(&s, "/v1/chat/completions", &bad_stream).await);
    let mut alone = Vec::new();
    for b in &good {
        alone.push(content(&post(&s, "/v1/chat/completions", b).await));
    }
    // Together: the bad requests in the middle of the good ones, twice.
    for _ in 0..2 {
        let mut all = good.clone();
        all.insert(1, bad.clone());
        all.insert(3, bad_stream.clone());
        let handles: Vec<_> = all
            .into_iter()
            .map(|b| {
                let s = s.clone();
                tokio::spawn(async move { post(&s, "/v1/chat/completions", &b).await })
            })
            .collect();
        let mut rs = Vec::new();
        for h in handles {
            rs.push(h.await.unwrap());
        }
        check_error(&rs[1]);
        check_stream(&rs[3]);
        let got: Vec<String> = [0, 2, 4, 5].iter().map(|&i| content(&rs[i])).collect();
        assert_eq!(
            got, alone,
            "a batch-mate's non-finite logits changed other rows"
        );
    }
    assert!(s.metrics.batch_rows.max() >= 3.0, "not batched");
    assert_eq!(
        call(&s, "GET", "/health", None, None).await.status,
        StatusCode::OK
    );
}

/// An adapter whose own config overflows (`lora_alpha: 1e30`), served by name at scale 1: the
/// server's adapter is at fault, not the request: a 500 `non_finite_logits` naming it. The
/// `adapters` extension refuses scales that are not finite in f32 before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_finite_logits_from_a_served_adapter_are_a_server_error() {
    let lm = tiny();
    let dir = adapters_dir(&lm, 1);
    random_adapter(&lm.model, &dir.path().join("huge"), 0.3);
    let cfg_path = dir.path().join("huge/adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = json!(1e30);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            ..Default::default()
        },
    );
    let r = post(&s, "/v1/chat/completions", &chat_body("huge", "Hello", 6)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text);
    let v = r.json();
    assert_eq!(v["error"]["code"], "non_finite_logits", "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let m = r.error_message();
    assert!(m.contains("huge") && m.contains("1e30"), "{m}");
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "model", "prompt": "Hi", "max_tokens": 3,
        "adapters": [{"name": "a0", "scale": 1e39}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.error_message().contains("scale"));
    assert_eq!(
        post(&s, "/v1/chat/completions", &chat_body("a0", "Hello", 4))
            .await
            .status,
        StatusCode::OK
    );
}

/// Adapters registered and deleted under ever new names leave nothing behind: no registry
/// entry, no resident bytes, no `/metrics` series (a map keyed by every name ever served would
/// grow without bound under churn).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_adapters_leave_no_state() {
    let lm = tiny();
    let root = TempDir::new("churn");
    random_adapter(&lm.model, &root.path().join("x"), 0.3);
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            admin_key: Some("adm".into()),
            ..Default::default()
        },
    );
    chat_text(&s, "x", "Hi", 3).await;
    let base_bytes = s.registry.resident_bytes();
    for i in 0..20 {
        let name = format!("tmp{i}");
        let b = json!({"name": name, "path": "x"}).to_string();
        let r = call(&s, "POST", "/v1/adapters", Some(&b), Some("adm")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        chat_text(&s, &name, "Hi", 3).await;
        let m = call(&s, "GET", "/metrics", None, None).await.text;
        assert!(m.contains(&format!("adapter=\"{name}\"")), "{m}");
        let r = call(
            &s,
            "DELETE",
            &format!("/v1/adapters/{name}"),
            None,
            Some("adm"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let m = call(&s, "GET", "/metrics", None, None).await.text;
        assert!(
            !m.contains(&format!("adapter=\"{name}\"")),
            "{name} still in:\n{m}"
        );
    }
    assert_eq!(s.registry.names(), ["x"]);
    // A finished row lets go of its adapter when the scheduler sweeps it, just after its
    // response was sent: until then the deleted version counts as retired.
    for _ in 0..400 {
        if s.registry.resident_bytes() == base_bytes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.registry.resident_bytes(), base_bytes);
    assert_eq!(s.metrics.adapter_series(), 1, "only x has a series");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapter_cards_and_the_playground_page() {
    let lm = tiny();
    let root = adapters_dir(&lm, 1);
    let a0 = random_adapter(&lm.model, &root.path().join("a0"), 0.3);
    std::fs::create_dir_all(root.path().join("broken")).unwrap();
    std::fs::write(root.path().join("broken/adapter_config.json"), b"{").unwrap();
    std::fs::write(
        root.path().join("fixture/README.md"),
        "---\nbase_model: tiny\n---\n# card\n\n| setting | value |\n|---|---|\n| rank | 4 |\n\n\
         | steps | tokens | last loss |\n|---|---|---|\n| 6 | 700 | 2.5 |\n\n\
         | step | training loss |\n|---|---|\n| 1 | 3.0 |\n| 6 | 2.5 |\n",
    )
    .unwrap();
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            api_key: Some("k".into()),
            ..Default::default()
        },
    );

    // The page needs no key (it holds none) and forbids everything but its own API.
    let resp = lowrank_serve::app(s.clone())
        .oneshot(request("GET", "/", None, None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let page = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains("lowrank playground") && page.contains("/v1/chat/completions"));
    assert!(
        !page.contains("innerHTML"),
        "server text must reach the page as text, never as HTML"
    );

    // Cards need the key, like the rest of the API.
    let r = call(&s, "GET", "/v1/adapters/a0", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    let r = call(&s, "GET", "/v1/adapters/a0", None, Some("k")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = r.json();
    assert_eq!(c["id"], "a0");
    assert_eq!(c["parameters"], a0.num_params());
    assert_eq!(c["modules"], a0.modules.len());
    let ranks: Vec<usize> = a0.modules.values().map(|m| m.rank()).collect();
    assert_eq!(c["rank"]["max"], *ranks.iter().max().unwrap());
    assert_eq!(c["rank"]["min"], *ranks.iter().min().unwrap());
    let mut targets: Vec<&str> = a0.modules.keys().map(|k| k.target.peft_name()).collect();
    targets.sort();
    targets.dedup();
    let mut got: Vec<&str> = c["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, targets);
    let on_disk = std::fs::metadata(root.path().join("a0/adapter_model.safetensors"))
        .unwrap()
        .len()
        + std::fs::metadata(root.path().join("a0/adapter_config.json"))
            .unwrap()
            .len();
    assert_eq!(c["file_bytes"], on_disk);
    assert_eq!(c["card"], serde_json::Value::Null);
    // Looking at a card does not load the adapter for serving…
    assert_eq!(c["loaded"], false);
    let l = call(&s, "GET", "/v1/adapters", None, Some("k"))
        .await
        .json();
    assert!(
        l["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["loaded"] == false),
        "{l}"
    );
    // …and once a request has loaded it, the card says so.
    let r = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body("a0", "Hi", 2).to_string()),
        Some("k"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = call(&s, "GET", "/v1/adapters/a0", None, Some("k"))
        .await
        .json();
    assert_eq!(c["loaded"], true);
    assert_eq!(
        c["resident_bytes"],
        lowrank_serve::registry::adapter_bytes(&a0)
    );

    // A model card beside the adapter: its tables, and its text.
    let c = call(&s, "GET", "/v1/adapters/fixture", None, Some("k"))
        .await
        .json();
    let card = &c["card"];
    assert_eq!(card["base_model"], "tiny");
    assert_eq!(card["settings"]["rank"], "4");
    assert_eq!(
        card["results"],
        json!([["steps", "6"], ["tokens", "700"], ["last loss", "2.5"]])
    );
    assert_eq!(card["loss_curve"], json!([[1, 3.0], [6, 2.5]]));
    assert!(card["markdown"]
        .as_str()
        .unwrap()
        .starts_with("---\nbase_model"));

    // Unknown and unloadable adapters are clear errors; the server keeps serving.
    let r = call(&s, "GET", "/v1/adapters/nope", None, Some("k")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error_message().contains("nope"));
    let r = call(&s, "GET", "/v1/adapters/broken", None, Some("k")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.error_message().contains("broken"));
    let r = call(&s, "GET", "/health", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
}
