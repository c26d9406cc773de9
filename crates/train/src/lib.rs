//! Training: datasets and masking, the LoRA / full training step, AdamW, checkpoints; the
//! built-in niche tasks and their metrics.
pub mod metrics;
pub mod tasks;
