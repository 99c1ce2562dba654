//! In-process meshes on 127.0.0.1 (mDNS off, static peers).
//!
//! Waits are bounded (a hang fails the test); nothing asserts on durations.

use anyhow::{Context, Result, bail};
use shoal::mesh::download::{self, Phase};
use shoal::mesh::secure::SecureChannel;
use shoal::mesh::{self, MeshConfig, Multiaddr, Progress};
use shoal::node::Node;
use shoal::store::{AddOptions, ArtifactId, HaveMap};
use shoal_testnet::{
    TestNode, WAIT, assert_identical, loopback_config, make_file, pull_done, start_mesh,
    start_node, wait_peers,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

const SIZE: usize = 24 << 20;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn add(node: &Node, path: &Path) -> Result<ArtifactId> {
    let store = node.store().clone();
    let p = path.to_owned();
    let id =
        tokio::task::spawn_blocking(move || store.add_file(&p, &AddOptions::default())).await??;
    node.mesh().provide(id).await?;
    Ok(id)
}

async fn wait_until(
    rx: &mut watch::Receiver<Progress>,
    f: impl Fn(&Progress) -> bool,
) -> Result<Progress> {
    let p = tokio::time::timeout(WAIT, rx.wait_for(|p| f(p) || p.phase == Phase::Failed))
        .await
        .context("timed out waiting for progress")??
        .clone();
    Ok(p)
}

fn tmp_file(dir: &tempfile::TempDir, name: &str, seed: u64) -> Result<PathBuf> {
    make_file(&dir.path().join(name), SIZE, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seeder_to_three_nodes() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", 1)?;
    let nodes = start_mesh(4, |_, _| {}).await?;
    let id = add(&nodes[0].node, &src).await?;
    for n in &nodes[1..] {
        wait_peers(&n.node, 1).await?;
    }
    let hex = id.to_hex();
    let pulls = nodes[1..].iter().map(|n| pull_done(&n.node, &hex));
    let results = futures::future::try_join_all(pulls).await?;
    for (n, p) in nodes[1..].iter().zip(&results) {
        assert_identical(&n.node, id, &src).await?;
        assert_eq!(p.have_bytes, SIZE as u64);
        assert_eq!(p.bad_chunks, 0);
        assert_eq!(p.bytes_from_origin, 0);
    }
    for n in &nodes {
        assert_eq!(n.node.mesh().serve_stats().corrupted, 0);
    }
    // Every byte fetched came from some node in the mesh, and the seeder served at least one copy.
    let served: u64 = nodes
        .iter()
        .map(|n| n.node.mesh().serve_stats().bytes)
        .sum();
    let fetched: u64 = results.iter().map(|p| p.bytes_from_peers).sum();
    assert!(served >= fetched, "served {served} < fetched {fetched}");
    assert!(nodes[0].node.mesh().serve_stats().bytes >= SIZE as u64 / 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_peer_is_banned_and_chunks_come_from_elsewhere() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", 2)?;
    let liar = start_node(
        MeshConfig {
            test_corrupt_chunks: true,
            ..loopback_config(vec![])
        },
        None,
    )
    .await?;
    let honest = start_node(loopback_config(vec![]), None).await?;
    let id = add(&liar.node, &src).await?;
    assert_eq!(add(&honest.node, &src).await?, id);
    // The downloader first knows only the liar.
    let d = start_node(loopback_config(vec![liar.addr.clone()]), None).await?;
    wait_peers(&d.node, 1).await?;
    let (_, mut rx) = d.node.pull(&id.to_hex()).await?;
    let p = wait_until(&mut rx, |p| p.bad_chunks > 0).await?;
    assert_eq!(p.banned, vec![liar.peer_id().to_string()]);
    assert_eq!(p.have_chunks, p.local_chunks, "no corrupt chunk was stored");
    let peers = d.node.mesh().peers().await?;
    let entry = peers
        .iter()
        .find(|e| e.peer_id == liar.peer_id().to_string())
        .context("liar listed")?;
    assert!(entry.banned.is_some(), "liar is banned: {entry:?}");
    // Now an honest source appears; the download completes from it.
    d.node.mesh().dial(honest.addr.clone()).await?;
    let p = wait_until(&mut rx, |p| p.phase == Phase::Done).await?;
    assert_eq!(p.phase, Phase::Done, "{:?}", p.error);
    assert_eq!(p.bytes_from_peers, SIZE as u64);
    assert_identical(&d.node, id, &src).await?;
    assert!(liar.node.mesh().serve_stats().corrupted > 0);
    // The banned liar is not re-dialled and cannot reconnect.
    assert!(!d.node.mesh().connected().await?.contains(&liar.peer_id()));
    Ok(())
}

/// A peer holding every other chunk; the downloader gets those, stops, restarts with a full seeder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_refetching_verified_chunks() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", 3)?;
    let seeder = start_node(loopback_config(vec![]), None).await?;
    let id = add(&seeder.node, &src).await?;
    let partial = start_node(loopback_config(vec![]), None).await?;
    let manifest = seeder.node.store().manifest(&id)?.context("manifest")?;
    let n = manifest.chunk_count();
    {
        let store = partial.node.store().clone();
        let data = std::fs::read(&src)?;
        let m = manifest.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            store.begin(&m)?;
            for (i, c) in m.chunks.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
                store.put_chunk(
                    &id,
                    i as u32,
                    &data[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
                )?;
            }
            store.flush(&id)?;
            Ok(())
        })
        .await??;
    }
    let half = n.div_ceil(2);
    let d_dir = tmp.path().join("d-store");
    let d = start_node(
        loopback_config(vec![partial.addr.clone()]),
        Some(d_dir.clone()),
    )
    .await?;
    wait_peers(&d.node, 1).await?;
    let (_, mut rx) = d.node.pull(&id.to_hex()).await?;
    let p = wait_until(&mut rx, |p| p.have_chunks == half).await?;
    assert_eq!(p.phase, Phase::Fetching);
    // Stop the node (cancelling the download) and start it again on the same store.
    assert!(d.node.downloads().cancel(&id));
    d.node.shutdown().await;
    drop(rx);
    let TestNode { node, daemon, .. } = d;
    drop(daemon);
    drop(node);
    let d2 = start_node_retry(loopback_config(vec![seeder.addr.clone()]), d_dir).await?;
    let before: HaveMap = d2.node.store().have_map(&id)?.context("partial survives")?;
    assert_eq!(
        before.count(),
        half,
        "every verified chunk survived the restart"
    );
    wait_peers(&d2.node, 1).await?;
    let opts = d2.node.mesh().config().download.clone();
    let report =
        download::download(d2.node.mesh(), id, None, &opts, None, d2.node.metrics()).await?;
    for i in &report.fetched {
        assert!(
            !before.get(*i),
            "chunk {i} was verified before the restart and fetched again"
        );
    }
    assert_eq!(report.fetched.len() as u32 + before.count(), n);
    assert_eq!(report.progress.local_chunks, half);
    assert_identical(&d2.node, id, &src).await?;
    Ok(())
}

