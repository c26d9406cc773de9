use super::kernel::KERNEL_NAMES;
use super::*;
use rand::{Rng, SeedableRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Block-grid weights: per 32-block d·q + m with q ∈ 0..levels (Q4_1-style for 16 levels).
/// The first two inputs of every block are q = 0 and q = levels − 1, so the grid's
/// largest q is reached.
fn grid_weights(out: usize, inp: usize, levels: u32, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        for b in 0..inp.div_ceil(QK) {
            let d: f32 = rng.random_range(0.001..0.05) * 16.0 / levels as f32;
            let m: f32 = rng.random_range(-0.3..0.0);
            for i in b * QK..((b + 1) * QK).min(inp) {
                let q = match i - b * QK {
                    0 => 0,
                    1 => levels - 1,
                    _ => rng.random_range(0..levels),
                };
                w[o * inp + i] = d * q as f32 + m;
            }
        }
    }
    w
}

/// Q4_1-style weights: per 32-block d·q + m with q ∈ 0..16.
fn q4_weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    grid_weights(out, inp, 16, seed)
}

fn reference(x: &[f32], w: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut s = 0f64;
            for i in 0..inp {
                s += x[r * inp + i] as f64 * w[o * inp + i] as f64;
            }
            y[r * out + o] = s as f32;
        }
    }
    y
}

/// Every supported kernel other than the portable one; prints the paths this CPU lacks.
fn vector_kernels(test: &str) -> Vec<Kernel> {
    let supported = Kernel::supported_list();
    let skipped: Vec<&str> = KERNEL_NAMES
        .iter()
        .copied()
        .filter(|n| !supported.iter().any(|k| k.name() == *n))
        .collect();
    eprintln!("{test}: skipped int8 kernel paths (not on this CPU): {skipped:?}");
    eprintln!(
        "{test}: checking {:?} against portable",
        supported.iter().map(|k| k.name()).collect::<Vec<_>>()
    );
    supported
        .into_iter()
        .filter(|&k| k != Kernel::Portable)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// The same matrix with a larger assumed q bound: the AVX2 kernel then takes a more
/// conservative mode (valid for any smaller q), so every mode runs on every weight kind.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn with_qmax(q: &QMatrix, qmax: u8) -> QMatrix {
    assert!(qmax >= q.qmax);
    let mut c = q.clone();
    c.qmax = qmax;
    c
}

/// Every vector kernel gives bitwise the portable results (and so do all AVX2 modes the
/// matrix allows); returns the portable result.
fn assert_kernels_agree(q: &QMatrix, x: &[f32], rows: usize, what: &str) -> Vec<f32> {
    let want = q.matmul_with(Kernel::Portable, x, rows);
    // Both q storages where the matrix allows nibbles (bitwise the same results).
    let storages: Vec<QMatrix> = if q.qmax <= 15 {
        vec![q.clone(), q.clone().with_nibbles(!q.nibbles)]
    } else {
        vec![q.clone()]
    };
    for k in Kernel::supported_list() {
        #[allow(unused_mut)]
        let mut variants = storages.clone();
        #[cfg(target_arch = "x86_64")]
        if k == Kernel::Avx2 {
            for s in &storages {
                variants.extend(
                    [16u8, 32, 64, 128, 255]
                        .into_iter()
                        .filter(|&b| b > q.qmax)
                        .map(|b| with_qmax(s, b)),
                );
            }
        }
        for v in &variants {
            let got = v.matmul_with(k, x, rows);
            assert!(
                bits(&got) == bits(&want),
                "{what}: kernel {} (qmax {}, nibbles {}) differs from portable: first at {:?}",
                k.name(),
                v.qmax,
                v.nibbles,
                got.iter()
                    .zip(&want)
                    .position(|(a, b)| a.to_bits() != b.to_bits())
                    .map(|i| (i, got[i], want[i]))
            );
        }
    }
    want
}

/// |y − reference| within the activation rounding (≤ s/2 per input) plus f32 noise.
fn assert_near_reference(y: &[f32], x: &[f32], w: &[f32], rows: usize, out: usize, what: &str) {
    let inp = w.len() / out;
    let r = reference(x, w, rows, out, inp);
    for row in 0..rows {
        let xr = &x[row * inp..(row + 1) * inp];
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            // Σ over blocks of (amax_b/254)·Σ|w|, plus relative f32 accumulation error.
            let mut tol = 0f64;
            let mut mag = 0f64;
            for (xb, wb) in xr.chunks(QK).zip(wr.chunks(QK)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                tol += amax / 254.0 * wsum;
                mag += amax * wsum;
            }
            let tol = tol * 1.01 + mag * 1e-5 + 1e-30;
            let (a, b) = (y[row * out + o], r[row * out + o]);
            assert!(
                ((a - b) as f64).abs() <= tol,
                "{what}: [{row}, {o}] {a} vs {b} (tol {tol})"
            );
        }
    }
}

#[test]
fn block_grid_weights_are_stored_exactly() {
    let (out, inp) = (37, 100); // ragged tiles and blocks
    let w = q4_weights(out, inp, 1);
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    assert_eq!(q.rounded_blocks(), 0);
    assert!(q.qmax <= 15);
    for (a, b) in q.dequantize().iter().zip(&w) {
        // Exact up to f32 rounding of the detected step (8-bit rounding would be ~1e-3).
        assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
    }
    // Arbitrary f32 weights are rounded to 256 levels per block.
    let f = rand_vec(out * inp, 2);
    let q = QMatrix::from_f32(&f, out, inp).unwrap();
    assert!(q.rounded_blocks() > 0);
    assert_eq!(q.qmax, 255);
    for (a, b) in q.dequantize().iter().zip(&f) {
        assert!((a - b).abs() <= 2.0 / 510.0 + 1e-6, "{a} vs {b}");
    }
}

