//! Checkpoints: `checkpoint-N/` holds the trainable tensors (a PEFT adapter, or a safetensors
//! file for full fine-tuning), the AdamW moments (`optimizer.safetensors`) and the trainer
//! state (`trainer_state.json`: step, RNG position, clock, the settings and the identity of the
//! inputs); resuming from one continues with exactly the loss sequence of an uninterrupted run.
//!
//! Crash safety: a checkpoint is written into `.checkpoint-N.partial/`, its files and the
//! directory flushed to disk, then renamed into place; a checkpoint is deleted by renaming it
//! to `.checkpoint-N.deleted` first. A process killed at any moment thus leaves every
//! `checkpoint-N` complete or absent; the hidden leftovers are swept when the next run starts.
//!
//! Format 2 (this one) always writes `optimizer.safetensors` (without tensors before the first
//! step) and records how many parameters it holds moments of, so a missing or cut file is
//! always an error. Format 1 wrote it only once AdamW had state: such a checkpoint is read
//! without it only if it was made before the first optimizer step.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use lowrank_lora::peft::{CONFIG_FILE, WEIGHTS_FILE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::files::{sync_dir, sync_tree, write_atomic};
use super::{io, Result, RunState, TrainError, Trainable, Trainer};
use crate::config::{Method, TrainConfig};
use crate::optim::AdamW;

pub(super) const STATE_FILE: &str = "trainer_state.json";
pub(super) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(super) const MODEL_FILE: &str = "model.safetensors";
const PREFIX: &str = "checkpoint-";
/// The checkpoint format this code writes (see the module comment).
const FORMAT: u32 = 2;
/// Safetensors' own cap on the JSON header (checked before the header is allocated).
const MAX_HEADER: u64 = 100_000_000;

fn format_v1() -> u32 {
    1
}

fn bad(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Io {
        path: path.into(),
        msg: msg.into(),
    }
}

/// `missing` for a file that is not there, else the I/O error.
fn open_err(path: &Path, e: std::io::Error) -> TrainError {
    if e.kind() == std::io::ErrorKind::NotFound {
        bad(path, "missing")
    } else {
        bad(path, format!("unreadable: {e}"))
    }
}

/// A data file as a run read it: compared by content on resume (a moved or renamed copy of
/// the same file resumes; an edited one does not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct FileId {
    pub(super) name: String,
    pub(super) bytes: u64,
    pub(super) sha256: String,
}

impl FileId {
    pub(super) fn of(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| open_err(path, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io(path))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            h.update(&buf[..n]);
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(FileId {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            sha256,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} bytes, sha256 {})",
            self.name,
            self.bytes,
            &self.sha256[..self.sha256.len().min(12)]
        )
    }
}

/// What a run reads besides its settings: compared on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct RunInputs {
    pub(super) data: FileId,
    pub(super) eval: Option<FileId>,
    pub(super) base_fingerprint: String,
}

/// Persisted with each checkpoint: everything needed to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TrainerState {
    /// Absent in format 1.
    #[serde(default = "format_v1")]
    pub(super) format: u32,
    pub(super) step: usize,
    pub(super) opt_t: u64,
    pub(super) dropout_rng_word_pos: u128,
    pub(super) elapsed_s: f64,
    pub(super) tokens: usize,
    pub(super) first_loss: Option<f64>,
    pub(super) eval_loss_before: Option<f64>,
    pub(super) config: TrainConfig,
    /// Parameters whose moments `optimizer.safetensors` holds (format 2).
    #[serde(default)]
    pub(super) optimizer_params: Option<usize>,
    /// The data, eval data and base model of the run (format 2).
    #[serde(default)]
    pub(super) inputs: Option<RunInputs>,
}

impl TrainerState {
    /// What to persist of `run` after `elapsed` seconds of training.
    fn of(run: &RunState, cfg: &TrainConfig, inputs: &RunInputs, elapsed: f64) -> Self {
        TrainerState {
            format: FORMAT,
            step: run.step,
            opt_t: run.opt.t,
            dropout_rng_word_pos: run.dropout_rng.get_word_pos(),
            elapsed_s: elapsed,
            tokens: run.tokens,
            first_loss: run.first_loss,
            eval_loss_before: run.eval_before,
            config: cfg.clone(),
            optimizer_params: Some(run.opt.state.len()),
            inputs: Some(inputs.clone()),
        }
    }
}

