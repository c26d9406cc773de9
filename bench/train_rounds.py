"""Training speed against PEFT in alternating rounds, each lowrank run's ratio to the faster PEFT
mode of the same round: the issue's benchmark, one command.

Usage: python3 bench/train_rounds.py --bin target/release/lowrank --model MODEL
         [--rounds 3 --batch 4 --seq 128 --steps 6 --computes int8,f32 --peft float32,bfloat16
          --isa avx2 --peer-python python3 --out bench/results/FILE.jsonl]

A round runs each PEFT mode, then each lowrank compute, one process at a time (this machine kind
drifts ±20 % within minutes, so only ratios within a round mean much). `--isa avx2` runs both
tools as on a CPU without AVX-512: lowrank with `LOWRANK_ISA=avx2` (every kernel family on its AVX2
path), torch with `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`
(its own kernels, MKL's gemm and oneDNN's, so PEFT's bf16 has no native bf16 either). Caches, clock
and memory stay the wider machine's. Prints one JSON line per run and a markdown table."""
import argparse, json, os, sys

from benchlib import run

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True)
ap.add_argument("--model", required=True, help="GGUF file or HF directory (both tools load it)")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=6, help="lowrank's measured steps (PEFT's script times its own)")
ap.add_argument("--computes", default="int8,f32")
ap.add_argument("--peft", default="float32,bfloat16", help="PEFT dtypes (empty for none)")
ap.add_argument("--isa", choices=["native", "avx2"], default="native")
ap.add_argument("--peer-python", default=sys.executable)
ap.add_argument("--peer", default=os.path.join(os.path.dirname(__file__), "peers", "peft_train.py"))
ap.add_argument("--out", default=None, help="append the JSON lines here too")
a = ap.parse_args()

LOWRANK_ENV = {"avx2": {"LOWRANK_ISA": "avx2"}, "native": {}}[a.isa]
TORCH_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}[a.isa]


shape = ["--batch", str(a.batch), "--seq", str(a.seq)]
peft_modes = [d for d in a.peft.split(",") if d]
computes = [c for c in a.computes.split(",") if c]
rows = []
for rnd in range(1, a.rounds + 1):
    peer = {}
    for dt in peft_modes:
        r = run([a.peer_python, a.peer, a.model, "--dtype", dt] + shape, TORCH_ENV)
        peer[dt] = r["tokens_per_s"]
        rows.append({"round": rnd, "isa": a.isa, "tool": "peft", "config": dt,
                     "tok_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    best = max(peer.values()) if peer else None
    for c in computes:
        r = run([a.bin, "bench", "train", "--model", a.model, "--compute", c, "--steps", str(a.steps)] + shape,
                LOWRANK_ENV)
        rows.append({"round": rnd, "isa": a.isa, "tool": "lowrank", "config": c,
                     "tok_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "paths": {k: r.get(k) for k in ("isa_cap", "int8_kernel", "f32_gemm", "train_product", "train_dx", "train_head")},
                     "vs_best_peft": round(r["tokens_per_s"] / best, 3) if best else None,
                     "vs_peft_f32": round(r["tokens_per_s"] / peer["float32"], 3) if "float32" in peer else None})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                if r["round"] == rnd:
                    f.write(json.dumps(r) + "\n")

print(f"\n{a.batch} × {a.seq}, isa {a.isa}")
print("| round | " + " | ".join([f"PEFT {d}" for d in peft_modes] + [f"lowrank {c}" for c in computes]) + " |")
print("|---|" + "---|" * (len(peft_modes) + len(computes)))
for rnd in range(1, a.rounds + 1):
    cells = []
    for r in [r for r in rows if r["round"] == rnd]:
        cell = f"{r['tok_s']} tok/s, {r['peak_rss_mb']} MB"
        if r["tool"] == "lowrank" and r["vs_best_peft"] is not None:
            cell += f" ({r['vs_best_peft']:.2f}× best PEFT)"
        cells.append(cell)
    print(f"| {rnd} | " + " | ".join(cells) + " |")
