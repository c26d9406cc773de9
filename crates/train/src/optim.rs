//! AdamW with decoupled weight decay and bias correction (as torch.optim.AdamW), over named
//! parameters with per-parameter learning-rate multipliers (LoRA+: B learns faster than A);
//! learning-rate schedules with warmup; global-norm clipping.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

pub struct Param {
    pub name: String,
    pub var: Var,
    /// Multiplier on the base learning rate (LoRA+ sets it on B).
    pub lr_mult: f64,
}

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (for bias correction).
    pub t: u64,
    /// name → (m, v)
    pub state: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            state: BTreeMap::new(),
        }
    }

    /// One update with gradients `grads[name]` at learning rate `lr`.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for p in params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let lr = lr * p.lr_mult;
            let (m, v) = match self.state.get(&p.name) {
                Some((m, v)) => (m.clone(), v.clone()),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let theta = p.var.as_tensor();
            // Decoupled weight decay first, as torch does: θ ← θ·(1 − lr·wd).
            let decayed = if self.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            p.var.set(&(decayed - (update * lr)?)?)?;
            self.state.insert(p.name.clone(), (m, v));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "linear" => Ok(Schedule::Linear),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!(
                "unknown schedule `{s}` (cosine, linear or constant)"
            )),
        }
    }
}

/// Learning rate at optimizer step `step` (0-based), as HF's schedules with warmup: linear
/// warmup from 0, then cosine / linear decay to 0 at `total`, or constant.
pub fn lr_at(base: f64, schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let denom = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / denom).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Global L2 norm of all gradients; scales them to `max_norm` when above it (max_norm > 0).
pub fn clip_grad_norm(
    grads: &mut BTreeMap<String, Tensor>,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computation() {
        // One parameter x=1.0, grad 0.5, lr 0.1, wd 0.01: torch AdamW's first step is
        // x·(1 − lr·wd) − lr·m̂/(√v̂+ε) with m̂ = g, v̂ = g² → 0.999 − 0.1·(0.5/0.5) = 0.899.
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let params = vec![Param {
            name: "x".into(),
            var: var.clone(),
            lr_mult: 1.0,
        }];
        let mut opt = AdamW::new(0.1, 0.01);
        let grads = BTreeMap::from([(
            "x".to_string(),
            Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
        )]);
        opt.step(&params, &grads, 0.1).unwrap();
        let x = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((x - 0.899).abs() < 1e-6, "{x}");
        // Second step, grad 0.5 again: m = 0.5, v = 0.25 after bias correction → same step.
        opt.step(&params, &grads, 0.1).unwrap();
        let x2 = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        let want = 0.899 * (1.0 - 0.001) - 0.1;
        assert!((x2 as f64 - want).abs() < 1e-5, "{x2} vs {want}");
    }

    #[test]
    fn schedules() {
        assert!((lr_at(1.0, Schedule::Cosine, 0, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 2, 2, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Linear, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, Schedule::Constant, 9, 2, 10), 1.0);
        assert!(lr_at(1.0, Schedule::Cosine, 10, 2, 10).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = BTreeMap::from([
            (
                "a".to_string(),
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }
}
