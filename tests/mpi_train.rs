//! Data-parallel training over MPI (`cargo test --features mpi --test mpi_train`; needs
//! OpenMPI's `mpirun`, which `.ci/run` installs): `mpirun -n 2` on loopback trains with the
//! same loss at every step as one process with the same global batch, both ranks end with
//! bitwise the same adapter, a rank killed mid-run stops the job with a clear error, and
//! `--resume` continues from the last checkpoint to the same result.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama-hf/model"
    )
    .into()
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-mpi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--model", &tiny(), "--data"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(data.display().to_string());
    v.push("--out".into());
    v.push(out.display().to_string());
    for a in [
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--max-steps",
        "8",
        "--batch-size",
        "5",
        "--grad-accum",
        "2",
        "--lr",
        "5e-3",
        "--seed",
        "7",
        "--quiet",
        "--save-every",
        "2",
        "--dropout",
        "0",
    ] {
        v.push(a.into());
    }
    v
}

/// `mpirun -n 2` (as root too, and on a machine with fewer cores than ranks).
fn mpirun(args: &[String], logs: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "2",
        "--output-filename",
    ])
    .arg(logs);
    for (k, v) in env {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.arg(env!("CARGO_BIN_EXE_lowrank"))
        .args(args)
        .args(["--threads", "1"]);
    c.output()
        .expect("mpirun not found (Debian: apt-get install openmpi-bin)")
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// Each rank's printed summary (`--output-filename` keeps one stdout per rank).
fn summaries(logs: &Path) -> Vec<serde_json::Value> {
    (0..2)
        .map(|r| {
            let p = logs.join(format!("1/rank.{r}/stdout"));
            let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}: {t}", p.display()))
        })
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_and_survive_a_lost_rank() {
    let d = tmpdir();
    let data = d.join("train.jsonl");
    let mut s = String::new();
    for i in 0..30 {
        s.push_str(&format!(
            "{}\n",
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{i} plus {i} is {}.", 2 * i)}]})
        ));
    }
    std::fs::write(&data, s).unwrap();

    // One process, global batch 5 × 2 accumulation.
    let one = d.join("one");
    let o = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(train_args(&data, &one))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l1 = losses(&one);
    assert_eq!(l1.len(), 8);

    // Two ranks, the same global batch (an odd one: shares of 3 and 2 sequences).
    let two = d.join("two");
    let o = mpirun(&train_args(&data, &two), &d.join("log-two"), &[]);
    assert!(
        o.status.success(),
        "mpirun failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let l2 = losses(&two);
    assert_eq!(l2.len(), l1.len());
    for (step, (a, b)) in l1.iter().zip(&l2).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(
            rel <= 1e-5,
            "step {}: one process {a}, two ranks {b} ({rel:e})",
            step + 1
        );
    }
    let sums = summaries(&d.join("log-two"));
    for s in &sums {
        assert_eq!(s["ranks"], 2);
    }
    let sha = sums[0]["params_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_eq!(sums[1]["params_sha256"], sha, "the ranks' adapters differ");
    assert!(two.join("adapter_model.safetensors").is_file());

    // Rank 1 dies after step 5: the job stops, non-zero, saying which rank.
    let three = d.join("three");
    let o = mpirun(
        &train_args(&data, &three),
        &d.join("log-crash"),
        &[("LOWRANK_TEST_CRASH", "1:5")],
    );
    assert!(!o.status.success(), "the job went on without rank 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank 1"), "no word of the lost rank: {err}");
    assert!(!three.join("adapter_model.safetensors").exists());
    assert!(
        three.join("checkpoint-4").is_dir(),
        "the last checkpoint before the crash is gone"
    );
    // Resume from the last checkpoint (step 4): the rest of the run is the uninterrupted one.
    let mut args = train_args(&data, &three);
    args.push("--resume".into());
    args.push(three.display().to_string());
    let o = mpirun(&args, &d.join("log-resume"), &[]);
    assert!(
        o.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        losses(&three),
        l2,
        "the resumed run's losses differ from the uninterrupted run's"
    );
    let resumed = summaries(&d.join("log-resume"));
    assert_eq!(resumed[0]["params_sha256"], sha);
    assert_eq!(resumed[1]["params_sha256"], sha);
    let _ = std::fs::remove_dir_all(&d);
}
