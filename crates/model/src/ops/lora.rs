//! The LoRA delta of a mixed-adapter batch in one gathered pass: each row under its own
//! group's adapters (S-LoRA / Punica's BGMV shrink and expand), computed row by row so a
//! row's result does not depend on the batch.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{dot, f32s, AttnKernel};
use crate::error::Result;

/// o[i] += Σ_k b[i·r + k]·u[k] for every output i of B [out, r], r a multiple of 8: each
/// output's products are summed lane-wise over r's chunks of 8, then over the 8 lanes as
/// ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)). That order is what eight AVX2 products reduce to
/// with two rounds of `hadd` and one add of the halves, so [`expand8_avx2`] is bitwise this.
/// Why not `dot` per output: with r = 8 each output is one short dot with a horizontal sum,
/// ~30 instructions per cache line of B, too few loads in flight to stream B from memory
/// when every row has its own adapter (measured: `examples/lora_memory.rs`).
fn expand8_portable(o: &mut [f32], b: &[f32], u: &[f32]) {
    let r = u.len();
    for (o, br) in o.iter_mut().zip(b.chunks_exact(r)) {
        let mut l = [0f32; 8];
        for (bc, uc) in br.chunks_exact(8).zip(u.chunks_exact(8)) {
            for j in 0..8 {
                l[j] += bc[j] * uc[j];
            }
        }
        *o += ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}

/// [`expand8_portable`] eight outputs at a time.
///
/// # Safety
/// The CPU must have AVX2; `u.len()` is a multiple of 8 and `b.len() ≥ o.len()·u.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn expand8_avx2(o: &mut [f32], b: &[f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let r = u.len();
    let n8 = o.len() / 8 * 8;
    let (bp, up, op) = (b.as_ptr(), u.as_ptr(), o.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        // p[j]: output i+j's lane-wise sums of products over r's chunks of 8
        let mut p = [_mm256_setzero_ps(); 8];
        for c in (0..r).step_by(8) {
            let uc = _mm256_loadu_ps(up.add(c));
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = _mm256_add_ps(
                    *pj,
                    _mm256_mul_ps(_mm256_loadu_ps(bp.add((i + j) * r + c)), uc),
                );
            }
        }
        // hadd within 128-bit halves: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
        let t0 = _mm256_hadd_ps(p[0], p[1]);
        let t1 = _mm256_hadd_ps(p[2], p[3]);
        let t2 = _mm256_hadd_ps(p[4], p[5]);
        let t3 = _mm256_hadd_ps(p[6], p[7]);
        // [(a01+a23), (b01+b23), (c..), (d..) | (a45+a67), …]
        let s0 = _mm256_hadd_ps(t0, t1);
        let s1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps(s0, s1, 0x20);
        let hi = _mm256_permute2f128_ps(s0, s1, 0x31);
        let sum = _mm256_add_ps(lo, hi);
        _mm256_storeu_ps(op.add(i), _mm256_add_ps(_mm256_loadu_ps(op.add(i)), sum));
        i += 8;
    }
    expand8_portable(&mut o[n8..], &b[n8 * r..], u);
}

/// u = sc·A·x for A [r, in]: each row's sum in [`dot`]'s order (eight lane sums over x's
/// chunks of 8, reduced as ((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7)), then the tail in order), so
/// every path is bitwise the portable one. Why a kernel: the portable shrink is r separate
/// dots, each one serial chain of adds (and 128-bit without a target CPU); eight rows at once
/// keep eight chains in flight and read each chunk of x once.
fn shrink(kernel: AttnKernel, u: &mut Vec<f32>, a: &[f32], x: &[f32], sc: f32) {
    u.clear();
    if x.is_empty() {
        return; // A [r, 0]: no products; an empty u makes the expand add nothing
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx2 | AttnKernel::Avx512 if kernel.supported() => {
            let rows = a.len() / x.len();
            u.resize(rows, 0.0);
            // SAFETY: AVX2 is present (both kernels' `supported` imply it); u holds one value
            // per whole row of a.
            unsafe { shrink_avx2(u, a, x, sc) }
        }
        _ => u.extend(a.chunks_exact(x.len()).map(|ak| dot(ak, x) * sc)),
    }
}

