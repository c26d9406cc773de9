//! Weighted combination of adapters with PEFT's `add_weighted_adapter` semantics
//! (`peft/tuners/lora/model.py`).
//!
//! The result always has `r = lora_alpha = new_rank` and `use_rslora = false`, i.e. scale 1,
//! like PEFT (rsLoRA is switched off so the scale really is 1): each part's scale s_i and
//! weight w_i are folded into the factors.
//!
//! * `Linear` (all parts must have the same rank in every module): A = Σ sign(w_i s_i)·√|w_i s_i|·A_i,
//!   B = Σ √|w_i s_i|·B_i. Note this is *not* Σ w_i s_i B_i A_i (cross terms B_i A_j appear);
//!   that is PEFT's behaviour and is kept for compatibility. With one part it is exact.
//! * `Cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; …] (rows), B = [B_1 B_2 …] (columns); rank Σ r_i, and
//!   ΔW = Σ w_i s_i B_i A_i exactly.
//! * `Svd`: ΔW = Σ w_i s_i B_i A_i, then its top-`rank` SVD (default: max part rank):
//!   B = U·diag(σ), A = Vᵀ. Deviation from PEFT: PEFT multiplies by `weight·scaling` *and*
//!   uses `get_delta_weight` (which already includes `scaling`), so its svd result is
//!   Σ w_i s_i² B_i A_i; we apply s_i once so `svd` at full rank equals `cat` (and the
//!   parts' actual outputs). For s_i = 1 the two agree.
//!
//! A single part is combined with the method asked for. Deviation from PEFT, which forces
//! `Linear` for one adapter: that would turn `svd --rank K` of one adapter into a full-rank
//! copy, silently ignoring K, whereas truncating one adapter to its best rank-K approximation
//! is a useful operation in its own right (for one part `Linear` and `Cat` give the same ΔW).
//! Modules present in only some parts use those parts alone (missing = zero contribution). Ranks of `Cat`/`Svd` modules that
//! need fewer directions are zero-padded up to the adapter's rank so every module has rank r.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::adapter::{Adapter, LoraModule, ModuleKey, Provenance};
use crate::config::{LayersToTransform, TargetModules};
use crate::error::{LoraError, Result};
use crate::linalg::{self, Mat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombineMethod {
    Linear,
    Cat,
    Svd,
}

impl FromStr for CombineMethod {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(CombineMethod::Linear),
            "cat" => Ok(CombineMethod::Cat),
            "svd" => Ok(CombineMethod::Svd),
            other => Err(LoraError::Invalid(format!(
                "unknown combination method `{other}` (linear, cat or svd)"
            ))),
        }
    }
}

/// The rank PEFT allocates for an adapter: r, or the largest rank_pattern entry.
fn config_rank(a: &Adapter) -> usize {
    a.config
        .rank_pattern
        .values()
        .copied()
        .chain([a.config.r])
        .max()
        .unwrap_or(a.config.r)
}

/// Pad `a` [k, in] with zero rows and `b` [out, k] with zero columns up to rank `r`.
fn pad(a: Tensor, b: Tensor, r: usize) -> Result<(Tensor, Tensor)> {
    let k = a.dims()[0];
    if k >= r {
        return Ok((a, b));
    }
    let za = Tensor::zeros((r - k, a.dims()[1]), DType::F32, a.device())?;
    let zb = Tensor::zeros((b.dims()[0], r - k), DType::F32, b.device())?;
    Ok((Tensor::cat(&[&a, &za], 0)?, Tensor::cat(&[&b, &zb], 1)?))
}

