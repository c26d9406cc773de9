//! The LM head fused with cross-entropy, chunked over tokens.
//!
//! The head is 21 % of a step's FLOPs and its logits are 100 MB per 512 tokens. Through
//! autograd they would be kept for backward and swept ~10 times by single-threaded
//! elementwise ops. Instead we compute, chunk by chunk, the loss and its gradient with
//! respect to the final hidden states in closed form — dL/dh = (softmax(hEᵀ) − onehot)·E / M —
//! and hand autograd a surrogate `Σ h ⊙ G` whose gradient is exactly G. Only rows whose next
//! token carries a label are ever projected (prompt tokens are skipped entirely).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use lowrank_lora::Adapter;
use lowrank_model::model::AdapterSet;
use lowrank_model::ops::gemm::{matmul_frozen, matmul_frozen_into, BLayout};
use lowrank_model::{ForwardOpts, Llama, LoadedModel, LogitsMode, SeqInput};
use rayon::prelude::*;

use crate::data::{load_jsonl, LoadOptions, Sample, IGNORE};
use crate::error::TrainError;

/// Most bytes of logits one head chunk holds (256 rows of the default model's 49152-word
/// vocabulary take 50 MB). Every chunk packs (f32) or decodes (int8) the whole head for
/// its logits and again for its input gradient: 113 MB of f32 head read per product for
/// the default model, which at 128-row chunks was ≈ 5 % of an f32 step.
const CHUNK_LOGITS_BYTES: usize = 64 << 20;

/// One head chunk's logits buffer, kept from one call of [`head_chunks`] to the next (a
/// call takes it, a concurrent one makes its own). Why: a 135 M step's 50 MB chunk is
/// larger than glibc's largest reuse threshold, so it was mapped fresh and faulted in every
/// step: on a Zen 4 EPYC, `perf record lowrank bench train --compute int8 --steps 8` put
/// page clearing and faults at 3.5 % of the run's CPU time, 1.9 % with the buffer kept,
/// at the same peak RSS (it is the step's peak either way). It stays allocated after
/// training, until the process ends.
static LOGITS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// Rows per head chunk for m rows of a `vocab`-word head: as many as CHUNK_LOGITS_BYTES
/// allow (at least 64, where our gemm runs), split evenly (512 rows: two of 256, not 341
/// and 171).
fn chunk_rows(m: usize, vocab: usize) -> usize {
    let max = (CHUNK_LOGITS_BYTES / (4 * vocab.max(1))).max(64);
    m.div_ceil(m.div_ceil(max).max(1)).max(1)
}

pub struct HeadLoss {
    /// Σ NLL over the targets (f64 for stable accumulation).
    pub nll_sum: f64,
    pub targets: usize,
    /// Surrogate scalar whose gradient is the loss gradient (`None` without `want_grad`).
    pub surrogate: Option<Tensor>,
}

/// Rows of the flat token matrix with a label on their next token, and those labels.
pub fn target_rows(batch: &[&Sample]) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut tg = Vec::new();
    let mut off = 0u32;
    for s in batch {
        for i in 0..s.ids.len().saturating_sub(1) {
            let l = s.labels[i + 1];
            if l != IGNORE {
                rows.push(off + i as u32);
                tg.push(l as u32);
            }
        }
        off += s.ids.len() as u32;
    }
    (rows, tg)
}

/// Forward a batch and compute the summed NLL of its targets; with `want_grad`, also a
/// surrogate whose gradient (scaled by `grad_scale`, e.g. 1 / targets in the whole
/// accumulated batch) is the gradient of the mean loss.
pub fn batch_loss(
    model: &Llama,
    batch: &[&Sample],
    adapters: Option<AdapterSet>,
    opts: &mut ForwardOpts<'_>,
    want_grad: bool,
    grad_scale: f64,
) -> lowrank_model::Result<HeadLoss> {
    let (rows, targets) = target_rows(batch);
    let mut seqs: Vec<SeqInput> = batch
        .iter()
        .map(|s| SeqInput {
            tokens: &s.ids,
            cache: None,
            adapters: adapters.clone(),
            logits: LogitsMode::None,
        })
        .collect();
    let hidden = model.forward_hidden(&mut seqs, opts)?; // [N, H]
    if rows.is_empty() {
        return Ok(HeadLoss {
            nll_sum: 0.0,
            targets: 0,
            surrogate: None,
        });
    }
    let idx = Tensor::new(rows.as_slice(), hidden.device())?;
    let h = hidden.index_select(&idx, 0)?; // [M, H]
    head_ce(model, &h, &targets, want_grad, grad_scale)
}