/// The store's directory lock is released when the last handle drops; tasks may linger a moment.
async fn start_node_retry(config: MeshConfig, dir: PathBuf) -> Result<TestNode> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match start_node(config.clone(), Some(dir.clone())).await {
            Ok(n) => return Ok(n),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "store still locked, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dedupe_copies_shared_chunks() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let a = tmp_file(&tmp, "a.bin", 4)?;
    // b = a with its last 100 KiB rewritten.
    let mut data = std::fs::read(&a)?;
    let len = data.len();
    for b in &mut data[len - (100 << 10)..] {
        *b = b.wrapping_add(1);
    }
    let b = tmp.path().join("b.bin");
    std::fs::write(&b, &data)?;
    let seeder = start_node(loopback_config(vec![]), None).await?;
    let id_b = add(&seeder.node, &b).await?;
    let d = start_node(loopback_config(vec![seeder.addr.clone()]), None).await?;
    add(&d.node, &a).await?;
    wait_peers(&d.node, 1).await?;
    let p = pull_done(&d.node, &id_b.to_hex()).await?;
    assert!(
        p.local_chunks > 0 && p.local_chunks + 4 >= p.total_chunks,
        "{p:?}"
    );
    assert!(
        p.bytes_from_peers < 4 << 20,
        "fetched {} bytes",
        p.bytes_from_peers
    );
    assert_identical(&d.node, id_b, &b).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_keeps_strangers_out() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("swarm.key");
    std::fs::write(&key_file, mesh::new_psk()?)?;
    let psk = mesh::read_psk(&key_file)?;
    let src = tmp_file(&dir, "a.bin", 5)?;
    let seeder = start_node(
        MeshConfig {
            psk: Some(psk),
            ..loopback_config(vec![])
        },
        None,
    )
    .await?;
    let id = add(&seeder.node, &src).await?;
    let member = start_node(
        MeshConfig {
            psk: Some(psk),
            ..loopback_config(vec![seeder.addr.clone()])
        },
        None,
    )
    .await?;
    let mut stranger_cfg = loopback_config(vec![seeder.addr.clone()]);
    stranger_cfg.download.find_timeout = Duration::from_secs(3);
    let stranger = start_node(stranger_cfg, None).await?;
    wait_peers(&member.node, 1).await?;
    pull_done(&member.node, &id.to_hex()).await?;
    assert_identical(&member.node, id, &src).await?;
    // The stranger never gets a connection, so it finds no source.
    let (_, mut rx) = stranger.node.pull(&id.to_hex()).await?;
    let p = wait_until(&mut rx, |p| p.phase == Phase::Done).await?;
    assert_eq!(p.phase, Phase::Failed);
    assert!(stranger.node.mesh().connected().await?.is_empty());
    assert!(
        !seeder
            .node
            .mesh()
            .connected()
            .await?
            .contains(&stranger.peer_id())
    );
    Ok(())
}

