//! Exec and Attach through berth's streaming server, driven by the tests' own SPDY client in
//! the channel protocols kubelet speaks: output, errors and exit codes (a `Status` JSON from
//! v4 on, text before), over SPDY and over WebSocket (binary and base64), stdin piped in and
//! closed, a terminal of the container's own with its
//! window size set, an attach to a container's stdin and output, bad requests refused with
//! clear errors, and a client that vanishes leaving neither a process in the container nor
//! anything open in berthd.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use berth::cri::v1 as cri;
use berth::streaming::spdy::Frame;
use bytes::Bytes;
use common::spdy::{self, Client, fd_count, syn};
use common::world::*;

/// A session's streams by type, opened in the order given (ids 1, 3, 5, …).
fn open(url: &str, protocol: &str, kinds: &[&str]) -> (Client, HashMap<String, u32>) {
    let (status, client) = spdy::connect(url, &[protocol]);
    let mut c = client.unwrap_or_else(|| panic!("no upgrade: {status}"));
    assert_eq!(c.protocol, protocol);
    let mut ids = HashMap::new();
    for (i, k) in kinds.iter().enumerate() {
        let id = 2 * i as u32 + 1;
        c.send(syn(id, &[("streamtype", k)]));
        ids.insert(k.to_string(), id);
    }
    (c, ids)
}

fn send(c: &mut Client, stream: u32, data: &[u8], fin: bool) {
    c.send(Frame::Data {
        stream,
        fin,
        data: Bytes::copy_from_slice(data),
    });
}

/// What came on each stream until the error stream and every output ended (or the
/// connection closed).
fn collect(c: &mut Client, ids: &HashMap<String, u32>) -> HashMap<String, String> {
    let names: HashMap<u32, String> = ids.iter().map(|(k, v)| (*v, k.clone())).collect();
    let mut got: HashMap<String, String> = HashMap::new();
    let mut open: Vec<u32> = ["error", "stdout", "stderr"]
        .iter()
        .filter_map(|k| ids.get(*k).copied())
        .collect();
    while !open.is_empty() {
        match c.next() {
            None => break,
            Some(Frame::Data { stream, fin, data }) => {
                let name = names.get(&stream).cloned().unwrap_or_default();
                got.entry(name)
                    .or_default()
                    .push_str(&String::from_utf8_lossy(&data));
                if fin {
                    open.retain(|s| *s != stream);
                }
            }
            Some(_) => {}
        }
    }
    got
}

async fn exec_url(w: &mut World, id: &str, cmd: &[&str], io: (bool, bool, bool, bool)) -> String {
    let (stdin, stdout, stderr, tty) = io;
    w.rt.exec(cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout,
        stderr,
    })
    .await
    .unwrap()
    .into_inner()
    .url
}

/// Runs a WebSocket exec session at `url` in `protocol`: sends `input` messages (channel byte
/// first; text protocols get them encoded), and returns every message received as (channel,
/// bytes) until the server closes.
fn ws_session(url: &str, protocol: &str, input: Vec<Vec<u8>>) -> Vec<(u8, Vec<u8>)> {
    use base64::Engine;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let b64 = base64::engine::general_purpose::STANDARD;
    spdy::block_on(async {
        let req = spdy::ws_request(url, protocol);
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], protocol);
        let text = protocol.contains("base64");
        for m in input {
            let msg = if text {
                let mut t = String::from(char::from(b'0' + m[0]));
                t.push_str(&b64.encode(&m[1..]));
                Message::Text(t.into())
            } else {
                Message::Binary(m.into())
            };
            ws.send(msg).await.unwrap();
        }
        let mut got = Vec::new();
        let deadline = tokio::time::sleep(Duration::from_secs(20));
        tokio::pin!(deadline);
        loop {
            let m = tokio::select! {
                m = ws.next() => m,
                _ = &mut deadline => panic!("the session did not end: {got:?}"),
            };
            match m {
                Some(Ok(Message::Binary(b))) => got.push((b[0], b[1..].to_vec())),
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_bytes();
                    got.push((t[0] - b'0', b64.decode(&t[1..]).unwrap()));
                }
                Some(Ok(Message::Close(f))) => {
                    // client-go takes any close but a normal one for an error.
                    assert_eq!(f.map(|f| u16::from(f.code)), Some(1000), "{got:?}");
                    break;
                }
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
        got
    })
}

