//! The request schema of `/api/chat`, `/api/generate`, `/api/show` and
//! `/api/pull`, as Ollama's `docs/api.md` names the fields. Unknown
//! top-level fields are ignored (as Ollama does); `options` is read key by
//! key in `prepare`.

use serde::Deserialize;
use serde_json::{Map, Value};

/// A chat message.
#[derive(Debug, Deserialize)]
pub(super) struct Message {
    pub(super) role: String,
    #[serde(default)]
    pub(super) content: Option<String>,
    #[serde(default)]
    pub(super) images: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) tool_calls: Option<Vec<Value>>,
}

/// Fields `/api/chat` and `/api/generate` share.
#[derive(Debug, Deserialize)]
pub(super) struct Common {
    pub(super) model: String,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    pub(super) options: Option<Map<String, Value>>,
    /// `""` or absent: free text; anything else (`"json"`, a schema) is refused.
    #[serde(default)]
    pub(super) format: Option<Value>,
    /// Accepted and ignored: a model stays loaded until room is needed.
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) keep_alive: Option<Value>,
    #[serde(default)]
    pub(super) think: Option<Value>,
    #[serde(default)]
    pub(super) tools: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) images: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) logprobs: Option<bool>,
}

/// `POST /api/chat`.
#[derive(Debug, Deserialize)]
pub(super) struct ChatBody {
    #[serde(default)]
    pub(super) messages: Vec<Message>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize)]
pub(super) struct GenerateBody {
    #[serde(default)]
    pub(super) prompt: Option<String>,
    #[serde(default)]
    pub(super) suffix: Option<String>,
    #[serde(default)]
    pub(super) system: Option<String>,
    #[serde(default)]
    pub(super) template: Option<String>,
    #[serde(default)]
    pub(super) context: Option<Vec<u32>>,
    #[serde(default)]
    pub(super) raw: Option<bool>,
}

/// `POST /api/show` and `POST /api/pull`: `model` (or the older `name`).
#[derive(Debug, Deserialize)]
pub(super) struct NameBody {
    #[serde(default)]
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
}

impl NameBody {
    pub(super) fn model(&self) -> Option<&str> {
        self.model
            .as_deref()
            .filter(|m| !m.is_empty())
            .or(self.name.as_deref().filter(|m| !m.is_empty()))
    }
}

/// Which endpoint a generation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Generate,
}

impl Kind {
    /// The response cache's endpoint name.
    pub(super) fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "ollama.chat",
            Kind::Generate => "ollama.generate",
        }
    }
}
