//! Tensor ops the model needs beyond candle's, chosen for training correctness.
//!
//! candle's autograd computes the gradient of *both* matmul inputs, so a frozen base weight
//! would get a full dW on every step (an extra forward's worth of FLOPs and memory).
//! [`frozen_linear`] is a custom op whose backward returns only dX = dY·W.
//! candle's fused softmax / rms_norm / rope have no backward: in training mode the model uses
//! the differentiable compositions below instead.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;

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
        // Rebuild a plain tensor view of the input (one copy of the activations, small next
        // to the matmul), multiply with candle's gemm, hand the result back as storage.
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
        let dx = g.reshape((rows, out))?.matmul(&self.w)?;
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
    let y = if rows == 1 || rows > SMALL_BATCH {
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

/// Elements per parallel task of the elementwise kernels below.
const EW_CHUNK: usize = 16 * 1024;

/// A contiguous f32 slice of a custom op's input.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expects contiguous f32 input"),
    }
}

fn fits(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == DType::F32
            && t.is_contiguous()
            && t.shape() == ts[0].shape()
    })
}

struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(gs, gl, self.name())?, slice(us, ul, self.name())?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(EW_CHUNK)
            .zip(g.par_chunks(EW_CHUNK).zip(u.par_chunks(EW_CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// SwiGLU's product m = silu(g)·u in one parallel pass (candle's silu and mul are separate
/// single-threaded sweeps: 1.2 ms for [512, 1536] on 2 cores).   g, u: [.., I] → [.., I]
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !fits(&[g, u]) {
        return Ok((g.silu()? * u)?);
    }
    Ok(g.apply_op2_no_bwd(u, &SiluMul)?)
}

struct SiluMulBwd;

impl candle_core::CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "silu-mul-bwd"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (g, u, d) = (slice(gs, gl, n)?, slice(us, ul, n)?, slice(ds, dl, n)?);
        // Output [2, ..]: dg then du, so each half is a contiguous view.
        let mut out = vec![0f32; 2 * g.len()];
        let (dg, du) = out.split_at_mut(g.len());
        dg.par_chunks_mut(EW_CHUNK)
            .zip(du.par_chunks_mut(EW_CHUNK))
            .zip(g.par_chunks(EW_CHUNK))
            .zip(u.par_chunks(EW_CHUNK).zip(d.par_chunks(EW_CHUNK)))
            .for_each(|(((dg, du), g), (u, d))| {
                for i in 0..g.len() {
                    let s = 1.0 / (1.0 + (-g[i]).exp());
                    dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = d[i] * g[i] * s;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Backward of m = silu(g)·u for dm: (dg, du) = (dm·u·silu'(g), dm·silu(g)), where
/// silu'(g) = σ(g)·(1 + g·(1 − σ(g))). One pass instead of nine candle ops.
pub fn silu_mul_bwd(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    if !fits(&[g, u, dm]) {
        let sig = candle_nn::ops::sigmoid(g)?;
        let silu = (g * &sig)?;
        let dsilu = (&sig * ((g * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
        return Ok((((dm * u)? * dsilu)?, (dm * silu)?));
    }
    let both = g.apply_op3_no_bwd(u, dm, &SiluMulBwd)?; // [2, .., I]
    Ok((both.get(0)?, both.get(1)?))
}

/// Causal softmax of attention scores over the last dim, scores scaled by `scale` first.
/// Rows are query positions modulo `t` (query heads stacked: [nkv, g·t, t]); row i sees keys
/// 0..=i. One parallel pass instead of scale, mask add and softmax as separate ops.
struct CausalSoftmax {
    t: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let t = self.t;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let n = r % t + 1; // visible keys
                let max = x[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &x) in o[..n].iter_mut().zip(&x[..n]) {
                    *o = ((x - max) * self.scale).exp();
                    sum += *o;
                }
                let k = 1.0 / sum;
                o[..n].iter_mut().for_each(|o| *o *= k);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// softmax(scale·scores + causal mask).   scores: [b, g·t, t] (no KV cache) → same shape
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    if !fits(&[scores]) || scores.dim(D::Minus1)? != t || scores.dim(1)? % t != 0 {
        let (b, rows, s) = scores.dims3()?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
        let sc = (scores * scale)?
            .reshape((b, rows / t, t, s))?
            .broadcast_add(&mask)?
            .reshape((b, rows, s))?;
        return Ok(candle_nn::ops::softmax_last_dim(&sc)?);
    }
    Ok(scores.apply_op1_no_bwd(&CausalSoftmax {
        t,
        scale: scale as f32,
    })?)
}

struct SoftmaxBwd {
    scale: f32,
}

impl candle_core::CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (p, dp) = (slice(ps, pl, self.name())?, slice(ds, dl, self.name())?);
        let n = *pl.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(n)
            .zip(p.par_chunks(n).zip(dp.par_chunks(n)))
            .for_each(|(o, (p, d))| {
                let dot: f32 = p.iter().zip(d).map(|(p, d)| p * d).sum();
                for ((o, &p), &d) in o.iter_mut().zip(p).zip(d) {
                    *o = p * (d - dot) * self.scale;
                }
            });
        Ok((CpuStorage::F32(out), pl.shape().clone()))
    }
}

/// Gradient of the scores of `p = softmax(scale·scores)`: scale·P ⊙ (dP − Σ_j dP⊙P).
pub fn softmax_bwd(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    if !fits(&[p, dp]) {
        let rs = (dp * p)?.sum_keepdim(D::Minus1)?;
        return Ok(((p * dp.broadcast_sub(&rs)?)? * scale)?);
    }
    Ok(p.apply_op2_no_bwd(
        dp,
        &SoftmaxBwd {
            scale: scale as f32,
        },
    )?)
}

fn f32s(s: &candle_core::Storage) -> Option<&[f32]> {
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

/// One sequence's rows for [`attention_rows`]: (first row in q, rows, K, V) with K, V views
/// [nkv, S, hd] holding the sequence's keys and values through its last new token; the
/// sequence's rows are its last `rows` positions (S − rows .. S).
pub type AttnItem = (usize, usize, Tensor, Tensor);

/// Causal attention for every new token of a ragged batch in one parallel pass over query
/// rows: row i of a sequence (at position p) attends over keys 0..=p of its own cache, one
/// query head group per cached row read. Returns [Σ rows, nh·hd] in item order, or `None` off
/// the CPU/f32 path (the caller then runs candle's per-sequence ops).
///
/// Every row is computed the same way whether it is a prompt token or a decode step, alone
/// or in a batch, in one chunk or several: a sequence's results do not depend on the batch
/// or on how its prompt was split, bit for bit. (With int8 activations a one-ulp difference
/// can flip a rounding and move a logit by ~0.5, so this matters.) Candle needs ~12 small
/// ops per sequence and layer for this.
pub fn attention_rows(
    q: &Tensor,
    items: &[AttnItem],
    num_kv_heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (nh, n, hd) = q.dims3()?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if items.is_empty()
        || !cpu_f32(q)
        || !q.is_contiguous()
        || nh % num_kv_heads != 0
        || items.iter().any(|(row, rows, k, v)| {
            !cpu_f32(k)
                || !cpu_f32(v)
                || k.stride()[2] != 1
                || v.stride()[2] != 1
                || k.dims() != v.dims()
                || k.dim(0).ok() != Some(num_kv_heads)
                || k.dim(2).ok() != Some(hd)
                || k.dim(1).map_or(true, |s| s < *rows)
                || row + rows > n
        })
    {
        return Ok(None);
    }
    let g = nh / num_kv_heads;
    // Hold every storage read guard while the kernel runs; the slices borrow from them.
    let (qs, ql) = q.storage_and_layout();
    let guards: Vec<_> = items
        .iter()
        .map(|(_, _, k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let Some(qv) = f32s(&qs) else { return Ok(None) };
    let qv = &qv[ql.start_offset()..];
    let mut kvs = Vec::with_capacity(items.len());
    let mut row_of = Vec::new(); // output row → (item, row within item)
    for (it, ((row, rows, k, _), ((kst, kl), (vst, vl)))) in items.iter().zip(&guards).enumerate() {
        let (Some(kd), Some(vd)) = (f32s(kst), f32s(vst)) else {
            return Ok(None);
        };
        kvs.push(AttnKv {
            k: kd,
            v: vd,
            ks: (kl.start_offset(), kl.stride()[0], kl.stride()[1]),
            vs: (vl.start_offset(), vl.stride()[0], vl.stride()[1]),
            len: k.dim(1)?,
            rows: *rows,
            row: *row,
        });
        row_of.extend((0..*rows).map(|i| (it, i)));
    }
    let shape = AttnShape {
        n,
        nkv: num_kv_heads,
        g,
        hd,
        scale: scale as f32,
    };
    let mut out = vec![0f32; row_of.len() * nh * hd];
    // One kernel for every row of the process (chosen by CPU and head shape only), so a row's
    // bits never depend on the batch.
    #[cfg(target_arch = "x86_64")]
    let kernel: Option<RowKernel> =
        is_x86_feature_detected!("avx512f").then(|| attn512::pick(g, hd));
    out.par_chunks_mut(nh * hd)
        .zip(&row_of)
        .for_each(|(o, &(it, i))| {
            #[cfg(target_arch = "x86_64")]
            if let Some(k) = kernel {
                // SAFETY: AVX-512F is present (detected above); shapes were checked.
                unsafe { k(qv, &kvs[it], i, &shape, o) };
                return;
            }
            attend_row(qv, &kvs[it], i, &shape, o)
        });
    drop(guards);
    drop(qs);
    Ok(Some(Tensor::from_vec(
        out,
        (row_of.len(), nh * hd),
        q.device(),
    )?))
}

/// One sequence's cache as slices for [`attention_rows`].
struct AttnKv<'a> {
    k: &'a [f32],
    v: &'a [f32],
    /// start offset, head stride, position stride (K then V)
    ks: (usize, usize, usize),
    vs: (usize, usize, usize),
    len: usize,
    rows: usize,
    row: usize,
}

struct AttnShape {
    /// Rows of q ([nh, n, hd]).
    n: usize,
    nkv: usize,
    /// Query heads per KV head.
    g: usize,
    hd: usize,
    scale: f32,
}

/// A row kernel of [`attention_rows`].
#[cfg(target_arch = "x86_64")]
type RowKernel = unsafe fn(&[f32], &AttnKv, usize, &AttnShape, &mut [f32]);

#[cfg(target_arch = "x86_64")]
mod attn512 {
    use super::{attend_row, AttnKv, AttnShape, RowKernel};
    use std::arch::x86_64::*;

    /// The kernel for g query heads per KV head and head_dim hd: register-blocked AVX-512
    /// for the common shapes (hd = 64 or 128, g ≤ 4: 4× fewer instructions than the generic
    /// code, which measured at 8 GMAC/s), else the generic code compiled for AVX-512.
    pub(super) fn pick(g: usize, hd: usize) -> RowKernel {
        match (g, hd) {
            (1, 64) => row::<1, 4>,
            (2, 64) => row::<2, 4>,
            (3, 64) => row::<3, 4>,
            (4, 64) => row::<4, 4>,
            (1, 128) => row::<1, 8>,
            (2, 128) => row::<2, 8>,
            (3, 128) => row::<3, 8>,
            (4, 128) => row::<4, 8>,
            _ => generic,
        }
    }

    /// e^x for x ≤ 0 (scores minus their max): Cephes' expf polynomial on the reduced
    /// argument, scaled by 2ⁿ with `vscalefps` (≈ 1 ulp; libm's scalar expf was 4 % of a
    /// serving profile).
    #[inline(always)]
    pub(super) unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(p, n)
    }

    /// In-place softmax of one row of scores, 16 lanes at a time.
    #[inline(always)]
    unsafe fn softmax(p: &mut [f32]) {
        let n = p.len();
        let (full, tail) = (n / 16, n % 16);
        let tm: __mmask16 = ((1u32 << tail) - 1) as u16;
        let ptr = p.as_mut_ptr();
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in 0..full {
            mv = _mm512_max_ps(mv, _mm512_loadu_ps(ptr.add(c * 16)));
        }
        if tail > 0 {
            let t = _mm512_mask_loadu_ps(mv, tm, ptr.add(full * 16));
            mv = _mm512_max_ps(mv, t);
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let mut sv = _mm512_setzero_ps();
        for c in 0..full {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(c * 16)), mx));
            _mm512_storeu_ps(ptr.add(c * 16), e);
            sv = _mm512_add_ps(sv, e);
        }
        if tail > 0 {
            let e = exp(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(tm, ptr.add(full * 16)),
                mx,
            ));
            _mm512_mask_storeu_ps(ptr.add(full * 16), tm, e);
            sv = _mm512_mask_add_ps(sv, tm, sv, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sv));
        for c in 0..full {
            let v = _mm512_mul_ps(_mm512_loadu_ps(ptr.add(c * 16)), inv);
            _mm512_storeu_ps(ptr.add(c * 16), v);
        }
        if tail > 0 {
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(tm, ptr.add(full * 16)), inv);
            _mm512_mask_storeu_ps(ptr.add(full * 16), tm, v);
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn generic(qv: &[f32], kv: &AttnKv, i: usize, s: &AttnShape, o: &mut [f32]) {
        attend_row(qv, kv, i, s, o)
    }

    /// [`attend_row`] with the g query rows and the output accumulators in registers; each
    /// cached K and V row is loaded once for the g heads. G heads per KV head, C = hd / 16.
    #[target_feature(enable = "avx512f")]
    unsafe fn row<const G: usize, const C: usize>(
        qv: &[f32],
        kv: &AttnKv,
        i: usize,
        s: &AttnShape,
        o: &mut [f32],
    ) {
        let hd = C * 16;
        let len = kv.len - kv.rows + i + 1; // keys this row sees
        let mut sc = vec![0f32; G * len]; // [G, len]
        for kvh in 0..s.nkv {
            let mut q = [[_mm512_setzero_ps(); C]; G];
            for (gi, qg) in q.iter_mut().enumerate() {
                let r = (kvh * G + gi) * s.n + kv.row + i;
                let qrow = &qv[r * hd..(r + 1) * hd];
                for (c, qc) in qg.iter_mut().enumerate() {
                    *qc = _mm512_loadu_ps(qrow.as_ptr().add(c * 16));
                }
            }
            for j in 0..len {
                let off = kv.ks.0 + kvh * kv.ks.1 + j * kv.ks.2;
                let krow = &kv.k[off..off + hd];
                let mut k = [_mm512_setzero_ps(); C];
                for (c, kc) in k.iter_mut().enumerate() {
                    *kc = _mm512_loadu_ps(krow.as_ptr().add(c * 16));
                }
                for (gi, qg) in q.iter().enumerate() {
                    let mut acc = _mm512_mul_ps(qg[0], k[0]);
                    for c in 1..C {
                        acc = _mm512_fmadd_ps(qg[c], k[c], acc);
                    }
                    sc[gi * len + j] = _mm512_reduce_add_ps(acc) * s.scale;
                }
            }
            for p in sc.chunks_exact_mut(len) {
                softmax(p);
            }
            let mut acc = [[_mm512_setzero_ps(); C]; G];
            for j in 0..len {
                let off = kv.vs.0 + kvh * kv.vs.1 + j * kv.vs.2;
                let vrow = &kv.v[off..off + hd];
                let mut v = [_mm512_setzero_ps(); C];
                for (c, vc) in v.iter_mut().enumerate() {
                    *vc = _mm512_loadu_ps(vrow.as_ptr().add(c * 16));
                }
                for (gi, ag) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(sc[gi * len + j]);
                    for c in 0..C {
                        ag[c] = _mm512_fmadd_ps(w, v[c], ag[c]);
                    }
                }
            }
            for (gi, ag) in acc.iter().enumerate() {
                let oh = &mut o[(kvh * G + gi) * hd..(kvh * G + gi + 1) * hd];
                for (c, ac) in ag.iter().enumerate() {
                    _mm512_storeu_ps(oh.as_mut_ptr().add(c * 16), *ac);
                }
            }
        }
    }
}

/// Row i of a sequence: every head's softmax(q·Kᵀ·scale)·V over keys 0..=p. o: [nh·hd].
#[inline(always)]
fn attend_row(qv: &[f32], kv: &AttnKv, i: usize, s: &AttnShape, o: &mut [f32]) {
    let (g, hd) = (s.g, s.hd);
    let len = kv.len - kv.rows + i + 1; // keys this row sees
    let qrow = |h: usize| {
        let r = h * s.n + kv.row + i;
        &qv[r * hd..(r + 1) * hd]
    };
    let mut sc = vec![0f32; g * len]; // [g, len]

    // Query head h uses KV head h / g (HF's repeat_kv): the g heads of a KV head are
    // adjacent, and each cached row is read once for all of them.
    for kvh in 0..s.nkv {
        for j in 0..len {
            let off = kv.ks.0 + kvh * kv.ks.1 + j * kv.ks.2;
            let krow = &kv.k[off..off + hd];
            for gi in 0..g {
                sc[gi * len + j] = dot(qrow(kvh * g + gi), krow) * s.scale;
            }
        }
        for p in sc.chunks_exact_mut(len) {
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in p.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in p.iter_mut() {
                *x *= inv;
            }
        }
        let oh = &mut o[kvh * g * hd..(kvh + 1) * g * hd];
        for j in 0..len {
            let off = kv.vs.0 + kvh * kv.vs.1 + j * kv.vs.2;
            let vrow = &kv.v[off..off + hd];
            for (gi, oi) in oh.chunks_exact_mut(hd).enumerate() {
                let w = sc[gi * len + j];
                for (o, &v) in oi.iter_mut().zip(vrow) {
                    *o += w * v;
                }
            }
        }
    }
}

/// One group of rows of a batch sharing an adapter mixture, for [`lora_gathered`]:
/// the rows and, per adapter, (A [r, in], B [out, r], scale·weight).
pub struct LoraRows<'a> {
    pub rows: &'a [u32],
    pub mods: Vec<(&'a Tensor, &'a Tensor, f64)>,
}

/// Σ w·s·B·(A·x) for every row of x [N, in] under its group's adapters, all groups in one
/// parallel pass (the gathered shrink/expand of S-LoRA/Punica's BGMV): [N, out], zero for
/// rows in no group. Candle would need index_select, two matmuls, a scale and an index_add
/// per group and projection. `None` off the CPU/f32 path (the caller runs those ops).
pub fn lora_gathered(
    x: &Tensor,
    out_features: usize,
    groups: &[LoraRows],
) -> Result<Option<Tensor>> {
    let (n, inp) = x.dims2()?;
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !ok(x)
        || groups.iter().any(|g| {
            g.rows.iter().any(|&r| r as usize >= n)
                || g.mods.iter().any(|(a, b, _)| {
                    !ok(a)
                        || !ok(b)
                        || a.dims().len() != 2
                        || a.dims()[1] != inp
                        || b.dims() != [out_features, a.dims()[0]]
                })
        })
    {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let Some(xv) = f32s(&xs) else { return Ok(None) };
    let xv = &xv[xl.start_offset()..xl.start_offset() + n * inp];
    let guards: Vec<Vec<_>> = groups
        .iter()
        .map(|g| {
            g.mods
                .iter()
                .map(|(a, b, _)| (a.storage_and_layout(), b.storage_and_layout()))
                .collect()
        })
        .collect();
    /// One module's (A, B, rank, scale·weight) as slices.
    type ModSlices<'a> = (&'a [f32], &'a [f32], usize, f32);
    let mut mods: Vec<Vec<ModSlices>> = Vec::with_capacity(groups.len());
    for (g, gg) in groups.iter().zip(&guards) {
        let mut v = Vec::with_capacity(g.mods.len());
        for ((a, _, sc), ((ast, al), (bst, bl))) in g.mods.iter().zip(gg) {
            let (Some(av), Some(bv)) = (f32s(ast), f32s(bst)) else {
                return Ok(None);
            };
            let r = a.dims()[0];
            v.push((
                &av[al.start_offset()..al.start_offset() + r * inp],
                &bv[bl.start_offset()..bl.start_offset() + out_features * r],
                r,
                *sc as f32,
            ));
        }
        mods.push(v);
    }
    let mut group_of = vec![usize::MAX; n];
    for (gi, g) in groups.iter().enumerate() {
        for &r in g.rows {
            group_of[r as usize] = gi;
        }
    }
    let mut out = vec![0f32; n * out_features];
    out.par_chunks_mut(out_features)
        .enumerate()
        .for_each(|(row, o)| {
            let gi = group_of[row];
            if gi == usize::MAX {
                return;
            }
            let xr = &xv[row * inp..(row + 1) * inp];
            let mut u = Vec::new();
            for &(a, b, r, sc) in &mods[gi] {
                // shrink: u = A·x [r]; expand: o += sc·B·u
                u.clear();
                u.extend(a.chunks_exact(inp).map(|ak| dot(ak, xr) * sc));
                for (o, br) in o.iter_mut().zip(b.chunks_exact(r)) {
                    *o += dot(br, &u);
                }
            }
        });
    drop(guards);
    drop(xs);
    Ok(Some(Tensor::from_vec(out, (n, out_features), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused CPU kernels equal the composed candle ops (the path other devices take:
    /// a transposed, non-contiguous input forces it here).
    #[test]
    fn fused_silu_kernels_equal_composed_ops() {
        let d = Device::Cpu;
        let g = Tensor::randn(0f32, 3.0, (37, 29), &d).unwrap();
        let u = Tensor::randn(0f32, 1.0, (37, 29), &d).unwrap();
        let dm = Tensor::randn(0f32, 1.0, (37, 29), &d).unwrap();
        let nc = |t: &Tensor| t.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!nc(&g).is_contiguous());
        let want = silu_mul(&nc(&g), &nc(&u)).unwrap();
        assert!(max_diff(&silu_mul(&g, &u).unwrap(), &want) < 1e-5);
        let (wg, wu) = silu_mul_bwd(&nc(&g), &nc(&u), &nc(&dm)).unwrap();
        let (fg, fu) = silu_mul_bwd(&g, &u, &dm).unwrap();
        assert!(max_diff(&fg, &wg) < 1e-5, "dg");
        assert!(max_diff(&fu, &wu) < 1e-5, "du");
        // and silu'(g) by central differences
        let h = 1e-2;
        let fd = ((silu_mul(&(&g + h).unwrap(), &u).unwrap()
            - silu_mul(&(&g - h).unwrap(), &u).unwrap())
        .unwrap()
            / (2.0 * h))
            .unwrap();
        assert!(max_diff(&(fd * &dm).unwrap(), &fg) < 2e-2);
    }

    #[test]
    fn fused_attention_softmax_equals_composed_ops() {
        let d = Device::Cpu;
        let (b, g, t) = (2, 3, 5);
        let sc = Tensor::randn(0f32, 2.0, (b, g * t, t), &d).unwrap();
        let nc = |t: &Tensor| {
            t.transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let fused = causal_softmax(&sc, t, 0.3).unwrap();
        let want = causal_softmax(&nc(&sc), t, 0.3).unwrap();
        assert!(max_diff(&fused, &want) < 1e-6);
        // row i of each block sees keys 0..=i only
        let v = fused.to_vec3::<f32>().unwrap();
        assert_eq!(v[1][t + 1][2], 0.0);
        assert!((v[1][t + 1][..2].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let dp = Tensor::randn(0f32, 1.0, (b, g * t, t), &d).unwrap();
        let a = softmax_bwd(&fused, &dp, 0.3).unwrap();
        let w = softmax_bwd(&nc(&fused), &nc(&dp), 0.3).unwrap();
        assert!(max_diff(&a, &w) < 1e-6);
    }
}

#[cfg(test)]
mod gathered_tests {
    use super::*;
    use candle_core::Device;

    /// Two groups (one a two-adapter mixture), a row in no group: equals x·Aᵀ·Bᵀ·s per row.
    #[test]
    fn gathered_lora_equals_per_group_matmuls() {
        let d = Device::Cpu;
        let (n, inp, out, r) = (7, 12, 10, 3);
        let x = Tensor::randn(0f32, 1.0, (n, inp), &d).unwrap();
        let ad = |seed: f64| {
            (
                (Tensor::randn(0f32, 1.0, (r, inp), &d).unwrap() * seed).unwrap(),
                Tensor::randn(0f32, 1.0, (out, r), &d).unwrap(),
            )
        };
        let (a1, b1) = ad(1.0);
        let (a2, b2) = ad(0.5);
        let rows1 = [0u32, 3, 4];
        let rows2 = [1u32, 6];
        let groups = [
            LoraRows {
                rows: &rows1,
                mods: vec![(&a1, &b1, 2.0)],
            },
            LoraRows {
                rows: &rows2,
                mods: vec![(&a1, &b1, 0.5), (&a2, &b2, -1.5)],
            },
        ];
        let got = lora_gathered(&x, out, &groups)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let delta = |a: &Tensor, b: &Tensor, s: f64| {
            (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * s)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (d1, d2, d3) = (
            delta(&a1, &b1, 2.0),
            delta(&a1, &b1, 0.5),
            delta(&a2, &b2, -1.5),
        );
        for row in 0..n {
            for o in 0..out {
                let want = if rows1.contains(&(row as u32)) {
                    d1[row][o]
                } else if rows2.contains(&(row as u32)) {
                    d2[row][o] + d3[row][o]
                } else {
                    0.0
                };
                assert!(
                    (got[row][o] - want).abs() < 1e-4,
                    "row {row} col {o}: {} vs {want}",
                    got[row][o]
                );
            }
        }
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use candle_core::Device;

    /// softmax(q·kᵀ/√d)·v over keys 0..=pos, in f64, for one query row of head h.
    fn naive(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], pos: usize) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = (0..=pos)
            .map(|j| {
                (0..hd).map(|d| q[d] as f64 * k[j][d] as f64).sum::<f64>() / (hd as f64).sqrt()
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (0..hd)
            .map(|d| {
                (0..=pos)
                    .map(|j| (s[j] - m).exp() / z * v[j][d] as f64)
                    .sum()
            })
            .collect()
    }

    /// A prompt chunk after a cached prefix, a decode step and a fresh prompt in one call:
    /// every row equals the naive causal attention over its own sequence's keys, and each
    /// sequence's rows are bitwise the same when it runs alone.
    #[test]
    fn attention_rows_equal_naive_causal_attention() {
        // The generic kernel (hd = 8) and the register-blocked ones (hd = 64, 128).
        for (nh, nkv, hd) in [(6, 2, 8), (9, 3, 64), (4, 4, 128), (8, 2, 64)] {
            attention_case(nh, nkv, hd);
        }
    }

    fn attention_case(nh: usize, nkv: usize, hd: usize) {
        let d = Device::Cpu;
        let g = nh / nkv;
        // (cached, new) tokens per sequence.
        let seqs = [(5usize, 3usize), (9, 1), (0, 4)];
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let q = Tensor::randn(0f32, 1.0, (nh, n, hd), &d).unwrap();
        let kvs: Vec<(Tensor, Tensor)> = seqs
            .iter()
            .map(|&(c, t)| {
                // A cache buffer with spare capacity, viewed up to its length (as KvCache does).
                let k = Tensor::randn(0f32, 1.0, (nkv, c + t + 4, hd), &d).unwrap();
                let v = Tensor::randn(0f32, 1.0, (nkv, c + t + 4, hd), &d).unwrap();
                (
                    k.narrow(1, 0, c + t).unwrap(),
                    v.narrow(1, 0, c + t).unwrap(),
                )
            })
            .collect();
        let mut items = Vec::new();
        let mut row = 0;
        for (&(_, t), (k, v)) in seqs.iter().zip(&kvs) {
            items.push((row, t, k.clone(), v.clone()));
            row += t;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let got = attention_rows(&q, &items, nkv, scale)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let qv = q.to_vec3::<f32>().unwrap();
        let mut r = 0;
        for (si, (&(c, t), (k, v))) in seqs.iter().zip(&kvs).enumerate() {
            let (k, v) = (k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
            for i in 0..t {
                for h in 0..nh {
                    let want = naive(&qv[h][r + i], &k[h / g], &v[h / g], c + i);
                    for (dd, w) in want.iter().enumerate() {
                        let x = got[r + i][h * hd + dd] as f64;
                        assert!(
                            (x - w).abs() < 1e-5,
                            "seq {si} row {i} head {h}: {x} vs {w}"
                        );
                    }
                }
            }
            // The same sequence alone (its q rows only): the same bits.
            let qs = q.narrow(1, r, t).unwrap().contiguous().unwrap();
            let alone = attention_rows(
                &qs,
                &[(0, t, items[si].2.clone(), items[si].3.clone())],
                nkv,
                scale,
            )
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
            assert_eq!(alone, got[r..r + t].to_vec(), "seq {si} alone");
            r += t;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_a_few_ulps() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run(x: &[f32; 16]) -> [f32; 16] {
            use std::arch::x86_64::*;
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), attn512::exp(_mm512_loadu_ps(x.as_ptr())));
            out
        }
        let mut worst = 0f64;
        for i in 0..20_000 {
            let x: [f32; 16] = std::array::from_fn(|l| -((i * 16 + l) as f32) * 85.0 / 320_000.0);
            let got = unsafe { run(&x) };
            for (g, x) in got.iter().zip(&x) {
                let want = (*x as f64).exp();
                worst = worst.max((*g as f64 - want).abs() / want);
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        // Far below the range: clamps to a tiny positive value instead of NaN/denormals.
        let tiny = unsafe { run(&[-1e30; 16]) };
        assert!(tiny.iter().all(|v| *v >= 0.0 && *v < 1e-37));
    }
}
