//! The HTTP/1.1 server loop under the API: hyper's connection driver with
//! the timeouts a node left in a classroom needs.
//!
//! - **Header timeout**: from the first byte of a request, its headers must
//!   be complete within `header` or the connection is closed (slow headers).
//! - **Body timeout**: a request body that gets no bytes for `body` fails, and
//!   the connection closes after the answer.
//! - **Idle timeout**: a connection with no request in progress (no request
//!   being handled, no response being written, no partial request) for
//!   `idle` is closed. A long generation or an event stream is in progress,
//!   never idle.
//!
//! Graceful shutdown: when `shutdown` resolves the listener is dropped, idle
//! connections close, and open requests finish before [`serve_with`] returns.

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Read and idle timeouts of the API's connections (`api.header_timeout`,
/// `api.body_timeout`, `api.idle_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From a request's first byte to the end of its headers.
    pub header: Duration,
    /// Longest wait for more of a request body.
    pub body: Duration,
    /// Longest time a connection may have no request in progress.
    pub idle: Duration,
}

impl Default for Timeouts {
    /// The configuration's defaults (`[api]`).
    fn default() -> Self {
        super::ApiOptions::default().timeouts()
    }
}

/// Serves `router` on `listener` with `timeouts` until `shutdown` resolves,
/// then drains open requests.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            router.clone(),
            timeouts,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    // Every connection task holds a receiver: this ends when the last one ends.
    stop_tx.closed().await;
    Ok(())
}

/// What one connection is doing, for the timeouts.
struct ConnState {
    /// Requests handled or answered right now.
    inflight: AtomicUsize,
    /// `(first byte of a request whose headers are not complete, end of the last request)`.
    times: Mutex<(Option<Instant>, Instant)>,
}

impl ConnState {
    fn on_read(&self) {
        if self.inflight.load(Ordering::Acquire) == 0 {
            let mut t = self.times.lock();
            if t.0.is_none() {
                t.0 = Some(Instant::now());
            }
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.times.lock().0 = None;
        InFlight(self.clone())
    }

    /// Why the connection should close now, if it should.
    fn expired(&self, t: &Timeouts) -> Option<&'static str> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let (pending, last) = *self.times.lock();
        match pending {
            Some(p) if p.elapsed() > t.header => Some("request headers too slow"),
            Some(_) => None,
            None if last.elapsed() > t.idle => Some("idle"),
            None => None,
        }
    }
}

/// One request in progress; dropped when its response has been written (or abandoned).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.times.lock().1 = Instant::now();
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, noting when bytes arrive.
struct Watched {
    io: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A request body that fails when no bytes come for `timeout`.
struct TimeoutBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for TimeoutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(x) => {
                this.sleep = None;
                Poll::Ready(x.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let t = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                if sleep.as_mut().poll(cx).is_ready() {
                    tracing::debug!(timeout = ?t, "request body timed out");
                    return Poll::Ready(Some(Err(format!(
                        "no request body bytes for {} ms (api.body_timeout)",
                        t.as_millis()
                    )
                    .into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request "in progress" until written.
struct Tracked {
    inner: Body,
    _flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    t: Timeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState {
        inflight: AtomicUsize::new(0),
        times: Mutex::new((None, Instant::now())),
    });
    let io = TokioIo::new(Watched {
        io: stream,
        state: state.clone(),
    });
    let st = state.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let flight = st.begin();
        let req = req.map(|b| {
            Body::new(TimeoutBody {
                inner: b,
                timeout: t.body,
                sleep: None,
            })
        });
        let router = router.clone();
        async move {
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok::<_, Infallible>(resp.map(|b| Tracked {
                inner: b,
                _flight: flight,
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let tick = (t.header.min(t.idle) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "API connection ended with an error");
                }
                break;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = ticker.tick() => {
                if let Some(why) = state.expired(&t) {
                    tracing::debug!(%peer, why, "closing API connection");
                    break;
                }
            }
        }
    }
}
