//! How LoRA training's forward multiplies a packed frozen weight, chosen per CPU path.
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

use candle_core::Tensor;

use super::kernel::Kernel;
use super::{qlinear_fine, QMatrix};
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

/// Names `LOWRANK_TRAIN_PRODUCT` accepts.
const NAMES: [&str; 2] = ["limbs", "dequantized"];

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
            let forced = std::env::var("LOWRANK_TRAIN_PRODUCT").ok();
            let (p, warning) = TrainProduct::choose(forced.as_deref(), Kernel::detect());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            p
        })
    }

    /// The choice [`TrainProduct::detect`] makes from the variable's value and the kernel
    /// path, with the warning to print, if any.
    fn choose(forced: Option<&str>, kernel: Kernel) -> (TrainProduct, Option<String>) {
        let auto = TrainProduct::for_kernel(kernel);
        match forced.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => (auto, None),
            Some("limbs") => (TrainProduct::Limbs, None),
            Some("dequantized") => (TrainProduct::Dequantized, None),
            Some(other) => (
                auto,
                Some(format!(
                    "LOWRANK_TRAIN_PRODUCT={other}: unknown (expected one of {}, auto); using {}",
                    NAMES.join(", "),
                    auto.name()
                )),
            ),
        }
    }
}

/// Most f32 bytes one dequantized chunk of a weight takes (a 4096 × 576 head chunk of the
/// default model is 9.4 MB): the whole f32 weight is never held for a big head or MLP pack.
const CHUNK_BYTES: usize = 16 << 20;

/// Training's forward product y = x·Wᵀ through the packed `w` by `product`.
/// x: [n, in] (f32, CPU) → [n, out]
pub fn qlinear_train(x: &Tensor, w: &QMatrix, product: TrainProduct) -> Result<Tensor> {
    match product {
        TrainProduct::Limbs => qlinear_fine(x, w),
        TrainProduct::Dequantized => dequantized_linear(x, w),
    }
}

/// x·Wᵀ with W dequantized a chunk of whole 16-row tiles at a time, the chunks' outputs
/// side by side. x: [n, in] → [n, out]
fn dequantized_linear(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
    let rows = CHUNK_BYTES / (4 * w.in_dim().max(1));
    dequantized_linear_chunked(x, w, rows)
}

/// [`dequantized_linear`] with chunks of `rows` output rows (rounded down to whole tiles).
fn dequantized_linear_chunked(x: &Tensor, w: &QMatrix, rows: usize) -> Result<Tensor> {
    let (out, inp) = (w.out_dim(), w.in_dim());
    let rows = rows.max(super::TILE) / super::TILE * super::TILE;
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = dequantized_linear_avx2(x, w, rows)? {
        return Ok(y);
    }
    let mut parts = Vec::with_capacity(out.div_ceil(rows));
    for r0 in (0..out).step_by(rows) {
        let n = rows.min(out - r0);
        let wc = Tensor::from_vec(w.dequantize_rows(r0, n)?, (n, inp), x.device())?;
        parts.push(crate::ops::linear(x, &wc)?); // [n_x, n]
    }
    crate::backward::cat_or_single(parts, 1)
}

/// [`dequantized_linear_chunked`] on the AVX2 f32 gemm, or `None` where the candle path must
/// take it (another f32 path, a tracked x, fewer than `MIN_ROWS` rows). Each chunk is
/// dequantized into one reused per-thread buffer and multiplied straight into its columns
/// of the output: no zero-filled chunk, no tensor per chunk, no concatenation (together
/// ≈ 8 % of an int8 step's time on AVX2 before).
#[cfg(target_arch = "x86_64")]
fn dequantized_linear_avx2(x: &Tensor, w: &QMatrix, rows: usize) -> Result<Option<Tensor>> {
    use crate::ops::gemm::{gemm_raw, BLayout, GemmKernel, MIN_ROWS};
    use std::cell::RefCell;
    thread_local! {
        /// The dequantized chunk (at most CHUNK_BYTES), kept between calls.
        static CHUNK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    let (out, inp) = (w.out_dim(), w.in_dim());
    let plain = x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 2;
    if GemmKernel::detect() != GemmKernel::Avx2 || !plain || x.track_op() {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    if m < MIN_ROWS || k != inp {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Some(xv) = crate::ops::f32s(&xs) else {
        return Ok(None);
    };
    let xv = &xv[xl.start_offset()..][..m * inp];
    let mut y: Vec<f32> = Vec::with_capacity(m * out);
    CHUNK.with(|chunk| -> Result<()> {
        let mut chunk = chunk.borrow_mut();
        for r0 in (0..out).step_by(rows) {
            let n = rows.min(out - r0);
            if chunk.len() < n * inp {
                chunk.resize(n * inp, 0.0);
            }
            let wc = &mut chunk[..n * inp];
            w.dequantize_rows_into(r0, wc)?;
            // SAFETY: y has room for m rows of `out` floats; this chunk writes columns
            // r0..r0+n of each (r0 + n ≤ out), and the chunks together write every column.
            unsafe {
                gemm_raw(
                    m,
                    n,
                    inp,
                    xv,
                    wc,
                    BLayout::Cols,
                    y.as_mut_ptr().add(r0),
                    out,
                )
            };
        }
        Ok(())
    })?;
    // SAFETY: every float of the m·out written above (the loop covers 0..out).
    unsafe { y.set_len(m * out) };
    Ok(Some(Tensor::from_vec(y, (m, out), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dequantized product is x times the weights the packing holds, in f64 up to f32
    /// accumulation error, whatever the chunking (a chunk placed at the wrong rows, or a
    /// ragged last chunk lost, fails it); the limbs agree with it to their rounding.
    #[test]
    fn dequantized_product_multiplies_the_packed_weights() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // A few rows (candle's product) and enough for the f32 gemm path's own.
        for n in [5, crate::ops::gemm::MIN_ROWS + 3] {
            let (out, inp) = (88, 96);
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
            let limbs = qlinear_train(&x, &w, TrainProduct::Limbs).unwrap();
            let e = off(&limbs);
            assert!(e > 0.0 && e < 1e-4, "two limbs off by {e}");
        }
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
}
