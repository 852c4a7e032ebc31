//! Pod sysctls: a name is normalised before it is judged, only the namespaced families are
//! allowed, and the value is written beneath /proc/sys by a descriptor walk that follows no
//! symlink, from inside the pod's namespaces. `net/../kernel/core_pattern` is neither `net.*`
//! nor anything else: it is refused.

use std::io::Write;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The namespace a sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The network namespace (`net.*`).
    Net,
    /// The IPC namespace (`kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`).
    Ipc,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Owner::Net => "network",
            Owner::Ipc => "IPC",
        })
    }
}

/// A sysctl name that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    /// Its path below /proc/sys (segments joined by '/').
    pub path: String,
    /// The namespace it belongs to.
    pub owner: Owner,
}

/// Why a sysctl name is refused; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlError {
    /// Not a well-formed name.
    #[error("sysctl {name:?} is not a valid name: {why}")]
    Malformed {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Well-formed, but it belongs to no namespace a pod has: it would change the node.
    #[error("sysctl {0} is not namespaced and cannot be set for a pod")]
    NotNamespaced(String),
}

/// Splits a name into its segments. As kubelet reads them: when the first separator is '/',
/// segments are separated by '/' and a '.' is part of a segment (`net/ipv4/conf/eth0.100/x`);
/// otherwise '.' separates and a '/' stands for a '.' inside a segment.
fn segments(name: &str) -> Result<Vec<String>, SysctlError> {
    let bad = |why| SysctlError::Malformed {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name
        .chars()
        .any(|c| c == '\0' || c.is_whitespace() || c.is_control())
    {
        return Err(bad("it holds a NUL, whitespace or a control character"));
    }
    let slash_form = name
        .find(['.', '/'])
        .is_some_and(|i| name[i..].starts_with('/'));
    let parts: Vec<String> = if slash_form {
        name.split('/').map(str::to_string).collect()
    } else {
        name.split('.').map(|s| s.replace('/', ".")).collect()
    };
    if parts[0].is_empty() {
        return Err(bad("it starts with a separator"));
    }
    for p in &parts {
        if p.is_empty() {
            return Err(bad("it has an empty segment"));
        }
        if p == "." || p == ".." {
            return Err(bad("it has a '.' or '..' segment"));
        }
    }
    Ok(parts)
}

/// Checks a name and says which namespace it belongs to.
pub fn parse(name: &str) -> Result<Sysctl, SysctlError> {
    let segs = segments(name)?;
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let owner = match s.as_slice() {
        ["net", _, ..] => Some(Owner::Net),
        ["kernel", k] if k.starts_with("shm") || k.starts_with("msg") || *k == "sem" => {
            Some(Owner::Ipc)
        }
        ["fs", "mqueue", _] => Some(Owner::Ipc),
        _ => None,
    };
    let dotted = segs
        .iter()
        .map(|s| s.replace('.', "/"))
        .collect::<Vec<_>>()
        .join(".");
    match owner {
        Some(owner) => Ok(Sysctl {
            path: segs.join("/"),
            owner,
        }),
        None => Err(SysctlError::NotNamespaced(dotted)),
    }
}

/// Writes `value` to the sysctl at `path` (from `parse`) as the calling thread's namespaces
/// see it: opened beneath /proc/sys without following any symlink.
pub fn write(path: &str, value: &str) -> std::io::Result<()> {
    let root = rustix::fs::open(
        "/proc/sys",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &root,
        path,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    std::fs::File::from(fd).write_all(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str) -> (String, Owner) {
        let s = parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (s.path, s.owner)
    }

    #[test]
    fn namespaced_families_in_both_forms() {
        assert_eq!(
            ok("net.ipv4.ip_forward"),
            ("net/ipv4/ip_forward".into(), Owner::Net)
        );
        assert_eq!(
            ok("net/ipv4/conf/eth0.100/rp_filter"),
            ("net/ipv4/conf/eth0.100/rp_filter".into(), Owner::Net)
        );
        assert_eq!(
            ok("net.ipv4.conf.eth0/100.rp_filter"),
            ("net/ipv4/conf/eth0.100/rp_filter".into(), Owner::Net)
        );
        for k in [
            "kernel.shm_rmid_forced",
            "kernel.shmmax",
            "kernel.msgmax",
            "kernel.msg_next_id",
            "kernel.sem",
            "fs.mqueue.msg_max",
        ] {
            assert_eq!(ok(k).1, Owner::Ipc, "{k}");
        }
    }

    #[test]
    fn node_wide_sysctls_are_refused_in_any_spelling() {
        for k in [
            "net/../vm/stat_interval",
            "net/../kernel/core_pattern",
            "net.ipv4/../../vm.swappiness",
            "net/ipv4/../../kernel/core_pattern",
            "net/./../kernel/core_pattern",
        ] {
            assert!(
                matches!(parse(k), Err(SysctlError::Malformed { .. })),
                "{k}: {:?}",
                parse(k)
            );
        }
        for k in [
            "vm.stat_interval",
            "vm/stat_interval",
            "kernel.core_pattern",
            "kernel.sem_next_id",
            "kernel.domainname",
            "fs.mqueue",
            "net",
        ] {
            assert!(
                matches!(parse(k), Err(SysctlError::NotNamespaced(_))),
                "{k}: {:?}",
                parse(k)
            );
        }
        assert_eq!(
            parse("vm/stat_interval").unwrap_err().to_string(),
            "sysctl vm.stat_interval is not namespaced and cannot be set for a pod"
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for k in [
            "",
            "/net/ipv4/ip_forward",
            ".net.ipv4.ip_forward",
            "net..ipv4",
            "net.ipv4.",
            "net//ipv4",
            "net.ipv4.ip_forward\0",
            "net.ipv4 .ip_forward",
            "net.ipv4.ip_forward\n",
        ] {
            assert!(
                matches!(parse(k), Err(SysctlError::Malformed { .. })),
                "{k:?}: {:?}",
                parse(k)
            );
        }
    }
}