/// Grids that none of llama.cpp's steps name and whose smallest offsets and gaps are many
/// steps wide (the level nearest the minimum 17–19 steps up, every gap ≥ 5 steps, up to 231
/// levels spanned): still found and kept exactly, and the 4-bit packing rounds them.
#[test]
fn sparse_dense_grids_are_found_exactly() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (out, inp) = (64, 4 * QK);
    let mut w = vec![0f32; out * inp];
    for block in w.chunks_mut(QK) {
        let lo: f32 = rng.random_range(-1.0..1.0);
        let step: f32 = rng.random_range(0.001..0.01);
        // Levels 0 and 17 + 7·(i − 1) + (0..=2): strictly increasing, gaps ≥ 5.
        let mut levels: Vec<u32> = (0..QK as u32)
            .map(|i| match i {
                0 => 0,
                _ => 17 + 7 * (i - 1) + rng.random_range(0..=2),
            })
            .collect();
        // Shuffled, so the minimum is not always first.
        for i in (1..levels.len()).rev() {
            levels.swap(i, rng.random_range(0..=i));
        }
        for (v, &l) in block.iter_mut().zip(&levels) {
            *v = lo + l as f32 * step;
        }
    }
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    assert_eq!(q.rounded_blocks(), 0);
    for (a, b) in q.dequantize().iter().zip(&w) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    let q4 = QMatrix::from_f32_bits(&w, out, inp, Bits::Four).unwrap();
    assert_eq!(q4.rounded_blocks(), out * inp / QK);

    // Any grid of 2..=256 levels, any subset of them (the top level always used), any scale
    // and base, values up to 255 steps from 0: kept exactly by 8 bits, and by 4 bits where
    // the block spans ≤ 15 steps. (Before range/K, o/k as the step missed grids like
    // 176 steps of 4.2e-4 from 0.074.)
    for case in 0..400u64 {
        let levels: u32 = rng.random_range(1..=255);
        let step: f32 = 10f32.powf(rng.random_range(-6.0..3.0));
        let lo: f32 = rng.random_range(-1.0..1.0) * step * levels as f32;
        let ls: Vec<u32> = (0..QK)
            .map(|i| match i {
                0 => levels,
                _ => rng.random_range(0..=levels),
            })
            .collect();
        let vals: Vec<f32> = ls.iter().map(|&l| lo + l as f32 * step).collect();
        // Steps the block spans (its lowest level need not be 0).
        let span = levels - ls.iter().min().unwrap();
        for (bits, fits) in [(Bits::Eight, true), (Bits::Four, span <= 15)] {
            let q = QMatrix::from_f32_bits(&vals, 1, QK, bits).unwrap();
            assert_eq!(
                q.rounded_blocks() == 0,
                fits,
                "case {case}: {levels} steps of {step} from {lo}, {bits:?}: {vals:?}"
            );
            if fits {
                for (a, b) in q.dequantize().iter().zip(&vals) {
                    assert!(
                        (a - b).abs() <= 1e-5 * step * levels as f32,
                        "case {case}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// A NaN or ±∞ weight, or a block whose range overflows f32, is an error naming the row
/// and the block's columns (it used to pack as 0 or as its block's minimum, silently); so
/// is a GGUF block whose scale is not finite. Parts name their own rows.
#[test]
fn non_finite_weights_are_errors_naming_their_place() {
    let (out, inp) = (37, 100);
    for (bad, at) in [
        (f32::NAN, 5 * inp + 70),
        (f32::INFINITY, 36 * inp + 99),
        (f32::NEG_INFINITY, 0),
    ] {
        for bits in [Bits::Eight, Bits::Four] {
            let mut w = rand_vec(out * inp, 9);
            w[at] = bad;
            match QMatrix::from_f32_bits(&w, out, inp, bits) {
                Err(ModelError::NonFiniteWeights { part, row, col }) => {
                    assert_eq!((part, row, col), (0, at / inp, at % inp / QK * QK), "{bad}")
                }
                other => panic!("{bad}: {:?}", other.map(|q| q.rounded_blocks())),
            }
        }
    }
    // Finite values 6e38 apart: the block's range is not an f32.
    let mut w = rand_vec(out * inp, 10);
    w[3 * inp + 40] = -3e38;
    w[3 * inp + 41] = 3e38;
    let e = QMatrix::from_f32(&w, out, inp).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::NonFiniteWeights {
                part: 0,
                row: 3,
                col: 32
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "weights not finite (NaN or ±∞) at row 3, columns 32..64"
    );
    // The second part's row 2.
    let (a, mut b) = (rand_vec(4 * inp, 11), rand_vec(6 * inp, 12));
    b[2 * inp + 7] = f32::NAN;
    let e = QMatrix::from_parts(&[&a, &b], inp).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::NonFiniteWeights {
                part: 1,
                row: 2,
                col: 0
            }
        ),
        "{e}"
    );
    // A Q8_0 block (f16 scale, 32 q) whose scale is +∞, in row 1 of a 2 × 64 tensor.
    let mut raw = Vec::new();
    for blk in 0..4 {
        let d = if blk == 3 {
            half::f16::INFINITY
        } else {
            half::f16::from_f32(0.01)
        };
        raw.extend(d.to_le_bytes());
        raw.extend((0..QK as i32).map(|i| (i - 16) as i8 as u8));
    }
    let e = QMatrix::from_gguf_blocks(BlockFormat::Q8_0, &[(&raw, 2, None)], 64, Bits::Eight)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::NonFiniteWeights {
                part: 0,
                row: 1,
                col: 32
            }
        ),
        "{e}"
    );
    // Finite weights still pack.
    assert!(QMatrix::from_f32(&rand_vec(out * inp, 9), out, inp).is_ok());
}

#[test]
fn matmul_matches_f32_within_activation_rounding() {
    for &(rows, out, inp) in &[(1, 16, 32), (5, 37, 100), (33, 48, 576), (70, 20, 64)] {
        let w = q4_weights(out, inp, rows as u64);
        let x = rand_vec(rows * inp, 7 + rows as u64);
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        let y = q.matmul(&x, rows);
        let r = reference(&x, &w, rows, out, inp);
        // Per element the activation rounding is ≤ s/2 = amax/254 per block.
        let wabs: f32 = w.iter().map(|v| v.abs()).fold(0.0, f32::max);
        let tol = inp as f32 * wabs / 254.0 * 0.5;
        for (i, (a, b)) in y.iter().zip(&r).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "[{rows}×{out}×{inp}] #{i}: {a} vs {b}"
            );
        }
        // Not trivially zero and much closer than the tolerance on average.
        let err: f32 = y.iter().zip(&r).map(|(a, b)| (a - b).abs()).sum::<f32>();
        let mag: f32 = r.iter().map(|v| v.abs()).sum::<f32>();
        assert!(err / mag < 0.02, "mean relative error {}", err / mag);
    }
}

