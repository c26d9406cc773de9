"""Steps of tests/object_store.rs against an S3-compatible server (moto) on loopback and a
`lowrank serve --adapters s3://lowrank/adapters`. Exits non-zero with a message on failure.

  object_store.py upload S3_URL LOCAL_ROOT [NAME=DIR ...]   (bucket `lowrank`, prefix `adapters/`)
  object_store.py first SERVER_URL      -> prints {"text": ...}
  object_store.py restart SERVER_URL TEXT
  object_store.py reload SERVER_URL TEXT
"""
import json
import os
import sys
import urllib.error
import urllib.request

KEY, ADMIN = "sk-s3", "adm-s3"
cmd = sys.argv[1]


def fail(msg):
    sys.exit(f"object_store.py {cmd}: {msg}")


def call(base, path, body=None, key=KEY):
    req = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(base, model):
    st, t = call(base, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8, "temperature": 0})
    return st, t


def text_of(model, st, t):
    if st != 200:
        fail(f"{model}: HTTP {st}: {t}")
    return json.loads(t)["choices"][0]["message"]["content"]


def downloads(base):
    st, t = call(base, "/metrics")
    for line in t.splitlines():
        if line.startswith("lowrank_adapter_downloads_total "):
            return int(float(line.split()[1]))
    fail("no lowrank_adapter_downloads_total in /metrics")


if cmd == "upload":
    import boto3
    s3 = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    try:
        s3.create_bucket(Bucket="lowrank")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    root = sys.argv[3]
    pairs = [a.split("=", 1) for a in sys.argv[4:]] or [(n, os.path.join(root, n)) for n in sorted(os.listdir(root))]
    for name, d in pairs:
        for f in sorted(os.listdir(d)):
            s3.upload_file(os.path.join(d, f), "lowrank", f"adapters/{name}/{f}")
    print("ok")

elif cmd == "first":
    base = sys.argv[2]
    st, t = call(base, "/v1/models")
    ids = sorted(m["id"] for m in json.loads(t)["data"] if m["parent"])
    if ids != ["broken", "tiny-lora", "two"]:
        fail(f"listed adapters {ids}")
    if downloads(base) != 0:
        fail("adapters were downloaded before any request (they load on first use)")
    t1 = text_of("tiny-lora", *chat(base, "tiny-lora"))
    if downloads(base) != 1:
        fail(f"{downloads(base)} downloads after the first request")
    if text_of("tiny-lora", *chat(base, "tiny-lora")) != t1:
        fail("the same greedy request answered differently")
    if downloads(base) != 1:
        fail("a second request downloaded again")
    st, t = chat(base, "broken")
    msg = json.loads(t).get("error", {}).get("message", "")
    if st != 422 or "broken" not in msg or "safetensors" not in msg:
        fail(f"the corrupted adapter gave HTTP {st}: {t}")
    t2 = text_of("two", *chat(base, "two"))
    if t2 == t1:
        fail("two different adapters answered the same")
    st, t = call(base, "/v1/adapters/tiny-lora")
    if st != 200 or json.loads(t)["parameters"] <= 0:
        fail(f"card: HTTP {st}: {t}")
    st, t = call(base, "/health")
    if st != 200:
        fail(f"unhealthy after the corrupted adapter: {t}")
    print(json.dumps({"text": t1, "two": t2}))

elif cmd == "restart":
    base, t1 = sys.argv[2], sys.argv[3]
    if text_of("tiny-lora", *chat(base, "tiny-lora")) != t1:
        fail("the cached adapter answers differently")
    if downloads(base) != 0:
        fail("a fresh server with the same cache downloaded the adapter again")
    print("ok")

elif cmd == "reload":
    base, two = sys.argv[2], sys.argv[3]
    st, t = call(base, "/v1/adapters", {"name": "tiny-lora", "path": "tiny-lora"}, key=ADMIN)
    if st != 200:
        fail(f"hot reload: HTTP {st}: {t}")
    if downloads(base) != 1:
        fail(f"{downloads(base)} downloads for the new version (expected 1)")
    # The new version under tiny-lora holds the weights `two` serves.
    if text_of("tiny-lora", *chat(base, "tiny-lora")) != two:
        fail("tiny-lora still answers with its old version")
    print("ok")
else:
    fail("unknown step")
