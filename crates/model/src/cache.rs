//! Per-sequence KV cache: one (K, V) buffer pair per layer, each [kv_heads, capacity, head_dim].
//!
//! Buffers grow by doubling and new tokens are written in place, so a decode step copies only
//! its own K/V rows instead of the whole history (which `cat` would, every step, every layer).
//!
//! The buffers hold f32 or f16 ([`KvDtype`]); f16 halves the bytes every decode step reads
//! per cached token (llama.cpp's default cache type). Each value is rounded once, when it is
//! appended, so a row's cache — and its output — never depends on the batch.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// f32: the HF reference's precision.
    #[default]
    F32,
    /// f16: K and V rounded to half precision when appended (relative error ≤ 2⁻¹¹).
    F16,
}

impl KvDtype {
    /// `f32` or `f16` (the flag's spelling).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        }
    }

    /// Bytes one cached token takes in a cache of this type: its K and V in every layer (what
    /// a server reserves per token of a request).
    pub fn bytes_per_token(self, num_layers: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        num_layers * 2 * num_kv_heads * head_dim * self.dtype().size_in_bytes()
    }
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    dtype: KvDtype,
    /// Tokens the buffers grow to at most (see [`KvCache::with_limit`]).
    limit: usize,
}

impl Clone for KvCache {
    /// A deep copy: buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| LayerKv {
                    k: l.k.copy().expect("copy k"),
                    v: l.v.copy().expect("copy v"),
                })
            })
            .collect();
        KvCache {
            layers,
            len: self.len,
            dtype: self.dtype,
            limit: self.limit,
        }
    }
}

impl KvCache {
    /// An f32 cache.
    pub fn new(num_layers: usize) -> Self {
        KvCache::with_dtype(num_layers, KvDtype::F32)
    }

