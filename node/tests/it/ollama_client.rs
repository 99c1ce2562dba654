//! The official Python `ollama` package, unchanged, against a real
//! `shoal serve` (loopback, mDNS off, API keys on): version, list, show, ps,
//! pull of a stored name (streamed and not) and of an unknown one, chat and
//! generate streamed and not, greedy chat equal to `/v1/chat/completions`',
//! a malformed request, unsupported options, and a client without the key.
//!
//! Needs `python3 -m pip install ollama` (`.ci/run` installs it). Outside
//! CI a missing package skips the test loudly; with `CI=true` it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::demo_model;

/// The client script: every check is an assertion; prints `ALL OK` at the end.
const SCRIPT: &str = r#"
import json, sys, urllib.request
import httpx, ollama
from ollama import Client, ResponseError

host, name, ident, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
auth = {"Authorization": f"Bearer {key}"}
c = Client(host=host, headers=auth, timeout=120)

# A client without the key is refused.
try:
    Client(host=host, timeout=30).list()
    raise AssertionError("no key accepted")
except ResponseError as e:
    assert e.status_code == 401 and "API key" in e.error, e
print("auth: ok")

v = httpx.get(f"{host}/api/version", headers=auth).json()
assert isinstance(v["version"], str) and v["version"].count(".") == 2, v
print("version:", v["version"])

# Pull of the stored name: progress lines, then success; the same not streamed.
lines = list(c.pull(name, stream=True))
assert lines[0].status == "pulling manifest", lines
assert lines[-1].status == "success", lines
prog = [l for l in lines if l.digest]
assert prog and prog[-1].digest == ident and prog[-1].total > 0 and prog[-1].completed == prog[-1].total, prog
assert c.pull(name).status == "success"
try:
    list(c.pull("no-such-model:latest", stream=True))
    raise AssertionError("an unknown model pulled")
except ResponseError as e:
    assert e.status_code == 404, e
print("pull: ok,", len(lines), "lines")

# The list: the stored model, with Ollama's fields.
models = c.list().models
m = [m for m in models if m.model == name]
assert len(m) == 1, models
m = m[0]
assert m.digest == ident and m.size > 0 and m.modified_at is not None, m
assert m.details.format == "gguf" and m.details.family == "llama", m.details
assert m.details.quantization_level == "Q4_1" and m.details.parameter_size.endswith("M"), m.details
print("list: ok", m.details.parameter_size)

s = c.show(name)
assert s.modelinfo["general.architecture"] == "llama", s.modelinfo
assert s.modelinfo["general.parameter_count"] > 100_000_000, s.modelinfo
assert s.template and s.modelfile.startswith('#') and "FROM" in s.modelfile, s
assert s.details.family == "llama" and "temperature" in s.parameters, s
try:
    c.show("no-such-model:latest")
    raise AssertionError("show of an unknown model")
except ResponseError as e:
    assert e.status_code == 404, e
print("show: ok")

# Chat, not streamed, greedy: the same text as /v1/chat/completions.
msgs = [{"role": "user", "content": "Name one colour."}]
greedy = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}
r = c.chat(model=name, messages=msgs, options=greedy, stream=False)
assert r.done and r.done_reason in ("stop", "length"), r
assert r.message.role == "assistant" and r.message.content, r
assert r.model == name and r.created_at, r
assert r.prompt_eval_count > 0 and 0 < r.eval_count <= 12, r
for f in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
    assert isinstance(getattr(r, f), int), (f, r)
assert r.total_duration >= r.eval_duration > 0, r
body = json.dumps({"model": name, "messages": msgs, "max_tokens": 12, "temperature": 0}).encode()
req = urllib.request.Request(host + "/v1/chat/completions", data=body,
    headers={**auth, "Content-Type": "application/json"})
oa = json.load(urllib.request.urlopen(req, timeout=120))
assert oa["choices"][0]["message"]["content"] == r.message.content, (oa, r.message.content)
print("chat:", json.dumps(r.message.content), "== /v1/chat/completions")

# Chat, streamed: the same text, one final line with the counts.
parts, last = [], None
for ch in c.chat(model=name, messages=msgs, options=greedy, stream=True):
    assert ch.model == name, ch
    if ch.done:
        last = ch
    else:
        parts.append(ch.message.content)
assert "".join(parts) == r.message.content, (parts, r.message.content)
assert last is not None and last.eval_count == r.eval_count and last.done_reason == r.done_reason, last
print("chat stream: ok,", len(parts), "lines")

