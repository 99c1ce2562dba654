//! Drives the real `shoal` binary: store commands, their errors, and crashes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shoal(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.env("SHOAL_DATA_DIR", data)
        .env_remove("SHOAL_STORE_QUOTA");
    c
}

fn run(data: &Path, args: &[&str]) -> Output {
    shoal(data).args(args).output().expect("run shoal")
}

fn ok(data: &Path, args: &[&str]) -> String {
    let o = run(data, args);
    assert!(
        o.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf8")
}

fn fails(data: &Path, args: &[&str]) -> String {
    let o = run(data, args);
    assert!(!o.status.success(), "shoal {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A synthetic GGUF (tensor sizes in bytes), written with the library's writer.
fn gguf(path: &Path, sizes: &[usize], seed: u8) -> Vec<u8> {
    use shoal::gguf::writer::{TensorSpec, write};
    use shoal::gguf::{GgmlType, Value};
    let tensors: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec {
            name: format!("blk.{i}.weight"),
            dims: vec![n as u64],
            ty: GgmlType::I8,
            data: (0..n)
                .map(|k| {
                    (k as u8)
                        .wrapping_mul(31)
                        .wrapping_add(seed)
                        .wrapping_add(i as u8)
                })
                .collect(),
        })
        .collect();
    let b = write(
        &[("general.architecture", Value::String("llama".into()))],
        &tensors,
    );
    std::fs::write(path, &b).expect("write gguf");
    b
}

fn ls_json(data: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&ok(data, &["ls", "--json"]))
        .expect("json")
        .as_array()
        .cloned()
        .expect("array")
}

#[test]
fn add_ls_show_verify_and_corruption() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("m.gguf");
    let bytes = gguf(&f, &[1_500_000, 300_000], 1);
    let out = ok(
        &data,
        &["add", f.to_str().expect("p"), "--name", "tiny:v1", "--pin"],
    );
    let id = out.trim().to_string();
    assert_eq!(id.len(), 64);
    let ls = ls_json(&data);
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0]["names"][0], "tiny:v1");
    assert_eq!(ls[0]["pinned"], true);
    let show: serde_json::Value =
        serde_json::from_str(&ok(&data, &["show", "tiny:v1", "--json"])).expect("json");
    assert_eq!(show["id"], id.as_str());
    assert_eq!(show["blake3"], blake3::hash(&bytes).to_hex().as_str());
    let chunks = show["chunks"].as_array().expect("chunks");
    assert!(chunks.len() >= 3);
    assert!(ok(&data, &["verify"]).contains("ok"));

    // Flip a byte inside chunk 2: verify names it and exits non-zero.
    let off = chunks[2]["offset"].as_u64().expect("offset");
    let obj = data.join("objects").join(&id);
    let mut p = std::fs::metadata(&obj).expect("meta").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    p.set_readonly(false);
    std::fs::set_permissions(&obj, p).expect("chmod");
    let mut b = std::fs::read(&obj).expect("read");
    b[off as usize + 5] ^= 0xff;
    std::fs::write(&obj, &b).expect("write");
    let err = fails(&data, &["verify", &id]);
    assert!(
        err.contains("chunk 2") && err.contains(&format!("offset {off}")),
        "{err}"
    );
    // It is marked corrupt: `ls` says so.
    let ls = ls_json(&data);
    assert_eq!(ls[0]["corrupt"], serde_json::json!([2]));
    assert!(ok(&data, &["ls"]).contains("CORRUPT"));

    // rm, then unknown id.
    ok(&data, &["unpin", &id]);
    ok(&data, &["rm", &id]);
    assert!(ls_json(&data).is_empty());
    let err = fails(&data, &["show", &id]);
    assert!(err.contains("unknown artifact"), "{err}");
}

#[test]
fn bad_inputs_get_clear_errors_and_change_nothing() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let err = fails(&data, &["add", "/nonexistent/model.gguf"]);
    assert!(err.contains("no such file"), "{err}");
    let fake = t.path().join("fake.gguf");
    std::fs::write(&fake, b"this is not a model").expect("w");
    let err = fails(&data, &["add", fake.to_str().expect("p")]);
    assert!(err.contains("not a GGUF"), "{err}");
    let good = t.path().join("good.gguf");
    let b = gguf(&good, &[100_000, 100_000], 2);
    let trunc = t.path().join("trunc.gguf");
    std::fs::write(&trunc, &b[..b.len() - 1000]).expect("w");
    let err = fails(&data, &["add", trunc.to_str().expect("p")]);
    assert!(err.contains("truncated GGUF"), "{err}");
    let err = fails(&data, &["show", "no-such-name"]);
    assert!(err.contains("unknown artifact"), "{err}");
    let err = fails(&data, &["trust", "add", "zz"]);
    assert!(err.contains("key"), "{err}");
    assert!(ls_json(&data).is_empty());
}

