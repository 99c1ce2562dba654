//! Model loading (memory-mapped GGUF) and the llama-family forward pass.

use super::InferenceError;
use super::kernels::{self, Isa};
use super::kv::{KvCache, KvDtype, KvLayout};
use super::quant::{Exec, QMatrix, dequant};
use super::tokenizer::Tokenizer;
use crate::gguf::{GgmlType, Gguf, TensorInfo, Value};
use rayon::prelude::*;
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
    /// Run matmuls on dequantized weights and unquantized f32 activations:
    /// a slow accuracy reference for tests.
    #[doc(hidden)]
    pub reference_matmul: bool,
}

/// Hyper-parameters, all read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    /// `general.architecture`.
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_head_kv: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (≤ head_dim).
    pub rope_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Linear RoPE scaling: positions are multiplied by this (1/factor).
    pub rope_freq_scale: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Maximum context length.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

/// A loaded model: the mapping, tensor views, tokenizer and worker pool.
/// Share it with `Arc`; forward passes take `&self`.
pub struct Model {
    map: super::mapguard::GuardedMap,
    path: PathBuf,
    hp: HParams,
    tok_embd: QMatrix,
    output: QMatrix,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
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

fn meta_u(g: &Gguf, key: &str) -> Option<usize> {
    g.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
}

fn meta_f(g: &Gguf, key: &str) -> Option<f32> {
    g.get(key).and_then(Value::as_f64).map(|v| v as f32)
}

fn req_u(g: &Gguf, key: &str) -> Result<usize, InferenceError> {
    meta_u(g, key).ok_or_else(|| InferenceError::BadModel(format!("missing metadata {key}")))
}

impl HParams {
    /// Reads the hyper-parameters of a llama-family model from metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, InferenceError> {
        let arch = g
            .architecture()
            .ok_or_else(|| InferenceError::BadModel("missing general.architecture".into()))?
            .to_owned();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(InferenceError::UnsupportedArchitecture(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_layer = req_u(g, &k("block_count"))?;
        let n_embd = req_u(g, &k("embedding_length"))?;
        let n_ff = req_u(g, &k("feed_forward_length"))?;
        let n_head = req_u(g, &k("attention.head_count"))?;
        let n_head_kv = meta_u(g, &k("attention.head_count_kv")).unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_embd % n_head != 0 {
            return Err(InferenceError::BadModel(format!(
                "bad head layout: {n_head} heads, {n_head_kv} kv heads, width {n_embd}"
            )));
        }
        let head_dim = meta_u(g, &k("attention.key_length")).unwrap_or(n_embd / n_head);
        if meta_u(g, &k("attention.value_length")).is_some_and(|v| v != head_dim) {
            return Err(InferenceError::BadModel(
                "key and value head sizes differ".into(),
            ));
        }
        let rope_dim = meta_u(g, &k("rope.dimension_count")).unwrap_or(head_dim);
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(InferenceError::BadModel(format!(
                "bad rope dimension {rope_dim}"
            )));
        }
        let mut rope_freq_scale = 1.0;
        match g.get(&k("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => {}
            Some("linear") => {
                let f = meta_f(g, &k("rope.scaling.factor")).unwrap_or(1.0);
                if f > 0.0 {
                    rope_freq_scale = 1.0 / f;
                }
            }
            Some(other) => {
                return Err(InferenceError::BadModel(format!(
                    "unsupported rope scaling {other:?}"
                )));
            }
        }
        if let Some(f) = meta_f(g, &k("rope.scale_linear"))
            && f > 0.0
        {
            rope_freq_scale = 1.0 / f;
        }
        let vocab_size = meta_u(g, &k("vocab_size"))
            .or_else(|| {
                g.get("tokenizer.ggml.tokens")
                    .and_then(Value::as_array)
                    .map(<[Value]>::len)
            })
            .ok_or_else(|| InferenceError::BadModel("unknown vocabulary size".into()))?;
        Ok(HParams {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_theta: meta_f(g, &k("rope.freq_base")).unwrap_or(10000.0),
            rope_freq_scale,
            rms_eps: meta_f(g, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            context_length: meta_u(g, &k("context_length")).unwrap_or(2048),
            vocab_size,
            arch,
        })
    }
}

fn tensor<'a>(g: &'a Gguf, name: &str) -> Result<&'a TensorInfo, InferenceError> {
    g.tensor(name)
        .ok_or_else(|| InferenceError::BadModel(format!("missing tensor {name}")))
}

fn matrix(
    g: &Gguf,
    map: &[u8],
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<QMatrix, InferenceError> {
    let t = tensor(g, name)?;
    let r = g.tensor_range(t);
    let m = QMatrix::new(name, t.ty, &t.dims, r.start, t.size, map)?;
    if m.cols != cols || m.rows != rows {
        return Err(InferenceError::BadModel(format!(
            "tensor {name}: shape {}x{}, expected {rows}x{cols}",
            m.rows, m.cols
        )));
    }
    Ok(m)
}

fn vector(g: &Gguf, map: &[u8], name: &str, len: usize) -> Result<Vec<f32>, InferenceError> {
    let t = tensor(g, name)?;
    if t.elements() != len as u64 || !matches!(t.ty, GgmlType::F32 | GgmlType::F16) {
        return Err(InferenceError::BadModel(format!(
            "tensor {name}: expected {len} f32/f16 values, got {:?} {}",
            t.dims,
            t.ty.name()
        )));
    }
    let r = g.tensor_range(t);
    let bytes = map
        .get(r.start as usize..r.end as usize)
        .ok_or_else(|| InferenceError::BadModel(format!("tensor {name}: out of file")))?;
    let mut out = vec![0f32; len];
    match t.ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
    Ok(out)
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
        let hp = HParams::from_gguf(&g)?;
        let (d, hd) = (hp.n_embd, hp.head_dim);
        let tok_embd = matrix(&g, &map, "token_embd.weight", d, hp.vocab_size)?;
        let output = if g.tensor("output.weight").is_some() {
            matrix(&g, &map, "output.weight", d, hp.vocab_size)?
        } else {
            tok_embd.clone()
        };
        let output_norm = vector(&g, &map, "output_norm.weight", d)?;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&g, &map, &n("attn_norm"), d)?,
                wq: matrix(&g, &map, &n("attn_q"), d, hp.n_head * hd)?,
                wk: matrix(&g, &map, &n("attn_k"), d, hp.n_head_kv * hd)?,
                wv: matrix(&g, &map, &n("attn_v"), d, hp.n_head_kv * hd)?,
                wo: matrix(&g, &map, &n("attn_output"), hp.n_head * hd, d)?,
                ffn_norm: vector(&g, &map, &n("ffn_norm"), d)?,
                w_gate: matrix(&g, &map, &n("ffn_gate"), d, hp.n_ff)?,
                w_up: matrix(&g, &map, &n("ffn_up"), d, hp.n_ff)?,
                w_down: matrix(&g, &map, &n("ffn_down"), hp.n_ff, d)?,
            });
        }
        let half = hp.rope_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                hp.rope_freq_scale * hp.rope_theta.powf(-(2.0 * i as f32) / hp.rope_dim as f32)
            })
            .collect();
        if g.tensor("rope_freqs.weight").is_some() {
            let f = vector(&g, &map, "rope_freqs.weight", half)?;
            for (x, d) in inv_freq.iter_mut().zip(f) {
                *x /= d;
            }
        }
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
            tok_embd,
            output,
            output_norm,
            layers,
            inv_freq,
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
        let mut logits = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.batch).collect();
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            let want = i == last;
            let l = self.exec.install(|| self.forward_batch(cache, c, want));
            if want {
                logits = l;
            }
        }
        Ok(logits)
    }

    /// Logits of every token of `tokens` (row-major, `tokens.len() x vocab`).
    /// Placeholder until the batched version lands: one forward per token.
    pub fn forward_all(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, InferenceError> {
        let mut out = Vec::with_capacity(tokens.len() * self.hp.vocab_size);
        for t in tokens {
            out.extend(self.forward(cache, std::slice::from_ref(t))?);
        }
        Ok(out)
    }

    fn forward_batch(&self, cache: &mut KvCache, tokens: &[u32], want_logits: bool) -> Vec<f32> {
        let hp = &self.hp;
        let base: &[u8] = &self.map;
        let n = tokens.len();
        let (d, hd, nh, nkv) = (hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv);
        let pos0 = cache.len();
        cache.reserve(n);

        let mut x = vec![0f32; n * d];
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            self.tok_embd.dequant_row(base, t as usize, row);
        }
        let mut xb = vec![0f32; n * d];
        let mut q = vec![0f32; n * nh * hd];
        let mut k = vec![0f32; n * nkv * hd];
        let mut v = vec![0f32; n * nkv * hd];
        let mut att = vec![0f32; n * nh * hd];
        let mut gate = vec![0f32; n * hp.n_ff];
        let mut up = vec![0f32; n * hp.n_ff];
        let mut tmp = vec![0f32; n * d];

        // Rotation table for the new positions: (cos, sin) per pair.
        let half = hp.rope_dim / 2;
        let mut rot = vec![(0f32, 0f32); n * half];
        for (i, r) in rot.chunks_exact_mut(half.max(1)).enumerate().take(n) {
            let p = (pos0 + i) as f32;
            for (j, cs) in r.iter_mut().enumerate() {
                let (s, c) = (p * self.inv_freq[j]).sin_cos();
                *cs = (c, s);
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, hp.rms_eps, d, &mut xb);
            let a = self.exec.acts(&l.wq, &xb, n, d);
            self.exec.matmul(base, &l.wq, &a, &mut q);
            let a2;
            let ak = if l.wk.act_kind() == l.wq.act_kind() {
                &a
            } else {
                a2 = self.exec.acts(&l.wk, &xb, n, d);
                &a2
            };
            self.exec.matmul(base, &l.wk, ak, &mut k);
            let a3;
            let av = if l.wv.act_kind() == l.wq.act_kind() {
                &a
            } else {
                a3 = self.exec.acts(&l.wv, &xb, n, d);
                &a3
            };
            self.exec.matmul(base, &l.wv, av, &mut v);
            for i in 0..n {
                let r = &rot[i * half..(i + 1) * half];
                for h in q[i * nh * hd..(i + 1) * nh * hd].chunks_exact_mut(hd) {
                    rope(h, r);
                }
                for h in k[i * nkv * hd..(i + 1) * nkv * hd].chunks_exact_mut(hd) {
                    rope(h, r);
                }
            }
            for i in 0..n {
                for h in 0..nkv {
                    let o = (i * nkv + h) * hd;
                    cache.write(li, pos0 + i, h, &k[o..o + hd], &v[o..o + hd]);
                }
            }
            // Attention, one task per (token, kv head) covering its query heads.
            let cache_ref: &KvCache = cache;
            let group = nh / nkv;
            let q_ref = &q;
            att.par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(idx, out)| {
                    let (i, g) = (idx / nkv, idx % nkv);
                    let qs = &q_ref[idx * group * hd..(idx + 1) * group * hd];
                    attend(cache_ref, li, g, pos0 + i + 1, qs, scale, out);
                });
            let a = self.exec.acts(&l.wo, &att, n, nh * hd);
            self.exec.matmul(base, &l.wo, &a, &mut tmp);
            for (xv, t) in x.iter_mut().zip(&tmp) {
                *xv += t;
            }

            rms_norm(&x, &l.ffn_norm, hp.rms_eps, d, &mut xb);
            let a = self.exec.acts(&l.w_gate, &xb, n, d);
            self.exec.matmul(base, &l.w_gate, &a, &mut gate);
            let a4;
            let au = if l.w_up.act_kind() == l.w_gate.act_kind() {
                &a
            } else {
                a4 = self.exec.acts(&l.w_up, &xb, n, d);
                &a4
            };
            self.exec.matmul(base, &l.w_up, au, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let a = self.exec.acts(&l.w_down, &gate, n, hp.n_ff);
            self.exec.matmul(base, &l.w_down, &a, &mut tmp);
            for (xv, t) in x.iter_mut().zip(&tmp) {
                *xv += t;
            }
        }
        cache.commit(n);
        if !want_logits {
            return Vec::new();
        }
        let last = &x[(n - 1) * d..];
        let mut normed = vec![0f32; d];
        rms_norm(last, &self.output_norm, hp.rms_eps, d, &mut normed);
        let a = self.exec.acts(&self.output, &normed, 1, d);
        let mut logits = vec![0f32; hp.vocab_size];
        self.exec.matmul(base, &self.output, &a, &mut logits);
        logits
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

fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let s = 1.0 / (ss + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * s * wv;
        }
    }
}

