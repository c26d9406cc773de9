//! Continuous batching on a dedicated thread.
//!
//! Each step runs ONE ragged `Llama::forward` over the active rows: prompt chunks of newly
//! admitted requests (within a per-step prefill token budget, oldest first) and one token of
//! every decoding request. Every row brings its own KV cache and adapter mixture; the forward
//! shares the base matmuls and applies each mixture's LoRA delta to its own rows only, so a
//! row's output does not depend on its batch-mates. After the forward each row samples with its
//! own seeded sampler and streams text; finished rows drop their cache and adapter pins.
//!
//! Before sampling, each row's logits are checked finite: a row whose logits hold NaN or ±inf
//! (a huge adapter scale or `lora_alpha` overflowed its activations) fails alone with a
//! `non_finite_logits` error; rows are computed independently, so its batch-mates go on.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lowrank_model::generate::{
    check_finite, describe_adapters, FinishReason, NonFiniteLogits, Sampler, SamplingParams,
    TextStream,
};
use lowrank_model::{AdapterSet, ForwardOpts, KvCache, Llama, LogitsMode, SeqInput, Tok};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// What the scheduler tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text that became final with it (may be empty).
    Token(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed.
    Error(ApiError),
}

/// A request ready to run: tokenized prompt, resolved adapters, sampling.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapters: Option<AdapterSet>,
    /// The API names of `adapters`, in the same order (for error messages).
    pub adapter_names: Vec<String>,
    /// Whether the request itself chose the mixture's scales (a scale other than 1 or several
    /// adapters): then non-finite logits are the request's fault (400), else the server's.
    pub request_mixture: bool,
    pub params: SamplingParams,
    pub arrived: Instant,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubmitError {
    QueueFull(usize),
    TooLarge { need: usize, budget: usize },
    Stopped,
}

enum Msg {
    Submit(GenRequest),
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch: usize,
    pub max_queue: usize,
    pub kv_cache_bytes: usize,
    pub prefill_tokens_per_step: usize,
}

/// The handle HTTP handlers submit through.
pub struct Scheduler {
    tx: Mutex<Sender<Msg>>,
    queued: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
    cfg: SchedulerConfig,
    kv_per_token: usize,
    max_pos: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(
        model: Arc<Llama>,
        tok: Arc<Tok>,
        eos: Vec<u32>,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Scheduler {
        // K and V, every layer, in the cache's element type (f16 caches take half).
        let kv_per_token = model.kv_bytes_per_token();
        let max_pos = model.cfg.max_position_embeddings;
        metrics
            .kv_cache_budget_bytes
            .store(cfg.kv_cache_bytes as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let th = {
            let (queued, alive, cfg) = (queued.clone(), alive.clone(), cfg.clone());
            std::thread::Builder::new()
                .name("lowrank-scheduler".into())
                .spawn(move || {
                    let mut s = Loop {
                        model: &model,
                        tok: &tok,
                        eos: &eos,
                        cfg,
                        metrics: &metrics,
                        queued: &queued,
                        kv_per_token,
                    };
                    let r = catch_unwind(AssertUnwindSafe(|| s.run(rx)));
                    if r.is_err() {
                        eprintln!("lowrank serve: the scheduler thread panicked");
                    }
                    alive.store(false, Ordering::SeqCst);
                })
                .expect("spawn scheduler thread")
        };
        Scheduler {
            tx: Mutex::new(tx),
            queued,
            alive,
            cfg,
            kv_per_token,
            max_pos,
            thread: Mutex::new(Some(th)),
        }
    }

    /// KV bytes reserved for a request of `prompt` tokens generating up to `max_tokens`.
    pub fn kv_need(&self, prompt: usize, max_tokens: usize) -> usize {
        (prompt + max_tokens).min(self.max_pos) * self.kv_per_token
    }

    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        let need = self.kv_need(req.prompt.len(), req.params.max_tokens);
        if need > self.cfg.kv_cache_bytes {
            return Err(SubmitError::TooLarge {
                need,
                budget: self.cfg.kv_cache_bytes,
            });
        }
        let prev = self.queued.fetch_add(1, Ordering::SeqCst);
        if prev as usize >= self.cfg.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(self.cfg.max_queue));
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.send(Msg::Submit(req)).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(())
    }

