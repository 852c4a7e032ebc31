//! Images: references, registry pulls, the content store, layer snapshots and the image index.
//!
//! An image is recorded in `root/images/<id hex>.json` (tags, repo digests, manifest and
//! layers); its manifest and config live in the content store; its layers in snapshots. The
//! index in memory answers List/Status without touching the disk, so kubelet's polling never
//! waits behind a pull: pulls take the index lock only for the instant they publish.

pub mod content;
pub mod credentials;
pub mod endpoints;
mod gc;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod unpack;
pub mod user;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::Error;
use crate::store::{self, StoreError};
use content::{ContentError, ContentStore};
use manifest::ImageConfig;
use reference::{Digest, Reference, ReferenceError, is_sha256_hex};
use registry::{Registry, RegistryError};
use snapshot::{LayerError, SnapshotStore};
use unpack::UnpackError;

/// Errors of the image subsystem.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A malformed reference.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// No such image here.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// A record of the store that cannot be read: berthd does not start on it.
    #[error("{0}")]
    Unreadable(String),
    /// Every endpoint failed; each one's error is listed.
    #[error("pulling {reference}: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Registry {
        /// The image.
        reference: String,
        /// One error per endpoint tried.
        errors: Vec<RegistryError>,
    },
    /// Credentials that cannot be used.
    #[error("credentials for {reference}: {message}")]
    Credentials {
        /// The image.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// A layer could not be downloaded, verified or unpacked.
    #[error("pulling {reference}: layer {digest} from {endpoint}: {source}")]
    Layer {
        /// The image.
        reference: String,
        /// The layer's blob digest.
        digest: String,
        /// Where it came from.
        endpoint: String,
        /// What went wrong.
        source: Box<LayerError>,
    },
    /// A download stopped moving.
    #[error(
        "pulling {reference}: layer {digest} from {endpoint}: no progress for {seconds}s ({received} bytes received); giving up"
    )]
    Stalled {
        /// The image.
        reference: String,
        /// The layer.
        digest: String,
        /// Where from.
        endpoint: String,
        /// The configured timeout.
        seconds: u64,
        /// Bytes received before it stalled.
        received: u64,
    },
    /// A manifest or config that is not usable.
    #[error("pulling {reference} from {endpoint}: {message}")]
    BadImage {
        /// The image.
        reference: String,
        /// Where from.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// The content store failed.
    #[error("{context}: {source}")]
    Content {
        /// What was being done.
        context: String,
        /// Why.
        source: ContentError,
    },
    /// A record could not be written or read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImageError {
    fn is_no_space(&self) -> bool {
        match self {
            ImageError::Layer { source, .. } => source.is_no_space(),
            ImageError::Content { source, .. } => source.is_no_space(),
            ImageError::Store(s) => s.is_no_space(),
            _ => false,
        }
    }
}

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Error {
        let no_space = e.is_no_space();
        let msg = e.to_string();
        if no_space {
            return Error::ResourceExhausted(msg);
        }
        match e {
            ImageError::Reference(_) | ImageError::Credentials { .. } => {
                Error::InvalidArgument(msg)
            }
            ImageError::NotFound(_) => Error::NotFound(msg),
            ImageError::Registry { errors, .. } => {
                if errors
                    .iter()
                    .any(|e| matches!(e, RegistryError::NotFound { .. }))
                {
                    Error::NotFound(msg)
                } else if errors
                    .iter()
                    .any(|e| matches!(e, RegistryError::Unauthorized { .. }))
                {
                    Error::PermissionDenied(msg)
                } else if errors
                    .iter()
                    .any(|e| matches!(e, RegistryError::SizeMismatch { more: true, .. }))
                {
                    // A blob longer than its descriptor: the image as served is invalid.
                    Error::InvalidArgument(msg)
                } else {
                    Error::Unavailable(msg)
                }
            }
            ImageError::Stalled { .. } => Error::DeadlineExceeded(msg),
            ImageError::Layer { source, .. }
                if matches!(*source, LayerError::Unpack(UnpackError::TooLarge { .. })) =>
            {
                Error::InvalidArgument(msg)
            }
            ImageError::Layer { source, .. } if matches!(*source, LayerError::Unpack(_)) => {
                Error::FailedPrecondition(msg)
            }
            ImageError::BadImage { .. } => Error::FailedPrecondition(msg),
            ImageError::Layer { .. } => Error::Unavailable(msg),
            ImageError::Content { .. } | ImageError::Store(_) | ImageError::Unreadable(_) => {
                Error::Internal(msg)
            }
        }
    }
}

