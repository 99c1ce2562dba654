//! Inference: the forward pass of llama, mistral, qwen2, qwen3, gemma3 and
//! phi3 models over GGUF weights read in place
//! from a memory mapping, an explicit per-sequence [`KvCache`], the GGUF
//! byte-level BPE [`Tokenizer`], chat templates, sampling and a streaming,
//! cancellable [`generate`] loop.
//!
//! This module does not know about the store: it loads a file path
//! ([`Model::load`]); callers resolve store ids to paths.
//!
//! Matmuls run on our own AVX2/FMA kernels for Q4_0, Q4_1 and Q8_0 (with
//! scalar fallbacks, selected at run time) and on candle-core's block types
//! and `vec_dot` for the other GGUF types (F16, Q5_x, Q2_K..Q6_K), viewed
//! zero-copy over the mapping. See `docs/INFERENCE.md`.

mod chat;
mod generate;
mod kernels;
mod kv;
mod mapguard;
mod model;
mod perplexity;
mod quant;
mod sample;
pub mod support;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, TemplateLimits};
pub use generate::{
    Decoder, GenerateConfig, GenerateOutput, Step, StopReason, TokenEvent, generate, generate_after,
};
pub use kernels::Isa;
pub use kv::{
    BLOCK_TOKENS as KV_STORAGE_TOKENS, KV_FORMAT_VERSION, KV_MAGIC, KvCache, KvDtype, KvLayout,
    SharedBlock,
};
pub use model::{BatchItem, HParams, Model, ModelConfig};
pub use perplexity::{PerplexityConfig, PerplexityReport, perplexity};
pub use sample::{Sampler, SamplerConfig};
pub use support::{HeaderCheck, MAX_HEADER_BYTES, Unservable, check_file, check_header};
pub use tokenizer::Tokenizer;

/// Errors from loading models, running them, and (de)serializing KV caches.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// Reading or mapping the file failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a valid GGUF (including truncated files).
    #[error("invalid GGUF: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    /// `general.architecture` names a model family we do not run.
    #[error(
        "unsupported architecture {0:?} (supported: llama, mistral, qwen2, qwen3, gemma3, phi3)"
    )]
    UnsupportedArchitecture(String),
    /// A tensor has a ggml type without a kernel here.
    #[error("tensor {tensor}: unsupported tensor type {ty}")]
    UnsupportedTensorType {
        /// Tensor name.
        tensor: String,
        /// Type name.
        ty: &'static str,
    },
    /// Required metadata or tensors are missing or inconsistent.
    #[error("bad model: {0}")]
    BadModel(String),
    /// The tokenizer metadata is missing or malformed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// The sequence would exceed the model's context length.
    #[error("context full: {need} tokens needed, context length is {max}")]
    ContextFull {
        /// Tokens that would be in the cache.
        need: usize,
        /// The model's context length.
        max: usize,
    },
    /// A KV cache blob or operation was refused.
    #[error("kv cache: {0}")]
    Kv(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// Bad generation or sampling parameters.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}