    /// Stop the thread (after failing anything still queued) and wait for it.
    pub fn shutdown(&self) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Msg::Shutdown);
        if let Some(h) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Msg::Shutdown);
    }
}

struct Row<'t> {
    /// Tokens not yet fed: the prompt, then the last sampled token.
    input: Vec<u32>,
    fed: usize,
    prompt_tokens: usize,
    cache: KvCache,
    adapters: Option<AdapterSet>,
    adapter_names: Vec<String>,
    request_mixture: bool,
    sampler: Sampler,
    stream: TextStream<'t>,
    generated: usize,
    arrived: Instant,
    deadline: Instant,
    last_token_at: Option<Instant>,
    events: UnboundedSender<Event>,
    reserved: usize,
    done: bool,
}

impl Row<'_> {
    fn finish(&mut self, ev: Event) {
        let _ = self.events.send(ev);
        self.done = true;
    }
}

/// What the loop carries from one iteration to the next besides the running rows.
#[derive(Default)]
struct LoopState {
    waiting: VecDeque<GenRequest>,
    /// KV-cache bytes reserved by the running rows.
    reserved: usize,
    stopping: bool,
    disconnected: bool,
}

struct Loop<'a> {
    model: &'a Llama,
    tok: &'a Tok,
    eos: &'a [u32],
    cfg: SchedulerConfig,
    metrics: &'a Metrics,
    queued: &'a AtomicU64,
    kv_per_token: usize,
}

