//! The real daemon under signals (issue 14, items 4 and 5): SIGTERM ends it
//! within `api.drain_timeout` even while it generates, and a model file
//! truncated while it is served (SIGBUS on the mapping) does not kill it.
//!
//! Needs the demo model (`SHOAL_TEST_MODEL`); skipped without it, except
//! under `CI=true`. `SHOAL_TEST_BIN` runs them against another `shoal`
//! binary (an older build, to see them fail).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::demo_model;

/// The binary under test.
fn shoal_bin() -> PathBuf {
    std::env::var_os("SHOAL_TEST_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_shoal")), PathBuf::from)
}

/// Adds a private copy of the demo model to a store at `data`; returns its id.
fn add_copy(dir: &Path, data: &Path, model: &Path) -> String {
    let copy = dir.join("model.gguf");
    std::fs::copy(model, &copy).expect("copy the demo model");
    add(dir, data, &copy)
}

/// Adds `file` to the store at `data`; returns its id.
fn add(dir: &Path, data: &Path, copy: &Path) -> String {
    let o = Command::new(shoal_bin())
        .args(["--data-dir", data.to_str().expect("utf-8"), "--json", "add"])
        .arg(copy)
        .env("HOME", dir)
        .output()
        .expect("shoal add");
    assert!(
        o.status.success(),
        "shoal add: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .unwrap_or_else(|| panic!("no id in {out:?}"))
        .to_owned()
}

/// A `shoal serve` child on loopback (mDNS off), its stderr collected.
struct Daemon {
    child: Child,
    api: String,
    log: Arc<Mutex<Vec<String>>>,
    /// The admin API's bearer token (`<data>/admin.token`).
    token: String,
}

impl Daemon {
    fn start(dir: &Path, data: &Path, env: &[(&str, &str)]) -> Daemon {
        let cfg = dir.join("shoal.toml");
        // One async worker, as on a small board: a stalled worker stalls all.
        std::fs::write(&cfg, "async_threads = 1\n").expect("write config");
        let mut child = Command::new(shoal_bin())
            .args(["--data-dir", data.to_str().expect("utf-8")])
            .args(["--config", cfg.to_str().expect("utf-8")])
            .args(["serve", "--no-mdns", "--offline"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"])
            .env("HOME", dir)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shoal serve");
        let (api, lines) = crate::util::api_address(&mut child);
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l.lock().expect("log").push(line);
            }
        });
        let token = std::fs::read_to_string(data.join("admin.token"))
            .expect("the daemon wrote its admin token")
            .trim()
            .to_owned();
        Daemon {
            child,
            api,
            log,
            token,
        }
    }

    fn connect(&self, wait: Duration) -> TcpStream {
        let s = TcpStream::connect(&self.api).expect("connect");
        s.set_read_timeout(Some(wait)).expect("timeout");
        s
    }

    /// Sends a request (`Connection: close`) on a new connection.
    fn send(&self, method: &str, path: &str, body: &str, wait: Duration) -> TcpStream {
        let mut s = self.connect(wait);
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            self.token,
            body.len()
        )
        .expect("send");
        s
    }

    /// The whole response to a request.
    fn request(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = self.send(method, path, body, Duration::from_secs(120));
        let mut out = Vec::new();
        if let Err(e) = s.read_to_end(&mut out) {
            panic!(
                "{method} {path}: no complete answer ({e}); got {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Starts a long streamed generation and returns once its first token
    /// has arrived, with the connection and what was read so far.
    fn start_long_generation(&self, model: &str) -> (TcpStream, String) {
        self.start_generation(model, 4000)
    }

    /// Starts a streamed generation of `max_tokens` tokens and returns once
    /// its first token has arrived, with the connection and what was read.
    fn start_generation(&self, model: &str, max_tokens: u32) -> (TcpStream, String) {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"Tell me a very long story."}}],"stream":true,"max_tokens":{max_tokens},"ignore_eos":true}}"#
        );
        let mut s = self.send(
            "POST",
            "/v1/chat/completions",
            &body,
            Duration::from_secs(300),
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The first content chunk (after the role chunk) means tokens flow.
        while String::from_utf8_lossy(&got).matches("data: ").count() < 3 {
            let n = s.read(&mut buf).expect("read the stream");
            assert!(
                n > 0,
                "stream ended early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        (s, String::from_utf8_lossy(&got).into_owned())
    }

    /// Waits (up to `max`) for the daemon to exit.
    fn wait_exit(&mut self, max: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < max {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill");
}

/// SIGTERM while a long generation streams: the daemon stops within the
/// drain timeout (2 s here) with status 1, naming what still ran, instead
/// of waiting for the generation (minutes) to end.
#[test]
fn sigterm_exits_within_the_drain_timeout() {
    let Some(model) = demo_model() else { return };
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let id = add_copy(d.path(), &data, &model);
    let mut node = Daemon::start(d.path(), &data, &[("SHOAL_DRAIN_TIMEOUT", "2s")]);
    let (_stream, _) = node.start_long_generation(&id);
    signal(&node.child, libc::SIGTERM);
    // Far above the 2 s drain timeout (a loaded machine), far below the
    // generation's length.
    let status = node.wait_exit(Duration::from_secs(60));
    let log = node.log();
    let status = status.unwrap_or_else(|| panic!("still running 60 s after SIGTERM:\n{log}"));
    assert_eq!(status.code(), Some(1), "{status:?}\n{log}");
    assert!(log.contains("drain timeout"), "{log}");
    assert!(
        log.contains(&id),
        "the log names the model still running:\n{log}"
    );
}

/// SIGTERM while a streamed chat completion runs, with time to finish (the
/// drain timeout far above it): the daemon refuses new connections at once,
/// lets the stream run to its end, and exits 0.
#[test]
fn sigterm_mid_stream_drains_and_exits_zero() {
    let Some(model) = demo_model() else { return };
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let id = add_copy(d.path(), &data, &model);
    let mut node = Daemon::start(d.path(), &data, &[("SHOAL_DRAIN_TIMEOUT", "300s")]);
    let (mut stream, got) = node.start_generation(&id, 400);
    signal(&node.child, libc::SIGTERM);
    // New connections are refused while the stream still runs (a deadline,
    // not a timed assertion).
    let t0 = Instant::now();
    while TcpStream::connect(&node.api).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "still accepting connections 60 s after SIGTERM:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = Vec::new();
    if let Err(e) = stream.read_to_end(&mut rest) {
        panic!("the stream did not run to its end ({e}):\n{}", node.log());
    }
    let all = got + &String::from_utf8_lossy(&rest);
    assert!(all.contains("data: [DONE]"), "{all}");
    assert!(
        all.contains("\"finish_reason\":\"length\""),
        "the in-flight generation ran to its end: {all}"
    );
    let status = node.wait_exit(Duration::from_secs(60));
    let log = node.log();
    let status = status.unwrap_or_else(|| panic!("still running after the drain:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
}

/// SIGTERM with nothing running still exits cleanly (status 0).
#[test]
fn sigterm_when_idle_exits_zero() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let mut node = Daemon::start(d.path(), &data, &[("SHOAL_DRAIN_TIMEOUT", "30s")]);
    assert!(
        node.request("GET", "/v1/models", "")
            .starts_with("HTTP/1.1 200")
    );
    signal(&node.child, libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(60));
    let log = node.log();
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
}

/// The model's object file is truncated (root ignores 0444) while a reply
/// streams: the daemon survives, the stream ends with a clear error, the
/// next request gets that error too (no text computed from zeros), and the
/// other routes answer.
#[test]
fn truncating_a_served_model_file_does_not_kill_the_daemon() {
    let Some(model) = demo_model() else { return };
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let id = add_copy(d.path(), &data, &model);
    let object = data.join("objects").join(&id);
    assert!(object.is_file(), "no object at {}", object.display());
    let mut node = Daemon::start(d.path(), &data, &[]);
    let (mut stream, mut got) = node.start_long_generation(&id);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&object)
        .expect("open the object for writing (as root)")
        .set_len(1 << 20)
        .expect("truncate");
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest);
    got.push_str(&String::from_utf8_lossy(&rest));
    if let Some(st) = node.wait_exit(Duration::from_millis(500)) {
        panic!(
            "the daemon died ({st:?}) when its model file was truncated:\n{}",
            node.log()
        );
    }
    read.expect("the stream ends");
    assert!(
        got.contains("model file changed on disk"),
        "the stream ends with a clear error: {got}"
    );
    let again = node.request(
        "POST",
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{id}","messages":[{{"role":"user","content":"Hello"}}],"max_tokens":8}}"#
        ),
    );
    // The damaged model was unloaded; loading the truncated file again fails
    // with a clear 503 (never text computed from missing bytes).
    assert!(again.starts_with("HTTP/1.1 503"), "{again}");
    assert!(again.contains("model_unavailable"), "{again}");
    let models = node.request("GET", "/v1/models", "");
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    let status = node.request("GET", "/admin/status", "");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(node.child.try_wait().expect("try_wait").is_none());
}

/// Two nested `range(100000)` loops: 10^10 iterations.
const HOSTILE: &str =
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";

/// The demo model with `tokenizer.chat_template` replaced by `template`.
fn with_template(model: &Path, template: &str) -> Vec<u8> {
    let bytes = std::fs::read(model).expect("read the demo model");
    shoal::gguf::writer::with_metadata(
        &bytes,
        "tokenizer.chat_template",
        shoal::gguf::Value::String(template.to_owned()),
    )
    .expect("rewrite the demo model")
}

/// Issue 14, item 4, as reported: a model whose chat template never ends,
/// served by a daemon with one async worker. The request fails with an
/// error naming the template limit, `/v1/models` and `/admin/status` answer
/// while it renders, and SIGTERM afterwards ends the daemon cleanly.
#[test]
fn a_hostile_chat_template_stalls_nothing() {
    let Some(model) = demo_model() else { return };
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let file = d.path().join("hostile.gguf");
    std::fs::write(&file, with_template(&model, HOSTILE)).expect("write model");
    let id = add(d.path(), &data, &file);
    let mut node = Daemon::start(d.path(), &data, &[("SHOAL_DRAIN_TIMEOUT", "30s")]);
    let chat = {
        let s = node.send(
            "POST",
            "/v1/chat/completions",
            &format!(
                r#"{{"model":"{id}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}"#
            ),
            Duration::from_secs(120),
        );
        std::thread::spawn(move || {
            let mut s = s;
            let mut out = Vec::new();
            let r = s.read_to_end(&mut out);
            (
                r.map_err(|e| e.to_string()),
                String::from_utf8_lossy(&out).into_owned(),
            )
        })
    };
    // Let the chat request reach its render before asking for the rest.
    std::thread::sleep(Duration::from_millis(500));
    for path in ["/v1/models", "/admin/status"] {
        let mut s = node.send("GET", path, "", Duration::from_secs(60));
        let mut out = Vec::new();
        if let Err(e) = s.read_to_end(&mut out) {
            panic!("{path} did not answer while the template rendered: {e}");
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
    }
    let (read, answer) = chat.join().expect("chat thread");
    assert!(
        read.is_ok(),
        "the chat request got no answer: {read:?} {answer}"
    );
    let code = answer.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        code.starts_with('4') || code.starts_with('5'),
        "the request must fail: {answer}"
    );
    assert!(answer.contains("template limit"), "{answer}");
    signal(&node.child, libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(60));
    let log = node.log();
    let status = status.unwrap_or_else(|| panic!("SIGTERM ignored:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
}
