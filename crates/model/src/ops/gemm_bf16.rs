//! C = A·B with both operands rounded to bf16 and the products summed in f32, on AVX-512
//! BF16 (`vdpbf16ps`): the low-bit training backward's dX = dY·W₀ through a packed base.
//!
//! Why: with the forward on the int8 kernels, this product in f32 was the largest part of
//! an int8 step (47 % of a 1.1 B step, 33 % of a 135 M one, `perf record` on an AVX-512 AMD
//! EPYC), and `vdpbf16ps` does twice the multiply-adds of an f32 FMA per instruction (16
//! lanes × 2; measured 7.0 G/s against the FMA's 7.5 G/s a core there). PEFT's bf16 mode
//! rounds the same operands (and the weights' gradients, which LoRA does not need).
//!
//! Layout: A [m, k] is rounded once into bf16 rows (k padded to even with a zero), read in
//! place a 32-bit pair of depths at a time; B is produced a tile of ≤ 16 rows at a time by a
//! caller's `fill` (the packed base decodes its 16-row tiles) and packed into 32-column
//! panels of depth pairs: panel word (kp, j) = (B[2kp][j], B[2kp + 1][j]) as two bf16 in
//! one u32, so one `vdpbf16ps` multiplies a broadcast pair of A's row into 16 columns. The
//! blocking and the threads' column split are `gemm`'s ([`super::gemm`]).
//!
//! The same kernel runs the LM head's training forward, logits = h·Wᵀ ([`gemm_bf16_cols`]):
//! there B = Wᵀ, so a panel's 32 columns are 32 rows of W; each is decoded over a depth
//! block, rounded to bf16 in place of order (a row's depth pairs are adjacent, so each pair
//! is already one u32), and the 32 rows of u32 words are transposed into the panel.
//!
//! Rounding: to nearest, ties to even, both operands (as `half::bf16::from_f32`, so tests
//! can form the same operands); each instruction then adds two exact products to an f32
//! lane (rounded once per instruction, flushing denormals, as the instruction defines).

use rayon::prelude::*;
use std::arch::x86_64::*;

use super::gemm::{column_tasks, even_blocks, store_12x32, transpose_panel, Aligned, SendPtr};

/// Rows of C one kernel call computes.
const MR: usize = 12;
/// Columns of C one kernel call computes: a panel of 32 columns (two zmm of 16 pairs).
const NR: usize = 32;
/// Depth of one packed block (a multiple of the fill's 16-row tiles): a panel is
/// 256 pairs × 128 B = 32 KiB, inside a 48 KiB L1.
const KC: usize = 512;
/// Rows of A one pass over a packed block takes: 144 × 512 × 2 B = 144 KiB (L2).
const MC: usize = 144;
/// Columns of B packed at a time (per thread): 512 × 256 × 2 B = 256 KiB (L2).
const NC: usize = 256;
/// Rows the fill gives at a time (the packed base's tile).
const FILL_ROWS: usize = 16;
/// Most bytes of A's bf16 copy: a longer A (the head's input gradient, 49152 logits a row)
/// is multiplied a chunk of depths at a time, each chunk's product added into C.
const A_BYTES: usize = 16 << 20;

/// Whether this CPU runs the bf16 product (AVX-512F and AVX-512 BF16) and `LOWRANK_ISA`
/// allows it.
pub fn supported() -> bool {
    crate::isa::Isa::Avx512.allowed()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bf16")
}

/// Produces rows r0..r0+rows (r0 a multiple of 16, rows ≤ 16), columns j0..j0+nc of a
/// weight W (j0 a multiple of 32) into `dst` [rows, nc], row-major, every float written.
pub type Fill<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32]) + Sync + 'a;

/// How B is made from the weight W a [`Fill`] gives.
#[derive(Clone, Copy)]
enum BFill<'a> {
    /// B = W [k, n]: the input gradient dY·W.
    Rows(&'a Fill<'a>),
    /// B = Wᵀ for W [n, k]: the forward x·Wᵀ.
    Cols(&'a Fill<'a>),
}

