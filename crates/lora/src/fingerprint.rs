//! A fast fingerprint of base-model weights, stored in adapter provenance so loading an adapter
//! onto a different base can be detected.
//!
//! Hashing all 135M+ parameters would cost about a second; instead each tensor contributes its
//! name, shape and a deterministic sample of its values: the first 4096, the last 4096 and an
//! evenly strided sample of the middle, at most 65,536 values per tensor. Values are hashed as
//! little-endian f32 bits (after conversion), so the same weights held as bf16 or upcast to f32
//! give the same fingerprint, while the dtype itself is not part of it. Inputs are sorted by
//! name, so iteration order does not matter.

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{LoraError, Result};

/// Values taken from each end of a tensor.
pub const EDGE: usize = 4096;
/// Maximum sampled values per tensor.
pub const MAX_SAMPLES: usize = 65_536;

/// The sampled values of one tensor as f32, in a fixed order.
/// Flat indices of the sampled values of a tensor with `n` elements.
fn sample_indices(n: usize) -> Box<dyn Iterator<Item = usize>> {
    if n <= MAX_SAMPLES {
        return Box::new(0..n);
    }
    // Middle: `count` values, one every `stride` (≥ 1 because n > MAX_SAMPLES).
    let count = MAX_SAMPLES - 2 * EDGE;
    let stride = (n - 2 * EDGE) / count;
    Box::new(
        (0..EDGE)
            .chain((0..count).map(move |k| EDGE + k * stride))
            .chain(n - EDGE..n),
    )
}

/// Fast path: read the samples straight out of a contiguous CPU buffer (no copies of the
/// tensor, which would dominate the cost on a 135M-parameter model).
fn sample_cpu(t: &Tensor) -> Option<Vec<f32>> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let n = end - start;
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => sample_indices(n).map(|i| v[start + i]).collect(),
        Storage::Cpu(CpuStorage::BF16(v)) => {
            sample_indices(n).map(|i| v[start + i].to_f32()).collect()
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            sample_indices(n).map(|i| v[start + i].to_f32()).collect()
        }
        _ => return None,
    };
    Some(out)
}

fn sample(t: &Tensor) -> Result<Vec<f32>> {
    if let Some(v) = sample_cpu(t) {
        return Ok(v);
    }
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    if n <= MAX_SAMPLES {
        return Ok(flat.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    // Gather with one index_select: much faster than narrow/reshape/strided copies.
    // Middle: `count` values, one every `stride` (≥ 1 because n > MAX_SAMPLES).
    let idx = sample_indices(n);
    let ids = if n <= u32::MAX as usize {
        Tensor::from_iter(idx.map(|i| i as u32), flat.device())?
    } else {
        Tensor::from_iter(idx.map(|i| i as i64), flat.device())?
    };
    let picked = flat.index_select(&ids, 0)?;
    let picked = if picked.dtype() == DType::F32 {
        picked
    } else {
        picked.to_dtype(DType::F32)?
    };
    Ok(picked.to_vec1::<f32>()?)
}

/// One tensor's contribution to a fingerprint: its name, shape and sampled values. Taking it
/// while a tensor is loaded lets a model whose f32 weights are never all held at once (packed
/// int8 loading) still carry the fingerprint of those weights.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub name: String,
    dims: Vec<usize>,
    vals: Vec<f32>,
}

/// Sample one tensor (see the module docs).
pub fn sample_tensor(name: &str, t: &Tensor) -> Result<Sampled> {
    Ok(Sampled {
        name: name.to_string(),
        dims: t.dims().to_vec(),
        vals: sample(t)?,
    })
}

/// Sample a tensor that is not held as one: `value_at(k)` gives its k-th element in
/// row-major order (e.g. read out of quantized blocks, exactly as they would dequantize).
pub fn sample_with(name: &str, dims: &[usize], value_at: impl Fn(usize) -> f32) -> Sampled {
    let n = dims.iter().product();
    Sampled {
        name: name.to_string(),
        dims: dims.to_vec(),
        vals: sample_indices(n).map(value_at).collect(),
    }
}

/// `"sha256s:<hex>"` over (name, shape, sampled values) of every tensor, sorted by name.
/// Errors on duplicate names (an ambiguous input, most likely a caller bug).
pub fn fingerprint<'a>(tensors: impl Iterator<Item = (&'a str, &'a Tensor)>) -> Result<String> {
    let items = tensors
        .map(|(n, t)| sample_tensor(n, t))
        .collect::<Result<Vec<_>>>()?;
    fingerprint_sampled(items)
}

