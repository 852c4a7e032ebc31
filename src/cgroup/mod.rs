//! cgroup hierarchies as mounted on this host (v1, hybrid or unified v2), the cgroup driver
//! (berth's own directories, or systemd units), and the pod level berth makes in them.
//! Containers' own cgroups are made by the OCI runtime from the spec's cgroupsPath; this module
//! only names them and prepares and removes the pod level above them.

mod driver;
pub mod pressure;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::systemd::Systemd;

/// Who makes the pod and container cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// berth makes directories; cgroup parents are paths (`/kubepods/burstable/pod<uid>`).
    #[default]
    Cgroupfs,
    /// systemd makes units (pod slices, container scopes) over D-Bus; cgroup parents are slice
    /// names (`kubepods-burstable-pod<uid>.slice`).
    Systemd,
}

/// The unit name prefix of berth's container scopes (`berth-<id>.scope`), as the OCI runtime
/// makes them from a `slice:berth:<id>` cgroupsPath.
pub const SCOPE_PREFIX: &str = "berth";

/// How this host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    /// Only cgroup v2, at /sys/fs/cgroup.
    Unified,
    /// cgroup v1 controllers, possibly with a cgroup2 mount beside them (hybrid).
    Legacy,
}

/// One mounted hierarchy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// Its v1 controllers (`cpu`, `memory`, ... or `name=systemd`); empty for cgroup2.
    pub controllers: Vec<String>,
    /// Whether this is the cgroup2 hierarchy.
    pub v2: bool,
}

/// The hierarchies of this host, and the driver that makes cgroups in them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cgroups {
    /// v1/hybrid or unified.
    pub mode: Mode,
    /// Every hierarchy berth makes pod directories in.
    pub hierarchies: Vec<Hierarchy>,
    /// cgroupfs or systemd.
    pub driver: Driver,
    /// The connection to systemd, with the systemd driver.
    #[serde(skip)]
    pub systemd: Option<Arc<Systemd>>,
}

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    /// Where.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// A cgroup parent that is not a plain path.
#[derive(Debug, thiserror::Error)]
#[error(
    "cgroup parent {0:?} must be a path without '..' (cgroupfs driver, e.g. /kubepods/burstable/pod<uid>)"
)]
pub struct BadParent(pub String);

/// Checks a cgroup path from a request and makes it relative to each hierarchy's root.
pub fn relative(parent: &str) -> Result<PathBuf, BadParent> {
    let p = Path::new(parent);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(BadParent(parent.to_string())),
        }
    }
    if out.as_os_str().is_empty() || parent.contains('\0') {
        return Err(BadParent(parent.to_string()));
    }
    Ok(out)
}

impl Cgroups {
    /// On a hybrid host, the controllers its cgroup2 mount has (`cgroup.controllers`), when
    /// it has any; `None` on a pure v1 or a unified host.
    pub fn hybrid_v2_controllers(&self) -> Option<String> {
        if self.mode != Mode::Legacy {
            return None;
        }
        let v2 = self.hierarchies.iter().find(|h| h.v2)?;
        let ctrls = std::fs::read_to_string(v2.mount.join("cgroup.controllers")).ok()?;
        let ctrls = ctrls.trim();
        (!ctrls.is_empty()).then(|| ctrls.to_string())
    }

    /// Whether the runtime can set limits of `controller` for containers: a v1 hierarchy of it
    /// (legacy and hybrid hosts: the runtime manages v1 there), or the v2 root enabling it.
    pub fn has_controller(&self, controller: &str) -> bool {
        match self.mode {
            Mode::Legacy => self
                .hierarchies
                .iter()
                .any(|h| !h.v2 && h.controllers.iter().any(|c| c == controller)),
            Mode::Unified => self.unified().is_some_and(|u| {
                std::fs::read_to_string(u.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|c| c == controller)
            }),
        }
    }

