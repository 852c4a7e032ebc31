//! Layer snapshots: each layer unpacked once into `root/snapshots/<chain-id hex>/fs`, ready to be
//! an overlayfs lower dir. A snapshot is built in `.tmp-*` and renamed into place only when whole
//! and verified, so a snapshot directory under its chain ID is always complete; `.tmp-*` and
//! `.del-*` directories a crash left are removed when the store opens. Files are unpacked
//! without an fsync each; after each pull one `syncfs` stores them and marks the snapshots
//! durable, and after a reboot a snapshot never marked so is dropped (the next pull rebuilds it).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::reference::Digest;
use super::unpack::{Limits, UnpackError, UnpackStats, unpack};
use crate::store::{self, StoreError};

const META: &str = "meta.json";
const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";

/// What is recorded beside each snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The chain ID naming the snapshot.
    pub chain_id: String,
    /// The uncompressed layer digest.
    pub diff_id: String,
    /// The compressed blob digest it was unpacked from.
    pub digest: String,
    /// Bytes and inodes it holds.
    pub stats: UnpackStats,
    /// Whether its files are known to be on disk (synced after the unpack). A snapshot that is
    /// not is dropped when the node rebooted since (a power cut may have torn it). Records
    /// from before this field are old enough for the kernel's writeback to have stored them.
    #[serde(default = "written_back")]
    pub durable: bool,
}

fn written_back() -> bool {
    true
}

