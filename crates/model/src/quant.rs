//! Int8 inference matmuls for CPU serving: 8-bit block weights × 8-bit block activations.
//!
//! This is the arithmetic llama.cpp runs for a Q4_1 GGUF (Q4_1 weights × Q8_1 activations),
//! written for batches: each weight row is cut into blocks of [`QK`] inputs stored as
//! `w = d·q + m` with `q ∈ 0..=255` (one scale and one offset per block), and each activation
//! row into blocks stored as `x ≈ s·a` with `a ∈ −127..=127`. A block's dot product is then
//! `d·s·Σ q·a + m·s·Σ a`, where `Σ q·a` is exact integer arithmetic (AVX-512 VNNI `vpdpbusd`:
//! 64 multiply-adds per instruction, 4× the f32 FMA rate).
//!
//! Weights that came from a ≤ 8-bit block format (Q4_0, Q4_1, Q5_x, Q8_0: every block is an
//! evenly spaced grid) are stored *exactly* (the grid is detected); other weights (f32, f16,
//! k-quants) are rounded to 256 levels per block. The activation rounding is the only other
//! loss — the same llama.cpp accepts. Each row is computed alone in a fixed order, so a row's
//! result never depends on which other rows share the batch (bitwise), which is what mixed
//! serving batches need; the portable fallback gives bitwise the same results as the VNNI path.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use lowrank_lora::Target;
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::weights::{LayerWeights, Weights};

/// Inputs per block (llama.cpp's QK4_1 / QK8_1).
pub const QK: usize = 32;
/// Outputs per tile: one 512-bit register of i32 or f32 lanes.
const TILE: usize = 16;
/// Bytes of one packed (tile, block): 16 outputs × 32 inputs.
const TB: usize = TILE * QK;
/// Rows of activations a kernel call keeps in registers.
const NR: usize = 8;
/// Rows per parallel work unit (bounds the activation bytes re-read per weight tile).
const ROW_BLOCK: usize = 64;

/// An [out, in] weight in 8-bit blocks, packed for the kernel:
/// `q[tile][block][group of 4 inputs][16 outputs][4]`, `d`, `m`: `[tile][block][16]`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    out: usize,
    inp: usize,
    /// Blocks along the input dim (inputs padded with zeros to a multiple of [`QK`]).
    nb: usize,
    tiles: usize,
    q: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    /// Blocks whose values were not an evenly spaced grid of ≤ 256 levels (rounded).
    rounded_blocks: usize,
}

impl QMatrix {
    /// Pack a row-major [out, in] f32 weight.
    pub fn from_f32(w: &[f32], out: usize, inp: usize) -> Result<QMatrix> {
        if w.len() != out * inp || out == 0 || inp == 0 {
            return Err(ModelError::Invalid(format!(
                "int8 pack: weight has {} values, expected {out}×{inp}",
                w.len()
            )));
        }
        let nb = inp.div_ceil(QK);
        let tiles = out.div_ceil(TILE);
        let mut q = vec![0u8; tiles * nb * TB];
        let mut d = vec![0f32; tiles * nb * TILE];
        let mut m = vec![0f32; tiles * nb * TILE];
        let rounded: usize = q
            .par_chunks_mut(nb * TB)
            .zip(d.par_chunks_mut(nb * TILE))
            .zip(m.par_chunks_mut(nb * TILE))
            .enumerate()
            .map(|(t, ((qt, dt), mt))| {
                let mut rounded = 0;
                let mut block = [0u8; QK];
                for lane in 0..TILE {
                    let o = t * TILE + lane;
                    if o >= out {
                        break; // padding outputs: d = m = 0 → 0
                    }
                    let row = &w[o * inp..(o + 1) * inp];
                    for b in 0..nb {
                        let vals = &row[b * QK..((b + 1) * QK).min(inp)];
                        let (db, mb, exact) = quantize_block(vals, &mut block);
                        rounded += usize::from(!exact);
                        dt[b * TILE + lane] = db;
                        mt[b * TILE + lane] = mb;
                        let qb = &mut qt[b * TB..(b + 1) * TB];
                        for (i, &v) in block.iter().enumerate() {
                            qb[(i / 4) * TILE * 4 + lane * 4 + i % 4] = v;
                        }
                    }
                }
                rounded
            })
            .sum();
        Ok(QMatrix {
            out,
            inp,
            nb,
            tiles,
            q,
            d,
            m,
            rounded_blocks: rounded,
        })
    }

