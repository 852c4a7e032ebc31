//! Which endpoints to try for a registry host, in order: its own mirrors, the `*` mirrors,
//! then the host itself (`http://` in a mirror, or `insecure` for the host, means plain HTTP).

use std::fmt;

use crate::config::{Config, RegistryConfig};

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
}
