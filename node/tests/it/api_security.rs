//! The HTTP API of a real `shoal serve` (loopback, mDNS off) against the
//! classroom attacks of issue 14: the admin token, the CLI reading it, API
//! keys with the official OpenAI client, Host and Origin checks, JSON-only
//! bodies, the pull bound, read and idle timeouts, and a tampered release.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::util::demo_model;

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

fn run(home: &Path, args: &[&str]) -> Output {
    shoal_cmd(home).args(args).output().expect("run shoal")
}

/// A `shoal serve` child on 127.0.0.1 (mDNS off, ports picked by the OS), killed when dropped.
struct Daemon {
    child: std::process::Child,
    api: String,
    data: PathBuf,
}

impl Daemon {
    /// Starts a node with data in `home/data` and `config` as its file.
    fn start(home: &Path, config: &str) -> Daemon {
        let data = home.join("data");
        let cfg = home.join("shoal.toml");
        std::fs::write(&cfg, config).expect("write config");
        let mut child = shoal_cmd(home)
            .args(["--data-dir", data.to_str().expect("utf-8")])
            .args(["--config", cfg.to_str().expect("utf-8")])
            .args(["serve", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--api", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shoal serve");
        let api = crate::util::announced_api(&mut child);
        Daemon { child, api, data }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_owned()
    }

    /// Sends `method path` with `headers` (Host is the API address unless given) and `body`.
    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut s = TcpStream::connect(&self.api).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.api));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        head.push_str(body);
        s.write_all(head.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        Resp::parse(&raw)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn parse(raw: &[u8]) -> Resp {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        Resp {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
    }
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// A small GGUF file for `shoal add`.
fn tiny_gguf(dir: &Path) -> PathBuf {
    use shoal::gguf::writer::{TensorSpec, write};
    use shoal::gguf::{GgmlType, Value};
    let bytes = write(
        &[("general.architecture", Value::String("llama".into()))],
        &[TensorSpec {
            name: "w".into(),
            dims: vec![64],
            ty: GgmlType::F32,
            data: vec![7; 256],
        }],
    );
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, bytes).expect("write gguf");
    p
}

#[test]
fn every_admin_route_needs_the_token_and_the_cli_reads_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let home = d.path();
    let data = home.join("data");
    let data_s = data.to_str().expect("utf-8");
    // A named model, so releases and manifests exist.
    let gguf = tiny_gguf(home);
    for args in [
        vec!["--data-dir", data_s, "keygen"],
        vec![
            "--data-dir",
            data_s,
            "add",
            gguf.to_str().expect("utf-8"),
            "--name",
            "tiny:f32",
        ],
    ] {
        let o = run(home, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let node = Daemon::start(home, "");
    // The token: made at first start, 256 bits in hex, readable by its owner only.
    let token = node.token();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("admin.token"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let id = "ab".repeat(32);
    let routes: &[(&str, String, &str)] = &[
        ("GET", "/admin/status".into(), ""),
        ("GET", "/admin/peers".into(), ""),
        ("GET", "/admin/releases".into(), ""),
        ("GET", format!("/admin/manifest/{id}"), ""),
        ("GET", format!("/admin/pull/{id}"), ""),
        ("POST", "/admin/pull".into(), r#"{"artifact":"tiny:f32"}"#),
        (
            "POST",
            "/admin/pin".into(),
            r#"{"artifact":"tiny:f32","pinned":false}"#,
        ),
        ("POST", "/admin/releases".into(), r#"{"signed":"00"}"#),
    ];
    let wrong = format!("Bearer {}", "0".repeat(64));
    let right = format!("Bearer {token}");
    for (method, path, body) in routes {
        let none = node.req(method, path, &[JSON], body);
        assert_eq!(
            none.status, 401,
            "{method} {path} without a token: {none:?}"
        );
        assert!(none.body.contains("admin.token"), "{none:?}");
        assert!(
            none.header("www-authenticate")
                .is_some_and(|v| v.starts_with("bearer")),
            "{none:?}"
        );
        let bad = node.req(method, path, &[JSON, ("Authorization", &wrong)], body);
        assert_eq!(
            bad.status, 401,
            "{method} {path} with a wrong token: {bad:?}"
        );
        let basic = node.req(
            method,
            path,
            &[JSON, ("Authorization", &format!("Basic {token}"))],
            body,
        );
        assert_eq!(basic.status, 401, "{method} {path} with Basic: {basic:?}");
        let ok = node.req(method, path, &[JSON, ("Authorization", &right)], body);
        assert_ne!(ok.status, 401, "{method} {path} with the token: {ok:?}");
    }
    // The authorized unpin above went through; pin the model back.
    let ok = node.req(
        "POST",
        "/admin/pin",
        &[JSON, ("Authorization", &right)],
        r#"{"artifact":"tiny:f32","pinned":true}"#,
    );
    assert_eq!(ok.status, 200, "{ok:?}");

    // Read-only pages stay public: the dashboard, its state, the metrics.
    for path in [
        "/",
        "/dashboard/app.js",
        "/dashboard/view.js",
        "/dashboard/style.css",
        "/dashboard/state",
        "/metrics",
    ] {
        assert_eq!(node.req("GET", path, &[], "").status, 200, "{path}");
        // As the dashboard's own page asks (same origin): allowed too.
        let own = format!("http://{}", node.api);
        assert_eq!(
            node.req("GET", path, &[("Origin", &own)], "").status,
            200,
            "{path}"
        );
    }

    // The CLI on the same machine reads the token from the data dir.
    let o = run(home, &["--data-dir", data_s, "status", "--api", &node.api]);
    assert!(
        o.status.success(),
        "shoal status: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("tiny:f32"));
    let o = run(home, &["--data-dir", data_s, "peers", "--api", &node.api]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Another user (another data dir, no token there) is refused, with the reason.
    let other = home.join("other");
    let o = run(
        home,
        &[
            "--data-dir",
            other.to_str().expect("utf-8"),
            "status",
            "--api",
            &node.api,
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("401") && err.contains("could not read the admin token"),
        "{err}"
    );
    // A token file named in the config is used (api.admin_token_file).
    let cfg = home.join("client.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nadmin_token_file = {:?}\n",
            data.join("admin.token").to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let o = run(
        home,
        &[
            "--config",
            cfg.to_str().expect("utf-8"),
            "--data-dir",
            other.to_str().expect("utf-8"),
            "status",
            "--api",
            &node.api,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A tampered release is the caller's fault: 400, not 500.
    let list = node.req("GET", "/admin/releases", &[("Authorization", &right)], "");
    assert_eq!(list.status, 200, "{list:?}");
    let v: serde_json::Value = serde_json::from_str(&list.body).expect("json");
    let signed = v[0]["signed"].as_str().expect("a release").to_owned();
    let mut bytes = hex::decode(&signed).expect("hex");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = node.req(
        "POST",
        "/admin/releases",
        &[JSON, ("Authorization", &right)],
        &format!(r#"{{"signed":"{}"}}"#, hex::encode(&bytes)),
    );
    assert_eq!(tampered.status, 400, "{tampered:?}");

    // The token survives a restart unchanged.
    drop(node);
    let node = Daemon::start(home, "");
    assert_eq!(node.token(), token);
}

#[test]
fn browsers_and_rebinding_pages_are_refused_and_bodies_must_be_json() {
    let d = tempfile::tempdir().expect("tempdir");
    let node = Daemon::start(
        d.path(),
        "[api]\nallowed_hosts = [\"pi-07.local\"]\nallowed_origins = [\"http://notebook.lan:8888\"]\n",
    );
    let auth = format!("Bearer {}", node.token());
    let chat = r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#;
    // JSON only: a form or text/plain body (what a page can send without a preflight) is 415.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ] {
        let r = node.req(
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", ct)],
            chat,
        );
        assert_eq!(r.status, 415, "{ct}: {r:?}");
        let r = node.req(
            "POST",
            "/admin/pin",
            &[("Content-Type", ct), ("Authorization", &auth)],
            r#"{"artifact":"x"}"#,
        );
        assert_eq!(r.status, 415, "{ct}: {r:?}");
    }
    let r = node.req("POST", "/v1/completions", &[], r#"{"prompt":"x"}"#);
    assert_eq!(r.status, 415, "no content type: {r:?}");
    // A JSON body passes the guard (and fails later for its own reasons).
    let r = node.req("POST", "/v1/chat/completions", &[JSON], chat);
    assert!(![401, 403, 415].contains(&r.status), "{r:?}");

    // A foreign page's request carries its Origin: refused, before any work.
    for (method, path, body) in [
        ("POST", "/v1/chat/completions", chat),
        ("GET", "/v1/models", ""),
        ("GET", "/dashboard/state", ""),
    ] {
        let r = node.req(
            method,
            path,
            &[JSON, ("Origin", "http://evil.example.com")],
            body,
        );
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    let pre = node.req(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", "http://evil.example.com"),
            ("Access-Control-Request-Method", "POST"),
        ],
        "",
    );
    assert_eq!(pre.status, 403, "{pre:?}");
    // The node's own pages (same origin) may.
    let own = format!("http://{}", node.api);
    let r = node.req("GET", "/v1/models", &[("Origin", &own)], "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), None);
    // A listed origin may, with CORS headers and an answered preflight.
    let nb = "http://notebook.lan:8888";
    let r = node.req("GET", "/v1/models", &[("Origin", nb)], "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(nb));
    let pre = node.req(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", nb),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, authorization",
            ),
        ],
        "",
    );
    assert_eq!(pre.status, 204, "{pre:?}");
    assert_eq!(
        pre.header("access-control-allow-origin").as_deref(),
        Some(nb)
    );
    assert!(
        pre.header("access-control-allow-headers")
            .is_some_and(|h| h.contains("content-type") && h.contains("authorization")),
        "{pre:?}"
    );

    // DNS rebinding: the attacker's name in Host is refused, even with the token.
    for host in [
        "evil.example.com",
        "evil.example.com:7070",
        "rebind.attacker.net",
    ] {
        for (method, path) in [
            ("GET", "/admin/status"),
            ("GET", "/v1/models"),
            ("GET", "/"),
        ] {
            let r = node.req(
                method,
                path,
                &[("Host", host), ("Authorization", &auth)],
                "",
            );
            assert_eq!(r.status, 403, "{host} {path}: {r:?}");
        }
    }
    // IP addresses, localhost and listed names are fine.
    for host in [
        "localhost",
        "127.0.0.1",
        "pi-07.local:7070",
        "192.168.1.7:7070",
    ] {
        let r = node.req(
            "GET",
            "/admin/status",
            &[("Host", host), ("Authorization", &auth)],
            "",
        );
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
}

#[test]
fn a_fifth_concurrent_pull_is_refused_with_retry_after() {
    let d = tempfile::tempdir().expect("tempdir");
    let node = Daemon::start(d.path(), "[api]\nmax_pulls = 4\n");
    let auth = format!("Bearer {}", node.token());
    // Ids no peer has: each download keeps looking for a manifest (no peers here).
    let ids: Vec<String> = (1..=5u8).map(|i| hex::encode([i; 32])).collect();
    let pull = |id: &str| {
        node.req(
            "POST",
            "/admin/pull",
            &[JSON, ("Authorization", &auth)],
            &format!(r#"{{"artifact":"{id}"}}"#),
        )
    };
    for id in &ids[..4] {
        let r = pull(id);
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_ne!(v["progress"]["phase"], "failed", "{r:?}");
    }
    // The four are still running when the fifth comes.
    for id in &ids[..4] {
        let r = node.req(
            "GET",
            &format!("/admin/pull/{id}"),
            &[("Authorization", &auth)],
            "",
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert!(
            !["done", "failed"].contains(&v["phase"].as_str().unwrap_or("")),
            "{r:?}"
        );
    }
    let r = pull(&ids[4]);
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after").as_deref(), Some("5"), "{r:?}");
    assert!(r.body.contains("api.max_pulls"), "{r:?}");
    // Joining a running download needs no new slot.
    assert_eq!(pull(&ids[0]).status, 200);
    // An over-long artifact is refused at the edge.
    let long = "a".repeat(70_000);
    assert_eq!(pull(&long).status, 400);
}

/// Reads from `s` until the server closes it (Ok) or `limit` passes (Err).
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("still open after {limit:?}: {e}")),
        }
    }
}

#[test]
fn slow_headers_slow_bodies_and_idle_connections_are_closed() {
    let d = tempfile::tempdir().expect("tempdir");
    let node = Daemon::start(
        d.path(),
        "[api]\nheader_timeout = \"300ms\"\nbody_timeout = \"300ms\"\nidle_timeout = \"600ms\"\n",
    );
    // The server closes each of these; the limit only keeps a broken build from hanging the test.
    let limit = Duration::from_secs(30);
    // Half a header, then nothing.
    let mut s = TcpStream::connect(&node.api).expect("connect");
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow:")
        .expect("send");
    let got = wait_closed(&mut s, limit).expect("half a header");
    assert!(
        got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 4"),
        "{got:?}"
    );
    // A connection that never sends a byte.
    let mut s = TcpStream::connect(&node.api).expect("connect");
    wait_closed(&mut s, limit).expect("silent connection");
    // A keep-alive connection, idle after its answer.
    let mut s = TcpStream::connect(&node.api).expect("connect");
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send");
    let got = wait_closed(&mut s, limit).expect("idle keep-alive");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // A body that stops halfway: an error answer, then the connection closes.
    let mut s = TcpStream::connect(&node.api).expect("connect");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .expect("send");
    let got = wait_closed(&mut s, limit).expect("slow body");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    // A request sent in time is served as before.
    let r = node.req("GET", "/v1/models", &[], "");
    assert_eq!(r.status, 200);
}

/// The Python script: the official `openai` client with and without the key.
const OPENAI_SCRIPT: &str = r#"
import sys, openai
from openai import OpenAI
base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
ok = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
ids = [m.id for m in ok.models.list()]
r = ok.chat.completions.create(model=model, max_tokens=4, temperature=0,
    messages=[{"role": "user", "content": "Name one colour."}])
assert r.choices[0].message.content, r
for bad in ["sk-wrong", "sk-local"]:
    try:
        OpenAI(base_url=base, api_key=bad, max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
try:
    OpenAI(base_url=base, api_key=bad, max_retries=0).chat.completions.create(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("a chat with a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
print("ALL OK")
"#;

#[test]
fn a_keys_file_makes_the_openai_routes_need_a_key() {
    if !crate::util::python_has("openai") {
        return;
    }
    let Some(model) = demo_model() else {
        return;
    };
    let d = tempfile::tempdir().expect("tempdir");
    let home = d.path();
    let data = home.join("data");
    let o = run(
        home,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--json",
            "add",
            model.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = v["id"]
        .as_str()
        .or_else(|| v.as_str())
        .expect("artifact id")
        .to_owned();
    let keys = home.join("api-keys");
    std::fs::write(&keys, "# room 12\nsk-class-12-alpha\n\nsk-class-12-beta\n").expect("write");
    let node = Daemon::start(
        home,
        &format!(
            "[api]\nkeys_file = {:?}\n[response_cache]\nbudget = \"0\"\n",
            keys.to_str().expect("utf-8")
        ),
    );
    // Without a key, and with a wrong one: 401 in the OpenAI error shape.
    for auth in [None, Some("Bearer sk-nope")] {
        let mut h = vec![];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        let r = node.req("GET", "/v1/models", &h, "");
        assert_eq!(r.status, 401, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{r:?}");
    }
    // The admin token is accepted too (the node's owner).
    let r = node.req(
        "GET",
        "/v1/models",
        &[("Authorization", &format!("Bearer {}", node.token()))],
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let base = format!("http://{}/v1", node.api);
    let out = Command::new("python3")
        .args(["-c", OPENAI_SCRIPT, &base, &id, "sk-class-12-beta"])
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_empty_data_dir_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("shoal.toml");
    std::fs::write(&cfg, "data_dir = \"\"\n").expect("write");
    let o = run(d.path(), &["--config", cfg.to_str().expect("utf-8"), "ls"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("data_dir is empty"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(d.path(), &["--data-dir", "", "ls"]);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        !d.path().join("objects").exists(),
        "nothing was made in the current directory"
    );
}
