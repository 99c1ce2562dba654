//! The network-namespace scenarios of `scripts/testnet.sh`, run against this
//! build's `shoal` binary: real daemons in namespaces on a bridge with
//! rate-limited links and mDNS discovery. Needs root; skips loudly otherwise.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn netns_scenarios() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!!!!!!! SKIPPED netns_scenarios: network namespaces need root !!!!!!!!");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("bash")
        .arg(root.join("scripts/testnet.sh"))
        .env("SHOAL", env!("CARGO_BIN_EXE_shoal"))
        .env("NODES", "4")
        .env("SIZE_MB", "16")
        .env("WAIT_SECS", "120")
        .status()
        .expect("run scripts/testnet.sh");
    assert!(
        status.success(),
        "netns scenarios failed (see the log above)"
    );
}

/// Discovery under cold starts (issue 14, item 8): three cold starts of four
/// nodes with mDNS on one bridge, each node connected to all the others
/// within 5 s of the last one answering (the bound, not a
/// benchmark); and peers found by mDNS whose first dial failed are redialled.
#[test]
fn netns_discovery_cold_starts() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "!!!!!!!! SKIPPED netns_discovery_cold_starts: network namespaces need root !!!!!!!!"
        );
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("bash")
        .arg(root.join("scripts/testnet.sh"))
        .args(["discovery-soak", "discovery-redial"])
        .env("SHOAL", env!("CARGO_BIN_EXE_shoal"))
        .env("NODES", "4")
        .env("STARTS", "3")
        .env("DISCOVERY_SECS", "5")
        .env("WAIT_SECS", "60")
        .status()
        .expect("run scripts/testnet.sh");
    assert!(
        status.success(),
        "netns discovery scenarios failed (see the log above)"
    );
}
