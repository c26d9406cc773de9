//! The error of training and of the loss on a data file: a bad setting, bad data, a checkpoint
//! that does not continue this run, or a failure of the model, the adapter code, candle or the
//! file system.

use std::path::PathBuf;

use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] lowrank_model::ModelError),
    #[error(transparent)]
    Lora(#[from] lowrank_lora::LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// Resuming with settings that change the run's numbers: each entry is
    /// `--flag: checkpoint's value → this run's value`.
    #[error("{path}: the checkpoint was made with other settings ({}); resume with the checkpoint's settings, or pass --allow-changed-config to continue with the new ones", changes.join("; "))]
    ChangedConfig { path: PathBuf, changes: Vec<String> },
}
