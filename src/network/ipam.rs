//! Host-local IP address management: one file per address handed out, `state/ipam/<ip>`,
//! holding the owner's pod id. Creating the file with O_EXCL is the allocation, so no address is
//! handed out twice, whatever runs concurrently, and allocations survive berthd restarts. A
//! cursor makes allocation round-robin, so a released address is not reused at once.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::cidr::{Ipv4Cidr, Ipv6Cidr};

/// Errors of address management.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every address of the subnet is in use.
    #[error("no free address in {0}: every pod address is in use")]
    Exhausted(String),
    /// The allocation directory failed.
    #[error("address allocation in {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The allocator.
pub struct Ipam {
    dir: PathBuf,
    cursor: AtomicU32,
    /// The last IPv6 host number handed out (a dual-stack node's).
    cursor6: AtomicU32,
}

impl Ipam {
    /// Opens (creating) the allocation directory.
    pub fn open(dir: &Path) -> Result<Ipam, IpamError> {
        std::fs::create_dir_all(dir).map_err(|source| IpamError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let cursor = std::fs::read_to_string(dir.join(".cursor"))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .unwrap_or(0);
        let cursor6 = std::fs::read_to_string(dir.join(".cursor6"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(Ipam {
            dir: dir.to_owned(),
            cursor: AtomicU32::new(cursor),
            cursor6: AtomicU32::new(cursor6),
        })
    }

    /// Hands out a free address of the IPv6 subnet to `owner` (host numbers from 2 on).
    pub fn allocate6(&self, subnet: &Ipv6Cidr, owner: &str) -> Result<Ipv6Addr, IpamError> {
        let size = subnet.pod_count();
        if size == 0 {
            return Err(IpamError::Exhausted(subnet.to_string()));
        }
        let after = u64::from(self.cursor6.load(Ordering::Relaxed));
        for i in 0..size {
            let n = (after + 1 + i) % size;
            let ip = subnet.host(2 + u128::from(n));
            if self.claim(IpAddr::V6(ip), owner)? {
                self.cursor6.store(n as u32, Ordering::Relaxed);
                let _ = crate::store::write_atomic_volatile(
                    &self.dir.join(".cursor6"),
                    n.to_string().as_bytes(),
                );
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(subnet.to_string()))
    }

    /// Takes `ip` for `owner` if nobody holds it (creating its file is the allocation).
    fn claim(&self, ip: IpAddr, owner: &str) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(owner.as_bytes())
                    .map_err(|source| IpamError::Io { path, source })?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(IpamError::Io { path, source }),
        }
    }

    /// Hands out a free address of `subnet` to `owner`.
    pub fn allocate(&self, subnet: &Ipv4Cidr, owner: &str) -> Result<Ipv4Addr, IpamError> {
        let range = subnet.pod_range();
        let (start, end) = (*range.start(), *range.end());
        if start > end {
            return Err(IpamError::Exhausted(subnet.to_string()));
        }
        let size = end - start + 1;
        let after = self.cursor.load(Ordering::Relaxed);
        let first = if (start..=end).contains(&after) {
            after - start + 1
        } else {
            0
        };
        for i in 0..size {
            let ip = Ipv4Addr::from(start + (first + i) % size);
            if self.claim(IpAddr::V4(ip), owner)? {
                self.cursor.store(u32::from(ip), Ordering::Relaxed);
                // The cursor is a hint; losing it only makes reuse less round-robin.
                let _ = crate::store::write_atomic_volatile(
                    &self.dir.join(".cursor"),
                    ip.to_string().as_bytes(),
                );
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(subnet.to_string()))
    }

    /// Releases `ip` if `owner` holds it.
    pub fn release(&self, ip: IpAddr, owner: &str) {
        let path = self.dir.join(ip.to_string());
        if std::fs::read_to_string(&path).is_ok_and(|o| o == owner) {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Every allocation: (address, owner).
    pub fn allocations(&self) -> Vec<(IpAddr, String)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let ip: IpAddr = e.file_name().to_str()?.parse().ok()?;
                let owner = std::fs::read_to_string(e.path()).ok()?;
                Some((ip, owner))
            })
            .collect()
    }

    /// Releases every address held by `owner`.
    pub fn release_owner(&self, owner: &str) {
        for (ip, o) in self.allocations() {
            if o == owner {
                self.release(ip, owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_addresses_until_exhausted_then_reuses_released_ones() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path()).unwrap();
        let net: Ipv4Cidr = "10.0.0.0/29".parse().unwrap();
        let mut got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.allocate(&net, &format!("p{i}")).unwrap())
            .collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 5);
        assert!(matches!(
            ipam.allocate(&net, "p5"),
            Err(IpamError::Exhausted(_))
        ));
        ipam.release(got[2].into(), "someone-else");
        assert!(
            ipam.allocate(&net, "p5").is_err(),
            "only the owner releases"
        );
        ipam.release(got[2].into(), "p2");
        assert_eq!(ipam.allocate(&net, "p5").unwrap(), got[2]);
        // Allocations survive reopening.
        let again = Ipam::open(d.path()).unwrap();
        assert_eq!(again.allocations().len(), 5);
    }

    #[test]
    fn ipv6_addresses_beside_ipv4_ones() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path()).unwrap();
        let net: Ipv6Cidr = "fd00:1::/125".parse().unwrap();
        let got: Vec<Ipv6Addr> = (0..5)
            .map(|i| ipam.allocate6(&net, &format!("p{i}")).unwrap())
            .collect();
        assert!(
            got.iter()
                .all(|ip| net.contains(*ip) && *ip != net.gateway())
        );
        assert!(ipam.allocate6(&net, "p5").is_err());
        ipam.release_owner("p3");
        assert_eq!(ipam.allocate6(&net, "p5").unwrap(), got[3]);
        assert_eq!(ipam.allocations().len(), 5);
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let ipam = std::sync::Arc::new(Ipam::open(d.path()).unwrap());
        let net: Ipv4Cidr = "10.1.0.0/24".parse().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| ipam.allocate(&net, &format!("t{t}-{i}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200);
    }
}
