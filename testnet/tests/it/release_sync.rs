//! A name published before a node joined still resolves there: the node asks
//! its peers for their releases and applies only those its trust store accepts.

use anyhow::Result;
use shoal::store::AddOptions;
use shoal_testnet::{
    WAIT, loopback_config, make_file, pull_done, seed_release, start_node, wait_peers,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_resolves_trusted_names_and_refuses_untrusted_ones() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("model.bin"), 3 << 20, 7)?;
    let a = start_node(loopback_config(vec![]), None).await?;
    let (id, publisher) = {
        let store = a.node.store().clone();
        let src = src.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let id = store.add_file(&src, &AddOptions::default())?;
            let pk = store.keygen(false)?;
            store.publish(&id, "demo:v1", None)?;
            Ok((id, pk))
        })
        .await??
    };
    a.node.mesh().provide(id).await?;

    // b trusts a's key; c does not.
    let b_dir = tmp.path().join("b");
    let c_dir = tmp.path().join("c");
    for (dir, trust) in [(&b_dir, true), (&c_dir, false)] {
        let s = shoal::store::Store::open(dir, Default::default())?;
        if trust {
            s.trust_add(publisher, "a")?;
        }
    }
    let b = start_node(loopback_config(vec![a.addr.clone()]), Some(b_dir)).await?;
    let c = start_node(loopback_config(vec![a.addr.clone()]), Some(c_dir)).await?;
    wait_peers(&b.node, 1).await?;
    wait_peers(&c.node, 1).await?;

    let (got, _) = tokio::time::timeout(WAIT, b.node.resolve("demo:v1")).await??;
    assert_eq!(got, id, "the trusted name resolves to the published id");
    let err = tokio::time::timeout(WAIT, c.node.resolve("demo:v1"))
        .await?
        .expect_err("an untrusted publisher's name must not resolve");
    assert!(err.to_string().contains("unknown artifact"), "{err}");
    // The refused release was not stored either.
    assert!(c.node.store().release("demo:v1")?.is_none());

    // b pulls by name; the fetch is counted in the metrics by source.
    let peer_bytes = || {
        // The downloader reports to b's own registry.
        b.node
            .metrics()
            .render()
            .lines()
            .find(|l| l.starts_with("shoal_chunk_fetch_bytes_total{source=\"peer\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = peer_bytes();
    pull_done(&b.node, "demo:v1").await?;
    assert!(
        peer_bytes() - before >= (3 << 20) as f64,
        "peer bytes not counted: {} -> {}",
        before,
        peer_bytes()
    );
    Ok(())
}

/// A release travels with its manifest: every node that trusts the publisher
/// keeps it, answers neighbours' manifest requests with it without holding
/// the artifact, and pulls without looking for a holder of the manifest; a
/// node that does not trust the publisher keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_brings_its_manifest_to_the_nodes_that_trust_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("model.bin"), 2 << 20, 9)?;
    let a = start_node(loopback_config(vec![]), None).await?;
    let b = start_node(loopback_config(vec![a.addr.clone()]), None).await?;
    let c = start_node(loopback_config(vec![b.addr.clone()]), None).await?;
    let d = start_node(loopback_config(vec![b.addr.clone()]), None).await?;
    wait_peers(&b.node, 3).await?;
    let nodes = [a, b, c];
    // a seeds and signs; b and c trust a's key, d does not.
    let (id, signed) = seed_release(&nodes, &src, "gossip:v1").await?;
    let [a, b, c] = nodes;
    // Gossip needs the topic meshes formed: publish until c has the name
    // (the same release again is a no-op for a node that has it).
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.node.store().release("gossip:v1")?.is_none() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the release never reached c"
        );
        a.node.mesh().publish_release(&signed).await?;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.node.mesh().gossiped_manifest(&id).is_none() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "c never kept the manifest"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // b holds no byte of the artifact, yet answers with its manifest.
    assert!(b.node.store().manifest(&id)?.is_none());
    let m = c
        .node
        .mesh()
        .manifest(b.node.mesh().peer_id(), id)
        .await?
        .expect("b answers from the release's manifest");
    assert_eq!(m.id(), id);
    // d saw the same gossip and kept neither the release nor its manifest.
    assert!(d.node.mesh().gossiped_manifest(&id).is_none());
    assert!(d.node.store().release("gossip:v1")?.is_none());
    assert!(
        d.node
            .mesh()
            .manifest(b.node.mesh().peer_id(), id)
            .await?
            .is_some(),
        "b answers anyone: the manifest is public, checked by its id"
    );
    // c pulls by name; the manifest was already there.
    pull_done(&c.node, "gossip:v1").await?;
    shoal_testnet::assert_identical(&c.node, id, &src).await?;
    Ok(())
}

/// Anti-entropy: a node that knew an older release of a name, and was away
/// when the newer one was gossiped, catches up from a neighbour's list by
/// itself (no pull, no resolve); a release in that list from a publisher it
/// does not trust stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_release_catches_up_from_a_neighbour() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let v1 = make_file(&tmp.path().join("v1.bin"), 1 << 20, 1)?;
    let v2 = make_file(&tmp.path().join("v2.bin"), 1 << 20, 2)?;
    let a = start_node(loopback_config(vec![]), None).await?;
    let (ids, publisher, stranger, first) = {
        let store = a.node.store().clone();
        let dir = tmp.path().join("stranger");
        tokio::task::spawn_blocking(move || -> Result<_> {
            let id1 = store.add_file(&v1, &AddOptions::default())?;
            let id2 = store.add_file(&v2, &AddOptions::default())?;
            let pk = store.keygen(false)?;
            let first = store.publish(&id1, "demo:v1", None)?;
            store.publish(&id2, "demo:v1", None)?;
            // A release a trusts and b will not: another key's.
            let other = shoal::store::Store::open(&dir, Default::default())?;
            let oid = other.add_file(&v1, &AddOptions::default())?;
            let spk = other.keygen(false)?;
            store.trust_add(spk, "stranger")?;
            store.apply_release(&other.publish(&oid, "other:v1", None)?)?;
            Ok(((id1, id2), pk, spk, first))
        })
        .await??
    };
    // b trusts a (not the stranger) and knows only the first release.
    let b_dir = tmp.path().join("b");
    {
        let s = shoal::store::Store::open(&b_dir, Default::default())?;
        s.trust_add(publisher, "a")?;
        s.apply_release(&first)?;
        assert!(!s.is_trusted(&stranger)?);
    }
    let mut config = loopback_config(vec![a.addr.clone()]);
    config.release_sync_interval = std::time::Duration::from_secs(1);
    let b = start_node(config, Some(b_dir)).await?;
    assert_eq!(b.node.store().resolve("demo:v1")?, ids.0);
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.node.store().resolve("demo:v1")? != ids.1 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "b never caught up with the second release"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(b.node.store().release("other:v1")?.is_none());
    Ok(())
}
