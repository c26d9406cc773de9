//! The model: a Llama-family decoder on candle, its loading (GGUF, HF safetensors), tokenizer,
//! chat template, KV cache, batched ragged forward with per-sequence adapter mixtures, and
//! generation.
//!
//! Data flows one way: `source` (where the files are) → `config` + `weights` → `model`
//! (forward) → `generate`. The decoder's equations are written once (`model.rs`: block,
//! projections with their LoRA deltas; `attention.rs`) and run in three modes: inference
//! (fused kernels from `ops`, int8 matmuls from `quant`, KV caches), autograd (full
//! fine-tuning) and recorded (LoRA training: `backward.rs` keeps a tape and runs the
//! hand-written backward).

pub mod adapters;
mod attention;
pub mod backward;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod isa;
pub mod model;
pub mod ops;
pub mod quant;
mod rope;
pub mod source;
mod st;
pub mod tokenizer;
pub mod weights;

pub use cache::{KvCache, KvDtype};
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use model::{AdapterSet, ForwardOpts, Llama, LogitsMode, SeqInput};
pub use source::{LoadedModel, ModelSource};
pub use tokenizer::Tok;

/// Use `n` threads (all cores by default) for candle's CPU kernels and our own rayon kernels.
///
/// candle's default comes out as 1 on these VMs (see ENGINEERING notes); its matmuls read
/// `RAYON_NUM_THREADS` on every call, so the variable is set here, and rayon's global pool
/// is built with `n` workers.
///
/// Contract: call it at the start of the process, before any thread that reads the
/// environment or runs a tensor op is started. Only the first call takes effect (its `n`
/// and workload decide); every later call, from any thread, changes nothing and returns
/// the count the first one chose. So the environment is written exactly once, and
/// concurrent callers (tests, which each call it from their own thread) wait until it is
/// written and never write it themselves; writing the environment while another thread
/// reads it is the data race that makes `set_var` `unsafe` in edition 2024.
pub fn init_threads(n: Option<usize>) -> usize {
    init_threads_for(n, Workload::Inference)
}

/// What a process mostly does, which decides how candle's elementwise pool is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Inference,
    Training,
}

/// [`init_threads`] for a workload (same once-only contract).
pub fn init_threads_for(n: Option<usize>, work: Workload) -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let n = n.filter(|n| *n > 0).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // candle 0.11 runs its elementwise ops on a second pool whose workers spin for a
        // while after each op, competing with gemm's rayon workers for the same cores
        // (measured: LoRA training step 12 % faster on 2 cores with that pool off). The heavy
        // elementwise work lives in our own rayon kernels (ops.rs), so candle's pool is left
        // to the main thread. Inference keeps it: its fused softmax/norm ops use that pool
        // (prefill ~8 % faster).
        if work == Workload::Training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        rayon_init(n);
        n
    })
}

/// Build rayon's global pool (used by gemm and by ops.rs) with `n` workers, rather than
/// leaving its size to whatever `RAYON_NUM_THREADS` says when some kernel first touches it.
fn rayon_init(n: usize) {
    // The only expected error is "the global pool is already built": something ran a rayon
    // job before this call (a test binary's other tests, say). That pool stays, sized from
    // the environment at that moment; building it twice is impossible, and gemm still splits
    // work into `n` parts since it reads RAYON_NUM_THREADS. So the error is ignored.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

#[cfg(test)]
mod tests {
    /// The child test, as the test harness names it.
    const CHILD: &str = "tests::init_threads_child";

    /// The first `init_threads` call decides, concurrent later ones return its choice, and
    /// the rayon pool is really built with that many workers. Run in a fresh process (this
    /// test binary, filtered to the child test) so that neither the other tests' rayon use nor
    /// their reads of the environment interfere, and so that this test's odd thread counts
    /// never reach them.
    #[test]
    fn init_threads_is_once_only_and_builds_the_pool() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                CHILD,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("CANDLE_NUM_THREADS")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(
            log.contains("1 passed"),
            "the child test did not run:\n{log}"
        );
    }

    #[test]
    #[ignore = "run in its own process by init_threads_is_once_only_and_builds_the_pool"]
    fn init_threads_child() {
        // Eight threads race to initialise with different counts.
        let got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (1..=8)
                .map(|k| {
                    s.spawn(move || {
                        let work = if k % 2 == 0 {
                            super::Workload::Training
                        } else {
                            super::Workload::Inference
                        };
                        super::init_threads_for(Some(k + 2), work)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n = got[0];
        assert!(got.iter().all(|g| *g == n), "{got:?}");
        assert!((3..=10).contains(&n));
        assert_eq!(
            super::init_threads(Some(1)),
            n,
            "a later call changes nothing"
        );
        assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), n.to_string());
        // The winner's workload decided candle's pool: Training (even k) switched it off.
        let candle = std::env::var("CANDLE_NUM_THREADS").ok();
        assert_eq!(
            candle.as_deref() == Some("1"),
            n.is_multiple_of(2),
            "{candle:?}"
        );
        assert_eq!(rayon::current_num_threads(), n);
        assert!(
            rayon::ThreadPoolBuilder::new().build_global().is_err(),
            "init_threads built the global pool"
        );
    }
}
