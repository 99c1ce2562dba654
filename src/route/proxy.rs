//! The router as HTTP middleware: in front of the generation routes
//! ([`super::forward::ROUTES`]), it reads the request, ranks the nodes that
//! can serve it ([`super::Routing::rank`]) and serves it here or forwards it.
//!
//! A peer that fails before the first byte of its answer reached the client
//! (its stream broke, it stalled, it answered 429, 5xx, 401 or 404) is
//! paused and the next candidate is tried: at most [`MAX_PEERS`] peers, then
//! this node. The first byte is the first token: the serving node sends
//! nothing of a streamed body before it (SSE keep-alive comments do not
//! count). After it, a broken answer ends with an error event in the
//! answer's own format (an SSE `data: {"error": ...}` then `data: [DONE]`,
//! or an NDJSON `{"error": ...}` line), so a client never hangs.

use super::forward::{self, ForwardError, ForwardRequest, Frame};
use super::{Routing, choose::Target, heads};
use crate::metrics::{RouteOutcome, RouteReason};
use crate::serve::openai::OpenAiError;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::io::{ReadHalf, WriteHalf};
use std::sync::Arc;
use std::time::Instant;

/// Request header: `local` serves the request on this node only.
pub const ROUTE_HEADER: &str = "x-shoal-route";
/// Most peers tried for one request before this node serves it.
pub const MAX_PEERS: usize = 3;

/// The API key scope the HTTP guard accepted for a request: the BLAKE3 hash
/// of the key presented (None when the node needs no key). Put into the
/// request's extensions by the guard; forwarded as is, never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyScope(pub Option<[u8; 32]>);

fn error_response(status: StatusCode, msg: &str) -> Response {
    OpenAiError::new(status, msg, "invalid_request_error", None).into_response()
}

/// The middleware (`axum::middleware::from_fn_with_state(routing, route)`).
// long: the whole decision: parse, rank, try each candidate in turn, fall back.
pub async fn route(State(r): State<Arc<Routing>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !r.cfg.enabled
        || req.method() != axum::http::Method::POST
        || !forward::ROUTES.contains(&path.as_str())
    {
        return next.run(req).await;
    }
    let local_only = req
        .headers()
        .get(ROUTE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("local"));
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, forward::MAX_REQUEST).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the request body is over {} bytes or was not received",
                    forward::MAX_REQUEST
                ),
            );
        }
    };
    let rebuild = |parts: axum::http::request::Parts, bytes: &Bytes| {
        Request::from_parts(parts, Body::from(bytes.clone()))
    };
    // Not JSON or no model: the handler gives its own error.
    let Some((model, json)) = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| Some((v.get("model")?.as_str()?.to_owned(), v)))
    else {
        return next.run(rebuild(parts, &bytes)).await;
    };
    let heads = heads::of_request(&path, &model, &json);
    let (ranked, holds) = if local_only {
        (Vec::new(), true)
    } else {
        let wanted = r.wanted(&model).await;
        let has_key = parts
            .extensions
            .get::<KeyScope>()
            .is_some_and(|k| k.0.is_some());
        (r.rank(&wanted, &heads, has_key).await, r.holds(&wanted))
    };
    if ranked.is_empty() {
        let reason = if local_only {
            RouteReason::LocalOnly
        } else {
            RouteReason::NoPeer
        };
        let req = rebuild(parts, &bytes);
        return serve_here(&r, next, req, &model, &heads, reason).await;
    }
    let peers_holding = ranked.iter().filter(|o| o.target != Target::Local).count();
    if ranked.first().is_some_and(|o| o.target != Target::Local) {
        if !holds {
            r.maybe_pull(&model);
        } else if ranked
            .iter()
            .any(|o| o.target == Target::Local && !o.loaded)
        {
            // Held here but not loaded: load it for the next requests.
            r.load_in_background(&model);
        }
    }
    let key = parts.extensions.get::<KeyScope>().and_then(|k| k.0);
    let fwd = ForwardRequest {
        path: path.clone(),
        content_type: header(&parts, "content-type"),
        accept: header(&parts, "accept"),
        key,
        body: bytes.to_vec(),
    };
    for (tried, offer) in ranked.iter().enumerate() {
        let reason = if offer.warm > 0 {
            RouteReason::Warm
        } else if peers_holding == 1 && !holds {
            RouteReason::OnlyHolder
        } else {
            RouteReason::Best
        };
        let Target::Peer(peer) = offer.target else {
            return serve_here(&r, next, rebuild(parts, &bytes), &model, &heads, reason).await;
        };
        if tried == MAX_PEERS {
            break;
        }
        let started = Instant::now();
        match attempt(&r, peer, &fwd).await {
            Ok(c) => {
                r.record(r.event(
                    offer.target,
                    &model,
                    RouteOutcome::Forwarded,
                    reason,
                    "",
                    Some(started.elapsed()),
                ));
                return c.into_response(&r, peer, &model);
            }
            Err((why, detail)) => {
                tracing::info!(%peer, model, reason = why.as_str(), detail, "routing: peer failed; trying the next");
                // A refused key scope is this request's, not the peer's fault.
                if why != RouteReason::Refused || !detail.contains("401") {
                    r.pause(peer, &detail);
                }
                r.record(r.event(
                    offer.target,
                    &model,
                    RouteOutcome::Retried,
                    why,
                    detail,
                    None,
                ));
            }
        }
    }
    // Every peer failed, or only peers were candidates: this node.
    serve_here(
        &r,
        next,
        rebuild(parts, &bytes),
        &model,
        &heads,
        RouteReason::NoPeer,
    )
    .await
}

