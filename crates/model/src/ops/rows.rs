//! Inference attention over the new rows of a ragged batch: every row (prompt token or decode
//! step) attends over its own sequence's cached keys in one parallel pass, with
//! register-blocked kernels for common head shapes on AVX-512 ([`super::attn512`]) and on
//! AVX2 + FMA ([`super::attn256`]), and portable code elsewhere.
//!
//! Caches hold f32 or f16 ([`crate::cache::KvDtype`]); each kernel is compiled for both, and
//! widens f16 values exactly as it loads them (`vcvtph2ps`), so an f16 cache changes only
//! the rounding of K and V, once, when they are cached.
//!
//! The kernel is chosen once per process ([`AttnKernel::detect`]): the best the CPU runs, or
//! the one `LOWRANK_ATTN_KERNEL=portable|avx2|avx512` names. Without that variable a forced
//! int8 path (`LOWRANK_INT8_KERNEL`) forces the attention kernel of the same instruction set,
//! so one variable emulates an AVX2-only or a scalar CPU for tests and benchmarks.

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
    attention_rows_with(AttnKernel::detect(), q, items, num_kv_heads, scale)
}

/// [`attention_rows`] with a given kernel (tests run every kernel the CPU supports); an
/// unsupported kernel runs the portable code.
pub(crate) fn attention_rows_with(
    kernel: AttnKernel,
    q: &Tensor,
    items: &[AttnItem],
    num_kv_heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (nh, n, hd) = q.dims3()?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    // Caches hold f32 or f16, each sequence its own (a batch may mix cached sequences with
    // uncached f32 ones).
    let cpu_kv = |t: &Tensor| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F16);
    if items.is_empty()
        || !cpu_f32(q)
        || !q.is_contiguous()
        || nh % num_kv_heads != 0
        || items.iter().any(|(row, rows, k, v)| {
            !cpu_kv(k)
                || v.dtype() != k.dtype()
                || !v.device().is_cpu()
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
        let ks = (kl.start_offset(), kl.stride()[0], kl.stride()[1]);
        let vs = (vl.start_offset(), vl.stride()[0], vl.stride()[1]);
        let (len, rows, row) = (k.dim(1)?, *rows, *row);
        let kv = if let (Some(k), Some(v)) = (f32s(kst), f32s(vst)) {
            AnyKv::F32(AttnKv {
                k,
                v,
                ks,
                vs,
                len,
                rows,
                row,
            })
        } else if let (Some(k), Some(v)) = (half::f16::slice(kst), half::f16::slice(vst)) {
            AnyKv::F16(AttnKv {
                k,
                v,
                ks,
                vs,
                len,
                rows,
                row,
            })
        } else {
            return Ok(None);
        };
        kvs.push(kv);
        row_of.extend((0..rows).map(|i| (it, i)));
    }
    let shape = AttnShape {
        n,
        nkv: num_kv_heads,
        g,
        hd,
        scale: scale as f32,
    };
    let mut out = vec![0f32; row_of.len() * nh * hd];
    // One kernel per cache type for every row of the process (chosen by CPU and head shape
    // only), so a row's bits never depend on the batch.
    let (k32, k16) = (
        kernel.row_kernel::<f32>(g, hd),
        kernel.row_kernel::<half::f16>(g, hd),
    );
    out.par_chunks_mut(nh * hd)
        .zip(&row_of)
        .for_each(|(o, &(it, i))| match &kvs[it] {
            AnyKv::F32(kv) => run_row(k32, qv, kv, i, &shape, o),
            AnyKv::F16(kv) => run_row(k16, qv, kv, i, &shape, o),
        });
    drop(guards);
    drop(qs);
    Ok(Some(Tensor::from_vec(
        out,
        (row_of.len(), nh * hd),
        q.device(),
    )?))
}

