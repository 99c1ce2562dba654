//! Perplexity of a model on a text, computed the way llama.cpp's
//! `llama-perplexity` computes it, so the two figures compare directly.
//!
//! The text is tokenized once (with BOS when the vocabulary adds one, special
//! token texts read as plain text) and cut into `chunks` windows of `ctx`
//! tokens. Each window runs from an empty KV cache, its first token replaced
//! by BOS when the vocabulary adds one; only the second half of each window
//! is scored (token `j + 1` under the logits of position `j`, for `j` from
//! `ctx / 2` to `ctx - 2`), so every scored token has at least `ctx / 2`
//! tokens of context. The result is `exp(mean negative log-likelihood)`,
//! with llama.cpp's uncertainty estimate.

use super::{InferenceError, Model};
use rayon::prelude::*;
use std::time::Instant;

/// Options for [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityConfig {
    /// Tokens per window (`llama-perplexity -c`); at least 8 and even.
    pub ctx: usize,
    /// Windows to score; `None` = as many as the text holds (`--chunks`).
    pub chunks: Option<usize>,
    /// Positions whose logits are computed in one forward call (bounds the
    /// logits buffer to `batch x vocab` floats); 0 = 64.
    pub batch: usize,
}

impl Default for PerplexityConfig {
    fn default() -> Self {
        PerplexityConfig {
            ctx: 512,
            chunks: None,
            batch: 64,
        }
    }
}

/// The outcome of [`perplexity`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PerplexityReport {
    /// `exp` of the mean negative log-likelihood of the scored tokens.
    pub perplexity: f64,
    /// llama.cpp's "+/-": the standard error of the mean NLL times the
    /// perplexity.
    pub uncertainty: f64,
    /// Tokens per window.
    pub ctx: usize,
    /// Windows scored.
    pub chunks: usize,
    /// Tokens in the whole text (BOS included when added).
    pub tokens: usize,
    /// Tokens scored (`chunks * (ctx - ctx / 2 - 1)`).
    pub scored: usize,
    /// The running perplexity after each window (llama.cpp's `[i]x.xxxx` line).
    pub running: Vec<f64>,
    /// Wall time of the forward passes and scoring, in seconds.
    pub seconds: f64,
}

/// Scores `text` under `model` (see the module docs). `progress` is called
/// after each window with its 1-based index and the running perplexity.
pub fn perplexity(
    model: &Model,
    text: &str,
    cfg: &PerplexityConfig,
    mut progress: impl FnMut(usize, f64),
) -> Result<PerplexityReport, InferenceError> {
    let ctx = cfg.ctx;
    if ctx < 8 || !ctx.is_multiple_of(2) {
        return Err(InferenceError::InvalidParameter(format!(
            "perplexity context must be even and at least 8, got {ctx}"
        )));
    }
    if ctx > model.hparams().context_length {
        return Err(InferenceError::InvalidParameter(format!(
            "perplexity context {ctx} exceeds the model's context length {}",
            model.hparams().context_length
        )));
    }
    if cfg.chunks == Some(0) {
        return Err(InferenceError::InvalidParameter(
            "at least one chunk is needed".into(),
        ));
    }
    let tok = model.tokenizer();
    let tokens = tok.encode(text, false, true);
    if tokens.len() < 2 * ctx {
        return Err(InferenceError::InvalidParameter(format!(
            "the text tokenizes to {} tokens; a context of {ctx} needs at least {}",
            tokens.len(),
            2 * ctx
        )));
    }
    let max_chunks = tokens.len() / ctx;
    let chunks = cfg.chunks.map_or(max_chunks, |c| c.min(max_chunks));
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let batch = if cfg.batch == 0 { 64 } else { cfg.batch };
    let vocab = model.hparams().vocab_size;
    let first = ctx / 2;
    let t0 = Instant::now();
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let window = &tokens[i * ctx..(i + 1) * ctx];
        let mut input = window.to_vec();
        if let Some(b) = bos {
            input[0] = b;
        }
        let mut cache = model.new_cache();
        // The first half only fills the cache; its logits are not needed.
        model.forward(&mut cache, &input[..first])?;
        let mut pos = first;
        while pos < ctx - 1 {
            let end = (pos + batch).min(ctx - 1);
            let logits = model.forward_all(&mut cache, &input[pos..end])?;
            let rows = end - pos;
            if logits.len() != rows * vocab {
                return Err(InferenceError::BadModel(format!(
                    "forward returned {} logits for {rows} positions of a {vocab}-token vocabulary",
                    logits.len()
                )));
            }
            let sums: (f64, f64) = logits
                .par_chunks_exact(vocab)
                .enumerate()
                .map(|(r, row)| {
                    let next = window[pos + r + 1] as usize;
                    let v = -log_softmax_at(row, next);
                    (v, v * v)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            nll += sums.0;
            nll2 += sums.1;
            count += rows;
            pos = end;
        }
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        progress(i + 1, ppl);
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let perplexity = mean.exp();
    let uncertainty = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * perplexity
    } else {
        0.0
    };
    Ok(PerplexityReport {
        perplexity,
        uncertainty,
        ctx,
        chunks,
        tokens: tokens.len(),
        scored: count,
        running,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `log(softmax(logits)[tok])`, with the sum in f64 as llama.cpp does.
fn log_softmax_at(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    let l = logits.get(tok).copied().unwrap_or(f32::NEG_INFINITY);
    f64::from(l - max) - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_of_uniform_logits_is_minus_log_n() {
        let l = vec![3.0f32; 1000];
        assert!((log_softmax_at(&l, 7) + (1000f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn log_softmax_is_stable_for_large_logits() {
        let l = [1000.0f32, 0.0, -1000.0];
        assert!(log_softmax_at(&l, 0).abs() < 1e-9);
        assert!((log_softmax_at(&l, 1) + 1000.0).abs() < 1e-6);
        assert!(log_softmax_at(&l, 5).is_infinite());
    }
}