fn header(parts: &axum::http::request::Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn serve_here(
    r: &Arc<Routing>,
    next: Next,
    req: Request,
    model: &str,
    heads: &[(usize, heads::Head)],
    reason: RouteReason,
) -> Response {
    let started = Instant::now();
    let resp = next.run(req).await;
    if resp.status().is_success() {
        r.note_served(model, heads);
        r.record(r.event(
            Target::Local,
            model,
            RouteOutcome::Local,
            reason,
            "",
            Some(started.elapsed()),
        ));
    }
    resp
}

/// A peer's answer that reached its first byte (or its end).
struct Committed {
    status: u16,
    headers: Vec<(String, String)>,
    first: Vec<Vec<u8>>,
    /// The stream, when the answer goes on.
    rest: Option<(ReadHalf<libp2p::Stream>, WriteHalf<libp2p::Stream>)>,
    inflight: super::InFlight,
}

/// Times a freshly opened stream may be dropped by the peer before its
/// first frame and opened again (see [`open`]).
const REOPEN: u32 = 5;

/// Opens a `/shoal/serve/1` stream to `peer`, sends the request and waits
/// for `Accepted`. A peer may drop a freshly opened stream before reading
/// it (libp2p-stream hands inbound streams over through a channel with room
/// for one; a burst of streams loses the others): a stream closed before
/// its first frame is opened again after a few milliseconds, up to
/// [`REOPEN`] times, without counting against the peer.
async fn open(
    r: &Arc<Routing>,
    peer: libp2p::PeerId,
    fwd: &ForwardRequest,
) -> Result<(ReadHalf<libp2p::Stream>, WriteHalf<libp2p::Stream>), (RouteReason, String)> {
    use futures::AsyncReadExt;
    let stall = r.cfg.stall_timeout;
    let mut control = r.mesh.stream_control();
    let mut tries = 0;
    loop {
        tries += 1;
        let stream =
            match tokio::time::timeout(stall, control.open_stream(peer, forward::SERVE_PROTOCOL))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err((RouteReason::Died, format!("cannot open a stream: {e}")));
                }
                Err(_) => return Err((RouteReason::Stalled, "opening a stream timed out".into())),
            };
        let (mut rd, mut wr) = stream.split();
        let first = match forward::write(&mut wr, fwd).await {
            Ok(()) => forward::next_frame(&mut rd, stall).await,
            Err(e) => Err(e.into()),
        };
        match first {
            Ok(Frame::Accepted) => return Ok((rd, wr)),
            Ok(Frame::Head { status: 401, .. }) => {
                return Err((RouteReason::Refused, "answered 401".into()));
            }
            Ok(Frame::Error(m)) => return Err((RouteReason::Refused, m)),
            Ok(other) => {
                return Err((
                    RouteReason::Died,
                    format!("unexpected first frame {other:?}"),
                ));
            }
            Err(ForwardError::Stalled(d)) => {
                return Err((RouteReason::Stalled, format!("no answer for {d:?}")));
            }
            Err(e) if tries < REOPEN => {
                tracing::debug!(%peer, error = %e, tries, "routing: stream dropped before its first frame; opening another");
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(tries))).await;
            }
            Err(e) => return Err((RouteReason::Died, e.to_string())),
        }
    }
}

