mod adapter_cmds;
mod demo;
mod eval;
mod experiments;
#[cfg(feature = "mpi")]
mod mpi;
mod progress;
mod serve;
mod tasks;
mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use lowrank_model::chat::ChatMessage;
use lowrank_model::generate::{generate, short_number, SamplingParams};
use lowrank_model::LoadedModel;

#[derive(Parser)]
#[command(
    name = "lowrank",
    version,
    about = "LoRA fine-tuning, merging and multi-adapter serving for Llama-family models"
)]
pub struct Cli {
    /// CPU threads for tensor kernels [default: all cores]
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Debug, Default)]
pub struct ModelArg {
    /// `smollm2-135m` (default, fetched on first use), a GGUF file, or a HF model directory.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
}

/// Arithmetic of the frozen weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeKind {
    /// f32 weights and activations: matches the HF reference.
    #[default]
    F32,
    /// 8-bit block weights × 8-bit block activations (llama.cpp's arithmetic for Q4/Q8
    /// GGUFs; weights from ≤ 8-bit GGUF blocks are kept exactly). CPU only; several times
    /// faster for batched decoding, and QLoRA-style training on the packed base.
    Int8,
    /// int8's kernels on 4-bit block weights: weights not already on a 16-level grid (as
    /// Q4_0/Q4_1 GGUF blocks are) are rounded to 16 levels per block of 32, QLoRA's 4-bit
    /// base. 0.6× int8's weight memory; the rounding changes the model (see the README).
    Int4,
}

impl From<ComputeKind> for lowrank_model::quant::Compute {
    fn from(k: ComputeKind) -> Self {
        match k {
            ComputeKind::F32 => lowrank_model::quant::Compute::F32,
            ComputeKind::Int8 => lowrank_model::quant::Compute::Int8,
            ComputeKind::Int4 => lowrank_model::quant::Compute::Int4,
        }
    }
}

/// Element type of the KV cache.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvKind {
    /// f16 with `--compute int8` or `int4`, f32 with `--compute f32`.
    #[default]
    Auto,
    /// f32: the HF reference's precision.
    F32,
    /// f16 (llama.cpp's default): half the bytes per cached token; K and V rounded once, when
    /// they are cached.
    F16,
}

#[derive(Args, Clone, Debug, Default)]
pub struct ComputeArg {
    /// How inference multiplies the frozen weights.
    #[arg(long, value_enum, default_value_t = ComputeKind::F32)]
    pub compute: ComputeKind,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value_t = KvKind::Auto)]
    pub kv_cache: KvKind,
}

impl ComputeArg {
    /// The KV cache type this choice runs.
    pub fn kv_dtype(&self) -> lowrank_model::KvDtype {
        use lowrank_model::KvDtype;
        match (self.kv_cache, self.compute) {
            (KvKind::F32, _) | (KvKind::Auto, ComputeKind::F32) => KvDtype::F32,
            (KvKind::F16, _) | (KvKind::Auto, ComputeKind::Int8 | ComputeKind::Int4) => {
                KvDtype::F16
            }
        }
    }

    /// Load `m` for this arithmetic and KV cache type, as every inference command does. A
    /// packed compute packs while loading (no f32 copy of the base: less memory and a faster
    /// start) unless `keep_f32` (adapters to merge into the f32 weights); then the f32 model
    /// is loaded and packed.
    pub fn load(&self, m: &ModelArg, device: &Device, keep_f32: bool) -> Result<LoadedModel> {
        let compute: lowrank_model::quant::Compute = self.compute.into();
        let mut lm = match compute.packed() && !keep_f32 {
            true => load_for(m, device, compute)?,
            false => {
                let mut lm = load(m, device)?;
                self.apply(&mut lm)?;
                lm
            }
        };
        lm.model.set_kv_dtype(self.kv_dtype());
        Ok(lm)
    }