/// Why a layer could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The tar was hostile, corrupt or could not be written.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The downloaded bytes are not the blob the manifest names.
    #[error("downloaded blob hashes to {actual}, the manifest says {expected}")]
    DigestMismatch {
        /// From the manifest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The uncompressed layer is not the one the image config names.
    #[error("uncompressed layer hashes to {actual}, the image config says {expected}")]
    DiffIdMismatch {
        /// From the config.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Decompression failed.
    #[error("decompressing the layer: {0}")]
    Decompress(std::io::Error),
    /// The snapshot directory could not be prepared or committed.
    #[error("snapshot {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot's record could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LayerError {
    /// Whether the disk filled up.
    pub fn is_no_space(&self) -> bool {
        match self {
            LayerError::Unpack(u) => u.is_no_space(),
            LayerError::Io { source, .. } | LayerError::Decompress(source) => {
                store::is_no_space(source)
            }
            LayerError::Store(s) => s.is_no_space(),
            _ => false,
        }
    }
}

/// The unpacked layers.
pub struct SnapshotStore {
    dir: PathBuf,
    known: RwLock<HashMap<String, SnapshotMeta>>,
    /// Committed snapshots not yet synced.
    unsynced: Mutex<Vec<String>>,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seq: AtomicU64,
}

/// A snapshot being built; removed on drop unless committed.
pub struct TempSnapshot {
    dir: PathBuf,
    committed: bool,
}

impl TempSnapshot {
    /// The directory the layer is unpacked into.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }
}

impl Drop for TempSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn chain_hex(chain_id: &str) -> &str {
    chain_id.strip_prefix("sha256:").unwrap_or(chain_id)
}

impl SnapshotStore {
    /// Opens the store under `dir`, loading every complete snapshot and removing leftovers.
    /// `rebooted`: the node restarted since the last berthd, so snapshots never synced may be
    /// torn and are dropped.
    pub fn open(dir: &Path, rebooted: bool) -> Result<SnapshotStore, LayerError> {
        std::fs::create_dir_all(dir).map_err(|source| LayerError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut known = HashMap::new();
        let mut unsynced = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|source| LayerError::Io {
            path: dir.to_owned(),
            source,
        })? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) || name.starts_with(DEL_PREFIX) {
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            match store::read_json::<SnapshotMeta>(&e.path().join(META)) {
                Ok(Some(m)) if chain_hex(&m.chain_id) == name && !m.durable && rebooted => {
                    tracing::warn!(path = %e.path().display(), "dropping a snapshot the node rebooted before it was synced");
                    let _ = std::fs::remove_dir_all(e.path());
                }
                Ok(Some(m)) if chain_hex(&m.chain_id) == name => {
                    if !m.durable {
                        unsynced.push(m.chain_id.clone());
                    }
                    known.insert(m.chain_id.clone(), m);
                }
                // A directory without a valid record is not a snapshot (it cannot be proven
                // whole): drop it; a later pull rebuilds it.
                _ => {
                    tracing::warn!(path = %e.path().display(), "removing incomplete snapshot");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let s = SnapshotStore {
            dir: dir.to_owned(),
            known: RwLock::new(known),
            unsynced: Mutex::new(unsynced),
            building: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
        };
        // Same boot: the page cache still holds them; store them now.
        s.sync();
        Ok(s)
    }

    /// Stores every committed snapshot's files (one syncfs of the filesystem) and marks them
    /// durable. Blocking: called after a pull and at a clean stop.
    pub fn sync(&self) {
        let pending = std::mem::take(&mut *self.unsynced.lock().expect("unsynced poisoned"));
        if pending.is_empty() {
            return;
        }
        let synced = std::fs::File::open(&self.dir)
            .and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
        if let Err(e) = synced {
            tracing::warn!(error = %e, "syncing the snapshots");
            self.unsynced
                .lock()
                .expect("unsynced poisoned")
                .extend(pending);
            return;
        }
        for chain in pending {
            // Under the lock, and only while the snapshot is still known: one removed during
            // the syncfs (its image removed right after the pull) must not come back into
            // the index, nor its record be written into a directory on its way out.
            let mut known = self.known.write().expect("snapshots lock poisoned");
            let Some(m) = known.get_mut(&chain) else {
                continue;
            };
            let mut durable = m.clone();
            durable.durable = true;
            let path = self.dir.join(chain_hex(&chain)).join(META);
            match store::write_json(&path, &durable) {
                Ok(()) => *m = durable,
                Err(e) => tracing::warn!(error = %e, "recording a snapshot as durable"),
            }
        }
    }

    /// The lower dir of a snapshot.
    pub fn fs_path(&self, chain_id: &str) -> PathBuf {
        self.dir.join(chain_hex(chain_id)).join("fs")
    }

    /// The directory holding every snapshot.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A snapshot's record, if it exists.
    pub fn get(&self, chain_id: &str) -> Option<SnapshotMeta> {
        self.known
            .read()
            .expect("snapshots lock poisoned")
            .get(chain_id)
            .cloned()
    }

    /// Every snapshot's chain ID.
    pub fn chain_ids(&self) -> Vec<String> {
        self.known
            .read()
            .expect("snapshots lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Serializes builders of one chain ID, so concurrent pulls unpack each layer once.
    pub async fn lock(&self, chain_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut b = self.building.lock().expect("snapshot build lock poisoned");
            b.retain(|_, m| Arc::strong_count(m) > 1);
            b.entry(chain_id.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Starts building a snapshot.
    pub fn begin(&self, chain_id: &str) -> Result<TempSnapshot, LayerError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}-{n}",
            &chain_hex(chain_id)[..12.min(chain_hex(chain_id).len())],
            std::process::id()
        ));
        let t = TempSnapshot {
            dir,
            committed: false,
        };
        std::fs::create_dir_all(t.fs()).map_err(|source| LayerError::Io {
            path: t.fs(),
            source,
        })?;
        Ok(t)
    }

    /// Makes a built snapshot visible under its chain ID.
    pub fn commit(&self, mut temp: TempSnapshot, mut meta: SnapshotMeta) -> Result<(), LayerError> {
        meta.durable = false;
        store::write_json(&temp.dir.join(META), &meta)?;
        let dest = self.dir.join(chain_hex(&meta.chain_id));
        std::fs::rename(&temp.dir, &dest).map_err(|source| LayerError::Io {
            path: dest.clone(),
            source,
        })?;
        temp.committed = true;
        store::sync_dir(&self.dir)?;
        self.unsynced
            .lock()
            .expect("unsynced poisoned")
            .push(meta.chain_id.clone());
        self.known
            .write()
            .expect("snapshots lock poisoned")
            .insert(meta.chain_id.clone(), meta);
        Ok(())
    }

    /// Removes a snapshot: renamed aside first (so it vanishes atomically), then deleted.
    pub fn remove(&self, chain_id: &str) {
        let Some(_meta) = self
            .known
            .write()
            .expect("snapshots lock poisoned")
            .remove(chain_id)
        else {
            return;
        };
        let src = self.dir.join(chain_hex(chain_id));
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let aside = self
            .dir
            .join(format!("{DEL_PREFIX}{}-{n}", chain_hex(chain_id)));
        match std::fs::rename(&src, &aside) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&aside) {
                    tracing::warn!(path = %aside.display(), error = %e, "could not remove snapshot; retried at next start");
                }
            }
            Err(e) => {
                tracing::warn!(path = %src.display(), error = %e, "could not remove snapshot")
            }
        }
        tracing::info!(chain_id, "snapshot removed");
    }

    /// Bytes and inodes held by all snapshots.
    pub fn usage(&self) -> (u64, u64) {
        let k = self.known.read().expect("snapshots lock poisoned");
        k.values()
            .fold((0, 0), |(b, i), m| (b + m.stats.bytes, i + m.stats.inodes))
    }
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Counts what passes and refuses to pass more than `limit` bytes: the uncompressed stream
/// of a small download can be any size.
struct Bounded<R> {
    inner: R,
    passed: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.passed > self.limit {
            return Err(std::io::Error::other("the layer's byte limit was passed"));
        }
        // One byte past the limit is read, so a stream of exactly `limit` bytes passes.
        let room = (self.limit - self.passed)
            .saturating_add(1)
            .min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.passed += n as u64;
        if self.passed > self.limit {
            return Err(std::io::Error::other("the layer's byte limit was passed"));
        }
        Ok(n)
    }
}

