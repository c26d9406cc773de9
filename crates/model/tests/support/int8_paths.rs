//! Shared by the model's and the server's int8 tests (included with `#[path]`).

/// Run `tests` of this test binary again in a child process once per int8 kernel path this
/// CPU supports other than the one this process uses (the path is chosen once per process
/// from `LOWRANK_INT8_KERNEL`), asserting that each child passes. Returns the paths run.
pub fn rerun_on_every_int8_path(tests: &[&str]) -> Vec<&'static str> {
    let exe = std::env::current_exe().expect("test binary");
    let here = lowrank_model::quant::kernel_name();
    let mut ran = Vec::new();
    for path in lowrank_model::quant::supported_kernels() {
        if path == here {
            continue;
        }
        let out = std::process::Command::new(&exe)
            .args(tests)
            .args(["--exact", "--test-threads", "1", "--nocapture"])
            .env("LOWRANK_INT8_KERNEL", path)
            .output()
            .expect("rerun the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "int8 path {path}:\n{text}");
        // Every named test ran (a filter that matched nothing would pass vacuously).
        assert!(
            text.contains(&format!("{} passed", tests.len())),
            "int8 path {path}: not all of {tests:?} ran:\n{text}"
        );
        ran.push(path);
    }
    eprintln!(
        "int8 tests ran on {here} (this process) and {ran:?}; CPU supports {:?}",
        lowrank_model::quant::supported_kernels()
    );
    ran
}
