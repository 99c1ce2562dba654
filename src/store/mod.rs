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
//! ([`StoreError::DamagedMetadata`]) and rebuilt by [`Store::fsck`]. An
//! artifact found corrupt is marked and not served ([`Store::mark_corrupt`],
//! [`Store::repair`]).

pub mod chunker;
pub mod havemap;
pub mod id;
pub mod manifest;
pub mod release;
pub mod treehash;

pub use havemap::HaveMap;
pub use id::{ArtifactId, ChunkHash, ParseIdError};
pub use manifest::{ArtifactKind, ChunkRef, MANIFEST_FORMAT, Manifest, ManifestError, TensorRef};
pub use release::{Release, ReleaseError, SignedRelease};

use crate::gguf::{Gguf, GgufError};
use ed25519_dalek::SigningKey;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// On-disk layout version of the store directory.
pub const STORE_FORMAT: u32 = 1;
/// Where files the store cannot account for are moved (never deleted).
pub const LOST_AND_FOUND: &str = "lost+found";
/// Directory of the signed release files (one per name), from which names
/// are restored when the metadata is lost.
const RELEASES_DIR: &str = "releases";
/// First line of `keys/trusted`.
const TRUST_FILE_HEADER: &str = "shoal-trust 1";
/// A trusted publisher key and its label.
type TrustedKey = ([u8; 32], String);
pub use release::MAX_NAME;
/// Bytes of written-but-unsynced chunks after which a partial is flushed.
const AUTO_FLUSH_BYTES: u64 = 16 << 20;
/// Downloads at least this large leave the page cache once durable.
const DROP_PAGES_FROM: u64 = 64 << 20;

/// Asks the kernel to drop the clean (already synced) pages of `ranges`
/// (offset, length) of the file.
///
/// A download is not read again before activation (the whole-file hash is
/// built from the chunks in memory, [`treehash`]), so keeping its pages
/// would only push out what the node does read: the weights of the model it
/// is serving. Dropped pages go straight back to the allocator, and the
/// next chunk is written into the same, already-touched memory: on this
/// project's VM, where freed memory is handed back to the host, writes into
/// fresh page cache cost 2-8x the CPU (docs/benchmarks.md).
///
/// Only the given ranges, never the whole file: content-defined chunks do not
/// start on page boundaries, and a page that a chunk shares with a neighbour
/// not yet written must stay, or writing the neighbour reads it back from
/// disk (one synchronous read per chunk boundary, under the writer lock).
/// The kernel drops only the pages a range covers whole. Advisory: a failure
/// changes nothing but the cache.
fn drop_clean_pages(file: &File, ranges: &[(u64, u64)]) {
    use std::os::fd::AsRawFd;
    for &(offset, len) in ranges {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            continue;
        };
        // SAFETY: plain syscall on an open descriptor we own; no memory is passed.
        let r =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            tracing::debug!(errno = r, "posix_fadvise(DONTNEED) failed");
            return;
        }
    }
}

/// The byte ranges of `chunks` (indices into `manifest`), adjacent chunks
/// merged, in file order.
fn chunk_ranges(manifest: &Manifest, chunks: &[u32]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = chunks
        .iter()
        .filter_map(|i| manifest.chunks.get(*i as usize))
        .map(|c| (c.offset, c.span().end()))
        .collect();
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}
/// Decoded manifests kept by [`Store::manifest_shared`] (cleared when full).
const MANIFEST_CACHE_ENTRIES: usize = 64;

/// Errors from the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[from] fjall::Error),
    /// Another process (usually a running `shoal serve`) has the store open.
    #[error(
        "the store at {0} is in use by another process (is `shoal serve` running? use its API instead)"
    )]
    Locked(PathBuf),
    /// The data directory was written by an incompatible version.
    #[error("store format {found} at {path} is not supported (this build uses {STORE_FORMAT})")]
    UnsupportedFormat {
        /// Directory.
        path: PathBuf,
        /// What the FORMAT file says.
        found: String,
    },
    /// A GGUF file is malformed or truncated.
    #[error("{path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// Parser error.
        source: GgufError,
    },
    /// The file claims to be GGUF by name but is not.
    #[error("{0}: not a GGUF file (no GGUF magic)")]
    NotGguf(PathBuf),
    /// No artifact with this id or name.
    #[error("unknown artifact {0:?}")]
    Unknown(String),
    /// The artifact exists but is not complete yet.
    #[error("artifact {0} is not complete yet")]
    NotActive(ArtifactId),
    /// A chunk's bytes do not match the manifest.
    #[error("chunk {index} of {id}: hash mismatch (expected {expected}, got {got})")]
    ChunkMismatch {
        /// Artifact.
        id: ArtifactId,
        /// Chunk index.
        index: u32,
        /// Hash in the manifest.
        expected: ChunkHash,
        /// Hash of the bytes offered.
        got: ChunkHash,
    },
    /// A chunk index beyond the manifest, or a chunk not present.
    #[error("chunk {index} of {id} is not available")]
    NoChunk {
        /// Artifact.
        id: ArtifactId,
        /// Chunk index.
        index: u32,
    },
    /// `finish` was called before all chunks are present.
    #[error("artifact {id} is incomplete: {have} of {total} chunks present")]
    Incomplete {
        /// Artifact.
        id: ArtifactId,
        /// Present chunks.
        have: u32,
        /// All chunks.
        total: u32,
    },
    /// Whole-file hash mismatch at activation or verification.
    #[error("artifact {0}: whole-file BLAKE3 does not match the manifest")]
    FileMismatch(ArtifactId),
    /// A manifest problem.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A release problem (signature, format, name).
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A release signed by a key that is not in the trust store.
    #[error(
        "release for {name:?} is signed by {publisher}, which is not in the trust store (see `shoal trust add`)"
    )]
    Untrusted {
        /// Release name.
        name: String,
        /// Publisher key (hex).
        publisher: String,
    },
    /// No publisher key yet.
    #[error("no publisher key: run `shoal keygen` first")]
    NoKey,
    /// The artifact does not fit in the quota even after evicting all that can be evicted.
    #[error(
        "store quota exceeded: need {need} bytes, {free} can be made free within the quota of {quota}"
    )]
    QuotaExceeded {
        /// Bytes needed.
        need: u64,
        /// Bytes that could be freed.
        free: u64,
        /// The quota.
        quota: u64,
    },
    /// Metadata that does not decode (a corrupt or foreign database).
    #[error("corrupt metadata: {0} (run `shoal fsck` to rebuild the metadata from the files)")]
    BadMetadata(String),
    /// The metadata database cannot be opened or read. Nothing was changed;
    /// [`Store::fsck`] moves it aside and rebuilds it from the files.
    #[error(
        "the metadata database at {path} is damaged ({why}); no model file was touched. Run `shoal fsck` to rebuild it from the files (the damaged copy is kept aside, not deleted)"
    )]
    DamagedMetadata {
        /// The `meta/` directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A name or id argument longer than any name or id can be.
    #[error("{what} is {len} bytes long; names are at most {MAX_NAME} bytes and ids 64 hex digits")]
    TooLong {
        /// What was given ("name", "id or name").
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The artifact's bytes failed verification: it is marked corrupt and is
    /// not served until [`Store::repair`] and a download fetched the bad
    /// chunks again. An empty `bad_chunks` means the chunks are right but the
    /// file as a whole is not (wrong length).
    #[error(
        "artifact {id} is corrupt (bad chunks: {bad_chunks:?}); it is not served until its bad chunks are fetched again from peers"
    )]
    Corrupt {
        /// Artifact.
        id: ArtifactId,
        /// Indices of the chunks whose bytes did not match the manifest.
        bad_chunks: Vec<u32>,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Called with the id of an artifact each time it is newly marked corrupt
/// ([`StoreOptions::on_corrupt`]).
pub type CorruptHook = Arc<dyn Fn(&ArtifactId) + Send + Sync>;

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

/// Options for [`Store::add_file`].
#[derive(Debug, Clone, Default)]
pub struct AddOptions {
    /// Force a kind instead of detecting it.
    pub kind: Option<ArtifactKind>,
    /// Pin the artifact (never evicted).
    pub pin: bool,
    /// Try to share the source file's blocks (reflink) instead of copying.
    pub reflink: bool,
    /// Try to hard-link the source into the store instead of copying (same
    /// filesystem only). The store then shares the source's inode, which is made
    /// read-only: only for sources never modified in place, such as Hugging
    /// Face and Ollama blobs. Takes precedence over `reflink`.
    pub hardlink: bool,
}

/// State of an artifact in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactStatus {
    /// Being filled; some chunks may be missing.
    Partial,
    /// Complete, verified, visible.
    Active,
}

/// An artifact's record (the `records` keyspace).
///
/// Encoding: the postcard encoding of [`RecordV1`] (format 1, the only
/// encoding before corrupt marks existed), followed, only when there is
/// something to add, by an extension: `u8` extension version (2) and the
/// postcard encoding of [`RecordExt2`]. A record without the tail decodes
/// with no mark, so older stores read unchanged; an unknown extension
/// version is refused (never silently dropped).
#[derive(Debug, Clone)]
struct Record {
    status: ArtifactStatus,
    pinned: bool,
    created: u64,
    last_used: u64,
    /// `Some` when the artifact is marked corrupt: the bad chunk indices
    /// (sorted, unique; empty: the file as a whole is wrong).
    corrupt: Option<Vec<u32>>,
}

/// Record format 1 (and the head of every later format).
#[derive(Serialize, Deserialize)]
struct RecordV1 {
    status: ArtifactStatus,
    pinned: bool,
    created: u64,
    last_used: u64,
}

/// Version of the record extension written after [`RecordV1`].
const RECORD_EXT_VERSION: u8 = 2;

/// Record extension, version 2.
#[derive(Serialize, Deserialize)]
struct RecordExt2 {
    /// Bad chunk indices of an artifact marked corrupt.
    corrupt: Option<Vec<u32>>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = encode(&RecordV1 {
            status: self.status,
            pinned: self.pinned,
            created: self.created,
            last_used: self.last_used,
        });
        if self.corrupt.is_some() {
            out.push(RECORD_EXT_VERSION);
            out.extend(encode(&RecordExt2 {
                corrupt: self.corrupt.clone(),
            }));
        }
        out
    }

    fn decode(b: &[u8]) -> Result<Record, StoreError> {
        let (v1, rest): (RecordV1, &[u8]) = postcard::take_from_bytes(b)
            .map_err(|e| StoreError::BadMetadata(format!("record: {e}")))?;
        let mut r = Record {
            status: v1.status,
            pinned: v1.pinned,
            created: v1.created,
            last_used: v1.last_used,
            corrupt: None,
        };
        match rest.split_first() {
            None => {}
            Some((&RECORD_EXT_VERSION, ext)) => {
                let e: RecordExt2 = decode("record extension", ext)?;
                r.corrupt = e.corrupt;
            }
            Some((v, _)) => {
                return Err(StoreError::BadMetadata(format!(
                    "record extension version {v} is not supported (this build reads {RECORD_EXT_VERSION})"
                )));
            }
        }
        Ok(r)
    }
}

