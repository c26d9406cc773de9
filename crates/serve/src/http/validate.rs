//! Request bodies → validated generation requests: JSON parsing with clear 4xx errors,
//! sampling parameters within bounds, prompts tokenized and checked against the context.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use lowrank_model::chat::ChatMessage;
use lowrank_model::generate::SamplingParams;
use lowrank_model::AdapterSet;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;
use crate::openai::{ChatRequest, Common, CompletionRequest, Kind, Prompt, Stop};

/// Body → JSON value → request type, each failure a 4xx with a clear message.
pub(crate) fn parse_body<T: DeserializeOwned>(
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
pub(crate) struct Prepared {
    pub model: String,
    pub prompt: Vec<u32>,
    pub adapters: Option<AdapterSet>,
    pub adapter_names: Vec<String>,
    pub request_mixture: bool,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
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

pub(crate) fn prepare(
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
    let mix = s.resolve(&model, common.adapters.as_deref().unwrap_or(&[]))?;
    Ok(Prepared {
        model,
        prompt,
        adapters: mix.set,
        adapter_names: mix.names,
        request_mixture: mix.by_request,
        params,
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}
