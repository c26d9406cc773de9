//! `sweep` (the LoRA paper's Table 6: weight types × ranks) and `budget` (Table 5: one
//! trainable-parameter budget spread over different weight types).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use lowrank_lora::shapes::BaseShapes;
use lowrank_model::LoadedModel;
use serde::{Deserialize, Serialize};

use lowrank_tasks::Metric;
use lowrank_train::progress::Event;

use crate::report::md_table;
use crate::runs::{
    better, err, fmt_metric, fmt_opt, targets_of, train_and_score, weight_label, write_file,
    Prepared, Result, RunResult, RunSettings,
};

/// The best configuration: best metric, ties → smaller r, then fewer parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recommendation {
    pub label: String,
    pub targets: Vec<String>,
    pub rank: usize,
    pub metric: f64,
    pub trainable_params: usize,
}

pub fn recommend(metric: Metric, cells: &[RunResult]) -> Option<Recommendation> {
    let mut best: Option<&RunResult> = None;
    for c in cells.iter().filter(|c| c.metric.is_finite()) {
        best = match best {
            None => Some(c),
            Some(b) => {
                let tie = (c.metric - b.metric).abs() < 1e-9;
                if better(metric, c.metric, b.metric)
                    || (tie && (c.rank, c.trainable_params) < (b.rank, b.trainable_params))
                {
                    Some(c)
                } else {
                    Some(b)
                }
            }
        };
    }
    best.map(|b| Recommendation {
        label: b.label.clone(),
        targets: b.targets.clone(),
        rank: b.rank,
        metric: b.metric,
        trainable_params: b.trainable_params,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepReport {
    pub kind: String,
    pub data: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub eval_n: usize,
    pub ranks: Vec<usize>,
    /// Row labels ("Wq", "Wq,Wv", …) in order, with their module lists.
    pub rows: Vec<String>,
    pub row_targets: Vec<Vec<String>>,
    pub max_steps: Option<usize>,
    pub budget_s: f64,
    pub cells: Vec<RunResult>,
    /// Best configuration overall.
    pub recommended: Option<Recommendation>,
    /// Best rank per weight type (same rule).
    pub recommended_per_row: Vec<Option<Recommendation>>,
}

impl SweepReport {
    pub fn cell(&self, row: usize, rank: usize) -> Option<&RunResult> {
        self.cells
            .iter()
            .find(|c| c.targets == self.row_targets[row] && c.rank == rank)
    }

    /// Table 6's shape: rows = weight types, columns = r, cells = the metric.
    pub fn table(&self) -> String {
        let mut header = vec!["Weight type".to_string()];
        header.extend(self.ranks.iter().map(|r| format!("r={r}")));
        header.push("best r".into());
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, label)| {
                let mut row = vec![label.clone()];
                row.extend(self.ranks.iter().map(|r| {
                    self.cell(i, *r)
                        .map(|c| fmt_metric(c.metric))
                        .unwrap_or_else(|| "—".into())
                }));
                row.push(
                    self.recommended_per_row[i]
                        .as_ref()
                        .map(|b| b.rank.to_string())
                        .unwrap_or_else(|| "—".into()),
                );
                row
            })
            .collect();
        md_table(&header, &rows)
    }

    pub fn markdown(&self) -> String {
        let dir = if self.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let mut s = format!(
            "# LoRA rank sweep: {}\n\nHeld-out {} ({dir}) on {} generated examples, after at most {} steps / {:.0} s of training per configuration.\n\n",
            self.data,
            self.metric,
            self.eval_n,
            self.max_steps.map(|m| m.to_string()).unwrap_or_else(|| "∞".into()),
            self.budget_s
        );
        s.push_str(&self.table());
        if let Some(r) = &self.recommended {
            s.push_str(&format!(
                "\n**Recommended:** {} with r = {} ({} = {}, {} trainable parameters; ties go to the smaller r).\n",
                r.label,
                r.rank,
                self.metric,
                fmt_metric(r.metric),
                r.trainable_params
            ));
        }
        s.push_str("\n## Runs\n\n");
        s.push_str(&runs_table(&self.metric, &self.cells));
        s
    }
}

/// Every run's details.
pub fn runs_table(metric: &str, cells: &[RunResult]) -> String {
    let header: Vec<String> = [
        "Weight type",
        "r",
        "params",
        "steps",
        "train s",
        "tok/s",
        "final loss",
        "eval loss",
        metric,
        "dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let rows: Vec<Vec<String>> = cells
        .iter()
        .map(|c| {
            vec![
                c.label.clone(),
                c.rank.to_string(),
                c.trainable_params.to_string(),
                c.steps.to_string(),
                format!("{:.1}", c.train_wall_s),
                format!("{:.0}", c.tok_per_s),
                fmt_opt(c.final_loss),
                fmt_opt(c.eval_loss_after),
                fmt_metric(c.metric),
                format!("`{}`", c.dir),
            ]
        })
        .collect();
    md_table(&header, &rows)
}

fn dir_name(targets: &[String], rank: usize) -> String {
    let t: Vec<&str> = targets
        .iter()
        .map(|t| t.trim_end_matches("_proj"))
        .collect();
    format!("runs/{}-r{rank}", t.join(""))
}

/// Train and score every (targets, rank) configuration; write `out/sweep.json` + `out/report.md`.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    lm: &mut LoadedModel,
    p: &Prepared,
    s: &RunSettings,
    target_sets: &[Vec<String>],
    ranks: &[usize],
    out: &Path,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Event),
) -> Result<SweepReport> {
    let n = target_sets.len() * ranks.len();
    let mut cells = Vec::new();
    let mut k = 0;
    for ts in target_sets {
        for &r in ranks {
            k += 1;
            progress(&Event::Note(format!(
                "[{k}/{n}] {} r={r}",
                weight_label(ts)
            )));
            let c = train_and_score(lm, p, s, ts, r, out, &dir_name(ts, r), stop, progress)?;
            progress(&Event::Note(format!(
                "[{k}/{n}] {} r={r}: {} = {} ({} steps)",
                c.label,
                p.metric.name(),
                fmt_metric(c.metric),
                c.steps
            )));
            cells.push(c);
        }
    }
    let rep = finish("sweep", p, s, target_sets, ranks.to_vec(), cells);
    write_file(
        &out.join("sweep.json"),
        &serde_json::to_string_pretty(&rep)?,
    )?;
    write_file(&out.join("report.md"), &rep.markdown())?;
    Ok(rep)
}

