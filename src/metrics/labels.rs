//! Label values (the typed enums every layer reports with) and the label
//! sets of the metric families.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use serde::Serialize;

/// Where a chunk's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Another artifact in this node's store held the same chunk (deduplication).
    Local,
    /// A peer in the mesh.
    Peer,
    /// The artifact's origin URL.
    Origin,
}

impl Source {
    /// All sources, in display order.
    pub const ALL: [Source; 3] = [Source::Local, Source::Peer, Source::Origin];
}

/// How a chunk fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The chunk arrived and matched its hash.
    Ok,
    /// The bytes arrived but did not match the hash (counted in bad chunks too).
    BadHash,
    /// The transfer failed (refused, reset, not found at the source).
    Failed,
    /// The transfer took too long and was abandoned.
    Timeout,
}

/// A KV-cache tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Blocks in RAM.
    Ram,
    /// Blocks spilled to disk.
    Disk,
}

/// Result of a cache lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// Found.
    Hit,
    /// Not found.
    Miss,
}

impl From<bool> for Lookup {
    fn from(hit: bool) -> Self {
        if hit { Lookup::Hit } else { Lookup::Miss }
    }
}

/// Which cache served the start of a response (splits time to first token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheOutcome {
    /// Nothing cached: the whole prompt was computed (cold).
    Miss,
    /// Part or all of the prompt's prefix came from the KV cache (warm).
    Kv,
    /// The whole response came from the response cache.
    Response,
}

/// State of a stored artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArtifactState {
    /// Complete and verified.
    Active,
    /// Being filled.
    Partial,
}

/// What happened to a generation request on the router (`crate::route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOutcome {
    /// Served by this node.
    Local,
    /// Forwarded to a peer, which answered.
    Forwarded,
    /// Served here for a peer that forwarded it.
    ServedForPeer,
    /// A peer failed before its first byte; the next node was tried.
    Retried,
    /// The answer broke after its first byte (the client got an error event),
    /// or no node could serve it.
    Failed,
}

/// Why a routing decision or failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReason {
    /// The best candidate by load (model loaded, least busy).
    Best,
    /// The candidate holds the prompt's prefix warm.
    Warm,
    /// The only node holding the model.
    OnlyHolder,
    /// The client asked for this node only (`X-Shoal-Route: local`) or routing is off.
    LocalOnly,
    /// No peer offers the model: served here (pulling it if needed).
    NoPeer,
    /// The peer sent nothing for `route.stall_timeout`.
    Stalled,
    /// The peer's stream failed (node gone, connection reset).
    Died,
    /// The peer answered 429/503 (full, loading) or 5xx.
    Busy,
    /// The peer refused (authentication, unknown model).
    Refused,
}

/// Label values are the lower-case (snake_case) names of the variants.
macro_rules! label_values {
    ($($t:ty { $($v:ident => $s:literal),+ $(,)? })+) => {$(
        impl $t {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )+};
}

label_values! {
    Source { Local => "local", Peer => "peer", Origin => "origin" }
    Outcome { Ok => "ok", BadHash => "bad_hash", Failed => "failed", Timeout => "timeout" }
    Tier { Ram => "ram", Disk => "disk" }
    Lookup { Hit => "hit", Miss => "miss" }
    CacheOutcome { Miss => "miss", Kv => "kv", Response => "response" }
    ArtifactState { Active => "active", Partial => "partial" }
    RouteOutcome { Local => "local", Forwarded => "forwarded", ServedForPeer => "served_for_peer",
        Retried => "retried", Failed => "failed" }
    RouteReason { Best => "best", Warm => "warm", OnlyHolder => "only_holder",
        LocalOnly => "local_only", NoPeer => "no_peer", Stalled => "stalled", Died => "died",
        Busy => "busy", Refused => "refused" }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct StatusLabel {
    pub(super) status: ArtifactState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct SourceLabel {
    pub(super) source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct FetchLabels {
    pub(super) source: Source,
    pub(super) outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TierLabel {
    pub(super) tier: Tier,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct KvLookupLabels {
    pub(super) tier: Tier,
    pub(super) result: Lookup,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub(super) result: Lookup,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct CacheLabel {
    pub(super) cache: CacheOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ModelLabel {
    pub(super) model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) outcome: RouteOutcome,
    pub(super) reason: RouteReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct HttpStatusLabel {
    pub(super) status: String,
}
