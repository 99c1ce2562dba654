//! The content store: a node's disk cache of model artifacts.
//!
//! An artifact (GGUF weights, a tokenizer, a KV block) is stored once, in its
//! final form, so it can be memory-mapped. Its id is the BLAKE3 of its
//! [`Manifest`], which lists its chunks with their hashes. Metadata lives in
//! fjall; artifact bytes live in plain files:
//!
//! ```text
//! <data-dir>/FORMAT            "shoal-store 1"
//! <data-dir>/meta/             fjall: manifests, artifact records, have-maps,
//!                              chunk index, names (signed releases), trust store
//! <data-dir>/objects/<id>      active artifacts (read-only, complete, verified)
//! <data-dir>/partial/<id>      artifacts being filled chunk by chunk, in place
//! <data-dir>/tmp/              files being added (removed on open)
//! <data-dir>/keys/publisher.key  this node's release-signing key (0600)
//! <data-dir>/keys/trusted      trusted publisher keys (copy of the trust store)
//! <data-dir>/releases/         one signed release file per name (copy of the names)
//! <data-dir>/LOCK              held (flock) while the store is open
//! <data-dir>/lost+found/       files the store could not account for (never deleted)
//! ```
//!
//! Guarantees: a chunk is marked present only after its bytes were verified
//! and made durable (fdatasync before the have-map is persisted); an artifact
//! becomes visible only once complete and its whole-file hash verified, by an
//! atomic rename followed by one atomic metadata batch. A crash at any point
//! loses at most unsynced chunks; reopening reconciles files and metadata.
//! Damaged or lost metadata never costs an artifact's bytes: files without a
//! record are re-verified against their id and registered again, or moved
//! to `lost+found/`; metadata that cannot be opened is reported
//! ([`OpenError::DamagedMetadata`]) and rebuilt by [`Store::fsck`]. An
//! artifact found corrupt is marked and not served ([`Store::mark_corrupt`],
//! [`Store::repair`]).

pub mod chunker;
pub mod havemap;
pub mod id;
pub mod manifest;
pub mod release;
pub mod treehash;

mod add;
mod dedupe;
mod error;
mod gc;
mod meta;
mod names;
mod partial;
mod read;
mod recovery;
mod sys;
mod verify;

pub use havemap::HaveMap;
pub use id::{ArtifactId, ChunkHash, ParseIdError};
pub use manifest::{ArtifactKind, ChunkRef, MANIFEST_FORMAT, Manifest, ManifestError, TensorRef};
pub use release::{Release, ReleaseError, SignedRelease};

pub use add::{AddOptions, build_manifest};
pub use error::{AddError, OpenError, ReadError, StoreError};
pub use gc::{GcReport, Lease};
pub use meta::ArtifactInfo;
pub use names::ReleaseOutcome;
pub use recovery::{LostFile, RecoveryReport};
pub use verify::VerifyReport;

use error::io_err;
use meta::{DbOpen, Record, index_key, open_db};
use partial::Partial;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// On-disk layout version of the store directory.
pub const STORE_FORMAT: u32 = 1;
/// Where files the store cannot account for are moved (never deleted).
pub const LOST_AND_FOUND: &str = "lost+found";

pub use release::MAX_NAME;
/// Decoded manifests kept by [`Store::manifest_shared`] (cleared when full).
const MANIFEST_CACHE_ENTRIES: usize = 64;

/// Called with the id of an artifact each time it is newly marked corrupt
/// ([`StoreOptions::on_corrupt`]).
pub type CorruptHook = Arc<dyn Fn(&ArtifactId) + Send + Sync>;

/// Called with a name and the artifact id it now stands for each time a
/// release is applied ([`StoreOptions::on_release`]).
pub type ReleaseHook = Arc<dyn Fn(&str, &ArtifactId) + Send + Sync>;

