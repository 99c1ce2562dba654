//! Issue 18, item 2, on the real binary: `/v1/models` of a fresh
//! `shoal serve` through the official `openai` Python client, and the store
//! commands beside a running daemon (through its admin API): the same
//! output as run directly, a refused token, a daemon that cannot be reached.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::demo_model;

/// The `shoal` binary with a clean environment rooted at `home`, on `home/data`.
fn shoal(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.current_dir(home)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("cfg"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") {
            c.env_remove(k);
        }
    }
    c.env("SHOAL_DATA_DIR", home.join("data"));
    c
}

fn run(home: &Path, args: &[&str]) -> Output {
    shoal(home).args(args).output().expect("run shoal")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts `shoal serve` on `home`'s data dir.
fn start_daemon(home: &Path) -> crate::util::ServeChild {
    crate::util::ServeChild::spawn(shoal(home))
}

/// A copy of the demo model with a byte appended: another artifact.
fn other_model(home: &Path, model: &Path) -> PathBuf {
    let p = home.join("other.gguf");
    let mut b = std::fs::read(model).expect("read");
    b.push(0);
    std::fs::write(&p, b).expect("write");
    p
}

/// Lists the models with the official client; prints `id state artifact` per model.
const LIST_SCRIPT: &str = r#"
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused")
for m in c.models.list().data:
    extra = m.model_extra or {}
    print(m.id, extra["shoal"]["state"], extra["shoal"]["artifact"], extra["shoal"]["servable"])
"#;

fn list_models(api: &str) -> Vec<Vec<String>> {
    let o = Command::new("python3")
        .args(["-c", LIST_SCRIPT, &format!("http://{api}/v1")])
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("python3");
    assert!(o.status.success(), "the openai client failed: {}", err(&o));
    out(&o)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn a_fresh_daemon_lists_its_named_models_to_the_openai_client() {
    if !crate::util::python_has("openai") {
        return;
    }
    let Some(model) = demo_model() else {
        return;
    };
    let d = tempfile::tempdir().expect("tmp");
    let home = d.path();
    let m = model.to_str().expect("utf-8");
    let o = run(home, &["add", m, "--name", "smol:q4"]);
    assert!(o.status.success(), "{}", err(&o));
    let id = out(&o).trim().to_owned();
    // A second trusted name for the same bytes: listed once each, and the id
    // is not repeated in hex.
    let o = run(home, &["publish", &id, "--name", "smol:latest"]);
    assert!(o.status.success(), "{}", err(&o));
    let node = start_daemon(home);
    let mut got = list_models(&node.api);
    got.sort();
    assert_eq!(
        got,
        vec![
            vec![
                "smol:latest".to_owned(),
                "local".into(),
                id.clone(),
                "True".into()
            ],
            vec![
                "smol:q4".to_owned(),
                "local".into(),
                id.clone(),
                "True".into()
            ],
        ],
        "a fresh node lists every name of its model before any use"
    );
}

#[test]
fn store_commands_beside_a_running_daemon() {
    let Some(model) = demo_model() else {
        return;
    };
    let d = tempfile::tempdir().expect("tmp");
    let home = d.path();
    let m = model.to_str().expect("utf-8");
    let o = run(home, &["add", m, "--name", "smol:q4"]);
    assert!(o.status.success(), "{}", err(&o));
    let id = out(&o).trim().to_owned();
    other_model(home, &model);

    // Direct runs first (no daemon): the reference output.
    let direct: Vec<(Vec<&str>, Output)> = [
        vec!["ls"],
        vec!["--json", "ls"],
        vec!["show", "smol:q4"],
        vec!["--json", "show", "smol:q4"],
        vec!["verify", "smol:q4"],
        vec!["pin", "smol:q4"],
        vec!["unpin", "smol:q4"],
        vec!["gc"],
        vec!["rm", "no-such-model"],
    ]
    .into_iter()
    .map(|a| {
        let o = run(home, &a);
        (a, o)
    })
    .collect();

    let node = start_daemon(home);
    // Directly the store is refused (the daemon holds it): `keygen` does not
    // go through the daemon.
    let o = run(home, &["trust", "ls"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("in use by another process"), "{}", err(&o));
    for (args, want) in &direct {
        let got = run(home, args);
        assert_eq!(
            got.status.code(),
            want.status.code(),
            "{args:?}: exit code; stderr {}",
            err(&got)
        );
        if args[0] == "--json" {
            assert_eq!(json(&got), json(want), "{args:?}: same output");
        } else if want.status.success() {
            assert_eq!(out(&got), out(want), "{args:?}: same output");
        } else {
            assert!(err(&got).contains("unknown artifact"), "{}", err(&got));
        }
    }
    // add (a file path relative to the caller) and rm through the daemon.
    let o = shoal(home)
        .current_dir(home)
        .args(["add", "other.gguf", "--name", "other:v1"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", err(&o));
    let other_id = out(&o).trim().to_owned();
    assert_eq!(other_id.len(), 64);
    let ls = out(&run(home, &["ls"]));
    assert!(ls.contains("other:v1") && ls.contains("smol:q4"), "{ls}");
    // The daemon serves what was added through it at once.
    let r = ureq_models(&node.api);
    assert!(r.contains("other:v1"), "{r}");
    let o = run(home, &["rm", "other:v1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).starts_with(&format!("removed {other_id} (")),
        "{}",
        out(&o)
    );

    // import (a directory relative to the caller) through the daemon.
    std::fs::create_dir(home.join("imp")).expect("mkdir");
    std::fs::rename(
        home.join("other.gguf"),
        home.join("imp").join("class-model.gguf"),
    )
    .expect("mv");
    let o = run(home, &["import", "imp"]);
    assert!(o.status.success(), "{}", err(&o));
    let line = out(&o);
    assert!(
        line.starts_with(&other_id[..12]) && line.contains("class-model"),
        "{line}"
    );
    let ls = out(&run(home, &["ls"]));
    assert!(ls.contains(&other_id[..12]), "{ls}");
    let o = run(home, &["rm", &other_id]);
    assert!(o.status.success(), "{}", err(&o));

    // A wrong token: refused, exit code 1, and the message says why.
    let bad = home.join("bad.token");
    std::fs::write(&bad, "x".repeat(64)).expect("write");
    let o = shoal(home)
        .env("SHOAL_ADMIN_TOKEN_FILE", &bad)
        .args(["ls"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("401"), "{}", err(&o));

    // The daemon's API cannot be reached (a stale address while the store
    // is still locked): a clear error, exit code 1.
    let addr_file = home.join("data").join("api.addr");
    let real = std::fs::read_to_string(&addr_file).expect("api.addr");
    assert_eq!(real.trim(), node.api);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    std::fs::write(&addr_file, format!("127.0.0.1:{port}\n")).expect("write");
    let o = run(home, &["ls"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("cannot reach the shoal daemon"),
        "{}",
        err(&o)
    );
    std::fs::write(&addr_file, real).expect("write");

    // Daemon gone: the commands open the store themselves again.
    drop(node);
    let o = run(home, &["ls"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), out(&direct[0].1));
    assert!(out(&o).contains(&id[..12]));
}

/// The JSON output without `last_used` (which reading may change).
fn json(o: &Output) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    if let Some(a) = v.as_array_mut() {
        for e in a {
            if let Some(m) = e.as_object_mut() {
                m.remove("last_used");
            }
        }
    }
    v
}

/// `GET /v1/models` with a raw request (no client library).
fn ureq_models(api: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).expect("connect");
    write!(
        s,
        "GET /v1/models HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut b = String::new();
    s.read_to_string(&mut b).expect("read");
    b
}
