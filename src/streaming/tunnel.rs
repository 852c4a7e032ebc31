//! SPDY over WebSocket (`SPDY/3.1+portforward.k8s.io`), as client-go's tunneling dialer speaks
//! it (`crictl port-forward --transport websocket`, newer kubectl): each binary message carries
//! the next bytes of the SPDY connection. A pipe bridges the two, so the SPDY session runs
//! unchanged over either transport.

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The WebSocket subprotocol of SPDY port-forward tunnelled over WebSocket.
pub const PORT_FORWARD: &str = "SPDY/3.1+portforward.k8s.io";

/// The SPDY bytes of `socket` as a byte stream; the socket closes when the stream does.
pub fn bridge(socket: WebSocket) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_pipe, mut to_pipe) = tokio::io::split(theirs);
    let (mut to_ws, mut from_ws) = socket.split();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = from_ws.next().await {
            match msg {
                Message::Binary(b) if to_pipe.write_all(&b).await.is_err() => break,
                Message::Binary(_) => {}
                Message::Close(_) => break,
                // Pings are answered by the WebSocket layer; text is not part of the tunnel.
                _ => {}
            }
        }
        let _ = to_pipe.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if to_ws.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_ws.send(Message::Close(None)).await;
    });
    ours
}