/// TLS is preferred, noise is the fallback, and two nodes with no channel in
/// common never connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_channels_negotiate_tls_then_noise() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let src = tmp_file(&dir, "a.bin", 8)?;
    let with = |security: Vec<SecureChannel>, peers: Vec<Multiaddr>| MeshConfig {
        security,
        ..loopback_config(peers)
    };
    // The seeder offers both, in the default order.
    let seeder = start_node(with(SecureChannel::defaults(), vec![]), None).await?;
    let id = add(&seeder.node, &src).await?;
    // A TLS-only node and a noise-only node both reach it and pull byte-identical copies.
    let tls = start_node(
        with(vec![SecureChannel::Tls], vec![seeder.addr.clone()]),
        None,
    )
    .await?;
    let noise = start_node(
        with(vec![SecureChannel::Noise], vec![seeder.addr.clone()]),
        None,
    )
    .await?;
    for n in [&tls, &noise] {
        wait_peers(&n.node, 1).await?;
        pull_done(&n.node, &id.to_hex()).await?;
        assert_identical(&n.node, id, &src).await?;
    }
    // TLS only against noise only: no channel in common, no connection.
    let mut cfg = with(vec![SecureChannel::Tls], vec![noise.addr.clone()]);
    cfg.download.find_timeout = Duration::from_secs(3);
    let lonely = start_node(cfg, None).await?;
    let (_, mut rx) = lonely.node.pull(&id.to_hex()).await?;
    let p = wait_until(&mut rx, |p| p.phase == Phase::Done).await?;
    assert_eq!(p.phase, Phase::Failed);
    assert!(lonely.node.mesh().connected().await?.is_empty());
    assert!(
        !noise
            .node
            .mesh()
            .connected()
            .await?
            .contains(&lonely.peer_id())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_releases_spread_by_gossip() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", 6)?;
    let nodes = start_mesh(3, |_, _| {}).await?;
    let (publisher, truster, sceptic) = (&nodes[0].node, &nodes[1].node, &nodes[2].node);
    let id = add(publisher, &src).await?;
    let key = publisher.store().keygen(false)?;
    truster.store().trust_add(key, "publisher")?;
    let signed = publisher.store().publish(&id, "tiny:v1", None)?;
    wait_peers(truster, 2).await?;
    wait_peers(sceptic, 2).await?;
    // Gossip needs the subscriptions exchanged; announce until the truster knows the name.
    let deadline = tokio::time::Instant::now() + WAIT;
    while truster.store().resolve("tiny:v1").is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("release never arrived");
        }
        publisher.mesh().publish_release(&signed).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(truster.store().resolve("tiny:v1")?, id);
    assert!(
        sceptic.store().resolve("tiny:v1").is_err(),
        "untrusted release must not resolve"
    );
    pull_done(truster, "tiny:v1").await?;
    assert_identical(truster, id, &src).await?;
    Ok(())
}

/// Three nodes: r, s (holding a file made from `seed`, `id`) and d, where s
/// and d know only r. Returns the temporary directory, the file, r, s, d, id.
async fn holder_behind_a_rendezvous(
    seed: u64,
) -> Result<(tempfile::TempDir, PathBuf, [TestNode; 3], ArtifactId)> {
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", seed)?;
    let r = start_node(loopback_config(vec![]), None).await?;
    let s = start_node(loopback_config(vec![r.addr.clone()]), None).await?;
    let id = add(&s.node, &src).await?;
    let d = start_node(loopback_config(vec![r.addr.clone()]), None).await?;
    wait_peers(&d.node, 1).await?;
    wait_peers(&s.node, 1).await?;
    Ok((tmp, src, [r, s, d], id))
}

/// Node d only knows r; s (which holds the artifact) only knows r. d finds s through Kademlia.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_found_through_kademlia() -> Result<()> {
    init_tracing();
    let (_tmp, src, [r, _s, d], id) = holder_behind_a_rendezvous(7).await?;
    let p = pull_done(&d.node, &id.to_hex()).await?;
    assert_eq!(p.bytes_from_peers, SIZE as u64);
    assert_identical(&d.node, id, &src).await?;
    assert!(
        r.node.store().status(&id)?.is_none(),
        "the middle node never held it"
    );
    Ok(())
}

