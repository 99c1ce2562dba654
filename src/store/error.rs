//! The store's errors, one type per kind of operation whose callers act
//! differently (in the style of iroh-blobs' `GetError`):
//!
//! - [`OpenError`] ([`Store::open`], [`Store::fsck`]): the store is locked
//!   by another process, its metadata is damaged (run `fsck`), or its format
//!   is foreign;
//! - [`ReadError`] (reads and leases: [`Store::read_chunk`],
//!   [`Store::artifact_path`], [`Store::lease`]): not here, corrupt, or I/O;
//! - [`AddError`] ([`Store::add_file`], [`build_manifest`]): the disk or the
//!   quota is full, or the file is not a valid GGUF;
//! - [`StoreError`]: everything else (metadata, partial downloads, names,
//!   trust), which callers report alike.
//!
//! Each converts into [`StoreError`] (`?` in a function returning it keeps
//! working; shared variants map to the same [`StoreError`] variant), and
//! `io_err` is the adapter every file operation uses.

use super::*;
use crate::gguf::GgufError;

/// Errors from the content store's operations that share one error type
/// (see the module documentation for the per-operation ones).
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
    /// The store could not be opened (see [`OpenError`]).
    #[error(transparent)]
    Open(OpenError),
    /// A file could not be added (see [`AddError`]; only the variants that
    /// have no [`StoreError`] twin end up here).
    #[error(transparent)]
    Add(AddError),
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

/// Why the store could not be opened ([`Store::open`], [`Store::fsck`]).
/// Each variant asks the caller for something different: wait for (or use)
/// the process that holds the store, run `shoal fsck`, or use another build.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
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
    /// Reconciling files and metadata, or (for `fsck`) re-verifying an
    /// artifact, failed.
    #[error(transparent)]
    Store(Box<StoreError>),
}

/// Why a chunk or an artifact could not be read or leased
/// ([`Store::read_chunk`], [`Store::read_chunk_into`],
/// [`Store::artifact_path`], [`Store::lease`], [`Lease::map`]). A peer asking
/// for it is told "not found" ([`ReadError::Unknown`],
/// [`ReadError::NotActive`], [`ReadError::NoChunk`]); corrupt bytes are
/// never served ([`ReadError::ChunkMismatch`], [`ReadError::Corrupt`]: the
/// artifact is marked and repaired).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No artifact with this id.
    #[error("unknown artifact {0:?}")]
    Unknown(String),
    /// The artifact exists but is not complete yet.
    #[error("artifact {0} is not complete yet")]
    NotActive(ArtifactId),
    /// A chunk index beyond the manifest, or a chunk not present.
    #[error("chunk {index} of {id} is not available")]
    NoChunk {
        /// Artifact.
        id: ArtifactId,
        /// Chunk index.
        index: u32,
    },
    /// The stored chunk's bytes do not match the manifest (the artifact is
    /// marked corrupt).
    #[error("chunk {index} of {id}: hash mismatch (expected {expected}, got {got})")]
    ChunkMismatch {
        /// Artifact.
        id: ArtifactId,
        /// Chunk index.
        index: u32,
        /// Hash in the manifest.
        expected: ChunkHash,
        /// Hash of the bytes read.
        got: ChunkHash,
    },
    /// The artifact is marked corrupt and is not served until repaired.
    #[error(
        "artifact {id} is corrupt (bad chunks: {bad_chunks:?}); it is not served until its bad chunks are fetched again from peers"
    )]
    Corrupt {
        /// Artifact.
        id: ArtifactId,
        /// Indices of the chunks whose bytes did not match the manifest.
        bad_chunks: Vec<u32>,
    },
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
    /// Anything else (the metadata database, a record that does not decode, ...).
    #[error(transparent)]
    Store(Box<StoreError>),
}

/// Why a file could not be added ([`Store::add_file`], [`build_manifest`]).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The disk (or the user's disk quota) is full: nothing was added, the
    /// store is intact; free space and add again.
    #[error("{what} {path}: {source}")]
    DiskFull {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error (ENOSPC or EDQUOT).
        source: io::Error,
    },
    /// The artifact does not fit in the store's quota even after evicting
    /// all that can be evicted.
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
    /// Anything else (the metadata database, a record that does not decode, ...).
    #[error(transparent)]
    Store(Box<StoreError>),
}

/// Whether an I/O error means the disk (or a disk quota) is full.
fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io { what, path, source } => OpenError::Io { what, path, source },
            StoreError::Open(o) => o,
            e => OpenError::Store(Box::new(e)),
        }
    }
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io { what, path, source } => StoreError::Io { what, path, source },
            OpenError::Store(e) => *e,
            e => StoreError::Open(e),
        }
    }
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unknown(s) => ReadError::Unknown(s),
            StoreError::NotActive(id) => ReadError::NotActive(id),
            StoreError::NoChunk { id, index } => ReadError::NoChunk { id, index },
            StoreError::ChunkMismatch {
                id,
                index,
                expected,
                got,
            } => ReadError::ChunkMismatch {
                id,
                index,
                expected,
                got,
            },
            StoreError::Corrupt { id, bad_chunks } => ReadError::Corrupt { id, bad_chunks },
            StoreError::Io { what, path, source } => ReadError::Io { what, path, source },
            e => ReadError::Store(Box::new(e)),
        }
    }
}

impl From<ReadError> for StoreError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unknown(s) => StoreError::Unknown(s),
            ReadError::NotActive(id) => StoreError::NotActive(id),
            ReadError::NoChunk { id, index } => StoreError::NoChunk { id, index },
            ReadError::ChunkMismatch {
                id,
                index,
                expected,
                got,
            } => StoreError::ChunkMismatch {
                id,
                index,
                expected,
                got,
            },
            ReadError::Corrupt { id, bad_chunks } => StoreError::Corrupt { id, bad_chunks },
            ReadError::Io { what, path, source } => StoreError::Io { what, path, source },
            ReadError::Store(e) => *e,
        }
    }
}

impl From<StoreError> for AddError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io { what, path, source } if is_disk_full(&source) => {
                AddError::DiskFull { what, path, source }
            }
            StoreError::Io { what, path, source } => AddError::Io { what, path, source },
            StoreError::QuotaExceeded { need, free, quota } => {
                AddError::QuotaExceeded { need, free, quota }
            }
            StoreError::Add(a) => a,
            e => AddError::Store(Box::new(e)),
        }
    }
}

impl From<AddError> for StoreError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::DiskFull { what, path, source } | AddError::Io { what, path, source } => {
                StoreError::Io { what, path, source }
            }
            AddError::QuotaExceeded { need, free, quota } => {
                StoreError::QuotaExceeded { need, free, quota }
            }
            AddError::Store(e) => *e,
            e => StoreError::Add(e),
        }
    }
}

/// Wraps an I/O error with what was being done and the path involved.
pub(super) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
