#!/usr/bin/env python3
"""Bounded soak test of `lowrank serve`: does the server's memory plateau under churn?

Starts `lowrank serve` on loopback with several adapters (made with `lowrank combine` from the
repository's SmolLM2 test adapter, so they have ranks 2 to 8), then for --minutes drives mixed
traffic from --concurrency client threads:

  * chat and text completions, streaming and not, on the base or one adapter;
  * per-request adapter mixtures (the `adapters` extension, 2-3 adapters, scales in [-1, 1.5]);
  * streams the client abandons after a few chunks (the socket is closed mid-stream);
  * adapter churn through the admin API: unload + reload of the served adapters, and
    short-lived adapters under fresh names (registered, used, deleted).

Every second it samples the server's resident set (VmRSS in /proc/PID/status) and, every few
seconds, the server's own gauges from /metrics. It writes, under --out:
  soak.csv      one row per sample: seconds, RSS MiB, requests done, 5xx so far, gauges
  soak.svg      RSS over time with the thirds of the run and the plateau rule's two maxima
  summary.json  the figures below and the verdict

Plateau rule: the largest RSS of the last third of the run exceeds the largest RSS of the middle
third by less than --tolerance (5 % by default); the first third is warm-up (allocator arenas,
adapter loads, KV caches reaching their working size).

Exit status 0 only if RSS plateaued, no response was a 5xx (a streamed `server_error` event
counts as one) and the server neither died nor failed to shut down cleanly on SIGINT.

Python 3 standard library only. Example (from the repository root, after
`cargo build --release --bin lowrank`):

  python3 bench/soak.py --minutes 6 --concurrency 8 --out soak-report
"""

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ADAPTER = os.path.join(ROOT, "tests", "fixtures", "smollm2-135m", "peft_adapter")
ADMIN_KEY = "soak-admin"
PROMPTS = [
    "Write a haiku about autumn.",
    "What is the capital of France? Answer in one word.",
    "Explain LoRA in two sentences.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Tell me a very short story about a robot who learns to paint.",
    "SELECT the names of all customers from the customers table.",
    "Summarise: the quick brown fox jumps over the lazy dog.",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "lowrank"),
                   help="the lowrank binary (default: target/release/lowrank)")
    p.add_argument("--model", default="smollm2-135m", help="model for `lowrank serve --model`")
    p.add_argument("--compute", default="f32", choices=["f32", "int8"], help="serve --compute")
    p.add_argument("--threads", type=int, default=None, help="serve --threads")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the traffic phase")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--max-tokens", type=int, default=24, help="max_tokens per request")
    p.add_argument("--adapters", type=int, default=6, help="adapters served (at least 3)")
    p.add_argument("--from-adapter", default=FIXTURE_ADAPTER,
                   help="PEFT adapter for --model the served ones are made from "
                        "(default: the SmolLM2 test fixture)")
    p.add_argument("--churn-every", type=float, default=1.0,
                   help="seconds between adapter unload/reload operations")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="plateau rule: allowed growth of the last third's max RSS over the middle third's")
    p.add_argument("--seed", type=int, default=0, help="traffic seed")
    p.add_argument("--out", default="soak-report", help="output directory")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds to wait for the server to answer /health")
    a = p.parse_args()
    if a.adapters < 3:
        p.error("--adapters must be at least 3")
    if a.minutes <= 0 or a.concurrency < 1 or a.max_tokens < 1:
        p.error("--minutes, --concurrency and --max-tokens must be positive")
    return a


def make_adapters(a, work):
    """Adapters of 1..4 times the source's rank: copies and `lowrank combine --method cat` mixes."""
    root = os.path.join(work, "adapters")
    os.makedirs(root)
    names = []
    for i in range(a.adapters):
        name = f"s{i}"
        out = os.path.join(root, name)
        parts = 1 + i % 4  # rank 2, 4, 6, 8
        if parts == 1:
            shutil.copytree(a.from_adapter, out)
        else:
            weights = [round(1.0 - 0.3 * k + 0.1 * i, 2) for k in range(parts)]
            specs = [f"{a.from_adapter}:{w}" for w in weights]
            cmd = [a.bin, "combine", "--model", a.model, "--method", "cat", "--out", out] + specs
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"soak: making adapter {name} failed:\n{' '.join(cmd)}\n{r.stderr}")
        names.append(name)
    return root, names


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_status = {}
        self.done = 0
        self.server_errors = 0  # 5xx, or a streamed server_error event
        self.transport_errors = 0
        self.disconnects = 0
        self.churn_ops = 0
        self.examples = []  # first few failures, for the report

    def record(self, kind, status, note=None):
        with self.lock:
            key = f"{kind} {status}"
            self.by_status[key] = self.by_status.get(key, 0) + 1
            self.done += 1
            bad = isinstance(status, int) and status >= 500
            if bad or status == "server_error_event":
                self.server_errors += 1
            if status == "transport":
                self.transport_errors += 1
            if (bad or status in ("server_error_event", "transport")) and len(self.examples) < 10:
                self.examples.append(f"{kind} {status}: {note}")