    /// Pack a [out, in] tensor (any device; copied to host).
    pub fn from_tensor(w: &Tensor) -> Result<QMatrix> {
        let (out, inp) = w.dims2()?;
        let v = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        QMatrix::from_f32(&v, out, inp)
    }

    pub fn out_dim(&self) -> usize {
        self.out
    }

    pub fn in_dim(&self) -> usize {
        self.inp
    }

    /// Blocks that had to be rounded (0 for weights from a ≤ 8-bit block format).
    pub fn rounded_blocks(&self) -> usize {
        self.rounded_blocks
    }

    /// Total blocks.
    pub fn blocks(&self) -> usize {
        self.out * self.nb
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.d.len() + self.m.len())
    }

    /// The weight as this packing represents it, row-major [out, in] (for tests and checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        for o in 0..self.out {
            let (t, lane) = (o / TILE, o % TILE);
            for i in 0..self.inp {
                let (b, j) = (i / QK, i % QK);
                let tb = t * self.nb + b;
                let q = self.q[tb * TB + (j / 4) * TILE * 4 + lane * 4 + j % 4];
                w[o * self.inp + i] =
                    self.d[tb * TILE + lane].mul_add(q as f32, self.m[tb * TILE + lane]);
            }
        }
        w
    }

    /// y = x·Wᵀ for row-major x [rows, in] → y [rows, out].
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * self.out];
        if rows == 0 {
            return y;
        }
        let act = Activations::quantize(x, rows, self.inp, self.nb);
        let kernel = Kernel::detect();
        let tiles_per_unit = tile_chunk(self.tiles, rows);
        let tile_units = self.tiles.div_ceil(tiles_per_unit);
        let row_units = rows.div_ceil(ROW_BLOCK);
        let yp = SendPtr(y.as_mut_ptr());
        (0..row_units * tile_units).into_par_iter().for_each(|u| {
            let (ru, tu) = (u / tile_units, u % tile_units);
            let r_end = ((ru + 1) * ROW_BLOCK).min(rows);
            let t_end = ((tu + 1) * tiles_per_unit).min(self.tiles);
            for t in tu * tiles_per_unit..t_end {
                let mut r0 = ru * ROW_BLOCK;
                while r0 < r_end {
                    let nr = (r_end - r0).min(NR);
                    // SAFETY: each (row, tile) output cell is written by exactly one unit,
                    // and `y` outlives the parallel loop.
                    unsafe { kernel.run(self, &act, t, r0, nr, yp) };
                    r0 += nr;
                }
            }
        });
        y
    }
}

/// Tiles per work unit: a few units per thread, none with less than ~64 KB of weights.
fn tile_chunk(tiles: usize, rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let units_wanted = threads * 4;
    let by_balance = tiles.div_ceil(units_wanted).max(1);
    if rows >= ROW_BLOCK {
        by_balance.min(8)
    } else {
        by_balance
    }
}

