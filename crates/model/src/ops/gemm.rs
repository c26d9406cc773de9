//! f32 matrix products with a frozen weight on AVX2 + FMA or AVX-512: C = A·B, B a
//! row-major weight read either as it is (`dX = dY·W`) or transposed (`y = x·Wᵀ`).
//!
//! Why our own: an f32 training step is ≈ 91–95 % such products, and candle's gemm (the
//! `gemm` crate) reached 55–75 % of one core's FMA peak on them on an AVX2-only AMD EPYC and
//! 1.6× that on two cores (`cargo run --release -p lowrank-model --example step_gemms`),
//! and 55–83 % of the two cores' peak on an AVX-512 EPYC (`--example f32_gemm`).
//! This is the usual blocked design (Goto / BLIS): a register tile of accumulators (6 × 16
//! in twelve ymm registers, or 12 × 32 in twenty-four zmm); the weight packed a KC × NC
//! block at a time (in L2) into panels as wide as the tile; the activations read in place,
//! a tile's rows at a time; the threads splitting C's columns, so each packs only its own
//! part of the weight and none waits for another. Packing copies the weight once per call,
//! small next to 2·m·k·n FLOPs for the shapes training has (m ≥ 128 rows); below
//! [`MIN_ROWS`] rows candle's path runs. With the AVX2 kernel a 4 × 128 step's products ran
//! 1.15–1.22× as fast as with candle's on the AVX2 EPYC, with the AVX-512 one 1.22× on the
//! AVX-512 EPYC (each shape 1.1–1.4×, 370–430 GFLOP/s on two cores).
//!
//! Results are not bitwise equal to candle's (another summation order); tests bound the
//! difference against an f64 product. `LOWRANK_F32_GEMM=candle|avx2|avx512` forces a path.

// The blocking constants, the column tasks and the packing buffer serve the x86 kernels only;
// elsewhere every product takes candle's path (an aarch64 build compiles them unused).
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_macros)
)]

#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Rows of x from which [`matmul_frozen`] runs [`gemm_f32`]: with fewer, repacking the
/// weight on every call costs more than the product (decoding a few rows takes candle's
/// path, see `ops::plain_linear`).
pub const MIN_ROWS: usize = 64;

/// Rows of C one micro-kernel call computes.
const MR: usize = 6;
/// Columns of C one micro-kernel call computes (two ymm registers).
const NR: usize = 16;
/// Depth of one packed block: a 16-column panel of B (20 KiB) stays in L1.
const KC: usize = 320;
/// Rows of A one pass over a packed block takes (144 × 320 × 4 = 180 KiB, from L2 or L3).
const MC: usize = 144;
/// Columns of B packed at a time (per thread): 320 × 256 × 4 = 320 KiB, written and read
/// in L2 (a block of 1024 columns went to L3, and packing it was ≈ 2× slower).
const NC: usize = 256;
/// The deepest packed block of any kernel.
const KC_MAX: usize = KC;

/// How B is stored: a row-major weight W read as B = W (`Rows`: B[k][n] = w[k·n_dim + n])
/// or as B = Wᵀ (`Cols`: B[k][n] = w[n·k_dim + k]).
#[derive(Clone, Copy, Debug)]
pub enum BLayout {
    Rows,
    Cols,
}

/// The f32 product path: chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// candle's matmul (the `gemm` crate; its own AVX-512 path where the CPU has one).
    Candle,
    /// This module's AVX2 + FMA kernel (6 × 16 tile of ymm registers).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// This module's AVX-512 kernel (12 × 32 tile of zmm registers), same blocking.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl GemmKernel {
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Candle => "candle",
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx512 => "avx512",
        }
    }

    /// Whether this path is one of this module's kernels (not candle's matmul).
    pub fn is_own(self) -> bool {
        self != GemmKernel::Candle
    }

    /// The paths this CPU runs (and `LOWRANK_ISA` allows), widest first; candle's, last, is
    /// always among them.
    pub fn supported_list() -> Vec<GemmKernel> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx512,
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx2,
            GemmKernel::Candle,
        ];
        all.into_iter().filter(|k| k.supported()).collect()
    }

    fn supported(self) -> bool {
        match self {
            GemmKernel::Candle => true,
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx2 => {
                Isa::Avx2.allowed()
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            GemmKernel::Avx512 => {
                Isa::Avx512.allowed()
                    && GemmKernel::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
            }
        }
    }

    /// The default on this CPU: our widest kernel that runs here, else candle.
    fn auto() -> GemmKernel {
        GemmKernel::supported_list()[0]
    }

    /// The choice from `LOWRANK_F32_GEMM`'s value, with the warning to print, if any.
    fn choose(forced: Option<&str>) -> (GemmKernel, Option<String>) {
        let auto = GemmKernel::auto();
        let pick = match forced.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => return (auto, None),
            Some("candle") => Some(GemmKernel::Candle),
            #[cfg(target_arch = "x86_64")]
            Some("avx2") => Some(GemmKernel::Avx2),
            #[cfg(target_arch = "x86_64")]
            Some("avx512") => Some(GemmKernel::Avx512),
            _ => None,
        };
        match pick {
            Some(k) if k.supported() => (k, None),
            Some(k) => (
                auto,
                Some(format!(
                    "LOWRANK_F32_GEMM={}: this CPU cannot run it; using {}",
                    k.name(),
                    auto.name()
                )),
            ),
            None => (
                auto,
                Some(format!(
                    "LOWRANK_F32_GEMM={}: unknown (candle, avx2, avx512); using {}",
                    forced.unwrap_or_default(),
                    auto.name()
                )),
            ),
        }
    }

    /// This process's path, decided once (`LOWRANK_F32_GEMM=candle|avx2|avx512` forces one; a
    /// path the CPU cannot run or an unknown name prints one warning and the default runs).
    pub fn detect() -> GemmKernel {
        static K: std::sync::OnceLock<GemmKernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            let forced = std::env::var("LOWRANK_F32_GEMM").ok();
            let (k, warning) = GemmKernel::choose(forced.as_deref());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            k
        })
    }
}

/// x·Wᵀ (`Cols`: W [n, k]) or x·W (`Rows`: W [k, n]) for x [m, k] and a frozen f32 weight
/// W, on this process's f32 path ([`GemmKernel::detect`]). candle's matmul takes other
/// devices and dtypes, a non-contiguous W, fewer than [`MIN_ROWS`] rows, and mismatched
/// shapes (whose error it reports). x: [m, k] → [m, n]
pub fn matmul_frozen(x: &Tensor, w: &Tensor, layout: BLayout) -> candle_core::Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if GemmKernel::detect().is_own() {
        if let Some(y) = matmul_own(x, w, layout)? {
            return Ok(y);
        }
    }
    match layout {
        BLayout::Cols => x.matmul(&w.t()?),
        BLayout::Rows => x.matmul(w),
    }
}

/// [`matmul_frozen`] as a row-major vector [m·n] in `c`, its contents replaced (for a
/// caller that works on the floats in place: no tensor, and no copy out of one, on our
/// path, which writes into c's allocation where it is big enough). The f32 loss's head
/// chunks (256 × 49152 logits) share one 50 MB buffer so: a fresh one per chunk was handed
/// back to the OS when the last was dropped, then faulted in and cleared page by page by
/// the kernel (1 % of an f32 step on a 2-core EPYC, `perf record`).
pub fn matmul_frozen_into(
    x: &Tensor,
    w: &Tensor,
    layout: BLayout,
    c: &mut Vec<f32>,
) -> candle_core::Result<()> {
    #[cfg(target_arch = "x86_64")]
    if GemmKernel::detect().is_own() && tensor_product_own_into(x, w, layout, c)?.is_some() {
        return Ok(());
    }
    *c = matmul_frozen(x, w, layout)?.flatten_all()?.to_vec1()?;
    Ok(())
}