/// One layer of an image as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The compressed blob digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Compressed size.
    pub size: i64,
    /// Uncompressed digest.
    pub diff_id: String,
    /// The chain ID naming its snapshot.
    pub chain_id: String,
}

/// An image as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:` of the config: the image ID.
    pub id: String,
    /// Normalized `name:tag` references.
    pub repo_tags: Vec<String>,
    /// Normalized `name@digest` references.
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The index or manifest list it was picked from, if any.
    #[serde(default)]
    pub index_digest: Option<String>,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Sum of the compressed layer sizes and the config.
    pub size: u64,
    /// When it was first pulled (Unix seconds).
    pub pulled_at: i64,
}

/// An image in the index: its record and its parsed config.
#[derive(Debug)]
pub struct Image {
    /// The record.
    pub record: ImageRecord,
    /// The image config.
    pub config: ImageConfig,
    /// The config as stored (for verbose status).
    pub config_json: serde_json::Value,
}

impl Image {
    /// The chain IDs of its layers, bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        self.record
            .layers
            .iter()
            .map(|l| l.chain_id.clone())
            .collect()
    }

    fn content_digests(&self) -> Vec<String> {
        let mut v = vec![self.record.id.clone(), self.record.manifest_digest.clone()];
        v.extend(self.record.index_digest.clone());
        v
    }
}

#[derive(Default)]
struct Index {
    by_id: HashMap<String, Arc<Image>>,
    /// Every tag and repo digest to the image ID.
    by_ref: HashMap<String, String>,
}

impl Index {
    fn insert(&mut self, img: Arc<Image>) {
        for r in img.record.repo_tags.iter().chain(&img.record.repo_digests) {
            self.by_ref.insert(r.clone(), img.record.id.clone());
        }
        self.by_id.insert(img.record.id.clone(), img);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Image>> {
        let img = self.by_id.remove(id)?;
        for r in img.record.repo_tags.iter().chain(&img.record.repo_digests) {
            if self.by_ref.get(r).map(String::as_str) == Some(id) {
                self.by_ref.remove(r);
            }
        }
        Some(img)
    }

    /// Finds an image by any form: name, name:tag, name@digest, full ID, ID without `sha256:`,
    /// or a unique ID prefix.
    fn find(&self, name: &str) -> Option<Arc<Image>> {
        let name = name.trim();
        if let Some(hex) = name.strip_prefix("sha256:")
            && is_sha256_hex(hex)
        {
            return self.by_id.get(name).cloned();
        }
        if is_sha256_hex(name)
            && let Some(i) = self.by_id.get(&format!("sha256:{name}"))
        {
            return Some(i.clone());
        }
        if let Ok(r) = Reference::parse(name) {
            let key = match r.digest() {
                Some(d) => r.with_digest(d),
                None => r.tagged().unwrap_or_default(),
            };
            if let Some(id) = self.by_ref.get(&key) {
                return self.by_id.get(id).cloned();
            }
        }
        // A unique ID prefix, as `crictl images` shows them truncated.
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut hits = self
                .by_id
                .values()
                .filter(|i| i.record.id["sha256:".len()..].starts_with(hex));
            if let (Some(one), None) = (hits.next(), hits.next()) {
                return Some(one.clone());
            }
        }
        None
    }
}

/// Bytes and inodes used by a filesystem area.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// The directory measured.
    pub mountpoint: PathBuf,
    /// Bytes used.
    pub bytes: u64,
    /// Inodes used.
    pub inodes: u64,
}

