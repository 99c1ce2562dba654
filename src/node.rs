//! The composition root: a [`Node`] owns the store and the mesh and starts them.
//!
//! Later layers (inference, KV cache, response cache) add their own handles
//! here; the HTTP API ([`crate::api`]) takes a `Node` as its state.

use crate::mesh::{self, Client, Downloads, MeshConfig, MeshError, Progress};
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
    serving: std::sync::OnceLock<Arc<crate::serve::Serving>>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Opens the store and starts the mesh on the current tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let (dir, opts) = (config.data_dir.clone(), config.store.clone());
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, opts))
            .await
            .map_err(|e| NodeError::Join(e.to_string()))??;
        let mut mesh_config = config.mesh;
        if mesh_config.keypair.is_none() {
            mesh_config.keypair = Some(node_key(&config.data_dir)?);
        }
        let mesh = mesh::start(mesh_config, store.clone()).await?;
        Ok(Node {
            inner: Arc::new(Inner {
                store,
                mesh,
                downloads: Downloads::default(),
                started: Instant::now(),
                serving: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The mesh client.
    pub fn mesh(&self) -> &Client {
        &self.inner.mesh
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
    /// on first use. Call before [`crate::api::router`]; a second call
    /// returns the existing layer.
    pub fn init_serving(
        &self,
        cfg: crate::serve::ServeConfig,
    ) -> Result<Arc<crate::serve::Serving>, crate::serve::ServeError> {
        if let Some(s) = self.inner.serving.get() {
            return Ok(s.clone());
        }
        let lie = cfg.test_lie_kv;
        let s = crate::serve::Serving::new(cfg)?;
        if let Some(kv) = s.kv() {
            match crate::kvcache::mesh::MeshTier::start(self.mesh().clone(), kv.clone(), lie) {
                Ok(t) => kv.set_mesh(t),
                Err(e) => tracing::warn!(error = %e, "KV mesh tier not started"),
            }
        }
        s.set_source(Arc::new(StoreModels(Arc::downgrade(&self.inner))));
        Ok(self.inner.serving.get_or_init(|| s).clone())
    }

    /// The serving layer, started with defaults (KV disk tier under
    /// `<data-dir>/kv`) if [`Node::init_serving`] was not called.
    pub fn serving(&self) -> Result<Arc<crate::serve::Serving>, crate::serve::ServeError> {
        let dir = self.inner.store.dir().to_path_buf();
        self.init_serving(crate::serve::ServeConfig::with_data_dir(dir))
    }

    /// Stops the mesh. The store closes when the last clone of the node is dropped.
    pub async fn shutdown(&self) {
        self.inner.downloads.cancel_all();
        self.inner.mesh.shutdown().await;
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

/// Models for the serving layer: a name or id resolved in the store; an
/// artifact that is not local is pulled from the mesh (or its origin) first.
struct StoreModels(std::sync::Weak<Inner>);

impl crate::serve::ModelSource for StoreModels {
    fn locate<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<crate::serve::Located, crate::serve::LocateError>>
    {
        use crate::serve::LocateError;
        Box::pin(async move {
            let inner = self
                .0
                .upgrade()
                .ok_or_else(|| LocateError::Unavailable("the node is stopping".into()))?;
            let node = Node { inner };
            let (id, _) = node.resolve(name).await.map_err(|e| {
                LocateError::Unknown(format!(
                    "The model `{name}` does not exist: no local artifact or trusted name matches ({e})."
                ))
            })?;
            let path_of = |node: &Node| {
                let store = node.inner.store.clone();
                tokio::task::spawn_blocking(move || store.artifact_path(&id))
            };
            if let Ok(Ok(p)) = path_of(&node).await {
                return Ok((p, Some(*id.as_bytes())));
            }
            tracing::info!(model = name, id = %id, "model not local: pulling it for serving");
            let (_, mut rx) = node
                .pull(name)
                .await
                .map_err(|e| LocateError::Unavailable(e.to_string()))?;
            let p = rx
                .wait_for(|p| {
                    matches!(
                        p.phase,
                        mesh::download::Phase::Done | mesh::download::Phase::Failed
                    )
                })
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
            match path_of(&node).await {
                Ok(Ok(p)) => Ok((p, Some(*id.as_bytes()))),
                Ok(Err(e)) => Err(LocateError::Unavailable(e.to_string())),
                Err(e) => Err(LocateError::Unavailable(e.to_string())),
            }
        })
    }
}