/// C [m, n] = A [m, k] · B [k, n] with A and B rounded to bf16 and the products summed in
/// f32. A is given as column blocks side by side (`blocks[b]`: m rows of `cols[b]` floats,
/// row-major; together k columns), B by `fill` (see [`Fill`]). C's m rows of n floats lie
/// `ldc` apart at `c`, each written (none read). Runs on the current rayon pool.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16 ([`supported`]); `c` points at m rows of n
/// writable floats, `ldc` ≥ n apart, that nothing else accesses during the call.
pub unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    blocks: &[&[f32]],
    cols: &[usize],
    fill: &Fill,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm_bf16_within(m, n, blocks, cols, BFill::Rows(fill), c, ldc, A_BYTES) }
}

/// C [m, n] = A [m, k] · Wᵀ for a weight W [n, k] that `fill` gives 16 rows at a time
/// (rows r0..r0+rows, depths j0..j0+nc, j0 a multiple of 32; see [`Fill`]), A and W rounded
/// to bf16 and the products summed in f32. A's m rows of k floats are contiguous; C's m rows
/// of n floats lie `ldc` apart at `c`, each written (none read). Runs on the current rayon
/// pool.
///
/// # Safety
/// As [`gemm_bf16`]'s.
pub unsafe fn gemm_bf16_cols(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    fill: &Fill,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm_bf16_within(m, n, &[a], &[k], BFill::Cols(fill), c, ldc, A_BYTES) }
}

/// [`gemm_bf16`] with at most `a_bytes` of A's bf16 copy (tests take it small, to cut A
/// into chunks of depths and blocks of rows).
///
/// # Safety
/// As [`gemm_bf16`]'s.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bf16_within(
    m: usize,
    n: usize,
    blocks: &[&[f32]],
    cols: &[usize],
    fill: BFill,
    c: *mut f32,
    ldc: usize,
    a_bytes: usize,
) {
    assert!(supported(), "the bf16 product does not run on this CPU");
    assert!(blocks.len() == cols.len() && ldc >= n);
    for (b, &w) in blocks.iter().zip(cols) {
        assert!(
            b.len() >= m * w,
            "an A block of {} floats for {m} × {w}",
            b.len()
        );
    }
    let k: usize = cols.iter().sum();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            // SAFETY: row i of C holds n writable floats (the caller's contract).
            unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) };
        }
        return;
    }
    // A's bf16 copy holds every row for a chunk of depths (a multiple of KC, within
    // A_BYTES), so B is produced once whatever m is: a block of rows at a time, the head's
    // input gradient (49152 depths) decoded the 28 M-weight head four times a 4 × 128 step.
    // Only where KC depths of every row exceed A_BYTES are the rows split too.
    let (rows_max, depth_max) = match m * KC * 2 <= a_bytes {
        true => (m, (a_bytes / (2 * m)) / KC * KC),
        false => ((a_bytes / (2 * KC)).max(MR), KC),
    };
    A_ROWS.with(|kept| {
        // (A worker that steals another product while this one waits takes a fresh buffer.)
        let mut fresh = Vec::new();
        let mut kept = kept.try_borrow_mut();
        let a = match kept.as_mut() {
            Ok(v) => &mut **v,
            Err(_) => &mut fresh,
        };
        for (i0, mi) in even_blocks(m, rows_max, MR) {
            for k0 in (0..k).step_by(depth_max) {
                let kw = depth_max.min(k - k0);
                // Depths k0..k0+kw of A's rows, padded to an even count (a zero), so each
                // pair is one u32.
                let lda = kw.next_multiple_of(2);
                if a.len() < mi * lda {
                    a.resize(mi * lda, half::bf16::ZERO);
                }
                a[..mi * lda]
                    .par_chunks_mut(lda)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let mut off = 0; // this block's first depth in A
                        for (blk, &w) in blocks.iter().zip(cols) {
                            let (lo, hi) = (k0.max(off), (k0 + kw).min(off + w));
                            if lo < hi {
                                let src = &blk[(i0 + i) * w + lo - off..][..hi - lo];
                                super::layout::to_bf16(src, &mut row[lo - k0..hi - k0]);
                            }
                            off += w;
                        }
                        row[kw..].fill(half::bf16::ZERO);
                    });
                // SAFETY: the CPU has AVX-512F and BF16 (asserted); A holds mi rows of lda
                // bf16, depths k0..k0+kw of them given, the pad zero; C's rows i0..i0+mi are
                // the caller's; k0 is a multiple of KC, so of the 16 rows a row fill gives and
                // of the 32 depths a column fill starts on.
                unsafe {
                    blocked(mi, n, kw, k0, a, lda, fill, c.add(i0 * ldc), ldc);
                }
            }
        }
    });
}

