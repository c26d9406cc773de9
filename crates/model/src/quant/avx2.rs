use super::{Call, QMatrix, NR_AVX2, QK, TB, TB4, TILE};
use std::arch::x86_64::*;

/// How a matrix's block sums are formed (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    /// Plain `maddubs`, K groups summed in i16 per `vpmaddwd` (K = 8, 4, 2, 1).
    Plain(usize),
    /// q > 128: the sign trick, one group per `vpmaddwd`.
    Sign,
}

impl Mode {
    pub(super) fn for_qmax(qmax: u8) -> Mode {
        // Each i16 lane adds 2·K products of at most qmax·127.
        match qmax {
            0..=16 => Mode::Plain(8),
            17..=32 => Mode::Plain(4),
            33..=64 => Mode::Plain(2),
            65..=128 => Mode::Plain(1),
            _ => Mode::Sign,
        }
    }
}

/// [`super::quantize_act_block`] for a full block of 32, vectorized; bitwise equal to it
/// for finite inputs (max of |x| is exact in any order, one f32 multiply, then the
/// conversion's round-half-to-even under the default MXCSR rounding mode).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block(xb: &[f32; QK], ab: &mut [i8; QK]) -> (f32, i32) {
    let (sc, _, _, total) = first_limb(xb, ab);
    (sc, total)
}

/// Both limbs of a full block ([`super::Activations::quantize_fine`]): the first as
/// [`quantize_block`], the residual as [`super::quantize_residual`], bitwise equal to them
/// for finite inputs. The residual is x − s·a as the scalar code rounds it (a product, then
/// a difference: no FMA), and a NaN residual gives 0 there, so its lanes are masked to 0
/// here (the conversion would give i32::MIN). Returns ((s, Σa₁), (s/256, Σa₂)).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_fine_block(
    xb: &[f32; QK],
    ab: &mut [i8; QK],
    ab2: &mut [i8; QK],
) -> [(f32, i32); 2] {
    let (sc, x, q, total) = first_limb(xb, ab);
    let (s2, inv2) = super::residual_scale(sc);
    let (scv, inv2) = (_mm256_set1_ps(sc), _mm256_set1_ps(inv2));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut q2 = [_mm256_setzero_si256(); 4];
    for k in 0..4 {
        let r = _mm256_sub_ps(x[k], _mm256_mul_ps(scv, _mm256_cvtepi32_ps(q[k])));
        let y = _mm256_mul_ps(r, inv2);
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
        let c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, lo), hi));
        q2[k] = _mm256_and_si256(c, ordered);
    }
    [(sc, total), (s2, store_i8(q2, ab2))]
}

/// The first limb of a full block: x's four vectors, its scale, the clamped integers as i32
/// lanes (also stored into `ab` as i8) and their sum.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn first_limb(xb: &[f32; QK], ab: &mut [i8; QK]) -> (f32, [__m256; 4], [__m256i; 4], i32) {
    let p = xb.as_ptr();
    let x = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let m8 = _mm256_max_ps(
        _mm256_max_ps(abs(x[0]), abs(x[1])),
        _mm256_max_ps(abs(x[2]), abs(x[3])),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<0b01>(m2, m2));
    let amax = _mm_cvtss_f32(m1);
    let (sc, inv) = super::act_scale(amax);
    let inv = _mm256_set1_ps(inv);
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let q = x.map(|v| {
        let qi = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
        _mm256_max_epi32(_mm256_min_epi32(qi, hi), lo)
    });
    let total = store_i8(q, ab);
    (sc, x, q, total)
}

/// Stores 32 i32 lanes in ±127 as i8 into `ab`, in order; returns their sum.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_i8(q: [__m256i; 4], ab: &mut [i8; QK]) -> i32 {
    // Narrow i32 → i8 (values are in ±127, so the saturating packs are exact). The packs
    // work per 128-bit lane, leaving 4-element runs in the order 0 1 2 3 | 4 5 6 7 of
    // (q[0] lo, q[1] lo, q[2] lo, q[3] lo | q[0] hi, …); the permute restores x's order.
    let p01 = _mm256_packs_epi32(q[0], q[1]);
    let p23 = _mm256_packs_epi32(q[2], q[3]);
    let p = _mm256_packs_epi16(p01, p23);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(ab.as_mut_ptr() as *mut __m256i, p);
    let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(s8),
        _mm256_extracti128_si256::<1>(s8),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
    _mm_cvtsi128_si32(s1)
}

