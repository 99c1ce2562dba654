//! The live dashboard at `/`.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the dashboard page (bundled into the binary; works offline) |
//! | `GET /dashboard/{app.js,view.js,routes.js,style.css}` | its ES modules and style |
//! | `GET /dashboard/state` | one [`DashboardState`] snapshot (JSON) |
//! | `GET /events` | server-sent events: a `state` event with a snapshot every second |
//!
//! A snapshot shows this node, its peers, every artifact this node or a peer
//! holds with per-node chunk availability (have-maps asked from each peer),
//! downloads, cache figures, recent time-to-first-token samples, disk use,
//! and the router's state (peers' serving cards, recent routing events: the
//! page draws requests moving between nodes).
//!
//! The page and its files carry the strict Content-Security-Policy of the
//! chat page ([`super::chat::CSP`]): no inline script or style, nothing from
//! another origin; the page builds its DOM with the DOM API only.

use super::ApiError;
use crate::metrics::{self, TtftSample};
use crate::node::Node;
use crate::route::RouteSnapshot;
use crate::store::{ArtifactId, ArtifactStatus, HaveMap};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use futures::Stream;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

/// Segments of an availability bar at most.
pub const BINS: u32 = 48;
/// How long a peer may take to answer one dashboard query.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time between two `state` events.
pub const TICK: Duration = Duration::from_secs(1);

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const VIEW_JS: &str = include_str!("dashboard/view.js");
const ROUTES_JS: &str = include_str!("dashboard/routes.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// `(path, content type, body)` of every file of the page.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", INDEX_HTML),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        APP_JS,
    ),
    (
        "/dashboard/view.js",
        "text/javascript; charset=utf-8",
        VIEW_JS,
    ),
    (
        "/dashboard/routes.js",
        "text/javascript; charset=utf-8",
        ROUTES_JS,
    ),
    ("/dashboard/style.css", "text/css; charset=utf-8", STYLE_CSS),
];

/// The dashboard's routes: its files, its snapshot and its event stream.
pub fn routes() -> Router<Node> {
    super::static_files(ASSETS)
        .route("/dashboard/state", get(state))
        .route("/events", get(events))
}

async fn state(State(node): State<Node>) -> Result<Json<DashboardState>, ApiError> {
    Ok(Json(snapshot(&node).await?))
}

