//! `bench_serve`: a load generator against an in-process server on loopback (127.0.0.1 only).
//!
//! Scenarios: the base model alone; unmerged LoRA with 1, 10, 100 … distinct adapters (requests
//! spread round-robin over them, so batches mix adapters); and the first adapter merged into
//! the base weights (no LoRA work at all). Adapters are random (A and B both random, so they
//! differ), written with `save_peft` into a temp directory that is removed afterwards. Each
//! scenario is bounded by a request count and a time limit; clients stream over raw HTTP/1.1
//! so time-to-first-token is measured where a user would see it.
//!
//! With `rounds` > 1 the scenarios run round-robin that many times, and the summary gives each
//! scenario's median and its decode rate relative to one adapter *within each round*: on a
//! shared machine whose speed drifts by tens of percent over minutes, only ratios of runs
//! minutes apart mean anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Provenance, Target};
use lowrank_model::{Llama, LoadedModel, Tok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::ServeConfig;
use crate::error::{Result, ServeError};
use crate::http::{default_model_id, serve_on, AppState};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Distinct adapters per unmerged scenario.
    pub adapter_counts: Vec<usize>,
    /// Also run the base model alone and the merged-adapter scenario.
    pub base: bool,
    pub merged: bool,
    /// Requests per scenario (upper bound).
    pub requests: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    pub max_tokens: usize,
    pub prompt: String,
    /// Wall-clock bound per scenario: no new request starts after it.
    pub time_limit: Duration,
    /// Times the whole list of scenarios runs, round-robin (at least 1).
    pub rounds: usize,
    /// Rank and projections of the random adapters.
    pub rank: usize,
    pub targets: Vec<Target>,
    /// Server settings (host and port are ignored: the bench listens on 127.0.0.1, port 0).
    pub serve: ServeConfig,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            adapter_counts: vec![1, 10, 100],
            base: true,
            merged: true,
            requests: 64,
            concurrency: 16,
            max_tokens: 32,
            prompt: "Write a short story about a robot learning to paint.".into(),
            time_limit: Duration::from_secs(60),
            rounds: 1,
            rank: 8,
            targets: vec![Target::Q, Target::V],
            serve: ServeConfig::default(),
        }
    }
}

/// One scenario's results.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub scenario: String,
    /// Which round of the scenario list (1-based).
    pub round: usize,
    pub adapters: usize,
    pub requests: usize,
    pub failed: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
    /// Completion tokens over the whole run (prompt processing included).
    pub tokens_per_s: f64,
    /// Aggregate decode rate: tokens / time of the steps in which every row was decoding.
    pub decode_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    /// Mean sequences per batched forward (from the server's metrics).
    pub mean_batch: f64,
}