/// A node that provides an artifact itself (a download does from its
/// start) still finds the other providers: its own record is no find, and
/// the lookup goes on to the peers that hold the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providing_node_still_finds_the_other_providers() -> Result<()> {
    init_tracing();
    let (_tmp, _src, [_r, s, d], id) = holder_behind_a_rendezvous(8).await?;
    d.node.mesh().provide(id).await?;
    let deadline = tokio::time::Instant::now() + shoal_testnet::WAIT;
    loop {
        let found = d.node.mesh().providers(id).await?;
        assert!(!found.contains(&d.peer_id()), "its own record is no find");
        if found.contains(&s.peer_id()) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the other provider was never found: {found:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its address came with the record: a request reaches it by id.
    let have = d.node.mesh().have_map(s.peer_id(), id).await?;
    assert!(have.is_some_and(|h| h.is_complete()));
    Ok(())
}

/// A have-map pushed to a peer (the downloaders' announcements) arrives as a
/// `Have` event naming the sender, with the map and the origin flag as sent;
/// a push to a peer that is not connected goes nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_have_maps_reach_the_peer_as_the_senders() -> Result<()> {
    init_tracing();
    let nodes = start_mesh(3, |i, c| {
        // Node 2 knows no one: nothing is pushed to it.
        if i == 2 {
            c.peers.clear();
        }
    })
    .await?;
    let (a, b, lonely) = (&nodes[0], &nodes[1], &nodes[2]);
    wait_peers(&b.node, 1).await?;
    let mut events = b.node.mesh().events();
    let mut lonely_events = lonely.node.mesh().events();
    let id = ArtifactId([7; 32]);
    let mut have = HaveMap::new(100);
    for i in [0, 9, 63, 99] {
        have.set(i);
    }
    a.node
        .mesh()
        .push_have(vec![b.peer_id(), lonely.peer_id()], id, &have, true)
        .await?;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(mesh::client::MeshEvent::Have {
                    peer,
                    id: hid,
                    have,
                    origin,
                }) if hid == id => return Ok::<_, anyhow::Error>((peer, have, origin)),
                Ok(_) => {}
                Err(e) => bail!("events: {e}"),
            }
        }
    })
    .await
    .context("no Have event")??;
    assert_eq!(got.0, a.peer_id(), "the sender is the connection's peer");
    assert_eq!(*got.1, have);
    assert!(got.2, "origin flag kept");
    // The lonely node heard nothing of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(ev) = lonely_events.try_recv() {
        assert!(
            !matches!(ev, mesh::client::MeshEvent::Have { id: hid, .. } if hid == id),
            "pushed to a peer that is not connected"
        );
    }
    Ok(())
}

/// The value of the unlabelled sample `name` in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Each in-process node has its own metrics: the downloader that bans a
/// lying peer counts the ban and its connected peer in its own `/metrics`;
/// the liar, in the same process, counts no ban and its own peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_counts_its_own_metrics() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp_file(&tmp, "a.bin", 4)?;
    let liar_config = MeshConfig {
        test_corrupt_chunks: true,
        ..loopback_config(vec![])
    };
    let liar = start_node(liar_config, None).await?;
    let id = add(&liar.node, &src).await?;
    let d_config = loopback_config(vec![liar.addr.clone()]);
    let d = start_node(d_config, None).await?;
    wait_peers(&d.node, 1).await?;
    let (_, mut rx) = d.node.pull(&id.to_hex()).await?;
    let p = wait_until(&mut rx, |p| !p.banned.is_empty()).await?;
    assert_eq!(p.banned, vec![liar.peer_id().to_string()]);
    // Through the HTTP API, as a scraper sees it.
    let scrape = |api: std::net::SocketAddr| async move {
        tokio::task::spawn_blocking(move || -> Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(api)?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .await?
    };
    // The ban reaches the mesh's event loop just after the download reports it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut mine = scrape(d.api).await?;
    while sample(&mine, "shoal_peer_bans_total") != Some(1.0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        mine = scrape(d.api).await?;
    }
    let theirs = scrape(liar.api).await?;
    assert_eq!(sample(&mine, "shoal_peer_bans_total"), Some(1.0), "{mine}");
    assert_eq!(sample(&mine, "shoal_peers_banned"), Some(1.0), "{mine}");
    assert_eq!(
        sample(&theirs, "shoal_peer_bans_total"),
        Some(0.0),
        "{theirs}"
    );
    assert_eq!(sample(&theirs, "shoal_peers_banned"), Some(0.0), "{theirs}");
    Ok(())
}
