//! AVX-512F row kernels of [`super::rows::attention_rows`].

use super::rows::{attend_row, AttnKv, AttnShape, KvElem, RowKernel};
use std::arch::x86_64::*;

/// The kernel for g query heads per KV head and head_dim hd: register-blocked AVX-512
/// for the common shapes (hd = 64 or 128, g ≤ 4: 4× fewer instructions than the generic
/// code, which measured at 8 GMAC/s), else the generic code compiled for AVX-512.
pub(super) fn pick<E: KvElem>(g: usize, hd: usize) -> RowKernel<E> {
    super::rows::pick_row_kernel!(row, generic, E, g, hd, 4, 8)
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

/// dst[j] = σ(src[j]) = 1/(1 + e^(−src[j])), 16 lanes at a time, the tail under a mask:
/// from t = e^(−|x|) (an argument ≤ 0, as [`exp`] wants), σ = 1/(1 + t) for x ≥ 0 and
/// t/(1 + t) below. A NaN gives 1 (the callers multiply by x, which keeps it NaN).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sigmoid(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (full, tail) = (n / 16, n % 16);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let sig = |x: __m512| -> __m512 {
        let zero = _mm512_setzero_ps();
        let one = _mm512_set1_ps(1.0);
        let t = exp(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
        let r = _mm512_div_ps(one, _mm512_add_ps(one, t));
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, zero);
        _mm512_mask_mul_ps(r, neg, r, t)
    };
    for c in 0..full {
        _mm512_storeu_ps(d.add(c * 16), sig(_mm512_loadu_ps(s.add(c * 16))));
    }
    if tail > 0 {
        let m: __mmask16 = ((1u32 << tail) - 1) as u16;
        let x = _mm512_maskz_loadu_ps(m, s.add(full * 16));
        _mm512_mask_storeu_ps(d.add(full * 16), m, sig(x));
    }
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
unsafe fn generic<E: KvElem>(qv: &[f32], kv: &AttnKv<E>, i: usize, s: &AttnShape, o: &mut [f32]) {
    attend_row(qv, kv, i, s, o)
}

/// [`attend_row`] with the g query rows and the output accumulators in registers; each
/// cached K and V row is loaded once for the g heads. G heads per KV head, C = hd / 16.
#[target_feature(enable = "avx512f")]
unsafe fn row<E: KvElem, const G: usize, const C: usize>(
    qv: &[f32],
    kv: &AttnKv<E>,
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
                *kc = E::load16(krow.as_ptr().add(c * 16));
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
                *vc = E::load16(vrow.as_ptr().add(c * 16));
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

/// dst[j] = e^(a·src[j] + b) for arguments ≤ 0 (softmax rows of training attention); returns
/// Σ dst. 16 lanes at a time, the tail under a mask.
///
/// # Safety
/// The CPU must support AVX-512F; `dst` and `src` have the same length.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_affine(dst: &mut [f32], src: &[f32], a: f32, b: f32) -> f32 {
    let n = dst.len().min(src.len());
    let (full, tail) = (n / 16, n % 16);
    let (av, bv) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut sum = _mm512_setzero_ps();
    for c in 0..full {
        let e = exp(_mm512_fmadd_ps(_mm512_loadu_ps(s.add(c * 16)), av, bv));
        _mm512_storeu_ps(d.add(c * 16), e);
        sum = _mm512_add_ps(sum, e);
    }
    if tail > 0 {
        let m: __mmask16 = ((1u32 << tail) - 1) as u16;
        let x = _mm512_maskz_loadu_ps(m, s.add(full * 16));
        let e = _mm512_maskz_mov_ps(m, exp(_mm512_fmadd_ps(x, av, bv)));
        _mm512_mask_storeu_ps(d.add(full * 16), m, e);
        sum = _mm512_add_ps(sum, e);
    }
    _mm512_reduce_add_ps(sum)
}
