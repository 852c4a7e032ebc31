//! Port-forward over SPDY/3.1 (`portforward.k8s.io`), as kubelet and kubectl speak it: per
//! forwarded connection the client opens an error stream and a data stream, paired by their
//! `requestid` header and naming the `port`; berth connects to localhost:port inside the pod's
//! network namespace and copies both ways. A failed connect is reported on the error stream.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::spdy::{Codec, Frame, goaway, headers, rst};

/// The subprotocol in `X-Stream-Protocol-Version`.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// How long a connect inside the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the pod's socket per DATA frame.
const CHUNK: usize = 64 * 1024;

/// How long a session may stay silent, and how long a request's second stream may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// No frame either way for this long ends the session.
    pub idle: Duration,
    /// A request id whose error or data stream does not follow within this is refused.
    pub creation: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(4 * 3600),
            creation: Duration::from_secs(30),
        }
    }
}

/// The streams of one request id, as they arrive.
struct Pair {
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Bytes>)>,
    port: Option<u16>,
    opened: Instant,
}

/// When the session last saw a frame either way, as milliseconds since it began.
struct Activity {
    began: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.began.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.began + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Serves one upgraded connection until the client goes away.
pub async fn serve<IO>(io: IO, pod_id: String, netns: Option<PathBuf>, timeouts: Timeouts)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut frames) = Framed::new(io, Codec::new()).split();
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let activity = Arc::new(Activity {
        began: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let sent = activity.clone();
    // Frames waiting together go out in one flush (one write to the client for many).
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let mut fed = sink.feed(f).await;
            while fed.is_ok()
                && let Ok(f) = rx.try_recv()
            {
                fed = sink.feed(f).await;
            }
            if fed.is_err() || sink.flush().await.is_err() {
                break;
            }
            sent.touch();
        }
    });
    let done = CancellationToken::new();
    let mut inbound: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut last_stream = 0;
    loop {
        let idle_at = activity.last() + timeouts.idle;
        let first_open = pairs.values().map(|p| p.opened).min();
        let wake = first_open.map_or(idle_at, |o| idle_at.min(o + timeouts.creation));
        let next = tokio::select! {
            f = frames.next() => f,
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                let late: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| now >= p.opened + timeouts.creation)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in late {
                    let p = pairs.remove(&k).expect("listed above");
                    tracing::debug!(pod = %pod_id, request = %k, "port-forward request's second stream never came");
                    for stream in [p.error, p.data.map(|(s, _)| s)].into_iter().flatten() {
                        inbound.remove(&stream);
                        let _ = tx.send(Frame::RstStream { stream, status: rst::REFUSED_STREAM }).await;
                    }
                }
                if now >= activity.last() + timeouts.idle {
                    tracing::debug!(pod = %pod_id, "port-forward session idle; closing it");
                    let _ = tx.send(Frame::GoAway { last_good: last_stream, status: goaway::OK }).await;
                    break;
                }
                continue;
            }
        };
        let Some(frame) = next else {
            break;
        };
        activity.touch();
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(pod = %pod_id, error = %e, "port-forward connection ended");
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream, headers, ..
            } => {
                last_stream = last_stream.max(stream);
                let kind = headers::get(&headers, "streamtype").unwrap_or_default();
                let request = headers::get(&headers, "requestid").unwrap_or_default();
                let port = headers::get(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                let reply = Frame::SynReply {
                    stream,
                    fin: false,
                    headers: Vec::new(),
                };
                if port.is_none_or(|p| p == 0) || !matches!(kind, "error" | "data") {
                    let _ = tx
                        .send(Frame::RstStream {
                            stream,
                            status: rst::PROTOCOL_ERROR,
                        })
                        .await;
                    continue;
                }
                let _ = tx.send(reply).await;
                let pair = pairs.entry(request.to_string()).or_insert_with(|| Pair {
                    error: None,
                    data: None,
                    port: None,
                    opened: Instant::now(),
                });
                pair.port = port;
                if kind == "error" {
                    pair.error = Some(stream);
                } else {
                    let (in_tx, in_rx) = mpsc::channel(16);
                    inbound.insert(stream, in_tx);
                    pair.data = Some((stream, in_rx));
                }
                if pair.error.is_some() && pair.data.is_some() {
                    let Pair {
                        error, data, port, ..
                    } = pairs.remove(request).expect("the pair just completed");
                    let (data, in_rx) = data.expect("checked");
                    tokio::spawn(forward(
                        Forward {
                            pod_id: pod_id.clone(),
                            netns: netns.clone(),
                            port: port.expect("checked"),
                            error: error.expect("checked"),
                            data,
                        },
                        in_rx,
                        tx.clone(),
                        done.child_token(),
                    ));
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(s) = inbound.get(&stream)
                    && !data.is_empty()
                    && s.send(data).await.is_err()
                {
                    inbound.remove(&stream);
                }
                if fin {
                    // Dropping the sender is the client's FIN for the forwarder.
                    inbound.remove(&stream);
                }
            }
            Frame::RstStream { stream, .. } => {
                inbound.remove(&stream);
            }
            Frame::Ping { id } => {
                let _ = tx.send(Frame::Ping { id }).await;
            }
            Frame::GoAway { .. } => break,
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. } => {}
        }
    }
    // The client is gone: every forwarded connection ends with it.
    done.cancel();
    drop(inbound);
    drop(tx);
    let _ = writer.await;
}

/// One forwarded connection.
struct Forward {
    pod_id: String,
    netns: Option<PathBuf>,
    port: u16,
    error: u32,
    data: u32,
}

async fn forward(
    f: Forward,
    mut from_client: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Frame>,
    cancel: CancellationToken,
) {
    let data = |stream, fin, data| Frame::Data { stream, fin, data };
    let conn = match connect_in(f.netns.clone(), f.port).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("error forwarding port {} to pod {}: {e}", f.port, f.pod_id);
            tracing::debug!(pod = %f.pod_id, port = f.port, error = %e, "port-forward connect failed");
            let _ = tx.send(data(f.error, false, Bytes::from(msg))).await;
            let _ = tx.send(data(f.error, true, Bytes::new())).await;
            let _ = tx.send(data(f.data, true, Bytes::new())).await;
            return;
        }
    };
    let (mut rd, mut wr) = conn.into_split();
    let to_pod = async {
        while let Some(b) = from_client.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let to_client = async {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let chunk = buf.split().freeze();
                    if tx.send(data(f.data, false, chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(data(f.data, true, Bytes::new())).await;
    };
    tokio::select! {
        _ = async { tokio::join!(to_pod, to_client) } => {}
        _ = cancel.cancelled() => return,
    }
    let _ = tx.send(data(f.error, true, Bytes::new())).await;
}

/// A TCP connection to localhost:`port` in the network namespace `netns` (the node's when
/// `None`), made on a thread of its own: setns changes only the calling thread, which then
/// ends, so no thread of berthd's pools is ever left in a pod's namespace. A socket keeps the
/// namespace it was made in.
pub(super) async fn connect_in(
    netns: Option<PathBuf>,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name("berth-portfwd".into())
        .spawn(move || {
            let connect = || -> std::io::Result<std::net::TcpStream> {
                if let Some(ns) = &netns {
                    let f = std::fs::File::open(ns)?;
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                }
                // localhost as kubelet's own forwarder tries it: IPv4, then IPv6.
                let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e4| {
                    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                    std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e4)
                })
            };
            let _ = done.send(connect());
        })?;
    let s = result
        .await
        .map_err(|_| std::io::Error::other("the connecting thread died"))??;
    s.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(s)
}