#[test]
fn trust_keygen_publish() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("m.gguf");
    gguf(&f, &[10_000], 3);
    let id = ok(&data, &["add", f.to_str().expect("p")])
        .trim()
        .to_string();
    let err = fails(&data, &["publish", &id, "--name", "m:v1"]);
    assert!(err.contains("keygen"), "{err}");
    let pk = ok(&data, &["keygen"]).trim().to_string();
    assert!(ok(&data, &["trust", "ls"]).contains(&pk));
    assert!(ok(&data, &["publish", &id, "--name", "m:v1"]).contains("seq 1"));
    assert!(ok(&data, &["publish", &id, "--name", "m:v1"]).contains("seq 2"));
    let err = fails(&data, &["publish", &id, "--name", "Bad Name"]);
    assert!(err.contains("invalid release name"), "{err}");
    ok(&data, &["trust", "rm", &pk]);
    let err = fails(&data, &["show", "m:v1"]);
    assert!(err.contains("not in the trust store"), "{err}");
}

/// Waits for the child to print a line matching `pred`, returning it.
fn wait_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    for l in lines.by_ref() {
        let l = l.expect("line");
        if pred(&l) {
            return l;
        }
        assert!(Instant::now() < deadline, "timed out waiting for output");
    }
    panic!("child ended before the expected line");
}

#[test]
fn sigkill_while_writing_chunks_keeps_verified_chunks_and_resumes() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("big.gguf");
    let bytes = gguf(&f, &[8 << 20, 6 << 20, 3 << 20, 1 << 20], 4);
    let mut child = shoal(&data)
        .args([
            "debug-fill",
            f.to_str().expect("p"),
            "--delay-ms",
            "30",
            "--flush-every",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let flushed = wait_line(&mut lines, |l| {
        l.strip_prefix("flushed ")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 6)
    });
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("wait");
    let flushed: u32 = flushed["flushed ".len()..].parse().expect("n");

    // The store reopens; the artifact is partial and invisible.
    let ls = ls_json(&data);
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0]["status"], "Partial");
    assert!(ls[0]["present_chunks"].as_u64().expect("n") >= u64::from(flushed));
    // Present chunks all verify.
    ok(&data, &["verify"]);
    // Retry completes, resuming from what was there.
    let out = ok(&data, &["debug-fill", f.to_str().expect("p")]);
    let present: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("present "))
        .and_then(|n| n.parse().ok())
        .expect("present line");
    assert!(
        present >= flushed,
        "lost verified chunks: {present} < {flushed}"
    );
    let wrote = out.lines().filter(|l| l.starts_with("wrote ")).count() as u32;
    let total = ls[0]["chunks"].as_u64().expect("chunks") as u32;
    assert_eq!(wrote + present, total, "a verified chunk was written twice");
    assert!(out.contains("done"));
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("id "))
        .expect("id")
        .to_string();
    assert_eq!(
        std::fs::read(data.join("objects").join(id)).expect("object"),
        bytes
    );
    ok(&data, &["verify"]);
}

