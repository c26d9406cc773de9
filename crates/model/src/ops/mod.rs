//! Tensor ops the model needs beyond candle's, by concern:
//!
//! * here: linear layers with a frozen weight, and the norm / softmax / rotary ops in their
//!   fused (inference) and differentiable (autograd) forms;
//! * [`fused`]: fused CPU kernels of the recorded training pass and its backward (SiLU·up,
//!   causal softmax) — one parallel pass instead of several candle ops;
//! * [`norm`]: the same for the training RMSNorm, its backward and the residual sums;
//! * [`layout`]: parallel copies into another layout (a projection's rows, attention's heads,
//!   a pack's targets) or element type (the tape's bf16);
//! * [`rows`]: inference attention over the new rows of a ragged batch, each against its own
//!   KV cache, bitwise independent of the batch;
//! * [`lora`]: the gathered LoRA delta of a mixed-adapter batch (S-LoRA's BGMV).
//!
//! candle's autograd computes the gradient of *both* matmul inputs, so a frozen base weight
//! would get a full dW on every step (an extra forward's worth of FLOPs and memory).
//! [`frozen_linear`] is a custom op whose backward returns only dX = dY·W.
//! candle's fused softmax / rms_norm / rope have no backward: in training mode the model uses
//! the differentiable compositions below instead.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use crate::error::Result;

#[cfg(target_arch = "x86_64")]
mod attn256;
#[cfg(target_arch = "x86_64")]
mod attn512;
mod fused;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
pub mod gemm_bf16;
mod layout;
mod lora;
mod norm;
mod rows;

pub use fused::{block_probs, block_softmax, silu_mul, silu_mul_bwd, softmax_bwd};
#[cfg(test)]
pub(crate) use layout::to_bf16_path_name;
pub use layout::{cast, heads, split_cols, unheads};
pub use lora::{lora_gathered, LoraRows};
pub use norm::{add, rms_apply, rms_bwd, rms_fwd};
pub use rows::{
    attention_kernel_name, attention_rows, exp_shifted_in_place, supported_attention_kernels,
    AttnItem, AttnKernel,
};

/// max |t| over every element (tests compare tensors by it).
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    let m = t.abs().and_then(|a| a.flatten_all()).and_then(|a| a.max(0));
    m.and_then(|m| m.to_scalar()).expect("an f32 tensor")
}

/// y = x·Wᵀ with W frozen (no gradient for W). x: [.., in], W: [out, in].
struct FrozenLinear {
    /// [out, in]
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let inp = dims[dims.len() - 1];
        // Our f32 gemm reads the input where it lies and its output becomes the storage.
        if let (CpuStorage::F32(v), Some((a, b))) = (storage, layout.contiguous_offsets()) {
            let rows = (b - a) / inp.max(1);
            if let Some((y, out)) =
                gemm::product_f32(&v[a..b], rows, inp, &self.w, gemm::BLayout::Cols)?
            {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = out;
                return Ok((CpuStorage::F32(y), Shape::from(out_dims)));
            }
        }
        // Else rebuild a plain tensor view of the input (one copy of the activations, small
        // next to the matmul), multiply with candle's gemm, hand the result back as storage.
        let x = match storage {
            CpuStorage::F32(v) => match layout.contiguous_offsets() {
                Some((a, b)) => {
                    Tensor::from_slice(&v[a..b], layout.shape(), &candle_core::Device::Cpu)?
                }
                None => {
                    let full =
                        Tensor::from_slice(v.as_slice(), v.len(), &candle_core::Device::Cpu)?;
                    full.as_strided(
                        layout.shape(),
                        layout.stride().to_vec(),
                        layout.start_offset(),
                    )?
                    .contiguous()?
                }
            },
            _ => candle_core::bail!("frozen-linear: only f32 is supported"),
        };
        let y = plain_linear(&x, &self.w)?;
        let shape = y.shape().clone();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dX = dY · W  ([.., out] · [out, in]); no dW.
        let g = grad_res.contiguous()?;
        let dims = g.dims().to_vec();
        let out = dims[dims.len() - 1];
        let rows = g.elem_count() / out;
        let dx = gemm::matmul_frozen(&g.reshape((rows, out))?, &self.w, gemm::BLayout::Rows)?;
        let mut new_dims = dims;
        let last = new_dims.len() - 1;
        new_dims[last] = self.w.dim(1)?;
        Ok(Some(dx.reshape(new_dims)?))
    }
}

