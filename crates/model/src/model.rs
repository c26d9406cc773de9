//! The Llama-family decoder, top to bottom: rotary tables → attention → MLP → block → model.
//!
//! One code path serves training, evaluation, merged inference and mixed-adapter serving:
//! the model owns only frozen weights; each forward receives, per sequence, the adapter
//! mixture that applies to it. Sequences are *ragged*: their tokens are concatenated into
//! one [N, hidden] matrix so every projection is one matmul over all sequences, and only
//! attention runs per sequence (with its own KV cache and causal mask). No padding is ever
//! computed, so a sequence's logits do not depend on what else is in the batch.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use lowrank_lora::{Adapter, LoraModule, ModuleKey, Target};
use rand::Rng;

use crate::attention::causal_mask;
use crate::backward::{lora_fwd, LayerRec, LayerTape, LoraRec, Record, Tape};
use crate::cache::{KvCache, KvDtype};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::ops;
use crate::quant::{self, Compute, QMatrix, QuantModel};
use crate::rope::RopeFreqs;
use crate::weights::Weights;

/// A weighted mixture of adapters applied to one sequence (empty: the base model).
pub type AdapterSet = Arc<Vec<(Arc<Adapter>, f64)>>;

/// Which logits a sequence wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    None,
    Last,
    All,
}

/// One sequence of a ragged batch.
pub struct SeqInput<'a> {
    /// New tokens to run (after whatever the cache holds).
    pub tokens: &'a [u32],
    pub cache: Option<&'a mut KvCache>,
    pub adapters: Option<AdapterSet>,
    pub logits: LogitsMode,
}

/// Training switches: differentiable ops and LoRA dropout.
pub struct ForwardOpts<'r> {
    /// Use differentiable (unfused) ops so autograd sees every path.
    pub train: bool,
    /// LoRA dropout probability and the RNG that draws the masks (training only).
    pub dropout: Option<(f64, &'r mut rand_chacha::ChaCha8Rng)>,
}

impl ForwardOpts<'_> {
    pub fn infer() -> Self {
        ForwardOpts {
            train: false,
            dropout: None,
        }
    }
}

/// Rows of the flat token matrix that share one adapter mixture.
pub(crate) struct Group {
    pub(crate) set: AdapterSet,
    /// The rows of the flat token matrix in this group.
    rows: Vec<u32>,
    /// `None` when the group covers every token (no gather/scatter needed).
    index: Option<Tensor>,
    /// Bit `t as usize` set when some adapter of the set adapts target `t` in some layer.
    /// Why: most projections (k, o and the MLP's for a q,v adapter) have no LoRA, and looking
    /// that up per group, projection and layer in each adapter's map cost ~1 % of a 32-stream
    /// decode step with distinct adapters (perf), touching every adapter's map each time.
    targets: u8,
}

// `Group::targets` has a bit per target.
const _: () = assert!(Target::ALL.len() <= 8);

impl Group {
    fn adapts(&self, t: Target) -> bool {
        self.targets & (1 << t as u8) != 0
    }
}

/// Per-sequence tensors reused by every layer.
pub(crate) struct SeqCtx {
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// Causal mask for candle's attention (training only; inference uses ops::attention_rows).
    pub(crate) mask: Option<Tensor>,
}

/// Rotary tables for every token of the batch at its own position: [N, hd/2].
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    pub weights: Weights,
    /// RoPE's frequencies; each forward computes the cos/sin rows of its own positions.
    rope: RopeFreqs,
    device: Device,
    /// Packed weights for int8 compute ([`Compute::Int8`]); `None`: f32.
    int8: Option<Arc<QuantModel>>,
    /// Whether `weights` holds the f32 projections, embedding and head. A model loaded for
    /// int8 compute only ([`Llama::from_packed`]) keeps placeholders there instead, and every
    /// f32 use of them is refused ([`Llama::require_f32`]).
    f32_base: bool,
    /// The base fingerprint, when taken at load time (packed loading; see `adapters.rs`).
    fingerprint: Option<String>,
    /// Element type of the KV caches [`Llama::new_cache`] makes.
    kv_dtype: KvDtype,
    /// How training's forward multiplies the packed weights (int8/int4 compute).
    train_product: quant::TrainProduct,
    /// How training's backward multiplies dX = dY·W₀ through the packed weights.
    train_dx: quant::DxProduct,
    /// How training's forward multiplies the packed LM head (bf16 only with `train_dx`'s).
    train_head: quant::HeadProduct,
}

impl Llama {
    pub fn new(cfg: ModelConfig, weights: Weights, device: &Device) -> Result<Self> {
        let rope = RopeFreqs::new(&cfg, device)?;
        Ok(Llama {
            cfg,
            weights,
            rope,
            device: device.clone(),
            int8: None,
            f32_base: true,
            fingerprint: None,
            kv_dtype: KvDtype::F32,
            train_product: quant::TrainProduct::detect(),
            train_dx: quant::DxProduct::detect(),
            train_head: quant::HeadProduct::detect(),
        })
    }

