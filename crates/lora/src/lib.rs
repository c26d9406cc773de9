//! LoRA math and adapter formats.
//!
//! An adapter is a set of low-rank updates `ΔW = s·B·A` keyed by (layer, projection).
//! This crate knows tensors, PEFT's file format and the arithmetic on adapters; it knows
//! nothing of the model's forward pass (the model receives adapters through a plan).

pub mod adapter;
pub mod analysis;
pub mod combine;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod init;
pub mod linalg;
pub mod merge;
pub mod peft;
pub mod permute;
pub mod shapes;
pub mod target;

pub use adapter::{Adapter, FingerprintStatus, LoraModule, ModuleKey, Provenance};
pub use analysis::{
    adapter_stats, amplification, effective_rank, module_stats, subspace_similarity, Amplification,
    ModuleStats,
};
pub use combine::{combine, CombineMethod};
pub use config::{InitLoraWeights, LoraConfig};
pub use error::{LoraError, Result};
pub use fingerprint::fingerprint;
pub use init::init_module;
pub use linalg::{svd_of_lowrank, Mat, Svd};
pub use merge::{merge_weight, unmerge_weight};
pub use peft::{load_peft, save_peft};
pub use permute::{gguf_to_hf_rows, hf_to_gguf_rows};
pub use shapes::BaseShapes;
pub use target::Target;

/// Version string written into adapter provenance.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
