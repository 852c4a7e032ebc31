//! Unpacking one layer tar into an empty directory that becomes an overlayfs lower dir.
//!
//! Layers come from registries and are hostile until proven otherwise. Every path is resolved by
//! the kernel beneath the snapshot root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`),
//! never by string checks alone, so no entry can create or change anything outside it: `..`,
//! absolute paths, a path through a symlink, a hard link pointing out, and a symlink replacing a
//! directory fail the layer with a message naming the entry.
//!
//! Whiteouts become what overlayfs expects: `.wh.NAME` a 0/0 character device, `.wh..wh..opq`
//! the `trusted.overlay.opaque=y` xattr on its directory. Ownership, modes (setuid included),
//! xattrs, hard links, symlinks, device nodes and mtimes are kept.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry that would escape the snapshot or is malformed.
    #[error("layer entry {entry:?} rejected: {why}")]
    Rejected {
        /// The entry's path as written in the tar.
        entry: String,
        /// Why.
        why: String,
    },
    /// Reading the tar stream failed (truncated, corrupt, or the download stopped).
    #[error("reading the layer: {0}")]
    Read(std::io::Error),
    /// Writing an entry failed.
    #[error("writing layer entry {entry:?}: {source}")]
    Write {
        /// The entry.
        entry: String,
        /// The error.
        source: std::io::Error,
    },
}

impl UnpackError {
    /// Whether the disk filled up.
    pub fn is_no_space(&self) -> bool {
        match self {
            UnpackError::Write { source, .. } | UnpackError::Read(source) => {
                crate::store::is_no_space(source)
            }
            _ => false,
        }
    }
}

/// What an unpacked layer occupies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnpackStats {
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries created (files, dirs, links, devices, whiteouts).
    pub inodes: u64,
}

/// A path split into checked components: no `..`, not absolute, `.` dropped.
struct CleanPath<'a> {
    parents: Vec<&'a [u8]>,
    name: Option<&'a [u8]>,
}

fn clean(raw: &[u8]) -> Result<CleanPath<'_>, &'static str> {
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

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// Unpacks the tar stream `reader` into the empty directory `dest`.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Write {
        entry: String::new(),
        source: e.into(),
    })?;
    let mut u = Unpacker {
        root,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        cached_parent: None,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for entry in entries {
        let entry = entry.map_err(UnpackError::Read)?;
        u.entry(entry)?;
    }
    u.finish()?;
    Ok(u.stats)
}

struct Unpacker {
    root: OwnedFd,
    stats: UnpackStats,
    /// Directory mtimes are set last: creating children changes them.
    dir_times: Vec<(Vec<u8>, i64)>,
    /// The parent directory of the previous entry: tars list a directory's entries together.
    cached_parent: Option<(Vec<u8>, OwnedFd)>,
}

