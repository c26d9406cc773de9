//! How LoRA training multiplies a packed frozen weight, forward and backward, chosen per CPU
//! path.
//!
//! Two products give the forward what the gradients need (within 1 % of f32's, see the
//! README's operand table):
//! - [`TrainProduct::Limbs`]: the integer kernels with activations in two 8-bit limbs
//!   ([`QMatrix::matmul_fine`]), two integer passes per product;
//! - [`TrainProduct::Dequantized`]: the pack dequantized (exactly: the weights the packing
//!   holds) a chunk of output rows at a time, for one f32 gemm with the f32 activations, as
//!   the backward's dX already does.
//!
//! Which is faster depends on the CPU's integer dot product against its f32 FMA. With
//! AVX-512 VNNI (`vpdpbusd`, 4× the FMA's multiply-adds per instruction) the two limbs still
//! pay. With AVX2 only, a limb costs `vpmaddubsw` + `vpaddw` per 32 multiply-adds, and on an
//! AMD EPYC (Zen 3) that pair issues about once a cycle against two FMAs of 8: two limbs
//! then do no more than f32 does, and `cargo run --release -p lowrank-model --example
//! int8_matmul` measured the dequantized gemm faster on four of the five training shapes
//! (down_proj 5.7 vs 10.1 ms, the head 260 vs 343 ms, 512 rows; gate/up equal). The
//! portable path is scalar, so it dequantizes too.
//!
//! The backward's frozen input gradient dX = dY·W₀ has two products too ([`DxProduct`]):
//! f32 with the pack dequantized a chunk at a time, or, on CPUs with AVX-512 BF16, dY and
//! the decoded W₀ rounded to bf16 for `vdpbf16ps` ([`crate::ops::gemm_bf16`]).

use candle_core::Tensor;

use super::kernel::Kernel;
use super::{parts_tensors, qlinear_fine, with_rows, QMatrix};
use crate::error::Result;

/// The product training's forward runs for a packed frozen weight (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainProduct {
    /// Integer kernels, activations in two 8-bit limbs.
    Limbs,
    /// The pack dequantized to f32 a chunk at a time, one f32 gemm per chunk.
    Dequantized,
}

impl TrainProduct {
    pub fn name(self) -> &'static str {
        match self {
            TrainProduct::Limbs => "limbs",
            TrainProduct::Dequantized => "dequantized",
        }
    }

    /// The faster product on this process's int8 kernel path.
    fn for_kernel(k: Kernel) -> TrainProduct {
        match k {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => TrainProduct::Limbs,
            _ => TrainProduct::Dequantized,
        }
    }

    /// This process's default, decided once: the faster product on its kernel path, or the
    /// one `LOWRANK_TRAIN_PRODUCT=limbs|dequantized` forces (a testing and timing aid; an
    /// unknown name prints one warning on stderr and the default runs).
    pub fn detect() -> TrainProduct {
        static P: std::sync::OnceLock<TrainProduct> = std::sync::OnceLock::new();
        *P.get_or_init(|| {
            from_env("LOWRANK_TRAIN_PRODUCT", |v| {
                TrainProduct::choose(v, Kernel::detect())
            })
        })
    }

    /// The choice [`TrainProduct::detect`] makes from the variable's value and the kernel
    /// path, with the warning to print, if any.
    fn choose(forced: Option<&str>, kernel: Kernel) -> (TrainProduct, Option<String>) {
        let all = [TrainProduct::Limbs, TrainProduct::Dequantized];
        let auto = TrainProduct::for_kernel(kernel);
        forced_choice(
            "LOWRANK_TRAIN_PRODUCT",
            forced,
            &all,
            auto,
            |_| true,
            |p| p.name(),
        )
    }
}

/// How the low-bit backward multiplies its frozen input gradient dX = dY·W₀ through a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DxProduct {
    /// dY and the decoded W₀ in f32 (our f32 gemm, a chunk of the pack at a time).
    F32,
    /// dY and the decoded W₀ rounded to bf16, products summed in f32 (`vdpbf16ps`, twice the
    /// f32 FMA's multiply-adds an instruction; [`crate::ops::gemm_bf16`]), for every pack but
    /// o_proj's (see `Tape::backward`). AVX-512 BF16 only.
    Bf16,
}

impl DxProduct {
    pub fn name(self) -> &'static str {
        match self {
            DxProduct::F32 => "f32",
            DxProduct::Bf16 => "bf16",
        }
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        match self {
            DxProduct::F32 => true,
            #[cfg(target_arch = "x86_64")]
            DxProduct::Bf16 => crate::ops::gemm_bf16::supported(),
            #[cfg(not(target_arch = "x86_64"))]
            DxProduct::Bf16 => false,
        }
    }

    /// This process's default, decided once: bf16 where the CPU runs it, else f32. Against
    /// PEFT's f32 gradients of a 154-token step its worst LoRA gradient is 2.3–2.5 % off,
    /// where f32 is at 2.1 % and PEFT's own bf16 mode at 37 % (o_proj's dX stays f32, see
    /// `Tape::backward`). `LOWRANK_TRAIN_DX=f32|bf16` forces one (as `train --backward-dx`;
    /// an unknown name or one the CPU cannot run prints one warning on stderr and the
    /// default runs).
    pub fn detect() -> DxProduct {
        static P: std::sync::OnceLock<DxProduct> = std::sync::OnceLock::new();
        *P.get_or_init(|| from_env("LOWRANK_TRAIN_DX", DxProduct::choose))
    }

    fn choose(forced: Option<&str>) -> (DxProduct, Option<String>) {
        let all = [DxProduct::F32, DxProduct::Bf16];
        let auto = match DxProduct::Bf16.supported() {
            true => DxProduct::Bf16,
            false => DxProduct::F32,
        };
        forced_choice(
            "LOWRANK_TRAIN_DX",
            forced,
            &all,
            auto,
            |p| p.supported(),
            |p| p.name(),
        )
    }
}

