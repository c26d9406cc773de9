//! `lowrank serve` and `lowrank bench (infer | train | serve)`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use lowrank_model::{ForwardOpts, LogitsMode, SeqInput};

use super::{ComputeArg, ModelArg};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub compute: ComputeArg,
    /// Where the adapters are, each sub-directory (holding adapter_config.json) served under
    /// its name: a local directory, or an object store location (s3://bucket/prefix, gs://,
    /// az://, http(s)://, file://; credentials from AWS_*, GOOGLE_*, AZURE_* variables),
    /// fetched on first use into a verified local cache.
    #[arg(long)]
    pub adapters: Option<String>,
    /// Cache for adapters from an object store [default: $LOWRANK_HOME/adapter-cache].
    #[arg(long)]
    pub adapter_cache: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "LOWRANK_API_KEY")]
    pub api_key: Option<String>,
    /// Key for POST/DELETE /v1/adapters (disabled without it).
    #[arg(long, env = "LOWRANK_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Most sequences in one batched forward step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Byte budget for resident adapters (LRU eviction of idle ones beyond it).
    #[arg(long, default_value_t = 2 << 30)]
    pub max_adapter_bytes: u64,
    /// Byte budget for the KV caches of running requests: a request is admitted while the
    /// caches reserved for every running one (prompt + max_tokens each, at the cache type's
    /// bytes per token) fit in it; one that alone needs more gets HTTP 400.
    #[arg(long, default_value_t = 4 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_bytes: u64,
    /// Requests waiting for a batch slot before new ones get HTTP 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Load every adapter at start instead of on first use.
    #[arg(long)]
    pub preload: bool,
    /// On SIGTERM or Ctrl-C: seconds during which /health answers 503 ("draining") while
    /// requests are still served, before the listener closes (in-flight requests always
    /// finish). Set it above the readiness probe's period behind a load balancer.
    #[arg(long, default_value_t = 0.0)]
    pub drain_seconds: f64,
}

fn model_id(spec: &str) -> Option<String> {
    (spec == lowrank_model::fetch::DEFAULT_ALIAS).then(|| spec.to_string())
}

pub fn serve(a: ServeArgs, device: &Device) -> Result<()> {
    // A packed compute packs while loading: no f32 copy of the base stays resident (adapters
    // run unmerged, from their own f32 A and B).
    let lm = a.compute.load(&a.model, device, false)?;
    let mut cfg = lowrank_serve::ServeConfig {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        admin_key: a.admin_key.clone(),
        adapters_dir: a
            .adapters
            .as_ref()
            .filter(|u| !lowrank_store::is_url(u))
            .map(PathBuf::from),
        adapters_url: a.adapters.clone().filter(|u| lowrank_store::is_url(u)),
        adapter_cache: a.adapter_cache.clone(),
        max_batch: a.max_batch.max(1),
        max_adapter_bytes: a.max_adapter_bytes,
        kv_cache_bytes: usize::try_from(a.kv_cache_bytes)
            .context("--kv-cache-bytes does not fit this machine's address space")?,
        max_queue: a.max_queue,
        preload: a.preload,
        model_id: model_id(&a.model.model),
        drain_delay: Duration::try_from_secs_f64(a.drain_seconds)
            .ok()
            .filter(|d| *d <= Duration::from_secs(3600))
            .context("--drain-seconds must be between 0 and 3600")?,
        ..Default::default()
    };
    if cfg.max_batch == 0 {
        cfg.max_batch = 1;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = async {
            let signal = shutdown_signal().await;
            eprintln!("{signal}: shutting down (in-flight requests finish first)");
        };
        lowrank_serve::serve(lm, cfg, shutdown).await
    })?;
    Ok(())
}

