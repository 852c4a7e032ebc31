//! What a container sees at /sys/fs/cgroup on a v1 (or hybrid) host: a small tmpfs with each
//! v1 hierarchy's directory of the container bound in, as runc shows it. berth spells these out
//! as plain mounts instead of handing the runtime a `cgroup` mount: libcontainer's own v1 code
//! looks its process up by a PID of the pod's namespace in the node's /proc, which fails (or
//! finds a stranger) whenever the container joins a pod's shared PID namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cgroup::Cgroups;

/// Where the hierarchies appear in a container.
const ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers the OCI runtime puts a container's processes in (libcgroups' list);
/// in any other hierarchy they stay in the monitor's cgroup.
const MANAGED: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "pids",
    "perf_event",
    "memory",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// One directory of the view: `/sys/fs/cgroup/<name>` shows `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewMount {
    /// The directory's name under /sys/fs/cgroup (`memory`, `cpu,cpuacct`, `systemd`).
    pub name: String,
    /// The host directory shown there.
    pub source: PathBuf,
}

/// The view of a container whose cgroup is `container` (relative to each hierarchy's root),
/// forked by a monitor whose `/proc/<pid>/cgroup` text is `monitor_cgroups`. A comounted
/// hierarchy (`cpu,cpuacct`) also appears under each controller's name, as the host's
/// symlinks show it. Hierarchies mounted elsewhere than directly under /sys/fs/cgroup, and
/// cgroup2, are not part of a v1 view.
pub fn v1_view(cgroups: &Cgroups, container: &Path, monitor_cgroups: &str) -> Vec<ViewMount> {
    let monitor: HashMap<&str, &str> = monitor_cgroups
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let _id = f.next()?;
            Some((f.next()?, f.next()?))
        })
        .collect();
    let mut out = Vec::new();
    for h in cgroups.hierarchies.iter().filter(|h| !h.v2) {
        if h.mount.parent() != Some(Path::new(ROOT)) {
            continue;
        }
        let Some(name) = h.mount.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let source = if h.controllers.iter().all(|c| MANAGED.contains(&c.as_str())) {
            h.mount.join(container)
        } else {
            match monitor.get(h.controllers.join(",").as_str()) {
                Some(p) => h.mount.join(p.trim_start_matches('/')),
                None => continue,
            }
        };
        out.push(ViewMount {
            name: name.to_string(),
            source: source.clone(),
        });
        if name.contains(',') {
            for alias in name.split(',') {
                out.push(ViewMount {
                    name: alias.to_string(),
                    source: source.clone(),
                });
            }
        }
    }
    out
}

/// The OCI mounts of the view: the tmpfs (with exactly as many inodes as its directories
/// need, so nothing else can be made in it), then the binds, read-only unless `writable`.
pub fn mounts(view: &[ViewMount], writable: bool) -> Vec<serde_json::Value> {
    let inodes = view.len() + 1;
    let mut out = vec![serde_json::json!({
        "destination": ROOT,
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", "noexec", "mode=755", "size=4k",
                    format!("nr_inodes={inodes}")],
    })];
    for v in view {
        let mut options = vec!["rbind", "nosuid", "nodev", "noexec"];
        if !writable {
            options.push("ro");
        }
        out.push(serde_json::json!({
            "destination": format!("{ROOT}/{}", v.name),
            "type": "bind",
            "source": v.source,
            "options": options,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Hierarchy, Mode};

    fn h(mount: &str, controllers: &[&str], v2: bool) -> Hierarchy {
        Hierarchy {
            mount: mount.into(),
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            v2,
        }
    }

    #[test]
    fn each_v1_hierarchy_shows_the_containers_own_directory() {
        let cg = Cgroups {
            driver: crate::cgroup::Driver::Cgroupfs,
            systemd: None,
            mode: Mode::Legacy,
            hierarchies: vec![
                h("/sys/fs/cgroup/cpu,cpuacct", &["cpu", "cpuacct"], false),
                h("/sys/fs/cgroup/memory", &["memory"], false),
                h("/sys/fs/cgroup/systemd", &["name=systemd"], false),
                h("/sys/fs/cgroup/misc", &["misc"], false),
                h("/sys/fs/cgroup/unified", &[], true),
                h("/elsewhere/pids", &["pids"], false),
            ],
        };
        let monitor = "5:name=systemd:/system.slice/berth.service\n0::/x\n";
        let v = v1_view(&cg, Path::new("kubepods/pod1/abc"), monitor);
        let got: Vec<(&str, &str)> = v
            .iter()
            .map(|m| (m.name.as_str(), m.source.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "cpu,cpuacct",
                    "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc"
                ),
                ("cpu", "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc"),
                ("cpuacct", "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc"),
                ("memory", "/sys/fs/cgroup/memory/kubepods/pod1/abc"),
                (
                    "systemd",
                    "/sys/fs/cgroup/systemd/system.slice/berth.service"
                ),
            ]
        );
        let m = mounts(&v, false);
        assert_eq!(m.len(), 6);
        assert!(m[0]["options"].to_string().contains("nr_inodes=6"));
        assert!(m[1]["options"].to_string().contains("\"ro\""));
        assert!(
            !mounts(&v, true)[1]["options"]
                .to_string()
                .contains("\"ro\"")
        );
    }
}
