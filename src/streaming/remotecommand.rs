//! Exec and attach over SPDY/3.1, in the channel protocols kubelet's streaming server speaks
//! (`v5`/`v4`/`v3`/`v2.channel.k8s.io`, `channel.k8s.io`): the client opens one stream per
//! channel, typed by its `streamtype` header (error, stdin, stdout, stderr, resize). Once all
//! it was granted are open, the session starts in the pod's monitor, and berth copies between
//! the streams and the descriptors the monitor passed; the outcome goes on the error stream
//! (a Kubernetes `Status` in JSON from v4 on, its message before) and the streams end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use super::command::{self, Channel, Chunk, Open};
use super::portforward::Timeouts;
use super::spdy::{Codec, Frame, headers};
use super::tokens::RemoteCommand;

/// The protocols this server speaks, in `X-Stream-Protocol-Version`.
pub const PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long berth waits for the client to close once the outcome is sent.
const LINGER: Duration = Duration::from_secs(5);

/// The first protocol of the client's list (in its order of preference) this server speaks;
/// `channel.k8s.io` for a client that names none.
pub fn negotiate<'a>(offered: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let mut any = false;
    for p in offered.flat_map(|v| v.split(',')).map(str::trim) {
        any = true;
        if let Some(ours) = PROTOCOLS.iter().find(|s| **s == p) {
            return Some(ours);
        }
    }
    (!any).then_some("channel.k8s.io")
}

/// Whether `protocol` writes the outcome as a JSON `Status` (else as plain text).
fn json_status(protocol: &str) -> bool {
    matches!(protocol, "v5.channel.k8s.io" | "v4.channel.k8s.io")
}

/// Whether `protocol` has a resize stream.
fn resizes(protocol: &str) -> bool {
    json_status(protocol) || protocol == "v3.channel.k8s.io"
}

/// The channels of a session: the stream id of each kind the client opened.
#[derive(Default)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

/// Frames from the client, routed: stdin and resize data to their channels.
struct Reader<S> {
    frames: S,
    tx: mpsc::Sender<Frame>,
    inbound: HashMap<u32, mpsc::Sender<Bytes>>,
    last: Instant,
}

impl<S> Reader<S>
where
    S: futures::Stream<Item = Result<Frame, super::spdy::SpdyError>> + Unpin,
{
    /// Handles the next frame; `None` when the client is gone (or broke the protocol). A new
    /// stream is returned with its type.
    async fn next(&mut self, idle: Duration) -> Option<Option<(u32, String)>> {
        let f = tokio::select! {
            f = self.frames.next() => f,
            _ = tokio::time::sleep_until((self.last + idle).into()) => {
                tracing::debug!("remote command session idle; closing it");
                return None;
            }
        };
        self.last = Instant::now();
        match f? {
            Err(e) => {
                tracing::debug!(error = %e, "remote command connection ended");
                None
            }
            Ok(Frame::SynStream {
                stream, headers, ..
            }) => {
                let kind = headers::get(&headers, "streamtype")
                    .unwrap_or_default()
                    .to_string();
                let reply = Frame::SynReply {
                    stream,
                    fin: false,
                    headers: Vec::new(),
                };
                let _ = self.tx.send(reply).await;
                Some(Some((stream, kind)))
            }
            Ok(Frame::Data { stream, fin, data }) => {
                if let Some(s) = self.inbound.get(&stream)
                    && !data.is_empty()
                    && s.send(data).await.is_err()
                {
                    self.inbound.remove(&stream);
                }
                if fin {
                    // Dropping the sender is the client's end of input.
                    self.inbound.remove(&stream);
                }
                Some(None)
            }
            Ok(Frame::RstStream { stream, .. }) => {
                self.inbound.remove(&stream);
                Some(None)
            }
            Ok(Frame::Ping { id }) => {
                let _ = self.tx.send(Frame::Ping { id }).await;
                Some(None)
            }
            Ok(Frame::GoAway { .. }) => None,
            Ok(_) => Some(None),
        }
    }
}

