//! LoRA training without autograd: a forward that records exactly what the backward needs
//! (a [`Tape`]), and the decoder's backward written out by hand.
//!
//! Why not candle's autograd: it keeps every intermediate tensor *and* every intermediate
//! gradient alive until the whole backward ends, materialises a gradient per elementary op,
//! and would compute dW for the frozen base (see `ops.rs`). Written out, a block's backward
//! is one dX matmul per projection, the attention matmuls, a few elementwise passes, and two
//! tiny matmuls per LoRA module; each layer's tape is dropped as soon as its backward ran.
//! The same equations as `model.rs`'s forward, so inference and training agree; checked
//! against autograd, finite differences and PEFT's gradients (train crate, tests/grads.rs).
//!
//! Notation: N tokens of the ragged batch, H hidden, I intermediate, nh/nkv heads, hd head dim,
//! g = nh/nkv query heads per KV head, r the LoRA rank, s its scale.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use lowrank_lora::{Adapter, LoraModule, ModuleKey, Target};

use crate::attention::{train_attention_bwd, ATTN_BLOCK};
use crate::error::{ModelError, Result};
use crate::model::{dropout_mask, AdapterSet, ForwardOpts, Llama, LogitsMode, SeqInput};
use crate::ops;
use crate::ops::gemm::{matmul_frozen, BLayout};

/// Gradients of one LoRA module: dA [r, in], dB [out, r].
pub struct LoraGrads {
    pub a: Tensor,
    pub b: Tensor,
}

/// What one LoRA module's backward needs.
pub(crate) struct LoraTape {
    /// [N, r] = drop(x)·Aᵀ
    u: Tensor,
    /// The inverted-dropout multiplier that was applied to x ([N, in]), if any.
    mask: Option<Tensor>,
}

/// The LoRA tapes of one layer, by target.
pub(crate) type LoraRec = BTreeMap<Target, LoraTape>;

/// What one block's backward needs. The normalised inputs h1/h2 and the MLP product are
/// recomputed (an elementwise pass is cheaper than keeping them), and so are the attention
/// probabilities, block by block from q, k and each row's log-sum-exp: keeping them was
/// 40 % of the tape for a batch of 4 × 128 on SmolLM2-135M (176 MB) and grows with the
/// square of the sequence; the recomputation costs ≈ 4 % more FLOPs. Nothing here is
/// larger than [N, I] — see [`Tape::bytes`].
pub(crate) struct LayerTape {
    /// [N, H] the block's input
    pub(crate) x: Tensor,
    /// [N, 1] 1/rms of x
    pub(crate) rstd1: Tensor,
    /// [nh, N, hd] queries after the rotary embedding
    pub(crate) q: Tensor,
    /// [nkv, N, hd] keys after the rotary embedding
    pub(crate) k: Tensor,
    /// [nkv, N, hd]
    pub(crate) v: Tensor,
    /// [nkv, g, N] each attention row's log-sum-exp (its probabilities are recomputed from
    /// it, q and k block by block: see `attention::train_attention_bwd`)
    pub(crate) lse: Tensor,
    /// [N, nh·hd] the attention output, kept only when o_proj is adapted
    pub(crate) attn: Option<Tensor>,
    /// [N, H] residual stream after attention
    pub(crate) x2: Tensor,
    /// [N, 1]
    pub(crate) rstd2: Tensor,
    /// [N, I] gate and up projections (before the activation)
    pub(crate) gate: Tensor,
    pub(crate) up: Tensor,
    pub(crate) lora: LoraRec,
}

/// What the recorded forward keeps of one block.
pub(crate) enum LayerRec {
    /// Everything its backward needs.
    Full(Box<LayerTape>),
    /// Layer checkpointing: only the block's input [N, H] and the LoRA dropout stream's state
    /// at its start; the backward replays the block's forward from them (bitwise the same
    /// tape) just before it needs it, so one block's tape is alive at a time.
    Input {
        x: Tensor,
        dropout: Option<(f64, Box<rand_chacha::ChaCha8Rng>)>,
    },
}

/// How the decoder records for the hand-written backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Inference or autograd: no tape.
    Off,
    /// Every block's tape.
    Full,
    /// Every block's input only ([`LayerRec::Input`]).
    Checkpoint,
}

impl Record {
    pub(crate) fn on(self) -> bool {
        self != Record::Off
    }
}

