//! Which capabilities a container gets: the runtime default set, the request's adds and
//! drops (`ALL` included), never more than berthd itself holds (root here lacks
//! CAP_SYS_RESOURCE: asking for ALL must still start the container).

/// What runtimes grant a container by default (containerd's list).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Capability names by number (capability.h), for reading the daemon's own bounding set.
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities this daemon holds in its bounding set: a container never gets more.
pub fn own_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    CAP_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bnd & (1u64 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// This daemon's oom_score_adj: without CAP_SYS_RESOURCE a container cannot go below it.
pub fn own_oom_score_adj() -> i64 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What a container's security context asks for.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// Privileged: every capability berthd holds.
    pub privileged: bool,
    /// add_capabilities (`ALL` or names, with or without `CAP_`).
    pub add: &'a [String],
    /// drop_capabilities (likewise).
    pub drop: &'a [String],
    /// add_ambient_capabilities: added to every set, the ambient and inheritable ones too.
    pub ambient: &'a [String],
}

fn upper(c: &str) -> String {
    c.trim().trim_start_matches("CAP_").to_uppercase()
}

/// The ambient (and inheritable) set of the container's process (`CAP_` names), within
/// `allowed`; `ALL` names no capability here.
pub fn ambient(w: Wanted<'_>, allowed: &[&str]) -> Vec<String> {
    let mut caps: Vec<String> = Vec::new();
    for a in w.ambient.iter().map(|a| upper(a)) {
        if allowed.contains(&a.as_str()) && !caps.contains(&a) {
            caps.push(a);
        }
    }
    caps.into_iter().map(|c| format!("CAP_{c}")).collect()
}

/// The capabilities of the container's process (`CAP_` names), within `allowed`.
pub fn capabilities(w: Wanted<'_>, allowed: &[&str]) -> Vec<String> {
    let mut caps: Vec<String> = if w.privileged {
        allowed.iter().map(|c| c.to_string()).collect()
    } else {
        DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
    };
    if !w.privileged {
        for a in w.add {
            if upper(a) == "ALL" {
                caps = allowed.iter().map(|c| c.to_string()).collect();
            } else if !caps.contains(&upper(a)) {
                caps.push(upper(a));
            }
        }
        for d in w.drop {
            if upper(d) == "ALL" {
                caps.clear();
            } else {
                caps.retain(|c| *c != upper(d));
            }
        }
        // An explicit add after ALL was dropped still counts.
        if w.drop.iter().any(|d| upper(d) == "ALL") {
            for a in w.add {
                if upper(a) != "ALL" && !caps.contains(&upper(a)) {
                    caps.push(upper(a));
                }
            }
        }
    }
    for a in w.ambient {
        if !caps.contains(&upper(a)) {
            caps.push(upper(a));
        }
    }
    caps.retain(|c| allowed.contains(&c.as_str()));
    caps.into_iter().map(|c| format!("CAP_{c}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_add_drop_all_and_stay_within_the_daemons() {
        let allowed: Vec<&str> = CAP_NAMES
            .iter()
            .copied()
            .filter(|c| *c != "SYS_RESOURCE")
            .collect();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let caps = |add: &[&str], drop: &[&str]| {
            let (add, drop) = (names(add), names(drop));
            let w = Wanted {
                privileged: false,
                add: &add,
                drop: &drop,
                ambient: &[],
            };
            capabilities(w, &allowed)
        };
        assert_eq!(caps(&[], &[]).len(), DEFAULT_CAPS.len());
        let c = caps(&["SYS_ADMIN", "SYS_RESOURCE"], &["CHOWN"]);
        assert!(c.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(
            !c.contains(&"CAP_SYS_RESOURCE".to_string()),
            "the daemon does not hold it"
        );
        assert!(!c.contains(&"CAP_CHOWN".to_string()));
        assert_eq!(caps(&["NET_ADMIN"], &["ALL"]), ["CAP_NET_ADMIN"]);
        assert_eq!(caps(&["ALL"], &[]).len(), allowed.len());
        let amb = names(&["NET_ADMIN", "cap_sys_resource", "ALL"]);
        let w = Wanted {
            privileged: false,
            add: &[],
            drop: &names(&["ALL"]),
            ambient: &amb,
        };
        assert_eq!(capabilities(w, &allowed), ["CAP_NET_ADMIN"]);
        assert_eq!(ambient(w, &allowed), ["CAP_NET_ADMIN"]);
    }
}
