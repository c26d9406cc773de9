//! Training / evaluation data: JSONL records → token ids with labels (−100 = no loss).
//!
//! Formats (one JSON object per line):
//! - `{"text"}`: every next-token prediction counts; no BOS is added.
//! - `{"prompt","completion"}`: loss on the completion only (+ EOS).
//! - `{"messages":[{role,content}...]}`: the model's chat template; loss on assistant turns only.
//! - alpaca `{"instruction","input","output"}`: rendered as a one-turn chat.
//!
//! Masking follows HF/PEFT (`tests/fixtures`): prompt and completion are tokenized
//! separately and concatenated; labels are −100 on prompt tokens, the model shifts them.

use std::path::{Path, PathBuf};

use lowrank_model::chat::ChatMessage;
use lowrank_model::Tok;
use serde_json::Value;

pub const IGNORE: i64 = -100;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}:{line}: {field}: {msg}")]
    Record {
        path: PathBuf,
        line: usize,
        field: String,
        msg: String,
    },
}

/// One tokenized example: `ids` and `labels` have equal length; labels[i] is the target
/// *at* position i (HF convention: the loss compares logits[i] with labels[i+1]).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// 1-based line in the source file.
    pub line: usize,
}

impl Sample {
    /// Number of next-token targets that carry loss.
    pub fn num_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    pub records: usize,
    pub skipped_bad: usize,
    pub truncated: usize,
    /// Records left with no target after truncation (dropped).
    pub empty: usize,
    /// Why each bad record was skipped (`--skip-bad`), for the caller to report.
    pub skipped: Vec<String>,
}

pub struct LoadOptions {
    pub max_seq_len: usize,
    pub skip_bad: bool,
}

/// A record's prompt (no loss) and answer (loss) as chat turns or raw text.
enum Record {
    Text(String),
    PromptCompletion(String, String),
    Chat(Vec<ChatMessage>),
}

fn field_err(path: &Path, line: usize, field: &str, msg: impl Into<String>) -> DataError {
    DataError::Record {
        path: path.into(),
        line,
        field: field.into(),
        msg: msg.into(),
    }
}

fn str_field(
    obj: &serde_json::Map<String, Value>,
    path: &Path,
    line: usize,
    key: &str,
) -> Result<String, DataError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(field_err(
            path,
            line,
            key,
            format!("expected a string, got {}", type_name(other)),
        )),
        None => Err(field_err(path, line, key, "missing")),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_record(v: &Value, path: &Path, line: usize) -> Result<Record, DataError> {
    let obj = v.as_object().ok_or_else(|| {
        field_err(
            path,
            line,
            "record",
            format!("expected a JSON object, got {}", type_name(v)),
        )
    })?;
    if obj.contains_key("messages") {
        let msgs = obj["messages"]
            .as_array()
            .ok_or_else(|| field_err(path, line, "messages", "expected an array"))?;
        if msgs.is_empty() {
            return Err(field_err(path, line, "messages", "empty"));
        }
        let mut out = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let o = m.as_object().ok_or_else(|| {
                field_err(path, line, &format!("messages[{i}]"), "expected an object")
            })?;
            let role = str_field(o, path, line, "role").map_err(|_| {
                field_err(
                    path,
                    line,
                    &format!("messages[{i}].role"),
                    "missing or not a string",
                )
            })?;
            let content = str_field(o, path, line, "content").map_err(|_| {
                field_err(
                    path,
                    line,
                    &format!("messages[{i}].content"),
                    "missing or not a string",
                )
            })?;
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                return Err(field_err(
                    path,
                    line,
                    &format!("messages[{i}].role"),
                    format!("unknown role `{role}` (system, user or assistant)"),
                ));
            }
            out.push(ChatMessage { role, content });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err(field_err(
                path,
                line,
                "messages",
                "no assistant message: nothing to learn",
            ));
        }
        return Ok(Record::Chat(out));
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        return Ok(Record::PromptCompletion(
            str_field(obj, path, line, "prompt")?,
            str_field(obj, path, line, "completion")?,
        ));
    }
    if obj.contains_key("instruction") {
        let ins = str_field(obj, path, line, "instruction")?;
        let input = match obj.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(o) => {
                return Err(field_err(
                    path,
                    line,
                    "input",
                    format!("expected a string, got {}", type_name(o)),
                ))
            }
        };
        let output = str_field(obj, path, line, "output")?;
        let user = if input.trim().is_empty() {
            ins
        } else {
            format!("{ins}\n\n{input}")
        };
        return Ok(Record::Chat(vec![
            ChatMessage::new("user", &user),
            ChatMessage::new("assistant", &output),
        ]));
    }
    if obj.contains_key("text") {
        let t = str_field(obj, path, line, "text")?;
        if t.is_empty() {
            return Err(field_err(path, line, "text", "empty"));
        }
        return Ok(Record::Text(t));
    }
    Err(field_err(path, line, "record", "unknown format: expected `text`, `prompt`+`completion`, `messages` or `instruction`+`output`"))
}

