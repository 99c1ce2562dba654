//! Operations against a live mesh. The dashboard in a real browser: a 3-node loopback mesh (mDNS off, static
//! peers), an artifact added on one node and pulled by another, and headless
//! Chromium (Debian's `chromium`, driven by playwright-core from
//! `scripts/dashboard-test`) loading the puller's dashboard: no console
//! errors, both peers and the artifact shown, a screenshot saved. Also checks
//! `GET /metrics` on the same server.
//!
//! Setup (`.ci/run` does it): `apt-get install chromium nodejs npm` and
//! `npm ci --prefix scripts/dashboard-test`.

use anyhow::{Context, Result, bail};
use shoal::mesh::download::Phase;
use shoal::node::Node;
use shoal::store::{AddOptions, ArtifactId};
use shoal_testnet::{WAIT, make_file, start_mesh, wait_peers};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Chromium and playwright-core, or `None` (loudly) outside CI; in CI a failure.
fn browser_setup() -> Option<PathBuf> {
    let script = repo().join("scripts/dashboard-test/check.mjs");
    let pw = repo().join("scripts/dashboard-test/node_modules/playwright-core");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = [
        (!chromium.exists()).then_some("chromium (apt-get install chromium)"),
        (!node_ok).then_some("node (apt-get install nodejs)"),
        (!pw.exists()).then_some("playwright-core (npm ci --prefix scripts/dashboard-test)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Some(script);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "dashboard test prerequisites missing: {}",
            missing.join(", ")
        );
    }
    eprintln!("SKIPPING dashboard test: missing {}", missing.join(", "));
    None
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

/// Adds `size` bytes on `seed` named `name` by `seed`'s key, which `other` trusts.
async fn seed_named(
    seed: &Node,
    other: &Node,
    dir: &Path,
    size: usize,
    name: &'static str,
) -> Result<ArtifactId> {
    let file = make_file(&dir.join("artifact.bin"), size, size as u64)?;
    let store = seed.store().clone();
    let (id, release) = tokio::task::spawn_blocking(move || -> Result<_> {
        let id = store.add_file(&file, &AddOptions::default())?;
        store.keygen(false)?;
        Ok((id, store.publish(&id, name, None)?))
    })
    .await??;
    seed.mesh().provide(id).await?;
    let store1 = other.store().clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        store1.trust_add(release.publisher, "seed")?;
        store1.apply_release(&release)?;
        Ok(())
    })
    .await??;
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_mesh_in_chromium() -> Result<()> {
    let Some(script) = browser_setup() else {
        return Ok(());
    };
    let nodes = start_mesh(3, |_, _| {}).await?;
    for n in &nodes {
        wait_peers(&n.node, 2).await?;
    }
    let (seed, puller) = (&nodes[0].node, &nodes[1].node);

    // An artifact on node 0, named by node 0's key, which node 1 trusts.
    let dir = tempfile::tempdir()?;
    let id = seed_named(seed, puller, dir.path(), 6 << 20, "demo:v1").await?;
    let (_, mut rx) = puller.pull(&id.to_hex()).await?;
    let done = tokio::time::timeout(
        WAIT,
        rx.wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed)),
    )
    .await
    .context("pull timed out")??
    .clone();
    if done.phase != Phase::Done {
        bail!("pull failed: {:?}", done.error);
    }

    // Node 1's API on its loopback port.
    let addr = nodes[1].api;

    // The snapshot the page renders, and the metrics beside it.
    let (status, state) =
        tokio::task::spawn_blocking(move || http_get(addr, "/dashboard/state")).await??;
    assert_eq!(status, 200, "{state}");
    assert!(state.contains(&id.to_hex()), "{state}");
    assert!(state.contains("demo:v1"), "{state}");
    let (status, metrics) =
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await??;
    assert_eq!(status, 200);
    assert!(metrics.contains("shoal_peers_connected 2"), "{metrics}");
    assert!(metrics.contains("# TYPE shoal_chunk_fetches_total counter"));

    // The page in Chromium.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .arg(format!("http://{addr}/"))
        .arg(&shot)
        .args(["--artifact", &id.to_hex()]);
    for n in [&nodes[0], &nodes[2]] {
        cmd.args(["--peer", &n.peer_id().to_string()]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dashboard check failed:\n{stdout}\n{stderr}\n(screenshot: {})",
        shot.display()
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("dashboard screenshot: {} ({stdout})", shot.display());
    Ok(())
}

/// `prefetch` (what `shoal prefetch` and the systemd timer run) pulls each
/// model through a node's admin API, waits for it, and pins it; a model
/// nobody has fails on its own without stopping the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_pulls_and_pins_through_the_admin_api() -> Result<()> {
    let nodes = start_mesh(2, |i, c| {
        if i == 1 {
            c.download.find_timeout = std::time::Duration::from_secs(3);
        }
    })
    .await?;
    wait_peers(&nodes[1].node, 1).await?;
    let (seed, node) = (&nodes[0].node, &nodes[1].node);
    let dir = tempfile::tempdir()?;
    let id = seed_named(seed, node, dir.path(), 3 << 20, "tiny:q8_0").await?;
    let addr = nodes[1].api;
    // The admin API needs the node's token, made in its data dir by the daemon.
    let api = shoal::api::client::AdminClient::new(&addr.to_string())
        .with_token_file(&node.store().dir().join(shoal::api::auth::ADMIN_TOKEN_FILE));
    let missing = "f".repeat(64);
    let done = tokio::time::timeout(
        WAIT,
        shoal::api::ops::prefetch(
            &api,
            &["tiny:q8_0".to_owned(), missing.clone()],
            std::time::Duration::from_millis(50),
        ),
    )
    .await
    .context("prefetch timed out")?;

    assert_eq!(done.len(), 2);
    assert!(done[0].error.is_none(), "{:?}", done[0]);
    assert_eq!(done[0].id.as_deref(), Some(id.to_hex().as_str()));
    let p = done[0].progress.as_ref().context("progress")?;
    assert_eq!(p.phase, Phase::Done);
    assert_eq!(p.bytes_from_peers, 3 << 20);
    assert!(done[1].error.is_some(), "{:?}", done[1]);
    let list = node.store().list()?;
    let a = list
        .iter()
        .find(|a| a.id == id)
        .context("pulled artifact")?;
    assert!(a.pinned, "prefetched models are pinned");
    Ok(())
}
