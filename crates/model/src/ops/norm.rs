//! RMSNorm of the recorded training pass and its backward, and the elementwise sum of the
//! residual stream, each one parallel pass over the rows of contiguous f32 data.
//!
//! Why our own: training sets candle's elementwise pool to one thread (see
//! `init_threads_for`), so each candle op here was a single-threaded sweep, and the norm's
//! forward and backward are six to eight of them. `perf record` of a 4 × 128 step on two
//! cores put those sweeps (and the adds of the residual stream and of the gradients) at
//! ≈ 3.5 % of the wall time with the second core idle throughout. Other devices and dtypes
//! take candle's composition of the same equations.
//!
//! RMSNorm: y = x·r·w with r = (mean(x²) + ε)^(−½) per row; its backward, for g = dy⊙w,
//! dx = r·g − x·r³·mean(g⊙x).

use candle_core::{Tensor, D};
use rayon::prelude::*;

use crate::error::Result;

/// Rows per parallel task (576-wide rows: 36 KB of input a task).
const ROWS_PER_TASK: usize = 16;

/// A fresh vector of `rows` rows of `width` floats; `f(i, row)` writes row i (rows in
/// parallel tasks of [`ROWS_PER_TASK`] when the work is large enough).
fn par_rows(rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    super::par_new(rows * width, width * ROWS_PER_TASK, |t, chunk| {
        for (i, row) in chunk.chunks_exact_mut(width.max(1)).enumerate() {
            f(t * ROWS_PER_TASK + i, row);
        }
    })
}

/// (rows, width) of a matrix-shaped tensor [.., width].
fn rows_width(t: &Tensor) -> Result<(usize, usize)> {
    let width = t.dim(D::Minus1)?;
    Ok((t.elem_count() / width.max(1), width))
}

/// RMSNorm keeping 1/rms.   x: [N, H], w: [H] → (y [N, H], r [N, 1])
pub fn rms_fwd(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (rows, h) = rows_width(x)?;
    let fused = super::with_slices(&[x, w], |s| {
        let (xs, ws) = (s[0], s[1]);
        let r: Vec<f32> = (0..rows)
            .into_par_iter()
            .with_min_len(ROWS_PER_TASK)
            .map(|i| inv_rms(&xs[i * h..][..h], eps))
            .collect();
        let y = par_rows(rows, h, |i, out| {
            let (x, ri) = (&xs[i * h..][..h], r[i]);
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(ws) {
                *o = x * ri * w;
            }
        });
        (y, r)
    });
    match fused {
        Some((y, r)) => Ok((
            Tensor::from_vec(y, x.shape(), x.device())?,
            Tensor::from_vec(r, (rows, 1), x.device())?,
        )),
        None => {
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [N, 1]
            Ok((x.broadcast_mul(&r)?.broadcast_mul(w)?, r))
        }
    }
}

/// (mean(x²) + ε)^(−½) of one row.
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let ms = super::dot(x, x) / x.len().max(1) as f32;
    1.0 / (ms + eps as f32).sqrt()
}

/// The norm's output again from its kept 1/rms (the backward recomputes it rather than keep
/// it).   x: [N, H], r: [N, 1], w: [H] → [N, H]
pub fn rms_apply(x: &Tensor, r: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, h) = rows_width(x)?;
    let fused = super::with_slices(&[x, r, w], |s| {
        let (xs, rs, ws) = (s[0], s[1], s[2]);
        par_rows(rows, h, |i, out| {
            let (x, ri) = (&xs[i * h..][..h], rs[i]);
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(ws) {
                *o = x * ri * w;
            }
        })
    });
    match fused {
        Some(y) if r.elem_count() == rows => Ok(Tensor::from_vec(y, x.shape(), x.device())?),
        _ => Ok(x.broadcast_mul(r)?.broadcast_mul(w)?),
    }
}

/// RMSNorm backward for dy, plus `res` (the residual stream's gradient) where given:
/// res + r·g − x·r³·mean(g⊙x) with g = dy⊙w.   dy, x, res: [N, H], r: [N, 1], w: [H] → [N, H]
pub fn rms_bwd(
    dy: &Tensor,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, h) = rows_width(x)?;
    let same = dy.shape() == x.shape() && r.elem_count() == rows;
    let same = same && res.is_none_or(|t| t.shape() == x.shape());
    let mut ts = vec![dy, x, r, w];
    ts.extend(res);
    let fused = same.then(|| {
        super::with_slices(&ts, |s| {
            let (dys, xs, rs, ws) = (s[0], s[1], s[2], s[3]);
            let res = s.get(4);
            par_rows(rows, h, |i, out| {
                let (dy, x, ri) = (&dys[i * h..][..h], &xs[i * h..][..h], rs[i]);
                // mean(g⊙x) = Σ dy·w·x / H, in 8 independent partial sums.
                let mut acc = [0f32; 8];
                for (j, ((&d, &w), &x)) in dy.iter().zip(ws).zip(x).enumerate() {
                    acc[j % 8] += d * w * x;
                }
                let dot = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                let coef = dot / h as f32 * ri * ri * ri;
                match res {
                    Some(res) => {
                        let res = &res[i * h..][..h];
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = res[j] + (ri * (dy[j] * ws[j]) - x[j] * coef);
                        }
                    }
                    None => {
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = ri * (dy[j] * ws[j]) - x[j] * coef;
                        }
                    }
                }
            })
        })
    });
    if let Some(Some(dx)) = fused {
        return Ok(Tensor::from_vec(dx, x.shape(), x.device())?);
    }
    let g = dy.broadcast_mul(w)?; // [N, H]
    let dot = (&g * x)?.mean_keepdim(D::Minus1)?; // [N, 1]
    let coef = (dot * r.powf(3.0)?)?; // [N, 1]
    let dx = (g.broadcast_mul(r)? - x.broadcast_mul(&coef)?)?;
    Ok(match res {
        Some(res) => (res + dx)?,
        None => dx,
    })
}

