//! A container's root filesystem: an overlay of the image's snapshots (read-only lower dirs)
//! and a writable upper dir of its own. The mount uses the new mount API with one `lowerdir+`
//! per layer where the kernel has it (6.8+), so no image has too many layers for the one-page
//! limit of mount(2)'s option string; older kernels get that string.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The mount failed.
#[derive(Debug, thiserror::Error)]
#[error("mounting the root filesystem at {target}: {message}")]
pub struct RootfsError {
    /// Where.
    pub target: PathBuf,
    /// Why.
    pub message: String,
}

/// Mounts the overlay at `target`. `lower` is top layer first.
pub fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    let err = |message: String| RootfsError {
        target: target.to_owned(),
        message,
    };
    if lower.is_empty() {
        return Err(err("the image has no layers".into()));
    }
    match mount_new_api(lower, upper, work, target) {
        Ok(()) => return Ok(()),
        // Kernels without `lowerdir+` (before 6.8) or without fsopen: the classic way.
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {}
        Err(e) => return Err(err(format!("fsopen/fsconfig: {e}"))),
    }
    let lowers: Vec<String> = lower.iter().map(|p| escape(&p.to_string_lossy())).collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        escape(&upper.to_string_lossy()),
        escape(&work.to_string_lossy())
    );
    if data.len() >= 4096 {
        return Err(err(format!(
            "{} layers do not fit in mount(2)'s options on this kernel",
            lower.len()
        )));
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| err(e.to_string()))
}

fn mount_new_api(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), rustix::io::Errno> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for l in lower {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_path())?;
    }
    rustix::mount::fsconfig_set_string(&fs, "upperdir", upper)?;
    rustix::mount::fsconfig_set_string(&fs, "workdir", work)?;
    rustix::mount::fsconfig_create(&fs)?;
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
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

/// Unmounts the root filesystem; not mounted is fine.
pub fn unmount(target: &Path) {
    // MNT_DETACH: a process that still holds something in it cannot make removal fail.
    let _ = umount2(target, MntFlags::MNT_DETACH);
}

/// Makes sure each of berth's file mount targets (`/etc/hosts`, ...) resolves to something in
/// the image: where the image has a dangling symlink there (`/etc/resolv.conf` pointing to a
/// resolver's runtime file is common), the file it names is created, inside the root (the
/// kernel resolves the link as if the root were `/`, so it can never name a node path), as
/// other runtimes do. Existing targets are left as they are (not even opened: one could be a
/// device or a FIFO). Runs before the container exists, so nothing races it in the root.
pub fn ensure_file_targets(root: &Path, targets: &[&str]) -> Result<(), RootfsError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let err = |t: &str, e: rustix::io::Errno| RootfsError {
        target: root.join(t.trim_start_matches('/')),
        message: format!("preparing the mount target {t}: {e}"),
    };
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("/", e))?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    for t in targets {
        match rustix::fs::openat2(&dir, *t, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), how) {
            Ok(_) => continue,
            Err(rustix::io::Errno::NOENT) => {}
            // A parent that is not a directory: libcontainer reports it when it mounts.
            Err(_) => continue,
        }
        match rustix::fs::openat2(
            &dir,
            *t,
            OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::from_raw_mode(0o644),
            how,
        ) {
            Ok(_) => {}
            // The link names a directory that does not exist either: nothing to make it in.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(err(t, e)),
        }
    }
    Ok(())
}
