//! AVX2 + FMA (+ F16C, for f16 caches) row kernels of [`super::rows::attention_rows`], for
//! CPUs without AVX-512 (most laptops, AMD Zen 1–3, many servers): 16 ymm registers instead
//! of 32 zmm, so the query rows stay in L1 rather than in registers and the output is
//! accumulated 16 values of each head at a time. Same algorithm as the AVX-512 kernels; not bitwise equal to them (a process runs
//! one attention kernel, so a row's bits still never depend on its batch).

use super::rows::{attend_row, AttnKv, AttnShape, KvElem, RowKernel};
use std::arch::x86_64::*;

/// The kernel for g query heads per KV head and head_dim hd: register-blocked for the common
/// shapes (hd = 64 or 128, g ≤ 4), else the generic code compiled for AVX2 + FMA.
pub(super) fn pick<E: KvElem>(g: usize, hd: usize) -> RowKernel<E> {
    super::rows::pick_row_kernel!(row, generic, E, g, hd, 8, 16)
}

/// e^x for x ≤ 0 (scores minus their max): the same Cephes expf polynomial as the AVX-512
/// kernel; 2ⁿ is built in the exponent bits (AVX2 has no `vscalefps`). x is clamped at −87,
/// so n ≥ −126 and 2ⁿ stays a normal number.
#[inline(always)]
pub(super) unsafe fn exp(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// In-place softmax of one row of scores, 8 lanes at a time (the tail through a padded
/// buffer, so every value goes through the same vector exp).
#[inline(always)]
unsafe fn softmax(p: &mut [f32]) {
    let n = p.len();
    let (full, tail) = (n / 8, n % 8);
    let ptr = p.as_mut_ptr();
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in 0..full {
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(ptr.add(c * 8)));
    }
    let mx = p[full * 8..].iter().fold(hmax(mv), |m, &x| m.max(x));
    let mxv = _mm256_set1_ps(mx);
    let mut sv = _mm256_setzero_ps();
    for c in 0..full {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(c * 8)), mxv));
        _mm256_storeu_ps(ptr.add(c * 8), e);
        sv = _mm256_add_ps(sv, e);
    }
    let mut sum = hsum(sv);
    if tail > 0 {
        let mut buf = [mx; 8];
        buf[..tail].copy_from_slice(&p[full * 8..]);
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mxv));
        _mm256_storeu_ps(buf.as_mut_ptr(), e);
        for (x, &e) in p[full * 8..].iter_mut().zip(&buf[..tail]) {
            *x = e;
            sum += e;
        }
    }
    let inv = 1.0 / sum;
    let iv = _mm256_set1_ps(inv);
    for c in 0..full {
        let v = _mm256_mul_ps(_mm256_loadu_ps(ptr.add(c * 8)), iv);
        _mm256_storeu_ps(ptr.add(c * 8), v);
    }
    for x in &mut p[full * 8..] {
        *x *= inv;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn generic<E: KvElem>(qv: &[f32], kv: &AttnKv<E>, i: usize, s: &AttnShape, o: &mut [f32]) {
    attend_row(qv, kv, i, s, o)
}

/// [`attend_row`] for G query heads per KV head, head_dim = 8·C (C even): each cached K row
/// is loaded once for the G heads (two accumulators per head hide the FMA latency); the
/// output is built 16 values of every head at a time, 2·G accumulators in registers.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row<E: KvElem, const G: usize, const C: usize>(
    qv: &[f32],
    kv: &AttnKv<E>,
    i: usize,
    s: &AttnShape,
    o: &mut [f32],
) {
    let hd = C * 8;
    let len = kv.len - kv.rows + i + 1; // keys this row sees
    let mut sc = vec![0f32; G * len]; // [G, len]
    for kvh in 0..s.nkv {
        let q: [&[f32]; G] = std::array::from_fn(|gi| {
            let r = (kvh * G + gi) * s.n + kv.row + i;
            &qv[r * hd..(r + 1) * hd]
        });
        for j in 0..len {
            let off = kv.ks.0 + kvh * kv.ks.1 + j * kv.ks.2;
            let kp = kv.k[off..off + hd].as_ptr();
            let mut a0 = [_mm256_setzero_ps(); G];
            let mut a1 = [_mm256_setzero_ps(); G];
            for c in (0..C).step_by(2) {
                let k0 = E::load8(kp.add(c * 8));
                let k1 = E::load8(kp.add(c * 8 + 8));
                for gi in 0..G {
                    let qp = q[gi].as_ptr().add(c * 8);
                    a0[gi] = _mm256_fmadd_ps(_mm256_loadu_ps(qp), k0, a0[gi]);
                    a1[gi] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8)), k1, a1[gi]);
                }
            }
            for gi in 0..G {
                sc[gi * len + j] = hsum(_mm256_add_ps(a0[gi], a1[gi])) * s.scale;
            }
        }
        for p in sc.chunks_exact_mut(len) {
            softmax(p);
        }
        for c in (0..C).step_by(2) {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for j in 0..len {
                let off = kv.vs.0 + kvh * kv.vs.1 + j * kv.vs.2;
                let vp = kv.v[off..off + hd].as_ptr().add(c * 8);
                let (v0, v1) = (E::load8(vp), E::load8(vp.add(8)));
                for (gi, ag) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(sc[gi * len + j]);
                    ag[0] = _mm256_fmadd_ps(w, v0, ag[0]);
                    ag[1] = _mm256_fmadd_ps(w, v1, ag[1]);
                }
            }
            for (gi, ag) in acc.iter().enumerate() {
                let oh = &mut o[(kvh * G + gi) * hd + c * 8..(kvh * G + gi) * hd + c * 8 + 16];
                _mm256_storeu_ps(oh.as_mut_ptr(), ag[0]);
                _mm256_storeu_ps(oh.as_mut_ptr().add(8), ag[1]);
            }
        }
    }
}