#[test]
fn sigkill_while_adding_leaves_a_working_store() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("big.gguf");
    let bytes = gguf(&f, &[96 << 20, 64 << 20], 5);
    ok(&data, &["ls"]); // create the store
    for delay in [5u64, 40, 150] {
        let mut child = shoal(&data)
            .args(["add", f.to_str().expect("p")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        child.wait().expect("wait");
        // Reopens; whatever is listed is complete and verifies.
        for a in ls_json(&data) {
            assert_eq!(a["status"], "Active");
        }
        ok(&data, &["verify"]);
    }
    let id = ok(&data, &["add", f.to_str().expect("p")])
        .trim()
        .to_string();
    assert_eq!(
        std::fs::read(data.join("objects").join(&id)).expect("object"),
        bytes
    );
    assert_eq!(std::fs::read_dir(data.join("tmp")).expect("tmp").count(), 0);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(data.join("objects"))
        .expect("objects")
        .map(|e| e.expect("e").path())
        .collect();
    assert_eq!(leftovers.len(), 1);
}

/// The demo model if present (the real case), else a synthetic GGUF.
fn a_model(dir: &Path) -> PathBuf {
    let p = crate::util::expected_demo_model();
    if p.exists() {
        return p;
    }
    let f = dir.join("m.gguf");
    gguf(&f, &[1_500_000, 300_000], 9);
    f
}

fn flip_first_journal_byte(data: &Path) {
    let j = data.join("meta").join("0.jnl");
    let mut b = std::fs::read(&j).expect("journal");
    b[0] ^= 0xff;
    std::fs::write(&j, &b).expect("write journal");
}

#[test]
fn a_flipped_journal_byte_loses_no_model_and_fsck_restores_the_name() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let model = a_model(t.path());
    let id = ok(
        &data,
        &[
            "add",
            model.to_str().expect("p"),
            "--name",
            "smol:q4",
            "--pin",
        ],
    )
    .trim()
    .to_string();
    flip_first_journal_byte(&data);
    // A plain `ls` keeps the model: re-verified and listed again.
    let ls = ls_json(&data);
    assert!(ls.iter().any(|a| a["id"] == id.as_str()), "{ls:?}");
    let obj = data.join("objects").join(&id);
    assert_eq!(
        std::fs::read(&obj).expect("the object is still there"),
        std::fs::read(&model).expect("model")
    );
    // fsck: nothing lost, the name is back, it verifies.
    let out = ok(&data, &["fsck"]);
    assert!(out.contains("ok"), "{out}");
    let show: serde_json::Value =
        serde_json::from_str(&ok(&data, &["show", "smol:q4", "--json"])).expect("json");
    assert_eq!(show["id"], id.as_str());
    ok(&data, &["verify"]);
}

#[test]
fn metadata_that_cannot_open_is_explained_and_fsck_rebuilds_it() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("m.gguf");
    let bytes = gguf(&f, &[1_500_000, 300_000], 4);
    let id = ok(&data, &["add", f.to_str().expect("p"), "--name", "tiny:v1"])
        .trim()
        .to_string();
    let meta = data.join("meta");
    std::fs::remove_dir_all(&meta).expect("rm meta");
    std::fs::write(&meta, b"not a database").expect("meta file");
    let err = fails(&data, &["ls"]);
    assert!(
        err.contains("shoal fsck") && err.contains("damaged"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(data.join("objects").join(&id)).expect("object"),
        bytes
    );
    let out = ok(&data, &["fsck"]);
    assert!(
        out.contains("moved aside") && out.contains("restored name tiny:v1"),
        "{out}"
    );
    // The damaged copy is kept.
    let aside: Vec<_> = std::fs::read_dir(&data)
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("meta.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).expect("aside"),
        b"not a database"
    );
    let ls = ls_json(&data);
    assert_eq!(ls[0]["id"], id.as_str());
    assert_eq!(ls[0]["names"][0], "tiny:v1");
    ok(&data, &["verify"]);
}

#[test]
fn files_the_store_cannot_account_for_fail_verify_and_fsck() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    let f = t.path().join("m.gguf");
    gguf(&f, &[200_000], 5);
    ok(&data, &["add", f.to_str().expect("p")]);
    let junk = data.join("objects").join("ab".repeat(32));
    std::fs::write(&junk, b"not what its name says").expect("junk");
    ok(&data, &["ls"]);
    assert!(!junk.exists());
    let err = fails(&data, &["verify"]);
    assert!(err.contains("lost+found"), "{err}");
    let err = fails(&data, &["fsck"]);
    assert!(err.contains("lost+found"), "{err}");
    let lf: Vec<_> = std::fs::read_dir(data.join("lost+found"))
        .expect("lost+found")
        .flatten()
        .collect();
    assert_eq!(lf.len(), 1);
    assert_eq!(
        std::fs::read(lf[0].path()).expect("kept"),
        b"not what its name says"
    );
}

#[test]
fn huge_names_get_a_clear_error_not_a_panic() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    for arg in ["a".repeat(70_000), "ab".repeat(35_000)] {
        for cmd in ["show", "pin", "rm", "verify"] {
            let err = fails(&data, &[cmd, &arg]);
            assert!(err.contains("bytes long"), "{cmd}: {err}");
            assert!(!err.contains("panicked"), "{cmd}: {err}");
        }
    }
}
