//! llama.cpp's q/k row permutation between the HF (half-split RoPE) and GGUF (interleaved
//! RoPE) layouts.
//!
//! llama.cpp's converter rewrites each head's rows of `q_proj`/`k_proj` as
//! `reshape(n_head, 2, hd/2, cols) → swap axes 1,2 → reshape(out, cols)`: within a head, row
//! `h·hd + j` (first half, j < hd/2) moves to `h·hd + 2j` and row `h·hd + hd/2 + j` moves to
//! `h·hd + 2j + 1`. The permutation acts on rows only, so it applies unchanged to the base
//! weight `W` [out, in] and to `lora_B` [out, r] (ΔW = B·A permutes exactly like W).
//! Use `n_kv_head` for k_proj.

use candle_core::Tensor;

use crate::error::{LoraError, Result};

fn check(t: &Tensor, n_head: usize) -> Result<(usize, usize, usize)> {
    let (out, cols) = t.dims2().map_err(|_| {
        LoraError::Invalid(format!(
            "q/k permutation needs a 2-D tensor, got shape {:?}",
            t.dims()
        ))
    })?;
    if n_head == 0 || !out.is_multiple_of(n_head) || !(out / n_head).is_multiple_of(2) {
        // An odd head dim cannot be split into RoPE halves; a bad head count is a config error.
        return Err(LoraError::Invalid(format!(
            "q/k permutation: {out} rows cannot be split into {n_head} heads of even size"
        )));
    }
    Ok((out, cols, out / n_head))
}

/// HF → GGUF row order (llama.cpp convert's `permute`).
pub fn hf_to_gguf_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, cols, hd) = check(t, n_head)?;
    Ok(t.reshape((n_head, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, cols))?)
}

/// GGUF → HF row order: the inverse of [`hf_to_gguf_rows`].
pub fn gguf_to_hf_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, cols, hd) = check(t, n_head)?;
    Ok(t.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rows(t: &Tensor) -> Vec<f32> {
        t.narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn hand_checked_example() {
        // 2 heads of dim 4, column 0 holds the row index. Per head, HF rows [0,1 | 2,3]
        // (two RoPE halves) become GGUF rows [0,2,1,3] (interleaved pairs).
        let t = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let t = Tensor::cat(&[&t, &t.affine(10.0, 0.0).unwrap()], 1).unwrap();
        let g = hf_to_gguf_rows(&t, 2).unwrap();
        assert_eq!(rows(&g), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        // The second column moves with its row.
        let c1 = g
            .narrow(1, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(c1, vec![0., 20., 10., 30., 40., 60., 50., 70.]);
        // head dim 6: [0,1,2 | 3,4,5] → [0,3,1,4,2,5]
        let t6 = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((6, 1))
            .unwrap();
        assert_eq!(
            rows(&hf_to_gguf_rows(&t6, 1).unwrap()),
            vec![0., 3., 1., 4., 2., 5.]
        );
        assert_eq!(
            rows(&gguf_to_hf_rows(&t6, 1).unwrap()),
            vec![0., 2., 4., 1., 3., 5.]
        );
    }

    #[test]
    fn inverse_roundtrip() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (192, 8), &dev).unwrap();
        for n in [3, 6, 1] {
            let y = gguf_to_hf_rows(&hf_to_gguf_rows(&x, n).unwrap(), n).unwrap();
            let d = (y - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
            // Not the identity.
            let p = hf_to_gguf_rows(&x, n).unwrap();
            let d = (p - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d > 0.0);
        }
        // ΔW = B·A permutes like W: perm(B)·A == perm(B·A).
        let b = Tensor::randn(0f32, 1., (576, 8), &dev).unwrap();
        let a = Tensor::randn(0f32, 1., (8, 64), &dev).unwrap();
        let lhs = hf_to_gguf_rows(&b, 9).unwrap().matmul(&a).unwrap();
        let rhs = hf_to_gguf_rows(&b.matmul(&a).unwrap(), 9).unwrap();
        let d = (lhs - rhs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((10, 3), DType::F32, &dev).unwrap();
        assert!(hf_to_gguf_rows(&x, 3).is_err()); // 10 rows / 3 heads
        assert!(hf_to_gguf_rows(&x, 2).is_err()); // head dim 5 is odd
        assert!(hf_to_gguf_rows(&x, 0).is_err());
        let v = Tensor::zeros(8, DType::F32, &dev).unwrap();
        assert!(gguf_to_hf_rows(&v, 2).is_err());
    }
}