thread_local! {
    /// A's bf16 rows, kept between calls (at most [`A_BYTES`]): a fresh buffer per product
    /// cost page faults and a memset each time.
    static A_ROWS: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The blocked product of bf16 rows `a` (m rows, `lda` apart) by rows k0..k0+k of the filled
/// B into C: written where k0 = 0, added to from the depths before it otherwise.
///
/// # Safety
/// As [`gemm_bf16`]'s; a holds m·lda bf16 with lda even and ≥ k (the pad zero); k0 is a
/// multiple of 32; where k0 > 0, C holds the product of the depths before k0.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    m: usize,
    n: usize,
    k: usize,
    k0: usize,
    a: &[half::bf16],
    lda: usize,
    src: BFill,
    c: *mut f32,
    ldc: usize,
) {
    let panels = n.div_ceil(NR);
    // (A's bf16 are half as long as the f32 the task split's cache bound counts.)
    let tasks = column_tasks(panels, m * lda / 2, rayon::current_num_threads(), NC / NR);
    let cp = SendPtr(c);
    let a = a.as_ptr() as *const u16;
    let ap = SendPtr(a as *mut f32);
    // Depth blocks start on the fill's 16-row tiles (B = W) or its 32-depth spans (B = Wᵀ).
    let unit = match src {
        BFill::Rows(_) => FILL_ROWS,
        BFill::Cols(_) => 32,
    };
    (0..tasks).into_par_iter().for_each(|t| {
        let (p0, p1) = (panels * t / tasks, panels * (t + 1) / tasks);
        // One buffer of f32-sized words: the packed panels (u32 pairs), the fill's rows
        // (≤ 16 × NC for B = W, ≤ 16 × KC for B = Wᵀ), and for B = Wᵀ a panel's 32 rows of
        // bf16 pairs.
        let words = KC / 2 * NC;
        let fill_words = FILL_ROWS * NC.max(KC);
        let mut buf = Aligned::new(words + fill_words + NR * KC / 2);
        let all = buf.slice(words + fill_words + NR * KC / 2);
        let (panel_words, rest) = all.split_at_mut(words);
        let (rows, pairs) = rest.split_at_mut(fill_words);
        let (cp, ap) = (&cp, &ap);
        let a = ap.0 as *const u16;
        let (c0, c1) = (p0 * NR, (p1 * NR).min(n));
        for (jc, nc) in even_blocks(c1 - c0, NC, NR) {
            let jc = c0 + jc;
            for (pc, kc) in even_blocks(k, KC, unit) {
                let kp = kc.div_ceil(2);
                let len = nc.div_ceil(NR) * NR * kp;
                match src {
                    BFill::Rows(fill) => {
                        // The f32 words reinterpreted as u32 pairs (same size and alignment).
                        let bp = bytemuck_u32(&mut panel_words[..len]);
                        for r in (0..kc).step_by(FILL_ROWS) {
                            let rn = FILL_ROWS.min(kc - r);
                            let src = &mut rows[..rn * nc];
                            fill(k0 + pc + r, rn, jc, nc, src);
                            // SAFETY: AVX-512F (asserted by the caller); src holds rn rows
                            // of nc.
                            unsafe { pack_pairs(src, rn, nc, kp, r / 2, bp) };
                        }
                    }
                    // SAFETY: AVX-512F (asserted by the caller); the buffers' sizes are
                    // those pack_cols asks for (kc ≤ KC, nc ≤ NC).
                    BFill::Cols(fill) => unsafe {
                        pack_cols(
                            fill,
                            k0 + pc,
                            kc,
                            jc,
                            nc,
                            rows,
                            pairs,
                            &mut panel_words[..len],
                        )
                    },
                }
                let bp: &[u32] = bytemuck_u32(&mut panel_words[..len]);
                for (ic, mc) in even_blocks(m, MC, MR) {
                    for (jp, panel) in bp.chunks_exact(NR * kp).enumerate() {
                        let j = jc + jp * NR;
                        let nr = NR.min(n - j);
                        for i in (ic..ic + mc).step_by(MR) {
                            let mr = MR.min(ic + mc - i);
                            // SAFETY: the CPU has AVX-512F and BF16; A's rows i..i+mr hold
                            // lda bf16 (lda apart), depths pc..pc + 2·kp ≤ lda; the panel
                            // holds kp × 32 pairs from a 64-byte boundary; C's tile lies
                            // inside c and inside this thread's columns.
                            unsafe {
                                kernel_12x32(
                                    kp,
                                    a.add(i * lda + pc),
                                    lda,
                                    panel,
                                    cp.0.add(i * ldc + j),
                                    ldc,
                                    mr,
                                    nr,
                                    k0 + pc > 0,
                                )
                            };
                        }
                    }
                }
            }
        }
    });
}

