//! PortForward through berth's streaming server, driven by a small SPDY/3.1 client of the
//! tests' own (over berth's frame codec; critest's Go client checks the other side), directly
//! and tunnelled over WebSocket: bytes of an HTTP server in a pod arrive whole, a closed port is
//! reported on the error stream, a URL works once, and a client that vanishes mid-transfer
//! leaves nothing open in berthd.

mod common;

use std::time::Duration;

use berth::cri::v1 as cri;
use berth::streaming::spdy::{Codec, Frame};
use bytes::{Bytes, BytesMut};
use common::spdy::{self, Client, fd_count, syn};
use common::world::*;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};

/// The SYN_STREAM opening stream `id` of kind `kind` ("error" or "data") for request `req`.
fn pf_syn(id: u32, kind: &str, port: u16, req: u32) -> Frame {
    let (port, req) = (port.to_string(), req.to_string());
    syn(
        id,
        &[("streamtype", kind), ("port", &port), ("requestid", &req)],
    )
}

/// GETs `url` with the port-forward upgrade; the status line and, on 101, the client.
fn connect(url: &str) -> (String, Option<Client>) {
    let (status, client) = spdy::connect(url, &["portforward.k8s.io"]);
    if let Some(c) = &client {
        assert_eq!(c.protocol, "portforward.k8s.io");
    }
    (status, client)
}

/// Opens the error and data streams of request `req` to `port` (ids 4req+1, 4req+3).
fn open(c: &mut Client, req: u32, port: u16) -> (u32, u32) {
    let (error, data) = (4 * req + 1, 4 * req + 3);
    for (id, kind) in [(error, "error"), (data, "data")] {
        c.send(pf_syn(id, kind, port, req));
    }
    (error, data)
}

/// Everything the server sends on `error` and `data` until both end.
fn drain(c: &mut Client, error: u32, data: u32) -> (Vec<u8>, Vec<u8>) {
    let (mut e, mut d) = (Vec::new(), Vec::new());
    let (mut e_done, mut d_done) = (false, false);
    while !(e_done && d_done) {
        match c.next().expect("the connection ended early") {
            Frame::Data {
                stream,
                fin,
                data: b,
            } if stream == error => {
                e.extend_from_slice(&b);
                e_done |= fin;
            }
            Frame::Data {
                stream,
                fin,
                data: b,
            } if stream == data => {
                d.extend_from_slice(&b);
                d_done |= fin;
            }
            Frame::SynReply { .. } | Frame::Ping { .. } => {}
            f => panic!("unexpected {f:?}"),
        }
    }
    (e, d)
}

/// Downloads `/f` through port-forward tunnelled over WebSocket (subprotocol
/// `SPDY/3.1+portforward.k8s.io`, SPDY bytes in binary messages), as client-go's tunneling
/// dialer does; returns the body.
fn ws_download(url: &str) -> Vec<u8> {
    use tokio_tungstenite::tungstenite::Message;
    spdy::block_on(async {
        let req = spdy::ws_request(url, "SPDY/3.1+portforward.k8s.io");
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers()["sec-websocket-protocol"],
            "SPDY/3.1+portforward.k8s.io"
        );
        let mut codec = Codec::new();
        let mut out = BytesMut::new();
        for f in [
            ("error", 1u32, None),
            ("data", 3, Some(&b"GET /f HTTP/1.0\r\n\r\n"[..])),
        ] {
            let (kind, id, payload) = f;
            codec.encode(&pf_syn(id, kind, 8080, 0), &mut out).unwrap();
            if let Some(p) = payload {
                let data = Frame::Data {
                    stream: id,
                    fin: true,
                    data: Bytes::copy_from_slice(p),
                };
                codec.encode(&data, &mut out).unwrap();
            }
        }
        ws.send(Message::Binary(out.split().freeze()))
            .await
            .unwrap();
        let mut inbound = BytesMut::new();
        let mut body = Vec::new();
        'read: while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Binary(b) => inbound.extend_from_slice(&b),
                Message::Close(_) => break,
                _ => continue,
            }
            while let Some(f) = codec.decode(&mut inbound).unwrap() {
                if let Frame::Data {
                    stream: 3,
                    fin,
                    data,
                } = f
                {
                    body.extend_from_slice(&data);
                    if fin {
                        break 'read;
                    }
                }
            }
        }
        let split = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        body.split_off(split + 4)
    })
}

