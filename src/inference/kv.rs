//! The explicit per-sequence KV cache and its versioned byte format.
//!
//! Keys and values are kept in f32 storage, in blocks of [`BLOCK_TOKENS`]
//! positions shared through `Arc`: [`KvCache::fork`] copies no data (blocks
//! are cloned only when a fork writes into a shared one). Keys are stored
//! after RoPE. Every value written is first rounded through the cache's
//! [`KvDtype`] (f16 by default), so the live cache holds exactly what an
//! export and import of it holds: a prefix restored from stored blocks and
//! the same prefix computed cold give bit-identical attention.
//!
//! # Byte format (version 1, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SHOAL-KV` |
//! | 8 | 4 | format version (1) |
//! | 12 | 32 | model id (store artifact id or BLAKE3 of the file) |
//! | 44 | 4 | layers |
//! | 48 | 4 | kv heads |
//! | 52 | 4 | head dim |
//! | 56 | 1 | dtype: 0 = f16, 1 = q8_0 |
//! | 57 | 3 | zero |
//! | 60 | 8 | first token position `a` |
//! | 68 | 8 | token count `b - a` |
//! | 76 | … | payload: per token, per layer, K then V, per head `head_dim` values |
//! | end-32 | 32 | BLAKE3 of all preceding bytes |
//!
//! q8_0 encodes each run of 32 values as an f16 scale and 32 i8 (34 bytes),
//! like ggml's Q8_0; it needs `head_dim % 32 == 0`.

use super::InferenceError;
use half::f16;
use std::ops::Range;
use std::sync::Arc;

/// Positions per shared block.
pub const BLOCK_TOKENS: usize = 32;
/// Magic bytes of an exported KV cache.
pub const KV_MAGIC: &[u8; 8] = b"SHOAL-KV";
/// Current KV byte-format version.
pub const KV_FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 76;
const SUM_LEN: usize = 32;

/// Shape of a model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Key/value heads per block.
    pub n_kv_head: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Bytes of an export of `tokens` positions in `dtype` (header and checksum included).
    pub fn export_len(&self, tokens: usize, dtype: KvDtype) -> usize {
        HEADER_LEN
            + tokens * self.n_layer * 2 * self.n_kv_head * dtype.head_bytes(self.head_dim)
            + SUM_LEN
    }

    fn block_len(&self) -> usize {
        self.n_layer * 2 * self.n_kv_head * BLOCK_TOKENS * self.head_dim
    }
    #[inline]
    fn index(&self, layer: usize, kv: usize, head: usize, t: usize) -> usize {
        (((layer * 2 + kv) * self.n_kv_head + head) * BLOCK_TOKENS + t) * self.head_dim
    }
}

/// Payload encoding of an exported cache; also the `kv.dtype` setting
/// (written `"f16"` or `"q8_0"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum KvDtype {
    /// IEEE half precision (2 bytes per value): exact to what the model computed.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// ggml Q8_0 blocks (34 bytes per 32 values): about half the bytes of f16.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl KvDtype {
    fn code(self) -> u8 {
        match self {
            KvDtype::F16 => 0,
            KvDtype::Q8_0 => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(KvDtype::F16),
            1 => Some(KvDtype::Q8_0),
            _ => None,
        }
    }
    fn head_bytes(self, hd: usize) -> usize {
        match self {
            KvDtype::F16 => hd * 2,
            KvDtype::Q8_0 => hd / 32 * 34,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = InferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "q8_0" => Ok(KvDtype::Q8_0),
            _ => Err(InferenceError::InvalidParameter(format!(
                "kv dtype {s:?} (expected f16 or q8_0)"
            ))),
        }
    }
}

#[derive(Clone)]
struct Block(Vec<f32>);

impl Drop for Block {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.0));
    }
}

/// Storage of dropped blocks, reused by new ones: a prefix import or a
/// prompt fills tens of MB of fresh blocks, and taking them from the
/// allocator costs a page fault per 4 KiB (more than decoding into them).
/// Bounded by [`pool::CAP_BYTES`].
mod pool {
    use parking_lot::Mutex;

    /// Most bytes kept for reuse.
    pub(super) const CAP_BYTES: usize = 128 << 20;

