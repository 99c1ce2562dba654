//! Operations against a live mesh. The dashboard in a real browser: a 3-node loopback mesh (mDNS off, static
//! peers), an artifact added on one node and pulled by another, and headless
//! Chromium (Debian's `chromium`, driven by playwright-core from
//! `scripts/dashboard-test`) loading the puller's dashboard: no console
//! errors, both peers and the artifact shown, a screenshot saved. Also checks
//! `GET /metrics` on the same server.
//!
//! Routing made visible: `GET /admin/route` (admin token; 404 when routing is
//! off) and, with the demo model, a chat request forwarded from one node to
//! the holder, then that node's dashboard in Chromium drawing it (the event
//! in the table, the arrow between the two nodes, the dot of a second request
//! in flight; screenshot `target/tmp/dashboard-routes.png`).
//!
//! Setup (`.ci/run` does it): `apt-get install chromium nodejs npm` and
//! `npm ci --prefix scripts/dashboard-test`.

use anyhow::{Context, Result, bail};
use shoal::mesh::download::Phase;
use shoal::node::Node;
use shoal::store::{AddOptions, ArtifactId};
use shoal_testnet::{
    TestNode, WAIT, loopback_config, make_file, start_mesh, start_node_with, wait_peers,
};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[path = "../../../tests/it/util/demo.rs"]
mod demo;

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

/// An answer of [`http`].
struct Reply {
    status: u16,
    /// Header names lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 request on loopback (`Connection: close`; a chunked body
/// is decoded).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let body = &raw[end + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The payload of a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = String::from_utf8_lossy(&rest[..line]);
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        let after = &rest[line + 2..];
        out.extend_from_slice(after.get(..n).context("short chunk")?);
        rest = after.get(n + 2..).context("chunk end")?;
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = http(addr, "GET", path, &[], "")?;
    Ok((r.status, r.body))
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

/// The admin token of `node` (made in its data dir by the daemon), as a header.
fn bearer(node: &Node) -> Result<String> {
    let path = node.store().dir().join(shoal::api::auth::ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(format!("Bearer {}", token.trim()))
}

/// `GET /admin/route` with `node`'s admin token.
async fn admin_route(t: &TestNode) -> Result<Reply> {
    let (addr, auth) = (t.api, bearer(&t.node)?);
    tokio::task::spawn_blocking(move || {
        http(addr, "GET", "/admin/route", &[("Authorization", &auth)], "")
    })
    .await?
}

/// `GET /admin/route` needs the admin token and answers the router's state:
/// this node, its own card, peers' cards, paused peers, recent events; a node
/// with routing off answers 404 and its dashboard snapshot has no routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_route_answers_the_routers_state() -> Result<()> {
    let on = start_node_with(loopback_config(Vec::new()), None, |_| {}).await?;
    let off = start_node_with(loopback_config(vec![on.addr.clone()]), None, |o| {
        o.route.enabled = false
    })
    .await?;
    wait_peers(&on.node, 1).await?;

    let addr = on.api;
    let anonymous =
        tokio::task::spawn_blocking(move || http(addr, "GET", "/admin/route", &[], "")).await??;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);

    let r = admin_route(&on).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    let me = on.peer_id().to_string();
    assert_eq!(v["me"], me.as_str(), "{v}");
    assert_eq!(v["enabled"], true, "{v}");
    assert_eq!(v["local"]["peer"], me.as_str(), "{v}");
    // No model anywhere: no cards (an empty card is never sent), no events.
    assert_eq!(v["local"]["models"], serde_json::json!([]), "{v}");
    for list in ["cards", "paused", "recent"] {
        assert_eq!(v[list], serde_json::json!([]), "{list}: {v}");
    }

    let r = admin_route(&off).await?;
    assert_eq!(r.status, 404, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["error"], "routing is off", "{v}");

    // The dashboard snapshot carries the same state, or null.
    for (t, on) in [(&on, true), (&off, false)] {
        let addr = t.api;
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(addr, "/dashboard/state")).await??;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(v["routes"].is_object(), on, "{}", v["routes"]);
        if on {
            assert_eq!(v["routes"]["me"], t.peer_id().to_string().as_str());
        } else {
            assert!(v["routes"].is_null());
        }
    }
    Ok(())
}

