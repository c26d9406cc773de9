//! The state every handler shares (model, tokenizer, registry, scheduler, metrics), API-key
//! checks, and resolving a request's `model` + `adapters` into the mixture to apply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use lowrank_model::source::ModelSource;
use lowrank_model::{AdapterSet, Llama, LoadedModel, Tok};

use crate::config::ServeConfig;
use crate::error::{ApiError, Result, ServeError};
use crate::metrics::Metrics;
use crate::openai::{AdapterRef, Kind};
use crate::registry::{Registry, RegistryError};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// A request's resolved adapters.
pub struct Mixture {
    pub set: Option<AdapterSet>,
    /// API names, in the order of `set`.
    pub names: Vec<String>,
    /// The request chose the scales (any scale other than 1, or several adapters).
    pub by_request: bool,
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub cfg: ServeConfig,
    pub base_id: String,
    pub model: Arc<Llama>,
    pub tok: Arc<Tok>,
    pub eos: Vec<u32>,
    pub registry: Registry,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub(crate) created: u64,
    pub(crate) next_id: AtomicU64,
    /// Set when shutdown begins: `/health` answers 503 so that load balancers stop sending
    /// new requests, while those that still arrive are served until the listener closes.
    pub draining: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The base model's API id: the GGUF file's stem, or the HF directory's name.
pub fn default_model_id(source: &ModelSource) -> String {
    let p = source.path();
    let s = match source {
        ModelSource::Gguf(_) => p.file_stem(),
        ModelSource::HfDir(_) => p.file_name(),
    };
    s.map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "base".into())
}

