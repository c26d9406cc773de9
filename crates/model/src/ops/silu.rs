//! SwiGLU's elementwise SiLU(gate)·up and its gradient over a chunk of contiguous floats:
//! portable code (libm's `exp`) and an AVX2 + FMA path with the attention kernels' vector
//! exp. The path follows the attention kernel of the process (`LOWRANK_ATTN_KERNEL`):
//! portable there means portable here, either vector kernel means AVX2 here.
//!
//! Why a vector path: with libm's scalar `expf` the two passes were ≈ 2.3 % of an f32
//! training step's samples on a 2-core AVX2 EPYC (`perf record`), most of it in `expf`.

use super::rows::AttnKernel;

/// Whether chunks take the AVX2 path in this process.
fn vector() -> bool {
    match AttnKernel::detect() {
        AttnKernel::Portable => false,
        _ => AttnKernel::Avx2.supported(),
    }
}

/// o = silu(g)·u = g·σ(g)·u elementwise. All three slices have the same length.
pub(crate) fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
    assert!(
        g.len() == o.len() && u.len() == o.len(),
        "silu_mul: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: `vector` checked AVX2 + FMA; the lengths are equal.
        return unsafe { avx2::silu_mul(g, u, o) };
    }
    silu_mul_portable(g, u, o)
}

/// (dg, du) = (d·u·σ(g)·(1 + g·(1 − σ(g))), d·g·σ(g)) elementwise: the backward of
/// [`silu_mul`] for its output gradient d. All five slices have the same length.
pub(crate) fn silu_mul_bwd(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    assert!(
        u.len() == n && d.len() == n && dg.len() == n && du.len() == n,
        "silu_mul_bwd: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: `vector` checked AVX2 + FMA; the lengths are equal.
        return unsafe { avx2::silu_mul_bwd(g, u, d, dg, du) };
    }
    silu_mul_bwd_portable(g, u, d, dg, du)
}

fn silu_mul_portable(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

fn silu_mul_bwd_portable(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let s = 1.0 / (1.0 + (-g[i]).exp());
        dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = d[i] * g[i] * s;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// σ(g) from e = e^(−|g|) ≤ 1, so the exponential never overflows: 1/(1 + e) for
    /// g ≥ 0, e/(1 + e) for g < 0 (the smaller value computed directly, not as 1 − ...).
    #[inline(always)]
    unsafe fn sigmoid(g: __m256) -> __m256 {
        let neg_abs = _mm256_or_ps(g, _mm256_set1_ps(-0.0));
        let e = super::super::attn256::exp(neg_abs);
        let one = _mm256_set1_ps(1.0);
        let inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
        // blendv takes its second operand where the mask's sign bit is set (g < 0).
        _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), g)
    }

    /// Up to 8 floats of `s` from `at`, zero-padded (tails go through the same lanes, so
    /// every element gets the same rounding).
    #[inline(always)]
    unsafe fn load(s: &[f32], at: usize, len: usize) -> __m256 {
        if len == 8 {
            return _mm256_loadu_ps(s.as_ptr().add(at));
        }
        let mut x = [0f32; 8];
        x[..len].copy_from_slice(&s[at..at + len]);
        _mm256_loadu_ps(x.as_ptr())
    }

    #[inline(always)]
    unsafe fn store(d: &mut [f32], at: usize, len: usize, v: __m256) {
        if len == 8 {
            return _mm256_storeu_ps(d.as_mut_ptr().add(at), v);
        }
        let mut x = [0f32; 8];
        _mm256_storeu_ps(x.as_mut_ptr(), v);
        d[at..at + len].copy_from_slice(&x[..len]);
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the slices have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
        for at in (0..o.len()).step_by(8) {
            let len = 8.min(o.len() - at);
            let gv = load(g, at, len);
            let s = sigmoid(gv);
            store(
                o,
                at,
                len,
                _mm256_mul_ps(_mm256_mul_ps(gv, s), load(u, at, len)),
            );
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the slices have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_bwd(
        g: &[f32],
        u: &[f32],
        d: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        let one = _mm256_set1_ps(1.0);
        for at in (0..g.len()).step_by(8) {
            let len = 8.min(g.len() - at);
            let (gv, uv, dv) = (load(g, at, len), load(u, at, len), load(d, at, len));
            let s = sigmoid(gv);
            // 1 + g·(1 − σ)
            let slope = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one);
            let dgv = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dv, uv), s), slope);
            store(dg, at, len, dgv);
            store(du, at, len, _mm256_mul_ps(_mm256_mul_ps(dv, gv), s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Values from −100 to 100 (both σ branches, the exp's clamp at −87, zero) and lengths
    /// with every tail of the 8-lane loop.
    fn inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut g: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        for (i, x) in [-100.0, -90.0, -20.0, -0.0, 0.0, 20.0, 100.0]
            .into_iter()
            .enumerate()
        {
            if i < n {
                g[i] = x;
            }
        }
        let u = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let d = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        (g, u, d)
    }

    /// Within f32 rounding of the terms: `scale` is the sum of their magnitudes (dg's
    /// 1 + g·(1 − σ) cancels near g ≈ −1.28).
    fn close(got: f32, want: f64, scale: f64, what: &str) {
        let tol = 2e-6 * scale + 1e-30;
        assert!(
            (got as f64 - want).abs() <= tol,
            "{what}: {got} against {want}"
        );
    }

    /// Both paths against f64 evaluations of the equations: the portable one, and the AVX2
    /// one where the CPU has it (called directly, whatever the process's kernel is).
    #[test]
    fn silu_and_its_gradient_match_f64_on_every_path() {
        type Fwd = unsafe fn(&[f32], &[f32], &mut [f32]);
        type Bwd = unsafe fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]);
        let mut paths: Vec<(&str, Fwd, Bwd)> =
            vec![("portable", silu_mul_portable, silu_mul_bwd_portable)];
        #[cfg(target_arch = "x86_64")]
        if AttnKernel::Avx2.supported() {
            paths.push(("avx2", avx2::silu_mul, avx2::silu_mul_bwd));
        }
        for (name, fwd, bwd) in paths {
            for n in (1..=17).chain([1000, 4099]) {
                let (g, u, d) = inputs(n, n as u64);
                let (mut o, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                // SAFETY: the AVX2 path is only listed where the CPU supports it; equal lengths.
                unsafe {
                    fwd(&g, &u, &mut o);
                    bwd(&g, &u, &d, &mut dg, &mut du);
                }
                for i in 0..n {
                    let (g, u, d) = (g[i] as f64, u[i] as f64, d[i] as f64);
                    let s = 1.0 / (1.0 + (-g).exp());
                    let o_want = g * s * u;
                    close(
                        o[i],
                        o_want,
                        o_want.abs(),
                        &format!("{name} silu·u, n {n}, g {g}"),
                    );
                    let want_dg = d * u * s * (1.0 + g * (1.0 - s));
                    let dg_scale = (d * u * s).abs() * (1.0 + (g * (1.0 - s)).abs());
                    close(
                        dg[i],
                        want_dg,
                        dg_scale,
                        &format!("{name} dg, n {n}, g {g}"),
                    );
                    let du_want = d * g * s;
                    close(
                        du[i],
                        du_want,
                        du_want.abs(),
                        &format!("{name} du, n {n}, g {g}"),
                    );
                }
            }
        }
    }
}