/// A line of [`Store::list`].
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactInfo {
    /// The id.
    pub id: ArtifactId,
    /// Names (from trusted releases) pointing at it.
    pub names: Vec<String>,
    /// Kind.
    pub kind: ArtifactKind,
    /// Status.
    pub status: ArtifactStatus,
    /// Size in bytes.
    pub size: u64,
    /// Bytes present.
    pub present_bytes: u64,
    /// Chunks in total.
    pub chunks: u32,
    /// Chunks present.
    pub present_chunks: u32,
    /// Pinned.
    pub pinned: bool,
    /// Unix seconds of last use.
    pub last_used: u64,
    /// `Some(bad chunk indices)` when the artifact is marked corrupt (not
    /// served until repaired; empty: the file as a whole is wrong).
    pub corrupt: Option<Vec<u32>>,
}

/// Result of [`Store::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The artifact.
    pub id: ArtifactId,
    /// Chunks checked.
    pub checked: u32,
    /// Chunks whose bytes do not match (index, offset).
    pub bad_chunks: Vec<(u32, u64)>,
    /// Whole-file hash matches (active artifacts only; `None` for partials).
    pub file_ok: Option<bool>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.bad_chunks.is_empty() && self.file_ok != Some(false)
    }
}

/// What [`Store::apply_release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The name now points at the release's id.
    Applied,
    /// The same release was already known.
    AlreadyKnown,
    /// A release with an equal or higher sequence number is already known.
    Stale,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Artifacts evicted to meet the quota.
    pub evicted: Vec<ArtifactId>,
    /// Stale partial artifacts removed.
    pub partials_removed: Vec<ArtifactId>,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// A file moved to `lost+found/` (see [`RecoveryReport`]).
#[derive(Debug, Clone, Serialize)]
pub struct LostFile {
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now (equal to `from` if it could not be moved).
    pub to: PathBuf,
    /// Why the store could not account for it.
    pub why: String,
}

/// What opening the store ([`Store::open`], [`Store::fsck`]) repaired.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// Where damaged metadata was moved aside (by [`Store::fsck`]).
    pub meta_moved_to: Option<PathBuf>,
    /// Artifact files without a record whose bytes matched their id:
    /// registered again, active and unpinned.
    pub reregistered: Vec<ArtifactId>,
    /// Partial downloads without a record whose manifest survived: kept.
    pub partials_recovered: Vec<ArtifactId>,
    /// Files the store could not account for, moved to `lost+found/`.
    pub lost: Vec<LostFile>,
    /// Records whose file had vanished (forgotten: nothing to lose).
    pub forgotten: Vec<ArtifactId>,
    /// Trusted keys restored from `keys/trusted` and `keys/publisher.key`.
    pub keys_restored: usize,
    /// Names restored from the release files in `releases/`.
    pub names_restored: Vec<String>,
}

impl RecoveryReport {
    /// True when nothing had to be repaired.
    pub fn is_clean(&self) -> bool {
        self.meta_moved_to.is_none()
            && self.reregistered.is_empty()
            && self.partials_recovered.is_empty()
            && self.lost.is_empty()
            && self.forgotten.is_empty()
            && self.keys_restored == 0
            && self.names_restored.is_empty()
    }
}

/// Per-partial in-memory state.
struct Partial {
    file: Arc<File>,
    /// Held around each chunk write. The kernel takes the inode's lock for
    /// every buffered write anyway; taking ours first makes a second writer
    /// sleep instead of spinning on that lock while the first copies its
    /// chunk (3 % of a receiver's CPU on two cores in `perf`).
    write_lock: Arc<Mutex<()>>,
    /// The whole-file hash, built from the chunks as they are written
    /// ([`treehash`]); `None` for small files and for downloads resumed
    /// after a restart, which hash the file at activation instead.
    tree: Option<Arc<Mutex<treehash::TreeHasher>>>,
    manifest: Arc<Manifest>,
    /// Persisted presence.
    have: HaveMap,
    /// Written and verified, not yet synced.
    pending: Vec<u32>,
    pending_bytes: u64,
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

/// Chunk-index key: chunk hash, artifact id, chunk index (big-endian).
fn index_key(hash: &ChunkHash, id: &ArtifactId, i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(68);
    k.extend_from_slice(&hash.0);
    k.extend_from_slice(&id.0);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// Computes the manifest of a file held in memory.
///
/// GGUF files (by magic) are parsed and cut along tensors; a malformed or
/// truncated GGUF is an error. Everything else is cut by content.
pub fn build_manifest(
    path: &Path,
    bytes: &[u8],
    kind: Option<ArtifactKind>,
) -> Result<Manifest, StoreError> {
    let is_gguf_magic = bytes.starts_with(crate::gguf::MAGIC);
    let named_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let kind = match kind {
        Some(k) => k,
        None if is_gguf_magic => ArtifactKind::Gguf,
        None if named_gguf => return Err(StoreError::NotGguf(path.to_owned())),
        None if path.file_name().is_some_and(|n| n == "tokenizer.json") => ArtifactKind::Tokenizer,
        None => ArtifactKind::Other,
    };
    let size = bytes.len() as u64;
    let (spans, gguf) = if kind == ArtifactKind::Gguf {
        if !is_gguf_magic {
            return Err(StoreError::NotGguf(path.to_owned()));
        }
        let g = Gguf::parse(bytes).map_err(|source| StoreError::Gguf {
            path: path.to_owned(),
            source,
        })?;
        (chunker::gguf_spans(&g, size), Some(g))
    } else {
        (chunker::cdc_spans(bytes), None)
    };
    // Hash chunks on this thread and the whole file on another: two passes,
    // two cores.
    let (whole, chunk_hashes) = std::thread::scope(|s| {
        let whole = s.spawn(|| blake3::hash(bytes));
        let hashes: Vec<ChunkHash> = spans
            .iter()
            .map(|sp| ChunkHash::of(&bytes[sp.offset as usize..sp.end() as usize]))
            .collect();
        (whole.join(), hashes)
    });
    let whole = whole.map_err(|_| StoreError::BadMetadata("hashing thread panicked".into()))?;
    let chunks: Vec<ChunkRef> = spans
        .iter()
        .zip(chunk_hashes)
        .map(|(sp, hash)| ChunkRef {
            offset: sp.offset,
            len: sp.len,
            hash,
        })
        .collect();
    let mut m = Manifest {
        format: MANIFEST_FORMAT,
        kind,
        size,
        blake3: *whole.as_bytes(),
        chunks,
        tensors: Vec::new(),
    };
    if let Some(g) = gguf {
        for t in &g.tensors {
            let r = g.tensor_range(t);
            let (Some(first), Some(last)) = (
                m.chunk_at(r.start),
                m.chunk_at(r.end.saturating_sub(1).max(r.start)),
            ) else {
                continue;
            };
            m.tensors.push(TensorRef {
                name: t.name.clone(),
                ggml_type: t.ty.id(),
                dims: t.dims.clone(),
                offset: r.start,
                size: t.size,
                first_chunk: first as u32,
                chunk_count: (last - first + 1) as u32,
            });
        }
    }
    m.validate()?;
    Ok(m)
}

/// Why [`open_db`] failed.
enum DbOpen {
    /// Another process has it open.
    Locked,
    /// It cannot be opened: what is wrong.
    Damaged(String),
}

/// Opens the fjall database in `meta`. fjall asserts some things about its
/// directory instead of returning errors (a journal that is not a regular
/// file panics): those are checked first, and a panic inside fjall all the
/// same is caught and reported as damage, never a crash.
fn open_db(meta: &Path) -> Result<Database, DbOpen> {
    for e in fs::read_dir(meta)
        .map_err(|e| DbOpen::Damaged(format!("cannot list it: {e}")))?
        .flatten()
    {
        let name = e.file_name();
        let is_journal = name.to_str().is_some_and(|n| n.ends_with(".jnl"));
        if is_journal && !e.file_type().is_ok_and(|t| t.is_file()) {
            return Err(DbOpen::Damaged(format!(
                "journal {} is not a regular file",
                e.path().display()
            )));
        }
    }
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Database::builder(meta).open()
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(fjall::Error::Locked)) => Err(DbOpen::Locked),
        Ok(Err(e)) => Err(DbOpen::Damaged(e.to_string())),
        Err(_) => Err(DbOpen::Damaged("the database library failed on it".into())),
    }
}

