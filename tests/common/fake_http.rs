//! A tiny HTTP/1.1 server inside a test's namespace that answers with a handler and records
//! every request it gets (method, path, headers): a registry mirror or a blob store that a test
//! watches for what berthd sends it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Netns;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (Content-Length and Connection are added).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// When set: after `body`, this many zero bytes, without a Content-Length (the end is the
    /// connection's close), sent until the peer stops reading: a registry's endless answer.
    pub then_zeros: Option<u64>,
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A running server; stops on drop.
pub struct FakeHttp {
    /// `IP:PORT` inside the namespace.
    pub addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHttp {
    /// Listens on `ip:port` in `ns` and answers every request with `handler`.
    pub fn start(
        ns: &Netns,
        ip: &str,
        port: u16,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> FakeHttp {
        let path = ns.path.clone();
        let addr = format!("{ip}:{port}");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handler: Arc<Handler> = Arc::new(handler);
        let (seen2, sent2, stop2, addr2) = (seen.clone(), sent.clone(), stop.clone(), addr.clone());
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind(&addr2).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (seen, sent, handler) = (seen2.clone(), sent2.clone(), handler.clone());
                        std::thread::spawn(move || serve(s, &seen, &sent, &*handler));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv().unwrap();
        FakeHttp {
            addr,
            seen,
            sent,
            stop,
            thread: Some(thread),
        }
    }

    /// Body bytes written so far, over all requests.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection: requests until the peer closes (keep-alive), no request bodies.
fn serve(s: TcpStream, seen: &Mutex<Vec<Seen>>, sent: &AtomicU64, handler: &Handler) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let req = Seen {
            method,
            path,
            headers,
        };
        seen.lock().unwrap().push(req.clone());
        let reply = handler(&req);
        let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if let (Some(zeros), "GET") = (reply.then_zeros, req.method.as_str()) {
            out.push_str("Connection: close\r\n\r\n");
            let _ = s_write(&mut w, out.as_bytes(), sent, false);
            if s_write(&mut w, &reply.body, sent, true).is_err() {
                return;
            }
            let chunk = vec![0u8; 64 * 1024];
            let mut left = zeros;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if s_write(&mut w, &chunk[..n], sent, true).is_err() {
                    return;
                }
                left -= n as u64;
            }
            return;
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
        let mut bytes = out.into_bytes();
        if req.method != "HEAD" {
            bytes.extend_from_slice(&reply.body);
            sent.fetch_add(reply.body.len() as u64, Ordering::Relaxed);
        }
        if w.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// Writes `data`, counting it in `sent` when it is body.
fn s_write(w: &mut TcpStream, data: &[u8], sent: &AtomicU64, body: bool) -> std::io::Result<()> {
    w.write_all(data)?;
    if body {
        sent.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// A plain GET (or HEAD) of `path` at `addr` with the given headers: status, headers, body.
/// For passing requests on to a real registry.
pub fn get(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("content-length")
                && !k.eq_ignore_ascii_case("connection")
                && !k.eq_ignore_ascii_case("transfer-encoding")
        })
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
        then_zeros: None,
    }
}
