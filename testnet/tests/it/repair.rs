//! A corrupt artifact is repaired from a peer: only its bad chunks travel.
//! In-process nodes on 127.0.0.1 (mDNS off, static peers); waits are bounded.

use anyhow::{Context, Result, bail};
use shoal::mesh::download::Phase;
use shoal::store::{AddOptions, ArtifactStatus};
use shoal_testnet::{WAIT, assert_identical, loopback_config, make_file, start_node, wait_peers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_artifact_refetches_only_its_bad_chunks_from_a_peer() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("a.bin"), 8 << 20, 41)?;
    let seeder = start_node(loopback_config(vec![]), None).await?;
    let node = start_node(loopback_config(vec![seeder.addr.clone()]), None).await?;
    let (id, bad, bad_len) = {
        let (s1, s2, p) = (
            seeder.node.store().clone(),
            node.node.store().clone(),
            src.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<_> {
            let id = s1.add_file(&p, &AddOptions::default())?;
            assert_eq!(s2.add_file(&p, &AddOptions::default())?, id);
            // Rot one chunk of the second node's copy.
            let m = s2.manifest(&id)?.context("manifest")?;
            let bad = 3u32;
            let c = m.chunks[bad as usize];
            let obj = s2.dir().join("objects").join(id.to_hex());
            std::fs::set_permissions(&obj, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            let mut b = std::fs::read(&obj)?;
            b[c.offset as usize + 9] ^= 0x20;
            std::fs::write(&obj, &b)?;
            let r = s2.verify(&id)?;
            assert_eq!(r.bad_chunks.len(), 1);
            assert_eq!(s2.corrupt_artifacts()?, vec![(id, vec![bad])]);
            let have = s2.repair(&id)?;
            assert_eq!(have.missing().collect::<Vec<_>>(), vec![bad]);
            Ok((id, bad, u64::from(c.len)))
        })
        .await??
    };
    seeder.node.mesh().provide(id).await?;
    wait_peers(&node.node, 1).await?;
    let (_, mut rx) = node.node.pull(&id.to_hex()).await?;
    let p = tokio::time::timeout(
        WAIT,
        rx.wait_for(|p| p.phase == Phase::Done || p.phase == Phase::Failed),
    )
    .await
    .context("timed out")??
    .clone();
    if p.phase != Phase::Done {
        bail!("pull failed: {:?}", p.error);
    }
    // Only the bad chunk came over the wire; the rest stayed in place.
    assert_eq!(p.bytes_from_peers, bad_len, "{p:?}");
    assert_eq!(p.have_bytes, 8 << 20);
    let store = node.node.store().clone();
    let (status, marks) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((store.status(&id)?, store.corrupt_artifacts()?))
    })
    .await??;
    assert_eq!(status, Some(ArtifactStatus::Active));
    assert!(
        marks.is_empty(),
        "the mark is gone: {marks:?} (chunk {bad})"
    );
    assert_identical(&node.node, id, &src).await?;
    Ok(())
}
