//! The `[network]` section of berthd's configuration: owned here, read by `crate::config`.

use serde::{Deserialize, Serialize};

use super::cidr::Ipv4Cidr;

/// The `[network]` section: a bridge, a veth per pod, host-local IPAM, nftables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The bridge pods attach to; created when missing.
    pub bridge: String,
    /// The pod subnet; the bridge takes its first address as the pods' gateway.
    pub subnet: Ipv4Cidr,
    /// Masquerade traffic from pods that leaves the subnet.
    pub masquerade: bool,
    /// MTU of the bridge and the pods' interfaces (0 = kernel default).
    pub mtu: u32,
    /// The nftables table (family `ip`) that holds berth's rules.
    pub nft_table: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "berth0".into(),
            subnet: "10.88.0.0/16".parse().expect("valid built-in subnet"),
            masquerade: true,
            mtu: 0,
            nft_table: "berth".into(),
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
        if self.subnet.prefix_len() > 30 {
            return Err(format!(
                "network.subnet {} leaves no room for pods (prefix must be /30 or shorter)",
                self.subnet
            ));
        }
        Ok(())
    }
}
