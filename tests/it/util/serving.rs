//! Serving nodes on loopback, started as every daemon is
//! ([`shoal::daemon::Daemon`]): one node with the demo model already loaded
//! ([`TestServer`]), bare nodes ([`start_node`]), and the two-node mesh
//! fixture ([`TwoNodes`]).

use super::demo_model;
use shoal::serve::{ServeConfig, Serving};
use std::net::SocketAddr;
use std::sync::Arc;

/// The served name of the demo model.
pub const NAME: &str = "smollm2";
/// A node serving the demo model on 127.0.0.1:0, started as every daemon is
/// ([`shoal::daemon::Daemon`]), in a temporary data directory.
pub struct TestServer {
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    /// Its serving layer.
    pub serving: Arc<Serving>,
    daemon: Option<shoal::daemon::Daemon>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a node serving the demo model as [`NAME`] with `cfg`; `None` if the model is missing.
    pub async fn start(cfg: ServeConfig) -> Option<TestServer> {
        let model = demo_model()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = shoal::daemon::DaemonOptions::loopback(dir.path().join("data"), Vec::new());
        opts.serve = cfg;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let daemon = shoal::daemon::Daemon::start(opts, listener)
            .await
            .expect("daemon");
        let serving = daemon.serving().clone();
        serving.add_model(NAME, model).expect("add model");
        Some(TestServer {
            addr: daemon.addr(),
            serving,
            daemon: Some(daemon),
            _dir: dir,
        })
    }

    /// Asks for a graceful shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(d) = &mut self.daemon {
            d.begin_shutdown();
        }
    }

    /// Shuts down gracefully and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("shutdown");
        }
    }

    /// The engine of the demo model.
    pub fn engine(&self) -> Arc<shoal::serve::Engine> {
        self.serving.model(NAME).expect("served").engine.clone()
    }
}

/// A config with the response cache off and the KV cache in RAM only.
pub fn ram_only() -> ServeConfig {
    ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::default()
    }
}

/// A real node in `dir` (store, mesh on 127.0.0.1 with mDNS off and the
/// given peers, serving with `cfg`) and its HTTP API on 127.0.0.1:0.
pub async fn start_node(
    dir: &std::path::Path,
    peers: Vec<libp2p::Multiaddr>,
    cfg: ServeConfig,
) -> (shoal::node::Node, SocketAddr) {
    start_node_with(dir, peers, shoal::store::StoreOptions::default(), cfg).await
}

/// [`start_node`] with the store's options (a quota, say).
pub async fn start_node_with(
    dir: &std::path::Path,
    peers: Vec<libp2p::Multiaddr>,
    store: shoal::store::StoreOptions,
    cfg: ServeConfig,
) -> (shoal::node::Node, SocketAddr) {
    let mut opts = shoal::daemon::DaemonOptions::loopback(dir, peers);
    opts.node.store = store;
    opts.serve = cfg;
    // These fixtures test one node's serving (and its KV tiers): requests
    // are not routed to peers. tests/it/serving_route.rs tests routing.
    opts.route.enabled = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let daemon = shoal::daemon::Daemon::start(opts, listener)
        .await
        .expect("node");
    let (node, addr) = (daemon.node().clone(), daemon.addr());
    // Serves until the test's runtime ends.
    tokio::spawn(daemon.run_until(std::future::pending()));
    (node, addr)
}

/// The first listen address of `node`, with its peer id (waits until it listens).
pub async fn p2p_addr(node: &shoal::node::Node) -> libp2p::Multiaddr {
    for _ in 0..6000 {
        if let Some(a) = node
            .mesh()
            .listen_addrs()
            .await
            .expect("addrs")
            .into_iter()
            .next()
        {
            return a.with_p2p(node.mesh().peer_id()).expect("p2p");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("node never listened");
}

/// A node of the two-node fixture that holds the demo model in its store.
pub struct ModelNode {
    /// The node.
    pub node: shoal::node::Node,
    /// Where its HTTP API listens.
    pub http: SocketAddr,
    /// The demo model's artifact id in its store (served by its hex name).
    pub model: shoal::store::ArtifactId,
}

/// The first node of the two-node serving fixture: a real node in `dir`
/// (static `peers`, loopback, mDNS off) serving with `cfg`, with the demo
/// model added to its store. Panics if the model is missing: callers check
/// [`demo_model_path`](super::demo_model_path) first and skip.
pub async fn model_node(
    dir: &std::path::Path,
    peers: Vec<libp2p::Multiaddr>,
    cfg: ServeConfig,
) -> ModelNode {
    let (node, http) = start_node(dir, peers, cfg).await;
    let path = super::demo_model_path().expect("model");
    let store = node.store().clone();
    let model = tokio::task::spawn_blocking(move || {
        store.add_file(&path, &shoal::store::AddOptions::default())
    })
    .await
    .expect("join")
    .expect("add");
    ModelNode { node, http, model }
}

/// The second node of the two-node serving fixture: a real node in `dir`
/// with `first` as its only static peer, serving with `cfg`.
pub async fn neighbour_of(
    first: &shoal::node::Node,
    dir: &std::path::Path,
    cfg: ServeConfig,
) -> (shoal::node::Node, SocketAddr) {
    start_node(dir, vec![p2p_addr(first).await], cfg).await
}

/// Waits (at most a minute) until `a` is connected to `b`.
pub async fn connected(a: &shoal::node::Node, b: &shoal::node::Node) {
    let pb = b.mesh().peer_id();
    for _ in 0..6000 {
        if a.mesh().connected().await.expect("peers").contains(&pb) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never connected");
}

/// The two-node serving fixture: two daemons on loopback (mDNS off), the
/// first ([`model_node`]) holding the demo model, the second
/// ([`neighbour_of`]) without it and with the first as its static peer.
pub struct TwoNodes {
    /// The first node, with the demo model in its store.
    pub first: ModelNode,
    /// The second node.
    pub second: shoal::node::Node,
    /// Where the second node's HTTP API listens.
    pub second_http: SocketAddr,
}

impl TwoNodes {
    /// Starts the pair in `dir/a` and `dir/b`, each serving with `cfg(its data dir)`.
    pub async fn start(
        dir: &std::path::Path,
        cfg: impl Fn(&std::path::Path) -> ServeConfig,
    ) -> TwoNodes {
        let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
        let first = model_node(&dir_a, Vec::new(), cfg(&dir_a)).await;
        let (second, second_http) = neighbour_of(&first.node, &dir_b, cfg(&dir_b)).await;
        TwoNodes {
            first,
            second,
            second_http,
        }
    }
}
