//! Mesh faults from issue 14 (item 6 and the pull bounds), on in-process
//! nodes on 127.0.0.1 (mDNS off, static peers), real stores and real libp2p.
//! Waits are bounded; nothing asserts on durations.

use anyhow::{Context, Result, bail};
use shoal::mesh::download::{KEEP_FINISHED, Phase};
use shoal::mesh::{MeshError, Progress};
use shoal::node::{Node, NodeError};
use shoal::store::{AddOptions, ArtifactId};
use shoal_testnet::{WAIT, loopback_config, make_file, start_node, wait_peers};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

async fn add(node: &Node, path: &Path) -> Result<ArtifactId> {
    let store = node.store().clone();
    let p = path.to_owned();
    let id =
        tokio::task::spawn_blocking(move || store.add_file(&p, &AddOptions::default())).await??;
    node.mesh().provide(id).await?;
    Ok(id)
}

async fn until_final(rx: &mut watch::Receiver<Progress>) -> Result<Progress> {
    Ok(
        tokio::time::timeout(WAIT, rx.wait_for(|p| p.phase.is_final()))
            .await
            .context("timed out waiting for the download to end")??
            .clone(),
    )
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

/// A fresh swarm key, through a `swarm.key` file as a node reads it.
fn random_psk(dir: &Path, name: &str) -> Result<shoal::mesh::MeshConfig> {
    let path = dir.join(name);
    std::fs::write(&path, shoal::mesh::new_psk()?)?;
    let mut c = loopback_config(vec![]);
    c.psk = Some(shoal::mesh::read_psk(&path)?);
    Ok(c)
}

/// Two nodes with different swarm keys: each handshake fails, every retry;
/// each node logs it once per address, at warn, naming the likely cause.
/// (Current-thread runtime: the nodes' tasks log to this thread's subscriber.)
#[tokio::test(flavor = "current_thread")]
async fn a_different_swarm_key_is_logged_once_per_address() -> Result<()> {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("warn,shoal::mesh=debug")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let keys = tempfile::tempdir()?;
    let a = start_node(random_psk(keys.path(), "a.key")?, None).await?;
    let mut cb = random_psk(keys.path(), "b.key")?;
    cb.peers = vec![a.addr.clone()];
    let b = start_node(cb, None).await?;
    // Static peers are redialled after 2 s, then 4 s, 8 s (doubling up to 16 s): wait for
    // several failed handshakes on both sides.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let fa = a.node.mesh().handshake_failures().await?;
        let fb = b.node.mesh().handshake_failures().await?;
        if fa >= 3 && fb >= 3 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("handshakes did not fail repeatedly (a: {fa}, b: {fb})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.node.mesh().connected().await?.is_empty());
    let text = logs.text();
    let warns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("handshake with"))
        .collect();
    // One line per node (both see the other at 127.0.0.1), not one per retry.
    assert_eq!(warns.len(), 2, "warnings: {warns:#?}");
    for w in warns {
        assert!(w.contains("swarm key"), "{w}");
    }
    Ok(())
}

/// More than `max_downloads` pulls are refused with a clear error; finished
/// downloads are remembered up to KEEP_FINISHED, the oldest dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_are_bounded() -> Result<()> {
    let mut c = loopback_config(vec![]);
    c.max_downloads = 2;
    let n = start_node(c, None).await?;
    let id = |i: u8| hex_id(i);
    // Nobody has these: each looks for a manifest holder for a minute.
    let long = Some(Duration::from_secs(60));
    let (_, _r1) = n.node.pull_with(&id(1), long).await?;
    let (_, _r2) = n.node.pull_with(&id(2), long).await?;
    match n.node.pull_with(&id(3), long).await {
        Err(NodeError::Mesh(MeshError::TooManyDownloads { limit: 2 })) => {}
        other => bail!("a third pull was not refused: {:?}", other.map(|(i, _)| i)),
    }
    // Joining a running download is not a new one.
    n.node.pull_with(&id(1), long).await?;
    assert_eq!(n.node.downloads().running(), 2);
    n.node.downloads().cancel_all();

    // Finished ones: many quick failures (no peer, no wait) leave at most KEEP_FINISHED.
    for i in 10..(10 + KEEP_FINISHED as u8 + 8) {
        let (_, mut rx) = n.node.pull_with(&id(i), Some(Duration::ZERO)).await?;
        let p = until_final(&mut rx).await?;
        assert_eq!(p.phase, Phase::Failed);
    }
    let all = n.node.downloads().all();
    assert_eq!(all.len(), KEEP_FINISHED, "remembered downloads");
    // The oldest were dropped, the newest kept.
    assert!(all.iter().all(|p| p.id != id(10)));
    assert!(all.iter().any(|p| p.id == id(10 + KEEP_FINISHED as u8 + 7)));
    Ok(())
}