/// Random adapter for `model`, saved at `dir`.
fn random_adapter(
    model: &Llama,
    dir: &Path,
    rank: usize,
    targets: &[Target],
    seed: u64,
) -> Result<Adapter> {
    let shapes = model.base_shapes();
    let config = LoraConfig::new(rank, 2.0 * rank as f64, targets);
    let mut modules = BTreeMap::new();
    // A small LCG keeps the adapters reproducible without another dependency.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut draw = |n: usize, bound: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32 * bound as f32
            })
            .collect()
    };
    for l in 0..shapes.num_layers {
        for &t in targets {
            let (out, inp) = shapes
                .dims_of(t)
                .ok_or_else(|| ServeError::Invalid(format!("the base has no {t}")))?;
            let a = Tensor::from_vec(
                draw(rank * inp, 1.0 / (inp as f64).sqrt()),
                (rank, inp),
                &Device::Cpu,
            )
            .map_err(model_err)?;
            let b = Tensor::from_vec(draw(out * rank, 0.05), (out, rank), &Device::Cpu)
                .map_err(model_err)?;
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
    lowrank_lora::save_peft(&a, dir, DType::F32).map_err(|e| ServeError::Invalid(e.to_string()))?;
    Ok(a)
}

fn model_err(e: candle_core::Error) -> ServeError {
    ServeError::Model(e.into())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One request's outcome.
struct Outcome {
    ok: bool,
    ttft: Option<Duration>,
    completion_tokens: usize,
}

/// Decode an HTTP/1.1 chunked body (returns the input unchanged if it is not chunked).
fn dechunk(headers: &str, body: &[u8]) -> Vec<u8> {
    if !headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let Some(eol) = body[i..].windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size_line = String::from_utf8_lossy(&body[i..i + eol]).to_string();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        i += eol + 2;
        if size == 0 || i + size > body.len() {
            break;
        }
        out.extend_from_slice(&body[i..i + size]);
        i += size + 2;
    }
    out
}

/// A streaming chat request over raw HTTP/1.1; TTFT is the arrival of the first non-empty
/// content delta.
async fn one_request(addr: std::net::SocketAddr, body: String) -> Outcome {
    let fail = Outcome {
        ok: false,
        ttft: None,
        completion_tokens: 0,
    };
    let t0 = Instant::now();
    let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
        return fail;
    };
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    if c.write_all(req.as_bytes()).await.is_err() {
        return fail;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut ttft = None;
    let needle = b"\"content\":\"";
    loop {
        let n = match c.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return fail,
        };
        let from = buf.len().saturating_sub(needle.len() + 1);
        buf.extend_from_slice(&chunk[..n]);
        if ttft.is_none() {
            let hay = &buf[from..];
            let hit = hay
                .windows(needle.len() + 1)
                .any(|w| &w[..needle.len()] == needle && w[needle.len()] != b'"');
            if hit {
                ttft = Some(t0.elapsed());
            }
        }
    }
    let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return fail;
    };
    let headers = String::from_utf8_lossy(&buf[..split]).to_string();
    if !headers.starts_with("HTTP/1.1 200") {
        return fail;
    }
    let body = dechunk(&headers, &buf[split + 4..]);
    let text = String::from_utf8_lossy(&body);
    let mut tokens = None;
    for line in text.lines() {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d.contains("\"error\"") {
            return fail;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(d) {
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
        }
    }
    match tokens {
        Some(n) => Outcome {
            ok: true,
            ttft: ttft.or(Some(t0.elapsed())),
            completion_tokens: n,
        },
        None => fail,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Run one scenario against a fresh server.
async fn scenario(
    name: &str,
    state: AppState,
    models: Vec<String>,
    n_adapters: usize,
    cfg: &BenchConfig,
) -> Result<BenchRow> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));
    let body_for = |model: &str| {
        serde_json::json!({
            "model": model, "messages": [{"role": "user", "content": cfg.prompt}],
            "max_tokens": cfg.max_tokens, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string()
    };
    // Warm-up (also loads caches and rayon pools).
    let _ = one_request(addr, body_for(&models[0])).await;
    let (sum0, n0) = state.metrics.batch_rows.sum_count();
    let (dsecs0, _) = state.metrics.decode_steps.sum_count();
    let dtok0 = state.metrics.decode_step_tokens.load(Ordering::Relaxed);
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let deadline = t0 + cfg.time_limit;
    let mut tasks = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let next = next.clone();
        let bodies: Vec<String> = models.iter().map(|m| body_for(m)).collect();
        let total = cfg.requests;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                out.push(one_request(addr, bodies[i % bodies.len()].clone()).await);
            }
            out
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(
            t.await
                .map_err(|e| ServeError::Invalid(format!("bench client failed: {e}")))?,
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = server.await;
    let (sum1, n1) = state.metrics.batch_rows.sum_count();
    let (dsecs1, _) = state.metrics.decode_steps.sum_count();
    let dtok1 = state.metrics.decode_step_tokens.load(Ordering::Relaxed);
    // Aggregate decode rate: tokens of the steps where every row was decoding, over their time.
    let decode_tokens_per_s = if dsecs1 > dsecs0 {
        (dtok1 - dtok0) as f64 / (dsecs1 - dsecs0)
    } else {
        0.0
    };
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let tokens: usize = ok.iter().map(|o| o.completion_tokens).sum();
    let mut ttft: Vec<f64> = ok
        .iter()
        .filter_map(|o| o.ttft)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ttft.sort_by(|a, b| a.total_cmp(b));
    // Mean sequences per forward during the run.
    let mean_batch = if n1 > n0 {
        (sum1 - sum0) / (n1 - n0) as f64
    } else {
        0.0
    };
    Ok(BenchRow {
        scenario: name.to_string(),
        round: 1,
        adapters: n_adapters,
        requests: outcomes.len(),
        failed: outcomes.len() - ok.len(),
        completion_tokens: tokens,
        seconds: secs,
        tokens_per_s: tokens as f64 / secs,
        decode_tokens_per_s,
        requests_per_s: ok.len() as f64 / secs,
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p95_ms: percentile(&ttft, 0.95),
        mean_batch,
    })
}

/// The results as a text table.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<24} {:>5} {:>8} {:>6} {:>6} {:>8} {:>8} {:>9} {:>10} {:>7} {:>10} {:>10} {:>7}\n",
        "scenario",
        "round",
        "adapters",
        "reqs",
        "failed",
        "tokens",
        "secs",
        "tok/s",
        "decode t/s",
        "req/s",
        "ttft p50",
        "ttft p95",
        "batch"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<24} {:>5} {:>8} {:>6} {:>6} {:>8} {:>8.2} {:>9.1} {:>10.1} {:>7.2} {:>8.1}ms {:>8.1}ms {:>7.1}\n",
            r.scenario,
            r.round,
            r.adapters,
            r.requests,
            r.failed,
            r.completion_tokens,
            r.seconds,
            r.tokens_per_s,
            r.decode_tokens_per_s,
            r.requests_per_s,
            r.ttft_p50_ms,
            r.ttft_p95_ms,
            r.mean_batch
        ));
    }
    s
}

