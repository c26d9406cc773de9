//! The HTTP API: OpenAI-compatible completions, models, adapter admin, health and metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lowrank_model::chat::ChatMessage;
use lowrank_model::generate::SamplingParams;
use lowrank_model::source::ModelSource;
use lowrank_model::{AdapterSet, Llama, LoadedModel, Tok};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::config::ServeConfig;
use crate::error::{ApiError, Result, ServeError};
use crate::metrics::Metrics;
use crate::openai::{
    self, AdapterRef, ChatRequest, Common, CompletionRequest, Kind, Prompt, RegisterAdapter, Stop,
};
use crate::registry::{Registry, RegistryError};
use crate::scheduler::{
    deadline_after, Event, GenRequest, Scheduler, SchedulerConfig, SubmitError,
};

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
    created: u64,
    next_id: AtomicU64,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

fn unix_now() -> u64 {
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
        let registry = Registry::new(
            model.clone(),
            cfg.adapters_dir.as_deref(),
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
        })))
    }

    /// Stop the scheduler thread (blocking). Requests still queued fail with 503.
    pub fn shutdown(&self) {
        self.scheduler.shutdown();
    }

    fn check_api(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
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

    fn check_admin(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
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

    fn new_id(&self, kind: Kind) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}{:x}{:06x}", kind.id_prefix(), self.created, n)
    }

    /// `model` (base id, adapter name, or `base:adapter`) plus the `adapters` extension →
    /// the mixture to apply. Blocking: may load adapters.
    pub fn resolve(
        &self,
        model: &str,
        extra: &[AdapterRef],
    ) -> std::result::Result<Option<AdapterSet>, ApiError> {
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
            if !a.scale.is_finite() {
                return Err(ApiError::bad_request(format!(
                    "adapter `{}`: scale must be a finite number",
                    a.name
                ))
                .param("adapters"));
            }
            names.push((a.name.clone(), a.scale));
        }
        if names.is_empty() {
            return Ok(None);
        }
        let mut set = Vec::with_capacity(names.len());
        let by_model = model != self.base_id;
        for (i, (n, scale)) in names.into_iter().enumerate() {
            let r = self.registry.get(&n).map_err(|e| match e {
                RegistryError::NotFound(_) if i == 0 && by_model => model_not_found(model),
                e => registry_error(e),
            })?;
            self.metrics.adapter_request(&n);
            set.push((r.adapter, scale));
        }
        Ok(Some(Arc::new(set)))
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

fn model_not_found(model: &str) -> ApiError {
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

/// Body → JSON value → request type, each failure a 4xx with a clear message.
fn parse_body<T: DeserializeOwned>(
    body: std::result::Result<Bytes, BytesRejection>,
    limit: usize,
) -> std::result::Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body exceeds the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(r.status(), "invalid_request_error", r.body_text())
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// A validated request, ready for the scheduler.
struct Prepared {
    model: String,
    prompt: Vec<u32>,
    adapters: Option<AdapterSet>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
}

fn sampling(
    s: &AppState,
    c: &Common,
    prompt_len: usize,
) -> std::result::Result<SamplingParams, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::bad_request(format!(
                "n = {n} is not supported: this server returns one choice per request (n = 1)"
            ))
            .param("n"));
        }
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(
            ApiError::bad_request(format!("temperature {temperature} is outside [0, 2]"))
                .param("temperature"),
        );
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::bad_request(format!("top_p {top_p} is outside (0, 1]")).param("top_p"),
        );
    }
    let top_k = c.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::bad_request("top_k must be 0 (off) or positive").param("top_k"));
    }
    let max_pos = s.model.cfg.max_position_embeddings;
    let (field, requested) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let limit = s.cfg.max_tokens_limit;
    let max_tokens = match requested {
        None => limit,
        Some(m) if m < 1 => {
            return Err(ApiError::bad_request(format!("{field} must be at least 1")).param(field))
        }
        Some(m) if m as u64 > limit as u64 => {
            return Err(ApiError::bad_request(format!(
                "{field} = {m} exceeds this server's limit of {limit}"
            ))
            .param(field))
        }
        Some(m) => m as usize,
    };
    if prompt_len == 0 {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    if prompt_len >= max_pos {
        return Err(ApiError::bad_request(format!(
            "the prompt has {prompt_len} tokens; this model's context is {max_pos} tokens"
        ))
        .code("context_length_exceeded"));
    }
    let stop = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 16 {
        return Err(ApiError::bad_request("at most 16 stop sequences").param("stop"));
    }
    let seed = match c.seed {
        Some(s) => s as u64,
        None => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ s
                .next_id
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k: top_k as usize,
        seed,
        max_tokens: max_tokens.min(max_pos - prompt_len),
        stop,
    })
}

