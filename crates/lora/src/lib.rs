//! LoRA math and adapter formats.
//!
//! An adapter is a set of low-rank updates `ΔW = s·B·A` keyed by (layer, projection).
//! This crate knows tensors, PEFT's file format and the arithmetic on adapters; it knows
//! nothing of the model's forward pass (the model receives adapters through a plan).

pub mod adapter;
pub mod config;
pub mod error;

pub use adapter::{Adapter, LoraModule, ModuleKey, Target};
pub use config::LoraConfig;
pub use error::LoraError;

/// Version string written into adapter provenance.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
