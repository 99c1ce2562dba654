//! Model loading (memory-mapped GGUF) and the forward pass of the
//! supported families (llama/mistral, qwen2, qwen3, gemma3, phi3).
//!
//! Layout (as llama.cpp's): `hparams.rs` reads the metadata, `load.rs` the
//! tensors, `forward.rs` is the one shared forward pass, and `arch/` holds
//! what differs per family, one file each.

mod arch;
mod forward;
mod hparams;
mod load;
#[cfg(test)]
mod parity;

pub use hparams::HParams;

use super::InferenceError;
use super::kernels::Isa;
use super::kv::{KvCache, KvDtype, KvLayout};
use super::quant::{Exec, QMatrix, dequant};
use super::tokenizer::Tokenizer;
use crate::gguf::{Gguf, Value};
use arch::Act;
use forward::{Rope, Want};
use load::{Layer, matrix, opt_vector};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Options for [`Model::load_with`].
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// Worker threads for matmuls and attention; 0 = all available cores.
    pub threads: usize,
    /// The 32-byte model id written into exported KV caches (the store's
    /// artifact id). `None`: BLAKE3 of the file, computed on first use.
    pub model_id: Option<[u8; 32]>,
    /// Tokens per forward batch during prompt processing; 0 = 256.
    pub batch: usize,
    /// Context length to run with; 0 = the model's trained context. Lower
    /// values cap [`HParams::context_length`] (and select Phi-3's short RoPE
    /// factors when at most the original context, as llama.cpp's `n_ctx`).
    pub context: usize,
    /// Run matmuls on dequantized weights and unquantized f32 activations:
    /// a slow accuracy reference for tests.
    #[doc(hidden)]
    pub reference_matmul: bool,
}

/// One sequence of a [`Model::forward_many`] batch.
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The sequence's cache; the tokens' keys and values are appended.
    pub cache: &'a mut KvCache,
    /// Tokens to run after the cache's contents (at least one).
    pub tokens: &'a [u32],
    /// Whether to compute the logits of the last token (a prompt chunk
    /// before the last needs none: the output matrix is skipped).
    pub logits: bool,
}

/// A loaded model: the mapping, tensor views, tokenizer and worker pool.
/// Share it with `Arc`; forward passes take `&self`.
pub struct Model {
    map: super::mapguard::GuardedMap,
    path: PathBuf,
    hp: HParams,
    act: Act,
    tok_embd: QMatrix,
    output: QMatrix,
    output_norm: Option<Vec<f32>>,
    layers: Vec<Layer>,
    /// RoPE of the global layers, then of the sliding-window layers.
    rope: [Rope; 2],
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<String>,
    exec: Exec,
    id: OnceLock<[u8; 32]>,
    batch: usize,
    load_time: Duration,
    tokenizer_load_time: Duration,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("hparams", &self.hp)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a GGUF model with default options (all cores).
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, InferenceError> {
        Self::load_with(path, &ModelConfig::default())
    }

