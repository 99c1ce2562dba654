//! yamux as the mesh's stream multiplexer, with larger data frames.
//!
//! `libp2p-yamux` fixes yamux's data frames at 16 KiB. Under TLS that costs
//! twice per frame: yamux writes each frame's 12-byte header and its body as
//! two writes, so every 16 KiB of chunk body becomes two TLS records (one of
//! them 12 bytes, sealed on its own), and yamux's connection loop flushes the
//! socket after every frame, one `sendmsg` per 16 KiB. This adapter is the
//! same yamux protocol (`/yamux/1.0.0`, the same crate underneath) with data
//! frames of up to [`SPLIT_SEND_SIZE`]: 16 times fewer frames, header
//! records and flushes for a chunk body. Any yamux peer reads them: a frame
//! is never larger than the receiver's window (256 KiB at the start of every
//! stream) and rust-yamux accepts bodies up to 1 MiB.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{AsyncRead, AsyncWrite, future};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Largest yamux data frame this node sends (256 KiB, yamux's initial stream window).
pub const SPLIT_SEND_SIZE: usize = 256 << 10;

/// Inbound streams held while the swarm is not asking for them; more are reset.
const MAX_QUEUED_INBOUND: usize = 256;

/// The multiplexer upgrade: yamux with a frame size of our choosing.
#[derive(Debug, Clone)]
pub struct Config {
    inner: yamux::Config,
}

impl Config {
    /// yamux allowing `max_streams` concurrent streams, sending data frames of
    /// at most `split_send_size` bytes (16 KiB is libp2p-yamux's choice).
    pub fn new(max_streams: usize, split_send_size: usize) -> Self {
        let mut inner = yamux::Config::default();
        inner.set_max_num_streams(max_streams);
        inner.set_split_send_size(split_send_size.clamp(1 << 10, 1 << 20));
        Self { inner }
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.inner, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.inner, yamux::Mode::Client)))
    }
}

