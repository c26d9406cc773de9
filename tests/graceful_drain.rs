//! SIGTERM (what Kubernetes sends) drains `lowrank serve`: `/health` turns 503 "draining" at
//! once while requests are still accepted for `--drain-seconds`, a request in flight runs to
//! its last token, and the process then exits 0.

mod common;

use common::{http, request};

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

#[test]
fn sigterm_drains_then_exits() {
    lowrank_model::fetch::ensure_default(false).expect("the default model");
    let mut server = common::Server::start(&["--model", "smollm2-135m", "--drain-seconds", "3"]);
    let port = server.port;
    // A long streaming request; the thread reports its first token, then the whole answer.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let long = std::thread::spawn(move || {
        let body = r#"{"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}"#;
        let s = request(port, "POST", "/v1/completions", body);
        let mut r = BufReader::new(s);
        let mut all = String::new();
        let mut told = false;
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            if !told && line.starts_with("data: ") {
                tx.send(String::new()).unwrap();
                told = true;
            }
            all.push_str(&line);
            line.clear();
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the long request produced no token");
    let (st, _) = http(port, "GET", "/health", "");
    assert_eq!(st, 200);

    let t0 = Instant::now();
    server.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    let (st, body) = http(port, "GET", "/health", "");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("\"draining\""), "{body}");
    // Still served while draining.
    let (st, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 3, "temperature": 0}"#,
    );
    assert_eq!(st, 200, "{body}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "the checks took longer than the drain window"
    );

    // The request in flight ran to its end.
    let all = long.join().unwrap();
    assert!(all.contains("data: [DONE]"), "{all}");
    assert!(
        all.contains("\"completion_tokens\":200"),
        "the stream was cut short: {all}"
    );
    // Then the process exits cleanly.
    let code = server
        .wait(Duration::from_secs(30))
        .expect("the server did not exit after draining");
    assert!(code.success(), "exit status {code}");
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "exited before the drain window ended"
    );
}
