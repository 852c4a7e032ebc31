//! Talking to registries: which endpoints to try for a host (mirrors first), which credentials
//! to present, and fetching manifests and blobs with `oci-client`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::credentials::{Credentials, CriAuth};
use super::endpoints::Endpoint;

/// Every manifest kind berth accepts, in the Accept header of manifest requests.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry says the manifest or blob does not exist.
    #[error("{endpoint}: {what} not found")]
    NotFound {
        /// The endpoint asked.
        endpoint: String,
        /// What was asked for.
        what: String,
    },
    /// The registry refused the credentials (or wants some).
    #[error("{endpoint}: not authorized to pull {what}")]
    Unauthorized {
        /// The endpoint.
        endpoint: String,
        /// What was asked for.
        what: String,
    },
    /// The registry could not be reached.
    #[error("{endpoint}: unreachable: {message}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The transport's error.
        message: String,
    },
    /// Content whose digest does not match what was asked for.
    #[error("{endpoint}: {what}: digest mismatch: {message}")]
    DigestMismatch {
        /// The endpoint.
        endpoint: String,
        /// What was fetched.
        what: String,
        /// Details.
        message: String,
    },
    /// A blob that went past its descriptor's size, or ended short of it.
    #[error(
        "{endpoint}: {what}: the manifest declares {declared} bytes, the registry sent {}",
        if *more { format!("more than {received}") } else { received.to_string() }
    )]
    SizeMismatch {
        /// The endpoint.
        endpoint: String,
        /// The blob ("layer sha256:…", "config sha256:…").
        what: String,
        /// The descriptor's size.
        declared: i64,
        /// What arrived before the download was stopped.
        received: u64,
        /// Whether it went past the declared size (else it ended short).
        more: bool,
    },
    /// Anything else the registry answered wrongly.
    #[error("{endpoint}: {message}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// Details.
        message: String,
    },
}

fn classify(e: OciDistributionError, ep: &Endpoint, what: &str) -> RegistryError {
    let endpoint = ep.to_string();
    let what = what.to_string();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            RegistryError::NotFound { endpoint, what }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}", e.code))
                .collect();
            let msg = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            if codes
                .iter()
                .any(|c| c.contains("Unknown") || c.contains("NameUnknown"))
            {
                RegistryError::NotFound { endpoint, what }
            } else if codes
                .iter()
                .any(|c| c.contains("Unauthorized") || c.contains("Denied"))
            {
                RegistryError::Unauthorized { endpoint, what }
            } else {
                RegistryError::Protocol {
                    endpoint,
                    message: format!("{what}: {msg}"),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            RegistryError::NotFound { endpoint, what }
        }
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        }
        | OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { endpoint, what }
        }
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
            RegistryError::Unreachable {
                endpoint,
                message: error_chain(&r),
            }
        }
        OciDistributionError::DigestError(d) => RegistryError::DigestMismatch {
            endpoint,
            what,
            message: d.to_string(),
        },
        OciDistributionError::RequestError(r) => RegistryError::Protocol {
            endpoint,
            message: format!("{what}: {}", error_chain(&r)),
        },
        other => RegistryError::Protocol {
            endpoint,
            message: format!("{what}: {other}"),
        },
    }
}

/// An error with its sources, which is where reqwest says what really happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The registry client: one `oci-client` per endpoint and credentials, so tokens are cached
/// across the layers of a pull (and across pulls) without mixing identities.
pub struct Registry {
    credentials_file: Option<PathBuf>,
    clients: Mutex<HashMap<(Endpoint, Credentials), oci_client::Client>>,
    /// Built on first use: building one loads and parses every CA certificate of the host,
    /// which berthd should not pay at startup for the rare identity-token exchange.
    http: OnceLock<Result<reqwest::Client, String>>,
}

impl Registry {
    /// A client reading credentials (when the CRI sends none) from `credentials_file`.
    pub fn new(credentials_file: Option<PathBuf>) -> Registry {
        Registry {
            credentials_file,
            clients: Mutex::new(HashMap::new()),
            http: OnceLock::new(),
        }
    }

