//! Int8 inference matmuls for CPU serving: 8-bit block weights × 8-bit block activations.
//!
//! This is the arithmetic llama.cpp runs for a Q4_1 GGUF (Q4_1 weights × Q8_1 activations),
//! written for batches: each weight row is cut into blocks of [`QK`] inputs stored as
//! `w = d·q + m` with `q ∈ 0..=255` (one scale and one offset per block), and each activation
//! row into blocks stored as `x ≈ s·a` with `a ∈ −127..=127`. A block's dot product is then
//! `d·s·Σ q·a + m·s·Σ a`, where `Σ q·a` is exact integer arithmetic (AVX-512 VNNI `vpdpbusd`:
//! 64 multiply-adds per instruction, 4× the f32 FMA rate; AVX2 `vpmaddubsw` + `vpmaddwd`).
//!
//! Weights that came from a ≤ 8-bit block format (Q4_0, Q4_1, Q5_x, Q8_0: every block is an
//! evenly spaced grid) are stored *exactly* (the grid is detected); other weights (f32, f16,
//! k-quants) are rounded to 256 levels per block, or with [`Compute::Int4`] to 16 (QLoRA's
//! 4-bit base; see [`Bits`]). The activation rounding is the only other loss — the same
//! llama.cpp accepts. Each row is computed alone in a fixed order, so a row's
//! result never depends on which other rows share the batch (bitwise), which is what mixed
//! serving batches need.
//!
//! Kernel paths (chosen once per process by CPU features, see [`kernel_name`]):
//! `avx512vnni` (AVX-512 F/BW/VNNI), `avx2` (AVX2 + FMA) and `portable` (plain Rust, any CPU).
//! Every path computes the same exact i32 block sums and then the same f32 operations in the
//! same order, so all give bitwise the same results. `LOWRANK_INT8_KERNEL=portable|avx2|avx512vnni`
//! forces a path (for testing and timing); a path this CPU cannot run is refused with one warning
//! on stderr and the best supported path runs instead. `LOWRANK_PORTABLE_INT8=1` is an older
//! spelling of `LOWRANK_INT8_KERNEL=portable`. `LOWRANK_ISA=avx2|portable` caps this choice
//! and every other kernel family's at once ([`crate::isa`]).

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
/// Bytes of one (tile, block) packed as nibbles (every q ≤ 15): two groups of 4 inputs share
/// 64 bytes, the even group in the low nibbles (see [`QMatrix::nibbles`]).
const TB4: usize = TB / 2;
/// Rows of activations a VNNI kernel call keeps in registers (4 zmm each: an i32 dot and an
/// f32 sum for each of its two tiles).
#[cfg(target_arch = "x86_64")]
const NR_VNNI: usize = 6;
/// Activation rows (limb pairs × 2) of a two-limb VNNI call: 4 zmm of i32 dots and 2 of f32
/// sums per pair.
#[cfg(target_arch = "x86_64")]
const NR_VNNI_LIMBS: usize = 8;
/// Rows per AVX2 kernel call: each row needs 2 ymm (a 16-output group is two 256-bit halves)
/// of i32 or i16 sums, out of 16 ymm registers (see `avx2::tile`).
#[cfg(target_arch = "x86_64")]
const NR_AVX2: usize = 4;
/// Rows per portable kernel call (it loops over rows; only the unit of work).
const NR_PORTABLE: usize = 8;
/// Rows per parallel work unit (bounds the activation bytes re-read per weight tile).
const ROW_BLOCK: usize = 64;
/// Packed weights of at least this many bytes are multiplied tile-major (see `products`).
const TILE_MAJOR_BYTES: usize = 16 << 20;

/// One GGUF tensor for [`QMatrix::from_gguf_blocks`]: its raw blocks, its rows, and for each
/// output row the file row it comes from (when the rows are permuted).
pub type GgufPart<'a> = (&'a [u8], usize, Option<&'a [usize]>);

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
    /// The largest q: bounds the i16 partial sums of the AVX2 kernel (see `avx2::Mode`).
    qmax: u8,
    /// q stored as nibbles (every q ≤ 15, e.g. weights from a 4-bit GGUF): per (tile, block)
    /// [`TB4`] bytes, byte k of pair p holding byte k of group 2p (low nibble) and of group
    /// 2p + 1 (high nibble). Decoding one token reads every weight once, so halving the q
    /// bytes (40 → 24 bytes per 32 weights with the f32 scale and offset) speeds it up; the
    /// kernels unpack with an AND and a shift and form the same integer sums, so results are
    /// bitwise those of the byte layout. `LOWRANK_INT8_PACKING=bytes` keeps bytes (for
    /// comparison).
    nibbles: bool,
}

impl QMatrix {
    /// Pack a row-major [out, in] f32 weight.
    pub fn from_f32(w: &[f32], out: usize, inp: usize) -> Result<QMatrix> {
        QMatrix::from_f32_bits(w, out, inp, Bits::Eight)
    }

    /// [`QMatrix::from_f32`], rounding blocks that are not on a grid of at most `bits` bits
    /// to that many.
    pub fn from_f32_bits(w: &[f32], out: usize, inp: usize, bits: Bits) -> Result<QMatrix> {
        QMatrix::from_parts_bits(&[w], inp, bits).and_then(|q| {
            if q.out == out {
                Ok(q)
            } else {
                Err(ModelError::Invalid(format!(
                    "int8 pack: weight has {} values, expected {out}×{inp}",
                    w.len()
                )))
            }
        })
    }

    /// Pack row-major f32 weights with `inp` columns stacked along the output dim (q, k and
    /// v as one matrix), read in place: no concatenated copy (copies of the 540 MB of f32
    /// weights were a third of the default model's start-up).
    pub fn from_parts(parts: &[&[f32]], inp: usize) -> Result<QMatrix> {
        QMatrix::from_parts_bits(parts, inp, Bits::Eight)
    }

    /// [`QMatrix::from_parts`] with blocks rounded to at most `bits` bits.
    pub fn from_parts_bits(parts: &[&[f32]], inp: usize, bits: Bits) -> Result<QMatrix> {
        if inp == 0 || parts.is_empty() || parts.iter().any(|p| p.is_empty() || p.len() % inp != 0)
        {
            return Err(ModelError::Invalid(format!(
                "int8 pack: parts of {:?} values are not whole rows of {inp}",
                parts.iter().map(|p| p.len()).collect::<Vec<_>>()
            )));
        }
        let out: usize = parts.iter().map(|p| p.len() / inp).sum();
        let locate = part_locator(parts.iter().map(|p| p.len() / inp));
        let row_of = |o: usize| -> &[f32] {
            let (i, r) = locate(o);
            &parts[i][r * inp..(r + 1) * inp]
        };
        QMatrix::pack_blocks(out, inp, |o, b, block| {
            let vals = &row_of(o)[b * QK..((b + 1) * QK).min(inp)];
            quantize_block(vals, block, bits.top())
        })
        .map_err(|(o, b)| {
            let (part, row) = locate(o);
            ModelError::NonFiniteWeights {
                part,
                row,
                col: b * QK,
            }
        })
    }

