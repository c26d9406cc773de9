//! Merge / unmerge a LoRA module into a base weight: `W ± weight·scale·B·A` in f32.

use candle_core::{DType, Tensor};

use crate::adapter::LoraModule;
use crate::error::{LoraError, Result};

fn check(w: &Tensor, m: &LoraModule) -> Result<()> {
    let (out, inp) = w
        .dims2()
        .map_err(|_| LoraError::Mismatch(format!("base weight must be 2-D, got {:?}", w.dims())))?;
    let (r, a_in) = m
        .a
        .dims2()
        .map_err(|_| LoraError::Mismatch(format!("lora_A must be 2-D, got {:?}", m.a.dims())))?;
    let (b_out, b_r) = m
        .b
        .dims2()
        .map_err(|_| LoraError::Mismatch(format!("lora_B must be 2-D, got {:?}", m.b.dims())))?;
    if (out, inp) != (b_out, a_in) || r != b_r {
        return Err(LoraError::Mismatch(format!(
            "weight [{out}, {inp}] vs lora_B [{b_out}, {b_r}] · lora_A [{r}, {a_in}]"
        )));
    }
    Ok(())
}

/// `W + weight·scale·B·A` (f32, on W's device). `weight` is the user's adapter strength.
pub fn merge_weight(w: &Tensor, m: &LoraModule, weight: f64) -> Result<Tensor> {
    check(w, m)?;
    let d = m.delta()?.to_device(w.device())?;
    Ok((w.to_dtype(DType::F32)? + d.affine(weight, 0.0)?)?)
}

/// Inverse of [`merge_weight`]: `W − weight·scale·B·A`. Exact up to f32 rounding.
pub fn unmerge_weight(w: &Tensor, m: &LoraModule, weight: f64) -> Result<Tensor> {
    check(w, m)?;
    let d = m.delta()?.to_device(w.device())?;
    Ok((w.to_dtype(DType::F32)? - d.affine(weight, 0.0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn module(dev: &Device) -> LoraModule {
        LoraModule {
            a: Tensor::randn(0f32, 1., (4, 32), dev).unwrap(),
            b: Tensor::randn(0f32, 1., (48, 4), dev).unwrap(),
            scale: 2.0,
        }
    }

    #[test]
    fn merge_then_unmerge_is_identity() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (48, 32), &dev).unwrap();
        let m = module(&dev);
        let merged = merge_weight(&w, &m, 0.7).unwrap();
        // It actually changed W, by weight·scale·B·A.
        let expect = (&w + m.b.matmul(&m.a).unwrap().affine(1.4, 0.0).unwrap()).unwrap();
        let e = (&merged - &expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(e < 1e-5);
        let back = unmerge_weight(&merged, &m, 0.7).unwrap();
        let num = (&back - &w)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let den = w
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(num / den < 1e-6, "relative error {}", num / den);
    }

    #[test]
    fn shape_mismatch_is_error() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((32, 48), DType::F32, &dev).unwrap();
        assert!(matches!(
            merge_weight(&w, &module(&dev), 1.0),
            Err(LoraError::Mismatch(_))
        ));
        assert!(unmerge_weight(&w, &module(&dev), 1.0).is_err());
    }
}
