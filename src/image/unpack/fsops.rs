//! The filesystem steps of unpacking, each beneath the snapshot root and following no
//! symlink: cleaning entry paths, opening parents, removing what an entry replaces, setting
//! owners, modes, xattrs and times.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

/// A path split into checked components: no `..`, not absolute, `.` dropped.
pub(super) struct CleanPath<'a> {
    pub(super) parents: Vec<&'a [u8]>,
    pub(super) name: Option<&'a [u8]>,
}

pub(super) fn clean(raw: &[u8]) -> Result<CleanPath<'_>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut comps: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("path contains '..'"),
            c if c.contains(&0) => return Err("path contains a NUL byte"),
            c => comps.push(c),
        }
    }
    let name = comps.pop();
    Ok(CleanPath {
        parents: comps,
        name,
    })
}

pub(super) fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// Metadata of an entry, PAX overrides applied.
pub(super) struct Meta {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: i64,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
}

/// Says which component of a path the kernel refused to walk through, and why.
pub(super) fn diagnose(root: BorrowedFd<'_>, comps: &[&[u8]]) -> String {
    let mut cur = match root.try_clone_to_owned() {
        Ok(fd) => fd,
        Err(_) => return "the path cannot be resolved inside the layer".into(),
    };
    for (i, c) in comps.iter().enumerate() {
        let prefix = String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned();
        let name = OsStr::from_bytes(c);
        match rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    return format!("the path passes through the symlink {prefix:?}");
                }
                FileType::Directory => {}
                _ => return format!("{prefix:?} on the path is not a directory"),
            },
            Err(_) => break,
        }
        match rustix::fs::openat2(
            &cur,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve_flags(),
        ) {
            Ok(fd) => cur = fd,
            Err(_) => return format!("{prefix:?} on the path is another mount"),
        }
    }
    "the path leaves the layer".into()
}

pub(super) fn tparent_same(a: &[&[u8]], b: &[&[u8]]) -> bool {
    a == b
}

/// Opens a directory beneath `root` by components, refusing symlinks anywhere on the way.
pub(super) fn open_beneath_dir(root: BorrowedFd<'_>, comps: &[&[u8]]) -> Result<OwnedFd, Errno> {
    let path = if comps.is_empty() {
        b".".to_vec()
    } else {
        comps.join(&b'/')
    };
    rustix::fs::openat2(
        root,
        OsStr::from_bytes(&path),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        resolve_flags(),
    )
}

/// Removes a file, link, device or a whole directory tree at `name` under `parent`.
pub(super) fn remove_existing(parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let name_os = OsStr::from_bytes(name);
    match rustix::fs::unlinkat(parent, name_os, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => remove_tree(parent, name_os),
        Err(e) => Err(e),
    }
}

pub(super) fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let dir = rustix::fs::openat2(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        resolve_flags(),
    )?;
    let mut children = Vec::new();
    for e in rustix::fs::Dir::read_from(&dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push(n.to_vec());
        }
    }
    for c in children {
        remove_existing(dir.as_fd(), &c)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// Owner, mode (unless a symlink, whose mode means nothing) and mtime of a non-regular entry,
/// never following a symlink.
pub(super) fn set_attrs_at(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    chmod: bool,
) -> Result<(), Errno> {
    let (uid, gid) = (Uid::from_raw(meta.uid), Gid::from_raw(meta.gid));
    rustix::fs::chownat(
        parent,
        name,
        Some(uid),
        Some(gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if chmod {
        rustix::fs::chmodat(
            parent,
            name,
            Mode::from_raw_mode(meta.mode & 0o7777),
            AtFlags::empty(),
        )?;
    }
    rustix::fs::utimensat(parent, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
}

/// Owner, mode (after the owner, so setuid bits survive chown) and xattrs.
pub(super) fn set_attrs(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Errno> {
    rustix::fs::fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))?;
    for (k, v) in &meta.xattrs {
        // The overlay's own xattrs in a layer would forge whiteouts or redirects: never copied.
        if k.starts_with("trusted.overlay.") {
            continue;
        }
        match rustix::fs::fsetxattr(fd, k.as_str(), v, XattrFlags::empty()) {
            Ok(()) => {}
            // A filesystem without xattr support, or a namespace it refuses: the file is still
            // usable, as with other runtimes.
            Err(Errno::NOTSUP) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

pub(super) fn device<R: Read>(entry: &tar::Entry<'_, R>) -> u64 {
    let h = entry.header();
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    rustix::fs::makedev(major, minor)
}