    /// Stack GGUF block weights (Q4_1, Q8_0) along the output dim, straight from their
    /// blocks: each block's scale (and minimum) and q are llama.cpp's own, exact by
    /// construction with no grid search and no f32 copy (start-up of the default model's
    /// `generate --compute int8`: 1.0 s → 0.7 s with Q4_1 alone, see the README). A part is
    /// (the tensor's raw blocks, its rows, and for each output row the file row it comes from
    /// when the rows are permuted, as q and k are from GGUF to HF order). A block with more
    /// levels than `bits` allows (Q8_0 under [`Bits::Four`]) is rounded from its values as
    /// GGUF readers dequantize them, exactly as the f32 weights of the same file would be.
    pub fn from_gguf_blocks(
        fmt: BlockFormat,
        parts: &[GgufPart<'_>],
        inp: usize,
        bits: Bits,
    ) -> Result<QMatrix> {
        let nb = inp / QK;
        let bytes = fmt.bytes();
        let bad = |msg: String| Err(ModelError::Invalid(format!("{fmt:?} pack: {msg}")));
        if inp == 0 || !inp.is_multiple_of(QK) {
            return bad(format!("{inp} inputs are not whole blocks of {QK}"));
        }
        for (raw, rows, map) in parts {
            if raw.len() != rows * nb * bytes {
                return bad(format!("{} bytes for {rows} rows of {inp}", raw.len()));
            }
            if let Some(m) = map {
                if m.len() != *rows || m.iter().any(|&r| r >= *rows) {
                    return bad("a row map that is not a permutation of the rows".into());
                }
            }
        }
        let out: usize = parts.iter().map(|p| p.1).sum();
        let locate = part_locator(parts.iter().map(|p| p.1));
        QMatrix::pack_blocks(out, inp, |o, b, block| {
            let (i, r) = locate(o);
            let (raw, _, map) = parts[i];
            let r = map.map_or(r, |m| m[r]);
            let blk = &raw[(r * nb + b) * bytes..(r * nb + b + 1) * bytes];
            let (d, m) = fmt.decode(blk, block);
            if block.iter().all(|&q| q <= bits.top()) {
                return (d, m, true);
            }
            let mut vals = [0f32; QK];
            for (j, v) in vals.iter_mut().enumerate() {
                *v = fmt.value(blk, j);
            }
            quantize_block(&vals, block, bits.top())
        })
        .map_err(|(o, b)| {
            let (part, r) = locate(o);
            let row = parts[part].2.map_or(r, |m| m[r]);
            ModelError::NonFiniteWeights {
                part,
                row,
                col: b * QK,
            }
        })
    }

    /// The packing loop: `block(o, b, q)` fills block b of output row o (q, zero-padded) and
    /// returns its (d, m, exact). Stores 4-bit q as nibbles (unless
    /// `LOWRANK_INT8_PACKING=bytes`). A block whose d or m is not finite (non-finite weights,
    /// or a GGUF block's scale) is an error: (its output row, its block), the first in memory
    /// order.
    fn pack_blocks(
        out: usize,
        inp: usize,
        block: impl Fn(usize, usize, &mut [u8; QK]) -> (f32, f32, bool) + Sync,
    ) -> std::result::Result<QMatrix, (usize, usize)> {
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
                let mut qs = [0u8; QK];
                for lane in 0..TILE {
                    let o = t * TILE + lane;
                    if o >= out {
                        break; // padding outputs: d = m = 0 → 0
                    }
                    for b in 0..nb {
                        let (db, mb, exact) = block(o, b, &mut qs);
                        rounded += usize::from(!exact);
                        dt[b * TILE + lane] = db;
                        mt[b * TILE + lane] = mb;
                        let qb = &mut qt[b * TB..(b + 1) * TB];
                        for (i, &v) in qs.iter().enumerate() {
                            qb[(i / 4) * TILE * 4 + lane * 4 + i % 4] = v;
                        }
                    }
                }
                rounded
            })
            .sum();
        // d and m are [tiles][nb][TILE]; padding lanes hold 0.
        let bad = |x: &f32| !x.is_finite();
        if let Some(i) = d
            .iter()
            .position(bad)
            .into_iter()
            .chain(m.iter().position(bad))
            .min()
        {
            let (t, b, lane) = (i / (nb * TILE), i / TILE % nb, i % TILE);
            return Err((t * TILE + lane, b));
        }
        let qmax = q.par_iter().copied().max().unwrap_or(0);
        let packed = QMatrix {
            out,
            inp,
            nb,
            tiles,
            q,
            d,
            m,
            rounded_blocks: rounded,
            qmax,
            nibbles: false,
        };
        Ok(if qmax <= 15 && nibble_packing() {
            packed.with_nibbles(true)
        } else {
            packed
        })
    }

    /// The same matrix with q stored as nibbles (`true`, which needs every q ≤ 15) or bytes.
    pub(super) fn with_nibbles(mut self, nibbles: bool) -> QMatrix {
        assert!(!nibbles || self.qmax <= 15, "nibbles need q ≤ 15");
        if nibbles != self.nibbles {
            self.q = if nibbles {
                let mut q4 = vec![0u8; self.q.len() / 2];
                q4.par_chunks_mut(TB4)
                    .zip(self.q.par_chunks(TB))
                    .for_each(|(q4, q8)| to_nibbles(q8, q4));
                q4
            } else {
                let mut q8 = vec![0u8; self.q.len() * 2];
                q8.par_chunks_mut(TB)
                    .zip(self.q.par_chunks(TB4))
                    .for_each(|(q8, q4)| from_nibbles(q4, q8));
                q8
            };
            self.nibbles = nibbles;
        }
        self
    }

    /// Whether q is stored as nibbles (see the field's docs).
    pub fn nibble_packed(&self) -> bool {
        self.nibbles
    }

    /// Pack a [out, in] tensor (any device; copied to host unless CPU f32 contiguous).
    pub fn from_tensor(w: &Tensor) -> Result<QMatrix> {
        QMatrix::from_tensor_bits(w, Bits::Eight)
    }

    /// [`QMatrix::from_tensor`] with blocks rounded to at most `bits` bits.
    pub fn from_tensor_bits(w: &Tensor, bits: Bits) -> Result<QMatrix> {
        if w.device().is_cpu() && w.dtype() == candle_core::DType::F32 && w.is_contiguous() {
            let (_, inp) = w.dims2()?;
            let (st, l) = w.storage_and_layout();
            if let Some(v) = crate::ops::f32s(&st) {
                let data = &v[l.start_offset()..l.start_offset() + w.elem_count()];
                return QMatrix::from_parts_bits(&[data], inp, bits);
            }
        }
        // Another dtype (a bf16 checkpoint's embedding or head) or layout: converted and
        // packed ROWS rows at a time, so its f32 copy is never whole (a 49152 × 2048 head is
        // 400 MB in f32, the peak of loading a 1.1 B base for int8 training). Rows are
        // packed independently, so the parts stack into bitwise the whole packing.
        const ROWS: usize = 2048; // a multiple of TILE
        let (out, inp) = w.dims2()?;
        let parts = (0..out.max(1))
            .step_by(ROWS)
            .map(|r0| {
                let n = ROWS.min(out - r0);
                let v = w
                    .narrow(0, r0, n)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                QMatrix::from_f32_bits(&v, n, inp, bits).map_err(|e| match e {
                    ModelError::NonFiniteWeights { row, col, .. } => ModelError::NonFiniteWeights {
                        part: 0,
                        row: r0 + row,
                        col,
                    },
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        QMatrix::stack_rows(parts)
    }

    /// Matrices with the same inputs stacked along the output dim (every part but the last
    /// a whole number of tiles, so the tiles concatenate); q as nibbles only if every part
    /// has them.
    fn stack_rows(parts: Vec<QMatrix>) -> Result<QMatrix> {
        let bad = |m: &str| Err(ModelError::Invalid(format!("int8 stack: {m}")));
        let Some(first) = parts.first() else {
            return bad("no parts");
        };
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let (inp, nb) = (first.inp, first.nb);
        let nibbles = parts.iter().all(|p| p.nibbles);
        let n = parts.len();
        for (k, p) in parts.iter().enumerate() {
            if p.inp != inp {
                return bad("parts of different input sizes");
            }
            if k + 1 < n && !p.out.is_multiple_of(TILE) {
                return bad("a part that is not whole tiles before the last");
            }
        }
        let mut all = QMatrix {
            out: 0,
            inp,
            nb,
            tiles: 0,
            q: vec![],
            d: vec![],
            m: vec![],
            rounded_blocks: 0,
            qmax: 0,
            nibbles,
        };
        for p in parts {
            let p = p.with_nibbles(nibbles);
            all.out += p.out;
            all.tiles += p.tiles;
            all.rounded_blocks += p.rounded_blocks;
            all.qmax = all.qmax.max(p.qmax);
            all.q.extend_from_slice(&p.q);
            all.d.extend_from_slice(&p.d);
            all.m.extend_from_slice(&p.m);
        }
        Ok(all)
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

    /// The weight as this packing represents it, row-major [out, in].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        // Tile by tile, reading q in storage order (training's backward dequantizes every
        // pack on every step, so this is a hot loop; row by row it strided through q).
        w.par_chunks_mut(TILE * self.inp)
            .enumerate()
            .for_each(|(t, rows)| self.tile_into(t, rows));
        w
    }

    /// Rows r0..r0+n of the weight as this packing represents it, row-major [n, in] (bitwise
    /// as [`QMatrix::dequantize`]'s). r0 is a multiple of 16 and r0 + n ≤ out.
    pub fn dequantize_rows(&self, r0: usize, n: usize) -> Result<Vec<f32>> {
        if !r0.is_multiple_of(TILE) || r0 + n > self.out {
            return Err(ModelError::Invalid(format!(
                "int8 rows {r0}..{} of a {}-row matrix (the first a multiple of {TILE})",
                r0 + n,
                self.out
            )));
        }
        let mut w = vec![0f32; n * self.inp];
        self.dequantize_rows_into(r0, &mut w)?;
        Ok(w)
    }

    /// [`QMatrix::dequantize_rows`] into `out` (its length n·in gives n), every float of it
    /// written: a caller can reuse one buffer for every chunk.
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) -> Result<()> {
        let n = out.len() / self.inp.max(1);
        if !r0.is_multiple_of(TILE) || r0 + n > self.out || n * self.inp != out.len() {
            return Err(ModelError::Invalid(format!(
                "int8 rows {r0}..{} of a {}-row matrix (the first a multiple of {TILE}) into {} floats",
                r0 + n,
                self.out,
                out.len()
            )));
        }
        out.par_chunks_mut(TILE * self.inp)
            .enumerate()
            .for_each(|(t, rows)| self.tile_into(r0 / TILE + t, rows));
        Ok(())
    }

    /// The rows of tile `t` ([≤ 16, in], row-major), bitwise as [`QMatrix::row_into`].
    fn tile_into(&self, t: usize, rows: &mut [f32]) {
        self.tile_span_into(t, 0, self.inp, rows);
    }

    /// Columns i0..i0+ni of tile `t`'s rows ([≤ 16, ni], row-major), decoding only the blocks
    /// they lie in; bitwise as [`QMatrix::tile_into`]. i0 is a multiple of [`QK`].
    fn tile_span_into(&self, t: usize, i0: usize, ni: usize, rows: &mut [f32]) {
        self.tile_span_with(Kernel::detect(), t, i0, ni, rows)
    }

    /// [`QMatrix::tile_span_into`] by the decoder of a kernel path: the AVX2 one on the
    /// SIMD paths, the scalar body on the portable path (all bitwise equal).
    fn tile_span_with(&self, kernel: Kernel, t: usize, i0: usize, ni: usize, rows: &mut [f32]) {
        assert!(
            t < self.tiles
                && i0.is_multiple_of(QK)
                && ni > 0
                && i0 + ni <= self.inp
                && rows.len().is_multiple_of(ni)
                && rows.len() / ni <= TILE.min(self.out - t * TILE),
            "int8 tile {t} span {i0}+{ni} into {} values",
            rows.len()
        );
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the bounds are asserted above.
            return unsafe { avx2::tile_span_into(self, t, i0, ni, rows) };
        }
        let _ = kernel;
        // Training dequantizes every pack on every step. Built for the baseline x86_64 CPU,
        // `mul_add` is a call into libm per weight (a third of this function's time in a
        // profile of `bench train --compute int8`); with FMA enabled it is one instruction,
        // and the same exactly rounded fused operation.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA.
            return unsafe { self.tile_span_into_fma(t, i0, ni, rows) };
        }
        self.tile_span_body(t, i0, ni, rows)
    }

    /// [`QMatrix::tile_span_into`] compiled with FMA.
    ///
    /// # Safety
    /// The CPU has FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    unsafe fn tile_span_into_fma(&self, t: usize, i0: usize, ni: usize, rows: &mut [f32]) {
        self.tile_span_body(t, i0, ni, rows)
    }

    #[inline(always)]
    fn tile_span_body(&self, t: usize, i0: usize, ni: usize, rows: &mut [f32]) {
        let n = rows.len() / ni;
        let end = (i0 + ni).min(self.inp);
        for b in i0 / QK..end.div_ceil(QK) {
            let tb = t * self.nb + b;
            let d: &[f32; TILE] = self.d[tb * TILE..][..TILE].try_into().expect("a tile");
            let m: &[f32; TILE] = self.m[tb * TILE..][..TILE].try_into().expect("a tile");
            for g in 0..QK / 4 {
                let c0 = b * QK + g * 4;
                if c0 >= end {
                    break;
                }
                // The group's 16 outputs × 4 inputs lie in 64 consecutive bytes (as nibbles,
                // the group pair's bytes): decode all of them, then copy each row's part.
                let (src, shift) = match self.nibbles {
                    true => (&self.q[tb * TB4 + (g / 2) * TILE * 4..], 4 * (g % 2)),
                    false => (&self.q[tb * TB + g * TILE * 4..], 0),
                };
                let src: &[u8; TILE * 4] = src[..TILE * 4].try_into().expect("a group");
                let mask = if self.nibbles { 0x0F } else { 0xFF };
                let mut v = [0f32; TILE * 4];
                for (i, x) in v.iter_mut().enumerate() {
                    let q = (src[i] >> shift) & mask;
                    *x = d[i / 4].mul_add(q as f32, m[i / 4]);
                }
                let kn = 4.min(end - c0);
                for lane in 0..n {
                    let at = lane * ni + c0 - i0;
                    rows[at..at + kn].copy_from_slice(&v[lane * 4..lane * 4 + kn]);
                }
            }
        }
    }

    /// Row `o` of the weight as this packing represents it (`row`: `inp` values).
    pub fn row_into(&self, o: usize, row: &mut [f32]) {
        assert!(o < self.out && row.len() == self.inp, "int8 row {o}");
        let (t, lane) = (o / TILE, o % TILE);
        for (i, v) in row.iter_mut().enumerate() {
            let (b, j) = (i / QK, i % QK);
            let tb = t * self.nb + b;
            let byte = (j / 4) * TILE * 4 + lane * 4 + j % 4;
            let q = if self.nibbles {
                // Groups 2p and 2p + 1 share pair p's bytes (low, high nibble).
                let (p, odd) = (byte / (2 * TILE * 4), (j / 4) % 2);
                let b4 = self.q[tb * TB4 + p * TILE * 4 + byte % (TILE * 4)];
                (b4 >> (4 * odd)) & 0x0F
            } else {
                self.q[tb * TB + byte]
            };
            *v = self.d[tb * TILE + lane].mul_add(q as f32, self.m[tb * TILE + lane]);
        }
    }

    /// Rows `ids` of the weight, [ids.len(), in] row-major: an embedding lookup in a packed
    /// (tied) head, so the f32 embedding need not be held.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.out) {
            return Err(ModelError::Invalid(format!(
                "row {bad} of a packed matrix with {} rows",
                self.out
            )));
        }
        let mut x = vec![0f32; ids.len() * self.inp];
        x.par_chunks_mut(self.inp)
            .zip(ids.par_iter())
            .for_each(|(row, &o)| self.row_into(o as usize, row));
        Ok(x)
    }

    /// y = x·Wᵀ for row-major x [rows, in] → y [rows, out].
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_limbs(x, rows, false)
    }

    /// The product on this process's kernel path; `fine`: two-limb activations
    /// ([`QMatrix::matmul_fine`]).
    fn matmul_limbs(&self, x: &[f32], rows: usize, fine: bool) -> Vec<f32> {
        let kernel = Kernel::detect();
        match fine {
            true => {
                let mut y = Vec::new();
                self.matmul_fine_with(kernel, x, rows, &mut y);
                y
            }
            false => self.matmul_with(kernel, x, rows),
        }
    }

    /// [`QMatrix::matmul`] with activations in two 8-bit limbs: x = s·a + r, and the residual
    /// r (|r| ≤ s/2) is quantized again at s/256, so x is represented to ~1/(127·512) of its
    /// block's largest magnitude instead of 1/254: f32-grade activations at twice the integer
    /// work (`Activations::quantize_fine` says how a kernel combines the pair).
    /// Training needs it: with one limb the rounding of 30 layers' activations moves the
    /// default model's final hidden states by ~4 % and LoRA gradients by 15–30 %. Rows stay
    /// independent of each other (each row's residual is its own), and every kernel path
    /// gives the same bits.
    pub fn matmul_fine(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_limbs(x, rows, true)
    }

    /// [`QMatrix::matmul_fine`] into `y` (its contents replaced; its allocation reused
    /// where big enough).
    pub fn matmul_fine_into(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        self.matmul_fine_with(Kernel::detect(), x, rows, y)
    }

    fn matmul_fine_with(&self, kernel: Kernel, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        self.matmul_fine_ordered(kernel, x, rows, y, self.q.len() >= TILE_MAJOR_BYTES)
    }

    /// [`QMatrix::matmul_fine_with`] with the work units' order given (tests run both).
    fn matmul_fine_ordered(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: usize,
        y: &mut Vec<f32>,
        tile_major: bool,
    ) {
        let act = self.fine_activations(kernel, x, rows);
        self.products(kernel, &act, rows, true, y, tile_major)
    }

    /// Two-limb activations of x [rows, in] for this matrix on `kernel`, which the CPU must
    /// support (asserted, as the size of x).
    fn fine_activations(&self, kernel: Kernel, x: &[f32], rows: usize) -> Activations {
        assert!(
            kernel.supported(),
            "int8 kernel {} on this CPU",
            kernel.name()
        );
        assert_eq!(x.len(), rows * self.inp, "int8 matmul: input size");
        Activations::quantize_fine(kernel, x, rows, self.inp, self.nb)
    }

    /// One-limb activations of x [rows, in] for this matrix on `kernel` (as
    /// [`QMatrix::fine_activations`]).
    fn activations(&self, kernel: Kernel, x: &[f32], rows: usize) -> Activations {
        assert!(
            kernel.supported(),
            "int8 kernel {} on this CPU",
            kernel.name()
        );
        assert_eq!(x.len(), rows * self.inp, "int8 matmul: input size");
        Activations::quantize(kernel, x, rows, self.inp, self.nb)
    }

    /// [`QMatrix::matmul`] on a given kernel path (which the CPU must support).
    fn matmul_with(&self, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        let act = self.activations(kernel, x, rows);
        if rows == 0 {
            return vec![];
        }
        let mut y = Vec::new();
        let tile_major = self.q.len() >= TILE_MAJOR_BYTES;
        self.products(kernel, &act, rows, false, &mut y, tile_major);
        y
    }

    /// [`QMatrix::matmul_fine`] with y's columns split into consecutive parts of `widths`
    /// (a fused q/k/v or gate/up pack's targets), each written straight into its own
    /// [rows, width] vector: the fused output and its copy into parts were 2–3 % of an int8
    /// training step (memmove, and the zeroing and faulting-in of the parts). `None` where
    /// the widths do not sum to the output dim, or a part other than the last does not
    /// start and end on a kernel call's tile group (16 outputs, 32 on AVX-512): the caller
    /// then splits the whole product. Every cell is the same as in the whole product.
    pub fn matmul_fine_parts(
        &self,
        x: &[f32],
        rows: usize,
        widths: &[usize],
    ) -> Option<Vec<Vec<f32>>> {
        self.matmul_parts_limbs(x, rows, widths, true)
    }

    /// [`QMatrix::matmul`] into column parts, as [`QMatrix::matmul_fine_parts`] (inference's
    /// fused q/k/v and gate/up: the split copied 8 MB a layer of a 512-token prefill).
    pub fn matmul_parts(&self, x: &[f32], rows: usize, widths: &[usize]) -> Option<Vec<Vec<f32>>> {
        self.matmul_parts_limbs(x, rows, widths, false)
    }

    /// The parts' product with one-limb activations, or with `fine` two.
    fn matmul_parts_limbs(
        &self,
        x: &[f32],
        rows: usize,
        widths: &[usize],
        fine: bool,
    ) -> Option<Vec<Vec<f32>>> {
        let kernel = Kernel::detect();
        let group = TILE * kernel.tiles_per_call();
        let (last, inner) = widths.split_last()?;
        if widths.iter().sum::<usize>() != self.out
            || *last == 0
            || inner.iter().any(|&w| w == 0 || !w.is_multiple_of(group))
        {
            return None;
        }
        let act = match fine {
            true => self.fine_activations(kernel, x, rows),
            false => self.activations(kernel, x, rows),
        };
        let mut ys: Vec<Vec<f32>> = widths.iter().map(|_| Vec::new()).collect();
        let tile_major = self.q.len() >= TILE_MAJOR_BYTES;
        self.products_parts(kernel, &act, rows, fine, &mut ys, widths, tile_major);
        Some(ys)
    }

    /// y [rows, out] from activations quantized for this matrix (on a supported `kernel`):
    /// one activation row per row of y, or with `limbs` a pair of them (a row's limbs, as
    /// [`Activations::quantize_fine`] lays them out), combined per block in the kernel's
    /// integer sums ([`Kernel::run`]) and written straight into y (its contents replaced).
    fn products(
        &self,
        kernel: Kernel,
        act: &Activations,
        rows: usize,
        limbs: bool,
        y: &mut Vec<f32>,
        tile_major: bool,
    ) {
        let mut ys = [std::mem::take(y)];
        self.products_parts(kernel, act, rows, limbs, &mut ys, &[self.out], tile_major);
        let [whole] = ys;
        *y = whole;
    }

    /// [`QMatrix::products`] into consecutive column parts of `widths` (summing to out; each
    /// but the last a multiple of the kernel's tiles per call, so that no call straddles two
    /// parts), part j into `ys[j]` as [rows, widths[j]].
    #[allow(clippy::too_many_arguments)]
    fn products_parts(
        &self,
        kernel: Kernel,
        act: &Activations,
        rows: usize,
        limbs: bool,
        ys: &mut [Vec<f32>],
        widths: &[usize],
        tile_major: bool,
    ) {
        let tpc = kernel.tiles_per_call();
        assert_eq!(ys.len(), widths.len());
        assert_eq!(
            widths.iter().sum::<usize>(),
            self.out,
            "int8 matmul: part widths"
        );
        // Each part's first tile and output pointer.
        let mut parts = Vec::with_capacity(widths.len());
        let mut first = 0;
        for (j, (y, &w)) in ys.iter_mut().zip(widths).enumerate() {
            assert!(
                j + 1 == widths.len() || w.is_multiple_of(TILE * tpc),
                "int8 matmul: part {j} of width {w} splits a kernel call"
            );
            // Every cell is stored by exactly one kernel call below (no kernel accumulates
            // into y), so y starts uninitialized: zero-filling it was 0.5 % of an int8
            // training step. Unit tests and debug builds start from NaN instead, so that a
            // cell no call wrote shows in every comparison.
            y.clear();
            match cfg!(any(test, debug_assertions)) {
                true => y.resize(rows * w, f32::NAN),
                false => y.reserve(rows * w),
            };
            parts.push((first, SendPtr(y.as_mut_ptr()), w));
            first += w / TILE;
        }
        if rows == 0 {
            return;
        }
        // The part holding tile t: (its first tile, its cells, its width).
        let part_of = |t: usize| -> (usize, &SendPtr, usize) {
            let (f, p, w) = &parts[parts.partition_point(|&(f, _, _)| f <= t) - 1];
            (*f, p, *w)
        };
        let arows = if limbs { 2 * rows } else { rows };
        let nr_max = kernel.rows_per_call(limbs);
        // Every call takes whole pairs of limb rows: units start at multiples of ROW_BLOCK
        // and calls at multiples of nr_max, both even, and arows is even with limbs.
        const _: () = assert!(ROW_BLOCK.is_multiple_of(2));
        assert!(nr_max <= NR_MAX && nr_max.is_multiple_of(2));
        // Tiles a call computes (t, t + 1, … where the matrix has them); units take whole
        // calls' worth.
        let tiles_per_unit = tile_chunk(self.tiles, arows).next_multiple_of(tpc);
        let tile_units = self.tiles.div_ceil(tiles_per_unit);
        let row_units = arows.div_ceil(ROW_BLOCK);
        let per_row = if limbs { 2 } else { 1 };
        // Consecutive units (which a thread takes together) share their rows, re-reading the
        // weights once per block of rows; for a weight far bigger than the activations that
        // streams it from memory every time, so there they share their tiles instead and the
        // activations are re-read. `SHAPES=1b cargo run --release -p lowrank-model --example
        // int8_matmul`, two limbs, 512 rows, alternating: the 1.1 B base's 49152-row head
        // 354–373 → 324–341 ms, its gate/up 72.7 → 68–70 ms; the 135 M head 127–147 → 115–121
        // ms. Smaller matrices (in cache either way) measured 3–10 % slower tile-major. The
        // callers choose by TILE_MAJOR_BYTES; every cell's value is the same either way.
        (0..row_units * tile_units).into_par_iter().for_each(|u| {
            let (ru, tu) = match tile_major {
                true => (u % row_units, u / row_units),
                false => (u / tile_units, u % tile_units),
            };
            let r_end = ((ru + 1) * ROW_BLOCK).min(arows);
            let t_end = ((tu + 1) * tiles_per_unit).min(self.tiles);
            for t in (tu * tiles_per_unit..t_end).step_by(tpc) {
                let (f, yp, ld) = part_of(t);
                let mut r0 = ru * ROW_BLOCK;
                while r0 < r_end {
                    let nr = (r_end - r0).min(nr_max);
                    // SAFETY: t is a multiple of tpc (units start at multiples of it) and the
                    // part's first tile f too (every part before the last is a multiple of tpc
                    // tiles), so tiles t..t + tpc lie in this part (or past the matrix's
                    // end). Its row r0 / per_row + r (r < nr / per_row) exists (< rows) and its
                    // lanes from 16(t − f) on, min(16·tpc, out − 16t) of them, are this unit's
                    // alone (its own rows and tiles); rows r0..r0+nr < arows exist in `act`
                    // (whole limb pairs with `limbs`); t < tiles; `kernel` is supported (the
                    // callers assert it); the parts outlive the parallel loop.
                    unsafe {
                        let y = OutTile {
                            p: yp.get().add(r0 / per_row * ld + (t - f) * TILE),
                            ld,
                        };
                        let (w, x) = (self, act);
                        kernel.run(Call {
                            w,
                            x,
                            t,
                            r0,
                            nr,
                            limbs,
                            y,
                        });
                    }
                    r0 += nr;
                }
            }
        });
        for (y, &w) in ys.iter_mut().zip(widths) {
            // SAFETY: the units cover rows 0..rows and tiles 0..tiles, and each call stored
            // every lane < out of its rows and tiles (see `Kernel::run`), so all rows·w
            // floats of each part's allocation are initialized.
            unsafe { y.set_len(rows * w) };
        }
    }
}

