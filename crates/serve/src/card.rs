//! An adapter's card for people (`GET /v1/adapters/{name}`, the playground): what it adapts
//! (targets, layers, ranks, parameters, bytes, from the loaded tensors, so it is true of the
//! files being served) and, when a model card (README.md) lies beside it, how it was trained.
//!
//! `lowrank train` writes that card (settings and results as markdown tables, the loss curve as
//! a table of steps); the tables are read back generically, so a PEFT or hand-written card
//! shows its own tables and text without any of them being required.

use std::io::Read;
use std::path::Path;

use lowrank_lora::{Adapter, Target};
use serde_json::{json, Map, Value};

/// The most of a README.md that is read (a card is a page, not a dataset).
const MAX_CARD_BYTES: u64 = 256 << 10;

/// The card of `adapter` served as `name` from `dir` (`path`: as listed by the registry).
pub fn adapter_card(name: &str, path: &Path, dir: &Path, adapter: &Adapter, loaded: bool) -> Value {
    let mut targets: Vec<&str> = vec![];
    for t in Target::ALL {
        if adapter.modules.keys().any(|k| k.target == t) {
            targets.push(t.peft_name());
        }
    }
    let layers: std::collections::BTreeSet<usize> =
        adapter.modules.keys().map(|k| k.layer).collect();
    let ranks = adapter.modules.values().map(|m| m.rank());
    let (rmin, rmax) = ranks.fold((usize::MAX, 0), |(a, b), r| (a.min(r), b.max(r)));
    let files: u64 = ["adapter_model.safetensors", "adapter_config.json"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let c = &adapter.config;
    json!({
        "id": name,
        "object": "adapter.card",
        "path": path,
        "loaded": loaded,
        "rank": if adapter.modules.is_empty() { Value::Null } else { json!({"min": rmin, "max": rmax}) },
        "alpha": c.lora_alpha,
        "rslora": c.use_rslora,
        "targets": targets,
        "layers": layers.len(),
        "modules": adapter.modules.len(),
        "parameters": adapter.num_params(),
        "file_bytes": files,
        "resident_bytes": crate::registry::adapter_bytes(adapter),
        "base_fingerprint": adapter.provenance.base_fingerprint,
        "lowrank_version": adapter.provenance.lowrank_version,
        "created": adapter.provenance.created,
        "card": read_card(&dir.join("README.md")),
    })
}

/// The model card beside an adapter, or null when there is none (or it cannot be read: the
/// card is information, never a reason to fail the request).
fn read_card(path: &Path) -> Value {
    let Ok(f) = std::fs::File::open(path) else {
        return Value::Null;
    };
    let mut bytes = vec![];
    if f.take(MAX_CARD_BYTES).read_to_end(&mut bytes).is_err() {
        return Value::Null;
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let mut card = parse_card(&text);
    card.insert("markdown".into(), Value::String(text));
    Value::Object(card)
}

/// The structured part of a card: the front matter's `base_model`, a two-column
/// `setting | value` table as `settings`, a one-row table (the results) as `results`
/// ([[column, value], …]), and a
/// `step | … loss` table as `loss_curve` ([[step, loss], …]).
pub fn parse_card(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(rest) = text.strip_prefix("---\n") {
        let front = rest.split("\n---").next().unwrap_or("");
        for l in front.lines() {
            if let Some(v) = l.strip_prefix("base_model:") {
                out.insert("base_model".into(), Value::String(v.trim().to_string()));
            }
        }
    }
    for t in tables(text) {
        let (head, rows) = (&t[0], &t[1..]);
        let lower: Vec<String> = head.iter().map(|h| h.to_lowercase()).collect();
        if lower == ["setting", "value"] && !out.contains_key("settings") {
            let m: Map<String, Value> = rows
                .iter()
                .filter(|r| r.len() == 2)
                .map(|r| (r[0].clone(), Value::String(r[1].clone())))
                .collect();
            out.insert("settings".into(), Value::Object(m));
        } else if lower.len() == 2
            && lower[0] == "step"
            && lower[1] == "training loss"
            && !out.contains_key("loss_curve")
        {
            let pts: Vec<Value> = rows
                .iter()
                .filter_map(|r| {
                    let s: u64 = r.first()?.parse().ok()?;
                    let y: f64 = r.get(1)?.parse().ok()?;
                    y.is_finite().then(|| json!([s, y]))
                })
                .collect();
            out.insert("loss_curve".into(), Value::Array(pts));
        } else if rows.len() == 1 && head.len() > 2 && !out.contains_key("results") {
            // Pairs, not an object: the table's column order is the reading order.
            let m: Vec<Value> = head
                .iter()
                .zip(&rows[0])
                .map(|(k, v)| json!([k, v]))
                .collect();
            out.insert("results".into(), Value::Array(m));
        }
    }
    out
}

/// Markdown pipe tables: each a header row then its data rows (the `|---|` line dropped),
/// cells trimmed and stripped of backticks.
fn tables(text: &str) -> Vec<Vec<Vec<String>>> {
    let mut out = vec![];
    let mut cur: Vec<Vec<String>> = vec![];
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let l = l.trim();
        if l.starts_with('|') && l.ends_with('|') && l.len() > 1 {
            let cells: Vec<String> = l[1..l.len() - 1]
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect();
            let rule = cells
                .iter()
                .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')));
            if !rule {
                cur.push(cells);
            }
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if lines.peek().is_none() && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tables_of_a_training_card() {
        let md = "---\nlibrary_name: peft\nbase_model: SmolLM2\n---\n\n# x\n\n| setting | value |\n|---|---|\n| rank | 8 |\n| targets | q_proj, v_proj |\n\n## Results\n\n| steps | tokens | wall time |\n|---|---|---|\n| 40 | 5120 | 3.2 s |\n\n| step | training loss |\n|---|---|\n| 1 | 2.5000 |\n| 40 | 1.2500 |\n";
        let c = parse_card(md);
        assert_eq!(c["base_model"], "SmolLM2");
        assert_eq!(c["settings"]["rank"], "8");
        assert_eq!(c["settings"]["targets"], "q_proj, v_proj");
        assert_eq!(
            c["results"],
            json!([["steps", "40"], ["tokens", "5120"], ["wall time", "3.2 s"]])
        );
        assert_eq!(c["loss_curve"], json!([[1, 2.5], [40, 1.25]]));
    }

    #[test]
    fn a_card_without_tables_has_no_structured_fields() {
        let c = parse_card("# My adapter\n\nSome words | with a pipe.\n");
        assert!(c.is_empty(), "{c:?}");
    }
}
