//! What each pod was attached with: one record per pod (`<cache>/<pod id>.json`), written
//! (fsynced) before ADD runs and again with ADD's result before the pod's network is reported.
//! DEL always runs from it, with the configuration the pod was set up with, whatever the
//! configuration directory holds by then; a restart finds the pods whose ADD or DEL a crash
//! interrupted here. Kept under the root directory: the plugins' own state (host-local's
//! leases) outlives a reboot too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{self, StoreError};

/// One pod's attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The pod (`CNI_CONTAINERID`).
    pub pod_id: String,
    /// Its network namespace pin (`CNI_NETNS`).
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// The capability arguments offered (`runtimeConfig`, by capability).
    pub capability_args: Value,
    /// The configuration file the list came from.
    pub config_file: PathBuf,
    /// The network configuration list, as it was.
    pub config: Value,
    /// ADD's final result, once ADD returned.
    pub result: Option<Value>,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens (makes) the directory.
    pub fn open(dir: &Path) -> std::io::Result<Cache> {
        crate::layout::private_dir(dir)?;
        store::clean_temp(dir);
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("{pod_id}.json"))
    }

    /// Writes a pod's entry (durably).
    pub fn put(&self, e: &Entry) -> Result<(), StoreError> {
        store::write_json(&self.path(&e.pod_id), e)
    }

    /// A pod's entry.
    pub fn get(&self, pod_id: &str) -> Result<Option<Entry>, StoreError> {
        store::read_json(&self.path(pod_id))
    }

    /// Forgets a pod (after its DEL).
    pub fn remove(&self, pod_id: &str) -> Result<(), StoreError> {
        store::remove(&self.path(pod_id))
    }

    /// Every entry; unreadable ones are reported with their file.
    pub fn all(&self) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        store::read_all(&self.dir)
    }
}