    static FREE: Mutex<(usize, Vec<Vec<f32>>)> = Mutex::new((0, Vec::new()));

    /// A block of `len` values, taken from the pool when one is there. Its
    /// contents are unspecified (positions are written before they are read).
    pub(super) fn take(len: usize) -> Vec<f32> {
        {
            let mut f = FREE.lock();
            if let Some(i) = f.1.iter().rposition(|v| v.len() == len) {
                let v = f.1.swap_remove(i);
                f.0 -= len * 4;
                return v;
            }
        }
        vec![0f32; len]
    }

    pub(super) fn give(v: Vec<f32>) {
        let n = v.len() * 4;
        if n == 0 {
            return;
        }
        let mut f = FREE.lock();
        if f.0 + n <= CAP_BYTES {
            f.0 += n;
            f.1.push(v);
        }
    }
}

/// One full storage block of a cache ([`BLOCK_TOKENS`] positions, every
/// layer, f32), shared without copying: see [`KvCache::shared_block`].
#[derive(Clone)]
pub struct SharedBlock(Arc<Block>);

impl SharedBlock {
    /// Bytes of storage it holds.
    pub fn bytes(&self) -> usize {
        self.0.0.len() * 4
    }
}

/// Keys and values of one sequence, for positions `0..len()`.
///
/// Every value is kept exactly as the cache's [`KvDtype`] stores it: a
/// computed key or value is rounded through that encoding when it is
/// written, so exporting positions and importing them changes no bit, and
/// a prefix restored from blocks attends over the very values a cold
/// computation of the same tokens attends over (see docs/INFERENCE.md,
/// "KV cache and determinism").
#[derive(Clone)]
pub struct KvCache {
    layout: KvLayout,
    dtype: KvDtype,
    len: usize,
    blocks: Vec<Arc<Block>>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layout", &self.layout)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Header of an exported cache, as read by [`KvCache::inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvHeader {
    /// Format version.
    pub version: u32,
    /// Model id the cache was computed with.
    pub model_id: [u8; 32],
    /// Layout.
    pub layout: KvLayout,
    /// Payload encoding.
    pub dtype: KvDtype,
    /// Positions covered.
    pub range: Range<usize>,
}

impl KvCache {
    /// An empty cache holding f16 values (see [`KvCache::with_dtype`]).
    pub fn new(layout: KvLayout) -> Self {
        Self::with_dtype(layout, KvDtype::F16)
    }

    /// An empty cache whose values are rounded through `dtype` when they
    /// are written (for q8_0 with a head dim that is not a multiple of 32,
    /// which cannot be exported as q8_0, through f16), and which imports
    /// only blobs of that `dtype`.
    pub fn with_dtype(layout: KvLayout, dtype: KvDtype) -> Self {
        KvCache {
            layout,
            dtype,
            len: 0,
            blocks: Vec::new(),
        }
    }

