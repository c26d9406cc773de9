#!/usr/bin/env python3
"""Crash test of `lowrank train`'s checkpoints: kill -9 at random moments, then resume.

    python3 bench/crash_test.py PATH/TO/lowrank [RUNS] [SEED] [--model M] [--steps N] ...

A reference run trains a small job with a checkpoint after every step
(`--save-every 1 --keep-checkpoints 2`). Then, RUNS times (20 by default): the same job starts
afresh in its own directory and is killed with SIGKILL at a random moment (sometimes its
resume is killed again); after each kill every `checkpoint-*` directory must be complete (all
files the checkpoint format requires present and parseable, safetensors sizes matching their
headers) or absent. The job is then resumed from the output directory (`--resume OUT`: the
newest complete checkpoint) or, if the kill came before the first checkpoint, started again;
the finished run must name the checkpoint it resumed from, end with the adapter bytes and the
per-step losses (metrics.jsonl) of the reference run, keep exactly the two newest checkpoints
and leave no hidden leftovers. Exits non-zero on any failure; the last line is
"kills survived: N/N". Python 3 standard library only.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REQUIRED = {
    "lora": ["trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"],
    "full": ["trainer_state.json", "model.safetensors", "optimizer.safetensors"],
}


class Bad(Exception):
    pass


def check_safetensors(path):
    """The header parses and the file is exactly as long as the header says."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Bad(f"{path}: truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise Bad(f"{path}: header of {n} bytes in a file of {size}")
        try:
            meta = json.loads(f.read(n))
        except ValueError as e:
            raise Bad(f"{path}: corrupt header: {e}")
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise Bad(f"{path}: header describes {8 + n + end} bytes, file has {size}")


def check_checkpoint(d, method):
    for f in REQUIRED[method]:
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            raise Bad(f"{p}: missing (left: {sorted(os.listdir(d))})")
        if f.endswith(".json"):
            try:
                with open(p) as fh:
                    json.load(fh)
            except ValueError as e:
                raise Bad(f"{p}: invalid JSON: {e}")
        else:
            check_safetensors(p)


def checkpoints(out):
    """{step: name} of the directories named checkpoint-N."""
    if not os.path.isdir(out):
        return {}
    found = {}
    for n in os.listdir(out):
        if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit():
            found[int(n[len("checkpoint-"):])] = n
    return found


def check_all(out, method):
    """Every entry under a checkpoint name is a complete checkpoint; their steps."""
    if not os.path.isdir(out):
        return []
    for n in os.listdir(out):
        if n.startswith("checkpoint-"):
            if not n[len("checkpoint-"):].isdigit():
                raise Bad(f"{out}/{n}: odd entry under a checkpoint name")
            check_checkpoint(os.path.join(out, n), method)
    return sorted(checkpoints(out))


def leftovers(out):
    return sorted(n for n in os.listdir(out) if n.startswith(".")) if os.path.isdir(out) else []


def losses(out):
    got = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            v = json.loads(line)
            if "loss" in v:
                got.append((v["step"], v["loss"]))
    return got


def write_data(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}]}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lowrank", help="path of the lowrank binary")
    ap.add_argument("runs", nargs="?", type=int, default=20, help="killed runs (default 20)")
    ap.add_argument("seed", nargs="?", type=int, default=0, help="seed of the kill moments (default 0)")
    ap.add_argument("--model", help="model to train (default: lowrank's default model)")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="--threads of every run (default 2)")
    ap.add_argument("--work", help="scratch directory (default: a new temporary one, removed after)")
    args = ap.parse_args()
    if args.runs < 1 or args.steps < 3:
        ap.error("need runs >= 1 and steps >= 3")
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="lowrank-crash-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "train.jsonl")
    write_data(data, 48)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")

    def cmd(out, resume=False):
        c = [args.lowrank, "train", "--data", data, "--out", out, "--method", args.method,
             "--max-steps", str(args.steps), "--batch-size", "2", "--max-seq-len", "64",
             "--lr", "2e-3", "--dropout", "0.1", "--seed", "1", "--save-every", "1",
             "--keep-checkpoints", "2", "--threads", str(args.threads), "--quiet"]
        if args.model:
            c += ["--model", args.model]
        if resume:
            c += ["--resume", out]
        return c

    def start(out):
        """Resume from `out` if it holds a checkpoint, else start afresh."""
        return subprocess.Popen(cmd(out, resume=bool(checkpoints(out))), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    ref = os.path.join(work, "reference")
    t0 = time.monotonic()
    r = subprocess.run(cmd(ref), env=env, capture_output=True)
    ref_s = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"reference run failed: {r.stderr.decode(errors='replace')}")
    with open(os.path.join(ref, "adapter_model.safetensors" if args.method == "lora" else "model/model.safetensors"), "rb") as f:
        ref_bytes = f.read()
    ref_losses = losses(ref)
    print(f"reference: {args.steps} steps in {ref_s:.2f} s, losses {[round(l, 4) for _, l in ref_losses]}")

    kills = survived = 0
    failures = []
    for run in range(args.runs):
        out = os.path.join(work, f"run-{run}")
        notes = []
        try:
            # One kill, or two (the resumed run killed too) one time in three.
            for k in range(2 if rng.random() < 1 / 3 else 1):
                bound = ref_s
                for _ in range(5):
                    p = start(out)
                    t = time.monotonic()
                    at = rng.uniform(0.02, 0.97) * bound
                    time.sleep(at)
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                        kills += 1
                        steps = check_all(out, args.method)
                        notes.append(f"killed at {at:.2f} s: checkpoints {steps}, hidden {leftovers(out)}")
                        break
                    # It ended first (a resumed run is shorter): again, within its length.
                    p.wait()
                    bound = time.monotonic() - t
                    if p.returncode != 0:
                        raise Bad(f"run ended with {p.returncode}: {p.stderr.read().decode(errors='replace')}")
                else:
                    notes.append("no kill: the run kept ending first")
            newest = checkpoints(out)
            want = os.path.join(out, newest[max(newest)]) if newest else None
            p = start(out)
            so, se = p.communicate()
            if p.returncode != 0:
                raise Bad(f"resume failed ({p.returncode}): {se.decode(errors='replace')}")
            summary = json.loads(so)
            if summary.get("resumed_from") != want:
                raise Bad(f"resumed from {summary.get('resumed_from')}, the newest complete checkpoint is {want}")
            notes.append(f"resumed from {os.path.basename(want) if want else '(fresh start)'}")
            fin = os.path.join(out, "adapter_model.safetensors" if args.method == "lora" else "model/model.safetensors")
            with open(fin, "rb") as f:
                if f.read() != ref_bytes:
                    raise Bad("final adapter bytes differ from the reference run's")
            got = losses(out)
            if got != ref_losses:
                diff = [(a, b) for a, b in zip(got, ref_losses) if a != b][:3]
                raise Bad(f"per-step losses differ (first: {diff}; {len(got)} vs {len(ref_losses)} steps)")
            left = check_all(out, args.method)
            if left != [args.steps - 2, args.steps - 1] or leftovers(out):
                raise Bad(f"left checkpoints {left} and hidden {leftovers(out)}")
            survived += len([n for n in notes if n.startswith("killed")])
            print(f"run {run}: ok: " + "; ".join(notes))
        except Bad as e:
            failures.append(f"run {run}: {e}")
            print(f"run {run}: FAILED: {e} ({'; '.join(notes)})")
        shutil.rmtree(out, ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f, file=sys.stderr)
    print(f"kills survived: {survived}/{kills}")
    sys.exit(1 if failures or survived != kills else 0)


if __name__ == "__main__":
    main()