/// Store one block as `w = d·q + m`; returns (d, m, exact). Blocks on an evenly spaced grid
/// of ≤ 256 levels (every llama.cpp ≤ 8-bit block format) keep their grid, exactly.
fn quantize_block(vals: &[f32], q: &mut [u8; QK]) -> (f32, f32, bool) {
    q.fill(0);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() || hi == lo {
        return (0.0, if lo.is_finite() { lo } else { 0.0 }, lo.is_finite());
    }
    let range = hi - lo;
    let tiny = range * 1e-5;
    let on_grid = |step: f32| {
        step.is_finite()
            && (range / step).round() <= 255.0
            && vals.iter().all(|&v| {
                let k = (v - lo) / step;
                (k - k.round()).abs() < 1e-3
            })
    };
    // The grid step divides the smallest nonzero offset from the minimum (cheap; enough for
    // 4/5-bit blocks) and the smallest gap between sorted values (dense 8-bit blocks).
    let offset = vals
        .iter()
        .map(|&v| v - lo)
        .filter(|&g| g > tiny)
        .fold(f32::INFINITY, f32::min);
    let min_gap = || {
        let mut sorted = [0f32; QK];
        sorted[..vals.len()].copy_from_slice(vals);
        let sorted = &mut sorted[..vals.len()];
        sorted.sort_unstable_by(f32::total_cmp);
        sorted
            .windows(2)
            .map(|p| p[1] - p[0])
            .filter(|&g| g > tiny)
            .fold(f32::INFINITY, f32::min)
    };
    let step = (1..=16)
        .map(|div| offset / div as f32)
        .find(|&s| on_grid(s))
        .or_else(|| {
            let g = min_gap();
            (1..=4).map(|div| g / div as f32).find(|&s| on_grid(s))
        });
    if let Some(step) = step {
        for (qi, &v) in q.iter_mut().zip(vals) {
            *qi = ((v - lo) / step).round() as u8;
        }
        return (step, lo, true);
    }
    let d = range / 255.0;
    for (qi, &v) in q.iter_mut().zip(vals) {
        *qi = ((v - lo) / d).round().clamp(0.0, 255.0) as u8;
    }
    (d, lo, false)
}

/// Activation rows in 8-bit blocks: `x ≈ s·a`, plus `s·Σa` per block for the offset term.
struct Activations {
    /// [rows][nb·QK], zero-padded.
    a: Vec<i8>,
    /// [rows][nb]
    s: Vec<f32>,
    /// [rows][nb]: s·Σa
    sa: Vec<f32>,
    nb: usize,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, inp: usize, nb: usize) -> Activations {
        let kp = nb * QK;
        let mut a = vec![0i8; rows * kp];
        let mut s = vec![0f32; rows * nb];
        let mut sa = vec![0f32; rows * nb];
        let kernel = Kernel::detect();
        let work = |r: usize, (ar, (sr, sar)): (&mut [i8], (&mut [f32], &mut [f32]))| {
            let xr = &x[r * inp..(r + 1) * inp];
            for b in 0..nb {
                let xb = &xr[b * QK..((b + 1) * QK).min(inp)];
                let ab = &mut ar[b * QK..(b + 1) * QK];
                let (sc, sum) = match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX-512 (detected); xb ≤ 32 and ab = 32 elements.
                    Kernel::Vnni512 if xb.len() == QK => unsafe { vnni::quantize_block(xb, ab) },
                    _ => quantize_act_block(xb, ab),
                };
                sr[b] = sc;
                sar[b] = sc * sum as f32;
            }
        };
        let chunks = a
            .chunks_mut(kp)
            .zip(s.chunks_mut(nb).zip(sa.chunks_mut(nb)));
        if rows >= 16 {
            chunks
                .collect::<Vec<_>>()
                .into_par_iter()
                .enumerate()
                .for_each(|(r, c)| work(r, c));
        } else {
            chunks.enumerate().for_each(|(r, c)| work(r, c));
        }
        Activations { a, s, sa, nb }
    }
}

/// One activation block: `a = round(x/s)` with `s = max|x|/127` (ties to even, as the
/// vector conversion rounds); returns (s, Σa). The VNNI module's version is bitwise equal.
fn quantize_act_block(xb: &[f32], ab: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let sc = amax / 127.0;
    let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
    let mut sum = 0i32;
    for (ai, &v) in ab.iter_mut().zip(xb) {
        let qv = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        *ai = qv;
        sum += qv as i32;
    }
    (sc, sum)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output cells to the parallel units of one matmul.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Vnni512,
}