/// Downloads `/f` through port-forward in WebSocket channels (`v4.channel.k8s.io`, the port
/// in the URL): channel 0 carries the data both ways, 1 the errors, each opened with the port.
fn ws_channels_download(url: &str) -> Vec<u8> {
    use tokio_tungstenite::tungstenite::Message;
    spdy::block_on(async {
        let req = spdy::ws_request(url, "v4.channel.k8s.io");
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut get = vec![0u8];
        get.extend_from_slice(b"GET /f HTTP/1.0\r\n\r\n");
        ws.send(Message::Binary(get.into())).await.unwrap();
        let (mut data, mut opened) = (Vec::new(), [false; 2]);
        while let Some(Ok(m)) = ws.next().await {
            let Message::Binary(b) = m else { continue };
            let ch = usize::from(b[0]);
            assert!(ch < 2, "channel {ch}");
            if !opened[ch] {
                assert_eq!(
                    &b[1..],
                    &8080u16.to_le_bytes(),
                    "channel {ch} opens with the port"
                );
                opened[ch] = true;
            } else if ch == 0 {
                data.extend_from_slice(&b[1..]);
            } else {
                panic!("error: {}", String::from_utf8_lossy(&b[1..]));
            }
        }
        let split = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        data.split_off(split + 4)
    })
}

async fn forward_url(w: &mut World, pod: &str) -> String {
    forward_url_of(w, pod, vec![8080]).await
}

