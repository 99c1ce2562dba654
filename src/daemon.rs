//! The daemon's lifecycle, in one place (the mini-redis `server::run` shape):
//! open the node (store, mesh), start serving, serve the HTTP API on the
//! caller's listener, and on shutdown stop accepting, drain the open
//! requests and the engines within a deadline, and shut the node down.
//!
//! The `shoal serve` command, the testnet's in-process nodes, the tests'
//! node fixture and the serving benchmark all start nodes through
//! [`Daemon::start`] (or [`run`]); nothing else assembles a node with its
//! API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal::daemon::DaemonError> {
//! use shoal::daemon::{self, DaemonOptions};
//! let opts = DaemonOptions::loopback("/tmp/shoal-data", Vec::new());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! daemon::run(opts, listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use crate::api::{self, ApiOptions, auth::AuthError};
use crate::config::ConfigError;
use crate::mesh::{MeshConfig, Multiaddr};
use crate::metrics::Metrics;
use crate::node::{Node, NodeConfig, NodeError};
use crate::serve::{ServeConfig, ServeError, Serving};
use crate::settings::Config;
use crate::store::StoreOptions;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Errors starting or stopping a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The node (store, mesh) failed to start (boxed: it is large).
    #[error(transparent)]
    Node(Box<NodeError>),
    /// The serving layer failed to start.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The admin token or the API keys file cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The HTTP listener failed.
    #[error("HTTP API: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP server task failed.
    #[error("HTTP server task failed: {0}")]
    Join(String),
    /// Open requests were still running when the drain deadline passed.
    #[error(
        "drain timeout: {timeout:?} passed before open requests finished (still running: {})",
        describe(still_running)
    )]
    DrainTimeout {
        /// The deadline (`api.drain_timeout`).
        timeout: Duration,
        /// The models still generating, with their open requests
        /// (empty: only open HTTP connections remained).
        still_running: Vec<String>,
    },
}

impl From<NodeError> for DaemonError {
    fn from(e: NodeError) -> Self {
        DaemonError::Node(Box::new(e))
    }
}

fn describe(running: &[String]) -> String {
    if running.is_empty() {
        "open HTTP connections".to_owned()
    } else {
        running.join(", ")
    }
}

/// Everything a daemon needs to start: the node's, the serving layer's and
/// the API's settings (with the drain deadline). [`DaemonOptions::from_config`]
/// builds them from a config file; tests build them by hand.
#[derive(Clone)]
pub struct DaemonOptions {
    /// The node: data directory, store and mesh settings.
    pub node: NodeConfig,
    /// The serving layer (OpenAI API, KV and response caches).
    pub serve: ServeConfig,
    /// The HTTP API.
    pub api: ApiOptions,
    /// Routing requests across the mesh (`[route]`).
    pub route: crate::route::RouteConfig,
    /// The node's metrics; `None`: [`Node::start`]'s default.
    pub metrics: Option<Arc<Metrics>>,
}

impl DaemonOptions {
    /// Defaults around `node`: serving with its KV disk tier under
    /// `<data-dir>/kv`, the default API options and drain deadline.
    pub fn new(node: NodeConfig) -> Self {
        let serve = ServeConfig::with_data_dir(&node.data_dir);
        DaemonOptions {
            node,
            serve,
            api: ApiOptions::default(),
            route: crate::route::RouteConfig::default(),
            metrics: None,
        }
    }

    /// The options a config file asks for; `default_data_dir` is used when
    /// the config names none.
    pub fn from_config(cfg: &Config, default_data_dir: &Path) -> Result<Self, ConfigError> {
        let node = cfg.node_config(default_data_dir)?;
        let serve = cfg.serve_config(&node.data_dir);
        Ok(DaemonOptions {
            node,
            serve,
            api: cfg.api_options(),
            route: cfg.route,
            metrics: None,
        })
    }

    /// A node for tests and local experiments: a store in `data_dir`, the
    /// mesh on 127.0.0.1 (an OS-chosen port) with mDNS off and `peers` as
    /// static peers, everything else at its defaults.
    pub fn loopback(data_dir: impl Into<PathBuf>, peers: Vec<Multiaddr>) -> Self {
        DaemonOptions::new(NodeConfig {
            data_dir: data_dir.into(),
            store: StoreOptions::default(),
            mesh: MeshConfig {
                listen: vec![crate::mesh::loopback_listen()],
                peers,
                mdns: false,
                ..MeshConfig::default()
            },
        })
    }
}

