//! Inference subcommands: generate, chat, tokenize, perplexity.

use super::Ctx;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use shoal::inference::{
    ChatMessage, ChatTemplate, GenerateConfig, Model, ModelConfig, SamplerConfig, Tokenizer,
    generate,
};
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

/// Inference commands.
#[derive(Subcommand, Debug)]
pub enum InferCmd {
    /// Generate text from a raw prompt (no chat template); only the generated
    /// text goes to stdout.
    Generate {
        /// Model and thread options.
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt, used as is.
        #[arg(long)]
        prompt: String,
        /// Sampling options.
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Interactive chat with the model's chat template (one line per turn).
    Chat {
        /// Model and thread options.
        #[command(flatten)]
        model: ModelArgs,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// Sampling options.
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Perplexity of the model on a text file, computed as llama.cpp's
    /// `llama-perplexity` does (each window of CTX tokens scored on its
    /// second half).
    Perplexity {
        /// Model and thread options.
        #[command(flatten)]
        model: ModelArgs,
        /// The text file (UTF-8).
        file: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Windows to score (default: as many as the text holds).
        #[arg(long)]
        chunks: Option<usize>,
        /// Print one JSON object (with a `perplexity` field) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of TEXT as a JSON list.
    Tokenize {
        /// Model and thread options.
        #[command(flatten)]
        model: ModelArgs,
        /// Treat special-token texts like `<|im_start|>` as plain text.
        #[arg(long)]
        no_special: bool,
        /// The text.
        text: String,
    },
}

/// Which model to load.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Store artifact id (or unique prefix), release name, or GGUF file path.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Sampling options.
#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn config(&self) -> GenerateConfig {
        GenerateConfig {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..SamplerConfig::default()
            },
            stop: self.stop.clone(),
            stop_at_eos: true,
        }
    }
}

/// Resolves `spec` to a file: an existing path, else a store id or name.
/// Returns the path and, for store artifacts, the artifact id.
fn resolve(ctx: &Ctx, spec: &str) -> Result<(PathBuf, Option<[u8; 32]>)> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        return Ok((p, None));
    }
    let store = ctx
        .store()
        .with_context(|| format!("{spec:?} is not a file; looking it up in the store"))?;
    let id = store
        .resolve(spec)
        .with_context(|| format!("no model file, artifact or name {spec:?}"))?;
    let path = store
        .artifact_path(&id)
        .with_context(|| format!("artifact {id} is not usable"))?;
    Ok((path, Some(*id.as_bytes())))
}

fn load(ctx: &Ctx, m: &ModelArgs) -> Result<Arc<Model>> {
    let (path, id) = resolve(ctx, &m.model)?;
    let model = Model::load_with(
        &path,
        &ModelConfig {
            threads: m.threads,
            model_id: id,
            ..ModelConfig::default()
        },
    )
    .with_context(|| format!("loading {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        load_ms = model.load_time().as_secs_f64() * 1e3,
        tokenizer_ms = model.tokenizer_load_time().as_secs_f64() * 1e3,
        threads = model.threads(),
        isa = ?model.isa(),
        "model loaded"
    );
    Ok(model)
}

/// Runs an inference subcommand.
pub fn run(ctx: &Ctx, cmd: InferCmd) -> Result<()> {
    match cmd {
        InferCmd::Tokenize {
            model,
            no_special,
            text,
        } => {
            // Only the tokenizer: works on vocabulary-only GGUFs too.
            let (path, _) = resolve(ctx, &model.model)?;
            let t0 = std::time::Instant::now();
            let tok = Tokenizer::load(&path)
                .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
            tracing::debug!(
                vocab = tok.vocab_size(),
                load_ms = t0.elapsed().as_secs_f64() * 1e3,
                "tokenizer loaded"
            );
            let ids = tok.encode(&text, !no_special, true);
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        InferCmd::Perplexity {
            model,
            file,
            ctx: n_ctx,
            chunks,
            json,
        } => perplexity(ctx, &model, &file, n_ctx, chunks, json),
        InferCmd::Generate {
            model,
            prompt,
            sampling,
        } => {
            let m = load(ctx, &model)?;
            let ids = m.tokenizer().encode(&prompt, true, true);
            if ids.is_empty() {
                bail!("the prompt is empty");
            }
            let mut cache = m.new_cache();
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let mut write_err = None;
            let r = generate(&m, &mut cache, &ids, &sampling.config(), None, |ev| {
                if let Err(e) = out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()) {
                    write_err = Some(e);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })?;
            if let Some(e) = write_err {
                return Err(e.into());
            }
            writeln!(out)?;
            report(&r);
            Ok(())
        }
        InferCmd::Chat {
            model,
            system,
            sampling,
        } => chat(ctx, &model, system, &sampling),
    }
}

fn perplexity(
    ctx: &Ctx,
    margs: &ModelArgs,
    file: &std::path::Path,
    n_ctx: usize,
    chunks: Option<usize>,
    json: bool,
) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", file.display()))?;
    let m = load(ctx, margs)?;
    let cfg = shoal::inference::PerplexityConfig {
        ctx: n_ctx,
        chunks,
        ..Default::default()
    };
    let r = shoal::inference::perplexity(&m, &text, &cfg, |i, ppl| {
        if !json {
            eprint!("[{i}]{ppl:.4},");
        }
    })
    .with_context(|| format!("perplexity of {}", file.display()))?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), m.path().display().to_string().into());
            o.insert("file".into(), file.display().to_string().into());
        }
        println!("{v}");
    } else {
        eprintln!();
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5} ({} chunks of {} tokens, {} scored, {:.1} s)",
            r.perplexity, r.uncertainty, r.chunks, r.ctx, r.scored, r.seconds
        );
    }
    Ok(())
}

