//! The connection manager in a mesh larger than its bound: every node stays
//! within `mesh.max_connections`, idle connections close down towards
//! `mesh.min_connections`, and releases, providers and chunks still reach
//! nodes that are not connected to their source.
//!
//! Waits are bounded (a hang fails the test); nothing asserts on durations.

use anyhow::{Result, bail};
use shoal::node::Node;
use shoal_testnet::{
    TestNode, WAIT, assert_identical, loopback_config, make_file, pull_done, seed_release,
    start_node,
};
use std::time::{Duration, Instant};

const NODES: usize = 24;
const MAX: u32 = 8;
const MIN: u32 = 3;

fn metric(node: &Node, name: &str) -> f64 {
    node.metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn connected(node: &Node) -> Result<usize> {
    Ok(node.mesh().connected().await?.len())
}

/// 24 nodes, each dialling two earlier ones (a sparse chain), bound 8 / 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_larger_than_the_bound_keeps_it_and_still_spreads_everything() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut nodes: Vec<TestNode> = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let peers = [1usize, 5]
            .iter()
            .filter(|&&d| d <= i)
            .map(|&d| nodes[i - d].addr.clone())
            .collect();
        let mut c = loopback_config(peers);
        c.max_connections = MAX;
        c.min_connections = MIN;
        nodes.push(start_node(c, None).await?);
    }
    // Everyone connected to someone; Kademlia and identify spread the rest.
    let deadline = Instant::now() + WAIT;
    for n in &nodes {
        while connected(&n.node).await? == 0 {
            if Instant::now() > deadline {
                bail!("a node never connected");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Past the grace period of the first connections, for a few ticks:
    // never above the bound, and the manager has closed idle ones.
    let settle = Instant::now() + shoal::mesh::connmgr::GRACE + Duration::from_secs(5);
    let mut peak = 0;
    while Instant::now() < settle {
        for n in &nodes {
            let c = connected(&n.node).await?;
            peak = peak.max(c);
            assert!(
                c <= MAX as usize,
                "{c} connected peers above the bound {MAX}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let known: Vec<f64> = nodes
        .iter()
        .map(|n| metric(&n.node, "shoal_peers_known"))
        .collect();
    assert!(
        known.iter().any(|k| *k > f64::from(MAX)),
        "discovery learns more peers than the bound: {known:?}"
    );
    let trimmed: f64 = nodes
        .iter()
        .map(|n| metric(&n.node, "shoal_connections_trimmed_total"))
        .sum();
    eprintln!("peak {peak} connected peers per node; known {known:?}; {trimmed} trimmed");

    // A release published at one end reaches every node over the partial mesh.
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("a.bin"), 6 << 20, 5)?;
    let (id, signed) = seed_release(&nodes, &src, "bounded:v1").await?;
    nodes[0].node.mesh().publish_release(&signed).await?;
    let t0 = Instant::now();
    let deadline = t0 + WAIT;
    for n in &nodes {
        while n.node.store().resolve("bounded:v1").is_err() {
            if Instant::now() > deadline {
                bail!("the release never reached {}", n.peer_id());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The far end pulls it: providers through Kademlia, a connection on demand.
    let far = &nodes[NODES - 1];
    eprintln!(
        "release everywhere in {:?}; seeder {} far {}",
        t0.elapsed(),
        nodes[0].peer_id(),
        far.peer_id()
    );
    let t1 = Instant::now();
    let p = pull_done(&far.node, "bounded:v1").await?;
    eprintln!("pulled in {:?}", t1.elapsed());
    assert_eq!(p.bytes_from_peers, 6 << 20);
    assert_identical(&far.node, id, &src).await?;
    for n in &nodes {
        let c = connected(&n.node).await?;
        assert!(
            c <= MAX as usize,
            "{c} connected peers above the bound {MAX}"
        );
    }
    for n in &nodes {
        n.node.shutdown().await;
    }
    Ok(())
}

/// Peer exchange: a node lists the peers it knows with their addresses, and
/// a node that learns them this way (no mDNS here, one static peer) can
/// reach a peer it was never told of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_learns_the_mesh_from_a_neighbours_peer_list() -> Result<()> {
    let a = start_node(loopback_config(vec![]), None).await?;
    let b = start_node(loopback_config(vec![a.addr.clone()]), None).await?;
    let c = start_node(loopback_config(vec![b.addr.clone()]), None).await?;
    shoal_testnet::wait_peers(&c.node, 1).await?;
    let a_id = a.node.mesh().peer_id();
    let c_id = c.node.mesh().peer_id();
    let deadline = Instant::now() + WAIT;
    let list = loop {
        let list = c.node.mesh().peer_list(b.node.mesh().peer_id()).await?;
        if list.iter().any(|(p, _)| *p == a_id) {
            break list;
        }
        if Instant::now() > deadline {
            bail!("b never listed a: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        list.iter().all(|(p, _)| *p != c_id),
        "the asker is not listed to itself"
    );
    let (_, addrs) = list.iter().find(|(p, _)| *p == a_id).expect("listed");
    // What b says about a is enough to reach a.
    let addr: shoal::mesh::Multiaddr = format!("{}/p2p/{a_id}", addrs[0]).parse()?;
    c.node.mesh().dial(addr).await?;
    let deadline = Instant::now() + WAIT;
    while !c.node.mesh().connected().await?.contains(&a_id) {
        if Instant::now() > deadline {
            bail!("c could not reach a at the listed address");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