/// How the LM head's training forward (the logits h·Wᵀ) multiplies the packed head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProduct {
    /// The projections' forward product ([`TrainProduct`]).
    Packed,
    /// h and the decoded head rounded to bf16, products summed in f32 (`vdpbf16ps`,
    /// [`crate::ops::gemm_bf16::gemm_bf16_cols`]), where the backward's dX runs in bf16 too
    /// (`Llama::train_head`). Why only the head: with every projection's forward rounded
    /// so, the worst LoRA gradient of PEFT's long case was 4.9–5.5 % off (the bound is 5 %),
    /// with the MLP's alone 7.7 %; with only the head's, 2.3–2.4 % (the head on the packed
    /// product: 1.7–2.7 %). And the head's forward is a fifth of a 135 M step's
    /// multiply-adds, which the two limbs ran at ≈ half of `vdpbf16ps`'s rate. AVX-512 BF16
    /// only.
    Bf16,
}

impl HeadProduct {
    pub fn name(self) -> &'static str {
        match self {
            HeadProduct::Packed => "packed",
            HeadProduct::Bf16 => "bf16",
        }
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        match self {
            HeadProduct::Packed => true,
            HeadProduct::Bf16 => DxProduct::Bf16.supported(),
        }
    }

    /// This process's default, decided once: bf16 where the CPU runs it, else the packed
    /// product; `LOWRANK_TRAIN_HEAD=packed|bf16` forces one (a testing and timing aid; an
    /// unknown name or one the CPU cannot run prints one warning on stderr and the default
    /// runs).
    pub fn detect() -> HeadProduct {
        static P: std::sync::OnceLock<HeadProduct> = std::sync::OnceLock::new();
        *P.get_or_init(|| from_env("LOWRANK_TRAIN_HEAD", HeadProduct::choose))
    }

    fn choose(forced: Option<&str>) -> (HeadProduct, Option<String>) {
        let all = [HeadProduct::Packed, HeadProduct::Bf16];
        let auto = match HeadProduct::Bf16.supported() {
            true => HeadProduct::Bf16,
            false => HeadProduct::Packed,
        };
        forced_choice(
            "LOWRANK_TRAIN_HEAD",
            forced,
            &all,
            auto,
            |p| p.supported(),
            |p| p.name(),
        )
    }
}

impl std::str::FromStr for DxProduct {
    type Err = String;

    /// `f32` or `bf16` (any case).
    fn from_str(s: &str) -> std::result::Result<DxProduct, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(DxProduct::F32),
            "bf16" => Ok(DxProduct::Bf16),
            other => Err(format!(
                "unknown backward product {other:?} (expected f32 or bf16)"
            )),
        }
    }
}

/// The choice `choose` makes from variable `var`'s value (unset: `None`), its warning, if
/// any, printed once on stderr.
fn from_env<T>(var: &str, choose: impl Fn(Option<&str>) -> (T, Option<String>)) -> T {
    let forced = std::env::var(var).ok();
    let (p, warning) = choose(forced.as_deref());
    if let Some(w) = warning {
        eprintln!("lowrank: warning: {w}");
    }
    p
}

/// The value of variable `var` (`forced`) among `all` by name (trimmed, any case; empty or
/// `auto` gives `auto`), with the warning to print where it names none of them or one this
/// CPU cannot run (then `auto` runs).
fn forced_choice<T: Copy>(
    var: &str,
    forced: Option<&str>,
    all: &[T],
    auto: T,
    supported: impl Fn(T) -> bool,
    name: impl Fn(T) -> &'static str,
) -> (T, Option<String>) {
    let v = forced.map(|v| v.trim().to_ascii_lowercase());
    let v = match v.as_deref() {
        None | Some("") | Some("auto") => return (auto, None),
        Some(v) => v,
    };
    match all.iter().find(|&&t| name(t) == v) {
        Some(&t) if supported(t) => (t, None),
        Some(&t) => (
            auto,
            Some(format!(
                "{var}={}: this CPU cannot run it; using {}",
                name(t),
                name(auto)
            )),
        ),
        None => {
            let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
            let msg = format!(
                "{var}={}: unknown (expected one of {}, auto); using {}",
                forced.unwrap_or_default(),
                names.join(", "),
                name(auto)
            );
            (auto, Some(msg))
        }
    }
}

