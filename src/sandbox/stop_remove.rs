//! Taking a pod apart: StopPodSandbox ends what runs and connects it (init, hostPorts,
//! network namespace), RemovePodSandbox removes what remains (pins, /dev/shm, cgroup,
//! directories, record). The same idempotent steps undo a pod that failed to come up.

use std::path::Path;

use super::{PodRecord, PodState, Sandboxes, files, init, namespaces};
use crate::error::Result;

impl Sandboxes {
    /// Stops what runs and what connects the pod: its init, its hostPorts, its network
    /// namespace (the kernel frees it, and the veth in it, in its own time; the address is
    /// released once the veth is gone). In CNI mode the plugins' DEL runs first, and if it
    /// fails the namespace stays for a retry and the error is returned. Idempotent.
    pub(super) async fn teardown(&self, rec: &mut PodRecord) -> Result<()> {
        if let Some((pid, start)) = rec.init.take() {
            init::kill(pid, start).await;
        }
        if self.network.is_cni() {
            if rec.cni.is_some() || rec.state != PodState::NotReady {
                self.network.detach_cni(&rec.id).await.map_err(|e| {
                    crate::error::Error::Internal(format!(
                        "pod sandbox {}: network teardown: {e}",
                        rec.id
                    ))
                })?;
            }
            rec.cni = None;
        } else if rec.net.is_some() || rec.state != PodState::NotReady {
            self.network.detach(&rec.id, rec.net.as_ref()).await;
        }
        rec.net = None;
        namespaces::unpin(&namespaces::pin_path(&self.ns_dir(&rec.id), "net"));
        Ok(())
    }

    /// Undoes everything of a pod that failed to come up. A CNI DEL that fails here is
    /// retried from the CNI cache at the next start.
    pub(super) async fn undo(&self, rec: &mut PodRecord) {
        if let Err(e) = self.teardown(rec).await {
            tracing::warn!(pod = %rec.id, error = %e, "undoing a pod");
        }
        self.network.released(&rec.id).await;
        self.remove_resources(rec);
    }

    /// Removes what remains of a stopped pod: pins, /dev/shm, cgroup, directories, record
    /// (its copy first: a copy never outlives its record).
    fn remove_resources(&self, rec: &PodRecord) {
        if let Err(e) = self.copies.remove(&rec.id) {
            tracing::warn!(pod = %rec.id, error = %e, "removing the pod record's copy");
        }
        if let Some((pid, start)) = rec.monitor {
            init::kill_now(pid, start);
        }
        let _ = std::fs::remove_file(self.layout.monitor_socket(&rec.id));
        files::unmount_shm(&self.pod_dir(&rec.id).join("shm"));
        self.pod_cgroups
            .release(&self.cgroups, &rec.id, &rec.cgroup);
        remove_pod_dirs(&self.pod_dir(&rec.id), &self.ns_dir(&rec.id));
    }

    /// StopPodSandbox (after the pod's containers were stopped). Unknown or stopped: fine.
    pub async fn stop(&self, id: &str) -> Result<()> {
        let Some(pod) = crate::error::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = pod.lock().await;
        let mut rec = pod.record();
        if rec.state == PodState::NotReady {
            return Ok(());
        }
        if let Err(e) = self.teardown(&mut rec).await {
            // What was done (the init killed) is recorded; the pod stays Ready for a retry.
            self.persist(&rec)?;
            *pod.record.write().expect("pod record poisoned") = rec;
            return Err(e);
        }
        crate::failpoint::hit("stoppod:torn-down").await;
        rec.state = PodState::NotReady;
        self.persist(&rec)?;
        *pod.record.write().expect("pod record poisoned") = rec;
        tracing::info!(pod = %pod.id, "pod sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox (after its containers were removed). Unknown: fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(pod) = crate::error::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = pod.lock().await;
        let mut rec = pod.record();
        if rec.state != PodState::NotReady {
            self.teardown(&mut rec).await?;
        }
        // The address comes free once the kernel has destroyed the namespace and its veth: in
        // the background, not on the caller's path.
        self.remove_resources(&rec);
        crate::failpoint::hit("removepod:removed").await;
        self.pods.write().expect("pods poisoned").remove(&pod.id);
        self.names.release(&rec.spec.name_key(), &pod.id);
        tracing::info!(pod = %pod.id, "pod sandbox removed");
        Ok(())
    }
}

/// Removes a pod's directory (unmounting what could be mounted there) and its pin directory.
pub(super) fn remove_pod_dirs(pod_dir: &Path, ns_dir: &Path) {
    files::unmount_shm(&pod_dir.join("shm"));
    namespaces::unpin_all(ns_dir);
    let _ = std::fs::remove_dir(ns_dir);
    if let Err(e) = std::fs::remove_dir_all(pod_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %pod_dir.display(), error = %e, "could not remove the pod directory");
    }
}