/// One try at `peer`: until the first byte of the answer (or a failure).
async fn attempt(
    r: &Arc<Routing>,
    peer: libp2p::PeerId,
    fwd: &ForwardRequest,
) -> Result<Committed, (RouteReason, String)> {
    let stall = r.cfg.stall_timeout;
    let inflight = r.inflight(peer);
    let died = |e: ForwardError| match e {
        ForwardError::Stalled(_) => (RouteReason::Stalled, e.to_string()),
        _ => (RouteReason::Died, e.to_string()),
    };
    let (mut rd, _wr) = open(r, peer, fwd).await?;
    let mut head: Option<(u16, Vec<(String, String)>)> = None;
    let mut first = Vec::new();
    loop {
        match forward::next_frame(&mut rd, stall).await.map_err(died)? {
            Frame::Accepted | Frame::Heartbeat => {}
            Frame::Head { status, headers } => {
                if status == 429 || status >= 500 {
                    return Err((RouteReason::Busy, format!("answered {status}")));
                }
                if status == 401 || status == 403 || status == 404 {
                    return Err((RouteReason::Refused, format!("answered {status}")));
                }
                head = Some((status, headers));
            }
            Frame::Data(d) => {
                let Some((status, headers)) = &head else {
                    return Err((RouteReason::Died, "body before head".into()));
                };
                // SSE comments (keep-alives) are not the first token; an
                // error before any token is a failure of that node.
                let comment = d.first() == Some(&b':');
                if !comment && first.iter().all(|f: &Vec<u8>| f.first() == Some(&b':')) {
                    let t = String::from_utf8_lossy(&d[..d.len().min(64)]).into_owned();
                    if t.starts_with("data: {\"error\"") || t.starts_with("{\"error\"") {
                        return Err((RouteReason::Busy, "failed before its first token".into()));
                    }
                }
                first.push(d);
                if !comment {
                    return Ok(Committed {
                        status: *status,
                        headers: headers.clone(),
                        first,
                        rest: Some((rd, _wr)),
                        inflight,
                    });
                }
            }
            Frame::End => {
                let Some((status, headers)) = head else {
                    return Err((RouteReason::Died, "end before head".into()));
                };
                return Ok(Committed {
                    status,
                    headers,
                    first,
                    rest: None,
                    inflight,
                });
            }
            Frame::Error(m) => return Err((RouteReason::Busy, m)),
        }
    }
}

/// How a broken answer is ended for its client.
#[derive(Debug, Clone, Copy)]
enum Format {
    Sse,
    Ndjson,
    Other,
}

fn error_event(f: Format, msg: &str) -> Vec<u8> {
    let err = OpenAiError::new(
        StatusCode::BAD_GATEWAY,
        msg,
        "server_error",
        Some("serving_node_failed"),
    )
    .body();
    match f {
        Format::Sse => format!("data: {err}\n\ndata: [DONE]\n\n").into_bytes(),
        Format::Ndjson => format!("{}\n", serde_json::json!({"error": msg})).into_bytes(),
        Format::Other => Vec::new(),
    }
}