# Generate, not streamed and streamed; the context continues a conversation.
g = c.generate(model=name, prompt="The capital of France is", options=greedy)
assert g.done and g.response and g.context and len(g.context) > g.prompt_eval_count, g
gs = list(c.generate(model=name, prompt="The capital of France is", options=greedy, stream=True))
assert "".join(x.response for x in gs) == g.response and gs[-1].done, gs[-1]
assert gs[-1].context == g.context, (gs[-1].context, g.context)
raw = c.generate(model=name, prompt="1, 2, 3,", raw=True, options={"temperature": 0, "num_predict": 4})
assert raw.response and raw.done_reason == "length", raw
more = c.generate(model=name, prompt="And of Italy?", context=g.context, options=greedy)
assert more.done and more.prompt_eval_count > len(g.context), more
loaded = c.generate(model=name, prompt="")
assert loaded.done and loaded.done_reason == "load", loaded
print("generate:", json.dumps(g.response))

# ps: the model is loaded now.
p = c.ps().models
assert any(x.digest == ident and x.size > 0 and x.expires_at for x in p), p
print("ps: ok")

# Refused: a malformed body, unsupported options, JSON mode, tools, images.
bad = httpx.post(f"{host}/api/chat", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
assert bad.status_code == 400 and "error" in bad.json(), bad.text
bad = httpx.post(f"{host}/api/generate", json={"prompt": "x"}, headers=auth)
assert bad.status_code == 400 and "model is required" in bad.json()["error"], bad.text
for kw in ({"options": {"mirostat": 2}}, {"options": {"temperature": "hot"}}, {"format": "json"},
           {"tools": [{"type": "function", "function": {"name": "f", "description": "d",
                       "parameters": {"type": "object", "properties": {}}}}]}):
    try:
        c.chat(model=name, messages=msgs, **kw)
        raise AssertionError(f"accepted: {kw}")
    except ResponseError as e:
        assert e.status_code == 400 and e.error, (kw, e)
try:
    c.generate(model=name, prompt="x", images=[b"\x89PNG"])
    raise AssertionError("images accepted")
except ResponseError as e:
    assert e.status_code == 400, e
try:
    c.chat(model="no-such-model:latest", messages=msgs)
    raise AssertionError("unknown model chatted")
except ResponseError as e:
    assert e.status_code == 404 and "not found" in e.error, e
print("errors: ok")
print("ALL OK")
"#;

/// The `shoal` binary with a clean environment rooted at `home`.
fn shoal_cmd(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.current_dir(home)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("cfg"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") {
            c.env_remove(k);
        }
    }
    c
}

/// Starts `shoal serve` with data in `data` and `config` as its file.
fn start_daemon(home: &Path, data: &Path, config: &str) -> crate::util::ServeChild {
    let cfg = home.join("shoal.toml");
    std::fs::write(&cfg, config).expect("write config");
    let mut cmd = shoal_cmd(home);
    cmd.args(["--data-dir", data.to_str().expect("utf-8")])
        .args(["--config", cfg.to_str().expect("utf-8")]);
    crate::util::ServeChild::spawn(cmd)
}

#[test]
fn the_official_ollama_client_works_unchanged() {
    if !crate::util::python_has("ollama") {
        return;
    }
    let Some(model) = demo_model() else {
        return;
    };
    let d = tempfile::tempdir().expect("tempdir");
    let home = d.path();
    let data: PathBuf = home.join("data");
    let name = "smollm2-demo:q4_1";
    let o = shoal_cmd(home)
        .args(["--data-dir", data.to_str().expect("utf-8"), "--json", "add"])
        .args(["--name", name, model.to_str().expect("utf-8")])
        .output()
        .expect("run shoal add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = v["id"].as_str().expect("artifact id").to_owned();
    let keys = home.join("api-keys");
    std::fs::write(&keys, "sk-room-7\n").expect("write keys");
    let node = start_daemon(
        home,
        &data,
        &format!(
            "[api]\nkeys_file = {:?}\n[response_cache]\nbudget = \"0\"\n",
            keys.to_str().expect("utf-8")
        ),
    );
    let host = format!("http://{}", node.api);
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &host, name, &id, "sk-room-7"])
        // Nothing may leave loopback: no proxy for the local node.
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("OLLAMA_HOST")
        .env_remove("OLLAMA_API_KEY")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the ollama client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
