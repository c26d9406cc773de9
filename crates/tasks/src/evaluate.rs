//! Generation-based evaluation: batched greedy decoding on held-out prompts, scored with the
//! task's metrics (exact match, BLEU, slot error rate, accuracy).

use std::path::Path;

use lowrank_model::chat::ChatMessage;
use lowrank_model::generate::greedy_batch;
use lowrank_model::model::AdapterSet;
use lowrank_model::LoadedModel;
use serde::Serialize;

use lowrank_train::data::DataError;
use lowrank_train::progress::Event;

use crate::metrics::{exact_match, normalize_label, score, slot_errors};
use crate::task::{Metric, Split, Task};

/// A prompt (chat turns before the answer), the expected answer and the metric input
/// (the user message: the meaning representation for the slot metric).
#[derive(Debug, Clone)]
pub struct GenExample {
    pub prompt: Vec<ChatMessage>,
    pub gold: String,
    pub input: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub input: String,
    pub expected: String,
    pub got: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenEval {
    /// (metric name, value) in the task's order.
    pub scores: Vec<(String, f64)>,
    pub n: usize,
    pub failures: Vec<Failure>,
    pub wall_s: f64,
    pub generated_tokens: usize,
}

impl GenEval {
    pub fn get(&self, metric: &str) -> Option<f64> {
        self.scores
            .iter()
            .find(|(m, _)| m == metric)
            .map(|(_, v)| *v)
    }
}

pub fn examples_from_task(task: &dyn Task, n: usize, seed: u64) -> Vec<GenExample> {
    task.generate(Split::Eval, n, seed)
        .into_iter()
        .map(|e| GenExample {
            prompt: e
                .prompt()
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect(),
            gold: e.answer().to_string(),
            input: e.user().to_string(),
        })
        .collect()
}

/// `{"messages": [...]}` (last message = the expected assistant answer) or
/// `{"prompt","completion"}` records.
pub fn examples_from_jsonl(path: &Path) -> Result<Vec<GenExample>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::File {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let err = |field: &str, msg: &str| DataError::Record {
            path: path.into(),
            line: i + 1,
            field: field.into(),
            msg: msg.into(),
        };
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| err("json", &format!("invalid JSON: {e}")))?;
        if let Some(msgs) = v.get("messages") {
            let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone())
                .map_err(|e| err("messages", &e.to_string()))?;
            let Some((last, prompt)) = msgs.split_last() else {
                return Err(err("messages", "empty"));
            };
            if last.role != "assistant" {
                return Err(err(
                    "messages",
                    "the last message must be the expected assistant answer",
                ));
            }
            let input = prompt
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default();
            out.push(GenExample {
                prompt: prompt.to_vec(),
                gold: last.content.clone(),
                input,
            });
        } else {
            let p = v
                .get("prompt")
                .and_then(|x| x.as_str())
                .ok_or_else(|| err("prompt", "missing or not a string"))?;
            let c = v
                .get("completion")
                .and_then(|x| x.as_str())
                .ok_or_else(|| err("completion", "missing or not a string"))?;
            out.push(GenExample {
                prompt: vec![ChatMessage::new("user", p)],
                gold: c.to_string(),
                input: p.to_string(),
            });
        }
    }
    if out.is_empty() {
        return Err(DataError::File {
            path: path.into(),
            msg: "no records".into(),
        });
    }
    Ok(out)
}

fn failed(metric: Metric, ex: &GenExample, got: &str) -> bool {
    match metric {
        Metric::Exact => !exact_match(got, &ex.gold),
        Metric::Accuracy => normalize_label(got) != normalize_label(&ex.gold),
        Metric::SlotError => slot_errors(&ex.input, got).0 > 0,
        Metric::Bleu => got.trim() != ex.gold.trim(),
    }
}

/// The metrics of `outs` (one answer per example, in order) and the failures by the first
/// metric.
fn score_outputs(
    examples: &[GenExample],
    metrics: &[Metric],
    outs: &[String],
) -> (Vec<(String, f64)>, Vec<Failure>) {
    let golds: Vec<String> = examples.iter().map(|e| e.gold.clone()).collect();
    let inputs: Vec<String> = examples.iter().map(|e| e.input.clone()).collect();
    let scores = metrics
        .iter()
        .map(|m| (m.name().to_string(), score(m, outs, &golds, &inputs)))
        .collect();
    let primary = metrics.first().copied().unwrap_or(Metric::Exact);
    let failures = examples
        .iter()
        .zip(outs)
        .filter(|(e, o)| failed(primary, e, o))
        .map(|(e, o)| Failure {
            input: e.input.clone(),
            expected: e.gold.clone(),
            got: o.clone(),
        })
        .collect();
    (scores, failures)
}

/// Score answers produced elsewhere (another engine, e.g. llama.cpp with a merged GGUF) with
/// the same metrics as [`eval_generation`]: `predictions[i]` answers `examples[i]` (trimmed,
/// as lowrank's own answers are).
pub fn score_predictions(
    examples: &[GenExample],
    metrics: &[Metric],
    predictions: &[String],
) -> GenEval {
    let outs: Vec<String> = predictions.iter().map(|p| p.trim().to_string()).collect();
    let (scores, failures) = score_outputs(examples, metrics, &outs);
    GenEval {
        scores,
        n: examples.len(),
        failures,
        wall_s: 0.0,
        generated_tokens: 0,
    }
}

/// Greedy-decode every prompt (in batches) and score; the examples decoded go to `progress`.
pub fn eval_generation(
    lm: &LoadedModel,
    examples: &[GenExample],
    metrics: &[Metric],
    adapters: Option<AdapterSet>,
    batch: usize,
    progress: &mut dyn FnMut(&Event),
) -> lowrank_model::Result<GenEval> {
    let t0 = std::time::Instant::now();
    let eos = lm.eos_ids();
    let mut prompts = Vec::with_capacity(examples.len());
    let mut max_gold = 0;
    for e in examples {
        let text = lm.tok.render_chat(&e.prompt, true)?;
        prompts.push(lm.tok.encode(&text)?);
        max_gold = max_gold.max(lm.tok.encode(&e.gold)?.len());
    }
    // Room for a longer (wrong) answer, bounded so a rambling base model can't stall the run.
    let max_tokens = (max_gold * 2 + 8).min(160);
    progress(&Event::Begin {
        label: if adapters.is_some() {
            "eval adapter"
        } else {
            "eval base"
        }
        .into(),
        total: Some(examples.len()),
    });
    let mut outs: Vec<String> = Vec::with_capacity(examples.len());
    let mut generated = 0;
    for chunk in prompts.chunks(batch.max(1)) {
        let ads = vec![adapters.clone(); chunk.len()];
        let ids = greedy_batch(&lm.model, chunk, &ads, max_tokens, &eos)?;
        for i in ids {
            generated += i.len();
            outs.push(lm.tok.decode(&i)?.trim().to_string());
        }
        progress(&Event::Advance {
            done: outs.len(),
            item: None,
        });
    }
    progress(&Event::End);
    let (scores, failures) = score_outputs(examples, metrics, &outs);
    Ok(GenEval {
        scores,
        n: examples.len(),
        failures,
        wall_s: t0.elapsed().as_secs_f64(),
        generated_tokens: generated,
    })
}