/// Metadata of an entry, PAX overrides applied.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let reject = |why: &str| UnpackError::Rejected {
            entry: shown.clone(),
            why: why.to_string(),
        };
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let path = clean(&raw_path).map_err(reject)?;
        let meta = self.meta(&mut entry).map_err(UnpackError::Read)?;
        let werr = |source: std::io::Error| UnpackError::Write {
            entry: shown.clone(),
            source,
        };

        let Some(name) = path.name else {
            // The layer's root itself ("./"): apply its attributes to the snapshot root.
            if kind == tar::EntryType::Directory {
                let fd = self.root.try_clone().map_err(werr)?;
                set_attrs(fd.as_fd(), &meta).map_err(|e| werr(e.into()))?;
                self.dir_times.push((Vec::new(), meta.mtime));
            }
            return Ok(());
        };
        let parent_key = path.parents.join(&b'/');
        let parent = self
            .parent(&parent_key, &path.parents)
            .map_err(|e| match e {
                Errno::LOOP | Errno::XDEV | Errno::NOTDIR => {
                    reject(&diagnose(self.root.as_fd(), &path.parents))
                }
                e => werr(e.into()),
            })?;
        let parent = parent.as_fd();

        // Whiteouts.
        if name == OPAQUE_MARKER {
            rustix::fs::fsetxattr(parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| werr(e.into()))?;
            self.stats.inodes += 1;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(reject("malformed whiteout"));
            }
            remove_existing(parent, hidden).map_err(|e| werr(e.into()))?;
            rustix::fs::mknodat(
                parent,
                OsStr::from_bytes(hidden),
                FileType::CharacterDevice,
                Mode::empty(),
                0,
            )
            .map_err(|e| werr(e.into()))?;
            self.stats.inodes += 1;
            return Ok(());
        }

        let name_os = OsStr::from_bytes(name);
        let existing = rustix::fs::statat(parent, name_os, AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_is_dir = existing
            .as_ref()
            .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);

        match kind {
            tar::EntryType::Directory => {
                if existing.is_some() && !existing_is_dir {
                    remove_existing(parent, name).map_err(|e| werr(e.into()))?;
                }
                if !existing_is_dir {
                    rustix::fs::mkdirat(parent, name_os, Mode::from_raw_mode(0o700))
                        .map_err(|e| werr(e.into()))?;
                }
                let fd = rustix::fs::openat2(
                    parent,
                    name_os,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                    resolve_flags(),
                )
                .map_err(|e| werr(e.into()))?;
                set_attrs(fd.as_fd(), &meta).map_err(|e| werr(e.into()))?;
                let mut full = parent_key.clone();
                if !full.is_empty() {
                    full.push(b'/');
                }
                full.extend_from_slice(name);
                self.dir_times.push((full, meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if kind == tar::EntryType::GNUSparse {
                    return Err(reject("sparse files are not supported"));
                }
                if existing.is_some() {
                    self.replace(parent, name).map_err(|e| werr(e.into()))?;
                }
                let fd = rustix::fs::openat2(
                    parent,
                    name_os,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::CLOEXEC
                        | OFlags::NOFOLLOW,
                    Mode::from_raw_mode(0o600),
                    resolve_flags(),
                )
                .map_err(|e| werr(e.into()))?;
                let mut file = std::fs::File::from(fd);
                let n = std::io::copy(&mut entry, &mut file).map_err(|e| {
                    // A read failure is the stream's, a write failure the disk's.
                    if e.kind() == std::io::ErrorKind::UnexpectedEof || e.raw_os_error().is_none() {
                        UnpackError::Read(e)
                    } else {
                        werr(e)
                    }
                })?;
                self.stats.bytes += n;
                set_attrs(file.as_fd(), &meta).map_err(|e| werr(e.into()))?;
                rustix::fs::futimens(&file, &times(meta.mtime)).map_err(|e| werr(e.into()))?;
            }
            tar::EntryType::Symlink => {
                if existing_is_dir {
                    return Err(reject("a symlink would replace a directory"));
                }
                if existing.is_some() {
                    remove_existing(parent, name).map_err(|e| werr(e.into()))?;
                }
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| reject("symlink without a target"))?;
                // The target is data, not a path we follow: it is only resolved later, inside
                // the container's root.
                rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, name_os)
                    .map_err(|e| werr(e.into()))?;
                set_attrs_at(parent, name_os, &meta, false).map_err(|e| werr(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| reject("hard link without a target"))?
                    .into_owned();
                let t =
                    clean(&target).map_err(|why| reject(&format!("hard link target: {why}")))?;
                let Some(tname) = t.name else {
                    return Err(reject("hard link to the layer root"));
                };
                let tparent =
                    open_beneath_dir(self.root.as_fd(), &t.parents).map_err(|e| match e {
                        Errno::LOOP | Errno::XDEV => {
                            reject("hard link target passes through a symlink")
                        }
                        Errno::NOENT | Errno::NOTDIR => {
                            reject("hard link target does not exist in this layer")
                        }
                        e => werr(e.into()),
                    })?;
                if existing.is_some() {
                    if tparent_same(&t.parents, &path.parents) && tname == name {
                        return Ok(()); // a link to itself: nothing to do
                    }
                    self.replace(parent, name).map_err(|e| werr(e.into()))?;
                }
                rustix::fs::linkat(
                    tparent.as_fd(),
                    OsStr::from_bytes(tname),
                    parent,
                    name_os,
                    AtFlags::empty(),
                )
                .map_err(|e| match e {
                    Errno::NOENT => reject("hard link target does not exist in this layer"),
                    Errno::PERM => reject("hard link target is a directory"),
                    e => werr(e.into()),
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if existing.is_some() {
                    self.replace(parent, name).map_err(|e| werr(e.into()))?;
                }
                let (ft, dev) = match kind {
                    tar::EntryType::Char => (FileType::CharacterDevice, device(&entry)),
                    tar::EntryType::Block => (FileType::BlockDevice, device(&entry)),
                    _ => (FileType::Fifo, 0),
                };
                rustix::fs::mknodat(parent, name_os, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| werr(e.into()))?;
                set_attrs_at(parent, name_os, &meta, true).map_err(|e| werr(e.into()))?;
            }
            other => return Err(reject(&format!("unsupported entry type {other:?}"))),
        }
        self.stats.inodes += 1;
        Ok(())
    }

    /// The parent directory of an entry, created (0755, root) where the tar omitted it.
    fn parent(&mut self, key: &[u8], comps: &[&[u8]]) -> Result<OwnedFd, Errno> {
        if let Some((k, fd)) = &self.cached_parent
            && k.as_slice() == key
        {
            return fd
                .try_clone()
                .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO));
        }
        let fd = match open_beneath_dir(self.root.as_fd(), comps) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                let mut cur = self
                    .root
                    .try_clone()
                    .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
                for c in comps {
                    let c = OsStr::from_bytes(c);
                    match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o755)) {
                        Ok(()) => self.stats.inodes += 1,
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    cur = rustix::fs::openat2(
                        &cur,
                        c,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                        Mode::empty(),
                        resolve_flags(),
                    )?;
                }
                cur
            }
            Err(e) => return Err(e),
        };
        let clone = fd
            .try_clone()
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        self.cached_parent = Some((key.to_vec(), clone));
        Ok(fd)
    }

    /// Removes what stands at `name` so a new entry can take its place.
    fn replace(&mut self, parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
        // A removed directory may be the cached parent of later entries.
        self.cached_parent = None;
        remove_existing(parent, name)
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> std::io::Result<Meta> {
        let h = entry.header();
        let mut meta = Meta {
            mode: h.mode()?,
            // Some writers leave these fields blank; like GNU tar's lenient mode, that is 0.
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime: h.mtime().unwrap_or(0) as i64,
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let key = ext.key().unwrap_or("");
                let value = ext.value_bytes();
                let num = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
                };
                match key {
                    "uid" => meta.uid = num().unwrap_or(meta.uid as i64) as u32,
                    "gid" => meta.gid = num().unwrap_or(meta.gid as i64) as u32,
                    "mtime" => meta.mtime = num().unwrap_or(meta.mtime),
                    k if k.starts_with(PAX_XATTR_PREFIX) => meta
                        .xattrs
                        .push((k[PAX_XATTR_PREFIX.len()..].to_string(), value.to_vec())),
                    _ => {}
                }
            }
        }
        Ok(meta)
    }

    /// Sets directory mtimes, deepest first, once every child exists.
    fn finish(&mut self) -> Result<(), UnpackError> {
        self.cached_parent = None;
        let mut dirs = std::mem::take(&mut self.dir_times);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
        for (path, mtime) in dirs {
            let comps: Vec<&[u8]> = path
                .split(|b| *b == b'/')
                .filter(|c| !c.is_empty())
                .collect();
            // A directory later replaced by something else is simply skipped.
            if let Ok(fd) = open_beneath_dir(self.root.as_fd(), &comps) {
                let _ = rustix::fs::futimens(&fd, &times(mtime));
            }
        }
        Ok(())
    }
}