impl Kernel {
    /// The kernel for this CPU, decided once per process (`LOWRANK_PORTABLE_INT8` forces the
    /// portable one, for checking it): every matmul of the process must use the same one,
    /// and the environment lookup does not belong on the per-matmul path.
    fn detect() -> Kernel {
        static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::env::var_os("LOWRANK_PORTABLE_INT8").is_none()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Kernel::Vnni512;
                }
            }
            Kernel::Portable
        })
    }

    /// Rows r0..r0+nr of tile t into y.
    ///
    /// # Safety
    /// `y` points at a [rows, out] buffer; no other thread writes these cells meanwhile.
    unsafe fn run(self, w: &QMatrix, x: &Activations, t: usize, r0: usize, nr: usize, y: SendPtr) {
        match self {
            Kernel::Portable => portable(w, x, t, r0, nr, y),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => match nr {
                1 => vnni::tile::<1>(w, x, t, r0, y),
                2 => vnni::tile::<2>(w, x, t, r0, y),
                3 => vnni::tile::<3>(w, x, t, r0, y),
                4 => vnni::tile::<4>(w, x, t, r0, y),
                5 => vnni::tile::<5>(w, x, t, r0, y),
                6 => vnni::tile::<6>(w, x, t, r0, y),
                7 => vnni::tile::<7>(w, x, t, r0, y),
                _ => vnni::tile::<8>(w, x, t, r0, y),
            },
        }
    }
}