#[test]
fn rows_are_independent_of_the_batch_and_kernels_agree() {
    let (out, inp) = (50, 96);
    let w = q4_weights(out, inp, 3);
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    let rows = 77;
    let x = rand_vec(rows * inp, 4);
    vector_kernels("rows_are_independent_of_the_batch_and_kernels_agree");
    let want = assert_kernels_agree(&q, &x, rows, "77 rows");
    assert_near_reference(&want, &x, &q.dequantize(), rows, out, "77 rows");
    for k in Kernel::supported_list() {
        let all = q.matmul_with(k, &x, rows);
        for r in [0, 3, 8, 13, 76] {
            let one = q.matmul_with(k, &x[r * inp..(r + 1) * inp], 1);
            assert_eq!(
                bits(&one),
                bits(&all[r * out..(r + 1) * out]),
                "{} row {r}",
                k.name()
            );
        }
    }
    // The process's kernel is one of them.
    assert!(supported_kernels().contains(&kernel_name()));
    assert_eq!(supported_kernels().last(), Some(&"portable"));
}

#[test]
fn kernels_agree_bitwise_on_random_shapes() {
    vector_kernels("kernels_agree_bitwise_on_random_shapes");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let outs = [1, 7, 16, 17, 45, 100];
    let inps = [1, 31, 32, 33, 95, 200];
    #[cfg(target_arch = "x86_64")]
    let mut modes = std::collections::BTreeSet::new();
    let mut case = 0u64;
    for rows in (1..=20).chain([77]) {
        let out = outs[rng.random_range(0..outs.len())];
        let inp = inps[rng.random_range(0..inps.len())];
        // 16, 32, 64, 128 levels: the AVX2 plain modes; 129 and 256: the sign trick;
        // arbitrary f32 weights: rounded to 256 levels.
        for kind in [16, 32, 64, 128, 129, 256, 0] {
            case += 1;
            let w = if kind == 0 {
                rand_vec(out * inp, case)
            } else {
                grid_weights(out, inp, kind, case)
            };
            let q = QMatrix::from_f32(&w, out, inp).unwrap();
            #[cfg(target_arch = "x86_64")]
            modes.insert(format!("{:?}", avx2::Mode::for_qmax(q.qmax)));
            let mut x = rand_vec(rows * inp, 1000 + case);
            // Some all-zero and some large-magnitude blocks.
            for (i, xb) in x.chunks_mut(QK).enumerate() {
                match i % 5 {
                    1 => xb.fill(0.0),
                    3 => xb.iter_mut().for_each(|v| *v *= 1e4),
                    _ => {}
                }
            }
            let what = format!("{rows}×{out}×{inp} kind {kind}");
            let y = assert_kernels_agree(&q, &x, rows, &what);
            assert_near_reference(&y, &x, &q.dequantize(), rows, out, &what);
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        modes.len(),
        5,
        "every AVX2 mode met by the weights' own qmax: {modes:?}"
    );
}

/// The acceptance check on real weights: every packed matrix of the default model (Q4_1
/// GGUF, fetched on first use like the other model tests) gives bitwise the same results
/// on every path the CPU has, for activations shaped like a transformer's (a few large
/// outliers).
#[test]
fn kernels_agree_bitwise_on_the_default_model() {
    vector_kernels("kernels_agree_bitwise_on_the_default_model");
    let path = crate::fetch::ensure_default(false).expect("default model");
    let loaded = crate::LoadedModel::load(
        path.to_str().expect("utf-8 path"),
        &candle_core::Device::Cpu,
    )
    .expect("load the default model");
    let qm = QuantModel::build(&loaded.model.weights, super::Bits::Eight).unwrap();
    let mut qmax = std::collections::BTreeMap::<u8, usize>::new();
    let mut nibbles = 0;
    for (i, q) in qm.all().enumerate() {
        *qmax.entry(q.qmax).or_default() += 1;
        nibbles += usize::from(q.nibbles);
        assert_eq!(
            q.nibbles,
            q.qmax <= 15 && super::nibble_packing(),
            "matrix #{i}"
        );
        let rows = 5;
        let mut x = rand_vec(rows * q.in_dim(), 40 + i as u64);
        for v in x.iter_mut().step_by(97) {
            *v *= 30.0;
        }
        assert_kernels_agree(q, &x, rows, &format!("default model matrix #{i}"));
    }
    eprintln!("default model: matrices by largest q: {qmax:?}; {nibbles} nibble-packed");
    // The Q4_1 projections of every layer (4 packs × 30 layers) keep 4-bit q.
    if super::nibble_packing() {
        assert!(nibbles >= 120, "{nibbles} nibble-packed matrices");
    }
}

/// The saturation case of `vpmaddubsw`: q = 255 (and q = 0, i.e. q' = −128) against
/// a = ±127 in every position; and q at each AVX2 mode's bound (16, 32, 64, 128), where
/// the i16 sums come within 255 of overflowing.
#[test]
fn kernels_agree_on_extreme_blocks() {
    vector_kernels("kernels_agree_on_extreme_blocks");
    for top in [16, 32, 64, 128, 255] {
        extreme_blocks(top);
    }
}

fn extreme_blocks(top: u32) {
    let (out, inp) = (33, 100);
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        for i in 0..inp {
            let j = i % QK;
            // q = 1 at input 1 of the first block makes the grid step d.
            let q = match (o % 4, i) {
                (_, 0) => 0,
                (_, 1) => 1,
                (0, _) => top,
                (1, _) => 0,
                (2, _) => top * (j % 2) as u32,
                _ => top * ((i * 7 + o) % 3 == 0) as u32,
            };
            w[o * inp + i] = 0.01 * q as f32 - 1.0;
        }
    }
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    assert_eq!(q.qmax as u32, top);
    assert_eq!(q.rounded_blocks(), 0);
    let rows = 6;
    let mut x = vec![0f32; rows * inp];
    for (i, v) in x.iter_mut().enumerate() {
        let (r, c) = (i / inp, i % inp);
        *v = match r {
            0 => -1.0,
            1 => 1.0,
            2 => [-1.0, 1.0][c % 2],
            3 => [1.0, -1.0][c % 2],
            4 => [1.0, -1.0][(c * 5 / 3) % 2],
            _ => -3.5,
        };
    }
    let act = Activations::quantize(Kernel::Portable, &x, rows, inp, q.nb);
    assert!(act.a[..QK].iter().all(|&a| a == -127));
    let what = format!("extreme blocks, q up to {top}");
    let y = assert_kernels_agree(&q, &x, rows, &what);
    assert_near_reference(&y, &x, &q.dequantize(), rows, out, &what);
}