/// a + b for two tensors of one shape (the residual stream, sums of input gradients).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() == b.shape() && a.rank() > 0 {
        let (rows, width) = rows_width(a)?;
        let fused = super::with_slices(&[a, b], |s| {
            par_rows(rows, width, |i, out| {
                let (a, b) = (&s[0][i * width..][..width], &s[1][i * width..][..width]);
                for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                    *o = a + b;
                }
            })
        });
        if let Some(c) = fused {
            return Ok(Tensor::from_vec(c, a.shape(), a.device())?);
        }
    }
    Ok((a + b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Seeded values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn close(got: &Tensor, want: &[f64], what: &str) {
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * scale,
                "{what}: element {i}: {g} against {w}"
            );
        }
    }

    /// The fused norm, its recomputation, its backward (with and without the residual's
    /// gradient) and the sum against f64 loops of the equations, below and above the size
    /// where rows go to parallel tasks, with a row count that is no multiple of a task's.
    #[test]
    fn fused_norm_and_sum_match_the_equations() {
        let eps = 1e-5;
        for (rows, h) in [(3, 40), (37, 576), (101, 576)] {
            let (x, w) = (values(rows * h, 1), values(h, 2));
            let (dy, res) = (values(rows * h, 3), values(rows * h, 4));
            let (xt, wt) = (
                t(&x, (rows, h)),
                Tensor::from_slice(&w, h, &Device::Cpu).unwrap(),
            );
            let (dyt, rest) = (t(&dy, (rows, h)), t(&res, (rows, h)));
            let r: Vec<f64> = x
                .chunks(h)
                .map(|row| {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
                    1.0 / (ms + eps).sqrt()
                })
                .collect();
            let y: Vec<f64> = (0..rows * h)
                .map(|i| x[i] as f64 * r[i / h] * w[i % h] as f64)
                .collect();
            let (yt, rt) = rms_fwd(&xt, &wt, eps).unwrap();
            close(&yt, &y, "rms_fwd y");
            close(&rt, &r, "rms_fwd r");
            assert_eq!(rt.dims(), [rows, 1]);
            close(&rms_apply(&xt, &rt, &wt).unwrap(), &y, "rms_apply");
            // dx = r·g − x·r³·mean(g⊙x), g = dy⊙w
            let dx: Vec<f64> = (0..rows * h)
                .map(|i| {
                    let row = i / h;
                    let mean = (0..h)
                        .map(|j| {
                            let k = row * h + j;
                            dy[k] as f64 * w[j] as f64 * x[k] as f64
                        })
                        .sum::<f64>()
                        / h as f64;
                    let ri = r[row];
                    ri * dy[i] as f64 * w[i % h] as f64 - x[i] as f64 * ri.powi(3) * mean
                })
                .collect();
            close(&rms_bwd(&dyt, &xt, &rt, &wt, None).unwrap(), &dx, "rms_bwd");
            let with_res: Vec<f64> = dx.iter().zip(&res).map(|(d, r)| d + *r as f64).collect();
            close(
                &rms_bwd(&dyt, &xt, &rt, &wt, Some(&rest)).unwrap(),
                &with_res,
                "rms_bwd + res",
            );
            let sum: Vec<f64> = x
                .iter()
                .zip(&dy)
                .map(|(a, b)| *a as f64 + *b as f64)
                .collect();
            close(&add(&xt, &dyt).unwrap(), &sum, "add");
            // Candle's path (a non-contiguous input) computes the same.
            let xtt = t(&x, (rows, h))
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .t()
                .unwrap();
            assert!(!xtt.is_contiguous());
            close(
                &rms_bwd(&dyt, &xtt, &rt, &wt, Some(&rest)).unwrap(),
                &with_res,
                "candle",
            );
            close(&add(&xtt, &dyt).unwrap(), &sum, "candle add");
        }
    }
}
