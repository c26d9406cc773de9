//! Fuzzing the request bodies of every POST route (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/adapters`) through the in-process router: arbitrary bytes, arbitrary JSON, and valid
//! bodies with fields removed, replaced by arbitrary or edge values, truncated or with a byte
//! changed. Every answer is a success of the right shape or a 4xx with an OpenAI error object;
//! nothing panics, nothing is a 5xx, and the server answers a valid request the same way
//! afterwards. Seeds (the bugs found by hand, such as a 1e30 adapter scale) run first with
//! their exact expected status.

mod common;

use std::collections::BTreeMap;

use axum::http::StatusCode;
use common::*;
use lowrank_serve::{AppState, ServeConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

const ROUTES: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/adapters"];
const ADMIN: &str = "adm";

/// Valid bodies per route, the bases the mutations start from.
fn bases(route: usize) -> Vec<Value> {
    match route {
        0 => vec![
            json!({"model": "model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}),
            json!({"model": "a0", "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                   "stream": true, "stream_options": {"include_usage": true}, "seed": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "stop": ["\n"]}),
            json!({"model": "model", "messages": [{"role": "user", "content": "Mix"}], "max_completion_tokens": 2,
                   "adapters": [{"name": "a0", "scale": 0.5}, {"name": "fixture", "scale": 1.0}], "n": 1}),
        ],
        1 => vec![
            json!({"model": "model", "prompt": "Once upon", "max_tokens": 3, "temperature": 0}),
            json!({"model": "model:a0", "prompt": [1, 2, 3], "stream": true, "stop": "x"}),
            json!({"model": "fixture", "prompt": ["One prompt"], "adapters": [{"name": "a0"}], "seed": -3}),
        ],
        _ => vec![
            json!({"name": "fuzzed", "path": "a0"}),
            json!({"name": "a0", "path": "fixture"}),
        ],
    }
}

/// Field names the routes know (top level and nested paths), and a few they don't.
const KEYS: [&str; 27] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "adapters",
    "name",
    "path",
    "messages.0.role",
    "messages.0.content",
    "messages.0.content.0.type",
    "messages.0.content.0.text",
    "messages.1",
    "adapters.0.name",
    "adapters.0.scale",
    "adapters.1.scale",
    "stream_options.include_usage",
    "prompt.0",
    "unknown_field",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..600).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.5,
            1.0,
            2.0,
            2.0001,
            -1.0,
            1e-300,
            1e30,
            -1e30,
            3.4e38,
            3.5e38,
            1e308,
            f64::MAX,
            f64::MIN_POSITIVE
        ])
        .prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "model",
            "a0",
            "fixture",
            "model:a0",
            "model:",
            ":a0",
            "user",
            "assistant",
            "system",
            "tool",
            "text",
            "image_url",
            "..",
            "../a0",
            "/",
            "/etc",
            "",
            " ",
            "\u{0}",
            "é",
            "<|endoftext|>",
            "<|im_start|>",
            "\u{FFFD}",
        ])
        .prop_map(Value::from),
        "[ -~]{0,24}".prop_map(Value::from),
        any::<String>().prop_map(|s| Value::from(s.chars().take(24).collect::<String>())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(KEYS.to_vec()).prop_map(String::from),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Set (or with `None` remove) the value at a dotted path; parts that do not exist are skipped.
fn set_path(v: &mut Value, path: &str, new: Option<Value>) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = v;
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match (cur, p.parse::<usize>()) {
            (Value::Array(a), Ok(k)) => {
                if last {
                    match new {
                        Some(n) if k < a.len() => a[k] = n,
                        Some(n) => a.push(n),
                        None if k < a.len() => {
                            a.remove(k);
                        }
                        None => {}
                    }
                    return;
                }
                match a.get_mut(k) {
                    Some(x) => x,
                    None => return,
                }
            }
            (Value::Object(o), _) => {
                if last {
                    match new {
                        Some(n) => {
                            o.insert(p.to_string(), n);
                        }
                        None => {
                            o.remove(*p);
                        }
                    }
                    return;
                }
                match o.get_mut(*p) {
                    Some(x) => x,
                    None => return,
                }
            }
            _ => return,
        };
        cur = next;
    }
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
    Mutated {
        base: usize,
        edits: Vec<(&'static str, Option<Value>)>,
        /// Then, on the serialized text: cut at this fraction, or replace the byte there.
        cut: Option<f64>,
        poke: Option<(f64, u8)>,
    },
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Bytes),
        2 => value().prop_map(Body::Json),
        6 => (
            0usize..3,
            prop::collection::vec(
                (prop::sample::select(KEYS.to_vec()), prop::option::weighted(0.8, value())),
                0..4
            ),
            prop::option::weighted(0.1, 0.0..1.0f64),
            prop::option::weighted(0.1, (0.0..1.0f64, any::<u8>())),
        )
            .prop_map(|(base, edits, cut, poke)| Body::Mutated { base, edits, cut, poke }),
    ]
}