    /// Loads a GGUF model: maps the file, checks every tensor the forward
    /// pass needs (names, shapes, types, bounds, alignment) and builds the
    /// tokenizer. Tensor data is not read or copied here.
    pub fn load_with(
        path: impl AsRef<Path>,
        cfg: &ModelConfig,
    ) -> Result<Arc<Self>, InferenceError> {
        let t0 = Instant::now();
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path)?;
        // The store never rewrites an activated artifact in place, but root
        // can truncate it: the guard turns the lost pages into zeros (not a
        // SIGBUS that kills the node) and marks the map damaged, which
        // `mapping_damaged` reports and the serving engine checks.
        let map = super::mapguard::GuardedMap::map(&file)?;
        let g = Gguf::parse(&map)?;
        let arch_name = g
            .architecture()
            .ok_or_else(|| InferenceError::BadModel("missing general.architecture".into()))?
            .to_owned();
        let fam = arch::family(&arch_name)
            .ok_or_else(|| InferenceError::UnsupportedArchitecture(arch_name.clone()))?;
        let mut hp = HParams::read(&g, arch_name, fam)?;
        if cfg.context > 0 {
            hp.context_length = hp.context_length.min(cfg.context);
        }
        let d = hp.n_embd;
        let tok_embd = matrix(&g, &map, "token_embd.weight", d, hp.vocab_size)?;
        let output = if g.tensor("output.weight").is_some() {
            matrix(&g, &map, "output.weight", d, hp.vocab_size)?
        } else {
            tok_embd.clone()
        };
        let output_norm = opt_vector(&g, &map, "output_norm.weight", d)?;
        let layers = (0..hp.n_layer)
            .map(|i| load::layer(&g, &map, &hp, fam, i))
            .collect::<Result<Vec<_>, _>>()?;
        let rope = ropes(&g, &map, &hp, fam)?;
        let t_tok = Instant::now();
        let tokenizer = Tokenizer::shared(&g, &file)?;
        let tokenizer_load_time = t_tok.elapsed();
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        let mut exec = Exec::new(threads)?;
        exec.reference = cfg.reference_matmul;
        let id = OnceLock::new();
        if let Some(i) = cfg.model_id {
            let _ = id.set(i);
        }
        drop(g);
        let load_time = t0.elapsed();
        tracing::debug!(path = %path.display(), ?load_time, ?tokenizer_load_time, isa = ?exec.isa, threads, "model loaded");
        Ok(Arc::new(Model {
            map,
            path,
            hp,
            act: fam.act,
            tok_embd,
            output,
            output_norm,
            layers,
            rope,
            tokenizer,
            chat_template,
            exec,
            id,
            batch: if cfg.batch == 0 { 256 } else { cfg.batch },
            load_time,
            tokenizer_load_time,
        }))
    }

    /// Hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The shared tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The raw `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The file this model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the mapped file in bytes.
    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    /// True once the model file was found to have shrunk while mapped:
    /// weights read since may have been zeros, so nothing computed from this
    /// model may be used any more (reload it from a good copy).
    pub fn mapping_damaged(&self) -> bool {
        self.map.damaged()
    }

    /// Wall time of [`Model::load_with`] (including the tokenizer).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Time spent building (or fetching the shared) tokenizer.
    pub fn tokenizer_load_time(&self) -> Duration {
        self.tokenizer_load_time
    }

    /// Worker threads used.
    pub fn threads(&self) -> usize {
        self.exec.threads
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.exec.isa
    }

    /// The 32-byte model id KV exports are bound to (see [`ModelConfig::model_id`]).
    pub fn id(&self) -> [u8; 32] {
        *self.id.get_or_init(|| *blake3::hash(&self.map).as_bytes())
    }

    /// The KV layout of this model.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            n_layer: self.hp.n_layer,
            n_kv_head: self.hp.n_head_kv,
            head_dim: self.hp.head_dim,
        }
    }

    /// An empty KV cache for this model, holding f16 values.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_layout())
    }

    /// An empty KV cache for this model holding values of `dtype` (the
    /// format its blocks are exported in: see [`KvCache::with_dtype`]).
    pub fn new_cache_with(&self, dtype: KvDtype) -> KvCache {
        KvCache::with_dtype(self.kv_layout(), dtype)
    }

    /// Runs `tokens` through the model after the cache's contents, appends
    /// their keys and values to `cache` and returns the logits of the last
    /// token. Long inputs are processed in batches.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        self.run(cache, tokens, Want::Last)
    }

    /// Like [`Model::forward`], but returns the logits of every token of
    /// `tokens`: row-major, `tokens.len() x vocab_size` (for perplexity).
    /// Batched as `forward`; each batch's logits are computed in one matmul.
    pub fn forward_all(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, InferenceError> {
        self.run(cache, tokens, Want::All)
    }

    /// Runs several sequences' tokens in one batch (continuous batching):
    /// each item's tokens go after its cache's contents, its keys and values
    /// are appended to its cache, and the logits of its last token (empty
    /// when `logits` is false) are returned, in item order. Each sequence gets bit for bit what
    /// [`Model::forward`] of the same tokens alone gives. The caller bounds
    /// the batch (all tokens run at once, not split like `forward`'s). An
    /// item that is invalid (no tokens, wrong layout, past the context, a
    /// bad token id) fails the whole call before anything runs.
    pub fn forward_many(
        &self,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Vec<f32>>, InferenceError> {
        for it in items.iter() {
            self.check_run(it.cache, it.tokens)?;
        }
        let mut segs: Vec<forward::Seg<'_>> = items
            .iter_mut()
            .map(|it| forward::Seg {
                cache: &mut *it.cache,
                tokens: it.tokens,
                want: if it.logits { Want::Last } else { Want::None },
            })
            .collect();
        if segs.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.exec.install(|| self.forward_segs(&mut segs)))
    }

    /// Whether `tokens` can be run as one sequence from an empty cache: at
    /// least one token, no id outside the vocabulary, no more than the context length. What
    /// [`Model::forward_many`] would refuse, checked per sequence before it
    /// joins a batch.
    pub fn check_sequence(&self, tokens: &[u32]) -> Result<(), InferenceError> {
        if tokens.is_empty() {
            return Err(InferenceError::InvalidParameter("no tokens to run".into()));
        }
        if tokens.len() > self.hp.context_length {
            return Err(InferenceError::ContextFull {
                need: tokens.len(),
                max: self.hp.context_length,
            });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.hp.vocab_size) {
            return Err(InferenceError::BadToken(t));
        }
        Ok(())
    }

    fn check_run(&self, cache: &KvCache, tokens: &[u32]) -> Result<(), InferenceError> {
        if tokens.is_empty() {
            return Err(InferenceError::InvalidParameter("no tokens to run".into()));
        }
        if cache.layout() != self.kv_layout() {
            return Err(InferenceError::Kv(
                "cache layout does not match this model".into(),
            ));
        }
        let need = cache.len() + tokens.len();
        if need > self.hp.context_length {
            return Err(InferenceError::ContextFull {
                need,
                max: self.hp.context_length,
            });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.hp.vocab_size) {
            return Err(InferenceError::BadToken(t));
        }
        Ok(())
    }

    /// Tokens per forward batch during prompt processing
    /// ([`ModelConfig::batch`]).
    pub fn batch_tokens(&self) -> usize {
        self.batch
    }

    fn run(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        want: Want,
    ) -> Result<Vec<f32>, InferenceError> {
        self.check_run(cache, tokens)?;
        let mut logits = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.batch).collect();
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            let w = match want {
                Want::All => Want::All,
                _ if i == last => Want::Last,
                _ => Want::None,
            };
            let l = self.exec.install(|| self.forward_batch(cache, c, w));
            if want == Want::All {
                logits.extend_from_slice(&l);
            } else if w == Want::Last {
                logits = l;
            }
        }
        Ok(logits)
    }

    /// Dequantizes a whole weight row: used by tests to check kernels.
    #[doc(hidden)]
    pub fn debug_embedding_row(&self, token: u32) -> Vec<f32> {
        let mut out = vec![0f32; self.hp.n_embd];
        if (token as usize) < self.hp.vocab_size {
            dequant(
                self.tok_embd.ty,
                self.tok_embd.row(&self.map, token as usize),
                &mut out,
            );
        }
        out
    }
}

