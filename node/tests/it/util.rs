//! Helpers shared by the binary's tests.

#[path = "../../../tests/it/util/demo.rs"]
mod demo;

/// The demo model ([`demo::demo_model_path`]: the workspace's one lookup);
/// `None` (the test is skipped) when it is missing, except under `CI=true`,
/// where a missing model fails.
pub use demo::demo_model_path as demo_model;
/// Where the demo model is expected, whether or not it is there.
pub use demo::expected_demo_model;

/// The stderr lines of a spawned daemon after its API announcement.
pub type StderrLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Reads a spawned `shoal serve`'s stderr (which must be piped) until it
/// announces its API; returns the address and the lines that follow (the
/// caller drains or keeps them, so the daemon never blocks on a full
/// pipe). Kills the child and panics if it exits first.
pub fn api_address(child: &mut std::process::Child) -> (String, StderrLines) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("shoal serve exited before announcing its API");
        };
        if let Some(rest) = line.split("API on http://").nth(1) {
            return (rest.trim().to_owned(), lines);
        }
    }
}

/// [`api_address`], the rest of stderr drained on a thread of its own.
pub fn announced_api(child: &mut std::process::Child) -> String {
    let (api, lines) = api_address(child);
    std::thread::spawn(move || for _ in lines {});
    api
}

/// Whether `python3` can import `module` (an official client library a test
/// drives a daemon with). Missing, the test is skipped with a loud message,
/// except under `CI=true`, where it fails: `.ci/run` installs them.
pub fn python_has(module: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the Python {module} package is missing (python3 -m pip install {module})"
        );
        eprintln!(
            "SKIPPING: the Python `{module}` package is missing (python3 -m pip install {module})"
        );
    }
    ok
}

/// A `shoal serve` child on loopback (mDNS off, mesh and API ports picked by
/// the OS), killed and reaped when dropped.
pub struct ServeChild {
    /// The process.
    pub child: std::process::Child,
    /// `host:port` of its HTTP API.
    pub api: String,
}

impl ServeChild {
    /// Runs `cmd` (a `shoal` command with its global options) as `serve` on
    /// loopback and waits for its API announcement; stderr is drained.
    pub fn spawn(mut cmd: std::process::Command) -> ServeChild {
        let mut child = cmd
            .args(["serve", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--api", "127.0.0.1:0"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn shoal serve");
        let api = announced_api(&mut child);
        ServeChild { child, api }
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
