//! Ground floor: berthd's TCP listeners (streaming, metrics) under guard. Any node user can
//! connect to them, so each holds at most a bounded share of berthd's descriptors and closes a
//! connection that sends no request head within seconds: the CRI socket, monitors and records
//! always find a free descriptor.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection that has not sent a complete request head within this is closed; the same
/// holds between the requests of a kept-alive connection. Clients send theirs at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a connection may buffer of a request head (hyper's default, 400 KiB, would let
/// the connections of one listener hold hundreds of MiB). Clients' heads are a few KiB.
const MAX_BUFFER: usize = 64 * 1024;

/// The connections a listener may hold: 1/`share` of the descriptor limit, at least 4 and
/// at most `most`.
pub fn cap(share: u64, most: usize) -> usize {
    usize::try_from(crate::fdlimit::soft() / share)
        .unwrap_or(usize::MAX)
        .clamp(4, most)
}

/// A TCP listener that accepts only while it holds fewer connections than its cap.
pub struct GuardedListener {
    tcp: TcpListener,
    slots: Arc<Semaphore>,
    what: &'static str,
}

impl GuardedListener {
    /// Guards `tcp` (`what` names it in logs), allowing `cap` connections at once.
    pub fn new(tcp: TcpListener, cap: usize, what: &'static str) -> GuardedListener {
        tracing::debug!(listener = what, cap, "connection cap");
        GuardedListener {
            tcp,
            slots: Arc::new(Semaphore::new(cap)),
            what,
        }
    }

    /// The next connection (TCP_NODELAY set), once one of the cap's slots is free; the slot
    /// is taken back when the connection is dropped, upgraded or not.
    pub async fn accept(&self) -> (Guarded<TcpStream>, SocketAddr) {
        // Over the cap berthd does not accept rather than accept and close: a waiting
        // connection stays in the kernel's backlog (bounded by listen(2)), holding none of
        // berthd's descriptors, and is served when a slot frees; accept-and-close would spend
        // a descriptor and a wake-up on every attempt of a client that dials again at once.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.tcp.accept().await {
                Ok((tcp, peer)) => {
                    // Small frames (replies, an exit status) must not wait for the client's
                    // delayed ACK: without TCP_NODELAY each exec took ~40 ms longer.
                    let _ = tcp.set_nodelay(true);
                    return (
                        Guarded {
                            io: tcp,
                            _slot: slot,
                        },
                        peer,
                    );
                }
                // That client gave up before we took it: the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    // Out of descriptors after all (the CRI side took them): wait, not spin.
                    tracing::warn!(listener = self.what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A connection holding one of its listener's slots until it is dropped.
pub struct Guarded<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` over HTTP/1.1 (with upgrades: SPDY, WebSocket) on the connections of
/// `listener` until `shutdown`. `prepare` turns an accepted connection into the stream HTTP
/// runs on (a TLS handshake, in the connection's own task), or into `None` to drop it. After
/// `shutdown` the listening socket closes and this returns once every connection finished its
/// request; upgraded ones have left HTTP and are not waited for.
pub async fn serve<P, F, I, S>(
    listener: GuardedListener,
    prepare: P,
    app: axum::Router,
    shutdown: S,
) where
    P: Fn(Guarded<TcpStream>, SocketAddr) -> F,
    F: Future<Output = Option<I>> + Send + 'static,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Future<Output = ()>,
{
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let what = listener.what;
    tokio::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => break,
        };
        let io = prepare(conn, peer);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let Some(io) = io.await else { return };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_BUFFER)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let stop = async {
                let _ = stopping.wait_for(|s| *s).await;
            };
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                // A silent client's timeout, a client gone mid-request: theirs, not ours.
                tracing::debug!(listener = what, %peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    drop(stopping);
    let _ = stop.send(true);
    // Every connection task holds a receiver until it ends.
    stop.closed().await;
}
