//! The LoRA delta of a mixed-adapter batch in one gathered pass: each row under its own
//! group's adapters (S-LoRA / Punica's BGMV shrink and expand), computed row by row so a
//! row's result does not depend on the batch.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{dot, f32s};
use crate::error::Result;

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
                u.clear();
                u.extend(a.chunks_exact(inp).map(|ak| dot(ak, xr) * sc));
                for (o, br) in o.iter_mut().zip(b.chunks_exact(r)) {
                    *o += dot(br, &u);
                }
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
