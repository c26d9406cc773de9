//! Files a run writes besides tensors: metrics.jsonl lines, files replaced atomically, the
//! provenance time stamp, and the sizes the summaries report.

use std::io::Write;
use std::path::Path;

use super::{io, Result};

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Append one JSON line. The line is formatted first and written with one call, so a process
/// killed mid-way leaves at most one unterminated last line (which a resume drops), never a
/// line cut in the middle followed by another.
pub(super) fn append_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let line = format!("{v}\n");
    f.write_all(line.as_bytes()).map_err(io(path))
}

/// Replace `path` with `bytes` atomically (see `lowrank_lora::peft::write_file_atomically`).
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    lowrank_lora::peft::write_file_atomically(path, bytes).map_err(|e| match e {
        lowrank_lora::LoraError::Io { path, msg } => super::TrainError::Io { path, msg },
        other => other.into(),
    })
}

/// Flush a directory's entries (a rename in it) to disk. Best effort: some file systems
/// cannot open or sync directories, and a rename is atomic without it.
pub(super) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Flush every file of `dir`, then the directory itself, to disk.
pub(super) fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&p))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// `SOURCE_DATE_EPOCH` (reproducible builds) if set, else now, as an RFC 3339 UTC stamp.
pub fn created_stamp() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
