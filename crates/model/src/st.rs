//! Safetensors weights read one tensor at a time with positioned reads: loading a model keeps
//! at most one tensor of the file in memory besides what the model holds (candle's
//! `safetensors::load` reads every file whole, so a bf16 model was resident twice over:
//! as read, then in f32; for int8 compute the f32 copy was never needed at all). The page
//! cache holds the file, not the process. Every offset and size from the header is checked
//! against the file before anything is allocated.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The format's limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

struct Entry {
    path: PathBuf,
    file: Arc<File>,
    /// Absolute file offset of the data.
    start: u64,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

/// The tensors of one or more safetensors files, by name, not yet read.
pub(crate) struct StFiles {
    tensors: HashMap<String, Entry>,
}

/// One tensor's entry in the JSON header.
#[derive(serde::Deserialize)]
struct Info {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

fn dtype_of(d: &str) -> Option<DType> {
    Some(match d {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl StFiles {
    /// Index the tensors of `files` from their headers (later files win on a repeated name).
    pub(crate) fn open(files: &[PathBuf]) -> Result<StFiles> {
        let mut tensors = HashMap::new();
        for p in files {
            let bad = |msg: String| ModelError::File {
                path: p.clone(),
                msg: format!("cannot read safetensors (corrupt or truncated?): {msg}"),
            };
            let mut f = File::open(p).map_err(|e| bad(e.to_string()))?;
            let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
            let n = u64::from_le_bytes(n);
            if n > file_len.saturating_sub(8) || n > MAX_HEADER {
                return Err(bad(format!(
                    "header length {n} does not fit the file of {file_len} bytes"
                )));
            }
            let mut header = vec![0u8; 8 + n as usize];
            header[..8].copy_from_slice(&n.to_le_bytes());
            f.read_exact(&mut header[8..])
                .map_err(|e| bad(e.to_string()))?;
            let meta: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header[8..]).map_err(|e| bad(format!("header: {e}")))?;
            let data_start = 8 + n;
            let file = Arc::new(f);
            for (name, v) in meta {
                if name == "__metadata__" {
                    continue;
                }
                let info: Info =
                    serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
                let (a, b) = info.data_offsets;
                let fits = a <= b && data_start.checked_add(b).is_some_and(|e| e <= file_len);
                if !fits {
                    return Err(bad(format!(
                        "tensor {name}: bytes {a}..{b} lie outside the file of {file_len} bytes"
                    )));
                }
                let (a, b) = (a as usize, b as usize); // ≤ the file's length
                let dtype = dtype_of(&info.dtype).ok_or_else(|| ModelError::Tensor {
                    path: p.clone(),
                    name: name.clone(),
                    msg: format!("unsupported dtype {}", info.dtype),
                })?;
                let numel = info
                    .shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d));
                if numel.and_then(|n| n.checked_mul(dtype.size_in_bytes())) != Some(b - a) {
                    return Err(bad(format!(
                        "tensor {name}: shape {:?} does not match its {} bytes",
                        info.shape,
                        b - a
                    )));
                }
                tensors.insert(
                    name,
                    Entry {
                        path: p.clone(),
                        file: file.clone(),
                        start: data_start + a as u64,
                        len: b - a,
                        dtype,
                        shape: info.shape.clone(),
                    },
                );
            }
        }
        Ok(StFiles { tensors })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Read tensor `name` (in its file's dtype) and forget it; `None` when no file has it.
    pub(crate) fn take(
        &mut self,
        name: &str,
        device: &Device,
    ) -> Result<Option<(PathBuf, Tensor)>> {
        let Some(e) = self.tensors.remove(name) else {
            return Ok(None);
        };
        let err = |msg: String| ModelError::Tensor {
            path: e.path.clone(),
            name: name.into(),
            msg,
        };
        let mut buf = vec![0u8; e.len];
        let mut f: &File = &e.file;
        f.seek(SeekFrom::Start(e.start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|x| err(format!("cannot read its data: {x}")))?;
        let t = Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, device)
            .map_err(|x| err(x.to_string()))?;
        Ok(Some((e.path, t)))
    }
}
