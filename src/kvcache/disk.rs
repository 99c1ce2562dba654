//! The disk tier: one file per block under `<data-dir>/kv/`, a byte budget
//! with LRU eviction (an in-memory [`crate::lru::Lru`] index), survives restarts.
//!
//! # File format (version 1, little-endian), `<dir>/<hex key>.kvb`
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SHOALKVB` |
//! | 8 | 4 | format version (1) |
//! | 12 | 32 | block key (must equal the file name's) |
//! | 44 | 8 | blob length `n` |
//! | 52 | n | the KV export (`SHOAL-KV` format, ending in its BLAKE3 checksum), or a tail record ([`super::tail`]) |
//!
//! A read checks all of it (magic, version, key, length, the blob's
//! checksums); a file failing any check is deleted and reported as corrupt.
//! Writes go to a temporary file that is renamed into place, so a crash
//! leaves either the old state or the whole block.
//!
//! Besides its size budget the tier has a write budget ([`WriteBudget`],
//! `kv.disk_write_budget_per_hour`): once a window's bytes are spent,
//! blocks stay in RAM only until the next window, so an SD card sees at
//! most that many KV bytes an hour.

use super::tail::Owner;
use super::{BlockKey, KvCacheError};
use crate::inference::KvCache;
use crate::lru::Lru;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Magic bytes of a disk-tier block file.
pub const MAGIC: &[u8; 8] = b"SHOALKVB";
/// Disk-tier file format version.
pub const VERSION: u32 = 1;
const HEADER: usize = 52;
const EXT: &str = "kvb";

/// A cap on the bytes written per window (an hour in the node): the
/// window starts at the first write after the previous one ended, and a
/// write that does not fit in what is left of it is refused (not cut).
#[derive(Debug)]
pub struct WriteBudget {
    limit: u64,
    window: Duration,
    /// Start of the current window and the bytes spent in it.
    state: Mutex<Option<Window>>,
}

impl WriteBudget {
    /// The length of a window of `kv.disk_write_budget_per_hour`.
    pub const HOUR: Duration = Duration::from_secs(3600);

    /// At most `limit` bytes per `window`; a `limit` of 0 (or `u64::MAX`,
    /// a size of `"unlimited"`) is no limit.
    pub fn new(limit: u64, window: Duration) -> WriteBudget {
        WriteBudget {
            limit: if limit == u64::MAX { 0 } else { limit },
            window,
            state: Mutex::new(None),
        }
    }

    /// No limit.
    pub fn unlimited() -> WriteBudget {
        WriteBudget::new(0, Self::HOUR)
    }

    /// The byte limit per window (0: none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `n` bytes from the current window: false (and nothing taken)
    /// when they do not fit in what is left of it.
    pub fn try_take(&self, n: u64) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut st = self.state.lock();
        let now = Instant::now();
        let w = match &mut *st {
            Some(w) if now.duration_since(w.start) < self.window => w,
            other => other.insert(Window {
                start: now,
                spent: 0,
                refused: false,
            }),
        };
        if w.spent.saturating_add(n) <= self.limit {
            w.spent = w.spent.saturating_add(n);
            return true;
        }
        if !w.refused {
            w.refused = true;
            tracing::info!(
                limit = self.limit,
                spent = w.spent,
                window_s = self.window.as_secs(),
                "KV disk write budget spent: new blocks stay in RAM until the window ends"
            );
        }
        false
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    spent: u64,
    /// A write was refused in this window (logged once).
    refused: bool,
}

/// What [`DiskTier::put`] did with a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Written: a file of this many bytes.
    Written(u64),
    /// Already held: nothing written.
    Present,
    /// Larger than the tier's size budget: not written.
    TooLarge,
    /// The write budget of the current window is spent: not written.
    OverWriteBudget,
}

/// Blocks on disk. The sum of the indexed files' sizes never exceeds the budget.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    /// The indexed block files: key -> file size, in recency order.
    index: Mutex<Lru<BlockKey, ()>>,
    /// Bytes written per window.
    writes: WriteBudget,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Encodes a block file.
pub fn encode(key: &BlockKey, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + blob.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(blob);
    out
}

/// Checks a block file and returns its blob.
pub fn decode(key: &BlockKey, bytes: &[u8]) -> Result<Vec<u8>, KvCacheError> {
    let bad = |r: &str| KvCacheError::Corrupt {
        key: key.to_hex(),
        reason: r.to_owned(),
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("not a KV block file"));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(v);
    if version != VERSION {
        return Err(bad(&format!("unsupported block file version {version}")));
    }
    if bytes[12..44] != key.0 {
        return Err(bad("file holds another key"));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[44..52]);
    if u64::from_le_bytes(n) != (bytes.len() - HEADER) as u64 {
        return Err(bad("length does not match the header"));
    }
    let blob = &bytes[HEADER..];
    if super::tail::is_tail(blob) {
        super::tail::decode(blob).map_err(|e| bad(&e.to_string()))?;
    } else {
        KvCache::inspect(blob).map_err(|e| bad(&e.to_string()))?;
    }
    Ok(blob.to_vec())
}

/// The owner of a block file whose name says `key`: `Unknown` when its
/// header is not a valid one for that key (such files are left to the
/// checks of a read). `Ok(None)` when the file is gone.
pub(crate) fn file_owner(path: &Path, key: &BlockKey) -> std::io::Result<Option<Owner>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut head = Vec::with_capacity(HEADER + 64);
    f.take((HEADER + super::tail::OWNER_PREFIX) as u64)
        .read_to_end(&mut head)?;
    if head.len() < HEADER
        || &head[..8] != MAGIC
        || head[8..12] != VERSION.to_le_bytes()
        || head[12..44] != key.0
    {
        return Ok(Some(Owner::Unknown));
    }
    Ok(Some(super::tail::owner(&head[HEADER..])))
}

/// The block files of `dir` (`<hex key>.kvb`) with their keys.
fn block_files(dir: &Path) -> std::io::Result<Vec<(BlockKey, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(k) = name.strip_suffix(".kvb").and_then(BlockKey::from_hex) {
            out.push((k, e.path()));
        }
    }
    Ok(out)
}

/// Deletes the block files of `dir` holding KV of `model`, and the tail
/// records referring to those blocks or to blocks in `also_gone`; returns
/// the keys of the deleted files. Files whose header is not valid are left
/// alone.
pub(crate) fn purge_model_files(
    dir: &Path,
    model: &[u8; 32],
    also_gone: &HashSet<BlockKey>,
    mut delete: impl FnMut(&BlockKey, &Path) -> std::io::Result<()>,
) -> std::io::Result<Vec<BlockKey>> {
    let mut gone = Vec::new();
    let mut refs = Vec::new();
    for (key, path) in block_files(dir)? {
        match file_owner(&path, &key)? {
            Some(Owner::Model(m)) if &m == model => {
                delete(&key, &path)?;
                gone.push(key);
            }
            Some(Owner::Refers(target)) => refs.push((key, path, target)),
            _ => {}
        }
    }
    let dropped: HashSet<BlockKey> = gone.iter().copied().collect();
    for (key, path, target) in refs {
        if dropped.contains(&target) || also_gone.contains(&target) {
            delete(&key, &path)?;
            gone.push(key);
        }
    }
    Ok(gone)
}

impl DiskTier {
    /// Deletes this tier's blocks of `model` (see `purge_model_files`);
    /// returns their keys.
    pub fn remove_model(
        &self,
        model: &[u8; 32],
        also_gone: &HashSet<BlockKey>,
    ) -> Result<Vec<BlockKey>, KvCacheError> {
        Ok(purge_model_files(&self.dir, model, also_gone, |key, _| {
            self.remove(key);
            Ok(())
        })?)
    }

    /// Opens (creating) `dir` and indexes its block files, oldest first;
    /// stray temporary files are removed and the budget is enforced.
    pub fn open(dir: &Path, budget: u64) -> Result<DiskTier, KvCacheError> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".kvb").and_then(BlockKey::from_hex);
            match key {
                Some(k) => {
                    let m = e.metadata()?;
                    let mtime = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((mtime, k, m.len()));
                }
                None => {
                    if name.ends_with(".tmp") {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
        found.sort();
        let t = DiskTier {
            dir: dir.to_path_buf(),
            budget,
            index: Mutex::new(Lru::new(budget)),
            writes: WriteBudget::unlimited(),
        };
        {
            // Oldest first, evicting the oldest to stay within the budget
            // (the same files go as indexing all, then evicting).
            let mut idx = t.index.lock();
            for (_, k, len) in found {
                match idx.insert(k, (), len) {
                    Ok(gone) => t.delete_files(gone),
                    Err(()) => t.delete_files([(k, ())]),
                }
            }
        }
        tracing::debug!(dir = %dir.display(), blocks = t.len(), used = t.used(), "KV disk tier opened");
        Ok(t)
    }

    /// The tier with a write budget (see [`WriteBudget`]).
    pub fn with_write_budget(mut self, writes: WriteBudget) -> DiskTier {
        self.writes = writes;
        self
    }

    /// The write budget.
    pub fn write_budget(&self) -> &WriteBudget {
        &self.writes
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a block's file.
    pub fn path_of(&self, key: &BlockKey) -> PathBuf {
        self.dir.join(format!("{}.{EXT}", key.to_hex()))
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.index.lock().used()
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.index.lock().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if the block is indexed.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.index.lock().contains(key)
    }

    /// Reads and checks a block. A block failing a check is deleted and
    /// returned as [`KvCacheError::Corrupt`].
    pub fn get(&self, key: &BlockKey) -> Result<Option<Vec<u8>>, KvCacheError> {
        if self.index.lock().get(key).is_none() {
            return Ok(None);
        }
        let bytes = match std::fs::read(self.path_of(key)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(key);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        match decode(key, &bytes) {
            Ok(blob) => Ok(Some(blob)),
            Err(e) => {
                self.remove(key);
                Err(e)
            }
        }
    }

    /// Writes a block (atomically), evicting least recently used blocks to
    /// stay within the budget. Blocks larger than the budget, and blocks
    /// over the write budget of the current window, are skipped.
    pub fn put(&self, key: &BlockKey, blob: &[u8]) -> Result<Put, KvCacheError> {
        let bytes = encode(key, blob);
        let size = bytes.len() as u64;
        if size > self.budget {
            return Ok(Put::TooLarge);
        }
        if self.contains(key) {
            return Ok(Put::Present);
        }
        if !self.writes.try_take(size) {
            return Ok(Put::OverWriteBudget);
        }
        {
            // Reserve the space before writing so concurrent puts stay in budget.
            let mut idx = self.index.lock();
            if let Ok(gone) = idx.insert(*key, (), size) {
                self.delete_files(gone);
            }
        }
        let path = self.path_of(key);
        let tmp = self.dir.join(format!("{}.tmp", key.to_hex()));
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            self.forget(key);
            return Err(e.into());
        }
        Ok(Put::Written(size))
    }

    /// Deletes a block.
    pub fn remove(&self, key: &BlockKey) {
        self.forget(key);
        let _ = std::fs::remove_file(self.path_of(key));
    }

    fn forget(&self, key: &BlockKey) {
        self.index.lock().remove(key);
    }

    /// Deletes the files of blocks dropped from the index (called with the
    /// index locked, so a concurrent put of the same key waits for it).
    fn delete_files(&self, gone: impl IntoIterator<Item = (BlockKey, ())>) {
        for (k, ()) in gone {
            let _ = std::fs::remove_file(self.path_of(&k));
        }
    }
}

/// Longest time a queued block waits for the engines to be idle.
pub const WRITE_DEFER: std::time::Duration = std::time::Duration::from_secs(2);

enum Msg {
    Put(BlockKey, Arc<Vec<u8>>, std::time::Instant),
    Flush(mpsc::SyncSender<()>),
}

/// A background thread writing blocks to the disk tier.
pub(crate) struct WriteBehind {
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteBehind {
    /// Starts the writer; while `busy` is non-zero (a job is running)
    /// writes wait, up to [`WRITE_DEFER`] after they were queued.
    /// Written bytes and blocks skipped for the write budget go to `metrics`.
    pub(crate) fn start(
        disk: Arc<DiskTier>,
        busy: Arc<AtomicUsize>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> WriteBehind {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("kv-write-behind".into())
            .spawn(move || {
                for m in rx {
                    match m {
                        Msg::Put(k, b, queued) => {
                            // Let a running job have the cores (writing a
                            // prompt's blocks slowed the next follow-up's
                            // forward pass by ~15 ms on 2 cores), but never
                            // hold a block back more than WRITE_DEFER.
                            while busy.load(Ordering::Acquire) > 0 && queued.elapsed() < WRITE_DEFER
                            {
                                std::thread::sleep(std::time::Duration::from_millis(2));
                            }
                            if super::tail::is_tail(&b) {
                                // One tail record per parent: the latest replaces it.
                                disk.remove(&k);
                            }
                            match disk.put(&k, &b) {
                                Ok(Put::Written(n)) => metrics.kv_disk_written(n),
                                Ok(Put::OverWriteBudget) => metrics.kv_disk_write_skipped(),
                                Ok(Put::Present | Put::TooLarge) => {}
                                Err(e) => tracing::warn!(error = %e, "KV block write failed"),
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .ok();
        if thread.is_none() {
            tracing::warn!("could not start the KV write-behind thread; disk tier is read-only");
        }
        WriteBehind {
            tx: Some(tx),
            thread,
        }
    }

    pub(crate) fn queue(&self, key: BlockKey, blob: Arc<Vec<u8>>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Put(key, blob, std::time::Instant::now()));
        }
    }

    pub(crate) fn flush(&self) {
        if self.thread.is_none() {
            return;
        }
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if let Some(tx) = &self.tx
            && tx.send(Msg::Flush(done_tx)).is_ok()
        {
            let _ = done_rx.recv();
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::{KvDtype, KvLayout};

    fn blob(n: usize, seed: f32) -> Vec<u8> {
        let l = KvLayout {
            n_layer: 1,
            n_kv_head: 1,
            head_dim: 32,
        };
        let mut c = KvCache::new(l);
        for i in 0..n {
            let v: Vec<f32> = (0..32).map(|j| seed + (i * 32 + j) as f32 / 64.0).collect();
            c.append(&v, &v).expect("append");
        }
        c.export(0..n, KvDtype::F16, &[7; 32]).expect("export")
    }

    #[test]
    fn roundtrip_restart_corruption_and_budget() {
        let d = tempfile::tempdir().expect("tmp");
        let (k1, k2, k3) = (BlockKey([1; 32]), BlockKey([2; 32]), BlockKey([3; 32]));
        let b = blob(4, 0.0);
        let file_size = (HEADER + b.len()) as u64;
        {
            let t = DiskTier::open(d.path(), file_size * 2).expect("open");
            t.put(&k1, &b).expect("put");
            t.put(&k2, &b).expect("put");
            assert_eq!(t.get(&k1).expect("get").as_deref(), Some(&b[..]));
            t.put(&k3, &b).expect("put"); // evicts k2 (LRU)
            assert!(t.used() <= t.budget());
            assert!(!t.contains(&k2) && !t.path_of(&k2).exists());
        }
        // Restart: the index is rebuilt from the files.
        let t = DiskTier::open(d.path(), file_size * 2).expect("reopen");
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&k3).expect("get").as_deref(), Some(&b[..]));
        // Flip one payload byte: dropped, never returned.
        let p = t.path_of(&k1);
        let mut bytes = std::fs::read(&p).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&p, &bytes).expect("write");
        assert!(matches!(t.get(&k1), Err(KvCacheError::Corrupt { .. })));
        assert!(!p.exists());
        assert_eq!(t.get(&k1).expect("get"), None);
        // A file renamed to another key is refused.
        std::fs::copy(t.path_of(&k3), t.path_of(&k1)).expect("copy");
        let t = DiskTier::open(d.path(), file_size * 2).expect("reopen");
        assert!(t.get(&k1).is_err());
        // A smaller budget on reopen evicts down to it.
        let t = DiskTier::open(d.path(), file_size).expect("reopen");
        assert!(t.used() <= file_size);
    }

    #[test]
    fn write_budget_windows() {
        let b = WriteBudget::new(100, Duration::from_millis(200));
        assert!(b.try_take(60));
        assert!(!b.try_take(50), "does not fit in what is left");
        assert!(b.try_take(40), "what fits still goes");
        assert!(!b.try_take(1));
        std::thread::sleep(Duration::from_millis(250));
        assert!(b.try_take(100), "a new window");
        assert!(!b.try_take(1));
        for unlimited in [
            WriteBudget::new(0, WriteBudget::HOUR),
            WriteBudget::new(u64::MAX, WriteBudget::HOUR),
        ] {
            assert_eq!(unlimited.limit(), 0);
            assert!((0..4).all(|_| unlimited.try_take(u64::MAX / 2)));
        }
    }

    #[test]
    fn put_over_the_write_budget_writes_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let b = blob(4, 0.0);
        let size = (HEADER + b.len()) as u64;
        let t = DiskTier::open(d.path(), size * 10)
            .expect("open")
            .with_write_budget(WriteBudget::new(size, WriteBudget::HOUR));
        let (k1, k2) = (BlockKey([1; 32]), BlockKey([2; 32]));
        assert_eq!(t.put(&k1, &b).expect("put"), Put::Written(size));
        assert_eq!(t.put(&k1, &b).expect("put"), Put::Present);
        assert_eq!(t.put(&k2, &b).expect("put"), Put::OverWriteBudget);
        assert!(!t.contains(&k2) && !t.path_of(&k2).exists());
        assert_eq!(t.used(), size);
        assert_eq!(std::fs::read_dir(d.path()).expect("dir").count(), 1);
        assert_eq!(t.get(&k1).expect("get").as_deref(), Some(&b[..]));
    }

    #[test]
    fn fixture_v1() {
        let key = BlockKey([0xab; 32]);
        let b = blob(1, 0.5);
        let f = encode(&key, &b);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kvblock-v1.kvb");
        if std::env::var_os("SHOAL_WRITE_FIXTURES").is_some() {
            std::fs::write(path, &f).expect("write fixture");
        }
        let fixture = std::fs::read(path).expect("fixture file");
        assert_eq!(f, fixture, "disk block format changed: bump VERSION");
        assert_eq!(decode(&key, &fixture).expect("decode"), b);
    }
}
