//! Small filesystem helpers shared by the image, container and zygote code: measurements,
//! and mount_setattr(2), which no crate here wraps.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes (allocated blocks) and inodes under `dir`, not crossing into other filesystems and
/// not following symlinks. A missing directory measures zero.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = top.dev();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            bytes += m.blocks() * 512;
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// MOUNT_ATTR_RDONLY.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// MOUNT_ATTR_NOSUID.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// MOUNT_ATTR_NODEV.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// MOUNT_ATTR_IDMAP (needs `userns`).
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Sets `attrs` on the (detached) mount `mnt`, idmapped with the user namespace `userns` when
/// MOUNT_ATTR_IDMAP is among them.
pub fn mount_setattr(
    mnt: std::os::fd::BorrowedFd<'_>,
    attrs: u64,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    setattr(mnt, attrs, userns, libc::AT_EMPTY_PATH)
}

/// `mount_setattr` on `mnt` and every mount below it (AT_RECURSIVE).
pub fn mount_setattr_recursive(
    mnt: std::os::fd::BorrowedFd<'_>,
    attrs: u64,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    setattr(mnt, attrs, userns, libc::AT_EMPTY_PATH | libc::AT_RECURSIVE)
}

fn setattr(
    mnt: std::os::fd::BorrowedFd<'_>,
    attrs: u64,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
    flags: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map(|f| f.as_raw_fd() as u64).unwrap_or(0),
    };
    // SAFETY: mount_setattr reads `attr` (valid, of the size given) and the empty path string;
    // `mnt` and `userns` are open descriptors borrowed for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
