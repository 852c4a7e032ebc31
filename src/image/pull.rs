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

use super::credentials::{Credentials, CriAuth};
use super::endpoints::Endpoint;
use super::manifest::{self, Document, ImageConfig};
use super::reference::{Digest, Reference};
use super::registry::RegistryError;
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
        self: &std::sync::Arc<Self>,
        reference: &str,
        creds: Option<CriAuth>,
    ) -> Result<String, ImageError> {
        let started = Instant::now();
        let r = pull(self, reference, creds).await;
        crate::telemetry::pull_done(r.is_ok(), started.elapsed().as_secs_f64());
        return_free_heap();
        // The new layers' files are stored (and their snapshots marked durable) after the
        // answer: the pull does not wait for the disk.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_snapshots());
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
        let attempt = Attempting {
            store,
            r: &r,
            ep: &ep,
            creds: &creds,
        };
        match attempt.run().await {
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

/// One attempt: a pull from one endpoint with one set of credentials.
struct Attempting<'a> {
    store: &'a ImageStore,
    r: &'a Reference,
    ep: &'a Endpoint,
    creds: &'a Credentials,
}

impl Attempting<'_> {
    /// The image is not usable (as served by this endpoint).
    fn bad(&self, message: String) -> Attempt {
        Attempt::Fatal(ImageError::BadImage {
            reference: self.r.to_string(),
            endpoint: self.ep.to_string(),
            message,
        })
    }

    fn content_err(&self, context: &str, source: super::content::ContentError) -> Attempt {
        Attempt::Fatal(ImageError::Content {
            context: format!("pulling {}: {context}", self.r),
            source,
        })
    }

    fn digest(&self, d: &str, what: &str) -> Result<Digest, Attempt> {
        Digest::parse(d).ok_or_else(|| self.bad(format!("malformed {what} digest {d:?}")))
    }

    /// The steps of a pull from this endpoint; returns the image ID.
    async fn run(&self) -> Result<String, Attempt> {
        let (top, resolved) = self.resolve().await?;
        let top_d = self.digest(&resolved.top_digest, "manifest")?;
        if let Some(want) = self.r.digest()
            && want != &top_d
        {
            return Err(Attempt::NextEndpoint(RegistryError::DigestMismatch {
                endpoint: self.ep.to_string(),
                what: format!("manifest {}", self.r),
                message: format!("asked for {want}, got {top_d}"),
            }));
        }
        // What this pull fetches is held against garbage collection until it is published.
        let lease = self.store.lease();
        let m = &resolved.manifest;
        let config_digest = self.digest(&m.config.digest, "config")?;
        lease.add([
            resolved.top_digest.clone(),
            resolved.manifest_digest.clone(),
            config_digest.to_string(),
        ]);
        self.store
            .content()
            .write(&top_d, &top)
            .map_err(|e| self.content_err("manifest", e))?;
        let config_raw = self.config(m, &config_digest).await?;
        let config: ImageConfig = serde_json::from_slice(&config_raw)
            .map_err(|e| self.bad(format!("image config: {e}")))?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&config_raw).unwrap_or_default();
        let layers = self.layer_records(m, &config)?;
        lease.add(layers.iter().map(|l| l.chain_id.clone()));
        // The missing layers, several at a time.
        futures::stream::iter(layers.iter().map(Ok))
            .try_for_each_concurrent(self.store.max_downloads(), |l| self.ensure_layer(l))
            .await?;
        crate::failpoint::hit("pull:unpacked").await;
        let size =
            layers.iter().map(|l| l.size.max(0) as u64).sum::<u64>() + config_raw.len() as u64;
        let rec = ImageRecord {
            id: config_digest.to_string(),
            repo_tags: if self.r.digest().is_none() {
                self.r.tagged().into_iter().collect()
            } else {
                Vec::new()
            },
            repo_digests: vec![self.r.with_digest(&top_d)],
            manifest_digest: resolved.manifest_digest.clone(),
            index_digest: resolved.index_digest.clone(),
            layers,
            size,
            pulled_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        self.store.publish(rec, config, config_json).await?;
        drop(lease);
        Ok(config_digest.to_string())
    }

    /// The manifest for this host, through an index when there is one; the top document's
    /// bytes too (stored once the pull is leased).
    async fn resolve(&self) -> Result<(Bytes, Resolved), Attempt> {
        let reg = self.store.registry();
        let (top, top_digest) = reg
            .fetch_manifest(self.ep, self.r.path(), &self.r.registry_ref(), self.creds)
            .await
            .map_err(Attempt::NextEndpoint)?;
        let entries = match manifest::parse_document(&top).map_err(|e| self.bad(e))? {
            Document::Manifest(m) => {
                let resolved = Resolved {
                    top_digest: top_digest.clone(),
                    index_digest: None,
                    manifest_digest: top_digest,
                    manifest: m,
                };
                return Ok((top, resolved));
            }
            Document::Index(entries) => entries,
        };
        let want = manifest::host_platform();
        let pick = manifest::select_platform(&entries, &want).ok_or_else(|| {
            let have: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform.as_ref().map(|p| p.to_string()))
                .collect();
            self.bad(format!(
                "no manifest for {want} in the index (it has {})",
                have.join(", ")
            ))
        })?;
        let (body, digest) = reg
            .fetch_manifest(self.ep, self.r.path(), &pick.digest, self.creds)
            .await
            .map_err(Attempt::NextEndpoint)?;
        let Document::Manifest(m) = manifest::parse_document(&body).map_err(|e| self.bad(e))?
        else {
            return Err(self.bad("an index entry points to another index".into()));
        };
        let d = self.digest(&digest, "platform manifest")?;
        self.store
            .content()
            .write(&d, &body)
            .map_err(|e| self.content_err("platform manifest", e))?;
        let resolved = Resolved {
            top_digest: top_digest.clone(),
            index_digest: Some(top_digest),
            manifest_digest: digest,
            manifest: m,
        };
        Ok((top, resolved))
    }

    /// The image config: from the content store, or fetched (bounded) and verified.
    async fn config(
        &self,
        m: &manifest::Manifest,
        config_digest: &Digest,
    ) -> Result<Vec<u8>, Attempt> {
        let content = self.store.content();
        if content.contains(config_digest) {
            return content
                .read(config_digest)
                .map_err(|e| self.content_err("config", e));
        }
        if m.config.size > MAX_CONFIG_BYTES as i64 || m.config.size < 0 {
            return Err(self.bad(format!(
                "config of {} bytes is out of bounds (0..=16 MiB)",
                m.config.size
            )));
        }
        let declared = m.config.size as u64;
        let mismatch = |received: u64, more: bool| {
            Attempt::NextEndpoint(RegistryError::SizeMismatch {
                endpoint: self.ep.to_string(),
                what: format!("config {config_digest}"),
                declared: m.config.size,
                received,
                more,
            })
        };
        let stream = self
            .store
            .registry()
            .fetch_blob(
                self.ep,
                self.r.path(),
                config_digest.as_str(),
                m.config.size,
                &m.config.media_type,
                self.creds,
            )
            .await
            .map_err(Attempt::NextEndpoint)?;
        let mut buf = Vec::with_capacity(m.config.size.max(0) as usize);
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Attempt::NextEndpoint(RegistryError::Protocol {
                    endpoint: self.ep.to_string(),
                    message: format!("config {config_digest}: {e}"),
                })
            })?;
            crate::telemetry::pulled_bytes(chunk.len() as u64);
            if (buf.len() + chunk.len()) as u64 > declared {
                return Err(mismatch(buf.len() as u64, true));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() as u64 != declared {
            return Err(mismatch(buf.len() as u64, false));
        }
        match content.write(config_digest, &buf) {
            Ok(()) => Ok(buf),
            Err(super::content::ContentError::DigestMismatch { expected, actual }) => {
                Err(Attempt::NextEndpoint(RegistryError::DigestMismatch {
                    endpoint: self.ep.to_string(),
                    what: format!("config {expected}"),
                    message: format!("content hashes to {actual}"),
                }))
            }
            Err(e) => Err(self.content_err("config", e)),
        }
    }

    /// The layers as recorded: each manifest layer with its diff ID and chain ID, all
    /// well-formed and as many as the config names.
    fn layer_records(
        &self,
        m: &manifest::Manifest,
        config: &ImageConfig,
    ) -> Result<Vec<LayerRecord>, Attempt> {
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != m.layers.len() {
            return Err(self.bad(format!(
                "the manifest has {} layers but the config names {} diff IDs",
                m.layers.len(),
                diff_ids.len()
            )));
        }
        for d in diff_ids {
            Digest::parse(d)
                .ok_or_else(|| self.bad(format!("config has a malformed diff ID {d:?}")))?;
        }
        let chains = snapshot::chain_ids(diff_ids);
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
                .ok_or_else(|| self.bad(format!("layer with a malformed digest {:?}", l.digest)))?;
            if l.size < 0 {
                return Err(self.bad(format!("layer {} has a negative size {}", l.digest, l.size)));
            }
        }
        Ok(layers)
    }

    fn layer_err(&self, l: &LayerRecord, source: LayerError) -> Attempt {
        Attempt::Fatal(ImageError::Layer {
            reference: self.r.to_string(),
            digest: l.digest.clone(),
            endpoint: self.ep.to_string(),
            source: Box::new(source),
        })
    }

    /// A layer's snapshot, unless it exists: downloaded and unpacked at once (on a blocking
    /// thread fed through a channel), verified, committed.
    async fn ensure_layer(&self, l: &LayerRecord) -> Result<(), Attempt> {
        let snaps = self.store.snapshots();
        let _building = snaps.lock(&l.chain_id).await;
        if snaps.get(&l.chain_id).is_some() {
            return Ok(());
        }
        let temp = snaps.begin(&l.chain_id).map_err(|e| self.layer_err(l, e))?;
        let stream = self
            .store
            .registry()
            .fetch_blob(
                self.ep,
                self.r.path(),
                &l.digest,
                l.size,
                &l.media_type,
                self.creds,
            )
            .await
            .map_err(Attempt::NextEndpoint)?;
        let (tx, rx) = mpsc::channel::<Chunk>(32);
        let (digest, diff_id) = (l.digest.clone(), l.diff_id.clone());
        let limits = self.store.layer_limits();
        // The unpacking thread owns the temp snapshot: if anything fails, including this
        // future being dropped, it removes the directory itself.
        let unpacker = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx,
                cur: Bytes::new(),
                ended: false,
            };
            let res = snapshot::unpack_verified(reader, &temp.fs(), &digest, &diff_id, limits);
            res.map(|stats| (temp, stats))
        });
        let started = Instant::now();
        let downloaded = self.download(l, stream, tx).await;
        let joined = unpacker.await.map_err(|e| {
            self.layer_err(
                l,
                LayerError::Io {
                    path: snaps.dir().to_owned(),
                    source: std::io::Error::other(format!("unpacking thread failed: {e}")),
                },
            )
        })?;
        let received = downloaded?;
        let (temp, stats) = joined.map_err(|e| match e {
            LayerError::DigestMismatch { expected, actual } => {
                Attempt::NextEndpoint(RegistryError::DigestMismatch {
                    endpoint: self.ep.to_string(),
                    what: format!("layer {expected}"),
                    message: format!("the downloaded blob hashes to {actual}"),
                })
            }
            e => self.layer_err(l, e),
        })?;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            image = %self.r, layer = %l.digest, bytes = received, files = stats.inodes,
            rate_mib_s = format!("{:.1}", received as f64 / secs / 1048576.0),
            "layer unpacked"
        );
        let meta = SnapshotMeta {
            chain_id: l.chain_id.clone(),
            diff_id: l.diff_id.clone(),
            digest: l.digest.clone(),
            stats,
            durable: false,
        };
        snaps.commit(temp, meta).map_err(|e| self.layer_err(l, e))
    }

    /// A blob that went past its declared size or ended short: the next endpoint may serve it
    /// right.
    fn size_mismatch(&self, what: &str, l: &LayerRecord, received: u64, more: bool) -> Attempt {
        Attempt::NextEndpoint(RegistryError::SizeMismatch {
            endpoint: self.ep.to_string(),
            what: format!("{what} {}", l.digest),
            declared: l.size,
            received,
            more,
        })
    }

    /// Feeds a layer's download to the unpacker; returns the bytes received. A download that
    /// delivers nothing for the progress timeout fails; an unpacker that stops ends it (its
    /// own error says why).
    async fn download(
        &self,
        l: &LayerRecord,
        stream: impl futures::Stream<Item = std::io::Result<Bytes>>,
        tx: mpsc::Sender<Chunk>,
    ) -> Result<u64, Attempt> {
        let timeout = self.store.progress_timeout();
        let declared = u64::try_from(l.size).unwrap_or(0);
        let mut stream = std::pin::pin!(stream);
        let started = Instant::now();
        let mut last_log = started;
        let mut received: u64 = 0;
        loop {
            let Ok(next) = tokio::time::timeout(timeout, stream.next()).await else {
                return Err(Attempt::Fatal(ImageError::Stalled {
                    reference: self.r.to_string(),
                    digest: l.digest.clone(),
                    endpoint: self.ep.to_string(),
                    seconds: timeout.as_secs(),
                    received,
                }));
            };
            match next {
                Some(Ok(b)) => {
                    // Not a byte past the descriptor: an endless answer for a small layer
                    // would otherwise be unpacked until the disk is full.
                    if received + b.len() as u64 > declared {
                        return Err(self.size_mismatch("layer", l, received, true));
                    }
                    received += b.len() as u64;
                    crate::telemetry::pulled_bytes(b.len() as u64);
                    if last_log.elapsed() >= PROGRESS_LOG_EVERY {
                        last_log = Instant::now();
                        let secs = started.elapsed().as_secs_f64().max(0.001);
                        tracing::info!(
                            image = %self.r, layer = %l.digest, received, total = l.size,
                            rate_mib_s = format!("{:.1}", received as f64 / secs / 1048576.0),
                            "pull progress"
                        );
                    }
                    if tx.send(Chunk::Data(b)).await.is_err() {
                        return Ok(received);
                    }
                }
                Some(Err(e)) => {
                    // The client checks the digest as the stream ends: a short blob fails
                    // here, and saying how short is the clearer part.
                    let short = if received < declared {
                        format!(
                            "the manifest declares {} bytes, the registry sent {received}: ",
                            l.size
                        )
                    } else {
                        String::new()
                    };
                    return Err(Attempt::NextEndpoint(RegistryError::Protocol {
                        endpoint: self.ep.to_string(),
                        message: format!("layer {}: {short}{e}", l.digest),
                    }));
                }
                None => {
                    if received != declared {
                        return Err(self.size_mismatch("layer", l, received, false));
                    }
                    let _ = tx.send(Chunk::End).await;
                    return Ok(received);
                }
            }
        }
    }
}
