#!/usr/bin/env python3
"""Load client of the routing scenarios of scripts/testnet.sh (issue 19).

Python standard library only (threads, http.client, a streaming SSE parser).
Each node's API listens on the loopback of its own network namespace, so each
worker thread enters the namespace of the node it talks to (setns(2) on a
/run/netns/NAME file, which moves the calling thread only) before it opens
its socket; without --node NETNS parts it talks to the given host directly.

  route-client.py run --node LABEL=NETNS[@HOST:PORT] ... --model M [options]
  route-client.py prompt --words W --variant V     (prints the system prompt)

`run` sends streamed /v1/chat/completions requests. Clients are spread
round-robin over the --node list (client c asks node c mod len); each client
sends --requests requests one after the other, or keeps sending until
--duration seconds have passed (--ramp S spreads the clients' starts over
S seconds; by default they all start at once). Every request is bounded by --timeout and the
whole run by --deadline: a request still open at the deadline is cut and
counted as a hang. It prints one JSON line per request:

  {"i", "client", "node", "status", "served_by", "served_by_chunk",
   "forwarded_by", "ttft", "tokens", "finish", "done", "error",
   "error_event", "elapsed", "prompt_tokens", "cached_tokens",
   "token_at_kill", "hang", "events"}

(served_by: the X-Shoal-Served-By header, else x-shoal-node; served_by_chunk: the "served_by"
field of the first chunk; events: SSE data events received, a first
chunk without content included), then one line `SUMMARY {json}` with the counts,
the aggregate tok/s, TTFT median/p95, who served how many (and
served_mismatch: answers whose header and first chunk name different nodes), the queue samples
(--sample LABEL=NETNS[@HOST:PORT], every --sample-ms: shoal_queue_depth of
the node's models from /metrics; with two samplers the max and mean of |a - b|) and
the tok/s of the steady state (window_tok_s: content chunks that arrived
between the end of --ramp and --duration, with --duration) and
the kill (--kill PEER=PID ...: once --kill-after requests have their first
token, SIGKILL the PID of the peer serving most requests so far).
"""

import argparse
import ctypes
import http.client
import json
import os
import signal
import statistics
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = None


def enter_netns(path):
    """Moves the calling thread into the network namespace at `path`."""
    global _libc
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        else:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


def parse_node(spec):
    """LABEL=NETNS[@HOST:PORT] or LABEL=@HOST:PORT -> (label, netns path or None, host, port)."""
    label, _, rest = spec.partition("=")
    ns, _, addr = rest.partition("@")
    host, _, port = (addr or "127.0.0.1:7070").rpartition(":")
    path = None
    if ns:
        path = ns if ns.startswith("/") else f"/run/netns/{ns}"
    return label, path, host or "127.0.0.1", int(port)


# Short questions; each asks for an explanation long enough to fill the tokens asked for.
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
SUBJECTS = ["a farmer", "a sailor", "a child", "a teacher", "a baker", "an engineer", "a pilot",
            "a painter", "a nurse", "a miner", "a poet", "a judge"]


def question(i):
    """Distinct question number i (past the list: the list again, for another listener)."""
    q = QUESTIONS[i % len(QUESTIONS)]
    k = i // len(QUESTIONS)
    return q if k == 0 else f"{q} Answer as if talking to {SUBJECTS[(k - 1) % len(SUBJECTS)]} (#{k})."


def system_prompt(words, variant=0):
    """A deterministic house-rules system prompt of about `words` words (~1.3 tokens each).

    Variants share the template and the length but no text beyond the first
    words: a different library, other topics, places and numbers, so no
    prefix block (16 tokens) of one is a prefix block of another.
    """
    libraries = ["Harbor Street", "Mill Lane", "North Quay", "Cedar Hill", "Old Market", "River Gate"]
    topics = ["opening hours", "borrowing books", "quiet rooms", "printing", "lost cards", "late returns",
              "group study", "rare maps", "children's corner", "music scores", "reading glasses",
              "umbrella stands", "coffee cups", "wireless network", "microfilm", "donations"]
    acts = ["explain the rule kindly", "give the exact number of days", "name the desk to visit",
            "offer a short apology", "suggest a nearby alternative", "mention the posted sign",
            "ask one clarifying question", "thank the visitor for asking"]
    places = ["east wing", "second floor", "garden room", "front hall", "basement archive", "tower stair"]
    lib = libraries[variant % len(libraries)]
    out = [f"{lib} public library, variant {variant}: you are its assistant. Follow these house rules."]
    n, i = len(out[0].split()), 0
    while n < words:
        j = i + 7 * variant
        s = (f"Rule {i + 1}: when a visitor asks about {topics[j % len(topics)]} in the "
             f"{places[(j * 5) % len(places)]}, {acts[(j * 3) % len(acts)]}, keep the answer under "
             f"{40 + (j * 7) % 60} words, and never invent a fee of {(j * 13 + variant) % 9 + 1} coins.")
        out.append(s)
        n += len(s.split())
        i += 1
    return " ".join(out)


