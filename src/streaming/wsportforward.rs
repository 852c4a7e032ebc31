//! Port-forward over WebSocket in the channel protocol kubelet's own `/portForward` endpoint
//! passes on (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, or none named): the ports come
//! with the URL (`?port=80,8080`, as kubelet and client-go name them) or else from the
//! PortForward call; port i has channel 2i for data both ways and 2i+1 for its
//! errors, and each channel's first message from berth is the port, two bytes little-endian.
//! One connection to localhost:port in the pod per port, for the life of the session, which
//! ends when every port's connection has.

use std::path::PathBuf;

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::portforward::connect_in;
use super::wschannel::{decode, encode};

/// The subprotocols of this form, by preference (a client naming none gets binary).
pub const PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// At most this many ports per session.
const MAX_PORTS: usize = 64;

/// The ports of a URL's query (`port=80,8080`, the parameter repeatable), else `requested`
/// (the ports the PortForward call named).
pub fn ports(query: Option<&str>, requested: Vec<u16>) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k != "port" {
            continue;
        }
        for p in v.split(',') {
            match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => out.push(n),
                _ => return Err(format!("{p:?} is not a TCP port (1-65535)")),
            }
        }
    }
    if out.is_empty() {
        out = requested;
    }
    if out.is_empty() {
        return Err(
            "a WebSocket port-forward needs the port query parameter or ports in the PortForward call"
                .into(),
        );
    }
    if out.len() > MAX_PORTS {
        return Err(format!("at most {MAX_PORTS} ports per session"));
    }
    Ok(out)
}

/// Serves one session forwarding `ports` of the pod (network namespace `netns`; the node's
/// when `None`).
pub async fn serve(
    socket: WebSocket,
    pod_id: String,
    netns: Option<PathBuf>,
    ports: Vec<u16>,
    text: bool,
) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let normal = CloseFrame {
            code: close_code::NORMAL,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(normal))).await;
    });
    let encode = move |channel: usize, data: &[u8]| encode(text, channel as u8, data);
    let mut inbound = Vec::new();
    let mut forwards = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        for ch in [2 * i, 2 * i + 1] {
            let _ = tx.send(encode(ch, &port.to_le_bytes())).await;
        }
        let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(16);
        inbound.push(Some(in_tx));
        let (tx, netns, pod) = (tx.clone(), netns.clone(), pod_id.clone());
        forwards.spawn(async move {
            let conn = match connect_in(netns, port).await {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("error forwarding port {port} to pod {pod}: {e}");
                    let _ = tx.send(encode(2 * i + 1, msg.as_bytes())).await;
                    return;
                }
            };
            let (mut rd, mut wr) = conn.into_split();
            let to_pod = async {
                while let Some(b) = in_rx.recv().await {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            };
            let to_client = async {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tx.send(encode(2 * i, &buf[..n])).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            // The pod's end of the connection ends this port.
            tokio::select! {
                _ = to_client => {}
                _ = async { to_pod.await; std::future::pending::<()>().await } => {}
            }
        });
    }
    loop {
        let m = tokio::select! {
            m = incoming.next() => m,
            done = forwards.join_next() => {
                if done.is_none() { break } else { continue }
            }
        };
        let data = match m {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            Some(Ok(m)) => match decode(text, m) {
                Some(d) => d,
                None => continue,
            },
        };
        let Some((&ch, payload)) = data.split_first() else {
            continue;
        };
        let ch = usize::from(ch);
        if ch % 2 == 0
            && let Some(slot) = inbound.get_mut(ch / 2)
            && let Some(s) = slot.as_ref()
            && !payload.is_empty()
            && s.send(Bytes::copy_from_slice(payload)).await.is_err()
        {
            *slot = None;
        }
    }
    // The client is gone or every port is done: the rest of the connections close with it.
    forwards.abort_all();
    drop((inbound, tx));
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_query_else_from_the_call() {
        assert_eq!(
            ports(Some("port=80,8080&port=9"), vec![1]),
            Ok(vec![80, 8080, 9])
        );
        assert!(ports(Some("port=0"), vec![]).is_err());
        assert!(ports(Some("port=70000"), vec![]).is_err());
        assert_eq!(ports(None, vec![80]), Ok(vec![80]));
        assert_eq!(ports(Some("other=1"), vec![81]), Ok(vec![81]));
        assert!(ports(None, vec![]).is_err());
    }
}