/// a·b for a [B, m, k] and b [B, k, n] (candle's batched matmul) on this process's f32
/// path: the blockwise training attention's products (q·kᵀ, p·v and their gradients),
/// whose B is a view of a row-major matrix (k's or v's rows of a span: `Cols` or `Rows`)
/// and whose A is one too, or its transpose (pᵀ·dO, dSᵀ·q). On an AVX2-only EPYC this ran
/// each of them 1.2–1.7× as fast as candle's gemm (`cargo run --release -p lowrank-model
/// --example attn_bmm`). Other devices, dtypes and layouts, and fewer than [`MIN_ROWS`]
/// rows take candle's matmul.
/// a: [B, m, k], b: [B, k, n] → [B, m, n]
pub fn bmm(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if GemmKernel::detect().is_own() {
        if let Some(c) = bmm_own(GemmKernel::detect(), a, b)? {
            return Ok(c);
        }
    }
    a.matmul(b)
}

/// [`bmm`] on our `kernel`, or `None` where candle's path must take it.
#[cfg(target_arch = "x86_64")]
fn bmm_own(kernel: GemmKernel, a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 3;
    if !f32_cpu(a) || !f32_cpu(b) {
        return Ok(None);
    }
    let ((nb, m, k), (nb2, k2, n)) = (a.dims3()?, b.dims3()?);
    if nb != nb2 || k != k2 || nb == 0 || k == 0 {
        return Ok(None);
    }
    let (sa, sb) = (a.stride(), b.stride());
    // A read in place: rows of a row-major matrix, or (pᵀ·dO, dSᵀ·Q) the transpose of
    // one, read column-wise by the kernel (taken instead as (dOᵀ·p)ᵀ, with dOᵀ and the
    // result copied, it had run at 0.8–0.9× candle's speed).
    let (at, lda) = match (sa[1], sa[2]) {
        (r, 1) if r >= k => (false, r),
        (1, r) if r >= m => (true, r),
        _ => return Ok(None),
    };
    if m < MIN_ROWS {
        return Ok(None);
    }
    // B as a view of row-major rows: [k rows of n] (`Rows`) or [n rows of k] (`Cols`).
    let layout = match (sb[1], sb[2]) {
        (r, 1) if r == n || k == 1 => BLayout::Rows,
        (1, r) if r == k || n == 1 => BLayout::Cols,
        _ => return Ok(None),
    };
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (Some(av), Some(bv)) = (super::f32s(&as_), super::f32s(&bs)) else {
        return Ok(None);
    };
    let per_c = m * n;
    let a_len = match at {
        false => (m - 1) * lda + k,
        true => (k - 1) * lda + m,
    };
    let mut c: Vec<f32> = Vec::with_capacity(nb * per_c);
    for i in 0..nb {
        let a0 = al.start_offset() + i * sa[0];
        let b0 = bl.start_offset() + i * sb[0];
        let (ai, bi) = (&av[a0..][..a_len], &bv[b0..][..k * n]);
        // SAFETY: c has room for nb·m·n floats; this call writes batch i's m rows of n
        // (row stride n) from i·m·n, every one of them.
        unsafe {
            let ci = c.as_mut_ptr().add(i * per_c);
            match at {
                false => gemm_raw_on::<false>(kernel, m, n, k, ai, lda, bi, layout, ci, n, false),
                true => gemm_raw_on::<true>(kernel, m, n, k, ai, lda, bi, layout, ci, n, false),
            }
        };
    }
    // SAFETY: the loop wrote all nb·m·n floats.
    unsafe { c.set_len(nb * per_c) };
    drop((as_, bs));
    Ok(Some(Tensor::from_vec(c, (nb, m, n), a.device())?))
}

/// [`matmul_frozen`] on [`gemm_f32`], or `None` where candle's path must take it.
#[cfg(target_arch = "x86_64")]
fn matmul_own(x: &Tensor, w: &Tensor, layout: BLayout) -> candle_core::Result<Option<Tensor>> {
    let m = x.dim(0)?;
    tensor_product_own(x, w, layout)?
        .map(|(c, n)| Tensor::from_vec(c, (m, n), x.device()))
        .transpose()
}

/// [`product_own`] of a tensor x [m, k]: C's m·n floats and n.
#[cfg(target_arch = "x86_64")]
fn tensor_product_own(
    x: &Tensor,
    w: &Tensor,
    layout: BLayout,
) -> candle_core::Result<Option<(Vec<f32>, usize)>> {
    let mut c = Vec::new();
    Ok(tensor_product_own_into(x, w, layout, &mut c)?.map(|n| (c, n)))
}

/// [`tensor_product_own`] into `c` (see [`product_own_into`]).
#[cfg(target_arch = "x86_64")]
fn tensor_product_own_into(
    x: &Tensor,
    w: &Tensor,
    layout: BLayout,
    c: &mut Vec<f32>,
) -> candle_core::Result<Option<usize>> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2) {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Some(xv) = super::f32s(&xs) else {
        return Ok(None);
    };
    product_own_into(&xv[xl.start_offset()..][..m * k], m, k, w, layout, c)
}

/// x·Wᵀ or x·W (by `layout`) for x given as m rows of k floats, on this process's f32 path:
/// the product's m·n floats and n, or `None` where candle's path must take it (another
/// path, fewer than [`MIN_ROWS`] rows, W not a contiguous f32 CPU matrix with k on the
/// product's inner side).
pub fn product_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Tensor,
    layout: BLayout,
) -> candle_core::Result<Option<(Vec<f32>, usize)>> {
    #[cfg(target_arch = "x86_64")]
    if GemmKernel::detect().is_own() {
        return product_own(x, m, k, w, layout);
    }
    let _ = (x, m, k, w, layout);
    Ok(None)
}

/// [`product_f32`] on [`gemm_f32`].
#[cfg(target_arch = "x86_64")]
fn product_own(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Tensor,
    layout: BLayout,
) -> candle_core::Result<Option<(Vec<f32>, usize)>> {
    let mut c = Vec::new();
    Ok(product_own_into(x, m, k, w, layout, &mut c)?.map(|n| (c, n)))
}

/// [`product_own`] into `c`: its contents replaced by the m·n floats (its allocation kept
/// where big enough), returning n; `None` (c untouched) where candle's path must take it.
#[cfg(target_arch = "x86_64")]
fn product_own_into(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Tensor,
    layout: BLayout,
    c: &mut Vec<f32>,
) -> candle_core::Result<Option<usize>> {
    let plain = w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2;
    if !plain || !w.is_contiguous() || m < MIN_ROWS || x.len() < m * k {
        return Ok(None);
    }
    let (n, kw) = match layout {
        BLayout::Cols => w.dims2()?,
        BLayout::Rows => {
            let (kw, n) = w.dims2()?;
            (n, kw)
        }
    };
    if kw != k {
        return Ok(None);
    }
    let (ws, wl) = w.storage_and_layout();
    let Some(wv) = super::f32s(&ws) else {
        return Ok(None);
    };
    let wv = &wv[wl.start_offset()..][..k * n];
    // Not zero-filled first: the product writes every element (a memset of each output
    // was ≈ 3 % of a training step).
    c.clear();
    c.reserve(m * n);
    // SAFETY: c has room for m·n floats, and gemm_raw writes each of them.
    unsafe {
        gemm_raw::<false>(
            m,
            n,
            k,
            &x[..m * k],
            k,
            wv,
            layout,
            c.as_mut_ptr(),
            n,
            false,
        );
        c.set_len(m * n);
    }
    Ok(Some(n))
}

/// C [m, n] = A [m, k] · B [k, n], A and C row-major and contiguous, B = `w` read by
/// `layout`. Runs on the current rayon pool. Panics if a slice is shorter than its shape
/// (callers pass tensors' own buffers) or if the CPU lacks AVX2 + FMA.
///
/// The threads split C's columns (whole 16-column panels): each packs only its own panels
/// of B, so no thread waits for another's packing. A is read in place, six rows at a time.
#[cfg(target_arch = "x86_64")]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    w: &[f32],
    layout: BLayout,
    c: &mut [f32],
) {
    assert!(c.len() >= m * n);
    // SAFETY: c holds m·n floats.
    unsafe { gemm_raw::<false>(m, n, k, a, k, w, layout, c.as_mut_ptr(), n, false) }
}