/// GGUF block formats packed as they are (see [`QMatrix::from_gguf_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 d, f16 m, 32 4-bit q (low nibbles: elements 0–15, high: 16–31): w = d·q + m.
    Q4_1,
    /// f16 d, 32 i8 q: w = d·q, stored as q + 128 with m = −128·d.
    Q8_0,
}

impl BlockFormat {
    /// Bytes per block of 32 weights.
    pub fn bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    /// One block's q (as this packing's unsigned levels) and its (d, m).
    fn decode(self, blk: &[u8], q: &mut [u8; QK]) -> (f32, f32) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match self {
            BlockFormat::Q4_1 => {
                for (j, &byte) in blk[4..20].iter().enumerate() {
                    q[j] = byte & 0x0F;
                    q[j + QK / 2] = byte >> 4;
                }
                (d, half::f16::from_le_bytes([blk[2], blk[3]]).to_f32())
            }
            BlockFormat::Q8_0 => {
                for (qj, &byte) in q.iter_mut().zip(&blk[2..34]) {
                    *qj = (byte as i8 as i16 + 128) as u8;
                }
                (d, -128.0 * d)
            }
        }
    }

    /// Element j of a block as GGUF readers dequantize it (candle's formulas, to the bit):
    /// what the f32 base would hold there (for the fingerprint).
    pub fn value(self, blk: &[u8], j: usize) -> f32 {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match self {
            BlockFormat::Q4_1 => {
                let m = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let byte = blk[4 + j % (QK / 2)];
                let x = if j < QK / 2 { byte & 0x0F } else { byte >> 4 };
                (x as f32) * d + m
            }
            BlockFormat::Q8_0 => (blk[2 + j] as i8) as f32 * d,
        }
    }
}

