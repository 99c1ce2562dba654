//! The composition root: a [`Node`] owns the store, the mesh and its
//! [`Metrics`], and starts them.
//!
//! The serving layer (inference, KV cache, response cache) is attached with
//! [`Node::init_serving`]; the HTTP API ([`crate::api`]) takes a `Node` as its
//! state. The whole start and shutdown order of a daemon (node, serving, HTTP,
//! drain) lives in [`crate::daemon`].

use crate::mesh::{self, Client, Downloads, MeshConfig, MeshError, Progress};
use crate::metrics::Metrics;
use crate::store::{ArtifactId, Store, StoreError, StoreOptions};
use libp2p::identity::Keypair;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Errors starting or using a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The mesh failed.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The node identity key cannot be read or written.
    #[error("node key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A background task failed.
    #[error("background task failed: {0}")]
    Join(String),
}

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The store directory (locked by the node while it runs).
    pub data_dir: PathBuf,
    /// Store settings.
    pub store: StoreOptions,
    /// Mesh settings.
    pub mesh: MeshConfig,
}

struct Inner {
    store: Store,
    mesh: Client,
    downloads: Downloads,
    started: Instant,
    metrics: Arc<Metrics>,
    serving: std::sync::OnceLock<Arc<crate::serve::Serving>>,
    routing: std::sync::OnceLock<Arc<crate::route::Routing>>,
    /// Artifacts marked corrupt that are being re-fetched, with their
    /// number of bad chunks: not served until the download completes.
    repairing: parking_lot::Mutex<std::collections::HashMap<ArtifactId, usize>>,
    /// Set by [`Node::shutdown`]: repairs stop retrying.
    stopping: std::sync::atomic::AtomicBool,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Opens the store and starts the mesh on the current tokio runtime,
    /// with a fresh set of metrics of its own ([`Node::metrics`]).
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        Node::start_with(config, Arc::new(Metrics::new())).await
    }

    /// [`Node::start`] reporting to `metrics`: every layer of the node (store,
    /// mesh, downloads, serving, KV and response caches) reports there, and
    /// the HTTP API (`/metrics`, the dashboard) reads it.
    pub async fn start_with(config: NodeConfig, metrics: Arc<Metrics>) -> Result<Node, NodeError> {
        let (dir, mut opts) = (config.data_dir.clone(), config.store.clone());
        opts.metrics = metrics.clone();
        // Artifacts newly marked corrupt (verify, verify-on-read) are
        // repaired by the node: see `Node::on_corrupt`.
        let (corrupt_tx, corrupt_rx) = tokio::sync::mpsc::unbounded_channel::<ArtifactId>();
        let earlier = opts.on_corrupt.take();
        opts.on_corrupt = Some(Arc::new(move |id: &ArtifactId| {
            if let Some(h) = &earlier {
                h(id);
            }
            let _ = corrupt_tx.send(*id);
        }));
        // Names bound anew (gossip, publish, admin API): serving switches
        // what it serves under them (see `Node::watch_releases`).
        let (release_tx, release_rx) =
            tokio::sync::mpsc::unbounded_channel::<(String, ArtifactId)>();
        let earlier = opts.on_release.take();
        opts.on_release = Some(Arc::new(move |name: &str, id: &ArtifactId| {
            if let Some(h) = &earlier {
                h(name, id);
            }
            let _ = release_tx.send((name.to_owned(), *id));
        }));
        let store =
            tokio::task::spawn_blocking(move || Store::open(&dir, opts).map_err(StoreError::from))
                .await
                .map_err(|e| NodeError::Join(e.to_string()))??;
        let mut mesh_config = config.mesh;
        if mesh_config.keypair.is_none() {
            mesh_config.keypair = Some(node_key(&config.data_dir)?);
        }
        let mesh = mesh::start(mesh_config, store.clone(), metrics.clone()).await?;
        let node = Node {
            inner: Arc::new(Inner {
                store,
                mesh,
                downloads: Downloads::new(metrics.clone()),
                started: Instant::now(),
                metrics,
                serving: std::sync::OnceLock::new(),
                routing: std::sync::OnceLock::new(),
                repairing: parking_lot::Mutex::new(std::collections::HashMap::new()),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        node.watch_corrupt(corrupt_rx);
        node.watch_releases(release_rx);
        Ok(node)
    }

    /// Hands every name a release binds anew to the serving layer
    /// ([`crate::serve::Serving::on_rebind`]): a name served by one
    /// artifact that now stands for another is switched live.
    fn watch_releases(&self, mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, ArtifactId)>) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some((name, id)) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                if let Some(s) = inner.serving.get() {
                    s.on_rebind(&name, *id.as_bytes());
                }
            }
        });
    }

    /// Repairs every artifact marked corrupt before this start, then each
    /// one the store reports (its `on_corrupt` hook feeds `rx`).
    fn watch_corrupt(&self, mut rx: tokio::sync::mpsc::UnboundedReceiver<ArtifactId>) {
        let weak = Arc::downgrade(&self.inner);
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            let marked = tokio::task::spawn_blocking(move || store.corrupt_artifacts()).await;
            match marked {
                Ok(Ok(list)) => {
                    for (id, bad) in list {
                        let Some(inner) = weak.upgrade() else { return };
                        Node { inner }.on_corrupt(id, bad.len());
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot list corrupt artifacts"),
                Err(e) => tracing::error!(error = %e, "cannot list corrupt artifacts"),
            }
            while let Some(id) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let node = Node { inner };
                let store = node.inner.store.clone();
                let bad = tokio::task::spawn_blocking(move || store.corrupt_artifacts())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|l| l.into_iter().find(|(i, _)| *i == id))
                    .map_or(0, |(_, b)| b.len());
                node.on_corrupt(id, bad);
            }
        });
    }

    /// Reacts to artifact `id` being marked corrupt (`bad` chunks): it is
    /// not served any more (an engine loaded for it is unloaded), and it is
    /// repaired in the background: [`Store::repair`] reopens it as a partial
    /// missing only the bad chunks, and a download fetches them from peers
    /// (retried every 30 s until it succeeds or the node stops). Once active
    /// again it is served again. Calling it again while a repair runs only
    /// updates the count.
    pub fn on_corrupt(&self, id: ArtifactId, bad: usize) {
        {
            let mut r = self.inner.repairing.lock();
            if let Some(n) = r.get_mut(&id) {
                *n = (*n).max(bad);
                return;
            }
            r.insert(id, bad);
        }
        tracing::warn!(%id, bad_chunks = bad, "corrupt artifact: not served; re-fetching its bad chunks from peers");
        if let Some(s) = self.inner.serving.get() {
            s.on_model_corrupt(id.as_bytes());
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(repair(weak, id));
    }

    /// Artifacts being repaired (marked corrupt, re-fetching), with their
    /// number of bad chunks.
    pub fn repairing(&self) -> Vec<(ArtifactId, usize)> {
        self.inner
            .repairing
            .lock()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The mesh client.
    pub fn mesh(&self) -> &Client {
        &self.inner.mesh
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Downloads started on this node.
    pub fn downloads(&self) -> &Downloads {
        &self.inner.downloads
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    /// Resolves an id or trusted name and the origin URL its release names, if any.
    pub async fn resolve(
        &self,
        id_or_name: &str,
    ) -> Result<(ArtifactId, Option<String>), NodeError> {
        match self.resolve_local(id_or_name).await {
            Err(NodeError::Store(StoreError::Unknown(_))) => {
                // A name announced before we joined: ask the peers.
                self.sync_releases().await;
                self.resolve_local(id_or_name).await
            }
            other => other,
        }
    }

    /// Asks every connected peer for the releases it knows and applies those
    /// this node's trust store accepts (signature, publisher, higher sequence).
    /// Returns how many were applied.
    pub async fn sync_releases(&self) -> usize {
        let mesh = &self.inner.mesh;
        let peers = mesh.connected().await.unwrap_or_default();
        let mut applied = 0;
        for peer in peers {
            let Ok(list) = mesh.releases(peer).await else {
                continue;
            };
            let store = self.inner.store.clone();
            applied += tokio::task::spawn_blocking(move || {
                list.iter()
                    .filter(|r| {
                        matches!(
                            store.apply_release(r),
                            Ok(crate::store::ReleaseOutcome::Applied)
                        )
                    })
                    .count()
            })
            .await
            .unwrap_or(0);
        }
        applied
    }

    async fn resolve_local(
        &self,
        id_or_name: &str,
    ) -> Result<(ArtifactId, Option<String>), NodeError> {
        let store = self.inner.store.clone();
        let what = id_or_name.to_owned();
        tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let id = store.resolve(&what)?;
            let origin = store
                .releases()?
                .into_iter()
                .filter_map(|s| s.verify().ok())
                .filter(|r| r.id == id)
                .max_by_key(|r| r.seq)
                .and_then(|r| r.origin);
            Ok((id, origin))
        })
        .await
        .map_err(|e| NodeError::Join(e.to_string()))?
        .map_err(NodeError::Store)
    }

    /// Starts (or joins) fetching an artifact by id or trusted name; follow the returned progress.
    pub async fn pull(
        &self,
        id_or_name: &str,
    ) -> Result<(ArtifactId, watch::Receiver<Progress>), NodeError> {
        self.pull_with(id_or_name, None).await
    }

    /// [`Node::pull`], waiting up to `find_timeout` (instead of the mesh's
    /// `find_timeout`) for a peer that holds the manifest. Fails with
    /// [`MeshError::TooManyDownloads`] when `mesh.max_downloads` are running.
    pub async fn pull_with(
        &self,
        id_or_name: &str,
        find_timeout: Option<std::time::Duration>,
    ) -> Result<(ArtifactId, watch::Receiver<Progress>), NodeError> {
        let (id, origin) = self.resolve(id_or_name).await?;
        let rx = self
            .inner
            .downloads
            .start(&self.inner.mesh, id, origin, find_timeout)
            .await?;
        Ok((id, rx))
    }

    /// Starts the serving layer (OpenAI API, KV and response caches) with
    /// `cfg`; models are loaded from the store, and pulled from the mesh,
    /// on first use. [`crate::daemon::Daemon::start`] calls it before it
    /// builds the API router; a second call returns the existing layer.
    pub fn init_serving(
        &self,
        cfg: crate::serve::ServeConfig,
    ) -> Result<Arc<crate::serve::Serving>, crate::serve::ServeError> {
        if let Some(s) = self.inner.serving.get() {
            return Ok(s.clone());
        }
        let lie = cfg.test_lie_kv;
        // The node's metrics (what its /metrics renders).
        let cfg = crate::serve::ServeConfig {
            metrics: self.inner.metrics.clone(),
            node_id: Some(self.mesh().peer_id().to_string()),
            ..cfg
        };
        let s = crate::serve::Serving::new(cfg)?;
        if let Some(kv) = s.kv() {
            match crate::kvcache::remote::RemoteTier::start(self.mesh().clone(), kv.clone(), lie) {
                Ok(t) => kv.set_remote(t),
                Err(e) => tracing::warn!(error = %e, "KV mesh tier not started"),
            }
        }
        s.set_source(Arc::new(StoreModels {
            node: Arc::downgrade(&self.inner),
            verdicts: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }));
        Ok(self.inner.serving.get_or_init(|| s).clone())
    }

    /// The serving layer, if [`Node::init_serving`] started it.
    pub fn serving(&self) -> Option<Arc<crate::serve::Serving>> {
        self.inner.serving.get().cloned()
    }

    /// Starts routing requests across the mesh ([`crate::route`]) for the
    /// serving layer ([`Node::init_serving`] first; `None` without it, or
    /// when `cfg.enabled` is off). `needs_key`: this node's API needs an API
    /// key (peers see it on the card). A second call returns the same one.
    pub fn init_routing(
        &self,
        cfg: crate::route::RouteConfig,
        needs_key: bool,
    ) -> Option<Arc<crate::route::Routing>> {
        if !cfg.enabled {
            return None;
        }
        let serving = self.serving()?;
        if let Some(r) = self.inner.routing.get() {
            return Some(r.clone());
        }
        let host = Arc::new(RouteHostImpl {
            node: Arc::downgrade(&self.inner),
        });
        let r = crate::route::Routing::start(cfg, self.mesh().clone(), serving, host, needs_key);
        Some(self.inner.routing.get_or_init(|| r).clone())
    }

    /// The router, if [`Node::init_routing`] started it.
    pub fn routing(&self) -> Option<Arc<crate::route::Routing>> {
        self.inner.routing.get().cloned()
    }

    /// Stops the mesh. The store closes when the last clone of the node is dropped.
    pub async fn shutdown(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.downloads.cancel_all();
        self.inner.mesh.shutdown().await;
    }
}

/// Pause between attempts to re-fetch a corrupt artifact's bad chunks.
const REPAIR_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The background half of [`Node::on_corrupt`].
async fn repair(weak: std::sync::Weak<Inner>, id: ArtifactId) {
    use std::sync::atomic::Ordering;
    let mut reopened = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stopping.load(Ordering::Relaxed) {
            return;
        }
        let node = Node { inner };
        if !reopened {
            let store = node.inner.store.clone();
            match tokio::task::spawn_blocking(move || store.repair(&id)).await {
                Ok(Ok(have)) => {
                    reopened = true;
                    tracing::info!(%id, missing = have.missing().count(), "corrupt artifact reopened for re-fetching");
                }
                Ok(Err(e)) => {
                    tracing::error!(%id, error = %e, "cannot reopen the corrupt artifact")
                }
                Err(e) => tracing::error!(%id, error = %e, "cannot reopen the corrupt artifact"),
            }
        }
        if reopened {
            match node.pull(&id.to_hex()).await {
                Ok((_, mut rx)) => {
                    drop(node);
                    let end = rx.wait_for(|p| p.phase.is_final()).await.map(|p| p.clone());
                    match end {
                        Ok(p) if p.phase == mesh::download::Phase::Done => {
                            if let Some(inner) = weak.upgrade() {
                                inner.repairing.lock().remove(&id);
                            }
                            tracing::info!(%id, "corrupt artifact repaired from peers: served again");
                            return;
                        }
                        Ok(p) => {
                            tracing::warn!(%id, error = ?p.error, "re-fetching the corrupt artifact failed; retrying")
                        }
                        Err(_) => {
                            tracing::warn!(%id, "re-fetching the corrupt artifact was stopped")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot re-fetch the corrupt artifact; retrying")
                }
            }
        } else {
            drop(node);
        }
        tokio::time::sleep(REPAIR_RETRY).await;
    }
}

/// The node's libp2p identity, kept in `<data-dir>/keys/node.key` (0600) so its
/// peer id survives restarts.
fn node_key(data_dir: &std::path::Path) -> Result<Keypair, NodeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("keys").join("node.key");
    let err = |reason: String| NodeError::Key {
        path: path.clone(),
        reason,
    };
    match std::fs::read(&path) {
        Ok(b) => Keypair::from_protobuf_encoding(&b).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// How long serving waits for peers' answers to "do you have the manifest
/// of this id?" before it says nobody has it (and for Kademlia providers).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Node {
    /// Whether a connected peer or a Kademlia provider has the manifest of
    /// `id`: one round of the lookup a pull starts with, bounded by
    /// [`PROBE_TIMEOUT`] per question, so that serving can say at once that
    /// nobody has a model instead of waiting for a pull to time out.
    pub async fn someone_has(&self, id: ArtifactId) -> bool {
        use futures::StreamExt;
        let mesh = self.inner.mesh.clone();
        let me = mesh.peer_id();
        let m = mesh.clone();
        let providers = tokio::spawn(async move {
            tokio::time::timeout(PROBE_TIMEOUT, m.providers(id))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        });
        let ask = |peers: Vec<libp2p::PeerId>| {
            let mesh = mesh.clone();
            async move {
                let mut answers = futures::stream::iter(peers.into_iter().filter(|p| *p != me))
                    .map(|p| {
                        let mesh = mesh.clone();
                        async move {
                            matches!(
                                tokio::time::timeout(PROBE_TIMEOUT, mesh.manifest(p, id)).await,
                                Ok(Ok(Some(_)))
                            )
                        }
                    })
                    .buffer_unordered(16);
                while let Some(has) = answers.next().await {
                    if has {
                        return true;
                    }
                }
                false
            }
        };
        let mut connected = mesh.connected().await.unwrap_or_default();
        // A node that has just started (or lost its peers) may not be
        // connected yet: give discovery and static peers a moment before
        // saying that nobody has it.
        let wait_until = tokio::time::Instant::now() + PROBE_TIMEOUT;
        while connected.is_empty() && tokio::time::Instant::now() < wait_until {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            connected = mesh.connected().await.unwrap_or_default();
        }
        if ask(connected.clone()).await {
            providers.abort();
            return true;
        }
        let more: Vec<libp2p::PeerId> = providers
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !connected.contains(p))
            .collect();
        ask(more).await
    }
}

/// Models for the serving layer: a name or id resolved in the store; an
/// artifact that is not local is pulled from the mesh (or its origin)
/// first, if any peer (or the origin of its release) has it. The file is
/// leased (kept from eviction) for as long as serving holds the guard.
/// Before a pull, only the chunks holding the GGUF header are fetched and
/// checked ([`crate::serve::check_header`]): a model this build cannot serve
/// is refused without pulling the rest.
struct StoreModels {
    node: std::sync::Weak<Inner>,
    /// Header verdicts by artifact (an artifact's bytes never change).
    verdicts: parking_lot::Mutex<
        std::collections::HashMap<ArtifactId, Result<(), crate::serve::Unservable>>,
    >,
}

/// What the router asks of the node: names resolved by the store, pulls
/// started in the background, the operator's kept names.
struct RouteHostImpl {
    node: std::sync::Weak<Inner>,
}

impl crate::route::RouteHost for RouteHostImpl {
    fn resolve(&self, name: &str) -> Option<[u8; 32]> {
        let inner = self.node.upgrade()?;
        inner.store.resolve(name).ok().map(|id| id.0)
    }

    fn pull(&self, name: &str) {
        let Some(inner) = self.node.upgrade() else {
            return;
        };
        let node = Node { inner };
        let name = name.to_owned();
        tokio::spawn(async move {
            match node.pull(&name).await {
                Ok((id, _)) => {
                    tracing::info!(model = name, %id, "routing: background pull started")
                }
                Err(e) => {
                    tracing::info!(model = name, error = %e, "routing: background pull not started")
                }
            }
        });
    }

    fn pinned(&self, name: &str) -> bool {
        self.node.upgrade().is_some_and(|inner| {
            inner
                .store
                .options()
                .prefetch
                .iter()
                .any(|p| p.eq_ignore_ascii_case(name))
        })
    }
}

/// Largest GGUF header fetched to decide servability before a pull (see
/// [`crate::serve::MAX_HEADER_BYTES`]).
pub const MAX_HEADER_BYTES: u64 = crate::serve::MAX_HEADER_BYTES;

impl StoreModels {
    /// Fetches just the header chunks of `id` (verified) and checks them:
    /// `Err` names what this build lacks; `Ok` when it can serve it, or when
    /// the header could not be had (the pull that follows then decides).
    /// The fetched chunks are kept for that pull.
    async fn check_before_pull(
        &self,
        node: &Node,
        id: ArtifactId,
        origin: Option<String>,
    ) -> Result<(), crate::serve::Unservable> {
        use crate::serve::HeaderCheck;
        if let Some(v) = self.verdicts.lock().get(&id) {
            return v.clone();
        }
        let mut verdict = HeaderCheck::NeedMore;
        let find = node.inner.mesh.config().download.find_timeout;
        let got = mesh::download::fetch_prefix(
            &node.inner.mesh,
            id,
            origin,
            find,
            MAX_HEADER_BYTES,
            &node.inner.metrics,
            |prefix, len| {
                verdict = crate::serve::check_header(prefix, len);
                verdict != HeaderCheck::NeedMore
            },
        )
        .await;
        let prefix = match got {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%id, error = %e, "could not fetch the model's header; pulling it whole");
                return Ok(());
            }
        };
        tracing::info!(%id, header_chunks = prefix.chunks, fetched_bytes = prefix.fetched_bytes,
            verdict = ?verdict, "model header checked before the pull");
        match verdict {
            HeaderCheck::Unservable(u) => {
                self.verdicts.lock().insert(id, Err(u.clone()));
                Err(u)
            }
            HeaderCheck::Servable => {
                if let Err(e) = prefix.keep(&node.inner.mesh).await {
                    tracing::warn!(%id, error = %e, "header chunks not kept for the pull");
                }
                Ok(())
            }
            HeaderCheck::NeedMore => Ok(()),
        }
    }

    fn node(&self) -> Result<Node, crate::serve::LocateError> {
        self.node
            .upgrade()
            .map(|inner| Node { inner })
            .ok_or_else(|| crate::serve::LocateError::Unavailable("the node is stopping".into()))
    }
}

