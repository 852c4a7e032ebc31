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

use super::fdio::FdIo;
use super::portforward::Timeouts;
use super::spdy::{Codec, Frame, headers};
use super::tokens::RemoteCommand;
use crate::monitor::proto::{self, request};
use crate::monitor::stream::{SessionFds, StreamSession};

/// The protocols this server speaks, in `X-Stream-Protocol-Version`.
pub const PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// After an exec'd process exits, how long its output may still flow (something it left
/// running may hold the pipes) before the session ends anyway.
const DRAIN: Duration = Duration::from_secs(1);
/// Bytes read from a descriptor per DATA frame.
const CHUNK: usize = 32 * 1024;
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
    // Boxed so it can be dropped before the writer is awaited: its senders (and the
    // session's descriptors) must go for the writer to finish.
    let mut run = Box::pin(run(
        &cmd,
        protocol,
        &streams,
        stdin_rx,
        resize_rx,
        tx.clone(),
    ));
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

/// Starts the session in the monitor and copies until it is over; then the outcome.
async fn run(
    cmd: &RemoteCommand,
    protocol: &str,
    streams: &Streams,
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<Bytes>>,
    tx: mpsc::Sender<Frame>,
) {
    let op = match &cmd.exec {
        Some(e) => request::Op::ExecStream(proto::ExecStream {
            exec: Some(e.clone()),
            tty: cmd.io.tty,
            stdin: cmd.io.stdin,
            stdout: cmd.io.stdout,
            stderr: cmd.io.stderr,
        }),
        None => request::Op::Attach(proto::Attach {
            container_id: cmd.container_id.clone(),
            stdin: cmd.io.stdin,
            stdout: cmd.io.stdout,
            stderr: cmd.io.stderr,
        }),
    };
    let outcome = match StreamSession::open(&cmd.pod_id, &cmd.socket, op).await {
        Err(e) => Outcome::Failed(e.to_string()),
        Ok((mut session, fds)) => {
            match copy(cmd, streams, fds, stdin, resize, &tx, &mut session).await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
    };
    let fin = |stream| Frame::Data {
        stream,
        fin: true,
        data: Bytes::new(),
    };
    for s in [streams.stdout, streams.stderr].into_iter().flatten() {
        let _ = tx.send(fin(s)).await;
    }
    if let Some(e) = streams.error {
        let body = outcome.encode(cmd, protocol);
        if !body.is_empty() {
            let data = Frame::Data {
                stream: e,
                fin: false,
                data: Bytes::from(body),
            };
            let _ = tx.send(data).await;
        }
        let _ = tx.send(fin(e)).await;
    }
}

/// How a session ended.
enum Outcome {
    /// Exit code 0, or an attach that ended.
    Success,
    /// An exec's process exited with this code.
    Exit(i32),
    /// It could not run, or broke off.
    Failed(String),
}

impl Outcome {
    /// What goes on the error stream: a `Status` JSON (v4, v5), else the message (nothing for
    /// success).
    fn encode(&self, cmd: &RemoteCommand, protocol: &str) -> Vec<u8> {
        let args = cmd
            .exec
            .as_ref()
            .map(|e| e.args.clone())
            .unwrap_or_default();
        let status = match self {
            Outcome::Success => serde_json::json!({"metadata": {}, "status": "Success"}),
            Outcome::Exit(code) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: command {args:?} exited with {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Failed(m) => {
                let what = if cmd.exec.is_some() {
                    "error executing command in container"
                } else {
                    "error attaching to container"
                };
                let m = format!("{what}: {m}");
                serde_json::json!({
                    "metadata": {},
                    "status": "Failure",
                    "message": format!("Internal error occurred: {m}"),
                    "reason": "InternalError",
                    "details": {"causes": [{"message": m}]},
                    "code": 500,
                })
            }
        };
        if json_status(protocol) {
            return status.to_string().into_bytes();
        }
        match status.get("message").and_then(|m| m.as_str()) {
            Some(m) => m.as_bytes().to_vec(),
            None => Vec::new(),
        }
    }
}

/// Copies between the client's streams and the session's descriptors until the exec has
/// exited (and its output ended, at most `DRAIN` later) or the attached output ended.
async fn copy(
    cmd: &RemoteCommand,
    streams: &Streams,
    mut fds: SessionFds,
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<Bytes>>,
    tx: &mpsc::Sender<Frame>,
    session: &mut StreamSession,
) -> std::io::Result<Outcome> {
    let terminal = fds.take("terminal");
    let dup = |f: &Option<std::os::fd::OwnedFd>| -> std::io::Result<Option<FdIo>> {
        f.as_ref()
            .map(|f| f.try_clone().and_then(FdIo::new))
            .transpose()
    };
    let input = match fds.take("stdin") {
        Some(f) => Some(FdIo::new(f)?),
        None if cmd.io.stdin => dup(&terminal)?,
        None => None,
    };
    let sizer = if cmd.io.tty { dup(&terminal)? } else { None };
    let out = match fds.take("stdout") {
        Some(f) => Some(FdIo::new(f)?),
        // An exec's terminal carries its output.
        None if cmd.exec.is_some() => dup(&terminal)?,
        None => None,
    };
    let err = fds.take("stderr").map(FdIo::new).transpose()?;
    drop(terminal);
    let feed = async move {
        let (Some(mut rx), Some(w)) = (stdin, input) else {
            return;
        };
        while let Some(b) = rx.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
        // The client closed its input: so does the process's (the descriptor drops here).
    };
    let sizes = async move {
        let (Some(mut rx), Some(t)) = (resize, sizer) else {
            return std::future::pending::<()>().await;
        };
        let mut buf = Vec::new();
        while let Some(b) = rx.recv().await {
            buf.extend_from_slice(&b);
            for (w, h) in take_sizes(&mut buf) {
                let _ = t.resize(w, h);
            }
            if buf.len() > 64 * 1024 {
                buf.clear();
            }
        }
        std::future::pending::<()>().await
    };
    let pump = |fd: Option<FdIo>, stream: Option<u32>| {
        let tx = tx.clone();
        async move {
            let (Some(fd), Some(stream)) = (fd, stream) else {
                return;
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match fd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        let f = Frame::Data {
                            stream,
                            fin: false,
                            data,
                        };
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let outputs = async { tokio::join!(pump(out, streams.stdout), pump(err, streams.stderr)) };
    tokio::pin!(outputs);
    let input = async { tokio::join!(feed, sizes) };
    tokio::pin!(input);
    if cmd.exec.is_none() {
        // An attach lasts as long as the container's output (or the client).
        tokio::select! {
            _ = &mut outputs => {}
            _ = &mut input => {}
        }
        return Ok(Outcome::Success);
    }
    let exited = session.exited();
    tokio::pin!(exited);
    let mut drained = false;
    let code = loop {
        tokio::select! {
            c = &mut exited => break c,
            _ = &mut outputs, if !drained => drained = true,
            _ = &mut input => return Err(std::io::Error::other("the input copy ended")),
        }
    };
    let code = code.map_err(std::io::Error::other)?;
    if !drained {
        let _ = tokio::time::timeout(DRAIN, &mut outputs).await;
    }
    Ok(if code == 0 {
        Outcome::Success
    } else {
        Outcome::Exit(code)
    })
}

/// Takes the complete window sizes (`{"Width":80,"Height":24}` objects, one after another)
/// off the front of `buf`.
fn take_sizes(buf: &mut Vec<u8>) -> Vec<(u16, u16)> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    let mut out = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Size>();
    let mut used = 0;
    loop {
        match it.next() {
            Some(Ok(s)) => {
                out.push((s.width, s.height));
                used = it.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => break,
            // Garbage: dropped with what came before it.
            Some(Err(_)) => {
                used = buf.len();
                break;
            }
            None => {
                used = it.byte_offset();
                break;
            }
        }
    }
    buf.drain(..used);
    out
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

    #[test]
    fn window_sizes_are_taken_whole() {
        let mut b = br#"{"Width":80,"Height":24}{"Width":100,"#.to_vec();
        assert_eq!(take_sizes(&mut b), vec![(80, 24)]);
        assert_eq!(b, br#"{"Width":100,"#);
        b.extend_from_slice(b"\"Height\":50}\n");
        assert_eq!(take_sizes(&mut b), vec![(100, 50)]);
        let mut junk = b"]]]".to_vec();
        assert!(take_sizes(&mut junk).is_empty());
        assert!(junk.is_empty());
    }
}
