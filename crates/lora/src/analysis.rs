//! Adapter analysis for `inspect --svd` and the LoRA paper's experiments (Hu et al. 2021, §7).
//!
//! * [`module_stats`]: ‖ΔW‖_F, the singular values of ΔW = s·B·A (exact, via
//!   [`linalg::svd_of_lowrank`]), and two effective ranks:
//!   - `effective_rank_threshold`: how many singular values exceed 1e-3 · σ_max (numerical rank);
//!   - `effective_rank_entropy`: exp(H(p)) with p_i = σ_i / Σσ (Roy & Vetterli's effective rank),
//!     a continuous measure: r equal singular values give r, one dominant value gives ≈ 1.
//! * [`subspace_similarity`]: φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) (§7.2), U the top
//!   right-singular vectors of each A (they live in R^in).
//! * [`amplification`]: ‖UᵀWVᵀ‖_F for ΔW's, W's and random directions (Table 7).

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, LoraModule, ModuleKey};
use crate::error::{LoraError, Result};
use crate::linalg::{self, Iterations, Mat};

/// Singular-value statistics of one module's ΔW.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleStats {
    /// ‖ΔW‖_F = √Σσ².
    pub frobenius: f64,
    /// Singular values of ΔW, descending (r of them).
    pub singular_values: Vec<f64>,
    /// #{σ_i > 1e-3 · σ_max} (0 for ΔW = 0).
    pub effective_rank_threshold: usize,
    /// exp(−Σ p log p), p = σ/Σσ (0 for ΔW = 0).
    pub effective_rank_entropy: f64,
}

/// Both effective ranks of a spectrum (see the module docs).
pub fn effective_rank(s: &[f64]) -> (usize, f64) {
    let max = s.iter().cloned().fold(0.0, f64::max);
    let sum: f64 = s.iter().filter(|x| **x > 0.0).sum();
    if max <= 0.0 || sum <= 0.0 {
        return (0, 0.0);
    }
    let thr = s.iter().filter(|&&x| x > 1e-3 * max).count();
    let h: f64 = s
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| {
            let p = x / sum;
            -p * p.ln()
        })
        .sum();
    (thr, h.exp())
}

pub fn module_stats(m: &LoraModule) -> Result<ModuleStats> {
    let svd = linalg::svd_of_lowrank(&Mat::from_tensor(&m.b)?, &Mat::from_tensor(&m.a)?, m.scale)?;
    let frobenius = svd.s.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (t, e) = effective_rank(&svd.s);
    Ok(ModuleStats {
        frobenius,
        singular_values: svd.s,
        effective_rank_threshold: t,
        effective_rank_entropy: e,
    })
}

/// [`module_stats`] for every module, in key order.
pub fn adapter_stats(a: &Adapter) -> Result<Vec<(ModuleKey, ModuleStats)>> {
    a.modules
        .iter()
        .map(|(k, m)| Ok((*k, module_stats(m)?)))
        .collect()
}

/// Top-`k` right-singular vectors of `a` [r, in] as rows [k, in].
fn right_vectors(a: &Tensor, k: usize, which: &str) -> Result<Mat> {
    let m = Mat::from_tensor(a).map_err(|_| {
        LoraError::Invalid(format!(
            "subspace_similarity: {which} must be 2-D, got {:?}",
            a.dims()
        ))
    })?;
    if k == 0 || k > m.rows.min(m.cols) {
        return Err(LoraError::Invalid(format!(
            "subspace_similarity: {which} is [{}, {}], cannot take its top {k} directions",
            m.rows, m.cols
        )));
    }
    Ok(linalg::svd(&m)?.vt.first_rows(k))
}

/// φ(A1, A2, i, j) ∈ [0, 1]: 1 when one top subspace contains the other, 0 when orthogonal.
pub fn subspace_similarity(a1: &Tensor, a2: &Tensor, i: usize, j: usize) -> Result<f64> {
    let v1 = right_vectors(a1, i, "A1")?;
    let v2 = right_vectors(a2, j, "A2")?;
    if v1.cols != v2.cols {
        return Err(LoraError::Mismatch(format!(
            "subspace_similarity: A1 has {} columns, A2 has {}",
            v1.cols, v2.cols
        )));
    }
    // U_iᵀ U_j with U as column matrices = V1 · V2ᵀ with our row matrices.
    let g = v1.matmul(&v2.transpose())?;
    let f2: f64 = g.data.iter().map(|x| x * x).sum();
    Ok((f2 / i.min(j) as f64).clamp(0.0, 1.0))
}