/// Rotates adjacent pairs (llama.cpp "normal" RoPE; GGUF llama Q/K weights
/// are permuted for it).
fn rope(h: &mut [f32], rot: &[(f32, f32)]) {
    for (pair, &(c, s)) in h.chunks_exact_mut(2).zip(rot) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// Softmax attention of the query heads `qs` (consecutive, sharing one kv
/// head) over cache positions `0..upto`.
fn attend(
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    upto: usize,
    qs: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let hd = cache.layout().head_dim;
    let g = qs.len() / hd;
    let mut scores = vec![0f32; g * upto];
    let mut t = 0;
    for run in cache.head_runs(layer, 0, kv_head, upto) {
        for key in run.chunks_exact(hd) {
            for (qi, q) in qs.chunks_exact(hd).enumerate() {
                scores[qi * upto + t] = kernels::dot_f32_scalar(q, key) * scale;
            }
            t += 1;
        }
    }
    for row in scores.chunks_exact_mut(upto) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    out.fill(0.0);
    let mut t = 0;
    for run in cache.head_runs(layer, 1, kv_head, upto) {
        for val in run.chunks_exact(hd) {
            for (qi, o) in out.chunks_exact_mut(hd).enumerate() {
                kernels::axpy(o, scores[qi * upto + t], val);
            }
            t += 1;
        }
    }
}
