//! Where the time of the gathered LoRA delta goes when every row of a batch has its own
//! adapter: `cargo run --release -p lowrank-model --example lora_memory`.
//!
//! Per step: 32 rows through 30 layers' q (576→576) and v (576→192) deltas of r = 8, the
//! shapes of SmolLM2-135M. `lora_gathered` runs with one adapter shared by every row, and with
//! each row's own adapter out of 100, and out of the same adapters copied as views into one
//! tensor whose buffer is (or is not) advised for transparent huge pages (Linux); then loops
//! that only read the bytes the distinct case reads (one byte per cache line), from separate
//! allocations as the tensors are, and from one anonymous mapping with and without the
//! transparent-huge-page advice. Prints the best of five rounds of each, in ms per step.

use std::time::Instant;

use candle_core::{Device, Tensor};
use lowrank_model::ops::{lora_gathered, LoraRows};
#[cfg(target_os = "linux")]
use memmap2::Advice;
use memmap2::MmapMut;
use rayon::prelude::*;

const ROWS: usize = 32;
const ADAPTERS: usize = 100;
const LAYERS: usize = 30;
const RANK: usize = 8;
const HIDDEN: usize = 576;
/// q and v output sizes.
const OUTS: [usize; 2] = [576, 192];
const STEPS: usize = 10;
const HUGE: usize = 2 << 20;

/// Bytes of one module's A and B.
fn module_bytes(m: usize) -> usize {
    4 * RANK * (HIDDEN + OUTS[m])
}

/// The adapter of `row` at `step`: a new mix of adapters every step, as requests come and go.
fn adapter_of(row: usize, step: usize) -> usize {
    (row + 7 * step) % ADAPTERS
}

fn best_ms(mut f: impl FnMut(usize)) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for s in 0..STEPS {
                f(s);
            }
            t.elapsed().as_secs_f64() * 1e3 / STEPS as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Read one byte per cache line (the loads bring in every line; the sum keeps them).
fn touch(b: &[u8]) -> u32 {
    b.iter().step_by(64).map(|&x| x as u32).sum()
}

type Views = Vec<Vec<Vec<(Tensor, Tensor)>>>;

