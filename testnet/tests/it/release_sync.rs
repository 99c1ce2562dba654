//! A name published before a node joined still resolves there: the node asks
//! its peers for their releases and applies only those its trust store accepts.

use anyhow::Result;
use shoal::mesh::download::Phase;
use shoal::store::AddOptions;
use shoal_testnet::{WAIT, loopback_config, make_file, start_node, wait_peers};

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
    let (_, mut rx) = b.node.pull("demo:v1").await?;
    let p = tokio::time::timeout(
        WAIT,
        rx.wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed)),
    )
    .await??
    .clone();
    assert_eq!(p.phase, Phase::Done, "pull failed: {:?}", p.error);
    assert!(
        peer_bytes() - before >= (3 << 20) as f64,
        "peer bytes not counted: {} -> {}",
        before,
        peer_bytes()
    );
    Ok(())
}
