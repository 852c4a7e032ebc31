//! What CreateContainer refuses before it makes anything: privilege the pod does not grant,
//! what the pod's runtime handler cannot do, volumes a user-namespaced pod cannot have, and
//! cgroup v2 files (`unified`) the node does not have.
//! Each refusal names the field, and nothing is left behind.

use super::{ContainerSpec, Containers, Propagation};
use crate::error::{Error, Result};
use crate::sandbox::PodRecord;

/// Privilege is the pod's to grant: a container alone cannot take the node. Mounts that
/// propagate back to the node need a privileged container, as Kubernetes has it.
fn check_privilege(spec: &ContainerSpec, p: &PodRecord) -> Result<()> {
    if spec.security.privileged && !p.spec.security.privileged {
        return Err(Error::InvalidArgument(format!(
            "container {:?} asks for privileged, but pod sandbox {} is not privileged \
             (linux.security_context.privileged of the pod)",
            spec.name, p.id
        )));
    }
    if let Some(m) = spec
        .mounts
        .iter()
        .find(|m| m.propagation == Propagation::Bidirectional)
        && !spec.security.privileged
    {
        return Err(Error::InvalidArgument(format!(
            "mount {}: Bidirectional propagation needs a privileged container",
            m.container_path
        )));
    }
    Ok(())
}

impl Containers {
    /// Everything CreateContainer refuses before it makes anything.
    pub(super) fn check(&self, spec: &ContainerSpec, p: &PodRecord) -> Result<()> {
        check_privilege(spec, p)?;
        self.check_handler(spec, p)?;
        self.check_unified(spec, p)?;
        check_user_namespace_mounts(spec, p)
    }

    /// `unified` names cgroup v2 files: refused on a v1 node (never dropped), and each key
    /// must be an interface file the pod's cgroup has (the container's gets the same
    /// controllers), so a typo or a path fails here instead of inside the runtime.
    fn check_unified(&self, spec: &ContainerSpec, p: &PodRecord) -> Result<()> {
        let unified = &spec.resources.unified;
        if unified.is_empty() {
            return Ok(());
        }
        let cg = &self.pods.cgroups;
        if cg.mode != crate::cgroup::Mode::Unified {
            return Err(Error::InvalidArgument(format!(
                "linux resources: unified ({}) needs a cgroup v2 node; this one is cgroup v1",
                unified.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let pod_dir = cg.dir_of("memory", &p.cgroup);
        for k in unified.keys() {
            crate::cgroup::check_unified_key(k, pod_dir.as_deref())
                .map_err(|e| Error::InvalidArgument(format!("linux resources: {e}")))?;
        }
        Ok(())
    }

    /// What the pod's runtime handler cannot do is refused, never dropped: a recursive
    /// read-only mount with a runtime that would make it read-only only at the top.
    fn check_handler(&self, spec: &ContainerSpec, p: &PodRecord) -> Result<()> {
        let Some(h) = self.pods.handlers.get(&p.spec.runtime_handler) else {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} runs with runtime handler {:?}, which is no longer configured",
                p.id, p.spec.runtime_handler
            )));
        };
        if let Some(m) = spec.mounts.iter().find(|m| m.recursive_read_only)
            && !h.features.recursive_read_only
        {
            return Err(Error::InvalidArgument(format!(
                "mount {}: recursive_read_only is not supported by runtime handler {:?} ({})",
                m.container_path, h.name, h.version
            )));
        }
        Ok(())
    }

    /// The OCI runtime binary of the pod's handler; empty for the embedded runtime.
    pub(super) fn runtime_binary(&self, p: &PodRecord) -> String {
        self.pods
            .handlers
            .get(&p.spec.runtime_handler)
            .and_then(|h| h.binary.as_ref())
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Volumes of a pod with its own user namespace are idmapped copies (`volumes_idmapped`):
/// only with the pod's own mappings, and only private.
fn check_user_namespace_mounts(spec: &ContainerSpec, p: &PodRecord) -> Result<()> {
    if let Some(m) = spec
        .mounts
        .iter()
        .find(|m| m.idmap.is_some() && m.idmap != p.spec.namespaces.user)
    {
        return Err(Error::InvalidArgument(match p.spec.namespaces.user {
            None => format!(
                "mount {}: uid/gid mappings given, but pod sandbox {} has no user namespace \
                 of its own",
                m.container_path, p.id
            ),
            Some(_) => format!(
                "mount {}: idmapped with mappings other than pod sandbox {}'s user namespace; \
                 berth maps volumes with the pod's own",
                m.container_path, p.id
            ),
        }));
    }
    if p.spec.namespaces.user.is_some()
        && let Some(m) = spec
            .mounts
            .iter()
            .find(|m| m.propagation != Propagation::Private)
    {
        // The runtime binds an idmapped copy, which is no peer nor slave of the host's
        // mount: propagation from or to the host cannot be had.
        return Err(Error::InvalidArgument(format!(
            "mount {}: propagation {:?} is not supported in a pod with its own user \
             namespace (its volumes are idmapped copies); use private",
            m.container_path, m.propagation
        )));
    }
    Ok(())
}
