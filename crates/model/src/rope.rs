//! Rotary position embedding (HF's half-split RoPE): the cos/sin rows of the positions a batch
//! uses.
//!
//! The rows are computed in each forward for exactly the positions in the batch instead of
//! being tabulated up to the declared context when the model is built: a model may legally
//! declare a context of 2^32 − 1 tokens, and a [context, head_dim/2] table that long does not
//! fit in memory (building it aborted the process). The declared context stays the *limit*
//! requests are checked against; nothing is sized by it.
//!
//! Row p is computed with the same f32 operations, in the same order, as row p of the old
//! table: `(p as f32) · inv_freq`, then `cos` and `sin` (elementwise, so a row never depends
//! on the other rows computed with it). The values are therefore bitwise what they were. The
//! cost, N·head_dim transcendental functions per forward, is negligible next to the
//! projections.

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

/// The inverse frequencies θ^(−2i/hd), i < hd/2: all that RoPE keeps between forwards.
#[derive(Debug, Clone)]
pub(crate) struct RopeFreqs {
    /// [1, hd/2] f32.
    inv: Tensor,
}

impl RopeFreqs {
    pub(crate) fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, hd / 2))?;
        Ok(RopeFreqs { inv })
    }

    /// cos and sin, [N, hd/2] each, for each of the N `positions` (any order, repeats
    /// allowed).
    pub(crate) fn at(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        // `as f32` is the conversion candle's u32 → f32 cast applies (round to nearest).
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv.device())?;
        let freqs = pos.broadcast_mul(&self.inv)?; // [N, hd/2]
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn cfg(head_dim: usize, rope_theta: f64) -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            vocab_size: 16,
            hidden_size: head_dim * 2,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim,
            rope_theta,
            rms_norm_eps: 1e-5,
            max_position_embeddings: u32::MAX as usize,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// Rows lo..hi of the table the model used to build at load time, by that code's exact
    /// operations (arange u32 → f32 cast → broadcast multiply → cos/sin): the reference.
    fn table_rows(c: &ModelConfig, lo: u32, hi: u32, device: &Device) -> (Tensor, Tensor) {
        let hd = c.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (c.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), device)
            .unwrap()
            .reshape((1, hd / 2))
            .unwrap();
        let n = (hi - lo) as usize;
        let pos = Tensor::arange(lo, hi, device)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((n, 1))
            .unwrap();
        let freqs = pos.broadcast_mul(&inv).unwrap();
        (freqs.cos().unwrap(), freqs.sin().unwrap())
    }

    fn bits(t: &Tensor) -> Vec<Vec<u32>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f32::to_bits).collect())
            .collect()
    }

    /// Every row the per-batch computation produces is bitwise the old table's row, for
    /// positions in any order, repeated, and far out (beyond 2^24, where f32 no longer holds
    /// every integer, up to u32::MAX).
    #[test]
    fn rows_are_bitwise_the_old_tables() {
        let dev = Device::Cpu;
        for (hd, theta) in [(64, 100_000.0), (64, 10_000.0), (128, 500_000.0), (16, 1e6)] {
            let c = cfg(hd, theta);
            let rope = RopeFreqs::new(&c, &dev).unwrap();
            // The first 4096 positions, as one table, against positions in a scrambled batch.
            let (tc, ts) = table_rows(&c, 0, 4096, &dev);
            let (tc, ts) = (bits(&tc), bits(&ts));
            let batch: Vec<u32> = (0..4096u32)
                .map(|i| i.wrapping_mul(2_654_435_761) % 4096)
                .chain([0, 0, 4095, 17, 17])
                .collect();
            let (bc, bs) = rope.at(&batch).unwrap();
            let (bc, bs) = (bits(&bc), bits(&bs));
            for (k, &p) in batch.iter().enumerate() {
                assert_eq!(bc[k], tc[p as usize], "cos, hd {hd}, position {p}");
                assert_eq!(bs[k], ts[p as usize], "sin, hd {hd}, position {p}");
            }
            // Far positions: the old table's rows there, computed as a window.
            for lo in [(1u32 << 24) - 3, 1_000_000_007, u32::MAX - 7] {
                let (tc, ts) = table_rows(&c, lo, lo + 7, &dev);
                let batch: Vec<u32> = (lo..lo + 7).rev().collect();
                let (bc, bs) = rope.at(&batch).unwrap();
                let (tc, ts, bc, bs) = (bits(&tc), bits(&ts), bits(&bc), bits(&bs));
                for (k, &p) in batch.iter().enumerate() {
                    assert_eq!(bc[k], tc[(p - lo) as usize], "cos, hd {hd}, position {p}");
                    assert_eq!(bs[k], ts[(p - lo) as usize], "sin, hd {hd}, position {p}");
                }
            }
        }
    }
}