/// Rows r0..r0+nr of tile t, in the matrix's mode.
///
/// # Safety
/// The CPU has AVX2 and FMA; otherwise as [`super::Kernel::run`].
pub(super) unsafe fn run(c: Call<'_>) {
    match (c.w.nibbles, c.limbs) {
        (true, true) => by_mode::<true, true>(c),
        (true, false) => by_mode::<true, false>(c),
        (false, true) => by_mode::<false, true>(c),
        (false, false) => by_mode::<false, false>(c),
    }
}

/// # Safety
/// As [`run`], with `NIB` = `w.nibbles` and `LIMBS` = `limbs`.
unsafe fn by_mode<const NIB: bool, const LIMBS: bool>(c: Call<'_>) {
    match Mode::for_qmax(c.w.qmax) {
        Mode::Plain(8) => rows::<8, false, NIB, LIMBS>(c),
        Mode::Plain(4) => rows::<4, false, NIB, LIMBS>(c),
        Mode::Plain(2) => rows::<2, false, NIB, LIMBS>(c),
        Mode::Plain(_) => rows::<1, false, NIB, LIMBS>(c),
        Mode::Sign => rows::<1, true, NIB, LIMBS>(c),
    }
}

/// # Safety
/// As [`run`].
unsafe fn rows<const K: usize, const SIGN: bool, const NIB: bool, const LIMBS: bool>(c: Call<'_>) {
    const _: () = assert!(NR_AVX2 == 4);
    // Limb pairs come as whole pairs (nr even).
    match (c.nr, LIMBS) {
        (1, false) => tile::<1, K, SIGN, NIB, false>(c),
        (2, _) => tile::<2, K, SIGN, NIB, LIMBS>(c),
        (3, false) => tile::<3, K, SIGN, NIB, false>(c),
        _ => tile::<4, K, SIGN, NIB, LIMBS>(c),
    }
}

/// R activation rows × one 16-output tile. Per block and group of 4 inputs, the 64 weight
/// bytes are two ymm halves (outputs 0–7, 8–15); each row's 4 activations are broadcast
/// and multiplied into i16 pairs (`vpmaddubsw`), K groups are summed in i16, widened to
/// i32 (`vpmaddwd` with ones) and summed; then the VNNI kernel's f32 epilogue.
/// Registers (16 ymm): R·2 i16 sums + R·2 i32 sums (the compiler drops the i32 ones when
/// K = 8), 2 weight halves (+2 for the sign trick), the broadcast, ones, temporaries; the
/// f32 sums are touched once per block and may live in memory.
///
/// With `NIB` (q stored as nibbles) a group's two halves come from its pair's 64 bytes,
/// split with an AND (even group) or a shift and an AND (odd group). With `LIMBS` the R
/// rows are R / 2 limb pairs, each pair's block sums combined as 256·Σq·a₁ + Σq·a₂ before
/// the epilogue (see [`super::Kernel::run`]).
///
/// # Safety
/// The CPU has AVX2 and FMA; `K` divides 8 and K·2·qmax·127 ≤ 32767 when `!SIGN`, K = 1
/// when `SIGN`; `NIB` matches `w.nibbles`; R even with `LIMBS`; otherwise as
/// [`super::Kernel::run`] with nr = R.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<
    const R: usize,
    const K: usize,
    const SIGN: bool,
    const NIB: bool,
    const LIMBS: bool,
