//! Causal grouped-query attention of a ragged batch, in the three ways the decoder runs:
//! inference (one fused pass over every new row, each against its own KV cache: see
//! `ops::attention_rows`), autograd (candle's differentiable ops per sequence) and LoRA
//! training (blockwise over query rows, keeping only each row's log-sum-exp for the backward).

use candle_core::{Device, Tensor};

use crate::backward::cat_or_single;
use crate::error::Result;
use crate::model::{ForwardOpts, Llama, SeqCtx, SeqInput};
use crate::ops;
use crate::ops::gemm::bmm;

impl Llama {
    /// Causal grouped-query attention of every sequence over its own keys (and KV cache).
    /// q: [nh, N, hd], k/v: [nkv, N, hd] → [N, nh·hd] (and, when recording, the rows'
    /// log-sum-exps [nkv, g, N]).
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
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.cfg;
        let (nkv, hd) = (c.num_kv_heads, c.head_dim);
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
            // LoRA training (no caches): blockwise, keeping each row's log-sum-exp from which
            // the backward recomputes the probabilities.
            let spans: Vec<(usize, usize)> = ctxs.iter().map(|cx| (cx.offset, cx.len)).collect();
            let (out, lse) = train_attention(q, k, v, &spans, scale, ATTN_BLOCK)?;
            return Ok((out, Some(lse)));
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
                let (ks, vs) = (ks.to_dtype(q.dtype())?, vs.to_dtype(q.dtype())?);
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
            // candle's ops on an f16 cache: widen it (exactly) to the queries' dtype.
            let (ks, vs) = (ks.to_dtype(q.dtype())?, vs.to_dtype(q.dtype())?);
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

/// Query positions per block of the training attention. A block's transient scores are
/// [nkv, g·ATTN_BLOCK, ≤ t], so memory grows linearly with the sequence, and each block
/// multiplies only the keys up to its last row (the causal triangle is skipped but for the
/// block's own diagonal square): for one sequence of 2048 tokens that is 52 % of the full
/// square's FLOPs, for the usual 128-token sequences (two blocks) 75 %. With blocks of 128 a
/// 128-token sequence was one block, the whole square: 64 measured 1.01× (median of eight
/// paired `bench train --compute int8` rounds, 4 × 128) and 1.8 % by the rounds' medians.
pub(crate) const ATTN_BLOCK: usize = 64;

/// The blocks (first position, length) of a sequence of `t` tokens.
fn blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(block.max(1))
        .map(move |p0| (p0, block.max(1).min(t - p0)))
}

/// One work unit of the training attention: a block of `b` query rows from position `p0`
/// of the span (`off`, `t`) of the flat batch.
#[derive(Clone, Copy)]
struct Unit {
    off: usize,
    t: usize,
    p0: usize,
    b: usize,
}

/// Every block of every span, in order (an empty span has none).
fn units(spans: &[(usize, usize)], block: usize) -> Vec<Unit> {
    spans
        .iter()
        .flat_map(|&(off, t)| blocks(t, block).map(move |(p0, b)| Unit { off, t, p0, b }))
        .collect()
}

/// Runs `unit` over `units` on the CPU's threads a round of one unit a thread at a time,
/// handing the results to `sink` in order (on other devices, one after the other). Why:
/// the blocks' products are small batched matmuls that candle's gemm runs on one thread,
/// so one block after another left the other core idle (≈ 5 % of a 4 × 128 step's
/// samples were such single-threaded products); rounds bound the results held at once
/// (a 2048-token span's blocks' dK and dV parts) to one a thread.
fn in_rounds<U: Sync, T: Send>(
    device: &Device,
    units: &[U],
    unit: impl Fn(&U) -> Result<T> + Sync,
    mut sink: impl FnMut(&U, T) -> Result<()>,
) -> Result<()> {
    use rayon::prelude::*;
    let width = match device.is_cpu() {
        true => rayon::current_num_threads().max(1),
        false => 1,
    };
    for round in units.chunks(width) {
        let done: Vec<Result<T>> = match round.len() {
            1 => vec![unit(&round[0])],
            _ => round.par_iter().map(&unit).collect(),
        };
        for (u, r) in round.iter().zip(done) {
            sink(u, r?)?;
        }
    }
    Ok(())
}

