//! Partial downloads: registering a manifest, writing verified chunks in
//! place, making them durable, and activating the complete file.

use super::*;
use std::os::unix::fs::{FileExt, PermissionsExt};

/// Bytes of written-but-unsynced chunks after which a partial is flushed.
pub(super) const AUTO_FLUSH_BYTES: u64 = 16 << 20;
/// Downloads at least this large leave the page cache once durable.
pub(super) const DROP_PAGES_FROM: u64 = 64 << 20;

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
pub(super) fn drop_clean_pages(file: &File, ranges: &[(u64, u64)]) {
    for &(offset, len) in ranges {
        if let Err(errno) = sys::advise_dont_need(file, offset, len) {
            tracing::debug!(errno, "posix_fadvise(DONTNEED) failed");
            return;
        }
    }
}

/// The byte ranges of `chunks` (indices into `manifest`), adjacent chunks
/// merged, in file order.
pub(super) fn chunk_ranges(manifest: &Manifest, chunks: &[u32]) -> Vec<(u64, u64)> {
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

/// Per-partial in-memory state.
pub(super) struct Partial {
    pub(super) file: Arc<File>,
    /// Held around each chunk write. The kernel takes the inode's lock for
    /// every buffered write anyway; taking ours first makes a second writer
    /// sleep instead of spinning on that lock while the first copies its
    /// chunk (3 % of a receiver's CPU on two cores in `perf`).
    pub(super) write_lock: Arc<Mutex<()>>,
    /// The whole-file hash, built from the chunks as they are written
    /// ([`treehash`]); `None` for small files and for downloads resumed
    /// after a restart, which hash the file at activation instead.
    pub(super) tree: Option<Arc<Mutex<treehash::TreeHasher>>>,
    pub(super) manifest: Arc<Manifest>,
    /// Persisted presence.
    pub(super) have: HaveMap,
    /// Written and verified, not yet synced.
    pub(super) pending: Vec<u32>,
    pub(super) pending_bytes: u64,
}

impl Store {
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
        self.inner
            .opts
            .metrics
            .store_added(crate::metrics::ArtifactState::Partial, manifest.size);
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

    pub(super) fn load_partial(&self, id: &ArtifactId) -> Result<(), StoreError> {
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
                    let map = unsafe { sys::map_readonly(&file) }.map_err(io_err("map", &path))?;
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
        self.inner.opts.metrics.store_activated(manifest.size);
        tracing::info!(%id, size = manifest.size, "activated");
        Ok(())
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
