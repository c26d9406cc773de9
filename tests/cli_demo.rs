//! `lowrank demo --quick` end to end on the embedded default model: every adapter must beat
//! the base on its task's metric (the binary exits 2 otherwise), and the report is written.

use std::process::Command;

#[test]
fn demo_quick_adapters_beat_the_base() {
    let out = std::env::temp_dir().join(format!("lowrank-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let report = std::fs::read_to_string(out.join("README.md")).unwrap();
    for t in ["sql", "data2text", "clauses", "triage"] {
        assert!(report.contains(&format!("| {t} |")), "{report}");
        let svg = std::fs::read_to_string(out.join(format!("loss-{t}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "loss-{t}.svg"
        );
        assert!(out
            .join(format!("adapters/{t}/adapter_model.safetensors"))
            .exists());
    }
    assert!(report.contains("instead of 4 full fine-tuned copies"));
    let _ = std::fs::remove_dir_all(&out);
}