pub fn combine(
    adapters: &[(&Adapter, f64)],
    method: CombineMethod,
    rank: Option<usize>,
) -> Result<Adapter> {
    let first = adapters
        .first()
        .ok_or_else(|| LoraError::Invalid("combine: no adapters given".into()))?
        .0;
    if let Some((_, w)) = adapters.iter().find(|(_, w)| !w.is_finite()) {
        return Err(LoraError::Invalid(format!(
            "combine: weight {w} is not finite"
        )));
    }
    let ranks: Vec<usize> = adapters.iter().map(|(a, _)| config_rank(a)).collect();
    let new_rank = match method {
        CombineMethod::Linear => {
            if ranks.iter().any(|r| *r != ranks[0]) {
                return Err(LoraError::Mismatch(format!(
                    "combine linear: all adapters need the same rank, got {ranks:?}"
                )));
            }
            ranks[0]
        }
        CombineMethod::Cat => ranks.iter().sum(),
        CombineMethod::Svd => rank.unwrap_or_else(|| *ranks.iter().max().unwrap_or(&1)),
    };
    if new_rank == 0 {
        return Err(LoraError::Invalid("combine: rank 0".into()));
    }
    let keys: BTreeSet<ModuleKey> = adapters
        .iter()
        .flat_map(|(a, _)| a.modules.keys().copied())
        .collect();
    let mut modules = BTreeMap::new();
    for key in keys {
        let parts: Vec<(&LoraModule, f64)> = adapters
            .iter()
            .filter_map(|(a, w)| a.modules.get(&key).map(|m| (m, *w)))
            .collect();
        let (out, inp) = (parts[0].0.out_features(), parts[0].0.in_features());
        if let Some((m, _)) = parts
            .iter()
            .find(|(m, _)| (m.out_features(), m.in_features()) != (out, inp))
        {
            return Err(LoraError::Mismatch(format!(
                "combine: {key} is [{out}, {inp}] in one adapter and [{}, {}] in another",
                m.out_features(),
                m.in_features()
            )));
        }
        let device = parts[0].0.a.device().clone();
        let f32s =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&device)?) };
        let (a, b) = match method {
            CombineMethod::Linear => {
                let mut a_sum: Option<Tensor> = None;
                let mut b_sum: Option<Tensor> = None;
                for (m, w) in &parts {
                    if m.rank() != new_rank {
                        return Err(LoraError::Mismatch(format!(
                            "combine linear: {key} has rank {}, expected {new_rank}",
                            m.rank()
                        )));
                    }
                    let ws = w * m.scale;
                    let root = ws.abs().sqrt();
                    let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
                    let a = f32s(&m.a)?.affine(sign * root, 0.0)?;
                    let b = f32s(&m.b)?.affine(root, 0.0)?;
                    a_sum = Some(match a_sum {
                        Some(s) => (s + a)?,
                        None => a,
                    });
                    b_sum = Some(match b_sum {
                        Some(s) => (s + b)?,
                        None => b,
                    });
                }
                (
                    a_sum.expect("at least one part"),
                    b_sum.expect("at least one part"),
                )
            }
            CombineMethod::Cat => {
                let mut as_ = Vec::new();
                let mut bs = Vec::new();
                for (m, w) in &parts {
                    as_.push(f32s(&m.a)?.affine(w * m.scale, 0.0)?);
                    bs.push(f32s(&m.b)?);
                }
                let a = Tensor::cat(&as_, 0)?;
                let b = Tensor::cat(&bs, 1)?;
                pad(a, b, new_rank)?
            }
            CombineMethod::Svd => {
                // ΔW = Σ w s B A = [B_1 … B_n]·[w_1 s_1 A_1; …]: decompose the factored form
                // exactly instead of forming the [out, in] matrix.
                let mut as_ = Vec::new();
                let mut bs = Vec::new();
                for (m, w) in &parts {
                    as_.push(f32s(&m.a)?.affine(w * m.scale, 0.0)?);
                    bs.push(f32s(&m.b)?);
                }
                let svd = linalg::svd_of_lowrank(
                    &Mat::from_tensor(&Tensor::cat(&bs, 1)?)?,
                    &Mat::from_tensor(&Tensor::cat(&as_, 0)?)?,
                    1.0,
                )?
                .truncate(new_rank);
                let mut us = svd.u.clone();
                let k = svd.s.len();
                for row in us.data.chunks_mut(k.max(1)) {
                    row.iter_mut().zip(&svd.s).for_each(|(x, s)| *x *= s);
                }
                let b = if k == 0 {
                    Tensor::zeros((out, 0), DType::F32, &device)?
                } else {
                    us.to_tensor(&device)?
                };
                let a = if k == 0 {
                    Tensor::zeros((0, inp), DType::F32, &device)?
                } else {
                    svd.vt.to_tensor(&device)?
                };
                pad(a, b, new_rank)?
            }
        };
        modules.insert(key, LoraModule { a, b, scale: 1.0 });
    }

    let mut config = first.config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.use_rslora = false;
    let mut targets: Vec<String> = modules
        .keys()
        .map(|k| k.target.peft_name().to_string())
        .collect();
    targets.sort();
    targets.dedup();
    config.target_modules = TargetModules::List(targets);
    // Layers: the union of the parts' restrictions (None if any part covers every layer).
    config.layers_to_transform = if adapters
        .iter()
        .any(|(a, _)| a.config.layers_to_transform.is_none())
    {
        None
    } else {
        let layers: BTreeSet<usize> = modules.keys().map(|k| k.layer).collect();
        Some(LayersToTransform::List(layers.into_iter().collect()))
    };
    let fp = &first.provenance.base_fingerprint;
    let same_base = adapters
        .iter()
        .all(|(a, _)| &a.provenance.base_fingerprint == fp);
    let provenance = Provenance {
        base_fingerprint: if same_base { fp.clone() } else { None },
        lowrank_version: Some(crate::VERSION.to_string()),
        created: None,
    };
    Ok(Adapter {
        config,
        modules,
        provenance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraConfig;
    use crate::target::Target;
    use candle_core::Device;

    fn adapter(r: usize, alpha: f64, seed: f32) -> Adapter {
        let dev = Device::Cpu;
        let config = LoraConfig::new(r, alpha, &[Target::Q, Target::V]);
        let mut modules = BTreeMap::new();
        for (t, o) in [(Target::Q, 24), (Target::V, 12)] {
            let a = Tensor::randn(seed, 1., (r, 24), &dev).unwrap();
            let b = Tensor::randn(-seed, 1., (o, r), &dev).unwrap();
            modules.insert(
                ModuleKey::new(0, t),
                LoraModule {
                    a,
                    b,
                    scale: alpha / r as f64,
                },
            );
        }
        Adapter {
            config,
            modules,
            provenance: Provenance::default(),
        }
    }

    fn rel_err(x: &Tensor, y: &Tensor) -> f32 {
        let n = (x - y)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let d = y
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        n / d
    }

    fn expected(parts: &[(&Adapter, f64)], key: &ModuleKey) -> Tensor {
        let mut acc: Option<Tensor> = None;
        for (a, w) in parts {
            let d = a.modules[key].delta().unwrap().affine(*w, 0.0).unwrap();
            acc = Some(match acc {
                Some(s) => (s + d).unwrap(),
                None => d,
            });
        }
        acc.unwrap()
    }

    /// `got`'s ΔW is a best rank-`k` approximation of `want` (Eckart–Young: its residual is
    /// the norm of the singular values past the k-th).
    fn assert_best_rank_k(got: &LoraModule, want: &Tensor, k: usize) {
        let want = Mat::from_tensor(want).unwrap();
        let full = linalg::svd(&want).unwrap();
        let got = Mat::from_tensor(&got.delta().unwrap()).unwrap();
        let resid: f64 = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let best: f64 = full.s[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((resid - best).abs() < 1e-4 * full.s[0]);
    }

    #[test]
    fn svd_of_one_adapter_truncates_to_the_asked_rank() {
        // Regression: one part used to be forced to `linear`, returning the full rank and
        // ignoring `--rank`.
        let a1 = adapter(4, 8.0, 0.1);
        let parts = [(&a1, -0.5)];
        let s2 = combine(&parts, CombineMethod::Svd, Some(2)).unwrap();
        assert_eq!(s2.config.r, 2);
        assert_eq!(s2.config.lora_alpha, 2.0);
        for (key, m) in &s2.modules {
            assert_eq!(m.rank(), 2, "{key}");
            assert_eq!(m.scale, 1.0);
            assert_best_rank_k(m, &expected(&parts, key), 2);
        }
        // Without --rank, svd keeps the part's rank, which reproduces it.
        let full = combine(&parts, CombineMethod::Svd, None).unwrap();
        assert_eq!(full.config.r, 4);
        for key in a1.modules.keys() {
            let want = expected(&parts, key);
            assert!(
                rel_err(&full.modules[key].delta().unwrap(), &want) < 1e-5,
                "{key}"
            );
        }
        // Cat of one part is the part itself, at its rank.
        let cat = combine(&parts, CombineMethod::Cat, None).unwrap();
        assert_eq!(cat.config.r, 4);
        for key in a1.modules.keys() {
            let want = expected(&parts, key);
            assert!(
                rel_err(&cat.modules[key].delta().unwrap(), &want) < 1e-6,
                "{key}"
            );
        }
    }

    #[test]
    fn cat_is_weighted_sum_and_svd_full_rank_equals_cat() {
        let a1 = adapter(4, 8.0, 0.1);
        let a2 = adapter(2, 6.0, 0.3);
        let parts = [(&a1, 0.7), (&a2, -1.3)];
        let cat = combine(&parts, CombineMethod::Cat, None).unwrap();
        assert_eq!(cat.config.r, 6);
        assert_eq!(cat.config.lora_alpha, 6.0);
        assert!(!cat.config.use_rslora);
        let svd = combine(&parts, CombineMethod::Svd, Some(6)).unwrap();
        for key in a1.modules.keys() {
            let want = expected(&parts, key);
            let c = &cat.modules[key];
            assert_eq!(c.scale, 1.0);
            assert_eq!(c.rank(), 6);
            assert!(rel_err(&c.delta().unwrap(), &want) < 1e-6);
            assert!(
                rel_err(&svd.modules[key].delta().unwrap(), &want) < 1e-5,
                "{key}"
            );
        }
        // Truncated svd keeps the top directions: rank 1 is the best rank-1 approximation.
        let s1 = combine(&parts, CombineMethod::Svd, Some(1)).unwrap();
        let key = ModuleKey::new(0, Target::Q);
        assert_best_rank_k(&s1.modules[&key], &expected(&parts, &key), 1);
        // Default svd rank is the max part rank.
        assert_eq!(
            combine(&parts, CombineMethod::Svd, None).unwrap().config.r,
            4
        );
    }

    #[test]
    fn linear_follows_peft() {
        let a1 = adapter(4, 8.0, 0.1);
        let a2 = adapter(4, 4.0, 0.2);
        // One part, svd at its own rank: exact w·s·B·A (the ΔW PEFT's forced linear gives).
        let one = combine(&[(&a1, -0.5)], CombineMethod::Svd, None).unwrap();
        let key = ModuleKey::new(0, Target::V);
        assert!(
            rel_err(
                &one.modules[&key].delta().unwrap(),
                &expected(&[(&a1, -0.5)], &key)
            ) < 1e-6
        );
        // Two parts: A = Σ sign·√|ws|·A_i, B = Σ √|ws|·B_i.
        let lin = combine(&[(&a1, 0.5), (&a2, -2.0)], CombineMethod::Linear, None).unwrap();
        let m = &lin.modules[&key];
        let (m1, m2) = (&a1.modules[&key], &a2.modules[&key]);
        // w·s: 0.5·(8/4) = 1 and −2·(4/4) = −2.
        let r1 = 1.0;
        let r2 = 2f64.sqrt();
        let wa = (m1.a.affine(r1, 0.0).unwrap() + m2.a.affine(-r2, 0.0).unwrap()).unwrap();
        let wb = (m1.b.affine(r1, 0.0).unwrap() + m2.b.affine(r2, 0.0).unwrap()).unwrap();
        assert!(rel_err(&m.a, &wa) < 1e-6 && rel_err(&m.b, &wb) < 1e-6);
        assert_eq!(lin.config.r, 4);
        // Different ranks are rejected for linear.
        let a3 = adapter(2, 4.0, 0.2);
        assert!(combine(&[(&a1, 1.0), (&a3, 1.0)], CombineMethod::Linear, None).is_err());
        assert!("bogus".parse::<CombineMethod>().is_err());
        assert_eq!("cat".parse::<CombineMethod>().unwrap(), CombineMethod::Cat);
    }
}
