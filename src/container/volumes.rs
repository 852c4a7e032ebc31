//! What the runtime binds for each of a container's mounts: host paths checked and resolved,
//! idmapped copies of them for a pod with its own user namespace (`volumes_idmapped`), image
//! volumes mounted (`image_volumes`); and the mount targets made inside the root for them.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::volumes_idmapped::{self, Attached};
use super::{ContainerRecord, Containers, MountSpec, image_volumes, internal, rootfs, spec};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::sandbox::PodRecord;

impl Containers {
    /// The source the runtime binds for each of the container's mounts, in the request's
    /// order, and the guard that detaches what was attached for them (drop it once the runtime
    /// holds its binds).
    pub(super) fn volume_sources(
        &self,
        rec: &ContainerRecord,
        p: &PodRecord,
        images: &[Arc<Image>],
    ) -> Result<(Attached, Vec<(MountSpec, PathBuf)>)> {
        let dir = self.layout.idmapped();
        let userns = p
            .spec
            .namespaces
            .user
            .map(|_| self.pods.ns_dir(&p.id).join("user"));
        let mut attached = Attached::default();
        let host: Vec<(MountSpec, PathBuf)> = rec
            .mounts
            .iter()
            .filter(|(m, _)| m.image.is_none())
            .cloned()
            .collect();
        let host = match &userns {
            Some(ns) if !host.is_empty() => {
                volumes_idmapped::attach(&mut attached, &dir, &rec.id, &host, ns)
                    .map_err(Error::InvalidArgument)?
            }
            _ => host,
        };
        let mut host = host.into_iter();
        let mut out = Vec::with_capacity(rec.mounts.len());
        for (n, (m, _)) in rec.mounts.iter().enumerate() {
            let Some(v) = &m.image else {
                out.extend(host.next());
                continue;
            };
            let fail = |e: String| {
                Error::InvalidArgument(format!(
                    "mount {}: image volume {:?}: {e}",
                    m.container_path, v.image
                ))
            };
            let img = images
                .iter()
                .find(|i| i.record.id == v.image_id)
                .ok_or_else(|| Error::Internal(format!("image {} was not found", v.image_id)))?;
            let mut layers = self.images.lower_dirs(img);
            layers.push(self.empty_layer(&rec.id)?);
            let source = image_volumes::attach(
                &mut attached,
                image_volumes::mount_point(&dir, &rec.id, n),
                &layers,
                &v.sub_path,
                userns.as_deref(),
            )
            .map_err(fail)?;
            out.push((m.clone(), source));
        }
        Ok((attached, out))
    }

    /// An empty directory in the container's layer directory: the bottom layer of its image
    /// volumes' overlays, which the kernel wants two layers of at least.
    fn empty_layer(&self, id: &str) -> Result<PathBuf> {
        let empty = self.layout.layers().join(id).join("empty");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&empty)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(internal("creating the image volumes' empty layer"))?;
        Ok(empty)
    }

    /// The working directory and the mount targets, made inside the root where the image
    /// lacks them or has dangling links there (their targets are made, inside the root), each
    /// a directory or a file as what is bound there is.
    pub(super) fn ensure_targets(
        &self,
        rec: &ContainerRecord,
        image: &Image,
        root: &Path,
        sources: &[(MountSpec, PathBuf)],
    ) -> Result<()> {
        let cwd = spec::working_dir(&rec.spec, &image.config);
        let mut targets = vec![(cwd, rootfs::Target::Dir)];
        for (m, src) in sources {
            let kind = if src.is_dir() {
                rootfs::Target::Dir
            } else {
                rootfs::Target::File
            };
            targets.push((m.container_path.clone(), kind));
        }
        for (t, kind) in targets {
            if t.starts_with('/') {
                rootfs::ensure_target(root, &t, kind)
                    .map_err(|e| Error::Internal(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The request's host paths: absolute, existing; symlinks resolved so the mount shows the
/// target. An image volume has no host path: its entry's path is empty.
pub(super) fn host_mounts(mounts: &[MountSpec]) -> Result<Vec<(MountSpec, PathBuf)>> {
    let mut out = Vec::new();
    for m in mounts {
        if m.container_path.is_empty() || !m.container_path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "mount container path {:?} must be absolute",
                m.container_path
            )));
        }
        if m.image.is_some() {
            out.push((m.clone(), PathBuf::new()));
            continue;
        }
        if !m.host_path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "mount host path {:?} must be absolute",
                m.host_path
            )));
        }
        let resolved = std::fs::canonicalize(&m.host_path).map_err(|e| {
            Error::InvalidArgument(format!(
                "mount host path {:?} cannot be used: {e}",
                m.host_path
            ))
        })?;
        out.push((m.clone(), resolved));
    }
    Ok(out)
}
