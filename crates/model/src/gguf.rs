//! GGUF files: header and metadata, model config, tensors dequantized to f32.
//!
//! GGUF stores `attn_q` / `attn_k` rows permuted for llama.cpp's interleaved RoPE. We undo the
//! permutation at load time so the model (and every adapter) always sees HF's half-split
//! layout; only a GGUF *export* permutes back.
//!
//! The header is parsed and validated here, not by candle: every count and length it declares
//! is checked against the bytes left in the file (or a bound below) before anything is
//! allocated for it, and every tensor's shape, type, alignment and byte range is checked
//! before a tensor is read. candle gets the validated [`Content`] and only reads tensor data.
//! (candle's own reader divides by a `general.alignment` of 0, multiplies dimensions without
//! overflow checks and silently ignores an alignment stored as a 64-bit integer.)

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// GGUF's default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The largest `general.alignment` accepted: the spec stores it as a `uint32`, so the largest
/// power of two it can hold.
pub const MAX_ALIGNMENT: u64 = 1 << 31;
/// Metadata keys are at most 65535 bytes (GGUF spec).
pub const MAX_KEY_LEN: u64 = 65_535;
/// Tensor names are at most 64 bytes (GGUF spec; llama.cpp's `GGML_MAX_NAME`).
pub const MAX_TENSOR_NAME_LEN: u64 = 64;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// Arrays may nest (the spec allows it) but not deeper than this.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Metadata values (array elements included) in one file. Each costs ~32 bytes of memory
/// however small it is on disk, so this bounds the metadata's memory at ~512 MiB (plus the
/// strings' bytes, which the file length bounds); real files hold far fewer (a 256k-token
/// vocabulary with scores, types and merges is ~1M values).
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