/// The first of Ctrl-C (SIGINT) and, on Unix, SIGTERM (what Kubernetes and systemd send).
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupted"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted"
    }
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill tok/s (512-token prompt) and single-stream decode tok/s (128 tokens).
    Infer {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        compute: ComputeArg,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prompt.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Measurements taken (each a fresh prefill and decode).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Training step speed: LoRA (r=8 on q,v) on random tokens, batch × seq, like the PEFT peer.
    Train {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        compute: ComputeArg,
        /// Sequences per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Measured steps (one warm-up step more is run and dropped).
        #[arg(long, default_value_t = 6)]
        steps: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Comma-separated modules to adapt.
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// Full fine-tuning instead of LoRA.
        #[arg(long)]
        full: bool,
        /// Layer checkpointing (as `train --checkpoint-layers`).
        #[arg(long)]
        checkpoint_layers: bool,
        /// The backward's product through the packed base (as `train --backward-dx`).
        #[arg(long)]
        backward_dx: Option<String>,
    },
    /// Load generator against a server on loopback: 1 / 10 / 100 adapters, merged vs unmerged.
    Serve {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        compute: ComputeArg,
        /// Distinct adapters per unmerged scenario (comma-separated scenarios).
        #[arg(long, default_value = "1,10,100", value_delimiter = ',')]
        adapters: Vec<usize>,
        /// Requests per scenario (at most; see --time-limit).
        #[arg(long, default_value_t = 64)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Seconds per scenario (no new request starts after it).
        #[arg(long, default_value_t = 60)]
        time_limit: u64,
        /// Run the scenario list this many times, round-robin, and summarize medians and
        /// within-round ratios (for machines whose speed drifts between scenarios).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        /// Leave out the base-model scenario.
        #[arg(long)]
        no_base: bool,
        /// Leave out the merged-adapter scenario.
        #[arg(long)]
        no_merged: bool,
    },
}

impl BenchCmd {
    pub fn is_training(&self) -> bool {
        matches!(self, BenchCmd::Train { .. })
    }
}

