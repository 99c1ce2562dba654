//! Adding local files: building a manifest and copying (or linking,
//! reflinking) a file into `objects/`.

use super::*;
use crate::gguf::Gguf;
use std::os::unix::fs::PermissionsExt;

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

/// Computes the manifest of a file held in memory.
///
/// GGUF files (by magic) are parsed and cut along tensors; a malformed or
/// truncated GGUF is an error. Everything else is cut by content.
pub fn build_manifest(
    path: &Path,
    bytes: &[u8],
    kind: Option<ArtifactKind>,
) -> Result<Manifest, AddError> {
    let is_gguf_magic = bytes.starts_with(crate::gguf::MAGIC);
    let named_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let kind = match kind {
        Some(k) => k,
        None if is_gguf_magic => ArtifactKind::Gguf,
        None if named_gguf => return Err(AddError::NotGguf(path.to_owned())),
        None if path.file_name().is_some_and(|n| n == "tokenizer.json") => ArtifactKind::Tokenizer,
        None => ArtifactKind::Other,
    };
    let size = bytes.len() as u64;
    let (spans, gguf) = if kind == ArtifactKind::Gguf {
        if !is_gguf_magic {
            return Err(AddError::NotGguf(path.to_owned()));
        }
        let g = Gguf::parse(bytes).map_err(|source| AddError::Gguf {
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
    m.validate().map_err(StoreError::from)?;
    Ok(m)
}

impl Store {
    /// Adds a local file. Returns its id; adding the same content again is a no-op
    /// (apart from pinning).
    pub fn add_file(&self, path: &Path, opts: &AddOptions) -> Result<ArtifactId, AddError> {
        let src = File::open(path).map_err(io_err("open", path))?;
        let meta = src.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() {
            return Err(AddError::Io {
                what: "add",
                path: path.to_owned(),
                source: io::Error::other("not a regular file"),
            });
        }
        let len = meta.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and private to this call; a concurrent
            // writer to the source could change bytes under us, which the hashes
            // computed here and re-checked by `verify` would expose.
            Some(unsafe { sys::map_readonly(&src) }.map_err(io_err("map", path))?)
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
                } else if opts.reflink && sys::try_reflink(&src, &dst) {
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
            self.inner
                .opts
                .metrics
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
        b.commit().map_err(StoreError::from)?;
        self.inner
            .opts
            .metrics
            .store_added(crate::metrics::ArtifactState::Active, manifest.size);
        tracing::info!(%id, size = manifest.size, chunks = manifest.chunks.len(), "added");
        Ok(id)
    }
}
