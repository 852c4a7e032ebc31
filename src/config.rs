//! berthd's configuration: a TOML file whose sections later subsystems read, the built-in
//! defaults, and the command-line overrides. Parsing is strict: an unknown key or a wrong type is
//! an error naming the file, the line and the key, so a typo never silently becomes a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::network::NetworkConfig;

/// Where berthd looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";

/// Errors from reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for our schema.
    #[error("{path}:{line}:{column}: {key}{message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// "key `a.b`: " when the key is known, else empty.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// A value that parsed but makes no sense (e.g. an empty bridge name).
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or `<defaults>`).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The complete configuration of one berthd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent data: content store, snapshots, metadata.
    pub root: PathBuf,
    /// Runtime state that a reboot clears: sockets, pod dirs, bundles.
    pub state: PathBuf,
    /// The CRI socket.
    pub listen: PathBuf,
    /// A tracing level (`info`) or a full filter (`berth=debug,h2=warn`).
    pub log_level: String,
    /// Seconds that in-flight calls get to finish after SIGTERM before berthd exits anyway.
    pub shutdown_timeout_seconds: u64,
    /// A pod or container whose creating call's client gave up before the answer is kept this
    /// long for a retry of the call to claim, then removed.
    pub unclaimed_timeout_seconds: u64,
    /// The cgroup (cgroupfs path) under which pods without a cgroup parent from kubelet go;
    /// with the systemd driver a slice (the default `/berth` is then `berth.slice`).
    pub cgroup_parent: String,
    /// Who makes cgroups: berth (`cgroupfs`) or systemd over D-Bus (`systemd`). kubelet's
    /// `cgroupDriver` must be the same; it asks RuntimeConfig.
    pub cgroup_driver: crate::cgroup::Driver,
    /// Remount the cgroup2 hierarchy with `favordynmods` at start (see the default file).
    pub cgroup_favor_dynmods: bool,
    /// Per-registry-host settings; the key `*` applies to every host.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Image pulls and the image store.
    pub images: ImagesConfig,
    /// The built-in bridge network.
    pub network: NetworkConfig,
    /// Extra runtime handlers by name (the empty handler is always the embedded runtime).
    pub runtimes: BTreeMap<String, RuntimeHandlerConfig>,
    /// The exec/attach/port-forward streaming server.
    pub streaming: StreamingConfig,
    /// The metrics endpoint.
    pub metrics: MetricsConfig,
}

impl Config {
    /// The cgroup parent of pods kubelet gives none, for the configured driver.
    pub fn pod_cgroup_parent(&self) -> String {
        match self.cgroup_driver {
            crate::cgroup::Driver::Systemd if self.cgroup_parent == "/berth" => {
                "berth.slice".into()
            }
            _ => self.cgroup_parent.clone(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/berth"),
            state: PathBuf::from("/run/berth"),
            listen: PathBuf::from("/run/berth/berth.sock"),
            log_level: "info".into(),
            shutdown_timeout_seconds: 10,
            unclaimed_timeout_seconds: 300,
            cgroup_parent: "/berth".into(),
            cgroup_driver: crate::cgroup::Driver::Cgroupfs,
            cgroup_favor_dynmods: false,
            registries: BTreeMap::new(),
            images: ImagesConfig::default(),
            network: NetworkConfig::default(),
            runtimes: BTreeMap::new(),
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// Settings for one registry host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Endpoints tried in order before the host itself; `http://` means plain HTTP.
    pub mirrors: Vec<String>,
    /// Talk plain HTTP to the host itself (not only to `http://` mirrors).
    pub insecure: bool,
}

/// What one layer may unpack to unless configured: 64 GiB, 10 million entries (generous: a
/// layer near either is an attack, not an image).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;
/// See `DEFAULT_MAX_LAYER_BYTES`.
pub const DEFAULT_MAX_LAYER_INODES: u64 = 10_000_000;

/// Image pull settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// A Docker-style `config.json` with an `auths` map, used when the CRI sends no credentials.
    pub credentials_file: Option<PathBuf>,
    /// Layers of one pull downloaded at the same time.
    pub max_concurrent_downloads: usize,
    /// A pull that receives no bytes for this many seconds fails.
    pub pull_progress_timeout_seconds: u64,
    /// The most uncompressed bytes one layer may unpack to.
    pub max_layer_bytes: u64,
    /// The most files, directories and links one layer may hold.
    pub max_layer_inodes: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            credentials_file: None,
            max_concurrent_downloads: 3,
            pull_progress_timeout_seconds: 60,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_layer_inodes: DEFAULT_MAX_LAYER_INODES,
        }
    }
}

