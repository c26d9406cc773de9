"""Drive the playground of a running `lowrank serve` in headless Chromium (Selenium + the OS's
chromedriver) and check it against the API.

usage: playground.py BASE_URL API_KEY SCREENSHOT.png ADAPTER_A ADAPTER_B

Run by tests/playground.rs, which starts the server. Exits non-zero with a message on the first
thing that is wrong. Chromium and chromedriver: /usr/bin/chromium and /usr/bin/chromedriver
(Debian's chromium and chromium-driver), or LOWRANK_CHROMIUM / LOWRANK_CHROMEDRIVER.
"""

import json
import os
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

BASE, KEY, SHOT, A, B = sys.argv[1:6]
PROMPT = "Tell me a short story about a lighthouse."
MAX_TOKENS = 16
MIX = [{"name": A, "scale": 0.5}, {"name": B, "scale": 1.25}]


def fail(msg):
    sys.exit("playground: " + msg)


def api(path, body=None):
    req = urllib.request.Request(
        BASE + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def api_answer(model, adapters=None):
    """The API's own (non-streaming) answer to the request the page sends."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    if adapters:
        body["adapters"] = adapters
    return api("/v1/chat/completions", body)["choices"][0]["message"]["content"]


opts = webdriver.ChromeOptions()
opts.binary_location = os.environ.get("LOWRANK_CHROMIUM", "/usr/bin/chromium")
profile = tempfile.mkdtemp(prefix="lowrank-chromium-")
for a in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
    "--user-data-dir=" + profile,
]:
    opts.add_argument(a)
service = Service(executable_path=os.environ.get("LOWRANK_CHROMEDRIVER", "/usr/bin/chromedriver"))
d = webdriver.Chrome(service=service, options=opts)
wait = WebDriverWait(d, 60)
try:
    d.get(BASE + "/")
    # The server wants a key: the page must ask for it before it lists anything.
    wait.until(EC.visibility_of_element_located((By.ID, "key")))
    if d.find_elements(By.CSS_SELECTOR, "#models li"):
        fail("models listed before the API key was given")
    d.find_element(By.ID, "key").send_keys(KEY)
    d.find_element(By.CSS_SELECTOR, "#keyform button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models li")) >= 3)

    listed = [li.get_attribute("data-model") for li in d.find_elements(By.CSS_SELECTOR, "#models li")]
    served = [m["id"] for m in api("/v1/models")["data"]]
    if sorted(listed) != sorted(served):
        fail(f"the page lists {listed}, the API serves {served}")
    base = [m["id"] for m in api("/v1/models")["data"] if not m["parent"]][0]

    # The card of B, as the API reports it.
    d.find_element(By.CSS_SELECTOR, f'button[data-card="{B}"]').click()
    table = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'table[data-card="{B}"]')))
    rows = {
        r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
        for r in table.find_elements(By.TAG_NAME, "tr")
    }
    card = api(f"/v1/adapters/{B}")
    want = {
        "rank": str(card["rank"]["max"]),
        "targets": ", ".join(card["targets"]),
        "parameters": f'{card["parameters"]:,}',
    }
    for k, v in want.items():
        if rows.get(k) != v:
            fail(f"card row `{k}` shows {rows.get(k)!r}, the API says {v!r} (rows: {rows})")
    if card["card"] is None or "steps" not in rows:
        fail(f"the trained adapter's card has no training summary: {rows}")
    if not d.find_elements(By.CSS_SELECTOR, "#card svg.curve polyline"):
        fail("no loss curve drawn on the card")

    # Ask base, A and B side by side, plus a mixture set with the sliders.
    for box in d.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("data-model") in (base, A, B)):
            box.click()
    for m in MIX:
        d.execute_script(
            "const r = document.querySelector(`input[data-mix='${arguments[0]}']`);"
            "r.value = arguments[1]; r.dispatchEvent(new Event('input'));",
            m["name"], m["scale"],
        )
    d.find_element(By.ID, "mix-on").click()
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    mt = d.find_element(By.ID, "max-tokens")
    mt.clear()
    mt.send_keys(str(MAX_TOKENS))
    # Count every change the page makes to each answer while it streams. Several SSE events can
    # arrive in one network read and be painted together, so distinct texts seen by the observer
    # depend on timing; the number of writes to the answer does not: a page that buffers the
    # answer and shows it once at the end makes one write, a streaming page one per chunk.
    d.execute_script(
        "window.__writes = {}; window.__seen = {};"
        "new MutationObserver((ms) => { for (const m of ms) {"
        "  const el = m.target.nodeType === 1 ? m.target : m.target.parentElement;"
        "  const out = el.closest('.out'); if (!out) continue;"
        "  const k = out.closest('.col').dataset.model;"
        "  window.__writes[k] = (window.__writes[k] || 0) + 1;"
        "  const s = (window.__seen[k] = window.__seen[k] || []);"
        "  if (s[s.length - 1] !== out.textContent) s.push(out.textContent);"
        "} }).observe(document.getElementById('outputs'), {subtree: true, childList: true, characterData: true});"
    )
    d.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#outputs .col")) == 4)
    wait.until(lambda d: all(
        c.get_attribute("data-state") in ("done", "error")
        for c in d.find_elements(By.CSS_SELECTOR, "#outputs .col")
    ))
    seen = d.execute_script("return window.__seen")
    writes = d.execute_script("return window.__writes")
    cols = {c.get_attribute("data-model"): c for c in d.find_elements(By.CSS_SELECTOR, "#outputs .col")}
    if sorted(cols) != sorted([base, A, B, "mixture"]):
        fail(f"answer columns {sorted(cols)}")
    for name, col in cols.items():
        stats = col.find_element(By.CLASS_NAME, "stats").text
        if col.get_attribute("data-state") != "done":
            fail(f"`{name}` did not finish: {stats}")
        text = col.find_element(By.CLASS_NAME, "out").get_attribute("textContent")
        expect = api_answer(base, MIX) if name == "mixture" else api_answer(name)
        if text != expect:
            fail(f"`{name}`: the page shows {text!r}, the API answers {expect!r}")
        chunks = int(col.get_attribute("data-chunks"))
        if chunks < 2:
            fail(f"`{name}` arrived in {chunks} chunk(s), not streamed")
        if writes.get(name, 0) < chunks:
            fail(f"`{name}`: {chunks} chunks but {writes.get(name, 0)} writes to the answer, "
                 f"not shown as it streamed: {seen.get(name)}")
        if "tok/s" not in stats or not float(col.get_attribute("data-tps") or 0) > 0:
            fail(f"`{name}` shows no tokens/s: {stats!r}")
        print(f"{name}: {chunks} chunks, {writes[name]} writes, {len(seen[name])} painted, {stats}")
    if len({cols[n].find_element(By.CLASS_NAME, "out").get_attribute("textContent") for n in cols}) < 2:
        fail("every column shows the same text: the adapters were not applied")
    d.save_screenshot(SHOT)
    print("ok")
finally:
    d.quit()