/// A GGUF file whose header has been validated (see the module docs).
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub file_size: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::File {
            path: path.into(),
            msg: format!("cannot open: {e}"),
        })?;
        let file_size = file
            .metadata()
            .map_err(|e| ModelError::File {
                path: path.into(),
                msg: format!("cannot read its size: {e}"),
            })?
            .len();
        let content = Header {
            r: BufReader::new(file),
            pos: 0,
            len: file_size,
            path,
            values: 0,
        }
        .read()?;
        Ok(GgufFile {
            path: path.into(),
            content,
            file_size,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn field_err(&self, field: &str, msg: &str) -> ModelError {
        ModelError::Field {
            path: self.path.clone(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.field_err(key, "missing"))?;
        value_u64(v).ok_or_else(|| self.field_err(key, "expected an integer"))
    }

    /// An optional integer: absent is `None`; present with another type is an error, never
    /// silently the default.
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.field_err(key, "expected a non-negative integer")),
        }
    }

    /// An optional float (f32 or f64), strict like [`opt_u64`](Self::opt_u64).
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(|x| x as f64)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| self.field_err(key, "expected a float")),
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self
            .meta_str("general.architecture")
            .ok_or_else(|| self.field_err("general.architecture", "missing"))?;
        if !ModelConfig::SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArch {
                path: self.path.clone(),
                arch,
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_u64(&k("embedding_length"))? as usize;
        let num_heads = self.meta_u64(&k("attention.head_count"))? as usize;
        let num_kv_heads = self
            .opt_u64(&k("attention.head_count_kv"))?
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = match self.opt_u64(&k("attention.key_length"))? {
            Some(x) => x as usize,
            None => self
                .opt_u64(&k("rope.dimension_count"))?
                .map(|x| x as usize)
                .unwrap_or(hidden / num_heads.max(1)),
        };
        let vocab_size = match self.opt_u64(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| self.field_err(&k("vocab_size"), "missing"))?,
            },
        };
        // Token ids are u32: a larger value is an error, never silently wrapped.
        let token_id = |key: &str| -> Result<Option<u32>> {
            self.meta(key)
                .and_then(value_u64)
                .map(|x| u32::try_from(x).map_err(|_| self.field_err(key, "token id beyond u32")))
                .transpose()
        };
        let eos = token_id("tokenizer.ggml.eos_token_id")?;
        let cfg = ModelConfig {
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.meta_u64(&k("feed_forward_length"))? as usize,
            num_layers: self.meta_u64(&k("block_count"))? as usize,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: self.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rms_norm_eps: self
                .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            max_position_embeddings: self
                .opt_u64(&k("context_length"))?
                .map(|x| x as usize)
                .unwrap_or(2048),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: eos.into_iter().collect(),
            arch,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Dequantize one tensor to f32 on `device`. candle returns GGUF shapes in row-major
    /// order ([out, in] for a linear weight).
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let file = File::open(&self.path).map_err(|e| ModelError::File {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        let mut reader = BufReader::new(file);
        let q = self
            .content
            .tensor(&mut reader, name, device)
            .map_err(|e| ModelError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                msg: e.to_string(),
            })?;
        let t = q.dequantize(device).map_err(|e| ModelError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            msg: format!("cannot dequantize {:?}: {e}", q.dtype()),
        })?;
        Ok(t)
    }

    /// The block format a tensor is stored in, when it is one `QMatrix::from_gguf_blocks`
    /// packs as is (and its rows are whole blocks).
    pub fn block_format(&self, name: &str) -> Option<crate::quant::BlockFormat> {
        use candle_core::quantized::GgmlDType;
        let info = self.content.tensor_infos.get(name)?;
        let cols = *info.shape.dims().last()?;
        if cols % crate::quant::QK != 0 {
            return None;
        }
        match info.ggml_dtype {
            GgmlDType::Q4_1 => Some(crate::quant::BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(crate::quant::BlockFormat::Q8_0),
            _ => None,
        }
    }

    /// The file mapped into memory, for reading tensors' raw blocks in place
    /// ([`GgufFile::tensor_blocks`]): packing then reads the page cache directly instead of
    /// copying 100 MB through `read` (15 % of the default model's cold start).
    pub fn map(&self) -> Result<memmap2::Mmap> {
        let file = File::open(&self.path).map_err(|e| ModelError::File {
            path: self.path.clone(),
            msg: format!("cannot open: {e}"),
        })?;
        // SAFETY: the map is read-only and lives only while the model loads. If another
        // process truncated or rewrote the file meanwhile, reads could see other bytes or
        // fault (SIGBUS); model files are not modified while loaded, the same assumption
        // every mmap-based model loader (safetensors, llama.cpp) makes.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::File {
            path: self.path.clone(),
            msg: format!("cannot map: {e}"),
        })?;
        if map.len() as u64 != self.file_size {
            return Err(ModelError::File {
                path: self.path.clone(),
                msg: "the file changed size while loading".into(),
            });
        }
        Ok(map)
    }

    /// A tensor's raw blocks within `map` (from [`GgufFile::map`]), for a tensor whose
    /// [`GgufFile::block_format`] is known. The header check bounded every tensor's extent
    /// by the file length; it is checked again here against the map.
    pub fn tensor_blocks<'m>(
        &self,
        map: &'m [u8],
        name: &str,
    ) -> Result<(crate::quant::BlockFormat, &'m [u8])> {
        let err = |msg: String| ModelError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            msg,
        };
        let fmt = self
            .block_format(name)
            .ok_or_else(|| err("not stored in a block format packed as is".into()))?;
        let info = &self.content.tensor_infos[name];
        let blocks = info.shape.elem_count() / crate::quant::QK;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        let range = start
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| Some(s..s.checked_add(blocks.checked_mul(fmt.bytes())?)?))
            .filter(|r| r.end <= map.len())
            .ok_or_else(|| err("its data lies beyond the end of the file".into()))?;
        Ok((fmt, &map[range]))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of a tensor as [`tensor_f32`](Self::tensor_f32) returns it (row-major), from
    /// the header alone.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// Tensor storage types present, e.g. {"Q4_1": 211, "Q8_0": 1, "F32": 61}.
    pub fn dtype_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
        m
    }
}

pub fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::U64(x) => Some(*x),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// The ggml tensor types candle can hold, by their GGUF number (ggml.h's `ggml_type`).
fn ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The fewest bytes one metadata value of GGUF type `t` takes on disk; `None`: no such type.
fn min_value_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,   // u8, i8, bool
        2 | 3 => 2,       // u16, i16
        4..=6 => 4,       // u32, i32, f32
        8 | 10..=12 => 8, // string (its length), u64, i64, f64
        9 => 12,          // array: element type and length
        _ => return None,
    })
}

/// Smallest on-disk size of one metadata entry: key length, value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest on-disk size of one tensor info: name length, dims count, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// The header parser: a reader that knows how many bytes of the file are left, so no length
/// it reads is trusted before it is compared with them.
struct Header<'p, R> {
    r: R,
    /// Bytes consumed; never more than `len`.
    pos: u64,
    len: u64,
    path: &'p Path,
    /// Metadata values read so far (see [`MAX_METADATA_VALUES`]).
    values: u64,
}

