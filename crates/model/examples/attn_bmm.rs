//! The blockwise training attention's batched products (SmolLM2-135M: 3 KV heads, 3 query
//! heads each, head dim 64, blocks of 128 query rows) on candle's matmul and on
//! `ops::gemm::bmm`, per shape and key count: the fastest of REPS alternating calls.
//!
//! `cargo run --release -p lowrank-model --example attn_bmm`
use candle_core::{Device, Tensor};
use lowrank_model::ops::gemm::bmm;
use std::time::Instant;

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1f32, s, &d).unwrap();
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let (nkv, rows, hd) = (3, 384, 64);
    let (mut tc, mut to) = (0.0, 0.0);
    for e in [128usize, 512, 2048] {
        let keys = r(&[nkv, e, hd]);
        let q = r(&[nkv, rows, hd]);
        let p = r(&[nkv, rows, e]);
        let kt = keys.t().unwrap();
        let pt = p.t().unwrap();
        let cases: [(&str, &Tensor, &Tensor); 4] = [
            ("q·kᵀ", &q, &kt),
            ("p·v", &p, &keys),
            ("pᵀ·dO", &pt, &q),
            ("dS·k", &p, &keys),
        ];
        for (name, a, b) in cases {
            let (mut sc, mut so) = (f64::MAX, f64::MAX);
            for _ in 0..reps {
                sc = sc.min(best(1, || drop(a.matmul(b).unwrap())));
                so = so.min(best(1, || drop(bmm(a, b).unwrap())));
            }
            let (_, m, k) = a.dims3().unwrap();
            let n = b.dim(2).unwrap();
            let fl = 2.0 * (nkv * m * k * n) as f64;
            println!(
                "{name:7} e {e:5}  candle {:7.3} ms {:6.1} GF/s   bmm {:7.3} ms {:6.1} GF/s  ({:.2}x)",
                sc * 1e3,
                fl / sc / 1e9,
                so * 1e3,
                fl / so / 1e9,
                sc / so
            );
            tc += sc;
            to += so;
        }
    }
    println!("sum: candle {:.3} ms, bmm {:.3} ms", tc * 1e3, to * 1e3);
}
