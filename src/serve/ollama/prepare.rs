//! Request preparation: parse the body, refuse what is not supported
//! (`format`, `tools`, images, thinking, `suffix`, sampling options this
//! engine does not have), read `options` with Ollama's defaults, render the
//! prompt (the model's chat template; `raw`; a `template` of `{{ .System }}`,
//! `{{ .Prompt }}` and `{{ .Response }}`; a `context` from an earlier answer)
//! and build the generation settings ([`Prepared`]).

use super::error::OllamaError;
use super::schema::{ChatBody, Common, GenerateBody, Kind};
use crate::inference::{ChatMessage, GenerateConfig, SamplerConfig, Tokenizer};
use crate::serve::Served;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Ollama's sampling defaults (`api/types.go` `DefaultOptions`).
pub(super) const DEFAULT_TEMPERATURE: f32 = 0.8;
pub(super) const DEFAULT_TOP_K: usize = 40;
pub(super) const DEFAULT_TOP_P: f32 = 0.9;
pub(super) const DEFAULT_REPEAT_PENALTY: f32 = 1.1;
pub(super) const DEFAULT_REPEAT_LAST_N: usize = 64;

/// Most stop strings a request may give.
const MAX_STOP: usize = 16;

/// Runtime options of Ollama's runner that have no meaning here: accepted
/// and ignored.
const IGNORED_OPTIONS: &[&str] = &[
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "numa",
    "num_keep",
    "penalize_newline",
    "mirostat_tau",
    "mirostat_eta",
];

/// Sampling options this engine does not implement, with the value that
/// means "off" (accepted); any other value is refused with 400.
const UNSUPPORTED_OPTIONS: &[(&str, f64)] = &[
    ("mirostat", 0.0),
    ("tfs_z", 1.0),
    ("typical_p", 1.0),
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0),
];

pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, OllamaError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OllamaError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
        } else {
            OllamaError::bad(format!("could not read the request body: {e}"))
        }
    })?;
    if bytes.is_empty() {
        return Err(OllamaError::bad("missing request body"));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| OllamaError::bad(format!("invalid JSON in the request body: {e}")))?;
    if !v.is_object() {
        return Err(OllamaError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

pub(super) fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, OllamaError> {
    T::deserialize(v).map_err(|e| OllamaError::bad(format!("invalid request: {e}")))
}

/// The sampling and length options of a request.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Opts {
    pub(super) temperature: f32,
    pub(super) top_k: usize,
    pub(super) top_p: f32,
    pub(super) min_p: f32,
    pub(super) repeat_penalty: f32,
    /// `None`: the whole context (`-1`).
    pub(super) repeat_last_n: Option<usize>,
    pub(super) seed: Option<u64>,
    /// `None`: until the context is full (`-1`, `-2` or absent).
    pub(super) num_predict: Option<usize>,
    pub(super) stop: Vec<String>,
}

/// Reads `options` with Ollama's defaults; refuses a wrong type, a value
/// out of range, or a sampling option this engine does not have.
// long: (~125 lines), kept whole: one flat pass over the option keys, each
// with its own type and range check.
pub(super) fn options(o: Option<&Map<String, Value>>) -> Result<Opts, OllamaError> {
    let mut out = Opts {
        temperature: DEFAULT_TEMPERATURE,
        top_k: DEFAULT_TOP_K,
        top_p: DEFAULT_TOP_P,
        min_p: 0.0,
        repeat_penalty: DEFAULT_REPEAT_PENALTY,
        repeat_last_n: Some(DEFAULT_REPEAT_LAST_N),
        seed: None,
        num_predict: None,
        stop: Vec::new(),
    };
    let Some(o) = o else {
        return Ok(out);
    };
    let num = |k: &str, v: &Value| {
        v.as_f64()
            .ok_or_else(|| OllamaError::bad(format!("option {k} must be a number, not {v}")))
    };
    let int = |k: &str, v: &Value| {
        v.as_i64()
            .ok_or_else(|| OllamaError::bad(format!("option {k} must be an integer, not {v}")))
    };
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "temperature" => {
                let t = num(k, v)?;
                if !(0.0..=100.0).contains(&t) {
                    return Err(OllamaError::bad(format!(
                        "option temperature must be ≥ 0, not {t}"
                    )));
                }
                out.temperature = t as f32;
            }
            "top_k" => {
                // 0 (or less) turns top-k off, as in Ollama.
                out.top_k = usize::try_from(int(k, v)?.max(0)).unwrap_or(0);
            }
            "top_p" => {
                let p = num(k, v)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(OllamaError::bad(format!(
                        "option top_p must be in (0, 1], not {p}"
                    )));
                }
                out.top_p = p as f32;
            }
            "min_p" => {
                let p = num(k, v)?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(OllamaError::bad(format!(
                        "option min_p must be in [0, 1], not {p}"
                    )));
                }
                out.min_p = p as f32;
            }
            "repeat_penalty" => {
                let p = num(k, v)?;
                if !(p > 0.0 && p.is_finite()) {
                    return Err(OllamaError::bad(format!(
                        "option repeat_penalty must be > 0, not {p}"
                    )));
                }
                out.repeat_penalty = p as f32;
            }
            "repeat_last_n" => {
                let n = int(k, v)?;
                out.repeat_last_n = match n {
                    -1 => None,
                    n if n >= 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                    n => {
                        return Err(OllamaError::bad(format!(
                            "option repeat_last_n must be -1 (the whole context) or ≥ 0, not {n}"
                        )));
                    }
                };
            }
            "seed" => {
                let s = int(k, v)?;
                // -1: a random seed, as in Ollama.
                out.seed = (s >= 0).then_some(s as u64);
            }
            "num_predict" => {
                let n = int(k, v)?;
                out.num_predict = match n {
                    n if n < 0 => None,
                    0 => {
                        return Err(OllamaError::bad(
                            "option num_predict 0 would generate nothing; use -1 for no limit",
                        ));
                    }
                    n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                };
            }
            "stop" => {
                out.stop = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|s| {
                            s.as_str().map(str::to_owned).ok_or_else(|| {
                                OllamaError::bad("option stop must be a list of strings")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(OllamaError::bad("option stop must be a list of strings")),
                };
                if out.stop.len() > MAX_STOP || out.stop.iter().any(String::is_empty) {
                    return Err(OllamaError::bad(format!(
                        "option stop must hold at most {MAX_STOP} non-empty strings"
                    )));
                }
            }
            k if IGNORED_OPTIONS.contains(&k) => {}
            k => match UNSUPPORTED_OPTIONS.iter().find(|(n, _)| *n == k) {
                Some((_, off)) => {
                    let x = num(k, v)?;
                    if x != *off {
                        return Err(OllamaError::bad(format!(
                            "option {k} is not supported by this server (only {k} = {off}); \
                             use temperature, top_k, top_p, min_p and repeat_penalty"
                        )));
                    }
                }
                None => tracing::debug!(option = k, "unknown Ollama option ignored"),
            },
        }
    }
    Ok(out)
}

/// Refuses what this server does not do, before any model is looked up.
pub(super) fn refuse_unsupported(c: &Common, v: &Value) -> Result<(), OllamaError> {
    match &c.format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => {
            return Err(OllamaError::bad(
                "format (JSON mode and structured outputs) is not supported by this server",
            ));
        }
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad(
            "tools (function calling) are not supported by this server",
        ));
    }
    if c.images.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad("images are not supported by this server"));
    }
    match &c.think {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(OllamaError::bad(format!(
                "\"{}\" does not support thinking",
                c.model
            )));
        }
    }
    if c.logprobs == Some(true) {
        return Err(OllamaError::bad(
            "logprobs are not supported by this server",
        ));
    }
    if let Some(ms) = v.get("messages").and_then(Value::as_array) {
        for m in ms {
            if m.get("images")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
            {
                return Err(OllamaError::bad("images are not supported by this server"));
            }
        }
    }
    if v.get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(OllamaError::bad(
            "suffix (fill-in-the-middle) is not supported by this server",
        ));
    }
    Ok(())
}

/// Everything a generation needs once validated.
pub(super) struct Prepared {
    pub(super) served: Arc<Served>,
    pub(super) prompt: Vec<u32>,
    pub(super) gen_cfg: GenerateConfig,
    /// The request's options and prompt in canonical form: the response
    /// cache's key material, when the answer is deterministic.
    pub(super) cache_material: Option<Value>,
}

