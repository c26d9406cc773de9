//! Copies of activations into another layout or element type, in parallel: attention's two
//! layouts [N, n·hd] (a projection's output, one row a token) and [n, N, hd] (one matrix a
//! head), a packed projection's output split into its targets' columns, and the training
//! tape's f32 ↔ bf16 casts.
//!
//! Why our own: training runs candle's elementwise ops on one thread (see
//! `init_threads_for`), and each of these copies was a single-threaded sweep with the
//! second core idle: five head copies a layer (q, k, v and the output's gradient into heads,
//! dq, dk, dv back out) ≈ 1 % of an f32 4 × 128 step on two cores; under int8 compute the
//! column splits ≈ 1.5 % and the tape's casts ≈ 2.8 % more. Other devices and dtypes take
//! candle's copy.

use candle_core::{CpuStorage, DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;

/// Rows of hd floats per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Copies `src` into a fresh vector of `dst_rows` rows of `hd` floats, where destination
/// row j is source row `from(j)` (rows of hd floats, `src` holding every one of them).
fn gather_rows(
    src: &[f32],
    hd: usize,
    dst_rows: usize,
    from: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    super::par_new(dst_rows * hd, hd * ROWS_PER_TASK, |t, chunk| {
        for (i, row) in chunk.chunks_exact_mut(hd.max(1)).enumerate() {
            row.copy_from_slice(&src[from(t * ROWS_PER_TASK + i) * hd..][..hd]);
        }
    })
}

/// The f32 data of `t` for `f` ([`super::with_slices`] of one tensor).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    super::with_slices(&[t], |s| f(s[0]))
}

/// [N, n·hd] → [n, N, hd]
pub fn heads(t: &Tensor, n: usize, hd: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if t.dims() == [rows, n * hd] {
        // Destination row j = (head h, token i) is source row (i, h): index i·n + h.
        let fused = with_f32(t, |src| {
            gather_rows(src, hd, n * rows, |j| (j % rows) * n + j / rows)
        });
        if let Some(v) = fused {
            return Ok(Tensor::from_vec(v, (n, rows, hd), t.device())?);
        }
    }
    Ok(t.reshape((rows, n, hd))?.transpose(0, 1)?.contiguous()?)
}

/// [n, N, hd] → [N, n·hd]
pub fn unheads(t: &Tensor) -> Result<Tensor> {
    let (n, rows, hd) = t.dims3()?;
    // Destination row j = (token i, head h) is source row (h, i): index h·N + i.
    let fused = with_f32(t, |src| {
        gather_rows(src, hd, n * rows, |j| (j % n) * rows + j / n)
    });
    if let Some(v) = fused {
        return Ok(Tensor::from_vec(v, (rows, n * hd), t.device())?);
    }
    Ok(t.transpose(0, 1)?.reshape((rows, n * hd))?)
}

/// The columns of y [N, Σ w] split into contiguous [N, w] blocks, one per width, in order.
pub fn split_cols(y: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let (rows, total) = y.dims2()?;
    if widths.iter().sum::<usize>() != total {
        return Err(crate::error::ModelError::Invalid(format!(
            "split of {total} columns into {widths:?}"
        )));
    }
    let fused = with_f32(y, |src| {
        let mut off = 0;
        let mut parts = Vec::with_capacity(widths.len());
        for &w in widths {
            let rows_per_task = (ROWS_PER_TASK * 64).div_ceil(w.max(1));
            let part = super::par_new(rows * w, w * rows_per_task, |t, chunk| {
                for (i, row) in chunk.chunks_exact_mut(w.max(1)).enumerate() {
                    row.copy_from_slice(&src[(t * rows_per_task + i) * total + off..][..w]);
                }
            });
            parts.push((part, w));
            off += w;
        }
        parts
    });
    if let Some(parts) = fused {
        return parts
            .into_iter()
            .map(|(p, w)| Ok(Tensor::from_vec(p, (rows, w), y.device())?))
            .collect();
    }
    let mut off = 0;
    widths
        .iter()
        .map(|&w| {
            let part = y.narrow(1, off, w)?.contiguous()?;
            off += w;
            Ok(part)
        })
        .collect()
}

/// Elements per parallel task of a cast.
const CAST_TASK: usize = 16 * 1024;

