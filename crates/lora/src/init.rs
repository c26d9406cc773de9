//! Fresh LoRA modules with PEFT's `init_lora_weights` semantics (`reset_lora_parameters`,
//! `pissa_init` in `peft/tuners/lora/layer.py`):
//!
//! * `true`: A ~ kaiming_uniform(a=√5) = U(−1/√in, 1/√in), B = 0 (ΔW = 0 at start).
//! * `"gaussian"`: A ~ N(0, σ = 1/r), B = 0.
//! * `false`: A and B both nn.Linear-default random (A: U(±1/√in), B: U(±1/√r)); ΔW ≠ 0, which
//!   PEFT uses for tests.
//! * `"pissa"`: top-r SVD of the base weight W = V·S·Uh (PEFT's naming). With Sr = S[:r]/scale:
//!   A = diag(√Sr)·Uh[:r], B = V[:, :r]·diag(√Sr), and the base becomes the residual
//!   W − scale·B·A. `"pissa_niter_K"` uses K subspace iterations (torch `svd_lowrank`) instead of
//!   the exact SVD; ours is randomized subspace iteration seeded from `rng`.
//!
//! Everything is deterministic given the rng state.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::LoraModule;
use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{LoraError, Result};
use crate::linalg::{self, Iterations, Mat};
use crate::target::Target;

fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// Initialise the module for (`layer`, `target`) of shape [out, in]. Returns the module and,
/// for PiSSA, the residual base weight the model must use instead of W.
#[allow(clippy::too_many_arguments)]
pub fn init_module(
    config: &LoraConfig,
    layer: usize,
    target: Target,
    out: usize,
    inp: usize,
    base_w: Option<&Tensor>,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<(LoraModule, Option<Tensor>)> {
    let r = config.rank_for(layer, target);
    let scale = config.scale_for(layer, target);
    if r == 0 || out == 0 || inp == 0 {
        return Err(LoraError::Invalid(format!(
            "layers.{layer}.{target}: cannot init rank {r} for [{out}, {inp}]"
        )));
    }
    let kaiming_a = |rng: &mut ChaCha8Rng| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            uniform(rng, r * inp, 1.0 / (inp as f64).sqrt()),
            (r, inp),
            device,
        )?)
    };
    let zeros_b = || -> Result<Tensor> { Ok(Tensor::zeros((out, r), DType::F32, device)?) };
    let module = |a, b| LoraModule { a, b, scale };
    match &config.init_lora_weights {
        InitLoraWeights::Bool(true) => {
            let a = kaiming_a(rng)?;
            Ok((module(a, zeros_b()?), None))
        }
        InitLoraWeights::Bool(false) => {
            let a = kaiming_a(rng)?;
            let b = Tensor::from_vec(uniform(rng, out * r, 1.0 / (r as f64).sqrt()), (out, r), device)?;
            Ok((module(a, b), None))
        }
        InitLoraWeights::Named(name) if name.eq_ignore_ascii_case("gaussian") => {
            let std = 1.0 / r as f64;
            let v: Vec<f32> = (0..r * inp).map(|_| (linalg::std_normal(rng) * std) as f32).collect();
            Ok((module(Tensor::from_vec(v, (r, inp), device)?, zeros_b()?), None))
        }
        InitLoraWeights::Named(name) if name == "pissa" || name.starts_with("pissa_niter_") => {
            let iters = if name == "pissa" {
                Iterations::Converge
            } else {
                let k = name["pissa_niter_".len()..].parse::<usize>().map_err(|_| {
                    LoraError::Invalid(format!("init_lora_weights `{name}`: expected pissa_niter_<number>"))
                })?;
                Iterations::Fixed(k)
            };
            let w = base_w.ok_or_else(|| {
                LoraError::Invalid(format!("layers.{layer}.{target}: PiSSA init needs the base weight"))
            })?;
            if w.dims() != [out, inp] {
                return Err(LoraError::Mismatch(format!("layers.{layer}.{target}: base weight {:?} is not [{out}, {inp}]", w.dims())));
            }
            if r > out.min(inp) {
                return Err(LoraError::Invalid(format!("layers.{layer}.{target}: PiSSA rank {r} exceeds min({out}, {inp})")));
            }
            let wm = Mat::from_tensor(w)?;
            let svd = linalg::top_k_svd(&wm, r, iters, rng.random::<u64>())?;
            let sr: Vec<f64> = svd.s.iter().map(|s| (s / scale).max(0.0).sqrt()).collect();
            let mut a = svd.vt.clone(); // diag(√Sr)·Uh_r
            for (i, s) in sr.iter().enumerate() {
                a.data[i * inp..(i + 1) * inp].iter_mut().for_each(|x| *x *= s);
            }
            let mut b = svd.u.clone(); // V_r·diag(√Sr)
            for row in b.data.chunks_mut(r) {
                row.iter_mut().zip(&sr).for_each(|(x, s)| *x *= s);
            }
            let at = a.to_tensor(device)?;
            let bt = b.to_tensor(device)?;
            let m = module(at, bt);
            let residual = (w.to_dtype(DType::F32)?.to_device(device)? - m.delta()?)?;
            Ok((m, Some(residual)))
        }
        InitLoraWeights::Named(name) => Err(LoraError::Invalid(format!(
            "init_lora_weights `{name}` is not supported (true, false, gaussian, pissa, pissa_niter_K)"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(init: InitLoraWeights) -> LoraConfig {
        let mut c = LoraConfig::new(8, 16.0, &[Target::Q]);
        c.init_lora_weights = init;
        c
    }

    fn stats(t: &Tensor) -> (f32, f32, f32) {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        (mean, var.sqrt(), maxabs)
    }

    #[test]
    fn default_init_kaiming_and_zero_b() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (m, res) = init_module(
            &cfg(InitLoraWeights::Bool(true)),
            0,
            Target::Q,
            96,
            400,
            None,
            &mut rng,
            &dev,
        )
        .unwrap();
        assert!(res.is_none());
        assert_eq!(m.a.dims(), &[8, 400]);
        assert_eq!(m.b.dims(), &[96, 8]);
        assert_eq!(m.scale, 2.0);
        let (mean, std, maxabs) = stats(&m.a);
        let bound = 1.0 / 20.0;
        assert!(maxabs <= bound && maxabs > 0.95 * bound);
        assert!(mean.abs() < 0.003);
        assert!((std - bound / 3f32.sqrt()).abs() < 0.002, "{std}");
        assert_eq!(stats(&m.b).2, 0.0);
        // Deterministic given the seed; different for another seed.
        let mut rng2 = ChaCha8Rng::seed_from_u64(1);
        let (m2, _) = init_module(
            &cfg(InitLoraWeights::Bool(true)),
            0,
            Target::Q,
            96,
            400,
            None,
            &mut rng2,
            &dev,
        )
        .unwrap();
        assert_eq!(
            m.a.to_vec2::<f32>().unwrap(),
            m2.a.to_vec2::<f32>().unwrap()
        );
        let mut rng3 = ChaCha8Rng::seed_from_u64(2);
        let (m3, _) = init_module(
            &cfg(InitLoraWeights::Bool(true)),
            0,
            Target::Q,
            96,
            400,
            None,
            &mut rng3,
            &dev,
        )
        .unwrap();
        assert_ne!(
            m.a.to_vec2::<f32>().unwrap(),
            m3.a.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn gaussian_and_false() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, _) = init_module(
            &cfg(InitLoraWeights::Named("gaussian".into())),
            0,
            Target::Q,
            64,
            2000,
            None,
            &mut rng,
            &dev,
        )
        .unwrap();
        let (mean, std, _) = stats(&m.a);
        assert!(
            mean.abs() < 0.01 && (std - 1.0 / 8.0).abs() < 0.005,
            "{mean} {std}"
        );
        assert_eq!(stats(&m.b).2, 0.0);
        let (m, _) = init_module(
            &cfg(InitLoraWeights::Bool(false)),
            0,
            Target::Q,
            64,
            100,
            None,
            &mut rng,
            &dev,
        )
        .unwrap();
        let (_, _, bmax) = stats(&m.b);
        assert!(bmax > 0.0 && bmax <= 1.0 / 8f32.sqrt());
        assert!(init_module(
            &cfg(InitLoraWeights::Named("olora".into())),
            0,
            Target::Q,
            8,
            8,
            None,
            &mut rng,
            &dev
        )
        .is_err());
    }

    #[test]
    fn pissa_matches_definition() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let w = Tensor::randn(0f32, 1., (96, 80), &dev).unwrap();
        let (m, res) = init_module(
            &cfg(InitLoraWeights::Named("pissa".into())),
            0,
            Target::Q,
            96,
            80,
            Some(&w),
            &mut rng,
            &dev,
        )
        .unwrap();
        let res = res.unwrap();
        // residual + scale·B·A == W
        let back = (&res + m.delta().unwrap()).unwrap();
        let err = (back - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-5, "{err}");
        // scale·B·A is the best rank-8 approximation: its singular values are W's top 8, and
        // the residual's top singular value is W's 9th.
        let full = linalg::svd(&Mat::from_tensor(&w).unwrap()).unwrap();
        let d = linalg::svd(&Mat::from_tensor(&m.delta().unwrap()).unwrap()).unwrap();
        for i in 0..8 {
            assert!((d.s[i] - full.s[i]).abs() < 1e-4 * full.s[0], "{i}");
        }
        let rs = linalg::svd(&Mat::from_tensor(&res).unwrap()).unwrap();
        assert!((rs.s[0] - full.s[8]).abs() < 1e-4 * full.s[0]);
        // A·Aᵀ = diag(S/scale) (rows of A are scaled orthonormal vectors), same for BᵀB.
        let aat =
            m.a.matmul(&m.a.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
        for i in 0..8 {
            assert!((aat[i][i] as f64 - full.s[i] / 2.0).abs() < 1e-3 * full.s[0]);
        }
        // niter variant is close on a matrix with a clear spectral gap; missing W is an error.
        assert!(init_module(
            &cfg(InitLoraWeights::Named("pissa".into())),
            0,
            Target::Q,
            96,
            80,
            None,
            &mut rng,
            &dev
        )
        .is_err());
        assert!(init_module(
            &cfg(InitLoraWeights::Named("pissa_niter_x".into())),
            0,
            Target::Q,
            96,
            80,
            Some(&w),
            &mut rng,
            &dev
        )
        .is_err());
        let (m4, _) = init_module(
            &cfg(InitLoraWeights::Named("pissa_niter_4".into())),
            0,
            Target::Q,
            96,
            80,
            Some(&w),
            &mut rng,
            &dev,
        )
        .unwrap();
        assert_eq!(m4.a.dims(), &[8, 80]);
    }
}