/// [`gemm_f32`] with strides: A's m rows of k floats lie `lda` ≥ k floats apart (a block
/// of a wider matrix's columns), and C's m rows of n floats at `c` lie `ldc` ≥ n apart.
/// With `AT`, A is given as its transpose instead: k rows of m floats `lda` ≥ m apart
/// (A[i][kk] = a[kk·lda + i], as pᵀ in the attention's dV = pᵀ·dO), read in place too.
/// Without `accumulate` each of C's floats is written (none read), so they may be
/// uninitialised; with it the product is added to them (a sum over depth chunks, e.g. of
/// a weight decoded a chunk of rows at a time). The floats between rows are not touched.
///
/// # Safety
/// `c` points at m rows of n writable floats, `ldc` apart (initialised where `accumulate`),
/// that nothing else accesses during the call.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<const AT: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    w: &[f32],
    layout: BLayout,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let kernel = match GemmKernel::detect() {
        GemmKernel::Avx512 => GemmKernel::Avx512,
        // Forced to candle: a direct caller (an example, a test) gets the AVX2 kernel.
        _ => GemmKernel::Avx2,
    };
    gemm_raw_on::<AT>(kernel, m, n, k, a, lda, w, layout, c, ldc, accumulate)
}

/// [`gemm_raw`] on a given kernel of this module (`Avx2` or `Avx512`): the tests run
/// each kernel the CPU has, whatever this process's path. Panics if the CPU cannot run it.
///
/// # Safety
/// As [`gemm_raw`]'s.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw_on<const AT: bool>(
    kernel: GemmKernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    w: &[f32],
    layout: BLayout,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        kernel.is_own() && kernel.supported(),
        "the {} gemm does not run on this CPU",
        kernel.name()
    );
    assert!(w.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    match AT {
        false => assert!(lda >= k && a.len() >= (m - 1) * lda + k && ldc >= n),
        true => assert!(k == 0 || (lda >= m && a.len() >= (k - 1) * lda + m && ldc >= n)),
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * ldc), 0, n);
            }
        }
        return;
    }
    let src = BSource::Dense(w, layout);
    match kernel {
        GemmKernel::Avx512 => blocked::<AT, Zmm12x32>(m, n, k, a, lda, src, c, ldc, accumulate),
        _ => blocked::<AT, Ymm6x16>(m, n, k, a, lda, src, c, ldc, accumulate),
    }
}

/// C = A·Wᵀ for A [m, k] (rows `lda` ≥ k apart) and a weight W [n, k] that `fill` gives 16
/// rows at a time ([`Fill`]: rows r0..r0+rows, r0 a multiple of 16, columns j0..j0+nc, j0 a
/// multiple of 32, into [rows, nc] row-major), on this process's kernel: each panel of B is
/// filled straight from `fill` (a packed weight decoded into the cache-resident panel), so
/// no f32 copy of W is ever made. C's m rows of n floats lie `ldc` ≥ n apart, each written.
///
/// Why: the dequantized training product decoded 16 MB of a pack into memory and then
/// packed it again from there; on AVX2 that was 8 % of an int8 step (`perf`: decoding
/// 3.9 %, packing 4.4 %) and made int8 slower than f32 there.
///
/// # Safety
/// As [`gemm_raw`]'s (without `accumulate`), and `fill` writes every float it is given.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_fill_cols(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    fill: &Fill,
    c: *mut f32,
    ldc: usize,
) {
    let kernel = match GemmKernel::detect() {
        GemmKernel::Avx512 => GemmKernel::Avx512,
        _ => GemmKernel::Avx2,
    };
    gemm_fill_on(
        kernel,
        m,
        n,
        k,
        a,
        lda,
        BSource::FillCols(fill),
        c,
        ldc,
        false,
    )
}

/// C (+)= A·W for A [m, k] (rows `lda` ≥ k apart) and a weight W [k, n] that `fill` gives
/// 16 rows at a time (as [`gemm_fill_cols`]'s), on this process's kernel: the input
/// gradient dY·W through a packed weight, decoded straight into the panels. With
/// `accumulate` the product is added to C (initialised), else C is written.
///
/// # Safety
/// As [`gemm_raw`]'s, and `fill` writes every float it is given.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_fill_rows(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    fill: &Fill,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let kernel = match GemmKernel::detect() {
        GemmKernel::Avx512 => GemmKernel::Avx512,
        _ => GemmKernel::Avx2,
    };
    gemm_fill_on(
        kernel,
        m,
        n,
        k,
        a,
        lda,
        BSource::FillRows(fill),
        c,
        ldc,
        accumulate,
    )
}

/// [`gemm_fill_cols`] or [`gemm_fill_rows`] (by `src`, one of the fills) on a given kernel
/// of this module (`Avx2` or `Avx512`). Panics if the CPU cannot run it.
///
/// # Safety
/// As [`gemm_fill_rows`]'s.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_fill_on(
    kernel: GemmKernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    src: BSource,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        kernel.is_own() && kernel.supported(),
        "the {} gemm does not run on this CPU",
        kernel.name()
    );
    assert!(lda >= k && ldc >= n && (m == 0 || a.len() >= (m - 1) * lda + k));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * ldc), 0, n);
            }
        }
        return;
    }
    match kernel {
        GemmKernel::Avx512 => blocked::<false, Zmm12x32>(m, n, k, a, lda, src, c, ldc, accumulate),
        _ => blocked::<false, Ymm6x16>(m, n, k, a, lda, src, c, ldc, accumulate),
    }
}

/// Where a product's B comes from.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// A row-major f32 weight, read as it is or transposed.
    Dense(&'a [f32], BLayout),
    /// B = Wᵀ for a weight W [n, k] given by a [`Fill`] 16 rows at a time.
    FillCols(&'a Fill<'a>),
    /// B = W for a weight W [k, n] given by a [`Fill`] 16 rows at a time.
    FillRows(&'a Fill<'a>),
}

/// Produces rows r0..r0+rows (r0 a multiple of 16, rows ≤ 16), columns j0..j0+nc (j0 a
/// multiple of 32) of a weight into `dst` [rows, nc], row-major, every float written (the
/// type the bf16 product takes too).
#[cfg(target_arch = "x86_64")]
pub use super::gemm_bf16::Fill;

/// A register tile and the cache blocking around it: one per kernel.
#[cfg(target_arch = "x86_64")]
trait Micro {
    /// Rows of C one kernel call computes.
    const MR: usize;
    /// Columns of C one kernel call computes: the width of a packed panel of B.
    const NR: usize;
    /// Depth of one packed block: a KC × NR panel of B stays in L1.
    const KC: usize;
    /// Rows of A one pass over a packed block takes (from L2 or L3).
    const MC: usize;
    /// Columns of B packed at a time (per thread), written and read in L2.
    const NC: usize;

    /// C[0..mr, 0..nr] (row stride ldc) = (C if `add` else 0) + A[0..mr, 0..kc]·B, A read
    /// in place (row stride lda; with `AT`, A's transpose: A[i][kk] at a[kk·lda + i]), B a
    /// packed kc × NR panel. Rows past mr repeat row mr − 1 (their results are dropped), so
    /// A is never read past its last row.
    ///
    /// # Safety
    /// The CPU has this kernel's features; `a` points at mr ≥ 1 rows of kc readable floats,
    /// `lda` apart (with `AT`: kc rows of mr readable floats, `lda` apart); `b` holds
    /// kc·NR floats from a 64-byte boundary; `c` points at mr ≤ MR rows of nr ≤ NR writable
    /// floats, `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const AT: bool>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        add: bool,
    );

    /// [`pack_filled_cols`] into panels of NR columns.
    ///
    /// # Safety
    /// The CPU has AVX2.
    unsafe fn pack_fill(
        fill: &Fill,
        pc: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        rows: &mut [f32],
        dst: &mut [f32],
    );

    /// [`pack_block`] into panels of NR columns.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack(
        w: &[f32],
        layout: BLayout,
        k: usize,
        n: usize,
        pc: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        dst: &mut [f32],
    );
}

