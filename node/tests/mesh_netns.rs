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