/// [`fingerprint`] from tensors sampled earlier with [`sample_tensor`].
pub fn fingerprint_sampled(mut items: Vec<Sampled>) -> Result<String> {
    items.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = items.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(LoraError::Invalid(format!(
            "fingerprint: duplicate tensor name `{}`",
            w[0].name
        )));
    }
    let mut h = Sha256::new();
    h.update(b"lowrank-fingerprint-v1\0");
    for s in items {
        // Length-prefixed fields so ("ab", shape) and ("a", "b"…) cannot collide.
        h.update((s.name.len() as u64).to_le_bytes());
        h.update(s.name.as_bytes());
        h.update((s.dims.len() as u64).to_le_bytes());
        for d in &s.dims {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((s.vals.len() as u64).to_le_bytes());
        let mut buf = Vec::with_capacity(4 * s.vals.len());
        for v in &s.vals {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256s:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn order_independent_and_sensitive() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (300, 400), &dev).unwrap(); // 120k > MAX_SAMPLES
        let b = Tensor::randn(0f32, 1., (10, 7), &dev).unwrap();
        let f1 = fingerprint([("a", &a), ("b", &b)].into_iter()).unwrap();
        let f2 = fingerprint([("b", &b), ("a", &a)].into_iter()).unwrap();
        assert_eq!(f1, f2);
        assert!(f1.starts_with("sha256s:") && f1.len() == 8 + 64);
        // Change one sampled middle value of `a`: flat index EDGE + k·stride.
        let n = 300 * 400;
        let stride = (n - 2 * EDGE) / (MAX_SAMPLES - 2 * EDGE);
        let idx = EDGE + 100 * stride;
        let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[idx] += 1.0;
        let a2 = Tensor::from_vec(v.clone(), (300, 400), &dev).unwrap();
        let f3 = fingerprint([("a", &a2), ("b", &b)].into_iter()).unwrap();
        assert_ne!(f1, f3);
        // Last value (tail sample) and names/shapes matter too.
        v[idx] -= 1.0;
        v[n - 1] = 123.0;
        let a3 = Tensor::from_vec(v, (300, 400), &dev).unwrap();
        assert_ne!(
            f1,
            fingerprint([("a", &a3), ("b", &b)].into_iter()).unwrap()
        );
        assert_ne!(f1, fingerprint([("a", &a), ("c", &b)].into_iter()).unwrap());
        let a4 = a.reshape((400, 300)).unwrap();
        assert_ne!(
            f1,
            fingerprint([("a", &a4), ("b", &b)].into_iter()).unwrap()
        );
        assert!(fingerprint([("a", &a), ("a", &b)].into_iter()).is_err());
        // The generic (non-contiguous / device) path samples the same values as the CPU fast path.
        let at = a.t().unwrap();
        assert!(sample_cpu(&at).is_none());
        let fast = sample(&at.contiguous().unwrap()).unwrap();
        assert_eq!(sample(&at).unwrap(), fast);
        assert_eq!(fast.len(), MAX_SAMPLES);
        // dtype-independent for exactly representable values.
        let bb = b.to_dtype(DType::BF16).unwrap();
        let b_up = bb.to_dtype(DType::F32).unwrap();
        assert_eq!(
            fingerprint([("b", &bb)].into_iter()).unwrap(),
            fingerprint([("b", &b_up)].into_iter()).unwrap()
        );
    }

    #[test]
    fn fast_on_135m_params() {
        // 135M f32 values in SmolLM2-like tensor shapes (~540 MB); must hash well under 200 ms
        // in an optimised build. Debug builds are slower, so the bound here is loose and the
        // real figure is printed.
        let dev = Device::Cpu;
        let mut ts = vec![];
        ts.push((
            "embed".to_string(),
            Tensor::zeros((49152, 576), DType::F32, &dev).unwrap(),
        ));
        for l in 0..30 {
            for (n, s) in [
                ("q", (576, 576)),
                ("k", (192, 576)),
                ("v", (192, 576)),
                ("o", (576, 576)),
                ("g", (1536, 576)),
                ("u", (1536, 576)),
                ("d", (576, 1536)),
            ] {
                ts.push((
                    format!("l{l}.{n}"),
                    Tensor::ones(s, DType::F32, &dev).unwrap(),
                ));
            }
        }
        let total: usize = ts.iter().map(|(_, t)| t.elem_count()).sum();
        assert!(total > 130_000_000);
        let t0 = std::time::Instant::now();
        let f = fingerprint(ts.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
        let el = t0.elapsed();
        eprintln!("fingerprint of {total} params: {el:?} ({f})");
        assert!(el.as_millis() < 2000, "{el:?}");
    }
}