fn hex_id(i: u8) -> String {
    format!("{i:02x}").repeat(32)
}

/// A pull that resumes an interrupted download reports the bytes already
/// present in its very first progress (what `/admin/pull` answers first).
/// Current-thread runtime: the download task cannot run before the first
/// progress is read, as when the admin API answers the pull.
#[tokio::test(flavor = "current_thread")]
async fn a_resumed_pull_reports_its_bytes_first() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("a.bin"), 12 << 20, 7)?;
    let seeder = start_node(loopback_config(vec![]), None).await?;
    let id = add(&seeder.node, &src).await?;
    let ss = seeder.node.store().clone();
    let manifest = tokio::task::spawn_blocking(move || ss.manifest(&id))
        .await??
        .context("manifest")?;
    // An interrupted download: the manifest and the first half of the chunks.
    let b = start_node(loopback_config(vec![]), None).await?;
    let store = b.node.store().clone();
    let bytes = std::fs::read(&src)?;
    let m2 = manifest.clone();
    let kept = tokio::task::spawn_blocking(move || -> Result<u64> {
        store.begin(&m2)?;
        let mut kept = 0u64;
        for (i, c) in m2.chunks.iter().enumerate().take(m2.chunks.len() / 2) {
            let s = c.offset as usize;
            store.put_chunk(&id, i as u32, &bytes[s..s + c.len as usize])?;
            kept += u64::from(c.len);
        }
        store.flush(&id)?;
        Ok(kept)
    })
    .await??;
    assert!(kept > 0);
    let (_, mut rx) = b.node.pull(&id.to_hex()).await?;
    let first = rx.borrow().clone();
    assert_eq!(first.have_bytes, kept, "first progress: {first:?}");
    assert_eq!(first.total_bytes, manifest.size);
    // And it completes from the seeder, fetching only the rest.
    b.node.mesh().dial(seeder.addr.clone()).await?;
    let p = until_final(&mut rx).await?;
    assert_eq!(p.phase, Phase::Done, "{:?}", p.error);
    assert_eq!(p.local_bytes, kept);
    assert_eq!(p.bytes_from_peers, manifest.size - kept);
    Ok(())
}

/// A tmpfs mounted for the test (needs root), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc_geteuid() } != 0 {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "full-disk tests need root in CI"
            );
            eprintln!("!!!!!!!! SKIPPED full-disk pull: needs root to mount a tmpfs !!!!!!!!");
            return None;
        }
        let dir = tempfile::tempdir().ok()?.keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount tmpfs failed");
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A pull into a full disk stops with "the disk is full", not "no source".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_into_a_full_disk_says_the_disk_is_full() -> Result<()> {
    let Some(fs) = Tmpfs::mount("16m") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let src = make_file(&tmp.path().join("big.bin"), 24 << 20, 9)?;
    let seeder = start_node(loopback_config(vec![]), None).await?;
    let id = add(&seeder.node, &src).await?;
    let b = start_node(
        loopback_config(vec![seeder.addr.clone()]),
        Some(fs.0.join("store")),
    )
    .await?;
    wait_peers(&b.node, 1).await?;
    let (_, mut rx) = b.node.pull(&id.to_hex()).await?;
    let p = until_final(&mut rx).await?;
    assert_eq!(p.phase, Phase::Failed);
    let err = p.error.unwrap_or_default();
    assert!(err.contains("disk is full"), "error: {err}");
    assert!(!err.contains("no source"), "error: {err}");
    // Nobody was blamed for it.
    assert!(p.banned.is_empty());
    assert!(b.node.mesh().connected().await?.contains(&seeder.peer_id()));
    Ok(())
}
