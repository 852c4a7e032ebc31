//! Talking to registries: which endpoints to try for a host (mirrors first), which credentials
//! to present, and fetching manifests and blobs with `oci-client`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::config::{Config, RegistryConfig};

/// Every manifest kind berth accepts, in the Accept header of manifest requests.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One place to fetch an image from: a mirror or the registry host itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// A mirror rather than the image's own registry.
    pub mirror: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.plain_http { "http" } else { "https" };
        write!(f, "{scheme}://{}", self.host)
    }
}

impl Endpoint {
    fn from_mirror(m: &str) -> Endpoint {
        let (plain_http, rest) = match m.strip_prefix("http://") {
            Some(r) => (true, r),
            None => (false, m.strip_prefix("https://").unwrap_or(m)),
        };
        Endpoint {
            host: rest.trim_end_matches('/').to_string(),
            plain_http,
            mirror: true,
        }
    }
}

/// The endpoints to try for images of `domain`, in order: its own mirrors, the `*` mirrors,
/// then the host itself.
pub fn endpoints(config: &Config, domain: &str) -> Vec<Endpoint> {
    let none = RegistryConfig::default();
    let own = config.registries.get(domain).unwrap_or(&none);
    let any = config.registries.get("*").unwrap_or(&none);
    let mut out: Vec<Endpoint> = own
        .mirrors
        .iter()
        .chain(any.mirrors.iter())
        .map(|m| Endpoint::from_mirror(m))
        .collect();
    out.push(Endpoint {
        host: domain.to_string(),
        plain_http: own.insecure,
        mirror: false,
    });
    out.dedup();
    out
}

/// Credentials for one pull.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum Credentials {
    /// None: anonymous, with the anonymous token flow where the registry asks for it.
    #[default]
    Anonymous,
    /// Username and password (basic auth, or exchanged for a bearer token).
    Basic(String, String),
    /// A bearer token presented as is (CRI `registry_token`).
    Bearer(String),
    /// An OAuth2 refresh token exchanged for a bearer token (CRI `identity_token`).
    Identity(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log secrets.
        f.write_str(match self {
            Credentials::Anonymous => "Anonymous",
            Credentials::Basic(..) => "Basic(..)",
            Credentials::Bearer(_) => "Bearer(..)",
            Credentials::Identity(_) => "Identity(..)",
        })
    }
}

impl Credentials {
    /// Credentials from the CRI's AuthConfig fields; `None` when all are empty.
    pub fn from_cri(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
    ) -> Result<Option<Credentials>, String> {
        if !registry_token.is_empty() {
            return Ok(Some(Credentials::Bearer(registry_token.to_string())));
        }
        if !identity_token.is_empty() {
            return Ok(Some(Credentials::Identity(identity_token.to_string())));
        }
        if !username.is_empty() || !password.is_empty() {
            return Ok(Some(Credentials::Basic(
                username.to_string(),
                password.to_string(),
            )));
        }
        if !auth.is_empty() {
            return decode_basic(auth).map(Some);
        }
        Ok(None)
    }
}

/// Credentials a CRI PullImage carried, and the registry they are for (kubelet sends a pull
/// secret's entry with its `server_address`; empty means the image's own registry).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CriAuth {
    /// The credentials.
    pub credentials: Credentials,
    /// `host[:port]` they belong to, normalised (see `registry_host`); empty = the image's.
    pub server_address: String,
}

impl CriAuth {
    /// Whether these credentials are for `host` (the image's own registry `image_domain`).
    pub fn is_for(&self, host: &str, image_domain: &str) -> bool {
        let for_host = if self.server_address.is_empty() {
            registry_host(image_domain)
        } else {
            registry_host(&self.server_address)
        };
        for_host == registry_host(host)
    }
}

/// A registry address as credentials name it, reduced to `host[:port]`: scheme and path
/// dropped, lower case, Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`,
/// `https://index.docker.io/v1/`) all `docker.io`.
pub fn registry_host(address: &str) -> String {
    let h = auth_key_host(address.trim()).to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => h,
    }
}

/// Decodes a Docker `auth` field: base64 of `user:password`.
fn decode_basic(auth: &str) -> Result<Credentials, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!("auth is not valid base64: {e}"))?;
    let text = String::from_utf8(raw).map_err(|_| "auth is not UTF-8".to_string())?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| "auth must encode user:password".to_string())?;
    Ok(Credentials::Basic(u.to_string(), p.to_string()))
}

/// One entry of a Docker-style credentials file.
#[derive(Debug, Deserialize, Default)]
struct FileAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

#[derive(Debug, Deserialize, Default)]
struct CredentialsFile {
    #[serde(default)]
    auths: HashMap<String, FileAuth>,
}

