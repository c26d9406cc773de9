//! Small dense linear algebra on row-major `Vec<f64>` matrices.
//!
//! candle has no QR / SVD / eigen-decomposition, and the matrices LoRA needs them for are
//! small (r×r cores) or moderately sized with a tiny wanted rank (top-r of a 1536×576
//! weight). Everything is computed in f64 so that f32 inputs round-trip exactly enough.
//!
//! * [`qr_thin`]: Householder QR, `A = Q·R` with `Q` [m,n] orthonormal columns, `R` [n,n].
//! * [`sym_eigen`]: cyclic Jacobi for symmetric matrices.
//! * [`svd`]: one-sided (Hestenes) Jacobi SVD, accurate for small matrices.
//! * [`top_k_svd`]: randomized subspace iteration + QR + small SVD for large matrices.
//! * [`svd_of_lowrank`]: exact SVD of `scale·B·A` without forming the product.

// Index loops mirror the textbook formulas of these algorithms; iterator rewrites obscure them.
#![allow(clippy::needless_range_loop)]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LoraError, Result};

/// Row-major dense matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Mat::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// Build from row-major data; errors (instead of panicking) on a length mismatch.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(LoraError::Invalid(format!(
                "matrix data has {} values, expected {rows}×{cols}",
                data.len()
            )));
        }
        Ok(Mat { rows, cols, data })
    }

    /// Copy a 2-D tensor of any float dtype (on any device) into f64.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Mat::from_vec(rows, cols, v)
    }

    /// An f32 tensor [rows, cols] on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (self.rows, self.cols), device)?)
    }

    #[inline]
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    #[inline]
    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    pub fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        t
    }

    /// `self · other`; errors on inner-dimension mismatch.
    pub fn matmul(&self, other: &Mat) -> Result<Mat> {
        if self.cols != other.rows {
            return Err(LoraError::Invalid(format!(
                "matmul shape mismatch: [{}, {}] · [{}, {}]",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let (m, k, n) = (self.rows, self.cols, other.cols);
        let mut out = Mat::zeros(m, n);
        // i-k-j order: the inner loop walks both `other` and `out` rows contiguously.
        for i in 0..m {
            let orow = &mut out.data[i * n..(i + 1) * n];
            for p in 0..k {
                let a = self.data[i * k + p];
                if a == 0.0 {
                    continue;
                }
                let brow = &other.data[p * n..(p + 1) * n];
                for (o, b) in orow.iter_mut().zip(brow) {
                    *o += a * b;
                }
            }
        }
        Ok(out)
    }

    /// `selfᵀ · other` without materialising the transpose.
    pub fn t_matmul(&self, other: &Mat) -> Result<Mat> {
        if self.rows != other.rows {
            return Err(LoraError::Invalid(format!(
                "matmul shape mismatch: [{}, {}]ᵀ · [{}, {}]",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let (k, m, n) = (self.rows, self.cols, other.cols);
        let mut out = Mat::zeros(m, n);
        for p in 0..k {
            let arow = &self.data[p * m..(p + 1) * m];
            let brow = &other.data[p * n..(p + 1) * n];
            for (i, &a) in arow.iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                let orow = &mut out.data[i * n..(i + 1) * n];
                for (o, b) in orow.iter_mut().zip(brow) {
                    *o += a * b;
                }
            }
        }
        Ok(out)
    }

    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    pub fn scale(&self, s: f64) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|x| x * s).collect(),
        }
    }

    /// Columns `[0, k)`.
    pub fn first_cols(&self, k: usize) -> Mat {
        let k = k.min(self.cols);
        let mut out = Mat::zeros(self.rows, k);
        for i in 0..self.rows {
            out.data[i * k..(i + 1) * k]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + k]);
        }
        out
    }

    /// Rows `[0, k)`.
    pub fn first_rows(&self, k: usize) -> Mat {
        let k = k.min(self.rows);
        Mat {
            rows: k,
            cols: self.cols,
            data: self.data[..k * self.cols].to_vec(),
        }
    }
}

/// Thin SVD `A = U·diag(s)·Vt`, singular values sorted descending.
#[derive(Debug, Clone)]
pub struct Svd {
    /// [m, k], orthonormal columns.
    pub u: Mat,
    /// [k], descending, ≥ 0.
    pub s: Vec<f64>,
    /// [k, n], orthonormal rows.
    pub vt: Mat,
}

impl Svd {
    /// Keep the leading `k` triplets.
    pub fn truncate(mut self, k: usize) -> Svd {
        let k = k.min(self.s.len());
        self.u = self.u.first_cols(k);
        self.s.truncate(k);
        self.vt = self.vt.first_rows(k);
        self
    }
}

/// Householder thin QR of `a` [m, n] with m ≥ n: `Q` [m, n] with orthonormal columns, `R` [n, n]
/// upper triangular. Householder (rather than Gram-Schmidt) keeps `Q` orthonormal even when `a`
/// is rank-deficient, which happens for LoRA factors (B starts at zero).
pub fn qr_thin(a: &Mat) -> Result<(Mat, Mat)> {
    let (m, n) = (a.rows, a.cols);
    if m < n {
        return Err(LoraError::Invalid(format!(
            "qr_thin needs rows ≥ cols, got [{m}, {n}]"
        )));
    }
    // Work column-major: column j is r[j*m..(j+1)*m].
    let mut r: Vec<f64> = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            r[j * m + i] = a.data[i * n + j];
        }
    }
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(n);
    for j in 0..n {
        let col = &r[j * m..(j + 1) * m];
        let norm = col[j..].iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut v: Vec<f64> = col[j..].to_vec();
        if norm == 0.0 {
            // Nothing to reflect: use the identity (v = 0).
            vs.push(vec![0.0; m - j]);
            continue;
        }
        let alpha = if v[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm > 0.0 {
            v.iter_mut().for_each(|x| *x /= vnorm);
        }
        // Apply H = I − 2vvᵀ to columns j..n.
        for c in j..n {
            let colc = &mut r[c * m + j..(c + 1) * m];
            let d: f64 = colc.iter().zip(&v).map(|(x, y)| x * y).sum();
            for (x, y) in colc.iter_mut().zip(&v) {
                *x -= 2.0 * d * y;
            }
        }
        vs.push(v);
    }
    let mut rr = Mat::zeros(n, n);
    for i in 0..n {
        for j in i..n {
            rr.data[i * n + j] = r[j * m + i];
        }
    }
    // Q = H_0 H_1 … H_{n-1} · I[:, :n], applied right-to-left to the identity columns.
    let mut q: Vec<f64> = vec![0.0; m * n]; // column-major
    for j in 0..n {
        q[j * m + j] = 1.0;
    }
    for j in (0..n).rev() {
        let v = &vs[j];
        for c in 0..n {
            let colc = &mut q[c * m + j..(c + 1) * m];
            let d: f64 = colc.iter().zip(v).map(|(x, y)| x * y).sum();
            if d != 0.0 {
                for (x, y) in colc.iter_mut().zip(v) {
                    *x -= 2.0 * d * y;
                }
            }
        }
    }
    let mut qm = Mat::zeros(m, n);
    for i in 0..m {
        for j in 0..n {
            qm.data[i * n + j] = q[j * m + i];
        }
    }
    Ok((qm, rr))
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations.
/// Returns eigenvalues descending and the eigenvectors as the columns of a [n, n] matrix.
pub fn sym_eigen(a: &Mat) -> Result<(Vec<f64>, Mat)> {
    let n = a.rows;
    if a.cols != n {
        return Err(LoraError::Invalid(format!(
            "sym_eigen needs a square matrix, got [{}, {}]",
            a.rows, a.cols
        )));
    }
    let mut m = a.clone();
    let mut v = Mat::identity(n);
    let total: f64 = m.frobenius().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let mut off = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    off += m.get(i, j).powi(2);
                }
            }
        }
        if off.sqrt() <= 1e-15 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m.get(p, q);
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let app = m.get(p, p);
                let aqq = m.get(q, q);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // M ← Jᵀ M J on rows/cols p, q.
                for k in 0..n {
                    let mkp = m.get(k, p);
                    let mkq = m.get(k, q);
                    m.set(k, p, c * mkp - s * mkq);
                    m.set(k, q, s * mkp + c * mkq);
                }
                for k in 0..n {
                    let mpk = m.get(p, k);
                    let mqk = m.get(q, k);
                    m.set(p, k, c * mpk - s * mqk);
                    m.set(q, k, s * mpk + c * mqk);
                }
                for k in 0..n {
                    let vkp = v.get(k, p);
                    let vkq = v.get(k, q);
                    v.set(k, p, c * vkp - s * vkq);
                    v.set(k, q, s * vkp + c * vkq);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m.get(j, j).total_cmp(&m.get(i, i)));
    let evals: Vec<f64> = order.iter().map(|&i| m.get(i, i)).collect();
    let mut vecs = Mat::zeros(n, n);
    for (newj, &oldj) in order.iter().enumerate() {
        for k in 0..n {
            vecs.set(k, newj, v.get(k, oldj));
        }
    }
    Ok((evals, vecs))
}

