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

use rustix::fs::{AtFlags, FileType, Mode, OFlags, XattrFlags};
use rustix::io::Errno;

mod fsops;
mod headers;

pub use headers::MAX_HEADER_BYTES;

use fsops::{
    Meta, clean, device, diagnose, open_beneath_dir, remove_existing, resolve_flags, set_attrs,
    set_attrs_at, times, tparent_same,
};

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
    /// An entry or the layer goes past a limit (an extension header's size, the layer's bytes
    /// or inodes): refused before it takes the memory or the disk.
    #[error("layer entry {entry:?} refused: {why}")]
    TooLarge {
        /// The entry's path as written in the tar ("" for the layer as a whole).
        entry: String,
        /// Which limit, and by how much.
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

impl From<headers::HeaderError> for UnpackError {
    fn from(e: headers::HeaderError) -> UnpackError {
        match e {
            headers::HeaderError::TooLarge { entry, why } => UnpackError::TooLarge { entry, why },
            headers::HeaderError::Rejected { entry, why } => UnpackError::Rejected { entry, why },
            headers::HeaderError::Read(e) => UnpackError::Read(e),
        }
    }
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

/// What one layer may hold (`[images] max_layer_bytes`, `max_layer_inodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed bytes of the whole tar stream.
    pub bytes: u64,
    /// Entries created.
    pub inodes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bytes: crate::config::DEFAULT_MAX_LAYER_BYTES,
            inodes: crate::config::DEFAULT_MAX_LAYER_INODES,
        }
    }
}

/// Unpacks the tar stream `reader` into the empty directory `dest`, creating at most
/// `max_inodes` entries (the caller bounds the stream's bytes).
pub fn unpack(reader: impl Read, dest: &Path, max_inodes: u64) -> Result<UnpackStats, UnpackError> {
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
        max_inodes,
    };
    let mut archive = tar::Archive::new(reader);
    // Raw: extension entries come to us, so their size is judged before they are read.
    let entries = archive.entries().map_err(UnpackError::Read)?.raw(true);
    let mut ext = headers::Extensions::default();
    for entry in entries {
        let mut entry = entry.map_err(UnpackError::Read)?;
        if headers::Extensions::is_extension(entry.header().entry_type()) {
            ext.take(&mut entry)?;
            continue;
        }
        u.entry(entry, &std::mem::take(&mut ext))?;
    }
    if ext.pending() {
        return Err(rejected(
            "",
            "extension headers at the end of the layer describe no entry",
        ));
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
    max_inodes: u64,
}

/// Where an entry goes: its parent directory (open), its name, and what is there already.
struct Place<'a> {
    parent: BorrowedFd<'a>,
    /// The parent's path in the layer (`a/b`), and its components.
    parent_key: &'a [u8],
    parents: &'a [&'a [u8]],
    name: &'a [u8],
    /// The entry's path as the tar names it, for messages.
    shown: &'a str,
    exists: bool,
    existing_is_dir: bool,
}

impl Place<'_> {
    fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(self.name)
    }

    fn reject(&self, why: &str) -> UnpackError {
        rejected(self.shown, why)
    }

    fn werr(&self, source: std::io::Error) -> UnpackError {
        write_error(self.shown, source)
    }
}

fn rejected(entry: &str, why: &str) -> UnpackError {
    UnpackError::Rejected {
        entry: entry.to_string(),
        why: why.to_string(),
    }
}

fn write_error(entry: &str, source: std::io::Error) -> UnpackError {
    UnpackError::Write {
        entry: entry.to_string(),
        source,
    }
}