/// dst[j] = σ(src[j]) = 1/(1 + e^(−src[j])), 8 lanes at a time, the tail through a padded
/// vector (the same rounding for every element): from t = e^(−|x|) (an argument ≤ 0, as
/// [`exp`] wants), σ = 1/(1 + t) for x ≥ 0 and t/(1 + t) below. A NaN gives 1 (the callers
/// multiply by x, which keeps it NaN).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sigmoid(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (full, tail) = (n / 8, n % 8);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let sig = |x: __m256| -> __m256 {
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let t = exp(_mm256_sub_ps(
            zero,
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), x),
        ));
        let r = _mm256_div_ps(one, _mm256_add_ps(one, t));
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, zero);
        _mm256_blendv_ps(r, _mm256_mul_ps(r, t), neg)
    };
    for c in 0..full {
        _mm256_storeu_ps(d.add(c * 8), sig(_mm256_loadu_ps(s.add(c * 8))));
    }
    if tail > 0 {
        let mut x = [0f32; 8];
        x[..tail].copy_from_slice(&src[full * 8..n]);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sig(_mm256_loadu_ps(x.as_ptr())));
        dst[full * 8..n].copy_from_slice(&lanes[..tail]);
    }
}

/// dst[j] = e^(a·src[j] + b) for arguments ≤ 0 (softmax rows of training attention); returns
/// Σ dst. 8 lanes at a time, the tail in scalar code with the same polynomial (via a padded
/// vector), so every element gets the same rounding.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `dst` and `src` have the same length.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_affine(dst: &mut [f32], src: &[f32], a: f32, b: f32) -> f32 {
    let n = dst.len().min(src.len());
    let (full, tail) = (n / 8, n % 8);
    let (av, bv) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut sum = _mm256_setzero_ps();
    for c in 0..full {
        let e = exp(_mm256_fmadd_ps(_mm256_loadu_ps(s.add(c * 8)), av, bv));
        _mm256_storeu_ps(d.add(c * 8), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    if tail > 0 {
        let mut x = [-100f32; 8];
        x[..tail].copy_from_slice(&src[full * 8..n]);
        let e = exp(_mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr()), av, bv));
        _mm256_storeu_ps(lanes.as_mut_ptr(), e);
        dst[full * 8..n].copy_from_slice(&lanes[..tail]);
        total += lanes[..tail].iter().sum::<f32>();
    }
    total
}