/// A [`Micro`] for a kernel function and its blocking (the two differ only in these).
macro_rules! micro {
    ($(#[$doc:meta])* $name:ident: $mr:expr, $nr:expr, $kc:expr, $mc:expr, $nc:expr, $kernel:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        struct $name;

        #[cfg(target_arch = "x86_64")]
        impl Micro for $name {
            const MR: usize = $mr;
            const NR: usize = $nr;
            const KC: usize = $kc;
            const MC: usize = $mc;
            const NC: usize = $nc;
            unsafe fn tile<const AT: bool>(
                kc: usize,
                a: *const f32,
                lda: usize,
                b: &[f32],
                c: *mut f32,
                ldc: usize,
                mr: usize,
                nr: usize,
                add: bool,
            ) {
                $kernel::<AT>(kc, a, lda, b, c, ldc, mr, nr, add)
            }
            unsafe fn pack(
                w: &[f32],
                layout: BLayout,
                k: usize,
                n: usize,
                pc: usize,
                kc: usize,
                j0: usize,
                nc: usize,
                dst: &mut [f32],
            ) {
                pack_block::<$nr>(w, layout, k, n, pc, kc, j0, nc, dst)
            }
            unsafe fn pack_fill(
                fill: &Fill,
                pc: usize,
                kc: usize,
                j0: usize,
                nc: usize,
                rows: &mut [f32],
                dst: &mut [f32],
            ) {
                pack_filled_cols::<$nr>(fill, pc, kc, j0, nc, rows, dst)
            }
        }
    };
}

micro!(
    /// The AVX2 + FMA tile: 6 × 16, twelve ymm accumulators.
    Ymm6x16: MR, NR, KC, MC, NC, kernel_6x16
);
micro!(
    /// The AVX-512 tile: 12 × 32, twenty-four zmm accumulators (of 32 registers: two for the
    /// panel's row, one for A's broadcast). A 256-deep panel (32 KiB) stays in a 48 KiB L1.
    Zmm12x32: 12, 32, 256, 144, 256, kernel_12x32
);

/// The blocked product on kernel `K`; arguments as [`gemm_raw`]'s, with m, n, k ≥ 1 and
/// the shapes checked.
///
/// The threads split C's columns (whole panels): each packs only its own panels of B, so
/// no thread waits for another's packing. A is read in place, K::MR rows at a time.
///
/// # Safety
/// As [`gemm_raw`]'s, and the CPU runs `K`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked<const AT: bool, K: Micro>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    src: BSource,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let panels = n.div_ceil(K::NR);
    // A filled B comes in whole blocks of 32 of W's columns, 16 of its rows.
    let depth_unit = match src {
        BSource::Dense(..) => 8,
        BSource::FillCols(_) => 32,
        BSource::FillRows(_) => 16,
    };
    let tasks = column_tasks(panels, m * k, rayon::current_num_threads(), K::NC / K::NR);
    let cp = SendPtr(c);
    (0..tasks).into_par_iter().for_each(|t| {
        let (p0, p1) = (panels * t / tasks, panels * (t + 1) / tasks);
        let mut buf = Aligned::new(K::KC.div_ceil(8) * 8 * K::NC);
        // One panel's rows of W as the fill gives them (a filled B only).
        let mut rows = match src {
            BSource::Dense(..) => Vec::new(),
            BSource::FillCols(_) => vec![0f32; K::NR * K::KC],
            // 16 rows of a column block, from the 32-aligned column before it.
            BSource::FillRows(_) => vec![0f32; 16 * (K::NC + 32)],
        };
        let cp = &cp;
        let (c0, c1) = (p0 * K::NR, (p1 * K::NR).min(n));
        for (jc, nc) in even_blocks(c1 - c0, K::NC, K::NR) {
            let jc = c0 + jc;
            for (pc, kc) in even_blocks(k, K::KC, depth_unit) {
                let bp = buf.slice(nc.div_ceil(K::NR) * K::NR * kc);
                // SAFETY: AVX2 (every kernel's CPU has it), asserted by the caller.
                match src {
                    BSource::Dense(w, layout) => unsafe {
                        K::pack(w, layout, k, n, pc, kc, jc, nc, bp)
                    },
                    BSource::FillCols(fill) => unsafe {
                        K::pack_fill(fill, pc, kc, jc, nc, &mut rows, bp)
                    },
                    BSource::FillRows(fill) => {
                        pack_filled_rows(K::NR, fill, pc, kc, jc, nc, &mut rows, bp)
                    }
                }
                let bp: &[f32] = bp;
                for (ic, mc) in even_blocks(m, K::MC, K::MR) {
                    for (jp, panel) in bp.chunks_exact(K::NR * kc).enumerate() {
                        let j = jc + jp * K::NR;
                        let nr = K::NR.min(n - j);
                        for i in (ic..ic + mc).step_by(K::MR) {
                            let mr = K::MR.min(ic + mc - i);
                            // SAFETY: the CPU runs K (asserted by the caller); A's rows
                            // i..i+mr (lda apart) hold k floats, columns pc..pc + kc ≤ k; the
                            // panel holds kc × NR floats from a 64-byte boundary (kc·NR
                            // floats apart); C's tile (rows i..i+mr, columns j..j+nr, stride
                            // ldc) lies inside c and inside this thread's columns, which no
                            // other thread writes.
                            unsafe {
                                K::tile::<AT>(
                                    kc,
                                    a.as_ptr().add(match AT {
                                        false => i * lda + pc,
                                        true => pc * lda + i,
                                    }),
                                    lda,
                                    panel,
                                    cp.0.add(i * ldc + j),
                                    ldc,
                                    mr,
                                    nr,
                                    pc > 0 || accumulate,
                                )
                            };
                        }
                    }
                }
            }
        }
    });
}

/// How many column tasks a product of `panels` 16-column panels, whose A holds `a_len`
/// floats, is cut into: about four a thread, of at most NC columns each. Why not one a
/// thread: a worker that wakes late (a futex wake-up between this VM's cores took 0.1–1
/// ms) left the other idle once its fixed half was done; 21 % of a training step's 4 ms
/// windows had one busy thread, half of them inside this gemm, and 8.5 % with these tasks.
/// With several tasks the early thread takes the late one's share (rayon runs a task
/// itself that no thief has taken). But each task reads all of A: past [`A_SHARED_BYTES`]
/// (the head's input gradient, 256 × 49152 floats) A comes from memory each time, and one
/// task a thread was faster (101–122 ms against 128–140 ms, four alternating runs of
/// `SHAPE="head bwd" cargo run --release -p lowrank-model --example f32_gemm`).
pub(super) fn column_tasks(
    panels: usize,
    a_len: usize,
    threads: usize,
    block_panels: usize,
) -> usize {
    let threads = threads.max(1);
    if threads == 1 || a_len * 4 > A_SHARED_BYTES {
        // One task a thread, each at most NC columns wide blocks of its own.
        return threads.min(panels).max(1);
    }
    panels.div_ceil(panels.div_ceil(4 * threads).clamp(1, block_panels))
}

/// The largest A whose rereads (one a column task) stay in the last-level cache.
const A_SHARED_BYTES: usize = 8 << 20;

/// `len` cut into the fewest blocks of at most `max`, as even as whole multiples of `unit`
/// make them (a last short block of 64 after two of 256 would run the kernel at a fraction
/// of its speed): (start, length) pairs.
pub(super) fn even_blocks(
    len: usize,
    max: usize,
    unit: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let count = len.div_ceil(max).max(1);
    let size = len.div_ceil(count).div_ceil(unit) * unit;
    (0..len)
        .step_by(size.max(1))
        .map(move |s| (s, size.min(len - s)))
}

/// C's base pointer, shared by threads that write disjoint columns.
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: the threads of `gemm_f32` write disjoint column ranges of C through it, and the
// parallel loop ends before the borrow of C does.
unsafe impl Sync for SendPtr {}

/// A reusable f32 buffer whose slices start on a 64-byte boundary (the kernel's aligned
/// loads need 32). Each thread keeps its buffer between products (taken at the start of a
/// product's task and put back when it ends): a fresh zeroed 330 KB per call and thread
/// cost a memset each time, ≈ 0.4 % of a training step on two cores.
pub(super) struct Aligned(Vec<f32>);