/// Σ next-token NLL over `samples` and the number of target tokens, without gradients (batches
/// of 8): the eval loss of the trainer and of `lowrank eval --data`.
pub fn dataset_nll(
    model: &Llama,
    samples: &[Sample],
    adapters: Option<AdapterSet>,
) -> lowrank_model::Result<(f64, usize)> {
    let mut nll = 0.0;
    let mut n = 0;
    for chunk in samples.chunks(8) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let hl = batch_loss(
            model,
            &refs,
            adapters.clone(),
            &mut ForwardOpts::infer(),
            false,
            0.0,
        )?;
        nll += hl.nll_sum;
        n += hl.targets;
    }
    Ok((nll, n))
}

/// Token-weighted mean next-token loss of a JSONL file (`lowrank eval --data` loss mode):
/// (loss, target tokens); NaN when no token carries a label.
pub fn eval_loss_file(
    lm: &LoadedModel,
    path: &Path,
    adapters: Option<AdapterSet>,
) -> Result<(f64, usize), TrainError> {
    let eos = lm.eos_ids().first().copied();
    let lo = LoadOptions {
        max_seq_len: lm.model.cfg.max_position_embeddings,
        skip_bad: false,
    };
    let (samples, _) = load_jsonl(path, &lm.tok, eos, &lo)?;
    let (nll, n) = dataset_nll(&lm.model, &samples, adapters)?;
    Ok((if n > 0 { nll / n as f64 } else { f64::NAN }, n))
}

/// h: [M, H] final hidden states (after the norm); targets: M token ids.
pub fn head_ce(
    model: &Llama,
    h: &Tensor,
    targets: &[u32],
    want_grad: bool,
    grad_scale: f64,
) -> lowrank_model::Result<HeadLoss> {
    let w = head_weight(model);
    let hc = head_chunks(
        model,
        &h.detach(),
        targets,
        want_grad,
        grad_scale,
        w.is_variable(),
    )?;
    let surrogate = match hc.dh {
        Some(g) => {
            let mut s = (h * g)?.sum_all()?;
            if let Some(dw) = hc.dw {
                s = (s + (w * dw)?.sum_all()?)?;
            }
            Some(s)
        }
        None => None,
    };
    Ok(HeadLoss {
        nll_sum: hc.nll_sum,
        targets: targets.len(),
        surrogate,
    })
}

fn head_weight(model: &Llama) -> &Tensor {
    model
        .weights
        .lm_head
        .as_ref()
        .unwrap_or(&model.weights.embed) // [V, H]
}

struct HeadChunks {
    nll_sum: f64,
    /// dL/dh [M, H] (scaled by grad_scale)
    dh: Option<Tensor>,
    /// dL/dW of the head [V, H] (full fine-tuning only)
    dw: Option<Tensor>,
}

/// Loss and, with `want_grad`, its gradient w.r.t. h (and the head weight when `want_dw`),
/// chunk by chunk, without ever holding all logits.
fn head_chunks(
    model: &Llama,
    hd: &Tensor,
    targets: &[u32],
    want_grad: bool,
    grad_scale: f64,
    want_dw: bool,
) -> lowrank_model::Result<HeadChunks> {
    // Int8 compute: the head's logits and input gradient through its packings; f32: the
    // (detached) f32 weight.
    let int8 = model.int8().is_some();
    let wd = match int8 {
        true => None,
        false => Some(head_weight(model).detach()),
    };
    let m = targets.len();
    let mut nll_sum = 0.0f64;
    let mut grads = Vec::new();
    let mut dw: Option<Tensor> = None;
    // Int8's head products take whole chunks too: the input gradient (and the forward's
    // logits, where the training product dequantizes: see quant::TrainProduct) decode the
    // head once per chunk (2 × for 512 tokens), so smaller chunks would decode it more often.
    let chunk = chunk_rows(m, model.cfg.vocab_size);
    // The logits [n, V], row-major: the floats the loop below rewrites in place. One buffer
    // for every chunk and for later calls (see `Llama::lm_head_train_into` and
    // `matmul_frozen_into`).
    let mut data: Vec<f32> = std::mem::take(&mut *LOGITS.lock().unwrap_or_else(|e| e.into_inner()));
    for start in (0..m).step_by(chunk) {
        let n = chunk.min(m - start);
        let hc = hd.narrow(0, start, n)?; // [n, H]
        match &wd {
            Some(wd) => matmul_frozen_into(&hc, wd, BLayout::Cols, &mut data)?,
            None if want_grad => model.lm_head_train_into(&hc, &mut data)?,
            None => data = model.lm_head(&hc)?.flatten_all()?.to_vec1::<f32>()?,
        };
        let v = data.len() / n;
        let tg = &targets[start..start + n];
        // Per row: log-sum-exp, NLL, and (softmax − onehot)·scale in place. The rows' NLLs
        // are collected in order and summed serially: rayon's own `sum` associates the f64
        // additions as its work-stealing splits fall, so the loss would differ in the last
        // bits from run to run (and a resumed run would not reproduce the logged losses).
        let nlls: Vec<f64> = data
            .par_chunks_mut(v)
            .zip(tg.par_iter())
            .map(|(row, &t)| {
                // f32 exp (one per logit, vectorized), f64 sums: the log-sum-exp stays
                // accurate to ~1e-7.
                let (max, finite) = row.iter().fold((f32::NEG_INFINITY, true), |(m, f), &x| {
                    (m.max(x), f & x.is_finite())
                });
                let target = row[t as usize];
                let sum = match finite {
                    true => lowrank_model::ops::exp_shifted_in_place(row, max),
                    // A non-finite logit: libm's exp, so that NaN and ∞ reach the loss as they
                    // are (the vector exp clamps its argument).
                    false => row.iter_mut().fold(0f64, |s, x| {
                        *x = (*x - max).exp();
                        s + *x as f64
                    }),
                };
                let lse = max as f64 + sum.ln();
                if want_grad {
                    let k = (grad_scale / sum) as f32;
                    for x in row.iter_mut() {
                        *x *= k;
                    }
                    row[t as usize] -= grad_scale as f32;
                }
                lse - target as f64
            })
            .collect();
        nll_sum += nlls.iter().sum::<f64>();
        if want_grad {
            if wd.is_none() && !want_dw {
                // The packed head reads dL/dlogits in place, and the buffer serves the next chunk.
                grads.push(model.lm_head_input_grad_rows(&data, n)?); // dL/dh [n, H]
                continue;
            }
            let data = std::mem::take(&mut data);
            let p = Tensor::from_vec(data, (n, v), hd.device())?; // dL/dlogits [n, V]
            grads.push(match &wd {
                Some(wd) => matmul_frozen(&p, wd, BLayout::Rows)?,
                None => model.lm_head_input_grad(&p)?,
            }); // dL/dh [n, H]
            if want_dw {
                // Full fine-tuning: the head weight's own gradient, Pᵀ·h.
                let g = p.t()?.matmul(&hc)?; // [V, H]
                dw = Some(match dw {
                    None => g,
                    Some(acc) => (acc + g)?,
                });
            }
        }
    }
    let dh = if want_grad && !grads.is_empty() {
        Some(Tensor::cat(&grads, 0)?)
    } else {
        None
    };
    // (A poisoned lock only means another call panicked mid-step; the Vec is still a Vec.)
    if data.capacity() > 0 {
        *LOGITS.lock().unwrap_or_else(|e| e.into_inner()) = data;
    }
    Ok(HeadChunks { nll_sum, dh, dw })
}