class Client:
    def __init__(self, port, timeout=120):
        self.port = port
        self.timeout = timeout

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def request(self, method, path, body=None, admin=False):
        c = self.conn()
        try:
            headers = {"Content-Type": "application/json"}
            if admin:
                headers["Authorization"] = f"Bearer {ADMIN_KEY}"
            c.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            r = c.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            c.close()

    def stream(self, path, body, stop_after=None):
        """Returns (status, events read, server_error event seen, error text)."""
        c = self.conn()
        try:
            c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                return r.status, 0, False, r.read().decode("utf-8", "replace")
            events, server_error, err = 0, False, ""
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                events += 1
                ev = json.loads(data)
                if "error" in ev:
                    err = data
                    if ev["error"].get("type") == "server_error":
                        server_error = True
                if stop_after is not None and events >= stop_after:
                    break  # the client walks away: the socket closes below
            return 200, events, server_error, err
        finally:
            c.close()


def worker(idx, a, base, client, names, deadline, stats, churn_names):
    rng = random.Random(a.seed * 1000 + idx)
    while time.time() < deadline:
        kind = rng.choice(["chat", "chat", "completion", "stream", "stream", "disconnect", "mixture", "mixture"])
        live = names + [n for n in list(churn_names) if rng.random() < 0.5]
        model = rng.choice([base] + live)
        prompt = rng.choice(PROMPTS)
        common = {"max_tokens": rng.randint(4, a.max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
                  "seed": rng.randint(0, 1 << 30)}
        chat = {"model": model, "messages": [{"role": "user", "content": prompt}], **common}
        try:
            if kind == "chat":
                status, text = client.request("POST", "/v1/chat/completions", chat)
                stats.record(kind, status, text[:300])
            elif kind == "completion":
                status, text = client.request("POST", "/v1/completions", {"model": model, "prompt": prompt, **common})
                stats.record(kind, status, text[:300])
            elif kind in ("stream", "disconnect"):
                body = dict(chat, stream=True)
                if rng.random() < 0.5:
                    body = {"model": model, "prompt": prompt, "stream": True, **common}
                    path = "/v1/completions"
                else:
                    path = "/v1/chat/completions"
                stop = rng.randint(1, 3) if kind == "disconnect" else None
                status, events, server_error, err = client.stream(path, body, stop)
                if kind == "disconnect" and status == 200:
                    with stats.lock:
                        stats.disconnects += 1
                stats.record(kind, "server_error_event" if server_error else status, err[:300])
            else:
                mix = [{"name": n, "scale": round(rng.uniform(-1.0, 1.5), 3)}
                       for n in rng.sample(names, rng.randint(2, 3))]
                body = dict(chat, model=base, adapters=mix)
                if rng.random() < 0.3:
                    body["stream"] = True
                    status, _, server_error, err = client.stream("/v1/chat/completions", body)
                    stats.record(kind, "server_error_event" if server_error else status, err[:300])
                else:
                    status, text = client.request("POST", "/v1/chat/completions", body)
                    stats.record(kind, status, text[:300])
        except (OSError, http.client.HTTPException, ValueError) as e:
            stats.record(kind, "transport", repr(e))
            time.sleep(0.2)


def churn(a, client, names, deadline, stats, churn_names, stop):
    """Unload + reload served adapters; now and then a short-lived adapter under a new name."""
    rng = random.Random(a.seed + 7)
    fresh = 0
    while time.time() < deadline and not stop.is_set():
        try:
            n = rng.choice(names)
            s1, t1 = client.request("DELETE", f"/v1/adapters/{n}", admin=True)
            s2, t2 = client.request("POST", "/v1/adapters", {"name": n, "path": n}, admin=True)
            for s, t in ((s1, t1), (s2, t2)):
                stats.record("churn", s, t[:300])
            if rng.random() < 0.2:
                fresh += 1
                name = f"tmp{fresh}"
                s, t = client.request("POST", "/v1/adapters", {"name": name, "path": rng.choice(names)}, admin=True)
                stats.record("churn", s, t[:300])
                churn_names.add(name)
                time.sleep(a.churn_every)
                churn_names.discard(name)
                s, t = client.request("DELETE", f"/v1/adapters/{name}", admin=True)
                stats.record("churn", s, t[:300])
            with stats.lock:
                stats.churn_ops += 1
        except (OSError, http.client.HTTPException) as e:
            stats.record("churn", "transport", repr(e))
        stop.wait(a.churn_every)


def scrape_metrics(client):
    try:
        s, text = client.request("GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    out = {}
    for line in text.splitlines():
        for k in ("lowrank_resident_adapter_bytes", "lowrank_kv_cache_bytes", "lowrank_running_sequences",
                  "lowrank_resident_adapters"):
            if line.startswith(k + " "):
                out[k] = float(line.split()[1])
    return out


def plateau(samples, tolerance):
    """(verdict, max of middle third, max of last third, growth)."""
    n = len(samples)
    mid = [r for _, r in samples[n // 3: 2 * n // 3]]
    last = [r for _, r in samples[2 * n // 3:]]
    if not mid or not last:
        return False, None, None, None
    m, l = max(mid), max(last)
    growth = (l - m) / m
    return growth < tolerance, m, l, growth


def svg_plot(samples, verdict, mid_max, last_max, title):
    w, h, ml, mr, mt, mb = 900, 420, 70, 20, 40, 50
    ts = [t for t, _ in samples]
    rs = [r for _, r in samples]
    t1 = max(ts) if ts and max(ts) > 0 else 1.0
    lo, hi = min(rs), max(rs)
    pad = max((hi - lo) * 0.1, 5.0)
    lo, hi = max(0.0, lo - pad), hi + pad
    x = lambda t: ml + (w - ml - mr) * t / t1
    y = lambda r: mt + (h - mt - mb) * (1 - (r - lo) / (hi - lo))
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
         f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
         f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>']
    for k in range(6):
        r = lo + (hi - lo) * k / 5
        o.append(f'<line x1="{ml - 4}" y1="{y(r):.1f}" x2="{w - mr}" y2="{y(r):.1f}" stroke="#eee"/>')
        o.append(f'<text x="{ml - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r:.0f}</text>')
    minutes = t1 > 120
    step = max(1, round(t1 / 60 / 8)) * 60 if minutes else max(10, round(t1 / 8 / 10) * 10)
    t = 0.0
    while t <= t1 + 1e-9:
        label = f"{t / 60:g}" if minutes else f"{t:g}"
        o.append(f'<text x="{x(t):.1f}" y="{h - mb + 16}" text-anchor="middle">{label}</text>')
        t += step
    o.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 10}" text-anchor="middle">'
             f'{"minutes" if minutes else "seconds"}</text>')
    o.append(f'<text x="16" y="{(mt + h - mb) / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {(mt + h - mb) / 2})">RSS (MiB)</text>')
    n = len(samples)
    for i in (n // 3, 2 * n // 3):
        if 0 < i < n:
            o.append(f'<line x1="{x(ts[i]):.1f}" y1="{mt}" x2="{x(ts[i]):.1f}" y2="{h - mb}" '
                     f'stroke="#999" stroke-dasharray="4 4"/>')
    for val, color, label in ((mid_max, "#2a7", "max middle third"), (last_max, "#c33", "max last third")):
        if val is not None:
            o.append(f'<line x1="{ml}" y1="{y(val):.1f}" x2="{w - mr}" y2="{y(val):.1f}" stroke="{color}" '
                     f'stroke-dasharray="6 3"/>')
            o.append(f'<text x="{w - mr - 4}" y="{y(val) - 4:.1f}" text-anchor="end" fill="{color}">'
                     f'{label}: {val:.0f} MiB</text>')
    pts = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in samples)
    o.append(f'<polyline points="{pts}" fill="none" stroke="#1f4e9c" stroke-width="1.5"/>')
    o.append(f'<text x="{ml + 8}" y="{mt + 14}" fill="{"#2a7" if verdict else "#c33"}">'
             f'{"plateau" if verdict else "no plateau"}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    a = parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"soak: no binary at {a.bin}; run `cargo build --release --bin lowrank` or pass --bin")
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lowrank-soak-")
    server = None
    try:
        print(f"soak: making {a.adapters} adapters", flush=True)
        adapters_dir, names = make_adapters(a, work)
        port = free_port()
        cmd = [a.bin, "serve", "--model", a.model, "--compute", a.compute, "--adapters", adapters_dir,
               "--port", str(port), "--admin-key", ADMIN_KEY, "--preload"]
        if a.threads:
            cmd[1:1] = ["--threads", str(a.threads)]
        log = open(os.path.join(a.out, "server.log"), "w")
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        client = Client(port)
        t0 = time.time()
        while True:
            if server.poll() is not None:
                sys.exit(f"soak: the server exited with {server.returncode} at start; see {a.out}/server.log")
            try:
                if client.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > a.startup_timeout:
                sys.exit("soak: the server did not answer /health in time")
            time.sleep(0.5)
        base = json.loads(client.request("GET", "/v1/models")[1])["data"][0]["id"]
        print(f"soak: server pid {server.pid} on port {port}; {a.minutes} min of traffic, "
              f"{a.concurrency} clients", flush=True)

        stats = Stats()
        churn_names = set()
        start = time.time()
        deadline = start + a.minutes * 60
        stop = threading.Event()
        threads = [threading.Thread(target=worker, args=(i, a, base, client, names, deadline, stats, churn_names),
                                    daemon=True) for i in range(a.concurrency)]
        threads.append(threading.Thread(target=churn, args=(a, Client(port), names, deadline, stats,
                                                            churn_names, stop), daemon=True))
        for t in threads:
            t.start()

        rows, samples, gauges, died = [], [], {}, False
        next_print = start
        while time.time() < deadline:
            now = time.time() - start
            r = rss_mib(server.pid)
            if r is None or server.poll() is not None:
                died = True
                print("soak: the server died", flush=True)
                break
            if int(now) % 5 == 0:
                gauges = scrape_metrics(client) or gauges
            samples.append((now, r))
            with stats.lock:
                done, errs = stats.done, stats.server_errors
            rows.append([f"{now:.1f}", f"{r:.1f}", done, errs,
                         int(gauges.get("lowrank_resident_adapter_bytes", 0)),
                         int(gauges.get("lowrank_kv_cache_bytes", 0)),
                         int(gauges.get("lowrank_running_sequences", 0))])
            if time.time() >= next_print:
                print(f"  {now / 60:5.1f} min  RSS {r:7.1f} MiB  requests {done}  5xx {errs}", flush=True)
                next_print += 30
            time.sleep(max(0.0, 1.0 - (time.time() - start - now)))
        stop.set()
        for t in threads:
            t.join(timeout=180)

        clean_exit = False
        if not died and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                clean_exit = server.wait(timeout=120) == 0
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        else:
            died = True

        header = "seconds,rss_mib,requests_done,server_errors,resident_adapter_bytes,kv_cache_bytes,running"
        write_atomic(os.path.join(a.out, "soak.csv"),
                     header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
        ok_plateau, mid_max, last_max, growth = plateau(samples, a.tolerance)
        title = (f"lowrank serve RSS, {a.minutes:g} min, {a.concurrency} clients, {a.compute}, "
                 f"{stats.done} requests, {stats.server_errors} 5xx")
        write_atomic(os.path.join(a.out, "soak.svg"), svg_plot(samples, ok_plateau, mid_max, last_max, title))
        summary = {
            "minutes": a.minutes, "concurrency": a.concurrency, "compute": a.compute, "model": a.model,
            "adapters": names, "samples": len(samples),
            "start_rss_mib": round(samples[0][1], 1) if samples else None,
            "max_rss_middle_third_mib": None if mid_max is None else round(mid_max, 1),
            "plateau_rss_mib": None if last_max is None else round(last_max, 1),
            "growth_last_vs_middle": None if growth is None else round(growth, 4),
            "plateau_rule": f"max RSS of the last third < (1 + {a.tolerance}) x max RSS of the middle third",
            "plateau": ok_plateau,
            "requests": stats.done, "by_status": dict(sorted(stats.by_status.items())),
            "server_errors_5xx": stats.server_errors, "transport_errors": stats.transport_errors,
            "client_disconnects": stats.disconnects, "churn_ops": stats.churn_ops,
            "server_died": died, "clean_shutdown": clean_exit, "failure_examples": stats.examples,
        }
        write_atomic(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: summary[k] for k in (
            "start_rss_mib", "max_rss_middle_third_mib", "plateau_rss_mib", "growth_last_vs_middle", "plateau",
            "requests", "server_errors_5xx", "transport_errors", "client_disconnects", "churn_ops",
            "server_died", "clean_shutdown")}, indent=2))
        failed = []
        if not ok_plateau:
            failed.append("RSS did not plateau")
        if stats.server_errors:
            failed.append(f"{stats.server_errors} 5xx responses")
        if stats.transport_errors:
            failed.append(f"{stats.transport_errors} transport errors")
        if died:
            failed.append("the server died")
        elif not clean_exit:
            failed.append("the server did not shut down cleanly")
        if failed:
            print("soak: FAILED: " + "; ".join(failed), file=sys.stderr)
            return 1
        print(f"soak: OK ({a.out}/soak.csv, soak.svg, summary.json)")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