/// The same arithmetic as the VNNI kernel, in the same order (bitwise equal results).
unsafe fn portable(w: &QMatrix, x: &Activations, t: usize, r0: usize, nr: usize, y: SendPtr) {
    let (nb, kp) = (w.nb, x.nb * QK);
    let lanes = TILE.min(w.out - t * TILE);
    for r in r0..r0 + nr {
        let mut acc = [0f32; TILE];
        for b in 0..nb {
            let tb = t * nb + b;
            let qb = &w.q[tb * TB..(tb + 1) * TB];
            let ab = &x.a[r * kp + b * QK..r * kp + (b + 1) * QK];
            let mut dot = [0i32; TILE];
            for g in 0..QK / 4 {
                for (lane, dl) in dot.iter_mut().enumerate() {
                    let qs = &qb[g * TILE * 4 + lane * 4..g * TILE * 4 + lane * 4 + 4];
                    for j in 0..4 {
                        *dl += qs[j] as i32 * ab[g * 4 + j] as i32;
                    }
                }
            }
            let (s, sa) = (x.s[r * nb + b], x.sa[r * nb + b]);
            for lane in 0..TILE {
                let ds = w.d[tb * TILE + lane] * s;
                acc[lane] = (dot[lane] as f32).mul_add(ds, acc[lane]);
                acc[lane] = w.m[tb * TILE + lane].mul_add(sa, acc[lane]);
            }
        }
        let row = y.0.add(r * w.out + t * TILE);
        for (lane, &v) in acc.iter().enumerate().take(lanes) {
            *row.add(lane) = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Activations, QMatrix, SendPtr, QK, TB, TILE};
    use std::arch::x86_64::*;

    /// [`super::quantize_act_block`] for a full block of 32, vectorized.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_block(xb: &[f32], ab: &mut [i8]) -> (f32, i32) {
        let x0 = _mm512_loadu_ps(xb.as_ptr());
        let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let sc = amax / 127.0;
        let inv = _mm512_set1_ps(if sc > 0.0 { 1.0 / sc } else { 0.0 });
        // Round to nearest even (the default rounding mode), then narrow.
        let lim = _mm512_set1_epi32(127);
        let clamp =
            |v: __m512i| _mm512_max_epi32(_mm512_min_epi32(v, lim), _mm512_set1_epi32(-127));
        let q0 = clamp(_mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)));
        let q1 = clamp(_mm512_cvtps_epi32(_mm512_mul_ps(x1, inv)));
        _mm_storeu_si128(ab.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(
            ab.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(q1),
        );
        (sc, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))
    }

    /// R activation rows × one 16-output tile: per block, 8 `vpdpbusd` per row into i32
    /// lanes, then one scale FMA and one offset FMA into f32 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(
        w: &QMatrix,
        x: &Activations,
        t: usize,
        r0: usize,
        y: SendPtr,
    ) {
        let (nb, kp) = (w.nb, x.nb * QK);
        let mut acc = [_mm512_setzero_ps(); R];
        let qbase = w.q.as_ptr().add(t * nb * TB);
        let abase = x.a.as_ptr().add(r0 * kp);
        for b in 0..nb {
            let mut dot = [_mm512_setzero_si512(); R];
            let qb = qbase.add(b * TB);
            for g in 0..QK / 4 {
                let wv = _mm512_loadu_si512(qb.add(g * TILE * 4) as *const _);
                for (r, dr) in dot.iter_mut().enumerate() {
                    let a4 = (abase.add(r * kp + b * QK + g * 4) as *const i32).read_unaligned();
                    *dr = _mm512_dpbusd_epi32(*dr, wv, _mm512_set1_epi32(a4));
                }
            }
            let tb = t * nb + b;
            let dv = _mm512_loadu_ps(w.d.as_ptr().add(tb * TILE));
            let mv = _mm512_loadu_ps(w.m.as_ptr().add(tb * TILE));
            for (r, ar) in acc.iter_mut().enumerate() {
                let s = *x.s.get_unchecked((r0 + r) * nb + b);
                let sa = *x.sa.get_unchecked((r0 + r) * nb + b);
                let ds = _mm512_mul_ps(dv, _mm512_set1_ps(s));
                *ar = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), ds, *ar);
                *ar = _mm512_fmadd_ps(mv, _mm512_set1_ps(sa), *ar);
            }
        }
        let lanes = TILE.min(w.out - t * TILE);
        let mask: __mmask16 = if lanes == TILE {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        for (r, ar) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.0.add((r0 + r) * w.out + t * TILE), mask, *ar);
        }
    }
}

/// The custom op: x [.., in] (f32, CPU) → [.., out] through a packed weight.
struct QLinear<'a>(&'a QMatrix);

impl CustomOp1 for QLinear<'_> {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("int8-linear: expects contiguous f32 input"),
        };
        let dims = layout.shape().dims();
        let inp = dims[dims.len() - 1];
        if inp != self.0.inp {
            candle_core::bail!(
                "int8-linear: input dim {inp}, weight expects {}",
                self.0.inp
            );
        }
        let rows = x.len() / inp;
        let y = self.0.matmul(x, rows);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = self.0.out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// x·Wᵀ through a packed weight. x: [.., in] f32 on the CPU → [.., out]. No gradient.
pub fn qlinear(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Err(ModelError::Invalid(
            "int8 compute runs on the CPU with f32 activations".into(),
        ));
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&QLinear(w))?)
}

/// How the frozen projections and the LM head are multiplied at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// f32 weights and activations (matches the HF reference; the training path).
    #[default]
    F32,
    /// 8-bit block weights × 8-bit block activations (CPU; llama.cpp's arithmetic).
    Int8,
}

/// Projections packed into one matrix (outputs concatenated in this order): one activation
/// quantization and one parallel pass per group instead of one per projection.
pub const PACKS: [&[Target]; 4] = [
    &[Target::Q, Target::K, Target::V],
    &[Target::O],
    &[Target::Gate, Target::Up],
    &[Target::Down],
];

