//! The built-in pod network: a bridge, a veth pair per pod, host-local IPAM and nftables NAT.

pub mod cidr;

/// Whether `name` is acceptable to the kernel as an interface name.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}
