//! The two calls an engine makes per job: [`PrefixCache::restore`] before
//! computing a prompt and [`PrefixCache::save`] after generating.
//!
//! Restoring runs the whole cascade, longest usable prefix first:
//!
//! 1. the engine's hot sequence (its last sequence, forked at the exact
//!    common length: token-granular, zero-copy);
//! 2. the RAM tier, then the disk tier ([`PrefixCache::load_prefix`]), when
//!    they hold more full blocks;
//! 3. the remote tier (neighbours over the mesh, see [`super::remote`]) for
//!    the blocks after those, when fetching is cheaper than computing at the
//!    engine's measured prompt rate; the run is spot-checked by
//!    recomputation under the trust policy and a liar is banned;
//! 4. the tail record after the last full block (a partial block).
//!
//! At least one prompt token is always left to compute.

use super::remote::{FetchCost, Fetched, RemoteTier, SPOT_CHECK_TOL, kv_rel_error};
use super::{BlockKey, KeyContext, PrefixCache};
use crate::inference::{KvCache, Model};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What one engine keeps in the prefix cache between its jobs: the key
/// context of its model, its last sequence and its measured prompt rate.
/// Made by [`PrefixCache::session`]; one per engine thread.
#[derive(Debug)]
pub struct KvSession {
    ctx: KeyContext,
    hot: Option<HotSequence>,
    rate: PromptRate,
}

impl KvSession {
    /// The key context of the session's model.
    pub fn context(&self) -> &KeyContext {
        &self.ctx
    }

    /// Forgets the last sequence (its KV must not be reused, e.g. the
    /// model's file was damaged while it was computed).
    pub fn forget(&mut self) {
        self.hot = None;
    }
}

/// The engine's last sequence: its tokens and its full KV cache (values
/// rounded through the prefix cache's dtype, as stored blocks are). A
/// follow-up sharing a prefix with it forks it at the exact common length
/// (token-granular, zero-copy), which block keys cannot do for a partial
/// last block.
struct HotSequence {
    tokens: Vec<u32>,
    cache: KvCache,
}

impl std::fmt::Debug for HotSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotSequence")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
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

/// Where the restored prompt positions came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources {
    /// Tokens forked from the engine's hot sequence.
    pub hot_tokens: usize,
    /// Full blocks from the RAM tier.
    pub ram_blocks: usize,
    /// Full blocks from the disk tier.
    pub disk_blocks: usize,
    /// Full blocks from neighbours (after their checks).
    pub remote_blocks: usize,
    /// Tokens from a tail record (a partial block).
    pub tail_tokens: usize,
}

/// The outcome of [`PrefixCache::restore`]: the KV state to continue from.
#[derive(Debug)]
pub struct Restored {
    /// The KV of the first [`Restored::tokens`] prompt positions, in the
    /// cache's dtype.
    pub cache: KvCache,
    /// Prompt tokens restored (not to be computed again).
    pub tokens: usize,
    /// Which tiers they came from.
    pub from: Sources,
}

/// A finished sequence, for [`PrefixCache::save`].
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// The prompt tokens.
    pub prompt: &'a [u32],
    /// The generated tokens.
    pub generated: &'a [u32],
    /// Prompt tokens that were restored ([`Restored::tokens`]).
    pub reused: usize,
    /// Time spent computing the rest of the prompt.
    pub prompt_time: Duration,
}

impl PrefixCache {
    /// A new session for an engine serving `model`.
    pub fn session(&self, model: &Model) -> KvSession {
        KvSession {
            ctx: self.context(model),
            hot: None,
            rate: PromptRate::default(),
        }
    }

    /// Restores the longest cached prefix of `prompt` for `session`'s model
    /// (see the module docs for the cascade). Blocking (the remote tier
    /// waits for neighbours): call from the engine's thread.
    pub fn restore(&self, model: &Model, session: &KvSession, prompt: &[u32]) -> Restored {
        let ctx = &session.ctx;
        let b = ctx.block_tokens;
        // Live values in the blocks' format: cached and cold runs are bit-identical.
        let mut r = Restored {
            cache: model.new_cache_with(ctx.dtype),
            tokens: 0,
            from: Sources::default(),
        };
        let keys = ctx.keys(prompt);
        // Leave at least one prompt token to compute.
        let last = prompt.len().saturating_sub(1);
        let common = session.hot.as_ref().map_or(0, |h| {
            h.tokens
                .iter()
                .take(h.cache.len())
                .zip(&prompt[..last])
                .take_while(|(a, b)| a == b)
                .count()
        });
        if common >= b.max(1)
            && let Some(h) = session.hot.as_ref()
        {
            r.cache = h.cache.fork(common);
            r.tokens = common;
            r.from.hot_tokens = common;
            tracing::debug!(tokens = common, "prefix from the hot sequence");
        }
        let usable = (last / b).min(keys.len());
        // The tiers can only do better when they hold the block after what
        // the hot sequence gave (their prefix is contiguous from block 0):
        // otherwise reading and decoding their blocks would be thrown away.
        let next = r.tokens / b;
        if r.tokens < usable * b && (r.tokens == 0 || self.holds(&keys[next])) {
            self.restore_blocks(model, ctx, &keys[..usable], &mut r);
        }
        if let Some(remote) = self.remote()
            && r.tokens.is_multiple_of(b)
            && r.tokens < usable * b
        {
            let cost = FetchCost {
                block_bytes: model.kv_layout().export_len(b, self.cfg.dtype) as u64,
                compute_per_block: session.rate.0 * b as u32,
            };
            let run = remote.fetch_run(&keys[r.tokens / b..usable], cost);
            if !run.is_empty() {
                self.take_from_remote(model, remote, prompt, &run, &mut r);
            }
        }
        // The partial block after the last full one, token-granular.
        if r.tokens.is_multiple_of(b) && r.tokens < last && r.tokens / b <= keys.len() {
            let parent = (r.tokens / b).checked_sub(1).map(|i| &keys[i]);
            let key = ctx.tail_key(parent);
            let n = self.load_tail(&key, &prompt[r.tokens..last], &model.id(), &mut r.cache);
            if n > 0 {
                tracing::debug!(tokens = n, "prefix tail record");
            }
            r.tokens += n;
            r.from.tail_tokens = n;
        }
        r
    }