fn render(route: usize, b: &Body) -> Vec<u8> {
    match b {
        Body::Bytes(v) => v.clone(),
        Body::Json(v) => v.to_string().into_bytes(),
        Body::Mutated {
            base,
            edits,
            cut,
            poke,
        } => {
            let bases = bases(route);
            let mut v = bases[base % bases.len()].clone();
            for (k, new) in edits {
                set_path(&mut v, k, new.clone());
            }
            let mut s = v.to_string().into_bytes();
            if let Some(f) = cut {
                s.truncate((s.len() as f64 * f) as usize);
            }
            if let Some((f, byte)) = poke {
                if !s.is_empty() {
                    let i = ((s.len() as f64 * f) as usize).min(s.len() - 1);
                    s[i] = *byte;
                }
            }
            s
        }
    }
}

/// POST raw bytes (not necessarily UTF-8) with the admin key.
async fn post_bytes(s: &AppState, uri: &str, body: Vec<u8>) -> Resp {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(axum::body::Body::from(body))
        .unwrap();
    let resp = lowrank_serve::app(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let is_sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|c| c.to_str().unwrap_or("").starts_with("text/event-stream"));
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&bytes).to_string();
    if is_sse {
        text.insert_str(0, "\u{1}SSE\n");
    }
    Resp { status, text }
}

/// The invariant every answer keeps; `Err` describes a violation.
fn check(route: usize, r: &Resp) -> Result<(), String> {
    let code = r.status.as_u16();
    if r.status.is_success() {
        if let Some(sse) = r.text.strip_prefix("\u{1}SSE\n") {
            let events = Resp {
                status: r.status,
                text: sse.to_string(),
            }
            .sse();
            if events.last().map(String::as_str) != Some("[DONE]") {
                return Err(format!("stream does not end with [DONE]: {events:?}"));
            }
            for e in &events[..events.len() - 1] {
                let v: Value =
                    serde_json::from_str(e).map_err(|x| format!("event not JSON ({x}): {e}"))?;
                if let Some(err) = v.get("error") {
                    // A failure after the stream started: only the request's own fault.
                    if err["type"] == "server_error" || err["message"].as_str().is_none() {
                        return Err(format!("server error in a stream: {v}"));
                    }
                } else if v["choices"].as_array().is_none() {
                    return Err(format!("chunk without choices: {v}"));
                }
            }
            return Ok(());
        }
        let v: Value = serde_json::from_str(&r.text)
            .map_err(|x| format!("{code} body not JSON ({x}): {}", r.text))?;
        let ok = if route == 2 {
            v["object"] == "adapter" && v["id"].is_string()
        } else {
            v["choices"][0]["finish_reason"].is_string()
        };
        return if ok {
            Ok(())
        } else {
            Err(format!("{code} with an unexpected body: {v}"))
        };
    }
    if !r.status.is_client_error() {
        return Err(format!("status {code}: {}", r.text));
    }
    let v: Value = serde_json::from_str(&r.text)
        .map_err(|x| format!("{code} error body not JSON ({x}): {}", r.text))?;
    let e = &v["error"];
    let shaped = e["message"].as_str().is_some_and(|m| !m.is_empty())
        && e["type"].is_string()
        && ["param", "code"].iter().all(|k| e.get(*k).is_some());
    if shaped {
        Ok(())
    } else {
        Err(format!("{code} without an OpenAI error object: {v}"))
    }
}

