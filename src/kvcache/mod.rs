//! The prefix KV cache: KV blocks named by a BLAKE3 chain over the prompt
//! tokens, kept in a RAM tier and a disk tier.
//!
//! A prompt is cut into blocks of [`KvCacheConfig::block_tokens`] tokens.
//! Block `i`'s key is
//!
//! ```text
//! key_i = BLAKE3("shoal-kv-v1" ‖ model id ‖ tokenizer id ‖ KV format ‖ tokens of block i ‖ key_{i-1})
//! ```
//!
//! (`key_{-1}` is 32 zero bytes), so a key names exactly one KV content: the
//! keys and values of those tokens at those positions after that whole
//! prefix, computed by that model and stored in that format. A request walks
//! the keys from the start, takes the longest run it finds (RAM first, then
//! disk), imports it and computes only the rest; every new full block is
//! stored in RAM and written behind to disk.
//!
//! Blocks are KV exports of [`crate::inference::KvCache::export`] (a
//! versioned format with its own BLAKE3 checksum); the disk tier wraps each
//! in a small versioned header binding it to its key (see [`disk`]). A block
//! whose checksum or key does not match is dropped and recomputed, never
//! used. See `docs/SERVING.md`.

pub mod disk;
pub mod ram;
pub mod remote;
mod restore;
pub mod tail;

use crate::inference::{KV_STORAGE_TOKENS as BLOCK_TOKENS, KvCache, KvDtype, Model};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a block was found: the one tier type, shared with [`crate::metrics`].
pub use crate::metrics::Tier;
pub use disk::DiskTier;
pub use ram::RamTier;
pub use restore::{KvSession, Restored, Sequence, Sources};

/// Domain separator of block keys (and their version).
pub const KEY_DOMAIN: &[u8] = b"shoal-kv-v1";

/// Errors of the KV cache tiers.
#[derive(Debug, thiserror::Error)]
pub enum KvCacheError {
    /// Reading or writing the disk tier failed.
    #[error("kv disk tier i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A stored block is malformed or corrupted.
    #[error("kv block {key}: {reason}")]
    Corrupt {
        /// Hex key of the block.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("kv cache config: {0}")]
    Config(String),
}

/// The 32-byte key of one KV block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub [u8; 32]);

impl BlockKey {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<BlockKey> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(s, &mut k).ok()?;
        Some(BlockKey(k))
    }
}

impl std::fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockKey({})", &self.to_hex()[..16])
    }
}

/// What, besides the tokens, a block key depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyContext {
    /// The model id KV exports are bound to.
    pub model_id: [u8; 32],
    /// BLAKE3 over the tokenizer's vocabulary ([`tokenizer_id`]).
    pub tokenizer_id: [u8; 32],
    /// Storage format of the blocks.
    pub dtype: KvDtype,
    /// Tokens per block.
    pub block_tokens: usize,
}

impl KeyContext {
    /// The context of `model` with the given block size and format.
    pub fn for_model(model: &Model, dtype: KvDtype, block_tokens: usize) -> KeyContext {
        KeyContext {
            model_id: model.id(),
            tokenizer_id: tokenizer_id(model),
            dtype,
            block_tokens,
        }
    }

    /// Keys of the full blocks of `tokens` (a trailing partial block has none).
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_tokens.max(1));
        let mut parent = [0u8; 32];
        if self.block_tokens == 0 {
            return out;
        }
        let fmt = format_tag(self.dtype);
        for block in tokens.chunks_exact(self.block_tokens) {
            let mut h = blake3::Hasher::new();
            h.update(KEY_DOMAIN);
            h.update(&self.model_id);
            h.update(&self.tokenizer_id);
            h.update(&[fmt, crate::inference::KV_FORMAT_VERSION as u8]);
            h.update(&(self.block_tokens as u32).to_le_bytes());
            for t in block {
                h.update(&t.to_le_bytes());
            }
            h.update(&parent);
            parent = *h.finalize().as_bytes();
            out.push(BlockKey(parent));
        }
        out
    }
}

impl KeyContext {
    /// The key of the tail record after the full block `parent` (`None`:
    /// at the start of a sequence); see [`tail`].
    pub fn tail_key(&self, parent: Option<&BlockKey>) -> BlockKey {
        let mut h = blake3::Hasher::new();
        h.update(tail::TAIL_DOMAIN);
        h.update(&self.model_id);
        h.update(&self.tokenizer_id);
        h.update(&[
            format_tag(self.dtype),
            crate::inference::KV_FORMAT_VERSION as u8,
        ]);
        h.update(&(self.block_tokens as u32).to_le_bytes());
        h.update(parent.map_or(&[0u8; 32], |k| &k.0));
        BlockKey(*h.finalize().as_bytes())
    }
}

fn format_tag(d: KvDtype) -> u8 {
    match d {
        KvDtype::F16 => 0,
        KvDtype::Q8_0 => 1,
    }
}