/// Median of a list: the middle value, or the mean of the two middle ones (NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per scenario (in first-seen order): the median decode and overall tok/s over its rounds and,
/// for the unmerged scenarios, the decode rate over "unmerged, 1 adapter(s)" of the same round
/// (median and each round's). Empty when there is nothing to summarize.
pub fn format_summary(rows: &[BenchRow]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    let one = "unmerged, 1 adapter(s)";
    let decode_of = |name: &str, round: usize| {
        rows.iter()
            .find(|r| r.scenario == name && r.round == round)
            .map(|r| r.decode_tokens_per_s)
    };
    let rounds = rows.iter().map(|r| r.round).max().unwrap_or(0);
    let mut s = String::new();
    if rounds > 1 {
        s.push_str(&format!(
            "median over {rounds} rounds:\n{:<24} {:>10} {:>10}\n",
            "scenario", "tok/s", "decode t/s"
        ));
        for &n in &names {
            let of = |f: fn(&BenchRow) -> f64| -> Vec<f64> {
                rows.iter().filter(|r| r.scenario == n).map(f).collect()
            };
            s.push_str(&format!(
                "{:<24} {:>10.1} {:>10.1}\n",
                n,
                median(&of(|r| r.tokens_per_s)),
                median(&of(|r| r.decode_tokens_per_s))
            ));
        }
    }
    for &n in names
        .iter()
        .filter(|n| n.starts_with("unmerged") && **n != one)
    {
        // Each round's ratio pairs runs minutes apart; rounds lacking either side are skipped.
        let ratios: Vec<f64> = (1..=rounds)
            .filter_map(|k| match (decode_of(n, k), decode_of(one, k)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            })
            .collect();
        if ratios.is_empty() {
            continue;
        }
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        s.push_str(&format!(
            "decode, {n} / 1 adapter: {:.3}x (median; per round {})\n",
            median(&ratios),
            each.join(", ")
        ));
    }
    s
}

