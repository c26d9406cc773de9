//! The JSONL reader on hostile input: arbitrary bytes, valid files with bytes flipped, cut,
//! inserted or lines duplicated, and arbitrary JSON built from the format's keys. Every input
//! gives samples or a typed error naming its line (or, for a file with no usable record, the
//! file); never a panic. Crafted cases are kept as regression seeds below.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use lowrank_model::LoadedModel;
use lowrank_train::data::{load_jsonl, DataError, LoadOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn tiny() -> LoadedModel {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/model"
    );
    LoadedModel::load(p, &Device::Cpu).unwrap()
}

/// Cases per property: about a second each in a debug build.
const CASES: u32 = 1000;

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Nothing is written into the source tree; a failure prints its (shrunk) input.
        failure_persistence: None,
        // The same inputs on every run: with a random seed the check that both outcomes
        // come up failed about one run in 70 (47 of 1000 mutated files loaded, 50 needed),
        // a draw of the generator rather than a fault of the reader.
        rng_seed: RngSeed::Fixed(0x5EED_10AD),
        ..Config::default()
    }
}

/// A scratch directory per test (tests run in parallel threads), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d =
            std::env::temp_dir().join(format!("lowrank-data-fuzz-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn file(&self) -> PathBuf {
        self.0.join("data.jsonl")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How often each outcome came up (without --skip-bad): the inputs must reach both.
#[derive(Default)]
struct Seen {
    loaded: AtomicUsize,
    refused: AtomicUsize,
}

impl Seen {
    fn assert_both(&self, what: &str) {
        let (l, r) = (
            self.loaded.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        );
        assert!(
            l >= CASES as usize / 20 && r >= CASES as usize / 20,
            "{what}: {l} loaded, {r} refused: the inputs miss one side"
        );
    }
}

/// Load `bytes` as the file `path` (with and without --skip-bad) and check the outcome.
fn check(lm: &LoadedModel, path: &Path, bytes: &[u8], seen: &Seen) -> Result<(), TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    let lines = bytes.split(|&b| b == b'\n').count();
    let eos = lm.eos_ids().first().copied();
    for skip_bad in [false, true] {
        let opts = LoadOptions {
            max_seq_len: 24,
            skip_bad,
        };
        let r = load_jsonl(path, &lm.tok, eos, &opts);
        if !skip_bad {
            let n = if r.is_ok() {
                &seen.loaded
            } else {
                &seen.refused
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Ok((samples, stats)) => {
                prop_assert!(!samples.is_empty());
                prop_assert!(stats.records >= samples.len());
                prop_assert_eq!(stats.skipped_bad, stats.skipped.len());
                for s in &samples {
                    prop_assert_eq!(s.ids.len(), s.labels.len());
                    prop_assert!(s.ids.len() <= 24);
                    prop_assert!(s.num_targets() > 0);
                    prop_assert!((1..=lines).contains(&s.line));
                }
            }
            Err(DataError::Record {
                path: p,
                line,
                field,
                msg,
            }) => {
                prop_assert!(!skip_bad, "--skip-bad must skip, not fail: {}", msg);
                prop_assert_eq!(&p, path);
                prop_assert!((1..=lines).contains(&line), "line {} of {}", line, lines);
                prop_assert!(!field.is_empty() && !msg.is_empty());
            }
            Err(DataError::File { path: p, msg }) => {
                // The file is readable: the only whole-file error is having no record.
                prop_assert_eq!(&p, path);
                prop_assert_eq!(msg.as_str(), "no usable records");
            }
        }
    }
    Ok(())
}

/// Valid records of every format (multi-byte text included).
const VALID: &[&str] = &[
    r#"{"text": "Plain text for language modelling, with ünïcödé and 漢字."}"#,
    r#"{"prompt": "Count to three:", "completion": " 1 2 3"}"#,
    r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hello again."}]}"#,
    r#"{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}"#,
    r#"{"instruction": "Say yes.", "output": "yes"}"#,
];

/// Bytes that matter to JSON, UTF-8 and line splitting.
const SPICE: &[u8] = b"{}[]\",:\\\n\r\t \0u0\x80\xbf\xc3\xe2\xf0\xff";

fn valid_file() -> Vec<u8> {
    VALID.join("\n").into_bytes()
}

/// One edit of a byte string: (kind, position, byte).
fn mutate(mut b: Vec<u8>, edits: &[(u8, usize, u8, bool)]) -> Vec<u8> {
    for &(kind, pos, byte, spicy) in edits {
        let byte = if spicy {
            SPICE[byte as usize % SPICE.len()]
        } else {
            byte
        };
        let at = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
        match kind % 5 {
            0 if at < b.len() => b[at] = byte,
            1 => b.insert(at, byte),
            2 if at < b.len() => {
                b.drain(at..(at + 1 + byte as usize % 8).min(b.len()));
            }
            3 => b.truncate(at),
            _ => {
                // Duplicate the line around `at` (the same record twice, or a broken one).
                let s = b[..at]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |i| i + 1);
                let e = b[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |i| at + i);
                let mut line = b[s..e].to_vec();
                line.push(b'\n');
                b.splice(s..s, line);
            }
        }
    }
    b
}

/// Arbitrary JSON whose objects use the format's own keys.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop::sample::select(vec![
        "text",
        "prompt",
        "completion",
        "messages",
        "role",
        "content",
        "instruction",
        "input",
        "output",
        "other",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// Strings a record may hold: roles, template and special-token text, anything.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "user",
            "assistant",
            "system",
            "tool",
            " ",
            "<|im_end|>",
            "{{ x }}",
            "{% if %}"
        ])
        .prop_map(String::from),
        ".{0,24}",
    ]
}