    /// Switch `lm` to this arithmetic (packs the weights for int8) and KV cache type.
    pub fn apply(&self, lm: &mut LoadedModel) -> Result<()> {
        lm.model.set_kv_dtype(self.kv_dtype());
        let compute: lowrank_model::quant::Compute = self.compute.into();
        if compute.packed() {
            let t = std::time::Instant::now();
            lm.model
                .set_compute(compute)
                .with_context(|| format!("packing the weights for {} compute", compute.name()))?;
            if let Some(q) = lm.model.int8() {
                let (rounded, all) = q.rounded();
                let (nibbles, matrices) = q.nibble_packed();
                eprintln!(
                    "{} compute: packed {} in {:.1} s; {} of {} weight blocks rounded \
                     to {} (the rest kept exactly); {} of {} matrices hold 4-bit q as nibbles",
                    compute.name(),
                    lowrank_experiments::report::human_bytes(q.bytes() as f64),
                    t.elapsed().as_secs_f64(),
                    rounded,
                    all,
                    rounded_to(q.bits()),
                    nibbles,
                    matrices
                );
            }
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into $LOWRANK_HOME.
    Fetch,
    /// Architecture, parameter count, dtypes and file size of a model.
    Info(ModelArg),
    /// Print the token ids of TEXT as a JSON array (no special tokens added).
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// Accepted for symmetry with generate/eval: adapters never change tokenization,
        /// but they are loaded and checked against the base.
        #[command(flatten)]
        adapters: AdapterArgs,
        /// The text to tokenize.
        text: String,
    },
    /// Generate a completion; only the completion goes to stdout.
    Generate(GenerateArgs),
    /// Train a LoRA adapter (or fine-tune all weights with --method full).
    Train(Box<train::TrainArgs>),
    /// Loss on a JSONL file, or generation metrics on a task's held-out set.
    Eval(eval::EvalArgs),
    /// Merge adapters into the base and write a HF directory or a GGUF file.
    Merge(adapter_cmds::MergeArgs),
    /// Targets, ranks, parameters, sizes, fingerprint (and --svd analysis) of an adapter.
    Inspect(adapter_cmds::InspectArgs),
    /// Write an adapter in another tool's format: llama.cpp's LoRA GGUF and an Ollama Modelfile.
    Export(adapter_cmds::ExportArgs),
    /// Built-in niche tasks.
    #[command(subcommand)]
    Tasks(tasks::TasksCmd),
    /// OpenAI-compatible server: one base, many adapters, mixed-adapter batching.
    Serve(serve::ServeArgs),
    /// The main job: train one adapter per built-in task and show each beats the base.
    Demo(demo::DemoArgs),
    /// Benchmarks: inference, training step, server load.
    #[command(subcommand)]
    Bench(serve::BenchCmd),
    /// LoRA paper Table 6: train every (weight types × rank) configuration and score it.
    Sweep(experiments::SweepArgs),
    /// LoRA paper Table 5: one trainable-parameter budget spread over weight types.
    Budget(experiments::BudgetArgs),
    /// Subspace similarity φ(A1, A2, i, j) of two adapters (JSON grid, SVG heatmap).
    Similarity(experiments::SimilarityArgs),
    /// Feature amplification ‖ΔW‖ / ‖UᵀWVᵀ‖ of an adapter against its base (paper Table 7).
    Amplify(experiments::AmplifyArgs),
    /// LoRA vs full fine-tuning on the same data and step budget, side by side.
    Compare(experiments::CompareArgs),
    /// Weighted combination of adapters (PEFT add_weighted_adapter: linear, cat, svd).
    Combine(experiments::CombineArgs),
}

/// `--adapter DIR[:scale]` (repeatable: weighted sum), `--merged`, `--force`.
/// An adapter directory as given, or, for an object store URL (`s3://bucket/prefix/sql`,
/// gs://, az://, http(s)://, file://), its verified copy in `$LOWRANK_HOME/adapter-cache`.
pub fn local_adapter_dir(p: &Path) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    if !lowrank_store::is_url(&s) {
        return Ok(p.to_path_buf());
    }
    let cache = lowrank_model::fetch::lowrank_home().join("adapter-cache");
    let f = lowrank_store::fetch_url(&s, &cache, u64::MAX)?;
    if let Some(n) = &f.note {
        eprintln!("warning: {n}");
    }
    Ok(f.dir)
}

#[derive(Args, Clone, Debug, Default)]
pub struct AdapterArgs {
    /// A PEFT adapter directory or object store URL (s3://bucket/prefix/NAME, gs://, az://,
    /// http(s)://, file://), optionally with `:scale` (repeatable: weighted sum).
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Fold the adapters into the weights first (no adapter latency).
    #[arg(long)]
    pub merged: bool,
    /// Apply an adapter even if its recorded base fingerprint differs from this base.
    #[arg(long)]
    pub force: bool,
}

