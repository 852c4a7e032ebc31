//! A small SPDY/3.1 client for the streaming tests (over berth's frame codec; the Go clients
//! of critest and crictl check the other side): the HTTP/1.1 upgrade, frames in and out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use berth::streaming::spdy::{Codec, Frame};
use bytes::BytesMut;

/// A byte stream to the server: TCP, or TLS over it.
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A SPDY client connection, upgraded from HTTP/1.1.
pub struct Client {
    pub tcp: Box<dyn Conn>,
    codec: Codec,
    buf: BytesMut,
    /// The protocol the server chose.
    pub protocol: String,
}

/// The SYN_STREAM opening stream `id` with these headers.
pub fn syn(id: u32, headers: &[(&str, &str)]) -> Frame {
    Frame::SynStream {
        stream: id,
        associated: 0,
        priority: 0,
        flags: 0,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// `url`'s host:port and path.
pub fn split(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .expect("an http(s) URL");
    let (host, path) = rest.split_once('/').expect("a path");
    (host.to_string(), format!("/{path}"))
}

/// POSTs `url` with the SPDY upgrade offering `protocols`; the status line and, on 101, the
/// client.
pub fn connect(url: &str, protocols: &[&str]) -> (String, Option<Client>) {
    connect_with(url, protocols, None)
}

/// `connect`, over TLS with `tls` when given.
pub fn connect_with(
    url: &str,
    protocols: &[&str],
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> (String, Option<Client>) {
    let (host, path) = split(url);
    let tcp = TcpStream::connect(&host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tcp: Box<dyn Conn> = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let ip = host.rsplit_once(':').unwrap().0;
            let name = rustls::pki_types::ServerName::try_from(ip.to_string()).unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    let offered: String = protocols
        .iter()
        .map(|p| format!("X-Stream-Protocol-Version: {p}\r\n"))
        .collect();
    if let Err(e) = write!(
        tcp,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         {offered}Content-Length: 0\r\n\r\n"
    ) {
        // A TLS handshake the client refused, for one.
        return (format!("request not sent: {e}"), None);
    }
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if !matches!(tcp.read(&mut byte), Ok(1)) {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    if !status.contains(" 101 ") {
        return (status, None);
    }
    let protocol = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-stream-protocol-version")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let client = Client {
        tcp,
        codec: Codec::new(),
        buf: BytesMut::new(),
        protocol,
    };
    (status, Some(client))
}

impl Client {
    pub fn send(&mut self, f: Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(&f, &mut out).unwrap();
        self.tcp.write_all(&out).unwrap();
    }

    pub fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            match self.tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// How many descriptors process `pid` holds.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Runs `f` on a runtime of its own (the tests' network-namespace threads have none).
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The WebSocket upgrade request for streaming `url` offering `protocol`.
pub fn ws_request(
    url: &str,
    protocol: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    req
}
