//! Reading a file of an image (a container's mounted root filesystem), which is hostile
//! input: resolved inside the root (no symlink or `..` out of it), never opened unless it is a
//! regular file (a FIFO would block the reader, a device node would read the node's disk),
//! bounded in size, and read on a blocking thread with a deadline, so no image can stall the
//! daemon.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The largest image file berth reads (identity files are a few KiB).
pub const MAX_SIZE: u64 = 4 << 20;
/// How long reading may take before the call gives up.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Why an image file could not be read; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    /// It exists but is not a regular file.
    #[error("the image's {path} is a {kind}, not a regular file")]
    NotRegular {
        /// The file, as seen in the container.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// It is larger than berth reads.
    #[error("the image's {path} has {size} bytes, more than the {MAX_SIZE} berth reads")]
    TooBig {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Reading it took longer than `DEADLINE`.
    #[error("reading the image's {path} took longer than {}s", DEADLINE.as_secs())]
    TimedOut {
        /// The file.
        path: String,
    },
    /// The filesystem refused.
    #[error("reading the image's {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Reads `rel` (an absolute path inside the image, like `/etc/passwd`) of the root mounted at
/// `root`; `Ok(None)` when it does not exist. Blocking: see `read` for the async form.
pub fn read_blocking(root: &Path, rel: &str) -> Result<Option<String>, ImageFileError> {
    let io = |source: std::io::Error| ImageFileError::Io {
        path: rel.to_string(),
        source,
    };
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    // O_PATH opens nothing: a FIFO does not block, a device is not touched. IN_ROOT makes
    // the kernel resolve every symlink and `..` as if `root` were `/`, so a symlink inside the
    // image (distroless images link /etc/passwd) is followed but can never leave the image;
    // that is what O_NOFOLLOW would guard against, without refusing such images.
    let handle = match rustix::fs::openat2(
        &dir,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => return Ok(None),
        Err(e) => return Err(io(e.into())),
    };
    let meta = std::fs::File::from(handle.try_clone().map_err(io)?)
        .metadata()
        .map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ImageFileError::NotRegular {
            path: rel.to_string(),
            kind: kind(meta.file_type()),
        });
    }
    if meta.len() > MAX_SIZE {
        return Err(ImageFileError::TooBig {
            path: rel.to_string(),
            size: meta.len(),
        });
    }
    // The regular file checked above, reopened for reading through its O_PATH handle (not by
    // name: nothing can be swapped in between). O_NONBLOCK as a second guard.
    let f = rustix::fs::open(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&handle)),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let mut s = String::new();
    std::fs::File::from(f)
        .take(MAX_SIZE)
        .read_to_string(&mut s)
        .map_err(io)?;
    Ok(Some(s))
}

/// `read_blocking` on a blocking thread, given up after `DEADLINE`.
pub async fn read(root: &Path, rel: &str) -> Result<Option<String>, ImageFileError> {
    let (root, rel_owned) = (root.to_owned(), rel.to_string());
    let task = tokio::task::spawn_blocking(move || read_blocking(&root, &rel_owned));
    match tokio::time::timeout(DEADLINE, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(ImageFileError::Io {
            path: rel.to_string(),
            source: std::io::Error::other(e),
        }),
        Err(_) => Err(ImageFileError::TimedOut {
            path: rel.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_everything_else_refused() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        assert_eq!(
            read_blocking(d.path(), "/etc/passwd").unwrap().unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        assert!(read_blocking(d.path(), "/etc/group").unwrap().is_none());

        nix::unistd::mkfifo(
            &etc.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let e = read_blocking(d.path(), "/etc/fifo").unwrap_err();
        assert!(
            e.to_string().contains("/etc/fifo is a FIFO"),
            "{e}" // and it returned at once: nothing opened the FIFO for reading
        );

        // Symlinks resolve inside the root, absolute ones included: /etc/hostname is not the
        // node's, and the image has none.
        std::os::unix::fs::symlink("/etc/hostname", etc.join("abs")).unwrap();
        assert!(read_blocking(d.path(), "/etc/abs").unwrap().is_none());
        std::os::unix::fs::symlink("/etc/passwd", etc.join("alias")).unwrap();
        assert!(read_blocking(d.path(), "/etc/alias").unwrap().is_some());
        std::os::unix::fs::symlink("../../../../../../etc", d.path().join("up")).unwrap();
        assert_eq!(
            read_blocking(d.path(), "/up/passwd").unwrap().unwrap(),
            "root:x:0:0::/root:/bin/sh\n",
            "'..' through a symlink stays inside the root"
        );

        std::fs::write(etc.join("big"), vec![b'x'; MAX_SIZE as usize + 1]).unwrap();
        assert!(matches!(
            read_blocking(d.path(), "/etc/big"),
            Err(ImageFileError::TooBig { .. })
        ));
        assert!(matches!(
            read_blocking(d.path(), "/etc"),
            Err(ImageFileError::NotRegular {
                kind: "directory",
                ..
            })
        ));
    }
}
