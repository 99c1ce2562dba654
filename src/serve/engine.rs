//! The per-model engine: a bounded queue in front of one generation thread
//! that uses the prefix KV cache.

use crate::inference::{GenerateConfig, KvCache, KvDtype, Model, StopReason, generate_after};
use crate::kvcache::{KeyContext, PrefixCache};
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
    pending: Arc<AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let left = self.pending.fetch_sub(1, Ordering::AcqRel) - 1;
        crate::metrics::global().queue_depth(&self.model, left);
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
    kv: Option<(Arc<PrefixCache>, KeyContext)>,
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
    /// `1 + queue_depth` requests are admitted at once (one running).
    pub fn start(
        name: &str,
        model: Arc<Model>,
        kv: Option<Arc<PrefixCache>>,
        queue_depth: usize,
    ) -> Result<Arc<Engine>, std::io::Error> {
        let kv = kv.map(|c| {
            let ctx = c.context(&model);
            (c, ctx)
        });
        let (tx, rx) = std::sync::mpsc::channel::<Queued>();
        let stats = Arc::new(EngineStats::default());
        let avg_job_ms = Arc::new(AtomicU64::new(1000));
        {
            let model = model.clone();
            let kv = kv.clone();
            let stats = stats.clone();
            let avg = avg_job_ms.clone();
            std::thread::Builder::new()
                .name(format!("engine-{name}"))
                .spawn(move || {
                    let mut hot: Option<HotSequence> = None;
                    let mut rate = PromptRate::default();
                    for q in rx {
                        let t0 = Instant::now();
                        let cancelled = run_job(&model, kv.as_ref(), &mut hot, &mut rate, q.job);
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
        self.kv.as_ref().map(|(c, _)| c)
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
        crate::metrics::global().queue_depth(&self.name, self.pending());
        Some(Permit {
            model: self.name.clone(),
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

/// The engine thread's last sequence: its tokens and its full KV cache
/// (values rounded through the prefix cache's dtype, as stored blocks are). A follow-up sharing a prefix with it forks it at the exact
/// common length (token-granular, zero-copy), which block keys cannot do
/// for a partial last block.
struct HotSequence {
    tokens: Vec<u32>,
    cache: KvCache,
}

/// The engine's measured prompt throughput: time per prompt token
/// (moving average), for deciding whether fetching KV beats computing it.
#[derive(Debug, Clone, Copy)]
struct PromptRate(Duration);

impl Default for PromptRate {
    /// Until measured: 5 ms per token (a small model on a few cores).
    fn default() -> Self {
        PromptRate(Duration::from_millis(5))
    }
}

impl PromptRate {
    fn observe(&mut self, tokens: usize, took: Duration) {
        if tokens >= 16 {
            let t = took / tokens as u32;
            self.0 = (self.0 + t) / 2;
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

/// Runs one job; returns true if it ended cancelled.
fn run_job(
    model: &Model,
    kv: Option<&(Arc<PrefixCache>, KeyContext)>,
    hot: &mut Option<HotSequence>,
    rate: &mut PromptRate,
    job: Job,
) -> bool {
    let t0 = Instant::now();
    if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
        return true;
    }
    if model.mapping_damaged() {
        *hot = None;
        let _ = job
            .events
            .send(JobEvent::Failed(damaged_model_message(model)));
        return false;
    }
    let _busy = kv.map(|(pc, _)| pc.busy());
    let model_id = model.id();
    // Live values in the blocks' format: cached and cold runs are bit-identical.
    let dtype = kv.map_or(KvDtype::F16, |(_, ctx)| ctx.dtype);
    let mut cache = model.new_cache_with(dtype);
    let mut cached = 0usize;
    let mut keys = Vec::new();
    if let Some((pc, ctx)) = kv {
        keys = ctx.keys(&job.prompt);
        // Leave at least one prompt token to compute.
        let last = job.prompt.len().saturating_sub(1);
        let common = hot.as_ref().map_or(0, |h| {
            h.tokens
                .iter()
                .take(h.cache.len())
                .zip(&job.prompt[..last])
                .take_while(|(a, b)| a == b)
                .count()
        });
        if common >= ctx.block_tokens.max(1)
            && let Some(h) = hot.as_ref()
        {
            cache = h.cache.fork(common);
            cached = common;
            tracing::debug!(tokens = common, "prefix from the hot sequence");
        }
        let usable = last / ctx.block_tokens;
        let usable = usable.min(keys.len());
        if cached < usable * ctx.block_tokens {
            let mut c = model.new_cache_with(dtype);
            let hit = pc.load_prefix(&keys[..usable], &model_id, &mut c);
            if hit.blocks * ctx.block_tokens > cached {
                cache = c;
                cached = hit.blocks * ctx.block_tokens;
            }
            tracing::debug!(
                blocks = hit.blocks,
                from_ram = hit.from_ram,
                from_disk = hit.from_disk,
                "prefix cache"
            );
        }
        if let Some(mesh) = pc.remote()
            && cached.is_multiple_of(ctx.block_tokens)
            && cached < usable * ctx.block_tokens
        {
            let from = cached / ctx.block_tokens;
            let cost = crate::kvcache::remote::FetchCost {
                block_bytes: model
                    .kv_layout()
                    .export_len(ctx.block_tokens, pc.config().dtype)
                    as u64,
                compute_per_block: rate.0 * ctx.block_tokens as u32,
            };
            let run = mesh.fetch_run(&keys[from..usable], cost);
            if !run.is_empty() {
                let (c, n) = take_from_mesh(model, pc, ctx, mesh, &cache, &job.prompt, from, &run);
                cache = c;
                cached += n * ctx.block_tokens;
            }
        }
        // The partial block after the last full one, token-granular.
        let b = ctx.block_tokens;
        if cached.is_multiple_of(b) && cached < last && cached / b <= keys.len() {
            let parent = (cached / b).checked_sub(1).map(|i| &keys[i]);
            let key = ctx.tail_key(parent);
            let n = pc.load_tail(&key, &job.prompt[cached..last], &model_id, &mut cache);
            if n > 0 {
                tracing::debug!(tokens = n, "prefix tail record");
            }
            cached += n;
        }
    }
    let _ = job.events.send(JobEvent::Started {
        prompt_tokens: job.prompt.len(),
        cached_tokens: cached,
    });
    let mut ttft = None;
    let mut released = String::new();
    let res = generate_after(
        model,
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
        *hot = None;
        tracing::error!(path = %model.path().display(), "model file changed on disk while serving; failing the request");
        let _ = job
            .events
            .send(JobEvent::Failed(damaged_model_message(model)));
        return cancelled;
    }
    match res {
        Ok(out) => {
            rate.observe(job.prompt.len() - cached, out.prompt_time);
            if let Some((pc, ctx)) = kv {
                // Store the blocks of everything the cache now holds.
                let mut all = job.prompt.clone();
                all.extend_from_slice(&out.tokens);
                if all.len() > job.prompt.len() {
                    keys = ctx.keys(&all[..cache.len().min(all.len())]);
                }
                pc.store_blocks(&cache, &keys, 0, &model_id);
                all.truncate(cache.len());
                store_tails(pc, ctx, &cache, &all, &keys, cached, &model_id);
                *hot = Some(HotSequence { tokens: all, cache });
            }
            let tail = out
                .text
                .strip_prefix(released.as_str())
                .unwrap_or_default()
                .to_owned();
            let m = crate::metrics::global();
            if let Some(t) = ttft {
                let outcome = if cached > 0 {
                    crate::metrics::CacheOutcome::Kv
                } else {
                    crate::metrics::CacheOutcome::Miss
                };
                m.ttft(outcome, t.as_secs_f64());
            }
            m.generation(out.tokens.len() as u64, out.gen_time.as_secs_f64());
            let _ = job.events.send(JobEvent::Done {
                stop: if cancelled {
                    StopReason::Cancelled
                } else {
                    out.stop
                },
                completion_tokens: out.tokens.len(),
                tail,
                ttft: ttft.unwrap_or_else(|| t0.elapsed()),
            });
            cancelled || matches!(out.stop, StopReason::Cancelled | StopReason::Callback)
        }
        Err(e) => {
            let _ = job.events.send(JobEvent::Failed(e.to_string()));
            cancelled
        }
    }
}

/// Stores the tail records of a finished sequence (`all`, the tokens
/// `cache` holds, with the keys of its full blocks; positions before
/// `reused` came from the cache): after each full block from the one the
/// request started computing in, a reference to the next full block, and
/// after the last one the partial block's KV inline.
#[allow(clippy::too_many_arguments)]
fn store_tails(
    pc: &PrefixCache,
    ctx: &KeyContext,
    cache: &KvCache,
    all: &[u32],
    keys: &[crate::kvcache::BlockKey],
    reused: usize,
    model_id: &[u8; 32],
) {
    let b = ctx.block_tokens;
    let n = all.len().min(cache.len());
    for f in reused / b..=n / b {
        let start = f * b;
        if start >= n || f > keys.len() {
            break;
        }
        let key = ctx.tail_key(f.checked_sub(1).map(|j| &keys[j]));
        let end = n.min(start + b - 1);
        // A full block's first b - 1 tokens by reference, else the tail inline.
        let block = keys.get(f).copied();
        pc.store_tail(key, &all[start..end], block, cache, start, model_id);
    }
}

/// Imports a run fetched from a neighbour on top of `cache` (which holds
/// blocks `..from`), spot-checking one block by recomputation when the
/// trust policy asks for it. Returns the new cache and the blocks taken
/// (0 if the peer was caught lying: it is banned and its blocks dropped).
#[allow(clippy::too_many_arguments)]
fn take_from_mesh(
    model: &Model,
    pc: &PrefixCache,
    ctx: &KeyContext,
    mesh: &crate::kvcache::remote::RemoteTier,
    cache: &KvCache,
    prompt: &[u32],
    from: usize,
    run: &[crate::kvcache::remote::Fetched],
) -> (KvCache, usize) {
    let b = ctx.block_tokens;
    let model_id = model.id();
    let mut trial = cache.fork(from * b);
    let mut n = 0;
    for f in run {
        if trial.import_append(&f.blob, &model_id).is_err() {
            break;
        }
        n += 1;
    }
    if n == 0 {
        return (cache.fork(usize::MAX), 0);
    }
    let peer = run[0].peer;
    let fresh = !mesh.is_checked(&peer);
    if fresh || mesh.needs_check(&peer) {
        // The first fetched block of a new peer, else a random one of the run.
        let j = if fresh || n == 1 {
            0
        } else {
            let mut r = [0u8; 8];
            let _ = getrandom::fill(&mut r);
            (u64::from_le_bytes(r) % n as u64) as usize
        };
        let start = (from + j) * b;
        let mut re = trial.fork(start);
        let ok = match model.forward(&mut re, &prompt[start..start + b]) {
            Ok(_) => {
                let err = crate::kvcache::remote::kv_rel_error(&trial, &re, start..start + b);
                tracing::debug!(%peer, err, "KV spot check");
                err <= crate::kvcache::remote::SPOT_CHECK_TOL
            }
            Err(_) => false,
        };
        if !ok {
            pc.stats().mesh_caught.fetch_add(1, Ordering::Relaxed);
            mesh.caught(peer, pc);
            return (cache.fork(usize::MAX), 0);
        }
        pc.stats().mesh_checked.fetch_add(1, Ordering::Relaxed);
        mesh.passed(peer);
    }
    for f in &run[..n] {
        pc.put_foreign(f.key, f.blob.clone());
    }
    mesh.took(peer, run[..n].iter().map(|f| f.key));
    pc.stats().mesh_hits.fetch_add(n as u64, Ordering::Relaxed);
    (trial, n)
}
