use candle_core::{Device, Tensor};
use lowrank_model::quant::QMatrix;
use std::time::Instant;
fn main() {
    lowrank_model::init_threads(None);
    for &(out, inp) in &[(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu).unwrap();
        let q = QMatrix::from_tensor(&w).unwrap();
        for &rows in &[1usize, 32, 512] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).unwrap();
            let reps = if out > 10000 { 5 } else { 50 };
            let _ = lowrank_model::ops::plain_linear(&x, &w).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                let _ = lowrank_model::ops::plain_linear(&x, &w).unwrap();
            }
            let f = t.elapsed().as_secs_f64() / reps as f64;
            let _ = lowrank_model::quant::qlinear(&x, &q).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                let _ = lowrank_model::quant::qlinear(&x, &q).unwrap();
            }
            let i = t.elapsed().as_secs_f64() / reps as f64;
            let gf = 2.0 * (out * inp * rows) as f64 / 1e9;
            println!("{out}x{inp} rows {rows}: f32 {:.3} ms ({:.0} GF/s)  int8 {:.3} ms ({:.0} Gop/s)  {:.2}x", f*1e3, gf/f, i*1e3, gf/i, f/i);
        }
    }
}