    /// The element type of the KV caches [`Llama::new_cache`] makes (inference only;
    /// training keeps no cache).
    pub fn set_kv_dtype(&mut self, d: KvDtype) {
        self.kv_dtype = d;
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Bytes one token takes in the caches [`Llama::new_cache`] makes (every layer's K and V).
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        self.kv_dtype
            .bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
    }

    /// How LoRA training's forward multiplies the packed weights under int8/int4 compute
    /// (default: the faster product on this CPU's kernel path, see [`quant::TrainProduct`]).
    pub fn set_train_product(&mut self, p: quant::TrainProduct) {
        self.train_product = p;
    }

    pub fn train_product(&self) -> quant::TrainProduct {
        self.train_product
    }

    /// How LoRA training's backward multiplies the frozen input gradient dY·W₀ through the
    /// packed weights (default: bf16 where the CPU has AVX-512 BF16, see
    /// [`quant::DxProduct`]). A product this CPU cannot run leaves the current one.
    pub fn set_train_dx(&mut self, p: quant::DxProduct) {
        if p.supported() {
            self.train_dx = p;
        }
    }

    pub fn train_dx(&self) -> quant::DxProduct {
        self.train_dx
    }

    /// How LoRA training's forward multiplies the packed LM head under int8/int4 compute
    /// (default: bf16 where the CPU has AVX-512 BF16, see [`quant::HeadProduct`]). Bf16
    /// runs only where the backward's dX does ([`Llama::train_head`]): `--backward-dx f32`
    /// keeps both products off bf16. A product this CPU cannot run leaves the current one.
    pub fn set_train_head(&mut self, p: quant::HeadProduct) {
        if p.supported() {
            self.train_head = p;
        }
    }

    /// The head's forward product training runs: bf16 where both the head's setting and
    /// the dX's are bf16, else the projections' packed product.
    pub fn train_head(&self) -> quant::HeadProduct {
        match (self.train_head, self.train_dx) {
            (quant::HeadProduct::Bf16, quant::DxProduct::Bf16) => quant::HeadProduct::Bf16,
            _ => quant::HeadProduct::Packed,
        }
    }

    /// An empty KV cache for one sequence, of this model's layers and KV dtype.
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_dtype(self.cfg.num_layers, self.kv_dtype)
    }

    /// [`Llama::new_cache`] for a sequence of at most `tokens` (its buffers never grow past
    /// them, see [`KvCache::with_limit`]).
    pub fn new_cache_for(&self, tokens: usize) -> KvCache {
        KvCache::with_limit(self.cfg.num_layers, self.kv_dtype, tokens)
    }

    /// A model for int8 compute only: `weights` holds placeholders for the projections, the
    /// embedding and the head (see `weights::Packer`), `q` their packing, and `fingerprint`
    /// the fingerprint of the f32 weights they came from.
    pub(crate) fn from_packed(
        cfg: ModelConfig,
        weights: Weights,
        q: QuantModel,
        fingerprint: String,
        device: &Device,
    ) -> Result<Self> {
        if !device.is_cpu() {
            return Err(ModelError::Invalid(
                "int8 compute is implemented for the CPU only".into(),
            ));
        }
        let mut m = Llama::new(cfg, weights, device)?;
        m.int8 = Some(Arc::new(q));
        m.f32_base = false;
        m.fingerprint = Some(fingerprint);
        Ok(m)
    }

    /// Choose how the frozen weights are multiplied (inference and LoRA training alike). Int8
    /// packs every projection and the head once (CPU only).
    pub fn set_compute(&mut self, c: Compute) -> Result<()> {
        self.int8 = match c.bits() {
            None => {
                self.require_f32("f32 compute")?;
                None
            }
            Some(_) if !self.device.is_cpu() => {
                return Err(ModelError::Invalid(format!(
                    "{} compute is implemented for the CPU only",
                    c.name()
                )))
            }
            Some(bits) if self.int8.as_ref().is_some_and(|q| q.bits() == bits) => self.int8.take(),
            Some(bits) => {
                self.require_f32(&format!("{} compute", c.name()))?;
                Some(Arc::new(QuantModel::build(&self.weights, bits)?))
            }
        };
        Ok(())
    }

    /// Whether the f32 weights are held (false for a model loaded for int8 compute only).
    pub fn has_f32_weights(&self) -> bool {
        self.f32_base
    }