impl LayerRec {
    fn tensors(&self) -> Box<dyn Iterator<Item = &Tensor> + '_> {
        match self {
            LayerRec::Full(t) => Box::new(t.tensors()),
            LayerRec::Input { x, .. } => Box::new(std::iter::once(x)),
        }
    }
}

impl LayerTape {
    /// The tape with its [N, H] and [N, I] activations — the block's input x, the residual
    /// x2 and the MLP's gate and up, 81 % of a layer's tape on the default model — held as
    /// `dtype`. Measured on PEFT's gradient fixture under int8 compute, worst LoRA gradient:
    /// 0.3 % off with an all-f32 tape, 1.4 % with bf16 gate/up, 2.3 % with x and x2 as well
    /// (the bound is 5 %); bf16 q, k and v too gave 6.1 % (layer 0's o_proj: rounding q and k
    /// shifts the large logits of a sharp attention row, whose probabilities the backward
    /// recomputes), so the attention's inputs and output and the statistics stay f32.
    pub(crate) fn stored(self, dtype: candle_core::DType) -> Result<LayerTape> {
        if dtype == self.gate.dtype() {
            return Ok(self);
        }
        let cast = |t: Tensor| ops::cast(&t, dtype);
        Ok(LayerTape {
            x: cast(self.x)?,
            x2: cast(self.x2)?,
            gate: cast(self.gate)?,
            up: cast(self.up)?,
            ..self
        })
    }

    /// Every tensor the layer keeps.
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let kept = [&self.x, &self.rstd1, &self.q, &self.k, &self.v, &self.lse];
        let mlp = [&self.x2, &self.rstd2, &self.gate, &self.up];
        let lora = self
            .lora
            .values()
            .flat_map(|t| std::iter::once(&t.u).chain(&t.mask));
        kept.into_iter().chain(mlp).chain(&self.attn).chain(lora)
    }
}

/// A recorded training forward; consumed by [`Tape::backward`].
pub struct Tape {
    /// (offset, length) of each sequence in the flat token matrix
    pub(crate) seqs: Vec<(usize, usize)>,
    /// [N, hd/2] rotary tables at each token's position
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) layers: Vec<LayerRec>,
    /// The batch's adapter groups, kept to replay checkpointed blocks.
    pub(crate) groups: Option<Vec<crate::model::Group>>,
    /// [N, H] input of the final norm, and its 1/rms
    pub(crate) x_last: Tensor,
    pub(crate) rstd_last: Tensor,
}

pub(crate) fn cat_or_single(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, dim)?
    })
}

impl Llama {
    /// Training forward with one adapter (its tensors are read, never tracked by autograd):
    /// returns the final hidden states [N, H] (after the final norm) of the concatenated
    /// sequences, and the tape for [`Tape::backward`]. The forward is the decoder's own
    /// ([`Llama::decode`] in recording mode), so it draws LoRA dropout masks in the same order
    /// as [`Llama::forward`] does. `checkpoint`: keep only each block's input and replay the
    /// block in the backward (one more forward's work for a tape of [N, H] per layer).
    pub fn forward_tape(
        &self,
        seqs: &[&[u32]],
        adapter: &Adapter,
        dropout: Option<(f64, &mut rand_chacha::ChaCha8Rng)>,
        checkpoint: bool,
    ) -> Result<(Tensor, Tape)> {
        // One group over every row, weight 1 (the tape's backward assumes exactly that).
        let set: AdapterSet = Arc::new(vec![(Arc::new(adapter.clone()), 1.0)]);
        let mut inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .map(|s| SeqInput {
                tokens: s,
                cache: None,
                adapters: Some(set.clone()),
                logits: LogitsMode::None,
            })
            .collect();
        let mut opts = ForwardOpts {
            train: false,
            dropout,
        };
        let record = match checkpoint {
            true => Record::Checkpoint,
            false => Record::Full,
        };
        let (hidden, tape) = self.decode(&mut inputs, &mut opts, record)?;
        let tape = tape.ok_or_else(|| ModelError::Invalid("the forward kept no tape".into()))?;
        Ok((hidden, tape))
    }
}

