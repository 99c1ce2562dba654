//! The per-model engine: a bounded queue in front of one generation thread
//! that runs every admitted sequence together (continuous batching) within
//! a KV memory budget, using the prefix KV cache.

use crate::inference::{BatchItem, Decoder, GenerateConfig, KvCache, KvDtype, Model, StopReason};
use crate::kvcache::{KvSession, PrefixCache, Sequence};
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

/// A snapshot of an engine's load ([`Engine::load`]), what a node
/// advertises on its serving card and routes requests by.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// Sequences decoded together at most (`inference.parallel`).
    pub parallel: u32,
    /// Requests that may wait beyond those (`inference.queue_depth`).
    pub queue_depth: u32,
    /// Sequences in the running batch now.
    pub running: u32,
    /// Requests admitted but not running yet (queued, or put back to wait
    /// by the KV budget): `running + waiting` is the number of admitted
    /// requests ([`Engine::pending`]).
    pub waiting: u32,
    /// Prompt tokens computed per second of the steps that computed prompt
    /// tokens (an exponentially weighted moving average over such steps;
    /// 0.0 until measured). Prompt tokens restored from the prefix cache
    /// are not counted.
    pub prompt_tps: f32,
    /// Tokens per second one running sequence gets: the inverse of the
    /// time of a step that generated tokens (one forward pass over the
    /// batch plus sampling), as an exponentially weighted moving average
    /// over such steps; 0.0 until measured. With `n` sequences decoding
    /// together the engine produces about `n * decode_tps` tokens per second.
    pub decode_tps: f32,
}

/// What the generation thread publishes for [`Engine::load`].
#[derive(Debug, Default)]
struct LoadGauges {
    running: AtomicU32,
    /// `f32` bits.
    prompt_tps: AtomicU32,
    /// `f32` bits.
    decode_tps: AtomicU32,
}

/// Weight of the newest step in the moving averages of [`EngineLoad`]'s rates.
const RATE_ALPHA: f32 = 0.2;

impl LoadGauges {
    fn rate(a: &AtomicU32) -> f32 {
        f32::from_bits(a.load(Ordering::Relaxed))
    }

    /// Folds one measured rate into `a`'s moving average (the first
    /// measurement is taken as is).
    fn fold(a: &AtomicU32, x: f32) {
        if !x.is_finite() || x <= 0.0 {
            return;
        }
        let old = Self::rate(a);
        let new = if old > 0.0 {
            old + RATE_ALPHA * (x - old)
        } else {
            x
        };
        a.store(new.to_bits(), Ordering::Relaxed);
    }
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

/// How an engine batches and bounds its sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together, at least 1 (`inference.parallel`).
    pub parallel: usize,
    /// Requests that may wait beyond those (`inference.queue_depth`).
    pub queue_depth: usize,
    /// Bytes the running sequences' keys and values may take together
    /// (`inference.kv_budget`; blocks shared between sequences count once).
    pub kv_budget: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            parallel: DEFAULT_PARALLEL,
            queue_depth: 16,
            kv_budget: DEFAULT_KV_BUDGET,
        }
    }
}

/// Prompt tokens a step takes before it stops taking further prompts:
/// prompts shorter than this share a step, longer ones get one each.
const PREFILL_STEP_MIN: usize = 32;

