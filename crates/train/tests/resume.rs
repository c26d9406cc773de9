//! Resuming in-process on the tiny fixture model: a checkpoint whose optimizer or trainer
//! state is missing or cut is refused naming the file; a changed setting is refused naming
//! each change (unless allowed); an output directory resumes from its newest complete
//! checkpoint; the optimizer file is always written; a fresh start owns its directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use lowrank_model::LoadedModel;
use lowrank_train::progress::Event;
use lowrank_train::{TrainConfig, TrainSummary, Trainer};

fn tiny() -> LoadedModel {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/model"
    );
    LoadedModel::load(p, &Device::Cpu).unwrap()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..16 {
        s.push_str(&serde_json::json!({"prompt": format!("Repeat after me: {i}"), "completion": format!(" {i} {i} {i}")}).to_string());
        s.push('\n');
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn cfg(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        data: Some(data.into()),
        out: Some(out.into()),
        targets: vec!["q_proj".into(), "v_proj".into()],
        rank: 4,
        lr: 1e-2,
        seed: 1,
        dropout: 0.1,
        batch_size: 4,
        max_steps: Some(6),
        save_every: 2,
        keep_checkpoints: 5,
        ..Default::default()
    }
}

/// [`cfg`] for 8 steps (two epochs).
fn cfg8(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        max_steps: Some(8),
        ..cfg(data, out)
    }
}

