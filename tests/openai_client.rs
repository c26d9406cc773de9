//! The official OpenAI Python client against `lowrank serve` on loopback (installed by
//! .ci/run): list models, complete, chat, stream, and a per-request adapter mixture.

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn official_openai_python_client() {
    let have = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(have, "the `openai` Python package is required (bash .ci/run installs it: python3 -m pip install openai)");
    // Adapters root with the PEFT fixture adapter under the name `tiny-lora`.
    let root = std::env::temp_dir().join(format!("lowrank-openai-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("tiny-lora")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("tiny-llama-hf/peft_adapter").join(f),
            root.join("tiny-lora").join(f),
        )
        .unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = fixtures().join("tiny-llama-hf/model");
    let child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--adapters",
            root.to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--api-key",
            "sk-test",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Ok(Some(st)) = server.0.try_wait() {
            let mut e = String::new();
            server
                .0
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
    let script = format!(
        r#"
import openai, sys
c = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="sk-test")
ids = [m.id for m in c.models.list().data]
assert "tiny-lora" in ids and len(ids) == 2, ids
base = [i for i in ids if i != "tiny-lora"][0]
r = c.completions.create(model=base, prompt="Hello", max_tokens=5, temperature=0)
assert r.choices[0].text is not None and r.usage.completion_tokens >= 1, r
r = c.chat.completions.create(model="tiny-lora", messages=[{{"role": "user", "content": "hi"}}], max_tokens=6, temperature=0)
full = r.choices[0].message.content
assert r.choices[0].finish_reason in ("stop", "length"), r
parts = []
for ch in c.chat.completions.create(model="tiny-lora", messages=[{{"role": "user", "content": "hi"}}], max_tokens=6, temperature=0, stream=True):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
assert "".join(parts) == full, (parts, full)
r = c.chat.completions.create(model=base, messages=[{{"role": "user", "content": "hi"}}], max_tokens=4, temperature=0,
                              extra_body={{"adapters": [{{"name": "tiny-lora", "scale": 0.5}}]}})
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
try:
    c.chat.completions.create(model="nope", messages=[{{"role": "user", "content": "hi"}}])
    sys.exit("unknown model accepted")
except openai.NotFoundError:
    pass
try:
    openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
    sys.exit("wrong key accepted")
except openai.AuthenticationError:
    pass
print("ok")
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