    pub fn with_dtype(num_layers: usize, dtype: KvDtype) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            dtype,
            limit: usize::MAX,
        }
    }

    /// A cache that is expected to hold at most `tokens`: its buffers grow by doubling as
    /// usual but never beyond `tokens` (unless a step needs more), so its bytes stay within
    /// what a server reserved for the request (`tokens` × [`KvDtype::bytes_per_token`]);
    /// doubling alone could reach twice that.
    pub fn with_limit(num_layers: usize, dtype: KvDtype, tokens: usize) -> Self {
        KvCache {
            limit: tokens,
            ..KvCache::with_dtype(num_layers, dtype)
        }
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Tokens already cached (= the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (capacity, for the server's memory bound).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Append this step's K, V ([kv_heads, t, hd]) to layer `l`; returns views of the full
    /// K, V ([kv_heads, len + t, hd]) in the cache's dtype.
    pub(crate) fn append(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (nkv, t, hd) = k.dims3()?;
        let dt = self.dtype.dtype();
        let (k, v) = (&k.to_dtype(dt)?, &v.to_dtype(dt)?);
        let cur = self.len;
        let need = cur + t;
        let grow = match &self.layers[l] {
            None => true,
            Some(b) => b.k.dim(1)? < need,
        };
        if grow {
            let old_cap = self.layers[l]
                .as_ref()
                .map(|b| b.k.dim(1))
                .transpose()?
                .unwrap_or(0);
            let cap = need.max(old_cap * 2).max(32).min(self.limit).max(need);
            let dev: &Device = k.device();
            let nk = Tensor::zeros((nkv, cap, hd), k.dtype(), dev)?;
            let nv = Tensor::zeros((nkv, cap, hd), v.dtype(), dev)?;
            if let Some(b) = &self.layers[l] {
                if cur > 0 {
                    nk.slice_set(&b.k.narrow(1, 0, cur)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&b.v.narrow(1, 0, cur)?.contiguous()?, 1, 0)?;
                }
            }
            self.layers[l] = Some(LayerKv { k: nk, v: nv });
        }
        let b = self.layers[l].as_ref().expect("allocated");
        b.k.slice_set(&k.contiguous()?, 1, cur)?;
        b.v.slice_set(&v.contiguous()?, 1, cur)?;
        Ok((b.k.narrow(1, 0, need)?, b.v.narrow(1, 0, need)?))
    }

    /// Called once per forward, after every layer appended `t` tokens.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forget everything after the first `len` tokens (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a cache holds per token is what [`KvDtype::bytes_per_token`] says, for both types
    /// (a server's admission budget counts with it).
    #[test]
    fn bytes_per_token_is_what_the_cache_holds() {
        let d = Device::Cpu;
        let (layers, kv_heads, hd) = (3, 2, 8);
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut c = KvCache::with_dtype(layers, dtype);
            // 32 tokens: exactly the first capacity, so the buffers hold no spare rows.
            for t in [20, 12] {
                let k = Tensor::randn(0f32, 1.0, (kv_heads, t, hd), &d).unwrap();
                for l in 0..layers {
                    c.append(l, &k, &k).unwrap();
                }
                c.advance(t);
            }
            assert_eq!(c.len(), 32);
            assert_eq!(
                c.bytes(),
                32 * dtype.bytes_per_token(layers, kv_heads, hd),
                "{}",
                dtype.name()
            );
        }
        assert_eq!(
            KvDtype::F16.bytes_per_token(30, 3, 64) * 2,
            KvDtype::F32.bytes_per_token(30, 3, 64)
        );
    }

    /// A limited cache never grows past its limit (where doubling would: 32 → 64 for 33
    /// tokens), holds what an unlimited one holds, bit for bit, and still takes a step past
    /// its limit rather than fail.
    #[test]
    fn a_limited_cache_stays_within_its_tokens() {
        let d = Device::Cpu;
        let (kv_heads, hd) = (2, 8);
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let per_token = dtype.bytes_per_token(1, kv_heads, hd);
            let mut free = KvCache::with_dtype(1, dtype);
            let mut lim = KvCache::with_limit(1, dtype, 45);
            for (t, cap) in [(20, 32), (13, 45), (12, 45), (3, 48)] {
                let k = Tensor::randn(0f32, 1.0, (kv_heads, t, hd), &d).unwrap();
                let v = (&k * 3.0).unwrap();
                let (fk, fv) = free.append(0, &k, &v).unwrap();
                let (lk, lv) = lim.append(0, &k, &v).unwrap();
                free.advance(t);
                lim.advance(t);
                let f32s = |x: &Tensor| {
                    let x = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    x.to_vec1::<f32>().unwrap()
                };
                assert_eq!(f32s(&lk), f32s(&fk));
                assert_eq!(f32s(&lv), f32s(&fv));
                assert_eq!(
                    lim.bytes(),
                    cap * per_token,
                    "{} at {}",
                    dtype.name(),
                    lim.len()
                );
            }
            assert_eq!(free.bytes(), 64 * per_token);
        }
    }

    /// An f16 cache holds K and V rounded once to half precision (within 2⁻¹¹ relative, 2⁻²⁵
    /// absolute below f16's normal range), in
    /// half the bytes of an f32 cache, and keeps what earlier steps appended when it grows.
    #[test]
    fn f16_cache_rounds_once_and_halves_the_bytes() {
        let d = Device::Cpu;
        let mut c32 = KvCache::new(1);
        let mut c16 = KvCache::with_dtype(1, KvDtype::F16);
        let mut all = Vec::new();
        // 40 steps of 1..3 tokens: past the first capacity (32), so the buffers grow.
        for step in 0..40 {
            let t = 1 + step % 3;
            let k = Tensor::randn(0f32, 1.0, (3, t, 8), &d).unwrap();
            let v = (k.clone() * -2.0).unwrap();
            let (k32, _) = c32.append(0, &k, &v).unwrap();
            let (k16, v16) = c16.append(0, &k, &v).unwrap();
            c32.advance(t);
            c16.advance(t);
            assert_eq!(k16.dtype(), DType::F16);
            assert_eq!(v16.dtype(), DType::F16);
            all.push(k);
            let want = Tensor::cat(&all, 1).unwrap();
            assert_eq!(
                k32.to_vec3::<f32>().unwrap(),
                want.to_vec3::<f32>().unwrap()
            );
            let got = k16.to_dtype(DType::F32).unwrap();
            // Relative to max(|x|, 2⁻¹⁴): below f16's smallest normal the spacing is fixed
            // (2⁻²⁴), so the bound is absolute there (randn draws such values now and then).
            let err = ((&got - &want).unwrap().abs().unwrap())
                .broadcast_div(&want.abs().unwrap().maximum(2f32.powi(-14)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err <= 1.0 / 2048.0, "step {step}: relative error {err}");
            // Rounding happens once: the cached values are the f16 rounding of the input.
            assert_eq!(
                k16.to_vec3::<half::f16>().unwrap(),
                want.to_dtype(DType::F16)
                    .unwrap()
                    .to_vec3::<half::f16>()
                    .unwrap()
            );
        }
        assert_eq!(c16.dtype(), KvDtype::F16);
        assert_eq!(c16.bytes() * 2, c32.bytes());
    }
}