impl Llama {
    /// The tape of block `l` again from its input, as the recorded forward made it (same
    /// functions, same dropout stream): for a checkpointed layer, just before its backward.
    #[allow(clippy::too_many_arguments)]
    fn replay_block(
        &self,
        l: usize,
        x: &Tensor,
        spans: &[(usize, usize)],
        cos: &Tensor,
        sin: &Tensor,
        groups: &Option<Vec<crate::model::Group>>,
        dropout: Option<(f64, Box<rand_chacha::ChaCha8Rng>)>,
    ) -> Result<LayerTape> {
        let groups = groups
            .as_deref()
            .ok_or_else(|| ModelError::Invalid("a checkpointed tape without its groups".into()))?;
        let ctxs: Vec<crate::model::SeqCtx> = spans
            .iter()
            .map(|&(offset, len)| crate::model::SeqCtx {
                offset,
                len,
                mask: None,
            })
            .collect();
        let rope = crate::model::Rope {
            cos: cos.clone(),
            sin: sin.clone(),
        };
        let mut rng = dropout.as_ref().map(|(_, r)| (**r).clone());
        let mut opts = ForwardOpts {
            train: false,
            dropout: dropout.map(|(p, _)| p).zip(rng.as_mut()),
        };
        let (_, tape) = self.block(l, x, &mut [], &ctxs, &rope, groups, &mut opts, true)?;
        tape.ok_or_else(|| ModelError::Invalid("the replayed block kept no tape".into()))
    }
}

/// LoRA forward: (s·(drop(x)·Aᵀ)·Bᵀ, tape).   x: [N, in] → [N, out]
pub(crate) fn lora_fwd(
    x: &Tensor,
    m: &LoraModule,
    dropout: Option<&mut (f64, &mut rand_chacha::ChaCha8Rng)>,
) -> Result<(Tensor, LoraTape)> {
    let (a, b) = (m.a.detach(), m.b.detach());
    // u = drop(x)·Aᵀ: [N, r]
    let (u, mask) = match dropout {
        Some((p, rng)) if *p > 0.0 => {
            let mask = dropout_mask(x, *p, rng)?;
            ((x * &mask)?.matmul(&a.t()?)?, Some(mask))
        }
        _ => (x.matmul(&a.t()?)?, None),
    };
    let y = u.matmul(&b.t()?)?.affine(m.scale, 0.0)?; // [N, out]
    Ok((y, LoraTape { u, mask }))
}

/// LoRA backward for dY [N, out] and the module's input x [N, in]:
/// dB = s·dYᵀ·u, du = s·dY·B, dA = duᵀ·drop(x), and the input gradient du·A (masked).
fn lora_bwd(
    m: &LoraModule,
    tape: &LoraTape,
    x: &Tensor,
    dy: &Tensor,
) -> Result<(LoraGrads, Tensor)> {
    let (a, b) = (m.a.detach(), m.b.detach());
    let db = dy.t()?.matmul(&tape.u)?.affine(m.scale, 0.0)?; // [out, r]
    let du = dy.matmul(&b)?.affine(m.scale, 0.0)?; // [N, r]

    // dA: [r, in], dx: [N, in]
    let (da, dx) = match &tape.mask {
        Some(mask) => (du.t()?.matmul(&(x * mask)?)?, (du.matmul(&a)? * mask)?),
        None => (du.t()?.matmul(x)?, du.matmul(&a)?),
    };
    Ok((LoraGrads { a: da, b: db }, dx))
}

