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
//! k-quants) are rounded to 256 levels per block. The activation rounding is the only other
//! loss — the same llama.cpp accepts. Each row is computed alone in a fixed order, so a row's
//! result never depends on which other rows share the batch (bitwise), which is what mixed
//! serving batches need.
//!
//! Kernel paths (chosen once per process by CPU features, see [`kernel_name`]):
//! `avx512vnni` (AVX-512 F/BW/VNNI), `avx2` (AVX2 + FMA) and `portable` (plain Rust, any CPU).
//! Every path computes the same exact i32 block sums and then the same f32 operations in the
//! same order, so all give bitwise the same results. `LOWRANK_INT8_KERNEL=portable|avx2|avx512vnni`
//! forces a path (for testing and timing); a path this CPU cannot run is refused with one warning
//! on stderr and the best supported path runs instead. `LOWRANK_PORTABLE_INT8=1` is an older
//! spelling of `LOWRANK_INT8_KERNEL=portable`.

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
/// Rows of activations a VNNI kernel call keeps in registers (2 zmm each: i32 dot, f32 sum).
#[cfg(target_arch = "x86_64")]
const NR_VNNI: usize = 8;
/// Rows per AVX2 kernel call: each row needs 2 ymm (a 16-output group is two 256-bit halves)
/// of i32 or i16 sums, out of 16 ymm registers (see `avx2::tile`).
#[cfg(target_arch = "x86_64")]
const NR_AVX2: usize = 4;
/// Rows per portable kernel call (it loops over rows; only the unit of work).
const NR_PORTABLE: usize = 8;
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
    /// The largest q: bounds the i16 partial sums of the AVX2 kernel (see `avx2::Mode`).
    qmax: u8,
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
        let qmax = q.par_iter().copied().max().unwrap_or(0);
        Ok(QMatrix {
            out,
            inp,
            nb,
            tiles,
            q,
            d,
            m,
            rounded_blocks: rounded,
            qmax,
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
        self.matmul_with(Kernel::detect(), x, rows)
    }

    /// [`QMatrix::matmul`] on a given kernel path (which the CPU must support).
    fn matmul_with(&self, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(
            kernel.supported(),
            "int8 kernel {} on this CPU",
            kernel.name()
        );
        assert_eq!(x.len(), rows * self.inp, "int8 matmul: input size");
        let mut y = vec![0f32; rows * self.out];
        if rows == 0 {
            return y;
        }
        let act = Activations::quantize(kernel, x, rows, self.inp, self.nb);
        let nr_max = kernel.rows_per_call();
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
                    let nr = (r_end - r0).min(nr_max);
                    // SAFETY: each (row, tile) output cell is written by exactly one unit,
                    // `y` outlives the parallel loop, rows r0..r0+nr < rows exist in `act`
                    // and `y`, t < tiles, and `kernel` is supported (asserted above).
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

/// Activation rows in 8-bit blocks: `x ≈ s·a`, plus `Σa` and `s·Σa` per block for the offset
/// term (and the AVX2 kernel's sign trick).
struct Activations {
    /// [rows][nb·QK], zero-padded.
    a: Vec<i8>,
    /// [rows][nb]
    s: Vec<f32>,
    /// [rows][nb]: s·Σa
    sa: Vec<f32>,
    /// [rows][nb]: Σa (exact; |Σa| ≤ 32·127)
    sum: Vec<i32>,
    nb: usize,
}

impl Activations {
    /// Quantize with `kernel`'s block quantizer (all are bitwise equal; the vector ones are
    /// faster). Panics when this CPU does not support `kernel`.
    fn quantize(kernel: Kernel, x: &[f32], rows: usize, inp: usize, nb: usize) -> Activations {
        assert!(kernel.supported(), "int8 kernel {}", kernel.name());
        assert!(x.len() >= rows * inp && nb == inp.div_ceil(QK));
        let kp = nb * QK;
        let mut a = vec![0i8; rows * kp];
        let mut s = vec![0f32; rows * nb];
        let mut sa = vec![0f32; rows * nb];
        let mut sum = vec![0i32; rows * nb];
        let work = |r: usize, (ar, (sr, (sar, sumr))): RowOut<'_>| {
            let xr = &x[r * inp..(r + 1) * inp];
            for (b, ab) in ar.chunks_exact_mut(QK).enumerate() {
                let xb = &xr[b * QK..((b + 1) * QK).min(inp)];
                let ab: &mut [i8; QK] = ab.try_into().expect("QK-sized chunk");
                // SAFETY: the CPU supports `kernel` (asserted above).
                let (sc, total) = unsafe { kernel.quantize_block(xb, ab) };
                sr[b] = sc;
                sar[b] = sc * total as f32;
                sumr[b] = total;
            }
        };
        let chunks = a.chunks_mut(kp).zip(
            s.chunks_mut(nb)
                .zip(sa.chunks_mut(nb).zip(sum.chunks_mut(nb))),
        );
        if rows >= 16 {
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

/// The name of the int8 kernel path this process uses: `"avx512vnni"`, `"avx2"` or
/// `"portable"` (decided once, on first use; see the module docs for the override).
pub fn kernel_name() -> &'static str {
    Kernel::detect().name()
}

/// The int8 kernel paths this CPU can run, best first (`"portable"` always, last).
pub fn supported_kernels() -> Vec<&'static str> {
    Kernel::supported_list().iter().map(|k| k.name()).collect()
}

/// Names [`Kernel::choose`] accepts for `LOWRANK_INT8_KERNEL` (on every architecture).
const KERNEL_NAMES: [&str; 3] = ["avx512vnni", "avx2", "portable"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    /// AVX2 + FMA: `vpmaddubsw` / `vpmaddwd` (see [`avx2`]).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F + BW + VNNI: `vpdpbusd`.
    #[cfg(target_arch = "x86_64")]
    Vnni512,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => "avx512vnni",
        }
    }

    /// The kernel of that name compiled into this build (whether or not the CPU runs it).
    fn by_name(name: &str) -> Option<Kernel> {
        match name {
            "portable" => Some(Kernel::Portable),
            #[cfg(target_arch = "x86_64")]
            "avx2" => Some(Kernel::Avx2),
            #[cfg(target_arch = "x86_64")]
            "avx512vnni" => Some(Kernel::Vnni512),
            _ => None,
        }
    }

    /// Whether this CPU runs the kernel (every instruction set its functions enable).
    fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }

    /// Supported kernels, best (fastest) first; the portable one is always last.
    fn supported_list() -> Vec<Kernel> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2,
            Kernel::Portable,
        ];
        all.into_iter().filter(|k| k.supported()).collect()
    }

    /// The kernel for this process, decided once: every matmul of a process must use the same
    /// one (bitwise-equal paths notwithstanding, one path keeps timing and debugging simple),
    /// and the environment lookup does not belong on the per-matmul path.
    ///
    /// `LOWRANK_INT8_KERNEL=portable|avx2|avx512vnni` forces a path; an unknown name or a path
    /// the CPU cannot run prints one warning on stderr and the best supported path runs (a
    /// forced path is a testing and timing aid, so a server keeps working on another CPU).
    /// `LOWRANK_PORTABLE_INT8` (set, not empty or `0`) is the older spelling of `portable`.
    fn detect() -> Kernel {
        static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            let forced = std::env::var("LOWRANK_INT8_KERNEL").ok();
            let legacy = std::env::var_os("LOWRANK_PORTABLE_INT8")
                .is_some_and(|v| !v.is_empty() && v != "0");
            let (kernel, warning) =
                Kernel::choose(forced.as_deref(), legacy, &Kernel::supported_list());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            kernel
        })
    }

    /// The choice [`Kernel::detect`] makes from the environment's values and the supported
    /// kernels (best first), with the warning to print, if any.
    fn choose(
        forced: Option<&str>,
        legacy_portable: bool,
        supported: &[Kernel],
    ) -> (Kernel, Option<String>) {
        let best = supported.first().copied().unwrap_or(Kernel::Portable);
        let forced = forced.map(|v| v.trim().to_ascii_lowercase());
        match forced.as_deref() {
            None | Some("") | Some("auto") => {
                let k = if legacy_portable {
                    Kernel::Portable
                } else {
                    best
                };
                (k, None)
            }
            Some(name) => match Kernel::by_name(name) {
                Some(k) if supported.contains(&k) => (k, None),
                _ if KERNEL_NAMES.contains(&name) => (
                    best,
                    Some(format!(
                        "LOWRANK_INT8_KERNEL={name}: this CPU does not support that int8 \
                         kernel (supported: {}); using {}",
                        supported
                            .iter()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                        best.name()
                    )),
                ),
                _ => (
                    best,
                    Some(format!(
                        "LOWRANK_INT8_KERNEL={name}: unknown int8 kernel (expected one of \
                         {}, auto); using {}",
                        KERNEL_NAMES.join(", "),
                        best.name()
                    )),
                ),
            },
        }
    }

    /// Most activation rows one kernel call takes.
    fn rows_per_call(self) -> usize {
        match self {
            Kernel::Portable => NR_PORTABLE,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => NR_AVX2,
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => NR_VNNI,
        }
    }

    /// One activation block (a short tail block is zero-padded, which changes neither the
    /// maximum nor the sum): (s, Σa).
    ///
    /// # Safety
    /// The CPU supports this kernel ([`Kernel::supported`]).
    unsafe fn quantize_block(self, xb: &[f32], ab: &mut [i8; QK]) -> (f32, i32) {
        #[cfg(target_arch = "x86_64")]
        {
            let mut buf = [0f32; QK];
            let full: &[f32; QK] = match xb.try_into() {
                Ok(full) => full,
                Err(_) => {
                    buf[..xb.len()].copy_from_slice(xb);
                    &buf
                }
            };
            match self {
                Kernel::Portable => {}
                // SAFETY: the caller guarantees the CPU has AVX2 + FMA.
                Kernel::Avx2 => return unsafe { avx2::quantize_block(full, ab) },
                // SAFETY: the caller guarantees the CPU has AVX-512 F/BW/VNNI.
                Kernel::Vnni512 => return unsafe { vnni::quantize_block(full, ab) },
            }
        }
        quantize_act_block(xb, ab)
    }

    /// Rows r0..r0+nr (nr ≤ [`Kernel::rows_per_call`]) of tile t into y.
    ///
    /// # Safety
    /// The CPU supports this kernel; `y` points at a [rows, out] buffer and `x` holds
    /// rows ≥ r0 + nr quantized for `w`'s input dim; t < `w.tiles`; no other thread writes
    /// these cells meanwhile.
    unsafe fn run(self, w: &QMatrix, x: &Activations, t: usize, r0: usize, nr: usize, y: SendPtr) {
        debug_assert!(nr >= 1 && nr <= self.rows_per_call());
        match self {
            Kernel::Portable => portable(w, x, t, r0, nr, y),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::run(w, x, t, r0, nr, y),
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

/// Σ q·a of one (tile, block) for its 16 outputs, exact. Written for the auto-vectorizer:
/// fixed-size arrays, no branches, i16 products (|q·a| ≤ 255·127 < 2¹⁵: the i16 multiply is
/// exact) widened into i32 sums. Per group of 4 inputs the layout's 64 bytes are runs of 8
/// (2 outputs × 4 inputs), each multiplied element-wise by the group's 4 activations twice
/// over; `wide` sums each (output, input mod 4) over the groups and each output's 4 are added
/// at the end (integer sums: any order is exact). Of the shapes tried on SSE2 this one ran
/// fastest (≈ 2× the per-output form and the `pmaddwd`-shaped pair sums).
#[inline(always)]
fn block_dot(qb: &[u8; TB], ab: &[i8; QK]) -> [i32; TILE] {
    let mut wide = [0i32; 4 * TILE];
    for (qg, a4) in qb.chunks_exact(4 * TILE).zip(ab.chunks_exact(4)) {
        let pat: [i16; 8] = std::array::from_fn(|j| a4[j % 4] as i16);
        for (w8, q8) in wide.chunks_exact_mut(8).zip(qg.chunks_exact(8)) {
            for j in 0..8 {
                w8[j] += (q8[j] as i16 * pat[j]) as i32;
            }
        }
    }
    let mut dot = [0i32; TILE];
    for (dl, w4) in dot.iter_mut().zip(wide.chunks_exact(4)) {
        *dl = (w4[0] + w4[1]) + (w4[2] + w4[3]);
    }
    dot
}

/// The same arithmetic as the vector kernels, in the same order (bitwise equal results).
///
/// # Safety
/// As [`Kernel::run`].
#[inline(never)] // one call per tile: keeps it a unit in profiles and disassembly
unsafe fn portable(w: &QMatrix, x: &Activations, t: usize, r0: usize, nr: usize, y: SendPtr) {
    let (nb, kp) = (w.nb, x.nb * QK);
    let lanes = TILE.min(w.out - t * TILE);
    for r in r0..r0 + nr {
        let mut acc = [0f32; TILE];
        for b in 0..nb {
            let tb = t * nb + b;
            let qb: &[u8; TB] = w.q[tb * TB..(tb + 1) * TB].try_into().expect("TB");
            let ab: &[i8; QK] = x.a[r * kp + b * QK..r * kp + (b + 1) * QK]
                .try_into()
                .expect("QK");
            let dot = block_dot(qb, ab);
            let (s, sa) = (x.s[r * nb + b], x.sa[r * nb + b]);
            let d: &[f32; TILE] = w.d[tb * TILE..(tb + 1) * TILE].try_into().expect("TILE");
            let m: &[f32; TILE] = w.m[tb * TILE..(tb + 1) * TILE].try_into().expect("TILE");
            for lane in 0..TILE {
                let ds = d[lane] * s;
                acc[lane] = (dot[lane] as f32).mul_add(ds, acc[lane]);
                acc[lane] = m[lane].mul_add(sa, acc[lane]);
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
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_block(xb: &[f32; QK], ab: &mut [i8; QK]) -> (f32, i32) {
        let x0 = _mm512_loadu_ps(xb.as_ptr());
        let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let (sc, inv) = super::act_scale(amax);
        let inv = _mm512_set1_ps(inv);
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
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; otherwise as [`super::Kernel::run`] with nr = R.
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
mod avx2 {
    use super::{Activations, QMatrix, SendPtr, NR_AVX2, QK, TB, TILE};
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
        (sc, _mm_cvtsi128_si32(s1))
    }

    /// Rows r0..r0+nr of tile t, in the matrix's mode.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; otherwise as [`super::Kernel::run`].
    pub(super) unsafe fn run(
        w: &QMatrix,
        x: &Activations,
        t: usize,
        r0: usize,
        nr: usize,
        y: SendPtr,
    ) {
        match Mode::for_qmax(w.qmax) {
            Mode::Plain(8) => rows::<8, false>(w, x, t, r0, nr, y),
            Mode::Plain(4) => rows::<4, false>(w, x, t, r0, nr, y),
            Mode::Plain(2) => rows::<2, false>(w, x, t, r0, nr, y),
            Mode::Plain(_) => rows::<1, false>(w, x, t, r0, nr, y),
            Mode::Sign => rows::<1, true>(w, x, t, r0, nr, y),
        }
    }

    /// # Safety
    /// As [`run`].
    unsafe fn rows<const K: usize, const SIGN: bool>(
        w: &QMatrix,
        x: &Activations,
        t: usize,
        r0: usize,
        nr: usize,
        y: SendPtr,
    ) {
        const _: () = assert!(NR_AVX2 == 4);
        match nr {
            1 => tile::<1, K, SIGN>(w, x, t, r0, y),
            2 => tile::<2, K, SIGN>(w, x, t, r0, y),
            3 => tile::<3, K, SIGN>(w, x, t, r0, y),
            _ => tile::<4, K, SIGN>(w, x, t, r0, y),
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
    /// # Safety
    /// The CPU has AVX2 and FMA; `K` divides 8 and K·2·qmax·127 ≤ 32767 when `!SIGN`, K = 1
    /// when `SIGN`; otherwise as [`super::Kernel::run`] with nr = R.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const K: usize, const SIGN: bool>(
        w: &QMatrix,
        x: &Activations,
        t: usize,
        r0: usize,
        y: SendPtr,
    ) {
        const G: usize = QK / 4; // groups of 4 inputs per block
        let (nb, kp) = (w.nb, x.nb * QK);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let qbase = w.q.as_ptr().add(t * nb * TB);
        let abase = x.a.as_ptr().add(r0 * kp);
        for b in 0..nb {
            let qb = qbase.add(b * TB);
            let ab = abase.add(b * QK);
            let mut dot = [[_mm256_setzero_si256(); 2]; R];
            for c in 0..G / K {
                let mut s16 = [[_mm256_setzero_si256(); 2]; R];
                for k in 0..K {
                    let g = c * K + k;
                    let w0 = _mm256_loadu_si256(qb.add(g * TILE * 4) as *const __m256i);
                    let w1 = _mm256_loadu_si256(qb.add(g * TILE * 4 + 32) as *const __m256i);
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
            for (r, (ar, dr)) in acc.iter_mut().zip(&dot).enumerate() {
                let i = (r0 + r) * nb + b;
                let s = _mm256_set1_ps(*x.s.get_unchecked(i));
                let sa = _mm256_set1_ps(*x.sa.get_unchecked(i));
                let mut dot = *dr;
                if SIGN {
                    // Σq·a = Σq'·a + 128·Σa (exact in i32: |128·Σa| ≤ 128·32·127).
                    let fix = _mm256_set1_epi32(128 * *x.sum.get_unchecked(i));
                    dot = dot.map(|v| _mm256_add_epi32(v, fix));
                }
                for h in 0..2 {
                    let ds = _mm256_mul_ps(dv[h], s);
                    ar[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), ds, ar[h]);
                    ar[h] = _mm256_fmadd_ps(mv[h], sa, ar[h]);
                }
            }
        }
        let lanes = TILE.min(w.out - t * TILE);
        for (r, ar) in acc.iter().enumerate() {
            let row = y.0.add((r0 + r) * w.out + t * TILE);
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

    /// Block-grid weights: per 32-block d·q + m with q ∈ 0..levels (Q4_1-style for 16 levels).
    /// The first two inputs of every block are q = 0 and q = levels − 1, so the grid's
    /// largest q is reached.
    fn grid_weights(out: usize, inp: usize, levels: u32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut w = vec![0f32; out * inp];
        for o in 0..out {
            for b in 0..inp.div_ceil(QK) {
                let d: f32 = rng.random_range(0.001..0.05) * 16.0 / levels as f32;
                let m: f32 = rng.random_range(-0.3..0.0);
                for i in b * QK..((b + 1) * QK).min(inp) {
                    let q = match i - b * QK {
                        0 => 0,
                        1 => levels - 1,
                        _ => rng.random_range(0..levels),
                    };
                    w[o * inp + i] = d * q as f32 + m;
                }
            }
        }
        w
    }

    /// Q4_1-style weights: per 32-block d·q + m with q ∈ 0..16.
    fn q4_weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
        grid_weights(out, inp, 16, seed)
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

    /// Every supported kernel other than the portable one; prints the paths this CPU lacks.
    fn vector_kernels(test: &str) -> Vec<Kernel> {
        let supported = Kernel::supported_list();
        let skipped: Vec<&str> = KERNEL_NAMES
            .iter()
            .copied()
            .filter(|n| !supported.iter().any(|k| k.name() == *n))
            .collect();
        eprintln!("{test}: skipped int8 kernel paths (not on this CPU): {skipped:?}");
        eprintln!(
            "{test}: checking {:?} against portable",
            supported.iter().map(|k| k.name()).collect::<Vec<_>>()
        );
        supported
            .into_iter()
            .filter(|&k| k != Kernel::Portable)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The same matrix with a larger assumed q bound: the AVX2 kernel then takes a more
    /// conservative mode (valid for any smaller q), so every mode runs on every weight kind.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn with_qmax(q: &QMatrix, qmax: u8) -> QMatrix {
        assert!(qmax >= q.qmax);
        let mut c = q.clone();
        c.qmax = qmax;
        c
    }

    /// Every vector kernel gives bitwise the portable results (and so do all AVX2 modes the
    /// matrix allows); returns the portable result.
    fn assert_kernels_agree(q: &QMatrix, x: &[f32], rows: usize, what: &str) -> Vec<f32> {
        let want = q.matmul_with(Kernel::Portable, x, rows);
        for k in Kernel::supported_list() {
            #[allow(unused_mut)]
            let mut variants = vec![q.clone()];
            #[cfg(target_arch = "x86_64")]
            if k == Kernel::Avx2 {
                variants.extend(
                    [16u8, 32, 64, 128, 255]
                        .into_iter()
                        .filter(|&b| b > q.qmax)
                        .map(|b| with_qmax(q, b)),
                );
            }
            for v in &variants {
                let got = v.matmul_with(k, x, rows);
                assert!(
                    bits(&got) == bits(&want),
                    "{what}: kernel {} (qmax {}) differs from portable: first at {:?}",
                    k.name(),
                    v.qmax,
                    got.iter()
                        .zip(&want)
                        .position(|(a, b)| a.to_bits() != b.to_bits())
                        .map(|i| (i, got[i], want[i]))
                );
            }
        }
        want
    }

    /// |y − reference| within the activation rounding (≤ s/2 per input) plus f32 noise.
    fn assert_near_reference(y: &[f32], x: &[f32], w: &[f32], rows: usize, out: usize, what: &str) {
        let inp = w.len() / out;
        let r = reference(x, w, rows, out, inp);
        for row in 0..rows {
            let xr = &x[row * inp..(row + 1) * inp];
            for o in 0..out {
                let wr = &w[o * inp..(o + 1) * inp];
                // Σ over blocks of (amax_b/254)·Σ|w|, plus relative f32 accumulation error.
                let mut tol = 0f64;
                let mut mag = 0f64;
                for (xb, wb) in xr.chunks(QK).zip(wr.chunks(QK)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    tol += amax / 254.0 * wsum;
                    mag += amax * wsum;
                }
                let tol = tol * 1.01 + mag * 1e-5 + 1e-30;
                let (a, b) = (y[row * out + o], r[row * out + o]);
                assert!(
                    ((a - b) as f64).abs() <= tol,
                    "{what}: [{row}, {o}] {a} vs {b} (tol {tol})"
                );
            }
        }
    }

    #[test]
    fn block_grid_weights_are_stored_exactly() {
        let (out, inp) = (37, 100); // ragged tiles and blocks
        let w = q4_weights(out, inp, 1);
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        assert_eq!(q.rounded_blocks(), 0);
        assert!(q.qmax <= 15);
        for (a, b) in q.dequantize().iter().zip(&w) {
            // Exact up to f32 rounding of the detected step (8-bit rounding would be ~1e-3).
            assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
        }
        // Arbitrary f32 weights are rounded to 256 levels per block.
        let f = rand_vec(out * inp, 2);
        let q = QMatrix::from_f32(&f, out, inp).unwrap();
        assert!(q.rounded_blocks() > 0);
        assert_eq!(q.qmax, 255);
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
        vector_kernels("rows_are_independent_of_the_batch_and_kernels_agree");
        let want = assert_kernels_agree(&q, &x, rows, "77 rows");
        assert_near_reference(&want, &x, &q.dequantize(), rows, out, "77 rows");
        for k in Kernel::supported_list() {
            let all = q.matmul_with(k, &x, rows);
            for r in [0, 3, 8, 13, 76] {
                let one = q.matmul_with(k, &x[r * inp..(r + 1) * inp], 1);
                assert_eq!(
                    bits(&one),
                    bits(&all[r * out..(r + 1) * out]),
                    "{} row {r}",
                    k.name()
                );
            }
        }
        // The process's kernel is one of them.
        assert!(supported_kernels().contains(&kernel_name()));
        assert_eq!(supported_kernels().last(), Some(&"portable"));
    }

    #[test]
    fn kernels_agree_bitwise_on_random_shapes() {
        vector_kernels("kernels_agree_bitwise_on_random_shapes");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let outs = [1, 7, 16, 17, 45, 100];
        let inps = [1, 31, 32, 33, 95, 200];
        #[cfg(target_arch = "x86_64")]
        let mut modes = std::collections::BTreeSet::new();
        let mut case = 0u64;
        for rows in (1..=20).chain([77]) {
            let out = outs[rng.random_range(0..outs.len())];
            let inp = inps[rng.random_range(0..inps.len())];
            // 16, 32, 64, 128 levels: the AVX2 plain modes; 129 and 256: the sign trick;
            // arbitrary f32 weights: rounded to 256 levels.
            for kind in [16, 32, 64, 128, 129, 256, 0] {
                case += 1;
                let w = if kind == 0 {
                    rand_vec(out * inp, case)
                } else {
                    grid_weights(out, inp, kind, case)
                };
                let q = QMatrix::from_f32(&w, out, inp).unwrap();
                #[cfg(target_arch = "x86_64")]
                modes.insert(format!("{:?}", avx2::Mode::for_qmax(q.qmax)));
                let mut x = rand_vec(rows * inp, 1000 + case);
                // Some all-zero and some large-magnitude blocks.
                for (i, xb) in x.chunks_mut(QK).enumerate() {
                    match i % 5 {
                        1 => xb.fill(0.0),
                        3 => xb.iter_mut().for_each(|v| *v *= 1e4),
                        _ => {}
                    }
                }
                let what = format!("{rows}×{out}×{inp} kind {kind}");
                let y = assert_kernels_agree(&q, &x, rows, &what);
                assert_near_reference(&y, &x, &q.dequantize(), rows, out, &what);
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            modes.len(),
            5,
            "every AVX2 mode met by the weights' own qmax: {modes:?}"
        );
    }

    /// The acceptance check on real weights: every packed matrix of the default model (Q4_1
    /// GGUF, fetched on first use like the other model tests) gives bitwise the same results
    /// on every path the CPU has, for activations shaped like a transformer's (a few large
    /// outliers).
    #[test]
    fn kernels_agree_bitwise_on_the_default_model() {
        vector_kernels("kernels_agree_bitwise_on_the_default_model");
        let path = crate::fetch::ensure_default(false).expect("default model");
        let loaded = crate::LoadedModel::load(
            path.to_str().expect("utf-8 path"),
            &candle_core::Device::Cpu,
        )
        .expect("load the default model");
        let qm = QuantModel::build(&loaded.model.weights).unwrap();
        let mut qmax = std::collections::BTreeMap::<u8, usize>::new();
        for (i, q) in qm.all().enumerate() {
            *qmax.entry(q.qmax).or_default() += 1;
            let rows = 5;
            let mut x = rand_vec(rows * q.in_dim(), 40 + i as u64);
            for v in x.iter_mut().step_by(97) {
                *v *= 30.0;
            }
            assert_kernels_agree(q, &x, rows, &format!("default model matrix #{i}"));
        }
        eprintln!("default model: matrices by largest q: {qmax:?}");
    }

    /// The saturation case of `vpmaddubsw`: q = 255 (and q = 0, i.e. q' = −128) against
    /// a = ±127 in every position; and q at each AVX2 mode's bound (16, 32, 64, 128), where
    /// the i16 sums come within 255 of overflowing.
    #[test]
    fn kernels_agree_on_extreme_blocks() {
        vector_kernels("kernels_agree_on_extreme_blocks");
        for top in [16, 32, 64, 128, 255] {
            extreme_blocks(top);
        }
    }

    fn extreme_blocks(top: u32) {
        let (out, inp) = (33, 100);
        let mut w = vec![0f32; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let j = i % QK;
                // q = 1 at input 1 of the first block makes the grid step d.
                let q = match (o % 4, i) {
                    (_, 0) => 0,
                    (_, 1) => 1,
                    (0, _) => top,
                    (1, _) => 0,
                    (2, _) => top * (j % 2) as u32,
                    _ => top * ((i * 7 + o) % 3 == 0) as u32,
                };
                w[o * inp + i] = 0.01 * q as f32 - 1.0;
            }
        }
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        assert_eq!(q.qmax as u32, top);
        assert_eq!(q.rounded_blocks(), 0);
        let rows = 6;
        let mut x = vec![0f32; rows * inp];
        for (i, v) in x.iter_mut().enumerate() {
            let (r, c) = (i / inp, i % inp);
            *v = match r {
                0 => -1.0,
                1 => 1.0,
                2 => [-1.0, 1.0][c % 2],
                3 => [1.0, -1.0][c % 2],
                4 => [1.0, -1.0][(c * 5 / 3) % 2],
                _ => -3.5,
            };
        }
        let act = Activations::quantize(Kernel::Portable, &x, rows, inp, q.nb);
        assert!(act.a[..QK].iter().all(|&a| a == -127));
        let what = format!("extreme blocks, q up to {top}");
        let y = assert_kernels_agree(&q, &x, rows, &what);
        assert_near_reference(&y, &x, &q.dequantize(), rows, out, &what);
    }

    #[test]
    fn activation_quantizers_agree() {
        let kernels = vector_kernels("activation_quantizers_agree");
        let mut x = rand_vec(32 * 60, 9);
        let blocks: Vec<&mut [f32]> = x.chunks_mut(QK).collect();
        for (i, xb) in blocks.into_iter().enumerate() {
            for (j, v) in xb.iter_mut().enumerate() {
                let k = j as f32 - 16.0;
                match i {
                    // Exact ties: s = 1 (amax 127), values k + 0.5 and −(k + 0.5).
                    0 => *v = if j == 0 { 127.0 } else { k + 0.5 },
                    1 => *v = if j == 0 { -127.0 } else { -(k + 0.5) },
                    // s = 2: odd integers are ties.
                    2 => *v = if j == 0 { 254.0 } else { 2.0 * k + 1.0 },
                    3 => *v = 0.0,
                    4 => *v = -0.0,
                    // Tiny values (1/s would overflow) and denormals.
                    5 => *v *= 1e-38,
                    6 => *v = if j % 3 == 0 { 1e-45 } else { 0.0 },
                    // Large values.
                    7 => *v *= 3e37,
                    // One non-zero value.
                    8 => *v = if j == 17 { -0.25 } else { 0.0 },
                    _ => *v *= (i as f32 - 30.0).exp(),
                }
            }
        }
        for xb in x.chunks_exact(QK) {
            let mut p = [0i8; QK];
            let want = quantize_act_block(xb, &mut p);
            for &k in &kernels {
                let mut v = [0i8; QK];
                // SAFETY: `kernels` are the ones this CPU supports.
                let got = unsafe { k.quantize_block(xb, &mut v) };
                assert_eq!(
                    (got.0.to_bits(), got.1, v),
                    (want.0.to_bits(), want.1, p),
                    "{} on {xb:?}",
                    k.name()
                );
            }
            let s = want.0;
            assert_eq!(want.1, p.iter().map(|&a| a as i32).sum::<i32>());
            for (&q, &v) in p.iter().zip(xb) {
                assert!(
                    (q as f32 * s - v).abs() <= s / 2.0 * 1.0001 + 1e-37,
                    "{q} {s} {v}"
                );
            }
        }
        // Ties round to even.
        let mut p = [0i8; QK];
        let xb: Vec<f32> = (0..QK)
            .map(|j| if j == 0 { 127.0 } else { j as f32 - 15.5 })
            .collect();
        quantize_act_block(&xb, &mut p);
        assert_eq!(&p[1..5], &[-14, -14, -12, -12]);
        // Tail blocks (every length) through the whole row quantizer.
        for inp in 1..=70 {
            let x = rand_vec(3 * inp, inp as u64);
            let nb = inp.div_ceil(QK);
            let want = Activations::quantize(Kernel::Portable, &x, 3, inp, nb);
            for &k in &kernels {
                let got = Activations::quantize(k, &x, 3, inp, nb);
                assert_eq!(got.a, want.a, "{} inp {inp}", k.name());
                assert_eq!(bits(&got.s), bits(&want.s), "{} inp {inp}", k.name());
                assert_eq!(bits(&got.sa), bits(&want.sa), "{} inp {inp}", k.name());
                assert_eq!(got.sum, want.sum, "{} inp {inp}", k.name());
            }
        }
    }

    #[test]
    fn kernel_choice_from_the_environment() {
        let all = Kernel::supported_list();
        let best = all[0];
        assert_eq!(Kernel::choose(None, false, &all), (best, None));
        assert_eq!(Kernel::choose(Some("auto"), false, &all), (best, None));
        assert_eq!(Kernel::choose(None, true, &all).0, Kernel::Portable);
        assert_eq!(
            Kernel::choose(Some(" Portable "), false, &all),
            (Kernel::Portable, None)
        );
        for k in &all {
            assert_eq!(Kernel::choose(Some(k.name()), true, &all), (*k, None));
        }
        // Unknown names and paths the CPU lacks: the best supported path, with a warning.
        let (k, w) = Kernel::choose(Some("neon9"), false, &all);
        assert_eq!(k, best);
        assert!(w.unwrap().contains("unknown int8 kernel"));
        let portable_only = [Kernel::Portable];
        for name in ["avx2", "avx512vnni"] {
            let (k, w) = Kernel::choose(Some(name), false, &portable_only);
            assert_eq!(k, Kernel::Portable);
            let w = w.unwrap();
            assert!(
                w.contains("does not support") && w.contains("using portable"),
                "{w}"
            );
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

    /// Timing per kernel path (not a test; no assertions on time):
    /// `cargo test --release -p lowrank-model --lib quant::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing() {
        let shapes = [(1536, 576), (576, 1536), (49152, 576)];
        let threads = rayon::current_num_threads();
        for (kind, levels) in [("q4", 16u32), ("q8", 256)] {
            for &(out, inp) in &shapes {
                let w = grid_weights(out, inp, levels, 1);
                let q = QMatrix::from_f32(&w, out, inp).unwrap();
                for rows in [1usize, 32] {
                    let x = rand_vec(rows * inp, 2);
                    let mut line = format!(
                        "{kind} qmax {:3} {out:5}×{inp:4} rows {rows:2} ({threads} threads):",
                        q.qmax
                    );
                    #[allow(unused_mut)]
                    let mut variants: Vec<(String, Kernel, QMatrix)> = Kernel::supported_list()
                        .into_iter()
                        .map(|k| (k.name().to_string(), k, q.clone()))
                        .collect();
                    #[cfg(target_arch = "x86_64")]
                    if Kernel::Avx2.supported() && q.qmax <= 128 {
                        variants.push(("avx2-sign".into(), Kernel::Avx2, with_qmax(&q, 255)));
                    }
                    for (name, k, m) in &variants {
                        let _ = m.matmul_with(*k, &x, rows);
                        let budget = std::time::Duration::from_millis(400);
                        let start = std::time::Instant::now();
                        let mut n = 0u32;
                        let mut best = f64::INFINITY;
                        while start.elapsed() < budget || n < 3 {
                            let t = std::time::Instant::now();
                            std::hint::black_box(m.matmul_with(*k, &x, rows));
                            best = best.min(t.elapsed().as_secs_f64());
                            n += 1;
                        }
                        let gops = 2.0 * (rows * out * inp) as f64 / best / 1e9;
                        line += &format!("  {name} {:8.1} µs {gops:6.1} GOP/s", best * 1e6);
                    }
                    eprintln!("{line}");
                }
            }
        }
    }
}