async fn forward_url_of(w: &mut World, pod: &str, port: Vec<i32>) -> String {
    w.rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port,
    })
    .await
    .unwrap()
    .into_inner()
    .url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_carries_an_http_download_whole_and_reports_closed_ports() {
    let mut w = World::new().await;
    let pod = w.pod("forwarded").await;
    let web = w
        .run(
            &pod,
            container(
                "web",
                &[
                    "sh",
                    "-c",
                    "mkdir /www && dd if=/dev/urandom of=/www/f bs=1M count=32 2>/dev/null && \
                     touch /www/ready && exec httpd -f -p 8080 -h /www",
                ],
            ),
        )
        .await;
    let mut sum = String::new();
    for _ in 0..100 {
        let (code, out) = w.sh(&web, "test -e /www/ready && sha256sum /www/f").await;
        if code == 0 {
            sum = out.split_whitespace().next().unwrap().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sum.len(), 64, "no file in the pod");

    let url = forward_url(&mut w, &pod.0).await;
    let berthd = w.env.berthd.pid();
    let fds_before = fd_count(berthd);
    let again = url.clone();
    let (body, closed, reused) = w.env.netns.run_in(move || {
        let (status, client) = connect(&url);
        let mut c = client.unwrap_or_else(|| panic!("no upgrade: {status}"));
        let (error, data) = open(&mut c, 0, 8080);
        c.send(Frame::Data {
            stream: data,
            fin: true,
            data: Bytes::from_static(b"GET /f HTTP/1.0\r\n\r\n"),
        });
        let (err, resp) = drain(&mut c, error, data);
        assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let body = resp[split + 4..].to_vec();
        // A port nobody listens on: the reason comes on the error stream.
        let (error, data) = open(&mut c, 1, 8081);
        let (err, _) = drain(&mut c, error, data);
        // The URL was used: a second use is refused.
        let (reused, _) = connect(&again);
        (body, String::from_utf8_lossy(&err).into_owned(), reused)
    });
    assert_eq!(body.len(), 32 << 20);
    assert_eq!(hex::encode(Sha256::digest(&body)), sum);
    assert!(closed.contains("error forwarding port 8081"), "{closed}");
    assert!(reused.contains(" 404 "), "{reused}");

    // The same over WebSocket.
    let url = forward_url(&mut w, &pod.0).await;
    let body = w.env.netns.run_in(move || ws_download(&url));
    assert_eq!(hex::encode(Sha256::digest(&body)), sum);

    // In WebSocket channels (kubelet's /portForward form): the port first on each channel,
    // then the bytes. The ports come from the URL's query, else from the PortForward call;
    // none in either is a 400.
    let url = forward_url_of(&mut w, &pod.0, vec![]).await;
    let body = w
        .env
        .netns
        .run_in(move || ws_channels_download(&format!("{url}?port=8080")));
    assert_eq!(hex::encode(Sha256::digest(&body)), sum);
    let url = forward_url(&mut w, &pod.0).await;
    let body = w.env.netns.run_in(move || ws_channels_download(&url));
    assert_eq!(hex::encode(Sha256::digest(&body)), sum);
    let url = forward_url_of(&mut w, &pod.0, vec![]).await;
    let refused = w.env.netns.run_in(move || {
        spdy::block_on(async {
            let req = spdy::ws_request(&url, "v4.channel.k8s.io");
            tokio_tungstenite::connect_async(req)
                .await
                .unwrap_err()
                .to_string()
        })
    });
    assert!(refused.contains("400"), "{refused}");

    // A client that vanishes mid-download: berthd keeps nothing of it.
    let url = forward_url(&mut w, &pod.0).await;
    w.env.netns.run_in(move || {
        let (_, client) = connect(&url);
        let mut c = client.unwrap();
        let (_, data) = open(&mut c, 0, 8080);
        c.send(Frame::Data {
            stream: data,
            fin: true,
            data: Bytes::from_static(b"GET /f HTTP/1.0\r\n\r\n"),
        });
        let _ = c.next();
        drop(c);
    });
    eventually("berthd closed the vanished client's sockets", || {
        fd_count(berthd) <= fds_before
    })
    .await;

    // Bad requests get clear errors.
    let unknown =
        w.rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "no-such-pod".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let bad_port =
        w.rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.0.clone(),
            port: vec![70000],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_port.code(), tonic::Code::InvalidArgument);
    w.stop(&web, 0).await;
    w.remove(&web).await;
    w.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .unwrap();
    let stopped =
        w.rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.0.clone(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(
        stopped.code(),
        tonic::Code::FailedPrecondition,
        "{stopped:?}"
    );
    assert!(stopped.message().contains("not ready"), "{stopped:?}");
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_opened_request_is_refused_and_an_idle_session_closed() {
    let mut w = World::with(common::Options {
        extra_config:
            "[streaming]\nidle_timeout_seconds = 2\nstream_creation_timeout_seconds = 1\n".into(),
        ..Default::default()
    })
    .await;
    let pod = w.pod("timeouts").await;
    let url = forward_url(&mut w, &pod.0).await;
    let frames = w.env.netns.run_in(move || {
        let (status, client) = connect(&url);
        let mut c = client.unwrap_or_else(|| panic!("no upgrade: {status}"));
        // Only the error stream of request 0: its data stream never follows.
        c.send(pf_syn(1, "error", 8080, 0));
        let mut seen = Vec::new();
        while let Some(f) = c.next() {
            seen.push(f);
        }
        seen
    });
    let refused = Frame::RstStream {
        stream: 1,
        status: berth::streaming::spdy::rst::REFUSED_STREAM,
    };
    assert!(frames.contains(&refused), "{frames:?}");
    assert!(
        matches!(frames.last(), Some(Frame::GoAway { last_good: 1, .. })),
        "{frames:?}"
    );
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}