    fn http(&self, ep: &Endpoint) -> Result<&reqwest::Client, RegistryError> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build()
                    .map_err(|e| format!("building an HTTP client: {}", error_chain(&e)))
            })
            .as_ref()
            .map_err(|message| RegistryError::Unreachable {
                endpoint: ep.to_string(),
                message: message.clone(),
            })
    }

    /// The credentials to present to `ep` (see `credentials::for_endpoint`).
    pub fn credentials_for(
        &self,
        ep: &Endpoint,
        image_domain: &str,
        from_cri: Option<&CriAuth>,
    ) -> Result<Credentials, String> {
        super::credentials::for_endpoint(
            self.credentials_file.as_deref(),
            ep,
            image_domain,
            from_cri,
        )
    }

    /// The registry client for `ep` with `creds`, made once. Built with `try_from`: oci-client's
    /// `new` falls back to a default client that panics when the node has no CA certificates.
    fn client(
        &self,
        ep: &Endpoint,
        creds: &Credentials,
    ) -> Result<oci_client::Client, RegistryError> {
        let mut clients = self.clients.lock().expect("registry clients lock poisoned");
        if let Some(c) = clients.get(&(ep.clone(), creds.clone())) {
            return Ok(c.clone());
        }
        let client = oci_client::Client::try_from(ClientConfig {
            protocol: if ep.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(CONNECT_TIMEOUT),
            ..Default::default()
        })
        .map_err(|e| RegistryError::Unreachable {
            endpoint: ep.to_string(),
            message: format!(
                "building the registry client (are the node's CA certificates installed?): {}",
                error_chain(&e)
            ),
        })?;
        clients.insert((ep.clone(), creds.clone()), client.clone());
        Ok(client)
    }

    /// The oci-client auth for `creds`; an identity token is exchanged for a bearer token first.
    async fn auth(
        &self,
        ep: &Endpoint,
        repo: &str,
        creds: &Credentials,
    ) -> Result<RegistryAuth, RegistryError> {
        Ok(match creds {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic(u, p) => RegistryAuth::Basic(u.clone(), p.clone()),
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
            Credentials::Identity(t) => {
                RegistryAuth::Bearer(self.exchange_identity_token(ep, repo, t).await?)
            }
        })
    }

    /// The OAuth2 refresh-token grant: the registry's challenge names the token realm, which
    /// trades the identity token for an access token scoped to pulling `repo`.
    async fn exchange_identity_token(
        &self,
        ep: &Endpoint,
        repo: &str,
        token: &str,
    ) -> Result<String, RegistryError> {
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            endpoint: ep.to_string(),
            message: error_chain(&e),
        };
        let resp = self
            .http(ep)?
            .get(format!("{ep}/v2/"))
            .send()
            .await
            .map_err(unreachable)?;
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_bearer_challenge)
            .ok_or_else(|| RegistryError::Protocol {
                endpoint: ep.to_string(),
                message: "an identity token was given but the registry asks for no bearer token"
                    .into(),
            })?;
        let scope = format!("repository:{repo}:pull");
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", "berth"),
            ("scope", scope.as_str()),
        ];
        if let Some(s) = &challenge.service {
            form.push(("service", s.as_str()));
        }
        let resp = self
            .http(ep)?
            .post(&challenge.realm)
            .form(&form)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(RegistryError::Unauthorized {
                endpoint: ep.to_string(),
                what: format!("{repo} (token exchange answered {})", resp.status()),
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            access_token: String,
            #[serde(default)]
            token: String,
        }
        let t: TokenResponse = resp.json().await.map_err(|e| RegistryError::Protocol {
            endpoint: ep.to_string(),
            message: format!("token response: {e}"),
        })?;
        Ok(if t.access_token.is_empty() {
            t.token
        } else {
            t.access_token
        })
    }

    /// Fetches a manifest or index by tag or digest; returns its bytes and digest (verified
    /// against the requested digest when pulling by digest).
    pub async fn fetch_manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        creds: &Credentials,
    ) -> Result<(Bytes, String), RegistryError> {
        let what = format!("manifest {repo}:{reference}").replace(":sha256:", "@sha256:");
        let r = oci_reference(ep, repo, reference);
        let auth = self.auth(ep, repo, creds).await?;
        self.client(ep, creds)?
            .pull_manifest_raw(&r, &auth, &MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| classify(e, ep, &what))
    }

    /// Streams a blob. The registry client verifies the digest as the stream ends; the caller
    /// hashes too and must treat a short or failing stream as a failed download.
    pub async fn fetch_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        size: i64,
        media_type: &str,
        creds: &Credentials,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + use<>, RegistryError> {
        let what = format!("blob {digest} of {repo}");
        let r = oci_reference(ep, repo, digest);
        let auth = self.auth(ep, repo, creds).await?;
        let client = self.client(ep, creds)?;
        client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        let desc = oci_client::manifest::OciDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            ..Default::default()
        };
        let stream = client
            .pull_blob_stream(&r, &desc)
            .await
            .map_err(|e| classify(e, ep, &what))?;
        Ok(stream
            .stream
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed())
    }
}

fn oci_reference(ep: &Endpoint, repo: &str, reference: &str) -> oci_client::Reference {
    if reference.starts_with("sha256:") {
        oci_client::Reference::with_digest(ep.host.clone(), repo.to_string(), reference.to_string())
    } else {
        oci_client::Reference::with_tag(ep.host.clone(), repo.to_string(), reference.to_string())
    }
}

struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn parse_bearer_challenge(h: &str) -> Option<BearerChallenge> {
    let rest = h
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| h.trim().strip_prefix("bearer "))?;
    let mut realm = None;
    let mut service = None;
    for part in split_params(rest) {
        let (k, v) = part.split_once('=')?;
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            _ => {}
        }
    }
    Some(BearerChallenge {
        realm: realm?,
        service,
    })
}

/// Splits on commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_is_parsed() {
        let c = parse_bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a,b:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        assert!(parse_bearer_challenge("Basic realm=x").is_none());
    }
}
