//! Fused CPU kernels of the recorded training pass and its backward: SiLU(gate)·up and its
//! gradient, the causal softmax of a block of query rows (with its log-sum-exp), the
//! probabilities again from that log-sum-exp, and the softmax's gradient. Each is one
//! parallel pass over contiguous f32 data (candle would run several ops, each a full sweep).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::rows::exp_affine;
use crate::error::Result;

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
        let out = super::par_new(g.len(), EW_CHUNK, |i, o| {
            let (g, u) = (&g[i * EW_CHUNK..][..o.len()], &u[i * EW_CHUNK..][..o.len()]);
            super::rows::sigmoid_into(o, g);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o *= g * u;
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
        let out = super::par_new2(g.len(), EW_CHUNK, |c, dg, du| {
            let (at, len) = (c * EW_CHUNK, dg.len());
            let (g, u, d) = (&g[at..][..len], &u[at..][..len], &d[at..][..len]);
            super::rows::sigmoid_into(dg, g); // σ(g), then dg in place
            for i in 0..g.len() {
                let s = dg[i];
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

/// Causal softmax of one block of query rows against its key prefix, scores scaled by
/// `scale` first, with each row's log-sum-exp. Scores are [b, g·q, e] (query heads stacked
/// by KV head, e = start + q); row (h, i) is query position start + i and sees keys
/// 0..=start+i. Output: the probabilities (zero past the diagonal) followed by the b·g·q
/// log-sum-exps, so that p = exp(scale·x − lse) on the visible keys. One parallel pass
/// instead of scale, mask add and softmax as separate ops.
struct BlockSoftmax {
    q: usize,
    start: usize,
    scale: f32,
}

impl BlockSoftmax {
    fn check(&self, dims: &[usize]) -> candle_core::Result<usize> {
        match dims {
            [_, rows, e] if rows % self.q == 0 && *e == self.start + self.q => Ok(*e),
            _ => candle_core::bail!(
                "block softmax: scores {dims:?} do not match {} queries from position {}",
                self.q,
                self.start
            ),
        }
    }
}

impl CustomOp1 for BlockSoftmax {
    fn name(&self) -> &'static str {
        "block-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let e = self.check(l.dims())?;
        let x = slice(s, l, self.name())?;
        let rows = x.len() / e;
        let mut out = vec![0f32; x.len() + rows];
        let (probs, lses) = out.split_at_mut(x.len());
        probs
            .par_chunks_mut(e)
            .zip(lses.par_iter_mut())
            .zip(x.par_chunks(e))
            .enumerate()
            .for_each(|(r, ((o, lse), x))| {
                let n = self.start + r % self.q + 1; // visible keys
                let max = x[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = exp_affine(&mut o[..n], &x[..n], self.scale, -max * self.scale);
                let k = 1.0 / sum;
                o[..n].iter_mut().for_each(|o| *o *= k);
                *lse = max * self.scale + sum.ln();
            });
        Ok((CpuStorage::F32(out), Shape::from(x.len() + rows)))
    }
}

/// The additive causal mask of a block: [q, start+q], row i sees keys 0..=start+i.
fn block_mask(q: usize, start: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let e = start + q;
    let mask: Vec<f32> = (0..q)
        .flat_map(|i| {
            (0..e).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (q, e), dev)?)
}

/// Causal softmax of a block of `q` query rows starting at position `start`, and each row's
/// log-sum-exp.   scores: [b, g·q, start+q] → (probabilities of the same shape, lse [b, g·q])
pub fn block_softmax(
    scores: &Tensor,
    q: usize,
    start: usize,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, rows, e) = scores.dims3()?;
    if !fits(&[scores]) {
        let sc = (scores * scale)?
            .reshape((b, rows / q, q, e))?
            .broadcast_add(&block_mask(q, start, scores.device())?)?
            .reshape((b, rows, e))?;
        let max = sc.max_keepdim(D::Minus1)?;
        let ex = sc.broadcast_sub(&max)?.exp()?;
        let sum = ex.sum_keepdim(D::Minus1)?;
        let lse = (max + sum.log()?)?.squeeze(D::Minus1)?;
        return Ok((ex.broadcast_div(&sum)?, lse));
    }
    let op = BlockSoftmax {
        q,
        start,
        scale: scale as f32,
    };
    let both = scores.apply_op1_no_bwd(&op)?;
    let n = b * rows * e;
    let probs = both.narrow(0, 0, n)?.reshape((b, rows, e))?;
    // A copy: a view would keep the probabilities' buffer alive for as long as the lse.
    let lse = both.narrow(0, n, b * rows)?.copy()?.reshape((b, rows))?;
    Ok((probs, lse))
}

/// The probabilities of [`block_softmax`] again from the scores and the saved log-sum-exp:
/// p = exp(scale·x − lse) on the visible keys, 0 past the diagonal. One pass (no max, no sum).
struct BlockProbs {
    q: usize,
    start: usize,
    scale: f32,
}

impl candle_core::CustomOp2 for BlockProbs {
    fn name(&self) -> &'static str {
        "block-probs"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = BlockSoftmax {
            q: self.q,
            start: self.start,
            scale: self.scale,
        };
        let e = shape.check(l.dims())?;
        let (x, lse) = (slice(s, l, self.name())?, slice(ls, ll, self.name())?);
        if lse.len() * e != x.len() {
            candle_core::bail!(
                "block probs: {} log-sum-exps for {:?} scores",
                lse.len(),
                l.dims()
            );
        }
        // Zero past each row's diagonal.
        let out = super::par_new(x.len(), e, |r, o| {
            let n = self.start + r % self.q + 1;
            exp_affine(&mut o[..n], &x[r * e..][..n], self.scale, -lse[r]);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// [`block_softmax`]'s probabilities recomputed from the scores and its log-sum-exp.
/// scores: [b, g·q, start+q], lse: [b, g·q] → [b, g·q, start+q]
pub fn block_probs(
    scores: &Tensor,
    lse: &Tensor,
    q: usize,
    start: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, rows, e) = scores.dims3()?;
    if !fits(&[scores]) || !lse.is_contiguous() || lse.dtype() != DType::F32 {
        let sc = (scores * scale)?
            .reshape((b, rows / q, q, e))?
            .broadcast_add(&block_mask(q, start, scores.device())?)?
            .reshape((b, rows, e))?;
        return Ok(sc.broadcast_sub(&lse.unsqueeze(D::Minus1)?)?.exp()?);
    }
    let op = BlockProbs {
        q,
        start,
        scale: scale as f32,
    };
    Ok(scores.apply_op2_no_bwd(lse, &op)?)
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
        let out = super::par_new(p.len(), n, |r, o| {
            let (p, d) = (&p[r * n..][..o.len()], &dp[r * n..][..o.len()]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::ops::max_abs(&(a - b).unwrap())
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
        let nc = |t: &Tensor| {
            t.transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        // A whole sequence (start 0) and a later block of it (start 4).
        for (b, g, q, start) in [(2, 3, 5, 0), (2, 3, 3, 4)] {
            let e = start + q;
            let sc = Tensor::randn(0f32, 2.0, (b, g * q, e), &d).unwrap();
            let (fused, lse) = block_softmax(&sc, q, start, 0.3).unwrap();
            let (want, want_lse) = block_softmax(&nc(&sc), q, start, 0.3).unwrap();
            assert!(max_diff(&fused, &want) < 1e-6);
            assert_eq!(lse.dims(), &[b, g * q]);
            assert!(max_diff(&lse, &want_lse) < 1e-5);
            // row i of each head sees keys 0..=start+i only
            let v = fused.to_vec3::<f32>().unwrap();
            assert_eq!(v[1][q + 1][start + 2], 0.0);
            assert!((v[1][q + 1][..start + 2].iter().sum::<f32>() - 1.0).abs() < 1e-6);
            // the probabilities again from the log-sum-exp, fused and composed
            let again = block_probs(&sc, &lse, q, start, 0.3).unwrap();
            assert!(max_diff(&again, &fused) < 1e-6);
            let composed = block_probs(&nc(&sc), &lse, q, start, 0.3).unwrap();
            assert!(max_diff(&composed, &fused) < 1e-6);
            let dp = Tensor::randn(0f32, 1.0, (b, g * q, e), &d).unwrap();
            let a = softmax_bwd(&fused, &dp, 0.3).unwrap();
            let w = softmax_bwd(&nc(&fused), &nc(&dp), 0.3).unwrap();
            assert!(max_diff(&a, &w) < 1e-6);
        }
        // a block that does not fit its scores is an error, not a wrong answer
        let sc = Tensor::randn(0f32, 1.0, (1, 4, 5), &d).unwrap();
        assert!(block_softmax(&sc, 2, 2, 1.0).is_err());
    }
}
