//! LoRA vs full fine-tuning on the same data and step budget. Each run is a child process of
//! the `lowrank` binary (`lowrank train …`), so its peak RSS is its own; the summaries come
//! back as JSON on the child's stdout. Both results are then scored on the held-out set.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lowrank_model::LoadedModel;
use serde::{Deserialize, Serialize};

use lowrank_train::progress::Event;
use lowrank_train::trainer::dir_bytes;
use lowrank_train::TrainSummary;

use crate::report::{bar_panels, human_bytes, line_chart, md_table, short_num, Series};
use crate::runs::{
    err, fmt_metric, fmt_opt, io_err, score_adapter, write_file, ExpError, Prepared, Result,
};

#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The `lowrank` executable (the CLI passes `std::env::current_exe()`).
    pub exe: PathBuf,
    pub model: String,
    pub threads: Option<usize>,
    pub rank: usize,
    pub targets: Vec<String>,
    pub lora_lr: f64,
    pub full_lr: f64,
    pub max_steps: usize,
    pub budget_s: f64,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub seed: u64,
    pub eval_batch: usize,
    /// Arithmetic of the frozen base in LoRA training (full fine-tuning is always f32).
    pub compute: lowrank_model::quant::Compute,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub summary: TrainSummary,
    /// Bytes of what the run saved: the adapter files, or the whole model directory.
    pub checkpoint_bytes: u64,
    pub metric: f64,
    pub eval_n: usize,
    pub eval_wall_s: f64,
    pub dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageRow {
    pub tasks: usize,
    /// One base file + N adapters.
    pub lora_bytes: u64,
    /// N fine-tuned models.
    pub full_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub data: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub eval_n: usize,
    pub max_steps: usize,
    pub budget_s: f64,
    pub lora_rank: usize,
    pub lora_targets: Vec<String>,
    pub base_file_bytes: u64,
    pub lora: MethodResult,
    pub full: MethodResult,
    pub storage: Vec<StorageRow>,
}