def median(v):
    return statistics.median(v) if v else None


def rnd(x, n=4):
    return None if x is None else round(x, n)


def percentile(values, p):
    v = sorted(values)
    if not v:
        return None
    k = max(1, -(-len(v) * p // 100))
    return v[int(k) - 1]


class Run:
    """Shared state of one run: results, first-token count, the kill."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.results = []
        self.live = {}  # i -> result dict of requests in flight
        self.first_tokens = 0
        self.killed = None
        self.kill_at = None
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline
        self.stop = threading.Event()

    def maybe_kill(self):
        """Under the lock: SIGKILL the holder serving most requests once enough have a token."""
        a = self.args
        if not a.kill or self.killed is not None or self.first_tokens < a.kill_after:
            return
        pids = dict(k.split("=", 1) for k in a.kill)
        count = {}
        for r in list(self.live.values()) + self.results:
            who = r.get("served_by_chunk") or r.get("served_by")
            if who in pids:
                count[who] = count.get(who, 0) + 1
        if not count:
            return
        victim = max(sorted(count), key=lambda p: count[p])
        try:
            os.kill(int(pids[victim]), signal.SIGKILL)
        except OSError as e:
            print(f"route-client: kill {victim} ({pids[victim]}): {e}", file=sys.stderr)
        self.killed = victim
        self.kill_at = time.monotonic() - self.t0
        for r in list(self.live.values()):
            r["token_at_kill"] = r["ttft"] is not None
        for r in self.results:
            r["token_at_kill"] = r["ttft"] is not None
        print(f"route-client: SIGKILL {victim} (pid {pids[victim]}) at {self.kill_at:.2f}s, "
              f"serving counts {count}", file=sys.stderr)


def one_request(run, conn_factory, i, client, label, messages):
    """One streamed chat request; returns its result dict (never raises)."""
    a = run.args
    r = {"i": i, "client": client, "node": label, "status": None, "served_by": None,
         "served_by_chunk": None, "forwarded_by": None, "ttft": None, "tokens": 0, "finish": None,
         "done": False, "error": None, "error_event": False, "elapsed": None, "prompt_tokens": None,
         "cached_tokens": None, "token_at_kill": None, "hang": False, "events": 0, "_times": []}
    body = {"model": a.model, "messages": messages, "max_tokens": a.tokens, "temperature": a.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    for h in a.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    t_send = time.monotonic()
    # A request may not outlive its own timeout nor the run's deadline.
    limit = min(t_send + a.timeout, run.deadline)
    with run.lock:
        run.live[i] = r
    conn = None
    try:
        # One blocking read may last until the bound; past it the request is a hang.
        conn = conn_factory(max(0.5, limit - t_send))
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        r["status"] = resp.status
        # X-Shoal-Served-By (issue 19); x-shoal-node (the node that ran the
        # model; a forwarded answer passes the server's x-shoal-* headers) when absent.
        r["served_by"] = resp.getheader("x-shoal-served-by") or resp.getheader("x-shoal-node")
        r["forwarded_by"] = resp.getheader("x-shoal-forwarded-by")
        if resp.status != 200:
            r["error"] = f"HTTP {resp.status}: {resp.read(300).decode('utf-8', 'replace')}"
            return r
        with run.lock:
            run.maybe_kill()
        first_chunk = True
        while True:
            if time.monotonic() > limit:
                r["error"], r["hang"] = "timeout (request bound)", True
                break
            line = resp.readline()
            if not line:
                if not r["done"] and r["error"] is None:
                    r["error"] = "stream closed before [DONE]"
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                r["done"] = True
                break
            try:
                c = json.loads(payload)
            except ValueError:
                continue
            r["events"] += 1
            if first_chunk:
                first_chunk = False
                r["served_by_chunk"] = c.get("served_by")
            if "error" in c:
                e = c["error"]
                r["error"] = e.get("message", str(e)) if isinstance(e, dict) else str(e)
                r["error_event"] = True
                continue
            if c.get("usage"):
                u = c["usage"]
                r["prompt_tokens"] = u.get("prompt_tokens")
                r["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
                r["usage_tokens"] = u.get("completion_tokens")
            for ch in c.get("choices") or []:
                if ch.get("finish_reason"):
                    r["finish"] = ch["finish_reason"]
                content = (ch.get("delta") or {}).get("content")
                if content:
                    r["tokens"] += 1
                    r["_times"].append(time.monotonic() - run.t0)
                    if r["ttft"] is None:
                        r["ttft"] = time.monotonic() - t_send
                        with run.lock:
                            run.first_tokens += 1
                            run.maybe_kill()
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() >= limit - 0.01:
            r["hang"] = True
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        if conn is not None:
            conn.close()
        r["elapsed"] = rnd(time.monotonic() - t_send)
        r["ttft"] = rnd(r["ttft"])
        if r.get("usage_tokens"):
            r["tokens"] = r.pop("usage_tokens")
        else:
            r.pop("usage_tokens", None)
        if r["status"] == 200 and r["error"] is None and (not r["done"] or r["finish"] is None):
            r["error"] = "no finish_reason" if r["done"] else "no [DONE]"
        with run.lock:
            run.live.pop(i, None)
            if run.killed is not None and r["token_at_kill"] is None:
                # Finished after the kill without having been live at it: it started after.
                r["token_at_kill"] = False
    return r


def client_loop(run, c, node, counter):
    a = run.args
    label, path, host, port = node
    if path:
        enter_netns(path)

    def factory(timeout):
        return http.client.HTTPConnection(host, port, timeout=timeout)

    system = system_prompt(a.system_words, a.system_variant) if a.system_words else None
    # --ramp: client c starts c/clients of the ramp after the others' start.
    if a.ramp > 0:
        time.sleep(a.ramp * c / max(1, a.clients))
    k = 0
    end = run.t0 + a.duration if a.duration else None
    while not run.stop.is_set():
        if a.requests and k >= a.requests:
            break
        if end is not None and time.monotonic() >= end:
            break
        if time.monotonic() >= run.deadline:
            break
        with run.lock:
            i = counter[0]
            counter[0] += 1
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question(a.question_offset + i)}]
        r = one_request(run, factory, i, c, label, msgs)
        with run.lock:
            run.results.append(r)
            print(json.dumps({k2: v for k2, v in r.items() if k2 != "_times"}), flush=True)
        k += 1
        if r["error"] is not None:
            # A failing node answers at once: do not turn the run into a flood.
            time.sleep(0.25)


def sampler_loop(run, node, samples):
    a = run.args
    label, path, host, port = node
    if path:
        enter_netns(path)
    k = 0
    while not run.stop.is_set() and time.monotonic() < run.deadline:
        t = run.t0 + k * a.sample_ms / 1000
        d = t - time.monotonic()
        if d > 0:
            time.sleep(d)
        v = None
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode("utf-8", "replace")
            conn.close()
            # Requests waiting or running, summed over the node's models (one here).
            v = 0.0
            for line in text.splitlines():
                if line.startswith("shoal_queue_depth{"):
                    v += float(line.split()[-1])
        except (OSError, http.client.HTTPException, ValueError):
            v = None
        samples.append((k, v))
        k += 1


def summarize(run, sample_sets):
    a = run.args
    res = sorted(run.results, key=lambda r: r["i"])
    ok = [r for r in res if r["status"] == 200 and r["error"] is None]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    toks = sum(r["tokens"] for r in ok)
    # The load's wall time: from the start to the last answer.
    wall = run.wall
    served = {}
    for r in ok:
        who = r["served_by_chunk"] or r["served_by"] or "?"
        served[who] = served.get(who, 0) + 1
    # The header and the first chunk must name the same node.
    mismatch = sum(1 for r in ok if r["served_by_chunk"] and r["served_by"]
                   and r["served_by_chunk"] != r["served_by"])
    s = {"requests": len(res), "ok": len(ok), "failed": len(res) - len(ok), "served_mismatch": mismatch,
         "hangs": sum(1 for r in res if r["hang"]), "error_events": sum(1 for r in res if r["error_event"]),
         "statuses": {}, "tokens": toks, "wall_s": round(wall, 3),
         "tok_s": round(toks / wall, 2) if wall > 0 else None,
         "ttft_median": rnd(median(ttfts)), "ttft_p95": rnd(percentile(ttfts, 95)),
         "ttft_min": rnd(min(ttfts) if ttfts else None), "served": served,
         "killed": run.killed, "kill_at_s": run.kill_at}
    if a.duration and a.duration > a.ramp:
        # Steady state: content chunks that arrived between the end of the ramp
        # and --duration (every client busy), over that window.
        n = sum(1 for r in ok for t in r["_times"] if a.ramp <= t <= a.duration)
        s["window_tok_s"] = round(n / (a.duration - a.ramp), 2)
    for r in res:
        s["statuses"][str(r["status"])] = s["statuses"].get(str(r["status"]), 0) + 1
    if sample_sets:
        per = {}
        for label, samples in sample_sets.items():
            vals = [v for _, v in samples if v is not None]
            per[label] = {"n": len(samples), "missing": sum(1 for _, v in samples if v is None),
                          "mean": round(statistics.mean(vals), 3) if vals else None,
                          "max": max(vals) if vals else None}
        s["load"] = per
        if len(sample_sets) == 2:
            (_, x), (_, y) = sample_sets.items()
            dx, dy = dict(x), dict(y)
            diffs = [abs(dx[k] - dy[k]) for k in dx if dx[k] is not None and dy.get(k) is not None]
            # Only while the load runs: both queues empty at the end says nothing.
            busy = [abs(dx[k] - dy[k]) for k in dx
                    if dx[k] is not None and dy.get(k) is not None and (dx[k] or dy[k])]
            s["load_diff_max"] = max(busy) if busy else (max(diffs) if diffs else None)
            s["load_diff_mean"] = round(statistics.mean(busy), 3) if busy else None
            s["load_samples_busy"] = len(busy)
    return s


def cmd_run(a):
    nodes = [parse_node(n) for n in a.node]
    if not nodes:
        sys.exit("route-client: no --node")
    if not a.requests and not a.duration:
        a.requests = 1
    run = Run(a)
    counter = [0]
    sample_sets = {}
    samplers = []
    for spec in a.sample:
        node = parse_node(spec)
        sample_sets[node[0]] = []
        t = threading.Thread(target=sampler_loop, args=(run, node, sample_sets[node[0]]), daemon=True)
        t.start()
        samplers.append(t)
    threads = []
    for c in range(a.clients):
        t = threading.Thread(target=client_loop, args=(run, c, nodes[c % len(nodes)], counter), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        # Every request is bounded by the deadline; a thread past it (+ slack) is a hang.
        t.join(max(0.0, run.deadline - time.monotonic()) + 5)
    run.wall = time.monotonic() - run.t0
    run.stop.set()
    for t in samplers:
        t.join(3)
    with run.lock:
        for i, r in list(run.live.items()):
            r["hang"], r["error"] = True, "still open after the deadline"
            run.results.append(r)
            print(json.dumps({k2: v for k2, v in r.items() if k2 != "_times"}), flush=True)
        run.live.clear()
    s = summarize(run, sample_sets)
    print("SUMMARY " + json.dumps(s), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="send streamed chat requests")
    r.add_argument("--node", action="append", default=[], help="LABEL=NETNS[@HOST:PORT] (repeatable)")
    r.add_argument("--model", required=True)
    r.add_argument("--clients", type=int, default=1)
    r.add_argument("--requests", type=int, default=0, help="requests per client")
    r.add_argument("--duration", type=float, default=0, help="seconds to keep sending (per client)")
    r.add_argument("--tokens", type=int, default=64, help="max_tokens")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--system-words", type=int, default=0, help="a system prompt of about W words")
    r.add_argument("--system-variant", type=int, default=0)
    r.add_argument("--ramp", type=float, default=0, help="spread the clients' starts over this many seconds")
    r.add_argument("--question-offset", type=int, default=0, help="first question number")
    r.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    r.add_argument("--timeout", type=float, default=120, help="bound of one request, seconds")
    r.add_argument("--deadline", type=float, default=600, help="bound of the whole run, seconds")
    r.add_argument("--sample", action="append", default=[], help="LABEL=NETNS[@HOST:PORT]: queue sampler")
    r.add_argument("--sample-ms", type=float, default=200)
    r.add_argument("--kill", action="append", default=[], help="PEER=PID: candidates of the kill")
    r.add_argument("--kill-after", type=int, default=1, help="first tokens seen before the kill")
    pr = sub.add_parser("prompt", help="print a system prompt")
    pr.add_argument("--words", type=int, default=750)
    pr.add_argument("--variant", type=int, default=0)
    a = p.parse_args()
    if a.cmd == "prompt":
        print(system_prompt(a.words, a.variant))
        return 0
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