trait AsStrided {
    fn as_strided(
        &self,
        shape: &Shape,
        stride: Vec<usize>,
        offset: usize,
    ) -> candle_core::Result<Tensor>;
}

impl AsStrided for Tensor {
    fn as_strided(
        &self,
        shape: &Shape,
        stride: Vec<usize>,
        offset: usize,
    ) -> candle_core::Result<Tensor> {
        // Gather element by element: only reached for exotic layouts the model never makes.
        let v = self.to_vec1::<f32>()?;
        let dims = shape.dims();
        let n = shape.elem_count();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..n {
            let off: usize = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            out.push(v[off]);
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Tensor::from_vec(out, shape, &candle_core::Device::Cpu)
    }
}

/// Row counts up to which [`plain_linear`] puts the weight on the left of the gemm.
const SMALL_BATCH: usize = 64;

/// x·Wᵀ for x [.., in], W [out, in] (plain autograd semantics).
pub fn plain_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows = x.elem_count() / inp;
    let x2 = x.reshape((rows, inp))?;
    let y = if rows > SMALL_BATCH {
        gemm::matmul_frozen(&x2, w, gemm::BLayout::Cols)?
    } else if rows == 1 {
        x2.matmul(&w.t()?)?
    } else {
        // (W·xᵀ)ᵀ rather than x·Wᵀ for a few rows (batched decode): the gemm crate repacks its
        // right operand on every call, and the weight is by far the larger one. Measured on 2
        // cores with 30 cache-cold [1536, 576] weights: 1.7× faster at 32 rows. For large
        // batches the strided copy of the transposed result costs more than it saves.
        w.matmul(&x2.t()?.contiguous()?)?.t()?.contiguous()?
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

/// x·Wᵀ where W is a frozen weight: when x carries a gradient graph and W is not itself a
/// variable, use the dX-only custom op (CPU); otherwise the plain matmul.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.track_op() && !w.is_variable() && x.device().is_cpu() && x.dtype() == DType::F32 {
        Ok(x.apply_op1(FrozenLinear { w: w.clone() })?)
    } else {
        Ok(plain_linear(x, w)?)
    }
}

/// RMSNorm over the last dim. `train`: differentiable composition; else candle's fused op.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, train: bool) -> Result<Tensor> {
    if !train {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?)
}

/// Softmax over the last dim. `train`: differentiable composition; else fused.
pub fn softmax(x: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// HF ("half-split") rotary embedding. x: [heads, T, hd]; cos, sin: [T, hd/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> Result<Tensor> {
    if !train {
        let x4 = x.unsqueeze(0)?.contiguous()?;
        return Ok(candle_nn::rotary_emb::rope(&x4, cos, sin)?.squeeze(0)?);
    }
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    // [x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin]
    let c = cos.unsqueeze(0)?;
    let s = sin.unsqueeze(0)?;
    let r1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let r2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

/// Work below this many floats runs on the calling thread (a decode step's few rows).
const PAR_MIN: usize = 32 * 1024;

/// A fresh vector of n floats, filled by `f(i, c)` for its consecutive chunks c of `chunk`
/// floats (the last may be shorter), in parallel tasks once n ≥ [`PAR_MIN`]. Each chunk is
/// zeroed inside its own task just before `f` gets it, so `f` may leave zeros where it
/// writes nothing: a fresh zeroed vector costs a single-threaded memset wherever the
/// allocator reuses memory, which `perf` put at ≈ 3 % of a 4 × 128 training step's wall
/// time on two cores (the other core idle meanwhile); zeroed here, the chunk is in cache
/// when `f` writes it.
pub(crate) fn par_new(n: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    par_new_in(n, false, chunk, |i, a, _| f(i, a))
}

/// [`par_new`] for a kernel with two outputs of n floats each: one vector of 2n floats, the
/// first output then the second; `f(i, a, b)` gets the i-th chunk of each.
pub(crate) fn par_new2(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    par_new_in(n, true, chunk, f)
}

fn par_new_in(
    n: usize,
    two: bool,
    chunk: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let chunk = chunk.max(1);
    let total = if two { 2 * n } else { n };
    let mut v: Vec<f32> = Vec::with_capacity(total);
    let init = |c: &mut [MaybeUninit<f32>]| -> *mut [f32] {
        for x in c.iter_mut() {
            x.write(0.0);
        }
        c as *mut [MaybeUninit<f32>] as *mut [f32]
    };
    type Chunks<'a> = (&'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<f32>]);
    let task = |(i, (ca, cb)): (usize, Chunks<'_>)| {
        // SAFETY: `init` wrote every element of each chunk, and MaybeUninit<f32> has f32's
        // layout, so each pointer is to an initialised slice that only this task holds.
        let (ca, cb) = unsafe { (&mut *init(ca), &mut *init(cb)) };
        f(i, ca, cb);
    };
    let (sa, sb) = v.spare_capacity_mut()[..total].split_at_mut(n);
    let empty = || -> &mut [MaybeUninit<f32>] { &mut [] };
    match (two, n < PAR_MIN) {
        (true, true) => sa
            .chunks_mut(chunk)
            .zip(sb.chunks_mut(chunk))
            .enumerate()
            .for_each(task),
        (true, false) => sa
            .par_chunks_mut(chunk)
            .zip(sb.par_chunks_mut(chunk))
            .enumerate()
            .for_each(task),
        (false, true) => sa
            .chunks_mut(chunk)
            .map(|c| (c, empty()))
            .enumerate()
            .for_each(task),
        (false, false) => sa
            .par_chunks_mut(chunk)
            .map(|c| (c, empty()))
            .enumerate()
            .for_each(task),
    }
    // SAFETY: the tasks above initialised all `total` elements, within capacity.
    unsafe { v.set_len(total) };
    v
}