/// 60 blocks of activations at the quantizers' edges: exact ties, zeros of both signs,
/// tiny, denormal and huge values, a lone non-zero, and scales across e^±30.
fn edge_activation_blocks() -> Vec<f32> {
    let mut x = rand_vec(32 * 60, 9);
    let blocks: Vec<&mut [f32]> = x.chunks_mut(QK).collect();
    for (i, xb) in blocks.into_iter().enumerate() {
        for (j, v) in xb.iter_mut().enumerate() {
            let k = j as f32 - 16.0;
            match i {
                // Exact ties: s = 1 (amax 127), values k + 0.5 and −(k + 0.5).
                0 => *v = if j == 0 { 127.0 } else { k + 0.5 },
                1 => *v = if j == 0 { -127.0 } else { -(k + 0.5) },
                // s = 2: odd integers are ties.
                2 => *v = if j == 0 { 254.0 } else { 2.0 * k + 1.0 },
                3 => *v = 0.0,
                4 => *v = -0.0,
                // Tiny values (1/s would overflow) and denormals.
                5 => *v *= 1e-38,
                6 => *v = if j % 3 == 0 { 1e-45 } else { 0.0 },
                // Large values.
                7 => *v *= 3e37,
                // One non-zero value.
                8 => *v = if j == 17 { -0.25 } else { 0.0 },
                _ => *v *= (i as f32 - 30.0).exp(),
            }
        }
    }
    x
}

#[test]
fn activation_quantizers_agree() {
    let kernels = vector_kernels("activation_quantizers_agree");
    let x = edge_activation_blocks();
    for xb in x.chunks_exact(QK) {
        let mut p = [0i8; QK];
        let want = quantize_act_block(xb, &mut p);
        for &k in &kernels {
            let mut v = [0i8; QK];
            // SAFETY: `kernels` are the ones this CPU supports.
            let got = unsafe { k.quantize_block(xb, &mut v) };
            assert_eq!(
                (got.0.to_bits(), got.1, v),
                (want.0.to_bits(), want.1, p),
                "{} on {xb:?}",
                k.name()
            );
        }
        let s = want.0;
        assert_eq!(want.1, p.iter().map(|&a| a as i32).sum::<i32>());
        for (&q, &v) in p.iter().zip(xb) {
            assert!(
                (q as f32 * s - v).abs() <= s / 2.0 * 1.0001 + 1e-37,
                "{q} {s} {v}"
            );
        }
    }
    // Ties round to even.
    let mut p = [0i8; QK];
    let xb: Vec<f32> = (0..QK)
        .map(|j| if j == 0 { 127.0 } else { j as f32 - 15.5 })
        .collect();
    quantize_act_block(&xb, &mut p);
    assert_eq!(&p[1..5], &[-14, -14, -12, -12]);
    // Tail blocks (every length) through the whole row quantizer.
    row_quantizers_agree(&kernels, false);
}

/// Rows of every length 1..=70 (whole and tail blocks) through the row quantizer, one limb
/// or (`two`) two: every vector kernel's activations bitwise the portable ones.
fn row_quantizers_agree(kernels: &[Kernel], two: bool) {
    for inp in 1..=70 {
        let x = rand_vec(3 * inp, inp as u64 + if two { 100 } else { 0 });
        let nb = inp.div_ceil(QK);
        let want = Activations::quantize_limbs(Kernel::Portable, &x, 3, inp, nb, two);
        for &k in kernels {
            let got = Activations::quantize_limbs(k, &x, 3, inp, nb, two);
            assert_eq!(got.a, want.a, "{} inp {inp}", k.name());
            assert_eq!(bits(&got.s), bits(&want.s), "{} inp {inp}", k.name());
            assert_eq!(bits(&got.sa), bits(&want.sa), "{} inp {inp}", k.name());
            assert_eq!(got.sum, want.sum, "{} inp {inp}", k.name());
        }
    }
}