/// The host part of a credentials-file key (`https://index.docker.io/v1/` → `index.docker.io`).
fn auth_key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

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

    /// The credentials to present to `ep` when pulling an image of `image_domain`. The CRI's
    /// go only to the registry they are for, and never to a mirror (a mirror is another party:
    /// a user's pull secret is not the operator's to hand it); everything else, mirrors
    /// included, gets the credentials-file entry for its own host, or none.
    pub fn credentials_for(
        &self,
        ep: &Endpoint,
        image_domain: &str,
        from_cri: Option<&CriAuth>,
    ) -> Result<Credentials, String> {
        if let Some(c) = from_cri
            && !ep.mirror
            && c.is_for(&ep.host, image_domain)
        {
            return Ok(c.credentials.clone());
        }
        let Some(path) = &self.credentials_file else {
            return Ok(Credentials::Anonymous);
        };
        // Read on each pull: operators rotate the file without restarting berthd.
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials::Anonymous);
            }
            Err(e) => return Err(format!("reading credentials file {}: {e}", path.display())),
        };
        let file: CredentialsFile = serde_json::from_str(&text)
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
        let want = registry_host(&ep.host);
        for (key, a) in &file.auths {
            if registry_host(key) == want {
                return Ok(Credentials::from_cri(
                    &a.username,
                    &a.password,
                    &a.auth,
                    &a.identity_token,
                    &a.registry_token,
                )
                .map_err(|e| format!("credentials file {} entry {key:?}: {e}", path.display()))?
                .unwrap_or_default());
            }
        }
        Ok(Credentials::Anonymous)
    }

    fn client(&self, ep: &Endpoint, creds: &Credentials) -> oci_client::Client {
        let mut clients = self.clients.lock().expect("registry clients lock poisoned");
        clients
            .entry((ep.clone(), creds.clone()))
            .or_insert_with(|| {
                oci_client::Client::new(ClientConfig {
                    protocol: if ep.plain_http {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    connect_timeout: Some(CONNECT_TIMEOUT),
                    ..Default::default()
                })
            })
            .clone()
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
        self.client(ep, creds)
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
        let client = self.client(ep, creds);
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
    fn mirrors_come_before_the_host_and_star_applies_to_all() {
        let c = Config::parse(
            "[registries.\"registry.k8s.io\"]\nmirrors = [\"http://127.0.0.1:5000\", \"mirror.example:443\"]\n\
             [registries.\"*\"]\nmirrors = [\"https://all.example\"]\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let eps: Vec<String> = endpoints(&c, "registry.k8s.io")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            eps,
            [
                "http://127.0.0.1:5000",
                "https://mirror.example:443",
                "https://all.example",
                "https://registry.k8s.io"
            ]
        );
        let eps = endpoints(&c, "quay.io");
        assert_eq!(eps.len(), 2);
        assert!(!eps[1].mirror);
    }

    #[test]
    fn cri_auth_forms() {
        assert_eq!(Credentials::from_cri("", "", "", "", "").unwrap(), None);
        assert_eq!(
            Credentials::from_cri("u", "p", "", "", "").unwrap(),
            Some(Credentials::Basic("u".into(), "p".into()))
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        assert_eq!(
            Credentials::from_cri("", "", &b64, "", "").unwrap(),
            Some(Credentials::Basic("alice".into(), "s3cret:x".into()))
        );
        assert!(Credentials::from_cri("", "", "!!notbase64", "", "").is_err());
        assert_eq!(
            Credentials::from_cri("", "", "", "", "tok").unwrap(),
            Some(Credentials::Bearer("tok".into()))
        );
        assert_eq!(
            Credentials::from_cri("", "", "", "idt", "").unwrap(),
            Some(Credentials::Identity("idt".into()))
        );
    }

    #[test]
    fn credentials_file_is_matched_by_host() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("bob:pw");
        std::fs::write(
            &f,
            format!(r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{b64}"}}, "127.0.0.1:5000": {{"username": "u", "password": "p"}}}}}}"#),
        )
        .unwrap();
        let r = Registry::new(Some(f));
        let hub = Endpoint {
            host: "docker.io".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            r.credentials_for(&hub, "docker.io", None).unwrap(),
            Credentials::Basic("bob".into(), "pw".into())
        );
        let local = Endpoint {
            host: "127.0.0.1:5000".into(),
            plain_http: true,
            mirror: true,
        };
        assert_eq!(
            r.credentials_for(&local, "registry.k8s.io", None).unwrap(),
            Credentials::Basic("u".into(), "p".into()),
            "a mirror gets its own host's entry"
        );
        let other = Endpoint {
            host: "quay.io".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            r.credentials_for(&other, "quay.io", None).unwrap(),
            Credentials::Anonymous
        );
        let cri = CriAuth {
            credentials: Credentials::Bearer("t".into()),
            server_address: String::new(),
        };
        assert_eq!(
            r.credentials_for(&other, "quay.io", Some(&cri)).unwrap(),
            cri.credentials
        );
        // Never to a mirror, whatever the mirror's host.
        assert_eq!(
            r.credentials_for(&local, "127.0.0.1:5000", Some(&cri))
                .unwrap(),
            Credentials::Basic("u".into(), "p".into())
        );
        // Only to the host they name.
        let for_example = CriAuth {
            credentials: Credentials::Basic("alice".into(), "pw".into()),
            server_address: "https://registry.example.com/v2/".into(),
        };
        assert_eq!(
            r.credentials_for(&other, "quay.io", Some(&for_example))
                .unwrap(),
            Credentials::Anonymous
        );
        let example = Endpoint {
            host: "registry.example.com".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            r.credentials_for(&example, "registry.example.com", Some(&for_example))
                .unwrap(),
            for_example.credentials
        );
        let hub_secret = CriAuth {
            credentials: Credentials::Basic("carol".into(), "pw".into()),
            server_address: "https://index.docker.io/v1/".into(),
        };
        assert_eq!(
            r.credentials_for(&hub, "docker.io", Some(&hub_secret))
                .unwrap(),
            hub_secret.credentials
        );
    }

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