/// The step of a directory named `checkpoint-N` (digits only).
fn step_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The `checkpoint-N` directories in `out` as (step, name), oldest first.
pub(super) fn list_checkpoints(out: &Path) -> Result<Vec<(usize, String)>> {
    let mut all: Vec<(usize, String)> = std::fs::read_dir(out)
        .map_err(io(out))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            Some((step_of(&name)?, name))
        })
        .collect();
    all.sort();
    Ok(all)
}

/// Delete the directory `out/name` so that no crash can leave part of it under its name: it
/// is renamed to a hidden tombstone first (atomic), then the tombstone is deleted.
pub(super) fn remove_dir_atomically(out: &Path, name: &str) -> Result<()> {
    let from = out.join(name);
    let grave = out.join(format!(".{name}.deleted"));
    if grave.exists() {
        // A tombstone of the same name left by an earlier crash: already garbage.
        std::fs::remove_dir_all(&grave).map_err(io(&grave))?;
    }
    std::fs::rename(&from, &grave).map_err(io(&from))?;
    sync_dir(out);
    // Once renamed the directory is gone from every reader's view; a tombstone that cannot
    // be deleted now is swept when the next run starts.
    let _ = std::fs::remove_dir_all(&grave);
    Ok(())
}

/// Is `name` something a killed run leaves behind in its output directory?
fn is_leftover(name: &str) -> bool {
    // The adapter writer's own temporaries beside the directory it writes (the checkpoint's
    // `.partial` or the final adapter's `.adapter.tmp`): `.{dir}.tmp-*` and `.{dir}.old-*`.
    if let Some(rest) = name.strip_prefix('.') {
        for sep in [".tmp-", ".old-"] {
            if rest.rfind(sep).is_some_and(|i| is_leftover(&rest[..i])) {
                return true;
            }
        }
    }
    let hidden_checkpoint = name
        .strip_prefix('.')
        .and_then(|n| {
            n.strip_suffix(".partial")
                .or_else(|| n.strip_suffix(".deleted"))
        })
        .and_then(step_of)
        .is_some();
    hidden_checkpoint
        || matches!(
            name,
            ".adapter.tmp" | ".metrics.jsonl.tmp" | ".summary.json.tmp"
        )
}