/// What a request asks for: a generation, or only that the model be loaded
/// (an empty prompt or no messages, as Ollama answers with `done_reason`
/// `"load"`).
pub(super) enum Plan {
    Generate(Box<Prepared>),
    Load,
}

/// The prompt and settings of a request whose model is `served`.
pub(super) fn prepare(
    served: Arc<Served>,
    v: &Value,
    kind: Kind,
    opts: &Opts,
) -> Result<Plan, OllamaError> {
    let model = served.engine.model();
    let tok = model.tokenizer().clone();
    let ctx = model.hparams().context_length;
    let Some(prompt) = prompt_tokens(&served, &tok, v, kind)? else {
        return Ok(Plan::Load);
    };
    let prompt = if prompt.is_empty() {
        tok.bos()
            .map(|b| vec![b])
            .ok_or_else(|| OllamaError::bad("the prompt is empty"))?
    } else {
        prompt
    };
    if prompt.len() >= ctx {
        return Err(OllamaError::bad(format!(
            "the prompt is {} tokens long; this model's context is {ctx} tokens",
            prompt.len()
        )));
    }
    let room = ctx - prompt.len();
    let max_tokens = opts.num_predict.map_or(room, |n| n.min(room));
    let mut stop = opts.stop.clone();
    if matches!(kind, Kind::Chat)
        && let Some(s) = served.template_stop
        && !stop.iter().any(|x| x == s)
    {
        stop.push(s.to_owned());
    }
    let sampler = SamplerConfig {
        temperature: opts.temperature,
        top_k: opts.top_k,
        top_p: opts.top_p,
        min_p: opts.min_p,
        repeat_penalty: opts.repeat_penalty,
        repeat_last_n: opts.repeat_last_n.unwrap_or(ctx),
        seed: opts.seed.unwrap_or_else(random_seed),
    };
    sampler
        .validate()
        .map_err(|e| OllamaError::bad(e.to_string()))?;
    let deterministic = opts.temperature == 0.0 || opts.seed.is_some();
    let cache_material = deterministic.then(|| {
        json!({
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": opts.temperature,
            "top_k": opts.top_k,
            "top_p": opts.top_p,
            "min_p": opts.min_p,
            "repeat_penalty": opts.repeat_penalty,
            "repeat_last_n": sampler.repeat_last_n,
            "seed": if opts.temperature == 0.0 { None } else { opts.seed },
        })
    });
    Ok(Plan::Generate(Box::new(Prepared {
        served,
        prompt,
        gen_cfg: GenerateConfig {
            max_tokens,
            sampler,
            stop,
            stop_at_eos: true,
        },
        cache_material,
    })))
}

/// The prompt's tokens, or `None` when the request only asks that the
/// model be loaded (no messages, an empty prompt and no context).
fn prompt_tokens(
    served: &Served,
    tok: &Tokenizer,
    v: &Value,
    kind: Kind,
) -> Result<Option<Vec<u32>>, OllamaError> {
    Ok(Some(match kind {
        Kind::Chat => {
            let body: ChatBody = typed(v)?;
            if body.messages.is_empty() {
                return Ok(None);
            }
            if body
                .messages
                .iter()
                .any(|m| m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()))
                || body
                    .messages
                    .iter()
                    .any(|m| m.images.as_ref().is_some_and(|i| !i.is_empty()))
            {
                return Err(OllamaError::bad(
                    "tool calls and images in messages are not supported by this server",
                ));
            }
            let msgs: Vec<ChatMessage> = body
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, m.content.as_deref().unwrap_or("")))
                .collect();
            let text = served
                .template
                .render(&msgs, true)
                .map_err(|e| OllamaError::bad(e.to_string()))?;
            encode_rendered(tok, &text, true)
        }
        Kind::Generate => {
            let body: GenerateBody = typed(v)?;
            let _ = &body.suffix;
            let text = body.prompt.unwrap_or_default();
            let context = body.context.unwrap_or_default();
            if text.is_empty() && context.is_empty() {
                return Ok(None);
            }
            if let Some(bad) = context.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                return Err(OllamaError::bad(format!(
                    "context token {bad} is outside the vocabulary"
                )));
            }
            let rendered = if body.raw.unwrap_or(false) || text.is_empty() {
                text
            } else if let Some(t) = body.template.as_deref().filter(|t| !t.is_empty()) {
                go_template(t, body.system.as_deref().unwrap_or(""), &text)?
            } else {
                let mut msgs = Vec::new();
                if let Some(s) = body.system.as_deref().filter(|s| !s.is_empty()) {
                    msgs.push(ChatMessage::new("system", s));
                }
                msgs.push(ChatMessage::new("user", &text));
                served
                    .template
                    .render(&msgs, true)
                    .map_err(|e| OllamaError::bad(e.to_string()))?
            };
            let mut p = context;
            let first = p.is_empty();
            p.extend(encode_rendered(tok, &rendered, first));
            p
        }
    }))
}

