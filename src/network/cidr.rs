//! IPv4 subnets as the configuration and IPAM use them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network in CIDR notation; the address is stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// A string that is not `a.b.c.d/len`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 CIDR {0:?}: expected a.b.c.d/len with len 0-32")]
pub struct CidrError(pub String);

impl Ipv4Cidr {
    /// A network from an address (host bits are cleared) and a prefix length.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, CidrError> {
        if prefix_len > 32 {
            return Err(CidrError(format!("{addr}/{prefix_len}")));
        }
        let mask = Self::mask_of(prefix_len);
        Ok(Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }

    fn mask_of(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The broadcast address (last of the range).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_of(self.prefix_len))
    }

    /// The first usable address, which the bridge takes as the pods' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask_of(self.prefix_len) == u32::from(self.network)
    }

    /// The addresses pods may get: all but network, gateway and broadcast.
    pub fn pod_range(&self) -> std::ops::RangeInclusive<u32> {
        (u32::from(self.network) + 2)..=(u32::from(self.broadcast()) - 1)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        Ipv4Cidr::new(addr, len).map_err(|_| err())
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_clears_host_bits() {
        let c: Ipv4Cidr = "10.88.3.7/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.88.0.0/16");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert!(c.contains(Ipv4Addr::new(10, 88, 200, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 1)));
    }

    #[test]
    fn pod_range_excludes_network_gateway_and_broadcast() {
        let c: Ipv4Cidr = "192.168.5.0/29".parse().unwrap();
        let r = c.pod_range();
        assert_eq!(Ipv4Addr::from(*r.start()), Ipv4Addr::new(192, 168, 5, 2));
        assert_eq!(Ipv4Addr::from(*r.end()), Ipv4Addr::new(192, 168, 5, 6));
    }

    #[test]
    fn rejects_garbage() {
        for s in ["10.0.0.0", "10.0.0.0/33", "x/8", "10.0.0/8", ""] {
            assert!(s.parse::<Ipv4Cidr>().is_err(), "{s}");
        }
    }
}