/// Thin SVD by one-sided Jacobi: `k = min(m, n)` triplets, descending.
/// Columns of `U` belonging to zero singular values are completed to an orthonormal set so
/// `U` always has orthonormal columns.
pub fn svd(a: &Mat) -> Result<Svd> {
    if a.rows < a.cols {
        // SVD of Aᵀ = U' S V'ᵀ  ⇒  A = V' S U'ᵀ.
        let t = svd(&a.transpose())?;
        return Ok(Svd {
            u: t.vt.transpose(),
            s: t.s,
            vt: t.u.transpose(),
        });
    }
    let (m, n) = (a.rows, a.cols);
    if n == 0 {
        return Ok(Svd {
            u: Mat::zeros(m, 0),
            s: vec![],
            vt: Mat::zeros(0, 0),
        });
    }
    // Columns of A (and V) stored contiguously for the pairwise rotations.
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a.get(i, j)).collect())
        .collect();
    let mut vcols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let eps = 1e-15;
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta, gamma) = {
                    let (cp, cq) = (&cols[p], &cols[q]);
                    let mut al = 0.0;
                    let mut be = 0.0;
                    let mut ga = 0.0;
                    for (x, y) in cp.iter().zip(cq) {
                        al += x * x;
                        be += y * y;
                        ga += x * y;
                    }
                    (al, be, ga)
                };
                if gamma.abs() <= eps * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                let (lo, hi) = cols.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
                let (lo, hi) = vcols.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = cols
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    let smax = norms.iter().cloned().fold(0.0, f64::max);
    let tiny = smax * 1e-13 + f64::MIN_POSITIVE;
    let mut u = Mat::zeros(m, n);
    let mut vt = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    let mut ucols: Vec<Vec<f64>> = Vec::with_capacity(n);
    for (newj, &oldj) in order.iter().enumerate() {
        let sv = norms[oldj];
        let ucol: Option<Vec<f64>> =
            (sv > tiny).then(|| cols[oldj].iter().map(|x| x / sv).collect());
        s.push(if sv > tiny { sv } else { 0.0 });
        ucols.push(ucol.unwrap_or_default());
        for k in 0..n {
            vt.set(newj, k, vcols[oldj][k]);
        }
    }
    complete_orthonormal(&mut ucols, m);
    for (j, c) in ucols.iter().enumerate() {
        for i in 0..m {
            u.set(i, j, c[i]);
        }
    }
    Ok(Svd { u, s, vt })
}