/// Most f32 bytes one dequantized chunk of a weight takes (a 4096 × 576 head chunk of the
/// default model is 9.4 MB): the whole f32 weight is never held for a big head or MLP pack.
const CHUNK_BYTES: usize = 16 << 20;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// A dequantized chunk of a weight (at most CHUNK_BYTES), kept between calls: decoding
    /// into fresh zero-filled buffers cost page faults and memsets on every product.
    static CHUNK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the dequantized forward decodes whole chunks first (`LOWRANK_TRAIN_DECODE=chunks`,
/// for timing against the default, decoding into the gemm's panels), read once.
#[cfg(target_arch = "x86_64")]
fn decode_in_chunks() -> bool {
    static C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *C.get_or_init(|| {
        std::env::var("LOWRANK_TRAIN_DECODE").is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunks"))
    })
}

/// Runs `f(r0, n, rows)` on rows r0..r0+n of `w` decoded (exactly) into this thread's
/// reused buffer, for chunks of `rows` rows (rounded down to whole tiles, where chunks
/// must start) in order over the whole pack.
#[cfg(target_arch = "x86_64")]
fn for_decoded_chunks(
    w: &QMatrix,
    rows: usize,
    mut f: impl FnMut(usize, usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (out, inp) = (w.out_dim(), w.in_dim());
    let rows = rows.max(super::TILE) / super::TILE * super::TILE;
    CHUNK.with(|chunk| -> Result<()> {
        let mut chunk = chunk.borrow_mut();
        for r0 in (0..out).step_by(rows) {
            let n = rows.min(out - r0);
            if chunk.len() < n * inp {
                chunk.resize(n * inp, 0.0);
            }
            let wc = &mut chunk[..n * inp];
            w.dequantize_rows_into(r0, wc)?;
            f(r0, n, wc)?;
        }
        Ok(())
    })
}

/// Training's forward product y = x·Wᵀ through the packed `w` by `product`.
/// x: [n, in] (f32, CPU) → [n, out]
pub fn qlinear_train(x: &Tensor, w: &QMatrix, product: TrainProduct) -> Result<Tensor> {
    match product {
        TrainProduct::Limbs => qlinear_fine(x, w),
        TrainProduct::Dequantized => dequantized_linear(x, w),
    }
}

/// [`qlinear_train`] of a fused pack, split into its targets' outputs: consecutive column
/// parts of `widths` (summing to the pack's out dim), each [n, width]. Each product writes
/// the parts straight into their own tensors where the widths allow it (the limbs' where
/// they fall on the kernel's tile groups, [`QMatrix::matmul_fine_parts`]; the dequantized
/// one's on whole 16-row tiles, one gemm per part); otherwise the whole product is split.
pub fn qlinear_train_parts(
    x: &Tensor,
    w: &QMatrix,
    product: TrainProduct,
    widths: &[usize],
) -> Result<Vec<Tensor>> {
    let as_tensors = |parts, rows| parts_tensors(parts, rows, widths, x.device());
    #[cfg(target_arch = "x86_64")]
    if product == TrainProduct::Dequantized {
        if let Some(parts) = dequantized_linear_parts(x, w, widths)? {
            return as_tensors(parts, x.dim(0)?);
        }
    }
    if product == TrainProduct::Limbs && !x.track_op() {
        let parts = with_rows(x, w.in_dim(), |v, rows| {
            Ok(w.matmul_fine_parts(v, rows, widths).map(|p| (p, rows)))
        })?;
        if let Some(Some((parts, rows))) = parts {
            return as_tensors(parts, rows);
        }
    }
    crate::ops::split_cols(&qlinear_train(x, w, product)?, widths)
}

/// [`qlinear_train`] as a row-major vector [n·out] (no tensor, and no copy out of one,
/// where the dequantized product runs on our gemm).
pub fn qlinear_train_vec(x: &Tensor, w: &QMatrix, product: TrainProduct) -> Result<Vec<f32>> {
    let mut y = Vec::new();
    qlinear_train_into(x, w, product, &mut y)?;
    Ok(y)
}

/// [`qlinear_train_vec`] into `y` (its contents replaced). The limbs' product and the
/// dequantized one on our gemm write into y's allocation where it is big enough: the head's chunks of 256 × 49152 logits reuse one
/// 50 MB buffer, where a fresh one per chunk was faulted in and cleared by the kernel page
/// by page (2.5 % of an int8 step on a 2-core EPYC).
pub fn qlinear_train_into(
    x: &Tensor,
    w: &QMatrix,
    product: TrainProduct,
    y: &mut Vec<f32>,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if product == TrainProduct::Dequantized && dequantized_linear_own_into(x, w, chunk_rows(w), y)?
    {
        return Ok(());
    }
    // The limbs' product is a vector already: taken as it is, not through a tensor and a
    // copy out of it (that copy was a second 50 MB buffer per head chunk).
    if product == TrainProduct::Limbs {
        let done = with_rows(x, w.in_dim(), |v, rows| {
            w.matmul_fine_into(v, rows, y);
            Ok(())
        })?;
        if done.is_some() {
            return Ok(());
        }
    }
    *y = qlinear_train(x, w, product)?.flatten_all()?.to_vec1()?;
    Ok(())
}

/// y = x·Wᵀ [n, out] with x [n, in] and the decoded W rounded to bf16 and the products
/// summed in f32 ([`HeadProduct::Bf16`]), into `y` (its contents replaced, its allocation
/// reused where big enough: the head's chunks of logits share one buffer). False, with y
/// untouched, where it does not run: no AVX-512 BF16, x not a plain f32 matrix on the CPU
/// (or tracked), or fewer than [`crate::ops::gemm::MIN_ROWS`] rows (the weight's decoding
/// would cost more than the product).
pub fn bf16_linear_into(x: &Tensor, w: &QMatrix, y: &mut Vec<f32>) -> Result<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::gemm::MIN_ROWS;
        let (out, inp) = (w.out_dim(), w.in_dim());
        let plain = x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 2;
        if !HeadProduct::Bf16.supported() || !plain || x.track_op() {
            return Ok(false);
        }
        let (m, k) = x.dims2()?;
        if m < MIN_ROWS || k != inp {
            return Ok(false);
        }
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let Some(xv) = crate::ops::f32s(&xs) else {
            return Ok(false);
        };
        let xv = &xv[xl.start_offset()..][..m * inp];
        // W's rows r0..r0+n (one 16-row tile), depths j0..j0+nc (j0 a multiple of 32):
        // decoded exactly as the other products multiply them, then rounded by the packing.
        let fill = |r0: usize, n: usize, j0: usize, nc: usize, dst: &mut [f32]| {
            debug_assert!(n <= super::TILE && dst.len() == n * nc);
            w.tile_span_into(r0 / super::TILE, j0, nc, dst)
        };
        y.clear();
        y.reserve(m * out);
        // SAFETY: the CPU runs the bf16 product (checked above); y has room for m rows of
        // `out` floats, each written by the product; x holds m rows of `inp` floats.
        unsafe {
            crate::ops::gemm_bf16::gemm_bf16_cols(m, out, inp, xv, &fill, y.as_mut_ptr(), out);
            y.set_len(m * out);
        }
        Ok(true)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w, y);
        Ok(false)
    }
}

/// x·Wᵀ with W dequantized a chunk of whole 16-row tiles at a time, the chunks' outputs
/// side by side. x: [n, in] → [n, out]
fn dequantized_linear(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = dequantized_linear_own(x, w, chunk_rows(w))? {
        return Ok(Tensor::from_vec(y, (x.dim(0)?, w.out_dim()), x.device())?);
    }
    dequantized_linear_chunked(x, w, CHUNK_BYTES / (4 * w.in_dim().max(1)))
}

/// The chunk the dequantized forward decodes at a time on our gemm: none by default (the
/// gemm decodes into its panels), CHUNK_BYTES of rows with `LOWRANK_TRAIN_DECODE=chunks`.
#[cfg(target_arch = "x86_64")]
fn chunk_rows(w: &QMatrix) -> Option<usize> {
    decode_in_chunks().then(|| CHUNK_BYTES / (4 * w.in_dim().max(1)))
}

/// [`dequantized_linear`] with chunks of `rows` output rows (rounded down to whole tiles).
fn dequantized_linear_chunked(x: &Tensor, w: &QMatrix, rows: usize) -> Result<Tensor> {
    let (out, inp) = (w.out_dim(), w.in_dim());
    let rows = rows.max(super::TILE) / super::TILE * super::TILE;
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = dequantized_linear_own(x, w, Some(rows))? {
        return Ok(Tensor::from_vec(y, (x.dim(0)?, out), x.device())?);
    }
    let mut parts = Vec::with_capacity(out.div_ceil(rows));
    for r0 in (0..out).step_by(rows) {
        let n = rows.min(out - r0);
        let wc = Tensor::from_vec(w.dequantize_rows(r0, n)?, (n, inp), x.device())?;
        parts.push(crate::ops::linear(x, &wc)?); // [n_x, n]
    }
    crate::backward::cat_or_single(parts, 1)
}