    /// Reads the hierarchies from /proc/self/mountinfo.
    pub fn detect() -> Cgroups {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut hierarchies = Vec::new();
        let mut mode = Mode::Legacy;
        for line in info.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mount = pre.split(' ').nth(4).unwrap_or("");
            let mut post = post.split(' ');
            let fstype = post.next().unwrap_or("");
            let _source = post.next();
            let opts = post.next().unwrap_or("");
            match fstype {
                "cgroup" => {
                    let controllers: Vec<String> = opts
                        .split(',')
                        .filter(|o| {
                            !matches!(
                                *o,
                                "rw" | "ro"
                                    | "nosuid"
                                    | "nodev"
                                    | "noexec"
                                    | "relatime"
                                    | "clone_children"
                            ) && !o.starts_with("release_agent")
                        })
                        .map(String::from)
                        .collect();
                    hierarchies.push(Hierarchy {
                        mount: PathBuf::from(mount),
                        controllers,
                        v2: false,
                    });
                }
                "cgroup2" => {
                    if mount == "/sys/fs/cgroup" {
                        mode = Mode::Unified;
                    }
                    hierarchies.push(Hierarchy {
                        mount: PathBuf::from(mount),
                        controllers: Vec::new(),
                        v2: true,
                    });
                }
                _ => {}
            }
        }
        if mode == Mode::Unified {
            hierarchies.retain(|h| h.v2);
        }
        Cgroups {
            mode,
            hierarchies,
            driver: Driver::Cgroupfs,
            systemd: None,
        }
    }

    /// Remounts the cgroup2 hierarchy with `favordynmods` (kernel 6.0+), which spares every
    /// task migration an RCU grace period. Keeps the mount's other options.
    pub fn favor_dynmods(&self) -> Result<(), String> {
        let Some(mount) = self.unified() else {
            return Err("there is no cgroup2 hierarchy".into());
        };
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let opts = info
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(&*mount.to_string_lossy()))
            .find_map(|l| {
                l.split_once(" - ")
                    .and_then(|(_, post)| post.split(' ').nth(2))
            })
            .unwrap_or("rw")
            .to_string();
        if opts.split(',').any(|o| o == "favordynmods") {
            return Ok(());
        }
        let wanted = format!("{opts},favordynmods");
        nix::mount::mount(
            None::<&str>,
            mount,
            Some("cgroup2"),
            nix::mount::MsFlags::MS_REMOUNT,
            Some(wanted.as_str()),
        )
        .map_err(|e| format!("remounting {} with {wanted}: {e}", mount.display()))
    }

    /// The unified (cgroup2) hierarchy's mount, if there is one.
    pub fn unified(&self) -> Option<&Path> {
        self.hierarchies
            .iter()
            .find(|h| h.v2)
            .map(|h| h.mount.as_path())
    }

    /// The directories of `rel` that do not exist yet, in every hierarchy, parents first:
    /// what `create` will make.
    pub fn missing(&self, rel: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if self.systemd.is_some() {
            // systemd makes a slice's parents itself and removes them never: only the pod's
            // own slice is berth's.
            for h in &self.hierarchies {
                if !h.mount.join(rel).exists() {
                    out.push(h.mount.join(rel));
                }
            }
            return out;
        }
        for h in &self.hierarchies {
            let mut cur = h.mount.clone();
            for comp in rel.components() {
                cur.push(comp);
                if !cur.exists() {
                    out.push(cur.clone());
                }
            }
        }
        out
    }

    /// Makes `rel` in every hierarchy (parents too); with systemd, starts the slice `rel`
    /// names when its cgroup does not exist.
    pub fn create(&self, rel: &Path) -> Result<(), CgroupError> {
        if let Some(sd) = &self.systemd {
            let missing = self.missing(rel);
            if let Some(first) = missing.first() {
                let name = rel.file_name().unwrap_or_default().to_string_lossy();
                sd.start_slice(&name).map_err(|e| CgroupError {
                    path: first.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
            return Ok(());
        }
        for h in &self.hierarchies {
            let mut cur = h.mount.clone();
            for comp in rel.components() {
                let parent = cur.clone();
                cur.push(comp);
                match std::fs::create_dir(&cur) {
                    Ok(()) => self
                        .init_dir(h, &parent, &cur)
                        .map_err(|source| CgroupError {
                            path: cur.clone(),
                            source,
                        })?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError { path: cur, source }),
                }
            }
        }
        Ok(())
    }

    /// `rel` and its ancestors in every hierarchy, deepest first.
    pub fn lineage(&self, rel: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in &self.hierarchies {
            let mut p = h.mount.join(rel);
            while p != h.mount && p.starts_with(&h.mount) {
                out.push(p.clone());
                if !p.pop() {
                    break;
                }
            }
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        out
    }

    /// What a new directory needs before processes can join it: v1 cpuset copies its parent's
    /// cpus and mems (they start empty); v2 parents delegate the controllers berth uses.
    fn init_dir(&self, h: &Hierarchy, parent: &Path, dir: &Path) -> std::io::Result<()> {
        if h.controllers.iter().any(|c| c == "cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(parent.join(f))?;
                std::fs::write(dir.join(f), v.trim())?;
            }
        }
        if h.v2 && self.mode == Mode::Unified {
            let available =
                std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            let want: Vec<String> = available
                .split_whitespace()
                .filter(|c| matches!(*c, "cpu" | "cpuset" | "memory" | "pids" | "io" | "hugetlb"))
                .map(|c| format!("+{c}"))
                .collect();
            if !want.is_empty() {
                std::fs::write(parent.join("cgroup.subtree_control"), want.join(" "))?;
            }
        }
        Ok(())
    }

    /// A cgroup.procs file that lists every process of the cgroup `rel`: the pids or memory
    /// v1 hierarchy (which every container joins), or the unified one on v2 hosts.
    pub fn procs_file(&self, rel: &Path) -> Option<PathBuf> {
        let pick = |want: &str| {
            self.hierarchies
                .iter()
                .find(|h| h.controllers.iter().any(|c| c == want))
        };
        let h = match self.mode {
            Mode::Unified => self.hierarchies.iter().find(|h| h.v2),
            Mode::Legacy => pick("pids").or_else(|| pick("memory")),
        }?;
        Some(h.mount.join(rel).join("cgroup.procs"))
    }

    /// Whether the OOM killer killed something in cgroup `rel` (v1 `memory.oom_control`'s
    /// `oom_kill`, v2 `memory.events`' `oom_kill`). With systemd the scope's cgroup may be gone
    /// already (systemd removes a scope as it empties): then the scope's `Result` says it
    /// (systemd 253+), or else the growth of the pod slice's count since the container was
    /// made (two containers of one pod killed at once by the OOM killer and by something
    /// else can then be told apart only by the first).
    pub fn oom_killed(&self, rel: &Path) -> bool {
        let (h, file) = match self.mode {
            Mode::Unified => (self.hierarchies.iter().find(|h| h.v2), "memory.events"),
            Mode::Legacy => (
                self.hierarchies
                    .iter()
                    .find(|h| h.controllers.iter().any(|c| c == "memory")),
                "memory.oom_control",
            ),
        };
        let Some(h) = h else { return false };
        let count = |dir: &Path| oom_kill_count(&dir.join(file));
        let own = count(&h.mount.join(rel));
        let (Some(sd), Some(pod)) = (&self.systemd, rel.parent()) else {
            return own.is_some_and(|n| n > 0);
        };
        if let Some(n) = own {
            // The pod's count moves on past this kill, so a later exit is not taken for it.
            if let Some(p) = count(&h.mount.join(pod)) {
                sd.pod_oom_grew(pod, p);
            }
            return n > 0;
        }
        let unit = rel.file_name().unwrap_or_default().to_string_lossy();
        if !unit.ends_with(".scope") {
            return false;
        }
        if sd.scope_oom_killed(&unit) {
            return true;
        }
        count(&h.mount.join(pod)).is_some_and(|n| sd.pod_oom_grew(pod, n))
    }

    /// With systemd: notes pod `pod`'s OOM kill count before one of its containers is made
    /// (what `oom_killed` holds a later count against).
    pub fn note_oom_baseline(&self, pod: &Path) {
        let Some(sd) = &self.systemd else { return };
        let Some(u) = self.unified() else { return };
        let n = oom_kill_count(&u.join(pod).join("memory.events")).unwrap_or(0);
        sd.note_pod_oom(pod, n);
    }

    /// The directory of cgroup `rel` where `controller`'s files are: its v1 hierarchy, or the
    /// unified one on v2 hosts.
    pub fn dir_of(&self, controller: &str, rel: &Path) -> Option<PathBuf> {
        let h = match self.mode {
            Mode::Unified => self.hierarchies.iter().find(|h| h.v2),
            Mode::Legacy => self
                .hierarchies
                .iter()
                .find(|h| !h.v2 && h.controllers.iter().any(|c| c == controller)),
        }?;
        Some(h.mount.join(rel))
    }

    /// Moves a process into `rel` in every hierarchy.
    pub fn add_process(&self, rel: &Path, pid: i32) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let f = h.mount.join(rel).join("cgroup.procs");
            std::fs::write(&f, pid.to_string())
                .map_err(|source| CgroupError { path: f, source })?;
        }
        Ok(())
    }
}