    /// The RAM and disk tiers: replaces `r` when they hold more of `keys`.
    fn restore_blocks(&self, model: &Model, ctx: &KeyContext, keys: &[BlockKey], r: &mut Restored) {
        let mut c = model.new_cache_with(ctx.dtype);
        let hit = self.load_prefix(keys, &model.id(), &mut c);
        if hit.blocks * ctx.block_tokens > r.tokens {
            r.cache = c;
            r.tokens = hit.blocks * ctx.block_tokens;
            r.from = Sources {
                ram_blocks: hit.from_ram,
                disk_blocks: hit.from_disk,
                ..Sources::default()
            };
        }
        tracing::debug!(
            blocks = hit.blocks,
            from_ram = hit.from_ram,
            from_disk = hit.from_disk,
            "prefix cache"
        );
    }

    /// Imports a run fetched from a neighbour on top of `r` (which holds
    /// whole blocks), spot-checking one block by recomputation when the
    /// trust policy asks for it. `r` is left as it was when nothing
    /// imports or the peer was caught lying (it is banned and its blocks
    /// dropped).
    fn take_from_remote(
        &self,
        model: &Model,
        remote: &RemoteTier,
        prompt: &[u32],
        run: &[Fetched],
        r: &mut Restored,
    ) {
        let b = self.cfg.block_tokens;
        let from = r.tokens / b;
        let model_id = model.id();
        let mut trial = r.cache.fork(from * b);
        let mut n = 0;
        for f in run {
            if trial.import_append(&f.blob, &model_id).is_err() {
                break;
            }
            n += 1;
        }
        if n == 0 {
            return;
        }
        let peer = run[0].peer;
        let fresh = !remote.is_checked(&peer);
        if fresh || remote.needs_check(&peer) {
            // The first fetched block of a new peer, else a random one of the run.
            let j = if fresh || n == 1 {
                0
            } else {
                let mut rnd = [0u8; 8];
                let _ = getrandom::fill(&mut rnd);
                (u64::from_le_bytes(rnd) % n as u64) as usize
            };
            let start = (from + j) * b;
            let mut re = trial.fork(start);
            let ok = match model.forward(&mut re, &prompt[start..start + b]) {
                Ok(_) => {
                    let err = kv_rel_error(&trial, &re, start..start + b);
                    tracing::debug!(%peer, err, "KV spot check");
                    err <= SPOT_CHECK_TOL
                }
                Err(_) => false,
            };
            if !ok {
                self.stats.mesh_caught.fetch_add(1, Ordering::Relaxed);
                remote.caught(peer, self);
                return;
            }
            self.stats.mesh_checked.fetch_add(1, Ordering::Relaxed);
            remote.passed(peer);
        }
        for f in &run[..n] {
            self.put_foreign(f.key, f.blob.clone());
        }
        remote.took(peer, run[..n].iter().map(|f| f.key));
        self.stats.mesh_hits.fetch_add(n as u64, Ordering::Relaxed);
        r.cache = trial;
        r.tokens += n * b;
        r.from.remote_blocks = n;
    }

    /// Stores what a finished sequence computed: every full block its
    /// `cache` holds, the tail records after them, and the sequence as
    /// `session`'s hot sequence; updates the session's prompt rate.
    pub fn save(&self, session: &mut KvSession, seq: Sequence<'_>, cache: KvCache) {
        session
            .rate
            .observe(seq.prompt.len() - seq.reused, seq.prompt_time);
        let ctx = session.ctx;
        let mut all = seq.prompt.to_vec();
        all.extend_from_slice(seq.generated);
        let keys = if all.len() > seq.prompt.len() {
            ctx.keys(&all[..cache.len().min(all.len())])
        } else {
            ctx.keys(seq.prompt)
        };
        self.store_blocks(&cache, &keys, 0, &ctx.model_id);
        all.truncate(cache.len());
        self.store_tails(&ctx, &cache, &all, &keys, seq.reused);
        session.hot = Some(HotSequence { tokens: all, cache });
    }

    /// Stores the tail records of a finished sequence (`all`, the tokens
    /// `cache` holds, with the keys of its full blocks; positions before
    /// `reused` came from the cache): after each full block from the one the
    /// request started computing in, a reference to the next full block, and
    /// after the last one the partial block's KV inline.
    fn store_tails(
        &self,
        ctx: &KeyContext,
        cache: &KvCache,
        all: &[u32],
        keys: &[BlockKey],
        reused: usize,
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
            self.store_tail(key, &all[start..end], block, cache, start, &ctx.model_id);
        }
    }
}
