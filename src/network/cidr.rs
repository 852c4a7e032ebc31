//! Subnets as the configuration and IPAM use them: IPv4, IPv6, and the pair a dual-stack
//! node serves (`subnet = ["10.88.0.0/16", "fd00:88::/64"]`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
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

/// An IPv6 network in CIDR notation; the address is stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    network: Ipv6Addr,
    prefix_len: u8,
}

impl Ipv6Cidr {
    /// A network from an address (host bits are cleared) and a prefix length.
    pub fn new(addr: Ipv6Addr, prefix_len: u8) -> Result<Self, CidrError> {
        if prefix_len > 128 {
            return Err(CidrError(format!("{addr}/{prefix_len}")));
        }
        Ok(Ipv6Cidr {
            network: Ipv6Addr::from(u128::from(addr) & Self::mask_of(prefix_len)),
            prefix_len,
        })
    }

    fn mask_of(prefix_len: u8) -> u128 {
        if prefix_len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(prefix_len))
        }
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The first address after the network's, which the bridge takes as the pods' gateway.
    pub fn gateway(&self) -> Ipv6Addr {
        self.host(1)
    }

    /// The `n`th address of the network.
    pub fn host(&self, n: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + n)
    }

    /// How many addresses pods may get (from host 2 on): all of the network's but its first
    /// two and its last, at most 2^32.
    pub fn pod_count(&self) -> u64 {
        let bits = 128 - u32::from(self.prefix_len);
        if bits >= 33 {
            1 << 32
        } else {
            (1u64 << bits).saturating_sub(3)
        }
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & Self::mask_of(self.prefix_len) == u128::from(self.network)
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(err)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        Ipv6Cidr::new(addr, len).map_err(|_| err())
    }
}

/// The pod subnets of the built-in network: one IPv4, and for a dual-stack node one IPv6.
/// Written as one string, or a list of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnets {
    /// The IPv4 subnet.
    pub v4: Ipv4Cidr,
    /// The IPv6 subnet, on a dual-stack node.
    pub v6: Option<Ipv6Cidr>,
}

impl Subnets {
    /// Parses `a.b.c.d/n` and, optionally, one IPv6 CIDR, in any order.
    pub fn parse(parts: &[String]) -> Result<Subnets, String> {
        let (mut v4, mut v6) = (None, None);
        for p in parts {
            if p.contains(':') {
                let c: Ipv6Cidr = p.parse().map_err(|e: CidrError| e.to_string())?;
                if v6.replace(c).is_some() {
                    return Err("more than one IPv6 subnet".into());
                }
            } else {
                let c: Ipv4Cidr = p.parse().map_err(|e: CidrError| e.to_string())?;
                if v4.replace(c).is_some() {
                    return Err("more than one IPv4 subnet".into());
                }
            }
        }
        Ok(Subnets {
            v4: v4.ok_or("an IPv4 subnet is needed (and at most one IPv6 beside it)")?,
            v6,
        })
    }
}

impl Serialize for Subnets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.v6 {
            None => s.collect_str(&self.v4),
            Some(v6) => {
                use serde::ser::SerializeSeq;
                let mut seq = s.serialize_seq(Some(2))?;
                seq.serialize_element(&self.v4.to_string())?;
                seq.serialize_element(&v6.to_string())?;
                seq.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Subnets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let parts = match Form::deserialize(d)? {
            Form::One(s) => vec![s],
            Form::Many(v) => v,
        };
        Subnets::parse(&parts).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_subnets_and_the_dual_stack_pair() {
        let c: Ipv6Cidr = "fd00:88::7/64".parse().unwrap();
        assert_eq!(c.to_string(), "fd00:88::/64");
        assert_eq!(c.gateway(), "fd00:88::1".parse::<Ipv6Addr>().unwrap());
        assert!(c.contains("fd00:88::ffff".parse().unwrap()));
        assert!(!c.contains("fd00:89::1".parse().unwrap()));
        assert_eq!(c.pod_count(), 1 << 32);
        let small: Ipv6Cidr = "fd00::/125".parse().unwrap();
        assert_eq!(small.pod_count(), 5);
        let s = Subnets::parse(&["fd00:88::/64".into(), "10.88.0.0/16".into()]).unwrap();
        assert_eq!(s.v4.to_string(), "10.88.0.0/16");
        assert_eq!(s.v6, Some(c));
        assert!(Subnets::parse(&["fd00::/64".into()]).is_err());
        assert!(Subnets::parse(&["10.0.0.0/8".into(), "10.1.0.0/16".into()]).is_err());
    }

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
