//! The streaming server's HTTP side: it binds `[streaming] address:port`, takes the token
//! from a URL that Exec, Attach or PortForward handed out, and upgrades the connection to the
//! protocol the client asked for. A used, expired or unknown token is a 404.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::tokens::RemoteCommand;
use super::tokens::{Session, TokenError, Tokens};
use super::{portforward, remotecommand, tunnel, wschannel, wsportforward};

/// Tokens and the base URL they are handed out under.
#[derive(Default)]
pub struct Streaming {
    tokens: Tokens,
    base: OnceLock<String>,
    timeouts: OnceLock<portforward::Timeouts>,
}

/// The streaming server could not start, or a URL could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The configured address.
    #[error("streaming server {address}: {message}")]
    Bind {
        /// host:port.
        address: String,
        /// Why.
        message: String,
    },
    /// The server is not running yet.
    #[error("the streaming server is not serving yet")]
    NotServing,
    /// No token.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl Streaming {
    /// The URL that lets its holder run `session`, once, within a minute.
    pub fn url(&self, session: Session) -> Result<String, StreamingError> {
        let base = self.base.get().ok_or(StreamingError::NotServing)?;
        let path = match &session {
            Session::PortForward { .. } => "portforward",
            Session::Remote(r) if r.exec.is_some() => "exec",
            Session::Remote(_) => "attach",
        };
        let token = self.tokens.mint(session)?;
        Ok(format!("{base}/{path}/{token}"))
    }

    /// Binds `address:port` (0 = any free port) and serves, over TLS when `tls` names a
    /// certificate, until `shutdown`; returns the bound address.
    pub async fn serve<S>(
        self: &Arc<Self>,
        address: &str,
        port: u16,
        tls: Option<&super::tls::Certificate>,
        timeouts: portforward::Timeouts,
        shutdown: S,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StreamingError>
    where
        S: std::future::Future<Output = ()> + Send + 'static,
    {
        let shown = format!("{address}:{port}");
        let err = |message: String| StreamingError::Bind {
            address: shown.clone(),
            message,
        };
        let ip: std::net::IpAddr = address
            .parse()
            .map_err(|e| err(format!("not an IP address: {e}")))?;
        let listener = tokio::net::TcpListener::bind((ip, port))
            .await
            .map_err(|e| err(format!("binding: {e}")))?;
        let bound = listener.local_addr().map_err(|e| err(e.to_string()))?;
        let tls = tls
            .map(|c| super::tls::server_config(c, ip))
            .transpose()
            .map_err(|e| err(e.to_string()))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = match bound {
            SocketAddr::V4(a) => format!("{scheme}://{a}"),
            SocketAddr::V6(a) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
        };
        let _ = self.base.set(base);
        let _ = self.timeouts.set(timeouts);
        let app = axum::Router::new()
            .route(
                "/portforward/{token}",
                axum::routing::get(port_forward).post(port_forward),
            )
            .route(
                "/exec/{token}",
                axum::routing::get(remote_command).post(remote_command),
            )
            .route(
                "/attach/{token}",
                axum::routing::get(remote_command).post(remote_command),
            )
            .with_state(self.clone());
        // 1/8 of the descriptor limit (128 of 1024), at most 1024: with the metrics
        // endpoint's 1/64, bare connections take at most a seventh of the table; even if every
        // slot were an exec session (~5 descriptors: the connection, the monitor's, stdio) a
        // third of it stays for the CRI socket, monitors and records.
        let listener = crate::listen_guard::GuardedListener::new(
            listener,
            crate::listen_guard::cap(8, 1024),
            "streaming",
        );
        let handshake = tls.map(super::tls::Handshake::new);
        let task = tokio::spawn(async move {
            use crate::listen_guard::serve;
            match handshake {
                Some(tls) => {
                    let prepare = move |conn, peer: SocketAddr| {
                        let tls = tls.clone();
                        async move { tls.accept(conn, peer).await }
                    };
                    serve(listener, prepare, app, shutdown).await
                }
                None => {
                    let prepare = |conn, _| std::future::ready(Some(conn));
                    serve(listener, prepare, app, shutdown).await
                }
            }
        });
        tracing::info!(address = %bound, "streaming server listening");
        Ok((bound, task))
    }
}

/// Whether a comma-separated header (any of its occurrences) holds `want`.
fn header_has(headers: &HeaderMap, name: &str, want: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(want))
}

fn refuse(code: StatusCode, message: String) -> Response {
    (code, message).into_response()
}

fn unknown_token() -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        "unknown, used or expired streaming URL".into(),
    )
}