/// [`dequantized_linear_chunked`] on our f32 gemm (the product's n·out floats), or
/// `None` where the candle path must take it (another f32 path, a tracked x, fewer than
/// `MIN_ROWS` rows). Without `chunk_rows` the gemm decodes the pack 16 rows and one depth
/// block at a time straight into its panels ([`crate::ops::gemm::gemm_fill_cols`]): no f32
/// chunk of the weight, no tensor per chunk, no concatenation. With it, chunks of that
/// many rows are decoded into a reused buffer first (what `LOWRANK_TRAIN_DECODE=chunks`
/// runs, for timing): an extra write and read of every decoded weight.
#[cfg(target_arch = "x86_64")]
fn dequantized_linear_own(
    x: &Tensor,
    w: &QMatrix,
    chunk_rows: Option<usize>,
) -> Result<Option<Vec<f32>>> {
    let mut y = Vec::new();
    Ok(dequantized_linear_own_into(x, w, chunk_rows, &mut y)?.then_some(y))
}

/// [`dequantized_linear_own`] into `y`: its contents replaced by the n·out floats (its
/// allocation kept where big enough) and `true`, or `false` (y untouched) where the candle
/// path must take it.
#[cfg(target_arch = "x86_64")]
fn dequantized_linear_own_into(
    x: &Tensor,
    w: &QMatrix,
    chunk_rows: Option<usize>,
    y: &mut Vec<f32>,
) -> Result<bool> {
    use crate::ops::gemm::{gemm_raw, BLayout};
    if !own_gemm_rows(x)? {
        return Ok(false);
    }
    let (out, inp) = (w.out_dim(), w.in_dim());
    let done = with_rows(x, inp, |xv, m| {
        let Some(rows) = chunk_rows else {
            decoded_cols_product_into(xv, m, w, 0, out, y);
            return Ok(());
        };
        y.clear();
        y.reserve(m * out);
        for_decoded_chunks(w, rows, |r0, n, wc| {
            // SAFETY: y has room for m rows of `out` floats; this chunk writes columns
            // r0..r0+n of each (r0 + n ≤ out), and the chunks together write every column.
            unsafe {
                gemm_raw::<false>(
                    m,
                    n,
                    inp,
                    xv,
                    inp,
                    wc,
                    BLayout::Cols,
                    y.as_mut_ptr().add(r0),
                    out,
                    false,
                )
            };
            Ok(())
        })?;
        // SAFETY: every float of the m·out written above (the loop covers 0..out).
        unsafe { y.set_len(m * out) };
        Ok(())
    })?;
    Ok(done.is_some())
}

/// Whether x suits our own f32 gemm's products: that gemm path runs, x is an untracked
/// matrix of at least [`crate::ops::gemm::MIN_ROWS`] rows (below that the weight's decoding
/// costs more than the product).
#[cfg(target_arch = "x86_64")]
fn own_gemm_rows(x: &Tensor) -> Result<bool> {
    use crate::ops::gemm::{GemmKernel, MIN_ROWS};
    Ok(GemmKernel::detect().is_own() && !x.track_op() && x.rank() == 2 && x.dim(0)? >= MIN_ROWS)
}

/// x·W[c0..c0 + n]ᵀ [m, n] on our f32 gemm, which decodes those rows of the pack 16 rows
/// and one depth block at a time straight into its panels (c0 a multiple of 16, and n too
/// unless the rows run to the pack's end). xv: m rows of the pack's in dim.
#[cfg(target_arch = "x86_64")]
fn decoded_cols_product(xv: &[f32], m: usize, w: &QMatrix, c0: usize, n: usize) -> Vec<f32> {
    let mut y = Vec::new();
    decoded_cols_product_into(xv, m, w, c0, n, &mut y);
    y
}

/// [`decoded_cols_product`] into `y` (its contents replaced, its allocation kept where big
/// enough).
#[cfg(target_arch = "x86_64")]
fn decoded_cols_product_into(
    xv: &[f32],
    m: usize,
    w: &QMatrix,
    c0: usize,
    n: usize,
    y: &mut Vec<f32>,
) {
    use crate::ops::gemm::gemm_fill_cols;
    let inp = w.in_dim();
    assert!(xv.len() >= m * inp && c0.is_multiple_of(super::TILE) && c0 + n <= w.out_dim());
    assert!(n.is_multiple_of(super::TILE) || c0 + n == w.out_dim());
    // W's rows c0 + r0.. (one 16-row tile: r0 is a multiple of 16, and the tile holds n
    // rows where the product does), columns j0..j0+nc (j0 a multiple of 32): decoded
    // exactly, as in the chunks.
    let fill = |r0: usize, rn: usize, j0: usize, nc: usize, dst: &mut [f32]| {
        debug_assert!(rn <= super::TILE && dst.len() == rn * nc);
        w.tile_span_into((c0 + r0) / super::TILE, j0, nc, dst)
    };
    y.clear();
    y.reserve(m * n);
    // SAFETY: y has room for m rows of n floats, each written by the product; xv holds m
    // rows of `inp` floats.
    unsafe {
        gemm_fill_cols(m, n, inp, xv, inp, &fill, y.as_mut_ptr(), n);
        y.set_len(m * n);
    }
}

/// [`dequantized_linear_own`] of a fused pack into its targets' column parts of `widths`
/// (each [m, width], written in place by its own product), or `None` where that does not
/// run: as there, or chunked decoding, or a part other than the last not on whole tiles.
#[cfg(target_arch = "x86_64")]
fn dequantized_linear_parts(
    x: &Tensor,
    w: &QMatrix,
    widths: &[usize],
) -> Result<Option<Vec<Vec<f32>>>> {
    let Some((_, inner)) = widths.split_last() else {
        return Ok(None);
    };
    if !own_gemm_rows(x)?
        || chunk_rows(w).is_some()
        || widths.iter().sum::<usize>() != w.out_dim()
        || inner.iter().any(|wd| !wd.is_multiple_of(super::TILE))
    {
        return Ok(None);
    }
    with_rows(x, w.in_dim(), |xv, m| {
        let mut c0 = 0;
        Ok(widths
            .iter()
            .map(|&wd| {
                let y = decoded_cols_product(xv, m, w, c0, wd);
                c0 += wd;
                y
            })
            .collect())
    })
}