/// Whether packing stores 4-bit q as nibbles: yes, unless `LOWRANK_INT8_PACKING=bytes`.
fn nibble_packing() -> bool {
    static N: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let v = std::env::var("LOWRANK_INT8_PACKING").unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "nibbles" => true,
            "bytes" => false,
            other => {
                eprintln!(
                    "lowrank: warning: LOWRANK_INT8_PACKING={other}: expected nibbles, bytes \
                     or auto; using nibbles"
                );
                true
            }
        }
    })
}

/// One (tile, block) of byte q (each ≤ 15) into nibbles: pair p's byte k holds byte k of
/// group 2p in its low nibble and of group 2p + 1 in its high nibble.
fn to_nibbles(q8: &[u8], q4: &mut [u8]) {
    const G: usize = TILE * 4; // bytes per group of 4 inputs
    for (p, out) in q4.chunks_exact_mut(G).enumerate() {
        let (even, odd) = (
            &q8[2 * p * G..(2 * p + 1) * G],
            &q8[(2 * p + 1) * G..(2 * p + 2) * G],
        );
        for ((o, &e), &d) in out.iter_mut().zip(even).zip(odd) {
            *o = e | (d << 4);
        }
    }
}

/// The inverse of [`to_nibbles`].
fn from_nibbles(q4: &[u8], q8: &mut [u8]) {
    const G: usize = TILE * 4;
    for (p, inp) in q4.chunks_exact(G).enumerate() {
        for (k, &b) in inp.iter().enumerate() {
            q8[2 * p * G + k] = b & 0x0F;
            q8[(2 * p + 1) * G + k] = b >> 4;
        }
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

/// The integer nearest to k (ties to even) for |k| < 2²², as two additions: `f32::round` is a
/// libm call on baseline x86-64 (no SSE4.1), and it was 12 % of packing the default model's
/// 4.2 M blocks at start-up. NaN and larger values come back unchanged or off by a fraction,
/// which the grid test rejects.
#[inline(always)]
fn round_small(k: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it leaves no fraction bits
    (k + MAGIC) - MAGIC
}

/// Store one block as `w = d·q + m` with `q ≤ top`; returns (d, m, exact). Blocks on an
/// evenly spaced grid of ≤ `top + 1` levels (with 255: every llama.cpp ≤ 8-bit block format;
/// with 15: Q4_0 and Q4_1) keep their grid, exactly; others are rounded to `top + 1` levels.
fn quantize_block(vals: &[f32], q: &mut [u8; QK], top: u8) -> (f32, f32, bool) {
    q.fill(0);
    // A NaN or ±∞ has no grid and no rounding (a silent 0 or minimum would hide it, where
    // the f32 model's output shows it): (NaN, NaN), which `pack_blocks` reports. So is a
    // block whose range overflows f32.
    let not_finite = (f32::NAN, f32::NAN, false);
    if vals.iter().any(|v| !v.is_finite()) {
        return not_finite;
    }
    let lo = lanes(vals, f32::INFINITY, |v| v, f32::min);
    let hi = lanes(vals, f32::NEG_INFINITY, |v| v, f32::max);
    if hi == lo {
        return (0.0, lo, true);
    }
    let range = hi - lo;
    if !range.is_finite() {
        return not_finite;
    }
    let tiny = range * 1e-5;
    let near_int = |k: f32| (k - round_small(k)).abs() < 1e-3;
    // A few values first, short-circuiting: a block off every grid (any f32 or bf16 checkpoint)
    // fails on its first value that is not the minimum, so a candidate costs a division or
    // two. Then all 32 without a short circuit, a fold that vectorizes, for the blocks of a
    // quantized file, which pass.
    let on_grid = |step: f32| {
        step.is_finite()
            && step > 0.0
            && round_small(range / step) <= top as f32
            && vals.iter().take(4).all(|&v| near_int((v - lo) / step))
            && lanes(
                vals,
                0.0,
                |v| {
                    let k = (v - lo) / step;
                    (k - round_small(k)).abs()
                },
                f32::max,
            ) < 1e-3
    };
    // llama.cpp's block formats first: Q4_1 / Q5_1 store the block's minimum and maximum
    // (q = 0 and q = 15 or 31 occur), Q8_0 / Q4_0 / Q5_0 a scale from the largest magnitude
    // (q = ±127, −8 or −16 occurs). One of these steps fits almost every block of such a
    // file, which makes packing at start-up cheap.
    let amax = lo.abs().max(hi.abs());
    let known = [
        range / 15.0,
        amax / 127.0,
        amax / 8.0,
        range / 31.0,
        amax / 16.0,
    ];
    let step = known.into_iter().find(|&s| on_grid(s)).or_else(|| {
        // Any other grid: its step s divides the smallest nonzero offset o from the minimum,
        // and the one from the maximum (o = k·s; the smaller of the two halves the
        // candidates, 13 against 25 on average for normal weights), and the block spans at
        // most `top` steps (range < (top + ½)·s), so k ≤ (top + ½)·o/range: a few dozen
        // candidates at most for 8 bits, 1 or 2 for 4, that find every grid, however dense.
        // Each k gives the grid's K = range/s steps across the block, and the step is taken
        // as range/K: o/k carries the rounding of two values, which across K steps can exceed
        // the grid test's tolerance where the values are large against the step. (This
        // replaced sorting each block for its smallest gap, which with the grid tests took
        // 0.9 µs a block: 25 s of loading a 1.1 B bf16 checkpoint for int8.)
        let offset_from = |edge: f32| {
            lanes(
                vals,
                f32::INFINITY,
                |v| match (v - edge).abs() {
                    g if g > tiny => g,
                    _ => f32::INFINITY,
                },
                f32::min,
            )
        };
        let offset = offset_from(lo).min(offset_from(hi));
        let kmax = ((top as f32 + 0.5) * (offset / range)).min(top as f32) as u32;
        // A first filter by multiplications only: on a grid of K steps, K·(v − lo)/range is
        // an integer for every v. Up to three values' fractions of the range, divided once;
        // a K that passes them is tested by `on_grid` as every other candidate.
        let mut fractions = [0f32; 3];
        let mut n = 0;
        for &v in vals {
            if n < fractions.len() && v - lo > tiny {
                fractions[n] = (v - lo) / range;
                n += 1;
            }
        }
        let fractions = &fractions[..n];
        let per_k = range / offset;
        // (A plain loop: as an iterator chain its closures were not inlined, 20 % of packing.)
        for k in 1..=kmax.max(1) {
            let steps = round_small(k as f32 * per_k);
            if steps > top as f32 {
                break; // steps only grows with k
            }
            if steps >= 1.0
                && fractions.iter().all(|&f| near_int(steps * f))
                && on_grid(range / steps)
            {
                return Some(range / steps);
            }
        }
        None
    });
    if let Some(step) = step {
        for (qi, &v) in q.iter_mut().zip(vals) {
            // Within 1e-3 of an integer ≤ 255 (checked): any rounding gives the same q.
            *qi = round_small((v - lo) / step) as u8;
        }
        return (step, lo, true);
    }
    round_block(vals, q, lo, range, top)
}

/// `op` (min or max: associative, commutative, NaN ignored) over `map` of every value, from
/// `init`, in 8 independent lanes: one chained `min` waits for each compare before the next,
/// and those chains were half of packing a bf16 checkpoint's blocks.
#[inline(always)]
fn lanes(vals: &[f32], init: f32, map: impl Fn(f32) -> f32, op: fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = op(*a, map(v));
        }
    }
    for &v in chunks.remainder() {
        acc[0] = op(acc[0], map(v));
    }
    acc.into_iter().fold(init, op)
}

