//! The f32 products of a training step (SmolLM2-135M, 4 × 128 tokens): candle's matmul
//! against `ops::gemm`'s kernel (AVX-512 or AVX2, as the process chooses), per shape,
//! GFLOP/s and max diff.
//!
//! `cargo run --release -p lowrank-model --example f32_gemm`
//! (`RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1` for one core).

#[cfg(target_arch = "x86_64")]
use candle_core::{Device, Tensor};
#[cfg(target_arch = "x86_64")]
use lowrank_model::ops::gemm::{gemm_f32, BLayout, GemmKernel};
#[cfg(target_arch = "x86_64")]
use std::time::Instant;

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("f32_gemm times the x86 kernels (AVX2, AVX-512); this build has none");
    std::process::exit(2);
}

/// Seconds of one call of `f` after `warm` untimed ones.
#[cfg(target_arch = "x86_64")]
fn secs(warm: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64()
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1f32, s, &d).unwrap();
    let (h, i, kv, v) = (576, 1536, 192, 49152);
    // Rows per head chunk (the loss's: 256 of a 4 × 128 batch); HEAD_ROWS= to compare.
    let hr: usize = std::env::var("HEAD_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    // (name, m, k, n, layout): forward x·Wᵀ (W [n, k]) and backward dY·W (W [k, n]).
    let shapes = [
        ("fwd q/o", 512, h, h, BLayout::Cols),
        ("fwd k/v", 512, h, kv, BLayout::Cols),
        ("fwd gate/up", 512, h, i, BLayout::Cols),
        ("fwd down", 512, i, h, BLayout::Cols),
        ("bwd q/o", 512, h, h, BLayout::Rows),
        ("bwd k/v", 512, kv, h, BLayout::Rows),
        ("bwd gate/up", 512, i, h, BLayout::Rows),
        ("bwd down", 512, h, i, BLayout::Rows),
        ("head fwd", hr, h, v, BLayout::Cols),
        ("head bwd", hr, v, h, BLayout::Rows),
    ];
    let (mut tc, mut to) = (0.0, 0.0);
    // Ours: this process's kernel (`LOWRANK_F32_GEMM=avx2` for the AVX2 one on an AVX-512 CPU).
    let ours = match GemmKernel::detect() {
        GemmKernel::Candle => GemmKernel::Avx2.name(),
        k => k.name(),
    };
    let only = std::env::var("SHAPE").ok();
    let reps_env: Option<usize> = std::env::var("REPS").ok().and_then(|v| v.parse().ok());
    for (name, m, k, n, layout) in shapes {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let a = r(&[m, k]);
        let w = match layout {
            BLayout::Cols => r(&[n, k]),
            BLayout::Rows => r(&[k, n]),
        };
        let wt = match layout {
            BLayout::Cols => w.t().unwrap(),
            BLayout::Rows => w.clone(),
        };
        let reps = reps_env.unwrap_or(if n > 10000 || k > 10000 { 5 } else { 30 });
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut c = vec![0f32; m * n];
        // Alternating calls, the fastest of each kept: this machine's speed drifts by ±20 %
        // within minutes, which a mean over consecutive runs would turn into a ratio.
        let (mut sc, mut so) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            sc = sc.min(secs(0, || {
                let _ = a.matmul(&wt).unwrap();
            }));
            so = so.min(secs(0, || gemm_f32(m, n, k, &av, &wv, layout, &mut c)));
        }
        let refc = a
            .matmul(&wt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = c
            .iter()
            .zip(&refc)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let fl = 2.0 * (m * k * n) as f64;
        println!(
            "{name:12} {m:4}x{k:5}x{n:5}  candle {:7.2} ms {:6.1} GF/s   {ours} {:7.2} ms {:6.1} GF/s  ({:.2}x)  max|diff| {diff:.2e}",
            sc * 1e3,
            fl / sc / 1e9,
            so * 1e3,
            fl / so / 1e9,
            sc / so
        );
        // Per step: q, o, k, v, gate and up twice each per layer (2 × 30), down once (30),
        // the head in 512 / HEAD_ROWS chunks.
        let count = match name {
            n if n.starts_with("head") => 512.0 / hr as f64,
            n if n.ends_with("down") => 30.0,
            _ => 60.0,
        };
        tc += sc * count;
        to += so * count;
    }
    println!("a step's products (4 × 128 tokens): candle {tc:.3} s, {ours} {to:.3} s");
}
