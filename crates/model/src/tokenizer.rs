//! Tokenizer and chat template, from GGUF metadata or a HF directory (tokenizer.json).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::chat::{render_chat, ChatMessage};
use crate::error::{ModelError, Result};
use crate::gguf::{value_u64, GgufFile};

/// A tokenizer with the model's special tokens and chat template.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

/// GPT-2's split regex (used by `ByteLevel` with `use_regex`), and Llama-3's, for
/// `tokenizer.ggml.pre` values that need an explicit `Split`.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tok {
    /// Build the byte-level BPE tokenizer GGUF describes (`tokenizer.ggml.model = gpt2`), the
    /// way transformers converts it: no normalizer, ByteLevel pre-tokenizer without prefix
    /// space, control / user-defined tokens as special added tokens.
    pub fn from_gguf(g: &GgufFile) -> Result<Tok> {
        let err = |m: String| ModelError::Tokenizer(format!("{}: {m}", g.path.display()));
        let model = g
            .meta_str("tokenizer.ggml.model")
            .ok_or_else(|| err("missing tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model = `{model}` is not supported (only gpt2 byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match g.meta(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.to_string()
                            .cloned()
                            .map_err(|_| err(format!("{key}: non-string element")))
                    })
                    .collect(),
                _ => Err(err(format!("missing {key}"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| value_u64(v).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // llama.cpp token types: 3 = control, 4 = user-defined.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let pre = g
            .meta_str("tokenizer.ggml.pre")
            .unwrap_or_else(|| "gpt2".into());
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match pre.as_str() {
            "llama3" | "llama-bpe" | "smaug-bpe" | "dbrx" => {
                json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": REGEX_LLAMA3}, "behavior": "Isolated", "invert": false},
                byte_level(false)]})
            }
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": REGEX_QWEN2}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
            // gpt2, smollm, starcoder, ...: GPT-2's own regex inside ByteLevel.
            _ => byte_level(true),
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec).expect("json"))
            .map_err(|e| err(format!("cannot build tokenizer: {e}")))?;
        let tok_str = |key: &str| {
            g.meta(key)
                .and_then(value_u64)
                .and_then(|i| tokens.get(i as usize).cloned())
        };
        let eos_ids: Vec<u32> = g
            .meta("tokenizer.ggml.eos_token_id")
            .and_then(value_u64)
            .map(|x| x as u32)
            .into_iter()
            .collect();
        Ok(Tok {
            inner,
            chat_template: g.meta_str("tokenizer.chat_template"),
            bos_token: tok_str("tokenizer.ggml.bos_token_id"),
            eos_token: tok_str("tokenizer.ggml.eos_token_id"),
            eos_ids,
        })
    }

    /// `tokenizer.json`, plus `tokenizer_config.json` (special tokens, template) and
    /// `chat_template.jinja` (transformers 5 keeps the template in its own file).
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Tok> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Json = match std::fs::read_to_string(&tc_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                ModelError::Tokenizer(format!("{}: invalid JSON: {e}", tc_path.display()))
            })?,
            Err(_) => Json::Null,
        };
        let special = |k: &str| -> Option<String> {
            match tc.get(k) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(String::from),
                _ => None,
            }
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| ModelError::Template(format!("{}: {e}", jinja.display())))?,
            )
        } else {
            tc.get("chat_template")
                .and_then(Json::as_str)
                .map(String::from)
        };
        let eos_token = special("eos_token");
        let mut eos_ids: Vec<u32> = eos_from_config.to_vec();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Tok {
            inner,
            chat_template,
            bos_token: special("bos_token"),
            eos_token,
            eos_ids,
        })
    }

    /// Token ids of `text`; no special tokens are added (special-token text is recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render `messages` with the model's own chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Template(
                "this model has no chat template (tokenizer.chat_template); use --prompt".into(),
            )
        })?;
        render_chat(
            tpl,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}