/// A block that is not on a grid: `steps + 1` evenly spaced levels from its minimum to its
/// maximum.
fn round_block(vals: &[f32], q: &mut [u8; QK], lo: f32, range: f32, steps: u8) -> (f32, f32, bool) {
    let top = steps as f32;
    let d = range / top;
    for (qi, &v) in q.iter_mut().zip(vals) {
        *qi = round_small(((v - lo) / d).clamp(0.0, top)) as u8;
    }
    (d, lo, false)
}

/// Activation rows in 8-bit blocks: `x ≈ s·a`, plus `Σa` and `s·Σa` per block for the offset
/// term (and the AVX2 kernel's sign trick).
struct Activations {
    /// [rows][nb·QK], zero-padded.
    a: Vec<i8>,
    /// [rows][nb]
    s: Vec<f32>,
    /// [rows][nb]: s·Σa
    sa: Vec<f32>,
    /// [rows][nb]: Σa (exact; |Σa| ≤ 32·127; read by the x86 kernels)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sum: Vec<i32>,
    nb: usize,
}

impl Activations {
    /// Quantize with `kernel`'s block quantizer (all are bitwise equal; the vector ones are
    /// faster). Panics when this CPU does not support `kernel`.
    fn quantize(kernel: Kernel, x: &[f32], rows: usize, inp: usize, nb: usize) -> Activations {
        Activations::quantize_limbs(kernel, x, rows, inp, nb, false)
    }

