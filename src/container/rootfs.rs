//! A container's root filesystem around its overlay (mounted by `overlay`): the checks and
//! mount targets made inside it before a runtime sees it, every path resolved as if the root
//! were `/`, so an image's links never lead out of it.

use std::path::{Path, PathBuf};

/// The mount failed.
#[derive(Debug, thiserror::Error)]
#[error("mounting the root filesystem at {target}: {message}")]
pub struct RootfsError {
    /// Where.
    pub target: PathBuf,
    /// Why.
    pub message: String,
}

/// Makes sure each of berth's file mount targets (`/etc/hosts`, ...) resolves to something in
/// the image: where the image has a dangling symlink there (`/etc/resolv.conf` pointing to a
/// resolver's runtime file is common), the file it names is created, with the directories
/// leading to it, inside the root (every step resolves as if the root were `/`, so a link can
/// never name a node path), as runc does. Existing targets are left as they are (not even
/// opened: one could be a device or a FIFO). Runs before the container exists, so nothing
/// races it in the root.
pub fn ensure_file_targets(root: &Path, targets: &[&str]) -> Result<(), RootfsError> {
    for t in targets {
        ensure_target(root, t, Target::File)?;
    }
    Ok(())
}

/// The directories a runtime mounts onto or writes into before it pivots into the root. An
/// image's symlink at one of them would be followed from the node's `/` (libcontainer and
/// runc make `/dev/ptmx`, `/dev/fd`... with plain paths): each must be absent or a real
/// directory.
const RUNTIME_DIRS: [&str; 5] = ["dev", "dev/pts", "dev/shm", "proc", "sys"];

/// Refuses a root whose `/dev`, `/dev/pts`, `/dev/shm`, `/proc` or `/sys` is anything but
/// a directory (a symlink above all), resolving beneath the root without following any link;
/// the error names the path. Runs before any runtime sees the root.
pub fn check_runtime_dirs(root: &Path) -> Result<(), String> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the container's root {}: {e}", root.display()))?;
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    for path in RUNTIME_DIRS {
        let refuse =
            |what: &str| format!("the image's /{path} is {what}; it must be absent or a directory");
        match rustix::fs::openat2(
            &dir,
            path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| format!("/{path}: {e}"))?;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => {}
                    FileType::Symlink => return Err(refuse("a symbolic link")),
                    _ => return Err(refuse("not a directory")),
                }
            }
            // A parent that is absent: nothing below it either.
            Err(rustix::io::Errno::NOENT) => {}
            // Only a link on the way (checked first, so the parent's own check named it) or a
            // file as a parent get here.
            Err(rustix::io::Errno::LOOP) => return Err(refuse("reached through a symbolic link")),
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(refuse("under something not a directory"));
            }
            Err(e) => return Err(format!("checking /{path} in the container's root: {e}")),
        }
    }
    Ok(())
}

/// What a mount target or working directory must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A file (to bind a file over).
    File,
    /// A directory.
    Dir,
}