thread_local! {
    static PACK_BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Aligned {
    pub(super) fn new(len: usize) -> Aligned {
        let kept = PACK_BUFFER.with(|b| b.take());
        match kept.len() >= len + 16 {
            true => Aligned(kept),
            false => Aligned(vec![0.0; len + 16]),
        }
    }
    pub(super) fn slice(&mut self, len: usize) -> &mut [f32] {
        let off = self.0.as_ptr().align_offset(64).min(15);
        &mut self.0[off..off + len]
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        PACK_BUFFER.with(|b| b.set(v));
    }
}

/// Packs B's rows pc..pc+kc (kc ≤ [`KC_MAX`]), columns j0..j0+nc into NR-column panels of
/// kc × NR floats each (NR a multiple of 16), one after the other: panel p holds
/// dst[p·NR·kc + kk·NR + jj] = B[pc+kk][j0+NR·p+jj], zero past column j0 + nc.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block<const NR: usize>(
    w: &[f32],
    layout: BLayout,
    k: usize,
    n: usize,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 6;
    match layout {
        BLayout::Rows => {
            // Row by row: each of B's rows is read front to back (the weight comes from
            // memory, and a sequential stream is what the prefetchers follow best).
            for kk in 0..kc {
                let row = &w[(pc + kk) * n + j0..][..nc];
                // The weight streams from memory in short row segments (nc of n columns),
                // which the hardware prefetchers pick up late: ask for rows ahead, every
                // 64-byte line of them (one a panel left every other line of 32-wide panels
                // to the hardware: `SHAPE=bwd` of `--example f32_gemm` ran 2–4 % slower).
                if kk + AHEAD < kc {
                    let ahead = w[(pc + kk + AHEAD) * n + j0..].as_ptr();
                    for off in (0..nc).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(off) as *const i8);
                    }
                }
                for (p, src) in row.chunks(NR).enumerate() {
                    let d = &mut dst[(p * kc + kk) * NR..][..NR];
                    if src.len() == NR {
                        for h in (0..NR).step_by(8) {
                            let v = _mm256_loadu_ps(src[h..].as_ptr());
                            _mm256_storeu_ps(d[h..].as_mut_ptr(), v);
                        }
                    } else {
                        d[..src.len()].copy_from_slice(src);
                        d[src.len()..].fill(0.0);
                    }
                }
            }
        }
        BLayout::Cols => {
            // B[k][j] = W[j][k]: W's rows transposed (a ragged last panel's missing rows
            // read as zeros), the next panel's rows prefetched meanwhile.
            debug_assert!(kc <= KC_MAX && NR.is_multiple_of(16));
            let zeros = [0f32; KC_MAX + 8];
            let panels = nc.div_ceil(NR);
            for (p, panel) in dst.chunks_exact_mut(NR * kc).enumerate() {
                let nr = NR.min(nc - p * NR);
                let rows: [&[f32]; NR] = std::array::from_fn(|jj| match jj < nr {
                    true => &w[(j0 + p * NR + jj) * k + pc..][..kc],
                    false => &zeros[..kc],
                });
                let next = (p + 1 < panels).then(|| {
                    let ptr = w[(j0 + (p + 1) * NR) * k + pc..].as_ptr();
                    (ptr, k, NR.min(nc - (p + 1) * NR))
                });
                transpose_panel::<NR>(&rows, kc, panel, next);
            }
        }
    }
}

/// One NR-column panel of B = Wᵀ: panel[kk·NR + jj] = rows[jj][kk] for kk < kc, by 8 × 8
/// blocks transposed in registers. `next` = (first float, stride, count) of rows to
/// prefetch meanwhile, one 64-byte line of each every 16 floats of depth.
///
/// # Safety
/// The CPU has AVX2; with `next`, its rows hold kc readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transpose_panel<const NR: usize>(
    rows: &[&[f32]; NR],
    kc: usize,
    panel: &mut [f32],
    next: Option<(*const f32, usize, usize)>,
) {
    use std::arch::x86_64::*;
    assert!(panel.len() >= NR * kc && rows.iter().all(|r| r.len() >= kc));
    let full = kc / 8 * 8;
    for kb in (0..full).step_by(8) {
        if let Some((nx, stride, count)) = next.filter(|_| kb % 16 == 0) {
            for jj in 0..count {
                _mm_prefetch::<_MM_HINT_T0>(nx.wrapping_add(jj * stride + kb) as *const i8);
            }
        }
        for h in 0..NR / 8 {
            let r: [__m256; 8] =
                std::array::from_fn(|i| _mm256_loadu_ps(rows[h * 8 + i][kb..].as_ptr()));
            for (kk, v) in transpose8(r).into_iter().enumerate() {
                _mm256_storeu_ps(panel[(kb + kk) * NR + h * 8..].as_mut_ptr(), v);
            }
        }
    }
    for kk in full..kc {
        for (jj, row) in rows.iter().enumerate() {
            panel[kk * NR + jj] = row[kk];
        }
    }
}

/// [`pack_block`]'s `Rows` packing for a W [k, n] that `fill` gives: W's rows pc..pc+kc (pc
/// a multiple of 16), columns j0..j0+nc into `nr`-column panels, zero past column j0 + nc.
/// 16 rows at a time are filled into `rows` from the 32-aligned column at or before j0 (the
/// fill's contract), then copied into the panels.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn pack_filled_rows(
    nr: usize,
    fill: &Fill,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    rows: &mut [f32],
    dst: &mut [f32],
) {
    debug_assert!(pc.is_multiple_of(16));
    let ja = j0 / 32 * 32;
    let (lead, width) = (j0 - ja, j0 - ja + nc);
    let panels = nc.div_ceil(nr);
    for g in (0..kc).step_by(16) {
        let n = 16.min(kc - g);
        let tile = &mut rows[..n * width];
        fill(pc + g, n, ja, width, tile);
        for (r, row) in tile.chunks_exact(width).enumerate() {
            let row = &row[lead..];
            for p in 0..panels {
                let d = &mut dst[(p * kc + g + r) * nr..][..nr];
                let src = &row[p * nr..nc.min((p + 1) * nr)];
                d[..src.len()].copy_from_slice(src);
                d[src.len()..].fill(0.0);
            }
        }
    }
}

/// [`pack_block`]'s `Cols` packing for a W [n, k] that `fill` gives: depth pc..pc+kc (pc a
/// multiple of 32), W's rows j0..j0+nc (j0 a multiple of 16) into NR-column panels, zero
/// past row j0 + nc. Each panel's rows are filled 16 at a time into `rows` (NR·kc floats)
/// and transposed from there, so the decoded weight goes from the cache into the panel.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_filled_cols<const NR: usize>(
    fill: &Fill,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    rows: &mut [f32],
    dst: &mut [f32],
) {
    debug_assert!(kc <= KC_MAX && NR.is_multiple_of(16) && j0.is_multiple_of(16));
    debug_assert!(pc.is_multiple_of(32));
    let zeros = [0f32; KC_MAX + 8];
    for (p, panel) in dst.chunks_exact_mut(NR * kc).enumerate() {
        let nr = NR.min(nc - p * NR);
        for g in (0..nr).step_by(16) {
            let n = 16.min(nr - g);
            fill(j0 + p * NR + g, n, pc, kc, &mut rows[g * kc..(g + n) * kc]);
        }
        let rows: &[f32] = rows;
        let rows: [&[f32]; NR] = std::array::from_fn(|jj| match jj < nr {
            true => &rows[jj * kc..][..kc],
            false => &zeros[..kc],
        });
        transpose_panel::<NR>(&rows, kc, panel, None);
    }
}

