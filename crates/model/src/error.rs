use std::path::PathBuf;

/// Errors of model loading and running. Variants name the file / field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: not a GGUF file ({msg})")]
    NotGguf { path: PathBuf, msg: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2 and other Llama-family decoders)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: missing or invalid field `{field}`: {msg}")]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {len} tokens does not fit the context of {max} tokens")]
    ContextOverflow { len: usize, max: usize },
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("{0}")]
    Invalid(String),
    /// A weight that packing cannot represent: NaN or ±∞ (or a block of 32 spanning more
    /// than f32's range). `part` is the index of the stacked tensor it lies in, for the
    /// caller that knows their names.
    #[error("weights not finite (NaN or ±∞) at row {row}, columns {col}..{}", col + 32)]
    NonFiniteWeights { part: usize, row: usize, col: usize },
    #[error(transparent)]
    NonFiniteLogits(#[from] crate::generate::NonFiniteLogits),
    #[error(transparent)]
    Lora(#[from] lowrank_lora::LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
