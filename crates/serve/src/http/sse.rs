//! Server-sent events: the scheduler's token events → OpenAI streaming chunks, ending in
//! `[DONE]` (errors after the stream started are sent as a final error chunk).

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::openai::Kind;
use crate::scheduler::Event;

/// The streaming response for one request whose events arrive on `rx`.
pub(crate) fn stream(
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> Response {
    let st = SseState {
        rx,
        pending: VecDeque::new(),
        finished: false,
        kind,
        id,
        created,
        model,
        include_usage,
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
    Sse::new(stream).into_response()
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
            Some(Event::Error(e)) => {
                self.pending.push_back(e.body().to_string());
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