/// The transpose of an 8 × 8 block held as eight rows: out[i][r] = rows[r][i].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// C[0..mr, 0..nr] (row stride ldc) = (C if `add` else 0) + A[0..mr, 0..kc]·B, A read in
/// place (row stride lda; with `AT`, A's transpose: A[i][kk] at a[kk·lda + i]), B a packed
/// kc × 16 panel. Rows past mr repeat row mr − 1 (their results are dropped), so A is never
/// read past its last row.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` points at mr ≥ 1 rows of kc readable floats, `lda` apart
/// (with `AT`: kc rows of mr readable floats, `lda` apart); `b` holds kc·16 floats from a
/// 32-byte boundary; `c` points at mr ≤ 6 rows of nr ≤ 16 writable floats, `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_6x16<const AT: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(b.len() >= kc * NR && (1..=MR).contains(&mr) && nr <= NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // Row i's first float, and the step from one depth to the next.
    let (rows, step): ([*const f32; MR], usize) = match AT {
        false => (std::array::from_fn(|i| a.add(i.min(mr - 1) * lda)), 1),
        true => (std::array::from_fn(|i| a.add(i.min(mr - 1))), lda),
    };
    // C's tile is read (or written) only after the loop: start bringing its lines in now.
    for i in 0..mr {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + NR - 1) as *const i8);
    }
    let mut pb = b.as_ptr();
    for kk in 0..kc {
        let b0 = _mm256_load_ps(pb);
        let b1 = _mm256_load_ps(pb.add(8));
        for (row, &pa) in acc.iter_mut().zip(&rows) {
            let ai = _mm256_broadcast_ss(&*pa.add(kk * step));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        pb = pb.add(NR);
    }
    if mr == MR && nr == NR {
        for (i, row) in acc.iter().enumerate() {
            let p = c.add(i * ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        }
    } else {
        let mut tmp = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(tmp.as_mut_ptr().add(i * NR), row[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(i * NR + 8), row[1]);
        }
        for i in 0..mr {
            let p = c.add(i * ldc);
            for j in 0..nr {
                let v = tmp[i * NR + j];
                *p.add(j) = if add { *p.add(j) + v } else { v };
            }
        }
    }
}

/// [`kernel_6x16`] on AVX-512: a 12 × 32 tile (C = (C if `add` else 0) + A·B, A read in
/// place, rows past mr repeating row mr − 1), the panel kc × 32 floats. Columns past nr are
/// masked off in C's loads and stores, so a ragged tile needs no copy.
///
/// # Safety
/// The CPU has AVX-512F; `a` points at mr ≥ 1 rows of kc readable floats, `lda` apart
/// (with `AT`: kc rows of mr readable floats, `lda` apart); `b` holds kc·32 floats from a
/// 64-byte boundary; `c` points at mr ≤ 12 rows of nr ≤ 32 writable floats, `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_12x32<const AT: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    const MR: usize = 12;
    const NR: usize = 32;
    debug_assert!(b.len() >= kc * NR && (1..=MR).contains(&mr) && nr <= NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // Row i's first float, and the step from one depth to the next.
    let (rows, step): ([*const f32; MR], usize) = match AT {
        false => (std::array::from_fn(|i| a.add(i.min(mr - 1) * lda)), 1),
        true => (std::array::from_fn(|i| a.add(i.min(mr - 1))), lda),
    };
    // C's tile is read (or written) only after the loop: start bringing its lines in now.
    for i in 0..mr {
        for j in [0, 16, NR - 1] {
            // (a hint only: the address may lie past a ragged tile's columns)
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + j) as *const i8);
        }
    }
    let mut pb = b.as_ptr();
    for kk in 0..kc {
        let b0 = _mm512_load_ps(pb);
        let b1 = _mm512_load_ps(pb.add(16));
        for (row, &pa) in acc.iter_mut().zip(&rows) {
            let ai = _mm512_set1_ps(*pa.add(kk * step));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
        pb = pb.add(NR);
    }
    store_12x32!(acc, c, ldc, mr, nr, add);
}