/// Tries to clone `src` into `dst` sharing blocks (FICLONE). False when unsupported.
fn try_reflink(src: &File, dst: &File) -> bool {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    use std::os::fd::AsRawFd;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE
    // takes the source fd as its argument and touches no user memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    rc == 0
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// Files and metadata are reconciled ([`Store::recovery_report`] says
    /// what was done); no byte the store cannot account for is deleted:
    /// objects without a record are re-verified and registered again, what
    /// cannot be checked goes to `lost+found/`. Metadata that cannot be
    /// opened or decoded is [`StoreError::DamagedMetadata`]: nothing is
    /// touched, and [`Store::fsck`] (`shoal fsck`) rebuilds it.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
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
    pub fn fsck(dir: &Path, opts: StoreOptions) -> Result<(Store, Vec<VerifyReport>), StoreError> {
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
    fn prepare(dir: &Path) -> Result<File, StoreError> {
        for sub in ["", "objects", "partial", "tmp", "keys"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let fmt_path = dir.join("FORMAT");
        let want = format!("shoal-store {STORE_FORMAT}\n");
        match fs::read_to_string(&fmt_path) {
            Ok(s) if s == want => {}
            Ok(s) => {
                return Err(StoreError::UnsupportedFormat {
                    path: dir.to_owned(),
                    found: s.trim().to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&fmt_path, &want).map_err(io_err("write", &fmt_path))?;
            }
            Err(e) => return Err(io_err("read", &fmt_path)(e)),
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
        // SAFETY: flock on an fd we own; released when the file is closed.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Locked(dir.to_owned()));
            }
            return Err(io_err("lock", &lock_path)(e));
        }
        Ok(lock)
    }

    /// Whether the metadata at `meta` opens and every value in it decodes.
    /// A missing `meta/` is sound (a fresh store); the error says what is wrong.
    fn check_meta(meta: &Path) -> Result<(), String> {
        match fs::symlink_metadata(meta) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot inspect it: {e}")),
            Ok(m) if !m.is_dir() => return Err("it is not a directory".into()),
            Ok(_) => {}
        }
        let db = open_db(meta).map_err(|e| match e {
            DbOpen::Locked => "it is in use".to_owned(),
            DbOpen::Damaged(why) => why,
        })?;
        let scan = |name: &str, check: &dyn Fn(&[u8], &[u8]) -> bool| -> Result<(), String> {
            let ks = db
                .keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| format!("keyspace {name}: {e}"))?;
            for kv in ks.iter() {
                let (k, v) = kv
                    .into_inner()
                    .map_err(|e| format!("keyspace {name}: {e}"))?;
                if !check(&k, &v) {
                    return Err(format!("keyspace {name}: a value does not decode"));
                }
            }
            Ok(())
        };
        scan("records", &|k, v| {
            ArtifactId::from_slice(k).is_some() && Record::decode(v).is_ok()
        })?;
        scan("manifests", &|k, v| {
            ArtifactId::from_slice(k)
                .is_some_and(|id| Manifest::decode(v).is_ok_and(|m| m.id() == id))
        })?;
        scan("haves", &|_, v| HaveMap::from_bytes(v).is_some())?;
        scan("names", &|_, v| SignedRelease::decode(v).is_ok())?;
        scan("trust", &|k, _| k.len() == 32)?;
        scan("chunk_index", &|k, _| k.len() == 68)?;
        Ok(())
    }

    /// Renames `meta/` to a fresh `meta.damaged-<unix time>[-n]` beside it.
    fn move_meta_aside(dir: &Path) -> Result<PathBuf, StoreError> {
        let meta = dir.join("meta");
        let base = format!("meta.damaged-{}", now_secs());
        let mut to = dir.join(&base);
        let mut n = 1;
        while to.exists() {
            to = dir.join(format!("{base}-{n}"));
            n += 1;
        }
        fs::rename(&meta, &to).map_err(io_err("move aside", &meta))?;
        fsync_dir(dir)?;
        Ok(to)
    }

    fn open_locked(
        dir: &Path,
        opts: StoreOptions,
        lock: File,
        meta_moved_to: Option<PathBuf>,
    ) -> Result<Store, StoreError> {
        let meta = dir.join("meta");
        let damaged = |why: String| StoreError::DamagedMetadata {
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
            Err(DbOpen::Locked) => return Err(StoreError::Locked(dir.to_owned())),
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
            Err(e) => return Err(e),
        }
        match store.list() {
            Ok(list) => crate::metrics::global().store_opened(
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

    /// What opening the store had to repair (empty after a clean shutdown).
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.lock().clone()
    }

    /// Files in `lost+found/`: bytes the store could not account for (moved
    /// there, never deleted). Empty when all is well; `shoal verify` fails
    /// while any are there. Look at them, then remove them by hand.
    pub fn lost_and_found(&self) -> Result<Vec<PathBuf>, StoreError> {
        let d = self.inner.dir.join(LOST_AND_FOUND);
        let mut out = Vec::new();
        match fs::read_dir(&d) {
            Ok(rd) => {
                for e in rd {
                    out.push(e.map_err(io_err("list", &d))?.path());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list", &d)(e)),
        }
        out.sort();
        Ok(out)
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

    /// Brings files and metadata back in agreement after a crash or damage.
    /// Never deletes a byte it cannot account for.
    fn reconcile(&self) -> Result<(), StoreError> {
        let tmp = self.inner.dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err("list", &tmp))?.flatten() {
            // Adds in progress: copies (or links) of files that exist elsewhere.
            let _ = fs::remove_file(e.path());
        }
        let mut records = HashMap::new();
        for kv in self.inner.records.iter() {
            let (k, v) = kv.into_inner()?;
            let Some(id) = ArtifactId::from_slice(&k) else {
                continue;
            };
            records.insert(id, Record::decode(&v)?);
        }
        // Files without a matching record: an add or activation that crashed
        // before its metadata commit, or metadata that was lost.
        for (sub, status) in [
            ("objects", ArtifactStatus::Active),
            ("partial", ArtifactStatus::Partial),
        ] {
            let d = self.inner.dir.join(sub);
            for e in fs::read_dir(&d).map_err(io_err("list", &d))?.flatten() {
                let path = e.path();
                let named = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<ArtifactId>().ok());
                let Some(id) = named else {
                    self.to_lost_and_found(&path, "its name is not an artifact id".into());
                    continue;
                };
                match records.get(&id).map(|r| r.status) {
                    Some(s) if s == status => {}
                    Some(ArtifactStatus::Partial) if status == ArtifactStatus::Active => {
                        // Crashed between the rename to objects/ and the metadata commit:
                        // the rename only happens after the whole-file hash verified.
                        tracing::info!(%id, "completing an activation interrupted by a crash");
                        self.commit_activation(&id)?;
                    }
                    Some(ArtifactStatus::Active)
                        if status == ArtifactStatus::Partial && !self.object_path(&id).exists() =>
                    {
                        // Crashed inside `repair`, between the rename to
                        // partial/ and the metadata batch: finish it, keeping
                        // the chunks that hash right.
                        tracing::warn!(%id, "completing a repair interrupted by a crash");
                        self.finish_interrupted_repair(&id)?;
                    }
                    Some(_) => self.to_lost_and_found(
                        &path,
                        "a second copy of an artifact that is complete in objects/".into(),
                    ),
                    None if status == ArtifactStatus::Active => self.recover_object(&id, &path)?,
                    None => self.recover_partial(&id, &path)?,
                }
            }
        }
        // Records whose file vanished.
        for (id, r) in &records {
            let p = match r.status {
                ArtifactStatus::Active => self.object_path(id),
                ArtifactStatus::Partial => self.partial_path(id),
            };
            if !p.exists() && !self.object_path(id).exists() {
                tracing::warn!(%id, "artifact file is missing; forgetting the artifact");
                self.forget(id)?;
                self.inner.recovery.lock().forgotten.push(*id);
            }
        }
        self.restore_trust()?;
        self.restore_releases()?;
        Ok(())
    }

    /// Moves a file the store cannot account for to `lost+found/` (never
    /// deletes it). A failure to move is logged and the file stays.
    fn to_lost_and_found(&self, path: &Path, why: String) {
        let lf = self.inner.dir.join(LOST_AND_FOUND);
        let from_dir = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = lf.join(format!("{from_dir}-{name}-{}", now_nanos()));
        let moved = fs::create_dir_all(&lf)
            .and_then(|_| fs::rename(path, &to))
            .and_then(|_| File::open(&lf).and_then(|f| f.sync_all()));
        match moved {
            Ok(()) => {
                let _ = fsync_dir(path.parent().unwrap_or(&self.inner.dir));
                tracing::warn!(from = %path.display(), to = %to.display(), %why, "moved to lost+found (not deleted)");
                self.inner.recovery.lock().lost.push(LostFile {
                    from: path.to_owned(),
                    to,
                    why,
                });
            }
            Err(e) => {
                tracing::error!(path = %path.display(), %why, error = %e, "cannot move a file the store cannot account for to lost+found; left in place");
                self.inner.recovery.lock().lost.push(LostFile {
                    from: path.to_owned(),
                    to: path.to_owned(),
                    why: format!("{why}; could not be moved: {e}"),
                });
            }
        }
    }

    /// Rebuilds the manifest of the file at `path` and returns it if its id
    /// is `id` (the bytes are what the name says). GGUF files are cut along
    /// tensors, others by content; the kind of a non-GGUF artifact is not in
    /// its bytes, so each kind is tried (the chunks do not depend on it).
    fn rebuild_manifest(
        &self,
        id: &ArtifactId,
        path: &Path,
    ) -> Result<Option<Manifest>, StoreError> {
        let f = File::open(path).map_err(io_err("open", path))?;
        let len = f.metadata().map_err(io_err("stat", path))?.len();
        // SAFETY: read-only private map of a file in the store; nothing writes it
        // while the store is being opened (the store lock is held).
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { memmap2::Mmap::map(&f) }.map_err(io_err("map", path))?)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let kinds = [
            ArtifactKind::Other,
            ArtifactKind::Tokenizer,
            ArtifactKind::KvBlock,
        ];
        let matching = |m: Manifest| -> Option<Manifest> {
            if m.id() == *id {
                return Some(m);
            }
            if m.kind == ArtifactKind::Gguf {
                return None;
            }
            kinds.iter().find_map(|k| {
                let mut other = m.clone();
                other.kind = *k;
                (other.id() == *id).then_some(other)
            })
        };
        if let Ok(m) = build_manifest(path, bytes, None)
            && let Some(m) = matching(m)
        {
            return Ok(Some(m));
        }
        // GGUF bytes added with a forced non-GGUF kind are cut by content.
        if bytes.starts_with(crate::gguf::MAGIC)
            && let Ok(m) = build_manifest(path, bytes, Some(ArtifactKind::Other))
        {
            return Ok(matching(m));
        }
        Ok(None)
    }

    /// An `objects/<id>` with no record: registered again (active,
    /// unpinned) if its bytes are `id`, else moved to `lost+found/`.
    fn recover_object(&self, id: &ArtifactId, path: &Path) -> Result<(), StoreError> {
        let m = match self.rebuild_manifest(id, path) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.to_lost_and_found(
                    path,
                    "an object with no record whose bytes do not match its id".into(),
                );
                return Ok(());
            }
            Err(e) => {
                self.to_lost_and_found(
                    path,
                    format!("an object with no record that cannot be read: {e}"),
                );
                return Ok(());
            }
        };
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o444));
        self.recover_object_registered(id, &m)
    }

    /// A `partial/<id>` with no record: kept as a partial download if its
    /// manifest survived (the chunks that hash right count as present),
    /// activated if the file is complete and its bytes are `id`, else moved
    /// to `lost+found/`.
    fn recover_partial(&self, id: &ArtifactId, path: &Path) -> Result<(), StoreError> {
        let manifest = self
            .inner
            .manifests
            .get(id.0)
            .ok()
            .flatten()
            .and_then(|b| Manifest::decode(&b).ok())
            .filter(|m| m.id() == *id);
        let len = fs::metadata(path).map(|m| m.len()).ok();
        if let Some(m) = manifest
            && len.is_some_and(|l| l <= m.size)
        {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err("open", path))?;
            f.set_len(m.size).map_err(io_err("size", path))?;
            let mut have = HaveMap::new(m.chunk_count());
            let mut buf = Vec::new();
            for (i, c) in m.chunks.iter().enumerate() {
                buf.resize(c.len as usize, 0);
                if f.read_exact_at(&mut buf, c.offset).is_ok() && ChunkHash::of(&buf) == c.hash {
                    have.set(i as u32);
                }
            }
            f.sync_all().map_err(io_err("sync", path))?;
            let mut b = self.register_batch(id, &m, ArtifactStatus::Partial, false);
            b.insert(&self.inner.haves, id.0, have.to_bytes());
            for i in have.present() {
                let c = &m.chunks[i as usize];
                b.insert(&self.inner.chunk_index, index_key(&c.hash, id, i), []);
            }
            b.commit()?;
            crate::metrics::global().store_added(crate::metrics::ArtifactState::Partial, m.size);
            tracing::warn!(%id, present = have.count(), chunks = m.chunk_count(), "a partial download had no record: registered again");
            self.inner.recovery.lock().partials_recovered.push(*id);
            return Ok(());
        }
        let obj = self.object_path(id);
        if !obj.exists()
            && let Ok(Some(m)) = self.rebuild_manifest(id, path)
        {
            // Complete and right: activate it.
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o444));
            fs::rename(path, &obj).map_err(io_err("rename into", &obj))?;
            fsync_dir(&self.inner.dir.join("objects"))?;
            fsync_dir(&self.inner.dir.join("partial"))?;
            return self.recover_object_registered(id, &m);
        }
        self.to_lost_and_found(
            path,
            "a partial download with no record and no manifest: its bytes cannot be checked".into(),
        );
        Ok(())
    }

    fn recover_object_registered(&self, id: &ArtifactId, m: &Manifest) -> Result<(), StoreError> {
        let mut b = self.register_batch(id, m, ArtifactStatus::Active, false);
        b.remove(&self.inner.haves, id.0);
        self.index_chunks(&mut b, id, m);
        b.commit()?;
        crate::metrics::global().store_added(crate::metrics::ArtifactState::Active, m.size);
        tracing::warn!(%id, size = m.size, "an artifact file had no record: its bytes match its id, registered again as active (unpinned)");
        self.inner.recovery.lock().reregistered.push(*id);
        Ok(())
    }

    /// See [`Store::reconcile`]: the record says active, the file is in partial/.
    fn finish_interrupted_repair(&self, id: &ArtifactId) -> Result<(), StoreError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let r = self
            .record(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let path = self.partial_path(id);
        let f = File::open(&path).map_err(io_err("open", &path))?;
        let mut have = HaveMap::new(m.chunk_count());
        let mut buf = Vec::new();
        for (i, c) in m.chunks.iter().enumerate() {
            buf.resize(c.len as usize, 0);
            if f.read_exact_at(&mut buf, c.offset).is_ok() && ChunkHash::of(&buf) == c.hash {
                have.set(i as u32);
            }
        }
        self.reopen_as_partial(id, &m, r, &have)
    }

    fn record(&self, id: &ArtifactId) -> Result<Option<Record>, StoreError> {
        self.inner
            .records
            .get(id.0)?
            .map(|v| Record::decode(&v))
            .transpose()
    }

    fn put_record(&self, id: &ArtifactId, r: &Record) -> Result<(), StoreError> {
        self.inner.records.insert(id.0, r.encode())?;
        Ok(())
    }

    /// The manifest of a known artifact (active or partial).
    pub fn manifest(&self, id: &ArtifactId) -> Result<Option<Manifest>, StoreError> {
        match self.inner.manifests.get(id.0)? {
            None => Ok(None),
            Some(b) => Ok(Some(Manifest::decode(&b)?)),
        }
    }

    /// The manifest of a known artifact, shared: decoded once and kept in a
    /// small cache (a manifest never changes under its id), so serving a
    /// chunk does not decode and re-validate the whole manifest each time.
    pub fn manifest_shared(&self, id: &ArtifactId) -> Result<Option<Arc<Manifest>>, StoreError> {
        if let Some(m) = self.inner.manifest_cache.lock().get(id) {
            return Ok(Some(m.clone()));
        }
        let Some(m) = self.manifest(id)? else {
            return Ok(None);
        };
        let m = Arc::new(m);
        let mut cache = self.inner.manifest_cache.lock();
        if cache.len() >= MANIFEST_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(*id, m.clone());
        Ok(Some(m))
    }

    /// The canonical manifest bytes (what peers hash to check the id).
    pub fn manifest_bytes(&self, id: &ArtifactId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.manifests.get(id.0)?.map(|b| b.to_vec()))
    }

    /// Status of an artifact, if known.
    pub fn status(&self, id: &ArtifactId) -> Result<Option<ArtifactStatus>, StoreError> {
        Ok(self.record(id)?.map(|r| r.status))
    }

    /// Which chunks are present (durably).
    pub fn have_map(&self, id: &ArtifactId) -> Result<Option<HaveMap>, StoreError> {
        let Some(rec) = self.record(id)? else {
            return Ok(None);
        };
        if rec.status == ArtifactStatus::Active {
            let m = self
                .manifest(id)?
                .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
            let mut have = HaveMap::full(m.chunk_count());
            // A corrupt artifact does not offer its bad chunks.
            for i in rec.corrupt.iter().flatten() {
                have.clear(*i);
            }
            return Ok(Some(have));
        }
        if let Some(p) = self.inner.partials.lock().get(id) {
            return Ok(Some(p.have.clone()));
        }
        match self.inner.haves.get(id.0)? {
            Some(b) => HaveMap::from_bytes(&b)
                .map(Some)
                .ok_or_else(|| StoreError::BadMetadata(format!("have-map of {id}"))),
            None => Ok(None),
        }
    }

    /// Adds a local file. Returns its id; adding the same content again is a no-op
    /// (apart from pinning).
    pub fn add_file(&self, path: &Path, opts: &AddOptions) -> Result<ArtifactId, StoreError> {
        let src = File::open(path).map_err(io_err("open", path))?;
        let meta = src.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() {
            return Err(StoreError::Io {
                what: "add",
                path: path.to_owned(),
                source: io::Error::other("not a regular file"),
            });
        }
        let len = meta.len();
        // SAFETY: the mapping is read-only and private to this call; a concurrent
        // writer to the source could change bytes under us, which the hashes
        // computed here and re-checked by `verify` would expose.
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { memmap2::Mmap::map(&src) }.map_err(io_err("map", path))?)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        #[cfg(unix)]
        if let Some(m) = &map {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
        let tmp_path =
            self.inner
                .dir
                .join("tmp")
                .join(format!("add-{}-{}", std::process::id(), now_nanos()));
        let linked = opts.hardlink && fs::hard_link(path, &tmp_path).is_ok();
        let dst = match linked {
            true => File::open(&tmp_path),
            false => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp_path),
        }
        .map_err(io_err("create", &tmp_path))?;
        let cleanup = TmpGuard(&tmp_path);
        // Copy (or reflink) on one thread while the manifest is hashed on the others.
        let started = std::time::Instant::now();
        let (manifest, copied) = std::thread::scope(|s| {
            let copier = s.spawn(|| -> Result<(), StoreError> {
                if linked {
                    tracing::debug!(path = %path.display(), "hard-linked");
                } else if opts.reflink && try_reflink(&src, &dst) {
                    tracing::debug!(path = %path.display(), "reflinked");
                } else {
                    // std's File-to-File copy uses copy_file_range: an in-kernel copy,
                    // no trip through user space.
                    let mut r = File::open(path).map_err(io_err("open", path))?;
                    let mut w = &dst;
                    let n = io::copy(&mut r, &mut w).map_err(io_err("copy to", &tmp_path))?;
                    if n != len {
                        return Err(io_err("copy to", &tmp_path)(io::Error::other(format!(
                            "source changed size while adding ({n} of {len} bytes)"
                        ))));
                    }
                }
                let copied = started.elapsed();
                dst.sync_data().map_err(io_err("sync", &tmp_path))?;
                tracing::debug!(?copied, synced = ?started.elapsed(), "copy done");
                Ok(())
            });
            let m = build_manifest(path, bytes, opts.kind);
            tracing::debug!(hashed = ?started.elapsed(), "manifest done");
            (m, copier.join())
        });
        let manifest = manifest?;
        copied.map_err(|_| StoreError::BadMetadata("copy thread panicked".into()))??;
        let id = manifest.id();
        let _g = self.inner.meta_lock.lock();
        if let Some(mut rec) = self.record(&id)? {
            if rec.status == ArtifactStatus::Active {
                if opts.pin && !rec.pinned {
                    rec.pinned = true;
                    self.put_record(&id, &rec)?;
                }
                return Ok(id);
            }
            // A partial of the same artifact: the local file completes it.
            crate::metrics::global()
                .store_removed(crate::metrics::ArtifactState::Partial, manifest.size);
            self.inner.partials.lock().remove(&id);
            let _ = fs::remove_file(self.partial_path(&id));
        }
        drop(_g);
        self.make_room(manifest.size, Some(&id))?;
        let _g = self.inner.meta_lock.lock();
        let obj = self.object_path(&id);
        let _ = fs::set_permissions(&tmp_path, fs::Permissions::from_mode(0o444));
        fs::rename(&tmp_path, &obj).map_err(io_err("rename into", &obj))?;
        std::mem::forget(cleanup);
        fsync_dir(&obj.with_file_name(""))?;
        let mut b = self.register_batch(&id, &manifest, ArtifactStatus::Active, opts.pin);
        b.remove(&self.inner.haves, id.0);
        self.index_chunks(&mut b, &id, &manifest);
        b.commit()?;
        crate::metrics::global().store_added(crate::metrics::ArtifactState::Active, manifest.size);
        tracing::info!(%id, size = manifest.size, chunks = manifest.chunks.len(), "added");
        Ok(id)
    }

    /// Registers a partial artifact from a manifest, creates its file, copies
    /// every chunk already present locally (dedupe), and returns the have-map.
    /// Calling it again for the same artifact resumes.
    pub fn begin(&self, manifest: &Manifest) -> Result<HaveMap, StoreError> {
        manifest.validate()?;
        let id = manifest.id();
        if let Some(rec) = self.record(&id)? {
            if rec.status == ArtifactStatus::Active {
                return Ok(HaveMap::full(manifest.chunk_count()));
            }
            self.load_partial(&id)?;
            self.dedupe_into(&id)?;
            return self
                .have_map(&id)?
                .ok_or_else(|| StoreError::Unknown(id.to_hex()));
        }
        self.make_room(manifest.size, None)?;
        let path = self.partial_path(&id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(io_err("create", &path))?;
        f.set_len(manifest.size).map_err(io_err("size", &path))?;
        f.sync_all().map_err(io_err("sync", &path))?;
        fsync_dir(&self.inner.dir.join("partial"))?;
        let have = HaveMap::new(manifest.chunk_count());
        let mut b = self.register_batch(&id, manifest, ArtifactStatus::Partial, false);
        b.insert(&self.inner.haves, id.0, have.to_bytes());
        b.commit()?;
        crate::metrics::global().store_added(crate::metrics::ArtifactState::Partial, manifest.size);
        self.inner.partials.lock().insert(
            id,
            Partial {
                file: Arc::new(f),
                write_lock: Arc::default(),
                tree: treehash::TreeHasher::new(manifest.size).map(|t| Arc::new(Mutex::new(t))),
                manifest: Arc::new(manifest.clone()),
                have,
                pending: Vec::new(),
                pending_bytes: 0,
            },
        );
        self.dedupe_into(&id)?;
        self.have_map(&id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))
    }

    fn load_partial(&self, id: &ArtifactId) -> Result<(), StoreError> {
        if self.inner.partials.lock().contains_key(id) {
            return Ok(());
        }
        let manifest = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let have = match self.inner.haves.get(id.0)? {
            Some(b) => HaveMap::from_bytes(&b)
                .ok_or_else(|| StoreError::BadMetadata(format!("have-map of {id}")))?,
            None => HaveMap::new(manifest.chunk_count()),
        };
        let path = self.partial_path(id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // Chunks written before a restart are not in a fresh tracker.
        let tree = (have.count() == 0)
            .then(|| treehash::TreeHasher::new(manifest.size))
            .flatten()
            .map(|t| Arc::new(Mutex::new(t)));
        self.inner.partials.lock().entry(*id).or_insert(Partial {
            file: Arc::new(f),
            write_lock: Arc::default(),
            tree,
            manifest: Arc::new(manifest),
            have,
            pending: Vec::new(),
            pending_bytes: 0,
        });
        Ok(())
    }

    /// Copies chunks of `id` that some other local artifact already holds.
    fn dedupe_into(&self, id: &ArtifactId) -> Result<u32, StoreError> {
        let manifest = {
            let parts = self.inner.partials.lock();
            let Some(p) = parts.get(id) else { return Ok(0) };
            p.manifest.clone()
        };
        let have = self
            .have_map(id)?
            .unwrap_or_else(|| HaveMap::new(manifest.chunk_count()));
        let mut copied = 0;
        for i in have.missing() {
            let c = &manifest.chunks[i as usize];
            let started = std::time::Instant::now();
            if let Some(data) = self.find_local_chunk(&c.hash, id)? {
                self.put_chunk(id, i, &data)?;
                copied += 1;
                let secs = started.elapsed().as_secs_f64();
                use crate::metrics::{Outcome, Source};
                crate::metrics::global().chunk_fetch(
                    Source::Local,
                    Outcome::Ok,
                    c.len.into(),
                    secs,
                );
            }
        }
        if copied > 0 {
            self.flush(id)?;
            tracing::info!(%id, chunks = copied, "copied chunks from local artifacts");
        }
        Ok(copied)
    }

    /// Finds a chunk with this hash in any local artifact other than `except`.
    pub fn find_local_chunk(
        &self,
        hash: &ChunkHash,
        except: &ArtifactId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        for kv in self.inner.chunk_index.prefix(hash.0) {
            let k = kv.key()?;
            let (Some(other), Some(idx)) = (
                ArtifactId::from_slice(&k[32..64]),
                k.get(64..68)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes),
            ) else {
                continue;
            };
            if &other == except {
                continue;
            }
            match self.read_chunk(&other, idx) {
                Ok(d) if ChunkHash::of(&d) == *hash => return Ok(Some(d)),
                Ok(_) | Err(_) => continue,
            }
        }
        Ok(None)
    }

    /// Verifies a chunk against the manifest and writes it in place. Its
    /// presence becomes durable at the next [`Store::flush`] (automatic every
    /// few MiB). A mismatch writes nothing.
    pub fn put_chunk(&self, id: &ArtifactId, index: u32, data: &[u8]) -> Result<(), StoreError> {
        self.load_partial(id).or_else(|e| match self.status(id) {
            Ok(Some(ArtifactStatus::Active)) => Ok(()),
            _ => Err(e),
        })?;
        let (file, write_lock, tree, size, c, chunks) = {
            let parts = self.inner.partials.lock();
            let Some(p) = parts.get(id) else {
                return Ok(()); // already active: nothing to write
            };
            let Some(c) = p.manifest.chunks.get(index as usize).copied() else {
                return Err(StoreError::NoChunk { id: *id, index });
            };
            if p.have.get(index) || p.pending.contains(&index) {
                return Ok(());
            }
            (
                p.file.clone(),
                p.write_lock.clone(),
                p.tree.clone(),
                p.manifest.size,
                c,
                p.manifest.chunks.len(),
            )
        };
        let got = ChunkHash::of(data);
        if got != c.hash || data.len() != c.len as usize {
            return Err(StoreError::ChunkMismatch {
                id: *id,
                index,
                expected: c.hash,
                got,
            });
        }
        let path = self.partial_path(id);
        {
            let _one_writer = write_lock.lock();
            file.write_all_at(data, c.offset)
                .map_err(io_err("write", &path))?;
        }
        self.stamp_verified(id, index, chunks);
        if let Some(t) = tree {
            // Hashed here, from the verified bytes in memory; the lock is
            // only taken to file the result.
            let piece = treehash::TreeHasher::hash_piece(size, index, c.offset, data);
            t.lock().add(piece);
        }
        let flush = {
            let mut parts = self.inner.partials.lock();
            let Some(p) = parts.get_mut(id) else {
                return Ok(());
            };
            p.pending.push(index);
            p.pending_bytes += u64::from(c.len);
            p.pending_bytes >= AUTO_FLUSH_BYTES
        };
        if flush {
            self.flush(id)?;
        }
        Ok(())
    }

    /// Makes written chunks durable and records them present: fdatasync of
    /// the data first, then the have-map.
    pub fn flush(&self, id: &ArtifactId) -> Result<(), StoreError> {
        let (file, pending, drop_pages) = {
            let mut parts = self.inner.partials.lock();
            let Some(p) = parts.get_mut(id) else {
                return Ok(());
            };
            if p.pending.is_empty() {
                return Ok(());
            }
            p.pending_bytes = 0;
            let pending = std::mem::take(&mut p.pending);
            let drop_pages = (p.tree.is_some() && p.manifest.size >= DROP_PAGES_FROM)
                .then(|| chunk_ranges(&p.manifest, &pending));
            (p.file.clone(), pending, drop_pages)
        };
        let path = self.partial_path(id);
        if let Err(e) = file.sync_data() {
            // Put them back: they are not durable.
            if let Some(p) = self.inner.partials.lock().get_mut(id) {
                p.pending.extend(pending);
            }
            return Err(io_err("sync", &path)(e));
        }
        if let Some(ranges) = drop_pages {
            drop_clean_pages(&file, &ranges);
        }
        let (have_bytes, manifest) = {
            let mut parts = self.inner.partials.lock();
            let Some(p) = parts.get_mut(id) else {
                return Ok(());
            };
            for i in &pending {
                p.have.set(*i);
            }
            (p.have.to_bytes(), p.manifest.clone())
        };
        let mut b = self
            .inner
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        b.insert(&self.inner.haves, id.0, have_bytes);
        for i in &pending {
            if let Some(c) = manifest.chunks.get(*i as usize) {
                b.insert(&self.inner.chunk_index, index_key(&c.hash, id, *i), []);
            }
        }
        b.commit()?;
        Ok(())
    }

    /// Verifies the whole file of a complete partial artifact and activates it atomically.
    pub fn finish(&self, id: &ArtifactId) -> Result<(), StoreError> {
        if self.status(id)? == Some(ArtifactStatus::Active) {
            return Ok(());
        }
        self.load_partial(id)?;
        self.flush(id)?;
        let (file, manifest, have, tree) = {
            let parts = self.inner.partials.lock();
            let p = parts
                .get(id)
                .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
            (
                p.file.clone(),
                p.manifest.clone(),
                p.have.clone(),
                p.tree.clone(),
            )
        };
        if !have.is_complete() {
            return Err(StoreError::Incomplete {
                id: *id,
                have: have.count(),
                total: have.len(),
            });
        }
        let path = self.partial_path(id);
        // The tree built from the chunks as they were written, when it saw
        // them all; otherwise a pass over the file.
        let built = tree.and_then(|t| t.lock().root());
        let whole = match built {
            Some(root) => root,
            None => {
                let mut h = blake3::Hasher::new();
                if manifest.size > 0 {
                    // SAFETY: read-only map of our own partial file, which only this store writes.
                    let map =
                        unsafe { memmap2::Mmap::map(&*file) }.map_err(io_err("map", &path))?;
                    // All cores: this pass is on the critical path of every download.
                    h.update_rayon(&map);
                }
                h.finalize()
            }
        };
        tracing::debug!(%id, from_tree = built.is_some(), "whole-file hash");
        if whole.as_bytes() != &manifest.blake3 {
            return Err(StoreError::FileMismatch(*id));
        }
        let _g = self.inner.meta_lock.lock();
        let obj = self.object_path(id);
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o444));
        fs::rename(&path, &obj).map_err(io_err("rename into", &obj))?;
        fsync_dir(&self.inner.dir.join("objects"))?;
        fsync_dir(&self.inner.dir.join("partial"))?;
        self.commit_activation(id)?;
        self.inner.partials.lock().remove(id);
        crate::metrics::global().store_activated(manifest.size);
        tracing::info!(%id, size = manifest.size, "activated");
        Ok(())
    }

    fn commit_activation(&self, id: &ArtifactId) -> Result<(), StoreError> {
        let manifest = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let mut rec = self
            .record(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        rec.status = ArtifactStatus::Active;
        rec.last_used = now_secs();
        // The whole file verified again: a repaired artifact is whole.
        rec.corrupt = None;
        let mut b = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.inner.records, id.0, rec.encode());
        b.remove(&self.inner.haves, id.0);
        self.index_chunks(&mut b, id, &manifest);
        b.commit()?;
        Ok(())
    }

    /// A synced batch that records a new artifact's manifest and record.
    fn register_batch(
        &self,
        id: &ArtifactId,
        manifest: &Manifest,
        status: ArtifactStatus,
        pinned: bool,
    ) -> fjall::OwnedWriteBatch {
        let now = now_secs();
        let mut b = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.inner.manifests, id.0, manifest.encode());
        let rec = Record {
            status,
            pinned,
            created: now,
            last_used: now,
            corrupt: None,
        };
        b.insert(&self.inner.records, id.0, rec.encode());
        b
    }

    /// Adds every chunk of an artifact to the chunk index (for local dedupe).
    fn index_chunks(&self, b: &mut fjall::OwnedWriteBatch, id: &ArtifactId, manifest: &Manifest) {
        for (i, c) in manifest.chunks.iter().enumerate() {
            b.insert(
                &self.inner.chunk_index,
                index_key(&c.hash, id, i as u32),
                [],
            );
        }
    }

    /// Reads a present chunk, re-verifying its hash (a corrupted disk is never served).
    pub fn read_chunk(&self, id: &ArtifactId, index: u32) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        let n = self.read_chunk_into(id, index, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// [`Store::read_chunk`] into a caller's buffer, reused across chunks:
    /// the chunk is `buf[..n]` for the returned `n`. The buffer only grows,
    /// so a stream of chunks of varying sizes zeroes no fresh memory once it
    /// has seen the largest. On error the buffer's content is unspecified.
    pub fn read_chunk_into(
        &self,
        id: &ArtifactId,
        index: u32,
        buf: &mut Vec<u8>,
    ) -> Result<usize, StoreError> {
        let status = self
            .status(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let (path, manifest) = match status {
            ArtifactStatus::Active => (
                self.object_path(id),
                self.manifest_shared(id)?
                    .ok_or_else(|| StoreError::Unknown(id.to_hex()))?,
            ),
            ArtifactStatus::Partial => {
                self.load_partial(id)?;
                let parts = self.inner.partials.lock();
                let p = parts
                    .get(id)
                    .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
                if !p.have.get(index) {
                    return Err(StoreError::NoChunk { id: *id, index });
                }
                (self.partial_path(id), p.manifest.clone())
            }
        };
        let c = manifest
            .chunks
            .get(index as usize)
            .ok_or(StoreError::NoChunk { id: *id, index })?;
        let f = File::open(&path).map_err(io_err("open", &path))?;
        let n = c.len as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let data = &mut buf[..n];
        if let Err(e) = f.read_exact_at(data, c.offset) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                // The file is shorter than its manifest: the chunk is gone.
                tracing::error!(%id, index, path = %path.display(), "stored file is truncated");
                self.mark_corrupt_quietly(id, index);
            }
            return Err(io_err("read", &path)(e));
        }
        if self.recently_verified(id, index) {
            return Ok(n);
        }
        let got = ChunkHash::of(data);
        if got != c.hash {
            tracing::error!(%id, index, "stored chunk is corrupt");
            self.mark_corrupt_quietly(id, index);
            return Err(StoreError::ChunkMismatch {
                id: *id,
                index,
                expected: c.hash,
                got,
            });
        }
        self.stamp_verified(id, index, manifest.chunks.len());
        Ok(n)
    }

    /// Notes that chunk `index` of `id` (of `chunks` chunks) was just hashed and found right.
    fn stamp_verified(&self, id: &ArtifactId, index: u32, chunks: usize) {
        if self.inner.opts.reverify_after.is_zero() {
            return;
        }
        let now = u32::try_from(self.inner.epoch.elapsed().as_secs())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1);
        let mut v = self.inner.verified.lock();
        let stamps = v.entry(*id).or_default();
        if stamps.len() < chunks {
            stamps.resize(chunks, 0);
        }
        if let Some(s) = stamps.get_mut(index as usize) {
            *s = now;
        }
    }

    /// Whether chunk `index` of `id` was hashed and found right within `reverify_after`.
    fn recently_verified(&self, id: &ArtifactId, index: u32) -> bool {
        let window = self.inner.opts.reverify_after;
        if window.is_zero() {
            return false;
        }
        let Some(stamp) = self
            .inner
            .verified
            .lock()
            .get(id)
            .and_then(|v| v.get(index as usize).copied())
            .filter(|s| *s > 0)
        else {
            return false;
        };
        let at = Duration::from_secs(u64::from(stamp - 1));
        self.inner.epoch.elapsed().saturating_sub(at) < window
    }

    /// Forgets that chunk `index` of `id` was verified (it was found corrupt).
    fn unstamp(&self, id: &ArtifactId, index: u32) {
        if let Some(s) = self
            .inner
            .verified
            .lock()
            .get_mut(id)
            .and_then(|v| v.get_mut(index as usize))
        {
            *s = 0;
        }
    }

    /// Path of an active artifact's file (for memory-mapping). Marks it used.
    /// A corrupt artifact is refused with [`StoreError::Corrupt`].
    pub fn artifact_path(&self, id: &ArtifactId) -> Result<PathBuf, StoreError> {
        let _g = self.inner.meta_lock.lock();
        match self.record(id)? {
            None => Err(StoreError::Unknown(id.to_hex())),
            Some(r) if r.status != ArtifactStatus::Active => Err(StoreError::NotActive(*id)),
            Some(Record {
                corrupt: Some(bad), ..
            }) => Err(StoreError::Corrupt {
                id: *id,
                bad_chunks: bad,
            }),
            Some(mut r) => {
                r.last_used = now_secs();
                self.put_record(id, &r)?;
                Ok(self.object_path(id))
            }
        }
    }

    /// Opens an active artifact for reading and holds a shared lock on it:
    /// while the returned [`Lease`] lives, eviction (in any process) skips it.
    /// A corrupt artifact is refused with [`StoreError::Corrupt`].
    pub fn lease(&self, id: &ArtifactId) -> Result<Lease, StoreError> {
        let path = self.artifact_path(id)?;
        let file = File::open(&path).map_err(io_err("open", &path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_SH) } != 0 {
            return Err(io_err("lock", &path)(io::Error::last_os_error()));
        }
        Ok(Lease {
            id: *id,
            path,
            file,
        })
    }

    /// Pins or unpins an artifact.
    pub fn set_pinned(&self, id: &ArtifactId, pinned: bool) -> Result<(), StoreError> {
        let _g = self.inner.meta_lock.lock();
        let mut r = self
            .record(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        r.pinned = pinned;
        self.put_record(id, &r)?;
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Removes an artifact (active or partial) and its metadata. Names that
    /// point at it stay (they resolve again once the artifact is fetched anew).
    pub fn remove(&self, id: &ArtifactId) -> Result<u64, StoreError> {
        let _g = self.inner.meta_lock.lock();
        let m = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let state = match self.status(id)? {
            Some(ArtifactStatus::Active) => crate::metrics::ArtifactState::Active,
            _ => crate::metrics::ArtifactState::Partial,
        };
        self.inner.partials.lock().remove(id);
        self.forget(id)?;
        for p in [self.object_path(id), self.partial_path(id)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &p)(e)),
            }
        }
        crate::metrics::global().store_removed(state, m.size);
        Ok(m.size)
    }

    fn forget(&self, id: &ArtifactId) -> Result<(), StoreError> {
        self.inner.manifest_cache.lock().remove(id);
        self.inner.verified.lock().remove(id);
        let m = self.manifest(id).ok().flatten();
        let mut b = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        b.remove(&self.inner.manifests, id.0);
        b.remove(&self.inner.records, id.0);
        b.remove(&self.inner.haves, id.0);
        if let Some(m) = m {
            for (i, c) in m.chunks.iter().enumerate() {
                b.remove(&self.inner.chunk_index, index_key(&c.hash, id, i as u32));
            }
        }
        b.commit()?;
        Ok(())
    }

    /// Lists every artifact.
    pub fn list(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        let names = self.name_map()?;
        let mut out = Vec::new();
        for kv in self.inner.records.iter() {
            let (k, v) = kv.into_inner()?;
            let Some(id) = ArtifactId::from_slice(&k) else {
                continue;
            };
            let r = Record::decode(&v)?;
            let Some(m) = self.manifest(&id)? else {
                continue;
            };
            let have = self
                .have_map(&id)?
                .unwrap_or_else(|| HaveMap::new(m.chunk_count()));
            let present_bytes = have
                .present()
                .map(|i| u64::from(m.chunks[i as usize].len))
                .sum();
            out.push(ArtifactInfo {
                id,
                names: names.get(&id).cloned().unwrap_or_default(),
                kind: m.kind,
                status: r.status,
                size: m.size,
                present_bytes,
                chunks: m.chunk_count(),
                present_chunks: have.count(),
                pinned: r.pinned,
                last_used: r.last_used,
                corrupt: r.corrupt,
            });
        }
        Ok(out)
    }

    /// Total bytes the store's artifacts take (active sizes plus partial file sizes).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.list()?.iter().map(|a| a.size).sum())
    }

    /// Re-hashes an artifact's chunks (and whole file, if active). For a
    /// partial, bad chunks are marked missing so they get fetched again.
    pub fn verify(&self, id: &ArtifactId) -> Result<VerifyReport, StoreError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let status = self
            .status(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let have = self
            .have_map(id)?
            .unwrap_or_else(|| HaveMap::new(m.chunk_count()));
        let path = match status {
            ArtifactStatus::Active => self.object_path(id),
            ArtifactStatus::Partial => self.partial_path(id),
        };
        let f = File::open(&path).map_err(io_err("open", &path))?;
        let flen = f.metadata().map_err(io_err("stat", &path))?.len();
        let mut report = VerifyReport {
            id: *id,
            checked: 0,
            bad_chunks: Vec::new(),
            file_ok: None,
        };
        let mut whole = blake3::Hasher::new();
        let mut buf = Vec::new();
        for i in have.present() {
            let c = &m.chunks[i as usize];
            buf.resize(c.len as usize, 0);
            let ok = f.read_exact_at(&mut buf, c.offset).is_ok() && ChunkHash::of(&buf) == c.hash;
            report.checked += 1;
            if !ok {
                report.bad_chunks.push((i, c.offset));
                self.unstamp(id, i);
            }
            if status == ArtifactStatus::Active {
                whole.update(&buf);
            }
        }
        let bad: Vec<u32> = report.bad_chunks.iter().map(|(i, _)| *i).collect();
        if status == ArtifactStatus::Active {
            report.file_ok = Some(flen == m.size && whole.finalize().as_bytes() == &m.blake3);
            if !report.ok() {
                self.mark_corrupt(id, &bad)?;
            }
        } else if !bad.is_empty() {
            self.clear_present(id, &bad)?;
        }
        Ok(report)
    }

    /// Marks chunks of a partial artifact missing again (their bytes were
    /// found wrong), so a download fetches them anew.
    fn clear_present(&self, id: &ArtifactId, bad: &[u32]) -> Result<(), StoreError> {
        self.load_partial(id)?;
        for i in bad {
            self.unstamp(id, *i);
        }
        let bytes = {
            let mut parts = self.inner.partials.lock();
            parts.get_mut(id).map(|p| {
                for i in bad {
                    p.have.clear(*i);
                }
                p.have.to_bytes()
            })
        };
        if let Some(b) = bytes {
            self.inner.haves.insert(id.0, b)?;
            self.inner.db.persist(PersistMode::SyncAll)?;
        }
        Ok(())
    }

    /// Marks an artifact corrupt: `bad_chunks` (chunk indices) failed
    /// verification. The mark is durable (in the artifact's record) and
    /// adds to any earlier mark. A marked artifact stays on disk but is not
    /// served ([`Store::artifact_path`] and [`Store::lease`] answer
    /// [`StoreError::Corrupt`], its have-map leaves the bad chunks out) until
    /// [`Store::repair`] and a download make it whole again. An empty
    /// `bad_chunks` marks the file as a whole (e.g. wrong length). For a
    /// partial artifact the chunks are marked missing instead (a download
    /// fetches them again). A new mark is reported to
    /// [`StoreOptions::on_corrupt`].
    pub fn mark_corrupt(&self, id: &ArtifactId, bad_chunks: &[u32]) -> Result<(), StoreError> {
        let m = self
            .manifest_shared(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        if let Some(&index) = bad_chunks.iter().find(|i| **i >= m.chunk_count()) {
            return Err(StoreError::NoChunk { id: *id, index });
        }
        let newly = {
            let _g = self.inner.meta_lock.lock();
            let mut r = self
                .record(id)?
                .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
            if r.status == ArtifactStatus::Partial {
                drop(_g);
                return self.clear_present(id, bad_chunks);
            }
            for i in bad_chunks {
                self.unstamp(id, *i);
            }
            let mut set = r.corrupt.clone().unwrap_or_default();
            set.extend_from_slice(bad_chunks);
            set.sort_unstable();
            set.dedup();
            let newly = r.corrupt.as_ref() != Some(&set);
            if newly {
                tracing::error!(%id, bad_chunks = ?set, "artifact marked corrupt: not served until repaired");
                r.corrupt = Some(set);
                self.put_record(id, &r)?;
                self.inner.db.persist(PersistMode::SyncAll)?;
            }
            newly
        };
        if newly && let Some(hook) = &self.inner.opts.on_corrupt {
            hook(id);
        }
        Ok(())
    }

    /// [`Store::mark_corrupt`] from a read path: a failure to persist the
    /// mark is logged (the read fails anyway).
    fn mark_corrupt_quietly(&self, id: &ArtifactId, index: u32) {
        if let Err(e) = self.mark_corrupt(id, &[index]) {
            tracing::error!(%id, index, error = %e, "could not mark the artifact corrupt");
        }
    }

    /// Every artifact marked corrupt, with its bad chunk indices.
    pub fn corrupt_artifacts(&self) -> Result<Vec<(ArtifactId, Vec<u32>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.records.iter() {
            let (k, v) = kv.into_inner()?;
            let Some(id) = ArtifactId::from_slice(&k) else {
                continue;
            };
            if let Some(bad) = Record::decode(&v)?.corrupt {
                out.push((id, bad));
            }
        }
        Ok(out)
    }

    /// Turns a corrupt active artifact back into a partial download whose
    /// have-map holds every chunk but the bad ones: the file moves (rename,
    /// no copy) to `partial/`, so [`Store::begin`] (any download: `shoal
    /// pull`, the mesh) resumes it and fetches only the bad chunks; when it
    /// activates again (whole-file hash verified) the mark is gone. Returns
    /// the have-map. An artifact that is already partial answers its
    /// have-map; an active artifact that is not marked is left alone (full
    /// have-map). A mark with no bad chunk (wrong length) is repaired here:
    /// the file is cut back to its size and activated if it verifies.
    pub fn repair(&self, id: &ArtifactId) -> Result<HaveMap, StoreError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let g = self.inner.meta_lock.lock();
        let r = self
            .record(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let bad = match (&r.status, &r.corrupt) {
            (ArtifactStatus::Partial, _) => {
                drop(g);
                return self
                    .have_map(id)?
                    .ok_or_else(|| StoreError::Unknown(id.to_hex()));
            }
            (ArtifactStatus::Active, None) => return Ok(HaveMap::full(m.chunk_count())),
            (ArtifactStatus::Active, Some(bad)) => bad.clone(),
        };
        let obj = self.object_path(id);
        let part = self.partial_path(id);
        if part.exists() {
            return Err(io_err("repair into", &part)(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a partial file of this artifact already exists",
            )));
        }
        fs::set_permissions(&obj, fs::Permissions::from_mode(0o644))
            .map_err(io_err("make writable", &obj))?;
        let f = OpenOptions::new()
            .write(true)
            .open(&obj)
            .map_err(io_err("open", &obj))?;
        f.set_len(m.size).map_err(io_err("size", &obj))?;
        f.sync_all().map_err(io_err("sync", &obj))?;
        drop(f);
        fs::rename(&obj, &part).map_err(io_err("rename into", &part))?;
        fsync_dir(&self.inner.dir.join("partial"))?;
        fsync_dir(&self.inner.dir.join("objects"))?;
        let mut have = HaveMap::full(m.chunk_count());
        for i in &bad {
            have.clear(*i);
        }
        self.reopen_as_partial(id, &m, r, &have)?;
        drop(g);
        crate::metrics::global().store_removed(crate::metrics::ArtifactState::Active, m.size);
        crate::metrics::global().store_added(crate::metrics::ArtifactState::Partial, m.size);
        tracing::warn!(%id, bad_chunks = ?bad, "corrupt artifact reopened as a partial download: its bad chunks will be fetched again");
        if have.is_complete() {
            // Only the length was wrong, and it is cut back: verify and activate.
            self.finish(id)?;
        }
        Ok(have)
    }

    /// The metadata half of [`Store::repair`] (the file is in `partial/`
    /// already): one synced batch makes the record partial, unmarked, with
    /// the have-map `have`, and drops the bad chunks from the chunk index.
    fn reopen_as_partial(
        &self,
        id: &ArtifactId,
        m: &Manifest,
        mut r: Record,
        have: &HaveMap,
    ) -> Result<(), StoreError> {
        self.inner.partials.lock().remove(id);
        self.inner.verified.lock().remove(id);
        r.status = ArtifactStatus::Partial;
        r.corrupt = None;
        r.last_used = now_secs();
        let mut b = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.inner.records, id.0, r.encode());
        b.insert(&self.inner.haves, id.0, have.to_bytes());
        for (i, c) in m.chunks.iter().enumerate() {
            if !have.get(i as u32) {
                b.remove(&self.inner.chunk_index, index_key(&c.hash, id, i as u32));
            }
        }
        b.commit()?;
        Ok(())
    }

    // ---- eviction ----

    /// Evicts least-recently-used, unpinned, unleased artifacts until `need`
    /// more bytes fit in the quota. `keep` is never evicted.
    fn make_room(&self, need: u64, keep: Option<&ArtifactId>) -> Result<(), StoreError> {
        let quota = self.inner.opts.quota_bytes;
        if quota == u64::MAX {
            return Ok(());
        }
        let _g = self.inner.meta_lock.lock();
        let list = self.list()?;
        let used: u64 = list.iter().map(|a| a.size).sum();
        if used.saturating_add(need) <= quota {
            return Ok(());
        }
        let mut candidates: Vec<&ArtifactInfo> = list
            .iter()
            .filter(|a| a.status == ArtifactStatus::Active && !a.pinned && Some(&a.id) != keep)
            .filter(|a| !self.in_use(&a.id))
            .collect();
        candidates.sort_by_key(|a| a.last_used);
        let freeable: u64 = candidates.iter().map(|a| a.size).sum();
        if used.saturating_sub(freeable).saturating_add(need) > quota {
            return Err(StoreError::QuotaExceeded {
                need,
                free: quota.saturating_sub(used) + freeable,
                quota,
            });
        }
        let mut used = used;
        drop(_g);
        for a in candidates {
            if used.saturating_add(need) <= quota {
                break;
            }
            tracing::info!(id = %a.id, size = a.size, "evicting (quota)");
            crate::metrics::global().store_evicted(a.size);
            used = used.saturating_sub(self.remove(&a.id)?);
        }
        Ok(())
    }

    /// Whether any process holds a [`Lease`] on the artifact.
    fn in_use(&self, id: &ArtifactId) -> bool {
        let p = self.object_path(id);
        let Ok(f) = File::open(&p) else { return false };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        // SAFETY: flock on an fd we own; released when `f` is dropped.
        let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
        rc != 0
    }

    /// Collects stale partials and evicts down to the quota.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let ttl = self.inner.opts.partial_ttl.as_secs();
        let now = now_secs();
        for a in self.list()? {
            if a.status == ArtifactStatus::Partial && now.saturating_sub(a.last_used) >= ttl {
                report.bytes_freed += self.remove(&a.id)?;
                report.partials_removed.push(a.id);
            }
        }
        let quota = self.inner.opts.quota_bytes;
        if quota != u64::MAX {
            let before: Vec<ArtifactId> = self.list()?.iter().map(|a| a.id).collect();
            let used = self.used_bytes()?;
            if used > quota {
                // Evict as if a zero-byte artifact needed room.
                let _ = self.make_room(0, None);
            }
            let after: std::collections::HashSet<ArtifactId> =
                self.list()?.iter().map(|a| a.id).collect();
            report.evicted = before
                .into_iter()
                .filter(|id| !after.contains(id))
                .collect();
            report.bytes_freed += used.saturating_sub(self.used_bytes()?);
        }
        Ok(report)
    }

    /// Marks a partial as touched now (downloads in progress are not collected).
    pub fn touch(&self, id: &ArtifactId) -> Result<(), StoreError> {
        let _g = self.inner.meta_lock.lock();
        if let Some(mut r) = self.record(id)? {
            r.last_used = now_secs();
            self.put_record(id, &r)?;
        }
        Ok(())
    }

    // ---- names, releases, trust ----

    fn name_map(&self) -> Result<HashMap<ArtifactId, Vec<String>>, StoreError> {
        let mut m: HashMap<ArtifactId, Vec<String>> = HashMap::new();
        for s in self.releases()? {
            if let Ok(r) = s.verify() {
                m.entry(r.id).or_default().push(r.name);
            }
        }
        Ok(m)
    }

    /// Every release the store knows (verified when applied; not re-checked here).
    pub fn releases(&self) -> Result<Vec<SignedRelease>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.names.iter() {
            let (_, v) = kv.into_inner()?;
            out.push(SignedRelease::decode(&v)?);
        }
        Ok(out)
    }

    /// The release currently bound to a name.
    pub fn release(&self, name: &str) -> Result<Option<SignedRelease>, StoreError> {
        if name.len() > MAX_NAME {
            return Err(StoreError::TooLong {
                what: "name",
                len: name.len(),
            });
        }
        self.inner
            .names
            .get(name.as_bytes())?
            .map(|v| SignedRelease::decode(&v).map_err(Into::into))
            .transpose()
    }

    /// Checks a signed release (signature, trusted publisher) and applies it if
    /// its sequence number is higher than the one known for its name.
    pub fn apply_release(&self, s: &SignedRelease) -> Result<ReleaseOutcome, StoreError> {
        self.apply_release_inner(s, true)
    }

    /// [`Store::apply_release`]; `write_file`: also write its release file
    /// (not when restoring from that file).
    fn apply_release_inner(
        &self,
        s: &SignedRelease,
        write_file: bool,
    ) -> Result<ReleaseOutcome, StoreError> {
        let r = s.verify()?;
        if !self.is_trusted(&s.publisher)? {
            return Err(StoreError::Untrusted {
                name: r.name,
                publisher: s.publisher_hex(),
            });
        }
        let _g = self.inner.meta_lock.lock();
        if let Some(cur) = self.release(&r.name)? {
            if cur == *s {
                return Ok(ReleaseOutcome::AlreadyKnown);
            }
            if let Ok(c) = cur.verify()
                && c.seq >= r.seq
                && self.is_trusted(&cur.publisher)?
            {
                return Ok(ReleaseOutcome::Stale);
            }
        }
        // The file first: if the metadata is lost, names come back from it.
        if write_file {
            self.write_release_file(&r.name, s)?;
        }
        self.inner.names.insert(r.name.as_bytes(), s.encode())?;
        self.inner.db.persist(PersistMode::SyncAll)?;
        tracing::info!(name = %r.name, id = %r.id, seq = r.seq, "release applied");
        Ok(ReleaseOutcome::Applied)
    }

    /// Resolves a 64-hex id or a trusted release name to an artifact id.
    pub fn resolve(&self, id_or_name: &str) -> Result<ArtifactId, StoreError> {
        if id_or_name.len() > MAX_NAME.max(64) {
            return Err(StoreError::TooLong {
                what: "id or name",
                len: id_or_name.len(),
            });
        }
        if let Ok(id) = id_or_name.parse::<ArtifactId>() {
            return Ok(id);
        }
        // A unique id prefix of at least 8 hex digits is accepted too.
        if id_or_name.len() >= 8 && id_or_name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<ArtifactId> = self
                .list()?
                .into_iter()
                .map(|a| a.id)
                .filter(|id| id.to_hex().starts_with(&id_or_name.to_ascii_lowercase()))
                .collect();
            if let [one] = hits.as_slice() {
                return Ok(*one);
            }
        }
        let s = self
            .release(id_or_name)?
            .ok_or_else(|| StoreError::Unknown(id_or_name.to_owned()))?;
        let r = s.verify()?;
        if !self.is_trusted(&s.publisher)? {
            return Err(StoreError::Untrusted {
                name: r.name,
                publisher: s.publisher_hex(),
            });
        }
        Ok(r.id)
    }

    /// Adds a publisher key to the trust store.
    pub fn trust_add(&self, key: [u8; 32], label: &str) -> Result<(), StoreError> {
        let _g = self.inner.meta_lock.lock();
        let mut keys = self.trust_list()?;
        keys.retain(|(k, _)| *k != key);
        keys.push((key, label.to_owned()));
        // The file first: if the metadata is lost, trust comes back from it.
        self.write_trust_file(&keys)?;
        self.inner.trust.insert(key, label.as_bytes())?;
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Removes a publisher key; returns whether it was there.
    pub fn trust_remove(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        let _g = self.inner.meta_lock.lock();
        let had = self.inner.trust.contains_key(key)?;
        let mut keys = self.trust_list()?;
        keys.retain(|(k, _)| k != key);
        // The file first: a crash in between must not bring the key back.
        self.write_trust_file(&keys)?;
        self.inner.trust.remove(*key)?;
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(had)
    }

    fn trust_file(&self) -> PathBuf {
        self.inner.dir.join("keys").join("trusted")
    }

    fn release_file(&self, name: &str) -> PathBuf {
        // Names are [a-z0-9._-]+ with one optional `:tag` (checked by
        // `verify`): safe as a file name once suffixed.
        self.inner
            .dir
            .join(RELEASES_DIR)
            .join(format!("{name}.release"))
    }

    /// `keys/trusted`: the header line, then one `<64 hex> <label>` per line.
    fn write_trust_file(&self, keys: &[([u8; 32], String)]) -> Result<(), StoreError> {
        let mut text = format!("{TRUST_FILE_HEADER}\n");
        for (k, label) in keys {
            // A label is one line.
            let label: String = label.chars().filter(|c| !c.is_control()).collect();
            text.push_str(&format!("{} {label}\n", hex::encode(k)));
        }
        write_atomically(&self.trust_file(), text.as_bytes(), 0o644)
    }

    /// Reads `keys/trusted` (`None` if absent).
    fn read_trust_file(&self) -> Result<Option<Vec<TrustedKey>>, StoreError> {
        let p = self.trust_file();
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &p)(e)),
        };
        let mut lines = text.lines();
        if lines.next() != Some(TRUST_FILE_HEADER) {
            return Err(StoreError::BadMetadata(format!(
                "{}: not a `{TRUST_FILE_HEADER}` file",
                p.display()
            )));
        }
        let mut out = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (k, label) = line.split_once(' ').unwrap_or((line, ""));
            let mut key = [0u8; 32];
            hex::decode_to_slice(k, &mut key).map_err(|_| {
                StoreError::BadMetadata(format!("{}: bad key line {line:?}", p.display()))
            })?;
            out.push((key, label.to_owned()));
        }
        Ok(Some(out))
    }

    /// Writes a release's file (`releases/<name>.release`: the
    /// [`SignedRelease`] encoding, format-versioned and signed).
    fn write_release_file(&self, name: &str, s: &SignedRelease) -> Result<(), StoreError> {
        let d = self.inner.dir.join(RELEASES_DIR);
        fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        write_atomically(&self.release_file(name), &s.encode(), 0o644)
    }

    /// Brings back trusted keys from `keys/trusted` that the metadata lacks
    /// (and this node's own key when neither knows any). Writes the file
    /// from the metadata when there is none yet (a store made before it).
    fn restore_trust(&self) -> Result<(), StoreError> {
        let known = self.trust_list()?;
        let from_file = match self.read_trust_file() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "the trusted-keys file is unreadable; not restoring from it");
                return Ok(());
            }
        };
        let Some(file_keys) = from_file else {
            if known.is_empty()
                && let Ok(Some(k)) = self.publisher_key()
            {
                // Metadata lost before the trust file existed: trust self again.
                self.trust_add(k.verifying_key().to_bytes(), "self")?;
                self.inner.recovery.lock().keys_restored += 1;
                return Ok(());
            }
            // Best effort: a store on a full disk still opens.
            if let Err(e) = self.write_trust_file(&known) {
                tracing::warn!(error = %e, "cannot write keys/trusted yet");
            }
            return Ok(());
        };
        let mut restored = 0;
        for (k, label) in file_keys {
            if !known.iter().any(|(kk, _)| *kk == k) {
                self.inner.trust.insert(k, label.as_bytes())?;
                restored += 1;
            }
        }
        if restored > 0 {
            self.inner.db.persist(PersistMode::SyncAll)?;
            tracing::warn!(keys = restored, "trusted keys restored from keys/trusted");
            self.inner.recovery.lock().keys_restored += restored;
        }
        Ok(())
    }

    /// Applies the release files in `releases/` the metadata lacks (the
    /// usual checks: signature, trusted publisher, higher sequence). Writes
    /// the files from the metadata when the directory does not exist yet.
    fn restore_releases(&self) -> Result<(), StoreError> {
        let d = self.inner.dir.join(RELEASES_DIR);
        if !d.exists() {
            // A store made before release files: write them (best effort:
            // a store on a full disk still opens; the next open retries).
            let mut written = true;
            for s in self.releases()? {
                if let Ok(r) = s.verify()
                    && let Err(e) = self.write_release_file(&r.name, &s)
                {
                    tracing::warn!(error = %e, "cannot write release files yet");
                    written = false;
                    break;
                }
            }
            if written && let Err(e) = fs::create_dir_all(&d) {
                tracing::warn!(error = %e, "cannot create releases/ yet");
            }
            return Ok(());
        }
        let mut files: Vec<PathBuf> = fs::read_dir(&d)
            .map_err(io_err("list", &d))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "release"))
            .collect();
        files.sort();
        for p in files {
            let outcome = fs::read(&p)
                .map_err(io_err("read", &p))
                .and_then(|b| Ok(SignedRelease::decode(&b)?))
                .and_then(|s| {
                    let r = s.verify()?;
                    if self.release(&r.name)?.as_ref() == Some(&s) {
                        // The usual case: the metadata has it already.
                        return Ok((r.name, ReleaseOutcome::AlreadyKnown));
                    }
                    Ok((r.name, self.apply_release_inner(&s, false)?))
                });
            match outcome {
                Ok((name, ReleaseOutcome::Applied)) => {
                    tracing::warn!(%name, "name restored from its release file");
                    self.inner.recovery.lock().names_restored.push(name);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "release file not applied");
                }
            }
        }
        Ok(())
    }

    /// Trusted keys with their labels.
    pub fn trust_list(&self) -> Result<Vec<([u8; 32], String)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.trust.iter() {
            let (k, v) = kv.into_inner()?;
            if let Ok(k) = <[u8; 32]>::try_from(&*k) {
                out.push((k, String::from_utf8_lossy(&v).into_owned()));
            }
        }
        Ok(out)
    }

    /// Whether a key is trusted.
    pub fn is_trusted(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.inner.trust.contains_key(key)?)
    }

    fn key_path(&self) -> PathBuf {
        self.inner.dir.join("keys").join("publisher.key")
    }

    /// This node's publisher key, if generated.
    pub fn publisher_key(&self) -> Result<Option<SigningKey>, StoreError> {
        let p = self.key_path();
        match fs::read_to_string(&p) {
            Ok(s) => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut seed).map_err(|_| {
                    StoreError::BadMetadata(format!("{} is not a hex key", p.display()))
                })?;
                Ok(Some(SigningKey::from_bytes(&seed)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// Generates this node's publisher key (unless one exists and `force` is
    /// false) and trusts it. Returns the public key.
    pub fn keygen(&self, force: bool) -> Result<[u8; 32], StoreError> {
        if !force && let Some(k) = self.publisher_key()? {
            return Ok(k.verifying_key().to_bytes());
        }
        let p = self.key_path();
        let k = release::generate_key().map_err(io_err("generate key", &p))?;
        write_atomically(&p, hex::encode(k.to_bytes()).as_bytes(), 0o600)?;
        let public = k.verifying_key().to_bytes();
        self.trust_add(public, "self")?;
        Ok(public)
    }

    /// Signs and applies a release binding `name` to `id` with the next sequence number.
    pub fn publish(
        &self,
        id: &ArtifactId,
        name: &str,
        origin: Option<String>,
    ) -> Result<SignedRelease, StoreError> {
        release::check_name(name)?;
        if self.manifest(id)?.is_none() {
            return Err(StoreError::Unknown(id.to_hex()));
        }
        let key = self.publisher_key()?.ok_or(StoreError::NoKey)?;
        let seq = match self.release(name)? {
            Some(cur) => cur.verify().map(|r| r.seq).unwrap_or(0) + 1,
            None => 1,
        };
        let s = SignedRelease::sign(
            &Release {
                format: release::RELEASE_FORMAT,
                name: name.to_owned(),
                id: *id,
                seq,
                origin,
                created: now_secs(),
            },
            &key,
        )?;
        self.apply_release(&s)?;
        Ok(s)
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Writes `data` to `path` atomically: a sibling `.tmp` file (mode
/// `mode`), synced, renamed over `path`, directory synced. On any failure
/// the temporary file is removed and `path` is left as it was.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let guard = TmpGuard(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    std::mem::forget(guard);
    if let Some(d) = path.parent() {
        fsync_dir(d)?;
    }
    Ok(())
}

/// Removes a temporary file unless disarmed with `mem::forget`.
struct TmpGuard<'a>(&'a Path);

impl Drop for TmpGuard<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

/// A read handle on an active artifact, holding a shared lock that keeps it
/// from being evicted.
#[derive(Debug)]
pub struct Lease {
    /// The artifact.
    pub id: ArtifactId,
    /// Its file.
    pub path: PathBuf,
    file: File,
}

impl Lease {
    /// Memory-maps the artifact read-only.
    pub fn map(&self) -> Result<memmap2::Mmap, StoreError> {
        // SAFETY: objects are read-only and never modified in place by the store.
        unsafe { memmap2::Mmap::map(&self.file) }.map_err(io_err("map", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(lens: &[u32]) -> Manifest {
        let mut offset = 0;
        let chunks = lens
            .iter()
            .map(|&len| {
                let c = ChunkRef {
                    offset,
                    len,
                    hash: ChunkHash::of(&[]),
                };
                offset += u64::from(len);
                c
            })
            .collect();
        Manifest {
            format: MANIFEST_FORMAT,
            kind: ArtifactKind::Gguf,
            size: offset,
            blake3: [0; 32],
            chunks,
            tensors: Vec::new(),
        }
    }

    #[test]
    fn record_format_fixture_old_records_decode_without_a_mark() {
        let mut r = Record {
            status: ArtifactStatus::Active,
            pinned: true,
            created: 300,
            last_used: 301,
            corrupt: None,
        };
        // Format 1, as every store before corrupt marks wrote it: unchanged.
        let v1 = [1, 1, 0xac, 0x02, 0xad, 0x02];
        assert_eq!(r.encode(), v1);
        assert_eq!(Record::decode(&v1).expect("v1").corrupt, None);
        // With a mark: the extension, version 2.
        r.corrupt = Some(vec![3, 200]);
        let v2 = [1, 1, 0xac, 0x02, 0xad, 0x02, 2, 1, 2, 3, 0xc8, 0x01];
        assert_eq!(r.encode(), v2);
        assert_eq!(Record::decode(&v2).expect("v2").corrupt, Some(vec![3, 200]));
        // An empty mark (the file as a whole) is a mark.
        r.corrupt = Some(vec![]);
        assert_eq!(
            Record::decode(&r.encode()).expect("v2").corrupt,
            Some(vec![])
        );
        // An unknown extension is refused, not dropped.
        assert!(matches!(
            Record::decode(&[1, 1, 0xac, 0x02, 0xad, 0x02, 9, 0]),
            Err(StoreError::BadMetadata(_))
        ));
    }

    #[test]
    fn dropped_ranges_are_the_flushed_chunks_merged_never_their_neighbours() {
        // Chunks at 0, 5000, 12000, 12100, 20000 (unaligned, as CDC cuts them).
        let m = manifest(&[5000, 7000, 100, 7900, 3000]);
        // Out of order, one twice, one out of range: runs of adjacent
        // chunks merge; chunk 1 (5000..12000), not flushed, stays out.
        assert_eq!(
            chunk_ranges(&m, &[3, 0, 2, 3, 99, 4]),
            vec![(0, 5000), (12000, 11000)]
        );
        assert_eq!(chunk_ranges(&m, &[1]), vec![(5000, 7000)]);
        assert!(chunk_ranges(&m, &[]).is_empty());
    }
}
