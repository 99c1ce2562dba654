#!/usr/bin/env python3
"""Client side of scripts/bench-room.sh: a room of streaming chat clients.

Python standard library only (http.client + threads). Every phase appends
JSON lines to the results file given with --out; `report` reads them back and
prints the summary plus one final JSON line. The shell script starts and
stops the servers (shoal's daemon, llama.cpp's llama-server) around each
phase; this file starts no server (only `shoal generate`, the raw engine's
reference, in `engine`).

  bench-room.py warm    --url URL --model M --out F --server S
  bench-room.py load    --url URL --model M --out F --server S --clients N --tokens T [--rss-pid P]
  bench-room.py alone   --url URL --model M --out F --server S --clients N --tokens T
  bench-room.py single  --url URL --model M --out F --server S --tokens T --runs R
  bench-room.py restart --url URL --model M --out F --server S --phase cold|restart --run I [--spawn-to-api S]
  bench-room.py rss     --pid P --out F --server S --what idle
  bench-room.py engine  --shoal-bin B --model-path G --threads T --tokens T --runs R --out F
  bench-room.py report  --out F [--meta JSON]
"""

import argparse
import http.client
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.parse

# Short questions, one per client: each asks for an explanation long enough
# to fill 96 tokens, so the greedy answers run to max_tokens on both servers.
QUESTIONS = [
    "Why is the sky blue? Explain it to a curious student.",
    "How do bees make honey? Describe each step.",
    "What causes the seasons on Earth? Explain in detail.",
    "How does a bicycle stay upright while moving?",
    "Why do cats purr? Give several reasons.",
    "How does a refrigerator keep food cold?",
    "What is photosynthesis and why does it matter?",
    "How do airplanes fly? Explain lift simply.",
    "Why does bread rise when it is baked?",
    "How do volcanoes form and why do they erupt?",
    "What makes a rainbow appear after rain?",
    "How does the heart pump blood through the body?",
    "Why do leaves change colour in autumn?",
    "How does a compass find north?",
    "What causes thunder and lightning during a storm?",
    "How do fish breathe under water?",
    "Why does ice float on water?",
    "How does a telescope make distant stars look closer?",
    "What happens inside a battery when it powers a lamp?",
    "How do plants know which way is up?",
    "Why do we dream when we sleep?",
    "How does soap remove grease from a plate?",
    "What is an echo and how does it happen?",
    "How do birds find their way when they migrate?",
]
SUBJECTS = ["a farmer", "a sailor", "a child", "a teacher", "a baker", "an engineer"]

WARM_PROMPT = "Say hello and introduce yourself in two sentences."
SINGLE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# The raw engine gets no chat template: a text to continue.
ENGINE_PROMPT = "Once upon a time, a lighthouse keeper found a message in a bottle. It said"


def question(i):
    """Distinct question number i (beyond the list: the list again, for another listener)."""
    q = QUESTIONS[i % len(QUESTIONS)]
    k = i // len(QUESTIONS)
    return q if k == 0 else f"{q} Answer as if talking to {SUBJECTS[(k - 1) % len(SUBJECTS)]}."


def system_prompt(words):
    """A deterministic house-rules system prompt of about `words` words (~1.3 tokens each)."""
    topics = ["opening hours", "borrowing books", "quiet rooms", "printing", "lost cards", "late returns",
              "group study", "rare maps", "children's corner", "music scores", "reading glasses",
              "umbrella stands", "coffee cups", "wireless network", "microfilm", "donations"]
    acts = ["explain the rule kindly", "give the exact number of days", "name the desk to visit",
            "offer a short apology", "suggest a nearby alternative", "mention the posted sign",
            "ask one clarifying question", "thank the visitor for asking"]
    places = ["east wing", "second floor", "garden room", "front hall", "basement archive", "tower stair"]
    out, n, i = ["You are the assistant of the Harbor Street public library. Follow these house rules."], 0, 0
    while n < words:
        s = (f"Rule {i + 1}: when a visitor asks about {topics[i % len(topics)]} in the "
             f"{places[(i * 5) % len(places)]}, {acts[(i * 3) % len(acts)]}, keep the answer under "
             f"{40 + (i * 7) % 60} words, and never invent a fee of {(i * 13) % 9 + 1} coins.")
        out.append(s)
        n += len(s.split())
        i += 1
    return " ".join(out)