fn panic_msg(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl<'a> Loop<'a> {
    /// The scheduler thread's loop: take requests, drop dead ones, admit, step, until shut
    /// down (or every sender is gone) and nothing is left to do.
    fn run(&mut self, rx: Receiver<Msg>) {
        let mut st = LoopState::default();
        let mut rows: Vec<Row<'a>> = Vec::new();
        loop {
            if rows.is_empty() && st.waiting.is_empty() && (st.stopping || st.disconnected) {
                break;
            }
            self.receive(&rx, &mut st, rows.is_empty());
            self.expire(&mut st, &mut rows);
            self.admit(&mut st, &mut rows);
            self.publish(rows.len(), st.reserved);
            if rows.is_empty() {
                continue;
            }
            // One forward over every row that has work this step.
            self.step(&mut rows);
            self.sweep(&mut rows, &mut st.reserved);
            let kv: usize = rows.iter().map(|r| r.cache.bytes()).sum();
            self.metrics
                .kv_cache_bytes
                .store(kv as u64, Ordering::Relaxed);
            self.metrics
                .kv_cache_reserved_bytes
                .store(st.reserved as u64, Ordering::Relaxed);
            self.metrics
                .running
                .store(rows.len() as u64, Ordering::Relaxed);
        }
        self.metrics.running.store(0, Ordering::Relaxed);
        self.metrics.kv_cache_bytes.store(0, Ordering::Relaxed);
        self.metrics
            .kv_cache_reserved_bytes
            .store(0, Ordering::Relaxed);
    }

    /// Take new requests; block for one only when no row is running and none is waiting.
    fn receive(&self, rx: &Receiver<Msg>, st: &mut LoopState, idle: bool) {
        if idle && st.waiting.is_empty() {
            match rx.recv() {
                Ok(Msg::Submit(r)) => st.waiting.push_back(r),
                Ok(Msg::Shutdown) => st.stopping = true,
                Err(_) => st.disconnected = true,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Submit(r)) => st.waiting.push_back(r),
                Ok(Msg::Shutdown) => st.stopping = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    st.disconnected = true;
                    break;
                }
            }
        }
    }

    /// Refuse queued requests when shutting down; drop abandoned (client gone) and expired
    /// requests, queued or running.
    fn expire(&self, st: &mut LoopState, rows: &mut Vec<Row<'a>>) {
        let now = Instant::now();
        if st.stopping {
            for r in st.waiting.drain(..) {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = r.events.send(Event::Error(ApiError::unavailable(
                    "the server is shutting down",
                )));
            }
        }
        st.waiting.retain(|r| {
            let keep = !r.events.is_closed() && now < r.deadline;
            if !keep {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                if now >= r.deadline {
                    let _ = r.events.send(Event::Error(ApiError::timeout(
                        "request timed out waiting in the queue",
                    )));
                }
            }
            keep
        });
        for r in rows.iter_mut() {
            if r.events.is_closed() {
                r.done = true;
            } else if now >= r.deadline {
                r.finish(Event::Error(ApiError::timeout(format!(
                    "request timed out after {} generated tokens",
                    r.generated
                ))));
            }
        }
        self.sweep(rows, &mut st.reserved);
    }

    /// Admit waiting requests, oldest first, within max_batch and the KV-cache budget (a
    /// request larger than the whole budget still runs when it is alone).
    fn admit(&self, st: &mut LoopState, rows: &mut Vec<Row<'a>>) {
        while rows.len() < self.cfg.max_batch.max(1) {
            let Some(r) = st.waiting.front() else { break };
            let tokens =
                (r.prompt.len() + r.params.max_tokens).min(self.model.cfg.max_position_embeddings);
            let need = tokens * self.kv_per_token;
            if !rows.is_empty() && st.reserved + need > self.cfg.kv_cache_bytes {
                break;
            }
            let r = st.waiting.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            st.reserved += need;
            rows.push(Row {
                prompt_tokens: r.prompt.len(),
                input: r.prompt,
                fed: 0,
                // Its buffers stay within the tokens reserved for it.
                cache: self.model.new_cache_for(tokens),
                adapters: r.adapters,
                adapter_names: r.adapter_names,
                request_mixture: r.request_mixture,
                stream: TextStream::new(self.tok, r.params.stop.clone()),
                sampler: Sampler::new(r.params),
                generated: 0,
                arrived: r.arrived,
                deadline: r.deadline,
                last_token_at: None,
                events: r.events,
                reserved: need,
                done: false,
            });
        }
    }

    /// Queue depth, running rows and their reserved KV bytes, for /metrics and /health.
    fn publish(&self, running: usize, reserved: usize) {
        self.metrics
            .kv_cache_reserved_bytes
            .store(reserved as u64, Ordering::Relaxed);
        self.metrics
            .queue_depth
            .store(self.queued.load(Ordering::SeqCst), Ordering::Relaxed);
        self.metrics
            .running
            .store(running as u64, Ordering::Relaxed);
    }

    /// Remove finished rows (their caches and adapter pins go with them), keeping order.
    fn sweep(&self, rows: &mut Vec<Row<'a>>, reserved: &mut usize) {
        rows.retain(|r| {
            if r.done {
                *reserved -= r.reserved;
            }
            !r.done
        });
    }

    fn step(&self, rows: &mut [Row<'a>]) {
        let started = Instant::now();
        let mut budget = self.cfg.prefill_tokens_per_step.max(1);
        let mut which: Vec<(usize, usize)> = Vec::with_capacity(rows.len());
        let result = {
            let mut seqs: Vec<SeqInput<'_>> = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter_mut().enumerate() {
                let left = r.input.len() - r.fed;
                let take = if r.generated > 0 {
                    left // decoding: the one sampled token
                } else {
                    let t = left.min(budget);
                    budget -= t;
                    t
                };
                if take == 0 {
                    continue;
                }
                let end = r.fed + take;
                seqs.push(SeqInput {
                    tokens: &r.input[r.fed..end],
                    cache: Some(&mut r.cache),
                    adapters: r.adapters.clone(),
                    logits: if end == r.input.len() {
                        LogitsMode::Last
                    } else {
                        LogitsMode::None
                    },
                });
                which.push((i, take));
            }
            if seqs.is_empty() {
                return;
            }
            self.metrics.batch_rows.observe(seqs.len() as f64);
            self.metrics
                .batch_tokens
                .observe(which.iter().map(|(_, t)| *t).sum::<usize>() as f64);
            // The whole forward runs on a rayon worker (a scope entered from outside the pool
            // runs its body there): the kernels' parallel loops then start from inside the
            // pool instead of waking this thread after each of the ~400 ops of a step.
            catch_unwind(AssertUnwindSafe(|| {
                rayon::scope(|_| self.model.forward(&mut seqs, &mut ForwardOpts::infer()))
            }))
        };
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                for &(i, _) in &which {
                    rows[i].finish(Event::Error(ApiError::internal(format!(
                        "model error: {e}"
                    ))));
                }
                return;
            }
            Err(p) => {
                for &(i, _) in &which {
                    rows[i].finish(Event::Error(ApiError::internal(format!(
                        "model error: {}",
                        panic_msg(&*p)
                    ))));
                }
                return;
            }
        };
        let now = Instant::now();
        let decode_only = which.iter().all(|&(i, _)| rows[i].generated > 0);
        for (k, &(i, take)) in which.iter().enumerate() {
            let r = &mut rows[i];
            r.fed += take;
            let Some(l) = logits[k].as_ref() else {
                continue;
            };
            let res = catch_unwind(AssertUnwindSafe(|| self.advance(r, l, now)));
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => r.finish(Event::Error(ApiError::internal(e))),
                Err(p) => r.finish(Event::Error(ApiError::internal(format!(
                    "sampling failed: {}",
                    panic_msg(&*p)
                )))),
            }
        }
        if decode_only {
            self.metrics
                .decode_steps
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .decode_step_tokens
                .fetch_add(which.len() as u64, Ordering::Relaxed);
        }
    }

    /// Sample the next token of a row and stream it; finish the row when it is done (or with
    /// an error when its logits are not finite).
    fn advance(
        &self,
        r: &mut Row<'a>,
        logits: &candle_core::Tensor,
        now: Instant,
    ) -> Result<(), String> {
        let logits: Vec<f32> = logits
            .flatten_all()
            .and_then(|l| l.to_dtype(candle_core::DType::F32))
            .and_then(|l| l.to_vec1())
            .map_err(|e| format!("sampling failed: {e}"))?;
        if let Err(n) = check_finite(&logits) {
            self.metrics
                .non_finite_logits
                .fetch_add(1, Ordering::Relaxed);
            let e = non_finite_error(n, r);
            r.finish(Event::Error(e));
            return Ok(());
        }
        let id = r.sampler.sample_vec(&logits);
        r.generated += 1;
        self.metrics
            .completion_tokens
            .fetch_add(1, Ordering::Relaxed);
        match r.last_token_at {
            None => self
                .metrics
                .ttft
                .observe(now.duration_since(r.arrived).as_secs_f64()),
            Some(t) => self
                .metrics
                .itl
                .observe(now.duration_since(t).as_secs_f64()),
        }
        r.last_token_at = Some(now);
        let done = |r: &mut Row<'a>, finish: FinishReason| {
            r.finish(Event::Done {
                finish,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.generated,
            });
        };
        let flush = |r: &mut Row<'a>| -> Result<(), String> {
            let rest = r.stream.flush().map_err(|e| e.to_string())?;
            if !rest.is_empty() {
                let _ = r.events.send(Event::Token(rest));
            }
            Ok(())
        };
        if self.eos.contains(&id) {
            flush(r)?;
            done(r, FinishReason::Stop);
            return Ok(());
        }
        let (piece, stopped) = r.stream.push(id).map_err(|e| e.to_string())?;
        if r.events.send(Event::Token(piece)).is_err() {
            r.done = true; // the client went away
            return Ok(());
        }
        if stopped {
            done(r, FinishReason::Stop);
        } else if r.generated >= r.sampler.params.max_tokens
            || r.cache.len() + 1 > self.model.cfg.max_position_embeddings
        {
            flush(r)?;
            done(r, FinishReason::Length);
        } else {
            r.input = vec![id];
            r.fed = 0;
        }
        Ok(())
    }
}

/// The error a request gets when its logits are not finite. 400 when the request chose the
/// mixture (a scale other than 1, or several adapters): the client can fix it by asking for a
/// smaller scale. 500 otherwise (the base, or a served adapter at its own scale): the model or
/// the adapter's files on the server are at fault, and the operator must see it as a failure.
fn non_finite_error(n: NonFiniteLogits, r: &Row<'_>) -> ApiError {
    let n = NonFiniteLogits {
        applied: describe_adapters(r.adapters.as_ref(), &r.adapter_names),
        ..n
    };
    if r.request_mixture {
        ApiError::bad_request(format!(
            "{n}: the request's adapter scales overflow the model's activations; use smaller scales"
        ))
        .param("adapters")
        .code("non_finite_logits")
    } else if r.adapters.as_ref().is_some_and(|s| !s.is_empty()) {
        ApiError::internal(format!(
            "{n}: the adapter's weights or lora_alpha overflow this base model's activations"
        ))
        .code("non_finite_logits")
    } else {
        ApiError::internal(format!("{n}: the base model itself overflowed"))
            .code("non_finite_logits")
    }
}

/// How long a request may still run.
pub fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or(now + Duration::from_secs(86400 * 365))
}