/// Causal grouped-query attention of LoRA training, per sequence (offset, length) of the
/// flat batch and per block of `block` query positions (flash-attention's memory layout:
/// only each row's log-sum-exp is kept for the backward, never the t × t probabilities).
/// q: [nh, N, hd], k/v: [nkv, N, hd] → (out [N, nh·hd], lse [nkv, g, N])
pub(crate) fn train_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &[(usize, usize)],
    scale: f64,
    block: usize,
) -> Result<(Tensor, Tensor)> {
    let (nh, _, hd) = q.dims3()?;
    let nkv = k.dim(0)?;
    let g = nh / nkv;
    let (mut outs, mut lses) = (vec![], vec![]);
    let units = units(spans, block);
    let unit = |&Unit { off, p0, b, .. }: &Unit| -> Result<(Tensor, Tensor)> {
        let e = p0 + b; // keys 0..e are visible to some row of the block
                        // query heads grouped by KV head: [nkv, g·b, hd]
        let qb = q.narrow(1, off + p0, b)?.reshape((nkv, g * b, hd))?;
        let sc = bmm(&qb, &k.narrow(1, off, e)?.t()?)?; // [nkv, g·b, e]
        let (p, lse) = ops::block_softmax(&sc, b, p0, scale)?;
        let out = bmm(&p, &v.narrow(1, off, e)?)?.reshape((nh, b, hd))?; // [nh, b, hd]
        Ok((out, lse.reshape((nkv, g, b))?))
    };
    in_rounds(q.device(), &units, unit, |_, (out, lse)| {
        outs.push(out);
        lses.push(lse);
        Ok(())
    })?;
    Ok((
        ops::unheads(&cat_or_single(outs, 1)?)?,
        cat_or_single(lses, 2)?,
    ))
}

