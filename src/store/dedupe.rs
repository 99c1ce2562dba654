//! The dedupe index: chunks a new artifact shares with local artifacts are
//! copied locally instead of fetched.

use super::*;

impl Store {
    /// Copies chunks of `id` that some other local artifact already holds.
    pub(super) fn dedupe_into(&self, id: &ArtifactId) -> Result<u32, StoreError> {
        let manifest = {
            let parts = self.inner.partials.lock();
            let Some(p) = parts.get(id) else { return Ok(0) };
            p.manifest.clone()
        };
        let have = self
            .have_map(id)?
            .unwrap_or_else(|| HaveMap::new(manifest.chunk_count()));
        let mut copied = 0;
        for i in have.missing() {
            let c = &manifest.chunks[i as usize];
            let started = std::time::Instant::now();
            if let Some(data) = self.find_local_chunk(&c.hash, id)? {
                self.put_chunk(id, i, &data)?;
                copied += 1;
                let secs = started.elapsed().as_secs_f64();
                use crate::metrics::{Outcome, Source};
                self.inner
                    .opts
                    .metrics
                    .chunk_fetch(Source::Local, Outcome::Ok, c.len.into(), secs);
            }
        }
        if copied > 0 {
            self.flush(id)?;
            tracing::info!(%id, chunks = copied, "copied chunks from local artifacts");
        }
        Ok(copied)
    }

    /// Finds a chunk with this hash in any local artifact other than `except`.
    pub fn find_local_chunk(
        &self,
        hash: &ChunkHash,
        except: &ArtifactId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        for kv in self.inner.chunk_index.prefix(hash.0) {
            let k = kv.key()?;
            let (Some(other), Some(idx)) = (
                ArtifactId::from_slice(&k[32..64]),
                k.get(64..68)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes),
            ) else {
                continue;
            };
            if &other == except {
                continue;
            }
            match self.read_chunk(&other, idx) {
                Ok(d) if ChunkHash::of(&d) == *hash => return Ok(Some(d)),
                Ok(_) | Err(_) => continue,
            }
        }
        Ok(None)
    }
}
