//! The content store: manifests, indexes and image configs by digest under
//! `root/content/sha256/<hex>`. A blob is written to a temp file in `root/content/ingest`, its
//! digest verified, then renamed into place, so a blob under its digest name is always whole and
//! correct. Layers are not kept here: they stream straight into snapshots (see `snapshot`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::reference::Digest;

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// Bytes whose hash is not the digest they were offered under; nothing was kept.
    #[error("content offered as {expected} hashes to {actual}; discarded")]
    DigestMismatch {
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// The filesystem refused.
    #[error("content store {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ContentError {
    /// Whether the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ContentError::Io { source, .. } if crate::store::is_no_space(source))
    }
}

/// Blobs by digest on disk.
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    /// Makes temp names unique: two pulls may write the same blob at once.
    seq: std::sync::atomic::AtomicU64,
}

impl ContentStore {
    /// Opens (creating) the store under `dir`, dropping temp files a crash left.
    pub fn open(dir: &Path) -> Result<ContentStore, ContentError> {
        let blobs = dir.join("sha256");
        let ingest = dir.join("ingest");
        for d in [&blobs, &ingest] {
            std::fs::create_dir_all(d).map_err(|source| ContentError::Io {
                path: d.clone(),
                source,
            })?;
        }
        if let Ok(entries) = std::fs::read_dir(&ingest) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(ContentStore {
            blobs,
            ingest,
            seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Where the blob with `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    /// Reads a whole blob.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        let p = self.path(digest);
        std::fs::read(&p).map_err(|source| ContentError::Io { path: p, source })
    }

    /// Stores `data` under `digest` after checking that it hashes to it.
    pub fn write(&self, digest: &Digest, data: &[u8]) -> Result<(), ContentError> {
        let actual = Digest::from_sha256(&Sha256::digest(data));
        if &actual != digest {
            return Err(ContentError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let dest = self.path(digest);
        if dest.exists() {
            return Ok(());
        }
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.ingest.join(format!("{}.{n}", digest.hex()));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ContentError::Io { path, source }
        };
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &dest).map_err(io(&dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes a blob; a missing one is fine.
    pub fn remove(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// Every digest present.
    pub fn list(&self) -> Vec<Digest> {
        std::fs::read_dir(&self.blobs)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Bytes and files used by the store.
    pub fn usage(&self) -> (u64, u64) {
        let mut bytes = 0;
        let mut files = 0;
        if let Ok(rd) = std::fs::read_dir(&self.blobs) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    bytes += m.len();
                    files += 1;
                }
            }
        }
        (bytes, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_kept_only_under_its_own_digest() {
        let d = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(d.path()).unwrap();
        let good = Digest::from_sha256(&Sha256::digest(b"hello"));
        cs.write(&good, b"hello").unwrap();
        assert_eq!(cs.read(&good).unwrap(), b"hello");
        let wrong = Digest::from_sha256(&Sha256::digest(b"other"));
        assert!(matches!(
            cs.write(&wrong, b"hello"),
            Err(ContentError::DigestMismatch { .. })
        ));
        assert!(!cs.contains(&wrong));
        assert_eq!(
            std::fs::read_dir(d.path().join("ingest")).unwrap().count(),
            0
        );
    }

    #[test]
    fn concurrent_writers_of_one_blob_all_succeed() {
        let d = tempfile::tempdir().unwrap();
        let cs = std::sync::Arc::new(ContentStore::open(d.path()).unwrap());
        let data = vec![7u8; 1 << 20];
        let digest = Digest::from_sha256(&Sha256::digest(&data));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cs, data, digest) = (cs.clone(), data.clone(), digest.clone());
                std::thread::spawn(move || cs.write(&digest, &data))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(cs.read(&digest).unwrap(), data);
    }
}
