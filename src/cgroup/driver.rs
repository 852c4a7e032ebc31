//! The cgroup driver: who makes pod and container cgroups (berth's directories, or systemd's
//! units), how kubelet's cgroup parents and the containers' cgroups are named under each, and
//! where a pod's init goes: methods of `Cgroups`, whose `driver` field says which.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Cgroups, Driver, Mode, SCOPE_PREFIX, relative, remove_dir, remove_tree};
use crate::systemd::Systemd;

impl Cgroups {
    /// These hierarchies with `driver`: the systemd one connects to systemd now, and fails
    /// when there is none to talk to.
    pub fn with_driver(mut self, driver: Driver) -> Result<Cgroups, crate::systemd::SystemdError> {
        if driver == Driver::Systemd {
            // libcontainer manages v1 hierarchies itself whatever it is told, so containers
            // would not be in systemd's units there: refused rather than half done.
            if self.mode != Mode::Unified {
                return Err(crate::systemd::SystemdError::NotRunning(format!(
                    "this node's cgroups are {}; berth runs the systemd driver on cgroup v2 \
                     only (use cgroup_driver = \"cgroupfs\")",
                    self.version_name()
                )));
            }
            // Units' cgroups show in the unified hierarchy.
            let root = self
                .hierarchies
                .iter()
                .find(|h| {
                    (self.mode == Mode::Unified && h.v2)
                        || h.controllers.iter().any(|c| c == "name=systemd")
                })
                .map(|h| h.mount.clone())
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
            self.systemd = Some(Arc::new(Systemd::connect(&root)?));
        }
        self.driver = driver;
        Ok(self)
    }

