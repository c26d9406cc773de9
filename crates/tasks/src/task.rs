//! Built-in niche tasks: seeded, deterministic generators of chat examples.
//!
//! Each task produces [`Example`]s made of a short system message (the task
//! statement), a user message (the input) and an assistant message (the exact
//! target). Generators are pure functions of `(split, n, seed)`.
//!
//! Held-out evaluation: the TRAIN and EVAL splits are drawn from *disjoint*
//! pools, fixed in the source code (they do not depend on the seed):
//! - entity values (names, cities, companies, numbers, ...) come from separate
//!   pools; numbers are assigned to a split by [`number_split`], a rule on the
//!   value itself, so the same number can never appear in both splits;
//! - templates (question phrasings, sentence realisations, clause wordings,
//!   case-description frames) are split too: an EVAL example always uses a
//!   wording never seen in TRAIN, expressing the same label semantics.
//!
//! Closed-vocabulary attribute values (SQL column names, E2E `food`, `area`,
//! `eatType`, ... values, patient sex) are part of the task definition and are
//! shared by both splits; they are not recorded as entities.
//!
//! [`ExampleMeta`] records the template id and the entity values used, so
//! tests can verify the disjointness from the data alone.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{ClausesTask, Data2TextTask, SqlTask, TriageTask};

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Provenance of a generated example (not written to JSONL).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExampleMeta {
    /// Template id, e.g. `sql/count_eq/t1` or `clauses/payment/e0`.
    pub template: String,
    /// Entity values used (as they appear in the text; numbers as plain digits).
    pub entities: Vec<String>,
}

/// A chat example; the last message is the assistant answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub messages: Vec<Message>,
    pub meta: ExampleMeta,
}

impl Example {
    /// The messages before the answer (what the model is prompted with).
    pub fn prompt(&self) -> &[Message] {
        &self.messages[..self.messages.len().saturating_sub(1)]
    }
    /// Content of the last user message (the task input).
    pub fn user(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
    /// Content of the final assistant message (the target).
    pub fn answer(&self) -> &str {
        self.messages
            .last()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

/// Evaluation metrics; see [`crate::metrics::score`] for units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Exact match after SQL normalisation (percentage, higher is better).
    Exact,
    /// Corpus BLEU-4 (0..100, higher is better).
    Bleu,
    /// Slot error rate (percentage, LOWER is better).
    SlotError,
    /// Label accuracy after label normalisation (percentage, higher is better).
    Accuracy,
}

impl Metric {
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Exact => "exact",
            Metric::Bleu => "bleu",
            Metric::SlotError => "slot_error",
            Metric::Accuracy => "accuracy",
        }
    }
    pub fn higher_is_better(&self) -> bool {
        !matches!(self, Metric::SlotError)
    }
}

/// A `--metric` value that names none of the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--metric `{0}`: use exact, bleu, slot-error or accuracy")]
pub struct UnknownMetric(pub String);

/// `exact | bleu | slot-error | accuracy` (also `slot_error`, as [`Metric::name`] spells it).
impl std::str::FromStr for Metric {
    type Err = UnknownMetric;
    fn from_str(s: &str) -> Result<Self, UnknownMetric> {
        Ok(match s.trim() {
            "exact" => Metric::Exact,
            "bleu" => Metric::Bleu,
            "slot-error" | "slot_error" => Metric::SlotError,
            "accuracy" => Metric::Accuracy,
            other => return Err(UnknownMetric(other.to_string())),
        })
    }
}

/// Which held-out side of a task to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Eval,
}

/// A built-in task.
pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn metrics(&self) -> Vec<Metric>;
    /// `n` examples of `split`, a pure function of `(split, n, seed)`.
    fn generate(&self, split: Split, n: usize, seed: u64) -> Vec<Example>;
}

/// All built-in tasks, in a stable order.
pub fn all_tasks() -> Vec<Box<dyn Task>> {
    vec![
        Box::new(SqlTask),
        Box::new(Data2TextTask),
        Box::new(ClausesTask),
        Box::new(TriageTask),
    ]
}

/// Look a task up by its name (case-insensitive).
pub fn task_by_name(name: &str) -> Option<Box<dyn Task>> {
    let want = name.trim().to_ascii_lowercase();
    all_tasks().into_iter().find(|t| t.name() == want)
}

#[derive(Serialize)]
struct JsonlLine<'a> {
    messages: &'a [Message],
}

