//! Reconciling files and metadata on open, recovering files without a
//! record, checking metadata for `fsck`, and `lost+found/`.

use super::*;
use std::os::unix::fs::{FileExt, PermissionsExt};

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

impl Store {
    /// Whether the metadata at `meta` opens and every value in it decodes.
    /// A missing `meta/` is sound (a fresh store); the error says what is wrong.
    pub(super) fn check_meta(meta: &Path) -> Result<(), String> {
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
    pub(super) fn move_meta_aside(dir: &Path) -> Result<PathBuf, StoreError> {
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

    /// Brings files and metadata back in agreement after a crash or damage.
    /// Never deletes a byte it cannot account for.
    pub(super) fn reconcile(&self) -> Result<(), StoreError> {
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
    pub(super) fn to_lost_and_found(&self, path: &Path, why: String) {
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
    pub(super) fn rebuild_manifest(
        &self,
        id: &ArtifactId,
        path: &Path,
    ) -> Result<Option<Manifest>, StoreError> {
        let f = File::open(path).map_err(io_err("open", path))?;
        let len = f.metadata().map_err(io_err("stat", path))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: read-only private map of a file in the store; nothing writes it
            // while the store is being opened (the store lock is held).
            Some(unsafe { sys::map_readonly(&f) }.map_err(io_err("map", path))?)
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
    pub(super) fn recover_object(&self, id: &ArtifactId, path: &Path) -> Result<(), StoreError> {
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
    pub(super) fn recover_partial(&self, id: &ArtifactId, path: &Path) -> Result<(), StoreError> {
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
            let have = valid_chunks(&f, &m);
            f.sync_all().map_err(io_err("sync", path))?;
            let mut b = self.register_batch(id, &m, ArtifactStatus::Partial, false);
            b.insert(&self.inner.haves, id.0, have.to_bytes());
            for i in have.present() {
                let c = &m.chunks[i as usize];
                b.insert(&self.inner.chunk_index, index_key(&c.hash, id, i), []);
            }
            b.commit()?;
            self.inner
                .opts
                .metrics
                .store_added(crate::metrics::ArtifactState::Partial, m.size);
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

    pub(super) fn recover_object_registered(
        &self,
        id: &ArtifactId,
        m: &Manifest,
    ) -> Result<(), StoreError> {
        let mut b = self.register_batch(id, m, ArtifactStatus::Active, false);
        b.remove(&self.inner.haves, id.0);
        self.index_chunks(&mut b, id, m);
        b.commit()?;
        self.inner
            .opts
            .metrics
            .store_added(crate::metrics::ArtifactState::Active, m.size);
        tracing::warn!(%id, size = m.size, "an artifact file had no record: its bytes match its id, registered again as active (unpinned)");
        self.inner.recovery.lock().reregistered.push(*id);
        Ok(())
    }

    /// See [`Store::reconcile`]: the record says active, the file is in partial/.
    pub(super) fn finish_interrupted_repair(&self, id: &ArtifactId) -> Result<(), StoreError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let r = self
            .record(id)?
            .ok_or_else(|| StoreError::Unknown(id.to_hex()))?;
        let path = self.partial_path(id);
        let f = File::open(&path).map_err(io_err("open", &path))?;
        let have = valid_chunks(&f, &m);
        self.reopen_as_partial(id, &m, r, &have)
    }
}

/// The chunks of `m` whose bytes in `f` match their hash (a partial file's
/// contents, re-read when its have-map cannot be trusted).
fn valid_chunks(f: &File, m: &Manifest) -> HaveMap {
    let mut have = HaveMap::new(m.chunk_count());
    let mut buf = Vec::new();
    for (i, c) in m.chunks.iter().enumerate() {
        buf.resize(c.len as usize, 0);
        if f.read_exact_at(&mut buf, c.offset).is_ok() && ChunkHash::of(&buf) == c.hash {
            have.set(i as u32);
        }
    }
    have
}