/// Leases an active artifact for serving: the file and the lease as guard.
async fn lease_for_serving(
    node: &Node,
    id: ArtifactId,
) -> Result<Result<crate::serve::Located, StoreError>, crate::serve::LocateError> {
    let store = node.inner.store.clone();
    let r = tokio::task::spawn_blocking(move || store.lease(&id))
        .await
        .map_err(|e| crate::serve::LocateError::Unavailable(e.to_string()))?;
    Ok(r.map_err(StoreError::from)
        .map(|lease| crate::serve::Located {
            path: lease.path.clone(),
            guard: Some(Box::new(lease)),
        }))
}

/// [`crate::serve::ModelSource::locate`], reporting the download's
/// verified bytes `(completed, total)` to `progress` while it runs (for
/// Ollama's `/api/pull`).
async fn locate_reporting(
    src: &StoreModels,
    id: [u8; 32],
    name: &str,
    progress: tokio::sync::mpsc::UnboundedSender<(u64, u64)>,
) -> Result<crate::serve::Located, crate::serve::LocateError> {
    use crate::serve::ModelSource;
    let node = src.node()?;
    let aid = ArtifactId(id);
    let watch = async {
        loop {
            if let Some(mut rx) = node.inner.downloads.watch(&aid) {
                loop {
                    let p = rx.borrow_and_update().clone();
                    let _ = progress.send((p.have_bytes, p.total_bytes));
                    if p.phase.is_final() || rx.changed().await.is_err() {
                        break;
                    }
                }
                // Reported to the end: `locate` finishes the rest.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = src.locate(id, name) => r,
        () = watch => Err(crate::serve::LocateError::Unavailable("progress ended".into())),
    }
}

impl crate::serve::ModelSource for StoreModels {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<[u8; 32], crate::serve::LocateError>> {
        use crate::serve::LocateError;
        Box::pin(async move {
            crate::serve::check_model_name(name)?;
            let node = self.node()?;
            let (id, _) = node.resolve(name).await.map_err(|e| {
                LocateError::Unknown(format!(
                    "The model `{name}` does not exist: no local artifact or trusted name matches ({e})."
                ))
            })?;
            Ok(*id.as_bytes())
        })
    }

    fn locate<'a>(
        &'a self,
        id: [u8; 32],
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<crate::serve::Located, crate::serve::LocateError>>
    {
        use crate::serve::LocateError;
        Box::pin(async move {
            let node = self.node()?;
            let id = ArtifactId(id);
            let corrupt = |bad: usize| {
                LocateError::Corrupt(format!(
                    "model {name} is corrupt ({bad} bad chunks); re-fetching from peers"
                ))
            };
            if let Some(bad) = node.inner.repairing.lock().get(&id).copied() {
                return Err(corrupt(bad));
            }
            match lease_for_serving(&node, id).await? {
                Ok(l) => return Ok(l),
                Err(StoreError::Unknown(_) | StoreError::NotActive(_)) => {}
                Err(StoreError::Corrupt { bad_chunks, .. }) => {
                    node.on_corrupt(id, bad_chunks.len());
                    return Err(corrupt(bad_chunks.len()));
                }
                Err(e) => return Err(LocateError::Unavailable(e.to_string())),
            }
            let mut rx = match node.inner.downloads.watch(&id) {
                Some(rx) if rx.borrow().phase != mesh::download::Phase::Failed => rx,
                _ => {
                    let (_, origin) = node
                        .resolve_local(&id.to_hex())
                        .await
                        .map_err(|e| LocateError::Unavailable(e.to_string()))?;
                    if origin.is_none() && !node.someone_has(id).await {
                        return Err(LocateError::Unknown(format!(
                            "The model `{name}` ({id}) is not on this node and no peer has it."
                        )));
                    }
                    self.check_before_pull(&node, id, origin)
                        .await
                        .map_err(LocateError::Unservable)?;
                    tracing::info!(model = name, id = %id, "model not local: pulling it for serving");
                    let (_, rx) = node
                        .pull(&id.to_hex())
                        .await
                        .map_err(|e| LocateError::Unavailable(e.to_string()))?;
                    rx
                }
            };
            let p = rx
                .wait_for(|p| p.phase.is_final())
                .await
                .map_err(|e| LocateError::Unavailable(e.to_string()))?
                .clone();
            if p.phase != mesh::download::Phase::Done {
                return Err(LocateError::Unavailable(format!(
                    "pulling it failed: {}",
                    p.error
                        .unwrap_or_else(|| "no peer or origin holds it".into())
                )));
            }
            lease_for_serving(&node, id)
                .await?
                .map_err(|e| LocateError::Unavailable(e.to_string()))
        })
    }

    fn local_file(
        &self,
        id: [u8; 32],
    ) -> futures::future::BoxFuture<'_, Option<crate::serve::Located>> {
        Box::pin(async move {
            let node = self.node().ok()?;
            lease_for_serving(&node, ArtifactId(id)).await.ok()?.ok()
        })
    }

    fn locate_reporting<'a>(
        &'a self,
        id: [u8; 32],
        name: &'a str,
        progress: tokio::sync::mpsc::UnboundedSender<(u64, u64)>,
    ) -> futures::future::BoxFuture<'a, Result<crate::serve::Located, crate::serve::LocateError>>
    {
        Box::pin(locate_reporting(self, id, name, progress))
    }

    fn catalog(&self) -> futures::future::BoxFuture<'_, Vec<crate::serve::CatalogEntry>> {
        Box::pin(async move {
            let Ok(node) = self.node() else {
                return Vec::new();
            };
            let store = node.inner.store.clone();
            // Active GGUF artifacts (id, names, file), and the trusted names
            // of artifacts that are not here (name, id).
            let (held, remote) = tokio::task::spawn_blocking(move || {
                let all = store.list().unwrap_or_default();
                let held = all
                    .iter()
                    .filter(|a| {
                        a.kind == crate::store::ArtifactKind::Gguf
                            && a.status == crate::store::ArtifactStatus::Active
                            && a.corrupt.is_none()
                    })
                    .filter_map(|a| {
                        let path = store.artifact_path(&a.id).ok()?;
                        Some((a.id, a.names.clone(), path))
                    })
                    .collect::<Vec<_>>();
                // Names whose id the store lacks or is still fetching (an
                // active artifact is listed above, or is no model).
                let remote = store
                    .releases()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| store.is_trusted(&s.publisher).unwrap_or(false))
                    .filter_map(|s| s.verify().ok())
                    .filter(|r| {
                        !all.iter().any(|a| {
                            a.id == r.id && a.status == crate::store::ArtifactStatus::Active
                        })
                    })
                    .map(|r| (r.name, r.id))
                    .collect::<Vec<_>>();
                (held, remote)
            })
            .await
            .unwrap_or_default();
            let mut out = Vec::with_capacity(held.len());
            for (id, names, path) in held {
                let cached = self.verdicts.lock().get(&id).cloned();
                let servable = match cached {
                    Some(v) => v,
                    None => {
                        match tokio::task::spawn_blocking(move || {
                            crate::serve::check_file(&path, MAX_HEADER_BYTES)
                        })
                        .await
                        {
                            Ok(Some(v)) => {
                                self.verdicts.lock().insert(id, v.clone());
                                v
                            }
                            // Unreadable, or a header too large to check
                            // first: its load decides.
                            _ => Ok(()),
                        }
                    }
                };
                let names = if names.is_empty() {
                    vec![id.to_hex()]
                } else {
                    names
                };
                for name in names {
                    out.push(crate::serve::CatalogEntry {
                        id: *id.as_bytes(),
                        name,
                        servable: servable.clone(),
                        local: true,
                    });
                }
            }
            for (name, id) in remote {
                let servable = self.verdicts.lock().get(&id).cloned().unwrap_or(Ok(()));
                out.push(crate::serve::CatalogEntry {
                    id: *id.as_bytes(),
                    name,
                    servable,
                    local: false,
                });
            }
            out
        })
    }
}
