//! OpenAI-compatible serving of a base model and many LoRA adapters with continuous batching.
//!
//! * [`http`]: the API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   `/v1/adapters`, `/health`, `/metrics`), [`app`] and [`serve`].
//! * [`scheduler`]: the batching loop on its own thread: one ragged forward per step over every
//!   active sequence, each with its own KV cache and adapter mixture.
//! * [`registry`]: adapters by name, lazily loaded, versioned, byte-budgeted with LRU eviction.
//! * [`bench`]: a loopback load generator.

pub mod bench;
pub mod card;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod registry;
pub mod scheduler;

pub use bench::{bench_serve, format_summary, format_table, BenchConfig, BenchRow};
pub use config::ServeConfig;
pub use error::{ApiError, Result, ServeError};
pub use http::{app, default_model_id, serve, serve_on, AppState};
pub use registry::{Registry, RegistryError};
