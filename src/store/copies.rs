//! Copies in `--root` of records that live in `--state`: the state directory is on tmpfs and
//! gone after a reboot, with every process it described, yet kubelet must still see what was
//! there (pods NotReady, containers Exited) rather than a node that forgot them. A copy is
//! written (fsynced) after the record it mirrors when the object enters a new phase, and
//! removed before the record, so a copy without its record means the state was lost, never
//! that a removal was interrupted.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{StoreError, read_json, write_json};

/// A directory of copies, one `<id>.json` per object.
#[derive(Debug)]
pub struct Copies {
    dir: PathBuf,
    /// The phase of each copy written by this process: a record rewritten in the same phase
    /// (its monitor's pid noted, a container started) needs no new copy, as a restore makes
    /// every phase's object the same stopped one. Each copy costs an fsync.
    written: std::sync::Mutex<std::collections::HashMap<String, &'static str>>,
}

impl Copies {
    /// The copies in `dir` (made by `Layout::prepare`), at start: the temporary files of
    /// writes a kill interrupted are removed (the copy they were replacing stands).
    pub fn open(dir: &Path) -> Copies {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Copies {
            dir: dir.to_owned(),
            written: Default::default(),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Replaces the copy of `id`, durably, unless this process already wrote one of the same
    /// `phase`.
    pub fn write<T: Serialize>(
        &self,
        id: &str,
        phase: &'static str,
        value: &T,
    ) -> Result<(), StoreError> {
        if self.written().get(id) == Some(&phase) {
            return Ok(());
        }
        write_json(&self.path(id), value)?;
        self.written().insert(id.to_string(), phase);
        Ok(())
    }

    /// Removes the copy of `id`; none is fine. Not made durable: a removal a power cut undoes
    /// brings back a stopped object kubelet removes again, while every removal here stays as
    /// fast as it was.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.written().remove(id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                what: "removing",
                path: self.path(id),
                source,
            }),
        }
    }

    fn written(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, &'static str>> {
        self.written.lock().expect("copies lock poisoned")
    }

    /// Every copy, by id; an unreadable one is an error naming its file. Leftover temporary
    /// files of an interrupted write are not copies.
    pub fn read_all<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(StoreError::Io {
                    what: "listing",
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            if let Some(v) = read_json(&e.path())? {
                out.push((id.to_string(), v));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_leftover_temp_files_go_and_a_torn_copy_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".a.json.1-0.tmp"), "{").unwrap();
        let c = Copies::open(dir.path());
        assert!(!dir.path().join(".a.json.1-0.tmp").exists());
        c.write("b", "x", &2u32).unwrap();
        c.write("a", "x", &1u32).unwrap();
        // The same phase again: no new copy; another phase: replaced.
        c.write("a", "x", &9u32).unwrap();
        assert_eq!(c.read_all::<u32>().unwrap()[0], ("a".to_string(), 1));
        c.write("a", "y", &3u32).unwrap();
        std::fs::write(dir.path().join(".a.json.1-1.tmp"), "{").unwrap();
        assert_eq!(
            c.read_all::<u32>().unwrap(),
            vec![("a".to_string(), 3), ("b".to_string(), 2)]
        );
        c.remove("a").unwrap();
        c.remove("a").unwrap();
        assert_eq!(c.read_all::<u32>().unwrap(), vec![("b".to_string(), 2)]);
        c.write("a", "y", &4u32).unwrap();
        assert_eq!(c.read_all::<u32>().unwrap()[0], ("a".to_string(), 4));
        c.remove("a").unwrap();
        std::fs::write(dir.path().join("c.json"), "{").unwrap();
        let e = c.read_all::<u32>().unwrap_err().to_string();
        assert!(e.contains("c.json"), "{e}");
    }
}
