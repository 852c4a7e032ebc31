//! Volumes as the CRI gives and reports them: a `Mount` checked and turned into the domain's
//! `MountSpec` (host path or image volume, propagation, idmapping, flags), and back for
//! ContainerStatus.

use crate::cri::v1 as cri;
use tonic::Status;

use crate::container::{ImageVolume, MountSpec, Propagation};

/// The domain's view of a CRI mount; what berth cannot honour fails by name.
pub(super) fn mount(m: cri::Mount) -> Result<MountSpec, Status> {
    let idmap = match (m.uid_mappings.as_slice(), m.gid_mappings.as_slice()) {
        ([], []) => None,
        ([u], [g]) => Some(crate::sandbox::UserNs {
            uids: id_range(u),
            gids: id_range(g),
        }),
        _ => {
            return Err(Status::invalid_argument(format!(
                "mount {}: an idmapped mount takes exactly one uid and one gid mapping \
                 (uid_mappings, gid_mappings)",
                m.container_path
            )));
        }
    };
    let propagation = match cri::MountPropagation::try_from(m.propagation) {
        Ok(cri::MountPropagation::PropagationPrivate) => Propagation::Private,
        Ok(cri::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
        Ok(cri::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "mount {}: unknown propagation {}",
                m.container_path, m.propagation
            )));
        }
    };
    if m.recursive_read_only && !m.readonly {
        return Err(Status::invalid_argument(format!(
            "mount {}: recursive_read_only needs readonly",
            m.container_path
        )));
    }
    if m.recursive_read_only && propagation != Propagation::Private {
        return Err(Status::invalid_argument(format!(
            "mount {}: recursive_read_only needs private propagation",
            m.container_path
        )));
    }
    let image = image_volume(&m, propagation)?;
    let options = mount_options(&m.container_path, m.mount_options)?;
    // selinux_relabel is ignored: no SELinux on these nodes.
    Ok(MountSpec {
        container_path: m.container_path,
        host_path: m.host_path,
        readonly: m.readonly,
        recursive_read_only: m.recursive_read_only,
        propagation,
        idmap,
        options,
        image,
    })
}

/// An image volume (`Mount.image`): read-only, private, no host path; its sub path relative
/// and inside the image (links in it are resolved inside the image when it is mounted).
fn image_volume(m: &cri::Mount, propagation: Propagation) -> Result<Option<ImageVolume>, Status> {
    let path = &m.container_path;
    let Some(spec) = m.image.as_ref().filter(|i| !i.image.is_empty()) else {
        if !m.image_sub_path.is_empty() {
            return Err(Status::invalid_argument(format!(
                "mount {path}: image_sub_path {:?} is given without an image",
                m.image_sub_path
            )));
        }
        return Ok(None);
    };
    let refuse = |why: String| {
        Err(Status::invalid_argument(format!(
            "mount {path}: image volume {:?}: {why}",
            spec.image
        )))
    };
    if !m.host_path.is_empty() {
        return refuse(format!(
            "host_path {:?} is given too; a mount has one source",
            m.host_path
        ));
    }
    if !m.readonly {
        return refuse("an image volume is read-only: readonly must be set".into());
    }
    if propagation != Propagation::Private {
        return refuse("an image volume has no node mount to propagate to or from; propagation must be private".into());
    }
    let sub = &m.image_sub_path;
    if sub.starts_with('/') || sub.contains('\0') || sub.split('/').any(|c| c == "..") {
        return refuse(format!(
            "image_sub_path {sub:?} must be relative to the image's root, without '..'"
        ));
    }
    Ok(Some(ImageVolume {
        image: spec.image.clone(),
        image_id: String::new(),
        sub_path: sub.clone(),
    }))
}

/// The per-mount flags berth applies to a bind mount (RuntimeFeatures.mount_options). Anything
/// else is refused by name: `ro` has its own field, and a flag that widens what the mount allows
/// (exec, dev, suid) is never what a volume needs.
const MOUNT_OPTIONS: [&str; 3] = ["noexec", "nodev", "nosuid"];

fn mount_options(path: &str, options: Vec<String>) -> Result<Vec<String>, Status> {
    let mut out: Vec<String> = Vec::new();
    for o in options {
        if !MOUNT_OPTIONS.contains(&o.as_str()) {
            return Err(Status::invalid_argument(format!(
                "mount {path}: mount option {o:?} is not taken (berth applies {})",
                MOUNT_OPTIONS.join(", ")
            )));
        }
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(out)
}

fn id_range(m: &cri::IdMapping) -> crate::sandbox::IdRange {
    crate::sandbox::IdRange {
        container: m.container_id,
        host: m.host_id,
        len: m.length,
    }
}

fn cri_id_range(r: &crate::sandbox::IdRange) -> cri::IdMapping {
    cri::IdMapping {
        container_id: r.container,
        host_id: r.host,
        length: r.len,
    }
}

/// A mount as ContainerStatus reports it (its host path resolved).
pub(super) fn cri_mount(m: &MountSpec, src: &std::path::Path) -> cri::Mount {
    // An image volume reports its image as asked and the ID it was found as (kubelet shows
    // that digest in the pod's volume status), and no host path.
    let image = m.image.as_ref().map(|v| cri::ImageSpec {
        image: v.image.clone(),
        image_ref: v.image_id.clone(),
        ..Default::default()
    });
    cri::Mount {
        container_path: m.container_path.clone(),
        host_path: src.to_string_lossy().into_owned(),
        image_sub_path: m
            .image
            .as_ref()
            .map(|v| v.sub_path.clone())
            .unwrap_or_default(),
        image,
        readonly: m.readonly,
        recursive_read_only: m.recursive_read_only,
        propagation: match m.propagation {
            Propagation::Private => cri::MountPropagation::PropagationPrivate,
            Propagation::HostToContainer => cri::MountPropagation::PropagationHostToContainer,
            Propagation::Bidirectional => cri::MountPropagation::PropagationBidirectional,
        } as i32,
        uid_mappings: m.idmap.iter().map(|u| cri_id_range(&u.uids)).collect(),
        gid_mappings: m.idmap.iter().map(|u| cri_id_range(&u.gids)).collect(),
        mount_options: m.options.clone(),
        ..Default::default()
    }
}
