//! Per-sequence KV cache: one (K, V) buffer pair per layer, each [kv_heads, capacity, head_dim].
//!
//! Buffers grow by doubling and new tokens are written in place, so a decode step copies only
//! its own K/V rows instead of the whole history (which `cat` would, every step, every layer).

use candle_core::{Device, Tensor};

use crate::error::Result;

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
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
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
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
    /// K, V ([kv_heads, len + t, hd]).
    pub(crate) fn append(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (nkv, t, hd) = k.dims3()?;
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
            let cap = need.max(old_cap * 2).max(32);
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
