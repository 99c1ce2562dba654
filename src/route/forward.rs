//! `/shoal/serve/1`: a generation request forwarded to a peer, its answer
//! streamed back.
//!
//! # Protocol (version 1)
//!
//! One request per libp2p stream, on the mesh's authenticated (and, with a
//! PSK, private) connections. Every message is a frame: `u32` big-endian
//! length, then the mesh wire version byte and postcard
//! ([`crate::mesh::wire::encode`]).
//!
//! 1. The forwarding node writes one [`ForwardRequest`] (at most
//!    [`MAX_REQUEST`] bytes): the route path, the content type and accept
//!    headers, the BLAKE3 hash of the API key it verified (never the key),
//!    and the body.
//! 2. The serving node answers [`Frame`]s: `Accepted` at once, `Head` when
//!    its handler has a status, then `Data` as the body is produced, `End`
//!    after the last byte, or `Error` when the body breaks. While nothing else
//!    is sent it writes a `Heartbeat` every [`HEARTBEAT`], so a silent stream
//!    means a dead or stalled node (the forwarding node gives up after
//!    `route.stall_timeout`).
//! 3. Either side closing the stream stops the other: the serving node drops
//!    the response (its engine cancels the generation), the forwarding node
//!    ends its client's answer (or tries the next node when nothing had been
//!    sent yet).
//!
//! Back-pressure is the stream's own flow control: a frame is written only
//! when the previous one fit in the peer's window, and the serving node polls
//! the body only then.

use crate::mesh::wire::{self, WireError};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The protocol name.
pub const SERVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/serve/1");
/// Largest forwarded request (body and headers).
pub const MAX_REQUEST: usize = 4 << 20;
/// Largest frame of an answer.
pub const MAX_FRAME: usize = 1 << 20;
/// Interval of heartbeats while nothing else is sent.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// The routes that may be forwarded.
pub const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
];
/// Request header naming the peer that forwarded the request (set by the
/// serving node on the request it hands its own handlers).
pub const FORWARDED_FROM: &str = "x-shoal-forwarded-from";
/// Response header naming the node that received the client's request and
/// forwarded it.
pub const FORWARDED_BY: &str = "x-shoal-forwarded-by";

/// A forwarded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// One of [`ROUTES`].
    pub path: String,
    /// The client's `Content-Type`.
    pub content_type: Option<String>,
    /// The client's `Accept`.
    pub accept: Option<String>,
    /// BLAKE3 of the API key the forwarding node accepted (None: it needs none).
    pub key: Option<[u8; 32]>,
    /// The request body (JSON).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A frame of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The request was read; the serving node works on it.
    Accepted,
    /// Still working (sent when nothing else was for [`HEARTBEAT`]).
    Heartbeat,
    /// The status and the headers worth passing on.
    Head {
        /// HTTP status.
        status: u16,
        /// Header names (lower case) and values.
        headers: Vec<(String, String)>,
    },
    /// Body bytes.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The body is complete.
    End,
    /// The body broke; the message says why.
    Error(String),
}

/// Errors of the forwarding protocol.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The stream failed (peer gone, reset, refused protocol).
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that does not decode.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// No frame for the stall timeout.
    #[error("no answer for {0:?}")]
    Stalled(Duration),
    /// The stream ended without `End`.
    #[error("the stream ended early")]
    Eof,
    /// The request is not one that may be forwarded.
    #[error("not a forwardable route: {0}")]
    Route(String),
}

/// Writes one frame.
pub async fn write<W: futures::AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    wire::write_frame(w, &wire::encode(msg)).await?;
    w.flush().await
}

/// Reads one frame of at most `max` bytes.
pub async fn read<R: futures::AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, ForwardError> {
    let bytes = match wire::read_frame(r, max).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ForwardError::Eof),
        Err(e) => return Err(e.into()),
    };
    Ok(wire::decode(&bytes)?)
}

/// Reads the next frame, giving up after `stall`.
pub async fn next_frame<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    stall: Duration,
) -> Result<Frame, ForwardError> {
    match tokio::time::timeout(stall, read::<_, Frame>(r, MAX_FRAME)).await {
        Ok(r) => r,
        Err(_) => Err(ForwardError::Stalled(stall)),
    }
}

/// Response headers passed from the serving node to the client.
pub fn passed_header(name: &str) -> bool {
    name == "content-type"
        || name == "cache-control"
        || name == "etag"
        || name == "retry-after"
        || name.starts_with("x-shoal-")
}

/// Decides whether a forwarded key scope (the hash of the key the
/// forwarding node verified, or none) may use this node's generation routes.
pub type Authorize = std::sync::Arc<dyn Fn(Option<&[u8; 32]>) -> bool + Send + Sync>;

/// A forwarded request served by [`serve_one`].
#[derive(Debug)]
pub struct ServedOne {
    /// The status answered.
    pub status: u16,
    /// The route.
    pub path: String,
    /// The request body.
    pub body: Vec<u8>,
}