/// A chat request (OpenAI, not streamed) for `model`.
fn chat_body(model: &str, prompt: &str) -> String {
    serde_json::json!({"model": model, "stream": false, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": prompt}]})
    .to_string()
}

async fn chat(t: &TestNode, body: String) -> Result<Reply> {
    let addr = t.api;
    tokio::task::spawn_blocking(move || http(addr, "POST", "/v1/chat/completions", &[], &body))
        .await?
}

/// With the demo model on one node of three: a chat request to another node
/// is forwarded to the holder; `GET /admin/route` lists it; the forwarding
/// node's dashboard in Chromium shows the event (from → to, `forwarded`),
/// the arrow between the two nodes, the holder's card, and the dot of a
/// second request (sent by the script once the page is up) in flight.
// long: one scenario in order (mesh, model, warm-up, card, forwarded request,
// admin route, the page in Chromium) with a message per failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_draws_requests_across_the_mesh_in_chromium() -> Result<()> {
    let Some(model_path) = demo::demo_model_path() else {
        return Ok(());
    };
    let Some(script) = browser_setup() else {
        return Ok(());
    };
    // The holder; the node asked (never pulls, so it keeps forwarding); a third.
    let holder = start_node_with(loopback_config(Vec::new()), None, |_| {}).await?;
    let front = start_node_with(loopback_config(vec![holder.addr.clone()]), None, |o| {
        o.route.pull = shoal::route::PullPolicy::Never
    })
    .await?;
    let third = start_node_with(
        loopback_config(vec![holder.addr.clone(), front.addr.clone()]),
        None,
        |_| {},
    )
    .await?;
    for t in [&holder, &front, &third] {
        wait_peers(&t.node, 2).await?;
    }
    let store = holder.node.store().clone();
    let model = tokio::task::spawn_blocking(move || {
        store.add_file(&model_path, &shoal::store::AddOptions::default())
    })
    .await??
    .to_hex();

    // The holder answers once itself (the model loads), then its card
    // reaches the front node with the model loaded.
    let warm = chat(&holder, chat_body(&model, "Say hello.")).await?;
    assert_eq!(warm.status, 200, "{}", warm.body);
    let routing = front.node.routing().context("routing is on by default")?;
    let holder_id = holder.peer_id().to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !routing
        .snapshot()
        .cards
        .iter()
        .any(|c| c.peer == holder_id && c.models.iter().any(|m| m.id == model && m.loaded))
    {
        if tokio::time::Instant::now() > deadline {
            bail!("the holder's card never arrived: {:?}", routing.snapshot());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Asked of the front node, answered by the holder.
    let r = chat(&front, chat_body(&model, "Name three colours.")).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let front_id = front.peer_id().to_string();
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(holder_id.to_ascii_lowercase()),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("x-shoal-forwarded-by")
            .map(str::to_ascii_lowercase),
        Some(front_id.to_ascii_lowercase()),
        "{:?}",
        r.headers
    );
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");

    // The admin route lists the decision.
    let a = admin_route(&front).await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body)?;
    let recent = v["recent"].as_array().context("recent")?;
    assert!(
        recent.iter().any(|e| e["from"] == front_id.as_str()
            && e["to"] == holder_id.as_str()
            && e["outcome"] == "forwarded"
            && e["model"] == model.as_str()
            && e["ttft_ms"].is_u64()),
        "{v}"
    );
    // The holder lists it as served for the front node.
    let v: serde_json::Value = serde_json::from_str(&admin_route(&holder).await?.body)?;
    assert!(
        v["recent"]
            .as_array()
            .context("recent")?
            .iter()
            .any(|e| e["from"] == front_id.as_str()
                && e["to"] == holder_id.as_str()
                && e["outcome"] == "served_for_peer"),
        "{v}"
    );

    // The front node's dashboard in Chromium.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-routes.png");
    let _ = std::fs::remove_file(&shot);
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .arg(format!("http://{}/", front.api))
        .arg(&shot)
        .args(["--peer", &holder_id])
        .args(["--peer", &third.peer_id().to_string()])
        .args(["--route", &format!("{front_id}>{holder_id}")])
        .args(["--chat", &chat_body(&model, "What is a shoal of fish?")]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dashboard check failed:\n{stdout}\n{stderr}\n(screenshot: {})",
        shot.display()
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("dashboard routes screenshot: {} ({stdout})", shot.display());
    // The holder's page: the same requests, served for the front node.
    let holder_shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-routes-holder.png");
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .arg(format!("http://{}/", holder.api))
        .arg(&holder_shot)
        .args(["--peer", &front_id])
        .args([
            "--route",
            &format!("{front_id}>{holder_id}:served_for_peer"),
        ]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    assert!(
        out.status.success(),
        "holder's dashboard check failed:\n{}\n{}\n(screenshot: {})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        holder_shot.display()
    );
    // The script's request was forwarded too.
    let v: serde_json::Value = serde_json::from_str(&admin_route(&front).await?.body)?;
    let forwarded = v["recent"]
        .as_array()
        .context("recent")?
        .iter()
        .filter(|e| e["to"] == holder_id.as_str() && e["outcome"] == "forwarded")
        .count();
    assert!(forwarded >= 2, "{v}");
    Ok(())
}