    /// Refuse `what` on a model that holds no f32 weights.
    pub fn require_f32(&self, what: &str) -> Result<()> {
        if self.f32_base {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!(
                "{what} needs the f32 base weights, but this model was loaded for {} compute \
                 only (packed while loading, to save memory); load it with f32 compute",
                self.compute().name()
            )))
        }
    }

    /// The fingerprint taken at load time, if the weights were packed while loading.
    pub(crate) fn load_fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    pub fn compute(&self) -> Compute {
        match &self.int8 {
            Some(q) => q.bits().compute(),
            None => Compute::F32,
        }
    }

    /// The packed weights when inference runs int8.
    pub fn int8(&self) -> Option<&QuantModel> {
        self.int8.as_deref()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The f32 model of the weights the packing holds (every packed projection, the head and
    /// a packed embedding dequantized; norms and biases as they are): what the integer
    /// kernels multiply, up to the activations' rounding. The reference for low-bit compute
    /// when the packing rounded the base (int4), and a way to measure what rounding did.
    /// `None` with f32 compute.
    pub fn dequantized(&self) -> Result<Option<Llama>> {
        let Some(q) = &self.int8 else {
            return Ok(None);
        };
        let dense = |m: &QMatrix| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                m.dequantize(),
                (m.out_dim(), m.in_dim()),
                &self.device,
            )?)
        };
        let mut w = self.weights.clone();
        for (l, lw) in w.layers.iter_mut().enumerate() {
            for ts in quant::PACKS {
                let packed = q.pack(l, ts).ok_or_else(|| {
                    ModelError::Invalid(format!("dequantize: layer {l} is not packed"))
                })?;
                let all = dense(packed)?;
                let mut row = 0;
                for &t in ts {
                    let n = lw.linear(t).dim(0)?;
                    *lw.linear_mut(t) = all.narrow(0, row, n)?.contiguous()?;
                    row += n;
                }
                if row != packed.out_dim() {
                    return Err(ModelError::Invalid(format!(
                        "dequantize: layer {l}'s {ts:?} have {row} rows, the pack {}",
                        packed.out_dim()
                    )));
                }
            }
        }
        w.lm_head = Some(dense(q.head())?);
        if let Some(e) = q.embed() {
            w.embed = dense(e)?;
        }
        let mut m = Llama::new(self.cfg.clone(), w, &self.device)?;
        m.kv_dtype = self.kv_dtype;
        m.train_product = self.train_product;
        m.train_dx = self.train_dx;
        m.train_head = self.train_head;
        Ok(Some(m))
    }

    /// Shapes of the adaptable projections, for validating adapters against this base.
    pub fn lora_shapes(&self) -> Vec<(Target, usize, usize)> {
        let c = &self.cfg;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        vec![
            (Target::Q, c.q_out(), h),
            (Target::K, c.kv_out(), h),
            (Target::V, c.kv_out(), h),
            (Target::O, h, c.q_out()),
            (Target::Gate, i, h),
            (Target::Up, i, h),
            (Target::Down, h, i),
        ]
    }

    /// A copy with `W ← W + Σ w·s·B·A` folded into private copies of the adapted weights
    /// (the rest stays shared with `self`). Removes all adapter latency.
    pub fn merged(&self, set: &[(Arc<Adapter>, f64)]) -> Result<Llama> {
        self.require_f32("merging adapters into the base")?;
        let mut out = self.clone();
        for (adapter, weight) in set {
            for (key, m) in &adapter.modules {
                let layer = out.weights.layers.get_mut(key.layer).ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "adapter targets layer {} but the model has {}",
                        key.layer, self.cfg.num_layers
                    ))
                })?;
                let w = layer.linear_mut(key.target);
                let delta = m.delta()?.affine(*weight, 0.0)?;
                *w = (&*w + delta)?;
            }
        }
        if let Some(q) = &self.int8 {
            // Repack only the groups holding merged projections; the rest stay shared.
            let mut q = (**q).clone();
            let keys: std::collections::BTreeSet<ModuleKey> = set
                .iter()
                .flat_map(|(a, _)| a.modules.keys().copied())
                .collect();
            for key in keys {
                q.replace(key.layer, &out.weights.layers[key.layer], key.target)?;
            }
            out.int8 = Some(Arc::new(q));
        }
        Ok(out)
    }

    /// Run a ragged batch; returns the logits each sequence asked for
    /// ([1, vocab] for `Last`, [t, vocab] for `All`).
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: &mut ForwardOpts<'_>,
    ) -> Result<Vec<Option<Tensor>>> {
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        on_pool(rows <= STAY_ROWS, || self.forward_here(seqs, opts))
    }

    fn forward_here(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: &mut ForwardOpts<'_>,
    ) -> Result<Vec<Option<Tensor>>> {
        let hidden = self.forward_hidden(seqs, opts)?; // [N, H]

        // Every row any sequence wants goes through the head in one matmul: per-sequence head
        // calls would each stream the whole [vocab, H] matrix (the decode bottleneck).
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for s in seqs.iter() {
            let t = s.tokens.len();
            let (from, n) = match s.logits {
                LogitsMode::None => (off + t, 0),
                LogitsMode::Last => (off + t - 1, 1),
                LogitsMode::All => (off, t),
            };
            spans.push((rows.len(), n));
            rows.extend((from..from + n).map(|r| r as u32));
            off += t;
        }
        if rows.is_empty() {
            return Ok(seqs.iter().map(|_| None).collect());
        }
        let picked = if rows.len() == off {
            hidden
        } else {
            hidden.index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?
        };
        let logits = self.lm_head(&picked)?; // [rows, vocab]
        let single = spans.len() == 1;
        spans
            .into_iter()
            .map(|(start, n)| {
                Ok(match n {
                    0 => None,
                    _ if single => Some(logits.clone()),
                    _ => Some(logits.narrow(0, start, n)?),
                })
            })
            .collect()
    }

    /// [n, H] final hidden states → [n, vocab] logits.
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            if !h.track_op() {
                return quant::qlinear(h, q.head());
            }
        }
        self.require_f32("the f32 LM head")?;
        let w = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        ops::linear(h, w)
    }

    /// The head in training: [`Llama::lm_head`], by the head's training product under
    /// int8 compute (see [`Llama::train_head`]).
    pub fn lm_head_train(&self, h: &Tensor) -> Result<Tensor> {
        match &self.int8 {
            Some(q) if !h.track_op() => {
                if self.train_head() == quant::HeadProduct::Bf16 {
                    let mut y = Vec::new();
                    if quant::bf16_linear_into(h, q.head(), &mut y)? {
                        let shape = (h.dim(0)?, q.head().out_dim());
                        return Ok(Tensor::from_vec(y, shape, h.device())?);
                    }
                }
                quant::qlinear_train(h, q.head(), self.train_product)
            }
            _ => self.lm_head(h),
        }
    }

    /// [`Llama::lm_head_train`]'s logits as a row-major vector [n·vocab] in `out` (its
    /// contents replaced), for the loss to work on in place: no tensor, and no copy out of
    /// one, on the packed products and our f32 gemm; the limbs' product reuses `out`'s
    /// allocation, so the loss's chunks share one buffer.
    pub fn lm_head_train_into(&self, h: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        match &self.int8 {
            Some(q) if !h.track_op() => {
                let bf16 = self.train_head() == quant::HeadProduct::Bf16;
                if bf16 && quant::bf16_linear_into(h, q.head(), out)? {
                    return Ok(());
                }
                quant::qlinear_train_into(h, q.head(), self.train_product, out)
            }
            _ => {
                *out = self.lm_head(h)?.flatten_all()?.to_vec1()?;
                Ok(())
            }
        }
    }

    /// The head's input gradient: dL/dlogits [n, vocab] → dL/dh = dL/dlogits·W [n, H]
    /// (int8: W dequantized a chunk of the vocabulary at a time, see
    /// [`head_input_grad_packed`]).
    pub fn lm_head_input_grad(&self, dlogits: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            return head_input_grad_packed(dlogits, q.head(), self.train_dx);
        }
        self.require_f32("the f32 LM head")?;
        let w = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        Ok(ops::gemm::matmul_frozen(
            dlogits,
            w,
            ops::gemm::BLayout::Rows,
        )?)
    }

    /// [`Llama::lm_head_input_grad`] of dL/dlogits given as n row-major rows of floats (the
    /// loss's reused logits buffer: the packed head reads them in place).
    pub fn lm_head_input_grad_rows(&self, dlogits: &[f32], n: usize) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            let dev = self.device();
            if let Some(dh) =
                quant::dequantized_input_grad_rows(dlogits, n, q.head(), self.train_dx, dev)?
            {
                return Ok(dh);
            }
        }
        let v = self.cfg.vocab_size;
        if dlogits.len() != n * v {
            return Err(ModelError::Invalid(format!(
                "head gradient: {} floats for {n} rows of {v} logits",
                dlogits.len()
            )));
        }
        self.lm_head_input_grad(&Tensor::from_slice(dlogits, (n, v), self.device())?)
    }

    /// The decoder up to (and including) the final norm: [N, H] over all sequences' new tokens.
    /// Appends to each sequence's KV cache.
    pub fn forward_hidden(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: &mut ForwardOpts<'_>,
    ) -> Result<Tensor> {
        Ok(self.decode(seqs, opts, Record::Off)?.0)
    }

    /// The decoder, written once for every use: inference (fused kernels, int8 where packed,
    /// KV caches), autograd (`opts.train`: differentiable ops only) and LoRA training
    /// (`record`: fused ops, and a [`Tape`] of what the hand-written backward needs).
    /// Returns the final hidden states [N, H] after the final norm.
    pub(crate) fn decode(
        &self,
        seqs: &mut [SeqInput<'_>],
        opts: &mut ForwardOpts<'_>,
        record: Record,
    ) -> Result<(Tensor, Option<Tape>)> {
        let on = record.on();
        if seqs.is_empty() {
            return Err(ModelError::Invalid("empty batch".into()));
        }
        let mut ids = Vec::new();
        let mut positions: Vec<u32> = Vec::new();
        let mut ctxs = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Invalid(
                    "a sequence in the batch has no tokens".into(),
                ));
            }
            if on && s.cache.is_some() {
                return Err(ModelError::Invalid(
                    "a recorded (training) forward runs without KV caches".into(),
                ));
            }
            let start = s.cache.as_ref().map(|c| c.len()).unwrap_or(0);
            let t = s.tokens.len();
            if start + t > self.cfg.max_position_embeddings {
                return Err(ModelError::ContextOverflow {
                    len: start + t,
                    max: self.cfg.max_position_embeddings,
                });
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
            ctxs.push(SeqCtx {
                offset: ids.len(),
                len: t,
                // Inference builds masks only if it falls back to candle's attention.
                mask: match opts.train {
                    true => causal_mask(t, start, &self.device)?,
                    false => None,
                },
            });
            positions.extend(start as u32..(start + t) as u32);
            ids.extend_from_slice(s.tokens);
        }
        let (cos, sin) = self.rope.at(&positions)?;
        let rope = Rope { cos, sin };
        let groups = self.groups(seqs, &ctxs)?;
        // [N, H]
        let mut x = match self.int8.as_ref().and_then(|q| q.embed()) {
            Some(e) => {
                Tensor::from_vec(e.gather_rows(&ids)?, (ids.len(), e.in_dim()), &self.device)?
            }
            None => {
                self.require_f32("the f32 embedding")?;
                let ids = Tensor::new(ids.as_slice(), &self.device)?;
                self.weights.embed.index_select(&ids, 0)?
            }
        };
        let mut layers = record.on().then(|| Vec::with_capacity(self.cfg.num_layers));
        for l in 0..self.cfg.num_layers {
            // Checkpointing keeps the block's input (and the dropout stream's state there) and
            // drops its tape; the backward replays the block from them, bitwise the same.
            let replay = (record == Record::Checkpoint).then(|| LayerRec::Input {
                x: x.clone(),
                dropout: opts
                    .dropout
                    .as_ref()
                    .map(|(p, rng)| (*p, Box::new((**rng).clone()))),
            });
            let (y, tape) = self.block(l, &x, seqs, &ctxs, &rope, &groups, opts, record.on())?;
            x = y;
            if let (Some(layers), Some(tape)) = (layers.as_mut(), tape) {
                layers.push(replay.unwrap_or_else(|| LayerRec::Full(Box::new(tape))));
            }
        }
        for s in seqs.iter_mut() {
            if let Some(c) = s.cache.as_deref_mut() {
                c.advance(s.tokens.len());
            }
        }
        let (hidden, rstd) = self.norm(&x, &self.weights.norm, opts, on)?; // [N, H]
        let tape = match (layers, rstd) {
            (Some(layers), Some(rstd_last)) => Some(Tape {
                seqs: ctxs.iter().map(|c| (c.offset, c.len)).collect(),
                groups: (record == Record::Checkpoint).then_some(groups),
                cos: rope.cos,
                sin: rope.sin,
                layers,
                x_last: x,
                rstd_last,
            }),
            _ => None,
        };
        Ok((hidden, tape))
    }

    /// Sequences sharing an adapter mixture form a group (compared by identity and weight).
    fn groups(&self, seqs: &[SeqInput<'_>], ctxs: &[SeqCtx]) -> Result<Vec<Group>> {
        type Key = Vec<(usize, u64)>;
        let key = |set: &[(Arc<Adapter>, f64)]| -> Key {
            set.iter()
                .map(|(a, w)| (Arc::as_ptr(a) as usize, w.to_bits()))
                .collect()
        };
        let mut found: Vec<(Key, AdapterSet, Vec<u32>)> = Vec::new();
        let total: usize = ctxs.iter().map(|c| c.len).sum();
        for (s, c) in seqs.iter().zip(ctxs) {
            let Some(set) = s.adapters.as_ref() else {
                continue;
            };
            if set.is_empty() {
                continue;
            }
            let k = key(set);
            let rows = (c.offset..c.offset + c.len).map(|r| r as u32);
            match found.iter_mut().find(|(fk, _, _)| *fk == k) {
                Some((_, _, idx)) => idx.extend(rows),
                None => found.push((k, set.clone(), rows.collect())),
            }
        }
        found
            .into_iter()
            .map(|(_, set, idx)| {
                let index = if idx.len() == total {
                    None
                } else {
                    Some(Tensor::new(idx.as_slice(), &self.device)?)
                };
                let targets = set
                    .iter()
                    .flat_map(|(a, _)| a.modules.keys())
                    .fold(0u8, |m, k| m | (1 << k.target as u8));
                Ok(Group {
                    set,
                    rows: idx,
                    index,
                    targets,
                })
            })
            .collect()
    }

    /// y = x·W₀ᵀ (+ bias) + Σ_groups Σ_adapters w·s·(drop(x)·Aᵀ)·Bᵀ.   x: [N, in] → [N, out]
    /// `rec`: LoRA training records each module's [`LoraTape`] by target.
    fn proj(
        &self,
        x: &Tensor,
        key: ModuleKey,
        bias: Option<&Tensor>,
        groups: &[Group],
        opts: &mut ForwardOpts<'_>,
        rec: Option<&mut LoraRec>,
    ) -> Result<Tensor> {
        let w = self.weights.layers[key.layer].linear(key.target);
        // [N, out]
        let y = match self.packed(key.layer, &[key.target], x, opts) {
            // Training: the faster of two-limb activations and the dequantized pack on this
            // CPU (see quant::TrainProduct).
            Some(q) if rec.is_some() => quant::qlinear_train(x, q, self.train_product)?,
            Some(q) => quant::qlinear(x, q)?,
            None => {
                self.require_f32("an f32 projection")?;
                ops::linear(x, w)?
            }
        };
        self.proj_finish(x, y, key, bias, groups, opts, rec)
    }

    /// The element type of the training tape's large activations ([`LayerTape::stored`]):
    /// bf16 under int8 compute (the low-bit mode, which trades a little gradient accuracy
    /// for memory: the tape of 4 × 128 tokens on the default model is 318 MB in f32, 259 MB
    /// of it x, x2, gate and up), f32 otherwise (which must match the f32 reference to ~1e-6).
    pub(crate) fn tape_dtype(&self) -> candle_core::DType {
        match self.int8 {
            Some(_) => candle_core::DType::BF16,
            None => candle_core::DType::F32,
        }
    }

    /// The int8 packed matrix for `targets` of `layer`, when the model computes int8
    /// (inference and the recorded LoRA forward; autograd always runs f32).
    fn packed(
        &self,
        layer: usize,
        targets: &[Target],
        x: &Tensor,
        opts: &ForwardOpts<'_>,
    ) -> Option<&quant::QMatrix> {
        match &self.int8 {
            Some(q) if !opts.train && !x.track_op() => q.pack(layer, targets),
            _ => None,
        }
    }

    /// Several projections of the same input ([`quant::PACKS`] order: q, k, v or gate, up).
    /// With int8 compute they are one matmul whose output columns are split per target.
    fn projs(
        &self,
        x: &Tensor,
        layer: usize,
        targets: &[(Target, Option<&Tensor>)],
        groups: &[Group],
        opts: &mut ForwardOpts<'_>,
        mut rec: Option<&mut LoraRec>,
    ) -> Result<Vec<Tensor>> {
        let ts: Vec<Target> = targets.iter().map(|(t, _)| *t).collect();
        let Some(q) = self.packed(layer, &ts, x, opts) else {
            return targets
                .iter()
                .map(|&(t, b)| {
                    let key = ModuleKey::new(layer, t);
                    self.proj(x, key, b, groups, opts, rec.as_deref_mut())
                })
                .collect();
        };
        let widths = targets
            .iter()
            .map(|&(t, _)| self.weights.layers[layer].linear(t).dim(0))
            .collect::<candle_core::Result<Vec<usize>>>()?;
        // [N, out] each (training: see quant::TrainProduct)
        let parts = match rec.is_some() {
            true => quant::qlinear_train_parts(x, q, self.train_product, &widths)?,
            false => quant::qlinear_parts(x, q, &widths)?,
        };
        let mut outs = Vec::with_capacity(targets.len());
        for (&(t, b), part) in targets.iter().zip(parts) {
            let key = ModuleKey::new(layer, t);
            outs.push(self.proj_finish(x, part, key, b, groups, opts, rec.as_deref_mut())?);
        }
        Ok(outs)
    }

    /// Add the bias and every group's LoRA delta to a projection's base output y [N, out].
    #[allow(clippy::too_many_arguments)]
    fn proj_finish(
        &self,
        x: &Tensor,
        mut y: Tensor,
        key: ModuleKey,
        bias: Option<&Tensor>,
        groups: &[Group],
        opts: &mut ForwardOpts<'_>,
        rec: Option<&mut LoraRec>,
    ) -> Result<Tensor> {
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        if !groups.iter().any(|g| g.adapts(key.target)) {
            return Ok(y);
        }
        if let Some(rec) = rec {
            // LoRA training: one adapter over every row (as `forward_tape` builds the batch);
            // its tensors are read, not tracked, and the tape keeps what dA and dB need.
            for g in groups {
                for (a, _) in g.set.iter() {
                    if let Some(m) = a.get(&key) {
                        let (delta, tape) = lora_fwd(x, m, opts.dropout.as_mut())?; // [N, out]
                        y = (y + delta)?;
                        rec.insert(key.target, tape);
                    }
                }
            }
            return Ok(y);
        }
        if !opts.train && !groups.is_empty() {
            // Inference: one gathered pass for all groups. Each row's delta is computed alone,
            // so a sequence's result never depends on what else is in the batch.
            let rows: Vec<ops::LoraRows> = groups
                .iter()
                .filter(|g| g.adapts(key.target))
                .map(|g| ops::LoraRows {
                    rows: &g.rows,
                    mods: g
                        .set
                        .iter()
                        .filter_map(|(a, wt)| a.get(&key).map(|m| (&m.a, &m.b, m.scale * wt)))
                        .collect(),
                })
                .filter(|r| !r.mods.is_empty())
                .collect();
            if rows.is_empty() {
                return Ok(y);
            }
            if let Some(delta) = ops::lora_gathered(x, y.dim(1)?, &rows)? {
                return Ok((y + delta)?);
            }
        }
        for g in groups {
            let mods: Vec<(&LoraModule, f64)> = g
                .set
                .iter()
                .filter_map(|(a, wt)| a.get(&key).map(|m| (m, *wt)))
                .collect();
            if mods.is_empty() {
                continue;
            }
            let xg = match &g.index {
                None => x.clone(),
                Some(idx) => x.index_select(idx, 0)?, // [n, in]
            };
            let mut delta: Option<Tensor> = None;
            for (m, wt) in mods {
                let xin = match opts.dropout.as_mut() {
                    Some((p, rng)) if opts.train && *p > 0.0 => dropout(&xg, *p, rng)?,
                    _ => xg.clone(),
                };
                let u = xin.matmul(&m.a.t()?)?; // [n, r]
                let d = u.matmul(&m.b.t()?)?.affine(m.scale * wt, 0.0)?; // [n, out]
                delta = Some(match delta {
                    None => d,
                    Some(acc) => (acc + d)?,
                });
            }
            let delta = delta.expect("at least one module");
            y = match &g.index {
                None => (y + delta)?,
                Some(idx) => y.index_add(idx, &delta, 0)?,
            };
        }
        Ok(y)
    }

    /// RMSNorm; when recording, also 1/rms for the backward.   x: [N, H] → [N, H] (, [N, 1])
    fn norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        opts: &ForwardOpts<'_>,
        record: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let eps = self.cfg.rms_norm_eps;
        if record {
            let (y, rstd) = ops::rms_fwd(x, w, eps)?;
            return Ok((y, Some(rstd)));
        }
        Ok((ops::rms_norm(x, w, eps, opts.train)?, None))
    }

    /// One decoder block: x + attn(norm(x)), then + mlp(norm(x)).   x: [N, H] → [N, H]
    /// `record`: LoRA training; the layer's [`LayerTape`] is returned with the output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &self,
        l: usize,
        x: &Tensor,
        seqs: &mut [SeqInput<'_>],
        ctxs: &[SeqCtx],
        rope: &Rope,
        groups: &[Group],
        opts: &mut ForwardOpts<'_>,
        record: bool,
    ) -> Result<(Tensor, Option<LayerTape>)> {
        let c = &self.cfg;
        let lw = &self.weights.layers[l];
        let key = |t| ModuleKey::new(l, t);
        let mut lora = record.then(LoraRec::new);
        // Attention: x + o(attn(rope(q), rope(k), v)) over norm(x).
        let (h, rstd1) = self.norm(x, &lw.attn_norm, opts, record)?; // [N, H]
        let qkv = [
            (Target::Q, lw.q_bias.as_ref()),
            (Target::K, lw.k_bias.as_ref()),
            (Target::V, lw.v_bias.as_ref()),
        ];
        // [N, nh·hd], [N, nkv·hd], [N, nkv·hd]
        let [q, k, v]: [Tensor; 3] = self
            .projs(&h, l, &qkv, groups, opts, lora.as_mut())?
            .try_into()
            .expect("three projections");
        // Heads first, rotary embedding once for the whole batch (each token at its own position).
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let q = ops::rope(&ops::heads(&q, nh, hd)?, &rope.cos, &rope.sin, opts.train)?; // [nh, N, hd]
        let k = ops::rope(&ops::heads(&k, nkv, hd)?, &rope.cos, &rope.sin, opts.train)?; // [nkv, N, hd]
        let v = ops::heads(&v, nkv, hd)?; // [nkv, N, hd]
        let (attn, recorded) = self.attention(l, &q, &k, &v, seqs, ctxs, opts, record)?; // [N, nh·hd]
        let o = self.proj(&attn, key(Target::O), None, groups, opts, lora.as_mut())?; // [N, H]
                                                                                      // An adapted o_proj needs its input in the backward: keep it (cheaper than a second
                                                                                      // attention pass).
        let attn_kept = lora.as_ref().is_some_and(|r| r.contains_key(&Target::O));
        let attn = attn_kept.then_some(attn);
        let x2 = ops::add(x, &o)?;
        // MLP: x2 + down(silu(gate)·up) over norm(x2).
        let (h, rstd2) = self.norm(&x2, &lw.mlp_norm, opts, record)?; // [N, H]
        let gate_up = [(Target::Gate, None), (Target::Up, None)];
        // gate, up: [N, I] each
        let [gate, up]: [Tensor; 2] = self
            .projs(&h, l, &gate_up, groups, opts, lora.as_mut())?
            .try_into()
            .expect("two projections");
        // m: [N, I]
        let m = if opts.train {
            // Differentiable ops for autograd (full fine-tuning).
            (gate.silu()? * &up)?
        } else {
            ops::silu_mul(&gate, &up)?
        };
        let down = self.proj(&m, key(Target::Down), None, groups, opts, lora.as_mut())?; // [N, H]
        let x3 = ops::add(&x2, &down)?;
        let tape = match (rstd1, rstd2, recorded, lora) {
            (Some(rstd1), Some(rstd2), Some(lse), Some(lora)) => Some(LayerTape {
                x: x.clone(),
                rstd1,
                q,
                k,
                v,
                lse,
                attn,
                x2,
                rstd2,
                gate,
                up,
                lora,
            }),
            _ => None,
        };
        let tape = tape.map(|t| t.stored(self.tape_dtype())).transpose()?;
        Ok((x3, tape))
    }
}

