//! Volumes of pods with a user namespace of their own: each host path is given to the runtime
//! as an idmapped copy (what the node's root owns there, the pod's root owns in the container,
//! as with the root filesystem), which libcontainer cannot make itself. The copies are attached
//! under `state/idmapped/<container>.<n>` only while the runtime binds them into the container,
//! then detached; the container's own mounts hold them from then on.
//!
//! An attached copy is the host's data, writable: nothing here ever removes recursively. A copy
//! is detached, then its empty mount point removed with rmdir/unlink; a start after a crash does
//! the same for whatever a previous berthd left attached.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

use super::MountSpec;

/// Mounts attached for one creation (these copies, image volumes); detached when dropped.
#[derive(Default)]
pub struct Attached(Vec<PathBuf>);

impl Attached {
    /// Takes a mount point made for this creation: detached (and removed) with the rest.
    pub fn push(&mut self, at: PathBuf) {
        self.0.push(at);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for p in &self.0 {
            detach(p);
        }
    }
}

/// Attaches an idmapped copy (recursive, as the runtime binds volumes with rbind) of each
/// mount's host source under `dir`, mapped with the user namespace pinned at `userns`, into
/// `attached`; returns the mounts with those copies as their sources.
pub fn attach(
    attached: &mut Attached,
    dir: &Path,
    ctr: &str,
    mounts: &[(MountSpec, PathBuf)],
    userns: &Path,
) -> Result<Vec<(MountSpec, PathBuf)>, String> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    let ns = std::fs::File::open(userns).map_err(|e| format!("{}: {e}", userns.display()))?;
    let mut out = Vec::new();
    for (n, (m, src)) in mounts.iter().enumerate() {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "volume {} (host path {}): {what}: {e}",
                m.container_path,
                src.display()
            )
        };
        let at = dir.join(format!("{ctr}.{n}"));
        let is_dir = src.is_dir();
        if is_dir {
            std::fs::create_dir(&at)
        } else {
            std::fs::File::create_new(&at).map(drop)
        }
        .map_err(|e| fail("making its mount point", &e))?;
        attached.push(at.clone());
        let tree = rustix::mount::open_tree(
            rustix::fs::CWD,
            src,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_RECURSIVE,
        )
        .map_err(|e| fail("open_tree", &e))?;
        crate::fsutil::mount_setattr_recursive(
            tree.as_fd(),
            crate::fsutil::MOUNT_ATTR_IDMAP,
            Some(ns.as_fd()),
        )
        .map_err(|e| {
            fail(
                "idmapping it (mount_setattr MOUNT_ATTR_IDMAP; its filesystem may not support idmapped mounts)",
                &e,
            )
        })?;
        rustix::mount::move_mount(
            &tree,
            "",
            rustix::fs::CWD,
            &at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| fail("attaching the idmapped copy", &e))?;
        out.push((m.clone(), at));
    }
    Ok(out)
}

/// Detaches and removes what is attached at `at` (a mount point of a creation's).
pub fn detach(at: &Path) {
    // A mount point may hold a copy stacked more than once (a crash between attaching and
    // recording): detach until nothing is mounted there.
    for _ in 0..8 {
        if umount2(at, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    // Never recursive: if something were still attached, removal fails instead of reaching
    // into the host's data.
    let _ = std::fs::remove_dir(at).or_else(|_| std::fs::remove_file(at));
}

/// Detaches every copy under `dir` of container `ctr` (all of them when `None`): what a
/// crashed creation left.
pub fn detach_left(dir: &Path, ctr: Option<&str>) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = match ctr {
            Some(c) => name
                .strip_prefix(c)
                .is_some_and(|rest| rest.starts_with('.')),
            None => true,
        };
        if ours {
            detach(&e.path());
            n += 1;
        }
    }
    n
}