fn report(r: &shoal::inference::GenerateOutput) {
    let pp = r.prompt_tokens as f64 / r.prompt_time.as_secs_f64().max(1e-9);
    let tg = r.tokens.len() as f64 / r.gen_time.as_secs_f64().max(1e-9);
    tracing::info!(
        prompt_tokens = r.prompt_tokens,
        generated = r.tokens.len(),
        stop = ?r.stop,
        prompt_tok_per_s = format!("{pp:.1}"),
        gen_tok_per_s = format!("{tg:.1}"),
        "generation done"
    );
}

fn chat(ctx: &Ctx, margs: &ModelArgs, system: Option<String>, s: &SamplingArgs) -> Result<()> {
    let m = load(ctx, margs)?;
    let tok = m.tokenizer().clone();
    // No template: ChatML, as llama-server and `shoal serve` do.
    let src = m.chat_template().unwrap_or(shoal::serve::CHATML);
    let piece = |id: Option<u32>| {
        id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
            .unwrap_or_default()
    };
    let tpl = ChatTemplate::new(src, &piece(tok.bos()), &piece(tok.eos()))?;
    let mut messages = Vec::new();
    if let Some(sys) = system {
        messages.push(ChatMessage::new("system", &sys));
    }
    let mut cache = m.new_cache();
    // Token ids whose keys/values are in `cache`.
    let mut cached: Vec<u32> = Vec::new();
    let mut cfg = s.config();
    if let Some(stop) = shoal::serve::chatml_stop(&m) {
        cfg.stop.push(stop.to_owned());
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    loop {
        if interactive {
            print!("> ");
            stdout.lock().flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        let text = tpl.render(&messages, true)?;
        // As the API does: no second BOS when the template already wrote one.
        let bos_text = tok
            .bos()
            .map(|b| String::from_utf8_lossy(tok.token_bytes(b)).into_owned());
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        let ids = tok.encode(&text, true, !has_bos);
        // Reuse the cached prefix; always run at least one token.
        let common = cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        cache.truncate(common);
        cached.truncate(common);
        let mut out = stdout.lock();
        let r = generate(&m, &mut cache, &ids[common..], &cfg, None, |ev| {
            let _ = out.write_all(ev.text.as_bytes()).and_then(|()| out.flush());
            ControlFlow::Continue(())
        })?;
        writeln!(out)?;
        drop(out);
        report(&r);
        cached.extend_from_slice(&ids[common..]);
        // The last generated token was sampled but not run.
        let ran = r.tokens.len().saturating_sub(1);
        cached.extend_from_slice(&r.tokens[..ran]);
        cache.truncate(cached.len());
        messages.push(ChatMessage::new("assistant", r.text.trim()));
    }
    Ok(())
}