/// Remove what a killed run left in `out`: half-written checkpoints (`.checkpoint-N.partial`),
/// tombstones of deleted ones (`.checkpoint-N.deleted`) and temporary files; their names.
pub(super) fn sweep_leftovers(out: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(out).map_err(io(out))? {
        let e = e.map_err(io(out))?;
        let Some(name) = e.file_name().to_str().map(String::from) else {
            continue;
        };
        if !is_leftover(&name) {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
        } else {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// The number of tensors of a safetensors file, after checking that its header parses and
/// that the file is exactly as long as the header says (so a cut file is caught); the tensor
/// data is not read.
fn safetensors_tensors(path: &Path) -> Result<usize> {
    let mut f = std::fs::File::open(path).map_err(|e| open_err(path, e))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len < 8 {
        return Err(bad(path, format!("truncated: {len} bytes")));
    }
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(io(path))?;
    let n = u64::from_le_bytes(n8);
    // Checked before the header is allocated.
    if n > len - 8 || n > MAX_HEADER {
        return Err(bad(
            path,
            format!("truncated or corrupt: a header of {n} bytes in a file of {len}"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io(path))?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("corrupt safetensors header: {e}")))?;
    let want = 8 + n + meta.data_len() as u64;
    if want != len {
        return Err(bad(
            path,
            format!("truncated or corrupt: its header describes {want} bytes, the file has {len}"),
        ));
    }
    Ok(meta.tensors().len())
}

/// The state of the checkpoint `dir` once every file its format requires is present and
/// parses; else an error naming the first file that is not.
pub(super) fn verify(dir: &Path) -> Result<TrainerState> {
    let sp = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).map_err(|e| open_err(&sp, e))?;
    let st: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad(&sp, format!("invalid: {e}")))?;
    if st.format > FORMAT {
        return Err(bad(
            &sp,
            format!(
                "checkpoint format {} is newer than this lowrank reads ({FORMAT})",
                st.format
            ),
        ));
    }
    match st.config.method {
        Method::Lora => {
            let cp = dir.join(CONFIG_FILE);
            let text = std::fs::read_to_string(&cp).map_err(|e| open_err(&cp, e))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| bad(&cp, format!("invalid: {e}")))?;
            safetensors_tensors(&dir.join(WEIGHTS_FILE))?;
        }
        Method::Full => {
            safetensors_tensors(&dir.join(MODEL_FILE))?;
        }
    }
    // Format 1 wrote no optimizer file before AdamW's first step (it had no state).
    if st.format >= 2 || st.opt_t > 0 {
        let op = dir.join(OPTIMIZER_FILE);
        let n = safetensors_tensors(&op)?;
        if let Some(k) = st.optimizer_params {
            if n != 2 * k {
                return Err(bad(
                    &op,
                    format!("holds {n} tensors; {STATE_FILE} records the moments of {k} parameters (2 each)"),
                ));
            }
        }
    }
    Ok(st)
}

/// A checkpoint chosen to resume from.
pub(super) struct Picked {
    pub(super) dir: PathBuf,
    pub(super) state: TrainerState,
    /// The newer checkpoints passed over because they are incomplete, each with why.
    pub(super) passed_over: Vec<String>,
}

/// `dir` itself if it is a checkpoint (it holds `trainer_state.json` or is named
/// `checkpoint-N`), else the newest complete `checkpoint-N` in it (a run's output directory).
pub(super) fn pick(dir: &Path) -> Result<Picked> {
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(step_of)
        .is_some();
    if named || dir.join(STATE_FILE).exists() {
        return Ok(Picked {
            state: verify(dir)?,
            dir: dir.into(),
            passed_over: vec![],
        });
    }
    if !dir.is_dir() {
        return Err(bad(
            dir,
            "not found (give a checkpoint directory or a run's output directory)",
        ));
    }
    let mut passed_over = Vec::new();
    for (_, name) in list_checkpoints(dir)?.into_iter().rev() {
        let d = dir.join(&name);
        match verify(&d) {
            Ok(state) => {
                return Ok(Picked {
                    dir: d,
                    state,
                    passed_over,
                })
            }
            Err(e) => passed_over.push(e.to_string()),
        }
    }
    Err(bad(
        dir,
        if passed_over.is_empty() {
            "no checkpoint to resume from (neither a checkpoint directory nor an output directory holding checkpoint-N)".to_string()
        } else {
            format!(
                "no complete checkpoint to resume from: {}",
                passed_over.join("; ")
            )
        },
    ))
}

/// Settings that do not change the numbers a run computes: free to change on resume. The
/// data files are compared by content instead of by path, and --epochs / --max-steps by the
/// run's length in steps they give (which the schedule depends on).
const FREE: &[&str] = &[
    "data",
    "eval",
    "epochs",
    "max_steps",
    "out",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "time_budget_s",
    "save_dtype",
    "skip_bad",
    "checkpoint_layers",
];
/// Settings the saved tensors depend on (their shapes, or PiSSA's rewritten base): never
/// changeable on resume.
const FIXED: &[&str] = &["method", "rank", "targets", "init"];

/// A config as JSON with equivalent spellings made equal (α's default, short target names).
fn normalized(cfg: &TrainConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut c = cfg.clone();
    c.alpha = Some(cfg.alpha());
    if let Ok(t) = cfg.target_names() {
        c.targets = t;
    }
    if c.init == "true" {
        c.init = "default".into();
    }
    match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

fn flag(key: &str) -> String {
    match key {
        "time_budget_s" => "--time-budget".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => "none".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| show(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// How this run's settings and inputs differ from the checkpoint's, as
/// `--flag: checkpoint's → this run's`: (the changes the tensors cannot follow, the others).
fn changes(
    st: &TrainerState,
    cfg: &TrainConfig,
    inputs: &RunInputs,
    total_steps: impl Fn(&TrainConfig) -> usize,
) -> (Vec<String>, Vec<String>) {
    let (old, new) = (normalized(&st.config), normalized(cfg));
    let (mut fixed, mut other) = (Vec::new(), Vec::new());
    let (was, now) = (total_steps(&st.config), total_steps(cfg));
    if was != now {
        other.push(format!("--max-steps/--epochs: {was} steps → {now} steps"));
    }
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        if FREE.contains(&k.as_str()) || old.get(k) == new.get(k) {
            continue;
        }
        let line = format!("{}: {} → {}", flag(k), show(old.get(k)), show(new.get(k)));
        if FIXED.contains(&k.as_str()) {
            fixed.push(line);
        } else {
            other.push(line);
        }
    }
    match &st.inputs {
        Some(was) => {
            if was.data.sha256 != inputs.data.sha256 {
                other.push(format!(
                    "--data: {} → {}",
                    was.data.describe(),
                    inputs.data.describe()
                ));
            }
            if was.eval.as_ref().map(|f| &f.sha256) != inputs.eval.as_ref().map(|f| &f.sha256) {
                let d = |f: &Option<FileId>| f.as_ref().map_or("none".into(), FileId::describe);
                other.push(format!("--eval: {} → {}", d(&was.eval), d(&inputs.eval)));
            }
            if was.base_fingerprint != inputs.base_fingerprint {
                other.push(format!(
                    "--model: base weights with fingerprint {} → {}",
                    was.base_fingerprint, inputs.base_fingerprint
                ));
            }
        }
        // Format 1 recorded no content hashes: the paths are all there is to compare.
        None => {
            for k in ["data", "eval"] {
                if old.get(k) != new.get(k) {
                    other.push(format!(
                        "{}: {} → {}",
                        flag(k),
                        show(old.get(k)),
                        show(new.get(k))
                    ));
                }
            }
        }
    }
    (fixed, other)
}

impl Trainer<'_> {
    /// Write `checkpoint-N/` atomically (a `.partial` sibling renamed into place): the trainable
    /// tensors, the optimizer moments and the trainer state; then prune old checkpoints.
    pub(super) fn save_checkpoint(&self, run: &RunState, elapsed: f64) -> Result<PathBuf> {
        let name = format!("{PREFIX}{}", run.step);
        let final_dir = self.out.join(&name);
        if !self.writer() {
            // Rank 0 writes the job's checkpoints (all ranks hold the same state).
            return Ok(final_dir);
        }
        let tmp = self.out.join(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        // Trainable tensors: a PEFT adapter (LoRA) or a plain safetensors file (full).
        match self.current_adapter()? {
            Some(a) => lowrank_lora::peft::save_peft(&a, &tmp, DType::F32)?,
            None => {
                std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
                let ts: HashMap<String, Tensor> = self
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
                    .collect();
                let mp = tmp.join(MODEL_FILE);
                candle_core::safetensors::save(&ts, &mp).map_err(io(&mp))?;
            }
        }
        // Always written (without tensors before the first step): a checkpoint without it
        // is broken, never a fresh optimizer.
        let mut ostate: HashMap<String, Tensor> = HashMap::new();
        for (k, (m, v)) in &run.opt.state {
            ostate.insert(format!("m.{k}"), m.clone());
            ostate.insert(format!("v.{k}"), v.clone());
        }
        let op = tmp.join(OPTIMIZER_FILE);
        candle_core::safetensors::save(&ostate, &op).map_err(io(&op))?;
        let st = TrainerState::of(run, &self.cfg, &self.inputs, elapsed);
        let sp = tmp.join(STATE_FILE);
        std::fs::write(&sp, serde_json::to_string_pretty(&st).expect("json")).map_err(io(&sp))?;
        let what = format!("checkpoint at step {}", run.step);
        self.write_card(&tmp, run, elapsed, None, what)?;
        sync_tree(&tmp)?;
        if final_dir.exists() {
            // The same step saved again (a resumed run stopped before its first step).
            remove_dir_atomically(&self.out, &name)?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        sync_dir(&self.out);
        self.prune_checkpoints()?;
        Ok(final_dir)
    }

    /// Delete all but the newest `keep_checkpoints` checkpoints, each atomically.
    fn prune_checkpoints(&self) -> Result<()> {
        self.prune_checkpoints_through(usize::MAX)
    }

    /// Delete all but the newest `keep_checkpoints` of the checkpoints at or before `step`,
    /// each atomically. A run killed between saving a checkpoint and pruning leaves one too
    /// many; its resume calls this with the step it resumes from, since a resumed run may
    /// save no checkpoint of its own (and the later ones, if any, are not its to judge).
    pub(super) fn prune_checkpoints_through(&self, step: usize) -> Result<()> {
        let keep = self.cfg.keep_checkpoints.max(1);
        let mut all = list_checkpoints(&self.out)?;
        all.retain(|(s, _)| *s <= step);
        if all.len() > keep {
            for (_, name) in &all[..all.len() - keep] {
                remove_dir_atomically(&self.out, name)?;
            }
        }
        Ok(())
    }

    /// Refuse a checkpoint made with settings or inputs that change this run's numbers,
    /// naming each change, unless `allow_changed_config`; the changes accepted are returned.
    pub(super) fn check_resume_config(&self, p: &Picked) -> Result<Vec<String>> {
        let sp = p.dir.join(STATE_FILE);
        // The run's length as `Trainer::new` computes it, on this run's data (other data is
        // reported on its own).
        let total = |c: &TrainConfig| {
            let per_epoch = super::epoch_order(self.train.len(), c, 0, &self.train).len();
            c.max_steps
                .unwrap_or(c.epochs * per_epoch.div_ceil(c.grad_accum.max(1)))
        };
        let (fixed, other) = changes(&p.state, &self.cfg, &self.inputs, total);
        if !fixed.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint's tensors were made with other settings, which cannot change on resume ({})",
                sp.display(),
                fixed.join("; ")
            )));
        }
        if !other.is_empty() && !self.allow_changed_config {
            return Err(TrainError::ChangedConfig {
                path: sp,
                changes: other,
            });
        }
        Ok(other)
    }

    /// Restore the trainable tensors and the optimizer from the checkpoint `dir` (verified,
    /// with state `st`).
    pub(super) fn load_checkpoint(
        &mut self,
        dir: &Path,
        st: &TrainerState,
        opt: &mut AdamW,
    ) -> Result<()> {
        let values: BTreeMap<String, Tensor> = match &self.trainable {
            Trainable::Lora { .. } => {
                let a = lowrank_lora::peft::load_peft(
                    dir,
                    &self.model.base_shapes(),
                    self.model.device(),
                )?;
                let mut v = BTreeMap::new();
                for (k, m) in a.modules {
                    v.insert(format!("{}.lora_A.weight", k.peft_prefix()), m.a);
                    v.insert(format!("{}.lora_B.weight", k.peft_prefix()), m.b);
                }
                v
            }
            Trainable::Full => {
                let mp = dir.join(MODEL_FILE);
                candle_core::safetensors::load(&mp, self.model.device())
                    .map_err(|e| bad(&mp, format!("unreadable: {e}")))?
                    .into_iter()
                    .collect()
            }
        };
        for p in &self.params {
            let t = values
                .get(&p.name)
                .ok_or_else(|| bad(dir, format!("checkpoint lacks `{}`", p.name)))?;
            p.var.set(t)?;
        }
        let op = dir.join(OPTIMIZER_FILE);
        if st.format >= 2 || st.opt_t > 0 || op.exists() {
            self.load_moments(&op, st, opt)?;
        }
        opt.t = st.opt_t;
        Ok(())
    }

    /// AdamW's moments from `op`: an (m, v) pair of this run's shapes per parameter, as many
    /// as the trainer state records.
    fn load_moments(&self, op: &Path, st: &TrainerState, opt: &mut AdamW) -> Result<()> {
        let os = candle_core::safetensors::load(op, self.model.device()).map_err(|e| match e {
            candle_core::Error::Io(e) => open_err(op, e),
            e => bad(op, format!("unreadable: {e}")),
        })?;
        let shapes: HashMap<&str, &[usize]> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.var.as_tensor().dims()))
            .collect();
        for k in os.keys() {
            let name = k.strip_prefix("m.").or_else(|| k.strip_prefix("v."));
            if !name.is_some_and(|n| shapes.contains_key(n)) {
                return Err(bad(
                    op,
                    format!("`{k}` is not a moment of a trainable tensor of this run"),
                ));
            }
        }
        for p in &self.params {
            let (mk, vk) = (format!("m.{}", p.name), format!("v.{}", p.name));
            match (os.get(&mk), os.get(&vk)) {
                (Some(m), Some(v)) => {
                    for (k, t) in [(&mk, m), (&vk, v)] {
                        if t.dims() != shapes[p.name.as_str()] {
                            return Err(bad(
                                op,
                                format!(
                                    "`{k}` has shape {:?}, the parameter {:?}",
                                    t.dims(),
                                    shapes[p.name.as_str()]
                                ),
                            ));
                        }
                    }
                    opt.state.insert(p.name.clone(), (m.clone(), v.clone()));
                }
                (None, None) => {}
                _ => return Err(bad(op, format!("holds only one of `{mk}`, `{vk}`"))),
            }
        }
        if let Some(k) = st.optimizer_params {
            if opt.state.len() != k {
                return Err(bad(
                    op,
                    format!(
                        "holds the moments of {} parameters; {STATE_FILE} records {k}",
                        opt.state.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Keep only records up to `step` (a resumed run rewrites what follows); the file is replaced
/// atomically, so a crash here loses nothing.
pub(super) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    // Unparseable lines (a last line cut by a kill) are dropped with the later steps.
    let mut out = String::new();
    for l in text.lines().filter(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| (s as usize) <= step)
    }) {
        out.push_str(l);
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lowrank-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_digits_name_a_checkpoint() {
        assert_eq!(step_of("checkpoint-12"), Some(12));
        for n in [
            "checkpoint-",
            "checkpoint-+1",
            "checkpoint-1x",
            ".checkpoint-1.deleted",
        ] {
            assert_eq!(step_of(n), None, "{n}");
        }
    }

    #[test]
    fn sweep_removes_partials_and_tombstones_only() {
        let d = tmp("sweep");
        for n in [
            ".checkpoint-3.partial",
            ".checkpoint-2.deleted",
            "checkpoint-4",
            ".adapter.tmp",
            "..adapter.tmp.old-1-2-0",
            "..checkpoint-3.partial.tmp-7-8-0",
            "keep.partial",
            ".keep.tmp-1",
        ] {
            std::fs::create_dir_all(d.join(n)).unwrap();
            std::fs::write(d.join(n).join("f"), "x").unwrap();
        }
        std::fs::write(d.join(".metrics.jsonl.tmp"), "x").unwrap();
        let removed = sweep_leftovers(&d).unwrap();
        assert_eq!(
            removed,
            [
                "..adapter.tmp.old-1-2-0",
                "..checkpoint-3.partial.tmp-7-8-0",
                ".adapter.tmp",
                ".checkpoint-2.deleted",
                ".checkpoint-3.partial",
                ".metrics.jsonl.tmp"
            ]
        );
        assert!(d.join("checkpoint-4/f").exists());
        assert!(d.join("keep.partial/f").exists());
        assert!(d.join(".keep.tmp-1/f").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn atomic_removal_replaces_a_stale_tombstone() {
        let d = tmp("tomb");
        std::fs::create_dir_all(d.join("checkpoint-1")).unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-1.deleted/x")).unwrap();
        remove_dir_atomically(&d, "checkpoint-1").unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn safetensors_check_catches_a_cut_file() {
        let d = tmp("st");
        let p = d.join("o.safetensors");
        let t = Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("m.x", t)]), &p).unwrap();
        assert_eq!(safetensors_tensors(&p).unwrap(), 1);
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = safetensors_tensors(&p).unwrap_err().to_string();
            assert!(e.contains("o.safetensors"), "{cut}: {e}");
        }
        // A header length far beyond the file is refused before anything is allocated.
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        assert!(safetensors_tensors(&p).is_err());
        // No tensors at all (the optimizer before its first step) is a valid file.
        candle_core::safetensors::save(&HashMap::<String, Tensor>::new(), &p).unwrap();
        assert_eq!(safetensors_tensors(&p).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
