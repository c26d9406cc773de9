//! Interoperation with llama.cpp itself, through the `llama-cpp-python` package (which builds
//! llama.cpp; `.ci/run` installs it): an adapter exported with `lowrank export --format
//! gguf-lora`, loaded by llama.cpp over the base GGUF, continues fixed prompts greedily as
//! lowrank does with `--compute int8` and that adapter; a Q8_0 merged GGUF (`merge --quant
//! q8_0`) continues them as lowrank does on that same file. An adapter whose q/k rows are in
//! the wrong order must not pass the first check.
//!
//! "As lowrank does": the same tokens, except that the two may part at a near-tie — a step
//! where the two tokens' logits are within [`TIE`] of each other, in lowrank's int8 logits or
//! in exact arithmetic (lowrank's f32 compute on the same weights, which matches transformers
//! to ~1e-6), and llama.cpp picked the other. Two int8 implementations round activations
//! differently, and one flipped rounding in a block holding one of this model's outlier
//! features moves a logit by ~0.5: at step 13 of "def fibonacci(n):" the base model's two
//! best tokens are 0.14 apart in f32; lowrank's int8 puts them 0.71 apart with the AVX2
//! attention kernel and 0.04 apart (in the other order) with the portable one (the same
//! int8 products, another f32 summation order in attention), and llama.cpp's own batched and
//! one-token-at-a-time evaluations put them 0.40 and −0.11 apart. After a parting the
//! contexts differ, so the comparison ends there. A real difference (a wrong row order, a
//! wrong scale) parts at once with a wide gap in both arithmetics.
//!
//! The adapter is the PEFT fixture (every projection, q and k included) scaled ×4 with
//! `lowrank combine`: strong enough to change every continuation, mild enough to keep them
//! text (a random adapter of that strength turns them into noise, where near-ties make any two
//! implementations part ways after a few tokens).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use lowrank_lora::{LoraConfig, Target};
use lowrank_model::quant::Compute;
use lowrank_model::{AdapterSet, ForwardOpts, LoadedModel, LogitsMode, SeqInput};

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
];
const TOKENS: usize = 16;
/// Logit gap below which two implementations may pick different tokens.
const TIE: f32 = 0.3;