/// [`shrink`] with eight (then one) rows of A at a time.
///
/// # Safety
/// The CPU must have AVX2; `x` is not empty and `u.len() ≤ a.len() / x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn shrink_avx2(u: &mut [f32], a: &[f32], x: &[f32], sc: f32) {
    let inp = x.len();
    let mut k = 0;
    while k + 8 <= u.len() {
        let s = shrink_rows::<8>(a.as_ptr().add(k * inp), x);
        for (j, v) in s.into_iter().enumerate() {
            u[k + j] = v * sc;
        }
        k += 8;
    }
    while k < u.len() {
        u[k] = shrink_rows::<1>(a.as_ptr().add(k * inp), x)[0] * sc;
        k += 1;
    }
}

/// The [`dot`]s of M consecutive rows of A (row stride `x.len()`, from `a`) with x.
///
/// # Safety
/// The CPU must have AVX2; M·x.len() values are readable from `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn shrink_rows<const M: usize>(a: *const f32, x: &[f32]) -> [f32; M] {
    use std::arch::x86_64::*;
    let inp = x.len();
    let n8 = inp / 8 * 8;
    let xp = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); M];
    let mut i = 0;
    while i < n8 {
        let xv = _mm256_loadu_ps(xp.add(i));
        for (j, acc) in acc.iter_mut().enumerate() {
            // mul then add, as the portable lanes do (no fused multiply-add)
            let av = _mm256_loadu_ps(a.add(j * inp + i));
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(av, xv));
        }
        i += 8;
    }
    let mut out = [0f32; M];
    for (j, o) in out.iter_mut().enumerate() {
        // [l0+l4, l1+l5, l2+l6, l3+l7] → ((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))
        let t = _mm_add_ps(
            _mm256_castps256_ps128(acc[j]),
            _mm256_extractf128_ps(acc[j], 1),
        );
        let h = _mm_hadd_ps(t, t);
        let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        for t in n8..inp {
            s += *a.add(j * inp + t) * *xp.add(t);
        }
        *o = s;
    }
    out
}

/// Groups of fewer rows than this have their adapters' A and B prefetched: one or two rows
/// do not keep an adapter in cache from one step to the next, so its bytes come from memory.
const COLD_ROWS: usize = 4;

