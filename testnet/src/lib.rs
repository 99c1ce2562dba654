//! Mesh simulation for shoal.
//!
//! In-process: [`start_mesh`] runs N full nodes on 127.0.0.1 (mDNS off,
//! static peers) inside one tokio runtime, each with its own temporary store
//! and its HTTP API on a loopback port, started as every daemon is
//! ([`shoal::daemon::Daemon`]).
//! Real: `scripts/testnet.sh` runs `shoal serve` processes in network namespaces.
#![deny(clippy::unwrap_used)]

use anyhow::{Context, Result, bail};
use shoal::daemon::{Daemon, DaemonOptions};
use shoal::mesh::download::{Phase, Progress};
use shoal::mesh::{self, MeshConfig, Multiaddr, PeerId};
use shoal::node::{Node, NodeConfig};
use shoal::store::{AddOptions, ArtifactId, SignedRelease, StoreOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upper bound for any wait in the harness: a hang becomes a failure, not a timing assertion.
pub const WAIT: Duration = Duration::from_secs(60);

/// One in-process node, its HTTP API and its temporary directory.
pub struct TestNode {
    /// The node.
    pub node: Node,
    /// Its first listen address, with `/p2p/<id>`.
    pub addr: Multiaddr,
    /// Where its HTTP API listens (127.0.0.1).
    pub api: SocketAddr,
    /// Its store directory.
    pub data_dir: PathBuf,
    /// Its daemon; dropping it closes the HTTP API.
    pub daemon: Daemon,
    _dir: Option<tempfile::TempDir>,
}

impl TestNode {
    /// Peer id.
    pub fn peer_id(&self) -> PeerId {
        self.node.mesh().peer_id()
    }
}

/// A mesh config for loopback tests: 127.0.0.1, mDNS off, static peers.
pub fn loopback_config(peers: Vec<Multiaddr>) -> MeshConfig {
    let mut c = MeshConfig {
        listen: vec![mesh::loopback_listen()],
        peers,
        mdns: false,
        ..MeshConfig::default()
    };
    c.download.stall_timeout = Duration::from_secs(20);
    c.download.find_timeout = Duration::from_secs(20);
    c
}

/// Starts a node with `config` on a store in `data_dir` (a fresh temp dir when `None`).
pub async fn start_node(config: MeshConfig, data_dir: Option<PathBuf>) -> Result<TestNode> {
    start_node_with(config, data_dir, |_| {}).await
}

/// [`start_node`], with `configure` adjusting the daemon's options (its
/// serving layer, say) before it starts. Each node has its own metrics.
pub async fn start_node_with(
    config: MeshConfig,
    data_dir: Option<PathBuf>,
    configure: impl FnOnce(&mut DaemonOptions),
) -> Result<TestNode> {
    let (dir, data_dir) = match data_dir {
        Some(d) => (None, d),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().join("store");
            (Some(t), p)
        }
    };
    let mut opts = DaemonOptions::new(NodeConfig {
        data_dir: data_dir.clone(),
        store: StoreOptions::default(),
        mesh: config,
    });
    // Each node its own metrics, as separate processes would have.
    opts.metrics = Some(std::sync::Arc::new(shoal::metrics::Metrics::new()));
    configure(&mut opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let daemon = Daemon::start(opts, listener).await?;
    let node = daemon.node().clone();
    let addr = listen_addr(&node).await?;
    Ok(TestNode {
        node,
        addr,
        api: daemon.addr(),
        data_dir,
        daemon,
        _dir: dir,
    })
}

/// The node's first concrete listen address, with its peer id appended.
pub async fn listen_addr(node: &Node) -> Result<Multiaddr> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(a) = node.mesh().listen_addrs().await?.into_iter().next() {
            return a
                .with_p2p(node.mesh().peer_id())
                .map_err(|a| anyhow::anyhow!("bad addr {a}"));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("node never listened");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts `n` nodes; node `i` has every node `j < i` as a static peer.
/// `configure(i, &mut config)` adjusts each node's config before it starts.
pub async fn start_mesh(
    n: usize,
    configure: impl Fn(usize, &mut MeshConfig),
) -> Result<Vec<TestNode>> {
    let mut nodes: Vec<TestNode> = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = loopback_config(nodes.iter().map(|t| t.addr.clone()).collect());
        configure(i, &mut c);
        nodes.push(start_node(c, None).await?);
    }
    Ok(nodes)
}

/// Waits until `node` is connected to at least `n` peers.
pub async fn wait_peers(node: &Node, n: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if node.mesh().connected().await?.len() >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("node {} has fewer than {n} peers", node.mesh().peer_id());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pulls `what` (an id or a trusted name) on `node` and waits until the pull
/// ends, done or failed; an error if that takes longer than [`WAIT`].
pub async fn pull_until_end(node: &Node, what: &str) -> Result<Progress> {
    let (_, mut rx) = node.pull(what).await?;
    let p = tokio::time::timeout(
        WAIT,
        rx.wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed)),
    )
    .await
    .context("timed out waiting for the pull")??
    .clone();
    Ok(p)
}

/// [`pull_until_end`], and an error if the pull failed.
pub async fn pull_done(node: &Node, what: &str) -> Result<Progress> {
    let p = pull_until_end(node, what).await?;
    if p.phase != Phase::Done {
        bail!("pull failed: {:?}", p.error);
    }
    Ok(p)
}

/// Adds `file` to the first node's store and provides it on the mesh, has
/// every other node trust a new publisher key of the first node's, and
/// signs a release of it as `name` (not yet gossiped: the caller times that).
pub async fn seed_release(
    nodes: &[TestNode],
    file: &Path,
    name: &str,
) -> Result<(ArtifactId, SignedRelease)> {
    let seeder = &nodes.first().context("no nodes")?.node;
    let store = seeder.store().clone();
    let p = file.to_path_buf();
    let id =
        tokio::task::spawn_blocking(move || store.add_file(&p, &AddOptions::default())).await??;
    seeder.mesh().provide(id).await?;
    let key = seeder.store().keygen(false)?;
    for n in nodes.iter().skip(1) {
        n.node.store().trust_add(key, "seeder")?;
    }
    let signed = seeder.store().publish(&id, name, None)?;
    Ok((id, signed))
}

/// Writes `size` deterministic pseudo-random bytes (BLAKE3 XOF of `seed`) to `path`.
pub fn make_file(path: &Path, size: usize, seed: u64) -> Result<PathBuf> {
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(path, &data).with_context(|| format!("write {}", path.display()))?;
    Ok(path.to_owned())
}

/// BLAKE3 of a file's bytes.
pub fn file_hash(path: &Path) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)?;
    Ok(*h.finalize().as_bytes())
}

/// Checks that artifact `id`, as activated in `node`'s store, is byte-identical
/// to the file `src` and that its whole-file BLAKE3 matches the manifest.
pub async fn assert_identical(node: &Node, id: shoal::store::ArtifactId, src: &Path) -> Result<()> {
    let store = node.store().clone();
    let (path, m) = tokio::task::spawn_blocking(move || -> Result<(PathBuf, _)> {
        Ok((
            store.artifact_path(&id)?,
            store.manifest(&id)?.context("manifest")?,
        ))
    })
    .await??;
    let got = file_hash(&path)?;
    if got != m.blake3 {
        bail!("{id}: whole-file BLAKE3 differs from the manifest");
    }
    if got != file_hash(src)? {
        bail!("{id}: not byte-identical to {}", src.display());
    }
    Ok(())
}
