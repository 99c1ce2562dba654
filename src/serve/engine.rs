//! The per-model engine: a bounded queue in front of one generation thread
//! that uses the prefix KV cache.

use crate::inference::{
    GenerateConfig, GenerateOutput, KvCache, KvDtype, Model, StopReason, generate_after,
};
use crate::kvcache::{KvSession, PrefixCache, Sequence};
use crate::metrics::Metrics;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a job reports, in order: `Started`, any number of `Token`, then
/// `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The prompt is in the cache; `cached_tokens` of it came from the prefix cache.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Prompt tokens taken from the prefix cache.
        cached_tokens: usize,
    },
    /// Generated text (may be empty for tokens held back).
    Token(String),
    /// Generation ended.
    Done {
        /// Why.
        stop: StopReason,
        /// Tokens generated.
        completion_tokens: usize,
        /// Text held back by the stop-sequence check and released at the end.
        tail: String,
        /// Time from the start of the job to the first token.
        ttft: Duration,
    },
    /// Generation failed.
    Failed(String),
}

/// One generation request.
#[derive(Debug)]
pub struct Job {
    /// The prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Generation parameters.
    pub cfg: GenerateConfig,
    /// Set to stop the generation.
    pub cancel: Arc<AtomicBool>,
    /// Where events go; a closed receiver cancels.
    pub events: mpsc::UnboundedSender<JobEvent>,
}

/// Counters of an engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs queued.
    pub submitted: AtomicU64,
    /// Jobs finished (any reason).
    pub finished: AtomicU64,
    /// Jobs that ended cancelled (flag or disconnected client).
    pub cancelled: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
}

/// Sets a job's cancel flag when dropped (the request went away).
#[derive(Debug)]
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A slot in the queue; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    model: String,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let left = self.pending.fetch_sub(1, Ordering::AcqRel) - 1;
        self.metrics.queue_depth(&self.model, left);
        if left == 0 {
            self.drained.notify_waiters();
        }
    }
}

struct Queued {
    job: Job,
    _permit: Permit,
}