/// One LoRA micro-batch through the hand-written backward (`lowrank_model::backward`):
/// the summed NLL of its targets and the gradients (scaled by `grad_scale`) of every module
/// of `adapter`, keyed by PEFT parameter name. `checkpoint`: layer checkpointing (see
/// `Llama::forward_tape`; the same gradients, bit for bit).
pub fn lora_batch_grads(
    model: &Llama,
    batch: &[&Sample],
    adapter: &Adapter,
    dropout: Option<(f64, &mut rand_chacha::ChaCha8Rng)>,
    grad_scale: f64,
    checkpoint: bool,
) -> lowrank_model::Result<(f64, usize, BTreeMap<String, Tensor>)> {
    let (rows, targets) = target_rows(batch);
    let seqs: Vec<&[u32]> = batch.iter().map(|s| s.ids.as_slice()).collect();
    let (hidden, tape) = model.forward_tape(&seqs, adapter, dropout, checkpoint)?; // [N, H]
    let mut out = BTreeMap::new();
    if rows.is_empty() {
        return Ok((0.0, 0, out));
    }
    let idx = Tensor::new(rows.as_slice(), hidden.device())?;
    let h = hidden.index_select(&idx, 0)?; // [M, H]
    let hc = head_chunks(model, &h, &targets, true, grad_scale, false)?;
    drop(h);
    let dh = hc.dh.expect("gradient requested");
    let dhidden = hidden.zeros_like()?.index_add(&idx, &dh, 0)?; // [N, H]
    drop(hidden);
    for (key, g) in tape.backward(model, adapter, &dhidden)? {
        let p = key.peft_prefix();
        out.insert(format!("{p}.lora_A.weight"), g.a);
        out.insert(format!("{p}.lora_B.weight"), g.b);
    }
    Ok((hc.nll_sum, targets.len(), out))
}

#[cfg(test)]
mod tests {
    use super::chunk_rows;

    /// Head chunks: even, within the logits budget (or 64 rows, where a vocabulary is so big
    /// that the budget holds fewer), and covering every row.
    #[test]
    fn head_chunks_are_even_and_bounded() {
        for (m, vocab, want) in [
            (512, 49152, 256),
            (100, 49152, 100),
            (2048, 49152, 293),
            (1000, 1 << 20, 63),
            (5, 32000, 5),
        ] {
            let c = chunk_rows(m, vocab);
            assert_eq!(c, want, "{m} rows of a {vocab}-word head");
            assert!(c * 4 * vocab <= super::CHUNK_LOGITS_BYTES || c <= 64);
            assert!(m.div_ceil(c) * c >= m);
        }
    }
}
