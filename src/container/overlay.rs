//! Overlay mounts of image snapshots: a container's root filesystem (the image's layers under
//! a writable layer of its own) and image volumes (the layers alone, read-only). The mount uses
//! the new mount API with one `lowerdir+` per layer where the kernel has it (6.8+), so no
//! image has too many layers for the one-page limit of mount(2)'s option string; older kernels
//! get that string.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::rootfs::RootfsError;

/// Mounts the overlay at `target`. `lower` is top layer first. With `userns` (a pod's user
/// namespace pin) each layer is an idmapped copy (overlayfs cannot be idmapped itself), so the
/// image's files are the namespace root's; the writable layer then belongs to that root's node
/// id (see `chown_upper`).
pub fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    userns: Option<&Path>,
) -> Result<(), RootfsError> {
    mount_layers(lower, Some((upper, work)), target, userns)
}

/// Mounts a read-only overlay of `lower` (top layer first) at `target`: an image volume. The
/// kernel wants two lower layers at least when there is no upper one, so the caller ends the
/// list with an empty directory. With `userns` each layer is an idmapped copy, as for a root.
pub fn mount_readonly(
    lower: &[PathBuf],
    target: &Path,
    userns: Option<&Path>,
) -> Result<(), RootfsError> {
    mount_layers(lower, None, target, userns)
}

fn mount_layers(
    lower: &[PathBuf],
    rw: Writable<'_>,
    target: &Path,
    userns: Option<&Path>,
) -> Result<(), RootfsError> {
    let err = |message: String| RootfsError {
        target: target.to_owned(),
        message,
    };
    let least = if rw.is_some() { 1 } else { 2 };
    if lower.len() < least {
        return Err(err(format!(
            "{} lower layers given; this overlay needs {least} at least",
            lower.len()
        )));
    }
    match userns {
        Some(ns) => mount_idmapped(lower, rw, target, ns).map_err(err),
        None => mount_any_api(lower, rw, target).map_err(err),
    }
}

/// The writable layer of an overlay: its upper and work directories.
type Writable<'a> = Option<(&'a Path, &'a Path)>;

/// The overlay with `lowerdir+` through the new mount API, or on kernels without it (before
/// 6.8) or without fsopen the classic way, all layers in one option string.
fn mount_any_api(lower: &[PathBuf], rw: Writable<'_>, target: &Path) -> Result<(), String> {
    match mount_new_api(lower, rw, target) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {}
        Err(e) => return Err(format!("fsopen/fsconfig: {e}")),
    }
    let lowers: Vec<String> = lower.iter().map(|p| escape(&p.to_string_lossy())).collect();
    let mut data = format!("lowerdir={}", lowers.join(":"));
    if let Some((upper, work)) = rw {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            escape(&upper.to_string_lossy()),
            escape(&work.to_string_lossy())
        ));
    }
    if data.len() >= 4096 {
        return Err(format!(
            "{} layers do not fit in mount(2)'s options on this kernel",
            lower.len()
        ));
    }
    let flags = if rw.is_some() {
        MsFlags::empty()
    } else {
        MsFlags::MS_RDONLY
    };
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| e.to_string())
}

fn mount_new_api(
    lower: &[PathBuf],
    rw: Writable<'_>,
    target: &Path,
) -> Result<(), rustix::io::Errno> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for l in lower {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_path())?;
    }
    let attrs = match rw {
        Some((upper, work)) => {
            rustix::mount::fsconfig_set_string(&fs, "upperdir", upper)?;
            rustix::mount::fsconfig_set_string(&fs, "workdir", work)?;
            MountAttrFlags::empty()
        }
        None => MountAttrFlags::MOUNT_ATTR_RDONLY,
    };
    rustix::mount::fsconfig_create(&fs)?;
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

/// Overlay options separate paths with ':' and ',': those are escaped.
fn escape(p: &str) -> String {
    p.replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

/// The overlay over idmapped copies of the layers. overlayfs takes its layers only from the
/// caller's mount namespace, so each copy is attached at `<target>.lower-<n>` (read-only: a
/// removal walking into one can delete nothing of the image) and detached again as soon as the
/// overlay holds it.
fn mount_idmapped(
    lower: &[PathBuf],
    rw: Writable<'_>,
    target: &Path,
    userns: &Path,
) -> Result<(), String> {
    use rustix::mount::MoveMountFlags;
    let ns = std::fs::File::open(userns).map_err(|e| format!("{}: {e}", userns.display()))?;
    let mut staged = Staged(Vec::new());
    for (n, l) in lower.iter().enumerate() {
        let at = staging_path(target, n);
        std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        let layer = idmapped_copy(l, &ns)?;
        rustix::mount::move_mount(
            &layer,
            "",
            rustix::fs::CWD,
            &at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| format!("attaching the idmapped {}: {e}", l.display()))?;
        staged.0.push(at);
    }
    // Idmapped lower layers work with either API (overlayfs 5.19+).
    mount_any_api(&staged.0, rw, target).map_err(|e| format!("overlay: {e}"))
}

/// Where the idmapped copy of layer `n` of the root filesystem at `target` is attached.
fn staging_path(target: &Path, n: usize) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(format!(".lower-{n}"));
    PathBuf::from(s)
}

/// Layer copies attached for an overlay: detached and removed when dropped.
struct Staged(Vec<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = umount2(p, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Detaches layer copies a crash left attached next to `target` (before its directory is
/// removed).
pub fn unstage(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefix = format!("{}.lower-", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = umount2(&e.path(), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// A detached read-only copy of the directory `dir`, idmapped with the user namespace `ns`.
fn idmapped_copy(dir: &Path, ns: &std::fs::File) -> Result<std::os::fd::OwnedFd, String> {
    use rustix::mount::OpenTreeFlags;
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| format!("open_tree {}: {e}", dir.display()))?;
    use crate::fsutil::{MOUNT_ATTR_IDMAP, MOUNT_ATTR_RDONLY, mount_setattr};
    use std::os::fd::AsFd;
    mount_setattr(
        tree.as_fd(),
        MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
        Some(ns.as_fd()),
    )
    .map_err(|e| {
        format!(
            "idmapping {} (mount_setattr MOUNT_ATTR_IDMAP): {e}",
            dir.display()
        )
    })?;
    Ok(tree)
}

/// Unmounts the root filesystem; not mounted is fine.
pub fn unmount(target: &Path) {
    // MNT_DETACH: a process that still holds something in it cannot make removal fail.
    let _ = umount2(target, MntFlags::MNT_DETACH);
    unstage(target);
}