/// Ask for every cache line of `s` ahead of its use. Why: issued all at once, the prefetches
/// put many more misses in flight than the shrink's and expand's own loads do. Measured with
/// `examples/lora_memory` (32 rows, each its own adapter): 9.3–10.6 → 7.7–8.0 ms a step;
/// non-temporal hints were slower (12–15 ms). A no-op off x86-64.
#[inline]
fn prefetch(s: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in s.chunks(16) {
        // SAFETY: a prefetch is a hint: it never faults and has no visible effect; SSE is
        // part of x86-64's baseline; the address lies inside `s`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// o += B·u (B [out, r] row-major) on `kernel`'s instruction set.
fn expand(kernel: AttnKernel, o: &mut [f32], b: &[f32], u: &[f32]) {
    let r = u.len();
    if r == 0 || !r.is_multiple_of(8) {
        for (o, br) in o.iter_mut().zip(b.chunks_exact(r.max(1))) {
            *o += dot(br, u);
        }
        return;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx2 | AttnKernel::Avx512 if kernel.supported() => {
            // SAFETY: AVX2 is present (both kernels' `supported` imply it), r % 8 == 0, and
            // b holds out·r values (checked by the caller's shapes).
            unsafe { expand8_avx2(o, b, u) }
        }
        _ => expand8_portable(o, b, u),
    }
}

/// One group of rows of a batch sharing an adapter mixture, for [`lora_gathered`]:
/// the rows and, per adapter, (A [r, in], B [out, r], scale·weight).
pub struct LoraRows<'a> {
    pub rows: &'a [u32],
    pub mods: Vec<(&'a Tensor, &'a Tensor, f64)>,
}

/// Σ w·s·B·(A·x) for every row of x [N, in] under its group's adapters, all groups in one
/// parallel pass (the gathered shrink/expand of S-LoRA/Punica's BGMV): [N, out], zero for
/// rows in no group. Candle would need index_select, two matmuls, a scale and an index_add
/// per group and projection. `None` off the CPU/f32 path (the caller runs those ops).
pub fn lora_gathered(
    x: &Tensor,
    out_features: usize,
    groups: &[LoraRows],
) -> Result<Option<Tensor>> {
    let (n, inp) = x.dims2()?;
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !ok(x)
        || groups.iter().any(|g| {
            g.rows.iter().any(|&r| r as usize >= n)
                || g.mods.iter().any(|(a, b, _)| {
                    !ok(a)
                        || !ok(b)
                        || a.dims().len() != 2
                        || a.dims()[1] != inp
                        || b.dims() != [out_features, a.dims()[0]]
                })
        })
    {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let Some(xv) = f32s(&xs) else { return Ok(None) };
    let xv = &xv[xl.start_offset()..xl.start_offset() + n * inp];
    let guards: Vec<Vec<_>> = groups
        .iter()
        .map(|g| {
            g.mods
                .iter()
                .map(|(a, b, _)| (a.storage_and_layout(), b.storage_and_layout()))
                .collect()
        })
        .collect();
    /// One module's (A, B, rank, scale·weight) as slices.
    type ModSlices<'a> = (&'a [f32], &'a [f32], usize, f32);
    let mut mods: Vec<Vec<ModSlices>> = Vec::with_capacity(groups.len());
    for (g, gg) in groups.iter().zip(&guards) {
        let mut v = Vec::with_capacity(g.mods.len());
        for ((a, _, sc), ((ast, al), (bst, bl))) in g.mods.iter().zip(gg) {
            let (Some(av), Some(bv)) = (f32s(ast), f32s(bst)) else {
                return Ok(None);
            };
            let r = a.dims()[0];
            v.push((
                &av[al.start_offset()..al.start_offset() + r * inp],
                &bv[bl.start_offset()..bl.start_offset() + out_features * r],
                r,
                *sc as f32,
            ));
        }
        mods.push(v);
    }
    let mut group_of = vec![usize::MAX; n];
    for (gi, g) in groups.iter().enumerate() {
        for &r in g.rows {
            group_of[r as usize] = gi;
        }
    }
    let kernel = AttnKernel::detect();
    let cold: Vec<bool> = groups.iter().map(|g| g.rows.len() < COLD_ROWS).collect();
    let mut out = vec![0f32; n * out_features];
    out.par_chunks_mut(out_features)
        .enumerate()
        .for_each(|(row, o)| {
            let gi = group_of[row];
            if gi == usize::MAX {
                return;
            }
            let xr = &xv[row * inp..(row + 1) * inp];
            let mut u = Vec::new();
            for &(a, b, r, sc) in &mods[gi] {
                // shrink: u = A·x [r]; expand: o += sc·B·u
                if cold[gi] {
                    prefetch(a);
                    prefetch(&b[..out_features * r]);
                }
                shrink(kernel, &mut u, a, xr, sc);
                expand(kernel, o, &b[..out_features * r], &u);
            }
        });
    drop(guards);
    drop(xs);
    Ok(Some(Tensor::from_vec(out, (n, out_features), x.device())?))
}

#[cfg(test)]
mod gathered_tests {
    use super::*;
    use candle_core::Device;

    /// Every expand path is bitwise the portable one (ranks 8, 16, 24; ragged output counts),
    /// and all are within rounding of the f64 product.
    #[test]
    fn expand_paths_agree_bitwise() {
        let mut seed = 7u64;
        let mut draw = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut ran = vec![];
        for r in [8, 16, 24] {
            for out in [1, 7, 8, 13, 64, 577] {
                let b: Vec<f32> = (0..out * r).map(|_| draw()).collect();
                let u: Vec<f32> = (0..r).map(|_| draw()).collect();
                let o0: Vec<f32> = (0..out).map(|_| draw()).collect();
                let mut want = o0.clone();
                expand8_portable(&mut want, &b, &u);
                for (i, w) in want.iter().enumerate() {
                    let exact: f64 = o0[i] as f64
                        + (0..r)
                            .map(|k| b[i * r + k] as f64 * u[k] as f64)
                            .sum::<f64>();
                    assert!((*w as f64 - exact).abs() < 1e-5, "r {r} out {out} i {i}");
                }
                for k in AttnKernel::supported_list() {
                    let mut got = o0.clone();
                    expand(k, &mut got, &b, &u);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} differs from portable at r {r}, out {out}",
                        k.name()
                    );
                    ran.push(k.name());
                }
            }
        }
        ran.dedup();
        eprintln!("expand paths run: {ran:?} (others unsupported on this CPU)");
    }

    /// Every shrink path is bitwise the portable one (ragged input sizes, row counts that are
    /// and are not multiples of 8), and all are within rounding of the f64 product.
    #[test]
    fn shrink_paths_agree_bitwise() {
        let mut seed = 11u64;
        let mut draw = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut ran = vec![];
        for r in [1, 3, 8, 9, 16, 17] {
            for inp in [1, 7, 8, 13, 64, 577] {
                let a: Vec<f32> = (0..r * inp).map(|_| draw()).collect();
                let x: Vec<f32> = (0..inp).map(|_| draw()).collect();
                let sc = draw() * 4.0;
                let mut want = Vec::new();
                shrink(AttnKernel::Portable, &mut want, &a, &x, sc);
                assert_eq!(want.len(), r);
                for (k, w) in want.iter().enumerate() {
                    let exact: f64 = (0..inp)
                        .map(|i| a[k * inp + i] as f64 * x[i] as f64)
                        .sum::<f64>()
                        * sc as f64;
                    assert!((*w as f64 - exact).abs() < 1e-4, "r {r} in {inp} k {k}");
                }
                for k in AttnKernel::supported_list() {
                    let mut got = vec![7.0; 3];
                    shrink(k, &mut got, &a, &x, sc);
                    let same = got.len() == r
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} differs from portable at r {r}, in {inp}",
                        k.name()
                    );
                    ran.push(k.name());
                }
            }
        }
        ran.sort();
        ran.dedup();
        eprintln!("shrink paths run: {ran:?} (others unsupported on this CPU)");
    }

    /// Two groups (one a two-adapter mixture), a row in no group: equals x·Aᵀ·Bᵀ·s per row.
    #[test]
    fn gathered_lora_equals_per_group_matmuls() {
        let d = Device::Cpu;
        let (n, inp, out, r) = (7, 12, 10, 3);
        let x = Tensor::randn(0f32, 1.0, (n, inp), &d).unwrap();
        let ad = |seed: f64| {
            (
                (Tensor::randn(0f32, 1.0, (r, inp), &d).unwrap() * seed).unwrap(),
                Tensor::randn(0f32, 1.0, (out, r), &d).unwrap(),
            )
        };
        let (a1, b1) = ad(1.0);
        let (a2, b2) = ad(0.5);
        let rows1 = [0u32, 3, 4];
        let rows2 = [1u32, 6];
        let groups = [
            LoraRows {
                rows: &rows1,
                mods: vec![(&a1, &b1, 2.0)],
            },
            LoraRows {
                rows: &rows2,
                mods: vec![(&a1, &b1, 0.5), (&a2, &b2, -1.5)],
            },
        ];
        let got = lora_gathered(&x, out, &groups)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let delta = |a: &Tensor, b: &Tensor, s: f64| {
            (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * s)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (d1, d2, d3) = (
            delta(&a1, &b1, 2.0),
            delta(&a1, &b1, 0.5),
            delta(&a2, &b2, -1.5),
        );
        for row in 0..n {
            for o in 0..out {
                let want = if rows1.contains(&(row as u32)) {
                    d1[row][o]
                } else if rows2.contains(&(row as u32)) {
                    d2[row][o] + d3[row][o]
                } else {
                    0.0
                };
                assert!(
                    (got[row][o] - want).abs() < 1e-4,
                    "row {row} col {o}: {} vs {want}",
                    got[row][o]
                );
            }
        }
    }
}
