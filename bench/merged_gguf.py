"""What a merged, re-quantized adapter costs in llama.cpp: file size, decode speed and a built-in
task's held-out metric, for the base GGUF, the base + the adapter as llama.cpp's LoRA GGUF, and the
merged model in f16, Q8_0, Q4_1 and Q4_0, all run by llama.cpp (llama-cpp-python); beside lowrank's
own score with the unmerged adapter (f32 and int8). One run, one machine; prints a markdown table.

usage: python3 bench/merged_gguf.py LOWRANK_BIN DEMO_DIR [--tasks sql,triage] [--out DIR]

DEMO_DIR is what `lowrank demo --tasks sql,triage --out DEMO_DIR` writes (adapters/<task>/ and
data/<task>/eval.jsonl). The answers of every engine are scored by `lowrank eval --predictions`,
so all rows use the same metric code. Needs `llama-cpp-python` (bench/peers/README.md).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("lowrank")
ap.add_argument("demo")
ap.add_argument("--tasks", default="sql,triage")
ap.add_argument("--out", default="merged-gguf-bench")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
METRIC = {"sql": "exact", "triage": "accuracy", "clauses": "accuracy", "data2text": "bleu"}


def lowrank(*a):
    r = subprocess.run([args.lowrank, *a], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lowrank {' '.join(a)} failed:\n{r.stderr}")
    return r.stdout


base = lowrank("fetch").strip().splitlines()[-1]


def llama(model, lora=None):
    kw = {"lora_path": lora} if lora else {}
    return Llama(model_path=model, n_ctx=2048, n_threads=args.threads, n_batch=512,
                 verbose=False, seed=0, **kw)


def decode_speed(m):
    """bench/peers/llamacpp_infer.py's decode measurement: 128 tokens after a short prompt."""
    m.reset()
    t = time.time()
    out = m.create_completion("Once upon a time", max_tokens=128, temperature=0.0)
    return out["usage"]["completion_tokens"] / (time.time() - t)


def answers(m, rows):
    """Greedy answers to the held-out prompts, with lowrank's token bound (eval_generation)."""
    golds = [r["messages"][-1]["content"] for r in rows]
    longest = max(len(m.tokenize(g.encode(), add_bos=False, special=False)) for g in golds)
    max_tokens = min(longest * 2 + 8, 160)
    out = []
    for r in rows:
        m.reset()
        c = m.create_chat_completion(messages=r["messages"][:-1], max_tokens=max_tokens, temperature=0.0)
        out.append(c["choices"][0]["message"]["content"] or "")
    return out


def score(task, data, preds, tag):
    p = os.path.join(args.out, f"pred-{task}-{tag}.jsonl")
    with open(p, "w") as f:
        for x in preds:
            f.write(json.dumps(x) + "\n")
    v = json.loads(lowrank("eval", "--data", data, "--metric", METRIC[task], "--predictions", p))
    return v[METRIC[task]]


rows_out = []
for task in args.tasks.split(","):
    ad = os.path.join(args.demo, "adapters", task)
    data = os.path.join(args.demo, "data", task, "eval.jsonl")
    rows = [json.loads(l) for l in open(data) if l.strip()]
    metric = METRIC[task]
    # lowrank itself, unmerged adapter.
    for compute in ["f32", "int8"]:
        for tag, extra in [("base", []), ("adapter", ["--adapter", ad])]:
            v = json.loads(lowrank("eval", "--data", data, "--metric", metric, "--compute", compute, *extra))
            rows_out.append((task, f"lowrank --compute {compute}, {tag}" + (" (unmerged)" if extra else ""), None, None, v[metric]))
            print(rows_out[-1], flush=True)
    # The GGUFs llama.cpp runs.
    lora = os.path.join(args.out, f"{task}-lora.gguf")
    lowrank("export", ad, "--format", "gguf-lora", "--out", lora)
    variants = [("base GGUF (Q4_1)", base, None), ("base + LoRA GGUF (unmerged)", base, lora)]
    for q in ["f16", "q8_0", "q4_1", "q4_0"]:
        f = os.path.join(args.out, f"{task}-merged-{q}.gguf")
        flags = ["--quant", q] if q != "f16" else ["--gguf-type", "f16"]
        lowrank("merge", "--adapter", ad, "--format", "gguf", "--out", f, *flags)
        variants.append((f"merged {q.upper()}", f, None))
    for name, model, lo in variants:
        m = llama(model, lo)
        size = os.path.getsize(model) + (os.path.getsize(lo) if lo else 0)
        speed = max(decode_speed(m) for _ in range(2))
        s = score(task, data, answers(m, rows), name.split()[0] + name.split()[-1].strip("()"))
        rows_out.append((task, "llama.cpp: " + name, size, speed, s))
        print(rows_out[-1], flush=True)
        del m

print("\n| task | what runs | file MB | llama.cpp decode tok/s | held-out metric |")
print("|---|---|---|---|---|")
for task, name, size, speed, s in rows_out:
    mb = f"{size / 1e6:.0f}" if size else "–"
    sp = f"{speed:.1f}" if speed else "–"
    print(f"| {task} ({METRIC[task]}) | {name} | {mb} | {sp} | {s:.1f} |")