>(
    c: Call<'_>,
) {
    let Call { w, x, t, r0, y, .. } = c;
    const G: usize = QK / 4; // groups of 4 inputs per block
                             // Activation rows per output row.
    let per = if LIMBS { 2 } else { 1 };
    const { assert!(!LIMBS || R.is_multiple_of(2)) };
    let (nb, kp) = (w.nb, x.nb * QK);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    debug_assert_eq!(NIB, w.nibbles);
    let tbytes = if NIB { TB4 } else { TB };
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let qbase = w.q.as_ptr().add(t * nb * tbytes);
    let abase = x.a.as_ptr().add(r0 * kp);
    for b in 0..nb {
        let qb = qbase.add(b * tbytes);
        let ab = abase.add(b * QK);
        let mut dot = [[_mm256_setzero_si256(); 2]; R];
        for c in 0..G / K {
            let mut s16 = [[_mm256_setzero_si256(); 2]; R];
            for k in 0..K {
                let g = c * K + k;
                let (w0, w1) = if NIB {
                    let pp = qb.add((g / 2) * TILE * 4);
                    let v0 = _mm256_loadu_si256(pp as *const __m256i);
                    let v1 = _mm256_loadu_si256(pp.add(32) as *const __m256i);
                    if g.is_multiple_of(2) {
                        (_mm256_and_si256(v0, low), _mm256_and_si256(v1, low))
                    } else {
                        (
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v0), low),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v1), low),
                        )
                    }
                } else {
                    (
                        _mm256_loadu_si256(qb.add(g * TILE * 4) as *const __m256i),
                        _mm256_loadu_si256(qb.add(g * TILE * 4 + 32) as *const __m256i),
                    )
                };
                if SIGN {
                    let (f0, f1) = (_mm256_xor_si256(w0, flip), _mm256_xor_si256(w1, flip));
                    let (u0, u1) = (_mm256_abs_epi8(f0), _mm256_abs_epi8(f1));
                    for (r, sr) in s16.iter_mut().enumerate() {
                        let a4 = (ab.add(r * kp + g * 4) as *const i32).read_unaligned();
                        let av = _mm256_set1_epi32(a4);
                        sr[0] = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(av, f0));
                        sr[1] = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(av, f1));
                    }
                } else {
                    for (r, sr) in s16.iter_mut().enumerate() {
                        let a4 = (ab.add(r * kp + g * 4) as *const i32).read_unaligned();
                        let av = _mm256_set1_epi32(a4);
                        // Wrapping i16 adds: the bound on K keeps them exact.
                        sr[0] = _mm256_add_epi16(sr[0], _mm256_maddubs_epi16(w0, av));
                        sr[1] = _mm256_add_epi16(sr[1], _mm256_maddubs_epi16(w1, av));
                    }
                }
            }
            for (dr, sr) in dot.iter_mut().zip(&s16) {
                dr[0] = _mm256_add_epi32(dr[0], _mm256_madd_epi16(sr[0], ones));
                dr[1] = _mm256_add_epi32(dr[1], _mm256_madd_epi16(sr[1], ones));
            }
        }
        let tb = t * nb + b;
        let dp = w.d.as_ptr().add(tb * TILE);
        let mp = w.m.as_ptr().add(tb * TILE);
        let dv = [_mm256_loadu_ps(dp), _mm256_loadu_ps(dp.add(8))];
        let mv = [_mm256_loadu_ps(mp), _mm256_loadu_ps(mp.add(8))];
        // Activation row r's exact block sums.
        let fixed = |r: usize| -> [__m256i; 2] {
            if SIGN {
                // Σq·a = Σq'·a + 128·Σa (exact in i32: |128·Σa| ≤ 128·32·127).
                let fix = _mm256_set1_epi32(128 * *x.sum.get_unchecked((r0 + r) * nb + b));
                dot[r].map(|v| _mm256_add_epi32(v, fix))
            } else {
                dot[r]
            }
        };
        for (o, ar) in acc.iter_mut().enumerate().take(R / per) {
            let r = o * per;
            let i = (r0 + r) * nb + b;
            let s = _mm256_set1_ps(*x.s.get_unchecked(i));
            let sa = _mm256_set1_ps(*x.sa.get_unchecked(i));
            let mut d = fixed(r);
            if LIMBS {
                let lo = fixed(r + 1);
                for h in 0..2 {
                    d[h] = _mm256_add_epi32(_mm256_slli_epi32::<8>(d[h]), lo[h]);
                }
            }
            for h in 0..2 {
                let ds = _mm256_mul_ps(dv[h], s);
                ar[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[h]), ds, ar[h]);
                ar[h] = _mm256_fmadd_ps(mv[h], sa, ar[h]);
            }
        }
    }
    let lanes = TILE.min(w.out - t * TILE);
    for (o, ar) in acc.iter().enumerate().take(R / per) {
        let row = y.row(o);
        if lanes == TILE {
            _mm256_storeu_ps(row, ar[0]);
            _mm256_storeu_ps(row.add(8), ar[1]);
        } else {
            let mut tmp = [0f32; TILE];
            _mm256_storeu_ps(tmp.as_mut_ptr(), ar[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), ar[1]);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, lanes);
        }
    }
}

