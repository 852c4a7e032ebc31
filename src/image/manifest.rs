//! The JSON documents of a pull: manifests, indexes (manifest lists) and image configs, with
//! the platform selection for this host. Docker schema 2 and OCI share one shape, so one set of
//! types reads all four manifest kinds.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:...`.
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: i64,
    /// Platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// A platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    /// `amd64`, `arm64`, ...
    #[serde(default)]
    pub architecture: String,
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// `v7`, `v8`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What a manifest request returned.
#[derive(Debug)]
pub enum Document {
    /// An image manifest (Docker v2 schema 2 or OCI).
    Manifest(Manifest),
    /// An index or manifest list.
    Index(Vec<Descriptor>),
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion", default)]
    schema_version: i64,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Reads a manifest document of any of the four kinds.
pub fn parse_document(bytes: &[u8]) -> Result<Document, String> {
    let p: Probe = serde_json::from_slice(bytes).map_err(|e| format!("malformed manifest: {e}"))?;
    if p.schema_version != 2 {
        return Err(format!(
            "unsupported manifest schema version {} (only schema 2 and OCI are supported)",
            p.schema_version
        ));
    }
    if let Some(m) = p.manifests {
        return Ok(Document::Index(m));
    }
    match (p.config, p.layers) {
        (Some(config), Some(layers)) => Ok(Document::Manifest(Manifest { config, layers })),
        _ => Err(format!(
            "manifest of media type {:?} has no config or layers",
            p.media_type
        )),
    }
}

/// This host's platform in OCI terms.
pub fn host_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        other => (other, None),
    };
    Platform {
        architecture: architecture.into(),
        os: std::env::consts::OS.into(),
        variant: variant.map(String::from),
    }
}

/// Picks the index entry for `want`: os and architecture must match; among those, a matching
/// variant is preferred, then an entry without a variant. arm64 treats a missing variant as v8.
pub fn select_platform<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    let norm = |p: &Platform| -> Option<String> {
        match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", None) => Some("v8".into()),
            (_, v) => v.map(String::from),
        }
    };
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
        })
        .collect();
    let want_variant = norm(want);
    candidates
        .iter()
        .find(|d| norm(d.platform.as_ref().unwrap()) == want_variant)
        .or_else(|| {
            candidates
                .iter()
                .find(|d| d.platform.as_ref().unwrap().variant.is_none())
        })
        .or_else(|| candidates.first())
        .copied()
}

/// The parts of an image config berth uses. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `amd64`, ...
    #[serde(default)]
    pub architecture: String,
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// The runtime defaults.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// The layer diff IDs.
    pub rootfs: RootFs,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub created: Option<String>,
}

/// The image's `rootfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Uncompressed layer digests, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The image's run defaults (`config` in the image config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunConfig {
    /// USER.
    #[serde(rename = "User", default)]
    pub user: String,
    /// ENV, `K=V`.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// ENTRYPOINT.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// CMD.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// WORKDIR.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: String,
    /// STOPSIGNAL.
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: String,
    /// VOLUME.
    #[serde(rename = "Volumes", default)]
    pub volumes: Option<HashMap<String, serde_json::Value>>,
    /// LABEL.
    #[serde(rename = "Labels", default)]
    pub labels: Option<HashMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: digest.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(String::from),
            }),
        }
    }

    #[test]
    fn selects_the_host_platform() {
        let e = vec![entry("arm64", Some("v8"), "a"), entry("amd64", None, "b")];
        let amd = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(select_platform(&e, &amd).unwrap().digest, "b");
        let arm = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(select_platform(&e, &arm).unwrap().digest, "a");
        let s390 = Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
            variant: None,
        };
        assert!(select_platform(&e, &s390).is_none());
    }

    #[test]
    fn documents_of_each_kind_parse() {
        let idx = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert!(matches!(parse_document(idx).unwrap(), Document::Index(_)));
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(parse_document(m).unwrap(), Document::Manifest(_)));
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_document(v1).unwrap_err().contains("schema version 1"));
    }
}