    /// Two-limb activations for [`QMatrix::matmul_fine`]: for each row of x, its 8-bit
    /// blocks (x ≈ s·a, row 2r) and then those of its residual x − s·a (row 2r + 1) at the
    /// fixed scale s/256 ([`quantize_residual`]), in one pass over x. The residual is rounded
    /// from f32 `x − s·a` as written (a product, then a difference), on every kernel path
    /// alike. Because the second limb's scale is the first's over 2⁸, a kernel sums a block
    /// of both limbs exactly in its i32 lanes (256·Σq·a₁ + Σq·a₂) and scales that once: the
    /// pair's scale s/256 and offset term s·Σa₁ + (s/256)·Σa₂ sit in row 2r's slots of `s`
    /// and `sa` (row 2r + 1's are 0); `sum` keeps each limb row's Σa.
    fn quantize_fine(kernel: Kernel, x: &[f32], rows: usize, inp: usize, nb: usize) -> Activations {
        Activations::quantize_limbs(kernel, x, rows, inp, nb, true)
    }

    /// [`Activations::quantize`], or with `two` [`Activations::quantize_fine`].
    fn quantize_limbs(
        kernel: Kernel,
        x: &[f32],
        rows: usize,
        inp: usize,
        nb: usize,
        two: bool,
    ) -> Activations {
        assert!(kernel.supported(), "int8 kernel {}", kernel.name());
        assert!(x.len() >= rows * inp && nb == inp.div_ceil(QK));
        let (kp, limbs) = (nb * QK, if two { 2 } else { 1 });
        let mut a = vec![0i8; limbs * rows * kp];
        let mut s = vec![0f32; limbs * rows * nb];
        let mut sa = vec![0f32; limbs * rows * nb];
        let mut sum = vec![0i32; limbs * rows * nb];
        // One row of x: its `limbs` activation rows, adjacent.
        let work = |r: usize, (ar, (sr, (sar, sumr))): RowOut<'_>| {
            let xr = &x[r * inp..(r + 1) * inp];
            let (a1, a2) = ar.split_at_mut(kp);
            for b in 0..nb {
                let xb = &xr[b * QK..((b + 1) * QK).min(inp)];
                let ab: &mut [i8; QK] = (&mut a1[b * QK..(b + 1) * QK])
                    .try_into()
                    .expect("QK-sized chunk");
                if !two {
                    // SAFETY: the CPU supports `kernel` (asserted above).
                    let (sc, total) = unsafe { kernel.quantize_block(xb, ab) };
                    sumr[b] = total;
                    sr[b] = sc;
                    sar[b] = sc * total as f32;
                    continue;
                }
                let ab2: &mut [i8; QK] = (&mut a2[b * QK..(b + 1) * QK])
                    .try_into()
                    .expect("QK-sized chunk");
                // SAFETY: as above.
                let [(sc, total), (s2, total2)] =
                    unsafe { kernel.quantize_fine_block(xb, ab, ab2) };
                sumr[b] = total;
                sumr[nb + b] = total2;
                sr[b] = s2;
                sar[b] = sc * total as f32 + s2 * total2 as f32;
            }
        };
        let chunks = a.chunks_mut(limbs * kp).zip(
            s.chunks_mut(limbs * nb)
                .zip(sa.chunks_mut(limbs * nb).zip(sum.chunks_mut(limbs * nb))),
        );
        if limbs * rows >= 16 {
            chunks
                .collect::<Vec<_>>()
                .into_par_iter()
                .enumerate()
                .for_each(|(r, c)| work(r, c));
        } else {
            chunks.enumerate().for_each(|(r, c)| work(r, c));
        }
        Activations { a, s, sa, sum, nb }
    }
}

/// The second limb of a block: its residual r (|r| ≤ s/2, from a first limb of scale s)
/// rounded at the fixed scale s/256, `round(r·256/s)` to nearest even and clamped to ±127
/// (|r·256/s| ≤ 128: only a residual within half a step of ±s/2 is clamped, by one step).
/// Returns (s/256, Σa). One scalar routine for every kernel path (it is a small part of a
/// product), written so that it vectorizes: the rounding is the 1.5·2²³ addition, read off
/// the sum's bits. `r` may be a short tail block (the rest of `ab` is zeroed); a NaN gives 0.
fn quantize_residual(r: &[f32], s: f32, ab: &mut [i8; QK]) -> (f32, i32) {
    let (s2, inv) = residual_scale(s);
    const C: f32 = 12_582_912.0; // 1.5 · 2^23
    let mut q = [0i32; QK];
    for (qi, &v) in q.iter_mut().zip(r) {
        let y = (v * inv).clamp(-127.0, 127.0);
        // A NaN residual (from a non-finite x) rounds to 0, as `as i8` rounds it in the
        // first limb's scalar quantizer; its bits would be no level.
        let y = if y.is_nan() { 0.0 } else { y };
        // y + C is an integer (|y| ≤ 127 < 2²²) in the low mantissa bits above C's.
        *qi = (y + C).to_bits() as i32 - C.to_bits() as i32;
    }
    let mut total = 0i32;
    for (a, &qi) in ab.iter_mut().zip(&q) {
        *a = qi as i8;
        total += qi;
    }
    (s2, total)
}