/// dL/dh = dL/dlogits·W [n, H] from the packed head W [V, H]: W dequantized VOCAB_CHUNK rows at
/// a time (exactly the weights the forward multiplied) for one f32 gemm each. The whole f32
/// head is never held (49152 × 2048 × 4 B = 400 MB for a 1.1 B base), and the chunks' products
/// are summed in order, so the result does not depend on the thread count.
fn head_input_grad_packed(
    dlogits: &Tensor,
    w: &quant::QMatrix,
    dx: quant::DxProduct,
) -> Result<Tensor> {
    /// Vocabulary rows per dequantized chunk (a multiple of the packing's 16-row tiles):
    /// 4096 × 576 × 4 B = 9.4 MB for the default model.
    const VOCAB_CHUNK: usize = 4096;
    let (n, v) = dlogits.dims2()?;
    let h = w.in_dim();
    if v != w.out_dim() {
        return Err(ModelError::Invalid(format!(
            "head gradient: {v} logits per row for a {}-row head",
            w.out_dim()
        )));
    }
    if let Some(dh) = quant::dequantized_input_grad(&[dlogits], w, dx)? {
        return Ok(dh);
    }
    let mut acc: Option<Tensor> = None;
    for v0 in (0..v).step_by(VOCAB_CHUNK) {
        let vc = VOCAB_CHUNK.min(v - v0);
        let wc = Tensor::from_vec(w.dequantize_rows(v0, vc)?, (vc, h), dlogits.device())?;
        let pc = dlogits.narrow(1, v0, vc)?.contiguous()?; // [n, vc]
        let g = ops::gemm::matmul_frozen(&pc, &wc, ops::gemm::BLayout::Rows)?; // [n, H]
        acc = Some(match acc {
            None => g,
            Some(a) => (a + g)?,
        });
    }
    Ok(match acc {
        Some(a) => a,
        None => Tensor::zeros((n, h), DType::F32, dlogits.device())?,
    })
}

