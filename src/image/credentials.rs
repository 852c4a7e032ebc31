//! Credentials for a pull: the CRI's AuthConfig (kubelet's pull secret for one registry) or an
//! entry of the Docker-style credentials file, and which endpoint may be given which. A user's
//! pull secret is for the registry it names, never for a mirror or another host.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::endpoints::Endpoint;

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

/// The credentials to present to `ep` when pulling an image of `image_domain`. The CRI's
/// go only to the registry they are for, and never to a mirror (a mirror is another party:
/// a user's pull secret is not the operator's to hand it); everything else, mirrors
/// included, gets the credentials-file entry for its own host, or none.
pub fn for_endpoint(
    credentials_file: Option<&Path>,
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
    let Some(path) = credentials_file else {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let file = Some(f.as_path());
        let hub = Endpoint {
            host: "docker.io".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            for_endpoint(file, &hub, "docker.io", None).unwrap(),
            Credentials::Basic("bob".into(), "pw".into())
        );
        let local = Endpoint {
            host: "127.0.0.1:5000".into(),
            plain_http: true,
            mirror: true,
        };
        assert_eq!(
            for_endpoint(file, &local, "registry.k8s.io", None).unwrap(),
            Credentials::Basic("u".into(), "p".into()),
            "a mirror gets its own host's entry"
        );
        let other = Endpoint {
            host: "quay.io".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            for_endpoint(file, &other, "quay.io", None).unwrap(),
            Credentials::Anonymous
        );
        let cri = CriAuth {
            credentials: Credentials::Bearer("t".into()),
            server_address: String::new(),
        };
        assert_eq!(
            for_endpoint(file, &other, "quay.io", Some(&cri)).unwrap(),
            cri.credentials
        );
        // Never to a mirror, whatever the mirror's host.
        assert_eq!(
            for_endpoint(file, &local, "127.0.0.1:5000", Some(&cri)).unwrap(),
            Credentials::Basic("u".into(), "p".into())
        );
        // Only to the host they name.
        let for_example = CriAuth {
            credentials: Credentials::Basic("alice".into(), "pw".into()),
            server_address: "https://registry.example.com/v2/".into(),
        };
        assert_eq!(
            for_endpoint(file, &other, "quay.io", Some(&for_example)).unwrap(),
            Credentials::Anonymous
        );
        let example = Endpoint {
            host: "registry.example.com".into(),
            plain_http: false,
            mirror: false,
        };
        assert_eq!(
            for_endpoint(file, &example, "registry.example.com", Some(&for_example)).unwrap(),
            for_example.credentials
        );
        let hub_secret = CriAuth {
            credentials: Credentials::Basic("carol".into(), "pw".into()),
            server_address: "https://index.docker.io/v1/".into(),
        };
        assert_eq!(
            for_endpoint(file, &hub, "docker.io", Some(&hub_secret)).unwrap(),
            hub_secret.credentials
        );
    }
}