/// The second limb's scale s/256 for a first limb of scale s, and the multiplier 256/s (0
/// for s = 0, capped at `f32::MAX` as [`act_scale`] caps 1/s), shared by every path.
#[inline(always)]
fn residual_scale(s: f32) -> (f32, f32) {
    let inv = if s > 0.0 {
        ((1.0 / s) * 256.0).min(f32::MAX)
    } else {
        0.0
    };
    (s * (1.0 / 256.0), inv)
}

/// One row's slices of [`Activations`] while it is being filled: (a, (s, (s·Σa, Σa))).
type RowOut<'a> = (
    &'a mut [i8],
    (&'a mut [f32], (&'a mut [f32], &'a mut [i32])),
);

/// One activation block: `a = round(x/s)` with `s = max|x|/127` (ties to even, as the
/// vector conversions round); returns (s, Σa). `xb` may be a short tail block (the rest of
/// `ab` is zeroed). The vector kernels' versions are bitwise equal (for finite inputs).
fn quantize_act_block(xb: &[f32], ab: &mut [i8; QK]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (sc, inv) = act_scale(amax);
    // Round half to even by the 1.5·2²³ trick: after clamping |y| ≤ 127 < 2²², y + C is
    // rounded to an integer by the (default, nearest-even) f32 addition and − C is exact,
    // so this equals `round_ties_even` (which is a library call on baseline x86-64, where
    // the add/sub form vectorizes). Clamping before rounding gives the same integers as
    // rounding before clamping because ±127 are integers.
    const C: f32 = 12_582_912.0; // 1.5 · 2^23
    let mut sum = 0i32;
    ab.fill(0);
    for (ai, &v) in ab.iter_mut().zip(xb) {
        let y = (v * inv).clamp(-127.0, 127.0);
        let qv = ((y + C) - C) as i8;
        *ai = qv;
        sum += qv as i32;
    }
    (sc, sum)
}

/// A block's scale `s = max|x|/127` and the multiplier `1/s` (0 for an all-zero block),
/// shared by every path's quantizer. `1/s` is capped at `f32::MAX`: for a block of tiny
/// (denormal-range) values it would be +∞, and 0·∞ = NaN converts differently in the scalar
/// (`as i8`: 0) and vector (`cvtps2dq`: i32::MIN) code.
#[inline(always)]
fn act_scale(amax: f32) -> (f32, f32) {
    let sc = amax / 127.0;
    let inv = if sc > 0.0 {
        (1.0 / sc).min(f32::MAX)
    } else {
        0.0
    };
    (sc, inv)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output cells to the parallel units of one matmul.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Where one kernel call writes its rows × 16·(tiles per call) outputs: row r of the call
/// (activation row r0 + r) at `p + r·ld`, lanes 0..min(16·tiles, out − 16t). Either the
/// matmul's own output (`ld` = out) or a small buffer whose rows are combined afterwards
/// (two-limb products).
#[derive(Clone, Copy)]
struct OutTile {
    p: *mut f32,
    ld: usize,
}

impl OutTile {
    /// The first output cell of the call's row r.
    ///
    /// # Safety
    /// r < the call's row count; the tile was made for this call (see [`Kernel::run`]).
    #[inline(always)]
    unsafe fn row(self, r: usize) -> *mut f32 {
        self.p.add(r * self.ld)
    }
}

/// Most rows any kernel path takes per call.
const NR_MAX: usize = 8;

/// One kernel call ([`Kernel::run`]): activation rows r0..r0+nr of `x` (limb pairs with
/// `limbs`) by tiles t.. of `w`, into `y`.
#[derive(Clone, Copy)]
struct Call<'a> {
    w: &'a QMatrix,
    x: &'a Activations,
    t: usize,
    r0: usize,
    nr: usize,
    limbs: bool,
    y: OutTile,
}

use kernel::Kernel;
pub use kernel::{kernel_name, supported_kernels};
pub use train::{
    bf16_linear_into, dequantized_input_grad, dequantized_input_grad_rows, qlinear_train,
    qlinear_train_into, qlinear_train_parts, qlinear_train_vec, DxProduct, HeadProduct,
    TrainProduct,
};

mod kernel;
mod portable;
mod train;

#[cfg(target_arch = "x86_64")]
mod vnni;

/// The AVX2 + FMA kernel family.
///
/// `vpmaddubsw` multiplies u8 by i8 and adds adjacent pairs into *saturating* i16, so the
/// exact block sum needs every i16 it forms to stay within ±32767. Which construction is
/// used depends on the matrix's largest q (`Mode::for_qmax`), all giving the exact i32 Σq·a:
///
/// * q ≤ 128: `maddubs(q, a)` directly (a pair is ≤ 2·128·127 = 32512), and when q is small
///   K consecutive groups' pairs are added in i16 before one `vpmaddwd` widens them
///   (K·2·qmax·127 ≤ 32767: K = 8 for q ≤ 16, i.e. 4-bit GGUF blocks; 4 for q ≤ 32; 2 for
///   q ≤ 64), saving most of the widening work.
/// * q > 128 (8-bit grids, rounded f32 weights): the sign trick. q' = q ^ 0x80 = q − 128 as
///   i8; `maddubs(|q'|, sign(a, q'))` forms q'·a with |q'| ≤ 128 (a pair ≤ 32512), and
///   Σq·a = Σq'·a + 128·Σa with the exact Σa from the quantizer.
///
/// The f32 epilogue is the VNNI kernel's, per 8-lane half.
#[cfg(target_arch = "x86_64")]
mod avx2;

/// The custom op: x [.., in] (f32, CPU) → [.., out] through a packed weight; `.1`: two-limb
/// activations ([`QMatrix::matmul_fine`]).
struct QLinear<'a>(&'a QMatrix, bool);

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
        let y = match self.1 {
            true => self.0.matmul_fine(x, rows),
            false => self.0.matmul(x, rows),
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = self.0.out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// x·Wᵀ through a packed weight. x: [.., in] f32 on the CPU → [.., out]. No gradient.
pub fn qlinear(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
    qlinear_op(x, w, false)
}

/// [`qlinear`] of a fused pack split into its targets' outputs: consecutive column parts
/// of `widths` (summing to the pack's out dim), each [n, width], written straight into
/// their own tensors where the widths fall on the kernel's tile groups
/// ([`QMatrix::matmul_parts`]); otherwise the whole product is split. x: [n, in].
pub fn qlinear_parts(x: &Tensor, w: &QMatrix, widths: &[usize]) -> Result<Vec<Tensor>> {
    let parts = with_rows(x, w.in_dim(), |v, rows| {
        Ok(w.matmul_parts(v, rows, widths).map(|p| (p, rows)))
    })?;
    if let Some(Some((parts, rows))) = parts {
        return parts_tensors(parts, rows, widths, x.device());
    }
    crate::ops::split_cols(&qlinear(x, w)?, widths)
}

/// Column parts of a product ([rows, width] each, row-major) as tensors on `device`.
fn parts_tensors(
    parts: Vec<Vec<f32>>,
    rows: usize,
    widths: &[usize],
    device: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    parts
        .into_iter()
        .zip(widths)
        .map(|(p, &wd)| Ok(Tensor::from_vec(p, (rows, wd), device)?))
        .collect()
}

/// `f(rows, m)` on x's m rows as one f32 slice (x made contiguous), where x is a plain f32
/// matrix [m, inp] on the CPU; `None` (f not run) otherwise. The products that take slices
/// share this check.
fn with_rows<R>(
    x: &Tensor,
    inp: usize,
    f: impl FnOnce(&[f32], usize) -> Result<R>,
) -> Result<Option<R>> {
    let plain = x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 2;
    if !plain || x.dim(1)? != inp {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let m = x.dim(0)?;
    let (xs, xl) = x.storage_and_layout();
    match crate::ops::f32s(&xs) {
        Some(v) => Ok(Some(f(&v[xl.start_offset()..][..m * inp], m)?)),
        None => Ok(None),
    }
}

/// [`qlinear`] with two-limb activations ([`QMatrix::matmul_fine`]; training).
pub fn qlinear_fine(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
    qlinear_op(x, w, true)
}

fn qlinear_op(x: &Tensor, w: &QMatrix, fine: bool) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Err(ModelError::Invalid(
            "int8 compute runs on the CPU with f32 activations".into(),
        ));
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&QLinear(w, fine))?)
}

/// How the frozen projections and the LM head are multiplied (inference and LoRA training).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// f32 weights and activations (matches the HF reference).
    #[default]
    F32,
    /// 8-bit block weights × 8-bit block activations (CPU; llama.cpp's arithmetic).
    Int8,
    /// 4-bit block weights × 8-bit block activations: [`Compute::Int8`]'s kernels on
    /// projections rounded to 16 levels per block (QLoRA's 4-bit base; Q4_0 / Q4_1 blocks stay
    /// exact); the LM head stays 8-bit ([`Bits::head`]).
    Int4,
}