/// Exec and attach: the SPDY upgrade to the first channel protocol of the client's that
/// berth speaks.
async fn remote_command(
    State(s): State<Arc<Streaming>>,
    Path(token): Path<String>,
    mut req: Request,
) -> Response {
    let Some(Session::Remote(cmd)) = s.tokens.take(&token) else {
        return unknown_token();
    };
    let timeouts = s.timeouts.get().copied().unwrap_or_default();
    if header_has(req.headers(), "upgrade", "websocket") {
        return remote_command_ws(req, cmd, timeouts).await;
    }
    let headers = req.headers();
    if !header_has(headers, "upgrade", "SPDY/3.1") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "exec and attach need Upgrade: SPDY/3.1 or websocket".into(),
        );
    }
    let offered = headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let Some(protocol) = remotecommand::negotiate(offered) else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "no supported X-Stream-Protocol-Version: this server speaks {}",
                remotecommand::PROTOCOLS.join(", ")
            ),
        );
    };
    let pod = cmd.pod_id.clone();
    spdy_upgrade(&mut req, protocol, pod, move |io| {
        remotecommand::serve(io, cmd, protocol, timeouts)
    })
}

async fn port_forward(
    State(s): State<Arc<Streaming>>,
    Path(token): Path<String>,
    mut req: Request,
) -> Response {
    let Some(Session::PortForward {
        pod_id,
        netns,
        ports,
    }) = s.tokens.take(&token)
    else {
        return unknown_token();
    };
    let timeouts = s.timeouts.get().copied().unwrap_or_default();
    if header_has(req.headers(), "upgrade", "websocket") {
        return port_forward_ws(req, pod_id, netns, ports, timeouts).await;
    }
    let headers = req.headers();
    if !header_has(headers, "upgrade", "SPDY/3.1") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "port-forward needs Upgrade: SPDY/3.1 or websocket".into(),
        );
    }
    if !header_has(headers, "x-stream-protocol-version", portforward::PROTOCOL) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "no supported X-Stream-Protocol-Version: this server speaks {}",
                portforward::PROTOCOL
            ),
        );
    }
    let pod = pod_id.clone();
    spdy_upgrade(&mut req, portforward::PROTOCOL, pod, move |io| {
        portforward::serve(io, pod_id, netns, timeouts)
    })
}

/// Answers 101 Switching Protocols to SPDY/3.1 speaking `protocol`, and runs `serve` on the
/// upgraded connection once hyper hands it over.
fn spdy_upgrade<F, Fut>(
    req: &mut Request,
    protocol: &'static str,
    pod: String,
    serve: F,
) -> Response
where
    F: FnOnce(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => serve(hyper_util::rt::TokioIo::new(io)).await,
            Err(e) => tracing::debug!(pod = %pod, error = %e, "SPDY upgrade failed"),
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    r
}

/// Exec and attach over WebSocket: the first of berth's channel protocols the client offers.
async fn remote_command_ws(
    req: Request,
    cmd: RemoteCommand,
    timeouts: portforward::Timeouts,
) -> Response {
    use axum::extract::FromRequestParts;
    use axum::extract::ws::WebSocketUpgrade;
    let (mut parts, _body) = req.into_parts();
    let Some(protocol) = wschannel::PROTOCOLS
        .iter()
        .find(|p| header_has(&parts.headers, "sec-websocket-protocol", p))
    else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "no supported Sec-WebSocket-Protocol: this server speaks {}",
                wschannel::PROTOCOLS.join(", ")
            ),
        );
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    ws.protocols([*protocol])
        .on_upgrade(move |socket| wschannel::serve(socket, cmd, protocol, timeouts))
}

/// Port-forward tunnelled over WebSocket: the same SPDY session inside binary messages.
async fn port_forward_ws(
    req: Request,
    pod_id: String,
    netns: Option<std::path::PathBuf>,
    requested: Vec<u16>,
    timeouts: portforward::Timeouts,
) -> Response {
    use axum::extract::FromRequestParts;
    use axum::extract::ws::WebSocketUpgrade;
    let (mut parts, _body) = req.into_parts();
    let offered = |p: &str| header_has(&parts.headers, "sec-websocket-protocol", p);
    // The SPDY tunnel, else the channel form (what kubelet's /portForward passes on), which
    // a client may also ask for by naming no protocol at all.
    let chosen = if offered(tunnel::PORT_FORWARD) {
        Some(tunnel::PORT_FORWARD)
    } else {
        wsportforward::PROTOCOLS.into_iter().find(|p| offered(p))
    };
    let named = parts.headers.contains_key("sec-websocket-protocol");
    if chosen.is_none() && named {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "no supported Sec-WebSocket-Protocol: this server speaks {}, {}",
                tunnel::PORT_FORWARD,
                wsportforward::PROTOCOLS.join(", ")
            ),
        );
    }
    let ports = if chosen == Some(tunnel::PORT_FORWARD) {
        Vec::new()
    } else {
        match wsportforward::ports(parts.uri.query(), requested) {
            Ok(p) => p,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
        }
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let ws = match chosen {
        Some(p) => ws.protocols([p]),
        None => ws,
    };
    ws.on_upgrade(move |socket| async move {
        match chosen {
            Some(tunnel::PORT_FORWARD) => {
                portforward::serve(tunnel::bridge(socket), pod_id, netns, timeouts).await
            }
            p => {
                let text = p.is_some_and(|p| p.contains("base64"));
                wsportforward::serve(socket, pod_id, netns, ports, text).await
            }
        }
    })
}