/// Replace empty vectors in `cols` by unit vectors orthogonal to all others (Gram-Schmidt
/// against the standard basis, twice for stability).
fn complete_orthonormal(cols: &mut [Vec<f64>], m: usize) {
    let mut basis = 0usize;
    for j in 0..cols.len() {
        if !cols[j].is_empty() {
            continue;
        }
        while basis < m {
            let mut v = vec![0.0; m];
            v[basis] = 1.0;
            basis += 1;
            for _ in 0..2 {
                for (k, c) in cols.iter().enumerate() {
                    if k == j || c.is_empty() {
                        continue;
                    }
                    let d: f64 = v.iter().zip(c).map(|(x, y)| x * y).sum();
                    v.iter_mut().zip(c).for_each(|(x, y)| *x -= d * y);
                }
            }
            let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if nv > 1e-8 {
                v.iter_mut().for_each(|x| *x /= nv);
                cols[j] = v;
                break;
            }
        }
        if cols[j].is_empty() {
            // More columns than dimensions cannot happen for a thin SVD; keep shapes valid.
            cols[j] = vec![0.0; m];
        }
    }
}

/// How [`top_k_svd`] iterates.
#[derive(Debug, Clone, Copy)]
pub enum Iterations {
    /// Run until the top-k singular values stop changing (relative 1e-12) or 200 rounds:
    /// effectively the exact truncated SVD when there is a spectral gap.
    Converge,
    /// Exactly this many power iterations (PEFT's `pissa_niter_K`), no oversampling
    /// (torch's `svd_lowrank(A, q=r, niter=K)`).
    Fixed(usize),
}

