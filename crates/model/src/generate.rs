//! Sampling and generation: greedy / temperature, top-k, top-p, seed; EOS, stop strings,
//! max tokens; incremental (streamable) text; batched greedy decoding for evaluation.
//!
//! Every logits row is checked before anything is drawn from it: NaN or ±inf (a huge adapter
//! scale or `lora_alpha` overflows f32 activations) is a [`NonFiniteLogits`] error, never a
//! token (greedy argmax over NaN would pick token 0 over and over).

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

/// A logits row holds NaN or ±inf: nothing may be sampled from it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the model produced non-finite logits ({count} of {len} values NaN or infinite, the first \
     {value} at token {index}){}",
    applied_suffix(.applied)
)]
pub struct NonFiniteLogits {
    /// How many of the row's values are not finite.
    pub count: usize,
    /// The row's length (the vocabulary).
    pub len: usize,
    /// The first non-finite value and its token id.
    pub index: usize,
    pub value: f32,
    /// What was applied to the row (see [`describe_adapters`]); empty when unknown.
    pub applied: String,
}

fn applied_suffix(applied: &str) -> String {
    if applied.is_empty() {
        String::new()
    } else {
        format!(" with {applied}")
    }
}

impl NonFiniteLogits {
    /// Record the adapters the row ran with (the sampler does not know them). Without any
    /// nothing is added: the weights may have been merged, which only the caller knows.
    pub fn with_adapters(mut self, adapters: Option<&AdapterSet>) -> Self {
        if adapters.is_some_and(|s| !s.is_empty()) {
            self.applied = describe_adapters(adapters, &[]);
        }
        self
    }
}

/// `Err` when any value of `logits` is NaN or infinite. One pass over the row (the vocabulary):
/// negligible next to the forward that produced it.
pub fn check_finite(logits: &[f32]) -> std::result::Result<(), NonFiniteLogits> {
    let Some(index) = logits.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    Err(NonFiniteLogits {
        count: logits[index..].iter().filter(|x| !x.is_finite()).count(),
        len: logits.len(),
        index,
        value: logits[index],
        applied: String::new(),
    })
}

/// The adapters of a mixture as a user can recognise them: each one's name (`names[i]`, or its
/// position when not given), mixture scale, rank and `lora_alpha` (the adapter's own scale is
/// alpha/r, or alpha/√r with rsLoRA: a huge alpha overflows just like a huge scale).
pub fn describe_adapters(adapters: Option<&AdapterSet>, names: &[String]) -> String {
    let Some(set) = adapters.filter(|s| !s.is_empty()) else {
        return "no adapter".into();
    };
    let parts: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, (a, scale))| {
            let c = &a.config;
            let name = match names.get(i) {
                Some(n) => format!("`{n}`"),
                None => format!("#{}", i + 1),
            };
            format!(
                "{name} at scale {} (r {}, lora_alpha {}{})",
                short_number(*scale),
                c.r,
                short_number(c.lora_alpha),
                if c.use_rslora { ", rsLoRA" } else { "" }
            )
        })
        .collect();
    format!("adapter {}", parts.join(" + "))
}

/// A scale as people write it: `0.5`, `16`, but `1e30` rather than thirty-one digits.
pub fn short_number(x: f64) -> String {
    let a = x.abs();
    if x.is_finite() && a != 0.0 && !(1e-4..1e6).contains(&a) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// One logits tensor ([vocab] or [1, vocab]) as f32 values, checked finite.
pub fn finite_row(logits: &Tensor) -> Result<Vec<f32>> {
    let v: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    check_finite(&v)?;
    Ok(v)
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

    /// logits: [vocab] or [1, vocab]. A row with NaN or ±inf is an error
    /// ([`ModelError::NonFiniteLogits`]).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        Ok(self.sample_vec(&finite_row(logits)?))
    }

    /// Draw from a row the caller has checked (see [`check_finite`]): non-finite values are
    /// never drawn when sampling, but a greedy draw over NaN is meaningless.
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
    // The cache never holds more than the prompt and max_tokens (the loop below stops there
    // or at the context), so its buffers need not grow past them.
    let mut cache = model.new_cache_for((prompt.len() + params.max_tokens).min(max));
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
        let id = sampler.sample(&logits).map_err(|e| match e {
            ModelError::NonFiniteLogits(n) => {
                ModelError::NonFiniteLogits(n.with_adapters(adapters.as_ref()))
            }
            e => e,
        })?;
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
/// Returns the generated ids per row (EOS excluded). A row whose logits are not finite fails
/// the whole call ([`ModelError::NonFiniteLogits`], naming that row's adapters).
pub fn greedy_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    adapters: &[Option<AdapterSet>],
    max_tokens: usize,
    eos_ids: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    let max = model.cfg.max_position_embeddings;
    // Each row's cache holds at most its prompt and max_tokens.
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| model.new_cache_for((p.len() + max_tokens).min(max)))
        .collect();
    let mut outs: Vec<Vec<u32>> = vec![vec![]; n];
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut active: Vec<usize> = (0..n)
        .filter(|&i| !prompts[i].is_empty() && max_tokens > 0)
        .collect();
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
            finite_row(l).map_err(|e| match e {
                ModelError::NonFiniteLogits(n) => ModelError::NonFiniteLogits(
                    n.with_adapters(adapters.get(i).and_then(|a| a.as_ref())),
                ),
                e => e,
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// NaN or ±inf anywhere in a row is refused, greedy or sampled: before, greedy argmax over
    /// an all-NaN row returned token 0 and sampling skipped the bad values.
    #[test]
    fn non_finite_rows_are_refused() {
        assert_eq!(check_finite(&[0.0, -3.5, f32::MAX]), Ok(()));
        let e = check_finite(&[0.0, f32::NAN, 1.0, f32::NEG_INFINITY]).unwrap_err();
        assert_eq!((e.index, e.count, e.len), (1, 2, 4));
        assert!(e.value.is_nan());
        assert!(e.to_string().contains("2 of 4"), "{e}");
        for temperature in [0.0, 0.8] {
            for bad in [f32::NAN, f32::INFINITY] {
                let row = Tensor::new(&[[1.0f32, bad, 0.5]], &Device::Cpu).unwrap();
                let mut s = Sampler::new(SamplingParams {
                    temperature,
                    ..Default::default()
                });
                match s.sample(&row) {
                    Err(ModelError::NonFiniteLogits(n)) => assert_eq!(n.index, 1),
                    other => panic!("t={temperature} {bad}: {other:?}"),
                }
            }
        }
        let row = Tensor::new(&[[1.0f32, 3.0, 0.5]], &Device::Cpu).unwrap();
        assert_eq!(
            Sampler::new(SamplingParams::default())
                .sample(&row)
                .unwrap(),
            1
        );
        assert_eq!(short_number(1e30), "1e30");
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(16.0), "16");
    }
}