fn prepare(
    s: &AppState,
    bytes: std::result::Result<Bytes, BytesRejection>,
    kind: Kind,
) -> std::result::Result<Prepared, ApiError> {
    let limit = s.cfg.body_limit;
    let (model, prompt, common) = match kind {
        Kind::Chat => {
            let r: ChatRequest = parse_body(bytes, limit)?;
            if r.messages.is_empty() {
                return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
            }
            let msgs = r
                .messages
                .iter()
                .map(|m| Ok(ChatMessage::new(&m.role, &m.text()?)))
                .collect::<std::result::Result<Vec<_>, ApiError>>()?;
            let text = s
                .tok
                .render_chat(&msgs, true)
                .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
            let ids = s
                .tok
                .encode(&text)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            (r.model, ids, r.common)
        }
        Kind::Completion => {
            let r: CompletionRequest = parse_body(bytes, limit)?;
            let ids = match &r.prompt {
                Prompt::Text(t) => s
                    .tok
                    .encode(t)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                Prompt::Texts(v) if v.len() == 1 => s
                    .tok
                    .encode(&v[0])
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                Prompt::Texts(v) => {
                    return Err(ApiError::bad_request(format!(
                        "{} prompts given: one prompt per request",
                        v.len()
                    ))
                    .param("prompt"))
                }
                Prompt::Ids(ids) => {
                    let vocab = s.model.cfg.vocab_size;
                    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                        return Err(ApiError::bad_request(format!(
                            "token id {bad} is outside the vocabulary of {vocab}"
                        ))
                        .param("prompt"));
                    }
                    ids.clone()
                }
            };
            (r.model, ids, r.common)
        }
    };
    let params = sampling(s, &common, prompt.len())?;
    let adapters = s.resolve(&model, common.adapters.as_deref().unwrap_or(&[]))?;
    Ok(Prepared {
        model,
        prompt,
        adapters,
        params,
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

async fn chat(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    complete(s, headers, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    complete(s, headers, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn blocking_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(format!("request preparation failed: {e}"))
}

async fn complete(
    s: AppState,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
    kind: Kind,
) -> std::result::Result<Response, ApiError> {
    s.check_api(&headers)?;
    let arrived = Instant::now();
    let st = s.clone();
    let p = tokio::task::spawn_blocking(move || prepare(&st, body, kind))
        .await
        .map_err(blocking_error)??;
    let (tx, mut rx) = unbounded_channel();
    let prompt_tokens = p.prompt.len();
    s.scheduler
        .submit(GenRequest {
            prompt: p.prompt,
            adapters: p.adapters,
            params: p.params,
            arrived,
            deadline: deadline_after(s.cfg.request_timeout),
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(n) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", format!("the server's queue is full ({n} requests waiting); retry later"))
                .code("queue_full"),
            SubmitError::TooLarge { need, budget } => ApiError::bad_request(format!(
                "prompt + max_tokens need {need} bytes of KV cache, more than the server's budget of {budget} bytes; lower max_tokens"
            ))
            .param("max_tokens"),
            SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down"),
        })?;
    s.metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let id = s.new_id(kind);
    let created = unix_now();
    if p.stream {
        let st = SseState {
            rx,
            pending: VecDeque::new(),
            finished: false,
            kind,
            id,
            created,
            model: p.model,
            include_usage: p.include_usage,
        };
        let mut st = st;
        if kind == Kind::Chat {
            let first = kind.chunk(
                &st.id,
                created,
                &st.model,
                Some(""),
                true,
                None,
                st.include_usage,
            );
            st.pending.push_back(first.to_string());
        }
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(d) = st.pending.pop_front() {
                    return Some((Ok::<_, Infallible>(SseEvent::default().data(d)), st));
                }
                if st.finished {
                    return None;
                }
                let ev = st.rx.recv().await;
                st.on_event(ev);
            }
        });
        return Ok(Sse::new(stream).into_response());
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Token(t)) => text.push_str(&t),
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                let body = kind.full(
                    &id,
                    created,
                    &p.model,
                    &text,
                    finish.as_openai(),
                    openai::usage(prompt_tokens, completion_tokens),
                );
                return Ok(Json(body).into_response());
            }
            Some(Event::Error(code, msg)) => return Err(event_error(code, msg)),
            None => return Err(ApiError::internal("generation ended unexpectedly")),
        }
    }
}

fn event_error(code: u16, msg: String) -> ApiError {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if code == 504 {
        "timeout"
    } else {
        "server_error"
    };
    ApiError::new(status, kind, msg)
}