/// BLAKE3 over the tokenizer's vocabulary (each token's bytes with their
/// length) and its BOS/EOS ids: two models with the same tokenizer share it.
pub fn tokenizer_id(model: &Model) -> [u8; 32] {
    let tok = model.tokenizer();
    let mut h = blake3::Hasher::new();
    h.update(b"shoal-tokenizer-v1");
    for id in 0..tok.vocab_size() {
        let b = tok.token_bytes(id as u32);
        h.update(&(b.len() as u32).to_le_bytes());
        h.update(b);
    }
    for x in [tok.bos(), tok.eos()] {
        h.update(&x.map_or(u64::MAX, u64::from).to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// Settings of the prefix cache: the `[kv]` section of the configuration
/// file ([`SETTINGS`]), plus the disk tier's directory, which the node sets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvCacheConfig {
    /// Byte budget of the RAM tier (0 disables it; `kv.ram_budget`).
    #[serde(with = "crate::config::size")]
    pub ram_budget: u64,
    /// Byte budget of the disk tier (`kv.disk_budget`).
    #[serde(with = "crate::config::size")]
    pub disk_budget: u64,
    /// Bytes the disk tier may write per hour; once spent, new blocks stay
    /// in RAM only until the hour ends (0: no limit;
    /// `kv.disk_write_budget_per_hour`, see [`disk::WriteBudget`]).
    #[serde(with = "crate::config::size")]
    pub disk_write_budget_per_hour: u64,
    /// Tokens per block (default 16, see docs/SERVING.md; `kv.block_size`).
    #[serde(rename = "block_size")]
    pub block_tokens: usize,
    /// Storage format of blocks (`kv.dtype`).
    pub dtype: KvDtype,
    /// How long a block stays usable after it was stored (`kv.ttl`).
    #[serde(rename = "ttl", with = "crate::config::duration")]
    pub ram_ttl: Duration,
    /// Directory of the disk tier (`<data-dir>/kv`); `None` disables it.
    /// Not in the file: the node puts it under its data directory.
    #[serde(skip)]
    pub disk_dir: Option<PathBuf>,
}

impl Default for KvCacheConfig {
    /// The configuration file's defaults (`[kv]`).
    fn default() -> Self {
        KvCacheConfig {
            ram_budget: 512 << 20,
            disk_budget: 4 << 30,
            disk_write_budget_per_hour: 1 << 30,
            block_tokens: 16,
            dtype: KvDtype::F16,
            ram_ttl: Duration::from_secs(7 * 86_400),
            disk_dir: None,
        }
    }
}

impl KvCacheConfig {
    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if self.block_tokens == 0 || self.block_tokens > 4096 {
            return Err(crate::config::ConfigError::Invalid(
                "kv.block_size must be between 1 and 4096 tokens".into(),
            ));
        }
        Ok(())
    }
}

/// The `[kv]` section's settings, in file order.
pub const SETTINGS: &[crate::config::Setting] = {
    use crate::config::Kind::{Int, Str};
    use crate::config::Setting as S;
    &[
        S::new(
            "kv.ram_budget",
            Some("SHOAL_KV_RAM"),
            Str,
            "RAM for KV-cache blocks of prompt prefixes. Least-recently-used blocks spill to disk.",
            "\"512M\"",
        ),
        S::new(
            "kv.disk_budget",
            Some("SHOAL_KV_DISK"),
            Str,
            "Disk for spilled KV-cache blocks (under data_dir); 0 keeps KV blocks in RAM only.",
            "\"4G\"",
        ),
        S::new(
            "kv.disk_write_budget_per_hour",
            Some("SHOAL_KV_DISK_WRITE_BUDGET"),
            Str,
            "Most bytes of KV blocks written to disk per hour (SD-card wear); once spent, new blocks stay in RAM only until the hour ends. 0 or \"unlimited\": no limit.",
            "\"1G\"",
        ),
        S::new(
            "kv.block_size",
            Some("SHOAL_KV_BLOCK_SIZE"),
            Int,
            "Tokens per KV block: prefixes are shared in whole blocks.",
            "16",
        ),
        S::new(
            "kv.dtype",
            Some("SHOAL_KV_DTYPE"),
            Str,
            "Element type of stored KV blocks: \"f16\" (exact) or \"q8_0\" (about half the bytes).",
            "\"f16\"",
        ),
        S::new(
            "kv.ttl",
            Some("SHOAL_KV_TTL"),
            Str,
            "KV blocks unused for this long are dropped.",
            "\"7d\"",
        ),
    ]
};

/// Counters of a [`PrefixCache`].
#[derive(Debug, Default)]
pub struct KvStats {
    /// Blocks found in RAM.
    pub ram_hits: AtomicU64,
    /// Blocks found on disk (after missing in RAM).
    pub disk_hits: AtomicU64,
    /// Lookups that ended on a block found nowhere.
    pub misses: AtomicU64,
    /// Blocks dropped because their checksum, key or layout was wrong.
    pub corrupt_dropped: AtomicU64,
    /// Blocks stored.
    pub stored: AtomicU64,
    /// Blocks taken from neighbours (after their checks).
    pub mesh_hits: AtomicU64,
    /// Spot checks that caught a lying neighbour.
    pub mesh_caught: AtomicU64,
    /// Spot checks passed.
    pub mesh_checked: AtomicU64,
}

/// A running job, from [`PrefixCache::busy`].
#[derive(Debug)]
pub struct BusyGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The outcome of [`PrefixCache::load_prefix`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Blocks imported.
    pub blocks: usize,
    /// Of which from RAM.
    pub from_ram: usize,
    /// Of which from disk.
    pub from_disk: usize,
}

/// The RAM and disk tiers behind one interface. Shared by all models of a
/// node (keys include the model id).
pub struct PrefixCache {
    cfg: KvCacheConfig,
    ram: Mutex<RamTier>,
    disk: Option<Arc<DiskTier>>,
    writer: Option<disk::WriteBehind>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
    stats: KvStats,
    foreign: Mutex<std::collections::HashSet<BlockKey>>,
    remote: std::sync::OnceLock<Arc<remote::RemoteTier>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl PrefixCache {
    /// Opens the tiers (the disk tier indexes `disk_dir`, creating it);
    /// lookups and tier sizes are reported to `metrics`.
    pub fn open(cfg: KvCacheConfig, metrics: Arc<Metrics>) -> Result<PrefixCache, KvCacheError> {
        if cfg.block_tokens == 0 || cfg.block_tokens > 4096 {
            return Err(KvCacheError::Config(
                "block_tokens must be between 1 and 4096".into(),
            ));
        }
        let disk = match &cfg.disk_dir {
            Some(d) => Some(Arc::new(
                DiskTier::open(d, cfg.disk_budget)?.with_write_budget(disk::WriteBudget::new(
                    cfg.disk_write_budget_per_hour,
                    disk::WriteBudget::HOUR,
                )),
            )),
            None => None,
        };
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = disk
            .as_ref()
            .map(|d| disk::WriteBehind::start(d.clone(), busy.clone(), metrics.clone()));
        Ok(PrefixCache {
            ram: Mutex::new(RamTier::new(cfg.ram_budget, cfg.ram_ttl)),
            cfg,
            disk,
            writer,
            busy,
            stats: KvStats::default(),
            foreign: Mutex::new(std::collections::HashSet::new()),
            remote: std::sync::OnceLock::new(),
            metrics,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &KvStats {
        &self.stats
    }

    /// The RAM tier (for inspection).
    pub fn ram(&self) -> &Mutex<RamTier> {
        &self.ram
    }

    /// The disk tier, if enabled.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_deref()
    }

    /// The key context of `model` under this cache's block size and format.
    pub fn context(&self, model: &Model) -> KeyContext {
        KeyContext::for_model(model, self.cfg.dtype, self.cfg.block_tokens)
    }

    /// Looks a block up in RAM, then on disk (promoting disk hits to RAM).
    pub fn get(&self, key: &BlockKey) -> Option<(Arc<Vec<u8>>, Tier)> {
        if let Some(b) = self.ram.lock().get(key) {
            return Some((b, Tier::Ram));
        }
        let disk = self.disk.as_ref()?;
        match disk.get(key) {
            Ok(Some(b)) => {
                let b = Arc::new(b);
                self.ram.lock().insert(*key, b.clone());
                Some((b, Tier::Disk))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(key = ?key, error = %e, "dropping unreadable KV block from disk");
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores a block in RAM and queues it for the disk tier.
    pub fn put(&self, key: BlockKey, blob: Arc<Vec<u8>>) {
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        self.ram.lock().insert(key, blob.clone());
        if let Some(w) = &self.writer {
            w.queue(key, blob);
        }
    }

    /// Marks a job as running until the guard is dropped: disk writes wait
    /// for it (a bounded time, see [`disk::WRITE_DEFER`]).
    pub fn busy(&self) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self.busy.clone())
    }

    /// Attaches the remote tier (neighbours over the mesh; once).
    pub fn set_remote(&self, tier: Arc<remote::RemoteTier>) {
        let _ = self.remote.set(tier);
    }

    /// The remote tier, if attached.
    pub fn remote(&self) -> Option<&Arc<remote::RemoteTier>> {
        self.remote.get()
    }

    /// Stores a block fetched from a neighbour: RAM only, and never served
    /// to others (this node did not compute it).
    pub fn put_foreign(&self, key: BlockKey, blob: Arc<Vec<u8>>) {
        self.foreign.lock().insert(key);
        self.ram.lock().insert(key, blob);
    }

    /// True if a tier holds `key` and this node computed it (what a
    /// neighbour may be offered).
    pub fn holds_own(&self, key: &BlockKey) -> bool {
        !self.is_foreign(key)
            && (self.ram.lock().contains(key)
                || self.disk.as_ref().is_some_and(|d| d.contains(key)))
    }

    /// True if the RAM or disk tier holds `key` (own or foreign).
    pub fn holds(&self, key: &BlockKey) -> bool {
        self.ram.lock().contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// True for blocks that came from a neighbour.
    pub fn is_foreign(&self, key: &BlockKey) -> bool {
        self.foreign.lock().contains(key)
    }

    /// Drops a block from every tier (it was found to be bad).
    pub fn remove(&self, key: &BlockKey) {
        self.foreign.lock().remove(key);
        self.ram.lock().remove(key);
        if let Some(d) = &self.disk {
            d.remove(key);
        }
    }

    /// Drops every stored entry holding KV computed by `model` (its id as
    /// written in the blocks): KV blocks, tail records and decoded blocks
    /// in RAM, block files on disk, and the tail records that refer to a
    /// dropped block. Returns how many entries were dropped (a block held
    /// in RAM and on disk counts twice). For KV computed from bytes later
    /// found corrupt: call it when no engine runs on that model any more
    /// (queued disk writes are flushed first). A disk error is logged and
    /// ends the disk pass (what it dropped is counted).
    pub fn drop_model(&self, model: &[u8; 32]) -> usize {
        use std::collections::HashSet;
        use tail::Owner;
        self.flush();
        let own = |b: &[u8]| matches!(tail::owner(b), Owner::Model(m) if &m == model);
        let mut gone: HashSet<BlockKey> = self
            .ram
            .lock()
            .remove_if(|_, e| match e {
                ram::RamEntry::Blob(b) => own(b),
                ram::RamEntry::Decoded { model: m } => m == model,
            })
            .into_iter()
            .collect();
        let mut n = gone.len();
        if let Some(d) = &self.disk {
            match d.remove_model(model, &gone) {
                Ok(keys) => {
                    n += keys.len();
                    gone.extend(keys);
                }
                Err(e) => {
                    tracing::warn!(error = %e, dir = %d.dir().display(), "dropping a model's KV blocks from disk failed");
                }
            }
        }
        // Tail records in RAM referring to a dropped block.
        let refs = self.ram.lock().remove_if(|_, e| match e {
            ram::RamEntry::Blob(b) => {
                matches!(tail::owner(b), Owner::Refers(k) if gone.contains(&k))
            }
            ram::RamEntry::Decoded { .. } => false,
        });
        n += refs.len();
        gone.extend(refs);
        self.foreign.lock().retain(|k| !gone.contains(k));
        tracing::info!(model = %hex::encode(model), dropped = n, "KV blocks of a model dropped");
        self.report_usage();
        n
    }

    /// Waits until every queued disk write is done.
    pub fn flush(&self) {
        if let Some(w) = &self.writer {
            w.flush();
        }
    }

    /// Imports the longest run of cached blocks for `keys` into `cache`
    /// (which must be empty). A block that fails to import (checksum,
    /// model, layout) is dropped from the tiers and ends the run.
    pub fn load_prefix(
        &self,
        keys: &[BlockKey],
        model_id: &[u8; 32],
        cache: &mut KvCache,
    ) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !cache.is_empty() {
            return hit;
        }
        if cache.dtype() != self.cfg.dtype {
            // Its values would not be the blocks' (and the blocks would not
            // import): a caller's mistake, not a bad block.
            tracing::warn!(cache = ?cache.dtype(), blocks = ?self.cfg.dtype, "KV cache of another dtype; prefix cache not used");
            return hit;
        }
        let m = &self.metrics;
        // Decoded storage blocks first: shared into the cache, no copy.
        if self.decoded_usable() {
            let mut j = 0;
            while let Some(key) = keys.get(self.covering(j)) {
                let Some(sb) = self.ram.lock().get_decoded(&decoded_key(key, j)) else {
                    break;
                };
                if cache.push_shared(sb).is_err() {
                    break;
                }
                j += 1;
            }
            // Back to a boundary of the key blocks (when they span several).
            cache.truncate(cache.len() / self.cfg.block_tokens * self.cfg.block_tokens);
            hit.blocks = cache.len() / self.cfg.block_tokens;
            hit.from_ram = hit.blocks;
            self.stats
                .ram_hits
                .fetch_add(hit.blocks as u64, Ordering::Relaxed);
            m.kv_lookup(Tier::Ram, true, hit.blocks as u64);
        }
        let first_decoded = cache.len() / BLOCK_TOKENS;
        // The run of blocks a tier holds, read (and disk reads verified) in
        // parallel: after a restart they all come from disk.
        let rest = &keys[hit.blocks..];
        let held = rest.iter().take_while(|k| self.holds(k)).count();
        let mut fetched = {
            use rayon::prelude::*;
            rest[..held]
                .par_iter()
                .map(|k| self.get(k))
                .collect::<Vec<_>>()
                .into_iter()
        };
        for key in rest {
            let got = match fetched.next() {
                Some(g) => g,
                None => self.get(key),
            };
            let Some((blob, tier)) = got else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                m.kv_lookup(Tier::Ram, false, 1);
                if self.disk.is_some() {
                    m.kv_lookup(Tier::Disk, false, 1);
                }
                break;
            };
            // RAM blobs were checked when they entered memory (computed here,
            // read and verified from disk, or verified from a neighbour), and
            // a disk hit was verified just now: no second checksum pass.
            if let Err(e) = cache.import_append_prefix(&blob, model_id, usize::MAX, false) {
                tracing::warn!(key = ?key, error = %e, "dropping a KV block that does not import");
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                self.remove(key);
                break;
            }
            hit.blocks += 1;
            match tier {
                Tier::Ram => {
                    hit.from_ram += 1;
                    self.stats.ram_hits.fetch_add(1, Ordering::Relaxed);
                    m.kv_lookup(Tier::Ram, true, 1);
                }
                Tier::Disk => {
                    hit.from_disk += 1;
                    self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                    m.kv_lookup(Tier::Ram, false, 1);
                    m.kv_lookup(Tier::Disk, true, 1);
                }
            }
        }
        // Keep what was decoded for next time.
        self.keep_decoded(cache, keys, first_decoded, false, model_id);
        self.report_usage();
        hit
    }

    /// True when storage blocks line up with key blocks (one divides the other).
    fn decoded_usable(&self) -> bool {
        let b = self.cfg.block_tokens;
        self.cfg.ram_budget > 0
            && (BLOCK_TOKENS.is_multiple_of(b) || b.is_multiple_of(BLOCK_TOKENS))
    }

    /// The key block holding the last position of storage block `j`: its key
    /// pins every token that block depends on.
    fn covering(&self, j: usize) -> usize {
        ((j + 1) * BLOCK_TOKENS - 1) / self.cfg.block_tokens
    }

    /// Keeps the full storage blocks `from_j..` of `cache` (whose key
    /// blocks are `keys`) in the RAM tier as decoded entries, up to the
    /// first block that depends on a neighbour's KV. With `round`, values
    /// are first rounded through the storage dtype (blocks computed in f32),
    /// so every tier gives the very same KV; without, the blocks were
    /// imported from blobs and are shared as they are.
    fn keep_decoded(
        &self,
        cache: &KvCache,
        keys: &[BlockKey],
        from_j: usize,
        round: bool,
        model_id: &[u8; 32],
    ) {
        if !self.decoded_usable() {
            return;
        }
        let own = keys
            .iter()
            .position(|k| self.is_foreign(k))
            .unwrap_or(keys.len());
        for j in from_j..cache.len() / BLOCK_TOKENS {
            let i = self.covering(j);
            if i >= own {
                break;
            }
            let dk = decoded_key(&keys[i], j);
            if self.ram.lock().contains(&dk) {
                continue;
            }
            let sb = if round {
                cache.rounded_block(j, self.cfg.dtype)
            } else {
                cache.shared_block(j)
            };
            if let Some(sb) = sb {
                self.ram.lock().insert_decoded(dk, sb, *model_id);
            }
        }
    }

    /// Stores the tail record `key` (see [`tail`]) for `tokens`, replacing
    /// the previous one (skipped when it holds the same): a reference to
    /// the full block `block` when given (whose first positions hold
    /// `tokens`), else the KV of positions `start..start + tokens.len()` of
    /// `cache` inline.
    pub fn store_tail(
        &self,
        key: BlockKey,
        tokens: &[u32],
        block: Option<BlockKey>,
        cache: &KvCache,
        start: usize,
        model_id: &[u8; 32],
    ) {
        if tokens.is_empty() {
            return;
        }
        if let Some(old) = self.ram.lock().get(&key)
            && tail::decode(&old).is_ok_and(|r| {
                r.tokens == tokens
                    && match (r.kv, block) {
                        (tail::TailKv::Block(k), Some(b)) => k == b,
                        (tail::TailKv::Inline(_), None) => true,
                        _ => false,
                    }
            })
        {
            return;
        }
        let rec = match block {
            Some(k) => tail::encode(tokens, &tail::TailKv::Block(k)),
            None => match cache.export(start..start + tokens.len(), self.cfg.dtype, model_id) {
                Ok(kv) => tail::encode(tokens, &tail::TailKv::Inline(&kv)),
                Err(e) => {
                    tracing::warn!(error = %e, "KV tail export failed");
                    return;
                }
            },
        };
        self.put(key, Arc::new(rec));
    }

    /// Imports the longest common prefix of the tail record `key` and
    /// `want` (the tokens after `cache`'s positions) into `cache`; returns
    /// the positions imported. A record that does not decode or import is
    /// dropped; a referenced block no tier holds gives 0.
    pub fn load_tail(
        &self,
        key: &BlockKey,
        want: &[u32],
        model_id: &[u8; 32],
        cache: &mut KvCache,
    ) -> usize {
        if cache.dtype() != self.cfg.dtype {
            return 0;
        }
        let Some((blob, _)) = self.get(key) else {
            return 0;
        };
        let rec = match tail::decode(&blob) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = ?key, error = %e, "dropping a KV tail record");
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                self.remove(key);
                return 0;
            }
        };
        let n = rec
            .tokens
            .iter()
            .zip(want)
            .take_while(|(a, b)| a == b)
            .count();
        if n == 0 {
            return 0;
        }
        let (kv, bad_key) = match rec.kv {
            tail::TailKv::Inline(kv) => (kv, *key),
            tail::TailKv::Block(k) => match self.get(&k) {
                Some((b, _)) if !tail::is_tail(&b) => {
                    return self.import_tail(&b, n, model_id, cache, k);
                }
                _ => return 0,
            },
        };
        self.import_tail(kv, n, model_id, cache, bad_key)
    }

    fn import_tail(
        &self,
        kv: &[u8],
        n: usize,
        model_id: &[u8; 32],
        cache: &mut KvCache,
        key: BlockKey,
    ) -> usize {
        // Checked when it entered memory (see load_prefix) or by decode.
        match cache.import_append_prefix(kv, model_id, n, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(key = ?key, error = %e, "dropping KV that does not import");
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                self.remove(&key);
                0
            }
        }
    }

    /// Publishes the tiers' sizes to this cache's metrics.
    pub fn report_usage(&self) {
        let m = &self.metrics;
        let (n, used) = {
            let r = self.ram.lock();
            (r.len() as u64, r.used())
        };
        m.kv_usage(Tier::Ram, n, used);
        if let Some(d) = &self.disk {
            m.kv_usage(Tier::Disk, d.len() as u64, d.used());
        }
    }

    /// Exports and stores blocks `from..` of `cache` (full blocks only);
    /// `keys` are the keys of the tokens `cache` holds.
    pub fn store_blocks(
        &self,
        cache: &KvCache,
        keys: &[BlockKey],
        from: usize,
        model_id: &[u8; 32],
    ) {
        let b = self.cfg.block_tokens;
        let full = (cache.len() / b).min(keys.len());
        for (i, key) in keys.iter().enumerate().take(full).skip(from) {
            if self.ram.lock().contains(key) || self.is_foreign(key) {
                continue;
            }
            match cache.export(i * b..(i + 1) * b, self.cfg.dtype, model_id) {
                Ok(blob) => self.put(*key, Arc::new(blob)),
                Err(e) => {
                    tracing::warn!(error = %e, "KV export failed");
                    break;
                }
            }
        }
        self.keep_decoded(cache, keys, 0, true, model_id);
        self.report_usage();
    }
}