/// One sequence's cache in either element type.
enum AnyKv<'a> {
    F32(AttnKv<'a, f32>),
    F16(AttnKv<'a, half::f16>),
}

/// Row i of a sequence with the chosen kernel, or the portable code (`None`).
#[inline(always)]
fn run_row<E: KvElem>(
    kernel: Option<RowKernel<E>>,
    qv: &[f32],
    kv: &AttnKv<E>,
    i: usize,
    s: &AttnShape,
    o: &mut [f32],
) {
    match kernel {
        // SAFETY: `AttnKernel::row_kernel` hands out a kernel only when the CPU has its
        // instruction set; the shapes and strides were checked by `attention_rows_with`, and
        // the kernels index the slices with bounds checks.
        Some(k) => unsafe { k(qv, kv, i, s, o) },
        None => attend_row(qv, kv, i, s, o),
    }
}

/// Element type of a KV cache the row kernels read: f32, or f16 (llama.cpp's default cache
/// type: half the bytes per cached token). Values are widened to f32 exactly on load, so
/// every kernel does the same arithmetic on either.
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    /// The cache's elements, if the storage holds this type.
    fn slice(s: &candle_core::Storage) -> Option<&[Self]>;
    /// `row` as f32: itself for f32 (no copy, `buf` untouched), else widened into `buf`.
    fn widen<'a>(row: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
    /// 8 values from `p` as f32.
    ///
    /// # Safety
    /// 8 elements are readable at `p`; the CPU has AVX2 and F16C (inlined into such kernels).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// 16 values from `p` as f32.
    ///
    /// # Safety
    /// 16 elements are readable at `p`; the CPU has AVX-512F (inlined into such kernels).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn slice(s: &candle_core::Storage) -> Option<&[f32]> {
        f32s(s)
    }

    #[inline(always)]
    fn widen<'a>(row: &'a [f32], _buf: &'a mut Vec<f32>) -> &'a [f32] {
        row
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    fn slice(s: &candle_core::Storage) -> Option<&[half::f16]> {
        match s {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => Some(v.as_slice()),
            _ => None,
        }
    }

    #[inline(always)]
    fn widen<'a>(row: &'a [half::f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(row.len(), 0.0);
        for (b, x) in buf.iter_mut().zip(row) {
            *b = x.to_f32();
        }
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// The attention row kernels: one per instruction set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AttnKernel {
    Portable,
    /// AVX2 + FMA ([`super::attn256`]).
    Avx2,
    /// AVX-512F ([`super::attn512`]).
    Avx512,
}

/// Names `LOWRANK_ATTN_KERNEL` accepts (on every architecture).
const ATTN_KERNEL_NAMES: [&str; 3] = ["avx512", "avx2", "portable"];

impl AttnKernel {
    pub fn name(self) -> &'static str {
        match self {
            AttnKernel::Portable => "portable",
            AttnKernel::Avx2 => "avx2",
            AttnKernel::Avx512 => "avx512",
        }
    }

    fn by_name(name: &str) -> Option<AttnKernel> {
        match name {
            "portable" => Some(AttnKernel::Portable),
            "avx2" => Some(AttnKernel::Avx2),
            "avx512" => Some(AttnKernel::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU runs the kernel.
    pub fn supported(self) -> bool {
        match self {
            AttnKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            AttnKernel::Avx2 => {
                crate::isa::Isa::Avx2.allowed()
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            AttnKernel::Avx512 => {
                crate::isa::Isa::Avx512.allowed() && is_x86_feature_detected!("avx512f")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Supported kernels, best first; the portable one is always last.
    pub fn supported_list() -> Vec<AttnKernel> {
        [AttnKernel::Avx512, AttnKernel::Avx2, AttnKernel::Portable]
            .into_iter()
            .filter(|k| k.supported())
            .collect()
    }

    /// The kernel of this process, decided once (see the module docs for the variables). An
    /// unknown name or a kernel the CPU cannot run prints one warning and the best runs.
    pub fn detect() -> AttnKernel {
        static K: std::sync::OnceLock<AttnKernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            let own = std::env::var("LOWRANK_ATTN_KERNEL").ok();
            let own = own
                .map(|v| v.trim().to_ascii_lowercase())
                .filter(|v| !v.is_empty());
            // A forced int8 path names an instruction set; follow it unless told otherwise.
            let int8 = std::env::var("LOWRANK_INT8_KERNEL").ok().and_then(|v| {
                match v.trim().to_ascii_lowercase().as_str() {
                    "avx512vnni" => Some("avx512".to_string()),
                    n @ ("avx2" | "portable") => Some(n.to_string()),
                    _ => None,
                }
            });
            let (k, warning) =
                AttnKernel::choose(own.or(int8).as_deref(), &AttnKernel::supported_list());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            k
        })
    }

    /// The choice [`AttnKernel::detect`] makes for a requested name and the supported kernels
    /// (best first), with the warning to print, if any.
    fn choose(requested: Option<&str>, supported: &[AttnKernel]) -> (AttnKernel, Option<String>) {
        let best = supported.first().copied().unwrap_or(AttnKernel::Portable);
        let names = |ks: &[AttnKernel]| ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
        match requested {
            None | Some("auto") => (best, None),
            Some(name) => match AttnKernel::by_name(name) {
                Some(k) if supported.contains(&k) => (k, None),
                Some(_) => (
                    best,
                    Some(format!(
                        "attention kernel {name}: this CPU does not support it (supported: {}); using {}",
                        names(supported),
                        best.name()
                    )),
                ),
                None => (
                    best,
                    Some(format!(
                        "LOWRANK_ATTN_KERNEL={name}: unknown attention kernel (expected one of {}, auto); using {}",
                        ATTN_KERNEL_NAMES.join(", "),
                        best.name()
                    )),
                ),
            },
        }
    }

    /// The row kernel for g query heads per KV head and head_dim hd; `None`: the portable
    /// code ([`attend_row`]), also for a kernel this CPU cannot run.
    fn row_kernel<E: KvElem>(self, g: usize, hd: usize) -> Option<RowKernel<E>> {
        if !self.supported() {
            return None;
        }
        match self {
            AttnKernel::Portable => None,
            #[cfg(target_arch = "x86_64")]
            AttnKernel::Avx2 => Some(super::attn256::pick::<E>(g, hd)),
            #[cfg(target_arch = "x86_64")]
            AttnKernel::Avx512 => Some(super::attn512::pick::<E>(g, hd)),
            #[cfg(not(target_arch = "x86_64"))]
            _ => {
                let _ = (g, hd);
                None
            }
        }
    }
}

/// dst[j] = e^(a·src[j] + b), with a·src[j] + b ≤ 0 up to rounding (rows of a softmax);
/// returns Σ dst. The vector exp of the process's attention kernel, else libm's.
pub(crate) fn exp_affine(dst: &mut [f32], src: &[f32], a: f32, b: f32) -> f32 {
    assert_eq!(
        dst.len(),
        src.len(),
        "exp_affine: slices of different lengths"
    );
    match AttnKernel::detect() {
        // SAFETY: `detect` picks only kernels the CPU supports; the lengths are equal.
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx512 => unsafe { super::attn512::exp_affine(dst, src, a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx2 => unsafe { super::attn256::exp_affine(dst, src, a, b) },
        _ => {
            let mut sum = 0f32;
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = (a * x + b).exp();
                sum += *d;
            }
            sum
        }
    }
}

/// dst[j] = σ(src[j]) = 1/(1 + e^(−src[j])) by the vector exp of the process's attention
/// kernel, else libm's. SwiGLU's forward and backward take σ of every gate value: with libm's
/// scalar `expf` that was 2.2 % of an int8 training step on an AVX-512 CPU. Where x is NaN
/// the vector paths give 1 and libm NaN; the callers multiply by x either way.
pub(crate) fn sigmoid_into(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "sigmoid: slices of different lengths");
    match AttnKernel::detect() {
        // SAFETY: `detect` picks only kernels the CPU supports.
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx512 => unsafe { super::attn512::sigmoid(dst, src) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx2 => unsafe { super::attn256::sigmoid(dst, src) },
        _ => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = 1.0 / (1.0 + (-x).exp());
            }
        }
    }
}

/// row[j] = e^(row[j] − shift) in place, for shift ≥ max(row) (a softmax row); returns
/// Σ row[j] summed in f64 (per 1024 values, then across them). The vector exp of [`exp_affine`], through an
/// L1-resident copy of 1024 values at a time. The training loss exponentiates 49152 logits per
/// token with it: with libm's scalar `expf` that was 2.5 % of an f32 step on an AVX2 CPU.
pub fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f64 {
    let mut tmp = [0f32; 1024];
    let mut sum = 0f64;
    for c in row.chunks_mut(tmp.len()) {
        let t = &mut tmp[..c.len()];
        t.copy_from_slice(c);
        exp_affine(c, t, 1.0, -shift);
        sum += c.iter().map(|&e| e as f64).sum::<f64>();
    }
    sum
}

/// The attention kernel this process uses: `"avx512"`, `"avx2"` or `"portable"`.
pub fn attention_kernel_name() -> &'static str {
    AttnKernel::detect().name()
}

/// The attention kernels this CPU runs, best first.
pub fn supported_attention_kernels() -> Vec<&'static str> {
    AttnKernel::supported_list()
        .iter()
        .map(|k| k.name())
        .collect()
}

/// One sequence's cache as slices for [`attention_rows`].
pub(super) struct AttnKv<'a, E> {
    pub(super) k: &'a [E],
    pub(super) v: &'a [E],
    /// start offset, head stride, position stride (K then V)
    pub(super) ks: (usize, usize, usize),
    pub(super) vs: (usize, usize, usize),
    pub(super) len: usize,
    pub(super) rows: usize,
    pub(super) row: usize,
}

pub(super) struct AttnShape {
    /// Rows of q ([nh, n, hd]).
    pub(super) n: usize,
    pub(super) nkv: usize,
    /// Query heads per KV head.
    pub(super) g: usize,
    pub(super) hd: usize,
    pub(super) scale: f32,
}

/// The register-blocked `$row::<G, C>` for g ≤ 4 query heads per KV head and head_dim 64
/// (C = `$c64` vectors) or 128 (`$c128`), else `$generic`: one shape table for every
/// instruction set's kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))] // the x86 kernels' table
macro_rules! pick_row_kernel {
    ($row:ident, $generic:ident, $e:ty, $g:expr, $hd:expr, $c64:literal, $c128:literal) => {
        match ($g, $hd) {
            (1, 64) => $row::<$e, 1, $c64>,
            (2, 64) => $row::<$e, 2, $c64>,
            (3, 64) => $row::<$e, 3, $c64>,
            (4, 64) => $row::<$e, 4, $c64>,
            (1, 128) => $row::<$e, 1, $c128>,
            (2, 128) => $row::<$e, 2, $c128>,
            (3, 128) => $row::<$e, 3, $c128>,
            (4, 128) => $row::<$e, 4, $c128>,
            _ => $generic::<$e>,
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use pick_row_kernel;

/// A row kernel of [`attention_rows`]: one row's every head into `o` ([nh·hd]).
///
/// # Safety
/// The CPU supports the kernel's instruction set; `kv` and the shape describe `q` and the
/// cache as [`attention_rows`] checks them.
pub(super) type RowKernel<E> = unsafe fn(&[f32], &AttnKv<E>, usize, &AttnShape, &mut [f32]);

/// Row i of a sequence: every head's softmax(q·Kᵀ·scale)·V over keys 0..=p. o: [nh·hd].
#[inline(always)]
pub(super) fn attend_row<E: KvElem>(
    qv: &[f32],
    kv: &AttnKv<E>,
    i: usize,
    s: &AttnShape,
    o: &mut [f32],
) {
    let (g, hd) = (s.g, s.hd);
    let mut buf = Vec::new(); // one cached row widened to f32 (never allocated for f32 caches)
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
            let krow = E::widen(&kv.k[off..off + hd], &mut buf);
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
            let vrow = E::widen(&kv.v[off..off + hd], &mut buf);
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
        // Every kernel this CPU runs; the others are named as skipped.
        let supported = AttnKernel::supported_list();
        for k in [AttnKernel::Avx512, AttnKernel::Avx2, AttnKernel::Portable] {
            if !supported.contains(&k) {
                eprintln!(
                    "attention kernel {}: skipped (this CPU cannot run it)",
                    k.name()
                );
                continue;
            }
            for (nh, nkv, hd) in [(6, 2, 8), (9, 3, 64), (4, 4, 128), (8, 2, 64), (16, 4, 128)] {
                // f32 caches, f16 caches, and a batch mixing both (cached f16 sequences
                // beside uncached f32 ones).
                use DType::{F16, F32};
                for kv in [[F32; 4], [F16; 4], [F16, F32, F32, F16]] {
                    attention_case(k, nh, nkv, hd, kv);
                }
            }
        }
    }

    /// `kv`: each sequence's cache dtype (f16 caches are compared with the naive attention
    /// over their values widened to f32).
    fn attention_case(kernel: AttnKernel, nh: usize, nkv: usize, hd: usize, kv: [DType; 4]) {
        let d = Device::Cpu;
        let g = nh / nkv;
        // (cached, new) tokens per sequence.
        // Lengths with and without a tail of a vector's width.
        let seqs = [(5usize, 3usize), (9, 1), (0, 4), (30, 3)];
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let q = Tensor::randn(0f32, 1.0, (nh, n, hd), &d).unwrap();
        let kvs: Vec<(Tensor, Tensor)> = seqs
            .iter()
            .zip(kv)
            .map(|(&(c, t), kv)| {
                // A cache buffer with spare capacity, viewed up to its length (as KvCache does).
                let k = Tensor::randn(0f32, 1.0, (nkv, c + t + 4, hd), &d).unwrap();
                let v = Tensor::randn(0f32, 1.0, (nkv, c + t + 4, hd), &d).unwrap();
                let (k, v) = (k.to_dtype(kv).unwrap(), v.to_dtype(kv).unwrap());
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
        let got = attention_rows_with(kernel, &q, &items, nkv, scale)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let qv = q.to_vec3::<f32>().unwrap();
        let mut r = 0;
        for (si, (&(c, t), (k, v))) in seqs.iter().zip(&kvs).enumerate() {
            let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
            let (k, v) = (widen(k), widen(v));
            for i in 0..t {
                for h in 0..nh {
                    let want = naive(&qv[h][r + i], &k[h / g], &v[h / g], c + i);
                    for (dd, w) in want.iter().enumerate() {
                        let x = got[r + i][h * hd + dd] as f64;
                        assert!(
                            (x - w).abs() < 1e-5,
                            "{kernel:?} {kv:?} seq {si} row {i} head {h}: {x} vs {w}"
                        );
                    }
                }
            }
            // The same sequence alone (its q rows only): the same bits.
            let qs = q.narrow(1, r, t).unwrap().contiguous().unwrap();
            let alone = attention_rows_with(
                kernel,
                &qs,
                &[(0, t, items[si].2.clone(), items[si].3.clone())],
                nkv,
                scale,
            )
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
            assert_eq!(
                alone,
                got[r..r + t].to_vec(),
                "{kernel:?} {kv:?} seq {si} alone"
            );
            r += t;
        }
    }

    /// The vector exp of each SIMD kernel this CPU runs (the others named as skipped) is
    /// within 4e-7 of f64's over the softmax range, and clamps far below it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_a_few_ulps() {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn run512(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            let e = super::super::attn512::exp(_mm512_loadu_ps(x.as_ptr()));
            _mm512_storeu_ps(out.as_mut_ptr(), e);
            out
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run256(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            for h in 0..2 {
                let e = super::super::attn256::exp(_mm256_loadu_ps(x.as_ptr().add(8 * h)));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), e);
            }
            out
        }
        type Run16 = unsafe fn(&[f32; 16]) -> [f32; 16];
        let kernels: [(AttnKernel, Run16); 2] =
            [(AttnKernel::Avx512, run512), (AttnKernel::Avx2, run256)];
        let mut ran = 0;
        for (k, run) in kernels {
            if !k.supported() {
                eprintln!("vector exp {}: skipped (this CPU cannot run it)", k.name());
                continue;
            }
            ran += 1;
            let mut worst = 0f64;
            for i in 0..20_000 {
                let x: [f32; 16] =
                    std::array::from_fn(|l| -((i * 16 + l) as f32) * 85.0 / 320_000.0);
                // SAFETY: the CPU supports the kernel (checked above).
                let got = unsafe { run(&x) };
                for (g, x) in got.iter().zip(&x) {
                    let want = (*x as f64).exp();
                    worst = worst.max((*g as f64 - want).abs() / want);
                }
            }
            assert!(worst < 4e-7, "{}: worst relative error {worst}", k.name());
            // Far below the range: clamps to a tiny positive value instead of NaN/denormals.
            // SAFETY: as above.
            let tiny = unsafe { run(&[-1e30; 16]) };
            assert!(tiny.iter().all(|v| *v >= 0.0 && *v < 1e-37), "{}", k.name());
        }
        eprintln!("vector exp checked on {ran} SIMD kernel(s)");
    }

    /// The training softmax's e^(a·x + b) over whole rows: every SIMD kernel this CPU runs
    /// (the others named as skipped), every tail length, against f64; the sum is the rows'.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_affine_covers_every_tail() {
        type Run = unsafe fn(&mut [f32], &[f32], f32, f32) -> f32;
        let kernels: [(AttnKernel, Run); 2] = [
            (AttnKernel::Avx512, super::super::attn512::exp_affine),
            (AttnKernel::Avx2, super::super::attn256::exp_affine),
        ];
        for (k, run) in kernels {
            if !k.supported() {
                eprintln!("exp_affine {}: skipped (this CPU cannot run it)", k.name());
                continue;
            }
            for n in 1..=41 {
                let src: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.37 + 1.5).collect();
                let (a, b) = (0.7f32, -1.05f32);
                let mut dst = vec![f32::NAN; n];
                // SAFETY: the CPU supports the kernel; equal lengths.
                let sum = unsafe { run(&mut dst, &src, a, b) };
                let mut want_sum = 0f64;
                for (d, x) in dst.iter().zip(&src) {
                    let want = (a as f64 * *x as f64 + b as f64).exp();
                    want_sum += want;
                    assert!(
                        ((*d as f64) - want).abs() <= 1e-6 * want,
                        "{} n={n}: {d} vs {want}",
                        k.name()
                    );
                }
                assert!(
                    ((sum as f64) - want_sum).abs() <= 1e-5 * want_sum,
                    "{} n={n}: sum",
                    k.name()
                );
            }
        }
    }

    /// SwiGLU's σ(x) on each SIMD kernel this CPU runs (the others named as skipped) and the
    /// dispatching function, every tail length, both signs and far tails: within 1e-6 of
    /// f64's (relative, and absolute near 0), and exactly 1 / tiny positive far out.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_sigmoid_covers_both_signs_and_every_tail() {
        type Run = unsafe fn(&mut [f32], &[f32]);
        // SAFETY (of the dispatcher's entry): it checks the CPU itself.
        unsafe fn dispatched(dst: &mut [f32], src: &[f32]) {
            super::sigmoid_into(dst, src)
        }
        let kernels: [(&str, bool, Run); 3] = [
            (
                "avx512",
                AttnKernel::Avx512.supported(),
                super::super::attn512::sigmoid,
            ),
            (
                "avx2",
                AttnKernel::Avx2.supported(),
                super::super::attn256::sigmoid,
            ),
            ("dispatched", true, dispatched),
        ];
        for (name, supported, run) in kernels {
            if !supported {
                eprintln!("sigmoid {name}: skipped (this CPU cannot run it)");
                continue;
            }
            for n in (1..=41).chain([1000]) {
                let src: Vec<f32> = (0..n)
                    .map(|i| (i as f32 - n as f32 / 2.0) * 40.0 / n as f32 + 0.013)
                    .collect();
                let mut dst = vec![f32::NAN; n];
                // SAFETY: the CPU supports the kernel; equal lengths.
                unsafe { run(&mut dst, &src) };
                for (d, x) in dst.iter().zip(&src) {
                    let want = 1.0 / (1.0 + (-(*x as f64)).exp());
                    assert!(
                        ((*d as f64) - want).abs() <= 1e-6 * want.max(1e-3),
                        "{name} n={n}: σ({x}) = {d} vs {want}"
                    );
                }
            }
            let far = [100.0f32, -100.0, 0.0, -0.0, f32::INFINITY];
            let mut got = [f32::NAN; 5];
            // SAFETY: as above.
            unsafe { run(&mut got, &far) };
            assert_eq!(got[0], 1.0, "{name}");
            assert!(
                got[1] >= 0.0 && got[1] < 1e-37,
                "{name}: σ(−100) = {}",
                got[1]
            );
            assert_eq!((got[2], got[3], got[4]), (0.5, 0.5, 1.0), "{name}");
        }
    }

    /// The loss's in-place exp over rows longer than its 1024-value copy (and with every kind
    /// of tail): each value within f32 exp accuracy of f64's, the f64 sum the values' own.
    #[test]
    fn shifted_exp_in_place_covers_long_rows() {
        for n in [1, 7, 1023, 1024, 1025, 3000, 49152] {
            // Logits of both signs, so the shift (the row's max) is not zero.
            let row: Vec<f32> = (0..n)
                .map(|i| 3.7 - ((i * 7919) % 613) as f32 * 0.031)
                .collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut got = row.clone();
            let sum = super::exp_shifted_in_place(&mut got, max);
            let mut want_sum = 0f64;
            for (i, (g, x)) in got.iter().zip(&row).enumerate() {
                let want = (*x as f64 - max as f64).exp();
                assert!(
                    (*g as f64 - want).abs() <= 4e-7 * want,
                    "n={n} [{i}]: {g} vs {want}"
                );
                want_sum += *g as f64;
            }
            // The values' own sum in f64 (per 1024-value chunk, then across chunks).
            assert!(
                (sum - want_sum).abs() <= 1e-13 * want_sum,
                "n={n}: sum {sum} vs {want_sum}"
            );
        }
    }

    /// The environment's request picks a supported kernel, and an unsupported or unknown one
    /// falls back to the best with a warning.
    #[test]
    fn forced_attention_kernel_is_honoured_or_warned() {
        use AttnKernel::*;
        let all = [Avx512, Avx2, Portable];
        assert_eq!(AttnKernel::choose(None, &all), (Avx512, None));
        assert_eq!(AttnKernel::choose(Some("avx2"), &all), (Avx2, None));
        assert_eq!(AttnKernel::choose(Some("portable"), &all), (Portable, None));
        let (k, w) = AttnKernel::choose(Some("avx512"), &[Avx2, Portable]);
        assert_eq!(k, Avx2);
        assert!(w.unwrap().contains("does not support"));
        let (k, w) = AttnKernel::choose(Some("neon9"), &[Portable]);
        assert_eq!(k, Portable);
        assert!(w.unwrap().contains("unknown"));
    }
}