fn lowrank() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowrank"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn python() -> String {
    std::env::var("LOWRANK_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Greedy continuations (token ids) by llama.cpp of every prompt (token ids), for `model`
/// (and a LoRA adapter).
fn llama_cpp(model: &Path, lora: Option<&Path>, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let script = r#"
import json, sys
try:
    from llama_cpp import Llama
except ImportError as e:
    sys.exit(f"llama-cpp-python is not installed ({e}): `python3 -m pip install llama-cpp-python` (.ci/run does)")
model, lora, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = {"lora_path": lora} if lora else {}
m = Llama(model_path=model, n_ctx=512, n_threads=2, verbose=False, seed=0, **kw)
out = []
for ids in json.loads(sys.stdin.readline()):
    gen = []
    for t in m.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if m.token_eos() == t:
            break
        gen.append(t)
        if len(gen) == n:
            break
    out.append(gen)
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .args([
            "-c",
            script,
            model.to_str().unwrap(),
            lora.map(|p| p.to_str().unwrap()).unwrap_or(""),
            &TOKENS.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    let prompts = serde_json::to_string(prompts).unwrap();
    writeln!(child.stdin.take().unwrap(), "{prompts}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "llama.cpp run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// One loaded model (and adapter) of lowrank's, in process.
struct Run {
    lm: LoadedModel,
    set: Option<AdapterSet>,
}

impl Run {
    fn new(model: &Path, adapter: Option<&Path>, compute: Compute) -> Run {
        let lm = LoadedModel::load_for(model.to_str().unwrap(), &Device::Cpu, compute).unwrap();
        let specs: Vec<String> = adapter.iter().map(|a| a.display().to_string()).collect();
        let set = lowrank_model::adapters::load_mixture(&lm.model, &specs, false).unwrap();
        Run { lm, set }
    }

    /// The last position's logits after `ids`.
    fn logits(&self, ids: &[u32]) -> Vec<f32> {
        let mut seqs = [SeqInput {
            tokens: ids,
            cache: None,
            adapters: self.set.clone(),
            logits: LogitsMode::Last,
        }];
        let l = self
            .lm
            .model
            .forward(&mut seqs, &mut ForwardOpts::infer())
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// lowrank with `--compute int8`, in process: the model (and adapter), greedy step by step;
/// and the same in f32, loaded when a parting needs the exact logits.
struct Ours {
    int8: Run,
    model: PathBuf,
    adapter: Option<PathBuf>,
    exact: std::cell::OnceCell<Run>,
}

impl Ours {
    fn new(model: &Path, adapter: Option<&Path>) -> Ours {
        Ours {
            int8: Run::new(model, adapter, Compute::Int8),
            model: model.to_path_buf(),
            adapter: adapter.map(Path::to_path_buf),
            exact: std::cell::OnceCell::new(),
        }
    }

    fn lm(&self) -> &LoadedModel {
        &self.int8.lm
    }

    fn logits(&self, ids: &[u32]) -> Vec<f32> {
        self.int8.logits(ids)
    }

    /// The last position's logits after `ids` in f32 compute.
    fn exact_logits(&self, ids: &[u32]) -> Vec<f32> {
        self.exact
            .get_or_init(|| Run::new(&self.model, self.adapter.as_deref(), Compute::F32))
            .logits(ids)
    }

    /// Check llama.cpp's continuation `theirs` of `prompt` against greedy decoding here (see
    /// the module docs); returns how many tokens agreed, or why they part.
    fn check(&self, prompt: &[u32], theirs: &[u32]) -> Result<usize, String> {
        let eos = self.lm().eos_ids();
        let mut ids = prompt.to_vec();
        for (step, &t) in theirs.iter().enumerate() {
            let l = self.logits(&ids);
            let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            if best as u32 == t {
                ids.push(t);
                continue;
            }
            let gap = l[best] - l[t as usize];
            let tie = gap <= TIE || {
                let f = self.exact_logits(&ids);
                (f[best] - f[t as usize]).abs() <= TIE
            };
            return match tie && !eos.contains(&(best as u32)) {
                true => Ok(step), // a near-tie: equal up to here
                false => {
                    let f = self.exact_logits(&ids);
                    let exact = f[best] - f[t as usize];
                    Err(format!(
                        "step {step}: llama.cpp chose token {t}, lowrank {best} by a logit gap of {gap:.3} (in f32: {exact:.3})"
                    ))
                }
            };
        }
        // llama.cpp stopped early only at end of sequence.
        if theirs.len() < TOKENS {
            let l = self.logits(&ids);
            let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
            if !eos.contains(&best) {
                return Err(format!(
                    "llama.cpp stopped after {} tokens, lowrank goes on",
                    theirs.len()
                ));
            }
        }
        Ok(theirs.len())
    }

    /// Every prompt's continuation agrees (up to near-ties); returns the agreeing lengths.
    fn agrees(&self, prompts: &[Vec<u32>], theirs: &[Vec<u32>]) -> Result<Vec<usize>, String> {
        prompts
            .iter()
            .zip(theirs)
            .enumerate()
            .map(|(k, (p, t))| {
                self.check(p, t)
                    .map_err(|e| format!("{:?}: {e}", PROMPTS[k]))
            })
            .collect()
    }
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-llamacpp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn llama_cpp_runs_exported_adapters_and_quantized_merges_like_lowrank() {
    let d = tmpdir();
    let base = run(lowrank().arg("fetch")).trim().to_string();
    let base = Path::new(&base);
    let adapter = d.join("adapter");
    let fixture = fixtures().join("smollm2-135m/peft_adapter");
    run(lowrank()
        .args(["combine", "--method", "linear", "--out"])
        .arg(&adapter)
        .arg(format!("{}:4", fixture.display())));
    let a = adapter.to_str().unwrap();
    let plain = Ours::new(base, None);
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| plain.lm().tok.encode(p).unwrap())
        .collect();

    // The base alone, as a baseline for the comparison itself.
    let base_out = llama_cpp(base, None, &prompts);
    let n = plain.agrees(&prompts, &base_out).unwrap();
    eprintln!("base: tokens agreeing per prompt {n:?} of {TOKENS}");

    // The LoRA GGUF over the base GGUF.
    let lora = d.join("adapter.gguf");
    run(lowrank()
        .args(["export", a, "--format", "gguf-lora", "--out"])
        .arg(&lora));
    let modelfile = std::fs::read_to_string(d.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("ADAPTER ./adapter.gguf") && modelfile.contains("FROM "),
        "{modelfile}"
    );
    let adapted = Ours::new(base, Some(&adapter));
    let with_lora = llama_cpp(base, Some(&lora), &prompts);
    for (w, b) in with_lora.iter().zip(&base_out) {
        assert_ne!(w, b, "the adapter must change every continuation");
    }
    let n = adapted.agrees(&prompts, &with_lora).unwrap();
    eprintln!("exported adapter: tokens agreeing per prompt {n:?} of {TOKENS}");
    assert!(
        n.iter().sum::<usize>() >= TOKENS * PROMPTS.len() / 2,
        "{n:?}"
    );

    // q and k alone (the fixture's, ×16), so that every change comes through them: exported,
    // it agrees; with B's rows left in HF order (the exporter's permutation undone
    // beforehand) it must fail the comparison — the check sees the row order.
    let (fx, _) =
        lowrank_model::adapters::load_adapter(&plain.lm().model, &fixture, false).unwrap();
    let qk_targets = [Target::Q, Target::K];
    let mut qk = fx.clone();
    qk.modules.retain(|k, _| qk_targets.contains(&k.target));
    for m in qk.modules.values_mut() {
        m.b = (&m.b * 16.0).unwrap();
    }
    qk.config = LoraConfig::new(fx.config.r, fx.config.lora_alpha, &qk_targets);
    let qk_dir = d.join("qk");
    lowrank_lora::peft::save_peft(&qk, &qk_dir, candle_core::DType::F32).unwrap();
    let qk_file = d.join("qk.gguf");
    run(lowrank()
        .args(["export", qk_dir.to_str().unwrap(), "--out"])
        .arg(&qk_file));
    let ours_qk = Ours::new(base, Some(&qk_dir));
    let qk_out = llama_cpp(base, Some(&qk_file), &prompts);
    let changed = qk_out.iter().zip(&base_out).filter(|(a, b)| a != b).count();
    assert!(changed >= 2, "q/k alone should change the continuations");
    let n = ours_qk.agrees(&prompts, &qk_out).unwrap();
    eprintln!("exported q/k adapter: tokens agreeing per prompt {n:?} of {TOKENS}");
    let c = &plain.lm().model.cfg;
    let mut wrong = qk.clone();
    for (k, m) in wrong.modules.iter_mut() {
        let heads = match k.target {
            Target::Q => c.num_heads,
            _ => c.num_kv_heads,
        };
        m.b = lowrank_model::weights::gguf_to_hf_rows(&m.b, heads).unwrap();
    }
    let wrong_file = d.join("wrong.gguf");
    lowrank_model::export::save_gguf_lora(&plain.lm().model, &wrong, &wrong_file).unwrap();
    let wrong_out = llama_cpp(base, Some(&wrong_file), &prompts);
    let e = ours_qk
        .agrees(&prompts, &wrong_out)
        .expect_err("a wrong q/k row order went unnoticed");
    eprintln!("wrong q/k order, as it should: {e}");

    // A Q8_0 merged GGUF: llama.cpp and lowrank read the same blocks.
    let merged = d.join("merged-q8_0.gguf");
    run(lowrank()
        .args([
            "merge",
            "--adapter",
            a,
            "--format",
            "gguf",
            "--quant",
            "q8_0",
            "--out",
        ])
        .arg(&merged));
    let ours_merged = Ours::new(&merged, None);
    let merged_out = llama_cpp(&merged, None, &prompts);
    for (w, b) in merged_out.iter().zip(&base_out) {
        assert_ne!(w, b, "the merged model must differ from the base");
    }
    let n = ours_merged.agrees(&prompts, &merged_out).unwrap();
    eprintln!("Q8_0 merge: tokens agreeing per prompt {n:?} of {TOKENS}");
    assert!(
        n.iter().sum::<usize>() >= TOKENS * PROMPTS.len() / 2,
        "{n:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
