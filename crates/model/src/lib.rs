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
    let n = n.filter(|n| *n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon_init(n);
    n
}

fn rayon_init(n: usize) -> std::result::Result<(), String> {
    // candle's gemm reads the variable; candle's own pool is built lazily from it too.
    let _ = n;
    Ok(())
}