/// Packs B = Wᵀ's depths d0..d0+kc (d0 a multiple of 32, kc ≤ [`KC`]), columns j0..j0+nc
/// (W's rows; nc ≤ [`NC`]) into 32-column panels of kp = ⌈kc/2⌉ depth pairs, as
/// [`pack_pairs`] lays them out, zero past column j0 + nc and past depth kc. Each panel's
/// rows of W are filled 16 at a time into `rows` and rounded into `pairs` (32 rows of kp
/// words, a row's bf16 in order, so word q holds depths 2q and 2q + 1 as `pack_pairs` puts
/// them), which are then transposed into the panel as 32-bit words.
///
/// # Safety
/// The CPU has AVX-512F; `rows` holds ≥ 16·kc floats, `pairs` ≥ 32·kp, `dst`
/// nc.div_ceil(32) panels of kp × 32 words.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_cols(
    fill: &Fill,
    d0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    rows: &mut [f32],
    pairs: &mut [f32],
    dst: &mut [f32],
) {
    debug_assert!(kc <= KC && d0.is_multiple_of(32));
    let kp = kc.div_ceil(2);
    debug_assert!(rows.len() >= FILL_ROWS * kc && pairs.len() >= NR * kp);
    debug_assert!(dst.len() >= nc.div_ceil(NR) * NR * kp);
    let zeros = [0f32; KC / 2];
    for (p, panel) in dst.chunks_exact_mut(NR * kp).enumerate() {
        let nr = NR.min(nc - p * NR);
        for g in (0..nr).step_by(FILL_ROWS) {
            let rn = FILL_ROWS.min(nr - g);
            fill(j0 + p * NR + g, rn, d0, kc, &mut rows[..rn * kc]);
            for r in 0..rn {
                let words = &mut pairs[(g + r) * kp..][..kp];
                let half = as_bf16(words);
                super::layout::to_bf16(&rows[r * kc..][..kc], &mut half[..kc]);
                half[kc..].fill(half::bf16::ZERO);
            }
        }
        let pairs: &[f32] = pairs;
        let src: [&[f32]; NR] = std::array::from_fn(|jj| match jj < nr {
            true => &pairs[jj * kp..][..kp],
            false => &zeros[..kp],
        });
        // SAFETY: AVX-512F implies AVX2; every row holds kp words; the panel kp × 32.
        unsafe { transpose_panel::<NR>(&src, kp, panel, None) };
    }
}

