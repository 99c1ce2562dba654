//! Leases, eviction to the quota, garbage collection of stale partials,
//! pinning and removal.

use super::*;

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Artifacts evicted to meet the quota.
    pub evicted: Vec<ArtifactId>,
    /// Stale partial artifacts removed.
    pub partials_removed: Vec<ArtifactId>,
    /// Bytes freed.
    pub bytes_freed: u64,
}

impl Store {
    /// Path of an active artifact's file (for memory-mapping). Marks it used.
    /// A corrupt artifact is refused with [`StoreError::Corrupt`].
    pub fn artifact_path(&self, id: &ArtifactId) -> Result<PathBuf, ReadError> {
        let _g = self.inner.meta_lock.lock();
        match self.record(id)? {
            None => Err(ReadError::Unknown(id.to_hex())),
            Some(r) if r.status != ArtifactStatus::Active => Err(ReadError::NotActive(*id)),
            Some(Record {
                corrupt: Some(bad), ..
            }) => Err(ReadError::Corrupt {
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
    /// A corrupt artifact is refused with [`ReadError::Corrupt`].
    pub fn lease(&self, id: &ArtifactId) -> Result<Lease, ReadError> {
        let path = self.artifact_path(id)?;
        let file = File::open(&path).map_err(io_err("open", &path))?;
        sys::lock_shared(&file).map_err(io_err("lock", &path))?;
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
        self.inner.opts.metrics.store_removed(state, m.size);
        Ok(m.size)
    }

    // ---- eviction ----

    /// Evicts least-recently-used, unpinned, unleased artifacts until `need`
    /// more bytes fit in the quota. `keep` is never evicted.
    pub(super) fn make_room(&self, need: u64, keep: Option<&ArtifactId>) -> Result<(), StoreError> {
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
            self.inner.opts.metrics.store_evicted(a.size);
            used = used.saturating_sub(self.remove(&a.id)?);
        }
        Ok(())
    }

    /// Whether any process holds a [`Lease`] on the artifact.
    pub(super) fn in_use(&self, id: &ArtifactId) -> bool {
        let p = self.object_path(id);
        let Ok(f) = File::open(&p) else { return false };
        // Released when `f` is dropped.
        sys::lock_exclusive_now(&f).is_err()
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
    pub fn map(&self) -> Result<memmap2::Mmap, ReadError> {
        // SAFETY: objects are read-only and never modified in place by the store.
        unsafe { sys::map_readonly(&self.file) }
            .map_err(io_err("map", &self.path))
            .map_err(ReadError::from)
    }
}