/// Unpacks a (possibly compressed) layer stream into `dest`, checking both the compressed
/// digest and the uncompressed diff ID, within `limits`. The compression is sniffed from the
/// first bytes, not trusted from the media type: gzip, zstd and plain tar are accepted.
pub fn unpack_verified(
    compressed: impl Read,
    dest: &Path,
    digest: &str,
    diff_id: &str,
    limits: Limits,
) -> Result<UnpackStats, LayerError> {
    let mut outer = BufReader::with_capacity(
        256 * 1024,
        Hashing {
            inner: compressed,
            hash: Sha256::new(),
        },
    );
    let head = outer.fill_buf().map_err(LayerError::Decompress)?.to_vec();
    let (stats, diff) = {
        let decoded: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(&mut outer))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(&mut outer)
                    .map_err(LayerError::Decompress)?,
            )
        } else {
            Box::new(&mut outer)
        };
        let mut inner = Hashing {
            inner: Bounded {
                inner: decoded,
                passed: 0,
                limit: limits.bytes,
            },
            hash: Sha256::new(),
        };
        let too_large = |b: &Bounded<_>| {
            (b.passed > b.limit).then(|| {
                LayerError::Unpack(UnpackError::TooLarge {
                    entry: String::new(),
                    why: format!(
                        "the uncompressed layer is larger than {} bytes ([images] max_layer_bytes)",
                        b.limit
                    ),
                })
            })
        };
        let stats = match unpack(&mut inner, dest, limits.inodes) {
            Ok(s) => s,
            Err(e) => return Err(too_large(&inner.inner).unwrap_or(e.into())),
        };
        // The diff ID covers the whole uncompressed stream, padding after the tar's end too.
        if let Err(e) = std::io::copy(&mut inner, &mut std::io::sink()) {
            return Err(too_large(&inner.inner).unwrap_or(LayerError::Decompress(e)));
        }
        (stats, Digest::from_sha256(&inner.hash.finalize()))
    };
    std::io::copy(&mut outer, &mut std::io::sink())
        .map_err(|e| LayerError::Unpack(UnpackError::Read(e)))?;
    let got = Digest::from_sha256(&outer.into_inner().hash.finalize());
    if got.as_str() != digest {
        return Err(LayerError::DigestMismatch {
            expected: digest.to_string(),
            actual: got.to_string(),
        });
    }
    if diff.as_str() != diff_id {
        return Err(LayerError::DiffIdMismatch {
            expected: diff_id.to_string(),
            actual: diff.to_string(),
        });
    }
    Ok(stats)
}

