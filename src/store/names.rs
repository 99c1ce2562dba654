//! Names (signed releases), the trust store, and this node's publisher
//! key, with their on-disk copies (`releases/`, `keys/`) from which lost
//! metadata is restored.

use super::*;
use ed25519_dalek::SigningKey;
use std::io::Write;

/// Directory of the signed release files (one per name), from which names
/// are restored when the metadata is lost.
pub(super) const RELEASES_DIR: &str = "releases";
/// First line of `keys/trusted`.
pub(super) const TRUST_FILE_HEADER: &str = "shoal-trust 1";
/// A trusted publisher key and its label.
pub(super) type TrustedKey = ([u8; 32], String);

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

impl Store {
    // ---- names, releases, trust ----

    pub(super) fn name_map(&self) -> Result<HashMap<ArtifactId, Vec<String>>, StoreError> {
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
    pub(super) fn apply_release_inner(
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
        if write_file && let Some(hook) = &self.inner.opts.on_release {
            hook(&r.name, &r.id);
        }
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

    pub(super) fn trust_file(&self) -> PathBuf {
        self.inner.dir.join("keys").join("trusted")
    }

    pub(super) fn release_file(&self, name: &str) -> PathBuf {
        // Names are [a-z0-9._-]+ with one optional `:tag` (checked by
        // `verify`): safe as a file name once suffixed.
        self.inner
            .dir
            .join(RELEASES_DIR)
            .join(format!("{name}.release"))
    }

    /// `keys/trusted`: the header line, then one `<64 hex> <label>` per line.
    pub(super) fn write_trust_file(&self, keys: &[([u8; 32], String)]) -> Result<(), StoreError> {
        let mut text = format!("{TRUST_FILE_HEADER}\n");
        for (k, label) in keys {
            // A label is one line.
            let label: String = label.chars().filter(|c| !c.is_control()).collect();
            text.push_str(&format!("{} {label}\n", hex::encode(k)));
        }
        write_atomically(&self.trust_file(), text.as_bytes(), 0o644)
    }

    /// Reads `keys/trusted` (`None` if absent).
    pub(super) fn read_trust_file(&self) -> Result<Option<Vec<TrustedKey>>, StoreError> {
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
    pub(super) fn write_release_file(
        &self,
        name: &str,
        s: &SignedRelease,
    ) -> Result<(), StoreError> {
        let d = self.inner.dir.join(RELEASES_DIR);
        fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        write_atomically(&self.release_file(name), &s.encode(), 0o644)
    }

    /// Brings back trusted keys from `keys/trusted` that the metadata lacks
    /// (and this node's own key when neither knows any). Writes the file
    /// from the metadata when there is none yet (a store made before it).
    pub(super) fn restore_trust(&self) -> Result<(), StoreError> {
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
    pub(super) fn restore_releases(&self) -> Result<(), StoreError> {
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

    pub(super) fn key_path(&self) -> PathBuf {
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

/// Writes `data` to `path` atomically: a sibling `.tmp` file (mode
/// `mode`), synced, renamed over `path`, directory synced. On any failure
/// the temporary file is removed and `path` is left as it was.
pub(super) fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
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