/// `t` as `dtype`: f32 ↔ bf16 of a contiguous CPU tensor in parallel (bitwise candle's
/// rounding: half's round-to-nearest-even), anything else through candle's `to_dtype`.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    if t.device().is_cpu() && t.is_contiguous() && !t.track_op() {
        let n = t.elem_count();
        let (s, l) = t.storage_and_layout();
        let (shape, dev) = (t.shape(), t.device());
        let cast = match (&*s, dtype) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), DType::BF16) => {
                let v = &v[l.start_offset()..][..n];
                // Each task zeroes its own chunk just before converting into it (in cache, in
                // parallel): one serial memset of the whole output was 0.5 % of an int8 step.
                let mut out: Vec<bf16> = Vec::with_capacity(n);
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(CAST_TASK)
                    .enumerate()
                    .for_each(|(c, o)| {
                        for x in o.iter_mut() {
                            x.write(bf16::ZERO);
                        }
                        // SAFETY: every element of the chunk was just written, and
                        // MaybeUninit<bf16> has bf16's layout; only this task holds the chunk.
                        let o = unsafe {
                            &mut *(o as *mut [std::mem::MaybeUninit<bf16>] as *mut [bf16])
                        };
                        to_bf16(&v[c * CAST_TASK..][..o.len()], o)
                    });
                // SAFETY: the tasks initialised all n elements.
                unsafe { out.set_len(n) };
                Some(Tensor::from_vec(out, shape, dev))
            }
            (candle_core::Storage::Cpu(CpuStorage::BF16(v)), DType::F32) => {
                let v = &v[l.start_offset()..][..n];
                let out = super::par_new(n, CAST_TASK, |c, o| {
                    to_f32(&v[c * CAST_TASK..][..o.len()], o)
                });
                Some(Tensor::from_vec(out, shape, dev))
            }
            _ => None,
        };
        if let Some(cast) = cast {
            return Ok(cast?);
        }
    }
    Ok(t.to_dtype(dtype)?)
}

/// dst = src rounded to bf16 as half's `bf16::from_f32` rounds (to nearest, ties to even;
/// a NaN stays a quiet NaN with its sign and top payload bits), 16 lanes at a time on
/// AVX-512, 8 on AVX2. Why vector code: half's scalar conversion was ≈ 2.3 % of an int8
/// training step's samples on an AVX2 EPYC (the tape's casts); on an AVX-512 EPYC the AVX2
/// loop was still 1.5 % (dY and the tape, for the bf16 dX product).
pub(crate) fn to_bf16(src: &[f32], dst: &mut [bf16]) {
    to_bf16_on(Bf16Path::detect(), src, dst)
}

/// The code paths of [`to_bf16`] (all give the same bits; tests run each).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bf16Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Bf16Path {
    /// The widest path the CPU runs and `LOWRANK_ISA` allows ([`crate::isa`]).
    fn detect() -> Bf16Path {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::isa::Isa;
            if Isa::Avx512.allowed() && is_x86_feature_detected!("avx512f") {
                return Bf16Path::Avx512;
            }
            if Isa::Avx2.allowed() && is_x86_feature_detected!("avx2") {
                return Bf16Path::Avx2;
            }
        }
        Bf16Path::Scalar
    }
}

/// The name of [`to_bf16`]'s path in this process (for the `LOWRANK_ISA` test).
#[cfg(test)]
pub(crate) fn to_bf16_path_name() -> &'static str {
    match Bf16Path::detect() {
        Bf16Path::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx512 => "avx512",
    }
}

/// [`to_bf16`] on `path` (which the CPU must run).
fn to_bf16_on(path: Bf16Path, src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "to_bf16: lengths");
    let done = match path {
        Bf16Path::Scalar => 0,
        // SAFETY: the caller's path runs on this CPU (detected, or checked by the test);
        // the lengths are equal (asserted above).
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx2 => unsafe { avx2::to_bf16(src, dst) },
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx512 => unsafe { avx512::to_bf16(src, dst) },
    };
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = bf16::from_f32(x);
    }
}