impl<R: Read> Header<'_, R> {
    fn field_err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Field {
            path: self.path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn tensor_err(&self, name: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: self.path.into(),
            name: name.into(),
            msg: msg.into(),
        }
    }

    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn too_short(&self, n: u64, field: &str) -> ModelError {
        self.field_err(
            field,
            format!(
                "needs {n} bytes at offset {}, but the file has only {} left (truncated or corrupt GGUF header)",
                self.pos,
                self.left()
            ),
        )
    }

    fn read_into(&mut self, buf: &mut [u8], field: &str) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.left() {
            return Err(self.too_short(n, field));
        }
        self.r.read_exact(buf).map_err(|e| ModelError::File {
            path: self.path.into(),
            msg: format!(
                "cannot read the GGUF header ({field}) at offset {}: {e}",
                self.pos
            ),
        })?;
        self.pos += n;
        Ok(())
    }

    /// `n` bytes of `field`, refused before allocating when the file does not hold them.
    fn bytes(&mut self, n: u64, field: &str) -> Result<Vec<u8>> {
        if n > self.left() {
            return Err(self.too_short(n, field));
        }
        let mut buf = vec![0u8; n as usize];
        self.read_into(&mut buf, field)?;
        Ok(buf)
    }

    fn fixed<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_into(&mut buf, field)?;
        Ok(buf)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(field)?))
    }

    /// A GGUF string (u64 length, bytes) of at most `max` bytes. Like candle, trailing NULs
    /// (some writers add one) are dropped and invalid UTF-8 is replaced.
    fn string(&mut self, field: &str, max: u64) -> Result<String> {
        let n = self.u64(field)?;
        if n > max {
            return Err(self.field_err(
                field,
                format!("string of {n} bytes, more than the {max} allowed"),
            ));
        }
        let mut b = self.bytes(n, field)?;
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn count_values(&mut self, n: u64, key: &str) -> Result<()> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_METADATA_VALUES {
            return Err(self.field_err(
                key,
                format!("the metadata holds more than {MAX_METADATA_VALUES} values"),
            ));
        }
        Ok(())
    }

    /// One metadata value of GGUF type `ty` (of key `key`, for messages). The caller has
    /// counted it (see [`count_values`](Self::count_values)).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.fixed::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.fixed(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.fixed(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.fixed(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(key)?)),
            7 => match self.fixed::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.field_err(key, format!("bool value {b} (must be 0 or 1)"))),
            },
            8 => Value::String(self.string(key, u64::MAX)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.field_err(
                        key,
                        format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                    ));
                }
                let ety = self.u32(key)?;
                let min = min_value_size(ety).ok_or_else(|| {
                    self.field_err(key, format!("unknown array element type {ety}"))
                })?;
                let n = self.u64(key)?;
                let need = n.saturating_mul(min);
                if need > self.left() {
                    return Err(self.field_err(
                        key,
                        format!(
                            "array of {n} elements needs at least {need} bytes, but the file has only {} left (truncated or corrupt GGUF header)",
                            self.left()
                        ),
                    ));
                }
                self.count_values(n, key)?;
                // n ≤ the bytes left and ≤ MAX_METADATA_VALUES: safe to reserve.
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.fixed(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(key)?)),
            t => return Err(self.field_err(key, format!("unknown value type {t}"))),
        })
    }

    /// Parse and validate the whole header (see the module docs).
    fn read(mut self) -> Result<Content> {
        let not_gguf = |msg: String| ModelError::NotGguf {
            path: self.path.into(),
            msg,
        };
        if self.len < 8 {
            return Err(not_gguf(format!(
                "{} bytes, too short for a GGUF header",
                self.len
            )));
        }
        let magic: [u8; 4] = self.fixed("magic")?;
        if &magic != b"GGUF" {
            return Err(not_gguf(format!(
                "it starts with {magic:02x?}, not the magic `GGUF`"
            )));
        }
        let version = self.u32("version")?;
        let magic = match version {
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            1 => {
                return Err(self.field_err(
                    "version",
                    "GGUF version 1 is not supported (only versions 2 and 3)",
                ))
            }
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(self.field_err("version", "big-endian GGUF files are not supported"))
            }
            v => {
                return Err(self.field_err(
                    "version",
                    format!("unknown GGUF version {v} (supported: 2 and 3)"),
                ))
            }
        };
        let tensor_count = self.u64("tensor_count")?;
        let kv_count = self.u64("metadata_kv_count")?;
        let need = kv_count
            .saturating_mul(MIN_KV_BYTES)
            .saturating_add(tensor_count.saturating_mul(MIN_TENSOR_INFO_BYTES));
        if need > self.left() {
            return Err(self.field_err(
                "tensor_count",
                format!(
                    "the header declares {tensor_count} tensors and {kv_count} metadata entries, which need at least {need} bytes, but the file has only {} left (truncated or corrupt GGUF header)",
                    self.left()
                ),
            ));
        }

        let mut metadata = HashMap::new();
        for i in 0..kv_count {
            let key = self.string(&format!("metadata entry {i} (its key)"), MAX_KEY_LEN)?;
            let ty = self.u32(&key)?;
            self.count_values(1, &key)?;
            let value = self.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.field_err(&key, "duplicate metadata key"));
            }
        }

        // (name, info, bytes of data) in file order.
        let mut infos: Vec<(String, TensorInfo, u64)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..tensor_count {
            let name = self.string(&format!("tensor info {i} (its name)"), MAX_TENSOR_NAME_LEN)?;
            let n_dims = self.u32(&name)?;
            if !(1..=MAX_TENSOR_DIMS).contains(&n_dims) {
                return Err(self.tensor_err(
                    &name,
                    format!("{n_dims} dimensions (ggml tensors have 1 to {MAX_TENSOR_DIMS})"),
                ));
            }
            // ne[0] (the contiguous dimension) first, as ggml stores them.
            let mut ne = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let x = self.u64(&name)?;
                if x == 0 {
                    return Err(self.tensor_err(&name, format!("dimension {d} is 0")));
                }
                ne.push(x);
            }
            let elems = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
                .ok_or_else(|| {
                    self.tensor_err(&name, format!("dimensions {ne:?}: element count overflows"))
                })?;
            let ty = self.u32(&name)?;
            let dtype = ggml_type(ty).ok_or_else(|| {
                self.tensor_err(&name, format!("unknown or unsupported ggml type {ty}"))
            })?;
            let bs = dtype.block_size() as u64;
            if ne[0] % bs != 0 {
                return Err(self.tensor_err(
                    &name,
                    format!(
                        "rows of {} elements are not a whole number of {dtype:?} blocks of {bs}",
                        ne[0]
                    ),
                ));
            }
            // elems / bs · type size ≤ elems · type size / bs, and both fit in u64 here.
            let bytes = (elems / bs)
                .checked_mul(dtype.type_size() as u64)
                .ok_or_else(|| self.tensor_err(&name, "byte size overflows"))?;
            let offset = self.u64(&name)?;
            if !names.insert(name.clone()) {
                return Err(self.tensor_err(&name, "duplicate tensor name"));
            }
            let dims: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
            infos.push((
                name,
                TensorInfo {
                    ggml_dtype: dtype,
                    shape: dims.into(),
                    offset,
                },
                bytes,
            ));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => value_u64(v).ok_or_else(|| {
                self.field_err(
                    "general.alignment",
                    format!(
                        "expected an unsigned integer, got a {:?} value",
                        v.value_type()
                    ),
                )
            })?,
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(self.field_err(
                "general.alignment",
                format!("{alignment} is not a power of two from 1 to 2^31"),
            ));
        }
        // pos ≤ len and alignment ≤ 2^31: no overflow.
        let data_start = self.pos.div_ceil(alignment) * alignment;
        for (name, info, bytes) in &infos {
            if info.offset % alignment != 0 {
                return Err(self.tensor_err(
                    name,
                    format!(
                        "data offset {} is not a multiple of general.alignment = {alignment}",
                        info.offset
                    ),
                ));
            }
            // A truncated download is the commonest bad file: every tensor's bytes must be
            // there before any time is spent loading them.
            let end = data_start
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(*bytes));
            match end {
                Some(end) if end <= self.len => {}
                _ => {
                    return Err(self.tensor_err(
                        name,
                        format!(
                            "file is truncated (or the tensor's offset is corrupt): its {bytes} bytes at data offset {} end past the file's {} bytes",
                            info.offset, self.len
                        ),
                    ))
                }
            }
        }
        Ok(Content {
            magic,
            metadata,
            tensor_infos: infos.into_iter().map(|(n, i, _)| (n, i)).collect(),
            tensor_data_offset: data_start,
        })
    }
}