    /// The encoding the values are held in.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The layout.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no positions are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops positions `n..`; no-op when `n >= len()`.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.len = n;
            self.blocks.truncate(n.div_ceil(BLOCK_TOKENS));
        }
    }

    /// A cache holding the first `n` positions (all if `n >= len()`). Blocks
    /// are shared with `self`, so this copies no key/value data.
    pub fn fork(&self, n: usize) -> KvCache {
        let mut c = self.clone();
        c.truncate(n);
        c
    }

    /// Storage block `j` (positions `j * BLOCK_TOKENS..(j + 1) * BLOCK_TOKENS`)
    /// when all its positions are held. Later writes to this cache never
    /// change it (a write into a shared block copies it first).
    pub fn shared_block(&self, j: usize) -> Option<SharedBlock> {
        if (j + 1) * BLOCK_TOKENS > self.len {
            return None;
        }
        self.blocks.get(j).map(|b| SharedBlock(b.clone()))
    }

    /// A copy of storage block `j` (when all its positions are held) with
    /// every value rounded through `dtype`: exactly what exporting its
    /// positions and importing them gives, without the bytes in between.
    pub fn rounded_block(&self, j: usize, dtype: KvDtype) -> Option<SharedBlock> {
        if (j + 1) * BLOCK_TOKENS > self.len {
            return None;
        }
        if dtype == self.dtype {
            // Values already are what a round trip through `dtype` gives.
            return self.shared_block(j);
        }
        let src = &self.blocks.get(j)?.0;
        let mut out = pool::take(src.len());
        // Head vectors are contiguous runs of head_dim values, as in an export.
        for (o, x) in out
            .chunks_exact_mut(self.layout.head_dim)
            .zip(src.chunks_exact(self.layout.head_dim))
        {
            round_through(dtype, x, o);
        }
        Some(SharedBlock(Arc::new(Block(out))))
    }

    /// Appends a full storage block (taken from a cache of the same layout
    /// by [`KvCache::shared_block`]) at `len()`, which must be a multiple of
    /// [`BLOCK_TOKENS`]. Copies nothing.
    pub fn push_shared(&mut self, b: SharedBlock) -> Result<(), InferenceError> {
        if !self.len.is_multiple_of(BLOCK_TOKENS) || b.0.0.len() != self.layout.block_len() {
            return Err(InferenceError::Kv(format!(
                "a shared block does not fit a cache of {} positions",
                self.len
            )));
        }
        self.blocks.truncate(self.len / BLOCK_TOKENS);
        self.blocks.push(b.0);
        self.len += BLOCK_TOKENS;
        Ok(())
    }

    /// Storage blocks held (shared ones included).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// An identity of each storage block held: two caches sharing a block
    /// (after [`KvCache::fork`]) report the same value for it, so memory
    /// held by several caches can be counted once.
    pub fn block_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().map(|b| Arc::as_ptr(b) as usize)
    }

    /// Storage blocks that running `n` more positions allocates or copies
    /// (a shared block written into is copied first).
    pub fn blocks_to_grow(&self, n: usize) -> usize {
        let need = (self.len + n).div_ceil(BLOCK_TOKENS);
        let first = self.len / BLOCK_TOKENS;
        let fresh = need.saturating_sub(self.blocks.len());
        let copied = self.blocks[first.min(self.blocks.len())..need.min(self.blocks.len())]
            .iter()
            .filter(|b| Arc::strong_count(b) > 1)
            .count();
        fresh + copied
    }

    /// Bytes of one storage block of `layout` (f32 keys and values of
    /// [`BLOCK_TOKENS`] positions, every layer).
    pub fn block_bytes(layout: KvLayout) -> usize {
        layout.block_len() * 4
    }

    /// Makes room for `n` more positions (allocating or un-sharing blocks).
    pub(crate) fn reserve(&mut self, n: usize) {
        let end = self.len + n;
        let need = end.div_ceil(BLOCK_TOKENS);
        let first = self.len / BLOCK_TOKENS;
        while self.blocks.len() < need {
            self.blocks
                .push(Arc::new(Block(pool::take(self.layout.block_len()))));
        }
        for b in &mut self.blocks[first..need] {
            Arc::make_mut(b);
        }
    }

    /// Writes K and V of one head at position `pos` (room made by `reserve`),
    /// rounded through the cache's dtype.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, head: usize, k: &[f32], v: &[f32]) {
        let hd = self.layout.head_dim;
        let (b, t) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS);
        let layout = self.layout;
        let dtype = self.dtype;
        let blk = &mut Arc::make_mut(&mut self.blocks[b]).0;
        let ik = layout.index(layer, 0, head, t);
        round_through(dtype, k, &mut blk[ik..ik + hd]);
        let iv = layout.index(layer, 1, head, t);
        round_through(dtype, v, &mut blk[iv..iv + hd]);
    }

    /// Marks `n` written positions as part of the cache.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Contiguous runs (one per block, `take * head_dim` values) of the keys
    /// (`kv = 0`) or values (`kv = 1`) of one head for positions `0..upto`.
    pub(crate) fn head_runs(
        &self,
        layer: usize,
        kv: usize,
        head: usize,
        upto: usize,
    ) -> impl Iterator<Item = &[f32]> + '_ {
        let hd = self.layout.head_dim;
        let i = self.layout.index(layer, kv, head, 0);
        let upto = upto.min(self.blocks.len() * BLOCK_TOKENS);
        self.blocks
            .iter()
            .take(upto.div_ceil(BLOCK_TOKENS))
            .enumerate()
            .map(move |(b, blk)| {
                let take = (upto - b * BLOCK_TOKENS).min(BLOCK_TOKENS);
                &blk.0[i..i + take * hd]
            })
    }

    /// Appends one position: `k` and `v` hold `n_layer * n_kv_head * head_dim`
    /// values each, layer-major then head.
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<(), InferenceError> {
        let l = self.layout;
        let want = l.n_layer * l.n_kv_head * l.head_dim;
        if k.len() != want || v.len() != want {
            return Err(InferenceError::Kv(format!(
                "append needs {want} keys and values, got {} and {}",
                k.len(),
                v.len()
            )));
        }
        self.reserve(1);
        let pos = self.len;
        for layer in 0..l.n_layer {
            for h in 0..l.n_kv_head {
                let o = (layer * l.n_kv_head + h) * l.head_dim;
                self.write(layer, pos, h, &k[o..o + l.head_dim], &v[o..o + l.head_dim]);
            }
        }
        self.commit(1);
        Ok(())
    }

    /// Key (`kv = 0`) or value (`kv = 1`) of one head at one position.
    pub fn get(&self, layer: usize, kv: usize, head: usize, pos: usize) -> Option<&[f32]> {
        let l = self.layout;
        if pos >= self.len || layer >= l.n_layer || kv > 1 || head >= l.n_kv_head {
            return None;
        }
        let blk = self.blocks.get(pos / BLOCK_TOKENS)?;
        let i = l.index(layer, kv, head, pos % BLOCK_TOKENS);
        blk.0.get(i..i + l.head_dim)
    }

    /// Serializes positions `range` (see the module docs for the format).
    pub fn export(
        &self,
        range: Range<usize>,
        dtype: KvDtype,
        model_id: &[u8; 32],
    ) -> Result<Vec<u8>, InferenceError> {
        let l = self.layout;
        if range.start > range.end || range.end > self.len {
            return Err(InferenceError::Kv(format!(
                "export range {range:?} outside 0..{}",
                self.len
            )));
        }
        if dtype == KvDtype::Q8_0 && !l.head_dim.is_multiple_of(32) {
            return Err(InferenceError::Kv(format!(
                "q8_0 needs a head dim divisible by 32, not {}",
                l.head_dim
            )));
        }
        let per_token = l.n_layer * 2 * l.n_kv_head * dtype.head_bytes(l.head_dim);
        let mut out = Vec::with_capacity(HEADER_LEN + per_token * range.len() + SUM_LEN);
        out.extend_from_slice(KV_MAGIC);
        out.extend_from_slice(&KV_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(model_id);
        for x in [l.n_layer, l.n_kv_head, l.head_dim] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        out.extend_from_slice(&[dtype.code(), 0, 0, 0]);
        out.extend_from_slice(&(range.start as u64).to_le_bytes());
        out.extend_from_slice(&(range.len() as u64).to_le_bytes());
        for pos in range {
            for layer in 0..l.n_layer {
                for kv in 0..2 {
                    for h in 0..l.n_kv_head {
                        let vals = self.get(layer, kv, h, pos).unwrap_or(&[]);
                        encode(dtype, vals, &mut out);
                    }
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Ok(out)
    }

    /// Reads and checks the header and checksum of an exported cache.
    pub fn inspect(bytes: &[u8]) -> Result<KvHeader, InferenceError> {
        Self::parse(bytes, true)
    }

    /// Reads and checks the header (and, with `verify`, the checksum).
    fn parse(bytes: &[u8], verify: bool) -> Result<KvHeader, InferenceError> {
        let bad = |m: &str| InferenceError::Kv(m.to_owned());
        if bytes.len() < HEADER_LEN + SUM_LEN {
            return Err(bad("blob too short"));
        }
        if &bytes[..8] != KV_MAGIC {
            return Err(bad("not a shoal KV blob (bad magic)"));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != KV_FORMAT_VERSION {
            return Err(InferenceError::Kv(format!(
                "unsupported KV format version {version} (this build reads {KV_FORMAT_VERSION})"
            )));
        }
        let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
        if verify && blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch: the KV blob is corrupted"));
        }
        let mut model_id = [0u8; 32];
        model_id.copy_from_slice(&bytes[12..44]);
        let layout = KvLayout {
            n_layer: u32_at(44) as usize,
            n_kv_head: u32_at(48) as usize,
            head_dim: u32_at(52) as usize,
        };
        let dtype = KvDtype::from_code(bytes[56]).ok_or_else(|| bad("unknown dtype"))?;
        let start = usize::try_from(u64_at(60)).map_err(|_| bad("start out of range"))?;
        let count = usize::try_from(u64_at(68)).map_err(|_| bad("count out of range"))?;
        let per_token = layout
            .n_layer
            .checked_mul(2 * layout.n_kv_head)
            .and_then(|x| x.checked_mul(dtype.head_bytes(layout.head_dim)))
            .ok_or_else(|| bad("layout overflows"))?;
        if Some(body.len() - HEADER_LEN) != per_token.checked_mul(count) {
            return Err(bad("payload length does not match the header"));
        }
        let end = start
            .checked_add(count)
            .ok_or_else(|| bad("range overflows"))?;
        Ok(KvHeader {
            version,
            model_id,
            layout,
            dtype,
            range: start..end,
        })
    }

    /// Builds a cache from a blob that starts at position 0 (holding values
    /// of the blob's dtype).
    pub fn import(
        bytes: &[u8],
        layout: KvLayout,
        model_id: &[u8; 32],
    ) -> Result<KvCache, InferenceError> {
        let h = Self::parse(bytes, false)?;
        let mut c = KvCache::with_dtype(layout, h.dtype);
        c.import_append(bytes, model_id)?;
        Ok(c)
    }

    /// Appends the positions of a blob whose range starts at `len()`.
    /// Refuses blobs of another model, another layout, another dtype, or
    /// corrupted ones.
    pub fn import_append(
        &mut self,
        bytes: &[u8],
        model_id: &[u8; 32],
    ) -> Result<(), InferenceError> {
        self.import_append_prefix(bytes, model_id, usize::MAX, true)
            .map(|_| ())
    }

    /// Appends the first `max` positions (all if fewer) of a blob whose range
    /// starts at `len()`; returns how many were appended. With `verify`
    /// false the blob's BLAKE3 checksum is not recomputed (for blobs checked
    /// when they entered memory); its header, lengths, model and layout
    /// always are. Decodes straight into the cache's storage.
    pub fn import_append_prefix(
        &mut self,
        bytes: &[u8],
        model_id: &[u8; 32],
        max: usize,
        verify: bool,
    ) -> Result<usize, InferenceError> {
        let h = Self::parse(bytes, verify)?;
        if &h.model_id != model_id {
            return Err(InferenceError::Kv(format!(
                "KV blob belongs to model {}, not {}",
                hex::encode(h.model_id),
                hex::encode(model_id)
            )));
        }
        if h.layout != self.layout {
            return Err(InferenceError::Kv(format!(
                "KV blob layout {:?} does not match {:?}",
                h.layout, self.layout
            )));
        }
        if h.dtype != self.dtype {
            return Err(InferenceError::Kv(format!(
                "KV blob holds {:?} values, this cache {:?}",
                h.dtype, self.dtype
            )));
        }
        if h.range.start != self.len {
            return Err(InferenceError::Kv(format!(
                "KV blob starts at position {}, cache holds {}",
                h.range.start, self.len
            )));
        }
        let n = h.range.len().min(max);
        let l = self.layout;
        let hd = l.head_dim;
        let hb = h.dtype.head_bytes(hd);
        self.reserve(n);
        let mut tmp = vec![f16::ZERO; hd];
        let mut off = HEADER_LEN;
        for pos in self.len..self.len + n {
            let (b, t) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS);
            // `reserve` made the block unique: this does not copy.
            let blk = &mut Arc::make_mut(&mut self.blocks[b]).0;
            for layer in 0..l.n_layer {
                for kv in 0..2 {
                    for head in 0..l.n_kv_head {
                        let i = l.index(layer, kv, head, t);
                        decode(
                            h.dtype,
                            &bytes[off..off + hb],
                            &mut blk[i..i + hd],
                            &mut tmp,
                        );
                        off += hb;
                    }
                }
            }
        }
        self.len += n;
        Ok(n)
    }
}

fn encode(dtype: KvDtype, vals: &[f32], out: &mut Vec<u8>) {
    match dtype {
        KvDtype::F16 => {
            for v in vals {
                out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        KvDtype::Q8_0 => {
            for c in vals.chunks_exact(32) {
                let (d, q) = q8_block(c);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
    }
}

/// One q8_0 run of 32 values: its f16 scale and quants (ggml's Q8_0).
#[inline]
fn q8_block(c: &[f32]) -> (f16, [i8; 32]) {
    let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    // A scale that is zero in f16 gives zero quants (not ±0 values that a
    // second round trip would turn into +0).
    let id = if f16::from_f32(d) != f16::ZERO {
        1.0 / d
    } else {
        0.0
    };
    let mut q = [0i8; 32];
    for (o, v) in q.iter_mut().zip(c) {
        *o = (v * id).round() as i8;
    }
    (f16::from_f32(d), q)
}

/// Writes `src` rounded through `dtype` to `out`: exactly what encoding
/// `src` as in an export and decoding it gives (the same functions do
/// both). q8_0 needs runs of 32 values; any other length goes through f16
/// (such a cache cannot be exported as q8_0 anyway).
fn round_through(dtype: KvDtype, src: &[f32], out: &mut [f32]) {
    match dtype {
        KvDtype::Q8_0 if src.len().is_multiple_of(32) => {
            for (o, c) in out.chunks_exact_mut(32).zip(src.chunks_exact(32)) {
                let (d, q) = q8_block(c);
                let d = d.to_f32();
                for (x, q) in o.iter_mut().zip(q) {
                    *x = f32::from(q) * d;
                }
            }
        }
        _ => {
            // f16 -> f32 is exact: any conversion matches `decode`.
            for (o, v) in out.iter_mut().zip(src) {
                *o = f16::from_f32(*v).to_f32();
            }
        }
    }
}

/// Decodes one head's values; `tmp` holds `out.len()` f16 scratch values.
fn decode(dtype: KvDtype, bytes: &[u8], out: &mut [f32], tmp: &mut [f16]) {
    match dtype {
        KvDtype::F16 => {
            use half::slice::HalfFloatSliceExt;
            for (o, c) in tmp.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]);
            }
            // Vectorized (F16C where the CPU has it).
            tmp[..out.len()].convert_to_f32_slice(out);
        }
        KvDtype::Q8_0 => {
            for (o, c) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16::from_le_bytes([c[0], c[1]]).to_f32();
                for (x, q) in o.iter_mut().zip(&c[2..]) {
                    *x = f32::from(*q as i8) * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: KvLayout = KvLayout {
        n_layer: 2,
        n_kv_head: 1,
        head_dim: 32,
    };

    fn filled(n: usize) -> KvCache {
        filled_as(n, KvDtype::F16)
    }

    fn filled_as(n: usize, dtype: KvDtype) -> KvCache {
        let mut c = KvCache::with_dtype(L, dtype);
        let w = L.n_layer * L.n_kv_head * L.head_dim;
        for p in 0..n {
            let k: Vec<f32> = (0..w).map(|i| (p * 100 + i) as f32 / 64.0).collect();
            let v: Vec<f32> = (0..w).map(|i| -((p * 100 + i) as f32) / 32.0).collect();
            c.append(&k, &v).expect("append");
        }
        c
    }

    #[test]
    fn fork_shares_and_diverges() {
        let a = filled(40);
        let mut b = a.fork(35);
        assert_eq!(b.len(), 35);
        assert_eq!(b.get(1, 0, 0, 34), a.get(1, 0, 0, 34));
        b.append(&[9.0; 64], &[9.0; 64]).expect("append");
        assert_eq!(b.get(0, 0, 0, 35), Some(&[9.0; 32][..]));
        // The original is untouched.
        assert_ne!(a.get(0, 0, 0, 35), b.get(0, 0, 0, 35));
        let mut c = a.clone();
        c.truncate(3);
        assert_eq!(c.len(), 3);
        assert!(c.get(0, 0, 0, 3).is_none());
    }

    #[test]
    fn export_import_ranges() {
        let id = [7u8; 32];
        for dtype in [KvDtype::F16, KvDtype::Q8_0] {
            let a = filled_as(70, dtype);
            let head = a.export(0..33, dtype, &id).expect("export");
            let tail = a.export(33..70, dtype, &id).expect("export");
            let mut b = KvCache::import(&head, L, &id).expect("import");
            // Out-of-order append is refused.
            assert!(b.import_append(&head, &id).is_err());
            b.import_append(&tail, &id).expect("append");
            assert_eq!(b.len(), 70);
            for p in [0, 32, 33, 69] {
                for kv in 0..2 {
                    let (x, y) = (
                        a.get(1, kv, 0, p).expect("a"),
                        b.get(1, kv, 0, p).expect("b"),
                    );
                    for (u, w) in x.iter().zip(y) {
                        assert!((u - w).abs() <= u.abs() / 100.0 + 0.01, "{u} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_corrupt_and_foreign() {
        let a = filled(5);
        let id = [1u8; 32];
        let blob = a.export(0..5, KvDtype::F16, &id).expect("export");
        let mut bad = blob.clone();
        bad[HEADER_LEN + 3] ^= 1;
        let e = KvCache::import(&bad, L, &id).expect_err("corrupt");
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = KvCache::import(&blob, L, &[2u8; 32]).expect_err("foreign");
        assert!(e.to_string().contains("belongs to model"), "{e}");
        let other = KvLayout { n_layer: 3, ..L };
        assert!(KvCache::import(&blob, other, &id).is_err());
        assert!(KvCache::import(&blob[..50], L, &id).is_err());
        let mut v2 = blob.clone();
        v2[8] = 2;
        let e = KvCache::import(&v2, L, &id).expect_err("version");
        assert!(e.to_string().contains("version"), "{e}");
    }

    #[test]
    fn partial_import_and_reused_storage() {
        let a = filled(40);
        let id = [4u8; 32];
        let blob = a.export(32..40, KvDtype::F16, &id).expect("export");
        // Without the checksum pass the header is still checked.
        let mut b = a.fork(32);
        assert!(b.import_append_prefix(&blob, &[5u8; 32], 3, false).is_err());
        let mut early = a.fork(31);
        assert!(early.import_append_prefix(&blob, &id, 3, false).is_err());
        assert_eq!(
            b.import_append_prefix(&blob, &id, 3, false)
                .expect("import"),
            3
        );
        assert_eq!(b.len(), 35);
        let (x, y) = (
            b.get(1, 1, 0, 34).expect("b"),
            a.get(1, 1, 0, 34).expect("a"),
        );
        for (u, w) in x.iter().zip(y) {
            assert!((u - w).abs() <= w.abs() / 500.0, "{u} vs {w}");
        }
        assert!(b.get(0, 0, 0, 35).is_none(), "nothing past the import");
        // Storage of dropped caches is reused; positions past len stay unreadable.
        drop(a);
        let mut c = KvCache::new(L);
        c.import_append_prefix(&blob[..], &id, 1, true)
            .expect_err("starts at 32, not 0");
        let head = filled(2).export(0..2, KvDtype::F16, &id).expect("export");
        assert_eq!(
            c.import_append_prefix(&head, &id, 9, true).expect("import"),
            2
        );
        assert!(c.get(0, 0, 0, 2).is_none());
    }

    #[test]
    fn shared_and_rounded_blocks_match_export_import() {
        let a = filled(70);
        let id = [6u8; 32];
        for dtype in [KvDtype::F16, KvDtype::Q8_0] {
            let b = KvCache::import(&a.export(0..64, dtype, &id).expect("export"), L, &id)
                .expect("import");
            let mut c = KvCache::new(L);
            for j in 0..2 {
                c.push_shared(a.rounded_block(j, dtype).expect("full block"))
                    .expect("push");
            }
            assert!(a.rounded_block(2, dtype).is_none(), "block 2 is partial");
            assert_eq!(c.len(), 64);
            for p in [0, 31, 32, 63] {
                for kv in 0..2 {
                    assert_eq!(c.get(1, kv, 0, p), b.get(1, kv, 0, p), "{dtype:?} {p}");
                }
            }
            // Appending after shared blocks copies them first: the source stays.
            let mut d = c.fork(40);
            assert!(d.push_shared(a.shared_block(0).expect("block")).is_err());
            d.append(&[1.0; 64], &[1.0; 64]).expect("append");
            assert_eq!(c.get(0, 0, 0, 40), b.get(0, 0, 0, 40));
        }
    }

    /// Written values are rounded through the cache's dtype: exporting and
    /// importing them changes no bit (also for tiny and zero runs), and a
    /// blob of another dtype is refused.
    #[test]
    fn live_values_are_round_trip_exact() {
        let id = [9u8; 32];
        let w = L.n_layer * L.n_kv_head * L.head_dim;
        for dtype in [KvDtype::F16, KvDtype::Q8_0] {
            let mut c = KvCache::with_dtype(L, dtype);
            let mut seed = 0x1234_5678_u32;
            let mut rnd = || {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            };
            for p in 0..40 {
                let scale = [1e-9f32, 1e-6, 0.0, 1.0, 300.0][p % 5];
                let k: Vec<f32> = (0..w).map(|_| rnd() * scale).collect();
                let v: Vec<f32> = (0..w).map(|_| rnd() * scale * 7.0).collect();
                c.append(&k, &v).expect("append");
            }
            let blob = c.export(0..40, dtype, &id).expect("export");
            let b = KvCache::import(&blob, L, &id).expect("import");
            assert_eq!(b.dtype(), dtype);
            for p in 0..40 {
                for layer in 0..L.n_layer {
                    for kv in 0..2 {
                        let (x, y) = (c.get(layer, kv, 0, p), b.get(layer, kv, 0, p));
                        let bits = |v: Option<&[f32]>| {
                            v.map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                        };
                        assert_eq!(bits(x), bits(y), "{dtype:?} position {p}");
                    }
                }
            }
            assert_eq!(
                b.export(0..40, dtype, &id).expect("export"),
                blob,
                "{dtype:?}: a second round trip changed bytes"
            );
            // The decoded block of a cache equals its rounded block.
            let r = c.rounded_block(0, dtype).expect("block");
            let mut d = KvCache::with_dtype(L, dtype);
            d.push_shared(r).expect("push");
            assert_eq!(d.get(1, 1, 0, 7), c.get(1, 1, 0, 7));
            let other = match dtype {
                KvDtype::F16 => KvDtype::Q8_0,
                KvDtype::Q8_0 => KvDtype::F16,
            };
            let e = KvCache::with_dtype(L, other)
                .import_append(&blob, &id)
                .expect_err("dtype mismatch accepted");
            assert!(e.to_string().contains("values, this cache"), "{e}");
        }
    }

    /// The byte format is pinned by a checked-in fixture: a 2-position,
    /// 2-layer, 1-head, head-dim-32 cache exported as f16 and as q8_0.
    #[test]
    fn fixture_v1() {
        let id = [0xab; 32];
        let f16_blob = filled_as(2, KvDtype::F16)
            .export(0..2, KvDtype::F16, &id)
            .expect("export");
        let q8_blob = filled_as(2, KvDtype::Q8_0)
            .export(0..2, KvDtype::Q8_0, &id)
            .expect("export");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        if std::env::var_os("SHOAL_REGEN_FIXTURES").is_some() {
            std::fs::write(dir.join("kv_v1_f16.bin"), &f16_blob).expect("write");
            std::fs::write(dir.join("kv_v1_q8_0.bin"), &q8_blob).expect("write");
        }
        let want_f16 = include_bytes!("../../tests/fixtures/kv_v1_f16.bin");
        let want_q8 = include_bytes!("../../tests/fixtures/kv_v1_q8_0.bin");
        assert_eq!(&f16_blob[..], &want_f16[..]);
        assert_eq!(&q8_blob[..], &want_q8[..]);
        let h = KvCache::inspect(want_q8).expect("inspect");
        assert_eq!(h.range, 0..2);
        assert_eq!(h.dtype, KvDtype::Q8_0);
        assert_eq!(h.layout, L);
        let b = KvCache::import(want_f16, L, &id).expect("import");
        assert_eq!(b.get(1, 1, 0, 1).map(|v| v[0]), Some(-132.0 / 32.0));
    }
}