impl Unpacker {
    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        ext: &headers::Extensions,
    ) -> Result<(), UnpackError> {
        let raw_path = ext.path(&entry);
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let kind = entry.header().entry_type();
        ext.check_size(&entry)
            .map_err(|why| rejected(&shown, &why))?;
        let path = clean(&raw_path).map_err(|why| rejected(&shown, why))?;
        // Checked before each entry; an entry's missing parents count too and may pass the
        // limit by the depth of one path, which is bounded by the tar's name length.
        if self.stats.inodes >= self.max_inodes {
            return Err(UnpackError::TooLarge {
                entry: shown,
                why: format!(
                    "the layer has more than {} entries ([images] max_layer_inodes)",
                    self.max_inodes
                ),
            });
        }
        let meta = self.meta(&mut entry, ext).map_err(UnpackError::Read)?;
        let Some(name) = path.name else {
            // The layer's root itself ("./"): apply its attributes to the snapshot root.
            if kind == tar::EntryType::Directory {
                let werr = |e: std::io::Error| write_error(&shown, e);
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
                    rejected(&shown, &diagnose(self.root.as_fd(), &path.parents))
                }
                e => write_error(&shown, e.into()),
            })?;
        let existing =
            rustix::fs::statat(&parent, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).ok();
        let at = Place {
            parent: parent.as_fd(),
            parent_key: &parent_key,
            parents: &path.parents,
            name,
            shown: &shown,
            existing_is_dir: existing
                .as_ref()
                .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            exists: existing.is_some(),
        };
        if self.whiteout(&at)? {
            return Ok(());
        }
        match kind {
            tar::EntryType::Directory => self.dir(&at, &meta)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.regular(&at, &meta, &mut entry)?
            }
            tar::EntryType::GNUSparse => return Err(at.reject("sparse files are not supported")),
            tar::EntryType::Symlink => self.symlink(&at, &meta, ext.link(&entry))?,
            tar::EntryType::Link => {
                if !self.hard_link(&at, ext.link(&entry))? {
                    return Ok(());
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.node(&at, &meta, kind, &entry)?
            }
            other => return Err(at.reject(&format!("unsupported entry type {other:?}"))),
        }
        self.stats.inodes += 1;
        Ok(())
    }

    /// A whiteout (`.wh.<name>`) or opaque marker: made into the overlay's form. Whether the
    /// entry was one.
    fn whiteout(&mut self, at: &Place<'_>) -> Result<bool, UnpackError> {
        if at.name == OPAQUE_MARKER {
            rustix::fs::fsetxattr(at.parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| at.werr(e.into()))?;
            self.stats.inodes += 1;
            return Ok(true);
        }
        let Some(hidden) = at.name.strip_prefix(WHITEOUT_PREFIX) else {
            return Ok(false);
        };
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(at.reject("malformed whiteout"));
        }
        remove_existing(at.parent, hidden).map_err(|e| at.werr(e.into()))?;
        rustix::fs::mknodat(
            at.parent,
            OsStr::from_bytes(hidden),
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .map_err(|e| at.werr(e.into()))?;
        self.stats.inodes += 1;
        Ok(true)
    }

    fn dir(&mut self, at: &Place<'_>, meta: &Meta) -> Result<(), UnpackError> {
        if at.exists && !at.existing_is_dir {
            remove_existing(at.parent, at.name).map_err(|e| at.werr(e.into()))?;
        }
        if !at.existing_is_dir {
            rustix::fs::mkdirat(at.parent, at.name_os(), Mode::from_raw_mode(0o700))
                .map_err(|e| at.werr(e.into()))?;
        }
        let fd = rustix::fs::openat2(
            at.parent,
            at.name_os(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| at.werr(e.into()))?;
        set_attrs(fd.as_fd(), meta).map_err(|e| at.werr(e.into()))?;
        let mut full = at.parent_key.to_vec();
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(at.name);
        self.dir_times.push((full, meta.mtime));
        Ok(())
    }

    fn regular(
        &mut self,
        at: &Place<'_>,
        meta: &Meta,
        entry: &mut impl Read,
    ) -> Result<(), UnpackError> {
        if at.exists {
            self.replace(at.parent, at.name)
                .map_err(|e| at.werr(e.into()))?;
        }
        let fd = rustix::fs::openat2(
            at.parent,
            at.name_os(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
            resolve_flags(),
        )
        .map_err(|e| at.werr(e.into()))?;
        let mut file = std::fs::File::from(fd);
        let n = std::io::copy(entry, &mut file).map_err(|e| {
            // A read failure is the stream's, a write failure the disk's.
            if e.kind() == std::io::ErrorKind::UnexpectedEof || e.raw_os_error().is_none() {
                UnpackError::Read(e)
            } else {
                at.werr(e)
            }
        })?;
        self.stats.bytes += n;
        set_attrs(file.as_fd(), meta).map_err(|e| at.werr(e.into()))?;
        rustix::fs::futimens(&file, &times(meta.mtime)).map_err(|e| at.werr(e.into()))
    }

    fn symlink(
        &mut self,
        at: &Place<'_>,
        meta: &Meta,
        target: Option<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        if at.existing_is_dir {
            return Err(at.reject("a symlink would replace a directory"));
        }
        if at.exists {
            remove_existing(at.parent, at.name).map_err(|e| at.werr(e.into()))?;
        }
        let target = target.ok_or_else(|| at.reject("symlink without a target"))?;
        // The target is data, not a path we follow: it is only resolved later, inside the
        // container's root.
        rustix::fs::symlinkat(OsStr::from_bytes(&target), at.parent, at.name_os())
            .map_err(|e| at.werr(e.into()))?;
        set_attrs_at(at.parent, at.name_os(), meta, false).map_err(|e| at.werr(e.into()))
    }

    /// A hard link to an entry of this layer (never out of it). Whether one was made (a link
    /// to itself is nothing to do).
    fn hard_link(&mut self, at: &Place<'_>, target: Option<Vec<u8>>) -> Result<bool, UnpackError> {
        let target = target.ok_or_else(|| at.reject("hard link without a target"))?;
        let t = clean(&target).map_err(|why| at.reject(&format!("hard link target: {why}")))?;
        let Some(tname) = t.name else {
            return Err(at.reject("hard link to the layer root"));
        };
        let tparent = open_beneath_dir(self.root.as_fd(), &t.parents).map_err(|e| match e {
            Errno::LOOP | Errno::XDEV => at.reject("hard link target passes through a symlink"),
            Errno::NOENT | Errno::NOTDIR => {
                at.reject("hard link target does not exist in this layer")
            }
            e => at.werr(e.into()),
        })?;
        if at.exists {
            if tparent_same(&t.parents, at.parents) && tname == at.name {
                return Ok(false);
            }
            self.replace(at.parent, at.name)
                .map_err(|e| at.werr(e.into()))?;
        }
        rustix::fs::linkat(
            tparent.as_fd(),
            OsStr::from_bytes(tname),
            at.parent,
            at.name_os(),
            AtFlags::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => at.reject("hard link target does not exist in this layer"),
            Errno::PERM => at.reject("hard link target is a directory"),
            e => at.werr(e.into()),
        })?;
        Ok(true)
    }

    /// A character or block device, or a FIFO.
    fn node<R: Read>(
        &mut self,
        at: &Place<'_>,
        meta: &Meta,
        kind: tar::EntryType,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        if at.exists {
            self.replace(at.parent, at.name)
                .map_err(|e| at.werr(e.into()))?;
        }
        let (ft, dev) = match kind {
            tar::EntryType::Char => (FileType::CharacterDevice, device(entry)),
            tar::EntryType::Block => (FileType::BlockDevice, device(entry)),
            _ => (FileType::Fifo, 0),
        };
        rustix::fs::mknodat(at.parent, at.name_os(), ft, Mode::from_raw_mode(0o600), dev)
            .map_err(|e| at.werr(e.into()))?;
        set_attrs_at(at.parent, at.name_os(), meta, true).map_err(|e| at.werr(e.into()))
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

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        ext: &headers::Extensions,
    ) -> std::io::Result<Meta> {
        let h = entry.header();
        let mut meta = Meta {
            mode: h.mode()?,
            // Some writers leave these fields blank; like GNU tar's lenient mode, that is 0.
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime: h.mtime().unwrap_or(0) as i64,
            xattrs: Vec::new(),
        };
        {
            for (key, value) in ext.pax_records() {
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

#[cfg(test)]
mod tests;
