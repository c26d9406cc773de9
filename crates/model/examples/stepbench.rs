use lowrank_model::quant::QMatrix;
use std::time::Instant;
fn main() {
    lowrank_model::init_threads(None);
    let shapes = [
        (576usize, 576usize),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mut mats = Vec::new();
    let mut seed = 1u32;
    let mut rnd = || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as f32 / 16777216.0 - 0.5
    };
    for _ in 0..30 {
        for &(o, i) in &shapes {
            let w: Vec<f32> = (0..o * i).map(|_| rnd()).collect();
            mats.push(QMatrix::from_f32(&w, o, i).unwrap());
        }
    }
    let w: Vec<f32> = (0..49152 * 576).map(|_| rnd()).collect();
    mats.push(QMatrix::from_f32(&w, 49152, 576).unwrap());
    let rows = 32;
    let x: Vec<f32> = (0..rows * 1536).map(|_| rnd()).collect();
    for rep in 0..12 {
        let t = Instant::now();
        for m in &mats {
            let _ = m.matmul(&x[..rows * m.in_dim()], rows);
        }
        println!(
            "rep {rep}: {:.2} ms per step",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