/// Tokenize a chat: prompt segments masked, each assistant turn's content + EOS learned.
fn tokenize_chat(
    tok: &Tok,
    msgs: &[ChatMessage],
    eos: Option<u32>,
    path: &Path,
    line: usize,
) -> Result<(Vec<u32>, Vec<i64>), DataError> {
    let tok_err = |e: lowrank_model::ModelError| field_err(path, line, "messages", e.to_string());
    let mut ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut covered = String::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt_full = tok.render_chat(&msgs[..i], true).map_err(tok_err)?;
        let piece = prompt_full.strip_prefix(covered.as_str()).ok_or_else(|| {
            field_err(path, line, "messages", "the chat template does not render this conversation incrementally; cannot mask multi-turn")
        })?;
        let p = tok.encode(piece).map_err(tok_err)?;
        labels.extend(std::iter::repeat_n(IGNORE, p.len()));
        ids.extend(p);
        let mut c = tok.encode(&m.content).map_err(tok_err)?;
        if let Some(e) = eos {
            c.push(e);
        }
        labels.extend(c.iter().map(|&x| x as i64));
        ids.extend(c);
        covered = format!(
            "{prompt_full}{}{}",
            m.content,
            eos.and_then(|e| tok.inner.id_to_token(e))
                .unwrap_or_default()
        );
    }
    Ok((ids, labels))
}

/// Tokenize one record.
fn tokenize(
    tok: &Tok,
    rec: &Record,
    eos: Option<u32>,
    path: &Path,
    line: usize,
) -> Result<(Vec<u32>, Vec<i64>), DataError> {
    let tok_err = |e: lowrank_model::ModelError| field_err(path, line, "text", e.to_string());
    match rec {
        Record::Text(t) => {
            let ids = tok.encode(t).map_err(tok_err)?;
            let labels = ids.iter().map(|&x| x as i64).collect();
            Ok((ids, labels))
        }
        Record::PromptCompletion(p, c) => {
            let p = tok.encode(p).map_err(tok_err)?;
            let mut c = tok.encode(c).map_err(tok_err)?;
            if let Some(e) = eos {
                c.push(e);
            }
            let labels = std::iter::repeat_n(IGNORE, p.len())
                .chain(c.iter().map(|&x| x as i64))
                .collect();
            Ok(([p, c].concat(), labels))
        }
        Record::Chat(m) => tokenize_chat(tok, m, eos, path, line),
    }
}

/// Read and tokenize a JSONL file.
pub fn load_jsonl(
    path: &Path,
    tok: &Tok,
    eos: Option<u32>,
    opts: &LoadOptions,
) -> Result<(Vec<Sample>, LoadStats), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::File {
        path: path.into(),
        msg: e.to_string(),
    })?;
    parse_jsonl(&bytes, path, tok, eos, opts)
}

/// Tokenize the JSONL `bytes` of the file `path` (named in errors). Any input gives samples
/// or an error naming the line and field (or, for a file without a usable record, the file).
pub fn parse_jsonl(
    bytes: &[u8],
    path: &Path,
    tok: &Tok,
    eos: Option<u32>,
    opts: &LoadOptions,
) -> Result<(Vec<Sample>, LoadStats), DataError> {
    let mut out = Vec::new();
    let mut st = LoadStats::default();
    // A UTF-8 byte-order mark (Windows editors) is not part of the first record.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        // Decoded per line, so bad bytes are reported (or skipped) with their line.
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| {
                field_err(
                    path,
                    line,
                    "utf-8",
                    format!("invalid UTF-8 after byte {} of the line", e.valid_up_to()),
                )
            })
            .and_then(|l| {
                if l.trim().is_empty() {
                    return Ok(None);
                }
                serde_json::from_str::<Value>(l)
                    .map_err(|e| field_err(path, line, "json", format!("invalid JSON: {e}")))
                    .and_then(|v| parse_record(&v, path, line))
                    .and_then(|r| tokenize(tok, &r, eos, path, line))
                    .map(Some)
            });
        let (mut ids, mut labels) = match parsed {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) if opts.skip_bad => {
                st.skipped.push(e.to_string());
                st.skipped_bad += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        st.records += 1;
        if ids.len() > opts.max_seq_len {
            ids.truncate(opts.max_seq_len);
            labels.truncate(opts.max_seq_len);
            st.truncated += 1;
        }
        let s = Sample { ids, labels, line };
        if s.num_targets() == 0 {
            st.empty += 1;
            continue;
        }
        out.push(s);
    }
    if out.is_empty() {
        return Err(DataError::File {
            path: path.into(),
            msg: "no usable records".into(),
        });
    }
    Ok((out, st))
}

/// Greedy packing: concatenate samples into rows of at most `max_len` tokens. Each packed
/// row keeps its parts' boundaries so attention never crosses documents (see `Batch`).
pub fn pack(samples: &[Sample], max_len: usize) -> Vec<Vec<Sample>> {
    let mut rows: Vec<Vec<Sample>> = Vec::new();
    let mut cur: Vec<Sample> = Vec::new();
    let mut len = 0;
    for s in samples {
        if len + s.ids.len() > max_len && !cur.is_empty() {
            rows.push(std::mem::take(&mut cur));
            len = 0;
        }
        len += s.ids.len();
        cur.push(s.clone());
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows
}
