use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    lowrank_model::init_threads(None);
    let d = Device::Cpu;
    let (nh, nkv, hd, seqs, l) = (9usize, 3usize, 64usize, 32usize, 110usize);
    // 30 layers' worth of caches so they do not sit in cache.
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let caches: Vec<Vec<(Tensor, Tensor)>> = (0..layers)
        .map(|_| {
            (0..seqs)
                .map(|_| {
                    let k = Tensor::randn(0f32, 1.0, (nkv, 256, hd), &d).unwrap();
                    let v = Tensor::randn(0f32, 1.0, (nkv, 256, hd), &d).unwrap();
                    (k.narrow(1, 0, l).unwrap(), v.narrow(1, 0, l).unwrap())
                })
                .collect()
        })
        .collect();
    let q = Tensor::randn(0f32, 1.0, (nh, seqs, hd), &d).unwrap();
    for rep in 0..3 {
        let t = Instant::now();
        for li in 0..30 {
            let layer = &caches[li % layers];
            let items: Vec<_> = layer
                .iter()
                .enumerate()
                .map(|(i, (k, v))| (i, 1usize, k.clone(), v.clone()))
                .collect();
            let _ = lowrank_model::ops::attention_rows(&q, &items, nkv, 0.125)
                .unwrap()
                .unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        let bytes = (30 * seqs * 2 * nkv * l * hd * 4) as f64;
        println!(
            "rep {rep}: {:.2} ms per step (30 layers), {:.1} GB/s",
            s * 1e3,
            bytes / s / 1e9
        );
    }
}