/// Deletes the disk-tier files under `kv_dir` (`<data-dir>/kv`) holding KV
/// computed by `model` (its id as written in the blocks), and the tail
/// records referring to those blocks; returns how many files were deleted.
/// For use while no prefix cache has the directory open (e.g. `shoal
/// verify` with the daemon stopped): a running node calls
/// [`PrefixCache::drop_model`]. A missing directory holds nothing (0).
/// Files that are not valid block files are left alone.
pub fn purge_model_on_disk(
    kv_dir: &std::path::Path,
    model: &[u8; 32],
) -> Result<usize, KvCacheError> {
    if !kv_dir.exists() {
        return Ok(0);
    }
    let gone = disk::purge_model_files(
        kv_dir,
        model,
        &std::collections::HashSet::new(),
        |_, path| match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    )?;
    tracing::info!(dir = %kv_dir.display(), model = %hex::encode(model), dropped = gone.len(), "KV blocks of a model purged from disk");
    Ok(gone.len())
}

/// The RAM-tier key of storage block `j` decoded, pinned by key block `key`.
fn decoded_key(key: &BlockKey, j: usize) -> BlockKey {
    let mut h = blake3::Hasher::new();
    h.update(b"shoal-kv-f32-v1");
    h.update(&key.0);
    h.update(&(j as u64).to_le_bytes());
    BlockKey(*h.finalize().as_bytes())
}

