//! Causal grouped-query attention of a ragged batch, in the three ways the decoder runs:
//! inference (one fused pass over every new row, each against its own KV cache: see
//! `ops::attention_rows`), autograd (candle's differentiable ops per sequence) and LoRA
//! training (a fused causal softmax whose probabilities the tape keeps for the backward).

use candle_core::{Device, Tensor};

use crate::backward::{cat_or_single, unheads};
use crate::error::Result;
use crate::model::{ForwardOpts, Llama, SeqCtx, SeqInput};
use crate::ops;

impl Llama {
    /// Causal grouped-query attention of every sequence over its own keys (and KV cache).
    /// q: [nh, N, hd], k/v: [nkv, N, hd] → [N, nh·hd] (and `Some(())` when recording).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [SeqInput<'_>],
        ctxs: &[SeqCtx],
        opts: &ForwardOpts<'_>,
        record: bool,
    ) -> Result<(Tensor, Option<()>)> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let single = ctxs.len() == 1;
        let part = |t: &Tensor, cx: &SeqCtx| -> Result<Tensor> {
            Ok(if single {
                t.clone()
            } else {
                t.narrow(1, cx.offset, cx.len)?.contiguous()?
            })
        };
        if record {
            // LoRA training (no caches): the backward recomputes the probabilities from the
            // tape's q and k with these same functions (bitwise the same), so none are kept.
            let spans: Vec<(usize, usize)> = ctxs.iter().map(|cx| (cx.offset, cx.len)).collect();
            let probs = train_probs(q, k, &spans, nkv, scale)?;
            return Ok((train_attn(&probs, v, &spans, nh)?, Some(())));
        }
        // Inference: every sequence's rows go through one fused pass (see attention_rows);
        // autograd and non-CPU devices run candle's differentiable per-sequence ops.
        let mut items: Vec<ops::AttnItem> = Vec::with_capacity(ctxs.len());
        let mut outs: Vec<Tensor> = Vec::with_capacity(ctxs.len());
        for (s, cx) in seqs.iter_mut().zip(ctxs) {
            let (ks, vs) = (part(k, cx)?, part(v, cx)?);
            let (ks, vs) = match s.cache.as_deref_mut() {
                Some(cache) => cache.append(l, &ks, &vs)?,
                None => (ks, vs),
            };
            if opts.train {
                let qs = part(q, cx)?;
                outs.push(self.attend(&qs, &ks, &vs, cx.mask.as_ref(), true)?);
            } else {
                items.push((cx.offset, cx.len, ks, vs));
            }
        }
        let fused = match items.is_empty() {
            true => None,
            false => ops::attention_rows(q, &items, nkv, scale)?,
        };
        if let Some(a) = fused {
            return Ok((a, None)); // [N, nh·hd]
        }
        for (row, rows, ks, vs) in items {
            let qs = q.narrow(1, row, rows)?.contiguous()?;
            let mask = causal_mask(rows, ks.dim(1)? - rows, self.device())?;
            outs.push(self.attend(&qs, &ks, &vs, mask.as_ref(), false)?);
        }
        Ok((cat_or_single(outs, 0)?, None)) // [N, nh·hd]
    }

    /// Grouped-query attention for one sequence.
    /// q: [nh, t, hd], k/v: [nkv, S, hd] (S = cached + t) → [t, nh·hd]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nh, t, hd) = q.dims3()?;
        let nkv = c.num_kv_heads;
        let g = nh / nkv;
        let s = k.dim(1)?;
        // Query heads [kv·g, kv·g+g) share KV head kv (HF's repeat_kv), so group them as rows.
        let q = q.reshape((nkv, g * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // [nkv, g·t, S]
        let scores = match mask {
            Some(m) => {
                scores
                    .reshape((nkv, g, t, s))?
                    .broadcast_add(m)?
                    .reshape((nkv, g * t, s))?
            }
            None => scores,
        };
        let p = ops::softmax(&scores, train)?;
        let o = p.matmul(v)?; // [nkv, g·t, hd]
        Ok(o.reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))?)
    }
}

/// Training attention's probabilities, per sequence (offset, length) of the flat batch:
/// softmax(q·kᵀ·scale) under the causal mask, query heads grouped by KV head.
/// q: [nh, N, hd], k: [nkv, N, hd] → per sequence [nkv, g·t, t]
pub(crate) fn train_probs(
    q: &Tensor,
    k: &Tensor,
    spans: &[(usize, usize)],
    nkv: usize,
    scale: f64,
) -> Result<Vec<Tensor>> {
    let (nh, _, hd) = q.dims3()?;
    let g = nh / nkv;
    let single = spans.len() == 1;
    spans
        .iter()
        .map(|&(off, t)| {
            let part = |x: &Tensor| -> Result<Tensor> {
                Ok(match single {
                    true => x.clone(),
                    false => x.narrow(1, off, t)?.contiguous()?,
                })
            };
            let qs = part(q)?.reshape((nkv, g * t, hd))?; // query heads grouped by KV head
            let sc = qs.matmul(&part(k)?.t()?)?; // [nkv, g·t, t]
            ops::causal_softmax(&sc, t, scale)
        })
        .collect()
}

/// Training attention's output from [`train_probs`]: P·v per sequence.
/// v: [nkv, N, hd] → [N, nh·hd]
pub(crate) fn train_attn(
    probs: &[Tensor],
    v: &Tensor,
    spans: &[(usize, usize)],
    nh: usize,
) -> Result<Tensor> {
    let hd = v.dim(2)?;
    let single = spans.len() == 1;
    let outs = probs
        .iter()
        .zip(spans)
        .map(|(p, &(off, t))| {
            let vs = match single {
                true => v.clone(),
                false => v.narrow(1, off, t)?.contiguous()?,
            };
            Ok(p.matmul(&vs)?.reshape((nh, t, hd))?) // [nh, t, hd]
        })
        .collect::<Result<Vec<_>>>()?;
    unheads(&cat_or_single(outs, 1)?)
}

/// Additive causal mask [t, start+t]: query i (position start+i) sees keys 0..=start+i.
pub(crate) fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = start + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (t, s), device)?))
}
