//! Manifest discovery: ask connected peers, Kademlia providers and the
//! origin for the manifest of an artifact until one verifies.

use super::driver::FindDeadline;
use crate::mesh::MeshError;
use crate::mesh::client::Client;
use crate::mesh::origin::Origin;
use crate::store::{ArtifactId, Manifest};
use libp2p::PeerId;
use std::collections::HashSet;
use std::time::Duration;

/// Manifest requests in flight at once while looking for a first source.
const MANIFEST_FANOUT: usize = 16;

/// Asks connected peers and Kademlia providers for the manifest until one verifies.
///
/// Peers are asked in parallel (up to [`MANIFEST_FANOUT`] at a time) and the
/// first verified manifest wins: on a large mesh a node is connected to dozens
/// of peers that mostly lack the artifact, and asking them one after the other
/// cost a round trip each. The Kademlia lookup runs beside the connected round.
///
/// `connected(n)` reports the connected peers at each round. A round that
/// finds no holder asks the mesh to look for peers again
/// ([`Client::rediscover`]); rounds go on until `deadline`.
pub(super) async fn find_manifest(
    client: &Client,
    id: ArtifactId,
    deadline: &FindDeadline,
    origin: Option<&Origin>,
    connected_now: impl Fn(usize),
) -> Result<(Manifest, Option<PeerId>), MeshError> {
    // A release announcement may have brought it; its author likely holds
    // the artifact and is asked first.
    if let Some((m, from)) = client.gossiped_manifest(&id) {
        tracing::debug!(%id, %from, "manifest from a release announcement");
        return Ok((m, Some(from)));
    }
    let mut waiting_logged = false;
    let mut tried: HashSet<PeerId> = HashSet::new();
    // Fellow downloaders announce their have-maps by gossip, which reaches
    // every node over the partial mesh: each holds the manifest, and they are
    // asked too (the providers Kademlia names first may be full: a node at
    // its connection cap refuses newcomers).
    let mut events = client.events();
    let mut heard: Vec<PeerId> = Vec::new();
    // The origin's last answer, so a failed pull says why (e.g. an untrusted certificate).
    let mut origin_error: Option<String> = None;
    loop {
        let c = client.clone();
        let kad = tokio::spawn(async move { c.providers(id).await.unwrap_or_default() });
        let connected = client.connected().await?;
        connected_now(connected.len());
        if connected.is_empty() && !waiting_logged {
            tracing::info!(%id, "waiting for peers to look for the manifest");
            waiting_logged = true;
        }
        tracing::debug!(
            connected = connected.len(),
            "manifest: asking connected peers"
        );
        if let Some(found) = ask_manifest(client, id, connected, &mut tried).await {
            kad.abort();
            return Ok(found);
        }
        while let Ok(ev) = events.try_recv() {
            if let crate::mesh::client::MeshEvent::Have { peer, id: hid, .. } = ev
                && hid == id
                && !heard.contains(&peer)
            {
                heard.push(peer);
            }
        }
        if !heard.is_empty() {
            tracing::debug!(
                heard = heard.len(),
                "manifest: asking announcing downloaders"
            );
            if let Some(found) = ask_manifest(client, id, heard.clone(), &mut tried).await {
                kad.abort();
                return Ok(found);
            }
        }
        let providers: Vec<PeerId> = kad.await.unwrap_or_default().into_iter().collect();
        tracing::debug!(
            found = providers.len(),
            "manifest: asking Kademlia providers"
        );
        if let Some(found) = ask_manifest(client, id, providers, &mut tried).await {
            return Ok(found);
        }
        if let Some(o) = origin {
            match o.manifest(&id).await {
                Ok(m) => return Ok((m, None)),
                Err(e) => {
                    if origin_error.is_none() {
                        tracing::warn!(%id, error = %e, "no manifest from the origin");
                    }
                    origin_error = Some(e.to_string());
                }
            }
        }
        if deadline.passed() {
            let peers = client.connected().await.map(|c| c.len()).unwrap_or(0);
            return Err(MeshError::NoSource(match origin_error {
                Some(e) => {
                    format!("no peer has the manifest of {id} ({peers} connected); origin: {e}")
                }
                None => format!("no peer has the manifest of {id} ({peers} connected)"),
            }));
        }
        // Nobody has it (or nobody is there): look for more peers. Peers
        // that lacked it may get it later.
        let _ = client.rediscover().await;
        tried.clear();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Asks `peers` (those not in `tried`) for the manifest, [`MANIFEST_FANOUT`]
/// at a time; the first that verifies wins and the other requests are dropped.
/// A peer whose manifest does not verify against `id` is banned.
async fn ask_manifest(
    client: &Client,
    id: ArtifactId,
    peers: Vec<PeerId>,
    tried: &mut HashSet<PeerId>,
) -> Option<(Manifest, Option<PeerId>)> {
    use futures::StreamExt;
    let me = client.peer_id();
    let mut queue = peers.into_iter().filter(|p| *p != me && tried.insert(*p));
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        while running.len() < MANIFEST_FANOUT {
            let Some(p) = queue.next() else { break };
            running.push(async move { (p, client.manifest(p, id).await) });
        }
        let (p, got) = running.next().await?;
        match got {
            Ok(Some(m)) => return Some((m, Some(p))),
            Ok(None) => {}
            Err(MeshError::Protocol { peer, reason }) => {
                tracing::warn!(%peer, %reason, "peer sent a manifest that does not verify");
                let _ = client.ban(peer, format!("bad manifest: {reason}")).await;
            }
            Err(e) => tracing::debug!(peer = %p, error = %e, "manifest request failed"),
        }
    }
}