pub fn bench(c: BenchCmd, device: &Device) -> Result<()> {
    match c {
        BenchCmd::Infer {
            model,
            compute,
            prompt_tokens,
            decode_tokens,
            repeats,
        } => bench_infer(
            &model,
            &compute,
            prompt_tokens,
            decode_tokens,
            repeats,
            device,
        ),
        BenchCmd::Train {
            model,
            compute,
            batch,
            seq,
            steps,
            rank,
            targets,
            full,
            checkpoint_layers,
            backward_dx,
        } => bench_train(
            &model,
            compute.compute.into(),
            (batch, seq, steps),
            rank,
            &targets,
            (full, checkpoint_layers),
            backward_dx.as_deref(),
            device,
        ),
        BenchCmd::Serve {
            model,
            compute,
            adapters,
            requests,
            concurrency,
            max_tokens,
            time_limit,
            rounds,
            no_base,
            no_merged,
        } => {
            // The merged scenario merges into the f32 weights, so they stay loaded for it.
            let lm = compute.load(&model, device, !no_merged)?;
            let cfg = lowrank_serve::BenchConfig {
                adapter_counts: adapters,
                requests,
                concurrency,
                max_tokens,
                time_limit: Duration::from_secs(time_limit),
                rounds: rounds as usize,
                base: !no_base,
                merged: !no_merged,
                serve: lowrank_serve::ServeConfig {
                    model_id: model_id(&model.model),
                    ..Default::default()
                },
                ..Default::default()
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(lowrank_serve::bench_serve(lm, cfg))?;
            Ok(())
        }
    }
}

fn bench_infer(
    m: &ModelArg,
    compute: &ComputeArg,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
    device: &Device,
) -> Result<()> {
    // Loaded as `serve` and `generate` load it (packed while loading for a packed compute).
    let lm = compute.load(m, device, false)?;
    let text = "The history of low-rank adaptation begins with the observation that fine-tuning updates have low intrinsic rank. ".repeat(64);
    let mut ids = lm.tok.encode(&text)?;
    ids.truncate(prompt_tokens);
    if ids.len() < prompt_tokens {
        anyhow::bail!("could not build a {prompt_tokens}-token prompt");
    }
    let mut prefill = vec![];
    let mut decode = vec![];
    for _ in 0..repeats.max(1) {
        let mut cache = lm.model.new_cache();
        let t = Instant::now();
        let mut logits = {
            let mut s = [SeqInput {
                tokens: &ids,
                cache: Some(&mut cache),
                adapters: None,
                logits: LogitsMode::Last,
            }];
            lm.model
                .forward(&mut s, &mut ForwardOpts::infer())?
                .pop()
                .flatten()
                .context("logits")?
        };
        prefill.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..decode_tokens {
            let id = lowrank_model::model::argmax_rows(&logits)?[0];
            let mut s = [SeqInput {
                tokens: &[id],
                cache: Some(&mut cache),
                adapters: None,
                logits: LogitsMode::Last,
            }];
            logits = lm
                .model
                .forward(&mut s, &mut ForwardOpts::infer())?
                .pop()
                .flatten()
                .context("logits")?;
        }
        decode.push(decode_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({
            "prefill_tokens": prompt_tokens, "prefill_tok_s": (med(&mut prefill) * 10.0).round() / 10.0,
            "decode_tokens": decode_tokens, "decode_tok_s": (med(&mut decode) * 10.0).round() / 10.0,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(), "compute": format!("{:?}", compute.compute).to_lowercase(),
            "int8_kernel": lm.model.compute().packed().then(lowrank_model::quant::kernel_name),
            "cpu_int8_kernels": lowrank_model::quant::supported_kernels(),
            "attention_kernel": lowrank_model::ops::attention_kernel_name(),
            "kv_cache": lm.model.kv_dtype().name(),
            "cpu_attention_kernels": lowrank_model::ops::supported_attention_kernels(),
        })
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_train(
    m: &ModelArg,
    compute: lowrank_model::quant::Compute,
    (batch, seq, steps): (usize, usize, usize),
    rank: usize,
    targets: &str,
    (full, checkpoint_layers): (bool, bool),
    backward_dx: Option<&str>,
    device: &Device,
) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let dx = super::backward_dx(backward_dx, compute)?;
    let mut lm = super::load_for(m, device, compute)?;
    if let Some(dx) = dx {
        lm.model.set_train_dx(dx);
    }
    let dir = std::env::temp_dir().join(format!("lowrank-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Random tokens, every position a target (the PEFT peer's labels = input_ids).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let data = dir.join("data.jsonl");
    let mut lines = String::new();
    let vocab = lm.model.cfg.vocab_size as u32;
    for _ in 0..batch * (steps + 1) {
        let ids: Vec<u32> = (0..seq).map(|_| rng.random_range(3..vocab)).collect();
        let text = lm.tok.decode(&ids)?;
        lines.push_str(&serde_json::json!({"text": text}).to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines)?;
    let cfg = lowrank_train::TrainConfig {
        data: Some(data),
        out: Some(dir.join("out")),
        targets: targets.split(',').map(String::from).collect(),
        rank,
        max_steps: Some(steps + 1),
        batch_size: batch,
        max_seq_len: seq,
        method: if full {
            lowrank_train::Method::Full
        } else {
            lowrank_train::Method::Lora
        },
        lr: 1e-4,
        compute,
        checkpoint_layers,
        ..Default::default()
    };
    let mut t = lowrank_train::Trainer::new(&lm, cfg)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let s = t.run(None, &stop)?;
    // Steady-state: drop the first step (allocation warm-up), as the peer does.
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl"))?;
    let mut rows: Vec<(f64, f64)> = vec![];
    let mut prev = 0.0;
    for l in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if let (Some(e), Some(tk)) = (v["elapsed"].as_f64(), v["tokens"].as_f64()) {
            rows.push((e - prev, tk));
            prev = e;
        }
    }
    let mut steady: Vec<f64> = rows.iter().skip(1).map(|(dt, tk)| tk / dt).collect();
    steady.sort_by(|a, b| a.total_cmp(b));
    let _ = std::fs::remove_dir_all(&dir);
    let tps = steady.get(steady.len() / 2).copied().unwrap_or(s.tok_per_s);
    // Matmul FLOPs per token: forward 2N + input gradients 2N (+ weight gradients 2N when full),
    // N ≈ every weight (the tied embedding counts once, as the LM head).
    let n = lm.model.weights.num_params() as f64;
    let flops_per_token = if full { 6.0 * n } else { 4.0 * n };
    println!(
        "{}",
        serde_json::json!({
            "mode": if full { "full" } else { "lora" }, "trainable": s.trainable_params,
            "compute": compute.name(), "checkpoint_layers": checkpoint_layers,
            "int8_kernel": compute.packed().then(lowrank_model::quant::kernel_name),
            "train_product": compute.packed().then(|| lm.model.train_product().name()),
            "train_dx": compute.packed().then(|| lm.model.train_dx().name()),
            "train_head": compute.packed().then(|| lm.model.train_head().name()),
            "f32_gemm": lowrank_model::ops::gemm::GemmKernel::detect().name(),
            "isa_cap": lowrank_model::isa::Isa::cap().name(),
            "batch": batch, "seq": seq, "tokens_per_s": (tps * 10.0).round() / 10.0,
            "achieved_gflops": (tps * flops_per_token / 1e8).round() / 10.0,
            "peak_rss_mb": s.peak_rss_bytes / (1 << 20),
        })
    );
    Ok(())
}