/// Each vector path's two-limb block quantizer gives bitwise the scalar definition: the
/// first limb by `quantize_act_block`, the residual x − s·a (product, then difference)
/// by `quantize_residual`; and whole rows of every length agree across the paths.
#[test]
fn fine_quantizers_agree() {
    let kernels = vector_kernels("fine_quantizers_agree");
    let mut x = edge_activation_blocks();
    // Many ordinary blocks too: a residual rounded differently (an FMA, say) shows only
    // where it falls near a rounding boundary.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    x.extend((0..32 * 4000).map(|i| {
        let scale = (((i / 32) % 40) as f32 - 20.0).exp();
        rng.random_range(-1.0f32..1.0) * scale
    }));
    for xb in x.chunks_exact(QK) {
        let (mut p, mut p2) = ([0i8; QK], [0i8; QK]);
        let (s, total) = quantize_act_block(xb, &mut p);
        let r: Vec<f32> = xb.iter().zip(&p).map(|(&v, &a)| v - s * a as f32).collect();
        let (s2, total2) = quantize_residual(&r, s, &mut p2);
        let want = [(s.to_bits(), total), (s2.to_bits(), total2)];
        for &k in kernels.iter().chain([&Kernel::Portable]) {
            let (mut v, mut v2) = ([0i8; QK], [0i8; QK]);
            // SAFETY: `kernels` are the ones this CPU supports, and portable runs anywhere.
            let got = unsafe { k.quantize_fine_block(xb, &mut v, &mut v2) };
            assert_eq!(
                (got.map(|(s, t)| (s.to_bits(), t)), v, v2),
                (want, p, p2),
                "{} on {xb:?}",
                k.name()
            );
        }
    }
    row_quantizers_agree(&kernels, true);
}

#[test]
fn kernel_choice_from_the_environment() {
    let all = Kernel::supported_list();
    let best = all[0];
    assert_eq!(Kernel::choose(None, false, &all), (best, None));
    assert_eq!(Kernel::choose(Some("auto"), false, &all), (best, None));
    assert_eq!(Kernel::choose(None, true, &all).0, Kernel::Portable);
    assert_eq!(
        Kernel::choose(Some(" Portable "), false, &all),
        (Kernel::Portable, None)
    );
    for k in &all {
        assert_eq!(Kernel::choose(Some(k.name()), true, &all), (*k, None));
    }
    // Unknown names and paths the CPU lacks: the best supported path, with a warning.
    let (k, w) = Kernel::choose(Some("neon9"), false, &all);
    assert_eq!(k, best);
    assert!(w.unwrap().contains("unknown int8 kernel"));
    let portable_only = [Kernel::Portable];
    for name in ["avx2", "avx512vnni"] {
        let (k, w) = Kernel::choose(Some(name), false, &portable_only);
        assert_eq!(k, Kernel::Portable);
        let w = w.unwrap();
        assert!(
            w.contains("does not support") && w.contains("using portable"),
            "{w}"
        );
    }
}

#[test]
fn op_keeps_leading_dims() {
    let (out, inp) = (24, 64);
    let w = q4_weights(out, inp, 5);
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    let x = Tensor::from_vec(
        rand_vec(2 * 3 * inp, 6),
        (2, 3, inp),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let y = qlinear(&x, &q).unwrap();
    assert_eq!(y.dims(), &[2, 3, out]);
    let flat = q.matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 6);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);
    assert!(qlinear(&x.narrow(2, 0, 32).unwrap(), &q).is_err());
}

/// Timing per kernel path (not a test; no assertions on time):
/// `cargo test --release -p lowrank-model --lib quant::tests::timing -- --ignored --nocapture`
#[test]
#[ignore]
fn timing() {
    let shapes = [(1536, 576), (576, 1536), (49152, 576)];
    let threads = rayon::current_num_threads();
    for (kind, levels) in [("q4", 16u32), ("q8", 256)] {
        for &(out, inp) in &shapes {
            let w = grid_weights(out, inp, levels, 1);
            let q = QMatrix::from_f32(&w, out, inp).unwrap();
            for rows in [1usize, 32] {
                let x = rand_vec(rows * inp, 2);
                let mut line = format!(
                    "{kind} qmax {:3} {out:5}×{inp:4} rows {rows:2} ({threads} threads):",
                    q.qmax
                );
                #[allow(unused_mut)]
                let mut variants: Vec<(String, Kernel, QMatrix)> = Kernel::supported_list()
                    .into_iter()
                    .map(|k| (k.name().to_string(), k, q.clone()))
                    .collect();
                #[cfg(target_arch = "x86_64")]
                if Kernel::Avx2.supported() && q.qmax <= 128 {
                    variants.push(("avx2-sign".into(), Kernel::Avx2, with_qmax(&q, 255)));
                }
                for (name, k, m) in &variants {
                    let _ = m.matmul_with(*k, &x, rows);
                    let budget = std::time::Duration::from_millis(400);
                    let start = std::time::Instant::now();
                    let mut n = 0u32;
                    let mut best = f64::INFINITY;
                    while start.elapsed() < budget || n < 3 {
                        let t = std::time::Instant::now();
                        std::hint::black_box(m.matmul_with(*k, &x, rows));
                        best = best.min(t.elapsed().as_secs_f64());
                        n += 1;
                    }
                    let gops = 2.0 * (rows * out * inp) as f64 / best / 1e9;
                    line += &format!("  {name} {:8.1} µs {gops:6.1} GOP/s", best * 1e6);
                }
                eprintln!("{line}");
            }
        }
    }
}

/// Nibble storage round-trips to the byte storage exactly and halves the q bytes.
#[test]
fn nibble_storage_round_trips() {
    let (out, inp) = (37, 70);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| 0.25 * ((i * 7 + i / 13) % 16) as f32 - 1.0)
        .collect();
    let q = QMatrix::from_f32(&w, out, inp).unwrap();
    assert!(q.qmax <= 15 && q.rounded_blocks() == 0);
    let bytes = q.clone().with_nibbles(false);
    let nib = bytes.clone().with_nibbles(true);
    assert_eq!(nib.q.len() * 2, bytes.q.len());
    assert_eq!(nib.clone().with_nibbles(false).q, bytes.q);
    assert_eq!(bits(&nib.dequantize()), bits(&bytes.dequantize()));
    assert_eq!(bits(&bytes.dequantize()), bits(&w));
}

