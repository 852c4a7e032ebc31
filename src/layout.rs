//! The directory layout under `--root` (persistent) and `--state` (gone at reboot), and who may
//! enter it. Image files are setuid-capable and records hold containers' environments
//! (Kubernetes secrets passed as env), so everything here is root's alone: directories 0700,
//! files 0600. Only `--state` itself is 0711, so a group given the CRI socket can reach it.
//! Modes are set when a directory or file is made and repaired at start for a tree an older
//! berthd (or an operator) left wider.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of directories holding data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the state directory itself: traversable, so the CRI socket in it can be reached.
pub const STATE_MODE: u32 = 0o711;
/// Mode of berth's own files (records, specs, blobs).
pub const FILE_MODE: u32 = 0o600;

/// Every directory berth keeps its data in.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `--root`.
    pub root: PathBuf,
    /// `--state`.
    pub state: PathBuf,
}

impl Layout {
    /// The layout over `root` and `state`.
    pub fn new(root: &Path, state: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
            state: state.to_owned(),
        }
    }

    /// `root/content`: manifests, indexes and configs by digest.
    pub fn content(&self) -> PathBuf {
        self.root.join("content")
    }

    /// `root/snapshots`: unpacked layers.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// `root/images`: image records.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// `root/containers`: containers' writable layers (`<id>/{upper,work}`).
    pub fn layers(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// `root/records/pods`: copies of the pod records, which outlive a reboot.
    pub fn pod_copies(&self) -> PathBuf {
        self.root.join("records").join("pods")
    }

    /// `root/records/containers`: copies of the container records, which outlive a reboot.
    pub fn container_copies(&self) -> PathBuf {
        self.root.join("records").join("containers")
    }

    /// `state/pods`: pod records and files (`<id>/{pod.json,hosts,resolv.conf,hostname,shm}`).
    pub fn pods(&self) -> PathBuf {
        self.state.join("pods")
    }

    /// `state/ns`: namespace pins (`<pod id>/{net,ipc,uts,pid}`).
    pub fn ns(&self) -> PathBuf {
        self.state.join("ns")
    }

    /// `state/containers`: container records, OCI bundles and rootfs mount points.
    pub fn containers(&self) -> PathBuf {
        self.state.join("containers")
    }

    /// `state/mon`: monitor sockets.
    pub fn monitors(&self) -> PathBuf {
        self.state.join("mon")
    }

    /// A pod's monitor socket: short, as unix socket paths are limited to 108 bytes.
    pub fn monitor_socket(&self, pod_id: &str) -> PathBuf {
        self.monitors()
            .join(format!("{}.sock", &pod_id[..16.min(pod_id.len())]))
    }

    /// `state/lc`: libcontainer's state.
    pub fn lc_root(&self) -> PathBuf {
        self.state.join("lc")
    }

    /// `state/idmapped`: idmapped copies of volumes, attached while a user-namespaced
    /// container is made (see `container::volumes_idmapped`).
    pub fn idmapped(&self) -> PathBuf {
        self.state.join("idmapped")
    }

    /// `root/cni/cache`: what each pod was attached with in CNI mode (outlives a reboot, as
    /// the plugins' own leases do).
    pub fn cni_cache(&self) -> PathBuf {
        self.root.join("cni").join("cache")
    }

    /// `state/ipam`: address allocations.
    pub fn ipam(&self) -> PathBuf {
        self.state.join("ipam")
    }

    /// `state/leases`: containers' holds on images.
    pub fn leases(&self) -> PathBuf {
        self.state.join("leases")
    }

    /// `state/cgroups.json`: the cgroup directories berth made.
    pub fn cgroups_record(&self) -> PathBuf {
        self.state.join("cgroups.json")
    }

    /// The directories of per-object directories a user-namespaced container's runtime
    /// steps go through (see `traversable_dir`).
    pub fn traversable_dirs(&self) -> Vec<PathBuf> {
        vec![self.pods(), self.ns(), self.containers(), self.idmapped()]
    }

    fn data_dirs(&self) -> Vec<PathBuf> {
        vec![
            self.content(),
            self.snapshots(),
            self.images(),
            self.layers(),
            self.pod_copies(),
            self.container_copies(),
            self.pods(),
            self.ns(),
            self.containers(),
            self.monitors(),
            self.lc_root(),
            self.ipam(),
            self.leases(),
        ]
    }

    /// Makes the root and state directories and the directories below them with their modes,
    /// and narrows what an older tree left wider: the directories, the per-object directories
    /// under them and the records in those.
    pub fn prepare(&self) -> std::io::Result<()> {
        private_dir_mode(&self.root, DIR_MODE)?;
        private_dir_mode(&self.state, STATE_MODE)?;
        for d in self.data_dirs() {
            if self.traversable_dirs().contains(&d) {
                traversable_dir(&d)?;
            } else {
                private_dir(&d)?;
            }
        }
        // Per-object directories and the records in them (not the image files in snapshots,
        // whose modes are the image's: the 0700 above them is what keeps node users out).
        for d in [
            self.pods(),
            self.containers(),
            self.layers(),
            self.snapshots(),
        ] {
            for e in std::fs::read_dir(&d)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    narrow(&e.path(), DIR_MODE)?;
                }
            }
        }
        let mut records = vec![self.cgroups_record()];
        for d in [self.pods(), self.containers()] {
            for e in std::fs::read_dir(&d)?.flatten() {
                for f in ["pod.json", "container.json", "config.json", "exit.json"] {
                    records.push(e.path().join(f));
                }
            }
        }
        for d in [
            self.images(),
            self.ipam(),
            self.leases(),
            self.pod_copies(),
            self.container_copies(),
        ] {
            records.extend(std::fs::read_dir(&d)?.flatten().map(|e| e.path()));
        }
        for f in records {
            match std::fs::symlink_metadata(&f) {
                Ok(m) if m.is_file() => narrow(&f, FILE_MODE)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Creates a directory holding per-object directories as 0711: nothing in it can be listed,
/// and each object's own directory is 0700, owned by root or (for a pod with a user namespace
/// of its own) by that pod's root, whose runtime steps must reach it from inside the
/// namespace.
pub fn traversable_dir(dir: &Path) -> std::io::Result<()> {
    private_dir_mode(dir, STATE_MODE)
}

/// Hands a per-object directory to a user-namespaced pod's root (node ids `uid`, `gid`).
pub fn hand_to(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}

/// Creates `dir` (and missing parents) as a 0700 directory; an existing one is narrowed to
/// 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    private_dir_mode(dir, DIR_MODE)
}

fn private_dir_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    narrow(dir, mode)
}

