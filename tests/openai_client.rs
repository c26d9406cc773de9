//! The official OpenAI Python client against `lowrank serve` on loopback (installed by
//! .ci/run): list models, complete, chat, stream, and a per-request adapter mixture.

mod common;

use common::{copy_fixture_adapter, fixtures, Server};
use std::process::Command;

#[test]
fn official_openai_python_client() {
    common::require_python("openai", "openai");
    // Adapters root with the PEFT fixture adapter under the name `tiny-lora`.
    let root = std::env::temp_dir().join(format!("lowrank-openai-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    copy_fixture_adapter(&root.join("tiny-lora"));
    let model = fixtures().join("tiny-llama-hf/model");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--adapters",
        root.to_str().unwrap(),
        "--api-key",
        "sk-test",
    ]);
    let port = server.port;
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