/// Write `{"messages":[{"role":..,"content":..},..]}` per line, atomically:
/// a temporary file in the same directory is written, fsynced and renamed
/// over `path`. `meta` is not written.
pub fn write_jsonl(examples: &[Example], path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let file = fs::File::create(&tmp)?;
        let mut w = io::BufWriter::new(file);
        for ex in examples {
            serde_json::to_writer(
                &mut w,
                &JsonlLine {
                    messages: &ex.messages,
                },
            )
            .map_err(io::Error::other)?;
            w.write_all(b"\n")?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename durable (best effort: not every platform can open a dir).
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write `dir/train.jsonl` (n_train examples) and `dir/eval.jsonl` (n_eval).
pub fn make_task_files(
    task: &dyn Task,
    dir: &Path,
    seed: u64,
    n_train: usize,
    n_eval: usize,
) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_jsonl(
        &task.generate(Split::Train, n_train, seed),
        &dir.join("train.jsonl"),
    )?;
    write_jsonl(
        &task.generate(Split::Eval, n_eval, seed),
        &dir.join("eval.jsonl"),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared generator helpers.

/// A pool of values split by hand between train and eval.
pub(crate) struct Pool {
    pub train: &'static [&'static str],
    pub eval: &'static [&'static str],
}

impl Pool {
    pub fn get(&self, split: Split) -> &'static [&'static str] {
        match split {
            Split::Train => self.train,
            Split::Eval => self.eval,
        }
    }
}

/// The split a number belongs to: strip trailing zeros, then EVAL iff the
/// remainder is 3 mod 4 (about a quarter of the values). Being a function of
/// the value, a number is never used by both splits, whatever it denotes.
pub fn number_split(n: u64) -> Split {
    let mut m = n;
    while m > 0 && m.is_multiple_of(10) {
        m /= 10;
    }
    if m % 4 == 3 {
        Split::Eval
    } else {
        Split::Train
    }
}

/// The values of `candidates` that belong to `split`.
pub(crate) fn numbers(split: Split, candidates: impl IntoIterator<Item = u64>) -> Vec<u64> {
    candidates
        .into_iter()
        .filter(|&n| number_split(n) == split)
        .collect()
}

/// Deterministic RNG for (task, split, seed).
pub(crate) fn rng_for(task: &str, split: Split, seed: u64) -> ChaCha8Rng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in task.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let salt = match split {
        Split::Train => 0x7472_6169_6e00_0001u64,
        Split::Eval => 0x6576_616c_0000_0002u64,
    };
    ChaCha8Rng::seed_from_u64(seed ^ h ^ salt)
}

/// Call `make(i)` until `n` examples exist, avoiding duplicate user prompts
/// within the split as far as the pools allow (bounded retries).
pub(crate) fn generate_unique(n: usize, mut make: impl FnMut(usize) -> Example) -> Vec<Example> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ex = make(i);
        let mut tries = 0;
        while seen.contains(ex.user()) && tries < 64 {
            ex = make(i);
            tries += 1;
        }
        seen.insert(ex.user().to_string());
        out.push(ex);
    }
    out
}

/// Assemble a system/user/assistant example.
pub(crate) fn example(
    system: &str,
    user: String,
    answer: String,
    template: String,
    entities: Vec<String>,
) -> Example {
    let mut entities = entities;
    entities.sort();
    entities.dedup();
    Example {
        messages: vec![
            Message::system(system),
            Message::user(user),
            Message::assistant(answer),
        ],
        meta: ExampleMeta { template, entities },
    }
}

/// Replace `{key}` placeholders.
pub(crate) fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    debug_assert!(!s.contains('{'), "unfilled placeholder in {s:?}");
    s
}

/// Turn the article "a" into "an" before a word starting with a vowel letter.
pub(crate) fn fix_articles(s: &str) -> String {
    let words: Vec<&str> = s.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        let next_vowel = words.get(i + 1).is_some_and(|n| starts_with_vowel_sound(n));
        match *w {
            "a" if next_vowel => out.push("an"),
            "A" if next_vowel => out.push("An"),
            _ => out.push(w),
        }
    }
    out.join(" ")
}

/// Vowel letter (not `u`: "a unit"), or a number read with a vowel sound
/// ("an 8-year-old", "an 11", "an 18", "an 80").
fn starts_with_vowel_sound(word: &str) -> bool {
    let Some(c) = word.chars().next() else {
        return false;
    };
    if "aeioAEIO".contains(c) {
        return true;
    }
    let digits: String = word.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.starts_with('8') || digits == "11" || digits == "18"
}

