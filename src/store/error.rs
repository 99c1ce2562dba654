//! The store's errors: [`StoreError`], shared by the operations whose
//! callers all act alike, and `io_err`, the adapter every file operation uses.

use super::*;
use crate::gguf::GgufError;

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
