//! The HTTP API: OpenAI-compatible completions, models, adapter admin, health and metrics.
//!
//! * [`state`]: what the handlers share, API keys, adapter resolution.
//! * [`validate`]: request bodies → validated generation requests.
//! * [`sse`]: token events → streaming chunks.
//! * here: the routes, the completion handler (validate → schedule → JSON or SSE), and `serve`.

mod sse;
mod state;
mod validate;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lowrank_model::LoadedModel;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;

use crate::config::ServeConfig;
use crate::error::{ApiError, Result, ServeError};
use crate::openai::{self, Kind, RegisterAdapter};
use crate::scheduler::{deadline_after, Event, GenRequest, SubmitError};

use state::unix_now;
pub use state::{default_model_id, registry_error, AppState, Mixture, Shared};
use validate::{parse_body, prepare};

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
            adapter_names: p.adapter_names,
            request_mixture: p.request_mixture,
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
        return Ok(sse::stream(rx, kind, id, created, p.model, p.include_usage));
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
            Some(Event::Error(e)) => return Err(e),
            None => return Err(ApiError::internal("generation ended unexpectedly")),
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

async fn adapter_card(
    State(s): State<AppState>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> std::result::Result<Json<Value>, ApiError> {
    s.check_api(&headers)?;
    let st = s.clone();
    let card = tokio::task::spawn_blocking(move || {
        let (a, path, loaded) = st.registry.inspect(&name)?;
        let root = st
            .registry
            .root()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let rel = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
        let dir = st.registry.local_dir(&path)?;
        Ok::<_, crate::registry::RegistryError>(crate::card::adapter_card(
            &name, &rel, &dir, &a, loaded,
        ))
    })
    .await
    .map_err(blocking_error)?
    .map_err(registry_error)?;
    Ok(Json(card))
}

/// The playground: one self-contained page (inline script and style, no build step), served
/// without a key (it holds none; it asks for the key and sends it with each API call).
async fn playground() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
        ],
        PLAYGROUND,
    )
        .into_response()
}

const PLAYGROUND: &str = include_str!("playground.html");

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
    s.metrics.forget_adapter(&name);
    Ok(Json(
        json!({"id": name, "object": "adapter", "deleted": true}),
    ))
}

async fn health(State(s): State<AppState>) -> Response {
    let draining = s.draining.load(Ordering::Relaxed);
    let ok = s.scheduler.is_alive() && !draining;
    let body = json!({
        "status": if draining { "draining" } else if ok { "ok" } else { "error" },
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
        "/" => "/",
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
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", get(list_adapters).post(add_adapter))
        .route("/v1/adapters/{name}", get(adapter_card).delete(del_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serve `app(state)` on an already-bound listener until `shutdown` resolves; then report
/// `draining` on `/health` for `cfg.drain_delay` while still serving, close the listener,
/// let in-flight requests finish, and stop the scheduler.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let st = state.clone();
    let shutdown = async move {
        shutdown.await;
        st.draining.store(true, Ordering::Relaxed);
        let d = st.cfg.drain_delay;
        if !d.is_zero() {
            eprintln!(
                "lowrank serve: draining: /health answers 503 for {:.1} s, then the listener closes",
                d.as_secs_f64()
            );
            tokio::time::sleep(d).await;
        }
    };
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
    let (m, budget) = (&state.model, state.cfg.kv_cache_bytes);
    eprintln!(
        "lowrank serve: model `{}` ({} compute, {} KV cache: {} tokens in the {} MiB budget) with \
         {} adapter(s) on http://{local}/v1",
        state.base_id,
        m.compute().name(),
        m.kv_dtype().name(),
        budget / m.kv_bytes_per_token().max(1),
        budget >> 20,
        state.registry.names().len()
    );
    serve_on(listener, state, shutdown).await
}