fn channel(got: &[(u8, Vec<u8>)], ch: u8) -> String {
    got.iter()
        .filter(|(c, _)| *c == ch)
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_output_input_exit_codes_and_a_terminal() {
    let mut w = World::new().await;
    let pod = w.pod("exec").await;
    let ctr = w.run(&pod, container("box", &["sleep", "3600"])).await;
    // Neither the container nor what runs in it inherits the monitor's blocked signals
    // (SIGCHLD, SIGPIPE for its signalfd): a blocked mask survives exec.
    let (_, blocked) = w
        .sh(&ctr, "grep SigBlk /proc/1/status /proc/self/status")
        .await;
    assert_eq!(blocked.matches("0000000000000000").count(), 2, "{blocked}");

    // Output on both streams and the exit code in a v4 Status.
    let url = exec_url(
        &mut w,
        &ctr,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        (false, true, true, false),
    )
    .await;
    let got = w.env.netns.run_in(move || {
        let (mut c, ids) = open(&url, "v4.channel.k8s.io", &["error", "stdout", "stderr"]);
        collect(&mut c, &ids)
    });
    assert_eq!(
        got.get("stdout").map(String::as_str),
        Some("out\n"),
        "{got:?}"
    );
    assert_eq!(
        got.get("stderr").map(String::as_str),
        Some("err\n"),
        "{got:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&got["error"]).unwrap();
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    // stdin piped in and closed: cat sees its end and exits 0.
    let url = exec_url(&mut w, &ctr, &["cat"], (true, true, false, false)).await;
    let got = w.env.netns.run_in(move || {
        let (mut c, ids) = open(&url, "v4.channel.k8s.io", &["error", "stdin", "stdout"]);
        send(&mut c, ids["stdin"], b"hello\n", false);
        send(&mut c, ids["stdin"], b"world\n", true);
        collect(&mut c, &ids)
    });
    assert_eq!(
        got.get("stdout").map(String::as_str),
        Some("hello\nworld\n"),
        "{got:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&got["error"]).unwrap();
    assert_eq!(status["status"], "Success", "{status}");

    // Before v4 the error stream carries the message only.
    let url = exec_url(
        &mut w,
        &ctr,
        &["sh", "-c", "exit 5"],
        (false, true, false, false),
    )
    .await;
    let got = w.env.netns.run_in(move || {
        let (mut c, ids) = open(&url, "v2.channel.k8s.io", &["error", "stdout"]);
        collect(&mut c, &ids)
    });
    assert!(got["error"].contains("exited with 5"), "{got:?}");

    // A terminal of the container's own devpts, with the window size the client sets.
    let url = exec_url(
        &mut w,
        &ctr,
        &["sh", "-c", "read go; stty size; tty"],
        (true, true, false, true),
    )
    .await;
    let got = w.env.netns.run_in(move || {
        let (mut c, ids) = open(
            &url,
            "v4.channel.k8s.io",
            &["error", "stdin", "stdout", "resize"],
        );
        send(
            &mut c,
            ids["resize"],
            br#"{"Width":123,"Height":45}"#,
            false,
        );
        std::thread::sleep(Duration::from_millis(200));
        send(&mut c, ids["stdin"], b"go\n", false);
        collect(&mut c, &ids)
    });
    let out = got.get("stdout").cloned().unwrap_or_default();
    assert!(out.contains("45 123"), "{got:?}");
    assert!(out.contains("/dev/pts/0"), "{got:?}");
    let status: serde_json::Value = serde_json::from_str(&got["error"]).unwrap();
    assert_eq!(status["status"], "Success", "{status}");

    // A command that does not exist: the reason, as an error Status.
    let url = exec_url(
        &mut w,
        &ctr,
        &["no-such-command"],
        (false, true, false, false),
    )
    .await;
    let got = w.env.netns.run_in(move || {
        let (mut c, ids) = open(&url, "v4.channel.k8s.io", &["error", "stdout"]);
        collect(&mut c, &ids)
    });
    assert!(got["error"].contains("no-such-command"), "{got:?}");

    // A client that vanishes: its terminal's hangup ends the process; berthd keeps nothing.
    let berthd = w.env.berthd.pid();
    let fds_before = fd_count(berthd);
    let url = exec_url(&mut w, &ctr, &["sleep", "4242"], (true, true, false, true)).await;
    w.env.netns.run_in(move || {
        let (c, _ids) = open(
            &url,
            "v4.channel.k8s.io",
            &["error", "stdin", "stdout", "resize"],
        );
        std::thread::sleep(Duration::from_millis(500));
        drop(c);
    });
    let mut gone = false;
    for _ in 0..100 {
        let (_, ps) = w.sh(&ctr, "ps").await;
        if !ps.contains("4242") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the exec'd process outlived its client");
    eventually("berthd closed the vanished session", || {
        fd_count(berthd) <= fds_before
    })
    .await;

    // Over WebSocket, v5: stdin in, closed with the close signal, output and status back; the
    // first message is the empty one on stdout that says the session is up.
    let url = exec_url(&mut w, &ctr, &["cat"], (true, true, false, false)).await;
    let got = w.env.netns.run_in(move || {
        let input = vec![b"\x00over ws\n".to_vec(), vec![255, 0]];
        ws_session(&url, "v5.channel.k8s.io", input)
    });
    assert_eq!(got.first(), Some(&(1, Vec::new())), "{got:?}");
    assert_eq!(channel(&got, 1), "over ws\n", "{got:?}");
    let status: serde_json::Value = serde_json::from_str(&channel(&got, 3)).unwrap();
    assert_eq!(status["status"], "Success", "{status}");
    // v4 in base64 text messages: the exit code in the Status.
    let url = exec_url(
        &mut w,
        &ctr,
        &["sh", "-c", "echo b64; exit 4"],
        (false, true, false, false),
    )
    .await;
    let got = w
        .env
        .netns
        .run_in(move || ws_session(&url, "v4.base64.channel.k8s.io", Vec::new()));
    assert_eq!(channel(&got, 1), "b64\n", "{got:?}");
    let status: serde_json::Value = serde_json::from_str(&channel(&got, 3)).unwrap();
    assert_eq!(status["details"]["causes"][0]["message"], "4", "{status}");

    // A used URL is a 404.
    let url = exec_url(&mut w, &ctr, &["true"], (false, true, false, false)).await;
    let (first, second) = w.env.netns.run_in(move || {
        let (mut c, ids) = open(&url, "v4.channel.k8s.io", &["error", "stdout"]);
        let first = collect(&mut c, &ids);
        (first, spdy::connect(&url, &["v4.channel.k8s.io"]).0)
    });
    assert!(first["error"].contains("Success"), "{first:?}");
    assert!(second.contains(" 404 "), "{second}");

    w.stop(&ctr, 0).await;
    w.remove(&ctr).await;
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_reaches_a_containers_stdin_and_output() {
    let mut w = World::new().await;
    let pod = w.pod("attach").await;
    let mut cfg = container("echo", &["sh", "-c", "while read l; do echo got $l; done"]);
    cfg.stdin = true;
    let ctr = w.run(&pod, cfg).await;
    let url =
        w.rt.attach(cri::AttachRequest {
            container_id: ctr.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.contains("/attach/"), "{url}");
    let out = w.env.netns.run_in(move || {
        let (mut c, ids) = open(
            &url,
            "v4.channel.k8s.io",
            &["error", "stdin", "stdout", "stderr"],
        );
        send(&mut c, ids["stdin"], b"one\n", false);
        let mut out = String::new();
        while !out.contains("got one") {
            match c.next() {
                Some(Frame::Data { stream, data, .. }) if stream == ids["stdout"] => {
                    out.push_str(&String::from_utf8_lossy(&data))
                }
                Some(_) => {}
                None => break,
            }
        }
        out
    });
    assert_eq!(out, "got one\n");

    // Bad requests get clear errors.
    let no_stdin = w.run(&pod, container("quiet", &["sleep", "3600"])).await;
    let attach = |id: &str, stdin, tty, stderr| cri::AttachRequest {
        container_id: id.into(),
        stdin,
        tty,
        stdout: true,
        stderr,
    };
    let e =
        w.rt.attach(attach(&no_stdin, true, false, true))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("stdin"), "{e:?}");
    let e =
        w.rt.attach(attach(&no_stdin, false, true, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let exec = |cmd: &[&str], tty, stderr, stdout| cri::ExecRequest {
        container_id: no_stdin.clone(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: false,
        stdout,
        stderr,
    };
    let e =
        w.rt.exec(exec(&["true"], true, true, true))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("tty"), "{e:?}");
    let e = w.rt.exec(exec(&[], false, false, true)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e =
        w.rt.exec(exec(&["true"], false, false, false))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    w.stop(&no_stdin, 0).await;
    let e =
        w.rt.exec(exec(&["true"], false, false, true))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let mut missing = exec(&["true"], false, false, true);
    missing.container_id = "no-such-container".into();
    let e = w.rt.exec(missing).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    w.stop(&ctr, 0).await;
    w.remove(&ctr).await;
    w.remove(&no_stdin).await;
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}

/// A client TLS configuration trusting `roots`, or any certificate when `None` (for the
/// self-signed one berthd makes at start, which nothing can know beforehand).
fn tls_client(roots: Option<&[u8]>) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct AnyCertificate(rustls::crypto::WebPkiSupportedAlgorithms);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match roots {
        Some(pem) => {
            let mut store = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                store.add(c.unwrap()).unwrap();
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    std::sync::Arc::new(config)
}

/// Runs `echo tls` through `url` over TLS with `config`; stdout and the Status.
fn exec_over_tls(url: String, config: std::sync::Arc<rustls::ClientConfig>) -> (String, String) {
    let (status, client) = spdy::connect_with(&url, &["v4.channel.k8s.io"], Some(config));
    let mut c = client.unwrap_or_else(|| panic!("no upgrade over TLS: {status}"));
    let mut ids = HashMap::new();
    for (i, k) in ["error", "stdout"].iter().enumerate() {
        c.send(syn(2 * i as u32 + 1, &[("streamtype", k)]));
        ids.insert(k.to_string(), 2 * i as u32 + 1);
    }
    let got = collect(&mut c, &ids);
    (
        got.get("stdout").cloned().unwrap_or_default(),
        got.get("error").cloned().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_tls_with_a_configured_certificate_or_a_self_signed_one() {
    // A CA of the test's and a server certificate it signed for 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "berth test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let (cert_file, key_file) = (dir.path().join("s.crt"), dir.path().join("s.key"));
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let roots = ca_cert.pem().into_bytes();

    let mut w = World::with(common::Options {
        extra_config: format!(
            "[streaming]\ntls = true\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        ),
        ..Default::default()
    })
    .await;
    let pod = w.pod("tls").await;
    let ctr = w.run(&pod, container("box", &["sleep", "3600"])).await;
    let url = exec_url(&mut w, &ctr, &["echo", "tls"], (false, true, false, false)).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let config = tls_client(Some(&roots));
    let (out, status) = w.env.netns.run_in(move || exec_over_tls(url, config));
    assert_eq!(out, "tls\n");
    assert!(status.contains("\"Success\""), "{status}");
    // Plain HTTP to the TLS server gets no upgrade, and the token is not spent by it.
    let url = exec_url(&mut w, &ctr, &["echo", "tls"], (false, true, false, false)).await;
    let plain = url.replace("https://", "http://");
    let status = w
        .env
        .netns
        .run_in(move || spdy::connect(&plain, &["v4.channel.k8s.io"]).0);
    assert!(!status.contains(" 101 "), "{status}");
    let config = tls_client(Some(&roots));
    let (out, _) = w.env.netns.run_in(move || exec_over_tls(url, config));
    assert_eq!(out, "tls\n");
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    drop(w);

    // No files: a certificate of berthd's own making; a client that trusts only the test's CA
    // refuses it, one that accepts any gets its exec.
    let mut w = World::with(common::Options {
        extra_config: "[streaming]\ntls = true\n".into(),
        ..Default::default()
    })
    .await;
    let pod = w.pod("tls-self").await;
    let ctr = w.run(&pod, container("box", &["sleep", "3600"])).await;
    let url = exec_url(&mut w, &ctr, &["echo", "tls"], (false, true, false, false)).await;
    assert!(url.starts_with("https://"), "{url}");
    let strict = tls_client(Some(&roots));
    let u = url.clone();
    let status = w
        .env
        .netns
        .run_in(move || spdy::connect_with(&u, &["v4.channel.k8s.io"], Some(strict)).0);
    assert!(!status.contains(" 101 "), "{status}");
    let config = tls_client(None);
    let (out, status) = w.env.netns.run_in(move || exec_over_tls(url, config));
    assert_eq!(out, "tls\n");
    assert!(status.contains("\"Success\""), "{status}");
    w.remove_pod(&pod.0).await;
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}
