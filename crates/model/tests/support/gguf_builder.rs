//! A GGUF writer for tests: any version, metadata, alignment and tensor list, so a test can
//! build a valid file and knows where each length, count, dimension and offset lies (to
//! corrupt exactly that field).
#![allow(dead_code)]

/// A metadata value, with GGUF's type numbers.
#[derive(Debug, Clone)]
pub enum V {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(u8),
    Str(String),
    /// Element type number and elements (all of that type).
    Arr(u32, Vec<V>),
}

impl V {
    fn ty(&self) -> u32 {
        match self {
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
        }
    }
}

pub fn s(x: &str) -> V {
    V::Str(x.into())
}

/// One tensor: ggml's dimension order (ne[0], the row length, first), ggml type, raw bytes.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub meta: Vec<(String, V)>,
    pub tensors: Vec<TensorSpec>,
    /// The alignment the data is laid out with (whatever `general.alignment` says).
    pub layout_alignment: u64,
}

/// A built file and the byte offsets of its u64 fields (counts, lengths, dims, offsets).
pub struct Built {
    pub bytes: Vec<u8>,
    /// (what, offset of the little-endian u64).
    pub u64_fields: Vec<(String, usize)>,
    /// Offset of each tensor's ggml type (u32).
    pub type_fields: Vec<usize>,
    /// End of the tensor infos (before the padding and the data).
    pub header_end: usize,
}

impl Gguf {
    pub fn build(&self) -> Built {
        let mut b = Vec::new();
        let mut f = Vec::new();
        let mut types = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&self.version.to_le_bytes());
        f.push(("tensor_count".to_string(), b.len()));
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        f.push(("metadata_kv_count".to_string(), b.len()));
        b.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            f.push((format!("key length of {k}"), b.len()));
            put_str(&mut b, k);
            b.extend_from_slice(&v.ty().to_le_bytes());
            put_value(&mut b, &mut f, k, v);
        }
        let a = self.layout_alignment;
        let mut offsets = Vec::new();
        let mut off = 0u64;
        for t in &self.tensors {
            offsets.push(off);
            off = (off + t.data.len() as u64).div_ceil(a) * a;
        }
        for (t, o) in self.tensors.iter().zip(&offsets) {
            f.push((format!("name length of {}", t.name), b.len()));
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for (i, d) in t.ne.iter().enumerate() {
                f.push((format!("dim {i} of {}", t.name), b.len()));
                b.extend_from_slice(&d.to_le_bytes());
            }
            types.push(b.len());
            b.extend_from_slice(&t.ty.to_le_bytes());
            f.push((format!("offset of {}", t.name), b.len()));
            b.extend_from_slice(&o.to_le_bytes());
        }
        let header_end = b.len();
        let start = (b.len() as u64).div_ceil(a) * a;
        b.resize(start as usize, 0);
        for (t, o) in self.tensors.iter().zip(&offsets) {
            b.resize((start + o) as usize, 0);
            b.extend_from_slice(&t.data);
        }
        Built {
            bytes: b,
            u64_fields: f,
            type_fields: types,
            header_end,
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, f: &mut Vec<(String, usize)>, key: &str, v: &V) {
    match v {
        V::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => b.push(*x),
        V::Str(x) => {
            f.push((format!("string length in {key}"), b.len()));
            put_str(b, x)
        }
        V::Arr(ty, xs) => {
            b.extend_from_slice(&ty.to_le_bytes());
            f.push((format!("array length of {key}"), b.len()));
            b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                put_value(b, f, key, x);
            }
        }
    }
}

/// Deterministic small floats in [-0.1, 0.1) (a tiny LCG; no RNG crate needed).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

