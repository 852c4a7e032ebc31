//! Metadata persistence: the one place that knows how records reach the disk. A record is a
//! JSON file replaced atomically (write a temp file, fsync, rename, fsync the directory), so a
//! kill at any instant leaves either the old or the new record, never a torn one.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

mod copies;
pub use copies::Copies;

/// A failed read or write of a record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The filesystem refused.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record that does not parse (written by another version, or damaged by hand).
    #[error("record {path} is unreadable: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A record that parses but contradicts where it lies (its id is not its directory's).
    #[error("record {path} is inconsistent: {message}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A directory written in a newer format than this berth reads.
    #[error("{path} says format {found}, but this berthd reads format {SCHEMA} at most")]
    Newer {
        /// The schema file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
}

/// What a reconcile at start did with the records it found, counted for its summary line.
#[derive(Debug, Default)]
pub struct Tally {
    /// Taken over as recorded (or as their monitor said).
    pub adopted: std::sync::atomic::AtomicUsize,
    /// Half-done operations finished (a pod stopped whose init or monitor had died).
    pub finished: std::sync::atomic::AtomicUsize,
    /// Half-made objects undone.
    pub undone: std::sync::atomic::AtomicUsize,
    /// Leftovers nothing referred to, removed.
    pub removed: std::sync::atomic::AtomicUsize,
    /// Taken back from their copies in `--root` after the state was lost (a reboot), stopped.
    pub restored: std::sync::atomic::AtomicUsize,
}

impl Tally {
    /// Counts one of `what`.
    pub fn add(what: &std::sync::atomic::AtomicUsize) {
        what.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts, for a log line.
    pub fn counts(&self) -> [usize; 5] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.adopted.load(Relaxed),
            self.finished.load(Relaxed),
            self.undone.load(Relaxed),
            self.removed.load(Relaxed),
            self.restored.load(Relaxed),
        ]
    }
}

/// The on-disk format version berth writes and reads. A directory written by a newer berth
/// (a higher number) is refused rather than misread.
pub const SCHEMA: u32 = 1;

/// The file in `--root` and `--state` that says which format the records in them follow.
pub const SCHEMA_FILE: &str = "schema.json";

#[derive(Serialize, serde::Deserialize)]
struct Schema {
    schema: u32,
}

/// Checks the format of the records under `dir`, recording it for a directory that has none
/// yet (new, or written before the format was versioned: that was version 1).
pub fn check_schema(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(SCHEMA_FILE);
    match read_json::<Schema>(&path)? {
        Some(s) if s.schema <= SCHEMA => Ok(()),
        Some(s) => Err(StoreError::Newer {
            path,
            found: s.schema,
        }),
        None => write_json(&path, &Schema { schema: SCHEMA }),
    }
}

/// Whether the node booted since the last berthd on `root` started (its kernel boot id
/// changed); records the current one. A root without a record (new, or from before this was
/// recorded) counts as the same boot.
pub fn rebooted_since_last_start(root: &Path) -> Result<bool, StoreError> {
    const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
    let now = std::fs::read_to_string(BOOT_ID)
        .map_err(io("reading", Path::new(BOOT_ID)))?
        .trim()
        .to_string();
    let path = root.join("boot_id");
    let before = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("reading", &path)(e)),
    };
    if before.as_deref() != Some(now.as_str()) {
        write_atomic(&path, format!("{now}\n").as_bytes())?;
    }
    Ok(before.is_some_and(|b| b != now))
}

/// The message berthd refuses to start with when a record cannot be read: it never rewrites
/// or drops data to get going.
pub fn refusal(e: &StoreError) -> String {
    format!(
        "{e}; berthd does not start on a store it cannot read (nothing was changed): repair \
         the file or move it out of the directory, which drops what it records"
    )
}

impl StoreError {
    /// Whether the disk is full (or over quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if is_no_space(source))
    }
}

/// Whether an I/O error means "no space left" (ENOSPC or EDQUOT).
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// Opens `tmp` for writing as a new private (0600) file, truncating a leftover.
fn create_private(tmp: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(tmp)
}

/// A temporary name beside `path` that no other write uses: two writers of one record never
/// share (and steal) each other's temporary file.
fn tmp_for(path: &Path) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or(OsStr::new("record"));
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(
        ".{}.{}-{n}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ))
}

/// Writes `data` to `path` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = tmp_for(path);
    let result = (|| {
        let mut f = create_private(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(data).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `data` to `path` atomically but without fsync: for records under the state
/// directory, which a reboot clears anyway. A killed process cannot tear the record (the rename
/// is atomic and the page cache survives the process); only a power cut could, and after a power
/// cut the state directory is gone.
pub fn write_atomic_volatile(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_for(path);
    let result = create_private(&tmp)
        .and_then(|mut f| f.write_all(data))
        .map_err(io("writing", &tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io("renaming into place", path)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as JSON into a state-directory record (see `write_atomic_volatile`).
pub fn write_json_volatile<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec(value).expect("records always serialize");
    write_atomic_volatile(path, &data)
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

/// Serializes `value` as JSON into `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec(value).expect("records always serialize");
    write_atomic(path, &data)
}

/// Reads a JSON record; `Ok(None)` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// Removes a record durably; a missing file is fine.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("/"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", path)(e)),
    }
}

/// Every `*.json` record in `dir` (temp files skipped), read in no particular order. Unreadable
/// records are returned as errors beside the good ones, so one bad file does not hide the rest.
pub fn read_all<T: DeserializeOwned>(dir: &Path) -> Result<Vec<Result<T, StoreError>>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("listing", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match read_json(&entry.path()) {
            Ok(Some(v)) => out.push(Ok(v)),
            Ok(None) => {}
            Err(e) => out.push(Err(e)),
        }
    }
    Ok(out)
}

/// Removes temp files a crash left in `dir`.
pub fn clean_temp(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_roundtrips_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_json(&p, &vec![1, 2, 3]).unwrap();
        write_json(&p, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), Some(vec![4]));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn missing_is_none_and_corrupt_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            read_json::<i32>(&d.path().join("x.json"))
                .unwrap()
                .is_none()
        );
        std::fs::write(d.path().join("bad.json"), b"{").unwrap();
        std::fs::write(d.path().join("good.json"), b"7").unwrap();
        let all = read_all::<i32>(d.path()).unwrap();
        assert_eq!(all.iter().filter(|r| r.is_ok()).count(), 1);
        assert_eq!(all.iter().filter(|r| r.is_err()).count(), 1);
    }
}
