//! The `[network]` section of berthd's configuration: owned here, read by `crate::config`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cidr::Subnets;

/// Who connects pods: berth's own bridge, or the cluster's CNI plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A bridge, a veth per pod, host-local IPAM, nftables (the keys below).
    #[default]
    Builtin,
    /// The first network configuration in `[network.cni] conf_dir`.
    Cni,
}

/// The `[network.cni]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Where the cluster's CNI DaemonSet writes its `.conflist` / `.conf` (watched).
    pub conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// What each pod was attached with (config and result); empty: `<root>/cni/cache`.
    pub cache_dir: Option<PathBuf>,
    /// How long one plugin call may take.
    pub plugin_timeout_seconds: u64,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            cache_dir: None,
            plugin_timeout_seconds: 60,
        }
    }
}

/// The `[network]` section: a bridge, a veth per pod, host-local IPAM, nftables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// `builtin` (default) or `cni`.
    pub mode: NetworkMode,
    /// The bridge pods attach to; created when missing.
    pub bridge: String,
    /// The pod subnet (IPv4), or the IPv4 and IPv6 pair of a dual-stack node; the bridge takes
    /// the first address of each as the pods' gateway.
    pub subnet: Subnets,
    /// Masquerade traffic from pods that leaves the subnet.
    pub masquerade: bool,
    /// MTU of the bridge and the pods' interfaces (0 = kernel default).
    pub mtu: u32,
    /// The nftables table (family `ip`) that holds berth's rules.
    pub nft_table: String,
    /// CNI mode's settings.
    pub cni: CniConfig,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "berth0".into(),
            subnet: Subnets {
                v4: "10.88.0.0/16".parse().expect("valid built-in subnet"),
                v6: None,
            },
            masquerade: true,
            mtu: 0,
            nft_table: "berth".into(),
            mode: NetworkMode::Builtin,
            cni: CniConfig::default(),
        }
    }
}

impl NetworkConfig {
    /// Checks what the types alone cannot; the message names the key.
    pub fn check(&self) -> Result<(), String> {
        if !super::is_valid_ifname(&self.bridge) {
            return Err(format!(
                "network.bridge {:?} is not a valid interface name (1-15 characters, no '/', ':' or whitespace)",
                self.bridge
            ));
        }
        for (key, p) in std::iter::once(("network.cni.conf_dir", &self.cni.conf_dir))
            .chain(
                self.cni
                    .bin_dirs
                    .iter()
                    .map(|d| ("network.cni.bin_dirs", d)),
            )
            .chain(
                self.cni
                    .cache_dir
                    .iter()
                    .map(|d| ("network.cni.cache_dir", d)),
            )
        {
            if !p.is_absolute() {
                return Err(format!("{key}: {} must be an absolute path", p.display()));
            }
        }
        if self.cni.plugin_timeout_seconds == 0 {
            return Err("network.cni.plugin_timeout_seconds must be at least 1".into());
        }
        if self.subnet.v4.prefix_len() > 30 {
            return Err(format!(
                "network.subnet {} leaves no room for pods (prefix must be /30 or shorter)",
                self.subnet.v4
            ));
        }
        if let Some(v6) = self.subnet.v6
            && v6.prefix_len() > 125
        {
            return Err(format!(
                "network.subnet {v6} leaves no room for pods (prefix must be /125 or shorter)"
            ));
        }
        Ok(())
    }
}