fn finish(
    kind: &str,
    p: &Prepared,
    s: &RunSettings,
    target_sets: &[Vec<String>],
    ranks: Vec<usize>,
    cells: Vec<RunResult>,
) -> SweepReport {
    let per_row = target_sets
        .iter()
        .map(|ts| {
            let row: Vec<RunResult> = cells.iter().filter(|c| &c.targets == ts).cloned().collect();
            recommend(p.metric, &row)
        })
        .collect();
    SweepReport {
        kind: kind.into(),
        data: p.name.clone(),
        metric: p.metric.name().into(),
        higher_is_better: p.metric.higher_is_better(),
        eval_n: p.examples.len(),
        ranks,
        rows: target_sets.iter().map(|t| weight_label(t)).collect(),
        row_targets: target_sets.to_vec(),
        max_steps: s.base.max_steps,
        budget_s: s.base.time_budget_s,
        recommended: recommend(p.metric, &cells),
        recommended_per_row: per_row,
        cells,
    }
}

/// Table 5's weight types.
pub const BUDGET_TYPES: &str = "q|k|v|o|q,k|q,v|q,k,v,o";

/// The largest r whose LoRA parameters on `targets` fit in `budget` (0 if even r = 1 does not).
pub fn rank_for_budget(shapes: &BaseShapes, targets: &[String], budget: usize) -> usize {
    let ts = targets_of(targets);
    let per_rank = shapes.lora_params(1, &ts);
    if per_rank == 0 {
        return 0;
    }
    budget / per_rank
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetReport {
    pub budget_params: usize,
    pub sweep: SweepReport,
}

impl BudgetReport {
    /// Table 5's shape: columns = weight types; rows = r, parameters, metric, eval loss.
    pub fn table(&self) -> String {
        let s = &self.sweep;
        let mut header = vec![format!("{} trainable params", self.budget_params)];
        header.extend(s.rows.iter().cloned());
        let cells: Vec<&RunResult> = s
            .row_targets
            .iter()
            .filter_map(|t| s.cells.iter().find(|c| &c.targets == t))
            .collect();
        let mut rank = vec!["Rank r".to_string()];
        let mut params = vec!["Params".to_string()];
        let mut metric = vec![s.metric.clone()];
        let mut loss = vec!["eval loss".to_string()];
        for c in &cells {
            rank.push(c.rank.to_string());
            params.push(c.trainable_params.to_string());
            metric.push(fmt_metric(c.metric));
            loss.push(fmt_opt(c.eval_loss_after));
        }
        md_table(&header, &[rank, params, metric, loss])
    }

    pub fn markdown(&self) -> String {
        let s = &self.sweep;
        let mut out = format!(
            "# LoRA parameter budget: {}\n\nOne budget of {} trainable parameters spread over different weight types (the rank of each \
             is the largest r that fits). Held-out {} on {} examples; at most {} steps / {:.0} s per configuration.\n\n",
            s.data,
            self.budget_params,
            s.metric,
            s.eval_n,
            s.max_steps.map(|m| m.to_string()).unwrap_or_else(|| "∞".into()),
            s.budget_s
        );
        out.push_str(&self.table());
        if let Some(r) = &s.recommended {
            out.push_str(&format!(
                "\n**Best:** {} (r = {}, {} = {}).\n",
                r.label,
                r.rank,
                s.metric,
                fmt_metric(r.metric)
            ));
        }
        out.push_str("\n## Runs\n\n");
        out.push_str(&runs_table(&s.metric, &s.cells));
        out
    }
}

/// Train each weight type at the largest rank within `budget`; write `budget.json` + `report.md`.
#[allow(clippy::too_many_arguments)]
pub fn budget(
    lm: &mut LoadedModel,
    p: &Prepared,
    s: &RunSettings,
    target_sets: &[Vec<String>],
    budget: usize,
    out: &Path,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Event),
) -> Result<BudgetReport> {
    let shapes = lm.model.base_shapes();
    let plan: Vec<(Vec<String>, usize)> = target_sets
        .iter()
        .map(|t| (t.clone(), rank_for_budget(&shapes, t, budget)))
        .collect();
    if let Some((t, _)) = plan.iter().find(|(_, r)| *r == 0) {
        let need = shapes.lora_params(1, &targets_of(t));
        return err(format!(
            "--params {budget}: too small for {} (r = 1 needs {need} parameters)",
            weight_label(t)
        ));
    }
    let n = plan.len();
    let mut cells = Vec::new();
    for (k, (ts, r)) in plan.iter().enumerate() {
        progress(&Event::Note(format!(
            "[{}/{n}] {} r={r} ({} params)",
            k + 1,
            weight_label(ts),
            shapes.lora_params(*r, &targets_of(ts))
        )));
        let c = train_and_score(lm, p, s, ts, *r, out, &dir_name(ts, *r), stop, progress)?;
        progress(&Event::Note(format!(
            "[{}/{n}] {}: {} = {}",
            k + 1,
            c.label,
            p.metric.name(),
            fmt_metric(c.metric)
        )));
        cells.push(c);
    }
    let mut ranks: Vec<usize> = plan.iter().map(|p| p.1).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let rep = BudgetReport {
        budget_params: budget,
        sweep: finish("budget", p, s, target_sets, ranks, cells),
    };
    write_file(
        &out.join("budget.json"),
        &serde_json::to_string_pretty(&rep)?,
    )?;
    write_file(&out.join("report.md"), &rep.markdown())?;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(t: &str, r: usize, m: f64) -> RunResult {
        RunResult {
            targets: vec![t.into()],
            label: t.into(),
            rank: r,
            alpha: 2.0 * r as f64,
            trainable_params: 100 * r,
            steps: 1,
            train_wall_s: 0.0,
            tok_per_s: 0.0,
            final_loss: None,
            eval_loss_before: None,
            eval_loss_after: None,
            metric: m,
            eval_n: 1,
            eval_wall_s: 0.0,
            dir: String::new(),
        }
    }

    #[test]
    fn recommendation_prefers_smaller_rank_on_ties() {
        let cells = vec![
            cell("q_proj", 8, 50.0),
            cell("q_proj", 1, 50.0),
            cell("q_proj", 4, 40.0),
        ];
        assert_eq!(recommend(Metric::Exact, &cells).unwrap().rank, 1);
        let cells = vec![
            cell("q_proj", 8, 60.0),
            cell("q_proj", 1, 50.0),
            cell("q_proj", 4, f64::NAN),
        ];
        assert_eq!(recommend(Metric::Exact, &cells).unwrap().rank, 8);
        assert_eq!(recommend(Metric::SlotError, &cells).unwrap().rank, 1);
        assert!(recommend(Metric::Exact, &[]).is_none());
    }

    #[test]
    fn budget_ranks() {
        let s = BaseShapes::smollm2_135m();
        let q = vec!["q_proj".to_string()];
        let all: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // r·30·1152 for Wq; r·30·3840 for all four.
        assert_eq!(rank_for_budget(&s, &q, 30 * 1152 * 8), 8);
        assert_eq!(rank_for_budget(&s, &q, 30 * 1152 * 8 - 1), 7);
        assert_eq!(rank_for_budget(&s, &all, 30 * 1152 * 8), 2);
        assert_eq!(rank_for_budget(&s, &all, 10), 0);
    }
}