/// dst = src widened to f32 (exact: bf16 is f32's top half).
fn to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, x) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((x.to_bits() as u32) << 16);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// The first 8·⌊n/8⌋ elements of [`super::to_bf16`]; returns how many it wrote.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn to_bf16(src: &[f32], dst: &mut [bf16]) -> usize {
        assert_eq!(src.len(), dst.len());
        let full = src.len() / 8 * 8;
        let (abs_mask, inf) = (
            _mm256_set1_epi32(0x7FFF_FFFF),
            _mm256_set1_epi32(0x7F80_0000),
        );
        let (half_ulp, one, quiet) = (
            _mm256_set1_epi32(0x7FFF),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(0x0040),
        );
        for at in (0..full).step_by(8) {
            let x = _mm256_loadu_si256(src.as_ptr().add(at) as *const __m256i);
            let nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs_mask), inf);
            let top = _mm256_srli_epi32::<16>(x);
            // (x + 0x7FFF + lsb) >> 16: up past the halfway point, ties to the even side.
            let bump = _mm256_add_epi32(half_ulp, _mm256_and_si256(top, one));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bump));
            let r = _mm256_blendv_epi8(rounded, _mm256_or_si256(top, quiet), nan);
            // Eight 32-bit lanes (each < 2¹⁶) to eight u16: pack within 128-bit halves,
            // then bring the two halves' low quarters together.
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
            _mm_storeu_si128(
                dst.as_mut_ptr().add(at) as *mut __m128i,
                _mm256_castsi256_si128(packed),
            );
        }
        full
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// The first 16·⌊n/16⌋ elements of [`super::to_bf16`] (the AVX2 loop's arithmetic on
    /// 16 lanes, narrowed by one `vpmovdw`); returns how many it wrote.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the lengths are equal.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_bf16(src: &[f32], dst: &mut [bf16]) -> usize {
        debug_assert_eq!(src.len(), dst.len());
        let full = src.len() / 16 * 16;
        let (abs_mask, inf) = (
            _mm512_set1_epi32(0x7FFF_FFFF),
            _mm512_set1_epi32(0x7F80_0000),
        );
        let (half_ulp, one, quiet) = (
            _mm512_set1_epi32(0x7FFF),
            _mm512_set1_epi32(1),
            _mm512_set1_epi32(0x0040),
        );
        for at in (0..full).step_by(16) {
            let x = _mm512_loadu_si512(src.as_ptr().add(at) as *const _);
            let nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(x, abs_mask), inf);
            let top = _mm512_srli_epi32::<16>(x);
            // (x + 0x7FFF + lsb) >> 16: up past the halfway point, ties to the even side.
            let bump = _mm512_add_epi32(half_ulp, _mm512_and_si512(top, one));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bump));
            let r = _mm512_mask_or_epi32(rounded, nan, top, quiet);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(at) as *mut __m256i,
                _mm512_cvtepi32_epi16(r),
            );
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every conversion path this CPU runs gives half's bits, on values that round every
    /// way and on every tail length.
    #[test]
    fn every_bf16_path_rounds_as_half() {
        let mut v: Vec<f32> = (0..20_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2654435761)))
            .collect();
        v.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::MAX,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFF80_8000),
            1e-40,
        ]);
        let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut paths = vec![Bf16Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                paths.push(Bf16Path::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                paths.push(Bf16Path::Avx512);
            }
        }
        assert!(paths.contains(&Bf16Path::detect()));
        for path in paths {
            for len in (0..40).chain([v.len()]) {
                let mut dst = vec![bf16::from_bits(0x1234); len];
                to_bf16_on(path, &v[v.len() - len..], &mut dst);
                let got: Vec<u16> = dst.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want[v.len() - len..], "{path:?}, {len} values");
            }
        }
    }

    /// Both copies against candle's strided copies, and back: below and above the size
    /// where rows go to parallel tasks, with token counts that are no multiple of a task's.
    #[test]
    fn heads_and_back_match_candles_transpose() {
        for (rows, n, hd) in [(5, 3, 8), (300, 9, 64), (77, 3, 64)] {
            let v: Vec<f32> = (0..rows * n * hd).map(|i| i as f32).collect();
            let x = Tensor::from_vec(v, (rows, n * hd), &Device::Cpu).unwrap();
            let want = x.reshape((rows, n, hd)).unwrap().transpose(0, 1).unwrap();
            let want = want.contiguous().unwrap();
            let h = heads(&x, n, hd).unwrap();
            assert_eq!(h.dims(), [n, rows, hd]);
            let diff = (&h - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                diff.to_scalar::<f32>().unwrap(),
                0.0,
                "heads {rows}×{n}×{hd}"
            );
            let back = unheads(&h).unwrap();
            assert_eq!(back.dims(), [rows, n * hd]);
            let diff = (&back - &x).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                diff.to_scalar::<f32>().unwrap(),
                0.0,
                "unheads {rows}×{n}×{hd}"
            );
        }
    }

    /// A pack's output split into its targets' columns is candle's narrow of each, and widths
    /// that do not add up are an error.
    #[test]
    fn split_columns_match_candles_narrow() {
        for rows in [3, 150] {
            let widths = [576, 192, 192];
            let total: usize = widths.iter().sum();
            let v: Vec<f32> = (0..rows * total).map(|i| i as f32).collect();
            let y = Tensor::from_vec(v, (rows, total), &Device::Cpu).unwrap();
            let parts = split_cols(&y, &widths).unwrap();
            let mut off = 0;
            for (p, &w) in parts.iter().zip(&widths) {
                let want = y.narrow(1, off, w).unwrap().contiguous().unwrap();
                assert_eq!(p.dims(), [rows, w]);
                assert!(p.is_contiguous());
                let got = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                off += w;
            }
            assert!(split_cols(&y, &[576, 192]).is_err());
        }
    }

    /// The parallel casts are bitwise candle's, in both directions, on values that round
    /// every way (ties, subnormals, infinities, NaN), and a cast to the same type is a no-op.
    #[test]
    fn casts_are_bitwise_candles() {
        let mut v: Vec<f32> = (0..100_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2654435761)))
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            // Ties (low half exactly 0x8000): to the even side, down then up.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0xBF81_8000),
            // The largest finite float rounds to infinity; NaNs with low payloads only.
            f32::MAX,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFF80_8000),
        ]);
        let x = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                _ => t
                    .to_vec1::<bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
            }
        };
        let b = cast(&x, DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(bits(&b), bits(&x.to_dtype(DType::BF16).unwrap()));
        let f = cast(&b, DType::F32).unwrap();
        assert_eq!(bits(&f), bits(&b.to_dtype(DType::F32).unwrap()));
        assert_eq!(bits(&cast(&x, DType::F32).unwrap()), bits(&x));
    }
}