/// Top-`k` SVD of a (large) matrix by randomized subspace iteration:
/// `Q = orth(A·Ω)`, then repeatedly `Q = orth(A·orth(AᵀQ))`, finally the small SVD of `QᵀA`.
/// Deterministic given `seed`.
pub fn top_k_svd(a: &Mat, k: usize, iters: Iterations, seed: u64) -> Result<Svd> {
    let (m, n) = (a.rows, a.cols);
    let kmax = m.min(n);
    let k = k.min(kmax);
    if k == 0 {
        return Ok(Svd {
            u: Mat::zeros(m, 0),
            s: vec![],
            vt: Mat::zeros(0, n),
        });
    }
    // Small matrices: the dense Jacobi SVD is exact and cheap.
    if kmax <= 64 || k * 2 >= kmax {
        return Ok(svd(a)?.truncate(k));
    }
    let p = match iters {
        Iterations::Converge => (k + 10).min(kmax),
        Iterations::Fixed(_) => k,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let omega = Mat::from_vec(n, p, (0..n * p).map(|_| std_normal(&mut rng)).collect())?;
    let (mut q, _) = qr_thin(&a.matmul(&omega)?)?;
    let max_rounds = match iters {
        Iterations::Converge => 200,
        Iterations::Fixed(it) => it,
    };
    let mut prev: Vec<f64> = vec![];
    for round in 0..max_rounds {
        let (z, _) = qr_thin(&a.t_matmul(&q)?)?; // [n, p]
        let (qn, _) = qr_thin(&a.matmul(&z)?)?; // [m, p]
        q = qn;
        if let Iterations::Converge = iters {
            // Convergence check every few rounds (it needs a small SVD).
            if round % 4 == 3 {
                let s = svd(&q.t_matmul(a)?)?.s;
                let top: Vec<f64> = s[..k].to_vec();
                if !prev.is_empty() {
                    let scale = top[0].max(f64::MIN_POSITIVE);
                    let diff = top
                        .iter()
                        .zip(&prev)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f64::max);
                    if diff <= 1e-12 * scale {
                        break;
                    }
                }
                prev = top;
            }
        }
    }
    let b = q.t_matmul(a)?; // [p, n]
    let small = svd(&b)?;
    let u = q.matmul(&small.u)?;
    Ok(Svd {
        u,
        s: small.s,
        vt: small.vt,
    }
    .truncate(k))
}

