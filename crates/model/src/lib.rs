//! The model: a Llama-family decoder on candle, its loading (GGUF, HF safetensors), tokenizer,
//! chat template, KV cache, batched ragged forward with per-sequence adapter mixtures, and
//! generation.
//!
//! Data flows one way: `source` (where the files are) → `config` + `weights` → `model`
//! (forward) → `generate`.

pub mod adapters;
pub mod backward;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod ops;
pub mod quant;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use model::{AdapterSet, ForwardOpts, Llama, LogitsMode, SeqInput};
pub use source::{LoadedModel, ModelSource};
pub use tokenizer::Tok;

/// Use `n` threads (all cores by default) for candle's CPU kernels.
///
/// candle's default comes out as 1 on these VMs (see ENGINEERING notes); it reads
/// `RAYON_NUM_THREADS`, so this must run before the first tensor op.
pub fn init_threads(n: Option<usize>) -> usize {
    init_threads_for(n, Workload::Inference)
}

/// What a process mostly does, which decides how candle's elementwise pool is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Inference,
    Training,
}

/// [`init_threads`] for a workload.
pub fn init_threads_for(n: Option<usize>, work: Workload) -> usize {
    let n = n.filter(|n| *n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle 0.11 runs its elementwise ops on a second pool whose workers spin for a while
    // after each op, competing with gemm's rayon workers for the same cores (measured: LoRA
    // training step 12 % faster on 2 cores with that pool off). The heavy elementwise work
    // lives in our own rayon kernels (ops.rs), so candle's pool is left to the main thread.
    // Inference keeps it: its fused softmax/norm ops use that pool (prefill ~8 % faster).
    if work == Workload::Training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let _ = rayon_init(n);
    n
}

fn rayon_init(n: usize) -> std::result::Result<(), String> {
    // candle's gemm reads the variable; candle's own pool is built lazily from it too.
    let _ = n;
    Ok(())
}
