//! The repository stands on its own: no test, bench, script or CI file reads a path outside the
//! checkout (a user's `git clone` has nothing beside it), and every fixture the tests name exists.

use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Source-like files under `dir` (recursively), skipping build output and VCS data.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "target" && name != ".git" && name != "node_modules" {
                sources(&p, out);
            }
        } else if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("rs" | "py" | "sh" | "toml")
        ) || p
            .parent()
            .is_some_and(|d| d.file_name() == Some(std::ffi::OsStr::new(".ci")))
        {
            out.push(p);
        }
    }
}

fn all_sources() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in [
        "src", "crates", "tests", "bench", ".ci", "deploy", "scripts",
    ] {
        sources(&root().join(d), &mut v);
    }
    sources_top(&mut v);
    assert!(v.len() > 20, "found only {} source files", v.len());
    v
}

/// Top-level files (Cargo.toml, build scripts).
fn sources_top(v: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root()).unwrap().flatten() {
        let p = e.path();
        if p.is_file() && matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "toml")) {
            v.push(p);
        }
    }
}

/// Lexically resolve `..` and `.` (the paths need not exist).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The crate directory a file belongs to: the nearest ancestor holding a Cargo.toml.
fn manifest_dir(file: &Path) -> PathBuf {
    let mut d = file.parent().unwrap().to_path_buf();
    while !d.join("Cargo.toml").is_file() {
        assert!(d.pop(), "{}: no Cargo.toml above", file.display());
    }
    d
}

#[test]
fn no_source_names_a_path_outside_the_repository() {
    let root = normalize(&root());
    // Spelled in pieces so that this file does not match itself.
    let sibling = ["..", "/", "shared", "/"].concat();
    let shared_dirs = [
        ["shared", "/fixtures"].concat(),
        ["shared", "/peers"].concat(),
    ];
    let anchor = ["env!(\"CARGO_MANIFEST_DIR\")", ", \""].concat();
    let mut bad = Vec::new();
    let mut anchored = 0;
    for f in all_sources() {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
        for (n, line) in text.lines().enumerate() {
            if line.contains(&sibling) || shared_dirs.iter().any(|s| line.contains(s.as_str())) {
                bad.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
        // concat!(env!("CARGO_MANIFEST_DIR"), "/rel/path"): must stay inside the checkout.
        // rustfmt may break the call over lines, so whitespace is squeezed first.
        let squeezed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let squeezed = squeezed.replace("( ", "(").replace(" )", ")");
        for (i, _) in squeezed.match_indices(&anchor) {
            let lit = &squeezed[i + anchor.len()..];
            let Some(end) = lit.find('"') else { continue };
            let target = normalize(&manifest_dir(&f).join(lit[..end].trim_start_matches('/')));
            anchored += 1;
            if !target.starts_with(&root) {
                bad.push(format!(
                    "{rel}: {} resolves outside the repository",
                    &lit[..end]
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "paths outside the repository:\n{}",
        bad.join("\n")
    );
    // The scan saw the fixture paths of the test crates (it is not vacuous).
    assert!(
        anchored >= 5,
        "only {anchored} CARGO_MANIFEST_DIR paths found"
    );
}

#[test]
fn the_fixtures_the_tests_use_are_in_the_repository() {
    let fx = root().join("tests/fixtures");
    for p in [
        "manifest.json",
        "make_fixtures.py",
        "smollm2-135m/text_cases.json",
        "smollm2-135m/logits.safetensors",
        "smollm2-135m/grads.safetensors",
        "smollm2-135m/grads_long.safetensors",
        "make_long_grads.py",
        "smollm2-135m/peft_adapter/adapter_config.json",
        "smollm2-135m/peft_adapter/adapter_model.safetensors",
        "tiny-llama-hf/logits.safetensors",
        "tiny-llama-hf/model/config.json",
        "tiny-llama-hf/model/model.safetensors",
        "tiny-llama-hf/model/tokenizer.json",
        "tiny-llama-hf/peft_adapter/adapter_model.safetensors",
    ] {
        assert!(fx.join(p).is_file(), "missing fixture tests/fixtures/{p}");
    }
    // Trimmed to what the assertions use: the whole set stays small enough to ship.
    let mut total = 0u64;
    let mut stack = vec![fx];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    assert!(total <= 15 << 20, "fixtures take {total} bytes (> 15 MiB)");
    for p in ["peft_train.py", "llamacpp_infer.py", "llamacpp_batched.py"] {
        assert!(
            root().join("bench/peers").join(p).is_file(),
            "missing bench/peers/{p}"
        );
    }
}