/// Found by hand (issue 16) and by earlier runs: each with the status it must get.
fn seeds() -> Vec<(usize, Value, u16)> {
    let chat = |extra: Value| {
        let mut b = json!({"model": "model", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    vec![
        // A finite but huge scale: NaN logits. It was a 200 with `<|endoftext|>` repeated.
        (
            0,
            chat(json!({"adapters": [{"name": "a0", "scale": 1e30}]})),
            400,
        ),
        (
            0,
            chat(json!({"adapters": [{"name": "a0", "scale": 1e30}], "stream": true})),
            200,
        ),
        (
            1,
            json!({"model": "a0", "prompt": "x", "max_tokens": 2, "adapters": [{"name": "fixture", "scale": -1e30}]}),
            400,
        ),
        // Beyond f32: refused before it runs.
        (
            0,
            chat(json!({"adapters": [{"name": "a0", "scale": 3.5e38}]})),
            400,
        ),
        (
            0,
            chat(json!({"adapters": [{"name": "a0", "scale": 1.5}]})),
            200,
        ),
        (0, chat(json!({"max_tokens": 1.5})), 400),
        (0, chat(json!({"max_tokens": u64::MAX})), 400),
        (
            1,
            json!({"model": "model", "prompt": [], "max_tokens": 2}),
            400,
        ),
        (2, json!({"name": "x", "path": "../../etc"}), 400),
        (2, json!({"name": "", "path": "a0"}), 400),
    ]
}

#[test]
fn post_bodies_never_panic_and_bad_ones_get_a_4xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lm = tiny();
    let dir = TempDir::new("fuzz");
    random_adapter(&lm.model, &dir.path().join("a0"), 0.3);
    copy_fixture_adapter(&dir.path().join("fixture"));
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(dir.path().into()),
            admin_key: Some(ADMIN.into()),
            // Small limits keep each case to milliseconds (and large values are 4xx).
            max_tokens_limit: 4,
            body_limit: 16 << 10,
            ..Default::default()
        },
    );
    let probe = || {
        let s = s.clone();
        rt.block_on(async move {
            let r = post(
                &s,
                "/v1/chat/completions",
                &json!({"model": "model", "messages": [{"role": "user", "content": "Probe"}], "max_tokens": 4, "temperature": 0}),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r.json()["choices"][0]["message"]["content"].clone()
        })
    };
    let before = probe();

    for (route, body, want) in seeds() {
        let r = rt.block_on(post_bytes(&s, ROUTES[route], body.to_string().into_bytes()));
        assert_eq!(
            r.status.as_u16(),
            want,
            "{} {body}: {}",
            ROUTES[route],
            r.text
        );
        check(route, &r).unwrap_or_else(|e| panic!("{} {body}: {e}", ROUTES[route]));
        if body.to_string().contains("1e30") && want == 200 {
            // Streaming: the error event, then the end.
            assert!(r.text.contains("non_finite_logits"), "{}", r.text);
        }
    }

    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(0usize..3, body()), |(route, b)| {
        let bytes = render(route, &b);
        let r = rt.block_on(post_bytes(&s, ROUTES[route], bytes.clone()));
        check(route, &r).map_err(|e| {
            TestCaseError::fail(format!(
                "{} {}: {e}",
                ROUTES[route],
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        prop_assert!(s.scheduler.is_alive(), "the scheduler died");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still serving, and the base model's answer is what it was.
    assert_eq!(probe(), before);
    let h = rt.block_on(call(&s, "GET", "/health", None, None));
    assert_eq!(h.status, StatusCode::OK, "{}", h.text);
}
