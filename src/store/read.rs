//! Reads served from the store, re-verified on the way out, and the
//! verification stamps that spare a recently hashed chunk a second hash.

use super::*;
use std::os::unix::fs::FileExt;

impl Store {
    /// Reads a present chunk, re-verifying its hash (a corrupted disk is never served).
    pub fn read_chunk(&self, id: &ArtifactId, index: u32) -> Result<Vec<u8>, ReadError> {
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
    ) -> Result<usize, ReadError> {
        let status = self
            .status(id)?
            .ok_or_else(|| ReadError::Unknown(id.to_hex()))?;
        let (path, manifest) = match status {
            ArtifactStatus::Active => (
                self.object_path(id),
                self.manifest_shared(id)?
                    .ok_or_else(|| ReadError::Unknown(id.to_hex()))?,
            ),
            ArtifactStatus::Partial => {
                self.load_partial(id)?;
                let parts = self.inner.partials.lock();
                let p = parts
                    .get(id)
                    .ok_or_else(|| ReadError::Unknown(id.to_hex()))?;
                if !p.have.get(index) {
                    return Err(ReadError::NoChunk { id: *id, index });
                }
                (self.partial_path(id), p.manifest.clone())
            }
        };
        let c = manifest
            .chunks
            .get(index as usize)
            .ok_or(ReadError::NoChunk { id: *id, index })?;
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
            return Err(io_err("read", &path)(e).into());
        }
        if self.recently_verified(id, index) {
            return Ok(n);
        }
        let got = ChunkHash::of(data);
        if got != c.hash {
            tracing::error!(%id, index, "stored chunk is corrupt");
            self.mark_corrupt_quietly(id, index);
            return Err(ReadError::ChunkMismatch {
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
    pub(super) fn stamp_verified(&self, id: &ArtifactId, index: u32, chunks: usize) {
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
    pub(super) fn recently_verified(&self, id: &ArtifactId, index: u32) -> bool {
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
    pub(super) fn unstamp(&self, id: &ArtifactId, index: u32) {
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
}
