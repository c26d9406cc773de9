//! Training: datasets and masking, the LoRA / full training step (fused head + loss, no dW
//! for frozen weights), AdamW, checkpoints; the built-in niche tasks and their metrics.

pub mod config;
pub mod data;
pub mod evaluate;
pub mod experiments;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod tasks;
pub mod trainer;

pub use config::{Method, TrainConfig};
pub use trainer::{TrainError, TrainSummary, Trainer};