fn train_child(
    o: &CompareOptions,
    p: &Prepared,
    method: &str,
    out: &Path,
    progress: &mut dyn FnMut(&Event),
) -> Result<TrainSummary> {
    let mut c = Command::new(&o.exe);
    if let Some(t) = o.threads {
        c.arg("--threads").arg(t.to_string());
    }
    c.arg("train")
        .arg("--model")
        .arg(&o.model)
        .arg("--data")
        .arg(&p.train)
        .arg("--out")
        .arg(out);
    c.args(["--method", method, "--quiet", "--seed", &o.seed.to_string()]);
    c.args([
        "--max-steps",
        &o.max_steps.to_string(),
        "--batch-size",
        &o.batch_size.to_string(),
    ]);
    c.args(["--max-seq-len", &o.max_seq_len.to_string()]);
    if o.budget_s > 0.0 {
        c.args(["--time-budget", &o.budget_s.to_string()]);
    }
    if let Some(e) = &p.eval_loss {
        c.arg("--eval").arg(e);
    }
    if method == "lora" {
        c.args([
            "--rank",
            &o.rank.to_string(),
            "--targets",
            &o.targets.join(","),
            "--lr",
            &o.lora_lr.to_string(),
            "--compute",
            o.compute.name(),
        ]);
    } else {
        c.args(["--lr", &o.full_lr.to_string()]);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    progress(&Event::Begin {
        label: format!(
            "training {method} ({} steps max, child process)",
            o.max_steps
        ),
        total: None,
    });
    let child = c
        .spawn()
        .map_err(|e| ExpError(format!("cannot run {}: {e}", o.exe.display())))?;
    let res = child
        .wait_with_output()
        .map_err(|e| ExpError(format!("{}: {e}", o.exe.display())))?;
    progress(&Event::End);
    let stderr = String::from_utf8_lossy(&res.stderr);
    if !res.status.success() {
        let tail: Vec<&str> = stderr
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return err(format!(
            "the {method} training run failed ({}):\n{}",
            res.status,
            tail.join("\n")
        ));
    }
    serde_json::from_slice(&res.stdout).map_err(|e| {
        ExpError(format!(
            "the {method} training run printed no summary JSON ({e}): {}",
            String::from_utf8_lossy(&res.stdout)
        ))
    })
}

/// (step, training loss) points of a run's metrics.jsonl.
pub fn loss_curve(path: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![];
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

pub fn compare(
    base: &mut LoadedModel,
    p: &Prepared,
    o: &CompareOptions,
    out: &Path,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompareReport> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut results = Vec::new();
    for method in ["lora", "full"] {
        let dir = out.join(method);
        let _ = std::fs::remove_dir_all(&dir);
        progress(&Event::Note(format!("[{method}] training…")));
        let summary = train_child(o, p, method, &dir, progress)?;
        if summary.interrupted {
            return err(format!("the {method} run was interrupted"));
        }
        let checkpoint_bytes = if method == "lora" {
            [
                lowrank_lora::peft::CONFIG_FILE,
                lowrank_lora::peft::WEIGHTS_FILE,
            ]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
        } else {
            dir_bytes(&dir.join("model"))
        };
        progress(&Event::Note(format!(
            "[{method}] {} steps in {:.1} s; scoring…",
            summary.steps, summary.wall_s
        )));
        let (metric, n, ew) = if method == "lora" {
            let (a, _) = lowrank_model::adapters::load_adapter(&base.model, &dir, false)?;
            score_adapter(base, Some(a), p, o.eval_batch, progress)?
        } else {
            let md = dir.join("model");
            let mut lm = LoadedModel::load(&md.to_string_lossy(), base.model.device())?;
            score_adapter(&mut lm, None, p, o.eval_batch, progress)?
        };
        progress(&Event::Note(format!(
            "[{method}] {} = {}",
            p.metric.name(),
            fmt_metric(metric)
        )));
        results.push(MethodResult {
            method: method.into(),
            summary,
            checkpoint_bytes,
            metric,
            eval_n: n,
            eval_wall_s: (ew * 1000.0).round() / 1000.0,
            dir: method.into(),
        });
    }
    let full = results.pop().expect("full");
    let lora = results.pop().expect("lora");
    let base_bytes = base.file_bytes;
    let storage = [1usize, 10, 100, 1000]
        .iter()
        .map(|&n| StorageRow {
            tasks: n,
            lora_bytes: base_bytes + n as u64 * lora.checkpoint_bytes,
            full_bytes: n as u64 * full.checkpoint_bytes,
        })
        .collect();
    let rep = CompareReport {
        data: p.name.clone(),
        metric: p.metric.name().into(),
        higher_is_better: p.metric.higher_is_better(),
        eval_n: p.examples.len(),
        max_steps: o.max_steps,
        budget_s: o.budget_s,
        lora_rank: o.rank,
        lora_targets: o.targets.clone(),
        base_file_bytes: base_bytes,
        lora,
        full,
        storage,
    };
    write_file(
        &out.join("compare.json"),
        &serde_json::to_string_pretty(&rep)?,
    )?;
    let curves: Vec<Series> = [&rep.lora, &rep.full]
        .iter()
        .map(|m| {
            (
                m.method.clone(),
                loss_curve(&out.join(&m.dir).join("metrics.jsonl")),
            )
        })
        .collect();
    line_chart(
        &out.join("loss.svg"),
        "Training loss",
        "step",
        "loss",
        &curves,
    )
    .map_err(ExpError)?;
    let pair = |f: &dyn Fn(&MethodResult) -> f64| {
        vec![
            ("LoRA".to_string(), f(&rep.lora)),
            ("full".to_string(), f(&rep.full)),
        ]
    };
    let panels = vec![
        (
            "trainable parameters".to_string(),
            pair(&|m| m.summary.trainable_params as f64),
        ),
        (
            "checkpoint bytes".to_string(),
            pair(&|m| m.checkpoint_bytes as f64),
        ),
        (
            "peak RSS bytes".to_string(),
            pair(&|m| m.summary.peak_rss_bytes as f64),
        ),
        ("tokens / s".to_string(), pair(&|m| m.summary.tok_per_s)),
        (
            "train wall time (s)".to_string(),
            pair(&|m| m.summary.wall_s),
        ),
        (format!("held-out {}", rep.metric), pair(&|m| m.metric)),
    ];
    bar_panels(
        &out.join("compare.svg"),
        "LoRA vs full fine-tuning",
        &panels,
    )
    .map_err(ExpError)?;
    write_file(&out.join("report.md"), &rep.markdown())?;
    Ok(rep)
}

impl CompareReport {
    pub fn table(&self) -> String {
        let header: Vec<String> = ["", "LoRA", "full fine-tuning", "full / LoRA"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (l, f) = (&self.lora, &self.full);
        let ratio = |a: f64, b: f64| {
            if a > 0.0 {
                format!("{:.1}×", b / a)
            } else {
                "—".into()
            }
        };
        let rows = vec![
            vec![
                "trainable parameters".into(),
                l.summary.trainable_params.to_string(),
                f.summary.trainable_params.to_string(),
                ratio(
                    l.summary.trainable_params as f64,
                    f.summary.trainable_params as f64,
                ),
            ],
            vec![
                "checkpoint size".into(),
                human_bytes(l.checkpoint_bytes as f64),
                human_bytes(f.checkpoint_bytes as f64),
                ratio(l.checkpoint_bytes as f64, f.checkpoint_bytes as f64),
            ],
            vec![
                "peak RSS (training process)".into(),
                human_bytes(l.summary.peak_rss_bytes as f64),
                human_bytes(f.summary.peak_rss_bytes as f64),
                ratio(
                    l.summary.peak_rss_bytes as f64,
                    f.summary.peak_rss_bytes as f64,
                ),
            ],
            vec![
                "steps".into(),
                l.summary.steps.to_string(),
                f.summary.steps.to_string(),
                String::new(),
            ],
            vec![
                "tokens / s".into(),
                format!("{:.1}", l.summary.tok_per_s),
                format!("{:.1}", f.summary.tok_per_s),
                ratio(l.summary.tok_per_s, f.summary.tok_per_s),
            ],
            vec![
                "train wall time (s)".into(),
                format!("{:.1}", l.summary.wall_s),
                format!("{:.1}", f.summary.wall_s),
                ratio(l.summary.wall_s, f.summary.wall_s),
            ],
            vec![
                "final train loss".into(),
                fmt_opt(l.summary.final_loss),
                fmt_opt(f.summary.final_loss),
                String::new(),
            ],
            vec![
                "eval loss (after)".into(),
                fmt_opt(l.summary.eval_loss_after),
                fmt_opt(f.summary.eval_loss_after),
                String::new(),
            ],
            vec![
                format!("held-out {} (n = {})", self.metric, self.eval_n),
                fmt_metric(l.metric),
                fmt_metric(f.metric),
                String::new(),
            ],
        ];
        md_table(&header, &rows)
    }

    pub fn storage_table(&self) -> String {
        let header: Vec<String> = [
            "tasks",
            "LoRA: base + N adapters",
            "full: N models",
            "full / LoRA",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows: Vec<Vec<String>> = self
            .storage
            .iter()
            .map(|r| {
                vec![
                    r.tasks.to_string(),
                    human_bytes(r.lora_bytes as f64),
                    human_bytes(r.full_bytes as f64),
                    if r.lora_bytes > 0 {
                        format!("{:.1}×", r.full_bytes as f64 / r.lora_bytes as f64)
                    } else {
                        "—".into()
                    },
                ]
            })
            .collect();
        md_table(&header, &rows)
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# LoRA vs full fine-tuning: {}\n\nSame training data, seed and budget (at most {} steps{}). LoRA: r = {} on {}. \
             Each run is a separate `lowrank train` process, so peak RSS is measured per method.\n\n",
            self.data,
            self.max_steps,
            if self.budget_s > 0.0 { format!(" / {:.0} s", self.budget_s) } else { String::new() },
            self.lora_rank,
            self.lora_targets.join(",")
        );
        s.push_str(&self.table());
        s.push_str(&format!(
            "\n## Storage for N tasks\n\nFrom the real file sizes: the base model file ({}) plus one adapter ({}) per task, \
             versus one saved fine-tuned model ({}, f32 safetensors) per task.\n\n",
            human_bytes(self.base_file_bytes as f64),
            human_bytes(self.lora.checkpoint_bytes as f64),
            human_bytes(self.full.checkpoint_bytes as f64)
        ));
        s.push_str(&self.storage_table());
        s.push_str(&format!(
            "\n## Charts\n\n![training loss](loss.svg)\n\n![comparison](compare.svg)\n\nTrainable parameters: LoRA {} vs full {}.\n",
            short_num(self.lora.summary.trainable_params as f64),
            short_num(self.full.summary.trainable_params as f64)
        ));
        s
    }
}