/// Columns i0..i0+ni of tile `t`'s rows ([n ≤ 16, ni], row-major) decoded as w = d·q + m,
/// bitwise as [`QMatrix::tile_span_body`] (the same fused multiply-add per weight; the
/// conversions of q are exact). Training decodes every pack twice a step (the forward's
/// f32 gemm on AVX2 and the backward's dX) and the head eight times: one weight at a time
/// that was 5–6 % of an int8 step on an AVX2 EPYC. A full tile's whole blocks go through
/// [`whole_blocks`] (0.08 instead of 0.25 ns a weight, in cache, on a Zen 4 core); the
/// rest here: two lanes' four inputs are one vector, 8 bytes widened, converted, one FMA,
/// two 16-byte stores. A group cut short by the span's end is decoded by the scalar body.
///
/// # Safety
/// The CPU has AVX2 and FMA; t < `w.tiles`; i0 is a multiple of [`QK`]; `rows` holds n·ni
/// f32 with n ≤ min(16, out − 16t) and i0 + ni ≤ `w.inp`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_span_into(w: &QMatrix, t: usize, i0: usize, ni: usize, rows: &mut [f32]) {
    let n = rows.len() / ni;
    debug_assert!(n <= TILE && rows.len() == n * ni && i0.is_multiple_of(QK));
    let end = (i0 + ni).min(w.inp);
    let out = rows.as_mut_ptr();
    let low = _mm256_set1_epi32(0x0F);
    // Whole blocks of a full tile (every training product's bulk): the fast path below.
    let whole = match n == TILE {
        true => (end - i0) / QK,
        false => 0,
    };
    if whole > 0 {
        match w.nibbles {
            true => whole_blocks::<true>(w, t, i0 / QK, whole, ni, out),
            false => whole_blocks::<false>(w, t, i0 / QK, whole, ni, out),
        }
    }
    for b in i0 / QK + whole..end.div_ceil(QK) {
        let tb = t * w.nb + b;
        let d = &w.d[tb * TILE..][..TILE];
        let m = &w.m[tb * TILE..][..TILE];
        // Per lane pair: [d(2p) ×4, d(2p+1) ×4], and the same of m.
        let pair = |v: &[f32], p: usize| {
            _mm256_setr_m128(_mm_set1_ps(v[2 * p]), _mm_set1_ps(v[2 * p + 1]))
        };
        let dv: [__m256; TILE / 2] = std::array::from_fn(|p| pair(d, p));
        let mv: [__m256; TILE / 2] = std::array::from_fn(|p| pair(m, p));
        for g in 0..QK / 4 {
            let c0 = b * QK + g * 4;
            if c0 >= end {
                break;
            }
            if end - c0 < 4 {
                // The span ends inside this group: the scalar body's arithmetic.
                let (src, shift) = match w.nibbles {
                    true => (&w.q[tb * TB4 + (g / 2) * TILE * 4..], 4 * (g % 2)),
                    false => (&w.q[tb * TB + g * TILE * 4..], 0),
                };
                let mask = if w.nibbles { 0x0F } else { 0xFF };
                for lane in 0..n {
                    for k in 0..end - c0 {
                        let q = (src[lane * 4 + k] >> shift) & mask;
                        rows[lane * ni + c0 - i0 + k] = d[lane].mul_add(q as f32, m[lane]);
                    }
                }
                continue;
            }
            let src = match w.nibbles {
                true => w.q.as_ptr().add(tb * TB4 + (g / 2) * TILE * 4),
                false => w.q.as_ptr().add(tb * TB + g * TILE * 4),
            };
            for p in 0..n.div_ceil(2) {
                let raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.add(8 * p) as *const __m128i));
                let q = match (w.nibbles, g % 2) {
                    (false, _) => raw,
                    (true, 0) => _mm256_and_si256(raw, low),
                    (true, _) => _mm256_and_si256(_mm256_srli_epi32::<4>(raw), low),
                };
                let v = _mm256_fmadd_ps(dv[p], _mm256_cvtepi32_ps(q), mv[p]);
                let at = out.add(2 * p * ni + c0 - i0);
                _mm_storeu_ps(at, _mm256_castps256_ps128(v));
                if 2 * p + 1 < n {
                    _mm_storeu_ps(at.add(ni), _mm256_extractf128_ps::<1>(v));
                }
            }
        }
    }
}

