//! The built-in niche tasks, their metrics, and generation-based evaluation.
//!
//! Data flows: a [`Task`] (sql, data2text, clauses, triage: seeded generators whose train and
//! eval splits draw on disjoint entities and wordings) → [`Example`]s → chat JSONL for
//! training (`make_task_files`, read by `lowrank-train`) and held-out prompts for
//! [`evaluate`] (batched greedy decoding with or without an adapter) → [`metrics`] (exact match,
//! BLEU, slot error rate, accuracy). Progress is reported as `lowrank_train::progress::Event`s.
//!
//! Below it: `lowrank-model` (generation) and `lowrank-train` (its data error type). Above it:
//! `lowrank-experiments` and the `lowrank` binary (`tasks`, `eval --task`, `demo`).

pub mod clauses;
pub mod data2text;
pub mod evaluate;
pub mod metrics;
pub mod sql;
pub mod task;
pub mod triage;

pub use clauses::ClausesTask;
pub use data2text::Data2TextTask;
pub use sql::SqlTask;
pub use task::{
    all_tasks, make_task_files, number_split, task_by_name, write_jsonl, Example, ExampleMeta,
    Message, Metric, Split, Task, UnknownMetric,
};
pub use triage::TriageTask;