/// Tokenizes rendered text (special tokens parsed), adding BOS when
/// `may_add_bos` and the text does not already start with it (as the
/// OpenAI chat route does, so both routes give the same tokens).
fn encode_rendered(tok: &Tokenizer, text: &str, may_add_bos: bool) -> Vec<u32> {
    let bos_text = tok
        .bos()
        .map(|b| String::from_utf8_lossy(tok.token_bytes(b)).into_owned());
    let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
    tok.encode(text, true, may_add_bos && !has_bos)
}

/// Fills a Go `template` of Ollama's simplest kind: `{{ .System }}`,
/// `{{ .Prompt }}` and `{{ .Response }}` (empty), with optional `-` trims
/// ignored. Anything else in `{{ }}` is refused (no Go template engine here).
pub(super) fn go_template(t: &str, system: &str, prompt: &str) -> Result<String, OllamaError> {
    let mut out = String::with_capacity(t.len() + prompt.len() + system.len());
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err(OllamaError::bad("template: unclosed {{"));
        };
        let action = after[..j].trim_matches('-').trim();
        match action {
            ".System" => out.push_str(system),
            ".Prompt" => out.push_str(prompt),
            ".Response" => {}
            other => {
                return Err(OllamaError::bad(format!(
                    "template: only {{{{ .System }}}}, {{{{ .Prompt }}}} and {{{{ .Response }}}} \
                     are supported, not {{{{ {other} }}}}"
                )));
            }
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_to_ollamas_and_refuse_what_is_missing() {
        let d = options(None).expect("defaults");
        assert_eq!(d.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(d.top_k, DEFAULT_TOP_K);
        assert_eq!(d.repeat_last_n, Some(64));
        let m = |v: Value| v.as_object().cloned().expect("object");
        let o = options(Some(&m(json!({"temperature": 0, "top_k": 5, "seed": 7,
            "num_predict": -1, "repeat_last_n": -1, "stop": ["\n"], "num_ctx": 4096,
            "mirostat": 0}))))
        .expect("valid");
        assert_eq!(
            (
                o.temperature,
                o.top_k,
                o.seed,
                o.num_predict,
                o.repeat_last_n
            ),
            (0.0, 5, Some(7), None, None)
        );
        assert_eq!(o.stop, vec!["\n".to_owned()]);
        for bad in [
            json!({"mirostat": 2}),
            json!({"temperature": "hot"}),
            json!({"top_p": 0}),
            json!({"num_predict": 0}),
            json!({"stop": [""]}),
            json!({"presence_penalty": 0.5}),
        ] {
            let e = options(Some(&m(bad.clone()))).expect_err("refused");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}: {e:?}");
        }
    }

    #[test]
    fn go_templates_of_the_simple_kind_are_filled() {
        let t = "{{ .System }}\nUSER: {{.Prompt}}\nASSISTANT: {{- .Response }}";
        assert_eq!(
            go_template(t, "Be brief.", "Hi").expect("filled"),
            "Be brief.\nUSER: Hi\nASSISTANT: "
        );
        assert!(go_template("{{ if .System }}x{{ end }}", "", "p").is_err());
        assert!(go_template("{{ .Prompt ", "", "p").is_err());
    }
}
