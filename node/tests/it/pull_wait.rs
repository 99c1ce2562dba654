//! `shoal pull` on a node that has no peer yet (issue 14, item 8): it says
//! "waiting for peers" and keeps waiting, up to `--timeout`, for a peer that
//! holds the artifact, instead of failing at once. Real daemons on loopback
//! (mDNS off, static peers), the real `shoal` binary.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn shoal(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.env("SHOAL_DATA_DIR", data)
        .env_remove("SHOAL_STORE_QUOTA")
        .env_remove("SHOAL_API")
        .env_remove("SHOAL_PEERS");
    c
}

/// A free loopback TCP port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A daemon killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data: &Path, api: u16, mesh: u16, peers: &[String]) -> Daemon {
    let mut c = shoal(data);
    c.args([
        "serve",
        "--no-mdns",
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{mesh}"),
        "--api",
        &format!("127.0.0.1:{api}"),
    ]);
    for p in peers {
        c.args(["--peer", p]);
    }
    let d = Daemon(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    // Bounded wait until its API answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = shoal(data)
            .args(["status", "--api", &format!("127.0.0.1:{api}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("status")
            .success();
        if ok {
            return d;
        }
        assert!(Instant::now() < deadline, "daemon never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn add_random_file(data: &Path, dir: &Path) -> String {
    let f = dir.join("blob.bin");
    let mut bytes = vec![0u8; 3 << 20];
    blake3::Hasher::new()
        .update(b"pull-wait")
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&f, &bytes).expect("write");
    let out = shoal(data)
        .args(["add", f.to_str().expect("path")])
        .output()
        .expect("add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .split_whitespace()
        .next()
        .expect("id")
        .to_owned()
}

#[test]
fn pull_without_peers_waits_then_fails_naming_the_cause() {
    let t = tempfile::tempdir().expect("tmp");
    let a = t.path().join("a");
    let api = free_port();
    let _d = serve(&a, api, free_port(), &[]);
    let id = "ab".repeat(32);
    let out = shoal(&a)
        .args([
            "pull",
            &id,
            "--api",
            &format!("127.0.0.1:{api}"),
            "--timeout",
            "2",
        ])
        .output()
        .expect("pull");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a pull nobody can serve must fail");
    assert!(err.contains("waiting for peers"), "stderr: {err}");
    assert!(err.contains("no peer has the manifest"), "stderr: {err}");
}

#[test]
fn pull_waits_for_a_peer_that_comes_later() {
    let t = tempfile::tempdir().expect("tmp");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let id = add_random_file(&b, t.path());
    let (api_a, mesh_a) = (free_port(), free_port());
    let _da = serve(&a, api_a, mesh_a, &[]);
    // The pull starts while node a has no peer at all.
    let mut pull = shoal(&a)
        .args([
            "pull",
            &id,
            "--api",
            &format!("127.0.0.1:{api_a}"),
            "--timeout",
            "300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pull");
    let mut stderr = BufReader::new(pull.stderr.take().expect("stderr"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("read");
    assert!(first.contains("waiting for peers"), "first line: {first}");
    // Now a peer holding the artifact appears (it dials node a).
    let _db = serve(
        &b,
        free_port(),
        free_port(),
        &[format!("/ip4/127.0.0.1/tcp/{mesh_a}")],
    );
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("read");
    let status = pull.wait().expect("wait");
    assert!(status.success(), "pull failed: {first}{rest}");
    let mut out = String::new();
    pull.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(out.starts_with(&id), "stdout: {out}");
    assert_eq!(
        std::fs::read(a.join("objects").join(&id)).expect("object"),
        std::fs::read(t.path().join("blob.bin")).expect("src")
    );
}