/// Makes `path` (absolute, inside the container) exist in `root` as `kind` if nothing is
/// there, following the image's symlinks inside the root: a dangling link gets its target
/// made, and missing directories on the way are made (0755). Something already there, of any
/// type, is left for the runtime to judge.
pub fn ensure_target(root: &Path, path: &str, kind: Target) -> Result<(), RootfsError> {
    use rustix::fs::{Mode, OFlags};
    let err = |t: &str, e: rustix::io::Errno| RootfsError {
        target: root.join(t.trim_start_matches('/')),
        message: format!("preparing the mount target {path} (at {t}): {e}"),
    };
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("/", e))?;
    // Follow a chain of dangling links to the path that is missing (bounded, as the kernel
    // bounds link chains).
    let mut want = normalize(path);
    for _ in 0..40 {
        match open_in_root(&dir, &want, OFlags::PATH) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::NOENT) => {}
            // A parent that is not a directory, a loop: the runtime reports it when it mounts.
            Err(_) => return Ok(()),
        }
        let (parent, name) = match want.rsplit_once('/') {
            Some((p, n)) if !n.is_empty() => (if p.is_empty() { "/" } else { p }, n),
            _ => return Ok(()),
        };
        make_dirs(&dir, parent).map_err(|e| err(parent, e))?;
        let Ok(pfd) = open_in_root(&dir, parent, OFlags::PATH | OFlags::DIRECTORY) else {
            return Ok(());
        };
        match rustix::fs::readlinkat(&pfd, name, Vec::new()) {
            Ok(target) => {
                let target = target.to_string_lossy().into_owned();
                want = if target.starts_with('/') {
                    normalize(&target)
                } else {
                    normalize(&format!("{parent}/{target}"))
                };
                continue;
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(_) => return Ok(()),
        }
        let made = match kind {
            Target::File => rustix::fs::openat(
                &pfd_dir(&dir, parent).map_err(|e| err(parent, e))?,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
                Mode::from_raw_mode(0o644),
            )
            .map(drop),
            Target::Dir => rustix::fs::mkdirat(
                &pfd_dir(&dir, parent).map_err(|e| err(parent, e))?,
                name,
                Mode::from_raw_mode(0o755),
            ),
        };
        return match made {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(err(&want, e)),
        };
    }
    Ok(())
}

/// Opens `path` as if `dir` were the root: every symlink and `..` stays inside it. A walk
/// through `..` fails EAGAIN whenever a mount or rename happens anywhere on the node (the
/// kernel cannot vouch for it then), which under a busy node is often: retried.
pub(super) fn open_in_root(
    dir: &std::os::fd::OwnedFd,
    path: &str,
    flags: rustix::fs::OFlags,
) -> rustix::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags | OFlags::CLOEXEC, Mode::empty(), how) {
            Err(rustix::io::Errno::AGAIN) if tries < 10_000 => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// Where `path` leads inside `root`, every link followed inside it, as an absolute path with
/// no link left, if it exists. Mount destinations go to the runtime in this form: libcontainer
/// resolves them itself with `openat2(RESOLVE_IN_ROOT)`, gives up on EAGAIN after a burst of
/// retries, and then took an image's `/etc/hosts -> ../run/netconf/hosts` for a missing file
/// (EEXIST) on a busy node. A path without links needs no `..`, so no EAGAIN.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<String> {
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsRawFd;
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let fd = open_in_root(&dir, path, OFlags::PATH).ok()?;
    let fd_path = |raw: i32| std::fs::read_link(format!("/proc/self/fd/{raw}")).ok();
    let (real, base) = (fd_path(fd.as_raw_fd())?, fd_path(dir.as_raw_fd())?);
    let inside = real.strip_prefix(&base).ok()?;
    Some(format!("/{}", inside.to_str()?))
}

/// The directory `path` in the root, opened for making entries in.
fn pfd_dir(dir: &std::os::fd::OwnedFd, path: &str) -> rustix::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::OFlags;
    open_in_root(dir, path, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// Makes each missing directory of `path` in the root, resolving inside it; a component that
/// is a dangling link is left alone (the caller then finds `path` missing and stops).
fn make_dirs(dir: &std::os::fd::OwnedFd, path: &str) -> rustix::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let mut cur = String::new();
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let parent = if cur.is_empty() {
            "/".to_string()
        } else {
            cur.clone()
        };
        cur = format!("{cur}/{comp}");
        match open_in_root(dir, &cur, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(_) => continue,
            Err(rustix::io::Errno::NOENT) => {}
            Err(_) => return Ok(()),
        }
        // A parent that cannot be opened is a dangling link: left for the runtime to report.
        let Ok(pfd) = pfd_dir(dir, &parent) else {
            return Ok(());
        };
        match rustix::fs::mkdirat(&pfd, comp, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `path` made absolute with `.` and `..` resolved lexically, `..` stopping at the root.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}
