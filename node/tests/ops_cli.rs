//! `shoal config show` and `shoal import` through the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn shoal(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("cfg"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().expect("run shoal")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "shoal failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn config_show_merges_file_env_and_flags() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("shoal.toml");
    std::fs::write(
        &cfg,
        "[store]\nquota = \"10G\"\npartial_ttl = \"2h\"\n[api]\nlisten = \"0.0.0.0:8080\"\n",
    )
    .expect("write");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    // File only.
    let out = stdout(&shoal(
        d.path(),
        &["config", "show", "--config", cfg_s],
        &[],
    ));
    assert!(out.contains("quota = \"10G\""), "{out}");
    assert!(out.contains("partial_ttl = \"2h\""), "{out}");
    assert!(out.contains("listen = \"0.0.0.0:8080\""), "{out}");
    assert!(out.contains("# Environment: SHOAL_STORE_QUOTA"), "{out}");
    // Environment over file; flags over environment.
    let out = stdout(&shoal(
        d.path(),
        &["config", "show", "--config", cfg_s, "--store-quota", "30G"],
        &[
            ("SHOAL_API", "127.0.0.1:9999"),
            ("SHOAL_PEERS", "/ip4/127.0.0.1/tcp/7101"),
        ],
    ));
    assert!(out.contains("quota = \"30G\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:9999\""), "{out}");
    assert!(
        out.contains("peers = [\"/ip4/127.0.0.1/tcp/7101\"]"),
        "{out}"
    );
    // SHOAL_CONFIG names the file when --config is absent; JSON output works.
    let out = stdout(&shoal(
        d.path(),
        &["--json", "config", "show"],
        &[("SHOAL_CONFIG", cfg_s)],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["store"]["quota"], "10G");
}

#[test]
fn config_errors_name_the_line() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("bad.toml");
    std::fs::write(&cfg, "# comment\n[kv]\nblock_size = 16\ndtype = \"f32\"\n").expect("write");
    let o = shoal(
        d.path(),
        &["config", "show", "--config", cfg.to_str().expect("utf-8")],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.toml:4:9:"), "{err}");
}
