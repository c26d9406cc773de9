//! Server settings.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `lowrank serve` can be told. `Default` gives sensible local settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Require `Authorization: Bearer <api_key>` on the `/v1` API.
    pub api_key: Option<String>,
    /// Required for `POST /v1/adapters` and `DELETE /v1/adapters/{name}`; without it these
    /// endpoints answer 403.
    pub admin_key: Option<String>,
    /// Each sub-directory holding `adapter_config.json` is served under its directory name.
    /// Admin-loaded adapter paths must lie inside it.
    pub adapters_dir: Option<PathBuf>,
    /// Or an object store location (`s3://bucket/prefix`, `gs://`, `az://`, `http(s)://`,
    /// `file://`): each `NAME/adapter_config.json` under it is an adapter, fetched on first
    /// use into `adapter_cache` (verified), and admin paths are keys under it.
    pub adapters_url: Option<String>,
    /// Local cache for `adapters_url` (default: `$LOWRANK_HOME/adapter-cache`).
    pub adapter_cache: Option<PathBuf>,
    /// Most sequences in one batched forward.
    pub max_batch: usize,
    /// Budget for resident adapter tensors (bytes); idle adapters are evicted LRU-first.
    pub max_adapter_bytes: u64,
    /// Requests waiting for a batch slot before new ones get 429.
    pub max_queue: usize,
    /// Largest `max_tokens` a request may ask for (also the default).
    pub max_tokens_limit: usize,
    /// Largest request body (bytes); larger ones get 413.
    pub body_limit: usize,
    /// Time a request may take from arrival to its last token.
    pub request_timeout: Duration,
    /// Budget for all sequences' KV caches (bytes, reserved for prompt + max_tokens at
    /// admission); requests wait in the queue while it is used up.
    pub kv_cache_bytes: usize,
    /// Prompt tokens prefilled per scheduler step (over all new requests), so running
    /// decodes are not starved by long prompts.
    pub prefill_tokens_per_step: usize,
    /// Load every adapter of `adapters_dir` at start instead of on first use.
    pub preload: bool,
    /// The base model's id in the API; `None`: the model file's stem (directory name for a
    /// HF model directory).
    pub model_id: Option<String>,
    /// After a shutdown signal: time during which `/health` reports `draining` (503) while
    /// requests are still accepted, so that a load balancer (a Kubernetes readiness probe)
    /// takes the replica out before its listener closes. In-flight requests always finish.
    pub drain_delay: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            admin_key: None,
            adapters_dir: None,
            adapters_url: None,
            adapter_cache: None,
            max_batch: 32,
            max_adapter_bytes: 2 << 30,
            max_queue: 256,
            max_tokens_limit: 2048,
            body_limit: 1 << 20,
            request_timeout: Duration::from_secs(300),
            kv_cache_bytes: 4 << 30,
            prefill_tokens_per_step: 512,
            preload: false,
            model_id: None,
            drain_delay: Duration::ZERO,
        }
    }
}
