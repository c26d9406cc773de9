//! The two layouts of attention's activations: [N, n·hd] (a projection's output, one row a
//! token) and [n, N, hd] (one matrix a head), moved between in parallel row copies.
//!
//! Why our own: candle's strided copy (transpose + contiguous) is one single-threaded
//! sweep, and training runs five of them a layer (q, k, v and the output's gradient into
//! heads, dq, dk, dv back out): ≈ 1 % of a 4 × 128 step on two cores, with the second core
//! idle. Other devices and dtypes take candle's copy.

use candle_core::{DType, Tensor};

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

/// The f32 data of a contiguous CPU tensor, for `f`; `None` for anything else, and for a
/// tensor in an autograd graph (full fine-tuning: candle's copy keeps it differentiable).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let plain = t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !plain || t.track_op() {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    super::f32s(&s).map(|v| f(&v[l.start_offset()..][..t.elem_count()]))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