impl AdapterArgs {
    /// The mixture to run with; with `--merged` it is folded into `lm.model` instead.
    pub fn mixture(&self, lm: &LoadedModel) -> Result<Option<lowrank_model::AdapterSet>> {
        let specs = self.local_specs()?;
        let set = lowrank_model::adapters::load_mixture(&lm.model, &specs, self.force)
            .context("loading adapters")?;
        // The LoRA delta runs in f32: a finite f64 scale beyond f32's range is infinite there.
        for (spec, (_, scale)) in self.adapter.iter().zip(set.iter().flat_map(|s| s.iter())) {
            if !(*scale as f32).is_finite() {
                anyhow::bail!(
                    "--adapter {spec}: scale {scale:e} is beyond ±{:e}",
                    f32::MAX
                );
            }
        }
        Ok(set)
    }

    /// The specs with every object store URL (`s3://…/sql[:scale]`) replaced by its verified
    /// local copy (see [`local_adapter_dir`]).
    fn local_specs(&self) -> Result<Vec<String>> {
        self.adapter
            .iter()
            .map(|spec| {
                if !lowrank_store::is_url(spec) {
                    return Ok(spec.clone());
                }
                // A `:scale` suffix comes after the URL's last `/`.
                let (url, scale) = match spec.rsplit_once(':') {
                    Some((u, s)) if !s.contains('/') && s.parse::<f64>().is_ok() => (u, Some(s)),
                    _ => (spec.as_str(), None),
                };
                let dir = local_adapter_dir(Path::new(url))
                    .with_context(|| format!("--adapter {spec}"))?
                    .to_string_lossy()
                    .into_owned();
                Ok(match scale {
                    Some(s) => format!("{dir}:{s}"),
                    None => dir,
                })
            })
            .collect()
    }

    /// The adapters as given, for error messages: `DIR at scale S + …`, or `no adapter`.
    pub fn describe(&self) -> String {
        if self.adapter.is_empty() {
            return "no adapter".into();
        }
        let parts: Vec<String> = self
            .adapter
            .iter()
            .map(|s| match lowrank_model::adapters::parse_adapter_spec(s) {
                Ok((dir, scale)) => format!("{} at scale {}", dir.display(), short_number(scale)),
                Err(_) => s.clone(),
            })
            .collect();
        let merged = if self.merged { " (merged)" } else { "" };
        format!("adapter {}{merged}", parts.join(" + "))
    }

