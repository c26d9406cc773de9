//! The server holds no memory per request served or per adapter reload once they are over:
//! live heap bytes (counted by this test binary's global allocator) after many mixed requests
//! and unload/reload cycles equal those after the first few. This separates a real leak (a map
//! or cache that keeps something per request or per adapter version) from what `bench/soak.py`
//! sees in RSS, which also includes allocator fragmentation and arenas.
//!
//! Bounded per-thread and per-word state would blur the count and is kept out of it: the
//! tokenizer's word cache (the prompts repeat, so it stops growing in the warm-up), gemm's 2 MiB
//! packing buffer per thread that runs a matmul (one rayon worker here, given it up front) and
//! each thread's own buffers (a fixed set of threads).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use axum::http::StatusCode;
use common::*;
use lowrank_serve::ServeConfig;
use serde_json::json;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn requests_and_adapter_churn_hold_no_memory() {
    // Only this test runs in this binary: the global pool is ours to size.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("the first use of the global rayon pool");
    // gemm allocates its packing buffer on a thread's first large enough matmul, which the
    // warm-up rounds may or may not reach: do one now, on the worker (a scope's body runs there).
    rayon::scope(|_| {
        let x = candle_core::Tensor::ones(
            (512, 512),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        x.matmul(&x).unwrap();
    });
    // Threads hold their own buffers (about 64 KiB each, freed when they exit): a fixed set of
    // blocking threads that never idle out keeps thread churn out of the count.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .max_blocking_threads(4)
        .thread_keep_alive(std::time::Duration::from_secs(3600))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let lm = tiny();
    let root = TempDir::new("live");
    for i in 0..3 {
        random_adapter(&lm.model, &root.path().join(format!("a{i}")), 0.3);
    }
    let s = state(
        lm,
        ServeConfig {
            adapters_dir: Some(root.path().into()),
            admin_key: Some("adm".into()),
            ..Default::default()
        },
    );
    // One round: every kind of request (chat, completion, streaming, mixture, an abandoned
    // stream, a 1e30 scale that fails, bad JSON), and every adapter unloaded and reloaded.
    let round = |k: usize| {
        let s = s.clone();
        async move {
            let name = format!("a{}", k % 3);
            let mut reqs = Vec::new();
            for (i, model) in ["model", name.as_str()].iter().enumerate() {
                reqs.push((
                    "/v1/chat/completions",
                    json!({"model": model, "messages": [{"role": "user", "content": "Hi there"}],
                    "max_tokens": 6, "temperature": 0.7, "seed": k + i}),
                ));
                reqs.push((
                    "/v1/completions",
                    json!({"model": model, "prompt": "Once", "max_tokens": 5, "stream": true}),
                ));
            }
            reqs.push(("/v1/chat/completions", json!({"model": "model", "messages": [{"role": "user", "content": "Mix"}], "max_tokens": 4,
                "adapters": [{"name": "a0", "scale": 0.5}, {"name": "a2", "scale": -0.3}]})));
            reqs.push(("/v1/chat/completions", json!({"model": "model", "messages": [{"role": "user", "content": "Boom"}], "max_tokens": 4,
                "adapters": [{"name": "a1", "scale": 1e30}]})));
            let handles: Vec<_> = reqs
                .into_iter()
                .map(|(uri, b)| {
                    let s = s.clone();
                    tokio::spawn(async move { post(&s, uri, &b).await.status })
                })
                .collect();
            let mut ok = 0;
            for h in handles {
                if h.await.unwrap() == StatusCode::OK {
                    ok += 1;
                }
            }
            assert_eq!(ok, 5, "round {k}");
            let r = call(&s, "POST", "/v1/chat/completions", Some("{bad"), None).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST);
            // An abandoned stream: the body is dropped after the first chunk.
            {
                use futures_util::StreamExt;
                use tower::ServiceExt;
                let body = json!({"model": name, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 40, "stream": true});
                let resp = lowrank_serve::app(s.clone())
                    .oneshot(request(
                        "POST",
                        "/v1/chat/completions",
                        Some(&body.to_string()),
                        None,
                    ))
                    .await
                    .unwrap();
                let mut st = resp.into_body().into_data_stream();
                let _ = st.next().await;
            }
            let r = call(
                &s,
                "DELETE",
                &format!("/v1/adapters/{name}"),
                None,
                Some("adm"),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let b = json!({"name": name, "path": name}).to_string();
            let r = call(&s, "POST", "/v1/adapters", Some(&b), Some("adm")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
    };
    // Until every adapter has been requested, reloaded and its metrics labels exist.
    for k in 0..12 {
        round(k).await;
    }
    let settle = || async {
        // Abandoned rows leave at the scheduler's next step; the tokio blocking pool's idle
        // threads keep their own small buffers, so wait for the server to be idle.
        for _ in 0..400 {
            if s.metrics.running.load(Ordering::Relaxed) == 0 && s.scheduler.queued() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        LIVE.load(Ordering::Relaxed)
    };
    // Three windows of rounds, each must leave the heap as it found it.
    let (windows, n) = (3, 32);
    let mut growth = Vec::new();
    let mut at = settle().await;
    let mut k = 12;
    for _ in 0..windows {
        for _ in 0..n {
            round(k).await;
            k += 1;
        }
        let now = settle().await;
        growth.push(now - at);
        at = now;
    }
    eprintln!("live heap growth per window of {n} rounds: {growth:?} bytes");
    // Zero would be exact (a few hundred bytes come and go with allocator-internal state). A
    // leak of a request's state, a KV cache or an adapter version per round (a kilobyte to
    // megabytes) adds far more than 1 KiB per round.
    assert!(
        growth.iter().all(|&g| g < 1024 * n as isize),
        "the live heap grew: {growth:?} bytes per window of {n} rounds"
    );
}
