//! The files a pod's containers see as /etc/hostname, /etc/hosts and /etc/resolv.conf, and the
//! pod's own /dev/shm.

use std::net::Ipv4Addr;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::DnsConfig;

/// Size of a pod's /dev/shm, as other runtimes give it.
const SHM_SIZE: &str = "size=65536k";

/// /etc/hosts: localhost, and the pod's address under its hostname.
pub fn hosts(hostname: &str, ip: Option<Ipv4Addr>) -> String {
    let mut s = String::from(
        "# managed by berth\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = ip {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    s
}

/// /etc/resolv.conf from the pod's DNS config, or the node's own when it has none.
pub fn resolv_conf(dns: Option<&DnsConfig>) -> std::io::Result<String> {
    match dns {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            let mut s = String::new();
            if !d.searches.is_empty() {
                s.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for n in &d.servers {
                s.push_str(&format!("nameserver {n}\n"));
            }
            if !d.options.is_empty() {
                s.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            Ok(s)
        }
        _ => match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        },
    }
}

/// Writes the three files into the pod directory.
pub fn write_all(
    dir: &Path,
    hostname: &str,
    ip: Option<Ipv4Addr>,
    dns: Option<&DnsConfig>,
) -> std::io::Result<()> {
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(dir.join("hosts"), hosts(hostname, ip))?;
    std::fs::write(dir.join("resolv.conf"), resolv_conf(dns)?)?;
    Ok(())
}

/// Mounts the pod's own /dev/shm (a tmpfs) at `dir`.
pub fn mount_shm(dir: &Path) -> nix::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    mount(
        Some("shm"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,{SHM_SIZE}").as_str()),
    )
}

/// Unmounts the pod's /dev/shm; not mounted is fine.
pub fn unmount_shm(dir: &Path) {
    let _ = umount2(dir, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let d = DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d)).unwrap(),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_names_the_pod() {
        let h = hosts("web-0", Some(Ipv4Addr::new(10, 88, 0, 7)));
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.88.0.7\tweb-0\n"));
    }
}
