//! An exec or attach session, whatever carries it (SPDY streams or WebSocket channels): it
//! starts in the pod's monitor, berth copies between the client's channels and the
//! descriptors the monitor passed, and the outcome goes on the error channel (a Kubernetes
//! `Status` in JSON from v4 on, its message before).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::fdio::FdIo;
use super::tokens::RemoteCommand;
use crate::monitor::proto::{self, request};
use crate::monitor::stream::{SessionFds, StreamSession};

/// After an exec'd process exits, how long its output may still flow (something it left
/// running may hold the pipes) before the session ends anyway.
const DRAIN: Duration = Duration::from_secs(1);
/// Bytes read from a descriptor per message.
const CHUNK: usize = 32 * 1024;

/// A channel from berth to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The process's output.
    Stdout,
    /// Its errors.
    Stderr,
    /// The outcome.
    Error,
}

/// Bytes for a channel; `fin`: its last.
#[derive(Debug)]
pub struct Chunk {
    /// Which channel.
    pub channel: Channel,
    /// What.
    pub data: Bytes,
    /// Nothing follows on this channel.
    pub fin: bool,
}

/// Which of berth's channels the client has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open {
    /// stdout.
    pub stdout: bool,
    /// stderr.
    pub stderr: bool,
    /// The error channel.
    pub error: bool,
}

/// Starts the session in the monitor and copies until it is over; then the outcome.
pub async fn run(
    cmd: &RemoteCommand,
    json_status: bool,
    open: Open,
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<Bytes>>,
    tx: mpsc::Sender<Chunk>,
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
            match copy(cmd, open, fds, stdin, resize, &tx, &mut session).await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
    };
    let fin = |channel| Chunk {
        channel,
        data: Bytes::new(),
        fin: true,
    };
    for (c, here) in [
        (Channel::Stdout, open.stdout),
        (Channel::Stderr, open.stderr),
    ] {
        if here {
            let _ = tx.send(fin(c)).await;
        }
    }
    if open.error {
        let body = outcome.encode(cmd, json_status);
        if !body.is_empty() {
            let data = Chunk {
                channel: Channel::Error,
                data: Bytes::from(body),
                fin: false,
            };
            let _ = tx.send(data).await;
        }
        let _ = tx.send(fin(Channel::Error)).await;
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
    fn encode(&self, cmd: &RemoteCommand, json_status: bool) -> Vec<u8> {
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
        if json_status {
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
    open: Open,
    mut fds: SessionFds,
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<Bytes>>,
    tx: &mpsc::Sender<Chunk>,
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
    let pump = |fd: Option<FdIo>, channel: Channel, here: bool| {
        let tx = tx.clone();
        async move {
            let Some(fd) = fd.filter(|_| here) else {
                return;
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match fd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        let c = Chunk {
                            channel,
                            data,
                            fin: false,
                        };
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let outputs = async {
        tokio::join!(
            pump(out, Channel::Stdout, open.stdout),
            pump(err, Channel::Stderr, open.stderr)
        )
    };
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
