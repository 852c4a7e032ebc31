//! TLS for the streaming server: the certificate and key from `[streaming] tls_cert_file` and
//! `tls_key_file`, or a self-signed certificate for the bound address made at start. The
//! handshake of each connection runs in the connection's own task, so a client that stalls in
//! it holds up nobody else's connection (and, counted by the listener's cap, only its own slot).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::listen_guard::Guarded;

/// A client that has not finished its handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate could not be read, parsed or made.
#[derive(Debug, thiserror::Error)]
#[error("streaming TLS: {0}")]
pub struct TlsError(String);

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum Certificate {
    /// PEM files: the chain (leaf first) and its private key.
    Files {
        /// `tls_cert_file`.
        cert: std::path::PathBuf,
        /// `tls_key_file`.
        key: std::path::PathBuf,
    },
    /// Made at start, for the address the server is bound to.
    SelfSigned,
}

/// The rustls configuration serving `cert` on `ip`; HTTP/1.1 only (the upgrade needs it).
pub fn server_config(cert: &Certificate, ip: IpAddr) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = match cert {
        Certificate::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
        Certificate::SelfSigned => self_signed(ip)?,
    };
    // The provider is named: rustls refuses to pick one when more than one is compiled in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("the certificate and key do not make a pair: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError(format!("{}: {e}", path.display())))
}

/// A certificate valid for `ip` (and `localhost`), signed by its own key.
fn self_signed(
    ip: IpAddr,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .map_err(|e| TlsError(e.to_string()))?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "berth streaming server");
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError(e.to_string()))?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError(e.to_string()))?;
    Ok((vec![cert.der().clone()], key))
}

/// The server side of the TLS handshake, for each accepted connection.
#[derive(Clone)]
pub struct Handshake(TlsAcceptor);

impl Handshake {
    /// Handshakes with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Handshake {
        Handshake(TlsAcceptor::from(config))
    }

    /// The connection from `peer` once its handshake is done; `None` (dropped) if it failed
    /// or took longer than HANDSHAKE_TIMEOUT.
    pub async fn accept(
        &self,
        conn: Guarded<TcpStream>,
        peer: SocketAddr,
    ) -> Option<TlsStream<Guarded<TcpStream>>> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.0.accept(conn)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "streaming TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "streaming TLS handshake timed out");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_makes_a_config_and_bad_files_are_named() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let config = server_config(&Certificate::SelfSigned, ip).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        let dir = std::env::temp_dir().join(format!("berth-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("c.pem");
        let key = dir.join("k.pem");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let files = Certificate::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let e = server_config(&files, ip).unwrap_err().to_string();
        assert!(e.contains(&cert.display().to_string()), "{e}");

        // A real pair whose key belongs to another certificate.
        let (chain, _) = self_signed(ip).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let pem = |der: &[u8]| {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            )
        };
        std::fs::write(&cert, pem(chain[0].as_ref())).unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = server_config(&files, ip).unwrap_err().to_string();
        assert!(e.contains("do not make a pair"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