/// Serves one upgraded connection speaking `protocol` for `cmd`.
pub async fn serve<IO>(io: IO, cmd: RemoteCommand, protocol: &'static str, timeouts: Timeouts)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, frames) = Framed::new(io, Codec::new()).split();
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if sink.send(f).await.is_err() {
                break;
            }
        }
    });
    let mut reader = Reader {
        frames,
        tx: tx.clone(),
        inbound: HashMap::new(),
        last: Instant::now(),
    };
    let want = cmd.io;
    let resize = want.tty && resizes(protocol);
    let expected = 1
        + usize::from(want.stdin)
        + usize::from(want.stdout)
        + usize::from(want.stderr)
        + usize::from(resize);
    let mut streams = Streams::default();
    let (mut stdin_rx, mut resize_rx) = (None, None);
    let mut got = 0;
    let deadline = Instant::now() + timeouts.creation;
    while got < expected {
        let next = tokio::select! {
            n = reader.next(timeouts.idle) => n,
            _ = tokio::time::sleep_until(deadline.into()) => None,
        };
        let Some(opened) = next else {
            tracing::debug!(pod = %cmd.pod_id, container = %cmd.container_id, "the client did not open its streams");
            drop((reader, tx));
            let _ = writer.await;
            return;
        };
        let Some((id, kind)) = opened else { continue };
        let slot = match kind.as_str() {
            "error" => &mut streams.error,
            "stdin" => &mut streams.stdin,
            "stdout" => &mut streams.stdout,
            "stderr" => &mut streams.stderr,
            "resize" => &mut streams.resize,
            other => {
                tracing::debug!(kind = other, "unexpected stream type");
                continue;
            }
        };
        *slot = Some(id);
        got += 1;
        let (in_tx, in_rx) = mpsc::channel(16);
        match kind.as_str() {
            "stdin" => {
                reader.inbound.insert(id, in_tx);
                stdin_rx = Some(in_rx);
            }
            "resize" => {
                reader.inbound.insert(id, in_tx);
                resize_rx = Some(in_rx);
            }
            _ => {}
        }
    }
    if protocol == "channel.k8s.io" {
        // The first protocol closes the client's input at once (as kubelet always did).
        stdin_rx = None;
    }
    let open = Open {
        stdout: streams.stdout.is_some(),
        stderr: streams.stderr.is_some(),
        error: streams.error.is_some(),
    };
    let (ctx, mut crx) = mpsc::channel::<Chunk>(64);
    let frames_tx = tx.clone();
    let ids = [streams.stdout, streams.stderr, streams.error];
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            let id = match c.channel {
                Channel::Stdout => ids[0],
                Channel::Stderr => ids[1],
                Channel::Error => ids[2],
            };
            let Some(stream) = id else { continue };
            let f = Frame::Data {
                stream,
                fin: c.fin,
                data: c.data,
            };
            if frames_tx.send(f).await.is_err() {
                return;
            }
        }
    });
    // Boxed so it can be dropped before the writer is awaited: its senders (and the
    // session's descriptors) must go for the writer to finish.
    let json = json_status(protocol);
    let mut run = Box::pin(command::run(&cmd, json, open, stdin_rx, resize_rx, ctx));
    let finished = loop {
        tokio::select! {
            _ = &mut run => break true,
            more = reader.next(timeouts.idle) => if more.is_none() { break false },
        }
    };
    drop(run);
    if finished {
        // The outcome is queued: the client closes once it has read it.
        let _ = tokio::time::timeout(LINGER, async {
            while reader.next(LINGER).await.is_some() {}
        })
        .await;
    }
    drop((reader, tx));
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_negotiated_in_the_clients_order() {
        let offered = ["v4.channel.k8s.io", "v3.channel.k8s.io"];
        assert_eq!(negotiate(offered.into_iter()), Some("v4.channel.k8s.io"));
        let one_header = ["v9.channel.k8s.io, v2.channel.k8s.io"];
        assert_eq!(negotiate(one_header.into_iter()), Some("v2.channel.k8s.io"));
        assert_eq!(negotiate(["v9"].into_iter()), None);
        assert_eq!(negotiate([].into_iter()), Some("channel.k8s.io"));
    }
}