/// A yamux connection seen as a libp2p [`StreamMuxer`].
pub struct Muxer<C> {
    conn: yamux::Connection<C>,
    /// Inbound streams yamux produced while the swarm was driving the
    /// connection through [`StreamMuxer::poll`] rather than asking for one.
    queued: VecDeque<Stream>,
    /// Woken when a stream lands in `queued`.
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    fn new(io: C, config: yamux::Config, mode: yamux::Mode) -> Self {
        Self {
            conn: yamux::Connection::new(io, config, mode),
            queued: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        match self.conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => Poll::Ready(Ok(Stream(s))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(Error(e))),
            Poll::Ready(None) => Poll::Ready(Err(Error(yamux::ConnectionError::Closed))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = Stream;
    type Error = Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        let this = self.get_mut();
        if let Some(s) = this.queued.pop_front() {
            return Poll::Ready(Ok(s));
        }
        match this.next_inbound(cx) {
            Poll::Pending => {
                this.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        self.get_mut()
            .conn
            .poll_new_outbound(cx)
            .map(|r| r.map(Stream).map_err(Error))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().conn.poll_close(cx).map_err(Error)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Error>> {
        let this = self.get_mut();
        // Driving yamux is the only way it reads frames; an inbound stream
        // that turns up meanwhile waits in `queued` for `poll_inbound`.
        let s = match this.next_inbound(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Poll::Pending,
        };
        if this.queued.len() < MAX_QUEUED_INBOUND {
            this.queued.push_back(s);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        } else {
            tracing::warn!(stream = %s.0, "too many inbound streams waiting: dropping one");
        }
        // Come back at once: there may be more frames to read.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One yamux stream.
#[derive(Debug)]
pub struct Stream(yamux::Stream);

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_read_vectored(cx, bufs)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_close(cx)
    }
}

/// A yamux connection error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(yamux::ConnectionError);

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e.0 {
            yamux::ConnectionError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::poll_fn;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use libp2p::tcp::tokio::TcpStream;
    use std::sync::Arc;

    /// A socket that keeps a copy of every byte read from it.
    struct Tap {
        io: TcpStream,
        seen: Arc<parking_lot::Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Tap {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = futures::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
            self.seen.lock().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Tap {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_close(cx)
        }
    }

    use crate::mesh::test_util::tcp_pair as pair;

    /// Keeps a muxer's connection moving (reads, writes, window updates) until it closes.
    fn drive<M: StreamMuxer + Unpin + Send + 'static>(mut m: M) {
        tokio::spawn(poll_fn(move |cx| {
            loop {
                match m.poll_unpin(cx) {
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }));
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// Lengths of the yamux data frames (type 0) in a byte capture.
    fn data_frames(mut wire: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        while wire.len() >= 12 {
            let kind = wire[1];
            let len = u32::from_be_bytes([wire[8], wire[9], wire[10], wire[11]]);
            wire = &wire[12..];
            if kind == 0 {
                out.push(len);
                wire = &wire[(len as usize).min(wire.len())..];
            }
        }
        out
    }

    /// Sends `body` over a fresh stream from a muxer of ours with frames of
    /// `split` bytes and returns the data frames the other side read.
    async fn frames_for(split: usize, body: &[u8]) -> Vec<u32> {
        let (c, s) = pair().await;
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let tap = Tap {
            io: s,
            seen: seen.clone(),
        };
        let mut client = Muxer::new(c, Config::new(16, split).inner, yamux::Mode::Client);
        let mut server = Muxer::new(tap, Config::new(16, split).inner, yamux::Mode::Server);
        let mut out = poll_fn(|cx| client.poll_outbound_unpin(cx))
            .await
            .expect("open");
        drive(client);
        let sender = {
            let body = body.to_vec();
            tokio::spawn(async move {
                out.write_all(&body).await.expect("write");
                out.close().await.expect("close");
            })
        };
        let mut inbound = poll_fn(|cx| server.poll_inbound_unpin(cx))
            .await
            .expect("accept");
        drive(server);
        let mut got = Vec::new();
        inbound.read_to_end(&mut got).await.expect("read");
        sender.await.expect("sender");
        assert_eq!(got, body, "the stream delivers the bytes unchanged");
        let wire = seen.lock().clone();
        data_frames(&wire)
    }

    #[tokio::test]
    async fn data_frames_are_as_large_as_configured() {
        let body = payload((1 << 20) + 1, 7);
        let big = frames_for(SPLIT_SEND_SIZE, &body).await;
        let small = frames_for(16 << 10, &body).await;
        let total = |f: &[u32]| f.iter().map(|&n| u64::from(n)).sum::<u64>();
        assert_eq!(total(&big), body.len() as u64);
        assert_eq!(total(&small), body.len() as u64);
        assert!(
            big.iter().all(|&n| n as usize <= SPLIT_SEND_SIZE),
            "{big:?}"
        );
        assert!(small.iter().all(|&n| n <= 16 << 10), "{small:?}");
        assert!(
            big.iter().any(|&n| n > 16 << 10),
            "no frame above yamux's stock 16 KiB: {big:?}"
        );
        // 1 MiB + 1 in 16 KiB frames needs 65 of them; 256 KiB frames, a handful.
        assert!(small.len() >= 65, "{} frames", small.len());
        assert!(big.len() <= 16, "{} frames: {big:?}", big.len());
    }

    /// 3 MiB from the dialer, 1 MiB + 5 back, over one stream.
    async fn exchange<A, B>(mut dialer: A, mut listener: B)
    where
        A: StreamMuxer + Unpin + Send + 'static,
        B: StreamMuxer + Unpin + Send + 'static,
        A::Substream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B::Substream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        A::Error: std::fmt::Debug,
        B::Error: std::fmt::Debug,
    {
        let up = payload(3 << 20, 1);
        let down = payload((1 << 20) + 5, 2);
        let mut out = poll_fn(|cx| dialer.poll_outbound_unpin(cx))
            .await
            .expect("open");
        drive(dialer);
        let (u, d) = (up.clone(), down.clone());
        let far = tokio::spawn(async move {
            out.write_all(&u).await.expect("write");
            let mut back = vec![0u8; d.len()];
            out.read_exact(&mut back).await.expect("read back");
            assert_eq!(back, d, "reply arrives unchanged");
        });
        let mut inb = poll_fn(|cx| listener.poll_inbound_unpin(cx))
            .await
            .expect("accept");
        drive(listener);
        let mut got = vec![0u8; up.len()];
        inb.read_exact(&mut got).await.expect("read");
        assert_eq!(got, up, "request arrives unchanged");
        inb.write_all(&down).await.expect("write back");
        inb.flush().await.expect("flush");
        far.await.expect("dialer side");
    }

    /// Our muxer and the stock libp2p-yamux one, each dialling: a node of
    /// this build talks to any other yamux peer.
    #[tokio::test]
    async fn interoperates_with_stock_libp2p_yamux() {
        use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
        let ours = Config::new(16, SPLIT_SEND_SIZE);
        let stock = libp2p_yamux::Config::default();
        let p = "/yamux/1.0.0";
        let (c, s) = pair().await;
        let a = ours.clone().upgrade_outbound(c, p).await.expect("ours");
        let b = stock.clone().upgrade_inbound(s, p).await.expect("stock");
        exchange(a, b).await;
        let (c, s) = pair().await;
        let a = stock.upgrade_outbound(c, p).await.expect("stock");
        let b = ours.upgrade_inbound(s, p).await.expect("ours");
        exchange(a, b).await;
    }
}