/// Upper-case the first character.
pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{clauses, triage};
    use std::collections::HashMap;

    #[test]
    fn metric_names_parse_back() {
        for m in [
            Metric::Exact,
            Metric::Bleu,
            Metric::SlotError,
            Metric::Accuracy,
        ] {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
        }
        assert_eq!(" slot-error ".parse::<Metric>().unwrap(), Metric::SlotError);
        let e = "nope".parse::<Metric>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--metric `nope`: use exact, bleu, slot-error or accuracy"
        );
    }

    const N: usize = 300;

    fn user_prompts(exs: &[Example]) -> HashSet<String> {
        exs.iter().map(|e| e.user().to_string()).collect()
    }

    #[test]
    fn registry_names() {
        let names: Vec<_> = all_tasks().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["sql", "data2text", "clauses", "triage"]);
        for n in &names {
            assert_eq!(task_by_name(n).unwrap().name(), *n);
            assert!(!task_by_name(n).unwrap().metrics().is_empty());
        }
        assert_eq!(task_by_name("SQL").unwrap().name(), "sql");
        assert!(task_by_name("nope").is_none());
    }

    #[test]
    fn deterministic_under_seed() {
        for task in all_tasks() {
            for split in [Split::Train, Split::Eval] {
                let a = task.generate(split, 50, 7);
                let b = task.generate(split, 50, 7);
                assert_eq!(
                    a,
                    b,
                    "{} {:?}: same seed must give identical examples",
                    task.name(),
                    split
                );
                let c = task.generate(split, 50, 8);
                assert_ne!(
                    a,
                    c,
                    "{} {:?}: different seeds must differ",
                    task.name(),
                    split
                );
                assert_eq!(a.len(), 50);
            }
            // A prefix of a longer run is not required, but n must be honoured.
            assert_eq!(task.generate(Split::Train, 0, 1).len(), 0);
        }
    }

    #[test]
    fn train_and_eval_are_disjoint() {
        for task in all_tasks() {
            // Several seeds: disjointness must not depend on the seed.
            let mut train = Vec::new();
            let mut eval = Vec::new();
            for seed in 0..3 {
                train.extend(task.generate(Split::Train, N, seed));
                eval.extend(task.generate(Split::Eval, N, seed));
            }
            let tr_ent: HashSet<&str> = train
                .iter()
                .flat_map(|e| e.meta.entities.iter().map(|s| s.as_str()))
                .collect();
            let ev_ent: HashSet<&str> = eval
                .iter()
                .flat_map(|e| e.meta.entities.iter().map(|s| s.as_str()))
                .collect();
            assert!(
                !tr_ent.is_empty() && !ev_ent.is_empty(),
                "{}: no entities recorded",
                task.name()
            );
            let shared: Vec<_> = tr_ent.intersection(&ev_ent).collect();
            assert!(
                shared.is_empty(),
                "{}: entities shared by train and eval: {shared:?}",
                task.name()
            );

            let tr_tpl: HashSet<&str> = train.iter().map(|e| e.meta.template.as_str()).collect();
            let ev_tpl: HashSet<&str> = eval.iter().map(|e| e.meta.template.as_str()).collect();
            let shared: Vec<_> = tr_tpl.intersection(&ev_tpl).collect();
            assert!(
                shared.is_empty(),
                "{}: templates shared: {shared:?}",
                task.name()
            );
            assert!(
                tr_tpl.len() >= 4 && ev_tpl.len() >= 2,
                "{}: too few templates",
                task.name()
            );

            let tr_u = user_prompts(&train);
            let ev_u = user_prompts(&eval);
            let shared: Vec<_> = tr_u.intersection(&ev_u).collect();
            assert!(
                shared.is_empty(),
                "{}: identical prompts: {shared:?}",
                task.name()
            );

            // Entities must actually appear in the text they were recorded for.
            for e in train.iter().chain(&eval) {
                let text = format!("{}\n{}", e.user(), e.answer());
                for ent in &e.meta.entities {
                    assert!(
                        text.contains(ent.as_str()),
                        "{}: entity {ent:?} not in {text:?}",
                        task.name()
                    );
                }
            }
        }
    }

    #[test]
    fn examples_are_well_formed_and_varied() {
        for task in all_tasks() {
            for split in [Split::Train, Split::Eval] {
                let exs = task.generate(split, N, 3);
                for e in &exs {
                    let roles: Vec<_> = e.messages.iter().map(|m| m.role.as_str()).collect();
                    assert_eq!(roles, ["system", "user", "assistant"]);
                    assert!(e.messages.iter().all(|m| !m.content.trim().is_empty()));
                    assert!(!e.meta.template.is_empty());
                    assert!(
                        !e.user().contains('{') && !e.answer().contains('{'),
                        "unfilled: {e:?}"
                    );
                    // Rough token budget: whitespace words of all messages.
                    let words: usize = e
                        .messages
                        .iter()
                        .map(|m| m.content.split_whitespace().count())
                        .sum();
                    assert!(
                        words <= 110,
                        "{}: example too long ({words} words): {e:?}",
                        task.name()
                    );
                }
                // Mostly unique inputs (memorising impossible).
                let uniq = user_prompts(&exs).len();
                assert!(
                    uniq * 100 >= exs.len() * 95,
                    "{} {:?}: only {uniq}/{} unique prompts",
                    task.name(),
                    split,
                    exs.len()
                );
            }
        }
    }

    #[test]
    fn classification_labels_balanced_and_in_label_set() {
        let cases: [(&str, &[&str]); 2] =
            [("clauses", clauses::LABELS), ("triage", triage::LABELS)];
        for (name, labels) in cases {
            let task = task_by_name(name).unwrap();
            assert!(labels.len() >= 8);
            for split in [Split::Train, Split::Eval] {
                let exs = task.generate(split, 200, 11);
                let mut counts: HashMap<&str, usize> = HashMap::new();
                for e in &exs {
                    assert!(
                        labels.contains(&e.answer()),
                        "{name}: answer {:?} not a label",
                        e.answer()
                    );
                    *counts.entry(e.answer()).or_default() += 1;
                    // The system prompt lists every label.
                    for l in labels {
                        assert!(e.messages[0].content.contains(l));
                    }
                }
                assert_eq!(
                    counts.len(),
                    labels.len(),
                    "{name} {split:?}: some label never generated"
                );
                let (lo, hi) = (
                    counts.values().min().unwrap(),
                    counts.values().max().unwrap(),
                );
                assert!(
                    hi - lo <= 1,
                    "{name} {split:?}: unbalanced labels {counts:?}"
                );
                // Labels are not in a fixed cyclic order (shuffled).
                let first: Vec<_> = exs.iter().take(labels.len()).map(|e| e.answer()).collect();
                assert_ne!(first, labels.to_vec(), "{name}: labels not shuffled");
            }
        }
    }

    #[test]
    fn number_split_rule() {
        assert_eq!(number_split(3), Split::Eval);
        assert_eq!(number_split(30), Split::Eval);
        assert_eq!(number_split(31000), Split::Eval);
        assert_eq!(number_split(4), Split::Train);
        assert_eq!(number_split(45000), Split::Train);
        assert_eq!(number_split(0), Split::Train);
        let tr = numbers(Split::Train, 1..=100);
        let ev = numbers(Split::Eval, 1..=100);
        assert_eq!(tr.len() + ev.len(), 100);
        assert!(ev.len() >= 15 && ev.len() <= 35);
    }

    #[test]
    fn article_fixing() {
        assert_eq!(
            fix_articles("a Italian pub and a coffee shop"),
            "an Italian pub and a coffee shop"
        );
        assert_eq!(fix_articles("A age of a"), "An age of a");
        assert_eq!(
            fix_articles("a 82-year-old and a 18-year-old and a 11 and a 1-year-old and a 110"),
            "an 82-year-old and an 18-year-old and an 11 and a 1-year-old and a 110"
        );
    }

    #[test]
    fn jsonl_round_trip_and_atomic() {
        let dir = std::env::temp_dir().join(format!("lowrank-tasks-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let task = task_by_name("sql").unwrap();
        make_task_files(task.as_ref(), &dir, 5, 12, 4).unwrap();
        let train = fs::read_to_string(dir.join("train.jsonl")).unwrap();
        let eval = fs::read_to_string(dir.join("eval.jsonl")).unwrap();
        assert_eq!(train.lines().count(), 12);
        assert_eq!(eval.lines().count(), 4);
        let expected = task.generate(Split::Train, 12, 5);
        for (line, ex) in train.lines().zip(&expected) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let obj = v.as_object().unwrap();
            assert_eq!(
                obj.keys().collect::<Vec<_>>(),
                ["messages"],
                "meta must not be written"
            );
            let msgs: Vec<Message> = serde_json::from_value(v["messages"].clone()).unwrap();
            assert_eq!(msgs, ex.messages);
        }
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Overwriting works.
        write_jsonl(&expected[..3], &dir.join("train.jsonl")).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("train.jsonl"))
                .unwrap()
                .lines()
                .count(),
            3
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
