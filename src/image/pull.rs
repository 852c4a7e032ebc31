//! A pull: resolve the reference at each endpoint in turn (mirrors first), pick this host's
//! platform, store manifest and config, then stream every missing layer straight into its
//! snapshot — several layers at once, each unpacked while it downloads, each verified by both
//! its blob digest and its diff ID before it becomes visible.
//!
//! Cancellation is by drop: when kubelet's call goes away, the download stops, the unpacking
//! thread sees its input end early and removes its temporary directory.

use std::io::Read;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::manifest::{self, Document, ImageConfig};
use super::reference::{Digest, Reference};
use super::registry::{Credentials, CriAuth, Endpoint, RegistryError};
use super::snapshot::{self, LayerError, SnapshotMeta};
use super::{ImageError, ImageRecord, ImageStore, LayerRecord};

/// Image configs are small; a huge one is hostile.
const MAX_CONFIG_BYTES: usize = 16 << 20;
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// What the downloading side hands the unpacking thread.
enum Chunk {
    Data(Bytes),
    End,
}

/// A blocking reader over the chunks of one download. If the sender goes away without `End`
/// (cancelled pull, failed download) reading fails, so a partial layer never looks whole.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.ended = true,
                None => {
                    return Err(std::io::Error::other(
                        "the download stopped before the layer was complete",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// The result of resolving a reference at one endpoint.
struct Resolved {
    top_digest: String,
    index_digest: Option<String>,
    manifest_digest: String,
    manifest: manifest::Manifest,
}

impl ImageStore {
    /// Pulls an image; returns its ID.
    pub async fn pull(
        &self,
        reference: &str,
        creds: Option<CriAuth>,
    ) -> Result<String, ImageError> {
        let r = pull(self, reference, creds).await;
        return_free_heap();
        r
    }
}

/// Hands the heap a pull freed back to the kernel. A pull allocates megabytes on several
/// threads (decompression windows, TLS, manifests) and glibc keeps each thread's freed arena
/// pages mapped; berthd then idles for hours with that memory counted against it.
fn return_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks and advises the
    // kernel about free pages; it touches no memory of ours and is safe from any thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Pulls `reference`, trying each endpoint until one serves it.
async fn pull(
    store: &ImageStore,
    reference: &str,
    creds: Option<CriAuth>,
) -> Result<String, ImageError> {
    let r = Reference::parse(reference)?;
    let started = Instant::now();
    tracing::info!(image = %r, "pulling image");
    let mut errors = Vec::new();
    for ep in store.endpoints(r.domain()) {
        let creds = store
            .registry()
            .credentials_for(&ep, r.domain(), creds.as_ref())
            .map_err(|message| ImageError::Credentials {
                reference: r.to_string(),
                message,
            })?;
        match pull_from(store, &r, &ep, &creds).await {
            Ok(id) => {
                tracing::info!(image = %r, id = %id, endpoint = %ep, elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
                return Ok(id);
            }
            Err(Attempt::NextEndpoint(e)) => {
                tracing::info!(image = %r, endpoint = %ep, error = %e, "endpoint failed; trying the next");
                errors.push(e);
            }
            Err(Attempt::Fatal(e)) => {
                tracing::warn!(image = %r, error = %e, "pull failed");
                return Err(e);
            }
        }
    }
    let e = ImageError::Registry {
        reference: r.to_string(),
        errors,
    };
    tracing::warn!(image = %r, error = %e, "pull failed");
    Err(e)
}

/// An endpoint's failure either lets the next endpoint try, or ends the pull.
enum Attempt {
    NextEndpoint(RegistryError),
    Fatal(ImageError),
}

impl From<ImageError> for Attempt {
    fn from(e: ImageError) -> Attempt {
        Attempt::Fatal(e)
    }
}

async fn pull_from(
    store: &ImageStore,
    r: &Reference,
    ep: &Endpoint,
    creds: &Credentials,
) -> Result<String, Attempt> {
    let reg = store.registry();
    let bad = |message: String| {
        Attempt::Fatal(ImageError::BadImage {
            reference: r.to_string(),
            endpoint: ep.to_string(),
            message,
        })
    };
    let content_err = |context: &str, source| {
        Attempt::Fatal(ImageError::Content {
            context: format!("pulling {r}: {context}"),
            source,
        })
    };

    // Manifest, through an index when there is one.
    let (top, top_digest) = reg
        .fetch_manifest(ep, r.path(), &r.registry_ref(), creds)
        .await
        .map_err(Attempt::NextEndpoint)?;
    let resolved = match manifest::parse_document(&top).map_err(bad)? {
        Document::Manifest(m) => Resolved {
            top_digest: top_digest.clone(),
            index_digest: None,
            manifest_digest: top_digest.clone(),
            manifest: m,
        },
        Document::Index(entries) => {
            let want = manifest::host_platform();
            let pick = manifest::select_platform(&entries, &want).ok_or_else(|| {
                let have: Vec<String> = entries
                    .iter()
                    .filter_map(|e| e.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                bad(format!(
                    "no manifest for {want} in the index (it has {})",
                    have.join(", ")
                ))
            })?;
            let (body, digest) = reg
                .fetch_manifest(ep, r.path(), &pick.digest, creds)
                .await
                .map_err(Attempt::NextEndpoint)?;
            match manifest::parse_document(&body).map_err(bad)? {
                Document::Manifest(m) => {
                    let d = Digest::parse(&digest)
                        .ok_or_else(|| bad(format!("bad digest {digest}")))?;
                    store
                        .content()
                        .write(&d, &body)
                        .map_err(|e| content_err("platform manifest", e))?;
                    Resolved {
                        top_digest: top_digest.clone(),
                        index_digest: Some(top_digest.clone()),
                        manifest_digest: digest,
                        manifest: m,
                    }
                }
                Document::Index(_) => {
                    return Err(bad("an index entry points to another index".into()));
                }
            }
        }
    };
    let top_d = Digest::parse(&resolved.top_digest)
        .ok_or_else(|| bad(format!("bad digest {}", resolved.top_digest)))?;
    if let Some(want) = r.digest()
        && want != &top_d
    {
        return Err(Attempt::NextEndpoint(RegistryError::DigestMismatch {
            endpoint: ep.to_string(),
            what: format!("manifest {r}"),
            message: format!("asked for {want}, got {top_d}"),
        }));
    }

    // What this pull fetches is held against garbage collection until it is published.
    let lease = store.lease();
    let m = &resolved.manifest;
    let config_digest = Digest::parse(&m.config.digest)
        .ok_or_else(|| bad(format!("bad config digest {:?}", m.config.digest)))?;
    lease.add([
        resolved.top_digest.clone(),
        resolved.manifest_digest.clone(),
        config_digest.to_string(),
    ]);
    store
        .content()
        .write(&top_d, &top)
        .map_err(|e| content_err("manifest", e))?;

    // Config.
    let config_raw = if store.content().contains(&config_digest) {
        store
            .content()
            .read(&config_digest)
            .map_err(|e| content_err("config", e))?
    } else {
        if m.config.size > MAX_CONFIG_BYTES as i64 {
            return Err(bad(format!(
                "config of {} bytes is too large",
                m.config.size
            )));
        }
        let stream = reg
            .fetch_blob(
                ep,
                r.path(),
                config_digest.as_str(),
                m.config.size,
                &m.config.media_type,
                creds,
            )
            .await
            .map_err(Attempt::NextEndpoint)?;
        let mut buf = Vec::with_capacity(m.config.size.max(0) as usize);
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Attempt::NextEndpoint(RegistryError::Protocol {
                    endpoint: ep.to_string(),
                    message: format!("config {config_digest}: {e}"),
                })
            })?;
            if buf.len() + chunk.len() > MAX_CONFIG_BYTES {
                return Err(bad("config larger than 16 MiB".into()));
            }
            buf.extend_from_slice(&chunk);
        }
        match store.content().write(&config_digest, &buf) {
            Ok(()) => buf,
            Err(super::content::ContentError::DigestMismatch { expected, actual }) => {
                return Err(Attempt::NextEndpoint(RegistryError::DigestMismatch {
                    endpoint: ep.to_string(),
                    what: format!("config {expected}"),
                    message: format!("content hashes to {actual}"),
                }));
            }
            Err(e) => return Err(content_err("config", e)),
        }
    };
    let config: ImageConfig =
        serde_json::from_slice(&config_raw).map_err(|e| bad(format!("image config: {e}")))?;
    let config_json: serde_json::Value = serde_json::from_slice(&config_raw).unwrap_or_default();
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != m.layers.len() {
        return Err(bad(format!(
            "the manifest has {} layers but the config names {} diff IDs",
            m.layers.len(),
            diff_ids.len()
        )));
    }
    for d in diff_ids {
        Digest::parse(d).ok_or_else(|| bad(format!("config has a malformed diff ID {d:?}")))?;
    }
    let chains = snapshot::chain_ids(diff_ids);
    lease.add(chains.iter().cloned());

    // Layers: the missing ones, several at a time.
    let layers: Vec<LayerRecord> = m
        .layers
        .iter()
        .zip(diff_ids)
        .zip(&chains)
        .map(|((l, d), c)| LayerRecord {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: l.size,
            diff_id: d.clone(),
            chain_id: c.clone(),
        })
        .collect();
    for l in &layers {
        Digest::parse(&l.digest)
            .ok_or_else(|| bad(format!("layer with a malformed digest {:?}", l.digest)))?;
    }
    futures::stream::iter(layers.iter().map(Ok))
        .try_for_each_concurrent(store.max_downloads(), |l| {
            ensure_layer(store, r, ep, creds, l)
        })
        .await?;

    // Publish.
    let size = layers.iter().map(|l| l.size.max(0) as u64).sum::<u64>() + config_raw.len() as u64;
    let rec = ImageRecord {
        id: config_digest.to_string(),
        repo_tags: if r.digest().is_none() {
            r.tagged().into_iter().collect()
        } else {
            Vec::new()
        },
        repo_digests: vec![r.with_digest(&top_d)],
        manifest_digest: resolved.manifest_digest.clone(),
        index_digest: resolved.index_digest.clone(),
        layers,
        size,
        pulled_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    store.publish(rec, config, config_json).await?;
    drop(lease);
    Ok(config_digest.to_string())
}

/// Makes sure the snapshot of one layer exists: downloads and unpacks it unless another pull
/// already did (or is doing it: then this waits for that one).
async fn ensure_layer(
    store: &ImageStore,
    r: &Reference,
    ep: &Endpoint,
    creds: &Credentials,
    l: &LayerRecord,
) -> Result<(), Attempt> {
    let snaps = store.snapshots();
    let _building = snaps.lock(&l.chain_id).await;
    if snaps.get(&l.chain_id).is_some() {
        return Ok(());
    }
    let layer_err = |source: LayerError| {
        Attempt::Fatal(ImageError::Layer {
            reference: r.to_string(),
            digest: l.digest.clone(),
            endpoint: ep.to_string(),
            source: Box::new(source),
        })
    };
    let temp = snaps.begin(&l.chain_id).map_err(layer_err)?;
    let stream = store
        .registry()
        .fetch_blob(ep, r.path(), &l.digest, l.size, &l.media_type, creds)
        .await
        .map_err(Attempt::NextEndpoint)?;

    let (tx, rx) = mpsc::channel::<Chunk>(32);
    let digest = l.digest.clone();
    let diff_id = l.diff_id.clone();
    // The unpacking thread owns the temp snapshot: if anything fails, including this future
    // being dropped, it removes the directory itself.
    let unpacker = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
            ended: false,
        };
        let res = snapshot::unpack_verified(reader, &temp.fs(), &digest, &diff_id);
        res.map(|stats| (temp, stats))
    });

    let timeout = store.progress_timeout();
    let mut stream = std::pin::pin!(stream);
    let started = Instant::now();
    let mut last_log = started;
    let mut received: u64 = 0;
    let mut download_error: Option<Attempt> = None;
    loop {
        let next = match tokio::time::timeout(timeout, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                download_error = Some(Attempt::Fatal(ImageError::Stalled {
                    reference: r.to_string(),
                    digest: l.digest.clone(),
                    endpoint: ep.to_string(),
                    seconds: timeout.as_secs(),
                    received,
                }));
                break;
            }
        };
        match next {
            Some(Ok(b)) => {
                received += b.len() as u64;
                if last_log.elapsed() >= PROGRESS_LOG_EVERY {
                    last_log = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        image = %r, layer = %l.digest, received, total = l.size,
                        rate_mib_s = format!("{:.1}", received as f64 / secs / 1048576.0),
                        "pull progress"
                    );
                }
                if tx.send(Chunk::Data(b)).await.is_err() {
                    break; // the unpacker stopped: its error says why
                }
            }
            Some(Err(e)) => {
                download_error = Some(Attempt::NextEndpoint(RegistryError::Protocol {
                    endpoint: ep.to_string(),
                    message: format!("layer {}: {e}", l.digest),
                }));
                break;
            }
            None => {
                let _ = tx.send(Chunk::End).await;
                break;
            }
        }
    }
    drop(tx);
    let joined = unpacker.await.map_err(|e| {
        layer_err(LayerError::Io {
            path: snaps.dir().to_owned(),
            source: std::io::Error::other(format!("unpacking thread failed: {e}")),
        })
    })?;
    if let Some(e) = download_error {
        return Err(e);
    }
    let (temp, stats) = joined.map_err(|e| match e {
        LayerError::DigestMismatch { expected, actual } => {
            Attempt::NextEndpoint(RegistryError::DigestMismatch {
                endpoint: ep.to_string(),
                what: format!("layer {expected}"),
                message: format!("the downloaded blob hashes to {actual}"),
            })
        }
        e => layer_err(e),
    })?;
    let secs = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(
        image = %r, layer = %l.digest, bytes = received, files = stats.inodes,
        rate_mib_s = format!("{:.1}", received as f64 / secs / 1048576.0),
        "layer unpacked"
    );
    snaps
        .commit(
            temp,
            SnapshotMeta {
                chain_id: l.chain_id.clone(),
                diff_id: l.diff_id.clone(),
                digest: l.digest.clone(),
                stats,
            },
        )
        .map_err(layer_err)
}