/// A named runtime handler (RuntimeClass).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandlerConfig {
    /// An OCI runtime binary (e.g. `/usr/bin/runc`); absent = the embedded runtime.
    pub path: Option<PathBuf>,
    /// Run a runc that lacks the November 2025 container-breakout fixes (CVE-2025-31133,
    /// CVE-2025-52565, CVE-2025-52881: older than 1.2.8, 1.3.0–1.3.2, 1.4.0 before rc.3) or
    /// whose version berthd cannot read, with a warning, instead of refusing to start. For a
    /// build that has the fixes under an older version number (a distribution's backport).
    pub allow_vulnerable: bool,
}

/// The streaming server (exec, attach, port-forward).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// Address the streaming server listens on.
    pub address: String,
    /// Port (0 = any free port).
    pub port: u16,
    /// A session with no frame either way for this long is closed.
    pub idle_timeout_seconds: u64,
    /// A port-forward request whose second stream does not come within this is refused.
    pub stream_creation_timeout_seconds: u64,
    /// Serve HTTPS instead of plain HTTP.
    pub tls: bool,
    /// PEM certificate chain for TLS; empty with `tls` = a self-signed one made at start.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1".into(),
            port: 0,
            // kubelet's defaults (streamingConnectionIdleTimeout, its stream creation timeout).
            idle_timeout_seconds: 4 * 3600,
            stream_creation_timeout_seconds: 30,
            tls: false,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The metrics endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ip:port` to serve berthd's Prometheus metrics on (GET /metrics); empty = off.
    pub address: String,
}

impl Config {
    /// Parses a configuration from TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(e, text, path))?;
        config.check(path)?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks what the types alone cannot.
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })
        };
        if let Err(message) = self.network.check() {
            return invalid(message);
        }
        for (host, reg) in &self.registries {
            for m in &reg.mirrors {
                if !(m.starts_with("http://") || m.starts_with("https://")) && m.contains("://") {
                    return invalid(format!(
                        "registries.\"{host}\".mirrors: {m:?} must be host[:port], http://host[:port] or https://host[:port]"
                    ));
                }
            }
        }
        for (name, h) in &self.runtimes {
            if name.is_empty() {
                return invalid(
                    "runtimes: the empty handler name is the embedded runtime and cannot be redefined"
                        .into(),
                );
            }
            if h.path.as_ref().is_none_or(|p| !p.is_absolute()) {
                return invalid(format!(
                    "runtimes.{name}.path must be the absolute path of an OCI runtime binary (e.g. /usr/sbin/runc)"
                ));
            }
        }
        match self.cgroup_driver {
            crate::cgroup::Driver::Cgroupfs => {
                if crate::cgroup::relative(&self.cgroup_parent).is_err() {
                    return invalid(format!(
                        "cgroup_parent {:?} must be a cgroup path without '..'",
                        self.cgroup_parent
                    ));
                }
            }
            crate::cgroup::Driver::Systemd => {
                if let Err(e) = crate::systemd::expand_slice(&self.pod_cgroup_parent()) {
                    return invalid(format!(
                        "cgroup_parent with cgroup_driver = \"systemd\" must be a slice \
                         (e.g. berth.slice): {e}"
                    ));
                }
            }
        }
        if !self.metrics.address.is_empty()
            && self
                .metrics
                .address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(format!(
                "metrics.address {:?} must be ip:port (for example 127.0.0.1:9470), or empty for none",
                self.metrics.address
            ));
        }
        if self.streaming.idle_timeout_seconds == 0
            || self.streaming.stream_creation_timeout_seconds == 0
        {
            return invalid(
                "streaming.idle_timeout_seconds and stream_creation_timeout_seconds must be at least 1"
                    .into(),
            );
        }
        let s = &self.streaming;
        match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return invalid(
                    "streaming.tls_cert_file and streaming.tls_key_file go together".into(),
                );
            }
            (Some(_), Some(_)) if !s.tls => {
                return invalid(
                    "streaming.tls_cert_file is set but streaming.tls is false: set tls = true to serve HTTPS"
                        .into(),
                );
            }
            _ => {}
        }
        for p in [&s.tls_cert_file, &s.tls_key_file].into_iter().flatten() {
            if !p.is_absolute() {
                return invalid(format!("{} must be an absolute path", p.display()));
            }
        }
        if self.images.max_layer_bytes == 0 || self.images.max_layer_inodes == 0 {
            return invalid(
                "images.max_layer_bytes and images.max_layer_inodes must be at least 1".into(),
            );
        }
        if self.images.max_concurrent_downloads == 0 {
            return invalid("images.max_concurrent_downloads must be at least 1".into());
        }
        for p in [&self.root, &self.state, &self.listen] {
            if !p.is_absolute() {
                return invalid(format!("{} must be an absolute path", p.display()));
            }
        }
        Ok(())
    }
}

/// Turns a toml error into file:line:column plus the key it concerns.
fn parse_error(e: toml::de::Error, text: &str, path: &Path) -> ConfigError {
    let (line, column, key) = match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            (line, column, key_at(text, line))
        }
        None => (1, 1, None),
    };
    ConfigError::Parse {
        path: path.to_owned(),
        line,
        column,
        key: key.map(|k| format!("key `{k}`: ")).unwrap_or_default(),
        message: e.message().to_string(),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The dotted key defined on a line (`network.subnet`), from the nearest table header above it
/// and the `key =` on the line itself. A best effort for messages only.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line - 1)?.trim();
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('[') && !this.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if this.starts_with('[') {
        return Some(
            this.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let key = this.split('=').next()?.trim();
    if key.is_empty() {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

/// The complete default configuration as commented TOML (what `berthd config default` prints).
/// A unit test checks that it parses back to `Config::default()`.
pub const DEFAULT_TOML: &str = r#"# berthd configuration. Every key is shown with its built-in default.
# Command-line flags (--root, --state, --listen, --log-level) override this file.

# Persistent data: content store, unpacked layers, metadata.
root = "/var/lib/berth"
# Runtime state cleared by a reboot: the socket, pod and container state, bundles.
state = "/run/berth"
# The CRI socket kubelet and crictl connect to (mode 0660, owned by root).
listen = "/run/berth/berth.sock"
# A level (error, warn, info, debug, trace) or a filter such as "berth=debug,h2=warn".
log_level = "info"
# After SIGTERM/SIGINT, in-flight calls get this long to finish.
shutdown_timeout_seconds = 10
# A pod or container whose RunPodSandbox/CreateContainer caller gave up (a client deadline)
# is still made; it waits this long for a retry of the same call to claim it, then goes.
unclaimed_timeout_seconds = 300
# Pods whose RunPodSandbox names no cgroup parent get one under this cgroup (cgroupfs path;
# with the systemd driver a slice, and the default /berth is then berth.slice).
cgroup_parent = "/berth"
# Who makes the pods' and containers' cgroups: "cgroupfs" (berth, as directories; kubelet's
# cgroup parents are paths) or "systemd" (transient slices and scopes made over D-Bus; kubelet's
# parents are slice names, and systemd must be running). kubelet must use the same driver: it
# takes it from berth's RuntimeConfig.
cgroup_driver = "cgroupfs"
# Moving a process into a cgroup waits for an RCU grace period (milliseconds) unless the
# cgroup2 hierarchy is mounted with `favordynmods`; every container creation moves one. true
# makes berthd remount it so at start: a host-wide kernel setting (forks and exits get slightly
# dearer), so it is off unless you ask for it.
cgroup_favor_dynmods = false

# Registry hosts. The key is a host ("registry.k8s.io", "docker.io", "127.0.0.1:5000"), or "*"
# for every host. Mirrors are tried in order before the host itself; an http:// mirror is
# spoken to in plain HTTP. `insecure = true` makes the host itself plain HTTP too.
#
# [registries."registry.k8s.io"]
# mirrors = ["http://127.0.0.1:5000"]
# insecure = false

[images]
# A Docker-style credentials file ({"auths": {"host": {"auth": "base64(user:pass)"}}}),
# used for hosts the CRI request carries no credentials for.
# credentials_file = "/etc/berth/auth.json"
# Layers of one pull downloaded in parallel.
max_concurrent_downloads = 3
# A pull that receives no bytes for this many seconds fails (a slow pull that moves goes on).
pull_progress_timeout_seconds = 60
# What one layer may unpack to: uncompressed bytes (64 GiB) and entries (10 million). A layer
# past either fails its pull naming the limit; what it had written is removed.
max_layer_bytes = 68719476736
max_layer_inodes = 10000000

[network]
# The bridge pods are attached to; created when missing. Its address is the subnet's first.
bridge = "berth0"
# Pod addresses come from here (UpdateRuntimeConfig's pod CIDR replaces it for new pods). A
# dual-stack node lists an IPv4 and an IPv6 subnet: subnet = ["10.88.0.0/16", "fd00:88::/64"].
subnet = "10.88.0.0/16"
# Masquerade pod traffic that leaves the subnet.
masquerade = true
# MTU of the bridge and pod interfaces; 0 keeps the kernel's default.
mtu = 0
# The nftables table (family ip) holding berth's NAT rules.
nft_table = "berth"
# "builtin": the bridge above. "cni": the cluster's CNI plugin, from the first network
# configuration in network.cni.conf_dir (lexical order); NetworkReady stays false until one
# appears there, and the keys above are not used.
mode = "builtin"

[network.cni]
conf_dir = "/etc/cni/net.d"
bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
# What each pod was attached with, for its DEL even after the configuration changed;
# default: <root>/cni/cache (it must outlive a reboot, as host-local's leases do).
# cache_dir = "/var/lib/berth/cni/cache"
plugin_timeout_seconds = 60

# Runtime handlers (RuntimeClass) besides the default "" handler, which is the embedded runtime:
# an OCI runtime binary the pod's monitor drives with create/start/delete (runc). berthd checks
# each at start (`--version`, and `features` for what Status claims) and refuses to start
# without it. A runc older than the November 2025 fixes (CVE-2025-31133, CVE-2025-52565,
# CVE-2025-52881: it needs 1.2.8+, 1.3.3+ or 1.4.0-rc.3+; Debian 12's 1.1.5 lacks them), or one
# whose version cannot be read, is refused too, unless its section says allow_vulnerable = true
# (berthd then warns at each start): for a build with the fixes backported, or a test machine.
#
# [runtimes.runc]
# path = "/usr/bin/runc"
# allow_vulnerable = false

[streaming]
# The exec/attach/port-forward server; port 0 picks a free port.
address = "127.0.0.1"
port = 0
# A session with no traffic either way for this long is closed.
idle_timeout_seconds = 14400
# A port-forward request whose data or error stream does not follow within this is refused.
stream_creation_timeout_seconds = 30
# HTTPS instead of HTTP. With a certificate and key (PEM files) the server presents them; without,
# a self-signed certificate for the address is made at each start (crictl accepts it; kubelet
# verifies the certificate, so give it one signed by a CA the node trusts).
tls = false
# tls_cert_file = "/etc/berth/streaming.crt"
# tls_key_file = "/etc/berth/streaming.key"

[metrics]
# ip:port of berthd's own Prometheus metrics (GET /metrics); empty turns them off.
address = ""
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/berth/config.toml"))
    }

    #[test]
    fn default_toml_parses_to_the_built_in_defaults() {
        assert_eq!(parse(DEFAULT_TOML).unwrap(), Config::default());
    }

    #[test]
    fn a_dual_stack_subnet_is_a_list_of_one_ipv4_and_one_ipv6() {
        let c = parse("[network]\nsubnet = [\"10.9.0.0/16\", \"fd00:9::/64\"]\n").unwrap();
        assert_eq!(c.network.subnet.v4.to_string(), "10.9.0.0/16");
        assert_eq!(c.network.subnet.v6.unwrap().to_string(), "fd00:9::/64");
        for bad in [
            "[\"fd00:9::/64\"]",
            "[\"10.1.0.0/16\", \"10.2.0.0/16\"]",
            "[\"10.1.0.0/16\", \"fd00::/127\"]",
        ] {
            let e = parse(&format!("[network]\nsubnet = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("network.subnet") || e.contains("subnet"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn streaming_tls_files_come_in_pairs_and_only_with_tls() {
        let e = parse("[streaming]\ntls = true\ntls_cert_file = \"/etc/c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
        let e =
            parse("[streaming]\ntls_cert_file = \"/etc/c.pem\"\ntls_key_file = \"/etc/k.pem\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("tls is false"), "{e}");
        let e =
            parse("[streaming]\ntls = true\ntls_cert_file = \"c.pem\"\ntls_key_file = \"/k\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("absolute"), "{e}");
        assert!(parse("[streaming]\ntls = true\n").unwrap().streaming.tls);
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn registry_mirrors_and_network_keys_are_read() {
        let c = parse(
            "[registries.\"registry.k8s.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\n\
             [network]\nbridge = \"br-test\"\nsubnet = \"10.200.0.0/24\"\n",
        )
        .unwrap();
        assert_eq!(
            c.registries["registry.k8s.io"].mirrors,
            vec!["http://127.0.0.1:5000".to_string()]
        );
        assert_eq!(c.network.bridge, "br-test");
        assert_eq!(c.network.subnet.v4.to_string(), "10.200.0.0/24");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[network]\nbridge = \"b\"\nbrigde = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/berth/config.toml:3:"), "{err}");
        assert!(err.contains("network.brigde"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let err = parse("root = \"/x\"\n\n[images]\nmax_concurrent_downloads = \"three\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/berth/config.toml:4:"), "{err}");
        assert!(err.contains("images.max_concurrent_downloads"), "{err}");
    }

    #[test]
    fn bad_subnet_is_rejected_with_its_line() {
        let err = parse("[network]\nsubnet = \"10.0.0.0/33\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2:"), "{err}");
        assert!(err.contains("network.subnet"), "{err}");
    }

    #[test]
    fn invalid_bridge_name_is_rejected() {
        let err = parse("[network]\nbridge = \"a-very-long-bridge-name\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.bridge"), "{err}");
    }

    #[test]
    fn relative_paths_are_rejected() {
        assert!(parse("root = \"var/lib\"\n").is_err());
    }
}
