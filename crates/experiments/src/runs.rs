//! What the experiments share: the error type, data preparation (a built-in task or JSONL
//! files → training file + held-out examples), one LoRA configuration trained and scored, and
//! the formatting of their tables.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lowrank_lora::Target;
use lowrank_model::LoadedModel;
use lowrank_tasks::evaluate::{
    eval_generation, examples_from_jsonl, examples_from_task, GenExample,
};
use lowrank_tasks::{task_by_name, Metric};
use lowrank_train::progress::Event;
use lowrank_train::{Method, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

/// An experiment error: a message naming what went wrong (the CLI prints it and exits ≠ 0).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpError(pub String);

impl std::fmt::Display for ExpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExpError {}

macro_rules! from_err {
    ($($t:ty),*) => {$(
        impl From<$t> for ExpError {
            fn from(e: $t) -> Self { ExpError(e.to_string()) }
        }
    )*};
}
from_err!(
    lowrank_train::TrainError,
    lowrank_train::data::DataError,
    lowrank_model::ModelError,
    lowrank_lora::LoraError,
    candle_core::Error,
    serde_json::Error,
    std::fmt::Error,
    lowrank_tasks::UnknownMetric
);

pub type Result<T> = std::result::Result<T, ExpError>;

pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(ExpError(msg.into()))
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExpError + '_ {
    move |e| ExpError(format!("{}: {e}", path.display()))
}

/// Write a file, creating its directory.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).map_err(io_err(p))?;
    }
    std::fs::write(path, text).map_err(io_err(path))
}

/// Where the data comes from: a built-in task, or training + held-out JSONL files and a metric.
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    pub task: Option<String>,
    pub data: Option<PathBuf>,
    pub eval: Option<PathBuf>,
    pub metric: Option<String>,
    /// Training examples generated for a task.
    pub n_train: usize,
    /// Held-out examples scored by generation.
    pub n_eval: usize,
    /// Held-out examples for the eval loss (0: none).
    pub n_eval_loss: usize,
    pub seed: u64,
}

/// Data ready for training and scoring.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// "sql" or the training file's name.
    pub name: String,
    pub train: PathBuf,
    /// JSONL for the eval loss (a prefix of the held-out set).
    pub eval_loss: Option<PathBuf>,
    pub examples: Vec<GenExample>,
    pub metric: Metric,
}

impl DataSpec {
    /// Generate the task files into `dir/data` (or check the given files).
    pub fn prepare(&self, dir: &Path) -> Result<Prepared> {
        let metric = self
            .metric
            .as_deref()
            .map(str::parse::<Metric>)
            .transpose()?;
        match (&self.task, &self.data) {
            (Some(_), Some(_)) => err("give either --task or --data/--eval, not both"),
            (None, None) => err("give --task NAME, or --data FILE --eval FILE --metric M"),
            (Some(t), None) => {
                let task = task_by_name(t).ok_or_else(|| {
                    let names: Vec<_> = lowrank_tasks::all_tasks()
                        .iter()
                        .map(|t| t.name())
                        .collect();
                    ExpError(format!(
                        "unknown task `{t}` (available: {})",
                        names.join(", ")
                    ))
                })?;
                if self.n_eval == 0 || self.n_train == 0 {
                    return err("--n-train and --n-eval must be ≥ 1");
                }
                let dd = dir.join("data");
                lowrank_tasks::make_task_files(
                    task.as_ref(),
                    &dd,
                    self.seed,
                    self.n_train,
                    self.n_eval.max(self.n_eval_loss),
                )
                .map_err(io_err(&dd))?;
                let examples = examples_from_task(task.as_ref(), self.n_eval, self.seed);
                let eval_loss = if self.n_eval_loss > 0 {
                    let p = dd.join("eval_loss.jsonl");
                    let ex = task.generate(lowrank_tasks::Split::Eval, self.n_eval_loss, self.seed);
                    lowrank_tasks::write_jsonl(&ex, &p).map_err(io_err(&p))?;
                    Some(p)
                } else {
                    None
                };
                Ok(Prepared {
                    name: task.name().to_string(),
                    train: dd.join("train.jsonl"),
                    eval_loss,
                    examples,
                    metric: metric.unwrap_or_else(|| task.metrics()[0]),
                })
            }
            (None, Some(d)) => {
                let e = self.eval.as_ref().ok_or_else(|| {
                    ExpError("--data needs --eval FILE (held-out examples to score)".into())
                })?;
                let metric = metric.ok_or_else(|| {
                    ExpError("--data needs --metric (exact, bleu, slot-error or accuracy)".into())
                })?;
                if !d.is_file() {
                    return err(format!("{}: no such file", d.display()));
                }
                let mut examples = examples_from_jsonl(e)?;
                if self.n_eval > 0 {
                    examples.truncate(self.n_eval);
                }
                let name = d
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "data".into());
                Ok(Prepared {
                    name,
                    train: d.clone(),
                    eval_loss: (self.n_eval_loss > 0).then(|| e.clone()),
                    examples,
                    metric,
                })
            }
        }
    }
}