/// RoPE of the global and of the sliding-window layers: the base from
/// metadata, llama's `rope_freqs` or Phi-3's LongRoPE factors as divisors.
fn ropes(
    g: &Gguf,
    map: &[u8],
    hp: &HParams,
    fam: &arch::Family,
) -> Result<[Rope; 2], InferenceError> {
    let half = hp.rope_dim / 2;
    let mut global = Rope::new(hp.rope_theta, hp.rope_dim, hp.rope_freq_scale);
    global.mscale = hp.rope_attn_factor;
    global.factors = opt_vector(g, map, "rope_freqs.weight", half)?;
    if fam.rope_factors {
        // llama.cpp `get_rope_factors`: long beyond the original context.
        let name = if hp.context_length > hp.rope_orig_context {
            "rope_factors_long.weight"
        } else {
            "rope_factors_short.weight"
        };
        if let Some(f) = opt_vector(g, map, name, half)? {
            global.factors = Some(f);
        }
    }
    if let Some(f) = &global.factors
        && let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0))
    {
        return Err(InferenceError::BadModel(format!(
            "rope frequency factor {bad} is not a positive number"
        )));
    }
    let mut local = Rope::new(hp.rope_theta_swa, hp.rope_dim, 1.0);
    local.mscale = hp.rope_attn_factor;
    Ok([global, local])
}