impl AppState {
    /// Start the scheduler thread and scan the adapters directory (loading it all with
    /// `preload`). Blocking.
    pub fn new(lm: LoadedModel, cfg: ServeConfig) -> Result<Self> {
        let eos = lm.eos_ids();
        let base_id = cfg
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(&lm.source));
        Self::from_parts(lm.model, Arc::new(lm.tok), eos, base_id, cfg)
    }

    /// As `new`, from the pieces (e.g. a merged copy of a model sharing a tokenizer).
    pub fn from_parts(
        model: Llama,
        tok: Arc<Tok>,
        eos: Vec<u32>,
        base_id: String,
        cfg: ServeConfig,
    ) -> Result<Self> {
        if cfg.max_batch == 0 {
            return Err(ServeError::Invalid("max_batch must be at least 1".into()));
        }
        if cfg.max_tokens_limit == 0 {
            return Err(ServeError::Invalid(
                "max_tokens_limit must be at least 1".into(),
            ));
        }
        let model = Arc::new(model);
        let metrics = Arc::new(Metrics::default());
        let store = match &cfg.adapters_url {
            None => None,
            Some(url) => {
                let cache = cfg
                    .adapter_cache
                    .clone()
                    .unwrap_or_else(|| lowrank_model::fetch::lowrank_home().join("adapter-cache"));
                let st = lowrank_store::AdapterStore::open(url, &cache, cfg.max_adapter_bytes)
                    .map_err(|e| ServeError::Invalid(e.to_string()))?;
                Some(Arc::new(st))
            }
        };
        if store.is_some() && cfg.adapters_dir.is_some() {
            return Err(ServeError::Invalid(
                "adapters come from a directory or from a store URL, not both".into(),
            ));
        }
        let registry = Registry::new(
            model.clone(),
            cfg.adapters_dir.as_deref(),
            store,
            &base_id,
            cfg.max_adapter_bytes,
            metrics.clone(),
        )?;
        if cfg.preload {
            for (name, e) in registry.preload() {
                eprintln!("lowrank serve: adapter `{name}` not preloaded: {e}");
            }
        }
        let scheduler = Scheduler::start(
            model.clone(),
            tok.clone(),
            eos.clone(),
            SchedulerConfig {
                max_batch: cfg.max_batch,
                max_queue: cfg.max_queue,
                kv_cache_bytes: cfg.kv_cache_bytes,
                prefill_tokens_per_step: cfg.prefill_tokens_per_step,
            },
            metrics.clone(),
        );
        Ok(AppState(Arc::new(Shared {
            cfg,
            base_id,
            model,
            tok,
            eos,
            registry,
            scheduler,
            metrics,
            created: unix_now(),
            next_id: AtomicU64::new(1),
            draining: std::sync::atomic::AtomicBool::new(false),
        })))
    }

    /// Stop the scheduler thread (blocking). Requests still queued fail with 503.
    pub fn shutdown(&self) {
        self.scheduler.shutdown();
    }

    pub(crate) fn check_api(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(key) = &self.cfg.api_key else {
            return Ok(());
        };
        match bearer(headers) {
            None => Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
            )),
            Some(k)
                if ct_eq(k, key) || self.cfg.admin_key.as_deref().is_some_and(|a| ct_eq(k, a)) =>
            {
                Ok(())
            }
            Some(_) => Err(ApiError::unauthorized("incorrect API key")),
        }
    }

    pub(crate) fn check_admin(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(key) = &self.cfg.admin_key else {
            return Err(ApiError::forbidden(
                "adapter management is disabled: the server was started without an admin key",
            ));
        };
        match bearer(headers) {
            None => Err(ApiError::unauthorized(
                "missing admin key: send `Authorization: Bearer <admin key>`",
            )),
            Some(k) if ct_eq(k, key) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("incorrect admin key")),
        }
    }

    pub(crate) fn new_id(&self, kind: Kind) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}{:x}{:06x}", kind.id_prefix(), self.created, n)
    }

    /// `model` (base id, adapter name, or `base:adapter`) plus the `adapters` extension →
    /// the mixture to apply. Blocking: may load adapters.
    pub fn resolve(
        &self,
        model: &str,
        extra: &[AdapterRef],
    ) -> std::result::Result<Mixture, ApiError> {
        let mut names: Vec<(String, f64)> = Vec::new();
        if model != self.base_id {
            let name = if self.registry.contains(model) {
                model
            } else if let Some(a) = model.strip_prefix(&format!("{}:", self.base_id)) {
                a
            } else {
                return Err(model_not_found(model));
            };
            names.push((name.to_string(), 1.0));
        }
        for a in extra {
            // The LoRA delta is computed in f32: a scale beyond f32's range is infinite there.
            if !a.scale.is_finite() || !(a.scale as f32).is_finite() {
                return Err(ApiError::bad_request(format!(
                    "adapter `{}`: scale {} must be a finite number within ±{:e}",
                    a.name,
                    a.scale,
                    f32::MAX
                ))
                .param("adapters"));
            }
            names.push((a.name.clone(), a.scale));
        }
        if names.is_empty() {
            return Ok(Mixture {
                set: None,
                names: vec![],
                by_request: false,
            });
        }
        let by_request = names.len() > 1 || extra.iter().any(|a| a.scale != 1.0);
        let mut set = Vec::with_capacity(names.len());
        let by_model = model != self.base_id;
        for (i, (n, scale)) in names.iter().enumerate() {
            let r = self.registry.get(n).map_err(|e| match e {
                RegistryError::NotFound(_) if i == 0 && by_model => model_not_found(model),
                e => registry_error(e),
            })?;
            self.metrics.adapter_request(n);
            set.push((r.adapter, *scale));
        }
        Ok(Mixture {
            set: Some(Arc::new(set)),
            names: names.into_iter().map(|(n, _)| n).collect(),
            by_request,
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Comparison whose time does not depend on where the strings differ.
fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn model_not_found(model: &str) -> ApiError {
    ApiError::not_found(format!("The model `{model}` does not exist"))
        .param("model")
        .code("model_not_found")
}

pub fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(m) => ApiError::not_found(m).code("adapter_not_found"),
        RegistryError::Invalid(m) => ApiError::bad_request(m),
        RegistryError::Load(m) => ApiError::unprocessable(m).code("adapter_load_failed"),
        RegistryError::Budget(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m).code("adapter_budget")
        }
    }
}