/// Backward of [`train_attention`] for the output gradient d_o: each block's probabilities
/// are recomputed from q, k and the saved log-sum-exp, then dV += Pᵀ·dO, dS = softmax'(dO·Vᵀ),
/// dQ = dS·K, dK += dSᵀ·Q over the block's key prefix.
/// q, d_o: [nh, N, hd], k/v: [nkv, N, hd], lse: [nkv, g, N] → (dq [nh, N, hd], dk, dv [nkv, N, hd])
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    spans: &[(usize, usize)],
    scale: f64,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (nh, _, hd) = q.dims3()?;
    let nkv = k.dim(0)?;
    let g = nh / nkv;
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    // acc [nkv, t, hd] += part [nkv, e, hd] on the first e keys
    let add_prefix = |acc: Option<Tensor>, part: Tensor, t: usize| -> Result<Tensor> {
        let e = part.dim(1)?;
        let part = match e < t {
            true => part.pad_with_zeros(1, 0, t - e)?,
            false => part,
        };
        Ok(match acc {
            Some(a) => (a + part)?,
            None => part,
        })
    };
    if spans.iter().any(|&(_, t)| t == 0) {
        let e = "an empty sequence in the batch";
        return Err(crate::error::ModelError::Invalid(e.into()));
    }
    let units = units(spans, block);
    let unit = |&Unit { off, p0, b, .. }: &Unit| -> Result<(Tensor, Tensor, Tensor)> {
        let e = p0 + b;
        let rows = |x: &Tensor| -> Result<Tensor> {
            Ok(x.narrow(1, off + p0, b)?.reshape((nkv, g * b, hd))?) // [nkv, g·b, hd]
        };
        let (qb, dob) = (rows(q)?, rows(d_o)?);
        let (kp, vp) = (k.narrow(1, off, e)?, v.narrow(1, off, e)?); // [nkv, e, hd]
        let lb = lse.narrow(2, off + p0, b)?.reshape((nkv, g * b))?;
        let p = ops::block_probs(&bmm(&qb, &kp.t()?)?, &lb, b, p0, scale)?; // [nkv, g·b, e]
        let dv = bmm(&p.t()?, &dob)?; // [nkv, e, hd]
        let dp = bmm(&dob, &vp.t()?)?; // [nkv, g·b, e]
        let ds = ops::softmax_bwd(&p, &dp, scale)?;
        drop((p, dp));
        let dq = bmm(&ds, &kp)?.reshape((nh, b, hd))?; // [nh, b, hd]
        let dk = bmm(&ds.t()?, &qb)?; // [nkv, e, hd]
        Ok((dq, dk, dv))
    };
    // Each span's dK and dV are summed over its blocks in block order (as one loop would).
    let (mut dk, mut dv) = (None, None);
    in_rounds(q.device(), &units, unit, |u, (dq, dkb, dvb)| {
        if u.p0 == 0 {
            dks.extend(dk.take());
            dvs.extend(dv.take());
        }
        dqs.push(dq);
        dk = Some(add_prefix(dk.take(), dkb, u.t)?);
        dv = Some(add_prefix(dv.take(), dvb, u.t)?);
        Ok(())
    })?;
    dks.extend(dk);
    dvs.extend(dv);
    Ok((
        cat_or_single(dqs, 1)?,
        cat_or_single(dks, 1)?,
        cat_or_single(dvs, 1)?,
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    /// max |a − b| / max |b|
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        ops::max_abs(&(a - b).unwrap()) / ops::max_abs(b)
    }

    /// The blockwise training attention and its recomputing backward against candle's
    /// autograd over the plain formula (full t × t probabilities per sequence), on a ragged
    /// batch, for blocks that split sequences unevenly, exactly, and not at all.
    #[test]
    fn blockwise_attention_matches_autograd_on_ragged_batches() {
        let dev = Device::Cpu;
        let (nh, nkv, hd) = (6, 2, 8);
        let g = nh / nkv;
        let spans = [(0, 7), (7, 1), (8, 12), (20, 5)];
        let n = 25;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = Tensor::randn(0f32, 1.5, (nh, n, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.5, (nkv, n, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (nkv, n, hd), &dev).unwrap();
        let d_o = Tensor::randn(0f32, 1.0, (nh, n, hd), &dev).unwrap();
        // Reference: per sequence, softmax(q·kᵀ·scale + mask)·v by differentiable ops.
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let mut outs = vec![];
        for &(off, t) in &spans {
            let qs = qv
                .narrow(1, off, t)
                .unwrap()
                .reshape((nkv, g * t, hd))
                .unwrap();
            let sc = (qs
                .matmul(&kv.narrow(1, off, t).unwrap().t().unwrap())
                .unwrap()
                * scale)
                .unwrap();
            let sc = match causal_mask(t, 0, &dev).unwrap() {
                Some(m) => sc
                    .reshape((nkv, g, t, t))
                    .unwrap()
                    .broadcast_add(&m)
                    .unwrap()
                    .reshape((nkv, g * t, t))
                    .unwrap(),
                None => sc,
            };
            let p = candle_nn::ops::softmax(&sc, D::Minus1).unwrap();
            outs.push(
                p.matmul(&vv.narrow(1, off, t).unwrap())
                    .unwrap()
                    .reshape((nh, t, hd))
                    .unwrap(),
            );
        }
        let out = Tensor::cat(&outs, 1).unwrap(); // [nh, N, hd]
        let grads = (&out * &d_o)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want_out = ops::unheads(&out).unwrap();
        let g_of = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
        let (wq, wk, wv) = (g_of(&qv), g_of(&kv), g_of(&vv));
        for block in [1, 3, 4, 5, 12, ATTN_BLOCK] {
            let (o, lse) = train_attention(&q, &k, &v, &spans, scale, block).unwrap();
            assert_eq!(lse.dims(), &[nkv, g, n]);
            assert!(
                rel(&o, &want_out) < 1e-5,
                "block {block}: output {}",
                rel(&o, &want_out)
            );
            let (dq, dk, dv) =
                train_attention_bwd(&q, &k, &v, &lse, &d_o, &spans, scale, block).unwrap();
            for (name, got, want) in [("dq", &dq, &wq), ("dk", &dk, &wk), ("dv", &dv, &wv)] {
                let r = rel(got, want);
                assert!(r < 1e-5, "block {block}: {name} off by {r}");
            }
        }
        // A wrong log-sum-exp (another row's) must show in the gradients.
        let (_, lse) = train_attention(&q, &k, &v, &spans, scale, 4).unwrap();
        let shifted = Tensor::cat(
            &[
                lse.narrow(2, 1, n - 1).unwrap(),
                lse.narrow(2, 0, 1).unwrap(),
            ],
            2,
        )
        .unwrap();
        let (dq, _, _) = train_attention_bwd(&q, &k, &v, &shifted, &d_o, &spans, scale, 4).unwrap();
        assert!(rel(&dq, &wq) > 1e-2);
    }
}
