//! The Kubernetes manifests in deploy/k8s: valid against the Kubernetes API schemas (strict:
//! no unknown fields; `kubernetes-validate` from PyPI, which `.ci/run` installs), a broken one
//! is caught, the server flags they pass exist, and the metric the autoscaler reads is one the
//! server exports.

use std::path::PathBuf;
use std::process::Command;

fn k8s() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s"))
}

/// The manifests kustomization.yaml lists (every one must exist), plus the example secret.
fn manifests() -> Vec<PathBuf> {
    let k = std::fs::read_to_string(k8s().join("kustomization.yaml")).unwrap();
    let mut v: Vec<PathBuf> = k
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|f| k8s().join(f.trim()))
        .collect();
    assert!(v.len() >= 5, "kustomization.yaml lists {v:?}");
    v.push(k8s().join("secret.example.yaml"));
    for p in &v {
        assert!(p.is_file(), "{} is listed but missing", p.display());
    }
    v
}

fn validate(files: &[PathBuf], version: &str) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate is required (pip install kubernetes-validate; bash .ci/run installs it)")
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files = manifests();
    for version in ["1.30", "1.37"] {
        let o = validate(&files, version);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "Kubernetes {version}:\n{out}");
        assert_eq!(
            out.matches(" passed for resource ").count(),
            files.len(),
            "{out}"
        );
    }
    // The validator does catch mistakes: a misspelt field and a wrong type.
    let dir = std::env::temp_dir().join(format!("lowrank-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dep = std::fs::read_to_string(k8s().join("deployment.yaml")).unwrap();
    for (what, broken) in [
        (
            "misspelt field",
            dep.replace("readinessProbe:", "readynessProbe:"),
        ),
        ("wrong type", dep.replace("replicas: 2", "replicas: two")),
    ] {
        assert_ne!(broken, dep);
        let p = dir.join("deployment.yaml");
        std::fs::write(&p, broken).unwrap();
        assert!(!validate(&[p], "1.30").status.success(), "a {what} passed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifests_match_the_server() {
    let dep = std::fs::read_to_string(k8s().join("deployment.yaml")).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = dep
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .collect();
    assert!(flags.len() >= 8, "{flags:?}");
    for f in &flags {
        assert!(
            help.contains(&format!("--{f} ")) || help.contains(&format!("--{f}\n")),
            "`lowrank serve` has no --{f}"
        );
    }
    // Probes, Service and server agree on the port; the autoscaler's metric is exported.
    assert!(dep.contains("\"8080\"") && dep.contains("containerPort: 8080"));
    assert!(dep.matches("path: /health").count() >= 3);
    let hpa = std::fs::read_to_string(k8s().join("hpa.yaml")).unwrap();
    let metric = hpa
        .lines()
        .find_map(|l| l.trim().strip_prefix("metric: {name: "))
        .and_then(|m| m.strip_suffix('}'))
        .expect("hpa.yaml names a pods metric");
    let exported = lowrank_serve::metrics::Metrics::default().render();
    assert!(
        exported.contains(&format!("\n{metric} ")) || exported.starts_with(&format!("{metric} ")),
        "the server exports no {metric}"
    );
    let rules = std::fs::read_to_string(k8s().join("prometheus-adapter-rules.yaml")).unwrap();
    assert!(rules.contains(&format!("'{metric}{{")) && rules.contains(&format!("as: {metric}")));
}