impl Committed {
    fn into_response(self, r: &Arc<Routing>, peer: libp2p::PeerId, model: &str) -> Response {
        let ct = self
            .headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let format = if ct.starts_with("text/event-stream") {
            Format::Sse
        } else if ct.starts_with("application/x-ndjson") {
            Format::Ndjson
        } else {
            Format::Other
        };
        let mut b = Response::builder()
            .status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY));
        for (n, v) in &self.headers {
            if forward::passed_header(n) {
                b = b.header(n.as_str(), v.as_str());
            }
        }
        b = b.header(forward::FORWARDED_BY, r.me.to_string());
        let first = futures::stream::iter(
            self.first
                .into_iter()
                .map(|d| Ok::<_, std::io::Error>(Bytes::from(d))),
        );
        let body = match self.rest {
            None => Body::from_stream(first),
            Some((rd, wr)) => {
                let st = Rest {
                    rd,
                    _wr: wr,
                    stall: r.cfg.stall_timeout,
                    format,
                    done: false,
                    routing: r.clone(),
                    peer,
                    model: model.to_owned(),
                    _inflight: self.inflight,
                };
                let rest = futures::stream::unfold(st, |mut st| async move {
                    if st.done {
                        return None;
                    }
                    loop {
                        match forward::next_frame(&mut st.rd, st.stall).await {
                            Ok(Frame::Data(d)) => return Some((Ok(Bytes::from(d)), st)),
                            Ok(Frame::Accepted | Frame::Heartbeat | Frame::Head { .. }) => {}
                            Ok(Frame::End) => return None,
                            Ok(Frame::Error(m)) => return Some(st.broken(&m)),
                            Err(e) => return Some(st.broken(&e.to_string())),
                        }
                    }
                });
                Body::from_stream(first.chain(rest))
            }
        };
        b.body(body).unwrap_or_else(|e| {
            error_response(
                StatusCode::BAD_GATEWAY,
                &format!("bad answer from {peer}: {e}"),
            )
        })
    }
}

/// The rest of a forwarded answer, frame by frame.
struct Rest {
    rd: ReadHalf<libp2p::Stream>,
    _wr: WriteHalf<libp2p::Stream>,
    stall: std::time::Duration,
    format: Format,
    done: bool,
    routing: Arc<Routing>,
    peer: libp2p::PeerId,
    model: String,
    _inflight: super::InFlight,
}

impl Rest {
    /// Ends a broken answer with an error event (never a hang).
    fn broken(mut self, why: &str) -> (Result<Bytes, std::io::Error>, Rest) {
        self.done = true;
        let msg = format!(
            "the node serving this answer ({}) failed after it started: {why}",
            self.peer
        );
        tracing::warn!(peer = %self.peer, model = self.model, why, "routing: forwarded answer broke");
        self.routing.pause(self.peer, why);
        self.routing.record(self.routing.event(
            Target::Peer(self.peer),
            &self.model,
            RouteOutcome::Failed,
            RouteReason::Died,
            why,
            None,
        ));
        let bytes = error_event(self.format, &msg);
        if bytes.is_empty() {
            (Err(std::io::Error::other(msg)), self)
        } else {
            (Ok(Bytes::from(bytes)), self)
        }
    }
}

/// Serves `/shoal/serve/1` streams from peers through `app` (the generation
/// routes without this middleware), as long as the router lives. `authorize`
/// checks a forwarded key scope against this node's API keys.
pub async fn serve_forwarded(r: Arc<Routing>, app: axum::Router, authorize: forward::Authorize) {
    if r.app.set((app, authorize)).is_err() {
        return;
    }
    let mut control = r.mesh.stream_control();
    let mut incoming = match control.accept(forward::SERVE_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "routing: cannot accept forwarded requests");
            return;
        }
    };
    // Held weakly: the node (its store, its mesh, its serving layer) goes
    // away when it shuts down even though this task waits for streams.
    let weak = Arc::downgrade(&r);
    drop(r);
    while let Some((peer, stream)) = incoming.next().await {
        let Some(r) = weak.upgrade() else { return };
        if r.banned.lock().contains(&peer) {
            continue;
        }
        let Some((app, authorize)) = r.app.get().cloned() else {
            return;
        };
        let busy = r.mesh.busy(peer);
        tokio::spawn(async move {
            let started = Instant::now();
            let served = forward::serve_one(peer, stream, app, &*authorize).await;
            drop(busy);
            match served {
                Ok(done) if done.status < 300 => {
                    let json =
                        serde_json::from_slice::<serde_json::Value>(&done.body).unwrap_or_default();
                    let model = json.get("model").and_then(|m| m.as_str()).unwrap_or("");
                    r.note_served(model, &heads::of_request(&done.path, model, &json));
                    let mut ev = r.event(
                        Target::Local,
                        model,
                        RouteOutcome::ServedForPeer,
                        RouteReason::Best,
                        "",
                        Some(started.elapsed()),
                    );
                    ev.from = peer.to_string();
                    r.record(ev);
                }
                Ok(done) => {
                    tracing::debug!(%peer, status = done.status, "routing: forwarded request answered")
                }
                Err(e) => tracing::debug!(%peer, error = %e, "routing: forwarded request ended"),
            }
        });
    }
}