RESTART_QUESTIONS = [
    "May I borrow a rare map for a week?",
    "Where can I print a letter today?",
    "I lost my library card, what should I do?",
    "Can my children read in the garden room?",
    "Is there a quiet room for studying tonight?",
    "Can I bring a coffee cup into the east wing?",
    "How late may I return a music score?",
    "Where do I leave a wet umbrella?",
    "Can I use the microfilm reader without booking?",
    "Do you accept donations of old encyclopedias?",
    "Is the wireless network free for visitors?",
    "Where are the reading glasses kept?",
]


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(1, math.ceil(p / 100 * len(v)))
    return v[k - 1]


def median(values):
    v = sorted(values)
    n = len(v)
    return None if n == 0 else (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


def stream_chat(url, model, messages, max_tokens, temperature=0.0, top_p=None, seed=None, timeout=600):
    """One streaming /v1/chat/completions request; timings in perf_counter seconds."""
    u = urllib.parse.urlsplit(url)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    data = json.dumps(body).encode()
    r = {"status": None, "error": None, "chunks": 0, "text": "", "usage": None}
    t_send = time.perf_counter()
    r["t_send"] = t_send
    t_first = t_last = None
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        r["status"] = resp.status
        if resp.status != 200:
            r["error"] = f"HTTP {resp.status}: {resp.read(500).decode('utf-8', 'replace')}"
            return r
        deadline = t_send + timeout
        while time.perf_counter() < deadline:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            try:
                c = json.loads(payload)
            except ValueError:
                continue
            if c.get("usage"):
                r["usage"] = c["usage"]
            for ch in c.get("choices") or []:
                content = (ch.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                    t_last = now
                    r["chunks"] += 1
                    r["text"] += content
        else:
            r["error"] = "timeout"
    except (OSError, http.client.HTTPException) as e:
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    r["t_done"] = time.perf_counter()
    r["t_first"], r["t_last"] = t_first, t_last
    if t_first is None and r["error"] is None:
        r["error"] = "no content"
    usage = r["usage"] or {}
    # Completion tokens from usage when the server sends it, else content chunks.
    r["tokens"] = usage.get("completion_tokens") or r["chunks"]
    r["prompt_tokens"] = usage.get("prompt_tokens")
    r["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    r["ttft"] = None if t_first is None else t_first - t_send
    return r


def emit(out, **kw):
    with open(out, "a") as f:
        f.write(json.dumps(kw) + "\n")


def vmrss(pid):
    """VmRSS of pid in bytes, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def user(q):
    return [{"role": "user", "content": q}]


def cmd_warm(a):
    r = stream_chat(a.url, a.model, user(WARM_PROMPT), 16)
    if r["error"]:
        sys.exit(f"bench-room: warm-up of {a.server} failed: {r['error']}")
    print(f"  {a.server}: warm-up {r['tokens']} tokens, TTFT {r['ttft']:.3f} s", file=sys.stderr)


def cmd_load(a):
    n = a.clients
    results = [None] * n
    barrier = threading.Barrier(n + 1)

    def client(i):
        barrier.wait(timeout=60)
        results[i] = stream_chat(a.url, a.model, user(question(i)), a.tokens, timeout=a.timeout)

    samples, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            v = vmrss(a.rss_pid)
            if v is not None:
                samples.append(v)
            stop.wait(0.1)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    rss_thread = None
    if a.rss_pid:
        rss_thread = threading.Thread(target=sampler, daemon=True)
        rss_thread.start()
    barrier.wait(timeout=60)
    for t in threads:
        t.join(timeout=a.timeout + 30)
    stop.set()
    if rss_thread:
        rss_thread.join(timeout=5)
    done = [r for r in results if r is not None]
    errors = [r["error"] for r in done if r["error"]] + ["no answer"] * (n - len(done))
    ok = [r for r in done if not r["error"]]
    if not ok:
        sys.exit(f"bench-room: every {a.server} client failed at {n}: {errors[:3]}")
    t0 = min(r["t_send"] for r in done)
    t1 = max(r["t_done"] for r in done)
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok]
    per_client = [r["tokens"] / (r["t_done"] - r["t_send"]) for r in ok]
    decode = [(r["tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in ok
              if r["tokens"] > 1 and r["t_last"] > r["t_first"]]
    rec = {"kind": "load", "server": a.server, "clients": n, "tokens": tokens, "wall_s": t1 - t0,
           "agg_tok_s": tokens / (t1 - t0), "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
           "ttft_max": max(ttfts), "per_client_tok_s_median": median(per_client),
           "per_client_tok_s_min": min(per_client), "per_client_decode_tok_s_median": median(decode),
           "errors": len(errors), "error_samples": errors[:3],
           "completion_tokens_each": [r["tokens"] for r in ok],
           "texts": {str(i): r["text"] for i, r in enumerate(results) if r is not None and not r["error"]}}
    if a.rss_pid:
        rec["rss_samples"] = len(samples)
        rec["rss_peak"] = max(samples) if samples else None
    emit(a.out, **rec)
    print(f"  {a.server} x{n}: {tokens} tokens in {t1 - t0:.2f} s = {rec['agg_tok_s']:.1f} tok/s aggregate; "
          f"TTFT p50 {rec['ttft_p50']:.3f} s p95 {rec['ttft_p95']:.3f} s; per client "
          f"{rec['per_client_tok_s_median']:.1f} tok/s (decode {rec['per_client_decode_tok_s_median'] or 0:.1f})"
          + (f"; {len(errors)} errors: {errors[:2]}" if errors else "")
          + (f"; peak RSS {rec['rss_peak'] / 2**20:.0f} MiB" if rec.get("rss_peak") else ""), file=sys.stderr)


def cmd_alone(a):
    """Each prompt of the last load level of this server, alone, one after the other (greedy):
    batching must not change answers, so every text must equal its batched one."""
    level = [json.loads(l) for l in open(a.out) if l.strip()]
    level = [r for r in level if r["kind"] == "load" and r["server"] == a.server and r["clients"] == a.clients]
    if not level:
        sys.exit(f"bench-room: no {a.server} level {a.clients} to compare with")
    texts = level[-1]["texts"]
    same, diff = 0, []
    for i in range(a.clients):
        if str(i) not in texts:
            continue
        r = stream_chat(a.url, a.model, user(question(i)), a.tokens, timeout=a.timeout)
        if r["error"]:
            sys.exit(f"bench-room: {a.server} alone run of prompt {i} failed: {r['error']}")
        if r["text"] == texts[str(i)]:
            same += 1
        else:
            diff.append(i)
    emit(a.out, kind="alone", server=a.server, clients=a.clients, same=same, differ=diff)
    print(f"  {a.server}: {same} of {same + len(diff)} answers of the {a.clients}-client level are identical "
          f"run alone" + (f"; different: prompts {diff}" if diff else ""), file=sys.stderr)


def cmd_single(a):
    for label, temp, top_p, seed in (("t0", 0.0, None, None), ("t0.7", 0.7, 0.95, 42)):
        for run in range(a.runs):
            r = stream_chat(a.url, a.model, user(SINGLE_PROMPT), a.tokens, temp, top_p, seed, timeout=a.timeout)
            if r["error"]:
                sys.exit(f"bench-room: {a.server} single {label} run {run} failed: {r['error']}")
            gen = None
            if r["tokens"] > 1 and r["t_last"] > r["t_first"]:
                gen = (r["tokens"] - 1) / (r["t_last"] - r["t_first"])
            emit(a.out, kind="single", server=a.server, sampler=label, run=run, tokens=r["tokens"],
                 ttft=r["ttft"], gen_tok_s=gen, total_s=r["t_done"] - r["t_send"])
            print(f"  {a.server} single {label} run {run}: {r['tokens']} tokens, TTFT {r['ttft']:.3f} s, "
                  f"generation {gen or 0:.1f} tok/s", file=sys.stderr)


def kv_lookups(url):
    """shoal's KV lookups by tier and result from /metrics ({"disk hit": n, ...}), {} when unavailable."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    out = {}
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace") if resp.status == 200 else ""
    except (OSError, http.client.HTTPException):
        return out
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("shoal_kv_lookups_total{"):
            labels, _, value = line.partition("}")
            kv = dict(p.split("=", 1) for p in labels[len("shoal_kv_lookups_total{"):].split(",") if "=" in p)
            key = " ".join(kv[k].strip('"') for k in ("tier", "result") if k in kv)
            try:
                out[key] = out.get(key, 0) + float(value)
            except ValueError:
                pass
    return out


def cmd_restart(a):
    sysmsg = system_prompt(a.sys_words)
    q = RESTART_QUESTIONS[(a.run * 3 + ["cold", "restart", "hot"].index(a.phase)) % len(RESTART_QUESTIONS)]
    msgs = [{"role": "system", "content": sysmsg}, {"role": "user", "content": q}]
    r = stream_chat(a.url, a.model, msgs, 8, timeout=a.timeout)
    if r["error"]:
        sys.exit(f"bench-room: {a.server} restart-test {a.phase} failed: {r['error']}")
    lookups = kv_lookups(a.url) if a.server == "shoal" else {}
    emit(a.out, kind="restart", server=a.server, phase=a.phase, run=a.run, ttft=r["ttft"],
         prompt_tokens=r["prompt_tokens"], cached_tokens=r["cached_tokens"], tokens=r["tokens"],
         spawn_to_api_s=a.spawn_to_api, kv_lookups=lookups)
    print(f"  {a.server} {a.phase} run {a.run}: TTFT {r['ttft']:.3f} s, prompt {r['prompt_tokens']} tokens "
          f"({r['cached_tokens']} cached)" + (f", process start to API up {a.spawn_to_api:.3f} s"
                                               if a.spawn_to_api is not None else "")
          + (f"; KV lookups since start: {lookups}" if lookups else ""), file=sys.stderr)


def cmd_engine(a):
    """The raw engine's decode rate, `shoal generate` in-process (no HTTP, no chat template): the
    reference of the streamed single-client rate."""
    for run in range(a.runs):
        try:
            p = subprocess.run([a.shoal_bin, "generate", "--log", "shoal::cmd::infer=info", "--model", a.model_path,
                                "--threads", str(a.threads), "--max-tokens", str(a.tokens),
                                "--prompt", ENGINE_PROMPT], capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            sys.exit("bench-room: shoal generate timed out")
        log = re.sub(r"\x1b\[[0-9;]*m", "", p.stderr)
        m = re.search(r'gen_tok_per_s="?([0-9.]+)', log)
        g = re.search(r"generated=([0-9]+)", log)
        if p.returncode != 0 or not m:
            sys.exit(f"bench-room: shoal generate failed (status {p.returncode}): {log[-500:]}")
        if not g or int(g.group(1)) < 2:
            sys.exit(f"bench-room: shoal generate made fewer than 2 tokens: {log[-500:]}")
        emit(a.out, kind="engine", server="shoal", run=run, gen_tok_s=float(m.group(1)),
             tokens=int(g.group(1)) if g else None)
        print(f"  shoal raw engine (shoal generate) run {run}: {g.group(1) if g else '?'} tokens, "
              f"decode {float(m.group(1)):.1f} tok/s", file=sys.stderr)


def cmd_rss(a):
    v = vmrss(a.pid)
    if v is None:
        sys.exit(f"bench-room: no VmRSS for pid {a.pid}")
    emit(a.out, kind="rss", server=a.server, what=a.what, clients=a.clients, bytes=v)


def ratio(x, y):
    return None if x is None or y is None or y == 0 else x / y


def rnd(x, n=4):
    return None if x is None else round(x, n)


def cmd_report(a):
    rows = [json.loads(l) for l in open(a.out) if l.strip()]
    meta = json.loads(a.meta) if a.meta else {}
    out = {"bench": "room", **meta, "shoal": {}, "llama": {}, "ratios": {}, "goals": {}}
    lines = []
    servers = [s for s in ("shoal", "llama") if any(r["server"] == s for r in rows)]
    for s in servers:
        levels = {}
        for r in rows:
            if r["kind"] == "load" and r["server"] == s:
                levels[str(r["clients"])] = {k: rnd(r.get(k)) for k in (
                    "agg_tok_s", "ttft_p50", "ttft_p95", "ttft_max", "per_client_tok_s_median",
                    "per_client_tok_s_min", "per_client_decode_tok_s_median", "wall_s")}
                levels[str(r["clients"])].update(tokens=r["tokens"], errors=r["errors"])
                if r.get("rss_peak"):
                    levels[str(r["clients"])]["rss_peak"] = r["rss_peak"]
        out[s]["levels"] = levels
        single = {}
        for label in ("t0", "t0.7"):
            g = [r["gen_tok_s"] for r in rows if r["kind"] == "single" and r["server"] == s
                 and r["sampler"] == label and r["gen_tok_s"]]
            single[label] = {"gen_tok_s_median": rnd(median(g), 2), "runs": [rnd(x, 2) for x in g]}
        single["ratio_t07_t0"] = rnd(ratio(single["t0.7"]["gen_tok_s_median"], single["t0"]["gen_tok_s_median"]))
        eng = [r["gen_tok_s"] for r in rows if r["kind"] == "engine" and r["server"] == s]
        if eng:
            single["engine_tok_s_median"] = rnd(median(eng), 2)
            single["engine_runs"] = eng
            single["ratio_t0_engine"] = rnd(ratio(single["t0"]["gen_tok_s_median"], median(eng)))
            single["ratio_t07_engine"] = rnd(ratio(single["t0.7"]["gen_tok_s_median"], median(eng)))
        out[s]["single"] = single
        rest = {}
        for ph in ("cold", "restart", "hot"):
            rr = [r for r in rows if r["kind"] == "restart" and r["server"] == s and r["phase"] == ph]
            if rr:
                rest[ph] = {"ttft_median": rnd(median([r["ttft"] for r in rr])),
                            "ttft_runs": [rnd(r["ttft"]) for r in rr],
                            "prompt_tokens": rr[-1]["prompt_tokens"], "cached_tokens": rr[-1]["cached_tokens"],
                            "kv_lookups": rr[-1].get("kv_lookups") or {}}
                sp = [r["spawn_to_api_s"] for r in rr if r.get("spawn_to_api_s") is not None]
                if sp:
                    rest[ph]["spawn_to_api_median"] = rnd(median(sp))
        if "cold" in rest and "restart" in rest:
            rest["ratio_restart_cold"] = rnd(ratio(rest["restart"]["ttft_median"], rest["cold"]["ttft_median"]))
        out[s]["restart"] = rest
        al = [r for r in rows if r["kind"] == "alone" and r["server"] == s]
        if al:
            out[s]["alone"] = {"clients": al[-1]["clients"], "same": al[-1]["same"], "differ": al[-1]["differ"]}
        idle = [r for r in rows if r["kind"] == "rss" and r["server"] == s and r["what"] == "idle"]
        if idle:
            i = idle[-1]
            peak = levels.get(str(i["clients"]), {}).get("rss_peak")
            out[s]["rss"] = {"clients": i["clients"], "idle": i["bytes"], "peak": peak,
                             "peak_minus_idle": None if peak is None else peak - i["bytes"]}

    sh, ll = out["shoal"], out["llama"]
    if sh and ll:
        for n in sh.get("levels", {}):
            if n in ll.get("levels", {}):
                x, y = sh["levels"][n], ll["levels"][n]
                out["ratios"][f"agg_tok_s_{n}"] = rnd(ratio(x["agg_tok_s"], y["agg_tok_s"]))
                out["ratios"][f"ttft_p50_{n}"] = rnd(ratio(x["ttft_p50"], y["ttft_p50"]))
                out["ratios"][f"ttft_p95_{n}"] = rnd(ratio(x["ttft_p95"], y["ttft_p95"]))
                if int(n) > 1:
                    out["goals"][f"agg_tok_s_{n}_ge_1.2x"] = out["ratios"][f"agg_tok_s_{n}"] >= 1.2
                    out["goals"][f"ttft_p50_{n}_le"] = out["ratios"][f"ttft_p50_{n}"] <= 1.0
                    out["goals"][f"ttft_p95_{n}_le"] = out["ratios"][f"ttft_p95_{n}"] <= 1.0
        for label in ("t0", "t0.7"):
            out["ratios"][f"single_{label}"] = rnd(ratio(sh["single"][label]["gen_tok_s_median"],
                                                       ll["single"][label]["gen_tok_s_median"]))
        c1, c2 = sh.get("restart", {}).get("cold"), ll.get("restart", {}).get("cold")
        if c1 and c2:
            out["ratios"]["cold_ttft"] = rnd(ratio(c1["ttft_median"], c2["ttft_median"]))
    if sh:
        r = sh["single"]["ratio_t07_t0"]
        if r is not None:
            out["goals"]["single_t07_ge_0.95x_t0"] = r >= 0.95
        r = sh["single"].get("ratio_t07_engine")
        if r is not None:
            out["goals"]["single_t07_ge_0.9x_engine"] = r >= 0.9
        rr = sh.get("restart", {}).get("ratio_restart_cold")
        if rr is not None:
            out["goals"]["restart_le_0.03x_cold"] = rr <= 0.03
        al = sh.get("alone")
        if al:
            out["goals"]["batched_equals_alone"] = not al["differ"]
        rss = sh.get("rss")
        if rss and rss.get("peak_minus_idle") is not None and meta.get("kv_budget_set"):
            out["goals"]["rss_growth_within_kv_budget"] = rss["peak_minus_idle"] <= meta["kv_budget_bytes"]

    # Human-readable summary.
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    lines.append(f"room benchmark, {meta.get('date', '?')}, load at start {meta.get('loadavg', '?')}, "
                 f"threads {meta.get('threads')}, max_tokens {meta.get('tokens')}"
                 + ("" if meta.get("parallel_set", True) else ", inference.parallel not set (no such key)"))
    lines.append("| clients | shoal tok/s | llama tok/s | ratio | shoal TTFT p50/p95 s | llama TTFT p50/p95 s "
                 "| shoal per-client tok/s | llama per-client tok/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    ns = sorted({int(n) for s in servers for n in out[s]["levels"]})
    for n in ns:
        x, y = sh.get("levels", {}).get(str(n), {}), ll.get("levels", {}).get(str(n), {})
        lines.append(f"| {n} | {f(x.get('agg_tok_s'))} | {f(y.get('agg_tok_s'))} "
                     f"| {f(out['ratios'].get(f'agg_tok_s_{n}'), '{:.2f}x')} "
                     f"| {f(x.get('ttft_p50'), '{:.3f}')} / {f(x.get('ttft_p95'), '{:.3f}')} "
                     f"| {f(y.get('ttft_p50'), '{:.3f}')} / {f(y.get('ttft_p95'), '{:.3f}')} "
                     f"| {f(x.get('per_client_tok_s_median'))} | {f(y.get('per_client_tok_s_median'))} |")
    for s in servers:
        sg = out[s]["single"]
        lines.append(f"{s} single client, generation tok/s (median of runs): t0 {f(sg['t0']['gen_tok_s_median'])}, "
                     f"t0.7/top_p 0.95 {f(sg['t0.7']['gen_tok_s_median'])}, ratio t0.7/t0 "
                     f"{f(sg['ratio_t07_t0'], '{:.3f}')}"
                     + (f"; raw engine (shoal generate, greedy) {sg['engine_tok_s_median']:.1f} tok/s, "
                        f"t0/engine {f(sg['ratio_t0_engine'], '{:.3f}')}, t0.7/engine {f(sg['ratio_t07_engine'], '{:.3f}')}"
                        if sg.get("engine_tok_s_median") else ""))
    for s in servers:
        rs = out[s].get("restart", {})
        if "cold" in rs:
            txt = (f"{s} ~{rs['cold']['prompt_tokens']}-token prompt, 8 tokens: cold TTFT "
                   f"{rs['cold']['ttft_median']:.3f} s")
            if "restart" in rs:
                txt += (f"; after a restart {rs['restart']['ttft_median']:.3f} s "
                        f"({rs['restart']['cached_tokens']} tokens cached), ratio {rs['ratio_restart_cold']:.4f}"
                        + (f"; daemon start to API up {rs['restart']['spawn_to_api_median']:.3f} s"
                           if rs["restart"].get("spawn_to_api_median") is not None else ""))
            if "hot" in rs:
                txt += f"; the next request (model loaded, blocks in RAM) {rs['hot']['ttft_median']:.3f} s"
            lines.append(txt)
    for s in servers:
        rss = out[s].get("rss")
        if rss:
            lines.append(f"{s} RSS at {rss['clients']} clients: idle {rss['idle'] / 2**20:.0f} MiB, peak "
                         f"{f(rss['peak'] and rss['peak'] / 2**20, '{:.0f}')} MiB, peak - idle "
                         f"{f(rss['peak_minus_idle'] and rss['peak_minus_idle'] / 2**20, '{:.0f}')} MiB"
                         + ((f" (inference.kv_budget {meta.get('kv_budget')})" if meta.get("kv_budget_set")
                             else " (inference.kv_budget not set: this shoal has no such key)")
                            if s == "shoal" else ""))
    for s in servers:
        al = out[s].get("alone")
        if al:
            lines.append(f"{s}: {al['same']} of {al['same'] + len(al['differ'])} greedy answers of the "
                         f"{al['clients']}-client level identical to the same request alone"
                         + (f" (different: prompts {al['differ']})" if al["differ"] else ""))
    if out["goals"]:
        lines.append("goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out["goals"].items()))
    print("\n".join(lines))
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["warm", "load", "alone", "single", "engine", "restart", "rss", "report"])
    p.add_argument("--url")
    p.add_argument("--model", default="default")
    p.add_argument("--out", required=True)
    p.add_argument("--server", default="shoal")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--rss-pid", type=int)
    p.add_argument("--pid", type=int)
    p.add_argument("--what", default="idle")
    p.add_argument("--phase", choices=["cold", "restart", "hot"], default="cold")
    p.add_argument("--run", type=int, default=0)
    p.add_argument("--sys-words", type=int, default=860)
    p.add_argument("--spawn-to-api", type=float)
    p.add_argument("--meta")
    p.add_argument("--shoal-bin")
    p.add_argument("--model-path")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    {"warm": cmd_warm, "load": cmd_load, "alone": cmd_alone, "engine": cmd_engine, "single": cmd_single, "restart": cmd_restart, "rss": cmd_rss,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