/// Run the benchmark on `lm` (consumed: its tokenizer is shared by every scenario's server)
/// and print the table to stdout; progress goes to stderr.
pub async fn bench_serve(lm: LoadedModel, cfg: BenchConfig) -> Result<Vec<BenchRow>> {
    let base_id = cfg
        .serve
        .model_id
        .clone()
        .unwrap_or_else(|| default_model_id(&lm.source));
    let eos = lm.eos_ids();
    let model = lm.model;
    let tok: Arc<Tok> = Arc::new(lm.tok);
    let max_n = cfg
        .adapter_counts
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(if cfg.merged { 1 } else { 0 });
    let dir = TempDir(std::env::temp_dir().join(format!(
            "lowrank-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        )));
    let _ = std::fs::remove_dir_all(&dir.0);
    let names: Vec<String> = (0..max_n).map(|i| format!("bench-{i:03}")).collect();
    eprintln!(
        "bench: writing {max_n} random adapters (r = {}, {:?}) to {}",
        cfg.rank,
        cfg.targets,
        dir.0.display()
    );
    let mut first: Option<Adapter> = None;
    {
        let model = model.clone();
        let (names, d, rank, targets) =
            (names.clone(), dir.0.clone(), cfg.rank, cfg.targets.clone());
        let a0 = tokio::task::spawn_blocking(move || -> Result<Option<Adapter>> {
            let mut a0 = None;
            for (i, n) in names.iter().enumerate() {
                let a = random_adapter(&model, &d.join(n), rank, &targets, i as u64 + 1)?;
                if i == 0 {
                    a0 = Some(a);
                }
            }
            Ok(a0)
        })
        .await
        .map_err(|e| ServeError::Invalid(e.to_string()))??;
        first = first.or(a0);
    }
    let mut rows = Vec::new();
    let make_state = |m: Llama, with_adapters: bool| {
        let mut sc = cfg.serve.clone();
        sc.adapters_dir = with_adapters.then(|| dir.0.clone());
        sc.preload = with_adapters;
        sc.max_tokens_limit = sc.max_tokens_limit.max(cfg.max_tokens);
        sc.max_queue = sc.max_queue.max(cfg.concurrency);
        let (tok, eos, id) = (tok.clone(), eos.clone(), base_id.clone());
        async move {
            tokio::task::spawn_blocking(move || AppState::from_parts(m, tok, eos, id, sc))
                .await
                .map_err(|e| ServeError::Invalid(e.to_string()))?
        }
    };
    if max_n > 0 {
        // Hot-load: registering an adapter from disk into a running registry (read, validate,
        // fingerprint check, install), timed per adapter after one warm-up load.
        let st = make_state(model.clone(), true).await?;
        let names = names.clone();
        let times = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
            let mut times = Vec::new();
            for (i, n) in names.iter().enumerate().take(21) {
                let t = std::time::Instant::now();
                st.registry
                    .register(&format!("hot-{i}"), n)
                    .map_err(|e| ServeError::Invalid(format!("hot-load {n}: {e}")))?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(times)
        })
        .await
        .map_err(|e| ServeError::Invalid(e.to_string()))??;
        if !times.is_empty() {
            let mut t = times.clone();
            t.sort_by(|a, b| a.total_cmp(b));
            println!(
                "hot-load (r = {}, {:?}): median {:.2} ms, max {:.2} ms over {} loads",
                cfg.rank,
                cfg.targets,
                percentile(&t, 0.5),
                t[t.len() - 1],
                t.len()
            );
        }
    }
    // The scenario list, run `rounds` times round-robin (each scenario on a fresh server).
    let merged = match (cfg.merged, first.take()) {
        (true, Some(a)) => Some(model.merged(&[(Arc::new(a), 1.0)])?),
        _ => None,
    };
    let mut list: Vec<(String, Option<Llama>, Option<usize>)> = Vec::new();
    if cfg.base {
        list.push(("base (no adapter)".into(), None, None));
    }
    for &n in cfg.adapter_counts.iter().filter(|&&n| n > 0) {
        list.push((format!("unmerged, {n} adapter(s)"), None, Some(n)));
    }
    if let Some(m) = merged {
        list.push(("merged, 1 adapter".into(), Some(m), None));
    }
    let rounds = cfg.rounds.max(1);
    for round in 1..=rounds {
        for (name, merged, unmerged) in &list {
            eprintln!("bench: {name} (round {round} of {rounds})");
            let mut row = match (merged, unmerged) {
                (Some(m), _) => {
                    let st = make_state(m.clone(), false).await?;
                    scenario(name, st, vec![base_id.clone()], 1, &cfg).await?
                }
                (None, Some(n)) => {
                    let st = make_state(model.clone(), true).await?;
                    scenario(name, st, names[..*n].to_vec(), *n, &cfg).await?
                }
                (None, None) => {
                    let st = make_state(model.clone(), false).await?;
                    scenario(name, st, vec![base_id.clone()], 0, &cfg).await?
                }
            };
            row.round = round;
            rows.push(row);
        }
    }
    println!("{}", arithmetic_line(&model));
    println!("{}", format_table(&rows));
    print!("{}", format_summary(&rows));
    Ok(rows)
}

/// Which arithmetic ran: the compute mode and, for int8, the kernel path this CPU took
/// (`LOWRANK_INT8_KERNEL` forces one), so figures from different CPUs are not mixed up.
pub fn arithmetic_line(model: &Llama) -> String {
    let attention = format!(
        "attention kernel {} (this CPU supports: {}), KV cache {}",
        lowrank_model::ops::attention_kernel_name(),
        lowrank_model::ops::supported_attention_kernels().join(", "),
        model.kv_dtype().name()
    );
    match model.compute() {
        lowrank_model::quant::Compute::F32 => format!("compute: f32; {attention}"),
        c @ (lowrank_model::quant::Compute::Int8 | lowrank_model::quant::Compute::Int4) => format!(
            "compute: {}, kernel {} (this CPU supports: {}); {attention}",
            c.name(),
            lowrank_model::quant::kernel_name(),
            lowrank_model::quant::supported_kernels().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, round: usize, decode: f64) -> BenchRow {
        BenchRow {
            scenario: name.into(),
            round,
            adapters: 0,
            requests: 1,
            failed: 0,
            completion_tokens: 1,
            seconds: 1.0,
            tokens_per_s: decode / 2.0,
            decode_tokens_per_s: decode,
            requests_per_s: 1.0,
            ttft_p50_ms: 1.0,
            ttft_p95_ms: 1.0,
            mean_batch: 1.0,
        }
    }

    /// Ratios pair scenarios of the same round (the machine drifts between rounds), and the
    /// medians are of each scenario's own rounds.
    #[test]
    fn summary_pairs_rounds() {
        let one = "unmerged, 1 adapter(s)";
        let many = "unmerged, 100 adapter(s)";
        let rows = [
            row("base (no adapter)", 1, 110.0),
            row(one, 1, 100.0),
            row(many, 1, 90.0),
            row("base (no adapter)", 2, 220.0),
            row(one, 2, 200.0),
            row(many, 2, 190.0),
            row("base (no adapter)", 3, 55.0),
            row(one, 3, 50.0),
            row(many, 3, 40.0),
        ];
        let s = format_summary(&rows);
        // per round 0.9, 0.95, 0.8: median 0.9 (the ratio of medians would be 0.9 too, but
        // the pooled mean 320/350 would not be what any round saw)
        assert!(
            s.contains("decode, unmerged, 100 adapter(s) / 1 adapter: 0.900x (median; per round 0.900, 0.950, 0.800)"),
            "{s}"
        );
        assert!(s.contains("median over 3 rounds"), "{s}");
        let base = s.lines().find(|l| l.starts_with("base")).unwrap();
        assert!(base.ends_with("110.0"), "{base}");
        // One round: no medians table, the ratio line still.
        let s1 = format_summary(&rows[..3]);
        assert!(!s1.contains("median over"), "{s1}");
        assert!(s1.contains("0.900x"), "{s1}");
        // Nothing to pair: nothing printed.
        assert_eq!(format_summary(&rows[..1]), "");
        // An even count of rounds: the mean of the middle two, not the upper one.
        let s2 = format_summary(&rows[..6]);
        assert!(
            s2.contains(": 0.925x (median; per round 0.900, 0.950)"),
            "{s2}"
        );
        assert!(
            s2.lines()
                .any(|l| l.starts_with("base") && l.ends_with("165.0")),
            "{s2}"
        );
    }
}