/// [`tile_span_into`]'s body for `count` whole blocks from block `b0` of a full tile (16
/// rows, `ni` floats apart, block b0 at column 0 of `out`): the same fused multiply-add per
/// weight. Each lane pair's scales are built once a block by permutes (not 32 scalar
/// loads), the nibbles of a group pair are loaded once for both groups, and two groups of
/// a lane pair are joined into whole 8-float rows, so a row's block is four 32-byte stores.
///
/// # Safety
/// The CPU has AVX2 and FMA; `NIB` matches `w.nibbles`; t < `w.tiles` is a full tile
/// (16 rows); blocks b0..b0+count exist; `out` points at 16 rows of ≥ 32·count writable
/// floats, `ni` apart.
#[target_feature(enable = "avx2,fma")]
unsafe fn whole_blocks<const NIB: bool>(
    w: &QMatrix,
    t: usize,
    b0: usize,
    count: usize,
    ni: usize,
    out: *mut f32,
) {
    debug_assert!(NIB == w.nibbles && (t + 1) * TILE <= w.out && b0 + count <= w.nb);
    let low = _mm256_set1_epi32(0x0F);
    // Lane pair p's [d(2p) ×4, d(2p+1) ×4] from the 8 lanes loaded with it.
    let spread: [__m256i; 4] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm256_setr_epi32(a, a, a, a, b, b, b, b)
    });
    for bi in 0..count {
        let b = b0 + bi;
        let tb = t * w.nb + b;
        let dp = w.d.as_ptr().add(tb * TILE);
        let mp = w.m.as_ptr().add(tb * TILE);
        let tbytes = if NIB { TB4 } else { TB };
        let qb = w.q.as_ptr().add(tb * tbytes);
        // The next tile's same block (what a caller filling 16 rows at a time decodes next):
        // its bytes lie a whole tile row away, past where the hardware prefetcher follows.
        if t + 1 < w.tiles {
            let nq = w.q.as_ptr().wrapping_add((tb + w.nb) * tbytes);
            for line in (0..tbytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(nq.wrapping_add(line) as *const i8);
            }
            _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().wrapping_add((tb + w.nb) * TILE) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w.m.as_ptr().wrapping_add((tb + w.nb) * TILE) as *const i8);
        }
        for half in 0..2 {
            // Lanes 8·half..8·half + 8: four lane pairs.
            let (d8, m8) = (
                _mm256_loadu_ps(dp.add(8 * half)),
                _mm256_loadu_ps(mp.add(8 * half)),
            );
            for (p, sp) in spread.iter().enumerate() {
                let dv = _mm256_permutevar8x32_ps(d8, *sp);
                let mv = _mm256_permutevar8x32_ps(m8, *sp);
                let lane = 8 * half + 2 * p;
                // Group g's 8 bytes of this lane pair.
                let bytes = |g: usize| -> __m256i {
                    let at = match NIB {
                        true => qb.add((g / 2) * TILE * 4 + 4 * lane),
                        false => qb.add(g * TILE * 4 + 4 * lane),
                    };
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(at as *const __m128i))
                };
                let row0 = out.add(lane * ni + bi * QK);
                let row1 = row0.add(ni);
                for gp in 0..QK / 8 {
                    let (q0, q1) = match NIB {
                        true => {
                            let raw = bytes(2 * gp);
                            (
                                _mm256_and_si256(raw, low),
                                _mm256_and_si256(_mm256_srli_epi32::<4>(raw), low),
                            )
                        }
                        false => (bytes(2 * gp), bytes(2 * gp + 1)),
                    };
                    let v0 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(q0), mv);
                    let v1 = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(q1), mv);
                    // v0: [lane, cols 8gp..+4 | lane + 1, same]; v1 the next 4 columns.
                    _mm256_storeu_ps(row0.add(8 * gp), _mm256_permute2f128_ps::<0x20>(v0, v1));
                    _mm256_storeu_ps(row1.add(8 * gp), _mm256_permute2f128_ps::<0x31>(v0, v1));
                }
            }
        }
    }
}
