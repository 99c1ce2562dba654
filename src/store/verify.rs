//! Verification of whole artifacts, corrupt marks, and repair (a corrupt
//! artifact turned back into a partial download).

use super::*;
use std::os::unix::fs::{FileExt, PermissionsExt};

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

impl Store {
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
    pub(super) fn clear_present(&self, id: &ArtifactId, bad: &[u32]) -> Result<(), StoreError> {
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
    pub(super) fn mark_corrupt_quietly(&self, id: &ArtifactId, index: u32) {
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
        self.inner
            .opts
            .metrics
            .store_removed(crate::metrics::ArtifactState::Active, m.size);
        self.inner
            .opts
            .metrics
            .store_added(crate::metrics::ArtifactState::Partial, m.size);
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
    pub(super) fn reopen_as_partial(
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
}