    /// What `crictl info` says of the node's cgroups: `v1`, `hybrid` or `v2`.
    pub fn version_name(&self) -> &'static str {
        match self.mode {
            Mode::Unified => "v2",
            Mode::Legacy if self.hierarchies.iter().any(|h| h.v2) => "hybrid",
            Mode::Legacy => "v1",
        }
    }

    /// The pod cgroup (relative to each hierarchy's root) for a cgroup parent from kubelet,
    /// checked for this driver: a path for cgroupfs, a slice name for systemd.
    pub fn pod_cgroup(&self, parent: &str) -> Result<PathBuf, String> {
        match self.driver {
            Driver::Cgroupfs => relative(parent).map_err(|e| e.to_string()),
            // A path's last part names the slice (`/test.slice`, as critest sends it;
            // containerd and CRI-O take the base name too).
            Driver::Systemd => crate::systemd::expand_slice(
                parent.rsplit('/').find(|p| !p.is_empty()).unwrap_or(parent),
            )
            .map_err(|e| {
                format!(
                    "cgroup parent: {e} (the systemd cgroup driver takes slice names, e.g. \
                     kubepods-burstable-pod<uid>.slice)"
                )
            }),
        }
    }

    /// The cgroup parent of a pod kubelet gave none: under `default` (a path, or a slice
    /// with the systemd driver), named by the pod's id.
    pub fn default_parent(&self, default: &str, pod_id: &str) -> String {
        match self.driver {
            Driver::Cgroupfs => format!("{}/{pod_id}", default.trim_end_matches('/')),
            Driver::Systemd => format!(
                "{}-pod{pod_id}.slice",
                default.strip_suffix(".slice").unwrap_or(default)
            ),
        }
    }

    /// A container's cgroup (relative), in its pod's: a directory named by its id, or with
    /// systemd the scope the runtime makes.
    pub fn container_cgroup(&self, pod: &Path, id: &str) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => pod.join(id),
            Driver::Systemd => pod.join(format!("{SCOPE_PREFIX}-{id}.scope")),
        }
    }

    /// The OCI spec's cgroupsPath of a container: `/<pod>/<id>`, or with systemd
    /// `<pod slice>:berth:<id>` (runc's and libcontainer's form for a scope in a slice).
    pub fn spec_cgroups_path(&self, pod: &Path, id: &str) -> String {
        match self.driver {
            Driver::Cgroupfs => format!("/{}/{id}", pod.display()),
            Driver::Systemd => format!(
                "{}:{SCOPE_PREFIX}:{id}",
                pod.file_name().unwrap_or_default().to_string_lossy()
            ),
        }
    }

    /// Puts a pod's init (the holder of its shared PID namespace) in the pod's cgroup: on v1
    /// the pod's own directory; on v2 a leaf below it (the kernel keeps processes out of a
    /// cgroup that hands controllers down), `init` or with systemd a scope.
    pub fn place_init(&self, pod: &Path, pod_id: &str, pid: i32) -> Result<(), String> {
        if let Some(sd) = &self.systemd {
            let slice = pod.file_name().unwrap_or_default().to_string_lossy();
            return sd
                .start_scope(
                    &format!("{SCOPE_PREFIX}-init-{pod_id}.scope"),
                    &slice,
                    pid as u32,
                )
                .map_err(|e| e.to_string());
        }
        let leaf = if self.mode == Mode::Unified {
            let leaf = pod.join("init");
            self.create(&leaf).map_err(|e| e.to_string())?;
            leaf
        } else {
            pod.to_path_buf()
        };
        self.add_process(&leaf, pid).map_err(|e| e.to_string())
    }

    /// Removes the v2 `init` leaf `place_init` made in pod cgroup `pod` (its init is gone): it
    /// is berth's even where kubelet made the pod's cgroup. Busy (another pod's init of the
    /// same parent) or absent: nothing to do.
    pub fn remove_init_leaf(&self, pod: &Path) {
        if self.systemd.is_some() || self.mode != Mode::Unified {
            return;
        }
        if let Some(u) = self.unified() {
            let _ = remove_dir(&u.join(pod).join("init"));
        }
    }

    /// Removes a pod cgroup berth made (`whole`: with what is left below it), or with
    /// systemd stops its slice. `Ok(false)` when something still uses it.
    pub fn remove_pod_dir(&self, d: &Path, whole: bool) -> std::io::Result<bool> {
        if let Some(sd) = &self.systemd {
            let name = d.file_name().unwrap_or_default().to_string_lossy();
            if !name.ends_with(".slice") {
                return Ok(false);
            }
            return sd
                .stop(&name, d)
                .map(|()| true)
                .map_err(|e| std::io::Error::other(e.to_string()));
        }
        if whole {
            return remove_tree(d);
        }
        // A pod directory berth made holds its init leaf (a restart's cleanup lands here).
        if self.mode == Mode::Unified {
            let _ = remove_dir(&d.join("init"));
        }
        remove_dir(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_parents_are_slices_or_paths_ending_in_one() {
        let mut cg = Cgroups::detect();
        cg.driver = Driver::Systemd;
        let want = PathBuf::from(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
        );
        assert_eq!(
            cg.pod_cgroup("kubepods-besteffort-pod1.slice").unwrap(),
            want
        );
        assert_eq!(
            cg.pod_cgroup("/kubepods-besteffort-pod1.slice").unwrap(),
            want
        );
        assert_eq!(
            cg.pod_cgroup("/test.slice").unwrap(),
            PathBuf::from("test.slice")
        );
        for bad in [
            "/kubepods/burstable/pod1",
            "",
            "/",
            "a--b.slice",
            "../x.slice/..",
        ] {
            let e = cg.pod_cgroup(bad).unwrap_err();
            assert!(e.contains("slice"), "{bad}: {e}");
        }
        assert_eq!(
            cg.container_cgroup(Path::new("test.slice"), "abc"),
            PathBuf::from("test.slice/berth-abc.scope")
        );
        assert_eq!(
            cg.spec_cgroups_path(&want, "abc"),
            "kubepods-besteffort-pod1.slice:berth:abc"
        );
        assert_eq!(
            cg.default_parent("berth.slice", "f00"),
            "berth-podf00.slice"
        );
    }
}
