//! Which pod cgroup directories berth made and which pods use them. Several pods may share one
//! cgroup parent (kubelet gives each its own, simpler drivers do not); a directory goes only
//! when berth made it and no pod, finished or still being created, is in it or under it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::cgroup::Cgroups;
use crate::store;

/// The book of pod cgroups: made by berth (recorded on disk, so a restart knows), and in use.
pub(super) struct PodCgroups {
    record: PathBuf,
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// Directories (absolute, in every hierarchy) berth made; only these it removes.
    owned: BTreeSet<PathBuf>,
    /// Pod cgroups (relative) and the pods in each, including pods being created.
    users: HashMap<PathBuf, BTreeSet<String>>,
}

impl Book {
    /// Every directory (in every hierarchy) that a pod other than `pod` is in or under:
    /// computed once per call, so a node with many pods pays for each pod once.
    fn used_by_others(&self, cgroups: &Cgroups, pod: &str) -> HashSet<PathBuf> {
        self.users
            .iter()
            .filter(|(_, pods)| pods.iter().any(|p| p != pod))
            .flat_map(|(rel, _)| cgroups.lineage(rel))
            .collect()
    }

    fn persist(&self, record: &Path) -> Result<(), store::StoreError> {
        store::write_json_volatile(record, &self.owned)
    }
}

impl PodCgroups {
    /// The book as the record at `record` left it, with no pod in it yet; an unreadable
    /// record is an error (the directories it lists would otherwise never be removed).
    pub fn load(record: PathBuf) -> Result<PodCgroups, store::StoreError> {
        let owned = store::read_json(&record)?.unwrap_or_default();
        Ok(PodCgroups {
            record,
            book: Mutex::new(Book {
                owned,
                users: HashMap::new(),
            }),
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("pod cgroup book poisoned")
    }

    /// Makes `rel` for `pod`. The directories that did not exist are recorded as berth's
    /// before they are made; the pod is a user of `rel` from here on, until `release`.
    pub fn make(&self, cgroups: &Cgroups, pod: &str, rel: &Path) -> Result<(), String> {
        let mut book = self.book();
        // A user first: whatever fails below, `release` undoes it.
        book.users
            .entry(rel.to_path_buf())
            .or_default()
            .insert(pod.to_string());
        let missing = cgroups.missing(rel);
        if !missing.is_empty() {
            book.owned.extend(missing);
            book.persist(&self.record)
                .map_err(|e| format!("recording the cgroups berth made: {e}"))?;
        }
        cgroups
            .create(rel)
            .map_err(|e| format!("creating the pod cgroup: {e}"))
    }

    /// Counts a pod a previous berthd made as a user of its cgroup.
    pub fn adopt(&self, pod: &str, rel: &Path) {
        self.book()
            .users
            .entry(rel.to_path_buf())
            .or_default()
            .insert(pod.to_string());
    }

    /// `pod` no longer uses `rel`: removes the berth-made directories of it that no other pod
    /// uses. The pod's own directory goes together with container cgroups left in it (by a
    /// crashed berthd) only when no other pod shares it. Idempotent.
    pub fn release(&self, cgroups: &Cgroups, pod: &str, rel: &Path) {
        cgroups.remove_init_leaf(rel);
        let mut book = self.book();
        if let Some(pods) = book.users.get_mut(rel) {
            pods.remove(pod);
            if pods.is_empty() {
                book.users.remove(rel);
            }
        }
        let before = book.owned.len();
        let in_use = book.used_by_others(cgroups, pod);
        for d in cgroups.lineage(rel) {
            if !book.owned.contains(&d) || in_use.contains(&d) {
                continue;
            }
            let removed = cgroups.remove_pod_dir(&d, d.ends_with(rel));
            match removed {
                Ok(true) => {
                    book.owned.remove(&d);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(cgroup = %d.display(), error = %e, "could not remove cgroup")
                }
            }
        }
        if book.owned.len() != before
            && let Err(e) = book.persist(&self.record)
        {
            tracing::warn!(error = %e, "recording cgroup ownership");
        }
    }

    /// Removes the berth-made directories no pod uses (after a restart adopted the pods that
    /// remain).
    pub fn remove_unused(&self, cgroups: &Cgroups) {
        let mut book = self.book();
        let in_use = book.used_by_others(cgroups, "");
        let mut dead: Vec<PathBuf> = book
            .owned
            .iter()
            .filter(|d| !in_use.contains(*d))
            .cloned()
            .collect();
        dead.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dead {
            if let Ok(true) = cgroups.remove_pod_dir(&d, false) {
                book.owned.remove(&d);
            }
        }
        let _ = book.persist(&self.record);
    }
}
