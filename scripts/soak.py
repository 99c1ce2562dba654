#!/usr/bin/env python3
"""Hostile-classroom soak test of a real shoal node (driven by scripts/soak.sh).

Runs classes of hostile inputs against real `shoal` daemons on loopback
(mDNS off, offline, static ports) and real data directories, and prints one
line per class:

    CLASS  tried=N panics=0 hangs=0 data-loss=0 wrong=0  (notes)

- panics: a daemon or CLI that panicked or died of a signal;
- hangs: a request or command that did not end within its bound;
- data-loss: model bytes that can no longer be found (objects/ or lost+found/);
- wrong: an answer that is not the right one (a hostile request served,
  a corrupt model answering 200, greedy text that differs cold and cached,
  a 5xx for a malformed request, ...).

Exit status 0 only when every count but `tried` is zero. Nothing leaves
loopback. The whole run is bounded (--budget seconds, default 600): classes
that would start after the budget is spent are reported as skipped, and the
run then fails.

usage: soak.py --bin target/release/shoal --model demo.gguf [--short] [--work DIR]
"""
import argparse
import hashlib
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

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "soak:demo"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def file_hash(path):
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class Tally:
    def __init__(self, name):
        self.name = name
        self.tried = 0
        self.panics = 0
        self.hangs = 0
        self.loss = 0
        self.wrong = 0
        self.notes = []
        self.skipped = False

    def bad(self):
        return self.panics + self.hangs + self.loss + self.wrong > 0 or self.skipped

    def line(self):
        s = (f"{self.name:<16} tried={self.tried:<4} panics={self.panics} hangs={self.hangs} "
             f"data-loss={self.loss} wrong={self.wrong}")
        if self.skipped:
            s += "  SKIPPED (time budget spent)"
        if self.notes:
            s += "  (" + "; ".join(self.notes[:6]) + (" ..." if len(self.notes) > 6 else "") + ")"
        return s