/// Every frozen projection (grouped as [`PACKS`]) and the LM head, packed. Shared (`Arc`)
/// between a model and its merged copies, which repack only the groups they change.
#[derive(Debug, Clone)]
pub struct QuantModel {
    /// [layer][pack]
    layers: Vec<[Arc<QMatrix>; 4]>,
    head: Arc<QMatrix>,
}

impl QuantModel {
    /// Pack every frozen projection and the head (the tied embedding when there is no head).
    pub fn build(w: &Weights) -> Result<QuantModel> {
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let v: Vec<Arc<QMatrix>> = PACKS
                    .iter()
                    .map(|p| pack_group(l, p))
                    .collect::<Result<_>>()?;
                Ok(v.try_into().expect("four packs"))
            })
            .collect::<Result<Vec<_>>>()?;
        let head = Arc::new(QMatrix::from_tensor(
            w.lm_head.as_ref().unwrap_or(&w.embed),
        )?);
        Ok(QuantModel { layers, head })
    }

    /// The packed matrix of `targets` in `layer`, when they are exactly one of [`PACKS`].
    pub fn pack(&self, layer: usize, targets: &[Target]) -> Option<&QMatrix> {
        let i = PACKS.iter().position(|p| *p == targets)?;
        self.layers.get(layer).map(|l| &*l[i])
    }

    pub fn head(&self) -> &QMatrix {
        &self.head
    }

    /// Repack the group holding `target` from the layer's (merged) weights.
    pub fn replace(&mut self, layer: usize, lw: &LayerWeights, target: Target) -> Result<()> {
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Invalid(format!("int8 repack: no layer {layer}")))?;
        let i = PACKS
            .iter()
            .position(|p| p.contains(&target))
            .expect("every target is packed");
        l[i] = pack_group(lw, PACKS[i])?;
        Ok(())
    }

    fn all(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().map(|m| &**m))
            .chain(std::iter::once(&*self.head))
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        self.all().map(QMatrix::bytes).sum()
    }

    /// (rounded blocks, all blocks): 0 rounded when the weights came from ≤ 8-bit blocks.
    pub fn rounded(&self) -> (usize, usize) {
        self.all()
            .fold((0, 0), |(r, n), m| (r + m.rounded_blocks(), n + m.blocks()))
    }
}