/// "q_proj" → "Wq"; a set → "Wq,Wv".
pub fn weight_label(targets: &[String]) -> String {
    targets
        .iter()
        .map(|t| match t.as_str() {
            "all-linear" => "all-linear".to_string(),
            t => format!("W{}", t.trim_end_matches("_proj")),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parse target sets: each item may hold several sets separated by `|` (`q|q,v|q,k,v,o`);
/// short names are expanded to PEFT names.
pub fn parse_target_sets(items: &[String]) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for item in items {
        for set in item.split(['|', ';']) {
            let names: Vec<String> = set
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if names.is_empty() {
                return err(format!("--targets `{item}`: empty module set"));
            }
            let cfg = TrainConfig {
                targets: names,
                ..TrainConfig::default()
            };
            let full = cfg.target_names().map_err(ExpError)?;
            if !out.contains(&full) {
                out.push(full);
            }
        }
    }
    if out.is_empty() {
        return err("--targets: give at least one module set, e.g. q|q,v|q,k,v,o");
    }
    Ok(out)
}

/// The projections of a (expanded) target list.
pub fn targets_of(names: &[String]) -> Vec<Target> {
    if names.iter().any(|n| n == "all-linear") {
        return Target::ALL.to_vec();
    }
    names
        .iter()
        .filter_map(|n| Target::from_peft_name(n))
        .collect()
}

/// One trained and scored configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub targets: Vec<String>,
    pub label: String,
    pub rank: usize,
    pub alpha: f64,
    pub trainable_params: usize,
    pub steps: usize,
    pub train_wall_s: f64,
    pub tok_per_s: f64,
    pub final_loss: Option<f64>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    /// The held-out generation metric (percentage or BLEU).
    pub metric: f64,
    pub eval_n: usize,
    pub eval_wall_s: f64,
    /// Output directory relative to the experiment directory.
    pub dir: String,
}

/// Settings shared by the configurations of an experiment.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Base settings (lr, batch size, steps, time box, seed…); rank/targets/out are set per run.
    pub base: TrainConfig,
    pub eval_batch: usize,
}

/// Score `examples` with the adapter folded into a copy of the base (no adapter latency).
pub fn score_adapter(
    lm: &mut LoadedModel,
    adapter: Option<lowrank_lora::Adapter>,
    p: &Prepared,
    batch: usize,
    progress: &mut dyn FnMut(&Event),
) -> Result<(f64, usize, f64)> {
    let ev = match adapter {
        Some(a) => {
            let set = vec![(Arc::new(a), 1.0)];
            let merged = lm.model.merged(&set)?;
            let base = std::mem::replace(&mut lm.model, merged);
            let r = eval_generation(lm, &p.examples, &[p.metric], None, batch, progress);
            lm.model = base;
            r?
        }
        None => eval_generation(lm, &p.examples, &[p.metric], None, batch, progress)?,
    };
    let v = ev.get(p.metric.name()).unwrap_or(f64::NAN);
    Ok((v, ev.n, ev.wall_s))
}

/// Train one LoRA configuration into `root/dir`, then score it on the held-out examples.
#[allow(clippy::too_many_arguments)]
pub fn train_and_score(
    lm: &mut LoadedModel,
    p: &Prepared,
    s: &RunSettings,
    targets: &[String],
    rank: usize,
    root: &Path,
    dir: &str,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Event),
) -> Result<RunResult> {
    let mut cfg = s.base.clone();
    cfg.targets = targets.to_vec();
    cfg.rank = rank;
    cfg.alpha = None;
    cfg.method = Method::Lora;
    cfg.data = Some(p.train.clone());
    cfg.eval = p.eval_loss.clone();
    cfg.out = Some(root.join(dir));
    let alpha = cfg.alpha();
    let mut t = Trainer::new(&*lm, cfg)?;
    let sum = t.run_with_progress(None, stop, progress)?;
    if sum.interrupted {
        return err("interrupted");
    }
    let adapter = t.current_adapter()?;
    drop(t);
    let (metric, n, ew) = score_adapter(lm, adapter, p, s.eval_batch, progress)?;
    Ok(RunResult {
        targets: targets.to_vec(),
        label: weight_label(targets),
        rank,
        alpha,
        trainable_params: sum.trainable_params,
        steps: sum.steps,
        train_wall_s: sum.wall_s,
        tok_per_s: sum.tok_per_s,
        final_loss: sum.final_loss,
        eval_loss_before: sum.eval_loss_before,
        eval_loss_after: sum.eval_loss_after,
        metric,
        eval_n: n,
        eval_wall_s: (ew * 1000.0).round() / 1000.0,
        dir: dir.to_string(),
    })
}

/// Is `a` better than `b` under the metric's direction (exact ties are not better)?
pub fn better(metric: Metric, a: f64, b: f64) -> bool {
    if a.is_nan() {
        return false;
    }
    if b.is_nan() {
        return true;
    }
    if (a - b).abs() < 1e-9 {
        return false;
    }
    if metric.higher_is_better() {
        a > b
    } else {
        a < b
    }
}

/// Format a metric value for tables.
pub fn fmt_metric(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "—".into()
    }
}

pub fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "—".into())
}

/// Parse a comma-separated list of ranks.
pub fn parse_ranks(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for x in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let r: usize = x
            .parse()
            .map_err(|_| ExpError(format!("--ranks: `{x}` is not a positive integer")))?;
        if r == 0 {
            return err("--ranks: ranks must be ≥ 1");
        }
        if !out.contains(&r) {
            out.push(r);
        }
    }
    if out.is_empty() {
        return err("--ranks: give at least one rank, e.g. 1,2,4,8,64");
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(parse_ranks("8,1, 4,8").unwrap(), vec![1, 4, 8]);
        assert!(parse_ranks("0").is_err() && parse_ranks("x").is_err() && parse_ranks("").is_err());
        let s = parse_target_sets(&["q|q,v".into(), "q,k,v,o".into()]).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1], vec!["q_proj".to_string(), "v_proj".to_string()]);
        assert_eq!(weight_label(&s[2]), "Wq,Wk,Wv,Wo");
        assert!(parse_target_sets(&["q|zz".into()]).is_err());
        assert!(better(Metric::Exact, 2.0, 1.0) && !better(Metric::Exact, 1.0, 1.0));
        assert!(better(Metric::SlotError, 1.0, 2.0));
        assert!("nope".parse::<Metric>().is_err());
    }
}
