//! Scale benchmark: an in-process mesh of N nodes (default 100) on 127.0.0.1,
//! static peers (each node knows 3 earlier ones), mDNS off.
//!
//! Measures: time until every node has learnt a newly published release
//! (gossipsub), time until 10 nodes have pulled a 64 MiB artifact from one
//! seeder, and resident memory per node.
//!
//!     cargo run --release -p shoal-testnet --bin scale -- [NODES] [PULLERS] [SIZE_MB]

use anyhow::{Context, Result, bail};
use shoal::mesh::download::Phase;
use shoal::store::AddOptions;
use shoal_testnet::{TestNode, loopback_config, make_file, start_node, wait_peers};
use std::time::{Duration, Instant};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main]
// long: the scale scenario, step by step, read top to bottom like the
// benchmark section it feeds.
async fn main() -> Result<()> {
    // Logs to stderr with RUST_LOG (off by default: 100 nodes are noisy).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let pullers: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let size_mb: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut nodes: Vec<TestNode> = Vec::with_capacity(n);
    for i in 0..n {
        // Each node dials up to 3 earlier nodes, spread out (a connected, sparse graph).
        let peers = [1usize, 2, 7]
            .iter()
            .filter(|&&d| d <= i)
            .map(|&d| nodes[i - d].addr.clone())
            .collect();
        nodes.push(start_node(loopback_config(peers), None).await?);
    }
    for node in &nodes[1..] {
        wait_peers(&node.node, 1).await?;
    }
    // Let the gossipsub meshes form (heartbeat 500 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_kib();
    println!(
        "started {n} nodes in {:.1}s; RSS {:.1} MiB total, {:.2} MiB per node",
        t.elapsed().as_secs_f64(),
        rss1 as f64 / 1024.0,
        (rss1 - rss0) as f64 / 1024.0 / n as f64
    );

    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("a.bin"), size_mb << 20, 42)?;
    let seeder = &nodes[0].node;
    let store = seeder.store().clone();
    let p = src.clone();
    let id =
        tokio::task::spawn_blocking(move || store.add_file(&p, &AddOptions::default())).await??;
    seeder.mesh().provide(id).await?;
    let key = seeder.store().keygen(false)?;
    for node in &nodes[1..] {
        node.node.store().trust_add(key, "bench")?;
    }
    let signed = seeder.store().publish(&id, "scale:v1", None)?;
    let t = Instant::now();
    seeder.mesh().publish_release(&signed).await?;
    let mut known = vec![false; n];
    known[0] = true;
    while known.iter().any(|k| !k) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "release reached {} of {n} nodes",
                known.iter().filter(|k| **k).count()
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            if !known[i] && node.node.store().resolve("scale:v1").is_ok() {
                known[i] = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let release_secs = t.elapsed().as_secs_f64();
    println!("release known by all {n} nodes after {release_secs:.2}s");

    let t = Instant::now();
    let step = (n / pullers.max(1)).max(1);
    let mut rxs = Vec::new();
    for i in (1..n).step_by(step).take(pullers) {
        let (_, rx) = nodes[i].node.pull("scale:v1").await?;
        println!(
            "  puller {} is node {i} ({})",
            rxs.len(),
            nodes[i].peer_id()
        );
        rxs.push(rx);
    }
    // Each puller's timeline: when it had the manifest (fetching), when it was done.
    let mut tasks = Vec::new();
    for (k, mut rx) in rxs.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let fetching = rx
                .wait_for(|p| p.phase != Phase::Finding)
                .await
                .map(|_| t.elapsed().as_secs_f64())
                .unwrap_or(f64::NAN);
            let p = rx
                .wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed))
                .await
                .map(|p| p.clone());
            (k, fetching, t.elapsed().as_secs_f64(), p)
        }));
    }
    for task in tasks {
        let (k, fetching, done, p) = task.await?;
        let p = p.context("download")?;
        if p.phase != Phase::Done {
            bail!("pull {k} failed: {:?}", p.error);
        }
        println!(
            "  puller {k}: manifest after {fetching:.2}s, done after {done:.2}s, {} MiB from peers, {} duplicate chunks",
            p.bytes_from_peers >> 20,
            p.duplicate_chunks
        );
    }
    let pull_secs = t.elapsed().as_secs_f64();
    println!(
        "{pullers} nodes pulled {size_mb} MiB in {pull_secs:.2}s; RSS now {:.1} MiB",
        rss_kib() as f64 / 1024.0
    );
    println!(
        "RESULT nodes={n} release_all_s={release_secs:.2} pullers={pullers} size_mb={size_mb} pull_all_s={pull_secs:.2} rss_per_node_mib={:.2}",
        (rss1 - rss0) as f64 / 1024.0 / n as f64
    );
    for node in &nodes {
        node.node.shutdown().await;
    }
    Ok(())
}