impl Drop for PrefixCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> KeyContext {
        KeyContext {
            model_id: [1; 32],
            tokenizer_id: [2; 32],
            dtype: KvDtype::F16,
            block_tokens: 4,
        }
    }

    #[test]
    fn keys_chain_and_depend_on_everything() {
        let c = ctx();
        let a = c.keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.len(), 2, "partial block has no key");
        let b = c.keys(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a, b);
        // Same second block after another first block: another key.
        let d = c.keys(&[0, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(a[1], d[1]);
        assert_ne!(a[0], d[0]);
        for other in [
            KeyContext {
                model_id: [9; 32],
                ..c
            },
            KeyContext {
                tokenizer_id: [9; 32],
                ..c
            },
            KeyContext {
                dtype: KvDtype::Q8_0,
                ..c
            },
        ] {
            assert_ne!(other.keys(&[1, 2, 3, 4])[0], a[0]);
        }
    }

    /// A 2-layer cache holding `n` positions of distinct values, the model id
    /// and the 16-token block keys of tokens `0..n`.
    fn filled_cache(n: u32) -> (KvCache, [u8; 32], Vec<BlockKey>) {
        use crate::inference::KvLayout;
        let l = KvLayout {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 32,
        };
        let mut c = KvCache::new(l);
        for p in 0..n as usize {
            let k: Vec<f32> = (0..64).map(|i| (p * 64 + i) as f32 / 300.0).collect();
            c.append(&k, &k).expect("append");
        }
        let cx = KeyContext {
            block_tokens: 16,
            ..ctx()
        };
        (c, [8u8; 32], cx.keys(&(0..n).collect::<Vec<u32>>()))
    }

    #[test]
    fn decoded_ram_blocks_equal_imported_blobs_and_skip_foreign() {
        let (c, id, keys) = filled_cache(70);
        let l = c.layout();
        let pc = PrefixCache::open(KvCacheConfig::default(), Arc::default()).expect("open");
        pc.store_blocks(&c, &keys, 0, &id);
        // 4 blobs and 2 decoded storage blocks (64 positions).
        assert_eq!(pc.ram().lock().len(), 4 + 2);
        let mut a = KvCache::new(l);
        assert_eq!(pc.load_prefix(&keys, &id, &mut a).blocks, 4);
        let mut b = KvCache::new(l);
        for k in &keys {
            let (blob, _) = pc.get(k).expect("blob");
            b.import_append(&blob, &id).expect("import");
        }
        for p in [0, 33, 63] {
            assert_eq!(a.get(1, 1, 0, p), b.get(1, 1, 0, p), "position {p}");
        }
        // Nothing decoded from the first foreign block on.
        let pc = PrefixCache::open(KvCacheConfig::default(), Arc::default()).expect("open");
        pc.put_foreign(keys[2], Arc::new(Vec::new()));
        pc.store_blocks(&c, &keys, 0, &id);
        let decoded = (0..2)
            .filter(|&j| {
                pc.ram()
                    .lock()
                    .get_decoded(&decoded_key(&keys[2 * j + 1], j))
                    .is_some()
            })
            .count();
        assert_eq!(decoded, 1);
    }

    /// Two models' blocks, decoded blocks and tail records (inline and by
    /// reference) in RAM and on disk, with a stray file that is not a
    /// valid block file.
    fn two_models(dir: &std::path::Path) -> (PrefixCache, [KeyContext; 2], Vec<Vec<BlockKey>>) {
        use crate::inference::KvLayout;
        let l = KvLayout {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 32,
        };
        let pc = PrefixCache::open(
            KvCacheConfig {
                block_tokens: 16,
                disk_dir: Some(dir.to_path_buf()),
                ..KvCacheConfig::default()
            },
            Arc::default(),
        )
        .expect("open");
        let cxs = [[0xaa; 32], [0xbb; 32]].map(|m| KeyContext {
            model_id: m,
            block_tokens: 16,
            ..ctx()
        });
        let tokens: Vec<u32> = (0..70).collect();
        let mut all_keys = Vec::new();
        for (i, cx) in cxs.iter().enumerate() {
            let mut c = KvCache::new(l);
            for p in 0..70 {
                let k: Vec<f32> = (0..64).map(|x| (p * 64 + x + i) as f32 / 300.0).collect();
                c.append(&k, &k).expect("append");
            }
            let keys = cx.keys(&tokens);
            pc.store_blocks(&c, &keys, 0, &cx.model_id);
            // Inline tail after the last full block, reference tail after the first.
            pc.store_tail(
                cx.tail_key(Some(&keys[3])),
                &tokens[64..70],
                None,
                &c,
                64,
                &cx.model_id,
            );
            pc.store_tail(
                cx.tail_key(Some(&keys[0])),
                &tokens[16..20],
                Some(keys[1]),
                &c,
                16,
                &cx.model_id,
            );
            all_keys.push(keys);
        }
        pc.flush();
        std::fs::write(
            dir.join(format!("{}.kvb", hex::encode([0xcc; 32]))),
            b"not a block",
        )
        .expect("stray");
        (pc, cxs, all_keys)
    }

    /// With a write budget of two blocks per hour the disk tier writes two
    /// blocks and no more; every block is still served from RAM, and after a
    /// restart the two on disk are read back, checked and imported.
    #[test]
    fn write_budget_stops_disk_writes_and_the_cache_stays_correct() {
        let (c, id, keys) = filled_cache(64);
        let l = c.layout();
        assert_eq!(keys.len(), 4);
        let d = tempfile::tempdir().expect("tmp");
        let file_size = {
            let blob = c.export(0..16, KvDtype::F16, &id).expect("export");
            disk::encode(&keys[0], &blob).len() as u64
        };
        let cfg = KvCacheConfig {
            block_tokens: 16,
            disk_dir: Some(d.path().to_path_buf()),
            disk_write_budget_per_hour: 2 * file_size + file_size / 2,
            ..KvCacheConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let pc = PrefixCache::open(cfg.clone(), metrics.clone()).expect("open");
        pc.store_blocks(&c, &keys, 0, &id);
        pc.flush();
        let disk = pc.disk().expect("disk tier");
        assert_eq!(disk.len(), 2, "only two blocks fit in the hour's budget");
        assert_eq!(files(d.path()), 2);
        assert!(disk.contains(&keys[0]) && disk.contains(&keys[1]));
        let text = metrics.render();
        let v = |s: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(s)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        assert_eq!(
            v("shoal_kv_disk_written_bytes_total"),
            Some((2 * file_size) as f64)
        );
        assert_eq!(v("shoal_kv_disk_writes_skipped_total"), Some(2.0));
        // Still answered in full, from RAM.
        let mut a = KvCache::new(l);
        let hit = pc.load_prefix(&keys, &id, &mut a);
        assert_eq!((hit.blocks, hit.from_disk), (4, 0));
        assert_eq!(a.get(1, 0, 0, 63), c.get(1, 0, 0, 63));
        drop(pc);
        // Restart: the two blocks on disk come back, checked; the rest is a miss.
        let pc = PrefixCache::open(cfg.clone(), Arc::default()).expect("reopen");
        let mut a = KvCache::new(l);
        let hit = pc.load_prefix(&keys, &id, &mut a);
        assert_eq!((hit.blocks, hit.from_disk), (2, 2));
        assert_eq!(a.len(), 32);
        for p in [0, 17, 31] {
            assert_eq!(a.get(1, 0, 1, p), c.get(1, 0, 1, p), "position {p}");
        }
        drop(pc);
        // A block on disk damaged meanwhile is refused, not imported.
        let path = d.path().join(format!("{}.kvb", keys[0].to_hex()));
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&path, &bytes).expect("write");
        let pc = PrefixCache::open(cfg, Arc::default()).expect("reopen");
        let mut a = KvCache::new(l);
        assert_eq!(pc.load_prefix(&keys, &id, &mut a).blocks, 0);
        assert_eq!(pc.stats().corrupt_dropped.load(Ordering::Relaxed), 1);
    }

    fn files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).expect("dir").count()
    }

    #[test]
    fn drop_model_drops_ram_and_disk_of_that_model_only() {
        use crate::inference::KvLayout;
        let l = KvLayout {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 32,
        };
        let d = tempfile::tempdir().expect("tmp");
        let (pc, [a, b], keys) = two_models(d.path());
        // Per model: 4 blocks + 2 tail records on disk; the stray file.
        assert_eq!(files(d.path()), 2 * 6 + 1);
        let ram_before = pc.ram().lock().len();
        // RAM: per model 4 blobs, 2 decoded blocks, 2 tail records.
        assert_eq!(ram_before, 2 * 8);
        let n = pc.drop_model(&a.model_id);
        assert_eq!(n, 8 + 6, "RAM entries and disk files of model a");
        assert_eq!(pc.ram().lock().len(), 8);
        assert_eq!(files(d.path()), 6 + 1, "b's files and the stray one stay");
        let mut c = KvCache::new(l);
        assert_eq!(pc.load_prefix(&keys[0], &a.model_id, &mut c).blocks, 0);
        let want: Vec<u32> = (64..70).collect();
        assert_eq!(
            pc.load_tail(&a.tail_key(Some(&keys[0][3])), &want, &a.model_id, &mut c),
            0
        );
        let mut c = KvCache::new(l);
        assert_eq!(pc.load_prefix(&keys[1], &b.model_id, &mut c).blocks, 4);
        assert_eq!(
            pc.load_tail(&b.tail_key(Some(&keys[1][3])), &want, &b.model_id, &mut c),
            6
        );
        assert_eq!(pc.drop_model(&a.model_id), 0, "nothing left to drop");
        drop(pc);
        // After a restart the disk tier still has nothing of a, all of b.
        let pc = PrefixCache::open(
            KvCacheConfig {
                block_tokens: 16,
                disk_dir: Some(d.path().to_path_buf()),
                ..KvCacheConfig::default()
            },
            Arc::default(),
        )
        .expect("reopen");
        let mut c = KvCache::new(l);
        assert_eq!(pc.load_prefix(&keys[0], &a.model_id, &mut c).blocks, 0);
        let mut c = KvCache::new(l);
        let hit = pc.load_prefix(&keys[1], &b.model_id, &mut c);
        assert_eq!((hit.blocks, hit.from_disk), (4, 4));
    }

    #[test]
    fn purge_model_on_disk_without_a_running_cache() {
        let d = tempfile::tempdir().expect("tmp");
        let (pc, [a, b], _) = two_models(d.path());
        drop(pc);
        assert_eq!(files(d.path()), 13);
        assert_eq!(
            purge_model_on_disk(d.path(), &a.model_id).expect("purge"),
            6
        );
        assert_eq!(files(d.path()), 7, "b's 6 files and the stray one stay");
        assert_eq!(
            purge_model_on_disk(d.path(), &a.model_id).expect("again"),
            0
        );
        let stray = d.path().join(format!("{}.kvb", hex::encode([0xcc; 32])));
        assert_eq!(std::fs::read(&stray).expect("stray"), b"not a block");
        assert_eq!(
            purge_model_on_disk(d.path(), &b.model_id).expect("purge b"),
            6
        );
        assert_eq!(files(d.path()), 1);
        let missing = d.path().join("nope");
        assert_eq!(
            purge_model_on_disk(&missing, &a.model_id).expect("missing"),
            0
        );
    }

    #[test]
    fn tail_key_fixture_v1() {
        // Pins the tail key derivation: changing it must change tail::TAIL_DOMAIN.
        let c = ctx();
        let k = c.keys(&[1, 2, 3, 4]);
        let t = c.tail_key(Some(&k[0]));
        assert_ne!(t, c.tail_key(None));
        assert_ne!(t, k[0]);
        assert_ne!(
            t,
            KeyContext {
                block_tokens: 8,
                ..c
            }
            .tail_key(Some(&k[0]))
        );
        assert_eq!(
            t.to_hex(),
            "7e51eba64bc6232b067e6b1296187c1cf3b0111ce34083809af4c47187e52417"
        );
    }

    #[test]
    fn key_fixture_v1() {
        // Pins the key derivation: changing it must change KEY_DOMAIN.
        let k = ctx().keys(&[1, 2, 3, 4]);
        assert_eq!(
            k[0].to_hex(),
            "2b4ecaf1d268680ecf28753395230a19257a9f689f7ed63588f4e07409e93855"
        );
    }
}