/// `w`'s words as twice as many bf16 (a word's low half first, as the little-endian u32
/// pairs the kernel reads them).
fn as_bf16(w: &mut [f32]) -> &mut [half::bf16] {
    // SAFETY: bf16 is a 2-byte plain value (any bits valid) with alignment ≤ f32's, the
    // length covers exactly w's bytes, and the borrow of `w` is carried by the result.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut half::bf16, 2 * w.len()) }
}

/// `w` as u32 words (f32 and u32 have the same size and alignment; any bits are a u32).
fn bytemuck_u32(w: &mut [f32]) -> &mut [u32] {
    // SAFETY: same size and alignment, every bit pattern valid for both, and the borrow
    // of `w` is carried by the result.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u32, w.len()) }
}

/// Packs `src`'s `rows` rows ([rows, nc] f32, rows ≤ 16) as depth pairs 0.., from pair
/// `pair0`, into 32-column panels of `kp` pairs each: word (p, kp, j) = (bf16 of row 2q,
/// bf16 of row 2q + 1) of column 32p + j in its low and high half; a missing odd row and
/// columns past nc are zeros.
///
/// # Safety
/// The CPU has AVX-512F; dst holds nc.div_ceil(32) panels of kp × 32 words, and
/// pair0 + rows.div_ceil(2) ≤ kp.
#[target_feature(enable = "avx512f")]
unsafe fn pack_pairs(
    src: &[f32],
    rows: usize,
    nc: usize,
    kp: usize,
    pair0: usize,
    dst: &mut [u32],
) {
    debug_assert!(src.len() >= rows * nc && pair0 + rows.div_ceil(2) <= kp);
    debug_assert!(dst.len() >= nc.div_ceil(NR) * NR * kp);
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for q in 0..rows.div_ceil(2) {
        let (r0, r1) = (2 * q, 2 * q + 1);
        // Every column of the panels, those past nc as zeros (the buffer is reused).
        for col in (0..nc.div_ceil(NR) * NR).step_by(16) {
            let lanes: __mmask16 = match nc.saturating_sub(col) {
                n if n >= 16 => 0xFFFF,
                n => (1u16 << n) - 1,
            };
            let load = |r: usize| match r < rows {
                true => {
                    _mm512_maskz_loadu_epi32(lanes, src.as_ptr().add(r * nc + col) as *const i32)
                }
                false => _mm512_setzero_si512(),
            };
            let (x0, x1) = (rounded(load(r0)), rounded(load(r1)));
            let pair = _mm512_or_si512(_mm512_srli_epi32::<16>(x0), _mm512_and_si512(x1, high));
            let (p, h) = (col / NR, col % NR);
            _mm512_storeu_si512(
                dst.as_mut_ptr().add((p * kp + pair0 + q) * NR + h) as *mut _,
                pair,
            );
        }
    }
}

/// f32 bits whose top half is the bf16 nearest (ties to even) — `half::bf16::from_f32`'s
/// rounding; a NaN stays a (quiet) NaN.
#[target_feature(enable = "avx512f")]
fn rounded(x: __m512i) -> __m512i {
    let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm512_mask_or_epi32(up, nan, x, _mm512_set1_epi32(0x0040_0000))
}

