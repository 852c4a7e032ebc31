//! A token server for docker-registry's bearer-token auth, inside a test's namespace: it signs
//! ES256 JWTs with a key whose self-signed certificate the registry trusts, and hands them out
//! for GET /token (anonymously, or for basic credentials) and POST /token (OAuth2 refresh-token
//! grant). The registry is the real one; only the issuer is ours.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::SigningKey;

use super::Netns;

/// The service name the registry expects in tokens.
pub const SERVICE: &str = "berth-test-registry";
/// The issuer the registry expects.
pub const ISSUER: &str = "berth-test-issuer";

/// Who may get a token.
#[derive(Clone)]
pub struct Policy {
    /// Tokens without credentials.
    pub anonymous: bool,
    /// Accepted basic credentials.
    pub user: Option<(String, String)>,
    /// Accepted refresh token (identity token).
    pub refresh_token: Option<String>,
}

struct Signer {
    key: rcgen::KeyPair,
    cert_der: Vec<u8>,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// ECDSA signatures come DER-encoded; JWS wants r || s, 32 bytes each.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    let mut i = 2; // SEQUENCE, length
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "INTEGER expected");
        let len = der[i + 1] as usize;
        let mut int = &der[i + 2..i + 2 + len];
        while int.len() > 32 && int[0] == 0 {
            int = &int[1..];
        }
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

impl Signer {
    fn token(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<serde_json::Value> = scope
            .split(' ')
            .filter_map(|s| {
                let mut p = s.splitn(3, ':');
                let (t, name, actions) = (p.next()?, p.next()?, p.next()?);
                Some(serde_json::json!({"type": t, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = serde_json::json!({
            "alg": "ES256", "typ": "JWT",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": "berth-test", "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", rand_u64()), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = der_to_raw(&self.key.sign(signing_input.as_bytes()).unwrap());
        format!("{signing_input}.{}", b64(&sig))
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

/// A running token server.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// The certificate the registry must trust (PEM file).
    pub cert: PathBuf,
    signer: Arc<Signer>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    /// Starts on 127.0.0.1:`port` in `ns`.
    pub fn start(ns: &Netns, port: u16, policy: Policy) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["berth-test-token".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("token.crt");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let signer = Arc::new(Signer {
            cert_der: cert.der().to_vec(),
            key,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, sg) = (stop.clone(), signer.clone());
        let path = ns.path.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        serve(c, &sg, &policy);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
        TokenServer {
            realm: format!("http://127.0.0.1:{port}/token"),
            cert: cert_path,
            signer,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// A token for `scope`, as the server would issue it (for the CRI's registry_token).
    pub fn token(&self, scope: &str) -> String {
        self.signer.token(scope)
    }

    /// The registry config section that sends clients here.
    pub fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            self.cert.display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(c: std::net::TcpStream, signer: &Signer, policy: &Policy) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap_or(0),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    let _ = r.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body).into_owned();
    let q = target
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    let params = if method == "POST" { body } else { q };
    let scope = query(&params, "scope").unwrap_or_default();
    let allowed = if method == "POST" {
        query(&params, "grant_type").as_deref() == Some("refresh_token")
            && policy.refresh_token.is_some()
            && query(&params, "refresh_token") == policy.refresh_token
    } else {
        match (&auth, &policy.user) {
            (Some(a), Some((u, p))) => a
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .is_some_and(|d| d == format!("{u}:{p}").as_bytes()),
            (None, _) => policy.anonymous,
            _ => false,
        }
    };
    let mut c = c;
    let resp = if allowed {
        let t = signer.token(&scope);
        let body =
            serde_json::json!({"token": t, "access_token": t, "expires_in": 300}).to_string();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    };
    let _ = c.write_all(resp.as_bytes());
}