impl Tape {
    /// Bytes the tape holds (every kept tensor, counted once per tensor; views count whole).
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let top = [&self.cos, &self.sin, &self.x_last, &self.rstd_last];
        top.into_iter()
            .chain(self.layers.iter().flat_map(LayerRec::tensors))
            .map(b)
            .sum()
    }

    /// The largest single tensor the tape holds, in elements (a t × t attention matrix of a
    /// sequence would show here).
    pub fn largest_tensor(&self) -> usize {
        let layers = self.layers.iter().flat_map(LayerRec::tensors);
        layers.map(Tensor::elem_count).max().unwrap_or(0)
    }

    /// Backpropagate dL/d(final hidden) [N, H] through the decoder; returns the gradient of
    /// every LoRA module of `adapter` (the base receives none and costs only dX matmuls).
    pub fn backward(
        self,
        model: &Llama,
        adapter: &Adapter,
        dhidden: &Tensor,
    ) -> Result<BTreeMap<ModuleKey, LoraGrads>> {
        let c = &model.cfg;
        let w = &model.weights;
        let (nh, hd) = (c.num_heads, c.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let neg_sin = self.sin.neg()?; // the rotation's transpose is the rotation by −θ
        let mut grads = BTreeMap::new();
        let mut dx = ops::rms_bwd(dhidden, &self.x_last, &self.rstd_last, &w.norm, None)?; // [N, H]
        let mut layers = self.layers;
        while let Some(rec) = layers.pop() {
            let l = layers.len();
            let lw = &w.layers[l];
            let lt = match rec {
                LayerRec::Full(t) => *t,
                LayerRec::Input { x, dropout } => model.replay_block(
                    l,
                    &x,
                    &self.seqs,
                    &self.cos,
                    &self.sin,
                    &self.groups,
                    dropout,
                )?,
            };
            // The backward computes in f32 (one layer's tape widened at a time).
            let lt = lt.stored(candle_core::DType::F32)?;
            // Int8 compute: the frozen part of a pack's input gradient, Σ_t dY_t·W_t, is one
            // f32 matmul of the concatenated dYs with the pack dequantized — exactly the
            // weights the forward multiplied, held in f32 for this one matmul only. Measured
            // against PEFT's gradients of the default model: 0.2 % worst error, where a
            // second (transposed) int8 packing gave 6.7 % at 8 bits and needed a 4-bit
            // residual (≈ 270 MB more) and two-limb dY to reach 0.6 %, at three integer
            // passes instead of this one gemm. With the bf16 product (`quant::DxProduct`),
            // every pack but o_proj's rounds dY and W₀ to bf16. o_proj's dX is the gradient
            // entering the attention backward, whose softmax part subtracts nearly equal terms
            // on sharp rows and so amplifies its rounding into dQ and dK: with it in bf16 too,
            // layer 0's k_proj gradient was 3.8–5.9 % off PEFT's on a 154-token step, with it
            // in f32 every gradient is within 2.5 % (f32 throughout: 2.1 %), for ≈ 9 % of the
            // dX multiply-adds at f32's speed. f32: dY·W₀ per projection.
            let pack = |ts: &[Target]| model.int8().and_then(|q| q.pack(l, ts));
            let base_dx = |ts: &[Target], dys: &[&Tensor]| -> Result<Tensor> {
                let q = pack(ts).expect("checked by the caller");
                let product = match ts {
                    [Target::O] => crate::quant::DxProduct::F32,
                    _ => model.train_dx(),
                };
                // Decoded a chunk at a time into each chunk's dY columns where the f32 gemm
                // is ours; else the whole pack, once, for candle's matmul.
                if let Some(dx) = crate::quant::dequantized_input_grad(dys, q, product)? {
                    return Ok(dx); // [N, in]
                }
                let w =
                    Tensor::from_vec(q.dequantize(), (q.out_dim(), q.in_dim()), dys[0].device())?;
                let dy = match dys {
                    [one] => (*one).clone(),
                    _ => Tensor::cat(dys, 1)?,
                };
                Ok(matmul_frozen(&dy, &w, BLayout::Rows)?) // [N, in]
            };
            // Input gradient of one projection (dY·W₀ unless `int8` adds it per pack, plus the
            // LoRA path), recording dA/dB.
            // Below layer 0 sits the frozen embedding: its q/k/v input gradient is never used.
            let mut proj_bwd = |t: Target,
                                int8: bool,
                                x: &dyn Fn() -> Result<Tensor>,
                                dy: &Tensor|
             -> Result<Option<Tensor>> {
                let needed = l > 0 || !matches!(t, Target::Q | Target::K | Target::V);
                // dY·W₀: [N, in]
                let mut dxp = if needed && !int8 {
                    Some(matmul_frozen(dy, lw.linear(t), BLayout::Rows)?)
                } else {
                    None
                };
                if let Some(tape) = lt.lora.get(&t) {
                    let key = ModuleKey::new(l, t);
                    let m = adapter.get(&key).ok_or_else(|| {
                        ModelError::Invalid(format!("adapter lost module {}", key.peft_prefix()))
                    })?;
                    let (gr, dxl) = lora_bwd(m, tape, &x()?, dy)?;
                    dxp = match dxp {
                        Some(d) => Some(ops::add(&d, &dxl)?),
                        None if needed => Some(dxl),
                        None => None,
                    };
                    grads.insert(key, gr);
                }
                Ok(dxp)
            };
            // The sum of a pack's input gradients: int8 adds the one base matmul to the LoRA
            // paths; f32 sums the projections' full gradients in order.
            let sum =
                |parts: Vec<Option<Tensor>>, base: Option<Tensor>| -> Result<Option<Tensor>> {
                    let mut acc = base;
                    for p in parts.into_iter().flatten() {
                        acc = Some(match acc {
                            None => p,
                            Some(a) => ops::add(&a, &p)?,
                        });
                    }
                    Ok(acc)
                };
            // MLP: y = x2 + down(silu(gate)·up).
            let dy = dx; // [N, H]
            let some =
                |d: Option<Tensor>| d.ok_or_else(|| ModelError::Invalid("missing gradient".into()));
            // dm: [N, I]
            let int8 = pack(&[Target::Down]).is_some();
            let base = match int8 {
                true => Some(base_dx(&[Target::Down], &[&dy])?),
                false => None,
            };
            let part = proj_bwd(Target::Down, int8, &|| ops::silu_mul(&lt.gate, &lt.up), &dy)?;
            let dm = some(sum(vec![part], base)?)?;
            let (dgate, dup) = ops::silu_mul_bwd(&lt.gate, &lt.up, &dm)?; // [N, I] each
            drop(dm);
            let h2 = || ops::rms_apply(&lt.x2, &lt.rstd2, &lw.mlp_norm);
            let gu = [Target::Gate, Target::Up];
            let int8 = pack(&gu).is_some();
            let base = match int8 {
                true => Some(base_dx(&gu, &[&dgate, &dup])?),
                false => None,
            };
            let parts = vec![
                proj_bwd(Target::Gate, int8, &h2, &dgate)?,
                proj_bwd(Target::Up, int8, &h2, &dup)?,
            ];
            let dh2 = some(sum(parts, base)?)?;
            let dx2 = ops::rms_bwd(&dh2, &lt.x2, &lt.rstd2, &lw.mlp_norm, Some(&dy))?; // [N, H]

            // Attention: x2 = x + o(attn).
            let attn = || {
                lt.attn
                    .clone()
                    .ok_or_else(|| ModelError::Invalid("the tape lost o_proj's input".into()))
            };
            let int8 = pack(&[Target::O]).is_some();
            let base = match int8 {
                true => Some(base_dx(&[Target::O], &[&dx2])?),
                false => None,
            };
            let part = proj_bwd(Target::O, int8, &attn, &dx2)?;
            let da = some(sum(vec![part], base)?)?; // [N, nh·hd]
            let da = ops::heads(&da, nh, hd)?; // [nh, N, hd]
            let (dq, dk, dv) = train_attention_bwd(
                &lt.q, &lt.k, &lt.v, &lt.lse, &da, &self.seqs, scale, ATTN_BLOCK,
            )?;
            drop(da);
            let dq = ops::rope(&dq, &self.cos, &neg_sin, false)?; // [nh, N, hd]
            let dk = ops::rope(&dk, &self.cos, &neg_sin, false)?; // [nkv, N, hd]
            let h1 = || ops::rms_apply(&lt.x, &lt.rstd1, &lw.attn_norm);
            let (dq, dk, dv) = (ops::unheads(&dq)?, ops::unheads(&dk)?, ops::unheads(&dv)?);
            let qkv = [Target::Q, Target::K, Target::V];
            let int8 = pack(&qkv).is_some();
            // Layer 0: nothing below needs the input gradient (only the LoRA grads).
            let base = match int8 && l > 0 {
                true => Some(base_dx(&qkv, &[&dq, &dk, &dv])?),
                false => None,
            };
            let parts = vec![
                proj_bwd(Target::Q, int8, &h1, &dq)?,
                proj_bwd(Target::K, int8, &h1, &dk)?,
                proj_bwd(Target::V, int8, &h1, &dv)?,
            ];
            dx = match sum(parts, base)? {
                Some(dh1) if l > 0 => {
                    ops::rms_bwd(&dh1, &lt.x, &lt.rstd1, &lw.attn_norm, Some(&dx2))?
                }
                _ => dx2, // layer 0: nothing below needs it
            };
        }
        Ok(grads)
    }
}
