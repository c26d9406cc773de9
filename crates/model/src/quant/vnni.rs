use super::{Call, QK, TB, TB4, TILE};
use std::arch::x86_64::*;

/// [`super::quantize_act_block`] for a full block of 32, vectorized.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn quantize_block(xb: &[f32; QK], ab: &mut [i8; QK]) -> (f32, i32) {
    let (sc, _, _, total) = first_limb(xb, ab);
    (sc, total)
}

/// Both limbs of a full block, as [`super::avx2::quantize_fine_block`] (which says why it
/// is bitwise the scalar code's) on 16-lane vectors; a NaN residual's lanes convert under a
/// zero mask.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn quantize_fine_block(
    xb: &[f32; QK],
    ab: &mut [i8; QK],
    ab2: &mut [i8; QK],
) -> [(f32, i32); 2] {
    let (sc, x, q, total) = first_limb(xb, ab);
    let (s2, inv2) = super::residual_scale(sc);
    let (scv, inv2) = (_mm512_set1_ps(sc), _mm512_set1_ps(inv2));
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let q2 = [0, 1].map(|k| {
        let r = _mm512_sub_ps(x[k], _mm512_mul_ps(scv, _mm512_cvtepi32_ps(q[k])));
        let y = _mm512_mul_ps(r, inv2);
        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
        _mm512_maskz_cvtps_epi32(ordered, _mm512_min_ps(_mm512_max_ps(y, lo), hi))
    });
    [(sc, total), (s2, store_i8(q2, ab2))]
}

/// The first limb of a full block: x's two vectors, its scale, the clamped integers as i32
/// lanes (also stored into `ab` as i8) and their sum.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn first_limb(xb: &[f32; QK], ab: &mut [i8; QK]) -> (f32, [__m512; 2], [__m512i; 2], i32) {
    let x = [
        _mm512_loadu_ps(xb.as_ptr()),
        _mm512_loadu_ps(xb.as_ptr().add(16)),
    ];
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x[0]), _mm512_abs_ps(x[1])));
    let (sc, inv) = super::act_scale(amax);
    let inv = _mm512_set1_ps(inv);
    // Round to nearest even (the default rounding mode), then narrow.
    let lim = _mm512_set1_epi32(127);
    let clamp = |v: __m512i| _mm512_max_epi32(_mm512_min_epi32(v, lim), _mm512_set1_epi32(-127));
    let q = x.map(|v| clamp(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
    let total = store_i8(q, ab);
    (sc, x, q, total)
}

/// Stores 32 i32 lanes in ±127 as i8 into `ab`, in order; returns their sum.
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_i8(q: [__m512i; 2], ab: &mut [i8; QK]) -> i32 {
    _mm_storeu_si128(ab.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q[0]));
    _mm_storeu_si128(
        ab.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(q[1]),
    );
    _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]))
}

/// Rows r0..r0+nr of tiles t and t + 1 (where the matrix has it), for the matrix's q
/// storage.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; otherwise as [`super::Kernel::run`].
pub(super) unsafe fn run(c: Call<'_>) {
    match (c.w.nibbles, c.limbs) {
        (true, false) => pair_rows::<true>(c),
        (false, false) => pair_rows::<false>(c),
        (true, true) => limb_rows::<true>(c),
        (false, true) => limb_rows::<false>(c),
    }
}

/// # Safety
/// As [`run`], with nr ≤ [`super::NR_VNNI`].
unsafe fn pair_rows<const NIB: bool>(c: Call<'_>) {
    const _: () = assert!(super::NR_VNNI == 6);
    match c.nr {
        1 => pair::<1, NIB, false>(c),
        2 => pair::<2, NIB, false>(c),
        3 => pair::<3, NIB, false>(c),
        4 => pair::<4, NIB, false>(c),
        5 => pair::<5, NIB, false>(c),
        _ => pair::<6, NIB, false>(c),
    }
}

/// # Safety
/// As [`run`] with `limbs`, nr even and ≤ [`super::NR_VNNI_LIMBS`].
unsafe fn limb_rows<const NIB: bool>(c: Call<'_>) {
    const _: () = assert!(super::NR_VNNI_LIMBS == 8);
    match c.nr {
        2 => pair::<2, NIB, true>(c),
        4 => pair::<4, NIB, true>(c),
        6 => pair::<6, NIB, true>(c),
        _ => pair::<8, NIB, true>(c),
    }
}