/// Chain IDs of a layer stack: the first is its diff ID, each next one
/// `sha256(previous + " " + diff ID)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                Digest::from_sha256(&Sha256::digest(format!("{prev} {d}").as_bytes())).to_string()
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn layer_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("hello").unwrap();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"world"[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn sha(b: &[u8]) -> String {
        Digest::from_sha256(&Sha256::digest(b)).to_string()
    }

    #[test]
    fn gzip_zstd_and_plain_layers_unpack_and_verify() {
        let tar = layer_tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for blob in [&gz, &zst, &tar] {
            let d = tempfile::tempdir().unwrap();
            let stats = unpack_verified(
                &blob[..],
                d.path(),
                &sha(blob),
                &sha(&tar),
                Limits::default(),
            )
            .unwrap();
            assert_eq!(stats.bytes, 5);
            assert_eq!(std::fs::read(d.path().join("hello")).unwrap(), b"world");
        }
    }

    #[test]
    fn wrong_digests_are_caught() {
        let tar = layer_tar();
        let d = tempfile::tempdir().unwrap();
        let e = unpack_verified(
            &tar[..],
            d.path(),
            &sha(b"x"),
            &sha(&tar),
            Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, LayerError::DigestMismatch { .. }), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = unpack_verified(
            &tar[..],
            d.path(),
            &sha(&tar),
            &sha(b"x"),
            Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, LayerError::DiffIdMismatch { .. }), "{e}");
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = sha(b"a");
        let b = sha(b"b");
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha(format!("{a} {b}").as_bytes()));
    }

    /// The record of a one-file snapshot named `chain`.
    fn meta(chain: &str, durable: bool) -> SnapshotMeta {
        SnapshotMeta {
            chain_id: chain.into(),
            diff_id: chain.into(),
            digest: chain.into(),
            stats: UnpackStats {
                bytes: 1,
                inodes: 1,
            },
            durable,
        }
    }

    #[test]
    fn temp_snapshots_vanish_unless_committed() {
        let d = tempfile::tempdir().unwrap();
        let s = SnapshotStore::open(d.path(), false).unwrap();
        let chain = sha(b"c");
        let t = s.begin(&chain).unwrap();
        std::fs::write(t.fs().join("f"), b"x").unwrap();
        drop(t);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let t = s.begin(&chain).unwrap();
        let meta = meta(&chain, true);
        s.commit(t, meta.clone()).unwrap();
        assert!(s.fs_path(&chain).exists());
        assert!(!s.get(&chain).unwrap().durable);
        s.sync();
        assert_eq!(s.get(&chain), Some(meta.clone()));
        let reopened = SnapshotStore::open(d.path(), true).unwrap();
        assert_eq!(reopened.get(&chain), Some(meta));
        reopened.remove(&chain);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn snapshots_never_synced_are_dropped_after_a_reboot_and_kept_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let chain = sha(b"u");
        let unsynced = |s: &SnapshotStore| {
            let t = s.begin(&chain).unwrap();
            s.commit(t, meta(&chain, false)).unwrap();
        };
        // Killed before the sync, same boot: kept, and synced at open.
        unsynced(&SnapshotStore::open(d.path(), false).unwrap());
        let same_boot = SnapshotStore::open(d.path(), false).unwrap();
        assert!(same_boot.get(&chain).is_some_and(|m| m.durable));
        same_boot.remove(&chain);
        // Killed before the sync, then the node rebooted: dropped.
        unsynced(&SnapshotStore::open(d.path(), false).unwrap());
        let after_reboot = SnapshotStore::open(d.path(), true).unwrap();
        assert!(after_reboot.get(&chain).is_none());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