/// C[0..mr, 0..nr] (row stride ldc) = (C if `add` else 0) + A[0..mr, 0..2kp]·B in a 12 ×
/// 32 tile of f32 accumulators: A bf16 rows read in place a u32 pair at a time, B a packed
/// panel of kp × 32 pairs. Rows past mr repeat row mr − 1 (their results are dropped).
///
/// # Safety
/// The CPU has AVX-512F and BF16; `a` points at mr ≥ 1 rows of 2·kp readable bf16, `lda`
/// apart; `b` holds kp·32 words from a 64-byte boundary; `c` points at mr ≤ 12 rows of
/// nr ≤ 32 writable floats, `ldc` apart.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_12x32(
    kp: usize,
    a: *const u16,
    lda: usize,
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    debug_assert!(b.len() >= kp * NR && (1..=MR).contains(&mr) && nr <= NR);
    let rows: [*const u16; MR] = std::array::from_fn(|i| a.add(i.min(mr - 1) * lda));
    for i in 0..mr {
        for j in [0, 16, NR - 1] {
            // (a hint only: the address may lie past a ragged tile's columns)
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + j) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut pb = b.as_ptr();
    for p in 0..kp {
        // SAFETY (transmutes): 64-byte vectors of the same size; bf16 pairs as the
        // instruction reads them.
        let b0: __m512bh = std::mem::transmute(_mm512_load_si512(pb as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_load_si512(pb.add(16) as *const _));
        for (row, &pa) in acc.iter_mut().zip(&rows) {
            let pair = (pa.add(2 * p) as *const i32).read_unaligned();
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
        pb = pb.add(NR);
    }
    store_12x32!(acc, c, ldc, mr, nr, add);
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    fn round(v: f32) -> f64 {
        bf16::from_f32(v).to_f64()
    }

    /// A·B of the bf16-rounded operands in f64, and gemm_bf16's result on a row stride
    /// wider than n, for A as `cols` blocks and B a row-major [k, n] matrix (`t` false) or
    /// Wᵀ for a row-major W [n, k] (`t` true, the forward's product).
    fn product(
        m: usize,
        n: usize,
        cols: &[usize],
        seed: u64,
        a_bytes: usize,
        t: bool,
    ) -> (Vec<f64>, Vec<f32>, f64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let k: usize = cols.iter().sum();
        let blocks: Vec<Vec<f32>> = cols
            .iter()
            .map(|&w| (0..m * w).map(|_| rng.random_range(-2f32..2.0)).collect())
            .collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1f32..1.0)).collect();
        // B[kk][j]: W[kk][j] for B = W [k, n], W[j][kk] for B = Wᵀ (W [n, k]).
        let b_at = |kk: usize, j: usize| match t {
            false => w[kk * n + j],
            true => w[j * k + kk],
        };
        // A's column kk of row i: in block bi at column kk − its start.
        let a_at = |i: usize, mut kk: usize| -> f32 {
            for (blk, &w) in blocks.iter().zip(cols) {
                if kk < w {
                    return blk[i * w + kk];
                }
                kk -= w;
            }
            unreachable!()
        };
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|kk| round(a_at(i, kk)) * round(b_at(kk, j)))
                    .sum()
            })
            .collect();
        // W's rows r0..r0+rows, columns j0..j0+nc (W's width: n for B = W, k for B = Wᵀ).
        let width = if t { k } else { n };
        let fill = |r0: usize, rows: usize, j0: usize, nc: usize, dst: &mut [f32]| {
            assert!(r0.is_multiple_of(FILL_ROWS) && rows <= FILL_ROWS && j0.is_multiple_of(32));
            assert!(j0 + nc <= width);
            assert_eq!(dst.len(), rows * nc);
            for r in 0..rows {
                dst[r * nc..][..nc].copy_from_slice(&w[(r0 + r) * width + j0..][..nc]);
            }
        };
        let src = match t {
            false => BFill::Rows(&fill),
            true => BFill::Cols(&fill),
        };
        let ldc = n + 3;
        let mut c = vec![f32::NAN; m * ldc];
        let views: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
        // SAFETY: supported() checked by the caller; c holds m rows of ldc ≥ n floats.
        unsafe { gemm_bf16_within(m, n, &views, cols, src, c.as_mut_ptr(), ldc, a_bytes) };
        for (i, row) in c.chunks(ldc).enumerate() {
            assert!(
                row[n..].iter().all(|v| v.is_nan()),
                "row {i}'s pad was written"
            );
        }
        let got: Vec<f32> = c.chunks(ldc).flat_map(|r| r[..n].to_vec()).collect();
        let scale = (k as f64).sqrt();
        (want, got, scale)
    }

    /// The product equals the f64 product of the same bf16-rounded operands up to f32
    /// accumulation error, on shapes with ragged tiles (m % 12, n % 32, n % 16), odd and
    /// unaligned depths (k % 16, k % 2: the zero pad), several A blocks, more than one
    /// depth block (k > 512) and more than one column task; and with A's bf16 copy capped
    /// small, A in chunks of depths (every row) and in blocks of rows as well; for B = W
    /// and B = Wᵀ. A pair packed in the wrong order, a panel column off by one, W's rows
    /// for another panel, or a block's or a chunk's depth offset lost fails it.
    #[test]
    fn matches_f64_of_the_rounded_operands() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16 (nothing to test)");
            return;
        }
        let shapes: [(usize, usize, &[usize]); 7] = [
            (1, 1, &[1]),
            (13, 47, &[33]),
            (64, 96, &[40, 24, 32]),
            (77, 300, &[515]),
            (150, 33, &[700, 125]),
            (25, 520, &[17, 1000]),
            (40, 70, &[1089]),
        ];
        // 40 KiB: every row of 512 depths at a time for m ≤ 40; 4 KiB: 12 rows.
        for t in [false, true] {
            for a_bytes in [A_BYTES, 40 << 10, 4 << 10] {
                for (s, &(m, n, cols)) in shapes.iter().enumerate() {
                    let (want, got, scale) = product(m, n, cols, s as u64, a_bytes, t);
                    let worst = want
                        .iter()
                        .zip(&got)
                        .fold(0f64, |w, (a, b)| w.max((a - *b as f64).abs()));
                    assert!(
                        worst < 2e-6 * scale,
                        "{m}×{n}, k blocks {cols:?}, A within {a_bytes} B, B = W{}: off by \
                         {worst} (scale {scale})",
                        if t { "ᵀ" } else { "" }
                    );
                }
            }
        }
    }

    /// Rounding is half's: ties to even, and a value past bf16's largest to infinity;
    /// the product of rounded operands is then exact for small integers.
    #[test]
    fn rounding_is_halfs() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16 (nothing to test)");
            return;
        }
        let vals: [f32; 16] = [
            1.0,
            1.0 + 1.0 / 256.0,  // a tie: down to even (1.0)
            1.0 + 3.0 / 256.0,  // a tie: up to even
            1.0 + 1.0 / 128.0,  // exact
            -1.0 - 1.0 / 512.0, // below half way
            3.4e38,             // rounds up past bf16's largest: infinity
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-3,
            257.0,
            -33.3,
            65535.0,
            0.1,
            7.0,
            1.5,
        ];
        let src: Vec<f32> = vals.iter().chain(vals.iter().rev()).copied().collect();
        let mut dst = vec![0xDEAD_BEEFu32; 32];
        // SAFETY: AVX-512F (supported); one panel of one pair.
        unsafe { pack_pairs(&src, 2, 16, 1, 0, &mut dst) };
        for j in 0..16 {
            let (lo, hi) = (dst[j] & 0xFFFF, dst[j] >> 16);
            assert_eq!(lo as u16, bf16::from_f32(src[j]).to_bits(), "{}", src[j]);
            assert_eq!(
                hi as u16,
                bf16::from_f32(src[16 + j]).to_bits(),
                "{}",
                src[16 + j]
            );
        }
        assert!(
            dst[16..].iter().all(|&w| w == 0),
            "columns past nc are zeros"
        );
    }
}
