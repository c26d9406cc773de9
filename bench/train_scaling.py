"""Training speed and peak memory against sequence length and model size, lowrank against
PEFT in the same session, alternating (one configuration at a time, never two at once).

Usage: python3 bench/train_scaling.py --bin target/release/lowrank --model MODEL
         [--seqs 256,512,1024,2048 --batch 1 --steps 2 --peer-python python3 --peer bench/peers/peft_train.py
          --lowrank f32,f32+ckpt,int8+ckpt --peft float32,bfloat16 --out bench/results/train-scaling.jsonl]

Each lowrank configuration is `--compute C` plus `--checkpoint-layers` for `+ckpt`. Prints one
JSON line per run and a markdown table (tok/s and peak RSS per configuration and length)."""
import argparse, json, os, sys

from benchlib import run

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True)
ap.add_argument("--model", required=True, help="GGUF file or HF directory (both tools load it)")
ap.add_argument("--seqs", default="256,512,1024,2048")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--steps", type=int, default=2, help="measured steps per run (one warm-up step more)")
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--targets", default="q_proj,v_proj")
ap.add_argument("--peer-python", default=sys.executable)
ap.add_argument("--peer", default=os.path.join(os.path.dirname(__file__), "peers", "peft_train.py"))
ap.add_argument("--lowrank", default="f32,f32+ckpt,int8+ckpt")
ap.add_argument("--peft", default="float32,bfloat16")
ap.add_argument("--out", default=None, help="append the JSON lines here too")
a = ap.parse_args()


rows = []
for seq in [int(s) for s in a.seqs.split(",")]:
    common = ["--batch", str(a.batch), "--seq", str(seq), "--rank", str(a.rank), "--targets", a.targets]
    for conf in [c for c in a.lowrank.split(",") if c]:
        compute, _, extra = conf.partition("+")
        cmd = [a.bin, "bench", "train", "--model", a.model, "--compute", compute, "--steps", str(a.steps)] + common
        if extra == "ckpt":
            cmd.append("--checkpoint-layers")
        r = run(cmd)
        rows.append({"tool": "lowrank", "config": conf, "seq": seq, "batch": a.batch,
                     "tok_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"], "kernel": r.get("int8_kernel")})
        print(json.dumps(rows[-1]), flush=True)
    for dt in [d for d in a.peft.split(",") if d]:
        r = run([a.peer_python, a.peer, a.model, "--dtype", dt, "--steps", str(a.steps + 1)] + common)
        rows.append({"tool": "peft", "config": dt, "seq": seq, "batch": a.batch,
                     "tok_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows[-(len(a.lowrank.split(",")) + len(a.peft.split(","))):]:
                f.write(json.dumps(r) + "\n")

seqs = sorted({r["seq"] for r in rows})
confs = []
for r in rows:
    k = (r["tool"], r["config"])
    if k not in confs:
        confs.append(k)
print("\n| tokens per sequence | " + " | ".join(f"{t} {c}" for t, c in confs) + " |")
print("|---|" + "---|" * len(confs))
for s in seqs:
    cells = []
    for t, c in confs:
        r = next((r for r in rows if r["seq"] == s and (r["tool"], r["config"]) == (t, c)), None)
        cells.append(f"{r['tok_s']} tok/s, {r['peak_rss_mb']} MB" if r else "")
    print(f"| {a.batch} × {s} | " + " | ".join(cells) + " |")
