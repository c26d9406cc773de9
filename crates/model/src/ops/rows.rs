//! Inference attention over the new rows of a ragged batch: every row (prompt token or decode
//! step) attends over its own sequence's cached keys in one parallel pass, with a
//! register-blocked AVX-512 kernel for common head shapes.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{dot, f32s};
use crate::error::Result;

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
