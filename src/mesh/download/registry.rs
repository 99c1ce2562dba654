//! The registry of running downloads ([`Downloads`]): one per artifact, a
//! second pull joins the first, finished ones are remembered for a while.

use super::driver::{FindDeadline, download_until};
use super::{Phase, Progress, initial_progress};
use crate::mesh::client::Client;
use crate::mesh::{MeshError, blocking};
use crate::metrics::Metrics;
use crate::store::ArtifactId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Finished (done or failed) downloads kept for `/admin/pull/{id}` and the
/// status; beyond this many the oldest are forgotten.
pub const KEEP_FINISHED: usize = 32;

/// Running downloads, one per artifact: a second pull of the same artifact
/// joins the first. At most [`MeshConfig::max_downloads`](crate::mesh::MeshConfig::max_downloads) run at once;
/// at most [`KEEP_FINISHED`] finished ones are remembered.
#[derive(Clone)]
pub struct Downloads {
    jobs: Arc<Mutex<Jobs>>,
    /// Where the downloads count their chunk fetches.
    metrics: Arc<Metrics>,
}

impl Default for Downloads {
    /// No downloads, counting into a fresh detached [`Metrics`].
    fn default() -> Self {
        Self::new(Arc::new(Metrics::new()))
    }
}

#[derive(Default)]
struct Jobs {
    map: HashMap<ArtifactId, Job>,
    /// Start order of the next job.
    next_seq: u64,
}

struct Job {
    progress: watch::Receiver<Progress>,
    task: tokio::task::AbortHandle,
    deadline: FindDeadline,
    seq: u64,
}

impl Jobs {
    /// Forgets the oldest finished downloads beyond [`KEEP_FINISHED`].
    fn prune(&mut self) {
        let mut finished: Vec<(u64, ArtifactId)> = self
            .map
            .iter()
            .filter(|(_, j)| j.is_final())
            .map(|(k, j)| (j.seq, *k))
            .collect();
        if finished.len() > KEEP_FINISHED {
            finished.sort_unstable();
            let drop_n = finished.len() - KEEP_FINISHED;
            for (_, k) in finished.into_iter().take(drop_n) {
                self.map.remove(&k);
            }
        }
    }
}

impl Job {
    fn is_final(&self) -> bool {
        self.progress.borrow().phase.is_final() || self.task.is_finished()
    }
}

impl Downloads {
    /// No downloads yet; the downloads started count their chunk fetches in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            jobs: Arc::default(),
            metrics,
        }
    }

    /// Starts fetching `id` in the background, or joins the download already
    /// running (or done). `find_timeout`: how long to wait for a peer holding
    /// the manifest (default
    /// [`DownloadOptions::find_timeout`](super::DownloadOptions::find_timeout),
    /// at most [`MAX_FIND_TIMEOUT`](super::MAX_FIND_TIMEOUT)); joining a
    /// download that is still looking extends its wait to this. Fails with
    /// [`MeshError::TooManyDownloads`] when `max_downloads` are running.
    pub async fn start(
        &self,
        client: &Client,
        id: ArtifactId,
        origin: Option<String>,
        find_timeout: Option<Duration>,
    ) -> Result<watch::Receiver<Progress>, MeshError> {
        // Read before taking the registry: a resumed download's first report
        // carries the bytes already present.
        let st = client.store().clone();
        let first = blocking(move || initial_progress(&st, &id)).await?;
        let opts = client.config().download.clone();
        let limit = client.config().max_downloads.max(1);
        let wait = find_timeout.unwrap_or(opts.find_timeout);
        let mut jobs = self.jobs.lock();
        if let Some(j) = jobs.map.get(&id)
            && !matches!(j.progress.borrow().phase, Phase::Failed)
        {
            j.deadline.extend(wait);
            return Ok(j.progress.clone());
        }
        let running = jobs.map.values().filter(|j| !j.is_final()).count();
        if running >= limit {
            return Err(MeshError::TooManyDownloads { limit });
        }
        let (tx, rx) = watch::channel(first);
        let deadline = FindDeadline::after(wait);
        let client = client.clone();
        let span = tracing::info_span!("pull", node = %client.peer_id(), id = %id.short());
        let d2 = deadline.clone();
        let metrics = self.metrics.clone();
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) =
                    download_until(&client, id, origin, &opts, Some(&tx), &d2, &metrics).await
                {
                    tracing::warn!(%id, error = %e, "download failed");
                    tx.send_modify(|p| {
                        p.phase = Phase::Failed;
                        p.error.get_or_insert_with(|| e.to_string());
                    });
                }
            },
            span,
        ));
        let seq = jobs.next_seq;
        jobs.next_seq += 1;
        jobs.map.insert(
            id,
            Job {
                progress: rx.clone(),
                task: task.abort_handle(),
                deadline,
                seq,
            },
        );
        jobs.prune();
        Ok(rx)
    }

    /// Stops the download of `id` (what was verified stays; a later pull resumes).
    pub fn cancel(&self, id: &ArtifactId) -> bool {
        match self.jobs.lock().map.remove(id) {
            Some(j) => {
                j.task.abort();
                true
            }
            None => false,
        }
    }

    /// Stops every download.
    pub fn cancel_all(&self) {
        for (_, j) in self.jobs.lock().map.drain() {
            j.task.abort();
        }
    }

    /// A receiver of the progress of the download of `id`, if one was started.
    pub fn watch(&self, id: &ArtifactId) -> Option<watch::Receiver<Progress>> {
        self.jobs.lock().map.get(id).map(|j| j.progress.clone())
    }

    /// The current progress of the download of `id`, if one was started.
    pub fn get(&self, id: &ArtifactId) -> Option<Progress> {
        self.jobs
            .lock()
            .map
            .get(id)
            .map(|j| j.progress.borrow().clone())
    }

    /// Progress of every download remembered (running, and the latest finished), oldest first.
    pub fn all(&self) -> Vec<Progress> {
        let mut jobs = self.jobs.lock();
        // Downloads that ended since the last start count against the bound too.
        jobs.prune();
        let mut v: Vec<(u64, Progress)> = jobs
            .map
            .values()
            .map(|j| (j.seq, j.progress.borrow().clone()))
            .collect();
        v.sort_unstable_by_key(|(seq, _)| *seq);
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Downloads running now.
    pub fn running(&self) -> usize {
        self.jobs
            .lock()
            .map
            .values()
            .filter(|j| !j.is_final())
            .count()
    }
}
