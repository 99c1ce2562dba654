//! The request schema: the typed bodies of `POST /v1/chat/completions` and
//! `POST /v1/completions` and their sampling parameters.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StopParam {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// Parameters shared by both endpoints.
#[derive(Debug, Deserialize)]
pub(super) struct Params {
    /// Required (its absence is reported from here); `run` reads it first.
    #[allow(dead_code)]
    pub(super) model: String,
    #[serde(default)]
    pub(super) max_tokens: Option<i64>,
    #[serde(default)]
    pub(super) max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    #[serde(default)]
    pub(super) top_k: Option<usize>,
    #[serde(default)]
    pub(super) min_p: Option<f32>,
    #[serde(default)]
    pub(super) repeat_penalty: Option<f32>,
    #[serde(default)]
    pub(super) seed: Option<u64>,
    #[serde(default)]
    pub(super) stop: Option<StopParam>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    pub(super) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(super) n: Option<u32>,
    #[serde(default)]
    pub(super) ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    pub(super) ty: String,
    #[serde(default)]
    pub(super) text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Message {
    pub(super) role: String,
    #[serde(default)]
    pub(super) content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatBody {
    pub(super) messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum PromptParam {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionBody {
    pub(super) prompt: PromptParam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub(super) fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completions",
            Kind::Completion => "completions",
        }
    }
}