class Node:
    """A `shoal serve` daemon on loopback with its own data directory."""

    def __init__(self, soak, data, extra_config=""):
        self.soak = soak
        self.data = data
        self.api_port = free_port()
        self.p2p_port = free_port()
        self.proc = None
        self.log_path = data + ".log"
        self.config = data + ".toml"
        with open(self.config, "w") as f:
            f.write("version = 1\n" + extra_config)

    def start(self, wait=60):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.soak.bin, "--config", self.config, "--data-dir", self.data, "--log", "info",
             "serve", "--no-mdns", "--offline",
             "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p_port}",
             "--api", f"127.0.0.1:{self.api_port}"],
            stdout=subprocess.DEVNULL, stderr=log, env=self.soak.env)
        log.close()
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited at start with {self.proc.returncode}; see {self.log_path}")
            try:
                st, _, _ = self.request("GET", "/v1/models", timeout=2)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node did not answer within {wait} s; see {self.log_path}")

    def token(self):
        p = os.path.join(self.data, "admin.token")
        try:
            with open(p) as f:
                return f.read().strip()
        except OSError:
            return None

    def request(self, method, path, body=None, headers=None, timeout=30, auth=True):
        h = {}
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        tok = self.token() if auth else None
        if tok and path.startswith("/admin"):
            h["Authorization"] = f"Bearer {tok}"
        h.update(headers or {})
        c = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data
        finally:
            c.close()

    def chat(self, content, max_tokens=24, model=NAME, timeout=60, system=None, stream=False):
        msgs = []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": content})
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        st, h, data = self.request("POST", "/v1/chat/completions", body, timeout=timeout)
        text = None
        if st == 200 and not stream:
            try:
                text = json.loads(data)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                text = None
        return st, text, data

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pid(self):
        return self.proc.pid

    def stop(self, timeout=30):
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "hung"

    def kill9(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def panicked(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().count(b"panicked at")
        except OSError:
            return 0


class Soak:
    def __init__(self, args):
        self.bin = os.path.abspath(args.bin)
        self.model = os.path.abspath(args.model)
        self.short = args.short
        self.work = args.work or tempfile.mkdtemp(prefix="shoal-soak.")
        os.makedirs(self.work, exist_ok=True)
        self.budget_end = time.time() + args.budget
        self.env = dict(os.environ)
        self.env.pop("SHOAL_CONFIG", None)
        self.env["SHOAL_LOG"] = "info"
        self.results = []
        self.variants = {}

    # ---- helpers -------------------------------------------------------------

    def cli(self, data, *args, timeout=300):
        try:
            p = subprocess.run([self.bin, "--data-dir", data, *args], capture_output=True,
                               timeout=timeout, env=self.env)
            return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            return "hung", "", ""

    def variant(self, key, value, tag):
        """A copy of the demo model with one metadata string changed (a new artifact id)."""
        path = os.path.join(self.work, f"variant-{tag}.gguf")
        if not os.path.exists(path):
            subprocess.run([sys.executable, os.path.join(HERE, "gguf-meta.py"), self.model, path,
                            key, value], check=True)
        return path

    def new_store(self, tag, name=NAME):
        data = os.path.join(self.work, tag)
        shutil.rmtree(data, ignore_errors=True)
        rc, out, err = self.cli(data, "add", self.model, "--name", name)
        if rc != 0:
            raise RuntimeError(f"shoal add failed: {err}")
        return data, out.strip().split()[-1]

    def object_bytes(self, data):
        """Hashes of every object file under objects/ and lost+found/."""
        found = set()
        for sub in ("objects", "lost+found"):
            d = os.path.join(data, sub)
            if not os.path.isdir(d):
                continue
            for root, _, files in os.walk(d):
                for fn in files:
                    try:
                        found.add(file_hash(os.path.join(root, fn)))
                    except OSError:
                        pass
        return found

    def check_cli(self, t, res, what):
        rc = res[0]
        if rc == "hung":
            t.hangs += 1
            t.notes.append(f"{what} hung")
        elif isinstance(rc, int) and rc < 0:
            t.panics += 1
            t.notes.append(f"{what} died of signal {-rc}")
        elif "panicked at" in res[2]:
            t.panics += 1
            t.notes.append(f"{what} panicked")

    def finish_node(self, t, node):
        alive = node.alive()
        rc = node.stop()
        if not alive:
            t.panics += 1
            t.notes.append(f"daemon died ({node.proc.returncode})")
        elif rc == "hung":
            t.hangs += 1
            t.notes.append("SIGTERM did not stop the daemon")
        n = node.panicked()
        if n:
            t.panics += n
            t.notes.append(f"{n} panic(s) in the daemon log")

    # ---- classes -------------------------------------------------------------

    def class_http(self):
        """Malformed requests to every route: no 5xx but 503/429, no panic, no hang."""
        t = Tally("http-malformed")
        data, mid = self.new_store("http")
        node = Node(self, data)
        node.start()
        huge = "x" * 70000
        bodies = [
            b"", b"{", b"null", b"[]", b"123", b'"x"', b"\xff\xfe\xfd", b"{}",
            b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
            json.dumps({"model": huge}).encode(),
            json.dumps({"model": huge, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            json.dumps({"artifact": huge}).encode(),
            json.dumps({"artifact": "0" * 64}).encode(),
            json.dumps({"id": huge, "pinned": False}).encode(),
            json.dumps({"model": NAME, "messages": "hi"}).encode(),
            json.dumps({"model": NAME, "messages": []}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": None}], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user"}], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "abc"}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": -5}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1e308}).encode(),
            b'{"model":"' + NAME.encode() + b'","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":NaN}',
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "top_p": 2}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 100000}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stop": ["x"] * 10000}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": "yes"}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logit_bias": {"999999999": 100}}).encode(),
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "\u0000\ud7ff" * 250}], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "prompt": ["a", "b"], "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "prompt": "", "max_tokens": 4}).encode(),
            json.dumps({"model": NAME, "prompt": "a" * 600000, "max_tokens": 4}).encode(),
            json.dumps({"model": mid.upper(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode(),
            json.dumps({"name": huge, "id": mid, "seq": -1, "sig": "zz"}).encode(),
            b"x" * (3 << 20),
        ]
        routes = ["/v1/chat/completions", "/v1/completions", "/admin/pull", "/admin/pin",
                  "/admin/releases"]
        gets = ["/v1/models/" + huge[:60000], "/admin/pull/" + "zz" * 40, "/admin/manifest/" + huge[:8000],
                "/admin/pull/" + "0" * 64, "/v1/models/%ff%fe", "/dashboard/../../etc/passwd",
                "/admin/manifest/" + mid[:8]]
        cases = [(r, b) for r in routes for b in bodies] + [(g, None) for g in gets]
        random.Random(7).shuffle(cases)
        for path, body in cases:
            if not node.alive():
                break
            t.tried += 1
            method = "GET" if body is None else "POST"
            hdrs = {} if body is None else {"Content-Type": "application/json"}
            try:
                st, _, _ = node.request(method, path, body, headers=hdrs, timeout=60)
            except socket.timeout:
                t.hangs += 1
                t.notes.append(f"{method} {path[:22]} {body[:60] if body else b''} hung")
                continue
            except (ConnectionError, http.client.HTTPException):
                # A refused oversized body may close the connection early.
                if not node.alive():
                    break
                continue
            if st >= 500 and st not in (503, 429):
                t.wrong += 1
                t.notes.append(f"{st} for {method} {path[:24]} {body[:24] if body else b''}")
        # The node still serves after all that.
        st, text, _ = node.chat("Say hi.", max_tokens=4)
        if st != 200 or not text:
            t.wrong += 1
            t.notes.append(f"node no longer serves ({st})")
        self.finish_node(t, node)
        # The CLI with a huge argument.
        for args in (["show", "x" * 70000], ["pin", "x" * 70000], ["rm", "y" * 70000]):
            t.tried += 1
            res = self.cli(data, *args, timeout=60)
            self.check_cli(t, res, args[0])
        return t

    def class_auth(self):
        """The room cannot drive the admin API or generation from a foreign page."""
        t = Tally("auth")
        data, mid = self.new_store("auth")
        rc = self.cli(data, "pin", mid)
        node = Node(self, data)
        node.start()
        admin_posts = [("/admin/pin", {"id": mid, "pinned": False}), ("/admin/pull", {"artifact": mid}),
                       ("/admin/releases", {})]
        admin_gets = ["/admin/status", "/admin/peers"]
        for tok in (None, "wrong-token"):
            for path, body in admin_posts:
                t.tried += 1
                hdr = {"Authorization": f"Bearer {tok}"} if tok else {}
                st, _, _ = node.request("POST", path, body, headers=hdr, auth=False, timeout=10)
                if st < 400:
                    t.wrong += 1
                    t.notes.append(f"POST {path} with {'no' if tok is None else 'a wrong'} token: {st}")
            for path in admin_gets:
                t.tried += 1
                hdr = {"Authorization": f"Bearer {tok}"} if tok else {}
                st, _, _ = node.request("GET", path, headers=hdr, auth=False, timeout=10)
                if st < 400:
                    t.wrong += 1
                    t.notes.append(f"GET {path} with {'no' if tok is None else 'a wrong'} token: {st}")
        chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        hostile = [
            ({"Content-Type": "text/plain"}, "text/plain body"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, "form body"),
            ({"Content-Type": "application/json", "Origin": "http://evil.example"}, "foreign Origin"),
            ({"Content-Type": "application/json", "Host": "evil.example:7070"}, "rebinding Host"),
        ]
        for hdr, what in hostile:
            for path, body in [("/v1/chat/completions", chat), ("/admin/pin", {"id": mid, "pinned": False})]:
                t.tried += 1
                st, _, _ = node.request("POST", path, json.dumps(body).encode(), headers=hdr, timeout=30)
                if st < 400:
                    t.wrong += 1
                    t.notes.append(f"{what} to {path}: {st}")
        # The pinned model is still pinned.
        rc, out, _ = 0, "", ""
        st, _, body = node.request("GET", "/admin/status", timeout=10)
        if st == 200 and b'"pinned":false' in body.replace(b" ", b""):
            t.wrong += 1
            t.notes.append("the pin was removed")
        # The CLI on the same machine still works (it reads the token).
        t.tried += 1
        res = self.cli(data, "status", "--api", f"127.0.0.1:{node.api_port}", timeout=30)
        if res[0] != 0:
            t.wrong += 1
            t.notes.append(f"CLI status failed: {res[2].strip()[:80]}")
        # Bounded pulls: many at once get 429, not an unbounded list.
        codes = []
        for i in range(40):
            t.tried += 1
            st, _, _ = node.request("POST", "/admin/pull", {"artifact": "%064x" % random.getrandbits(256)},
                                    timeout=30)
            codes.append(st)
        st, _, body = node.request("GET", "/admin/status", timeout=10)
        try:
            n_dl = len(json.loads(body).get("downloads", []))
        except ValueError:
            n_dl = -1
        if n_dl > 32:
            t.wrong += 1
            t.notes.append(f"{n_dl} downloads listed after 40 pulls")
        t.notes.append(f"40 pulls: {sum(1 for c in codes if c == 429)}x429")
        self.finish_node(t, node)
        return t

    def rss_threads(self, pid):
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return rss, threads

    def class_aliases(self):
        """Many names of one model load one engine; unknown ids fail fast without blocking others."""
        t = Tally("aliases")
        data, mid = self.new_store("aliases")
        node = Node(self, data)
        node.start()
        st, text, _ = node.chat("Say hi.", max_tokens=4)
        if st != 200:
            t.wrong += 1
            t.notes.append(f"demo chat {st}")
        rss0, th0 = self.rss_threads(node.pid())
        aliases = [mid, mid.upper()] + [mid[:n] for n in (8, 9, 10, 12, 16, 20, 24, 32, 40, 48)] + \
                  [mid[:12].upper(), mid[:16].swapcase()]
        for a in aliases:
            t.tried += 1
            try:
                st, _, _ = node.chat("Say hi.", max_tokens=2, model=a, timeout=60)
            except socket.timeout:
                t.hangs += 1
                continue
        rss1, th1 = self.rss_threads(node.pid())
        t.notes.append(f"{len(aliases)} aliases: RSS {rss0 >> 20}->{rss1 >> 20} MiB, threads {th0}->{th1}")
        if th1 > th0 + 4 or rss1 > rss0 + (150 << 20):
            t.wrong += 1
            t.notes.append("aliases loaded more engines")
        # Unknown ids fail fast and do not hold up the demo model.
        for _ in range(3 if self.short else 6):
            t.tried += 1
            bogus = "%064x" % random.getrandbits(256)
            res = {}

            def bogus_req():
                t0 = time.time()
                try:
                    res["bogus"] = node.chat("hi", max_tokens=2, model=bogus, timeout=60)[0]
                except socket.timeout:
                    res["bogus"] = "hung"
                res["bogus_s"] = time.time() - t0

            th = threading.Thread(target=bogus_req)
            th.start()
            time.sleep(0.2)
            t0 = time.time()
            try:
                st, _, _ = node.chat("Say hi.", max_tokens=2, timeout=60)
            except socket.timeout:
                st = "hung"
            demo_s = time.time() - t0
            th.join()
            if res.get("bogus") == "hung" or res.get("bogus_s", 99) > 10:
                t.hangs += 1
                t.notes.append(f"unknown id took {res.get('bogus_s', 0):.1f} s")
            if st != 200 or demo_s > 10:
                t.hangs += 1
                t.notes.append(f"demo request behind an unknown id: {st} after {demo_s:.1f} s")
            if res.get("bogus") == 200:
                t.wrong += 1
        self.finish_node(t, node)
        return t

    def class_slowloris(self):
        """Idle connections and slow headers are closed by the server."""
        t = Tally("slowloris")
        data, _ = self.new_store("slowloris")
        node = Node(self, data, "[api]\nheader_timeout = \"5s\"\nidle_timeout = \"10s\"\n")
        node.start()
        n = 30 if self.short else 100
        socks = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", node.api_port), timeout=5)
            if i % 2 == 0:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            else:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # then idle keep-alive
            socks.append(s)
        t.tried = n
        deadline = time.time() + 30
        open_ = list(socks)
        while open_ and time.time() < deadline:
            still = []
            for s in open_:
                s.settimeout(0.05)
                try:
                    while True:
                        b = s.recv(65536)
                        if not b:
                            break
                    if not b:
                        s.close()
                        continue
                except socket.timeout:
                    still.append(s)
                    continue
                except OSError:
                    s.close()
                    continue
            open_ = still
        t.hangs = len(open_)
        if open_:
            t.notes.append(f"{len(open_)} connections still open after 30 s")
        for s in open_:
            s.close()
        # Still answering.
        st, _, _ = node.request("GET", "/v1/models", timeout=10)
        if st != 200:
            t.wrong += 1
        self.finish_node(t, node)
        return t

    def class_template(self):
        """A chat template that never ends cannot stall the node; SIGTERM still stops it."""
        t = Tally("template")
        data, _ = self.new_store("template")
        hostile = self.variant(
            "tokenizer.chat_template",
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "hostile-template")
        rc, out, err = self.cli(data, "add", hostile, "--name", "soak:hostile")
        node = Node(self, data)
        node.start()
        res = {}

        def hostile_req():
            t0 = time.time()
            try:
                res["st"] = node.chat("hi", max_tokens=2, model="soak:hostile", timeout=60)[0]
            except socket.timeout:
                res["st"] = "hung"
            except (OSError, http.client.HTTPException) as e:
                res["st"] = f"connection lost ({type(e).__name__})"
            res["s"] = time.time() - t0

        for _ in range(2 if self.short else 4):
            t.tried += 1
            th = threading.Thread(target=hostile_req)
            th.start()
            time.sleep(1.0)
            t0 = time.time()
            try:
                st, _, _ = node.request("GET", "/v1/models", timeout=10)
            except socket.timeout:
                st = "hung"
            if st != 200 or time.time() - t0 > 5:
                t.hangs += 1
                t.notes.append(f"/v1/models during a hostile render: {st}")
            th.join()
            if res.get("st") == "hung":
                t.hangs += 1
                t.notes.append("hostile render hung the request")
            elif res.get("st") == 200:
                t.wrong += 1
        # SIGTERM while a hostile render runs.
        t.tried += 1
        th = threading.Thread(target=hostile_req)
        th.start()
        time.sleep(1.0)
        t0 = time.time()
        rc = node.stop(timeout=45)
        th.join()
        if rc == "hung":
            t.hangs += 1
            t.notes.append("SIGTERM ignored during a hostile render")
        else:
            t.notes.append(f"SIGTERM exit in {time.time() - t0:.1f} s")
        n = node.panicked()
        t.panics += n
        return t

    def class_truncate(self):
        """A served model file that shrinks cannot crash the node or give garbage."""
        t = Tally("truncate")
        data, _ = self.new_store("truncate")
        victim = self.variant("general.name", "soak-truncate", "truncate")
        rc, out, err = self.cli(data, "add", victim, "--name", "soak:victim")
        vid = out.strip().split()[-1]
        node = Node(self, data)
        node.start()
        st, text0, _ = node.chat("Tell me a long story about a cat.", max_tokens=8, model="soak:victim")
        obj = os.path.join(data, "objects", vid)
        keep = obj + ".soak-saved"
        shutil.copyfile(obj, keep)
        t.tried += 1
        res = {}

        def long_req():
            try:
                res["st"] = node.chat("Write a very long poem about the sea.", max_tokens=400,
                                      model="soak:victim", timeout=120)[:2]
            except (socket.timeout, OSError) as e:
                res["st"] = (str(e), None)

        th = threading.Thread(target=long_req)
        th.start()
        time.sleep(0.5)
        os.chmod(obj, 0o644)
        with open(obj, "r+b") as f:
            f.truncate(os.path.getsize(obj) // 3)
        th.join()
        time.sleep(0.5)
        if not node.alive():
            t.panics += 1
            t.notes.append(f"daemon died with {node.proc.returncode}")
        else:
            t.tried += 1
            st, text, _ = node.chat("Hello again.", max_tokens=8, model="soak:victim")
            if st == 200:
                t.wrong += 1
                t.notes.append("the truncated model still answered 200")
            st, text, _ = node.chat("Say hi.", max_tokens=4)
            if st != 200:
                t.wrong += 1
                t.notes.append(f"the other model stopped answering ({st})")
        if node.alive():
            self.finish_node(t, node)
        # The bytes are restored from the saved copy (the test truncated them, not the node).
        os.replace(keep, obj)
        return t

    def class_determinism(self):
        """Greedy text is the same cold, from the RAM tier and from the disk tier."""
        t = Tally("determinism")
        data, _ = self.new_store("determinism")
        node = Node(self, data)
        node.start()
        systems = [
            "You are a helpful geography teacher. Answer in one short sentence, and always name the country.",
            "You are a patient maths tutor for children. Explain every step in simple words and check the result.",
        ]
        questions = ["What is the capital of France?", "What is the capital of Japan?",
                     "Which river flows through Cairo?", "What is 12 times 12?",
                     "How many legs does a spider have?", "What is the largest ocean?",
                     "Name a planet with rings.", "What is 7 plus 8?", "Who wrote Hamlet?",
                     "What colour is the sky on Mars?"]
        prompts = [(s, q) for q in questions for s in systems][: (6 if self.short else 20)]
        cold = {}
        for s, q in prompts:
            st, text, _ = node.chat(q, max_tokens=24, system=s)
            cold[(s, q)] = text
        for label, mt in (("ram", 25),):
            for s, q in prompts:
                t.tried += 1
                st, text, _ = node.chat(q, max_tokens=mt, system=s)
                if st != 200 or text is None or cold[(s, q)] is None or not text.startswith(cold[(s, q)]):
                    t.wrong += 1
                    t.notes.append(f"{label}: {cold[(s, q)]!r} vs {text!r}"[:120])
        self.finish_node(t, node)
        node.start()
        for s, q in prompts:
            t.tried += 1
            st, text, _ = node.chat(q, max_tokens=26, system=s)
            if st != 200 or text is None or cold[(s, q)] is None or not text.startswith(cold[(s, q)]):
                t.wrong += 1
                t.notes.append(f"disk: {cold[(s, q)]!r} vs {text!r}"[:120])
        self.finish_node(t, node)
        return t

    def class_corrupt(self):
        """A corrupt model is refused (not served garbage); after repair it answers as before."""
        t = Tally("corrupt")
        data, mid = self.new_store("corrupt")
        node = Node(self, data)
        node.start()
        q = "What is the capital of France?"
        st, before, _ = node.chat(q, max_tokens=16)
        self.finish_node(t, node)
        obj = os.path.join(data, "objects", mid)
        size = os.path.getsize(obj)
        good = os.path.join(self.work, "corrupt-good.gguf")
        shutil.copyfile(obj, good)
        os.chmod(obj, 0o644)
        rng = random.Random(3)
        with open(obj, "r+b") as f:
            for _ in range(8):
                off = rng.randrange(size // 4, size)
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
        t.tried += 1
        res = self.cli(data, "verify", timeout=300)
        self.check_cli(t, res, "verify")
        if res[0] == 0:
            t.wrong += 1
            t.notes.append("verify exited 0 on a corrupt model")
        node.start()
        t.tried += 1
        st, text, _ = node.chat(q, max_tokens=16)
        if st == 200:
            t.wrong += 1
            t.notes.append(f"corrupt model answered 200: {text!r}"[:80])
        else:
            t.notes.append(f"corrupt model: {st}")
        self.finish_node(t, node)
        # Repair by adding the good file again; KV from the corrupt weights must not come back.
        res = self.cli(data, "add", good, "--name", NAME, timeout=300)
        self.check_cli(t, res, "add")
        node.start()
        t.tried += 1
        st, after, _ = node.chat(q, max_tokens=16)
        if st != 200 or after != before:
            t.wrong += 1
            t.notes.append(f"after repair: {st} {before!r} vs {after!r}"[:120])
        self.finish_node(t, node)
        return t

    def class_metadata(self):
        """Damaged metadata never loses model bytes; fsck brings the model back."""
        t = Tally("metadata")
        base, mid = self.new_store("metadata-base")
        want = file_hash(os.path.join(base, "objects", mid))

        def journals(d):
            out = []
            for root, _, files in os.walk(os.path.join(d, "meta")):
                for fn in sorted(files):
                    if fn.endswith(".jnl"):
                        out.append(os.path.join(root, fn))
            return out

        def mutate_bytes(fn):
            def m(d):
                for j in journals(d)[:1]:
                    with open(j, "rb") as f:
                        b = bytearray(f.read())
                    fn(b)
                    with open(j, "wb") as f:
                        f.write(bytes(b))
            return m

        def flip(pos):
            def f(b):
                if b:
                    i = pos(len(b))
                    b[i] ^= 0xFF
            return f

        def rm_meta(d):
            shutil.rmtree(os.path.join(d, "meta"))

        def meta_file(d):
            shutil.rmtree(os.path.join(d, "meta"))
            with open(os.path.join(d, "meta"), "w") as f:
                f.write("not a directory")

        def rm_journals(d):
            for j in journals(d):
                os.remove(j)

        def unreadable(d):
            for j in journals(d):
                os.chmod(j, 0)

        mutations = {
            "flip-first": mutate_bytes(flip(lambda n: 0)),
            "flip-middle": mutate_bytes(flip(lambda n: n // 2)),
            "flip-last": mutate_bytes(flip(lambda n: n - 1)),
            "truncate-0": mutate_bytes(lambda b: b.clear()),
            "truncate-half": mutate_bytes(lambda b: b.__delitem__(slice(len(b) // 2, None))),
            "truncate-tail": mutate_bytes(lambda b: b.__delitem__(slice(max(0, len(b) - 7), None))),
            "append-garbage": mutate_bytes(lambda b: b.extend(os.urandom(4096))),
            "zero-page": mutate_bytes(lambda b: b.__setitem__(slice(0, min(4096, len(b))), bytes(min(4096, len(b))))),
            "duplicate": mutate_bytes(lambda b: b.extend(bytes(b))),
            "random-bytes": mutate_bytes(lambda b: b.__setitem__(slice(0, len(b)), os.urandom(len(b)))),
            "rm-journals": rm_journals,
            "rm-meta": rm_meta,
            "meta-is-file": meta_file,
        }
        if os.geteuid() != 0:
            mutations["unreadable"] = unreadable
        for name, mut in mutations.items():
            t.tried += 1
            d = os.path.join(self.work, "metadata-" + name)
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d)
            mut(d)
            res = self.cli(d, "ls", timeout=120)
            self.check_cli(t, res, f"{name}: ls")
            if want not in self.object_bytes(d):
                t.loss += 1
                t.notes.append(f"{name}: model bytes gone after ls")
                continue
            res = self.cli(d, "fsck", timeout=300)
            self.check_cli(t, res, f"{name}: fsck")
            if want not in self.object_bytes(d):
                t.loss += 1
                t.notes.append(f"{name}: model bytes gone after fsck")
                continue
            res = self.cli(d, "--json", "ls", timeout=120)
            if mid not in res[1]:
                t.wrong += 1
                t.notes.append(f"{name}: model not listed after fsck ({res[2].strip()[:60]})")
            shutil.rmtree(d, ignore_errors=True)
        return t

    def class_kill9(self):
        """SIGKILL during adds, pulls and generation loses nothing."""
        t = Tally("kill9")
        data, mid = self.new_store("kill9")
        want = {file_hash(self.model)}
        rounds = 4 if self.short else 12
        rng = random.Random(11)
        for i in range(rounds):
            t.tried += 1
            node = Node(self, data)
            node.start()
            # A CLI add of a new variant killed mid-way (the store is locked by the daemon:
            # the add must refuse cleanly), and the daemon killed mid-generation.
            def story():
                try:
                    node.chat("Write a story.", max_tokens=200, timeout=60)
                except (OSError, http.client.HTTPException):
                    pass  # the daemon is killed under it

            th = threading.Thread(target=story)
            th.daemon = True
            th.start()
            time.sleep(rng.uniform(0.1, 1.5))
            node.kill9()
            th.join(5)
            # An add killed mid-way, with the daemon down.
            v = self.variant("general.name", f"soak-kill-{i % 3}", f"kill-{i % 3}")
            p = subprocess.Popen([self.bin, "--data-dir", data, "add", v], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=self.env)
            time.sleep(rng.uniform(0.05, 0.6))
            p.kill()
            p.wait()
            res = self.cli(data, "verify", timeout=300)
            self.check_cli(t, res, "verify")
            if res[0] != 0:
                t.wrong += 1
                t.notes.append(f"round {i}: verify failed: {(res[1] + res[2]).strip()[-80:]}")
            if not want <= self.object_bytes(data):
                t.loss += 1
                t.notes.append(f"round {i}: the demo model's bytes are gone")
            n = node.panicked()
            if n:
                t.panics += n
        node = Node(self, data)
        node.start()
        st, text, _ = node.chat("Say hi.", max_tokens=4)
        if st != 200:
            t.wrong += 1
            t.notes.append(f"after {rounds} kills: {st}")
        self.finish_node(t, node)
        return t

    # ---- driver --------------------------------------------------------------

    def run(self, only):
        classes = [
            ("http-malformed", self.class_http), ("auth", self.class_auth),
            ("aliases", self.class_aliases), ("slowloris", self.class_slowloris),
            ("template", self.class_template), ("truncate", self.class_truncate),
            ("corrupt", self.class_corrupt), ("metadata", self.class_metadata),
            ("kill9", self.class_kill9), ("determinism", self.class_determinism),
        ]
        for name, fn in classes:
            if only and name not in only:
                continue
            if time.time() > self.budget_end:
                t = Tally(name)
                t.skipped = True
            else:
                t0 = time.time()
                try:
                    t = fn()
                except Exception as e:  # a harness failure is a failure of the run
                    t = Tally(name)
                    t.wrong += 1
                    t.notes.append(f"harness: {type(e).__name__}: {e}"[:160])
                t.notes.append(f"{time.time() - t0:.0f} s")
            print(t.line(), flush=True)
            self.results.append(t)
        bad = [t for t in self.results if t.bad()]
        total = sum(t.tried for t in self.results)
        print(f"soak: {len(self.results)} classes, {total} inputs, "
              f"{'FAILED: ' + ', '.join(t.name for t in bad) if bad else 'all clean'}", flush=True)
        return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--work")
    ap.add_argument("--budget", type=float, default=600)
    ap.add_argument("classes", nargs="*")
    a = ap.parse_args()
    s = Soak(a)
    try:
        rc = s.run(set(a.classes))
    finally:
        if not a.work:
            shutil.rmtree(s.work, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