/// Table 7 of the LoRA paper for one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Amplification {
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// ‖UᵀWVᵀ‖_F with U, V the top-r singular directions of ΔW.
    pub proj_norm_delta_dirs: f64,
    /// The same with W's own top-r directions (= √Σ top-r σ(W)²).
    pub proj_norm_w_dirs: f64,
    /// The same with random orthonormal directions (fixed seed, reproducible).
    pub proj_norm_random: f64,
    /// ‖ΔW‖_F / proj_norm_delta_dirs: how much ΔW amplifies directions W barely uses.
    pub factor: f64,
}

fn proj_norm(w: &Mat, u: &Mat, vt: &Mat) -> Result<f64> {
    // Uᵀ · W · V  (V = vtᵀ)
    Ok(u.t_matmul(w)?.matmul(&vt.transpose())?.frobenius())
}

pub fn amplification(w: &Tensor, delta: &Tensor, r: usize) -> Result<Amplification> {
    let wm = Mat::from_tensor(w)?;
    let dm = Mat::from_tensor(delta)?;
    if (wm.rows, wm.cols) != (dm.rows, dm.cols) {
        return Err(LoraError::Mismatch(format!(
            "amplification: W is {:?} but ΔW is {:?}",
            w.dims(),
            delta.dims()
        )));
    }
    if r == 0 || r > wm.rows.min(wm.cols) {
        return Err(LoraError::Invalid(format!(
            "amplification: r = {r} for a [{}, {}] weight",
            wm.rows, wm.cols
        )));
    }
    let ds = linalg::top_k_svd(&dm, r, Iterations::Converge, 0)?;
    let ws = linalg::top_k_svd(&wm, r, Iterations::Converge, 1)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0x10A5);
    let gu = Mat::from_vec(
        wm.rows,
        r,
        (0..wm.rows * r)
            .map(|_| linalg::std_normal(&mut rng))
            .collect(),
    )?;
    let gv = Mat::from_vec(
        wm.cols,
        r,
        (0..wm.cols * r)
            .map(|_| linalg::std_normal(&mut rng))
            .collect(),
    )?;
    let (ru, _) = linalg::qr_thin(&gu)?;
    let (rv, _) = linalg::qr_thin(&gv)?;
    let delta_norm = dm.frobenius();
    let proj_norm_delta_dirs = proj_norm(&wm, &ds.u, &ds.vt)?;
    Ok(Amplification {
        delta_norm,
        proj_norm_delta_dirs,
        proj_norm_w_dirs: proj_norm(&wm, &ws.u, &ws.vt)?,
        proj_norm_random: proj_norm(&wm, &ru, &rv.transpose())?,
        factor: delta_norm / proj_norm_delta_dirs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: usize, cols: usize, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn similarity_identical_orthogonal_and_hand_case() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (4, 32), &dev).unwrap();
        // Same row space (A mixed by an invertible matrix): φ = 1 for full i = j.
        let mix = Tensor::randn(0f32, 1., (4, 4), &dev).unwrap();
        let a2 = mix.matmul(&a).unwrap();
        assert!((subspace_similarity(&a, &a2, 4, 4).unwrap() - 1.0).abs() < 1e-6);
        assert!((subspace_similarity(&a, &a, 2, 2).unwrap() - 1.0).abs() < 1e-9);
        // Rows on disjoint coordinates: φ = 0.
        let mut v1 = vec![0f32; 2 * 6];
        let mut v2 = vec![0f32; 2 * 6];
        v1[0] = 3.0; // e0
        v1[6 + 1] = 1.0; // e1
        v2[2] = 2.0; // e2
        v2[6 + 3] = 1.0; // e3
        assert!(
            subspace_similarity(&t(2, 6, v1.clone()), &t(2, 6, v2), 2, 2)
                .unwrap()
                .abs()
                < 1e-12
        );
        // Hand case: A1 top direction e0 (σ=3), A2 = one row (e0 + e1)/√2·…: φ(1,1) = cos² 45° = 0.5.
        let a3 = t(1, 6, vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((subspace_similarity(&t(2, 6, v1.clone()), &a3, 1, 1).unwrap() - 0.5).abs() < 1e-9);
        // i = 2 (span{e0, e1} contains (e0+e1)/√2): φ = 1 / min(2,1) = 1.
        assert!((subspace_similarity(&t(2, 6, v1), &a3, 2, 1).unwrap() - 1.0).abs() < 1e-9);
        assert!(subspace_similarity(&a, &a3, 5, 1).is_err());
        assert!(subspace_similarity(&a, &a3, 1, 1).is_err()); // 32 vs 6 columns
    }

    #[test]
    fn amplification_known_answer() {
        // W = diag(10, 5, 1) in 6×5; ΔW = 0.5·e2·e2ᵀ. ΔW's direction is W's weakest one:
        // ‖UᵀWV‖ = 1, so the factor is 0.5/1; W's own top direction gives 10.
        let mut w = vec![0f32; 30];
        w[0] = 10.0;
        w[5 + 1] = 5.0;
        w[10 + 2] = 1.0;
        let mut d = vec![0f32; 30];
        d[10 + 2] = 0.5;
        let a = amplification(&t(6, 5, w), &t(6, 5, d), 1).unwrap();
        assert!((a.delta_norm - 0.5).abs() < 1e-12);
        assert!((a.proj_norm_delta_dirs - 1.0).abs() < 1e-9);
        assert!((a.proj_norm_w_dirs - 10.0).abs() < 1e-9);
        assert!((a.factor - 0.5).abs() < 1e-9);
        assert!(a.proj_norm_random >= 0.0 && a.proj_norm_random <= 10.0 + 1e-9);
        // Large matrix (randomized path): W = diag(1..) + 3·e5e7ᵀ, ΔW = 2·e5e7ᵀ ⇒ proj = 3, factor 2/3.
        let (m, n) = (120, 90);
        let mut w = vec![0f32; m * n];
        for i in 0..n {
            w[i * n + i] = 1.0 + i as f32;
        }
        w[5 * n + 7] = 3.0;
        let mut d = vec![0f32; m * n];
        d[5 * n + 7] = 2.0;
        let a = amplification(&t(m, n, w), &t(m, n, d), 1).unwrap();
        assert!((a.proj_norm_delta_dirs - 3.0).abs() < 1e-6, "{a:?}");
        assert!((a.factor - 2.0 / 3.0).abs() < 1e-6);
        assert!(a.proj_norm_w_dirs > 89.0);
    }

    #[test]
    fn stats_and_effective_rank() {
        // ΔW = s·B·A with B = [e0·3, e1·1], A = [e0; e1] ⇒ σ = (6, 2) for s = 2.
        let b = t(4, 2, vec![3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let a = t(2, 3, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let st = module_stats(&LoraModule { a, b, scale: 2.0 }).unwrap();
        assert!(
            (st.singular_values[0] - 6.0).abs() < 1e-12
                && (st.singular_values[1] - 2.0).abs() < 1e-12
        );
        assert!((st.frobenius - 40f64.sqrt()).abs() < 1e-12);
        assert_eq!(st.effective_rank_threshold, 2);
        let p: [f64; 2] = [0.75, 0.25];
        let h: f64 = -p.iter().map(|x| x * x.ln()).sum::<f64>();
        assert!((st.effective_rank_entropy - h.exp()).abs() < 1e-12);
        assert_eq!(effective_rank(&[1.0, 1.0, 1.0, 1.0]).0, 4);
        assert!((effective_rank(&[1.0, 1.0, 1.0, 1.0]).1 - 4.0).abs() < 1e-12);
        assert_eq!(effective_rank(&[1.0, 1e-4]).0, 1);
        assert_eq!(effective_rank(&[0.0, 0.0]), (0, 0.0));
    }
}
