//! The LoRA paper's experiments on our model (Hu et al. 2021), the demo, and their reports.
//!
//! Data flows: a [`DataSpec`] (a built-in task of `lowrank-tasks`, or JSONL files and a metric)
//! is prepared into training data and held-out examples → each configuration is trained by
//! `lowrank-train`'s `Trainer` and scored by `lowrank-tasks`' generation-based evaluation
//! ([`train_and_score`]) → the experiment gathers the results into a report: [`sweep`] (rank ×
//! weight type, Table 6; a parameter budget over weight types, Table 5), [`analysis`] (subspace
//! similarity, Figures 3–4; feature amplification, Table 7), [`compare`] (LoRA vs full
//! fine-tuning), [`demo`] (one adapter per built-in task against the base) → JSON, Markdown and
//! SVG charts ([`report`], [`plot`]). Adapter arithmetic (`combine`) is `lowrank-lora`'s.
//!
//! Every training run is time-boxed (`time_budget_s`, `max_steps`). Progress goes to a
//! callback as `lowrank_train::progress::Event`s; the `lowrank` binary draws it.

pub mod analysis;
pub mod compare;
pub mod demo;
pub mod plot;
pub mod report;
pub mod runs;
pub mod sweep;

pub use runs::{
    better, err, fmt_metric, fmt_opt, parse_ranks, parse_target_sets, score_adapter, targets_of,
    train_and_score, weight_label, write_file, DataSpec, ExpError, Prepared, Result, RunResult,
    RunSettings,
};