/// The image subsystem.
pub struct ImageStore {
    images_dir: PathBuf,
    leases_dir: PathBuf,
    config: Config,
    registry: Registry,
    content: ContentStore,
    snapshots: SnapshotStore,
    index: RwLock<Index>,
    /// Serializes publishing records and garbage collection.
    commit: tokio::sync::Mutex<()>,
    /// Chain IDs and content digests held by pulls in flight (by lease id) and by containers.
    leases: Mutex<HashMap<String, Vec<String>>>,
    next_lease: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    owner: String,
    image_id: String,
    /// The images of the owner's image volumes (records from before image volumes lack it).
    #[serde(default)]
    volume_images: Vec<String>,
    items: Vec<String>,
}

impl ImageStore {
    /// Opens the image store under the configured root: loads every image and container lease.
    pub fn open(config: &Config) -> Result<ImageStore, ImageError> {
        let root = &config.root;
        let images_dir = root.join("images");
        // Containers' holds live with the containers, in the state directory: after a reboot
        // both are gone together. Written without fsync, like every state-directory record.
        let leases_dir = config.state.join("leases");
        for d in [&images_dir, &leases_dir] {
            std::fs::create_dir_all(d).map_err(|source| StoreError::Io {
                what: "creating",
                path: d.clone(),
                source,
            })?;
            store::clean_temp(d);
        }
        // A reboot since the last start: snapshots never synced may be torn.
        let rebooted = store::rebooted_since_last_start(root)?;
        if rebooted {
            tracing::info!("the node rebooted since the last berthd: checking the snapshots");
        }
        let content =
            ContentStore::open(&root.join("content")).map_err(|source| ImageError::Content {
                context: "opening the content store".into(),
                source,
            })?;
        let snapshots =
            SnapshotStore::open(&root.join("snapshots"), rebooted).map_err(|source| {
                ImageError::Layer {
                    reference: String::new(),
                    digest: String::new(),
                    endpoint: String::new(),
                    source: Box::new(source),
                }
            })?;
        let mut index = Index::default();
        for rec in store::read_all::<ImageRecord>(&images_dir)? {
            let rec = rec.map_err(|e| ImageError::Unreadable(store::refusal(&e)))?;
            match load_image(&content, &snapshots, rec) {
                Ok(img) => index.insert(Arc::new(img)),
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an image whose content is incomplete")
                }
            }
        }
        let mut leases = HashMap::new();
        // A lease lost would let the collector delete what a container uses: unreadable
        // ones stop the start, as image records do.
        for l in store::read_all::<LeaseRecord>(&leases_dir)? {
            let l = l.map_err(|e| ImageError::Unreadable(store::refusal(&e)))?;
            leases.insert(l.owner, l.items);
        }
        let s = ImageStore {
            images_dir,
            leases_dir,
            registry: Registry::new(config.images.credentials_file.clone()),
            config: config.clone(),
            content,
            snapshots,
            index: RwLock::new(index),
            commit: tokio::sync::Mutex::new(()),
            leases: Mutex::new(leases),
            next_lease: AtomicU64::new(0),
        };
        Ok(s)
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().expect("image index lock poisoned")
    }

    /// Finds an image by any reference form.
    pub fn find(&self, name: &str) -> Option<Arc<Image>> {
        self.read_index().find(name)
    }

    /// Every image, or those matching `filter` (any reference form).
    pub fn list(&self, filter: Option<&str>) -> Vec<Arc<Image>> {
        let idx = self.read_index();
        match filter.filter(|f| !f.is_empty()) {
            Some(f) => idx.find(f).into_iter().collect(),
            None => idx.by_id.values().cloned().collect(),
        }
    }

    /// The snapshot directories of an image, top layer first (overlayfs lowerdir order).
    pub fn lower_dirs(&self, img: &Image) -> Vec<PathBuf> {
        img.record
            .layers
            .iter()
            .rev()
            .map(|l| self.snapshots.fs_path(&l.chain_id))
            .collect()
    }

    /// Bytes and inodes the image store uses.
    pub fn usage(&self) -> Usage {
        let (sb, si) = self.snapshots.usage();
        let (cb, ci) = self.content.usage();
        Usage {
            mountpoint: self.snapshots.dir().to_owned(),
            bytes: sb + cb,
            inodes: si + ci,
        }
    }

    /// Publishes a pulled image: merges with an existing record of the same ID, moves tags from
    /// other images to it, and writes every changed record.
    async fn publish(
        &self,
        mut rec: ImageRecord,
        config: ImageConfig,
        config_json: serde_json::Value,
    ) -> Result<(), ImageError> {
        let _commit = self.commit.lock().await;
        let (changed, merged) = {
            let idx = self.read_index();
            let mut changed: Vec<ImageRecord> = Vec::new();
            if let Some(old) = idx.by_id.get(&rec.id) {
                let mut merged = old.record.clone();
                for t in &rec.repo_tags {
                    if !merged.repo_tags.contains(t) {
                        merged.repo_tags.push(t.clone());
                    }
                }
                for d in &rec.repo_digests {
                    if !merged.repo_digests.contains(d) {
                        merged.repo_digests.push(d.clone());
                    }
                }
                rec = merged;
            }
            // A tag names one image: take it away from whichever image had it.
            for t in &rec.repo_tags {
                if let Some(other) = idx.by_ref.get(t).filter(|id| **id != rec.id)
                    && let Some(o) = idx.by_id.get(other)
                {
                    let mut o = changed
                        .iter()
                        .position(|c| c.id == *other)
                        .map(|i| changed.remove(i))
                        .unwrap_or_else(|| o.record.clone());
                    o.repo_tags.retain(|x| x != t);
                    changed.push(o);
                }
            }
            (changed, rec)
        };
        for c in changed.iter().chain(std::iter::once(&merged)) {
            store::write_json(
                &self
                    .images_dir
                    .join(format!("{}.json", &c.id["sha256:".len()..])),
                c,
            )?;
        }
        let mut idx = self.index.write().expect("image index lock poisoned");
        for c in changed {
            if let Some(old) = idx.remove(&c.id) {
                idx.insert(Arc::new(Image {
                    record: c,
                    config: old.config.clone(),
                    config_json: old.config_json.clone(),
                }));
            }
        }
        let is_new = idx.remove(&merged.id).is_none();
        tracing::info!(image = %merged.id, tags = ?merged.repo_tags, new = is_new, "image stored");
        idx.insert(Arc::new(Image {
            record: merged,
            config,
            config_json,
        }));
        Ok(())
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn content(&self) -> &ContentStore {
        &self.content
    }

    /// Stores the files of snapshots unpacked since the last sync and marks them durable.
    pub fn sync_snapshots(&self) {
        self.snapshots.sync();
    }

    pub(crate) fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    pub(crate) fn max_downloads(&self) -> usize {
        self.config.images.max_concurrent_downloads
    }

    /// What one layer may unpack to.
    pub(crate) fn layer_limits(&self) -> unpack::Limits {
        unpack::Limits {
            bytes: self.config.images.max_layer_bytes,
            inodes: self.config.images.max_layer_inodes,
        }
    }

    /// How long a download may go without receiving a byte.
    pub(crate) fn progress_timeout(&self) -> Duration {
        Duration::from_secs(self.config.images.pull_progress_timeout_seconds.max(1))
    }

    pub(crate) fn endpoints(&self, domain: &str) -> Vec<endpoints::Endpoint> {
        endpoints::endpoints(&self.config, domain)
    }
}

/// Rebuilds an index entry from its record, checking that its config and snapshots exist.
fn load_image(
    content: &ContentStore,
    snapshots: &SnapshotStore,
    rec: ImageRecord,
) -> Result<Image, String> {
    let digest =
        Digest::parse(&rec.id).ok_or_else(|| format!("image record with bad id {:?}", rec.id))?;
    let raw = content
        .read(&digest)
        .map_err(|e| format!("image {}: config: {e}", rec.id))?;
    let config: ImageConfig =
        serde_json::from_slice(&raw).map_err(|e| format!("image {}: config: {e}", rec.id))?;
    let config_json = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    for l in &rec.layers {
        if snapshots.get(&l.chain_id).is_none() {
            return Err(format!("image {}: snapshot {} missing", rec.id, l.chain_id));
        }
    }
    Ok(Image {
        record: rec,
        config,
        config_json,
    })
}
