//! The f32 matrix products of one LoRA training step of the default model (SmolLM2-135M,
//! 4 × 128 tokens, r = 8 q,v), timed one shape at a time with candle's matmul: the forward
//! x·Wᵀ and the backward dX = dY·W of every frozen projection, the LM head in chunks of 128
//! rows, and the attention blocks. It prints each shape's GFLOP/s and the tok/s a step would
//! reach if it were only these products, to compare with `lowrank bench train`; then the
//! head's input gradient in other arrangements, and q/k/v and gate/up fused into one product.
//!
//! `cargo run --release -p lowrank-model --example step_gemms`
//! (`RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1` for one core).

use candle_core::{Device, Tensor};
use std::time::Instant;
/// Seconds per product, after one warm-up.
fn t(a: &Tensor, b: &Tensor, reps: usize) -> f64 {
    let _ = a.matmul(b).unwrap();
    let s = Instant::now();
    for _ in 0..reps {
        let _ = a.matmul(b).unwrap();
    }
    s.elapsed().as_secs_f64() / reps as f64
}
fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1f32, s, &d).unwrap();
    let n = 512;
    let (h, i, kv, v) = (576, 1536, 192, 49152);
    let mut total = 0.0;
    let mut flops_total = 0.0;
    let mut rep = |name: &str, a: Tensor, b: Tensor, count: usize| {
        let sec = t(&a, &b, 5);
        let (m, k) = (a.dim(a.rank() - 2).unwrap(), a.dim(a.rank() - 1).unwrap());
        let nn = b.dim(b.rank() - 1).unwrap();
        let batch: usize = a.dims()[..a.rank() - 2].iter().product();
        let fl = 2.0 * (batch * m * k * nn) as f64;
        println!(
            "{name:28} {:8.3} ms  {:6.1} GFLOP/s  x{count}",
            sec * 1e3,
            fl / sec / 1e9
        );
        total += sec * count as f64;
        flops_total += fl * count as f64;
    };
    // forward x·Wᵀ (W [out,in] transposed view)
    rep("fwd q/o 576x576", r(&[n, h]), r(&[h, h]).t().unwrap(), 60);
    rep("fwd k/v 192x576", r(&[n, h]), r(&[kv, h]).t().unwrap(), 60);
    rep(
        "fwd gate/up 1536x576",
        r(&[n, h]),
        r(&[i, h]).t().unwrap(),
        60,
    );
    rep("fwd down 576x1536", r(&[n, i]), r(&[h, i]).t().unwrap(), 30);
    // backward dY·W
    rep("bwd q/o", r(&[n, h]), r(&[h, h]), 60);
    rep("bwd k/v", r(&[n, kv]), r(&[kv, h]), 60);
    rep("bwd gate/up", r(&[n, i]), r(&[i, h]), 60);
    rep("bwd down", r(&[n, h]), r(&[h, i]), 30);
    // head chunks of 128 rows
    rep(
        "head fwd 128x576x49152",
        r(&[128, h]),
        r(&[v, h]).t().unwrap(),
        4,
    );
    rep("head bwd 128x49152x576", r(&[128, v]), r(&[v, h]), 4);
    // attention per sequence (t=128, g=3, nkv=3, hd=64), per layer ×4 seqs
    rep(
        "attn qk",
        r(&[3, 384, 64]),
        r(&[3, 128, 64]).t().unwrap(),
        240,
    );
    rep("attn pv", r(&[3, 384, 128]), r(&[3, 128, 64]), 120);
    rep(
        "attn bwd ptdo",
        r(&[3, 384, 128]).t().unwrap(),
        r(&[3, 384, 64]),
        120,
    );
    rep(
        "attn bwd dovt",
        r(&[3, 384, 64]),
        r(&[3, 128, 64]).t().unwrap(),
        120,
    );
    rep("attn bwd dsk", r(&[3, 384, 128]), r(&[3, 128, 64]), 120);
    rep(
        "attn bwd dstq",
        r(&[3, 384, 128]).t().unwrap(),
        r(&[3, 384, 64]),
        120,
    );
    {
        let p = r(&[128, v]);
        let w = r(&[v, h]);
        let s0 = Instant::now();
        for _ in 0..3 {
            let _ = w.t().unwrap().matmul(&p.t().unwrap()).unwrap();
        }
        println!(
            "head bwd as (W^T P^T): {:.1} ms",
            s0.elapsed().as_secs_f64() / 3.0 * 1e3
        );
        let s0 = Instant::now();
        for _ in 0..3 {
            let _ = w
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .matmul(&p.t().unwrap())
                .unwrap();
        }
        println!(
            "head bwd as (W^T contiguous P^T): {:.1} ms",
            s0.elapsed().as_secs_f64() / 3.0 * 1e3
        );
        let s0 = Instant::now();
        for _ in 0..3 {
            let a = p
                .narrow(1, 0, v / 2)
                .unwrap()
                .matmul(&w.narrow(0, 0, v / 2).unwrap())
                .unwrap();
            let b = p
                .narrow(1, v / 2, v / 2)
                .unwrap()
                .matmul(&w.narrow(0, v / 2, v / 2).unwrap())
                .unwrap();
            let _ = (a + b).unwrap();
        }
        println!(
            "head bwd K split 2 serial: {:.1} ms",
            s0.elapsed().as_secs_f64() / 3.0 * 1e3
        );
        let s0 = Instant::now();
        for _ in 0..3 {
            let mut acc: Option<Tensor> = None;
            for c in 0..8 {
                let k0 = c * v / 8;
                let g = p
                    .narrow(1, k0, v / 8)
                    .unwrap()
                    .matmul(&w.narrow(0, k0, v / 8).unwrap())
                    .unwrap();
                acc = Some(match acc {
                    None => g,
                    Some(a) => (a + g).unwrap(),
                });
            }
        }
        println!(
            "head bwd K split 8 serial: {:.1} ms",
            s0.elapsed().as_secs_f64() / 3.0 * 1e3
        );
        let p4 = r(&[512, v]);
        let s0 = Instant::now();
        for _ in 0..3 {
            let _ = p4.matmul(&w).unwrap();
        }
        println!(
            "head bwd M=512: {:.1} ms (per 128: {:.1})",
            s0.elapsed().as_secs_f64() / 3.0 * 1e3,
            s0.elapsed().as_secs_f64() / 12.0 * 1e3
        );
    }
    {
        let tm = |f: &dyn Fn()| {
            f();
            let s0 = Instant::now();
            for _ in 0..5 {
                f();
            }
            s0.elapsed().as_secs_f64() / 5.0 * 1e3
        };
        let x = r(&[n, h]);
        let wq = r(&[h, h]);
        let wk = r(&[kv, h]);
        let wv = r(&[kv, h]);
        let wqkv = r(&[h + 2 * kv, h]);
        println!(
            "fwd q,k,v separate {:.2} ms; fused {:.2} ms",
            tm(&|| {
                let _ = x.matmul(&wq.t().unwrap()).unwrap();
                let _ = x.matmul(&wk.t().unwrap()).unwrap();
                let _ = x.matmul(&wv.t().unwrap()).unwrap();
            }),
            tm(&|| {
                let _ = x.matmul(&wqkv.t().unwrap()).unwrap();
            })
        );
        let dq = r(&[n, h]);
        let dk = r(&[n, kv]);
        let dv = r(&[n, kv]);
        let dqkv = r(&[n, h + 2 * kv]);
        println!(
            "bwd q,k,v separate+adds {:.2} ms; fused {:.2} ms",
            tm(&|| {
                let a = dq.matmul(&wq).unwrap();
                let b = dk.matmul(&wk).unwrap();
                let c = dv.matmul(&wv).unwrap();
                let _ = ((a + b).unwrap() + c).unwrap();
            }),
            tm(&|| {
                let _ = dqkv.matmul(&wqkv).unwrap();
            })
        );
        let wg = r(&[i, h]);
        let wu = r(&[i, h]);
        let wgu = r(&[2 * i, h]);
        println!(
            "fwd gate,up separate {:.2} ms; fused {:.2} ms",
            tm(&|| {
                let _ = x.matmul(&wg.t().unwrap()).unwrap();
                let _ = x.matmul(&wu.t().unwrap()).unwrap();
            }),
            tm(&|| {
                let _ = x.matmul(&wgu.t().unwrap()).unwrap();
            })
        );
        let dg = r(&[n, i]);
        let du = r(&[n, i]);
        let dgu = r(&[n, 2 * i]);
        println!(
            "bwd gate,up separate+add {:.2} ms; fused {:.2} ms",
            tm(&|| {
                let a = dg.matmul(&wg).unwrap();
                let b = du.matmul(&wu).unwrap();
                let _ = (a + b).unwrap();
            }),
            tm(&|| {
                let _ = dgu.matmul(&wgu).unwrap();
            })
        );
    }
    println!(
        "total {:.3} s for {:.1} GFLOP: {:.1} GFLOP/s; {:.1} tok/s if only gemms",
        total,
        flops_total / 1e9,
        flops_total / total / 1e9,
        n as f64 / total
    );
}