struct SseState {
    rx: UnboundedReceiver<Event>,
    pending: VecDeque<String>,
    finished: bool,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl SseState {
    fn on_event(&mut self, ev: Option<Event>) {
        let (k, id, c, m, u) = (
            self.kind,
            &self.id,
            self.created,
            &self.model,
            self.include_usage,
        );
        match ev {
            Some(Event::Token(t)) => {
                if !t.is_empty() {
                    self.pending
                        .push_back(k.chunk(id, c, m, Some(&t), false, None, u).to_string());
                }
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                let text = if k == Kind::Chat { None } else { Some("") };
                self.pending.push_back(
                    k.chunk(id, c, m, text, false, Some(finish.as_openai()), u)
                        .to_string(),
                );
                if u {
                    self.pending.push_back(
                        k.usage_chunk(id, c, m, prompt_tokens, completion_tokens)
                            .to_string(),
                    );
                }
                self.pending.push_back("[DONE]".into());
                self.finished = true;
            }
            Some(Event::Error(code, msg)) => {
                self.pending
                    .push_back(event_error(code, msg).body().to_string());
                self.pending.push_back("[DONE]".into());
                self.finished = true;
            }
            None => {
                self.pending.push_back(
                    ApiError::internal("generation ended unexpectedly")
                        .body()
                        .to_string(),
                );
                self.pending.push_back("[DONE]".into());
                self.finished = true;
            }
        }
    }
}

async fn models(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> std::result::Result<Json<Value>, ApiError> {
    s.check_api(&headers)?;
    let mut data = vec![
        json!({"id": s.base_id, "object": "model", "created": s.created, "owned_by": "lowrank", "parent": null}),
    ];
    for n in s.registry.names() {
        data.push(json!({"id": n, "object": "model", "created": s.created, "owned_by": "lowrank", "parent": s.base_id}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn list_adapters(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> std::result::Result<Json<Value>, ApiError> {
    s.check_api(&headers)?;
    Ok(Json(
        json!({"object": "list", "data": s.registry.list(), "resident_bytes": s.registry.resident_bytes()}),
    ))
}

async fn add_adapter(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Json<Value>, ApiError> {
    s.check_admin(&headers)?;
    let r: RegisterAdapter = parse_body(body, s.cfg.body_limit)?;
    let st = s.clone();
    let name = r.name.clone();
    let res = tokio::task::spawn_blocking(move || st.registry.register(&r.name, &r.path))
        .await
        .map_err(blocking_error)?;
    let res = res.map_err(registry_error)?;
    Ok(Json(
        json!({"id": name, "object": "adapter", "parent": s.base_id, "generation": res.generation, "bytes": res.bytes}),
    ))
}

async fn del_adapter(
    State(s): State<AppState>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> std::result::Result<Json<Value>, ApiError> {
    s.check_admin(&headers)?;
    s.registry.remove(&name).map_err(registry_error)?;
    Ok(Json(
        json!({"id": name, "object": "adapter", "deleted": true}),
    ))
}

async fn health(State(s): State<AppState>) -> Response {
    let ok = s.scheduler.is_alive();
    let body = json!({
        "status": if ok { "ok" } else { "error" },
        "model": s.base_id,
        "queued": s.scheduler.queued(),
        "running": s.metrics.running.load(Ordering::Relaxed),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint {method} {}", uri.path())).code("unknown_url")
}

/// Metric label of a request path.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/adapters" => "/v1/adapters",
        p if p.starts_with("/v1/adapters/") => "/v1/adapters/{name}",
        _ => "other",
    }
}

async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let ep = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    s.metrics.request(ep, resp.status().as_u16());
    resp
}

/// The router, for `serve` and for in-process tests.
pub fn app(state: AppState) -> Router {
    let limit = state.cfg.body_limit;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", get(list_adapters).post(add_adapter))
        .route("/v1/adapters/{name}", delete(del_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serve `app(state)` on an already-bound listener until `shutdown` resolves, then drain
/// in-flight requests and stop the scheduler.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.shutdown()).await;
    Ok(())
}

/// Load the adapters registry, start the scheduler, listen on `cfg.host:cfg.port` and serve
/// until `shutdown` resolves (then drain in-flight requests).
pub async fn serve(
    lm: LoadedModel,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let state = tokio::task::spawn_blocking(move || AppState::new(lm, cfg))
        .await
        .map_err(|e| ServeError::Invalid(format!("startup failed: {e}")))??;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| ServeError::Invalid(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    eprintln!(
        "lowrank serve: model `{}` with {} adapter(s) on http://{local}/v1",
        state.base_id,
        state.registry.names().len()
    );
    serve_on(listener, state, shutdown).await
}