/// Inverted dropout: zero each element with probability p, scale the rest by 1/(1−p).
fn dropout(x: &Tensor, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Tensor> {
    let mask = dropout_mask(x, p, rng)?;
    Ok((x * mask)?)
}

/// The inverted-dropout multiplier for `x`'s shape: 0 with probability p, else 1/(1−p).
pub(crate) fn dropout_mask(
    x: &Tensor,
    p: f64,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// Index of the largest value in each row of [n, vocab] logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Steps of at most this many new rows keep the pool's other workers awake while they run
/// (see [`on_pool`]): single-stream decoding and small batches. Larger steps spend so long in
/// each kernel that the wake-ups do not show, and staying awake only takes cores from the
/// server's other threads (measured: `bench serve` at 32 rows ran 3 % slower with it).
pub const STAY_ROWS: usize = 8;

/// Run `f` on a worker of rayon's pool. A step makes ~120 parallel calls (every matmul and
/// elementwise kernel); from a thread outside the pool each one injects its job, wakes the
/// workers and puts the caller to sleep on a latch until they finish: two futex round trips
/// per call, about a quarter of a single-stream decode step on 2 cores (perf). From a worker,
/// the caller does its share itself and the other workers steal the rest.
///
/// Between two parallel calls the other workers still fall asleep (rayon sleeps after a few
/// dozen idle rounds) and need a futex wake for the next call, ~10 % of a decode step. With
/// `stay`, each other worker takes part through [`stay_near`] while `f` runs: it runs work
/// as it appears and otherwise yields its core to the OS scheduler, never sleeping on a futex.
/// That costs when another busy process shares the cores (two single-stream decoders on 2
/// cores: −11 % each), so `LOWRANK_STAY=0` turns it off (`1` turns it on for every step).
pub fn on_pool<R: Send>(stay: bool, f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let stay = match std::env::var("LOWRANK_STAY").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => stay,
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        if stay && rayon::current_num_threads() > 1 {
            let done = &done;
            // The owner's own copy returns at once: run by the owner (say while it waits in
            // a join inside `f`), it would wait for the `f` that same thread is running.
            s.spawn_broadcast(move |_, ctx| {
                if Some(ctx.index()) != owner {
                    stay_near(done)
                }
            });
        }
        let r = f();
        done.store(true, std::sync::atomic::Ordering::Release);
        r
    })
}