/// Every adapter's A and B copied into one f32 tensor, from a 2 MB boundary of its buffer
/// (advised for transparent huge pages before the first touch when `advise`), as views.
fn pooled(ads: &Views, advise: bool) -> candle_core::Result<Views> {
    let total: usize = ads
        .iter()
        .flatten()
        .flatten()
        .map(|(a, b)| a.elem_count() + b.elem_count())
        .sum();
    let mut buf: Vec<f32> = Vec::with_capacity(total + HUGE / 4);
    let p = buf.as_ptr() as usize;
    let pad = ((p + HUGE - 1) & !(HUGE - 1)) - p;
    #[cfg(target_os = "linux")]
    if advise {
        let len = (total * 4) & !(HUGE - 1);
        // SAFETY: [p + pad, p + pad + len) lies inside `buf`'s allocation (capacity total +
        // HUGE/4 floats); madvise only changes how the kernel backs those pages.
        let rc = unsafe { libc::madvise((p + pad) as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        assert_eq!(rc, 0, "madvise");
    }
    buf.resize(pad / 4, 0.0);
    let mut offs = Vec::new();
    for (a, b) in ads.iter().flatten().flatten() {
        offs.push(buf.len());
        buf.extend(a.flatten_all()?.to_vec1::<f32>()?);
        buf.extend(b.flatten_all()?.to_vec1::<f32>()?);
    }
    let n = buf.len();
    let pool = Tensor::from_vec(buf, n, &Device::Cpu)?;
    let mut it = offs.into_iter();
    ads.iter()
        .map(|layers| {
            layers
                .iter()
                .map(|mods| {
                    mods.iter()
                        .map(|(a, b)| {
                            let o = it.next().expect("one offset a module");
                            let va = pool.narrow(0, o, a.elem_count())?.reshape(a.dims())?;
                            let vb = pool
                                .narrow(0, o + a.elem_count(), b.elem_count())?
                                .reshape(b.dims())?;
                            Ok((va, vb))
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// This process's anonymous memory in transparent huge pages (Linux; "?" elsewhere).
fn huge_pages() -> String {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .map(|v| format!("{v} in huge pages"))
        .unwrap_or_else(|| "?".into())
}

/// Best ms per step of reading, per layer and module, the bytes `get` gives for each row's adapter.
fn read<'a>(get: &(dyn Fn(usize, usize, usize) -> &'a [u8] + Sync)) -> f64 {
    best_ms(|s| {
        for l in 0..LAYERS {
            for m in 0..2 {
                let t: u32 = (0..ROWS)
                    .into_par_iter()
                    .map(|row| touch(get(adapter_of(row, s), l, m)))
                    .sum();
                std::hint::black_box(t);
            }
        }
    })
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (ROWS, HIDDEN), &d)?;
    // [adapter][layer][module] → (A [r, in], B [out, r])
    let mut ads: Views = Vec::new();
    for _ in 0..ADAPTERS {
        let mut layers = Vec::new();
        for _ in 0..LAYERS {
            let mut mods = Vec::new();
            for out in OUTS {
                let a = (Tensor::randn(0f32, 1.0, (RANK, HIDDEN), &d)? * 0.04)?;
                let b = (Tensor::randn(0f32, 1.0, (out, RANK), &d)? * 0.05)?;
                mods.push((a, b));
            }
            layers.push(mods);
        }
        ads.push(layers);
    }
    let all: Vec<u32> = (0..ROWS as u32).collect();
    let own: Vec<[u32; 1]> = (0..ROWS as u32).map(|r| [r]).collect();
    // Per step and module: `lora_gathered` over the rows, each row under adapter `pick(row, s)`
    // of `ads`; with `shared`, one group of every row under adapter 0.
    let run = |ads: &Views, shared: bool| {
        best_ms(|s| {
            #[allow(clippy::needless_range_loop)] // l indexes every adapter's layers
            for l in 0..LAYERS {
                for (m, &out) in OUTS.iter().enumerate() {
                    let group = |rows, ad: usize| {
                        let (a, b) = &ads[ad][l][m];
                        LoraRows {
                            rows,
                            mods: vec![(a, b, 2.0)],
                        }
                    };
                    let groups: Vec<LoraRows> = match shared {
                        true => vec![group(&all[..], 0)],
                        false => (0..ROWS)
                            .map(|row| group(&own[row][..], adapter_of(row, s)))
                            .collect(),
                    };
                    let y = lora_gathered(&x, out, &groups).unwrap().expect("CPU f32");
                    std::hint::black_box(y);
                }
            }
        })
    };
    println!(
        "lora_gathered, one shared adapter:        {:6.2} ms/step",
        run(&ads, true)
    );
    println!(
        "lora_gathered, each row its own adapter:  {:6.2} ms/step",
        run(&ads, false)
    );
    // The same adapters as views into one tensor whose buffer is advised for huge pages.
    for advise in [false, true] {
        let views = pooled(&ads, advise)?;
        let t = run(&views, false);
        let name = match advise {
            true => "lora_gathered, own adapters, one tensor, huge pages:",
            false => "lora_gathered, own adapters, one tensor, 4 KB pages:",
        };
        println!("{name} {t:6.2} ms/step ({})", huge_pages());
    }

    // The same bytes, read only: separate allocations, one per module (as the tensors are).
    let sep: Vec<Vec<Vec<Vec<u8>>>> = (0..ADAPTERS)
        .map(|a| {
            (0..LAYERS)
                .map(|l| {
                    (0..2)
                        .map(|m| vec![(a + l + m) as u8; module_bytes(m)])
                        .collect()
                })
                .collect()
        })
        .collect();
    let t_sep = read(&|a, l, m| &sep[a][l][m]);
    println!("read only, separate allocations:          {t_sep:6.2} ms/step");
    // One anonymous mapping, adapters back to back from a 2 MB boundary.
    let per_adapter: usize = LAYERS * (module_bytes(0) + module_bytes(1));
    let offset = |l: usize, m: usize| l * (module_bytes(0) + module_bytes(1)) + m * module_bytes(0);
    for advise in [false, true] {
        let len = ADAPTERS * per_adapter;
        let mut map = MmapMut::map_anon(len + HUGE).map_err(candle_core::Error::wrap)?;
        let start = map.as_ptr().align_offset(HUGE);
        #[cfg(target_os = "linux")]
        if advise {
            // Before the first touch, so the faults can take huge pages.
            map.advise_range(Advice::HugePage, start, len)
                .map_err(candle_core::Error::wrap)?;
        }
        for (i, b) in map[start..start + len].iter_mut().enumerate() {
            *b = i as u8;
        }
        let region = &map[start..start + len];
        let t = read(&|a, l, m| {
            let o = a * per_adapter + offset(l, m);
            &region[o..o + module_bytes(m)]
        });
        let name = match advise {
            true => "read only, one region, huge-page advice:",
            false => "read only, one region, 4 KB pages:     ",
        };
        println!("{name}  {t:6.2} ms/step");
    }
    Ok(())
}
