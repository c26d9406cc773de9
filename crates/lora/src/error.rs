use std::path::PathBuf;

/// Errors of adapter handling. Every variant names the file (and key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("{path}: invalid adapter config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: key `{key}`: {msg}")]
    Tensor {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("adapter does not fit this base model: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LoraError>;