/// Mostly a string, sometimes any JSON (a field of the wrong type).
fn field() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![8 => string().prop_map(serde_json::Value::from), 1 => json_value()]
}

/// A record of one of the formats, its fields mostly of the right type: most files get
/// through the field checks to tokenization and masking.
fn record() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let role = prop_oneof![
        8 => prop::sample::select(vec!["system", "user", "assistant"]).prop_map(serde_json::Value::from),
        1 => field(),
    ];
    let message = (role, field()).prop_map(|(r, c)| json!({"role": r, "content": c}));
    prop_oneof![
        field().prop_map(|t| json!({ "text": t })),
        (field(), field()).prop_map(|(p, c)| json!({"prompt": p, "completion": c})),
        prop::collection::vec(message, 0..5).prop_map(|m| json!({ "messages": m })),
        (field(), field(), field())
            .prop_map(|(i, x, o)| json!({"instruction": i, "input": x, "output": o})),
        json_value(),
    ]
}

#[test]
fn any_bytes_give_samples_or_an_error_naming_the_line() {
    let lm = tiny();
    let dir = Scratch::new("bytes");
    let path = dir.file();
    proptest!(config(CASES), |(bytes in prop::collection::vec(any::<u8>(), 0..400))| {
        check(&lm, &path, &bytes, &Seen::default())?;
    });
}

#[test]
fn mutated_valid_files_give_samples_or_an_error_naming_the_line() {
    let lm = tiny();
    let dir = Scratch::new("mutated");
    let path = dir.file();
    let seen = Seen::default();
    check(&lm, &path, &valid_file(), &seen).unwrap();
    let edits = prop::collection::vec(
        (any::<u8>(), any::<usize>(), any::<u8>(), any::<bool>()),
        1..8,
    );
    proptest!(config(CASES), |(e in edits)| {
        check(&lm, &path, &mutate(valid_file(), &e), &seen)?;
    });
    seen.assert_both("mutated files");
}

#[test]
fn arbitrary_records_give_samples_or_an_error_naming_the_line() {
    let lm = tiny();
    let dir = Scratch::new("records");
    let path = dir.file();
    let seen = Seen::default();
    proptest!(config(CASES), |(records in prop::collection::vec(record(), 1..4))| {
        let text: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        check(&lm, &path, text.join("\n").as_bytes(), &seen)?;
    });
    seen.assert_both("arbitrary records");
}

/// What a crafted input gives: `None` loads, `Some((line, field))` fails naming them.
type Expect = Option<(usize, &'static str)>;

/// Crafted inputs: each loads, or fails naming the expected line and field.
#[test]
fn crafted_inputs() {
    let lm = tiny();
    let dir = Scratch::new("crafted");
    let path = dir.file();
    let eos = lm.eos_ids().first().copied();
    let opts = LoadOptions {
        max_seq_len: 64,
        skip_bad: false,
    };
    let ok = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        load_jsonl(&path, &lm.tok, eos, &opts)
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = |t: &str| {
        serde_json::json!({ "text": format!("{t}: a record of several words") }).to_string()
    };
    let cases: Vec<(Vec<u8>, Expect)> = vec![
        // Bytes that are not UTF-8 on line 2: named by line (not a whole-file read error).
        (
            [text("a").as_bytes(), b"\n{\"text\": \"\xff\xfe\"}\n"].concat(),
            Some((2, "utf-8")),
        ),
        // A byte-order mark before the first record (Windows editors) is not an error.
        ([b"\xEF\xBB\xBF".as_slice(), text("bom").as_bytes()].concat(), None),
        // CRLF line ends.
        (format!("{}\r\n{}\r\n", text("a"), text("b")).into_bytes(), None),
        // A lone surrogate escape, a NUL escape, a huge number, deep nesting.
        (
            format!("{}\n{{\"text\": \"\\ud800\"}}", text("a")).into_bytes(),
            Some((2, "json")),
        ),
        (br#"{"text": "nul \u0000 inside"}"#.to_vec(), None),
        (
            format!("{}\n{{\"text\": 1e999999}}", text("a")).into_bytes(),
            Some((2, "json")),
        ),
        (format!("{}\n{deep}", text("a")).into_bytes(), Some((2, "json"))),
        // Wrong types and shapes, each named by its field.
        (br#"{"messages": [{"role": 1, "content": "x"}]}"#.to_vec(), Some((1, "messages[0].role"))),
        (br#"{"messages": []}"#.to_vec(), Some((1, "messages"))),
        (br#"{"messages": [{"role": "user", "content": "only a question"}]}"#.to_vec(), Some((1, "messages"))),
        (br#"{"prompt": "p"}"#.to_vec(), Some((1, "completion"))),
        (br#"{"instruction": "i", "input": 3, "output": "o"}"#.to_vec(), Some((1, "input"))),
        (br#"{"text": ""}"#.to_vec(), Some((1, "text"))),
        (br#"[1, 2]"#.to_vec(), Some((1, "record"))),
        // Chat-template syntax and special-token text are data, not template code.
        (br#"{"messages": [{"role": "user", "content": "{{ raise_exception('x') }}"}, {"role": "assistant", "content": "<|im_end|>{% endfor %}"}]}"#.to_vec(), None),
    ];
    for (i, (bytes, want)) in cases.into_iter().enumerate() {
        match (ok(&bytes), want) {
            (Ok(_), None) => {}
            (Err(DataError::Record { line, field, .. }), Some((l, f))) => {
                assert_eq!((line, field.as_str()), (l, f), "case {i}")
            }
            (r, want) => panic!("case {i}: {:?}, want {want:?}", r.map(|(s, _)| s.len())),
        }
    }
}