/// Checks a key of the CRI's `unified` map: a plain cgroup interface file name (no path, no
/// `cgroup.` core file other than the writable `cgroup.max.*`), present in `dir` when one is
/// given (a controller the cgroup does not have has no files there).
pub fn check_unified_key(key: &str, dir: Option<&Path>) -> Result<(), String> {
    let plain = !key.is_empty()
        && key.contains('.')
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let core = key.starts_with("cgroup.") && !key.starts_with("cgroup.max.");
    if !plain || core {
        return Err(format!(
            "unified key {key:?} is not a cgroup file berth may write"
        ));
    }
    if let Some(d) = dir
        && !d.join(key).is_file()
    {
        return Err(format!(
            "unified key {key:?}: cgroup {} has no such file (is its controller enabled?)",
            d.display()
        ));
    }
    Ok(())
}

/// The `oom_kill` count of a `memory.events` or `memory.oom_control` file; `None` when it
/// cannot be read (the cgroup is gone).
fn oom_kill_count(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok().map(|text| {
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    })
}

/// Removes one cgroup directory: `Ok(true)` if gone, `Ok(false)` if still in use (by another
/// pod below it, or by processes).
pub fn remove_dir(d: &Path) -> std::io::Result<bool> {
    match std::fs::remove_dir(d) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How many huge pages of `size` (`2MB`, `1GB`, as the CRI names them) the node has or may
/// overcommit; `None` when the kernel has no such size.
pub fn hugepages(size: &str) -> Option<u64> {
    let size = size.trim();
    let (num, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
    let kb = num.parse::<u64>().ok()?
        * match unit.to_ascii_uppercase().as_str() {
            "KB" => 1,
            "MB" => 1 << 10,
            "GB" => 1 << 20,
            _ => return None,
        };
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("nr_hugepages")? + read("nr_overcommit_hugepages").unwrap_or(0))
}

/// Removes a cgroup directory together with the child cgroups left under it (a container's,
/// when berthd died before removing it), deepest first. `Ok(false)` when something in the
/// tree still has processes: the rest stays for the next attempt.
pub fn remove_tree(d: &Path) -> std::io::Result<bool> {
    let entries = match std::fs::read_dir(d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut all_gone = true;
    for entry in entries {
        let entry = entry?;
        // Control files are plain files; only directories are child cgroups.
        if entry.file_type()?.is_dir() {
            all_gone &= remove_tree(&entry.path())?;
        }
    }
    if !all_gone {
        return Ok(false);
    }
    remove_dir(d)
}

/// SIGKILLs every process listed in a cgroup.procs file (a missing file means none): on v2
/// (kernel 5.14+) at once through the cgroup's `cgroup.kill`, which no fork can outrun and
/// which takes the cgroups below too; else by pid.
pub fn kill_procs(procs: &Path) {
    if procs.as_os_str().is_empty() {
        return;
    }
    if let Some(kill) = procs.parent().map(|d| d.join("cgroup.kill"))
        && std::fs::write(&kill, "1").is_ok()
    {
        return;
    }
    // Twice: a process may fork between the read and the kill.
    for _ in 0..2 {
        let Ok(list) = std::fs::read_to_string(procs) else {
            return;
        };
        let pids: Vec<i32> = list.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepage_sizes_are_read_as_the_cri_names_them() {
        let has_2m = std::path::Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
        assert_eq!(hugepages("2MB").is_some(), has_2m);
        assert_eq!(hugepages("2048KB").is_some(), has_2m);
        assert_eq!(hugepages("3MB"), None);
        assert_eq!(hugepages("2XB"), None);
        assert_eq!(hugepages(""), None);
    }

    #[test]
    fn parents_are_made_relative_and_dot_dot_is_refused() {
        assert_eq!(
            relative("/kubepods/burstable/pod1").unwrap(),
            PathBuf::from("kubepods/burstable/pod1")
        );
        assert_eq!(
            relative("kubepods.slice").unwrap(),
            PathBuf::from("kubepods.slice")
        );
        assert!(relative("/kubepods/../etc").is_err());
        assert!(relative("/").is_err());
    }

    #[test]
    fn a_pod_cgroup_goes_with_the_container_cgroups_left_in_it() {
        let c = Cgroups::detect();
        let top = PathBuf::from(format!("berth-unit-{}", std::process::id()));
        let pod = top.join("pod");
        // Whatever the assertions do, nothing of the test stays in the hierarchies.
        struct Cleanup(Vec<PathBuf>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for d in &self.0 {
                    let _ = remove_tree(d);
                }
            }
        }
        let _cleanup = Cleanup(c.lineage(&top));
        c.create(&pod.join("ctr").join("inner")).unwrap();
        for d in c.lineage(&pod) {
            if d.ends_with(&pod) {
                assert!(remove_tree(&d).unwrap(), "{}", d.display());
                assert!(!d.exists());
            }
        }
        for d in c.lineage(&top) {
            assert!(remove_dir(&d).unwrap(), "{}", d.display());
        }
    }

    #[test]
    fn unified_keys_are_plain_interface_files() {
        for ok in [
            "memory.high",
            "pids.max",
            "cpu.weight.nice",
            "hugetlb.2MB.max",
            "cgroup.max.depth",
        ] {
            assert!(check_unified_key(ok, None).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "memory",
            "../escape",
            "a/b.c",
            ".hidden",
            "cgroup.procs",
            "cgroup.subtree_control",
            "x.y\0",
        ] {
            assert!(check_unified_key(bad, None).is_err(), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.high"), "max").unwrap();
        assert!(check_unified_key("memory.high", Some(d.path())).is_ok());
        let e = check_unified_key("memory.nothing", Some(d.path())).unwrap_err();
        assert!(
            e.contains("memory.nothing") && e.contains("no such file"),
            "{e}"
        );
    }

    #[test]
    fn this_host_has_hierarchies() {
        let c = Cgroups::detect();
        assert!(!c.hierarchies.is_empty());
    }
}
