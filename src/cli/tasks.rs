//! `lowrank tasks list | make`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use lowrank_tasks::{all_tasks, make_task_files, task_by_name};

#[derive(Subcommand)]
pub enum TasksCmd {
    /// The built-in niche tasks and their metrics.
    List,
    /// Write train.jsonl / eval.jsonl (chat `messages` format) for a task.
    Make {
        /// Task name (see `lowrank tasks list`).
        name: String,
        /// Directory for train.jsonl and eval.jsonl.
        #[arg(long)]
        out: PathBuf,
        /// Generator seed (same seed, same files).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training examples to write.
        #[arg(long, default_value_t = 400)]
        train: usize,
        /// Held-out examples to write.
        #[arg(long, default_value_t = 100)]
        eval: usize,
    },
}

pub fn run(c: TasksCmd) -> Result<()> {
    match c {
        TasksCmd::List => {
            for t in all_tasks() {
                let m: Vec<_> = t.metrics().iter().map(|m| m.name()).collect();
                println!("{:<10} {:<28} {}", t.name(), m.join(", "), t.description());
            }
        }
        TasksCmd::Make {
            name,
            out,
            seed,
            train,
            eval,
        } => {
            let t = task_by_name(&name)
                .with_context(|| format!("unknown task `{name}` (see `lowrank tasks list`)"))?;
            if train == 0 || eval == 0 {
                anyhow::bail!("--train and --eval must be ≥ 1");
            }
            make_task_files(t.as_ref(), &out, seed, train, eval)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {} and {}",
                out.join("train.jsonl").display(),
                out.join("eval.jsonl").display()
            );
        }
    }
    Ok(())
}
