//! The systemd units in scripts/systemd pass `systemd-analyze verify` (with the
//! binary path pointed at this build), carry the hardening the docs promise,
//! and score as well hardened by `systemd-analyze security --offline`.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 3] = [
    "shoal.service",
    "shoal-prefetch.service",
    "shoal-prefetch.timer",
];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd")
}

/// `None` (loudly) when systemd-analyze is missing outside CI; a failure in CI.
fn systemd_analyze() -> Option<&'static str> {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some("systemd-analyze");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("systemd-analyze is missing: apt-get install systemd");
    }
    eprintln!("SKIPPING: systemd-analyze not found (apt-get install systemd)");
    None
}

/// Copies the units to a temporary directory with ExecStart pointing at this build.
fn staged() -> (tempfile::TempDir, Vec<PathBuf>) {
    let d = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_shoal");
    let paths = UNITS
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(units_dir().join(u)).expect("read unit");
            let p = d.path().join(u);
            std::fs::write(&p, text.replace("/usr/local/bin/shoal", bin)).expect("write unit");
            p
        })
        .collect();
    (d, paths)
}

fn verify(tool: &str, paths: &[PathBuf]) -> (bool, String) {
    let out = Command::new(tool)
        .args(["verify", "--man=no"])
        .args(paths)
        .output()
        .expect("systemd-analyze verify");
    let msg =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), msg)
}

#[test]
fn units_verify_cleanly() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let (_d, paths) = staged();
    let (ok, msg) = verify(tool, &paths);
    assert!(ok, "systemd-analyze verify failed:\n{msg}");
    // Unknown keys are only warnings to systemd: any output is a failure here.
    assert!(
        msg.trim().is_empty(),
        "systemd-analyze verify complained:\n{msg}"
    );

    // The check can fail: a misspelt key and a missing binary are both caught.
    let bad = paths[0].with_file_name("bad.service");
    let text = std::fs::read_to_string(&paths[0]).expect("read");
    std::fs::write(&bad, text.replace("ProtectSystem=", "ProtectSytem=")).expect("write");
    let (_, msg) = verify(tool, std::slice::from_ref(&bad));
    assert!(msg.contains("Unknown key"), "{msg}");
    std::fs::write(
        &bad,
        text.replace(env!("CARGO_BIN_EXE_shoal"), "/nonexistent/shoal"),
    )
    .expect("write");
    let (ok, _) = verify(tool, &[bad]);
    assert!(!ok, "a unit whose binary is missing verified");
}

/// Every ExecStart names a subcommand and flags this binary accepts.
#[test]
fn exec_start_commands_exist() {
    for u in UNITS {
        let text = std::fs::read_to_string(units_dir().join(u)).expect("read unit");
        for line in text.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some("/usr/local/bin/shoal"), "{u}: {line}");
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
                .args(words)
                .arg("--help")
                .output()
                .expect("run shoal");
            assert!(
                out.status.success(),
                "{u}: `{line} --help` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn units_are_hardened() {
    let read = |u: &str| std::fs::read_to_string(units_dir().join(u)).expect("read unit");
    let main = read("shoal.service");
    for line in [
        "DynamicUser=yes",
        "StateDirectory=shoal",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/shoal serve --config /etc/shoal/shoal.toml",
    ] {
        assert!(
            main.lines().any(|l| l == line),
            "shoal.service lacks {line}"
        );
    }
    let prefetch = read("shoal-prefetch.service");
    assert!(prefetch.lines().any(|l| l == "Type=oneshot"));
    assert!(
        prefetch
            .lines()
            .any(|l| l.starts_with("ExecStart=/usr/local/bin/shoal prefetch"))
    );
    let timer = read("shoal-prefetch.timer");
    assert!(timer.lines().any(|l| l.starts_with("OnCalendar=")));

    let Some(tool) = systemd_analyze() else {
        return;
    };
    let (_d, paths) = staged();
    // Exposure 0 (locked down) … 10 (unsafe); --threshold is in tenths.
    let out = Command::new(tool)
        .args(["security", "--offline=true", "--threshold=25", "--no-pager"])
        .arg(&paths[0])
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "shoal.service exposure is above 2.5:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
