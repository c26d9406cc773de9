//! Sampling and generation: greedy / temperature, top-k, top-p, seed; EOS, stop strings,
//! max tokens; incremental (streamable) text; batched greedy decoding for evaluation.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::model::{AdapterSet, ForwardOpts, Llama, LogitsMode, SeqInput};
use crate::tokenizer::Tok;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// 1.0 = off.
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens: 256,
            stop: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS token or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
}

impl FinishReason {
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Draws the next token from logits.
pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// logits: [vocab] or [1, vocab].
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(self.sample_vec(&logits))
    }

    pub fn sample_vec(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = p.temperature as f32;
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(logits);
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 && idx.len() > p.top_k {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / t) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (k, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = k + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= s);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (k, q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return idx[k] as u32;
            }
        }
        idx[idx.len() - 1] as u32
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for i in 1..v.len() {
        if v[i] > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Turns generated ids into text incrementally, holding back bytes that may still form an
/// incomplete UTF-8 character or the beginning of a stop string.
pub struct TextStream<'t> {
    tok: &'t Tok,
    ids: Vec<u32>,
    emitted: usize,
    stop: Vec<String>,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tok, stop: Vec<String>) -> Self {
        TextStream {
            tok,
            ids: vec![],
            emitted: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Add a token; returns (new text safe to show, whether a stop string was hit).
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if let Some(pos) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            let out = text.get(self.emitted..pos).unwrap_or("").to_string();
            self.emitted = pos.max(self.emitted);
            return Ok((out, true));
        }
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe = text.len() - '\u{FFFD}'.len_utf8();
        }
        // Hold back a suffix that is a prefix of some stop string.
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
        while safe > self.emitted && !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.emitted {
            return Ok((String::new(), false));
        }
        let out = text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok((out, false))
    }

    /// Whatever was held back, at the end of generation (not after a stop string).
    pub fn flush(&mut self) -> Result<String> {
        let text = self.tok.decode(&self.ids)?;
        let out = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
}

/// Generate from one prompt; `on_text` receives text as it becomes final (streaming).
pub fn generate(
    model: &Llama,
    tok: &Tok,
    prompt: &[u32],
    adapters: Option<AdapterSet>,
    params: &SamplingParams,
    eos_ids: &[u32],
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("empty prompt".into()));
    }
    let max = model.cfg.max_position_embeddings;
    if prompt.len() >= max {
        return Err(ModelError::ContextOverflow {
            len: prompt.len(),
            max,
        });
    }
    let mut cache = KvCache::new(model.cfg.num_layers);
    let mut sampler = Sampler::new(params.clone());
    let mut stream = TextStream::new(tok, params.stop.clone());
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    let mut finish = FinishReason::Length;
    while ids.len() < params.max_tokens && cache.len() + next_input.len() <= max {
        let logits = {
            let mut seqs = [SeqInput {
                tokens: &next_input,
                cache: Some(&mut cache),
                adapters: adapters.clone(),
                logits: LogitsMode::Last,
            }];
            model
                .forward(&mut seqs, &mut ForwardOpts::infer())?
                .pop()
                .flatten()
                .expect("logits")
        };
        let id = sampler.sample(&logits)?;
        ids.push(id);
        if eos_ids.contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        let (piece, stopped) = stream.push(id)?;
        text.push_str(&piece);
        on_text(&piece);
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        next_input = vec![id];
    }
    if finish == FinishReason::Length || eos_ids.contains(ids.last().unwrap_or(&u32::MAX)) {
        let rest = stream.flush()?;
        text.push_str(&rest);
        on_text(&rest);
    }
    Ok(Generation {
        ids,
        text,
        finish,
        prompt_tokens: prompt.len(),
    })
}

/// Greedy decoding of many prompts at once (each with its own adapters), up to `max_tokens`
/// or EOS per row. Rows finish independently; the batch shrinks as they do.
/// Returns the generated ids per row (EOS excluded).
pub fn greedy_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    adapters: &[Option<AdapterSet>],
    max_tokens: usize,
    eos_ids: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::new(model.cfg.num_layers)).collect();
    let mut outs: Vec<Vec<u32>> = vec![vec![]; n];
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut active: Vec<usize> = (0..n)
        .filter(|&i| !prompts[i].is_empty() && max_tokens > 0)
        .collect();
    let max = model.cfg.max_position_embeddings;
    while !active.is_empty() {
        let logits = {
            let mut cache_refs: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
            let mut seqs: Vec<SeqInput> = active
                .iter()
                .map(|&i| SeqInput {
                    tokens: &next[i],
                    cache: cache_refs[i].take(),
                    adapters: adapters.get(i).cloned().flatten(),
                    logits: LogitsMode::Last,
                })
                .collect();
            model.forward(&mut seqs, &mut ForwardOpts::infer())?
        };
        let mut still = Vec::with_capacity(active.len());
        for (k, &i) in active.iter().enumerate() {
            let l = logits[k].as_ref().expect("logits");
            let id = crate::model::argmax_rows(l)?[0];
            if eos_ids.contains(&id) {
                continue;
            }
            outs[i].push(id);
            if outs[i].len() < max_tokens && caches[i].len() + 1 < max {
                next[i] = vec![id];
                still.push(i);
            }
        }
        active = still;
    }
    Ok(outs)
}