/// The frozen part of an input gradient through the packed `w`: dX = Σ_t dY_t·W_t [N, in],
/// where the pack's rows are the targets' weights one after another and `dys[t]` [N, out_t]
/// is the gradient of the t-th (`dys` together span the pack's rows: [N, out]). W is
/// decoded exactly (the weights the forward multiplied): where every target starts on a
/// 16-row tile, 16 rows at a time straight into our gemm's panels, one product per target
/// added into dX in target order; else a chunk of rows at a time into one reused
/// per-thread buffer, each chunk's product added straight into dX in row order. Neither
/// the f32 pack, nor the concatenated dYs, nor a partial sum per chunk is ever built, and
/// the result does not depend on the thread count.
///
/// `None` where this path does not run (another f32 gemm path, fewer than `MIN_ROWS`
/// rows, a dY that is not an f32 CPU matrix): the caller multiplies another way.
pub fn dequantized_input_grad(
    dys: &[&Tensor],
    w: &QMatrix,
    product: DxProduct,
) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        let rows = CHUNK_BYTES / (4 * w.in_dim().max(1));
        dequantized_input_grad_own(dys, w, rows, product)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dys, w, product);
        Ok(None)
    }
}

/// [`dequantized_input_grad`] by `product`: in f32 with chunks of `rows` pack rows (rounded
/// down to whole tiles), or in bf16 with the pack decoded a tile at a time into the panels of
/// [`crate::ops::gemm_bf16`] (no chunk buffer).
#[cfg(target_arch = "x86_64")]
fn dequantized_input_grad_own(
    dys: &[&Tensor],
    w: &QMatrix,
    rows: usize,
    product: DxProduct,
) -> Result<Option<Tensor>> {
    use crate::error::ModelError;
    use crate::ops::gemm::{GemmKernel, MIN_ROWS};
    let (out, inp) = (w.out_dim(), w.in_dim());
    let plain =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.rank() == 2;
    let Some(first) = dys.first() else {
        return Err(ModelError::Invalid("input gradient of no targets".into()));
    };
    let bf16 = product == DxProduct::Bf16 && product.supported();
    if !(bf16 || GemmKernel::detect().is_own()) || !dys.iter().all(|d| plain(d)) {
        return Ok(None);
    }
    let m = first.dim(0)?;
    let mut cols = Vec::with_capacity(dys.len());
    for d in dys {
        let (rm, c) = d.dims2()?;
        if rm != m {
            return Err(ModelError::Invalid(format!(
                "input gradient: dY blocks of {m} and {rm} rows"
            )));
        }
        cols.push(c);
    }
    if cols.iter().sum::<usize>() != out {
        return Err(ModelError::Invalid(format!(
            "input gradient: dY of {:?} columns for a {out}-row pack",
            cols
        )));
    }
    if m < MIN_ROWS {
        return Ok(None);
    }
    let dys: Vec<Tensor> = dys
        .iter()
        .map(|d| d.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = dys.iter().map(|d| d.storage_and_layout()).collect();
    let mut views: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for ((s, l), &c) in guards.iter().zip(&cols) {
        let Some(v) = crate::ops::f32s(s) else {
            return Ok(None);
        };
        views.push(&v[l.start_offset()..][..m * c]);
    }
    let dx = input_grad_views(&views, &cols, m, w, rows, bf16)?;
    drop(guards);
    Ok(Some(Tensor::from_vec(dx, (m, inp), first.device())?))
}

/// [`dequantized_input_grad`] of one row-major dY [m, out] given as floats (the head's
/// dL/dlogits, which the loss keeps in one reused buffer): dX [m, in], or `None` where
/// that path does not run.
pub fn dequantized_input_grad_rows(
    dy: &[f32],
    m: usize,
    w: &QMatrix,
    product: DxProduct,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    use crate::error::ModelError;
    let (out, inp) = (w.out_dim(), w.in_dim());
    if dy.len() != m * out {
        return Err(ModelError::Invalid(format!(
            "input gradient: {} floats of dY for {m} rows of a {out}-row pack",
            dy.len()
        )));
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::gemm::{GemmKernel, MIN_ROWS};
        let bf16 = product == DxProduct::Bf16 && product.supported();
        if device.is_cpu() && (bf16 || GemmKernel::detect().is_own()) && m >= MIN_ROWS {
            let rows = CHUNK_BYTES / (4 * inp.max(1));
            let dx = input_grad_views(&[dy], &[out], m, w, rows, bf16)?;
            return Ok(Some(Tensor::from_vec(dx, (m, inp), device)?));
        }
    }
    let _ = (product, inp, device);
    Ok(None)
}

/// dX [m, in] = Σ_t dY_t·W_t for the dY blocks `views` (m rows of `cols[t]` floats each,
/// together the pack's out rows) on the bf16 product (`bf16`, which the CPU runs) or on our
/// f32 gemm in chunks of `rows` pack rows (which the CPU runs).
#[cfg(target_arch = "x86_64")]
fn input_grad_views(
    views: &[&[f32]],
    cols: &[usize],
    m: usize,
    w: &QMatrix,
    rows: usize,
    bf16: bool,
) -> Result<Vec<f32>> {
    use crate::ops::gemm::{gemm_fill_rows, gemm_raw, BLayout};
    let (out, inp) = (w.out_dim(), w.in_dim());
    let mut dx: Vec<f32> = Vec::with_capacity(m * inp);
    if bf16 {
        // B's rows r0..r0+n (one 16-row tile), columns j0.. (a multiple of 32): decoded
        // exactly as the forward multiplied them, then rounded by the packing.
        let fill = |r0: usize, n: usize, j0: usize, nc: usize, dst: &mut [f32]| {
            debug_assert!(n <= super::TILE && dst.len() == n * nc);
            w.tile_span_into(r0 / super::TILE, j0, nc, dst)
        };
        // SAFETY: the CPU runs it (`supported`); dx has room for m rows of `inp` floats,
        // each written by the product; the views hold m rows of their widths.
        unsafe {
            crate::ops::gemm_bf16::gemm_bf16(m, inp, views, cols, &fill, dx.as_mut_ptr(), inp);
            dx.set_len(m * inp);
        }
        return Ok(dx);
    }
    // Each target's dY·W_t on our gemm with W_t's tiles decoded straight into its panels,
    // where every target starts on a tile (else, or with `LOWRANK_TRAIN_DECODE=chunks`,
    // chunks of `rows` rows are decoded into a reused buffer first).
    let starts: Vec<usize> = cols
        .iter()
        .scan(0, |off, &c| {
            *off += c;
            Some(*off - c)
        })
        .collect();
    if !decode_in_chunks() && starts.iter().all(|s| s.is_multiple_of(super::TILE)) && out > 0 {
        for (t, (dy, &c)) in views.iter().zip(cols).enumerate() {
            let off = starts[t];
            // W_t's rows r0..r0+n (pack rows off + r0.., one tile), columns j0..j0+nc.
            let fill = |r0: usize, n: usize, j0: usize, nc: usize, dst: &mut [f32]| {
                debug_assert!(n <= super::TILE && dst.len() == n * nc);
                w.tile_span_into((off + r0) / super::TILE, j0, nc, dst)
            };
            // SAFETY: dx has room for m rows of `inp` floats, all written by the first
            // product (t = 0) and added to by the rest; dY_t holds m rows of c floats.
            unsafe { gemm_fill_rows(m, inp, c, dy, c, &fill, dx.as_mut_ptr(), inp, t > 0) };
        }
        // SAFETY: the first product wrote every float of the m·inp.
        unsafe { dx.set_len(m * inp) };
        return Ok(dx);
    }
    let mut written = false;
    for_decoded_chunks(w, rows, |r0, n, wc| {
        // The chunk's rows r0..r0+n fall in one or more targets' blocks [off, off + c).
        let mut off = 0;
        for (dy, &c) in views.iter().zip(cols) {
            let (a, b) = (r0.max(off), (r0 + n).min(off + c));
            if a < b {
                // SAFETY: dx has room for m rows of `inp` floats, all written by the
                // first product (written = false) and added to by the rest; dY's block
                // from column a − off holds m rows of b − a floats, c apart.
                unsafe {
                    gemm_raw::<false>(
                        m,
                        inp,
                        b - a,
                        &dy[a - off..],
                        c,
                        &wc[(a - r0) * inp..(b - r0) * inp],
                        BLayout::Rows,
                        dx.as_mut_ptr(),
                        inp,
                        written,
                    )
                };
                written = true;
            }
            off += c;
        }
        Ok(())
    })?;
    if !written {
        dx.resize(m * inp, 0.0); // a pack of no rows: dX = 0
    }
    // SAFETY: the first product wrote every float of the m·inp (or the resize did).
    unsafe { dx.set_len(m * inp) };
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused pack's product into its targets' parts is, part by part, bitwise the whole
    /// product's columns, for both training products (each writing the parts in place where
    /// the widths allow it, else splitting): q/k/v-like parts, a ragged last part, and parts
    /// off the tile grid.
    #[test]
    fn fused_products_split_into_parts_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let cases: [(usize, &[usize]); 4] = [
            (96, &[64, 32, 32]),
            (64, &[96, 96]),
            (70, &[32, 64, 21]),
            (40, &[24, 40, 48]),
        ];
        for (inp, widths) in cases {
            let out: usize = widths.iter().sum();
            let wv: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let w = QMatrix::from_f32(&wv, out, inp).unwrap();
            for n in [5, crate::ops::gemm::MIN_ROWS + 3] {
                let xv: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-2f32..2.0)).collect();
                let x = Tensor::from_slice(&xv, (n, inp), &candle_core::Device::Cpu).unwrap();
                for product in [TrainProduct::Limbs, TrainProduct::Dequantized] {
                    let whole: Vec<f32> = qlinear_train(&x, &w, product)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let parts = qlinear_train_parts(&x, &w, product, widths).unwrap();
                    assert_eq!(parts.len(), widths.len());
                    let mut off = 0;
                    for (p, &wd) in parts.iter().zip(widths) {
                        assert_eq!(p.dims2().unwrap(), (n, wd));
                        let got: Vec<u32> = p
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let want: Vec<u32> = (0..n)
                            .flat_map(|r| whole[r * out + off..][..wd].iter().map(|v| v.to_bits()))
                            .collect();
                        assert!(
                            got == want,
                            "{product:?} widths {widths:?} n {n} part at {off}"
                        );
                        off += wd;
                    }
                }
            }
        }
    }

    /// The dequantized product is x times the weights the packing holds, in f64 up to f32
    /// accumulation error, whatever the chunking (a chunk placed at the wrong rows, or a
    /// ragged last chunk lost, fails it); the limbs agree with it to their rounding.
    #[test]
    fn dequantized_product_multiplies_the_packed_weights() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // A few rows (candle's product) and enough for the f32 gemm path's own; a pack of one
        // depth block and column block of the gemm, and one of several (decoded straight into
        // the gemm's panels by default: tiles and depth spans of the pack).
        let sizes = [
            (5, 88, 96),
            (crate::ops::gemm::MIN_ROWS + 3, 88, 96),
            (70, 600, 672),
        ];
        for (n, out, inp) in sizes {
            let wv: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let xv: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-2f32..2.0)).collect();
            let w = QMatrix::from_f32(&wv, out, inp).unwrap();
            let wd = w.dequantize();
            let x = Tensor::from_slice(&xv, (n, inp), &candle_core::Device::Cpu).unwrap();
            let want: Vec<f64> = (0..n * out)
                .map(|k| {
                    let (r, o) = (k / out, k % out);
                    (0..inp)
                        .map(|i| xv[r * inp + i] as f64 * wd[o * inp + i] as f64)
                        .sum()
                })
                .collect();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let off = |y: &Tensor| -> f64 {
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(y.len(), want.len());
                y.iter()
                    .zip(&want)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()))
                    / scale
            };
            for rows in [16, 32, 48, 1 << 20] {
                let y = dequantized_linear_chunked(&x, &w, rows).unwrap();
                assert_eq!(y.dims(), &[n, out]);
                assert!(off(&y) < 1e-6, "chunks of {rows} rows: off by {}", off(&y));
            }
            let y = qlinear_train(&x, &w, TrainProduct::Dequantized).unwrap();
            assert!(off(&y) < 1e-6);
            // The vector form is the same floats; chunks not of whole tiles start on tiles.
            let yv = qlinear_train_vec(&x, &w, TrainProduct::Dequantized).unwrap();
            assert_eq!(yv, y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            #[cfg(target_arch = "x86_64")]
            if let Some(v) = dequantized_linear_own(&x, &w, Some(20)).unwrap() {
                let v = Tensor::from_vec(v, (n, out), x.device()).unwrap();
                assert!(off(&v) < 1e-6, "chunks of 20 rows: off by {}", off(&v));
            }
            let limbs = qlinear_train(&x, &w, TrainProduct::Limbs).unwrap();
            let e = off(&limbs);
            assert!(e > 0.0 && e < 1e-4, "two limbs off by {e}");
            // The head's bf16 product: the f64 product of the bf16-rounded x and weights, up
            // to f32 accumulation error (and so off the unrounded one by the rounding);
            // nothing where it does not run, the buffer untouched.
            let mut yb = vec![7.0f32; 3];
            let ran = bf16_linear_into(&x, &w, &mut yb).unwrap();
            let runs = HeadProduct::Bf16.supported() && n >= crate::ops::gemm::MIN_ROWS;
            assert_eq!(ran, runs, "{n} rows");
            if !ran {
                assert_eq!(yb, [7.0; 3]);
                continue;
            }
            let round = |v: f32| half::bf16::from_f32(v).to_f64();
            let worst = (0..n * out).fold(0f64, |m, k| {
                let (r, o) = (k / out, k % out);
                let exact: f64 = (0..inp)
                    .map(|i| round(xv[r * inp + i]) * round(wd[o * inp + i]))
                    .sum();
                m.max((yb[k] as f64 - exact).abs())
            }) / scale;
            assert_eq!(yb.len(), n * out);
            assert!(
                worst < 1e-6,
                "bf16 product off its rounded operands' by {worst}"
            );
            let yt = Tensor::from_vec(yb, (n, out), x.device()).unwrap();
            assert!(off(&yt) > 1e-4, "the bf16 product rounded nothing");
        }
    }

    /// The input gradient through a pack of several targets is Σ_t dY_t·W_t of the weights
    /// the packing holds, in f64 up to f32 accumulation error, whatever the chunking: target
    /// blocks (40, 24, 32 rows) that start inside chunks, a ragged last chunk. A chunk's
    /// product written instead of added, or a dY block read at the wrong column, fails it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn input_grad_decodes_chunks_into_each_targets_columns() {
        use crate::ops::gemm::{GemmKernel, MIN_ROWS};
        use rand::{Rng, SeedableRng};
        if !GemmKernel::detect().is_own() {
            eprintln!("skipped: our f32 gemm does not run here (nothing to test)");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // Targets starting mid-tile (decoded in chunks first), and starting on tiles
        // (decoded into the gemm's panels), the last with several depth and column blocks.
        let m = MIN_ROWS + 3;
        let cases: [(usize, Vec<usize>); 3] = [
            (72, vec![40, 24, 32]),
            (72, vec![48, 16, 32]),
            (600, vec![336, 32, 48]),
        ];
        for (inp, cols) in cases {
            let out: usize = cols.iter().sum();
            let wv: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let w = QMatrix::from_f32(&wv, out, inp).unwrap();
            let wd = w.dequantize();
            let dev = candle_core::Device::Cpu;
            let dys: Vec<Tensor> = cols
                .iter()
                .map(|&c| {
                    let v: Vec<f32> = (0..m * c).map(|_| rng.random_range(-2f32..2.0)).collect();
                    Tensor::from_vec(v, (m, c), &dev).unwrap()
                })
                .collect();
            let dyv: Vec<Vec<f32>> = dys
                .iter()
                .map(|d| d.flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            // Σ_t dY_t·W_t in f64, of the operands as given or each rounded to bf16 first.
            let reference = |round: bool| -> Vec<f64> {
                let r = |v: f32| match round {
                    true => half::bf16::from_f32(v).to_f64(),
                    false => v as f64,
                };
                let mut want = vec![0f64; m * inp];
                let mut off = 0;
                for (d, &c) in dyv.iter().zip(&cols) {
                    for row in 0..m {
                        for o in 0..c {
                            for i in 0..inp {
                                want[row * inp + i] +=
                                    r(d[row * c + o]) * r(wd[(off + o) * inp + i]);
                            }
                        }
                    }
                    off += c;
                }
                want
            };
            let refs: Vec<&Tensor> = dys.iter().collect();
            let off_by = |got: &Tensor, want: &[f64]| -> f64 {
                assert_eq!(got.dims(), &[m, inp]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                got.iter()
                    .zip(want)
                    .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()))
                    / scale
            };
            let exact = reference(false);
            for rows in [16, 32, 48, 1 << 20] {
                let got = dequantized_input_grad_own(&refs, &w, rows, DxProduct::F32)
                    .unwrap()
                    .unwrap();
                let e = off_by(&got, &exact);
                assert!(e < 1e-6, "chunks of {rows} rows: off by {e}");
            }
            // In bf16: the rounded operands' product to f32 accumulation error, and within
            // bf16's rounding of the exact one (a pack row placed at the wrong depth, or a target
            // block's columns misread, is off by far more).
            if DxProduct::Bf16.supported() {
                let got = dequantized_input_grad_own(&refs, &w, 16, DxProduct::Bf16)
                    .unwrap()
                    .unwrap();
                let (e, e_exact) = (off_by(&got, &reference(true)), off_by(&got, &exact));
                assert!(
                    e < 1e-6,
                    "bf16: off by {e} from the rounded operands' product"
                );
                assert!(
                    e_exact > 1e-5 && e_exact < 1e-2,
                    "bf16: off by {e_exact} from f32's"
                );
            } else {
                eprintln!("bf16 half skipped: this CPU has no AVX-512 BF16");
            }
            // The public entry point, and its refusals: a dY of the wrong width is an error,
            // too few rows go back to the caller.
            assert!(dequantized_input_grad(&refs, &w, DxProduct::F32)
                .unwrap()
                .is_some());
            assert!(dequantized_input_grad(&refs[..2], &w, DxProduct::F32).is_err());
            let few: Vec<Tensor> = dys
                .iter()
                .map(|d| d.narrow(0, 0, MIN_ROWS - 1).unwrap())
                .collect();
            let few: Vec<&Tensor> = few.iter().collect();
            assert!(dequantized_input_grad(&few, &w, DxProduct::Bf16)
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn the_dx_product_follows_the_cpu_and_the_variable() {
        let auto = match DxProduct::Bf16.supported() {
            true => DxProduct::Bf16,
            false => DxProduct::F32,
        };
        assert_eq!("BF16".parse::<DxProduct>(), Ok(DxProduct::Bf16));
        assert!("int8"
            .parse::<DxProduct>()
            .unwrap_err()
            .contains("\"int8\""));
        assert_eq!(DxProduct::choose(None), (auto, None));
        assert_eq!(DxProduct::choose(Some(" AUTO ")), (auto, None));
        assert_eq!(DxProduct::choose(Some("f32")), (DxProduct::F32, None));
        let (p, w) = DxProduct::choose(Some("bf16"));
        match DxProduct::Bf16.supported() {
            true => assert_eq!((p, w), (DxProduct::Bf16, None)),
            false => {
                assert_eq!(p, DxProduct::F32);
                assert!(w.expect("a warning").contains("cannot run"));
            }
        }
        let (p, w) = DxProduct::choose(Some("int4"));
        assert_eq!(p, auto);
        assert!(w
            .expect("a warning")
            .contains("LOWRANK_TRAIN_DX=int4: unknown"));
    }

    #[test]
    fn the_head_product_follows_the_cpu_and_the_variable() {
        let auto = match HeadProduct::Bf16.supported() {
            true => HeadProduct::Bf16,
            false => HeadProduct::Packed,
        };
        assert_eq!(HeadProduct::choose(None), (auto, None));
        assert_eq!(HeadProduct::choose(Some(" Auto")), (auto, None));
        assert_eq!(
            HeadProduct::choose(Some("PACKED")),
            (HeadProduct::Packed, None)
        );
        let (p, w) = HeadProduct::choose(Some("bf16"));
        match HeadProduct::Bf16.supported() {
            true => assert_eq!((p, w), (HeadProduct::Bf16, None)),
            false => {
                assert_eq!(p, HeadProduct::Packed);
                assert!(w.expect("a warning").contains("cannot run"));
            }
        }
        let (p, w) = HeadProduct::choose(Some("limbs"));
        assert_eq!(p, auto);
        assert!(w
            .expect("a warning")
            .contains("LOWRANK_TRAIN_HEAD=limbs: unknown"));
    }

    #[test]
    fn the_product_follows_the_kernel_and_the_variable() {
        let (p, w) = TrainProduct::choose(None, Kernel::Portable);
        assert_eq!((p, w), (TrainProduct::Dequantized, None));
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                TrainProduct::choose(None, Kernel::Vnni512).0,
                TrainProduct::Limbs
            );
            assert_eq!(
                TrainProduct::choose(Some("auto"), Kernel::Avx2).0,
                TrainProduct::Dequantized
            );
            assert_eq!(
                TrainProduct::choose(Some(" Dequantized "), Kernel::Vnni512),
                (TrainProduct::Dequantized, None)
            );
        }
        assert_eq!(
            TrainProduct::choose(Some("limbs"), Kernel::Portable),
            (TrainProduct::Limbs, None)
        );
        let (p, w) = TrainProduct::choose(Some("bf16"), Kernel::Portable);
        assert_eq!(p, TrainProduct::Dequantized);
        assert!(w.expect("a warning").contains("LOWRANK_TRAIN_PRODUCT=bf16"));
    }

    /// The head's row-major forms are the tensor paths' floats: `qlinear_train_into` into a
    /// reused buffer (longer, then shorter, holding stale values) and
    /// `dequantized_input_grad_rows` against `dequantized_input_grad`, bit for bit, on every
    /// dX product this CPU runs; a dY of the wrong length is an error.
    #[test]
    fn row_major_head_forms_match_the_tensor_paths() {
        use crate::ops::gemm::MIN_ROWS;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (out, inp) = (88, 96);
        let wv: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let w = QMatrix::from_f32(&wv, out, inp).unwrap();
        let dev = candle_core::Device::Cpu;
        let mut buf = vec![7.0f32; 3 * (MIN_ROWS + 9) * out];
        for m in [MIN_ROWS + 5, 3] {
            let xv: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-2f32..2.0)).collect();
            let x = Tensor::from_slice(&xv, (m, inp), &dev).unwrap();
            for product in [TrainProduct::Limbs, TrainProduct::Dequantized] {
                let want = qlinear_train(&x, &w, product).unwrap();
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                let (ptr, cap) = (buf.as_ptr(), buf.capacity());
                qlinear_train_into(&x, &w, product, &mut buf).unwrap();
                assert_eq!(buf.len(), m * out);
                // Our products write into the buffer's allocation (big enough here).
                #[cfg(target_arch = "x86_64")]
                if product == TrainProduct::Limbs || own_gemm_rows(&x).unwrap() {
                    assert_eq!((buf.as_ptr(), buf.capacity()), (ptr, cap), "{product:?}");
                }
                let _ = (ptr, cap);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&buf), bits(&want), "{product:?}, {m} rows");
            }
            let dy: Vec<f32> = (0..m * out).map(|_| rng.random_range(-1f32..1.0)).collect();
            let dyt = Tensor::from_slice(&dy, (m, out), &dev).unwrap();
            for product in [DxProduct::F32, DxProduct::Bf16] {
                let a = dequantized_input_grad(&[&dyt], &w, product).unwrap();
                let b = dequantized_input_grad_rows(&dy, m, &w, product, &dev).unwrap();
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                        assert_eq!(a.len(), m * inp);
                        let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(same, "{product:?}, {m} rows: the row form differs");
                    }
                    (None, None) => {}
                    (a, b) => panic!(
                        "{product:?}, {m} rows: tensor path {}, row form {}",
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
            assert!(dequantized_input_grad_rows(&dy[1..], m, &w, DxProduct::F32, &dev).is_err());
        }
    }
}