/// Stores a 12 × 32 tile of zmm accumulators `acc` (rows past mr, columns past nr dropped):
/// C[0..mr, 0..nr] (row stride ldc) = (C if `add` else 0) + acc, columns past nr masked off
/// in C's loads and stores (a ragged tile needs no copy). A macro, not a function: a call
/// that the compiler did not inline passed the 24 accumulators through memory (1.2 % of an
/// int8 step in `perf`), and `#[inline(always)]` cannot go with `#[target_feature]`.
/// Expands inside an `unsafe` AVX-512F function whose `c` points at mr ≤ 12 rows of nr ≤ 32
/// writable floats, `ldc` apart.
macro_rules! store_12x32 {
    ($acc:expr, $c:expr, $ldc:expr, $mr:expr, $nr:expr, $add:expr) => {{
        use std::arch::x86_64::*;
        let (c, ldc, nr): (*mut f32, usize, usize) = ($c, $ldc, $nr);
        // Lanes of the two halves that are columns of C.
        let lanes = |from: usize| -> __mmask16 {
            match nr.saturating_sub(from) {
                0 => 0,
                n if n >= 16 => 0xFFFF,
                n => (1u16 << n) - 1,
            }
        };
        let (m0, m1) = (lanes(0), lanes(16));
        for (i, row) in $acc.iter().take($mr).enumerate() {
            let p = c.add(i * ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if $add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)));
            }
            // A masked-off lane is neither read nor written (nor can it fault), so the
            // second half's address may lie past C's row where nr ≤ 16.
            _mm512_mask_storeu_ps(p, m0, v0);
            _mm512_mask_storeu_ps(p.wrapping_add(16), m1, v1);
        }
    }};
}
pub(super) use store_12x32;

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values of both signs in [-1, 1).
    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// C = A·B in f64, and Σ|a||b| per element (the scale of f32's accumulation error).
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        w: &[f32],
        l: BLayout,
    ) -> Vec<(f64, f64)> {
        let b = |kk: usize, j: usize| match l {
            BLayout::Rows => w[kk * n + j],
            BLayout::Cols => w[j * k + kk],
        } as f64;
        let mut c = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let p = a[i * k + kk] as f64 * b(kk, j);
                    s += p;
                    mag += p.abs();
                }
                c.push((s, mag));
            }
        }
        c
    }

    /// Our kernels this CPU runs (AVX2 on every x86-64 machine of ours; AVX-512 on some).
    #[cfg(target_arch = "x86_64")]
    fn own_kernels() -> Vec<GemmKernel> {
        let ks: Vec<GemmKernel> = [GemmKernel::Avx2, GemmKernel::Avx512]
            .into_iter()
            .filter(|k| k.supported())
            .collect();
        for k in [GemmKernel::Avx2, GemmKernel::Avx512] {
            if !ks.contains(&k) {
                eprintln!("skipped: this CPU cannot run the {} kernel", k.name());
            }
        }
        ks
    }

    /// Runs `f(kernel, threads, pool)` for each of our kernels this CPU runs on pools of 1–3
    /// threads (a thread's column range then starts or ends mid-block).
    #[cfg(target_arch = "x86_64")]
    fn on_kernels_and_pools(mut f: impl FnMut(GemmKernel, usize, &rayon::ThreadPool)) {
        for kernel in own_kernels() {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                f(kernel, threads, &pool);
            }
        }
    }

    /// The filled products (B = Wᵀ or B = W, given 16 rows of W at a time) within f32
    /// accumulation error of the f64 one on each kernel and 1–3 threads, for shapes with a
    /// ragged last tile of rows (% 16), a ragged last panel (n % 16 or 32), several depth
    /// blocks and column blocks (n > NC; column blocks that start between two 32-aligned
    /// columns), C rows wider than n, and C written or added to. The fill checks its
    /// contract (rows from a multiple of 16, at most 16; columns from a multiple of 32;
    /// inside W); a panel filled from the wrong rows or columns is off by O(1).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn filled_products_match_f64() {
        let shapes = [
            (64, 88, 96),
            (69, 600, 672),
            (130, 40, 1000),
            (7, 17, 33),
            (66, 1000, 40),
        ];
        on_kernels_and_pools(|kernel, threads, pool| {
            for (m, n, k) in shapes {
                for (l, add) in [
                    (BLayout::Cols, false),
                    (BLayout::Rows, false),
                    (BLayout::Rows, true),
                ] {
                    let a = fill(m * k, (m * 7 + k) as u64);
                    let w = fill(n * k, (n * 5 + k) as u64);
                    // W's own shape: [n, k] for B = Wᵀ, [k, n] for B = W.
                    let (wr, wc) = match l {
                        BLayout::Cols => (n, k),
                        BLayout::Rows => (k, n),
                    };
                    let calls = std::sync::atomic::AtomicUsize::new(0);
                    let f = |r0: usize, rows: usize, j0: usize, nc: usize, dst: &mut [f32]| {
                        assert!(r0.is_multiple_of(16) && (1..=16).contains(&rows));
                        assert!(j0.is_multiple_of(32) && nc > 0);
                        assert!(r0 + rows <= wr && j0 + nc <= wc && dst.len() == rows * nc);
                        for r in 0..rows {
                            let row = &w[(r0 + r) * wc + j0..][..nc];
                            dst[r * nc..(r + 1) * nc].copy_from_slice(row);
                        }
                        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    };
                    let ldc = n + 3;
                    let base = if add { 0.5f32 } else { f32::NAN };
                    let mut c = vec![base; m * ldc];
                    let src = match l {
                        BLayout::Cols => BSource::FillCols(&f),
                        BLayout::Rows => BSource::FillRows(&f),
                    };
                    // SAFETY: c holds m rows of n floats, ldc apart; a holds m rows of k.
                    pool.install(|| unsafe {
                        gemm_fill_on(kernel, m, n, k, &a, k, src, c.as_mut_ptr(), ldc, add)
                    });
                    assert!(calls.into_inner() > 0);
                    let want = reference(m, n, k, &a, &w, l);
                    for i in 0..m {
                        for j in 0..n {
                            let (want, mag) = want[i * n + j];
                            let want = want + if add { 0.5 } else { 0.0 };
                            let got = c[i * ldc + j] as f64;
                            assert!(
                            (got - want).abs() <= 1e-6 * mag + if add { 1e-7 } else { 1e-30 },
                            "{} {m}×{n}×{k} {l:?} add {add} on {threads} threads: C[{i}][{j}] = {got}, f64 {want}",
                            kernel.name()
                        );
                        }
                        let rest = &c[i * ldc + n..(i + 1) * ldc];
                        assert!(rest.iter().all(|v| v.to_bits() == base.to_bits()));
                    }
                }
            }
        });
    }

    /// Every element of each kernel's product within f32 accumulation error of the f64 one,
    /// for shapes whose edges fall inside a register tile (m % 6 or 12, n % 16 or 32), inside
    /// an 8-wide transpose (k % 8), across depth blocks (k > KC, accumulated through C) and
    /// column blocks (n > NC), in both layouts and on 1–3 threads (a thread's column range
    /// that starts or ends mid-block). A wrong transpose, a lost depth block, a tile written
    /// at the wrong place or a column masked wrongly is off by O(1), far outside the bound.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn own_products_match_f64_on_ragged_shapes() {
        let shapes = [
            (1, 1, 1),
            (7, 17, 9),
            (13, 33, 700),
            (64, 48, 320),
            (65, 1040, 37),
            (130, 100, 641),
            (6, 2100, 16),
            (25, 47, 300),
            (12, 32, 257),
        ];
        on_kernels_and_pools(|kernel, threads, pool| {
            for (m, n, k) in shapes {
                for l in [BLayout::Rows, BLayout::Cols] {
                    let a = fill(m * k, (m * 31 + k) as u64);
                    let w = fill(k * n, (n * 17 + k) as u64);
                    let mut c = vec![f32::NAN; m * n];
                    // SAFETY: c holds m rows of n floats.
                    pool.install(|| unsafe {
                        gemm_raw_on::<false>(
                            kernel,
                            m,
                            n,
                            k,
                            &a,
                            k,
                            &w,
                            l,
                            c.as_mut_ptr(),
                            n,
                            false,
                        )
                    });
                    for (idx, (got, (want, mag))) in
                        c.iter().zip(reference(m, n, k, &a, &w, l)).enumerate()
                    {
                        let bound = 1e-6 * mag + 1e-30;
                        assert!(
                    (*got as f64 - want).abs() <= bound,
                    "{} {m}×{n}×{k} {l:?} on {threads} threads: C[{}][{}] = {got}, f64 {want}",
                    kernel.name(),
                    idx / n,
                    idx % n
                );
                    }
                }
            }
        });
    }

    /// With strides and `accumulate`, the raw entry point adds A's column block times B into
    /// a block of a wider C and leaves everything else alone: a product over a column block
    /// of a wider A (lda > k) in two depth halves, the second added to the first, equals
    /// the whole product; the floats beside C's block keep their values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn strided_accumulating_products_sum_depth_chunks() {
        for kernel in own_kernels() {
            for (m, n, k, split) in [(7, 21, 40, 16), (70, 35, 700, 336), (13, 40, 9, 1)] {
                for l in [BLayout::Rows, BLayout::Cols] {
                    let (lda, a_off, ldc, c_off) = (k + 5, 3, n + 7, 2);
                    let a_wide = fill((m - 1) * lda + a_off + k, (m + n) as u64);
                    let a_block: Vec<f32> = (0..m)
                        .flat_map(|i| a_wide[a_off + i * lda..][..k].to_vec())
                        .collect();
                    let w = fill(k * n, (k * 3) as u64);
                    // W's rows (Rows: depth rows; Cols: every row's depth columns) split in two.
                    let (w1, w2): (Vec<f32>, Vec<f32>) = match l {
                        BLayout::Rows => (w[..split * n].to_vec(), w[split * n..].to_vec()),
                        BLayout::Cols => (
                            (0..n).flat_map(|j| w[j * k..][..split].to_vec()).collect(),
                            (0..n)
                                .flat_map(|j| w[j * k + split..][..k - split].to_vec())
                                .collect(),
                        ),
                    };
                    let mut c = vec![-7f32; (m - 1) * ldc + c_off + n + 3];
                    // SAFETY: c holds m rows of n floats from c_off, ldc apart (and then some).
                    unsafe {
                        let cp = c.as_mut_ptr().add(c_off);
                        let a = &a_wide[a_off..];
                        gemm_raw_on::<false>(kernel, m, n, split, a, lda, &w1, l, cp, ldc, false);
                        let a2 = &a_wide[a_off + split..];
                        gemm_raw_on::<false>(
                            kernel,
                            m,
                            n,
                            k - split,
                            a2,
                            lda,
                            &w2,
                            l,
                            cp,
                            ldc,
                            true,
                        );
                    }
                    let want = reference(m, n, k, &a_block, &w, l);
                    for (idx, v) in c.iter().enumerate() {
                        let (i, j) = (
                            (idx.wrapping_sub(c_off)) / ldc,
                            (idx.wrapping_sub(c_off)) % ldc,
                        );
                        if idx < c_off || i >= m || j >= n {
                            assert_eq!(
                                *v, -7.0,
                                "{kernel:?} {m}×{n}×{k} {l:?}: float {idx} outside C touched"
                            );
                            continue;
                        }
                        let (want, mag) = want[i * n + j];
                        assert!(
                            (*v as f64 - want).abs() <= 1e-6 * mag + 1e-30,
                            "{kernel:?} {m}×{n}×{k} {l:?}: C[{i}][{j}] = {v}, f64 {want}"
                        );
                    }
                }
            }
        }
    }

    /// Column tasks: several a thread where there are panels enough (so a late thread's
    /// share goes to the other), none wider than a packed block, none empty; one a thread
    /// on one thread or for an A too large to reread.
    #[test]
    fn column_tasks_are_several_a_thread_unless_a_is_large() {
        let small = 512 * 576;
        for block in [NC / NR, 8] {
            for threads in [1, 2, 3, 8] {
                for panels in [1, 2, 5, 12, 36, 96, 3072] {
                    let tasks = column_tasks(panels, small, threads, block);
                    let what = format!("{panels} panels, {threads} threads: {tasks}");
                    assert!((1..=panels).contains(&tasks), "{what}");
                    let big = column_tasks(panels, A_SHARED_BYTES / 4 + 1, threads, block);
                    assert_eq!(big, threads.min(panels), "{what}");
                    if threads > 1 {
                        // The widest task (panels·(t+1)/tasks − panels·t/tasks) fits one block.
                        assert!(panels.div_ceil(tasks) <= block, "{what}");
                        assert!(tasks >= panels.min(2 * threads), "{what}");
                    } else {
                        assert_eq!(tasks, 1, "{what}");
                    }
                }
            }
        }
    }

    /// k = 0 is a zero matrix (C's old values gone), not whatever C held.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn empty_depth_writes_zeros() {
        for kernel in own_kernels() {
            let mut c = vec![5f32; 12];
            // SAFETY: c holds 3 rows of 4 floats.
            unsafe {
                gemm_raw_on::<false>(
                    kernel,
                    3,
                    4,
                    0,
                    &[],
                    0,
                    &[],
                    BLayout::Rows,
                    c.as_mut_ptr(),
                    4,
                    false,
                )
            };
            assert_eq!(c, vec![0f32; 12], "{kernel:?}");
        }
    }

    /// The tensor entry point gives candle's product (to accumulation error) on both paths
    /// and both sides of MIN_ROWS, and falls back to candle (its error) on a shape mismatch.
    #[test]
    fn matmul_frozen_agrees_with_candle() {
        let dev = candle_core::Device::Cpu;
        for m in [MIN_ROWS - 1, MIN_ROWS + 7] {
            let x = Tensor::new(fill(m * 40, 3), &dev)
                .unwrap()
                .reshape((m, 40))
                .unwrap();
            let w = Tensor::new(fill(24 * 40, 4), &dev)
                .unwrap()
                .reshape((24, 40))
                .unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = matmul_frozen(&x, &w, BLayout::Cols).unwrap();
            let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
            let dy = Tensor::new(fill(m * 24, 5), &dev)
                .unwrap()
                .reshape((m, 24))
                .unwrap();
            let want = dy.matmul(&w).unwrap();
            let got = matmul_frozen(&dy, &w, BLayout::Rows).unwrap();
            let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
            // x [m, 40] against W [24, 40] read as rows: k = 24 ≠ 40.
            assert!(matmul_frozen(&x, &w, BLayout::Rows).is_err());
        }
    }

    /// `matmul_frozen_into` replaces its buffer's contents with `matmul_frozen`'s floats,
    /// bit for bit, on both sides of MIN_ROWS, whatever the buffer held (longer, shorter,
    /// NaN), and keeps its allocation where it is big enough; a shape mismatch is an error.
    #[test]
    fn matmul_frozen_into_replaces_the_buffer() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::new(fill(24 * 40, 7), &dev)
            .unwrap()
            .reshape((24, 40))
            .unwrap();
        let mut c = vec![f32::NAN; (MIN_ROWS + 9) * 24 + 5];
        for m in [MIN_ROWS + 9, MIN_ROWS + 2, MIN_ROWS - 1, MIN_ROWS + 9] {
            let x = Tensor::new(fill(m * 40, m as u64), &dev)
                .unwrap()
                .reshape((m, 40))
                .unwrap();
            let want: Vec<f32> = matmul_frozen(&x, &w, BLayout::Cols)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (ptr, cap) = (c.as_ptr(), c.capacity());
            matmul_frozen_into(&x, &w, BLayout::Cols, &mut c).unwrap();
            assert_eq!(c.len(), m * 24);
            assert!(c.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
            #[cfg(target_arch = "x86_64")]
            if GemmKernel::detect().is_own() && m >= MIN_ROWS && cap >= m * 24 {
                assert_eq!((c.as_ptr(), c.capacity()), (ptr, cap), "reallocated");
            }
            let _ = (ptr, cap);
            assert!(matmul_frozen_into(&x, &w, BLayout::Rows, &mut c).is_err());
            // Stale values for the next round.
            c.iter_mut().for_each(|v| *v = f32::NAN);
        }
    }

    /// The batched product of the training attention on our path, for each view it is given
    /// (B as kᵀ of a span of rows, as v's rows, and A as a transposed p), against an f64
    /// product of the same logical matrices; other layouts and short A take candle's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bmm_matches_f64_on_attention_views() {
        for kernel in own_kernels() {
            bmm_matches_f64_on(kernel);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn bmm_matches_f64_on(kernel: GemmKernel) {
        let dev = candle_core::Device::Cpu;
        let t = |v: Vec<f32>, s: (usize, usize, usize)| {
            Tensor::new(v, &dev).unwrap().reshape(s).unwrap()
        };
        let check = |a: &Tensor, b: &Tensor| {
            let got = bmm_own(kernel, a, b)
                .unwrap()
                .expect("our path takes this layout");
            let (av, bv) = (a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
            let gv = got.to_vec3::<f32>().unwrap();
            let (nb, m, k) = a.dims3().unwrap();
            let n = b.dim(2).unwrap();
            assert_eq!(got.dims3().unwrap(), (nb, m, n));
            for bi in 0..nb {
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut mag) = (0f64, 0f64);
                        for kk in 0..k {
                            let p = av[bi][i][kk] as f64 * bv[bi][kk][j] as f64;
                            s += p;
                            mag += p.abs();
                        }
                        let d = (gv[bi][i][j] as f64 - s).abs();
                        assert!(
                            d <= 1e-6 * mag + 1e-30,
                            "{kernel:?} [{bi},{i},{j}] {d} of {mag}"
                        );
                    }
                }
            }
        };
        let (nkv, rows, hd, e, m) = (3, 150, 64, 101, 70);
        let keys = t(fill(nkv * rows * hd, 11), (nkv, rows, hd)); // k or v [nkv, N, hd]
        let span = keys.narrow(1, 7, e).unwrap(); // [nkv, e, hd], rows 7..7+e
        let q = t(fill(nkv * m * hd, 12), (nkv, m, hd));
        let p = t(fill(nkv * m * e, 13), (nkv, m, e));
        check(&q, &span.t().unwrap()); // q·kᵀ: B read as columns
        check(&p, &span); // p·v: B read as rows
        check(&p.t().unwrap(), &q); // pᵀ·dO: A read as columns of p [nkv, m, e]
                                    // pᵀ of a column block of a wider p (A's columns further apart than its rows).
        let pw = t(fill(nkv * m * 130, 16), (nkv, m, 130))
            .narrow(2, 20, e)
            .unwrap();
        check(&pw.t().unwrap(), &q);
        // A with a row stride wider than its rows (a column block of a wider matrix).
        check(
            &t(fill(nkv * m * 110, 14), (nkv, m, 110))
                .narrow(2, 3, e)
                .unwrap(),
            &span,
        );
        // B neither rows nor columns of a row-major matrix, and an A of too few rows: None,
        // and `bmm` gives candle's product.
        let odd = keys.narrow(2, 0, 40).unwrap(); // rows 64 apart, 40 used
        let short = q.narrow(1, 0, MIN_ROWS - 1).unwrap();
        let wide = t(fill(nkv * m * rows, 15), (nkv, m, rows));
        // Shapes that do not multiply: candle's error, not a product.
        assert!(bmm(&q, &span).is_err()); // [3, 70, 64]·[3, 101, 64]
        assert!(bmm(&q, &q.narrow(0, 0, 2).unwrap().t().unwrap()).is_err()); // 3 and 2 batches
        for (a, b) in [(&wide, &odd), (&short, &span.t().unwrap())] {
            assert!(bmm_own(kernel, a, b).unwrap().is_none());
            let want = a.matmul(b).unwrap().to_vec3::<f32>().unwrap();
            assert_eq!(bmm(a, b).unwrap().to_vec3::<f32>().unwrap(), want);
        }
    }

    /// `LOWRANK_F32_GEMM`: the default, each forced path, and a warning for an unknown name.
    #[test]
    fn forced_paths_and_unknown_names() {
        let auto = GemmKernel::auto();
        assert_eq!(GemmKernel::choose(None), (auto, None));
        assert_eq!(GemmKernel::choose(Some(" Auto ")), (auto, None));
        assert_eq!(
            GemmKernel::choose(Some("candle")),
            (GemmKernel::Candle, None)
        );
        #[cfg(target_arch = "x86_64")]
        for k in [GemmKernel::Avx2, GemmKernel::Avx512] {
            let upper = k.name().to_ascii_uppercase();
            match k.supported() {
                true => assert_eq!(GemmKernel::choose(Some(&upper)), (k, None)),
                false => assert!(GemmKernel::choose(Some(&upper)).1.is_some()),
            }
        }
        let (k, w) = GemmKernel::choose(Some("mkl"));
        assert_eq!(k, auto);
        assert!(w.unwrap().contains("LOWRANK_F32_GEMM=mkl"));
    }
}