/// A model with its generation thread and bounded queue. Cheap to share.
pub struct Engine {
    name: String,
    model: Arc<Model>,
    kv: Option<Arc<PrefixCache>>,
    metrics: Arc<Metrics>,
    capacity: usize,
    pending: Arc<AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
    tx: std::sync::mpsc::Sender<Queued>,
    stats: Arc<EngineStats>,
    avg_job_ms: Arc<AtomicU64>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the generation thread of `model`, served as `name`. At most
    /// `1 + queue_depth` requests are admitted at once (one running). Queue
    /// depth, time to first token and generation speed go to `metrics`.
    pub fn start(
        name: &str,
        model: Arc<Model>,
        kv: Option<Arc<PrefixCache>>,
        queue_depth: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Engine>, std::io::Error> {
        let (tx, rx) = std::sync::mpsc::channel::<Queued>();
        let stats = Arc::new(EngineStats::default());
        let avg_job_ms = Arc::new(AtomicU64::new(1000));
        {
            let mut worker = Worker {
                kv: kv.clone().map(|c| {
                    let session = c.session(&model);
                    (c, session)
                }),
                model: model.clone(),
                metrics: metrics.clone(),
            };
            let stats = stats.clone();
            let avg = avg_job_ms.clone();
            std::thread::Builder::new()
                .name(format!("engine-{name}"))
                .spawn(move || {
                    for q in rx {
                        let t0 = Instant::now();
                        let cancelled = worker.run(q.job);
                        let ms = t0.elapsed().as_millis() as u64;
                        let old = avg.load(Ordering::Relaxed);
                        avg.store((old * 3 + ms) / 4, Ordering::Relaxed);
                        stats.finished.fetch_add(1, Ordering::Relaxed);
                        if cancelled {
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(q._permit);
                    }
                })?;
        }
        Ok(Arc::new(Engine {
            name: name.to_owned(),
            model,
            kv,
            metrics,
            capacity: 1 + queue_depth,
            pending: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(tokio::sync::Notify::new()),
            tx,
            stats,
            avg_job_ms,
        }))
    }

    /// The served name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The prefix cache, if any.
    pub fn prefix_cache(&self) -> Option<&Arc<PrefixCache>> {
        self.kv.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests admitted and not finished (running or queued).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes a queue slot, or `None` when `1 + queue_depth` are taken.
    pub fn try_admit(&self) -> Option<Permit> {
        let ok = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < self.capacity).then_some(p + 1)
            })
            .is_ok();
        if !ok {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.queue_depth(&self.name, self.pending());
        Some(Permit {
            model: self.name.clone(),
            metrics: self.metrics.clone(),
            pending: self.pending.clone(),
            drained: self.drained.clone(),
        })
    }

    /// Seconds a refused client should wait: the expected time until a slot frees.
    pub fn retry_after_secs(&self) -> u64 {
        (self.avg_job_ms.load(Ordering::Relaxed) / 1000).clamp(1, 60)
    }

    /// Queues an admitted job.
    pub fn submit(&self, permit: Permit, job: Job) {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.send(Queued {
            job,
            _permit: permit,
        }) {
            let _ =
                e.0.job
                    .events
                    .send(JobEvent::Failed("engine stopped".into()));
        }
    }

    /// Waits until no request is running or queued.
    pub async fn drained(&self) {
        loop {
            let n = self.drained.notified();
            if self.pending() == 0 {
                return;
            }
            n.await;
        }
    }
}

/// Why a job fails once the model file shrank under its mapping (see
/// [`Model::mapping_damaged`]): its weights may now read as zeros.
pub fn damaged_model_message(model: &Model) -> String {
    format!(
        "model file changed on disk: {} shrank while it was served; this model is unusable until it is reloaded from a good copy",
        model.path().display()
    )
}

/// What the generation thread of one engine owns: its model, its session
/// in the prefix cache and where its metrics go.
struct Worker {
    model: Arc<Model>,
    kv: Option<(Arc<PrefixCache>, KvSession)>,
    metrics: Arc<Metrics>,
}

impl Worker {
    /// Runs one job; returns true if it ended cancelled.
    fn run(&mut self, job: Job) -> bool {
        let t0 = Instant::now();
        let model = self.model.clone();
        if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
            return true;
        }
        if model.mapping_damaged() {
            self.forget_hot();
            let _ = job
                .events
                .send(JobEvent::Failed(damaged_model_message(&model)));
            return false;
        }
        let _busy = self.kv.as_ref().map(|(pc, _)| pc.busy());
        let (mut cache, cached) = match &self.kv {
            Some((pc, session)) => {
                let r = pc.restore(&model, session, &job.prompt);
                (r.cache, r.tokens)
            }
            None => (model.new_cache_with(KvDtype::F16), 0),
        };
        let _ = job.events.send(JobEvent::Started {
            prompt_tokens: job.prompt.len(),
            cached_tokens: cached,
        });
        let mut ttft = None;
        let mut released = String::new();
        let res = generate_after(
            &model,
            &mut cache,
            &job.prompt[..cached],
            &job.prompt[cached..],
            &job.cfg,
            Some(&job.cancel),
            |ev| {
                // Never emit a token that may have been computed from zeros.
                if model.mapping_damaged() {
                    return ControlFlow::Break(());
                }
                if ttft.is_none() {
                    ttft = Some(t0.elapsed());
                }
                released.push_str(ev.text);
                if job
                    .events
                    .send(JobEvent::Token(ev.text.to_owned()))
                    .is_err()
                {
                    job.cancel.store(true, Ordering::Relaxed);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            },
        );
        let cancelled = job.cancel.load(Ordering::Relaxed);
        if model.mapping_damaged() {
            // Keep no KV computed from this model: it may hold zeros.
            self.forget_hot();
            tracing::error!(path = %model.path().display(), "model file changed on disk while serving; failing the request");
            let _ = job
                .events
                .send(JobEvent::Failed(damaged_model_message(&model)));
            return cancelled;
        }
        match res {
            Ok(out) => {
                let done = Finished {
                    cached,
                    released: &released,
                    ttft,
                    started: t0,
                    cancelled,
                };
                self.finish(&job, out, cache, done)
            }
            Err(e) => {
                let _ = job.events.send(JobEvent::Failed(e.to_string()));
                cancelled
            }
        }
    }

    /// Saves a generated sequence's KV, reports metrics and sends `Done`;
    /// returns true if the job ended cancelled.
    fn finish(
        &mut self,
        job: &Job,
        out: GenerateOutput,
        cache: KvCache,
        done: Finished<'_>,
    ) -> bool {
        if let Some((pc, session)) = &mut self.kv {
            let seq = Sequence {
                prompt: &job.prompt,
                generated: &out.tokens,
                reused: done.cached,
                prompt_time: out.prompt_time,
            };
            pc.save(session, seq, cache);
        }
        let tail = out
            .text
            .strip_prefix(done.released)
            .unwrap_or_default()
            .to_owned();
        if let Some(t) = done.ttft {
            let outcome = if done.cached > 0 {
                crate::metrics::CacheOutcome::Kv
            } else {
                crate::metrics::CacheOutcome::Miss
            };
            self.metrics.ttft(outcome, t.as_secs_f64());
        }
        self.metrics
            .generation(out.tokens.len() as u64, out.gen_time.as_secs_f64());
        let _ = job.events.send(JobEvent::Done {
            stop: if done.cancelled {
                StopReason::Cancelled
            } else {
                out.stop
            },
            completion_tokens: out.tokens.len(),
            tail,
            ttft: done.ttft.unwrap_or_else(|| done.started.elapsed()),
        });
        done.cancelled || matches!(out.stop, StopReason::Cancelled | StopReason::Callback)
    }

    fn forget_hot(&mut self) {
        if let Some((_, session)) = &mut self.kv {
            session.forget();
        }
    }
}

/// How a generated job went, for [`Worker::finish`].
struct Finished<'a> {
    /// Prompt tokens restored from the prefix cache.
    cached: usize,
    /// Text already sent as tokens.
    released: &'a str,
    /// Time to the first token, if one came.
    ttft: Option<Duration>,
    /// When the job started.
    started: Instant,
    /// The cancel flag after generation.
    cancelled: bool,
}