/// The tile-by-tile dequantization equals the row-by-row one (ragged shapes, both layouts).
#[test]
fn dequantize_matches_row_by_row() {
    for (out, inp) in [(37, 70), (16, 32), (5, 100)] {
        let q = QMatrix::from_f32(&q4_weights(out, inp, 7), out, inp).unwrap();
        for m in [q.clone().with_nibbles(true), q.with_nibbles(false)] {
            let all = m.dequantize();
            let mut row = vec![0f32; inp];
            for o in 0..out {
                m.row_into(o, &mut row);
                assert_eq!(
                    bits(&row),
                    bits(&all[o * inp..(o + 1) * inp]),
                    "{out}×{inp} row {o}"
                );
            }
        }
    }
}

/// The tile decoders (AVX2 on the SIMD paths, the scalar body FMA-compiled where the CPU has
/// FMA on the portable one) give bitwise what `row_into` (the reference, one weight at a
/// time) gives, for both storages, ragged tiles and blocks, and spans that start inside the
/// row and end inside a group of four.
#[test]
fn tile_decoding_is_bitwise_row_into() {
    let (out, inp) = (37, 100);
    for w in [q4_weights(out, inp, 3), rand_vec(out * inp, 4)] {
        let q = QMatrix::from_f32(&w, out, inp).unwrap();
        let mut storages = vec![q.clone().with_nibbles(false)];
        if q.qmax <= 15 {
            storages.push(q.clone().with_nibbles(true));
        }
        for q in storages {
            let mut want = vec![0f32; out * inp];
            for (o, row) in want.chunks_mut(inp).enumerate() {
                q.row_into(o, row);
            }
            assert_eq!(bits(&q.dequantize()), bits(&want), "nibbles {}", q.nibbles);
            // A span from block 1 to inside the last block, and every column (three whole
            // blocks of the full tiles, then a partial one).
            for (i0, ni) in [(QK, inp - QK - 5), (0, inp)] {
                for t in 0..out.div_ceil(TILE) {
                    let n = TILE.min(out - t * TILE);
                    for k in Kernel::supported_list() {
                        let mut got = vec![0f32; n * ni];
                        q.tile_span_with(k, t, i0, ni, &mut got);
                        for (lane, row) in got.chunks(ni).enumerate() {
                            let o = t * TILE + lane;
                            assert_eq!(
                                bits(row),
                                bits(&want[o * inp + i0..o * inp + i0 + ni]),
                                "{} decoder, nibbles {}, row {o}",
                                k.name(),
                                q.nibbles
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The two-limb product follows its definition to the bit on every kernel path, for ragged
/// shapes, several row units and calls, and both weight storages: limb 1 is x's one-limb
/// blocks (x ≈ s·a₁), limb 2 the residual x − s·a₁ rounded at s/256 (nearest even, clamped
/// to ±127), and per block and output acc = fma(D, d·s/256, acc), acc = fma(m, s·Σa₁ +
/// (s/256)·Σa₂, acc) with D = 256·Σq·a₁ + Σq·a₂ summed exactly. It is also ~2⁸ times closer to
/// the exact product than one limb.
#[test]
fn fine_product_follows_its_definition() {
    for (out, inp, rows, levels) in [(37, 70, 45, 16), (48, 96, 3, 256), (5, 33, 1, 16)] {
        let wf = grid_weights(out, inp, levels, 41);
        let q = QMatrix::from_f32(&wf, out, inp).unwrap();
        assert_eq!(q.nibbles, levels == 16 && nibble_packing());
        let (nb, kp) = (q.nb, q.nb * QK);
        // Weight level (as the kernels multiply it) of output o, input i.
        let level = |o: usize, i: usize| -> i64 {
            let tb = (o / TILE) * nb + i / QK;
            let mut tile = [0u8; TB];
            if q.nibbles {
                from_nibbles(&q.q[tb * TB4..(tb + 1) * TB4], &mut tile);
            } else {
                tile.copy_from_slice(&q.q[tb * TB..(tb + 1) * TB]);
            }
            let j = i % QK;
            tile[(j / 4) * 4 * TILE + (o % TILE) * 4 + j % 4] as i64
        };
        let x = rand_vec(rows * inp, 42);
        let one = Activations::quantize(Kernel::Portable, &x, rows, inp, nb);
        let mut want = vec![0f32; rows * out];
        for r in 0..rows {
            for b in 0..nb {
                let s1 = one.s[r * nb + b];
                let inv = if s1 > 0.0 {
                    ((1.0 / s1) * 256.0).min(f32::MAX)
                } else {
                    0.0
                };
                let a1: Vec<i64> = (0..QK).map(|j| one.a[r * kp + b * QK + j] as i64).collect();
                let a2: Vec<i64> = (0..QK)
                    .map(|j| {
                        let i = b * QK + j;
                        if i >= inp {
                            return 0;
                        }
                        let res = x[r * inp + i] - s1 * a1[j] as f32;
                        (res * inv).clamp(-127.0, 127.0).round_ties_even() as i64
                    })
                    .collect();
                let s2 = s1 * (1.0 / 256.0);
                let sum = |a: &[i64]| a.iter().sum::<i64>() as f32;
                let sa = s1 * sum(&a1) + s2 * sum(&a2);
                for o in 0..out {
                    let (mut d1, mut d2) = (0i64, 0i64);
                    for j in 0..QK.min(inp - b * QK) {
                        let l = level(o, b * QK + j);
                        d1 += l * a1[j];
                        d2 += l * a2[j];
                    }
                    let dd = 256 * d1 + d2;
                    assert!(dd.abs() < 1 << 31);
                    let tb = (o / TILE) * nb + b;
                    let (d, m) = (q.d[tb * TILE + o % TILE], q.m[tb * TILE + o % TILE]);
                    let acc = &mut want[r * out + o];
                    *acc = (dd as i32 as f32).mul_add(d * s2, *acc);
                    *acc = m.mul_add(sa, *acc);
                }
            }
        }
        let exact = reference(&x, &q.dequantize(), rows, out, inp);
        let err = |y: &[f32]| -> f64 {
            y.iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
        };
        let one_limb_err = err(&q.matmul_with(Kernel::Portable, &x, rows));
        // One buffer for every path and both orders of the work units, its last contents
        // replaced each time.
        let mut got = vec![7.0f32; 3];
        for (k, tile_major) in Kernel::supported_list()
            .into_iter()
            .flat_map(|k| [(k, false), (k, true)])
        {
            q.matmul_fine_ordered(k, &x, rows, &mut got, tile_major);
            assert_eq!(
                bits(&got),
                bits(&want),
                "{} {out}x{inp}, {rows} rows: two limbs differ from their definition",
                k.name()
            );
            let e = err(&got);
            assert!(
                e > 0.0 && e * 50.0 < one_limb_err,
                "{} {out}x{inp}: two limbs off by {e}, one limb by {one_limb_err}",
                k.name()
            );
        }
    }
}

/// The second limb's rounding at s/256: ties to even, a residual of ±s/2 (±128 steps)
/// clamped to ±127, a NaN to 0 (its bits are no level, and summing them overflowed), a short
/// tail block zero-padded, and a zero scale (an all-zero block) all zeros.
#[test]
fn residual_limb_rounds_clamps_and_zeroes() {
    let s = 2.0f32; // a step of 1/128
    let r = [0.5 / 128.0, 1.5 / 128.0, -1.0, 1.0, f32::NAN, 3.0 / 128.0];
    let mut ab = [7i8; QK];
    let (s2, total) = quantize_residual(&r, s, &mut ab);
    assert_eq!(s2, 1.0 / 128.0);
    assert_eq!(ab[..6], [0, 2, -127, 127, 0, 3]);
    assert!(ab[6..].iter().all(|&a| a == 0));
    assert_eq!(total, 5);
    let (s0, t0) = quantize_residual(&[1.0; 5], 0.0, &mut ab);
    assert_eq!((s0, t0), (0.0, 0));
    assert!(ab.iter().all(|&a| a == 0));
}

/// A bf16 matrix (a checkpoint's head or embedding) packed a chunk of rows at a time is
/// bitwise the packing of its whole f32 conversion: q, scales, offsets and storage, for a
/// ragged last chunk, with nibbles (a 4-bit grid) and with bytes (rounded blocks).
#[test]
fn chunked_packing_of_bf16_equals_the_whole() {
    for (levels, seed) in [(16, 51), (0, 52)] {
        let (out, inp) = (2 * 2048 + 40, 64);
        let w = match levels {
            0 => rand_vec(out * inp, seed),
            l => grid_weights(out, inp, l, seed),
        };
        let t = candle_core::Tensor::from_vec(w, (out, inp), &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::BF16)
            .unwrap();
        let got = QMatrix::from_tensor(&t).unwrap();
        let f = t
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = QMatrix::from_f32(&f, out, inp).unwrap();
        assert_eq!(
            (got.out, got.tiles, got.nb),
            (want.out, want.tiles, want.nb)
        );
        assert_eq!(got.nibbles, want.nibbles, "levels {levels}");
        assert_eq!(
            (got.qmax, got.rounded_blocks),
            (want.qmax, want.rounded_blocks)
        );
        assert!(got.q == want.q, "levels {levels}: q differ");
        assert_eq!(bits(&got.d), bits(&want.d), "levels {levels}: scales");
        assert_eq!(bits(&got.m), bits(&want.m), "levels {levels}: offsets");
    }
}

/// Four-bit packing (int4 compute): blocks on a grid of ≤ 16 levels stay exact; others are
/// rounded to 16 evenly spaced levels from the block's minimum to its maximum (error ≤ half a
/// step, where 8 bits would be 17× finer), q stored as nibbles; a Q8_0 GGUF block packs as its
/// dequantized values do, and a Q4_1 block as it does for 8 bits.
#[test]
fn four_bit_packing_rounds_to_sixteen_levels() {
    let (out, inp) = (37, 100); // ragged tiles and blocks
    let g = q4_weights(out, inp, 1);
    let q = QMatrix::from_f32_bits(&g, out, inp, Bits::Four).unwrap();
    assert_eq!(q.rounded_blocks(), 0);
    for (a, b) in q.dequantize().iter().zip(&g) {
        assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
    }
    // A 32-level grid (Q5_1-like) is kept by 8 bits and rounded by 4.
    let g8 = grid_weights(out, inp, 32, 2);
    assert_eq!(
        QMatrix::from_f32(&g8, out, inp).unwrap().rounded_blocks(),
        0
    );
    let q = QMatrix::from_f32_bits(&g8, out, inp, Bits::Four).unwrap();
    assert_eq!(q.rounded_blocks(), q.blocks());
    let f = rand_vec(out * inp, 3);
    let q = QMatrix::from_f32_bits(&f, out, inp, Bits::Four).unwrap();
    assert_eq!(q.rounded_blocks(), q.blocks());
    assert_eq!(q.qmax, 15);
    assert_eq!(q.nibble_packed(), nibble_packing());
    let deq = q.dequantize();
    let mut worst = 0f32;
    for o in 0..out {
        for b in 0..inp.div_ceil(QK) {
            let r = o * inp + b * QK..o * inp + ((b + 1) * QK).min(inp);
            let (lo, hi) = f[r.clone()]
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let half_step = (hi - lo) / 30.0;
            let mut levels: Vec<u32> = deq[r.clone()].iter().map(|v| v.to_bits()).collect();
            levels.sort_unstable();
            levels.dedup();
            assert!(
                levels.len() <= 16,
                "row {o} block {b}: {} levels",
                levels.len()
            );
            for (a, w) in deq[r.clone()].iter().zip(&f[r]) {
                assert!((a - w).abs() <= half_step * (1.0 + 1e-4), "{a} vs {w}");
                worst = worst.max((a - w).abs() / half_step);
            }
        }
    }
    assert!(
        worst > 0.5,
        "no value was rounded by more than a quarter step ({worst})"
    );

    // GGUF blocks: Q8_0 under 4 bits packs as its values; Q4_1 is unchanged.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let (rows, cols) = (20, 64);
    let blocks = rows * cols / QK;
    let mut q8raw = Vec::new();
    let mut q41raw = Vec::new();
    for _ in 0..blocks {
        q8raw.extend(half::f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes());
        q8raw.extend((0..QK).map(|_| rng.random_range(-127i8..=127) as u8));
        q41raw.extend(half::f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes());
        q41raw.extend(half::f16::from_f32(rng.random_range(-0.1..0.0)).to_le_bytes());
        q41raw.extend((0..QK / 2).map(|_| rng.random::<u8>()));
    }
    let fields = |m: &QMatrix| (m.clone().with_nibbles(false).q, bits(&m.d), bits(&m.m));
    let fmt = BlockFormat::Q8_0;
    let vals: Vec<f32> = q8raw
        .chunks_exact(fmt.bytes())
        .flat_map(|blk| (0..QK).map(move |j| fmt.value(blk, j)))
        .collect();
    let from_blocks = QMatrix::from_gguf_blocks(fmt, &[(&q8raw, rows, None)], cols, Bits::Four);
    let from_blocks = from_blocks.unwrap();
    assert_eq!(from_blocks.qmax, 15);
    assert_eq!(from_blocks.rounded_blocks(), blocks);
    let from_vals = QMatrix::from_f32_bits(&vals, rows, cols, Bits::Four).unwrap();
    assert!(fields(&from_blocks) == fields(&from_vals), "Q8_0 → 4 bits");
    let fmt = BlockFormat::Q4_1;
    let four = QMatrix::from_gguf_blocks(fmt, &[(&q41raw, rows, None)], cols, Bits::Four);
    let eight = QMatrix::from_gguf_blocks(fmt, &[(&q41raw, rows, None)], cols, Bits::Eight);
    let (four, eight) = (four.unwrap(), eight.unwrap());
    assert_eq!(four.rounded_blocks(), 0);
    assert!(fields(&four) == fields(&eight), "Q4_1 under 4 bits");
}

/// The product written into column parts gives, part by part, bitwise the whole product's
/// columns, with one-limb activations (inference) and two (training), on every kernel path
/// and in both work orders; widths that would split a kernel call, or do not sum to the
/// output dim, are refused.
#[test]
fn fine_product_parts_are_the_whole_split() {
    // (inp, widths): q/k/v-like, gate/up-like, a ragged last part, odd tile counts.
    let cases: [(usize, &[usize]); 5] = [
        (96, &[64, 32, 32]),
        (64, &[96, 96]),
        (70, &[32, 64, 21]),
        (40, &[32, 16, 48]),
        (32, &[16, 16, 16]),
    ];
    for (inp, widths) in cases {
        let out: usize = widths.iter().sum();
        let w = QMatrix::from_f32(&q4_weights(out, inp, 5), out, inp).unwrap();
        for rows in [1, 3, 70] {
            let x = rand_vec(rows * inp, rows as u64);
            for (k, fine) in Kernel::supported_list()
                .into_iter()
                .flat_map(|k| [(k, false), (k, true)])
            {
                let (whole, act) = match fine {
                    true => {
                        let mut whole = Vec::new();
                        w.matmul_fine_with(k, &x, rows, &mut whole);
                        (whole, Activations::quantize_fine(k, &x, rows, inp, w.nb))
                    }
                    false => (
                        w.matmul_with(k, &x, rows),
                        Activations::quantize(k, &x, rows, inp, w.nb),
                    ),
                };
                // Each part bitwise the whole product's columns.
                let check = |ys: &[Vec<f32>], what: &str| {
                    let mut off = 0;
                    for (y, &wd) in ys.iter().zip(widths) {
                        let want: Vec<f32> = (0..rows)
                            .flat_map(|r| whole[r * out + off..][..wd].to_vec())
                            .collect();
                        assert!(
                            bits(y) == bits(&want),
                            "{} (two limbs: {fine}, {what}) widths {widths:?} rows {rows} part at {off}",
                            k.name()
                        );
                        off += wd;
                    }
                };
                let group = TILE * k.tiles_per_call();
                let fits = widths[..widths.len() - 1].iter().all(|w| w % group == 0);
                for tile_major in [false, true] {
                    if !fits {
                        continue;
                    }
                    let mut ys: Vec<Vec<f32>> = widths.iter().map(|_| Vec::new()).collect();
                    w.products_parts(k, &act, rows, fine, &mut ys, widths, tile_major);
                    check(
                        &ys,
                        if tile_major {
                            "tile-major"
                        } else {
                            "row-major"
                        },
                    );
                }
                if k == Kernel::detect() {
                    let got = match fine {
                        true => w.matmul_fine_parts(&x, rows, widths),
                        false => w.matmul_parts(&x, rows, widths),
                    };
                    assert_eq!(got.is_some(), fits, "{} widths {widths:?}", k.name());
                    if let Some(got) = got {
                        check(&got, "public form");
                    }
                }
            }
        }
        let w2 = QMatrix::from_f32(&q4_weights(out, inp, 6), out, inp).unwrap();
        let x = rand_vec(2 * inp, 1);
        assert!(
            w2.matmul_fine_parts(&x, 2, &widths[1..]).is_none(),
            "widths short of out"
        );
        assert!(w2.matmul_parts(&x, 2, &widths[1..]).is_none());
    }
}
