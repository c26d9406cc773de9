//! Shared by the integration tests that talk to a running `lowrank serve`.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// Send one HTTP/1.1 request to the server on loopback `port` (the connection closes after
/// the answer); the stream to read the answer from.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> TcpStream {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// [`request`] and its whole answer: (status code, the raw response).
pub fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = request(port, method, path, body);
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// A `lowrank serve` child process, stopped with SIGINT (then killed) when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Start `lowrank serve --port P ARGS…` on a free loopback port and wait until it accepts
    /// connections (panics with the server's stderr if it exits first).
    pub fn start(args: &[&str]) -> Server {
        Self::start_env(args, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
            .arg("serve")
            .args(args)
            .args(["--port", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                let mut e = String::new();
                s.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut e)
                    .unwrap();
                panic!("server exited early ({st}): {e}");
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Server {
    /// Send `SIG<name>` (e.g. "TERM") to the server.
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// The first line of the server's stderr that contains `pat`, read within `limit`
    /// (panics with what it read otherwise). Lines read are consumed.
    pub fn stderr_line(&mut self, pat: &str, limit: Duration) -> String {
        use std::io::BufRead;
        let err = self.child.stderr.take().expect("stderr already taken");
        let (tx, rx) = std::sync::mpsc::channel();
        let pat_owned = pat.to_string();
        // A thread reads, so that a server that prints nothing cannot block the test, and
        // goes on reading to the end: a closed pipe would make the server's next eprintln fail.
        std::thread::spawn(move || {
            let mut seen = String::new();
            let mut found = false;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if !found && line.contains(&pat_owned) {
                    found = true;
                    let _ = tx.send(Ok(line));
                } else if !found {
                    seen.push_str(&line);
                    seen.push('\n');
                }
            }
            if !found {
                let _ = tx.send(Err(seen));
            }
        });
        match rx.recv_timeout(limit) {
            Ok(Ok(line)) => line,
            Ok(Err(seen)) => panic!("no stderr line with `{pat}`; the server wrote:\n{seen}"),
            Err(_) => panic!("no stderr line with `{pat}` within {limit:?}"),
        }
    }

    /// Wait up to `limit` for the server to exit; its exit status.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
    }
}

/// Copy the PEFT fixture adapter (no model card) to `dir`.
pub fn copy_fixture_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("tiny-llama-hf/peft_adapter").join(f),
            dir.join(f),
        )
        .unwrap();
    }
}

/// Fail (never skip) unless `python3` can import `modules` (e.g. "moto.server, boto3");
/// `package` is what to install.
pub fn require_python(modules: &str, package: &str) {
    let have = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        have,
        "the `{package}` Python package is required (bash .ci/run installs it: python3 -m pip install '{package}')"
    );
}