impl Compute {
    /// `f32`, `int8` or `int4` (the flag's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Int8 => "int8",
            Compute::Int4 => "int4",
        }
    }

    /// The packed weights' bits, for the packed (integer-kernel) computes.
    pub fn bits(self) -> Option<Bits> {
        match self {
            Compute::F32 => None,
            Compute::Int8 => Some(Bits::Eight),
            Compute::Int4 => Some(Bits::Four),
        }
    }

    /// Whether the frozen weights run packed, through the integer kernels.
    pub fn packed(self) -> bool {
        self.bits().is_some()
    }
}

/// How many bits a packed weight block keeps: blocks on a grid of at most that many levels
/// are stored exactly, the others are rounded to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    /// 256 levels per block (q stored as bytes unless every q ≤ 15).
    Eight,
    /// 16 levels per block, q stored as nibbles: 24 bytes per 32 weights instead of 40.
    Four,
}

impl Bits {
    /// The largest q.
    pub fn top(self) -> u8 {
        match self {
            Bits::Eight => 255,
            Bits::Four => 15,
        }
    }

    pub fn get(self) -> u32 {
        match self {
            Bits::Eight => 8,
            Bits::Four => 4,
        }
    }

    /// What the LM head (and a tied embedding, which is the head) is packed to: never fewer
    /// than 8 bits. Rounding the head to 16 levels costs far more than rounding the
    /// projections — on the default model, whose projections are 4-bit already, a 4-bit head
    /// and embedding put the logits 0.19 nats/token (KL) from HF's against int8's 0.007 — which
    /// is also why llama.cpp's 4-bit mixes keep `output.weight` at 6 bits or more.
    pub fn head(self) -> Bits {
        Bits::Eight
    }

    /// The compute that packs this many bits.
    pub fn compute(self) -> Compute {
        match self {
            Bits::Eight => Compute::Int8,
            Bits::Four => Compute::Int4,
        }
    }
}

impl std::str::FromStr for Compute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Compute::F32),
            "int8" => Ok(Compute::Int8),
            "int4" => Ok(Compute::Int4),
            _ => Err(format!("unknown compute `{s}` (f32, int8 or int4)")),
        }
    }
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
    /// The packed embedding, when the model holds no f32 weights (for a tied head, the head).
    embed: Option<Arc<QMatrix>>,
    /// What every matrix was packed to (and what a repacked group is packed to).
    bits: Bits,
}

impl QuantModel {
    /// Pack every frozen projection and the head (the tied embedding when there is no head).
    pub fn build(w: &Weights, bits: Bits) -> Result<QuantModel> {
        let layers = w
            .layers
            .iter()
            .map(|lw| pack_layer(lw, bits))
            .collect::<Result<Vec<_>>>()?;
        let head = Arc::new(QMatrix::from_tensor_bits(
            w.lm_head.as_ref().unwrap_or(&w.embed),
            bits.head(),
        )?);
        Ok(QuantModel {
            layers,
            head,
            embed: None,
            bits,
        })
    }

    /// Assemble packs made one layer at a time while loading (the f32 weights are dropped as
    /// soon as they are packed). `embed`: the packed embedding (the head itself when tied).
    pub fn from_packs(
        layers: Vec<[Arc<QMatrix>; 4]>,
        head: Arc<QMatrix>,
        embed: Arc<QMatrix>,
        bits: Bits,
    ) -> QuantModel {
        QuantModel {
            layers,
            head,
            embed: Some(embed),
            bits,
        }
    }

    /// What the weights were packed to.
    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// The packed matrix of `targets` in `layer`, when they are exactly one of [`PACKS`].
    pub fn pack(&self, layer: usize, targets: &[Target]) -> Option<&QMatrix> {
        let i = PACKS.iter().position(|p| *p == targets)?;
        self.layers.get(layer).map(|l| &*l[i])
    }

    pub fn head(&self) -> &QMatrix {
        &self.head
    }

    /// The packed embedding when the model keeps no f32 weights.
    pub fn embed(&self) -> Option<&QMatrix> {
        self.embed.as_deref()
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
        l[i] = pack_group(lw, PACKS[i], self.bits)?;
        Ok(())
    }

    fn all(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().map(|m| &**m))
            .chain(std::iter::once(&*self.head))
    }

    /// Bytes held by the packed weights (with a separate packed embedding, when there is
    /// one).
    pub fn bytes(&self) -> usize {
        let e = match &self.embed {
            Some(e) if !Arc::ptr_eq(e, &self.head) => e.bytes(),
            _ => 0,
        };
        self.all().map(QMatrix::bytes).sum::<usize>() + e
    }

    /// (matrices whose q are stored as nibbles, all matrices).
    pub fn nibble_packed(&self) -> (usize, usize) {
        self.all()
            .fold((0, 0), |(n, all), m| (n + usize::from(m.nibbles), all + 1))
    }

    /// (rounded blocks, all blocks): 0 rounded when the weights came from ≤ 8-bit blocks.
    pub fn rounded(&self) -> (usize, usize) {
        self.all()
            .fold((0, 0), |(r, n), m| (r + m.rounded_blocks(), n + m.blocks()))
    }
}

/// Every group of one layer, packed ([`PACKS`] order).
pub fn pack_layer(lw: &LayerWeights, bits: Bits) -> Result<[Arc<QMatrix>; 4]> {
    let v: Vec<Arc<QMatrix>> = PACKS
        .iter()
        .map(|p| pack_group(lw, p, bits))
        .collect::<Result<_>>()?;
    Ok(v.try_into().expect("four packs"))
}

/// One group's weights stacked along the output dim, packed (read in place where the
/// tensors are contiguous f32 on the CPU, as loaded weights are).
pub(crate) fn pack_group(
    lw: &LayerWeights,
    targets: &[Target],
    bits: Bits,
) -> Result<Arc<QMatrix>> {
    let ws: Vec<&Tensor> = targets.iter().map(|&t| lw.linear(t)).collect();
    let inp = ws[0].dims2()?.1;
    let in_place = ws.iter().all(|w| {
        w.device().is_cpu()
            && w.dtype() == candle_core::DType::F32
            && w.is_contiguous()
            && w.dims2().is_ok_and(|(_, i)| i == inp)
    });
    if !in_place {
        let w = match ws.as_slice() {
            [one] => (*one).clone(),
            _ => Tensor::cat(&ws, 0)?,
        };
        // Rows of the concatenation: the stacked tensors' rows in order.
        let rows: Vec<usize> = ws.iter().map(|w| w.dims2().map_or(0, |d| d.0)).collect();
        return QMatrix::from_tensor_bits(&w, bits)
            .map(Arc::new)
            .map_err(|e| match e {
                ModelError::NonFiniteWeights { row, col, .. } => {
                    let (part, row) = part_locator(rows.into_iter())(row);
                    name_part(ModelError::NonFiniteWeights { part, row, col }, targets)
                }
                e => e,
            });
    }
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(ws.len());
    for (w, (st, l)) in ws.iter().zip(&guards) {
        let Some(v) = crate::ops::f32s(st) else {
            return Err(ModelError::Invalid(
                "int8 pack: weight storage is not CPU f32".into(),
            ));
        };
        parts.push(&v[l.start_offset()..l.start_offset() + w.elem_count()]);
    }
    QMatrix::from_parts_bits(&parts, inp, bits)
        .map(Arc::new)
        .map_err(|e| name_part(e, targets))
}

/// A non-finite weight's error with its tensor named (`part` indexes `targets`).
pub(crate) fn name_part(e: ModelError, targets: &[Target]) -> ModelError {
    match e {
        ModelError::NonFiniteWeights { part, row, col } => ModelError::Invalid(format!(
            "{}: {}",
            targets.get(part).map_or("?", |t| t.peft_name()),
            ModelError::NonFiniteWeights { part, row, col }
        )),
        e => e,
    }
}

/// For parts stacked along the output dim with these row counts: output row → (part, row
/// within that part).
fn part_locator(rows: impl Iterator<Item = usize>) -> impl Fn(usize) -> (usize, usize) {
    let starts: Vec<usize> = rows
        .scan(0, |acc, n| {
            let s = *acc;
            *acc += n;
            Some(s)
        })
        .collect();
    move |o| {
        let i = starts.partition_point(|&s| s <= o) - 1;
        (i, o - starts[i])
    }
}

#[cfg(test)]
mod tests;
