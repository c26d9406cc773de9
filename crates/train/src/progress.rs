//! Progress events. The libraries never draw: a long call takes a callback
//! (`&mut dyn FnMut(&Event)`, e.g. [`crate::Trainer::run_with_progress`]) and reports what happens
//! through it; the binary renders the events (bars, log lines), tests pass [`silent`].
//! The crates above this one (tasks, experiments) report through the same events.

use std::path::PathBuf;

use crate::config::Method;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Training starts at optimizer step `step` (0, or the step of a resumed checkpoint) of `total`.
    TrainStart {
        method: Method,
        step: usize,
        total: usize,
    },
    /// An optimizer step finished: its loss and learning rate, and the run's throughput so far.
    TrainStep {
        step: usize,
        loss: f64,
        lr: f64,
        tok_per_s: f64,
    },
    /// The eval loss measured during training (every `eval_every` steps).
    TrainEval { step: usize, loss: f64 },
    /// The training loop ended (the final evaluation and saving follow).
    TrainEnd,
    /// The stop flag (Ctrl-C) ended the run: a checkpoint to resume from was written.
    Interrupted { step: usize, checkpoint: PathBuf },
    /// Another job starts: `total` units (examples decoded, modules analysed), or `None` for
    /// something of unknown length (a child process).
    Begin { label: String, total: Option<usize> },
    /// `done` units of the current job are complete; `item` names the one now in progress.
    Advance { done: usize, item: Option<String> },
    /// The current job ended.
    End,
    /// A line for the log (a phase of an experiment, a configuration's result).
    Note(String),
    /// Something the user should see even without progress output (a skipped bad record).
    Warning(String),
}

/// A callback that ignores every event.
pub fn silent(_: &Event) {}
