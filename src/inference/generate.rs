//! The streaming, cancellable generation loop.

use super::InferenceError;
use super::kv::KvCache;
use super::model::Model;
use super::sample::{Sampler, SamplerConfig};
use super::tokenizer::Tokenizer;
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
    let mut dec = Decoder::new(model, before, prompt, cfg)?;
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    if cancelled() {
        return Ok(dec.finish(StopReason::Cancelled));
    }
    let t0 = Instant::now();
    let mut logits = model.forward(cache, prompt)?;
    dec.prompt_time = t0.elapsed();
    let t1 = Instant::now();
    let max_ctx = model.hparams().context_length;
    let stop = loop {
        let step = dec.next(&mut logits);
        let flow = match &step.event {
            Some(ev) => on_token(ev),
            None => ControlFlow::Continue(()),
        };
        let id = step.event.as_ref().map(|e| e.id);
        match step.stop {
            Some(s @ (StopReason::StopSequence | StopReason::EndOfSequence)) => break s,
            _ if flow.is_break() => break StopReason::Callback,
            Some(s) => break s,
            None => {}
        }
        if cancelled() {
            break StopReason::Cancelled;
        }
        if cache.len() + 1 > max_ctx {
            break StopReason::ContextFull;
        }
        let Some(id) = id else {
            break StopReason::MaxTokens;
        };
        logits = model.forward(cache, &[id])?;
    };
    dec.gen_time = t1.elapsed();
    Ok(dec.finish(stop))
}

/// What [`Decoder::next`] made of one set of logits.
#[derive(Debug)]
pub struct Step<'a> {
    /// The sampled token and the text it releases; `None` when the model
    /// ended the sequence (or no token may be generated).
    pub event: Option<TokenEvent<'a>>,
    /// Why the sequence ends here, if it does: the end token, a stop
    /// sequence (text up to it is in `event`) or `max_tokens` reached.
    pub stop: Option<StopReason>,
}

/// The per-sequence half of generation, everything but the forward
/// passes: samples each next token with the sequence's own sampler, applies
/// its stop rules and releases its text. [`generate_after`] drives one for
/// a sequence alone; a batching engine drives one per running sequence and
/// feeds each the logits of its rows, so a sequence decodes the same
/// tokens alone or in a batch.
#[derive(Debug)]
pub struct Decoder {
    tok: std::sync::Arc<Tokenizer>,
    sampler: Sampler,
    max_tokens: usize,
    stop: Vec<String>,
    stop_at_eos: bool,
    history: Vec<u32>,
    pending: Vec<u8>,
    /// Text decoded so far; `released` bytes of it were handed out.
    text: String,
    released: usize,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    /// Time spent on the prompt (set by the driver).
    pub prompt_time: Duration,
    /// Time spent generating (set by the driver).
    pub gen_time: Duration,
}

impl Decoder {
    /// A decoder for `prompt` after the cached tokens `before` (which count
    /// for the repetition penalty as in [`generate_after`]).
    pub fn new(
        model: &Model,
        before: &[u32],
        prompt: &[u32],
        cfg: &GenerateConfig,
    ) -> Result<Decoder, InferenceError> {
        let sampler = Sampler::new(cfg.sampler.clone())?;
        if cfg.stop.iter().any(String::is_empty) {
            return Err(InferenceError::InvalidParameter(
                "empty stop sequence".into(),
            ));
        }
        let keep = before
            .len()
            .min(cfg.sampler.repeat_last_n.saturating_sub(prompt.len()));
        let mut history: Vec<u32> = before[before.len() - keep..].to_vec();
        history.extend_from_slice(prompt);
        Ok(Decoder {
            tok: model.tokenizer().clone(),
            sampler,
            max_tokens: cfg.max_tokens,
            stop: cfg.stop.clone(),
            stop_at_eos: cfg.stop_at_eos,
            history,
            pending: Vec::new(),
            text: String::new(),
            released: 0,
            tokens: Vec::new(),
            prompt_tokens: prompt.len(),
            prompt_time: Duration::ZERO,
            gen_time: Duration::ZERO,
        })
    }

    /// Tokens generated so far (the end token is never among them).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Samples the next token from `logits` (the repetition penalty
    /// modifies them in place) and releases its text.
    pub fn next(&mut self, logits: &mut [f32]) -> Step<'_> {
        if self.tokens.len() >= self.max_tokens {
            return Step {
                event: None,
                stop: Some(StopReason::MaxTokens),
            };
        }
        let id = self.sampler.sample(logits, &self.history);
        if self.stop_at_eos && self.tok.is_end(id) {
            return Step {
                event: None,
                stop: Some(StopReason::EndOfSequence),
            };
        }
        self.tokens.push(id);
        self.history.push(id);
        if !self.tok.is_control(id) {
            self.pending.extend_from_slice(self.tok.token_bytes(id));
        }
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        self.text
            .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
        self.pending.drain(..valid);
        let (stop_at, release_to) = scan_stops(&self.text, self.released, &self.stop);
        let from = self.released;
        self.released = release_to;
        let stop = if stop_at.is_some() {
            Some(StopReason::StopSequence)
        } else if self.tokens.len() >= self.max_tokens {
            Some(StopReason::MaxTokens)
        } else {
            None
        };
        Step {
            event: Some(TokenEvent {
                index: self.tokens.len() - 1,
                id,
                text: &self.text[from..release_to],
            }),
            stop,
        }
    }

    /// The result of the sequence, ended for `stop`.
    pub fn finish(mut self, stop: StopReason) -> GenerateOutput {
        if stop == StopReason::StopSequence {
            self.text.truncate(self.released);
        } else {
            // Incomplete UTF-8 at the end is kept (lossily) in the text; text
            // held back for a stop sequence that never came is in `text` too.
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
        }
        GenerateOutput {
            tokens: self.tokens,
            text: self.text,
            stop,
            prompt_time: self.prompt_time,
            gen_time: self.gen_time,
            prompt_tokens: self.prompt_tokens,
        }
    }
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