/// Store settings: the `[store]` section of the configuration file
/// ([`SETTINGS`]), plus runtime fields the file does not hold.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Byte quota for artifacts (active and partial). `u64::MAX` for none
    /// (`store.quota`).
    #[serde(rename = "quota", with = "crate::config::size")]
    pub quota_bytes: u64,
    /// Partial artifacts untouched for longer than this are collected by
    /// [`Store::gc`] (`store.partial_ttl`).
    #[serde(with = "crate::config::duration")]
    pub partial_ttl: Duration,
    /// Models (release names or ids) that `shoal prefetch` fetches and pins
    /// (`store.prefetch`); the store itself does not read it.
    pub prefetch: Vec<String>,
    /// A chunk served to a peer is hashed again before it leaves
    /// ([`Store::read_chunk_into`]) unless this node hashed it (on receipt or
    /// on an earlier read) less than this long ago. In a swarm every chunk is
    /// served many times within seconds of its arrival; one hash per window
    /// instead of one per send. `Duration::ZERO`: hash every read.
    #[serde(skip)]
    pub reverify_after: Duration,
    /// Told (on the thread that found it, after the mark is durable) when an
    /// artifact is newly marked corrupt by [`Store::verify`], a failed
    /// verify-on-read or [`Store::mark_corrupt`], so the node can react (drop
    /// derived caches, fetch the bad chunks again) without polling. Must not
    /// block for long.
    #[serde(skip)]
    pub on_corrupt: Option<CorruptHook>,
    /// Told (after the release is durable, on the applying thread) each time
    /// a release binds a name anew ([`Store::apply_release`]: gossip, a peer's
    /// list, `publish`, the admin API), so the node can switch what it
    /// serves under the name. Must not block for long.
    #[serde(skip)]
    pub on_release: Option<ReleaseHook>,
    /// Where the store reports its events (artifacts added, activated,
    /// removed, evicted; chunks copied locally). Not a setting: the node
    /// hands in its registry. Default: a fresh registry no one reads.
    #[serde(skip)]
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("quota_bytes", &self.quota_bytes)
            .field("partial_ttl", &self.partial_ttl)
            .field("prefetch", &self.prefetch)
            .field("reverify_after", &self.reverify_after)
            .field(
                "on_corrupt",
                &self.on_corrupt.as_ref().map(|_| "Fn(&ArtifactId)"),
            )
            .field(
                "on_release",
                &self.on_release.as_ref().map(|_| "Fn(&str, &ArtifactId)"),
            )
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            quota_bytes: u64::MAX,
            partial_ttl: Duration::from_secs(24 * 3600),
            prefetch: Vec::new(),
            reverify_after: Duration::from_secs(60),
            on_corrupt: None,
            on_release: None,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }
}

impl PartialEq for StoreOptions {
    /// Compares the settings; the hook is not compared.
    fn eq(&self, o: &Self) -> bool {
        self.quota_bytes == o.quota_bytes
            && self.partial_ttl == o.partial_ttl
            && self.prefetch == o.prefetch
            && self.reverify_after == o.reverify_after
    }
}

/// The `[store]` section's settings, in file order.
pub const SETTINGS: &[crate::config::Setting] = {
    use crate::config::Kind::{List, Str};
    use crate::config::Setting as S;
    &[
        S::new(
            "store.quota",
            Some("SHOAL_STORE_QUOTA"),
            Str,
            "Byte quota for artifacts (\"20G\", \"512M\", or \"unlimited\"). Beyond it the\nleast-recently-used unpinned artifacts are evicted; pinned ones never are.",
            "\"20G\"",
        ),
        S::new(
            "store.partial_ttl",
            Some("SHOAL_PARTIAL_TTL"),
            Str,
            "Partial downloads untouched for this long are deleted by garbage collection.",
            "\"24h\"",
        ),
        S::new(
            "store.prefetch",
            Some("SHOAL_PREFETCH"),
            List,
            "Models (release names or ids) that `shoal prefetch` fetches through the running\nnode and pins; the shoal-prefetch.timer runs it off-peak.",
            "[\"smollm2-135m-instruct:q4_1\"]",
        ),
    ]
};