/// Serves one forwarded request on `stream` through `app` (the node's
/// generation routes without the router middleware). `authorize` decides
/// whether the forwarded key scope may use this node's API.
// long: one request's whole life on the serving side, read to last frame.
pub async fn serve_one(
    peer: libp2p::PeerId,
    stream: libp2p::Stream,
    app: axum::Router,
    authorize: &(dyn Fn(Option<&[u8; 32]>) -> bool + Send + Sync),
) -> Result<ServedOne, ForwardError> {
    use tower::ServiceExt;
    let (mut rd, mut wr) = stream.split();
    let req: ForwardRequest =
        match tokio::time::timeout(Duration::from_secs(10), read(&mut rd, MAX_REQUEST)).await {
            Ok(r) => r?,
            Err(_) => return Err(ForwardError::Stalled(Duration::from_secs(10))),
        };
    if !ROUTES.contains(&req.path.as_str()) {
        let msg = format!("not a forwardable route: {}", req.path);
        write(&mut wr, &Frame::Error(msg.clone())).await?;
        return Err(ForwardError::Route(req.path));
    }
    if !authorize(req.key.as_ref()) {
        let body = serde_json::json!({"error": {"message":
            "this node needs an API key that the forwarding node did not verify",
            "type": "authentication_error", "code": "forwarded_key_refused"}})
        .to_string();
        write(
            &mut wr,
            &Frame::Head {
                status: 401,
                headers: vec![("content-type".into(), "application/json".into())],
            },
        )
        .await?;
        write(&mut wr, &Frame::Data(body.into_bytes())).await?;
        write(&mut wr, &Frame::End).await?;
        return Ok(ServedOne {
            status: 401,
            path: req.path,
            body: req.body,
        });
    }
    write(&mut wr, &Frame::Accepted).await?;
    let mut http = axum::http::Request::builder()
        .method("POST")
        .uri(req.path.as_str())
        .header(FORWARDED_FROM, peer.to_string())
        .header("host", "localhost");
    if let Some(ct) = &req.content_type {
        http = http.header("content-type", ct.as_str());
    }
    if let Some(a) = &req.accept {
        http = http.header("accept", a.as_str());
    }
    let done = |status| ServedOne {
        status,
        path: req.path.clone(),
        body: req.body.clone(),
    };
    let http = http
        .body(axum::body::Body::from(req.body.clone()))
        .map_err(|e| ForwardError::Route(e.to_string()))?;
    // A read on the stream completes only when the forwarding node closes
    // it (it sends nothing after the request): that is the cancellation.
    let mut probe = [0u8; 1];
    let closed = rd.read(&mut probe);
    futures::pin_mut!(closed);
    let call = app.oneshot(http);
    futures::pin_mut!(call);
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    let resp = loop {
        tokio::select! {
            r = &mut call => break r.unwrap_or_else(|e| match e {}),
            _ = &mut closed => return Err(ForwardError::Eof),
            _ = beat.tick() => write(&mut wr, &Frame::Heartbeat).await?,
        }
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter(|(n, _)| passed_header(n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    write(&mut wr, &Frame::Head { status, headers }).await?;
    let mut body = resp.into_body().into_data_stream();
    beat.reset();
    loop {
        tokio::select! {
            next = body.next() => match next {
                Some(Ok(bytes)) => {
                    for part in bytes.chunks(MAX_FRAME - 64) {
                        write(&mut wr, &Frame::Data(part.to_vec())).await?;
                    }
                    beat.reset();
                }
                Some(Err(e)) => {
                    write(&mut wr, &Frame::Error(e.to_string())).await?;
                    return Ok(done(status));
                }
                None => {
                    write(&mut wr, &Frame::End).await?;
                    let _ = wr.close().await;
                    return Ok(done(status));
                }
            },
            _ = &mut closed => return Err(ForwardError::Eof),
            _ = beat.tick() => write(&mut wr, &Frame::Heartbeat).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Version 1 is pinned: a change here is a wire change.
    #[test]
    fn fixture_version_1() {
        let req = ForwardRequest {
            path: "/v1/chat/completions".into(),
            content_type: Some("application/json".into()),
            accept: None,
            key: Some([7; 32]),
            body: b"{}".to_vec(),
        };
        let mut all = wire::encode(&req);
        for f in [
            Frame::Accepted,
            Frame::Heartbeat,
            Frame::Head {
                status: 200,
                headers: vec![("content-type".into(), "text/event-stream".into())],
            },
            Frame::Data(b"data: x\n\n".to_vec()),
            Frame::End,
            Frame::Error("gone".into()),
        ] {
            all.extend(wire::encode(&f));
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/serve-forward-v1.bin");
        if std::env::var_os("SHOAL_REGEN_FIXTURES").is_some() {
            std::fs::write(&path, &all).expect("write fixture");
        }
        let want = include_bytes!("../../tests/fixtures/serve-forward-v1.bin");
        assert_eq!(hex::encode(&all), hex::encode(want));
        assert_eq!(wire::decode::<Frame>(&[1, 0]), Ok(Frame::Accepted));
        assert_eq!(wire::decode::<Frame>(&[1, 4]), Ok(Frame::End));
        assert!(wire::decode::<Frame>(&[1, 9]).is_err());
        assert!(wire::decode::<Frame>(&[2, 0]).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_bounds_hold() {
        let mut buf = Vec::new();
        write(&mut buf, &Frame::Data(vec![1, 2, 3]))
            .await
            .expect("write");
        let mut r = futures::io::Cursor::new(buf.clone());
        let f: Frame = read(&mut r, MAX_FRAME).await.expect("read");
        assert_eq!(f, Frame::Data(vec![1, 2, 3]));
        let mut r = futures::io::Cursor::new(buf.clone());
        assert!(matches!(
            read::<_, Frame>(&mut r, 3).await,
            Err(ForwardError::Io(_))
        ));
        let mut r = futures::io::Cursor::new(buf[..buf.len() - 1].to_vec());
        assert!(matches!(
            read::<_, Frame>(&mut r, MAX_FRAME).await,
            Err(ForwardError::Eof)
        ));
        let mut empty = futures::io::Cursor::new(Vec::new());
        assert!(matches!(
            read::<_, Frame>(&mut empty, MAX_FRAME).await,
            Err(ForwardError::Eof)
        ));
    }
}
