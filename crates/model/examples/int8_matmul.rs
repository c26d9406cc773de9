//! Speed of the int8 matmul on the shapes training runs through it (SmolLM2-135M's
//! projections at batch 4 × 128): `cargo run --release -p lowrank-model --example int8_matmul`
//! (`ROWS=1` for one decoded token; `SHAPES=1b` for the 1.1 B benchmark base's shapes,
//! TinyLlama's: hidden 2048, MLP 5632, 4 KV heads of 64, the default vocabulary).
//!
//! Weights are random 4-bit grids per block (as a Q4_1 GGUF's, so they pack exactly, as
//! nibbles); activations random normal. Prints, per shape, the best of five rounds of
//! `matmul` (one 8-bit limb, as serving runs it) and `matmul_fine` (two limbs, as training's
//! forward runs it), in ms and in G multiply-adds per second of the integer work, then the
//! pack dequantized for candle's gemm, training's dequantized product as it runs, and the
//! bf16 product the LM head's training forward runs on AVX-512 BF16 (`-` elsewhere). The
//! kernel paths are the process's (`LOWRANK_INT8_KERNEL` or `LOWRANK_ISA` forces them).

use std::time::Instant;

use lowrank_model::quant::{
    bf16_linear_into, kernel_name, qlinear_train_vec, QMatrix, TrainProduct,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (name, out, in) of SmolLM2-135M's projections.
const SHAPES: [(&str, usize, usize); 5] = [
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("head 49152x576", 49152, 576),
];
/// TinyLlama-1.1B's projection shapes (the packs training multiplies: q/k/v and gate/up
/// fused), for `SHAPES=1b`.
const SHAPES_1B: [(&str, usize, usize); 5] = [
    ("q/k/v 2560x2048", 2560, 2048),
    ("o 2048x2048", 2048, 2048),
    ("gate/up 11264x2048", 11264, 2048),
    ("down 2048x5632", 2048, 5632),
    ("head 49152x2048", 49152, 2048),
];

/// Rows of activations (`rows=1` for a decoded token's products).
fn rows() -> usize {
    std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}
/// Rounds timed, the best kept (more for small row counts, whose calls are short).
fn rounds() -> usize {
    if rows() < 64 {
        200
    } else {
        5
    }
}

fn grid_weights(rng: &mut ChaCha8Rng, out: usize, inp: usize) -> Vec<f32> {
    if out > 4096 {
        // The head: a Q8_0 block's symmetric 8-bit grid, w = d·q with q in −127..=127.
        let mut w = vec![0f32; out * inp];
        for blk in w.chunks_mut(32) {
            let d = half::f16::from_f32(rng.random_range(0.0001f32..0.001)).to_f32();
            for v in blk.iter_mut() {
                *v = d * rng.random_range(-127i32..=127) as f32;
            }
        }
        return w;
    }
    let mut w = vec![0f32; out * inp];
    for blk in w.chunks_mut(32) {
        // d and m exactly representable in f16, q in 0..=15: a Q4_1 block.
        let d = half::f16::from_f32(rng.random_range(0.001f32..0.01)).to_f32();
        let m = half::f16::from_f32(rng.random_range(-0.08f32..-0.01)).to_f32();
        for v in blk.iter_mut() {
            *v = d * rng.random_range(0u8..16) as f32 + m;
        }
    }
    w
}

fn best_ms(mut f: impl FnMut()) -> f64 {
    f();
    (0..rounds())
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let rows = rows();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "int8 kernel: {}, {} rows, threads: {}",
        kernel_name(),
        rows,
        rayon::current_num_threads()
    );
    let shapes = match std::env::var("SHAPES").as_deref() {
        Ok("1b") => SHAPES_1B,
        _ => SHAPES,
    };
    for (name, out, inp) in shapes {
        let w = QMatrix::from_f32(&grid_weights(&mut rng, out, inp), out, inp).expect("pack");
        let x: Vec<f32> = (0..rows * inp)
            .map(|_| rng.random_range(-1f32..1.0) * rng.random_range(0f32..1.0))
            .collect();
        let macs = (rows * out * inp) as f64;
        let one = best_ms(|| {
            std::hint::black_box(w.matmul(&x, rows));
        });
        let two = best_ms(|| {
            std::hint::black_box(w.matmul_fine(&x, rows));
        });
        // The alternative to the two limbs: the pack dequantized (exactly) for one f32 gemm.
        let dev = candle_core::Device::Cpu;
        let xt = candle_core::Tensor::from_slice(&x, (rows, inp), &dev).expect("x");
        let deq = best_ms(|| {
            let wd = candle_core::Tensor::from_vec(w.dequantize(), (out, inp), &dev).expect("w");
            std::hint::black_box(xt.matmul(&wd.t().expect("t")).expect("gemm"));
        });
        let decode = best_ms(|| {
            std::hint::black_box(w.dequantize());
        });
        // Training's dequantized product as it runs (on our f32 gemm: decoded into its panels,
        // or a chunk at a time with `LOWRANK_TRAIN_DECODE=chunks`).
        let train = best_ms(|| {
            std::hint::black_box(
                qlinear_train_vec(&xt, &w, TrainProduct::Dequantized).expect("product"),
            );
        });
        // The bf16 product (x and the decoded pack rounded, `vdpbf16ps`), where it runs.
        let mut y = Vec::new();
        let bf16 = match bf16_linear_into(&xt, &w, &mut y).expect("product") {
            true => format!(
                "{:7.2} ms",
                best_ms(|| {
                    bf16_linear_into(&xt, &w, &mut y).expect("product");
                    std::hint::black_box(&y);
                })
            ),
            false => "      -   ".to_string(),
        };
        println!(
            "{name:18} nibbles {:5}  one limb {one:7.2} ms {:6.1} GMAC/s   two limbs {two:7.2} ms {:6.1} GMAC/s   dequantized f32 gemm {deq:7.2} ms (decoding {decode:6.2} ms)   training's dequantized {train:7.2} ms   bf16 {bf16}",
            w.nibble_packed(),
            macs / one / 1e6,
            2.0 * macs / two / 1e6
        );
    }
}