async fn events(State(node): State<Node>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold((node, true), |(node, first)| async move {
        if !first {
            tokio::time::sleep(TICK).await;
        }
        let event = match snapshot(&node).await {
            Ok(s) => Event::default()
                .event("state")
                .json_data(&s)
                .unwrap_or_else(|_| Event::default().comment("encoding failed")),
            Err(e) => Event::default().event("problem").data(e.1),
        };
        Some((Ok(event), (node, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// This node, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Peer id.
    pub peer_id: String,
    /// Mesh listen addresses.
    pub listen: Vec<String>,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Offline mode.
    pub offline: bool,
    /// mDNS on.
    pub mdns: bool,
}

/// A peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// Peer id.
    pub peer_id: String,
    /// Address of the connection.
    pub addr: String,
    /// Seconds connected.
    pub connected_secs: u64,
    /// Why and how long it is banned, if it is.
    pub banned: Option<String>,
}

/// Which chunks of an artifact one node holds.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    /// `"self"` or the peer id.
    pub peer: String,
    /// Chunks present.
    pub present: u32,
    /// Per-segment presence, 0–100 %, at most [`BINS`] segments.
    pub bins: Vec<u8>,
}

/// An artifact somebody in reach holds.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactView {
    /// Id (hex).
    pub id: String,
    /// Trusted release names.
    pub names: Vec<String>,
    /// Size in bytes (0 when not known yet).
    pub size: u64,
    /// Chunks.
    pub chunks: u32,
    /// Per node.
    pub holders: Vec<Holder>,
}

/// A download.
#[derive(Debug, Clone, Serialize)]
pub struct TransferView {
    /// Artifact id (hex).
    pub id: String,
    /// A name for it, if known.
    pub name: Option<String>,
    /// `finding`, `fetching`, `done`, `failed`.
    pub phase: String,
    /// Size.
    pub total_bytes: u64,
    /// Bytes present.
    pub have_bytes: u64,
    /// Sources serving it now.
    pub peers: usize,
    /// Verified bytes from peers.
    pub bytes_from_peers: u64,
    /// Verified bytes from the origin.
    pub bytes_from_origin: u64,
    /// Chunks that were local (resume, dedupe).
    pub local_chunks: u32,
    /// Milliseconds since it began.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Disk use of the store.
#[derive(Debug, Clone, Serialize)]
pub struct DiskView {
    /// Bytes of artifacts.
    pub used: u64,
    /// Quota; `None` when unlimited.
    pub quota: Option<u64>,
}

/// Everything the dashboard shows, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardState {
    /// This node.
    pub node: NodeView,
    /// Peers (connected or banned).
    pub peers: Vec<PeerView>,
    /// Artifacts held here or by a peer.
    pub artifacts: Vec<ArtifactView>,
    /// Downloads since start.
    pub transfers: Vec<TransferView>,
    /// Cache figures (bytes by source, hit ratios per layer).
    pub caches: metrics::Summary,
    /// Disk against quota.
    pub disk: DiskView,
    /// Recent time-to-first-token samples.
    pub ttft: Vec<TtftSample>,
    /// The router's state (`GET /admin/route` has the same); `None` when
    /// routing is off.
    pub routes: Option<RouteSnapshot>,
    /// When (Unix milliseconds).
    pub time_ms: u64,
}

/// Per-segment presence of a have-map, 0–100 %.
pub fn bins(have: &HaveMap) -> Vec<u8> {
    let len = have.len();
    if len == 0 {
        return Vec::new();
    }
    let n = len.min(BINS);
    (0..n)
        .map(|b| {
            let (start, end) = (b * len / n, ((b + 1) * len / n).max(b * len / n + 1));
            let present = (start..end).filter(|&i| have.get(i)).count() as u32;
            (present * 100 / (end - start)) as u8
        })
        .collect()
}

fn holder(peer: String, have: &HaveMap) -> Holder {
    Holder {
        peer,
        present: have.count(),
        bins: bins(have),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// What one peer holds: `(id, have-map, size if learned)`.
async fn peer_holdings(
    node: &Node,
    peer: libp2p::PeerId,
) -> Vec<(ArtifactId, HaveMap, Option<u64>)> {
    let mesh = node.mesh();
    let Ok(Ok(list)) = tokio::time::timeout(PEER_TIMEOUT, mesh.list(peer)).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in list {
        // A manifest of a large model is megabytes to read and decode: off the runtime.
        let store = node.store().clone();
        let id = a.id;
        let local = tokio::task::spawn_blocking(move || store.manifest(&id))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let manifest = match local {
            Some(m) => Some(m),
            None => tokio::time::timeout(PEER_TIMEOUT, mesh.manifest(peer, a.id))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
        };
        let Some(m) = manifest else { continue };
        let have = if a.complete {
            Some(HaveMap::full(m.chunk_count()))
        } else {
            tokio::time::timeout(PEER_TIMEOUT, mesh.have_map(peer, a.id))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        };
        if let Some(h) = have {
            out.push((a.id, h, Some(m.size)));
        }
    }
    out
}

/// Builds a snapshot (asks each connected peer what it holds).
// long: one pass that fills the page's sections in display order (peers,
// artifacts and their availability, downloads, caches, disk).
pub async fn snapshot(node: &Node) -> Result<DashboardState, ApiError> {
    let mesh = node.mesh();
    let peers = mesh.peers().await?;
    let store = node.store().clone();
    let (list, names, quota) = tokio::task::spawn_blocking(move || {
        let list = store.list()?;
        let mut names: HashMap<ArtifactId, Vec<String>> = HashMap::new();
        for s in store.releases()? {
            if let Ok(r) = s.verify()
                && store.is_trusted(&s.publisher).unwrap_or(false)
            {
                names.entry(r.id).or_default().push(r.name);
            }
        }
        let haves: Vec<_> = list
            .iter()
            .map(|a| (a.id, store.have_map(&a.id).ok().flatten()))
            .collect();
        Ok::<_, crate::store::StoreError>((
            list.into_iter().zip(haves).collect::<Vec<_>>(),
            names,
            store.options().quota_bytes,
        ))
    })
    .await
    .map_err(internal)??;

    let mut artifacts: BTreeMap<ArtifactId, ArtifactView> = BTreeMap::new();
    let mut used = 0;
    for (a, (_, have)) in &list {
        used += a.size;
        let have = match (a.status, have) {
            (ArtifactStatus::Active, _) => HaveMap::full(a.chunks),
            (_, Some(h)) => h.clone(),
            (_, None) => HaveMap::new(a.chunks),
        };
        artifacts.insert(
            a.id,
            ArtifactView {
                id: a.id.to_hex(),
                names: names.get(&a.id).cloned().unwrap_or_default(),
                size: a.size,
                chunks: a.chunks,
                holders: vec![holder("self".into(), &have)],
            },
        );
    }
    let connected: Vec<libp2p::PeerId> = peers
        .iter()
        .filter(|p| p.banned.is_none())
        .filter_map(|p| p.peer_id.parse().ok())
        .collect();
    let remote = futures::future::join_all(connected.iter().map(|p| peer_holdings(node, *p))).await;
    for (peer, holdings) in connected.iter().zip(remote) {
        for (id, have, size) in holdings {
            let entry = artifacts.entry(id).or_insert_with(|| ArtifactView {
                id: id.to_hex(),
                names: names.get(&id).cloned().unwrap_or_default(),
                size: size.unwrap_or(0),
                chunks: have.len(),
                holders: Vec::new(),
            });
            entry.holders.push(holder(peer.to_string(), &have));
        }
    }

    let transfers = node
        .downloads()
        .all()
        .into_iter()
        .map(|p| {
            let name =
                p.id.parse::<ArtifactId>()
                    .ok()
                    .and_then(|id| names.get(&id))
                    .and_then(|n| n.first().cloned());
            TransferView {
                name,
                phase: format!("{:?}", p.phase).to_lowercase(),
                total_bytes: p.total_bytes,
                have_bytes: p.have_bytes,
                peers: p.peers,
                bytes_from_peers: p.bytes_from_peers,
                bytes_from_origin: p.bytes_from_origin,
                local_chunks: p.local_chunks,
                elapsed_ms: p.elapsed_ms,
                error: p.error,
                id: p.id,
            }
        })
        .collect();

    Ok(DashboardState {
        node: NodeView {
            peer_id: mesh.peer_id().to_string(),
            listen: mesh
                .listen_addrs()
                .await?
                .iter()
                .map(|a| a.to_string())
                .collect(),
            uptime_secs: node.uptime_secs(),
            offline: mesh.config().offline,
            mdns: mesh.config().mdns,
        },
        peers: peers
            .into_iter()
            .map(|p| PeerView {
                peer_id: p.peer_id,
                addr: p.addr,
                connected_secs: p.connected_secs,
                banned: p.banned,
            })
            .collect(),
        artifacts: artifacts.into_values().collect(),
        transfers,
        caches: node.metrics().summary(),
        disk: DiskView {
            used,
            quota: (quota != u64::MAX).then_some(quota),
        },
        ttft: node.metrics().recent_ttft(),
        routes: node.routing().map(|r| r.snapshot()),
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, header};
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_page_and_its_files_have_their_type_and_a_strict_csp() {
        for &(path, ty, _) in ASSETS {
            let r = super::super::static_files::<()>(ASSETS)
                .oneshot(Request::get(path).body(Body::empty()).expect("a request"))
                .await
                .expect("infallible");
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ty, "{path}");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii");
            for part in [
                "default-src 'none'",
                "script-src 'self'",
                "style-src 'self'",
            ] {
                assert!(csp.contains(part), "{path}: {csp}");
            }
            assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        }
    }

    #[test]
    fn the_page_has_no_inline_code_and_loads_only_its_own_files() {
        crate::api::check_static_page(
            INDEX_HTML,
            &[
                ("app.js", APP_JS),
                ("view.js", VIEW_JS),
                ("routes.js", ROUTES_JS),
            ],
            ASSETS,
            "/dashboard/",
        );
    }

    #[test]
    fn availability_bins() {
        let mut h = HaveMap::new(10);
        assert_eq!(bins(&h), vec![0; 10]);
        h.set(0);
        h.set(9);
        assert_eq!(bins(&h)[0], 100);
        assert_eq!(bins(&h)[9], 100);
        let mut big = HaveMap::new(480);
        for i in 0..240 {
            big.set(i);
        }
        let b = bins(&big);
        assert_eq!(b.len(), BINS as usize);
        assert!(b[..24].iter().all(|&x| x == 100));
        assert!(b[24..].iter().all(|&x| x == 0));
        let mut odd = HaveMap::new(50);
        odd.set(49);
        let b = bins(&odd);
        assert_eq!(b.len(), 48);
        assert_eq!(b.iter().filter(|&&x| x > 0).count(), 1);
        assert!(bins(&HaveMap::new(0)).is_empty());
    }
}