/// Runs `f` on the f32 slices of `ts` (each contiguous, on the CPU, f32), or returns `None`
/// when one of them is not such a tensor, or is part of an autograd graph (full
/// fine-tuning: the result must stay differentiable, so candle's ops take it).
pub(crate) fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts
        .iter()
        .map(|t| {
            let ok = t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
            let ok = ok && !t.track_op();
            ok.then(|| t.storage_and_layout())
        })
        .collect::<Option<Vec<_>>>()?;
    let slices: Vec<&[f32]> = guards
        .iter()
        .zip(ts)
        .map(|((s, l), t)| f32s(s).map(|v| &v[l.start_offset()..][..t.elem_count()]))
        .collect::<Option<Vec<_>>>()?;
    Some(f(&slices))
}

pub(crate) fn f32s(s: &candle_core::Storage) -> Option<&[f32]> {
    match s {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => Some(v.as_slice()),
        _ => None,
    }
}

/// Σ a·b in a fixed order with 8 independent partial sums (a plain `.sum()` is one serial
/// chain the compiler may not vectorize: 9 % of a 32-stream serving profile). The order
/// depends only on the length, so a row's result never depends on the batch.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{par_new, par_new2, PAR_MIN};

    /// Every chunk reaches `f` once with its index, what `f` leaves is zero even in reused
    /// memory, and the two outputs of `par_new2` lie one after the other — on both sides of
    /// the parallel threshold, with a last chunk shorter than the others.
    #[test]
    fn new_vectors_are_filled_chunk_by_chunk_and_zero_elsewhere() {
        for n in [10, PAR_MIN - 1, 3 * PAR_MIN + 5] {
            for round in 0..3 {
                // Freed blocks of the same size are likely to come back dirty.
                drop(vec![7f32; n]);
                let chunk = 1000;
                let v = par_new(n, chunk, |i, c| {
                    assert!(c.iter().all(|&x| x == 0.0), "a chunk not zeroed first");
                    for (j, x) in c.iter_mut().enumerate().step_by(2) {
                        *x = (i * chunk + j) as f32 + round as f32;
                    }
                });
                assert_eq!(v.len(), n);
                for (k, &x) in v.iter().enumerate() {
                    let want = if k % chunk % 2 == 0 {
                        (k + round) as f32
                    } else {
                        0.0
                    };
                    assert_eq!(x, want, "element {k} of {n}");
                }
                let w = par_new2(n, chunk, |i, a, b| {
                    assert_eq!(a.len(), b.len());
                    for j in 0..a.len() {
                        a[j] = (i * chunk + j) as f32;
                        b[j] = -((i * chunk + j) as f32);
                    }
                });
                assert_eq!(w.len(), 2 * n);
                for k in 0..n {
                    assert_eq!((w[k], w[n + k]), (k as f32, -(k as f32)), "pair {k} of {n}");
                }
            }
        }
    }
}