/// How long a staying worker waits with no work before it leaves (see [`stay_near`]).
const STAY_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

/// Until `done`: run pool work as it appears, yielding the core (not sleeping) when there is
/// none, and leave once there has been no work for [`STAY_IDLE`] (a decode step's gaps
/// between kernels are tens of µs).
///
/// The idle bound is what makes this wait safe. A worker takes broadcast jobs while it waits
/// inside a join, so it can take this one while it is running one of `f`'s own jobs (it
/// checked its broadcast queue just before the broadcast was pushed, then stole one of `f`'s
/// jobs). Then `f` waits for that job, which cannot go on until this returns: without the
/// bound that would hang; with it, it costs `STAY_IDLE` once, since `f`'s other work has run
/// dry by then.
fn stay_near(done: &std::sync::atomic::AtomicBool) {
    let mut idle_since: Option<std::time::Instant> = None;
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            _ => {
                let t0 = *idle_since.get_or_insert_with(std::time::Instant::now);
                if t0.elapsed() > STAY_IDLE {
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;
    use rayon::prelude::*;

    /// `on_pool` runs `f` on a pool worker and returns its result, with and without staying,
    /// from several outside threads at once (as a test binary's or a server's threads do),
    /// nested, and without ever hanging.
    #[test]
    fn on_pool_runs_on_a_worker_and_never_hangs() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..200usize {
                        let stay = (i + t) % 2 == 0;
                        let (sum, idx) = on_pool(stay, || {
                            let v: Vec<usize> = (0..1000 + i).collect();
                            // nested: already on a worker, runs in place
                            let inner = on_pool(true, || v.par_iter().sum::<usize>());
                            (inner, rayon::current_thread_index())
                        });
                        let n = 1000 + i;
                        assert_eq!(sum, n * (n - 1) / 2);
                        assert!(idx.is_some(), "f ran outside the pool");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(rayon::current_thread_index().is_none());
    }

    /// A staying worker that ends up inside the very work its flag waits for (the race in
    /// [`stay_near`]'s comment) leaves once it is idle, instead of hanging the step.
    #[test]
    fn stay_near_inside_its_own_step_returns() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = on_pool(false, || {
                let done = std::sync::atomic::AtomicBool::new(false);
                // `done` is set only after the join, which waits for `stay_near` itself.
                let ((), s) = rayon::join(|| stay_near(&done), || (0..1000u64).sum::<u64>());
                done.store(true, std::sync::atomic::Ordering::Release);
                s
            });
            tx.send(r).unwrap();
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(got, Ok(499_500), "stay_near hung inside its own step");
    }
}

#[cfg(test)]
mod head_grad_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Largest |got − f64 dlogits·W| over Σ|terms| of that output: f32 accumulation error.
    fn worst_error(got: &[f32], p: &[f32], w: &[f32], n: usize, v: usize, h: usize) -> f64 {
        let mut worst = 0f64;
        for r in 0..n {
            for j in 0..h {
                let (mut s, mut mag) = (0f64, 0f64);
                for k in 0..v {
                    let t = p[r * v + k] as f64 * w[k * h + j] as f64;
                    s += t;
                    mag += t.abs();
                }
                worst = worst.max((got[r * h + j] as f64 - s).abs() / mag.max(1e-30));
            }
        }
        worst
    }

    /// The int8 head's input gradient is dlogits·W with W exactly the packed weights the
    /// forward multiplies (an f64 reference of those operands, to f32 accumulation error),
    /// over several vocabulary chunks and a ragged last one; the same check fails for a
    /// gradient that reads the chunks one tile off, or that drops the last chunk.
    #[test]
    fn packed_head_gradient_is_dlogits_times_the_packed_weights() {
        let (n, v, h) = (3, 2 * 4096 + 40, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // Q4_1-like blocks: on a 16-level grid, so packed exactly.
        let mut w = vec![0f32; v * h];
        for blk in w.chunks_mut(32) {
            let d: f32 = rng.random_range(0.001..0.05);
            let m: f32 = rng.random_range(-0.3..0.0);
            blk.iter_mut()
                .for_each(|x| *x = d * rng.random_range(0..16u8) as f32 + m);
        }
        let q = quant::QMatrix::from_f32(&w, v, h).unwrap();
        assert_eq!(q.rounded_blocks(), 0);
        let wd = q.dequantize();
        let p: Vec<f32> = (0..n * v).map(|_| rng.random_range(-1f32..1.0)).collect();
        let dl = Tensor::from_vec(p.clone(), (n, v), &Device::Cpu).unwrap();
        let got = head_input_grad_packed(&dl, &q, quant::DxProduct::F32).unwrap();
        assert_eq!(got.dims(), &[n, h]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let e = worst_error(&got, &p, &wd, n, v, h);
        assert!(e <= 1e-5, "head gradient off the f64 reference by {e:e}");
        // Deliberate mistakes: rows shifted by one tile, and the last chunk missing.
        let mut shifted = wd.clone();
        shifted.rotate_left(16 * h);
        assert!(worst_error(&got, &p, &shifted, n, v, h) > 1e-3);
        let mut short = p.clone();
        for r in 0..n {
            short[r * v + 2 * 4096..(r + 1) * v].fill(0.0);
        }
        let dl_short = Tensor::from_vec(short, (n, v), &Device::Cpu).unwrap();
        let g_short: Vec<f32> = head_input_grad_packed(&dl_short, &q, quant::DxProduct::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(worst_error(&g_short, &p, &wd, n, v, h) > 1e-3);
        // A dlogits of the wrong width is an error, not a product.
        let bad = Tensor::zeros((n, v - 1), DType::F32, &Device::Cpu).unwrap();
        assert!(head_input_grad_packed(&bad, &q, quant::DxProduct::F32).is_err());
    }
}
