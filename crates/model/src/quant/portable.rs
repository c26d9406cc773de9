//! The portable kernel: plain Rust for any CPU, bitwise equal to the vector kernels.

use super::{from_nibbles, Call, QK, TB, TB4, TILE};

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

/// The same arithmetic as the vector kernels, in the same order (bitwise equal results; see
/// [`super::Kernel::run`]).
///
/// # Safety
/// As [`super::Kernel::run`].
#[inline(never)] // one call per tile: keeps it a unit in profiles and disassembly
pub(super) unsafe fn portable(c: Call<'_>) {
    let Call {
        w,
        x,
        t,
        r0,
        nr,
        limbs,
        y,
    } = c;
    let (nb, kp) = (w.nb, x.nb * QK);
    let lanes = TILE.min(w.out - t * TILE);
    let per = if limbs { 2 } else { 1 };
    let mut unpacked = [0u8; TB];
    let act = |r: usize, b: usize| -> &[i8; QK] {
        x.a[r * kp + b * QK..r * kp + (b + 1) * QK]
            .try_into()
            .expect("QK")
    };
    for (i, r) in (r0..r0 + nr).step_by(per).enumerate() {
        let mut acc = [0f32; TILE];
        for b in 0..nb {
            let tb = t * nb + b;
            let qb: &[u8; TB] = if w.nibbles {
                from_nibbles(&w.q[tb * TB4..(tb + 1) * TB4], &mut unpacked);
                &unpacked
            } else {
                w.q[tb * TB..(tb + 1) * TB].try_into().expect("TB")
            };
            let mut dot = block_dot(qb, act(r, b));
            if limbs {
                let lo = block_dot(qb, act(r + 1, b));
                for (d, l) in dot.iter_mut().zip(lo) {
                    *d = (*d << 8) + l;
                }
            }
            let (s, sa) = (x.s[r * nb + b], x.sa[r * nb + b]);
            let d: &[f32; TILE] = w.d[tb * TILE..(tb + 1) * TILE].try_into().expect("TILE");
            let m: &[f32; TILE] = w.m[tb * TILE..(tb + 1) * TILE].try_into().expect("TILE");
            for lane in 0..TILE {
                let ds = d[lane] * s;
                acc[lane] = (dot[lane] as f32).mul_add(ds, acc[lane]);
                acc[lane] = m[lane].mul_add(sa, acc[lane]);
            }
        }
        let row = y.row(i);
        for (lane, &v) in acc.iter().enumerate().take(lanes) {
            *row.add(lane) = v;
        }
    }
}