/// A running daemon: the node, its serving layer and its HTTP API.
///
/// Stop it with [`Daemon::shutdown`]. Dropping it stops accepting HTTP
/// connections but leaves the node running.
pub struct Daemon {
    node: Node,
    serving: Arc<Serving>,
    addr: SocketAddr,
    drain_timeout: Duration,
    stop: Option<oneshot::Sender<()>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    /// Opens the node, starts its serving layer and serves the HTTP API on
    /// `listener`, on the current tokio runtime. The admin token exists
    /// (made if missing) when this returns.
    pub async fn start(opts: DaemonOptions, listener: TcpListener) -> Result<Daemon, DaemonError> {
        let node = match opts.metrics {
            Some(m) => Node::start_with(opts.node, m).await?,
            None => Node::start(opts.node).await?,
        };
        let drain_timeout = opts.api.drain_timeout;
        match Daemon::serve(&node, opts.serve, opts.api, opts.route, listener) {
            Ok((serving, addr, stop, http)) => Ok(Daemon {
                node,
                serving,
                addr,
                drain_timeout,
                stop: Some(stop),
                http: Some(http),
            }),
            Err(e) => {
                node.shutdown().await;
                Err(e)
            }
        }
    }

    /// The serving layer and the HTTP API of a started node.
    #[allow(clippy::type_complexity)] // the parts of a Daemon, once
    fn serve(
        node: &Node,
        serve: ServeConfig,
        mut api: ApiOptions,
        route: crate::route::RouteConfig,
        listener: TcpListener,
    ) -> Result<
        (
            Arc<Serving>,
            SocketAddr,
            oneshot::Sender<()>,
            JoinHandle<std::io::Result<()>>,
        ),
        DaemonError,
    > {
        let serving = node.init_serving(serve)?;
        node.init_routing(route, api.keys_file.is_some());
        preload_default_model(&serving);
        let addr = listener.local_addr()?;
        api.listen = addr;
        // Reads (or makes) the admin token and reads the API keys.
        let router = api::try_router(node.clone(), &api)?;
        let (stop, stopped) = oneshot::channel::<()>();
        tracing::info!(%addr, "HTTP API listening");
        let http = tokio::spawn(api::serve_with(
            listener,
            router,
            api.timeouts(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok((serving, addr, stop, http))
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The serving layer.
    pub fn serving(&self) -> &Arc<Serving> {
        &self.serving
    }

    /// Where the HTTP API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting HTTP connections without waiting; open requests go
    /// on. [`Daemon::shutdown`] then waits for them.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops accepting HTTP connections, waits up to the drain deadline for
    /// open requests and the engines (logging what still runs when it
    /// passes: [`DaemonError::DrainTimeout`]), then shuts the node down.
    pub async fn shutdown(mut self) -> Result<(), DaemonError> {
        self.begin_shutdown();
        let serving = self.serving.clone();
        let http = self.http.take();
        let drain = async move {
            if let Some(h) = http {
                h.await.map_err(|e| DaemonError::Join(e.to_string()))??;
            }
            serving.drain().await;
            Ok::<(), DaemonError>(())
        };
        let timeout = self.drain_timeout;
        let result = match tokio::time::timeout(timeout, drain).await {
            Ok(r) => r,
            Err(_) => {
                let still_running = still_running(&self.serving);
                tracing::error!(
                    still_running = ?still_running,
                    ?timeout,
                    "drain timeout: open requests did not finish in time"
                );
                Err(DaemonError::DrainTimeout {
                    timeout,
                    still_running,
                })
            }
        };
        self.node.shutdown().await;
        result
    }

    /// Waits for `shutdown`, then [`Daemon::shutdown`].
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        shutdown.await;
        self.shutdown().await
    }
}

/// The models of `serving` still generating, as `name (n requests)`.
pub fn still_running(serving: &Serving) -> Vec<String> {
    serving
        .models()
        .iter()
        .filter(|m| m.engine.pending() > 0)
        .map(|m| format!("{} ({} requests)", m.engine.name(), m.engine.pending()))
        .collect()
}

/// Runs a daemon with `opts`, its HTTP API on `listener`, until `shutdown`
/// resolves; then stops it as [`Daemon::shutdown`] does.
pub async fn run(
    opts: DaemonOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    Daemon::start(opts, listener)
        .await?
        .run_until(shutdown)
        .await
}

/// Loads `inference.default_model` in the background as the daemon starts,
/// so the first request after a (re)start finds it mapped instead of paying
/// the load (a client sees only the prefix restore and its new tokens). A
/// model that cannot be loaded now is only logged: requests load it (or
/// report why not) as before.
fn preload_default_model(serving: &Arc<crate::serve::Serving>) {
    let Some(name) = serving.config().default_model.clone() else {
        return;
    };
    let s = serving.clone();
    tokio::spawn(async move {
        match s.resolve(&name).await {
            Ok(_) => tracing::info!(model = %name, "default model preloaded"),
            Err(e) => tracing::warn!(model = %name, error = %e, "default model not preloaded"),
        }
    });
}
