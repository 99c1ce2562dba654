//! The streaming, cancellable generation loop.

use super::InferenceError;
use super::kv::KvCache;
use super::model::Model;
use super::sample::{Sampler, SamplerConfig};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Parameters of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Maximum tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampler: SamplerConfig,
    /// Generation stops when the text contains one of these; the stop
    /// sequence itself is not emitted.
    pub stop: Vec<String>,
    /// Stop at the end-of-sequence / end-of-turn token.
    pub stop_at_eos: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

/// One generated token, as delivered to the callback.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    /// 0-based index among the generated tokens.
    pub index: usize,
    /// Token id.
    pub id: u32,
    /// Text released with this token: complete UTF-8 only, held back while
    /// it could still be the start of a stop sequence (may be empty).
    pub text: &'a str,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` reached.
    MaxTokens,
    /// The model produced an end token.
    EndOfSequence,
    /// A stop sequence appeared.
    StopSequence,
    /// The cancellation flag was set.
    Cancelled,
    /// The callback returned `ControlFlow::Break`.
    Callback,
    /// The context length was reached.
    ContextFull,
}

/// Result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// Generated token ids (the end token, if any, is not included).
    pub tokens: Vec<u32>,
    /// Generated text (up to any stop sequence).
    pub text: String,
    /// Why it ended.
    pub stop: StopReason,
    /// Time spent on the prompt tokens.
    pub prompt_time: Duration,
    /// Time spent generating (after the prompt).
    pub gen_time: Duration,
    /// Prompt tokens evaluated.
    pub prompt_tokens: usize,
}

/// Generates after `prompt`, streaming tokens to `on_token`.
///
/// `cache` holds the sequence before `prompt` (empty, or e.g. an imported
/// prefix); `prompt` must hold at least one token (to continue from a cache
/// holding the whole prompt, truncate it by one and pass the last token).
/// On return `cache` holds the prompt and the generated tokens that were run
/// through the model: all of them after an end token, all but the last
/// otherwise.
/// `cancel` is checked before every forward pass.
///
/// The repetition penalty looks at `prompt` and the output only; when
/// `cache` holds earlier tokens (a restored prefix), use
/// [`generate_after`] so that the answer does not depend on how much of
/// the sequence came from a cache.
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    cfg: &GenerateConfig,
    cancel: Option<&AtomicBool>,
    on_token: impl FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<GenerateOutput, InferenceError> {
    generate_after(model, cache, &[], prompt, cfg, cancel, on_token)
}

/// [`generate`] where `cache` holds the tokens `before` (e.g. a prefix
/// restored from the KV cache): they count for the repetition penalty
/// exactly as if they had been part of `prompt`, so a cached and a cold
/// run of the same sequence sample the same tokens. `before` is not run
/// through the model (its keys and values are in `cache`); only its last
/// `repeat_last_n` tokens matter.
pub fn generate_after(
    model: &Model,
    cache: &mut KvCache,
    before: &[u32],
    prompt: &[u32],
    cfg: &GenerateConfig,
    cancel: Option<&AtomicBool>,
    mut on_token: impl FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<GenerateOutput, InferenceError> {
    let mut sampler = Sampler::new(cfg.sampler.clone())?;
    if cfg.stop.iter().any(String::is_empty) {
        return Err(InferenceError::InvalidParameter(
            "empty stop sequence".into(),
        ));
    }
    let tok = model.tokenizer();
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let mut out = GenerateOutput {
        tokens: Vec::new(),
        text: String::new(),
        stop: StopReason::MaxTokens,
        prompt_time: Duration::ZERO,
        gen_time: Duration::ZERO,
        prompt_tokens: prompt.len(),
    };
    if cancelled() {
        out.stop = StopReason::Cancelled;
        return Ok(out);
    }
    let t0 = Instant::now();
    let mut logits = model.forward(cache, prompt)?;
    out.prompt_time = t0.elapsed();
    let t1 = Instant::now();
    let keep = before
        .len()
        .min(cfg.sampler.repeat_last_n.saturating_sub(prompt.len()));
    let mut history: Vec<u32> = before[before.len() - keep..].to_vec();
    history.extend_from_slice(prompt);
    let mut pending: Vec<u8> = Vec::new();
    // Text decoded so far; `released` bytes of it went to the callback.
    let mut text = String::new();
    let mut released: usize = 0;
    let max_ctx = model.hparams().context_length;
    loop {
        if out.tokens.len() >= cfg.max_tokens {
            out.stop = StopReason::MaxTokens;
            break;
        }
        let id = sampler.sample(&mut logits, &history);
        if cfg.stop_at_eos && tok.is_end(id) {
            out.stop = StopReason::EndOfSequence;
            break;
        }
        out.tokens.push(id);
        history.push(id);
        if !tok.is_control(id) {
            pending.extend_from_slice(tok.token_bytes(id));
        }
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        text.push_str(&String::from_utf8_lossy(&pending[..valid]));
        pending.drain(..valid);
        let (stop_at, release_to) = scan_stops(&text, released, &cfg.stop);
        let ev = TokenEvent {
            index: out.tokens.len() - 1,
            id,
            text: &text[released..release_to],
        };
        let flow = on_token(&ev);
        released = release_to;
        if stop_at.is_some() {
            text.truncate(released);
            out.stop = StopReason::StopSequence;
            break;
        }
        if flow.is_break() {
            out.stop = StopReason::Callback;
            break;
        }
        if out.tokens.len() >= cfg.max_tokens {
            out.stop = StopReason::MaxTokens;
            break;
        }
        if cancelled() {
            out.stop = StopReason::Cancelled;
            break;
        }
        if cache.len() + 1 > max_ctx {
            out.stop = StopReason::ContextFull;
            break;
        }
        logits = model.forward(cache, &[id])?;
    }
    if out.stop != StopReason::StopSequence {
        // Incomplete UTF-8 at the end is kept (lossily) in the text; text
        // held back for a stop sequence that never came is in `text` too.
        text.push_str(&String::from_utf8_lossy(&pending));
    }
    out.text = text;
    out.gen_time = t1.elapsed();
    Ok(out)
}

/// Where the text may be released up to after new text was appended:
/// `(Some(at), at)` when a stop sequence starts at byte `at` (searched in
/// the unreleased tail, overlapping what was released by the length of the
/// sequence), else `(None, to)` where `to` holds back a suffix that could
/// still become a stop sequence.
fn scan_stops(text: &str, released: usize, stops: &[String]) -> (Option<usize>, usize) {
    let mut stop_at = None;
    for s in stops {
        let from = released.saturating_sub(s.len());
        let from = (from..=released)
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(released);
        if let Some(p) = text[from..].find(s.as_str()) {
            let at = from + p;
            stop_at = Some(stop_at.map_or(at, |x: usize| x.min(at)));
        }
    }
    if let Some(at) = stop_at {
        return (stop_at, at.max(released));
    }
    let mut hold = text.len();
    for s in stops {
        for (i, _) in text[released..].char_indices() {
            let at = released + i;
            if s.starts_with(&text[at..]) {
                hold = hold.min(at);
                break;
            }
        }
    }
    (None, hold)
}
