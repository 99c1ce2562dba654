//! Metadata: the fjall keyspaces and what is in them (artifact records,
//! manifests, have-maps, the chunk index), reading and writing records,
//! registering and forgetting artifacts, listing them.

use super::*;

/// An artifact's record (the `records` keyspace).
///
/// Encoding: the postcard encoding of [`RecordV1`] (format 1, the only
/// encoding before corrupt marks existed), followed, only when there is
/// something to add, by an extension: `u8` extension version (2) and the
/// postcard encoding of [`RecordExt2`]. A record without the tail decodes
/// with no mark, so older stores read unchanged; an unknown extension
/// version is refused (never silently dropped).
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) status: ArtifactStatus,
    pub(super) pinned: bool,
    pub(super) created: u64,
    pub(super) last_used: u64,
    /// `Some` when the artifact is marked corrupt: the bad chunk indices
    /// (sorted, unique; empty: the file as a whole is wrong).
    pub(super) corrupt: Option<Vec<u32>>,
}

/// Record format 1 (and the head of every later format).
#[derive(Serialize, Deserialize)]
pub(super) struct RecordV1 {
    status: ArtifactStatus,
    pinned: bool,
    created: u64,
    last_used: u64,
}

/// Version of the record extension written after [`RecordV1`].
pub(super) const RECORD_EXT_VERSION: u8 = 2;

/// Record extension, version 2.
#[derive(Serialize, Deserialize)]
pub(super) struct RecordExt2 {
    /// Bad chunk indices of an artifact marked corrupt.
    corrupt: Option<Vec<u32>>,
}

impl Record {
    pub(super) fn encode(&self) -> Vec<u8> {
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

    pub(super) fn decode(b: &[u8]) -> Result<Record, StoreError> {
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Chunk-index key: chunk hash, artifact id, chunk index (big-endian).
pub(super) fn index_key(hash: &ChunkHash, id: &ArtifactId, i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(68);
    k.extend_from_slice(&hash.0);
    k.extend_from_slice(&id.0);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// Why [`open_db`] failed.
pub(super) enum DbOpen {
    /// Another process has it open.
    Locked,
    /// It cannot be opened: what is wrong.
    Damaged(String),
}

/// Opens the fjall database in `meta`. fjall asserts some things about its
/// directory instead of returning errors (a journal that is not a regular
/// file panics): those are checked first, and a panic inside fjall all the
/// same is caught and reported as damage, never a crash.
pub(super) fn open_db(meta: &Path) -> Result<Database, DbOpen> {
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

impl Store {
    pub(super) fn record(&self, id: &ArtifactId) -> Result<Option<Record>, StoreError> {
        self.inner
            .records
            .get(id.0)?
            .map(|v| Record::decode(&v))
            .transpose()
    }

    pub(super) fn put_record(&self, id: &ArtifactId, r: &Record) -> Result<(), StoreError> {
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

    pub(super) fn commit_activation(&self, id: &ArtifactId) -> Result<(), StoreError> {
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
    pub(super) fn register_batch(
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
    pub(super) fn index_chunks(
        &self,
        b: &mut fjall::OwnedWriteBatch,
        id: &ArtifactId,
        manifest: &Manifest,
    ) {
        for (i, c) in manifest.chunks.iter().enumerate() {
            b.insert(
                &self.inner.chunk_index,
                index_key(&c.hash, id, i as u32),
                [],
            );
        }
    }

    pub(super) fn forget(&self, id: &ArtifactId) -> Result<(), StoreError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