/// Says which component of a path the kernel refused to walk through, and why.
fn diagnose(root: BorrowedFd<'_>, comps: &[&[u8]]) -> String {
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

fn tparent_same(a: &[&[u8]], b: &[&[u8]]) -> bool {
    a == b
}

/// Opens a directory beneath `root` by components, refusing symlinks anywhere on the way.
fn open_beneath_dir(root: BorrowedFd<'_>, comps: &[&[u8]]) -> Result<OwnedFd, Errno> {
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
fn remove_existing(parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let name_os = OsStr::from_bytes(name);
    match rustix::fs::unlinkat(parent, name_os, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => remove_tree(parent, name_os),
        Err(e) => Err(e),
    }
}

fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
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
fn set_attrs_at(
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
fn set_attrs(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Errno> {
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

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn device<R: Read>(entry: &tar::Entry<'_, R>) -> u64 {
    let h = entry.header();
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    rustix::fs::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).ok();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    /// A tar built entry by entry; raw names bypass the tar crate's own path checks, as a
    /// hostile layer would.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn raw(
            mut self,
            name: &[u8],
            kind: tar::EntryType,
            data: &[u8],
            link: Option<&[u8]>,
            mode: u32,
        ) -> Self {
            let mut h = header("x", kind, data.len() as u64, mode);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                gnu.linkname = [0; 100];
                gnu.linkname[..l.len()].copy_from_slice(l);
            }
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
            self.raw(name.as_bytes(), tar::EntryType::Regular, data, None, mode)
        }
        fn dir(self, name: &str) -> Self {
            self.raw(name.as_bytes(), tar::EntryType::Directory, b"", None, 0o755)
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(
                name.as_bytes(),
                tar::EntryType::Symlink,
                b"",
                Some(target.as_bytes()),
                0o777,
            )
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.raw(
                name.as_bytes(),
                tar::EntryType::Link,
                b"",
                Some(target.as_bytes()),
                0o644,
            )
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack_into(
        t: Vec<u8>,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Result<UnpackStats, UnpackError>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("snap");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(&t[..], &dest);
        (d, dest, r)
    }

    fn rejected(t: Vec<u8>, entry: &str) {
        let (d, _dest, r) = unpack_into(t);
        match r {
            Err(UnpackError::Rejected { entry: e, .. }) => assert_eq!(e, entry),
            other => panic!("expected rejection of {entry}, got {other:?}"),
        }
        // Nothing was created beside the snapshot.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
    }

    #[test]
    fn files_dirs_links_modes_and_owners_are_kept() {
        let t = Tar::new()
            .dir("bin")
            .file("bin/tool", b"#!/bin/sh\n", 0o4755)
            .hardlink("bin/tool2", "bin/tool")
            .symlink("bin/sh", "/bin/busybox")
            .file("etc/deep/file", b"x", 0o640)
            .bytes();
        let (_d, dest, r) = unpack_into(t);
        let stats = r.unwrap();
        assert_eq!(stats.bytes, 11);
        let m = std::fs::metadata(dest.join("bin/tool")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(m.nlink(), 2);
        assert_eq!(
            std::fs::read_link(dest.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(std::fs::read(dest.join("etc/deep/file")).unwrap(), b"x");
        assert_eq!(m.mtime(), 1_700_000_000);
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts_and_opaque_xattrs() {
        let t = Tar::new()
            .dir("a")
            .file("a/.wh.gone", b"", 0o644)
            .file("a/.wh..wh..opq", b"", 0o644)
            .bytes();
        let (_d, dest, r) = unpack_into(t);
        r.unwrap();
        let m = std::fs::symlink_metadata(dest.join("a/gone")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &m.file_type()
        ));
        assert_eq!(m.rdev(), 0);
        let mut buf = [0u8; 4];
        let n = rustix::fs::getxattr(dest.join("a"), OPAQUE_XATTR, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"y");
        assert!(!dest.join("a/.wh..wh..opq").exists());
    }

    #[test]
    fn dot_dot_is_rejected() {
        rejected(
            Tar::new().file("a/../../escape", b"x", 0o644).bytes(),
            "a/../../escape",
        );
    }

    #[test]
    fn absolute_paths_are_rejected() {
        rejected(
            Tar::new().file("/etc/escape", b"x", 0o644).bytes(),
            "/etc/escape",
        );
    }

    #[test]
    fn writing_through_a_symlink_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().to_str().unwrap().to_string();
        rejected(
            Tar::new()
                .symlink("link", &outside)
                .file("link/escape", b"x", 0o644)
                .bytes(),
            "link/escape",
        );
        assert!(!d.path().join("escape").exists());
        rejected(
            Tar::new()
                .symlink("rel", "..")
                .file("rel/escape", b"x", 0o644)
                .bytes(),
            "rel/escape",
        );
    }

    #[test]
    fn hard_links_pointing_out_are_rejected() {
        rejected(Tar::new().hardlink("hl", "../outside").bytes(), "hl");
        rejected(Tar::new().hardlink("hl", "/etc/passwd").bytes(), "hl");
        rejected(
            Tar::new()
                .symlink("s", "/etc")
                .hardlink("hl", "s/passwd")
                .bytes(),
            "hl",
        );
    }

    #[test]
    fn a_symlink_replacing_a_directory_is_rejected() {
        rejected(
            Tar::new()
                .dir("d")
                .symlink("d", "/tmp")
                .file("d/x", b"x", 0o644)
                .bytes(),
            "d",
        );
    }

    #[test]
    fn later_entries_replace_earlier_files() {
        let t = Tar::new()
            .file("f", b"old", 0o644)
            .file("f", b"new", 0o600)
            .bytes();
        let (_d, dest, r) = unpack_into(t);
        r.unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"new");
    }

    #[test]
    fn a_truncated_stream_is_a_read_error() {
        let mut t = Tar::new().file("big", &[7u8; 4096], 0o644).bytes();
        t.truncate(1024);
        let (_d, _dest, r) = unpack_into(t);
        assert!(matches!(r, Err(UnpackError::Read(_))), "{r:?}");
    }
}
