//! The experiment commands through the CLI: similarity (identical → 1, orthogonal → 0),
//! amplification on a constructed adapter, `combine` (cat = weighted sum of the parts'
//! outputs through the model; svd at full rank = cat), bad input, and the quick sweep /
//! compare runs on the real default model with well-formed reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lowrank_lora::{Adapter, LoraConfig, LoraModule, ModuleKey, Provenance, Target};
use lowrank_model::{ForwardOpts, LoadedModel, LogitsMode, SeqInput};

/// The heavy runs on the real model, one at a time (CI has two cores).
static HEAVY: Mutex<()> = Mutex::new(());

fn lowrank() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowrank"))
}

fn tiny() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama-hf/model"
    ))
}

fn tiny_str() -> String {
    tiny().to_string_lossy().into_owned()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-exp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(args: &[&str]) -> Output {
    let out = lowrank().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    out
}

fn fails_with(args: &[&str], needle: &str) {
    let out = lowrank().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Tiny-model projection shapes (out, in).
fn dims(t: Target) -> (usize, usize) {
    match t {
        Target::Q | Target::O => (64, 64),
        Target::K | Target::V => (32, 64),
        Target::Gate | Target::Up => (160, 64),
        Target::Down => (64, 160),
    }
}

/// An adapter on the tiny model with given A per (layer, target) and random B.
fn adapter_with(
    r: usize,
    alpha: f64,
    a_of: &dyn Fn(usize, Target) -> Tensor,
    targets: &[Target],
    seed: f64,
) -> Adapter {
    let dev = Device::Cpu;
    let mut modules = BTreeMap::new();
    for layer in 0..2 {
        for &t in targets {
            let (o, _) = dims(t);
            let a = a_of(layer, t);
            let b = Tensor::randn(0f32, 0.5, (o, r), &dev).unwrap();
            let b = (b + seed).unwrap();
            modules.insert(
                ModuleKey::new(layer, t),
                LoraModule {
                    a,
                    b,
                    scale: alpha / r as f64,
                },
            );
        }
    }
    Adapter {
        config: LoraConfig::new(r, alpha, targets),
        modules,
        provenance: Provenance::default(),
    }
}

fn random_adapter(r: usize, alpha: f64, targets: &[Target], seed: f64) -> Adapter {
    adapter_with(
        r,
        alpha,
        &|_, t| Tensor::randn(0f32, 0.3, (r, dims(t).1), &Device::Cpu).unwrap(),
        targets,
        seed,
    )
}

fn save(a: &Adapter, dir: &Path) {
    lowrank_lora::save_peft(a, dir, DType::F32).unwrap();
}

/// Rows = unit vectors e_{off}, e_{off+1}, … scaled (a clean, known row space).
fn coord_rows(r: usize, cols: usize, off: usize) -> Tensor {
    let mut v = vec![0f32; r * cols];
    for i in 0..r {
        v[i * cols + off + i] = (i + 1) as f32;
    }
    Tensor::from_vec(v, (r, cols), &Device::Cpu).unwrap()
}

#[test]
fn similarity_identical_is_one_and_orthogonal_is_zero() {
    let d = tmpdir("sim");
    let r = 4;
    let base = random_adapter(r, 8.0, &[Target::Q, Target::V], 0.0);
    // Same row space: A2 = M·A1 (M invertible) ⇒ φ(r, r) = 1; identical ⇒ φ(i, i) = 1 ∀ i.
    let mix = Tensor::randn(0f32, 1.0, (r, r), &Device::Cpu).unwrap();
    let mixed = adapter_with(
        r,
        8.0,
        &|l, t| mix.matmul(&base.modules[&ModuleKey::new(l, t)].a).unwrap(),
        &[Target::Q, Target::V],
        0.1,
    );
    let (p1, p2, p3) = (d.join("a1"), d.join("a2"), d.join("a3"));
    save(&base, &p1);
    save(&mixed, &p2);
    let svg = d.join("phi.svg");
    let out = run_ok(&[
        "similarity",
        "--model",
        &tiny_str(),
        p1.to_str().unwrap(),
        p1.to_str().unwrap(),
        "--layer",
        "1",
        "--out",
        svg.to_str().unwrap(),
    ]);
    let v = json(&out);
    assert_eq!(v["module"], "q_proj");
    assert_eq!(v["layers"], serde_json::json!([1]));
    let g: Vec<Vec<f64>> = serde_json::from_value(v["grid"].clone()).unwrap();
    assert_eq!((g.len(), g[0].len()), (r, r));
    for (i, row) in g.iter().enumerate() {
        assert!(
            (row[i] - 1.0).abs() < 1e-6,
            "identical: φ({0},{0}) = {1}",
            i + 1,
            row[i]
        );
        for x in row {
            assert!((0.0..=1.0 + 1e-9).contains(x));
        }
    }
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    // Mixed (same span), mean over both layers, v_proj.
    let v = json(&run_ok(&[
        "similarity",
        "--model",
        &tiny_str(),
        p1.to_str().unwrap(),
        p2.to_str().unwrap(),
        "--module",
        "v",
    ]));
    assert_eq!(v["layers"], serde_json::json!([0, 1]));
    let g: Vec<Vec<f64>> = serde_json::from_value(v["grid"].clone()).unwrap();
    assert!((g[r - 1][r - 1] - 1.0).abs() < 1e-6, "{g:?}");
    // Orthogonal: rows on disjoint coordinates ⇒ φ = 0 everywhere.
    let o1 = adapter_with(r, 8.0, &|_, _| coord_rows(r, 64, 0), &[Target::Q], 0.0);
    let o2 = adapter_with(2, 4.0, &|_, _| coord_rows(2, 64, 10), &[Target::Q], 0.0);
    save(&o1, &p1);
    save(&o2, &p3);
    let v = json(&run_ok(&[
        "similarity",
        "--model",
        &tiny_str(),
        p1.to_str().unwrap(),
        p3.to_str().unwrap(),
    ]));
    let g: Vec<Vec<f64>> = serde_json::from_value(v["grid"].clone()).unwrap();
    assert_eq!((g.len(), g[0].len()), (r, 2));
    assert!(g.iter().flatten().all(|x| x.abs() < 1e-9), "{g:?}");
    // Bad input: a module the adapters do not adapt; a missing layer; a missing directory.
    fails_with(
        &[
            "similarity",
            "--model",
            &tiny_str(),
            p1.to_str().unwrap(),
            p3.to_str().unwrap(),
            "--module",
            "v_proj",
        ],
        "does not adapt v_proj",
    );
    fails_with(
        &[
            "similarity",
            "--model",
            &tiny_str(),
            p1.to_str().unwrap(),
            p3.to_str().unwrap(),
            "--layer",
            "7",
        ],
        "--layer 7",
    );
    fails_with(
        &[
            "similarity",
            "--model",
            &tiny_str(),
            p1.to_str().unwrap(),
            "--module",
            "zz",
            p3.to_str().unwrap(),
        ],
        "--module `zz`",
    );
    fails_with(
        &[
            "similarity",
            "--model",
            &tiny_str(),
            d.join("nope").to_str().unwrap(),
            p3.to_str().unwrap(),
        ],
        "adapter config not found",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn amplification_on_a_constructed_adapter() {
    let d = tmpdir("amp");
    // Rank 1 on q_proj: ΔW = s·b·aᵀ, so U = b/|b|, V = a/|a| and ‖UᵀWV‖ = |bᵀWa| / (|a||b|).
    let ad = random_adapter(1, 2.0, &[Target::Q, Target::V], 0.2);
    let p = d.join("a");
    save(&ad, &p);
    let lm = LoadedModel::load(&tiny_str(), &Device::Cpu).unwrap();
    let v = json(&run_ok(&[
        "amplify",
        "--model",
        &tiny_str(),
        p.to_str().unwrap(),
        "--json",
        "--module",
        "q_proj",
        "--layer",
        "0",
    ]));
    let row = &v["per_module"][0];
    assert_eq!(row["module"], "q_proj");
    let m = &ad.modules[&ModuleKey::new(0, Target::Q)];
    let a: Vec<f32> = m.a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = m.b.flatten_all().unwrap().to_vec1().unwrap();
    let w = lm.model.weights.layers[0]
        .linear(Target::Q)
        .to_dtype(DType::F32)
        .unwrap();
    let wa: Vec<f32> = w
        .matmul(&m.a.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let bwa: f64 = b.iter().zip(&wa).map(|(x, y)| *x as f64 * *y as f64).sum();
    let proj = bwa.abs() / (norm(&a) * norm(&b));
    let dn = m.scale * norm(&a) * norm(&b);
    let got_proj = row["proj_delta_dirs"].as_f64().unwrap();
    let got_dn = row["delta_norm"].as_f64().unwrap();
    assert!(
        (got_proj - proj).abs() < 1e-4 * proj.max(1e-3),
        "{got_proj} vs {proj}"
    );
    assert!((got_dn - dn).abs() < 1e-4 * dn, "{got_dn} vs {dn}");
    assert!((row["factor"].as_f64().unwrap() - dn / proj).abs() < 1e-3 * dn / proj);
    // W's own top direction carries at least as much of W as any other direction.
    assert!(
        row["proj_w_dirs"].as_f64().unwrap() + 1e-6
            >= got_proj.max(row["proj_random"].as_f64().unwrap())
    );
    // The table form: one row per module type.
    let out = run_ok(&["amplify", "--model", &tiny_str(), p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("| q_proj |") && text.contains("| v_proj |"),
        "{text}"
    );
    fails_with(
        &[
            "amplify",
            "--model",
            &tiny_str(),
            p.to_str().unwrap(),
            "--module",
            "o_proj",
        ],
        "does not adapt o_proj",
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Logits of `ids` under a weighted adapter mixture.
fn logits(lm: &LoadedModel, ids: &[u32], set: Vec<(Adapter, f64)>) -> Tensor {
    let set = Arc::new(
        set.into_iter()
            .map(|(a, w)| (Arc::new(a), w))
            .collect::<Vec<_>>(),
    );
    let mut s = [SeqInput {
        tokens: ids,
        cache: None,
        adapters: Some(set),
        logits: LogitsMode::All,
    }];
    lm.model
        .forward(&mut s, &mut ForwardOpts::infer())
        .unwrap()
        .pop()
        .flatten()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn combine_cat_is_the_weighted_sum_and_svd_full_rank_equals_cat() {
    let d = tmpdir("combine");
    let lm = LoadedModel::load(&tiny_str(), &Device::Cpu).unwrap();
    let a1 = random_adapter(2, 8.0, &[Target::Q, Target::V], 0.05);
    let a2 = random_adapter(
        3,
        3.0,
        &[Target::Q, Target::K, Target::O, Target::Down],
        -0.05,
    );
    let (p1, p2) = (d.join("a1"), d.join("a2"));
    save(&a1, &p1);
    save(&a2, &p2);
    let (w1, w2) = (0.7, -0.4);
    let spec1 = format!("{}:{w1}", p1.display());
    let spec2 = format!("{}:{w2}", p2.display());
    let cat = d.join("cat");
    let v = json(&run_ok(&[
        "combine",
        "--model",
        &tiny_str(),
        &spec1,
        &spec2,
        "--method",
        "cat",
        "--out",
        cat.to_str().unwrap(),
    ]));
    assert_eq!(v["rank"], 5);
    let svd = d.join("svd");
    run_ok(&[
        "combine",
        "--model",
        &tiny_str(),
        &spec1,
        &spec2,
        "--method",
        "svd",
        "--rank",
        "5",
        "--out",
        svd.to_str().unwrap(),
    ]);
    let lin = d.join("lin");
    run_ok(&[
        "combine",
        "--model",
        &tiny_str(),
        &spec1,
        "--method",
        "linear",
        "--out",
        lin.to_str().unwrap(),
    ]);

    let load = |p: &Path| {
        lowrank_model::adapters::load_adapter(&lm.model, p, false)
            .unwrap()
            .0
    };
    let ids: Vec<u32> = lm
        .tok
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let want = logits(&lm, &ids, vec![(load(&p1), w1), (load(&p2), w2)]);
    let base = logits(&lm, &ids, vec![]);
    let effect = max_abs_diff(&want, &base);
    assert!(
        effect > 1e-2,
        "the adapters must change the output (max |Δ| = {effect})"
    );
    let got_cat = logits(&lm, &ids, vec![(load(&cat), 1.0)]);
    let got_svd = logits(&lm, &ids, vec![(load(&svd), 1.0)]);
    let tol = 1e-3 * effect.max(1.0);
    assert!(
        max_abs_diff(&got_cat, &want) < tol,
        "cat vs weighted sum: {}",
        max_abs_diff(&got_cat, &want)
    );
    assert!(
        max_abs_diff(&got_svd, &got_cat) < tol,
        "svd(full rank) vs cat: {}",
        max_abs_diff(&got_svd, &got_cat)
    );
    // One part (PEFT: linear) is exactly w·ΔW.
    let got_lin = logits(&lm, &ids, vec![(load(&lin), 1.0)]);
    let want_lin = logits(&lm, &ids, vec![(load(&p1), w1)]);
    assert!(max_abs_diff(&got_lin, &want_lin) < tol);
    // Bad input: different ranks for linear, unknown method, missing adapter, --rank without svd.
    let out = d.join("bad");
    let o = out.to_str().unwrap();
    fails_with(
        &[
            "combine",
            "--model",
            &tiny_str(),
            &spec1,
            &spec2,
            "--method",
            "linear",
            "--out",
            o,
        ],
        "same rank",
    );
    fails_with(
        &[
            "combine",
            "--model",
            &tiny_str(),
            &spec1,
            "--method",
            "bogus",
            "--out",
            o,
        ],
        "unknown combination method",
    );
    fails_with(
        &[
            "combine",
            "--model",
            &tiny_str(),
            d.join("missing").to_str().unwrap(),
            "--out",
            o,
        ],
        "adapter config not found",
    );
    fails_with(
        &[
            "combine",
            "--model",
            &tiny_str(),
            &spec1,
            "--method",
            "cat",
            "--rank",
            "3",
            "--out",
            o,
        ],
        "--rank applies to --method svd",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn experiment_commands_reject_bad_input() {
    let d = tmpdir("bad");
    let o = d.join("o");
    let o = o.to_str().unwrap();
    let m = tiny_str();
    fails_with(
        &["sweep", "--model", &m, "--task", "nope", "--out", o],
        "unknown task `nope`",
    );
    fails_with(
        &[
            "sweep", "--model", &m, "--task", "sql", "--ranks", "0", "--out", o,
        ],
        "--ranks",
    );
    fails_with(
        &[
            "sweep", "--model", &m, "--task", "sql", "--ranks", "1,x", "--out", o,
        ],
        "not a positive integer",
    );
    fails_with(
        &[
            "sweep",
            "--model",
            &m,
            "--task",
            "sql",
            "--targets",
            "q|zz",
            "--out",
            o,
        ],
        "unknown module `zz`",
    );
    fails_with(&["sweep", "--model", &m, "--out", o], "give --task NAME");
    let data = d.join("train.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let ds = data.to_str().unwrap();
    fails_with(
        &[
            "sweep", "--model", &m, "--data", ds, "--eval", ds, "--out", o,
        ],
        "--metric",
    );
    fails_with(
        &[
            "sweep", "--model", &m, "--data", ds, "--eval", ds, "--metric", "wrong", "--out", o,
        ],
        "--metric `wrong`",
    );
    fails_with(
        &[
            "budget", "--model", &m, "--task", "sql", "--params", "10", "--out", o,
        ],
        "too small",
    );
    fails_with(
        &[
            "compare", "--model", &m, "--task", "sql", "--rank", "0", "--out", o,
        ],
        "--rank",
    );
    fails_with(
        &[
            "sweep",
            "--model",
            d.join("nomodel").to_str().unwrap(),
            "--task",
            "sql",
            "--out",
            o,
        ],
        "no such file",
    );
    let _ = std::fs::remove_dir_all(&d);
}

fn default_model() -> String {
    let out = run_ok(&["fetch"]);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Parse a Markdown table starting at the line with `header_start`: (header, rows).
fn md_table(md: &str, header_start: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let lines: Vec<&str> = md.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(header_start))
        .unwrap_or_else(|| panic!("no table `{header_start}` in:\n{md}"));
    let cells = |l: &str| {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    };
    let header = cells(lines[i]);
    assert!(lines[i + 1].starts_with("|---"), "{md}");
    let rows: Vec<Vec<String>> = lines[i + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| cells(l))
        .collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "ragged table in:\n{md}");
    }
    (header, rows)
}

#[test]
fn sweep_quick_on_the_default_model() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let model = default_model();
    let d = tmpdir("sweep");
    let t0 = std::time::Instant::now();
    let out = run_ok(&[
        "sweep",
        "--model",
        &model,
        "--task",
        "sql",
        "--quick",
        "--quiet",
        "--out",
        d.to_str().unwrap(),
    ]);
    eprintln!("sweep --quick: {:.0} s", t0.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("recommended: Wq,Wv r="), "{stdout}");
    let md = std::fs::read_to_string(d.join("report.md")).unwrap();
    let (header, rows) = md_table(&md, "| Weight type | r=1");
    assert_eq!(header, ["Weight type", "r=1", "r=4", "best r"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], "Wq,Wv");
    for c in &rows[0][1..3] {
        let x: f64 = c.parse().unwrap_or_else(|_| panic!("cell `{c}`"));
        assert!((0.0..=100.0).contains(&x));
    }
    assert!(md.contains("**Recommended:** Wq,Wv with r = "), "{md}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(v["metric"], "exact");
    assert_eq!(v["ranks"], serde_json::json!([1, 4]));
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        assert_eq!(c["eval_n"], 40);
        assert!(c["steps"].as_u64().unwrap() >= 1 && c["steps"].as_u64().unwrap() <= 3);
        assert!(d
            .join(c["dir"].as_str().unwrap())
            .join("adapter_model.safetensors")
            .is_file());
    }
    // r=4 has 4× the parameters of r=1 (30 layers × (1152 + 768) per rank).
    assert_eq!(cells[0]["trainable_params"], 57_600);
    assert_eq!(cells[1]["trainable_params"], 230_400);
    let best = &v["recommended"];
    let (m1, m4) = (
        cells[0]["metric"].as_f64().unwrap(),
        cells[1]["metric"].as_f64().unwrap(),
    );
    let want = if m4 > m1 + 1e-9 { 4 } else { 1 };
    assert_eq!(best["rank"], want, "best metric, ties → smaller r");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn compare_quick_on_the_default_model() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let model = default_model();
    let d = tmpdir("compare");
    let t0 = std::time::Instant::now();
    run_ok(&[
        "compare",
        "--model",
        &model,
        "--task",
        "sql",
        "--quick",
        "--quiet",
        "--out",
        d.to_str().unwrap(),
    ]);
    eprintln!("compare --quick: {:.0} s", t0.elapsed().as_secs_f64());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("compare.json")).unwrap()).unwrap();
    let (l, f) = (&v["lora"], &v["full"]);
    assert_eq!(l["summary"]["trainable_params"], 460_800);
    assert_eq!(f["summary"]["trainable_params"], 134_515_008);
    assert_eq!(
        l["summary"]["steps"], f["summary"]["steps"],
        "same step budget"
    );
    for m in [l, f] {
        assert!(m["summary"]["peak_rss_bytes"].as_u64().unwrap() > 100 << 20);
        assert!(m["summary"]["tok_per_s"].as_f64().unwrap() > 0.0);
        assert!(m["metric"].as_f64().unwrap() >= 0.0);
    }
    assert!(l["checkpoint_bytes"].as_u64().unwrap() * 50 < f["checkpoint_bytes"].as_u64().unwrap());
    // Peak RSS measured per child: full fine-tuning holds gradients and Adam moments of every weight.
    assert!(
        f["summary"]["peak_rss_bytes"].as_u64().unwrap()
            > l["summary"]["peak_rss_bytes"].as_u64().unwrap()
    );
    let storage = v["storage"].as_array().unwrap();
    let s10 = storage.iter().find(|s| s["tasks"] == 10).unwrap();
    assert_eq!(
        s10["full_bytes"].as_u64().unwrap(),
        10 * f["checkpoint_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        s10["lora_bytes"].as_u64().unwrap(),
        v["base_file_bytes"].as_u64().unwrap() + 10 * l["checkpoint_bytes"].as_u64().unwrap()
    );
    let md = std::fs::read_to_string(d.join("report.md")).unwrap();
    let (header, rows) = md_table(&md, "|  | LoRA");
    assert_eq!(header[1..3], ["LoRA", "full fine-tuning"]);
    assert!(
        rows.iter()
            .any(|r| r[0] == "trainable parameters" && r[1] == "460800" && r[2] == "134515008"),
        "{md}"
    );
    let (_, srows) = md_table(&md, "| tasks |");
    assert_eq!(srows.len(), 4);
    for svg in ["loss.svg", "compare.svg"] {
        let s = std::fs::read_to_string(d.join(svg)).unwrap();
        assert!(s.contains("<svg") && md.contains(svg), "{svg}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `eval --predictions`: another engine's answers scored with lowrank's metrics, with clear
/// errors for a wrong count or a bad line.
#[test]
fn eval_scores_predictions_made_elsewhere() {
    let d = tmpdir("predictions");
    let data = d.join("eval.jsonl");
    let mut s = String::new();
    for (q, a) in [
        ("names?", "SELECT name FROM employees"),
        ("ages?", "SELECT age FROM employees"),
        ("cities?", "SELECT city FROM employees"),
    ] {
        s.push_str(&format!(
            "{}\n",
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        ));
    }
    std::fs::write(&data, s).unwrap();
    let preds = d.join("p.jsonl");
    // Exact match normalises case and spacing; the third answer is wrong.
    std::fs::write(
        &preds,
        "\"select name  from employees\"\n{\"prediction\": \" SELECT age FROM employees \"}\n\"SELECT 1\"\n",
    )
    .unwrap();
    let (ds, ps) = (data.to_str().unwrap(), preds.to_str().unwrap());
    let v = json(&run_ok(&[
        "eval",
        "--data",
        ds,
        "--metric",
        "exact",
        "--predictions",
        ps,
    ]));
    assert_eq!(v["n"], 3);
    assert_eq!(v["exact"], 66.67);
    // One answer short: refused, naming the file and both counts.
    std::fs::write(&preds, "\"SELECT 1\"\n\"SELECT 2\"\n").unwrap();
    fails_with(
        &[
            "eval",
            "--data",
            ds,
            "--metric",
            "exact",
            "--predictions",
            ps,
        ],
        "2 predictions for 3 held-out examples",
    );
    std::fs::write(&preds, "\"SELECT 1\"\n{\"prediction\": 7}\n\"x\"\n").unwrap();
    fails_with(
        &[
            "eval",
            "--data",
            ds,
            "--metric",
            "exact",
            "--predictions",
            ps,
        ],
        "p.jsonl:2: field `prediction` must be a string",
    );
    // A built-in task's held-out set: the task's own answers score 100.
    let made = d.join("sql");
    run_ok(&["tasks", "make", "sql", "--out", made.to_str().unwrap()]);
    let golds: String = std::fs::read_to_string(made.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}\n",
                v["messages"].as_array().unwrap().last().unwrap()["content"]
            )
        })
        .collect();
    std::fs::write(&preds, golds).unwrap();
    let v = json(&run_ok(&[
        "eval",
        "--data",
        made.join("eval.jsonl").to_str().unwrap(),
        "--metric",
        "exact",
        "--predictions",
        ps,
    ]));
    assert_eq!(v["exact"], 100.0);
    let _ = std::fs::remove_dir_all(&d);
}