/// One group's weights stacked along the output dim, packed.
fn pack_group(lw: &LayerWeights, targets: &[Target]) -> Result<Arc<QMatrix>> {
    let ws: Vec<&Tensor> = targets.iter().map(|&t| lw.linear(t)).collect();
    let w = match ws.as_slice() {
        [one] => (*one).clone(),
        _ => Tensor::cat(&ws, 0)?,
    };
    Ok(Arc::new(QMatrix::from_tensor(&w)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Q4_1-style weights: per 32-block d·q + m with q ∈ 0..16.
    fn q4_weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut w = vec![0f32; out * inp];
        for o in 0..out {
            for b in 0..inp.div_ceil(QK) {
                let d: f32 = rng.random_range(0.001..0.05);
                let m: f32 = rng.random_range(-0.3..0.0);
                for i in b * QK..((b + 1) * QK).min(inp) {
                    w[o * inp + i] = d * rng.random_range(0..16) as f32 + m;
                }
            }
        }
        w
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut s = 0f64;
                for i in 0..inp {
                    s += x[r * inp + i] as f64 * w[o * inp + i] as f64;
                }
                y[r * out + o] = s as f32;
            }
        }
        y
    }

    #[test]
    fn block_grid_weights_are_stored_exactly() {
        let (out, inp) = (37, 100); // ragged tiles and blocks
        let w = q4_weights(out, inp, 1);
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        assert_eq!(q.rounded_blocks(), 0);
        for (a, b) in q.dequantize().iter().zip(&w) {
            // Exact up to f32 rounding of the detected step (8-bit rounding would be ~1e-3).
            assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
        }
        // Arbitrary f32 weights are rounded to 256 levels per block.
        let f = rand_vec(out * inp, 2);
        let q = QMatrix::from_f32(&f, out, inp).unwrap();
        assert!(q.rounded_blocks() > 0);
        for (a, b) in q.dequantize().iter().zip(&f) {
            assert!((a - b).abs() <= 2.0 / 510.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn matmul_matches_f32_within_activation_rounding() {
        for &(rows, out, inp) in &[(1, 16, 32), (5, 37, 100), (33, 48, 576), (70, 20, 64)] {
            let w = q4_weights(out, inp, rows as u64);
            let x = rand_vec(rows * inp, 7 + rows as u64);
            let q = QMatrix::from_f32(&w, out, inp).unwrap();
            let y = q.matmul(&x, rows);
            let r = reference(&x, &w, rows, out, inp);
            // Per element the activation rounding is ≤ s/2 = amax/254 per block.
            let wabs: f32 = w.iter().map(|v| v.abs()).fold(0.0, f32::max);
            let tol = inp as f32 * wabs / 254.0 * 0.5;
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                assert!(
                    (a - b).abs() <= tol,
                    "[{rows}×{out}×{inp}] #{i}: {a} vs {b}"
                );
            }
            // Not trivially zero and much closer than the tolerance on average.
            let err: f32 = y.iter().zip(&r).map(|(a, b)| (a - b).abs()).sum::<f32>();
            let mag: f32 = r.iter().map(|v| v.abs()).sum::<f32>();
            assert!(err / mag < 0.02, "mean relative error {}", err / mag);
        }
    }

    #[test]
    fn rows_are_independent_of_the_batch_and_kernels_agree() {
        let (out, inp) = (50, 96);
        let w = q4_weights(out, inp, 3);
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        let rows = 77;
        let x = rand_vec(rows * inp, 4);
        let all = q.matmul(&x, rows);
        for r in [0, 8, 13, 76] {
            let one = q.matmul(&x[r * inp..(r + 1) * inp], 1);
            assert_eq!(one, all[r * out..(r + 1) * out], "row {r}");
        }
        // The portable kernel gives bitwise the VNNI kernel's results.
        let act = Activations::quantize(&x, rows, inp, q.nb);
        let mut y = vec![0f32; rows * out];
        let p = SendPtr(y.as_mut_ptr());
        for t in 0..q.tiles {
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(NR);
                unsafe { Kernel::Portable.run(&q, &act, t, r0, nr, p) };
                r0 += nr;
            }
        }
        assert_eq!(y, all);
    }

    #[test]
    fn activation_quantizers_agree() {
        let mut x = rand_vec(32 * 50, 9);
        // Exact ties (k + 0.5 steps) and an all-zero block.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) + 0.5;
        }
        x[32..64].fill(0.0);
        for xb in x.chunks_exact(QK) {
            let mut p = [0i8; QK];
            let want = quantize_act_block(xb, &mut p);
            #[cfg(target_arch = "x86_64")]
            if Kernel::detect() == Kernel::Vnni512 {
                let mut v = [0i8; QK];
                let got = unsafe { vnni::quantize_block(xb, &mut v) };
                assert_eq!((got, v), (want, p));
            }
            let s = want.0;
            for (&q, &v) in p.iter().zip(xb) {
                assert!((q as f32 * s - v).abs() <= s / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn op_keeps_leading_dims() {
        let (out, inp) = (24, 64);
        let w = q4_weights(out, inp, 5);
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        let x = Tensor::from_vec(
            rand_vec(2 * 3 * inp, 6),
            (2, 3, inp),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y = qlinear(&x, &q).unwrap();
        assert_eq!(y.dims(), &[2, 3, out]);
        let flat = q.matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 6);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);
        assert!(qlinear(&x.narrow(2, 0, 32).unwrap(), &q).is_err());
    }
}