/// State of an artifact in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactStatus {
    /// Being filled; some chunks may be missing.
    Partial,
    /// Complete, verified, visible.
    Active,
}

struct Inner {
    dir: PathBuf,
    opts: StoreOptions,
    db: Database,
    manifests: Keyspace,
    records: Keyspace,
    haves: Keyspace,
    chunk_index: Keyspace,
    names: Keyspace,
    trust: Keyspace,
    partials: Mutex<HashMap<ArtifactId, Partial>>,
    /// Decoded manifests of recently read artifacts (immutable: an id names one manifest).
    manifest_cache: Mutex<HashMap<ArtifactId, Arc<Manifest>>>,
    /// Serializes metadata read-modify-write sequences (releases, activation, eviction).
    meta_lock: Mutex<()>,
    /// When each chunk was last hashed and found right, per artifact: seconds
    /// since `epoch`, plus one (0: not since this process started).
    verified: Mutex<HashMap<ArtifactId, Vec<u32>>>,
    /// The clock of `verified`.
    epoch: std::time::Instant,
    /// What opening the store repaired.
    recovery: Mutex<RecoveryReport>,
    /// `<dir>/LOCK`, flocked exclusively while the store is open.
    _lock: File,
}

/// A handle on a node's content store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::BadMetadata(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync directory", dir))
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// Files and metadata are reconciled ([`Store::recovery_report`] says
    /// what was done); no byte the store cannot account for is deleted:
    /// objects without a record are re-verified and registered again, what
    /// cannot be checked goes to `lost+found/`. Metadata that cannot be
    /// opened or decoded is [`OpenError::DamagedMetadata`]: nothing is
    /// touched, and [`Store::fsck`] (`shoal fsck`) rebuilds it.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, OpenError> {
        let lock = Self::prepare(dir)?;
        Self::open_locked(dir, opts, lock, None)
    }

    /// Checks the store's metadata and rebuilds it from the files when it is
    /// damaged, then re-verifies every artifact.
    ///
    /// Metadata that fjall cannot open, or whose records, manifests,
    /// have-maps, names or trusted keys do not decode, is moved aside to
    /// `meta.damaged-<unix time>/` (never deleted) and rebuilt: every object
    /// is hashed and registered again if its bytes match its id (unpinned),
    /// partial downloads whose manifest survived are kept, trusted keys come
    /// back from `keys/trusted` (and `keys/publisher.key`), names from the
    /// signed release files in `releases/`. Whatever cannot be accounted for
    /// is moved to `lost+found/`. Returns the opened store (whose
    /// [`Store::recovery_report`] lists what was done) and one verification
    /// report per artifact (corrupt ones are marked).
    pub fn fsck(dir: &Path, opts: StoreOptions) -> Result<(Store, Vec<VerifyReport>), OpenError> {
        let lock = Self::prepare(dir)?;
        let meta = dir.join("meta");
        let moved = match Self::check_meta(&meta) {
            Ok(()) => None,
            Err(why) => {
                let to = Self::move_meta_aside(dir)?;
                tracing::warn!(
                    from = %meta.display(), to = %to.display(), %why,
                    "damaged metadata moved aside (kept, not deleted); rebuilding it from the files"
                );
                Some(to)
            }
        };
        let store = Self::open_locked(dir, opts, lock, moved)?;
        let mut reports = Vec::new();
        for a in store.list()? {
            reports.push(store.verify(&a.id)?);
        }
        Ok((store, reports))
    }

    /// Creates the directory layout, checks `FORMAT`, and takes the store's
    /// lock (`LOCK`, held for the life of the [`Store`]).
    fn prepare(dir: &Path) -> Result<File, OpenError> {
        for sub in ["", "objects", "partial", "tmp", "keys"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let fmt_path = dir.join("FORMAT");
        let want = format!("shoal-store {STORE_FORMAT}\n");
        match fs::read_to_string(&fmt_path) {
            Ok(s) if s == want => {}
            Ok(s) => {
                return Err(OpenError::UnsupportedFormat {
                    path: dir.to_owned(),
                    found: s.trim().to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&fmt_path, &want).map_err(io_err("write", &fmt_path))?;
            }
            Err(e) => return Err(io_err("read", &fmt_path)(e).into()),
        }
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // Released when the file is closed (the store is dropped).
        if let Err(e) = sys::lock_exclusive_now(&lock) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(OpenError::Locked(dir.to_owned()));
            }
            return Err(io_err("lock", &lock_path)(e).into());
        }
        Ok(lock)
    }

    fn open_locked(
        dir: &Path,
        opts: StoreOptions,
        lock: File,
        meta_moved_to: Option<PathBuf>,
    ) -> Result<Store, OpenError> {
        let meta = dir.join("meta");
        let damaged = |why: String| OpenError::DamagedMetadata {
            path: meta.clone(),
            why,
        };
        match fs::symlink_metadata(&meta) {
            Ok(m) if !m.is_dir() => return Err(damaged("it is not a directory".into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if meta_moved_to.is_none()
                    && fs::read_dir(dir.join("objects")).is_ok_and(|mut d| d.next().is_some())
                {
                    tracing::warn!(path = %meta.display(), "the metadata database is missing: rebuilding it from the files");
                }
                fs::create_dir_all(&meta).map_err(io_err("create directory", &meta))?;
            }
            Err(e) => return Err(damaged(format!("cannot inspect it: {e}"))),
        }
        let db = match open_db(&meta) {
            Ok(db) => db,
            Err(DbOpen::Locked) => return Err(OpenError::Locked(dir.to_owned())),
            Err(DbOpen::Damaged(why)) => return Err(damaged(why)),
        };
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| damaged(format!("keyspace {name}: {e}")))
        };
        let inner = Inner {
            manifests: ks("manifests")?,
            records: ks("records")?,
            haves: ks("haves")?,
            chunk_index: ks("chunk_index")?,
            names: ks("names")?,
            trust: ks("trust")?,
            db,
            dir: dir.to_owned(),
            opts,
            partials: Mutex::new(HashMap::new()),
            manifest_cache: Mutex::new(HashMap::new()),
            meta_lock: Mutex::new(()),
            verified: Mutex::new(HashMap::new()),
            epoch: std::time::Instant::now(),
            recovery: Mutex::new(RecoveryReport {
                meta_moved_to,
                ..RecoveryReport::default()
            }),
            _lock: lock,
        };
        let store = Store {
            inner: Arc::new(inner),
        };
        match store.reconcile() {
            Ok(()) => {}
            Err(StoreError::Db(e)) => return Err(damaged(e.to_string())),
            Err(StoreError::BadMetadata(why)) => return Err(damaged(why)),
            Err(e) => return Err(e.into()),
        }
        match store.list() {
            Ok(list) => store.options().metrics.store_opened(
                store.options().quota_bytes,
                list.iter().map(|a| {
                    let state = match a.status {
                        ArtifactStatus::Active => crate::metrics::ArtifactState::Active,
                        ArtifactStatus::Partial => crate::metrics::ArtifactState::Partial,
                    };
                    (state, a.size)
                }),
            ),
            Err(e) => tracing::warn!("counting the store's artifacts for metrics: {e}"),
        }
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The store options.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    fn object_path(&self, id: &ArtifactId) -> PathBuf {
        self.inner.dir.join("objects").join(id.to_hex())
    }

    fn partial_path(&self, id: &ArtifactId) -> PathBuf {
        self.inner.dir.join("partial").join(id.to_hex())
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Removes a temporary file unless disarmed with `mem::forget`.
struct TmpGuard<'a>(&'a Path);

impl Drop for TmpGuard<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}
