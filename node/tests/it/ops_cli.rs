//! `shoal config show`, `shoal import` and config switches of `shoal serve`
//! through the real binary.

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

#[test]
fn import_names_models_and_lists_them() {
    use shoal::gguf::writer::{TensorSpec, write};
    use shoal::gguf::{GgmlType, Value};
    let d = tempfile::tempdir().expect("tempdir");
    let models = d.path().join("usb/models");
    std::fs::create_dir_all(&models).expect("mkdir");
    let gguf = write(
        &[("general.architecture", Value::String("llama".into()))],
        &[TensorSpec {
            name: "w".into(),
            dims: vec![64],
            ty: GgmlType::F32,
            data: vec![7; 256],
        }],
    );
    std::fs::write(models.join("Tiny-Chat.Q8_0.gguf"), &gguf).expect("write");
    let data = d.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let models_s = models.to_str().expect("utf-8");
    let dry = stdout(&shoal(
        d.path(),
        &["--data-dir", data_s, "import", "--dry-run", models_s],
        &[],
    ));
    assert!(dry.starts_with("tiny-chat:q8_0\t"), "{dry}");
    assert!(!data.join("objects").exists(), "a dry run touches no store");
    let out = stdout(&shoal(
        d.path(),
        &["--data-dir", data_s, "import", "--pin", models_s],
        &[],
    ));
    assert!(out.contains("tiny-chat:q8_0"), "{out}");
    let ls = stdout(&shoal(
        d.path(),
        &["--data-dir", data_s, "--json", "ls"],
        &[],
    ));
    let v: serde_json::Value = serde_json::from_str(&ls).expect("json");
    assert_eq!(v[0]["names"][0], "tiny-chat:q8_0", "{ls}");
    assert_eq!(v[0]["pinned"], true, "{ls}");
    // Nothing importable: a clear failure.
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let o = shoal(
        d.path(),
        &[
            "--data-dir",
            data_s,
            "import",
            empty.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no GGUF models found"));
}

/// A `shoal serve` child on 127.0.0.1 (mDNS off, ports picked by the OS),
/// killed when dropped.
struct Daemon {
    child: std::process::Child,
    api: String,
    /// The admin API's token, from the node's data dir.
    token: String,
}

impl Daemon {
    fn start(dir: &Path, config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["--data-dir", dir.join("data").to_str().expect("utf-8")])
            .args(["--config", config.to_str().expect("utf-8")])
            .args(["serve", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--api", "127.0.0.1:0"])
            .env("HOME", dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn shoal serve");
        let api = crate::util::announced_api(&mut child);
        let token = std::fs::read_to_string(dir.join("data/admin.token"))
            .expect("the node made its admin token")
            .trim()
            .to_owned();
        Daemon { child, api, token }
    }

    /// Status code of `GET path` (with the admin token).
    fn get_status(&self, path: &str) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.api).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.api, self.token
        )
        .expect("send");
        let mut r = String::new();
        s.read_to_string(&mut r).expect("read");
        r.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn metrics_enabled_switch_is_honoured() {
    let d = tempfile::tempdir().expect("tempdir");
    for (enabled, want) in [(true, 200), (false, 404)] {
        let cfg = d.path().join(format!("shoal-{enabled}.toml"));
        std::fs::write(&cfg, format!("[metrics]\nenabled = {enabled}\n")).expect("write");
        let sub = d.path().join(format!("n-{enabled}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let node = Daemon::start(&sub, &cfg);
        assert_eq!(
            node.get_status("/metrics"),
            want,
            "[metrics] enabled = {enabled}"
        );
        assert_eq!(node.get_status("/admin/status"), 200);
    }
}

/// The daemon must outlive peers that hang up: a write to a socket the other
/// side closed has to fail with EPIPE, not kill it (the short-lived commands
/// keep SIGPIPE's default, for `shoal ls | head`). A liar banned by its
/// peers died of exactly that in the netns liar scenario.
#[test]
fn the_daemon_ignores_sigpipe() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("shoal.toml");
    std::fs::write(&cfg, "async_threads = 1\n").expect("write");
    let node = Daemon::start(d.path(), &cfg);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).expect("/proc status");
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("SigIgn line");
    assert_ne!(ignored & (1 << (SIGPIPE - 1)), 0, "SIGPIPE is not ignored");
    assert_eq!(node.get_status("/admin/status"), 200);
}

/// SIGPIPE's number on Linux.
const SIGPIPE: u32 = 13;