pub fn f32_tensor(name: &str, ne: &[u64], seed: u64) -> TensorSpec {
    let n = ne.iter().product::<u64>() as usize;
    let data = if name.ends_with("norm.weight") {
        vec![1.0f32; n]
    } else {
        values(n, seed)
    };
    TensorSpec {
        name: name.into(),
        ne: ne.to_vec(),
        ty: 0,
        data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Q8_0: blocks of 32 weights, each an f16 scale and 32 i8 (34 bytes).
pub fn q8_0_tensor(name: &str, ne: &[u64], seed: u64) -> TensorSpec {
    let n = ne.iter().product::<u64>() as usize;
    assert_eq!(ne[0] % 32, 0);
    let v = values(n, seed);
    let mut data = Vec::new();
    for block in v.chunks(32) {
        data.extend_from_slice(&0x2148u16.to_le_bytes()); // f16 ≈ 0.01
        data.extend(block.iter().map(|x| ((x * 1000.0) as i8) as u8));
    }
    TensorSpec {
        name: name.into(),
        ne: ne.to_vec(),
        ty: 8,
        data,
    }
}

/// Tiny Llama shape: hidden 32, 2 heads of 16 over 1 KV head, MLP 64, vocabulary 16.
pub const HIDDEN: u64 = 32;
pub const MLP: u64 = 64;
pub const VOCAB: u64 = 16;

/// A complete, loadable tiny Llama GGUF (`layers` blocks, tied embeddings, one Q8_0 tensor,
/// a 16-token byte-level BPE vocabulary "a".."p" without merges), version 3.
pub fn tiny_llama(layers: u64, context: u32) -> Gguf {
    let tokens: Vec<V> = (b'a'..b'a' + VOCAB as u8)
        .map(|c| V::Str((c as char).to_string()))
        .collect();
    let meta = vec![
        ("general.architecture".into(), s("llama")),
        ("llama.block_count".into(), V::U32(layers as u32)),
        ("llama.context_length".into(), V::U32(context)),
        ("llama.embedding_length".into(), V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), V::U32(MLP as u32)),
        ("llama.attention.head_count".into(), V::U32(2)),
        ("llama.attention.head_count_kv".into(), V::U32(1)),
        ("llama.rope.freq_base".into(), V::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), V::Arr(8, tokens)),
        ("tokenizer.ggml.merges".into(), V::Arr(8, vec![])),
        (
            "tokenizer.ggml.token_type".into(),
            V::Arr(5, (0..VOCAB).map(|_| V::I32(1)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(15)),
        ("general.alignment".into(), V::U32(32)),
    ];
    let mut tensors = vec![f32_tensor("token_embd.weight", &[HIDDEN, VOCAB], 1)];
    for l in 0..layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        let seed = 100 * (l + 1);
        tensors.push(f32_tensor(&n("attn_norm.weight"), &[HIDDEN], seed));
        tensors.push(f32_tensor(&n("attn_q.weight"), &[HIDDEN, 32], seed + 1));
        tensors.push(f32_tensor(&n("attn_k.weight"), &[HIDDEN, 16], seed + 2));
        tensors.push(f32_tensor(&n("attn_v.weight"), &[HIDDEN, 16], seed + 3));
        tensors.push(f32_tensor(
            &n("attn_output.weight"),
            &[32, HIDDEN],
            seed + 4,
        ));
        tensors.push(f32_tensor(&n("ffn_norm.weight"), &[HIDDEN], seed + 5));
        tensors.push(f32_tensor(&n("ffn_gate.weight"), &[HIDDEN, MLP], seed + 6));
        tensors.push(q8_0_tensor(&n("ffn_up.weight"), &[HIDDEN, MLP], seed + 7));
        tensors.push(f32_tensor(&n("ffn_down.weight"), &[MLP, HIDDEN], seed + 8));
    }
    tensors.push(f32_tensor("output_norm.weight", &[HIDDEN], 9));
    Gguf {
        version: 3,
        meta,
        tensors,
        layout_alignment: 32,
    }
}

impl Gguf {
    /// Replace (or add) a metadata entry.
    pub fn set(&mut self, key: &str, v: V) -> &mut Self {
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.meta.push((key.into(), v)),
        }
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }
}

/// A fresh, unique temporary directory, removed when dropped.
pub struct TmpDir(pub std::path::PathBuf);

impl TmpDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "lowrank-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