/// Sets `p`'s permission bits to `mode` unless they are already exactly that.
fn narrow(p: &Path, mode: u32) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(p)?;
    if m.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn prepare_makes_private_dirs_and_narrows_an_old_tree() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(&d.path().join("root"), &d.path().join("state"));
        l.prepare().unwrap();
        assert_eq!(mode(&l.root), 0o700);
        assert_eq!(mode(&l.state), 0o711);
        assert_eq!(mode(&l.snapshots()), 0o700);
        assert_eq!(mode(&l.containers()), 0o711);

        // A tree an older berthd left: wide directories and records.
        let pod = l.pods().join("p1");
        std::fs::create_dir(&pod).unwrap();
        std::fs::write(pod.join("pod.json"), "{}").unwrap();
        std::fs::write(pod.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        for p in [&l.root, &l.state, &l.pods(), &pod] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(pod.join("pod.json"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::set_permissions(pod.join("hosts"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        l.prepare().unwrap();
        assert_eq!(mode(&l.root), 0o700);
        assert_eq!(mode(&l.state), 0o711);
        assert_eq!(mode(&l.pods()), 0o711);
        assert_eq!(mode(&pod), 0o700);
        assert_eq!(mode(&pod.join("pod.json")), 0o600);
        assert_eq!(
            mode(&pod.join("hosts")),
            0o644,
            "files containers read keep their mode"
        );
    }
}