    /// Load adapters; with --merged, replace the model by the merged copy and return None.
    pub fn apply(&self, lm: &mut LoadedModel) -> Result<Option<lowrank_model::AdapterSet>> {
        let set = self.mixture(lm)?;
        if self.merged {
            if let Some(s) = &set {
                lm.model = lm.model.merged(s)?;
            }
            return Ok(None);
        }
        Ok(set)
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    compute: ComputeArg,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Raw prompt text (no template).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate (fewer at a stop string or end-of-sequence).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sample among the K most likely tokens only (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed (the same seed gives the same completion).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

/// Ranks of the MPI job that started this process, if an MPI launcher did (OpenMPI,
/// MPICH/Hydra and Intel MPI, PMI/PMIx launchers such as Slurm's srun).
pub fn mpi_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .filter(|n| *n >= 1)
}

/// Default threads of one rank of an MPI job: this host's cores shared among its ranks
/// (N ranks × all cores each would oversubscribe the host).
fn mpi_default_threads() -> Option<usize> {
    mpi_world_size()?;
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMI_LOCAL_SIZE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
    .filter(|n| *n >= 1)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / local).max(1))
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let work = match &cli.cmd {
        Cmd::Train(_) | Cmd::Demo(_) | Cmd::Sweep(_) | Cmd::Budget(_) | Cmd::Compare(_) => {
            lowrank_model::Workload::Training
        }
        Cmd::Bench(c) if c.is_training() => lowrank_model::Workload::Training,
        _ => lowrank_model::Workload::Inference,
    };
    if work == lowrank_model::Workload::Training {
        one_malloc_arena();
    }
    lowrank_model::init_threads_for(cli.threads.or_else(mpi_default_threads), work);
    let device = Device::Cpu;
    match cli.cmd {
        Cmd::Fetch => {
            let p = lowrank_model::fetch::ensure_default(true)?;
            println!("{}", p.display());
        }
        Cmd::Info(m) => info(&m, &device)?,
        Cmd::Tokenize {
            model,
            adapters,
            text,
        } => {
            let lm = load(&model, &device)?;
            adapters.mixture(&lm)?;
            let ids = lm.tok.encode(&text)?;
            println!("{}", serde_json::to_string(&ids)?);
        }
        Cmd::Generate(a) => generate_cmd(a, &device)?,
        Cmd::Train(a) => train::run(*a, &device)?,
        Cmd::Eval(a) => eval::run(a, &device)?,
        Cmd::Merge(a) => adapter_cmds::merge(a, &device)?,
        Cmd::Inspect(a) => adapter_cmds::inspect(a, &device)?,
        Cmd::Export(a) => adapter_cmds::export(a, &device)?,
        Cmd::Tasks(c) => tasks::run(c)?,
        Cmd::Serve(a) => serve::serve(a, &device)?,
        Cmd::Demo(a) => {
            if !demo::run(a, &device)? {
                return Ok(ExitCode::from(2));
            }
        }
        Cmd::Bench(c) => serve::bench(c, &device)?,
        Cmd::Sweep(a) => experiments::run_sweep(a, &device)?,
        Cmd::Budget(a) => experiments::run_budget(a, &device)?,
        Cmd::Similarity(a) => experiments::run_similarity(a, &device)?,
        Cmd::Amplify(a) => experiments::run_amplify(a, &device)?,
        Cmd::Compare(a) => experiments::run_compare(a, &device)?,
        Cmd::Combine(a) => experiments::run_combine(a, &device)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Training: every thread allocates from glibc's one main arena. Why: a step frees and
/// allocates activations of 0.1–50 MB on both workers; with an arena per thread (glibc's
/// default under contention) each arena kept its own freed blocks, and the peak RSS of
/// `bench train --compute int8` (4 × 128) went from 485–501 MB on an idle 2-core machine to
/// 709–734 MB with a second job on it; with one arena 485 MB in both cases, at the same speed
/// (191 against 186 tok/s, loaded). Set before any worker thread starts; a no-op elsewhere.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator settings; called before other threads
    // exist, and M_ARENA_MAX with a positive value is a documented, valid request.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub fn load(m: &ModelArg, device: &Device) -> Result<LoadedModel> {
    LoadedModel::load(&m.model, device).with_context(|| format!("loading model `{}`", m.model))
}

/// What rounded blocks were rounded to, for the packing messages.
fn rounded_to(bits: lowrank_model::quant::Bits) -> String {
    match bits.head() == bits {
        true => format!("{} bits", bits.get()),
        false => format!("{} bits (the LM head to {})", bits.get(), bits.head().get()),
    }
}

/// Load for training or evaluation with `compute`: int8 packs while loading and never holds
/// the f32 base (say so, with the packed size).
/// `--backward-dx`'s value checked against the compute and this CPU (before the model loads):
/// the product to set on the loaded model, if one was given.
pub fn backward_dx(
    v: Option<&str>,
    compute: lowrank_model::quant::Compute,
) -> Result<Option<lowrank_model::quant::DxProduct>> {
    use lowrank_model::quant::DxProduct;
    let Some(v) = v else { return Ok(None) };
    let p: DxProduct = v
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--backward-dx")?;
    if p == DxProduct::Bf16 && !compute.packed() {
        anyhow::bail!(
            "--backward-dx bf16 needs --compute int8 or int4 (it multiplies through the packed \
             base; the f32 compute keeps its f32 backward)"
        );
    }
    if !p.supported() {
        anyhow::bail!(
            "--backward-dx {}: this CPU has no AVX-512 BF16 (vdpbf16ps); use f32",
            p.name()
        );
    }
    Ok(Some(p))
}

pub fn load_for(
    m: &ModelArg,
    device: &Device,
    compute: lowrank_model::quant::Compute,
) -> Result<LoadedModel> {
    let t = std::time::Instant::now();
    let lm = LoadedModel::load_for(&m.model, device, compute)
        .with_context(|| format!("loading model `{}` for {} compute", m.model, compute.name()))?;
    if let Some(q) = lm.model.int8() {
        let (rounded, all) = q.rounded();
        eprintln!(
            "{} compute: loaded and packed in {:.1} s ({}, no f32 copy of the base); {} of {} \
             weight blocks rounded to {}, the rest kept exactly",
            compute.name(),
            t.elapsed().as_secs_f64(),
            lowrank_experiments::report::human_bytes(q.bytes() as f64),
            rounded,
            all,
            rounded_to(q.bits())
        );
    }
    Ok(lm)
}

fn info(m: &ModelArg, device: &Device) -> Result<()> {
    let lm = load(m, device)?;
    let c = &lm.model.cfg;
    let out = serde_json::json!({
        "source": lm.source.path().display().to_string(),
        "architecture": c.arch,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "context_length": c.max_position_embeddings,
        "tied_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "parameters": lm.model.weights.num_params(),
        "file_dtypes": lm.file_dtypes,
        "compute_dtype": "f32",
        "file_bytes": lm.file_bytes,
        "chat_template": lm.tok.chat_template.is_some(),
        "eos_ids": lm.eos_ids(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn generate_cmd(a: GenerateArgs, device: &Device) -> Result<()> {
    let mut lm = a.compute.load(&a.model, device, a.adapters.merged)?;
    let set = a.adapters.apply(&mut lm)?;
    let prompt_text = match (&a.prompt, &a.chat) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", c));
            lm.tok.render_chat(&msgs, true)?
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let ids = lm.tok.encode(&prompt_text)?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
    };
    if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        anyhow::bail!("--temperature must be ≥ 0");
    }
    let mut stdout = std::io::stdout();
    let eos = lm.eos_ids();
    let g = generate(&lm.model, &lm.tok, &ids, set, &params, &eos, &mut |s| {
        let _ = stdout.write_all(s.as_bytes());
        let _ = stdout.flush();
    })
    .with_context(|| format!("generating with {}", a.adapters.describe()))?;
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated, finish: {}]",
        g.prompt_tokens,
        g.ids.len(),
        g.finish.as_openai()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `lowrank X --help` explains every flag and positional argument of every subcommand.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                if !matches!(id, "help" | "version") && help.trim().is_empty() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let cli = super::Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "lowrank", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }

    /// Every inference command loads through `ComputeArg::load`: the model it returns runs
    /// the compute and the KV cache type the flags name (a packed compute packed while loading,
    /// the f32 weights kept only where adapters are to be merged into them).
    #[test]
    fn inference_loads_run_the_compute_and_kv_cache_asked_for() {
        use super::{ComputeArg, ComputeKind, KvKind, ModelArg};
        let m = ModelArg {
            model: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-llama-hf/model"
            )
            .into(),
        };
        let d = candle_core::Device::Cpu;
        for compute in [ComputeKind::F32, ComputeKind::Int8, ComputeKind::Int4] {
            for kv_cache in [KvKind::Auto, KvKind::F32, KvKind::F16] {
                for keep_f32 in [false, true] {
                    let a = ComputeArg { compute, kv_cache };
                    let lm = a.load(&m, &d, keep_f32).unwrap();
                    let what = format!("{compute:?} {kv_cache:?} keep_f32={keep_f32}");
                    assert_eq!(lm.model.kv_dtype(), a.kv_dtype(), "{what}");
                    assert_eq!(lm.model.compute(), compute.into(), "{what}");
                    let f32_kept = compute == ComputeKind::F32 || keep_f32;
                    assert_eq!(lm.model.has_f32_weights(), f32_kept, "{what}");
                }
            }
        }
    }