/// Standard normal sample (Box–Muller); `rand` 0.9 has no normal distribution without
/// `rand_distr`, which is not a workspace dependency.
pub fn std_normal<R: Rng>(rng: &mut R) -> f64 {
    loop {
        let u1: f64 = rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        if u1 > f64::MIN_POSITIVE {
            return (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        }
    }
}

/// Exact thin SVD of `scale·B·A` (B [out, r], A [r, in]) without forming the [out, in] product:
/// `B = Qb·Rb`, `Aᵀ = Qa·Ra`, so `scale·B·A = Qb·(scale·Rb·Raᵀ)·Qaᵀ`; the r×r core is
/// decomposed by Jacobi and rotated back. Returns `min(r, out, in)` triplets.
pub fn svd_of_lowrank(b: &Mat, a: &Mat, scale: f64) -> Result<Svd> {
    if b.cols != a.rows {
        return Err(LoraError::Invalid(format!(
            "svd_of_lowrank: B is [{}, {}] but A is [{}, {}]",
            b.rows, b.cols, a.rows, a.cols
        )));
    }
    let r = a.rows;
    if b.rows < r || a.cols < r {
        // Rank larger than a side: the product is small enough to decompose directly.
        return svd(&b.matmul(a)?.scale(scale));
    }
    let (qb, rb) = qr_thin(b)?;
    let (qa, ra) = qr_thin(&a.transpose())?;
    let core = rb.matmul(&ra.transpose())?.scale(scale);
    let c = svd(&core)?;
    let u = qb.matmul(&c.u)?;
    // Vt = Vcᵀ·Qaᵀ = (Qa·Vc)ᵀ
    let vt = c.vt.matmul(&qa.transpose())?;
    Ok(Svd { u, s: c.s, vt })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_mat(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Mat::from_vec(
            rows,
            cols,
            (0..rows * cols).map(|_| std_normal(&mut rng)).collect(),
        )
        .unwrap()
    }

    fn orthonormal_cols(rows: usize, cols: usize, seed: u64) -> Mat {
        qr_thin(&rand_mat(rows, cols, seed)).unwrap().0
    }

    /// U·diag(s)·Vᵀ with known singular values.
    fn with_singular_values(m: usize, n: usize, s: &[f64], seed: u64) -> Mat {
        let k = s.len();
        let u = orthonormal_cols(m, k, seed);
        let v = orthonormal_cols(n, k, seed + 1);
        let mut us = u.clone();
        for i in 0..m {
            for j in 0..k {
                us.set(i, j, u.get(i, j) * s[j]);
            }
        }
        us.matmul(&v.transpose()).unwrap()
    }

    fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn reconstruct(s: &Svd) -> Mat {
        let mut us = s.u.clone();
        for i in 0..us.rows {
            for j in 0..us.cols {
                us.set(i, j, us.get(i, j) * s.s[j]);
            }
        }
        us.matmul(&s.vt).unwrap()
    }

    fn assert_orthonormal_cols(q: &Mat, tol: f64) {
        let g = q.t_matmul(q).unwrap();
        assert!(max_abs_diff(&g, &Mat::identity(q.cols)) < tol, "QᵀQ != I");
    }

    #[test]
    fn qr_reconstructs_and_is_orthonormal() {
        let a = rand_mat(20, 7, 1);
        let (q, r) = qr_thin(&a).unwrap();
        assert_orthonormal_cols(&q, 1e-12);
        assert!(max_abs_diff(&q.matmul(&r).unwrap(), &a) < 1e-12);
        for i in 0..7 {
            for j in 0..i {
                assert_eq!(r.get(i, j), 0.0);
            }
        }
    }

    #[test]
    fn qr_rank_deficient_still_orthonormal() {
        // Zero matrix (a freshly initialised lora_B) and duplicated columns.
        let z = Mat::zeros(10, 4);
        let (q, r) = qr_thin(&z).unwrap();
        assert_orthonormal_cols(&q, 1e-12);
        assert!(r.frobenius() == 0.0);
        let mut a = rand_mat(10, 4, 2);
        for i in 0..10 {
            let v = a.get(i, 0);
            a.set(i, 2, v);
        }
        let (q, r) = qr_thin(&a).unwrap();
        assert_orthonormal_cols(&q, 1e-12);
        assert!(max_abs_diff(&q.matmul(&r).unwrap(), &a) < 1e-12);
        assert!(qr_thin(&Mat::zeros(2, 3)).is_err());
    }

    #[test]
    fn sym_eigen_known() {
        // [[2,1],[1,2]] has eigenvalues 3 and 1 with vectors (1,1)/√2 and (1,−1)/√2.
        let a = Mat::from_vec(2, 2, vec![2.0, 1.0, 1.0, 2.0]).unwrap();
        let (e, v) = sym_eigen(&a).unwrap();
        assert!((e[0] - 3.0).abs() < 1e-12 && (e[1] - 1.0).abs() < 1e-12);
        assert!((v.get(0, 0).abs() - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((v.get(0, 0) - v.get(1, 0)).abs() < 1e-12);
        // Random symmetric: A·V = V·Λ.
        let b = rand_mat(9, 9, 3);
        let s = b.matmul(&b.transpose()).unwrap();
        let (e, v) = sym_eigen(&s).unwrap();
        let av = s.matmul(&v).unwrap();
        for j in 0..9 {
            for i in 0..9 {
                assert!((av.get(i, j) - e[j] * v.get(i, j)).abs() < 1e-9);
            }
        }
        assert!(e.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn svd_known_singular_values() {
        let s_true = [9.0, 4.0, 2.5, 1.0, 0.25];
        for (m, n) in [(12, 5), (5, 12), (5, 5)] {
            let a = with_singular_values(m, n, &s_true, 7);
            let d = svd(&a).unwrap();
            for (x, y) in d.s.iter().zip(&s_true) {
                assert!((x - y).abs() < 1e-10, "{m}x{n}: {:?}", d.s);
            }
            assert_orthonormal_cols(&d.u, 1e-10);
            assert_orthonormal_cols(&d.vt.transpose(), 1e-10);
            assert!(max_abs_diff(&reconstruct(&d), &a) < 1e-10);
        }
    }

    #[test]
    fn svd_rank_deficient_completes_u() {
        let a = with_singular_values(8, 6, &[3.0, 1.0], 11); // rank 2
        let d = svd(&a).unwrap();
        assert_eq!(d.s.len(), 6);
        assert!((d.s[0] - 3.0).abs() < 1e-10 && (d.s[1] - 1.0).abs() < 1e-10);
        assert!(d.s[2..].iter().all(|&x| x < 1e-10));
        assert_orthonormal_cols(&d.u, 1e-10);
        assert!(max_abs_diff(&reconstruct(&d), &a) < 1e-10);
    }

    #[test]
    fn top_k_svd_large_matrix_fast_and_exact() {
        // 1536×576 (a SmolLM2 MLP weight) with a decaying spectrum + noise.
        let mut s_true: Vec<f64> = (0..30).map(|i| 50.0 * 0.8f64.powi(i)).collect();
        s_true.sort_by(|a, b| b.total_cmp(a));
        let a = with_singular_values(1536, 576, &s_true, 5);
        let t0 = std::time::Instant::now();
        let d = top_k_svd(&a, 8, Iterations::Converge, 42).unwrap();
        let el = t0.elapsed();
        for (x, y) in d.s.iter().zip(&s_true[..8]) {
            assert!((x - y).abs() < 1e-8 * s_true[0], "{:?}", d.s);
        }
        assert_orthonormal_cols(&d.u, 1e-10);
        assert_eq!(
            (d.u.rows, d.u.cols, d.vt.rows, d.vt.cols),
            (1536, 8, 8, 576)
        );
        // Generous bound: CI machines are slow and this is a debug-ish build.
        assert!(el.as_secs_f64() < 5.0, "top_k_svd took {el:?}");
        // Deterministic.
        let d2 = top_k_svd(&a, 8, Iterations::Converge, 42).unwrap();
        assert_eq!(d.s, d2.s);
    }

    #[test]
    fn svd_of_lowrank_matches_dense() {
        let b = rand_mat(40, 4, 21);
        let a = rand_mat(4, 30, 22);
        let l = svd_of_lowrank(&b, &a, 2.0).unwrap();
        let dense = svd(&b.matmul(&a).unwrap().scale(2.0)).unwrap();
        for i in 0..4 {
            assert!((l.s[i] - dense.s[i]).abs() < 1e-10);
        }
        assert!(max_abs_diff(&reconstruct(&l), &b.matmul(&a).unwrap().scale(2.0)) < 1e-10);
        // Known singular values: B = U·diag(s), A = Vᵀ.
        let u = orthonormal_cols(50, 3, 31);
        let v = orthonormal_cols(20, 3, 32);
        let mut b = u.clone();
        for i in 0..50 {
            for (j, s) in [5.0, 2.0, 0.5].iter().enumerate() {
                b.set(i, j, u.get(i, j) * s);
            }
        }
        let l = svd_of_lowrank(&b, &v.transpose(), 0.5).unwrap();
        for (x, y) in l.s.iter().zip([2.5, 1.0, 0.25]) {
            assert!((x - y).abs() < 1e-12);
        }
        assert!(svd_of_lowrank(&b, &rand_mat(4, 20, 1), 1.0).is_err());
    }
}