/// Run `cfg` (resuming from `resume`), collecting the progress events.
fn train(
    lm: &LoadedModel,
    cfg: TrainConfig,
    resume: Option<&Path>,
    allow: bool,
    stop: bool,
) -> (Result<TrainSummary, String>, Vec<Event>) {
    let mut t = Trainer::new(lm, cfg).unwrap();
    t.allow_changed_config(allow);
    let mut events = Vec::new();
    let r = t
        .run_with_progress(resume, &AtomicBool::new(stop), &mut |e| {
            events.push(e.clone())
        })
        .map_err(|e| e.to_string());
    (r, events)
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The adapter's tensors (the file's bytes also hold a creation time).
fn adapter(out: &Path) -> Vec<(String, Vec<f32>)> {
    let m = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

/// Something done to one file of a checkpoint.
type Damage = fn(&Path);

#[test]
fn missing_or_cut_checkpoint_files_are_refused_naming_the_file() {
    let lm = tiny();
    let d = tmpdir("files");
    let data = data(&d);
    let run = d.join("run");
    train(&lm, cfg(&data, &run), None, false, false).0.unwrap();
    let ck = run.join("checkpoint-2");
    assert!(ck.join("optimizer.safetensors").exists());
    let cases: [(&str, &str, Damage); 4] = [
        ("no-opt", "optimizer.safetensors", |p| {
            std::fs::remove_file(p).unwrap()
        }),
        ("cut-opt", "optimizer.safetensors", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
        ("no-state", "trainer_state.json", |p| {
            std::fs::remove_file(p).unwrap()
        }),
        ("cut-state", "trainer_state.json", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
    ];
    for (name, file, damage) in cases {
        let bad = d.join(name).join("checkpoint-2");
        copy_dir(&ck, &bad);
        damage(&bad.join(file));
        let (r, _) = train(&lm, cfg(&data, &d.join(name)), Some(&bad), false, false);
        let err = r.expect_err(name);
        let want = bad.join(file).display().to_string();
        assert!(
            err.contains(&want),
            "{name}: error {err:?} should name {want}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn changed_settings_are_refused_naming_each_unless_allowed() {
    let lm = tiny();
    let d = tmpdir("config");
    let data = data(&d);
    let run = d.join("run");
    train(&lm, cfg8(&data, &run), None, false, false).0.unwrap();
    let ck = run.join("checkpoint-4");
    let mut changed = cfg8(&data, &d.join("changed"));
    changed.seed = 2;
    changed.lr = 2e-2;
    changed.warmup_steps = 1;
    changed.max_steps = Some(10);
    let (r, _) = train(&lm, changed.clone(), Some(&ck), false, false);
    let err = r.unwrap_err();
    for want in [
        "--seed: 1 → 2",
        "--lr: 0.01 → 0.02",
        "--warmup-steps: 0 → 1",
    ] {
        assert!(err.contains(want), "{err}: should name {want}");
    }
    assert!(err.contains("trainer_state.json"), "{err}");
    // Other data (same name, other content) is a change too.
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"text\": \"one more record\"}\n");
    std::fs::write(other.join("d.jsonl"), text).unwrap();
    let (r, _) = train(
        &lm,
        cfg8(&other.join("d.jsonl"), &d.join("o")),
        Some(&ck),
        false,
        false,
    );
    let err = r.unwrap_err();
    assert!(err.contains("--data: d.jsonl ("), "{err}");
    // Settings that leave the numbers alone may change (and a copy of the data elsewhere is
    // the same data).
    let copy = d.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(&data, copy.join("d.jsonl")).unwrap();
    let mut free = cfg8(&copy.join("d.jsonl"), &d.join("free"));
    free.keep_checkpoints = 1;
    free.save_every = 3;
    free.eval_every = 1;
    free.time_budget_s = 1000.0;
    free.save_dtype = "bf16".into();
    free.alpha = Some(8.0); // 2 × rank: the default spelled out
    free.targets = vec!["q".into(), "v".into()];
    free.max_steps = None;
    free.epochs = 2; // 16 records in batches of 4: the same 8 steps
    train(&lm, free, Some(&ck), false, false).0.unwrap();
    // Allowed: it runs and warns with the list.
    let (r, events) = train(&lm, changed, Some(&ck), true, false);
    r.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Warning(w) if w.contains("--seed: 1 → 2"))),
        "{events:?}"
    );
    // What the tensors depend on never changes.
    let mut rank = cfg8(&data, &d.join("rank"));
    rank.rank = 2;
    let err = train(&lm, rank, Some(&ck), true, false).0.unwrap_err();
    assert!(err.contains("--rank: 4 → 2"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_output_dir_resumes_from_its_newest_complete_checkpoint() {
    let lm = tiny();
    let d = tmpdir("outdir");
    let data = data(&d);
    let reference = d.join("reference");
    train(&lm, cfg(&data, &reference), None, false, false)
        .0
        .unwrap();
    let run = d.join("run");
    train(&lm, cfg(&data, &run), None, false, false).0.unwrap();
    assert_eq!(checkpoints(&run), ["checkpoint-2", "checkpoint-4"]);
    // The newest is cut (as by a crash of an older lowrank): passed over, with a warning.
    let op = run.join("checkpoint-4/optimizer.safetensors");
    let b = std::fs::read(&op).unwrap();
    std::fs::write(&op, &b[..b.len() - 3]).unwrap();
    let (r, events) = train(&lm, cfg(&data, &run), Some(&run), false, false);
    let s = r.unwrap();
    let picked = run.join("checkpoint-2");
    assert_eq!(s.resumed_from.as_deref(), Some(picked.as_path()));
    let said = format!("resuming from {} (step 2)", picked.display());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Note(n) if *n == said)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::Warning(w)
            if w.contains("checkpoint-4") && w.contains("optimizer.safetensors"))),
        "{events:?}"
    );
    assert_eq!(losses(&run), losses(&reference));
    assert_eq!(adapter(&run), adapter(&reference));
    // A directory with no checkpoint says so.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = train(&lm, cfg(&data, &run), Some(&empty), false, false)
        .0
        .unwrap_err();
    assert!(err.contains("no checkpoint to resume from"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_optimizer_file_is_always_written_and_old_checkpoints_still_load() {
    let lm = tiny();
    let d = tmpdir("format");
    let data = data(&d);
    let reference = d.join("reference");
    train(&lm, cfg(&data, &reference), None, false, false)
        .0
        .unwrap();
    // Stopped before the first step: a checkpoint whose optimizer has no state yet.
    let run = d.join("run");
    let (r, _) = train(&lm, cfg(&data, &run), None, false, true);
    assert!(r.unwrap().interrupted);
    let ck0 = run.join("checkpoint-0");
    assert!(
        ck0.join("optimizer.safetensors").exists(),
        "the optimizer file must exist even before the first step"
    );
    train(&lm, cfg(&data, &run), Some(&ck0), false, false)
        .0
        .unwrap();
    assert_eq!(losses(&run), losses(&reference));
    assert_eq!(adapter(&run), adapter(&reference));
    // Format 1 (no `format` key) before the first step had no optimizer file: still loads.
    let old = d.join("old");
    let run = d.join("run1");
    let (r, _) = train(&lm, cfg(&data, &run), None, false, true);
    assert!(r.unwrap().interrupted);
    copy_dir(&run.join("checkpoint-0"), &old.join("checkpoint-0"));
    make_format_1(&old.join("checkpoint-0"));
    std::fs::remove_file(old.join("checkpoint-0/optimizer.safetensors")).unwrap();
    train(
        &lm,
        cfg(&data, &run),
        Some(&old.join("checkpoint-0")),
        false,
        false,
    )
    .0
    .unwrap();
    assert_eq!(adapter(&run), adapter(&reference));
    // ... but one after steps without its optimizer file is refused.
    let ck4 = old.join("checkpoint-4");
    copy_dir(&reference.join("checkpoint-4"), &ck4);
    make_format_1(&ck4);
    std::fs::remove_file(ck4.join("optimizer.safetensors")).unwrap();
    let err = train(&lm, cfg(&data, &d.join("x")), Some(&ck4), false, false)
        .0
        .unwrap_err();
    assert!(
        err.contains(&ck4.join("optimizer.safetensors").display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Rewrite a checkpoint's trainer state as format 1 wrote it (no format, counts or inputs).
fn make_format_1(ck: &Path) {
    let p = ck.join("trainer_state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    for k in ["format", "optimizer_params", "inputs"] {
        o.remove(k);
    }
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_fresh_start_removes_an_earlier_runs_checkpoints() {
    let lm = tiny();
    let d = tmpdir("fresh");
    let data = data(&d);
    let run = d.join("run");
    let mut long = cfg(&data, &run);
    long.max_steps = Some(12);
    long.save_every = 1;
    long.keep_checkpoints = 20;
    train(&lm, long, None, false, false).0.unwrap();
    assert_eq!(checkpoints(&run).len(), 11);
    // A shorter run in the same directory keeps only its own newest two.
    let mut short = cfg(&data, &run);
    short.save_every = 1;
    short.keep_checkpoints = 2;
    let (r, events) = train(&lm, short, None, false, false);
    r.unwrap();
    assert_eq!(checkpoints(&run), ["checkpoint-4", "checkpoint-5"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Warning(w) if w.contains("checkpoint-11"))),
        "{events:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