/// Sequences decoded together by default (`inference.parallel`).
pub const DEFAULT_PARALLEL: usize = 16;
/// The default `inference.kv_budget`: 1 GiB.
pub const DEFAULT_KV_BUDGET: u64 = 1 << 30;

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
    cfg: EngineConfig,
    gauges: Arc<LoadGauges>,
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
    /// Starts the generation thread of `model`, served as `name`. Up to
    /// `cfg.parallel` sequences run together (continuous batching) within
    /// `cfg.kv_budget`; at most `parallel + queue_depth` requests are
    /// admitted at once. Queue depth, time to first token and generation
    /// speed go to `metrics`.
    pub fn start(
        name: &str,
        model: Arc<Model>,
        kv: Option<Arc<PrefixCache>>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Engine>, std::io::Error> {
        let (tx, rx) = std::sync::mpsc::channel::<Queued>();
        let stats = Arc::new(EngineStats::default());
        let avg_job_ms = Arc::new(AtomicU64::new(1000));
        let gauges = Arc::new(LoadGauges::default());
        let block = KvCache::block_bytes(model.kv_layout()) as u64;
        let worker = Worker {
            kv: kv.clone().map(|c| {
                let session = c.session(&model);
                (c, session)
            }),
            model: model.clone(),
            metrics: metrics.clone(),
            stats: stats.clone(),
            avg_job_ms: avg_job_ms.clone(),
            gauges: gauges.clone(),
            parallel: cfg.parallel.max(1),
            budget_blocks: (cfg.kv_budget / block.max(1)).max(1) as usize,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || worker.serve(rx))?;
        Ok(Arc::new(Engine {
            name: name.to_owned(),
            model,
            kv,
            metrics,
            capacity: cfg.parallel.max(1) + cfg.queue_depth,
            pending: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(tokio::sync::Notify::new()),
            tx,
            stats,
            avg_job_ms,
            cfg,
            gauges,
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

    /// A snapshot of the engine's load: its bounds, the sequences running
    /// and waiting now, and its measured rates. Cheap (a few atomic loads).
    pub fn load(&self) -> EngineLoad {
        let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let running = self.gauges.running.load(Ordering::Acquire);
        // The worker updates `running` after each change; the permit count
        // may move first, so `waiting` never goes below zero.
        let waiting = sat(self.pending()).saturating_sub(running);
        EngineLoad {
            parallel: sat(self.cfg.parallel.max(1)),
            queue_depth: sat(self.cfg.queue_depth),
            running,
            waiting,
            prompt_tps: LoadGauges::rate(&self.gauges.prompt_tps),
            decode_tps: LoadGauges::rate(&self.gauges.decode_tps),
        }
    }

    /// Takes a queue slot, or `None` when `parallel + queue_depth` are taken.
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

/// A job with its sequence state: waiting to start, running, or put back
/// (preempted) with its tokens to recompute.
struct Seq {
    q: Queued,
    /// When the engine took the job.
    t0: Instant,
    /// Sampler, stop rules and released text (made when it first starts).
    dec: Option<Decoder>,
    /// Prompt then generated tokens: every token whose keys and values the
    /// cache must hold before the next token is sampled.
    tokens: Vec<u32>,
    cache: Option<KvCache>,
    /// Prompt tokens restored from the prefix cache when it first started.
    cached: usize,
    ttft: Option<Duration>,
    /// Text sent as tokens so far.
    released: String,
    prompt_time: Duration,
    /// When its first generated token was sampled.
    gen_start: Option<Instant>,
}

impl Seq {
    fn job(&self) -> &Job {
        &self.q.job
    }
}

/// What the generation thread of one engine owns: its model, its session
/// in the prefix cache, the sequences it runs and where its metrics go.
struct Worker {
    model: Arc<Model>,
    kv: Option<(Arc<PrefixCache>, KvSession)>,
    metrics: Arc<Metrics>,
    stats: Arc<EngineStats>,
    avg_job_ms: Arc<AtomicU64>,
    gauges: Arc<LoadGauges>,
    parallel: usize,
    /// `kv_budget` in storage blocks.
    budget_blocks: usize,
    /// Jobs not started yet, and preempted sequences (at the front).
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
}

/// How one running sequence's step ended.
enum After {
    Continue,
    Stop(StopReason),
}

impl Worker {
    /// The scheduling loop: takes jobs, admits them within the budget and
    /// advances every running sequence by one forward pass per step.
    fn serve(mut self, rx: std::sync::mpsc::Receiver<Queued>) {
        loop {
            self.publish();
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(q) => self.waiting.push_back(Seq::new(q)),
                    Err(_) => return,
                }
            }
            while let Ok(q) = rx.try_recv() {
                self.waiting.push_back(Seq::new(q));
            }
            self.drop_cancelled_waiting();
            if self.model.mapping_damaged() {
                self.fail_all(&damaged_model_message(&self.model));
                continue;
            }
            self.admit();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            self.fit_budget();
            self.step();
        }
    }

    /// Publishes the size of the running batch ([`Engine::load`]).
    fn publish(&self) {
        let n = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        self.gauges.running.store(n, Ordering::Release);
    }

    /// Waiting jobs whose client went away end here (nothing was sent yet
    /// for a job that never started).
    fn drop_cancelled_waiting(&mut self) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(s) = self.waiting.pop_front() {
            if is_cancelled(s.job()) {
                if s.dec.is_some() {
                    self.finish_with(s, StopReason::Cancelled);
                } else {
                    self.count_done(&s, true);
                }
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
    }

    /// Blocks the running sequences hold (shared blocks once).
    fn used_blocks(&self) -> usize {
        let mut ids: Vec<usize> = self
            .running
            .iter()
            .filter_map(|s| s.cache.as_ref())
            .flat_map(|c| c.block_ids())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Starts waiting jobs while there is a free slot and KV room for their
    /// prompt (preempted sequences first, then in arrival order).
    fn admit(&mut self) {
        let block = crate::inference::KV_STORAGE_TOKENS;
        while self.running.len() < self.parallel {
            let Some(front) = self.waiting.front() else {
                return;
            };
            let need = (front.tokens_to_hold() + 1).div_ceil(block);
            if need > self.budget_blocks {
                if let Some(s) = self.waiting.pop_front() {
                    let block = KvCache::block_bytes(self.model.kv_layout());
                    let msg = format!(
                        "the prompt needs {} MiB of KV, more than inference.kv_budget ({} MiB)",
                        (need * block).div_ceil(1 << 20),
                        (self.budget_blocks * block) >> 20
                    );
                    self.fail(s, &msg);
                }
                continue;
            }
            if !self.running.is_empty() && self.used_blocks() + need > self.budget_blocks {
                return;
            }
            let Some(s) = self.waiting.pop_front() else {
                return;
            };
            if let Some(s) = self.start(s) {
                self.running.push(s);
            }
        }
    }

    /// Restores the longest cached prefix of a sequence's tokens (from the
    /// prefix cache, or shared with a running sequence) and makes its
    /// decoder on first start. `None` when it failed (the client was told).
    fn start(&mut self, mut s: Seq) -> Option<Seq> {
        let model = self.model.clone();
        let first = s.dec.is_none();
        if first {
            // A bad sequence fails alone, never the batch it would join.
            if let Err(e) = model.check_sequence(&s.job().prompt) {
                self.fail(s, &e.to_string());
                return None;
            }
            s.tokens = s.job().prompt.clone();
        }
        let _busy = self.kv.as_ref().map(|(pc, _)| pc.busy());
        let (mut cache, mut cached) = match &self.kv {
            Some((pc, session)) => {
                let r = pc.restore(&model, session, &s.tokens);
                (r.cache, r.tokens)
            }
            None => (model.new_cache_with(KvDtype::F16), 0),
        };
        // A running sequence with a longer common prefix: share its blocks
        // (copy-on-write), as long as the dtypes agree.
        let last = s.tokens.len().saturating_sub(1);
        for r in &self.running {
            let Some(rc) = &r.cache else { continue };
            if rc.dtype() != cache.dtype() {
                continue;
            }
            let common = r
                .tokens
                .iter()
                .take(rc.len())
                .zip(&s.tokens[..last])
                .take_while(|(a, b)| a == b)
                .count();
            if common > cached && common >= crate::inference::KV_STORAGE_TOKENS {
                cache = rc.fork(common);
                cached = common;
            }
        }
        if first {
            let prompt = &s.job().prompt;
            match Decoder::new(&model, &prompt[..cached], &prompt[cached..], &s.job().cfg) {
                Ok(d) => s.dec = Some(d),
                Err(e) => {
                    self.fail(s, &e.to_string());
                    return None;
                }
            }
            s.cached = cached;
            let _ = s.job().events.send(JobEvent::Started {
                prompt_tokens: s.job().prompt.len(),
                cached_tokens: cached,
            });
        }
        s.cache = Some(cache);
        Some(s)
    }

    /// Makes the next step fit the KV budget: while the blocks it would
    /// allocate do not fit, the most recently started sequence is put back
    /// to wait (its KV dropped, recomputed when it runs again); a sequence
    /// alone that does not fit ends for length.
    fn fit_budget(&mut self) {
        let chunk = self.model.batch_tokens();
        loop {
            let grow: usize = self
                .running
                .iter()
                .filter_map(|s| {
                    s.cache
                        .as_ref()
                        .map(|c| c.blocks_to_grow(s.feed_len(chunk)))
                })
                .sum();
            if self.used_blocks() + grow <= self.budget_blocks {
                return;
            }
            let Some(mut s) = self.running.pop() else {
                return;
            };
            if self.running.is_empty() {
                self.publish();
                tracing::warn!(
                    model = %self.model.path().display(),
                    "a sequence alone reached inference.kv_budget: ended for length"
                );
                self.finish_with(s, StopReason::ContextFull);
                return;
            }
            tracing::debug!(
                tokens = s.tokens.len(),
                "KV budget full: sequence preempted"
            );
            s.cache = None;
            self.waiting.push_front(s);
        }
    }

    /// One forward pass over every running sequence: a token each for the
    /// decoding ones, prompt chunks (within the batch size) for the others.
    fn step(&mut self) {
        let model = self.model.clone();
        let chunk = model.batch_tokens();
        let mut left = chunk;
        // Decoding sequences first, then prompts in order while room is left.
        let mut feeds = vec![0usize; self.running.len()];
        for (i, s) in self.running.iter().enumerate() {
            if s.feed_len(chunk) == 1 {
                feeds[i] = 1;
                left = left.saturating_sub(1);
            }
        }
        // Prompts one after the other (in arrival order), not all at once:
        // the first answer starts after its own prompt, not after everyone's
        // (short prompts still share a step, up to PREFILL_STEP_MIN tokens).
        let mut prefill = 0;
        for (i, s) in self.running.iter().enumerate() {
            if feeds[i] == 0 && left > 0 && prefill < PREFILL_STEP_MIN {
                let n = s.feed_len(chunk).min(left);
                feeds[i] = n;
                left -= n;
                prefill += n;
            }
        }
        // For the rates of `EngineLoad`: prompt tokens this step computes,
        // and whether it generates a token for a sequence already decoding.
        let mut prompt_tokens = 0usize;
        let mut decoding = false;
        for (i, s) in self.running.iter().enumerate() {
            if s.gen_start.is_none() {
                prompt_tokens += feeds[i];
            } else if feeds[i] == 1 {
                decoding = true;
            }
        }
        let t = Instant::now();
        let mut idx = Vec::new();
        let mut items = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            let n = feeds[i];
            let Some(cache) = s.cache.as_mut() else {
                continue;
            };
            if n == 0 {
                continue;
            }
            let from = cache.len();
            let logits = from + n == s.tokens.len();
            idx.push(i);
            items.push(BatchItem {
                cache,
                tokens: &s.tokens[from..from + n],
                logits,
            });
        }
        let out = model.forward_many(&mut items);
        drop(items);
        let spent = t.elapsed();
        let mut logits = match out {
            Ok(l) => l,
            Err(e) => {
                self.fail_all(&e.to_string());
                return;
            }
        };
        if model.mapping_damaged() {
            self.fail_all(&damaged_model_message(&model));
            return;
        }
        let mut ended = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            let s = &mut self.running[i];
            if s.gen_start.is_none() {
                s.prompt_time += spent;
            }
            let l = std::mem::take(&mut logits[k]);
            if l.is_empty() {
                if is_cancelled(s.job()) {
                    ended.push((i, StopReason::Cancelled));
                }
                continue;
            }
            if let After::Stop(r) = s.sample(l, &model) {
                ended.push((i, r));
            }
        }
        let secs = t.elapsed().as_secs_f32();
        if secs > 0.0 {
            if prompt_tokens > 0 {
                LoadGauges::fold(&self.gauges.prompt_tps, prompt_tokens as f32 / secs);
            }
            if decoding {
                LoadGauges::fold(&self.gauges.decode_tps, 1.0 / secs);
            }
        }
        // Remove from the back so indices stay valid.
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let ended: Vec<(Seq, StopReason)> = ended
            .into_iter()
            .map(|(i, r)| (self.running.remove(i), r))
            .collect();
        // The load is published before the clients hear of the end.
        self.publish();
        for (s, r) in ended {
            self.finish_with(s, r);
        }
    }

    /// Fails every running and waiting sequence (the model is unusable or
    /// a forward pass failed); keeps none of their KV.
    fn fail_all(&mut self, msg: &str) {
        tracing::error!(error = msg, "generation failed");
        if let Some((_, session)) = &mut self.kv {
            session.forget();
        }
        let running = std::mem::take(&mut self.running);
        self.publish();
        for s in running.into_iter().chain(std::mem::take(&mut self.waiting)) {
            self.fail(s, msg);
        }
    }

    fn fail(&self, s: Seq, msg: &str) {
        let _ = s.job().events.send(JobEvent::Failed(msg.to_owned()));
        self.count_done(&s, false);
    }

    fn count_done(&self, s: &Seq, cancelled: bool) {
        let ms = s.t0.elapsed().as_millis() as u64;
        let old = self.avg_job_ms.load(Ordering::Relaxed);
        self.avg_job_ms.store((old * 3 + ms) / 4, Ordering::Relaxed);
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
        if cancelled {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends a started sequence: saves its KV to the prefix cache, reports
    /// metrics and sends `Done`.
    fn finish_with(&mut self, mut s: Seq, stop: StopReason) {
        let Some(mut dec) = s.dec.take() else {
            self.count_done(&s, stop == StopReason::Cancelled);
            return;
        };
        dec.prompt_time = s.prompt_time;
        dec.gen_time = s.gen_start.map_or(Duration::ZERO, |g| g.elapsed());
        let stop = if is_cancelled(s.job()) {
            StopReason::Cancelled
        } else {
            stop
        };
        let out = dec.finish(stop);
        if let (Some((pc, session)), Some(cache)) = (&mut self.kv, s.cache.take()) {
            let seq = Sequence {
                prompt: &s.q.job.prompt,
                generated: &out.tokens,
                reused: s.cached,
                prompt_time: out.prompt_time,
            };
            pc.save(session, seq, cache);
        }
        let tail = out
            .text
            .strip_prefix(s.released.as_str())
            .unwrap_or_default()
            .to_owned();
        if let Some(t) = s.ttft {
            let outcome = if s.cached > 0 {
                crate::metrics::CacheOutcome::Kv
            } else {
                crate::metrics::CacheOutcome::Miss
            };
            self.metrics.ttft(outcome, t.as_secs_f64());
        }
        self.metrics
            .generation(out.tokens.len() as u64, out.gen_time.as_secs_f64());
        let _ = s.job().events.send(JobEvent::Done {
            stop,
            completion_tokens: out.tokens.len(),
            tail,
            ttft: s.ttft.unwrap_or_else(|| s.t0.elapsed()),
        });
        let cancelled = matches!(stop, StopReason::Cancelled | StopReason::Callback);
        self.count_done(&s, cancelled);
    }
}

fn is_cancelled(job: &Job) -> bool {
    job.cancel.load(Ordering::Relaxed) || job.events.is_closed()
}

impl Seq {
    fn new(q: Queued) -> Seq {
        Seq {
            q,
            t0: Instant::now(),
            dec: None,
            tokens: Vec::new(),
            cache: None,
            cached: 0,
            ttft: None,
            released: String::new(),
            prompt_time: Duration::ZERO,
            gen_start: None,
        }
    }

    /// Tokens the cache must hold before the next sample.
    fn tokens_to_hold(&self) -> usize {
        if self.dec.is_some() {
            self.tokens.len()
        } else {
            self.q.job.prompt.len()
        }
    }

    /// Tokens the next step runs for it (at most `chunk`).
    fn feed_len(&self, chunk: usize) -> usize {
        let have = self.cache.as_ref().map_or(0, KvCache::len);
        self.tokens.len().saturating_sub(have).min(chunk)
    }

    /// Samples the next token from `logits`, streams its text and applies
    /// the stop rules, cancellation and the context length.
    fn sample(&mut self, mut logits: Vec<f32>, model: &Model) -> After {
        let Some(dec) = self.dec.as_mut() else {
            return After::Stop(StopReason::Cancelled);
        };
        if self.gen_start.is_none() {
            self.gen_start = Some(Instant::now());
        }
        let step = dec.next(&mut logits);
        let mut gone = false;
        if let Some(ev) = &step.event {
            if self.ttft.is_none() {
                self.ttft = Some(self.t0.elapsed());
            }
            self.released.push_str(ev.text);
            if self
                .q
                .job
                .events
                .send(JobEvent::Token(ev.text.to_owned()))
                .is_err()
            {
                self.q.job.cancel.store(true, Ordering::Relaxed);
                gone = true;
            }
            self.tokens.push(ev.id);
        }
        match step.stop {
            Some(r @ (StopReason::StopSequence | StopReason::EndOfSequence)) => {
                return After::Stop(r);
            }
            _ if gone => return After::Stop(StopReason::Cancelled),
            Some(r) => return After::Stop(r),
            None => {}
        }
        if is_cancelled(&self.q.job) {
            return After::Stop(StopReason::Cancelled);
        }
        if self.tokens.len() > model.hparams().context_length {
            return After::Stop(StopReason::ContextFull);
        }
        After::Continue
    }
}
