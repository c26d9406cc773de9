//! Training LoRA adapters (or every weight) on a frozen Llama-family base.
//!
//! Data flows one way through the modules: [`config`] (a [`TrainConfig`], from flags or TOML)
//! → [`data`] (JSONL records → tokenized [`data::Sample`]s with HF/PEFT's label masking) →
//! [`trainer`] (micro-batches → [`loss`]: the recorded forward, the hand-written backward and the
//! LM head fused with the cross-entropy → [`optim`]: clipping, schedule, AdamW) → the output
//! directory (a PEFT adapter, metrics.jsonl, checkpoints, summary.json). Long calls report
//! [`progress::Event`]s through a callback; this crate never draws or prints.
//!
//! Below it: `lowrank-model` (the decoder and its training tape) and `lowrank-lora` (adapters).
//! Above it: `lowrank-tasks` (built-in tasks, metrics, generation-based evaluation) and
//! `lowrank-experiments` (the paper's experiments, the demo).

pub mod config;
pub mod data;
pub mod error;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod progress;
pub mod trainer;

pub use config::{Method, TrainConfig};
pub use error::TrainError;
pub use progress::Event;
pub use trainer::{TrainSummary, Trainer};