    /// `--kv-cache auto` follows the compute (f16 beside int8, which measured faster for
    /// batched decode; f32 beside f32, which matches HF); an explicit type always wins, and
    /// the flags parse on the commands that take `--compute`.
    #[test]
    fn kv_cache_follows_the_compute_unless_given() {
        use super::{ComputeArg, ComputeKind, KvKind};
        use lowrank_model::KvDtype;
        let arg = |compute, kv_cache| ComputeArg { compute, kv_cache };
        assert_eq!(arg(ComputeKind::F32, KvKind::Auto).kv_dtype(), KvDtype::F32);
        assert_eq!(
            arg(ComputeKind::Int8, KvKind::Auto).kv_dtype(),
            KvDtype::F16
        );
        assert_eq!(arg(ComputeKind::Int8, KvKind::F32).kv_dtype(), KvDtype::F32);
        assert_eq!(arg(ComputeKind::F32, KvKind::F16).kv_dtype(), KvDtype::F16);
        use clap::Parser;
        for cmd in [
            &["lowrank", "generate", "--kv-cache", "f16", "--prompt", "hi"][..],
            &["lowrank", "serve", "--compute", "int8", "--kv-cache", "f32"][..],
            &["lowrank", "bench", "serve", "--kv-cache", "f16"][..],
        ] {
            super::Cli::try_parse_from(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        }
        assert!(super::Cli::try_parse_from(["lowrank", "serve", "--kv-cache", "q8"]).is_err());
        // Zero rounds would benchmark nothing.
        assert!(
            super::Cli::try_parse_from(["lowrank", "bench", "serve", "--rounds", "0"]).is_err()
        );
        assert!(super::Cli::try_parse_from(["lowrank", "bench", "serve", "--rounds", "2"]).is_ok());
    }
}
