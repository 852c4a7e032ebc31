//! Exec and attach over WebSocket, in the channel protocols of kubelet's streaming server
//! (`crictl exec --transport websocket`, client-go's WebSocket executor): every message starts
//! with its channel, 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize. `v5.channel.k8s.io` adds
//! the client's half-close (`[255, channel]`); the `base64.` forms send text messages, the
//! channel as a digit and the rest base64. The first message on the lowest channel berth
//! writes is empty: it tells the client the session is up.

use std::time::Instant;

use axum::extract::ws::{Message, WebSocket};
use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::command::{self, Channel, Chunk, Open};
use super::portforward::Timeouts;
use super::tokens::RemoteCommand;

/// The subprotocols berth speaks, by preference.
pub const PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// The v5 half-close signal.
const CLOSE: u8 = 255;

/// A message on `channel`: a binary one led by the channel byte, or (`text`, the base64
/// forms) the channel as a digit and the data in base64.
pub(super) fn encode(text: bool, channel: u8, data: &[u8]) -> Message {
    if text {
        let mut s = String::from(char::from(b'0' + channel));
        s.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
        Message::Text(s.into())
    } else {
        let mut b = Vec::with_capacity(data.len() + 1);
        b.push(channel);
        b.extend_from_slice(data);
        Message::Binary(Bytes::from(b))
    }
}

/// A data message from the client as its channel byte and payload; `None` for what carries
/// none (pings, text in a binary protocol, undecodable base64, an empty message).
pub(super) fn decode(text: bool, m: Message) -> Option<Vec<u8>> {
    match m {
        Message::Binary(b) if !b.is_empty() => Some(b.to_vec()),
        Message::Text(t) if text => {
            let (&digit, rest) = t.as_str().as_bytes().split_first()?;
            let mut d = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            d.insert(0, digit.wrapping_sub(b'0'));
            Some(d)
        }
        _ => None,
    }
}

/// Serves one WebSocket session speaking `protocol` (one of `PROTOCOLS`).
pub async fn serve(
    socket: WebSocket,
    cmd: RemoteCommand,
    protocol: &'static str,
    timeouts: Timeouts,
) {
    let text = protocol.contains("base64");
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        // A normal closure with its code: client-go takes a close without one (1005) for an
        // error on every channel.
        let normal = axum::extract::ws::CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(normal))).await;
    });
    let encode = move |channel: u8, data: &[u8]| encode(text, channel, data);
    let io = cmd.io;
    let first = if io.stdout {
        1
    } else if io.stderr {
        2
    } else {
        3
    };
    let _ = tx.send(encode(first, &[])).await;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<Bytes>(16);
    let mut stdin_tx = io.stdin.then_some(stdin_tx);
    let resize_tx = io.tty.then_some(resize_tx);
    let (ctx, mut crx) = mpsc::channel::<Chunk>(64);
    let to_ws = tx.clone();
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            if c.data.is_empty() {
                continue;
            }
            let ch = match c.channel {
                Channel::Stdout => 1,
                Channel::Stderr => 2,
                Channel::Error => 3,
            };
            if to_ws.send(encode(ch, &c.data)).await.is_err() {
                return;
            }
        }
    });
    let open = Open {
        stdout: io.stdout,
        stderr: io.stderr,
        error: true,
    };
    let json = protocol.starts_with("v4.") || protocol.starts_with("v5.");
    let stdin_rx = io.stdin.then_some(stdin_rx);
    let resize_rx = io.tty.then_some(resize_rx);
    // Boxed so it can be dropped before the writer is awaited (see remotecommand.rs).
    let mut run = Box::pin(command::run(&cmd, json, open, stdin_rx, resize_rx, ctx));
    let mut last = Instant::now();
    loop {
        let m = tokio::select! {
            _ = &mut run => break,
            m = incoming.next() => m,
            _ = tokio::time::sleep_until((last + timeouts.idle).into()) => break,
        };
        last = Instant::now();
        let data = match m {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            Some(Ok(m)) => match decode(text, m) {
                Some(d) => d,
                None => continue,
            },
        };
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        match channel {
            // The client closed its input.
            CLOSE if protocol.starts_with("v5.") && payload == [0] => stdin_tx = None,
            0 => {
                if let Some(s) = &stdin_tx
                    && !payload.is_empty()
                    && s.send(Bytes::copy_from_slice(payload)).await.is_err()
                {
                    stdin_tx = None;
                }
            }
            4 => {
                if let Some(s) = &resize_tx {
                    let _ = s.send(Bytes::copy_from_slice(payload)).await;
                }
            }
            _ => {}
        }
    }
    drop(run);
    drop((stdin_tx, resize_tx, incoming));
    // A WebSocket has no end per channel: the close after the outcome is the client's sign
    // that the session is over (the writer sends it once everything queued is out).
    drop(tx);
    let _ = writer.await;
}