/// R activation rows × two 16-output tiles (t, t + 1): per block, 8 `vpdpbusd` per row and
/// tile into i32 lanes (exact), then one scale FMA and one offset FMA into f32 lanes, as
/// every path does. With `NIB` (q stored as nibbles) each 64-byte load holds two groups of
/// 4 inputs, split with an AND and a shift. Why two tiles: with one tile a call, each
/// `vpdpbusd` needed more than one load (a broadcast activation group per row and group, a
/// weight vector per group), so the kernel waited on loads; here each broadcast feeds two,
/// and the two tiles' sums are the independent chains the unit needs. Where t is the last
/// tile it is computed twice and stored once (only a matrix with an odd tile count has it).
/// With `LIMBS` the R rows are R / 2 limb pairs whose block sums are combined as
/// 256·Σq·a₁ + Σq·a₂ (a shift and an add) before one epilogue per pair: that halves the
/// epilogue's FMAs, which compete with `vpdpbusd` for the same pipes (without the offset FMA
/// alone a two-limb product ran 16 % faster), and frees the registers for a fourth pair.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `NIB` matches `w.nibbles`; R even with `LIMBS`;
/// otherwise as [`super::Kernel::run`] with nr = R (tile t + 1's lanes at
/// `y.row(r) + 16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pair<const R: usize, const NIB: bool, const LIMBS: bool>(c: Call<'_>) {
    let Call { w, x, t, r0, y, .. } = c;
    debug_assert!(NIB == w.nibbles && t < w.tiles);
    let tbytes = if NIB { TB4 } else { TB };
    // Activation rows per output row.
    let per = if LIMBS { 2 } else { 1 };
    const { assert!(!LIMBS || R.is_multiple_of(2)) };
    let (nb, kp) = (w.nb, x.nb * QK);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // The second tile: t + 1, or t again past the matrix's last tile (not stored).
    let t2 = if t + 1 < w.tiles { t + 1 } else { t };
    let qbase = [
        w.q.as_ptr().add(t * nb * tbytes),
        w.q.as_ptr().add(t2 * nb * tbytes),
    ];
    let abase = x.a.as_ptr().add(r0 * kp);
    let low = _mm512_set1_epi8(0x0F);
    // Groups 2p and 2p + 1 (4 inputs × 16 outputs each) of one tile's block.
    let groups = |qb: *const u8, p: usize| -> (__m512i, __m512i) {
        if NIB {
            let v = _mm512_loadu_si512(qb.add(p * TILE * 4) as *const _);
            (
                _mm512_and_si512(v, low),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low),
            )
        } else {
            (
                _mm512_loadu_si512(qb.add(2 * p * TILE * 4) as *const _),
                _mm512_loadu_si512(qb.add((2 * p + 1) * TILE * 4) as *const _),
            )
        }
    };
    for b in 0..nb {
        let mut dot = [[_mm512_setzero_si512(); 2]; R];
        for p in 0..QK / 8 {
            let (u0, u1) = groups(qbase[0].add(b * tbytes), p);
            let (v0, v1) = groups(qbase[1].add(b * tbytes), p);
            for (r, dr) in dot.iter_mut().enumerate() {
                let ap = abase.add(r * kp + b * QK + p * 8) as *const i32;
                let a0 = _mm512_set1_epi32(ap.read_unaligned());
                dr[0] = _mm512_dpbusd_epi32(dr[0], u0, a0);
                dr[1] = _mm512_dpbusd_epi32(dr[1], v0, a0);
                let a1 = _mm512_set1_epi32(ap.add(1).read_unaligned());
                dr[0] = _mm512_dpbusd_epi32(dr[0], u1, a1);
                dr[1] = _mm512_dpbusd_epi32(dr[1], v1, a1);
            }
        }
        for (h, tt) in [t, t2].into_iter().enumerate() {
            let tb = tt * nb + b;
            let dv = _mm512_loadu_ps(w.d.as_ptr().add(tb * TILE));
            let mv = _mm512_loadu_ps(w.m.as_ptr().add(tb * TILE));
            for (o, ar) in acc.iter_mut().enumerate().take(R / per) {
                let r = o * per;
                let s = *x.s.get_unchecked((r0 + r) * nb + b);
                let sa = *x.sa.get_unchecked((r0 + r) * nb + b);
                let d = if LIMBS {
                    _mm512_add_epi32(_mm512_slli_epi32::<8>(dot[r][h]), dot[r + 1][h])
                } else {
                    dot[r][h]
                };
                let ds = _mm512_mul_ps(dv, _mm512_set1_ps(s));
                ar[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ds, ar[h]);
                ar[h] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sa), ar[h]);
            }
        }
    }
    // Lanes of each tile that are outputs (the second's none where t2 = t).
    let lanes = |first: usize| -> __mmask16 {
        match w.out.saturating_sub(first * TILE).min(TILE) {
            TILE => 0xffff,
            n => (1u16 << n) - 1,
        }
    };
    let masks = [lanes(t), if t2 > t { lanes(t2) } else { 0 }];
    for (r, ar) in acc.iter().enumerate().take(R / per) {
        // A masked-off lane is neither written nor can it fault, so the second tile's
        // address may lie past y's row where it has no lanes.
        _mm512_mask_storeu_ps(y.row(r), masks[0], ar[0]);
        _mm512_mask_storeu_ps(y.row(r).wrapping_add(TILE), masks[1], ar[1]);
    }
}
