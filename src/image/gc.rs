//! What keeps content and snapshots alive, and their collection: images hold theirs, a pull in
//! flight holds what it fetched (a lease dropped when the pull ends), a container holds its
//! image and its image volumes' images durably (`state/leases/<owner>.json`). Garbage
//! collection runs after RemoveImage and after a container's hold is released.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::reference::Digest;
use super::{Image, ImageError, ImageStore, LeaseRecord};
use crate::store::{self, StoreError};

/// A pull's hold on what it has fetched but not yet published.
pub(crate) struct PullLease<'a> {
    store: &'a ImageStore,
    id: String,
}

impl PullLease<'_> {
    pub(crate) fn add(&self, items: impl IntoIterator<Item = String>) {
        let mut l = self.store.leases.lock().expect("leases lock poisoned");
        l.entry(self.id.clone()).or_default().extend(items);
    }
}

impl Drop for PullLease<'_> {
    fn drop(&mut self) {
        self.store
            .leases
            .lock()
            .expect("leases lock poisoned")
            .remove(&self.id);
    }
}

impl ImageStore {
    /// A new hold for a pull in flight, dropped when the pull ends.
    pub(super) fn lease(&self) -> PullLease<'_> {
        let id = format!("pull-{}", self.next_lease.fetch_add(1, Ordering::Relaxed));
        PullLease { store: self, id }
    }

    /// Holds the layers of `images` (a container's own and its image volumes') for `owner`,
    /// durably, until `release`. Taken under the collector's lock, and only for images still
    /// here: an image removed between a caller finding it and this hold is NotFound, never
    /// held half-deleted.
    pub async fn hold(&self, owner: &str, images: &[&Image]) -> Result<(), ImageError> {
        let _commit = self.commit.lock().await;
        {
            let idx = self.read_index();
            if let Some(gone) = images
                .iter()
                .find(|i| !idx.by_id.contains_key(&i.record.id))
            {
                return Err(ImageError::NotFound(format!(
                    "{} (removed while the container was being made)",
                    gone.record.id
                )));
            }
        }
        let mut items: Vec<String> = Vec::new();
        for img in images {
            for i in img.chain_ids().into_iter().chain(img.content_digests()) {
                if !items.contains(&i) {
                    items.push(i);
                }
            }
        }
        store::write_json_volatile(
            &self.leases_dir.join(format!("{owner}.json")),
            &LeaseRecord {
                owner: owner.to_string(),
                image_id: images
                    .first()
                    .map(|i| i.record.id.clone())
                    .unwrap_or_default(),
                volume_images: images.iter().skip(1).map(|i| i.record.id.clone()).collect(),
                items: items.clone(),
            },
        )?;
        self.leases
            .lock()
            .expect("leases lock poisoned")
            .insert(owner.to_string(), items);
        Ok(())
    }

    /// Drops `owner`'s hold and collects what nothing uses any more.
    pub async fn release(&self, owner: &str) -> Result<(), ImageError> {
        match std::fs::remove_file(self.leases_dir.join(format!("{owner}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ImageError::Store(StoreError::Io {
                    what: "removing",
                    path: self.leases_dir.join(format!("{owner}.json")),
                    source,
                }));
            }
        }
        let had = self
            .leases
            .lock()
            .expect("leases lock poisoned")
            .remove(owner)
            .is_some();
        if had {
            self.gc().await;
        }
        Ok(())
    }

    /// Owners of durable holds (containers), for reconciliation at start.
    pub fn holders(&self) -> Vec<String> {
        self.leases
            .lock()
            .expect("leases lock poisoned")
            .keys()
            .filter(|k| !k.starts_with("pull-"))
            .cloned()
            .collect()
    }

    /// Removes an image (every tag of it) found by any reference form; an unknown one is fine.
    /// Its layers go when no other image and no container uses them.
    pub async fn remove(&self, name: &str) -> Result<(), ImageError> {
        {
            let _commit = self.commit.lock().await;
            let Some(img) = self.find(name) else {
                return Ok(());
            };
            store::remove(
                &self
                    .images_dir
                    .join(format!("{}.json", &img.record.id["sha256:".len()..])),
            )?;
            self.index
                .write()
                .expect("image index lock poisoned")
                .remove(&img.record.id);
            tracing::info!(image = %img.record.id, tags = ?img.record.repo_tags, "image removed");
        }
        self.gc().await;
        Ok(())
    }

    /// Deletes snapshots and content that no image, pull or container holds.
    pub async fn gc(&self) {
        let _commit = self.commit.lock().await;
        let mut keep: HashSet<String> = HashSet::new();
        for img in self.read_index().by_id.values() {
            keep.extend(img.chain_ids());
            keep.extend(img.content_digests());
        }
        for items in self.leases.lock().expect("leases lock poisoned").values() {
            keep.extend(items.iter().cloned());
        }
        let dead_snapshots: Vec<String> = self
            .snapshots
            .chain_ids()
            .into_iter()
            .filter(|c| !keep.contains(c))
            .collect();
        let dead_content: Vec<Digest> = self
            .content
            .list()
            .into_iter()
            .filter(|d| !keep.contains(d.as_str()))
            .collect();
        if dead_snapshots.is_empty() && dead_content.is_empty() {
            return;
        }
        let snaps = &self.snapshots;
        let content = &self.content;
        // Deleting trees is slow, blocking work; the commit lock keeps pulls from racing it.
        tokio::task::block_in_place(|| {
            for c in &dead_snapshots {
                snaps.remove(c);
            }
            for d in &dead_content {
                content.remove(d);
            }
        });
    }
}
