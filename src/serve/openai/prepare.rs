//! Request preparation: parse and validate a body, render the chat template,
//! tokenize the prompt and build the generation settings ([`Prepared`]).

use super::error::OpenAiError;
use super::schema::{ChatBody, CompletionBody, Content, Kind, Params, PromptParam, StopParam};
use crate::inference::{ChatMessage, GenerateConfig, SamplerConfig};
use crate::serve::Served;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, OpenAiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OpenAiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: "The request body is too large.".into(),
                ty: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
                retry_after: None,
            }
        } else {
            OpenAiError::invalid(format!("Could not read the request body: {e}"), None, None)
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        OpenAiError::invalid(
            format!("We could not parse the JSON body of your request ({e})."),
            None,
            None,
        )
    })?;
    if !v.is_object() {
        return Err(OpenAiError::invalid(
            "The request body must be a JSON object.",
            None,
            None,
        ));
    }
    Ok(v)
}

pub(super) fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, OpenAiError> {
    T::deserialize(v).map_err(|e| OpenAiError::invalid(format!("Invalid request: {e}"), None, None))
}

/// Everything a request needs once validated.
pub(super) struct Prepared {
    pub(super) served: Arc<Served>,
    pub(super) prompt: Vec<u32>,
    pub(super) gen_cfg: GenerateConfig,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) model_name: String,
}

// long: (~165 lines), kept whole: a flat list of per-field
// validations in the order their OpenAI error messages are checked.
pub(super) fn prepare(served: Arc<Served>, v: &Value, kind: Kind) -> Result<Prepared, OpenAiError> {
    let p: Params = typed(v)?;
    if p.n.unwrap_or(1) != 1 {
        return Err(OpenAiError::invalid(
            "Only n = 1 is supported.",
            Some("n"),
            Some("invalid_value"),
        ));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OpenAiError::invalid(
            format!("{temperature} is not valid for temperature: expected a number in [0, 2]."),
            Some("temperature"),
            Some("invalid_value"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(OpenAiError::invalid(
            "top_p must be in (0, 1].",
            Some("top_p"),
            Some("invalid_value"),
        ));
    }
    let model = served.engine.model();
    let tok = model.tokenizer();
    let ctx = model.hparams().context_length;
    let prompt: Vec<u32> = match kind {
        Kind::Chat => {
            let body: ChatBody = typed(v)?;
            if body.messages.is_empty() {
                return Err(OpenAiError::invalid(
                    "messages must not be empty.",
                    Some("messages"),
                    None,
                ));
            }
            let msgs: Vec<ChatMessage> = body
                .messages
                .iter()
                .map(|m| {
                    let text = match &m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t.clone(),
                        Some(Content::Parts(ps)) => ps
                            .iter()
                            .filter(|p| p.ty == "text")
                            .filter_map(|p| p.text.as_deref())
                            .collect::<Vec<_>>()
                            .join(""),
                    };
                    ChatMessage::new(&m.role, &text)
                })
                .collect();
            let text = served
                .template
                .render(&msgs, true)
                .map_err(|e| OpenAiError::invalid(e.to_string(), Some("messages"), None))?;
            let bos_text = tok
                .bos()
                .map(|b| String::from_utf8_lossy(tok.token_bytes(b)).into_owned());
            let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
            tok.encode(&text, true, !has_bos)
        }
        Kind::Completion => {
            let body: CompletionBody = typed(v)?;
            match body.prompt {
                PromptParam::Text(t) => tok.encode(&t, false, true),
                PromptParam::Texts(ts) if ts.len() == 1 => tok.encode(&ts[0], false, true),
                PromptParam::Texts(_) => {
                    return Err(OpenAiError::invalid(
                        "Only one prompt per request is supported.",
                        Some("prompt"),
                        Some("invalid_value"),
                    ));
                }
                PromptParam::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                        return Err(OpenAiError::invalid(
                            format!("Token id {bad} is outside the vocabulary."),
                            Some("prompt"),
                            Some("invalid_value"),
                        ));
                    }
                    ids
                }
            }
        }
    };
    let prompt = if prompt.is_empty() {
        tok.bos()
            .map(|b| vec![b])
            .ok_or_else(|| OpenAiError::invalid("The prompt is empty.", Some("prompt"), None))?
    } else {
        prompt
    };
    let context_err = |need: usize| {
        OpenAiError::invalid(
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {need} tokens ({} in the prompt). Please reduce the length of the prompt or max_tokens.",
                prompt.len()
            ),
            Some("messages"),
            Some("context_length_exceeded"),
        )
    };
    if prompt.len() >= ctx {
        return Err(context_err(prompt.len()));
    }
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        None => ctx - prompt.len(),
        Some(m) if m < 1 || m as u64 > ctx as u64 => {
            return Err(OpenAiError::invalid(
                format!("max_tokens is {m}, but it must be between 1 and {ctx}."),
                Some("max_tokens"),
                Some("invalid_value"),
            ));
        }
        Some(m) => {
            let m = m as usize;
            if prompt.len() + m > ctx {
                return Err(context_err(prompt.len() + m));
            }
            m
        }
    };
    let mut stop = match p.stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(OpenAiError::invalid(
            "stop must hold at most 4 non-empty strings.",
            Some("stop"),
            Some("invalid_value"),
        ));
    }
    if matches!(kind, Kind::Chat)
        && let Some(s) = served.template_stop
        && !stop.iter().any(|x| x == s)
    {
        stop.push(s.to_owned());
    }
    let sampler = SamplerConfig {
        temperature,
        top_k: p.top_k.unwrap_or(0),
        top_p,
        min_p: p.min_p.unwrap_or(0.0),
        repeat_penalty: p.repeat_penalty.unwrap_or(1.0),
        repeat_last_n: 64,
        seed: p.seed.unwrap_or_else(random_seed),
    };
    sampler
        .validate()
        .map_err(|e| OpenAiError::invalid(e.to_string(), None, Some("invalid_value")))?;
    let stream = p.stream.unwrap_or(false);
    Ok(Prepared {
        model_name: served.engine.name().to_owned(),
        served,
        prompt,
        gen_cfg: GenerateConfig {
            max_tokens,
            sampler,
            stop,
            stop_at_eos: !p.ignore_eos.unwrap_or(false),
        },
        stream,
        include_usage: stream && p.stream_options.is_some_and(|o| o.include_usage),
    })
}

pub(super) fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return unique() as u64;
    }
    u64::from_le_bytes(b)
}

pub(super) fn unique() -> u128 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    t ^ (u128::from(N.fetch_add(1, Ordering::Relaxed)) << 64)
}
