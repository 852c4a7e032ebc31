//! CreateContainer: the request checked (privilege is the pod's to grant), the name
//! reserved, the record written, then each step of making the container: root filesystem,
//! identity, mounts, OCI spec, the monitor's create. A failed step undoes them all.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::{
    ContainerRecord, ContainerSpec, Containers, Ctr, CtrState, MountSpec, image_file, internal,
    mon_err, name_key, now_ns, rootfs, spec, user, volumes, volumes_idmapped,
};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::monitor::client::MonitorError;
use crate::monitor::proto::{self, request};
use crate::reservations::Reserved;
use crate::sandbox::{NsMode, Pod, PodRecord, PodState};
use crate::store;

impl Containers {
    /// CreateContainer. The making runs to its end even when the caller goes away (a client
    /// deadline): the container then waits for a retry of the same call to claim it, and is
    /// removed if none comes within the unclaimed timeout.
    pub async fn create(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        spec: ContainerSpec,
        image: Arc<Image>,
        volumes: Vec<Arc<Image>>,
    ) -> Result<String> {
        let key = name_key(&pod.id, &spec.name, spec.attempt);
        let ticket = match self.names.reserve(&key).await {
            Reserved::Mine(t) => t,
            Reserved::Claimed(id) => {
                tracing::info!(container = %id, "a retried CreateContainer claims the container its caller left");
                return Ok(id);
            }
            Reserved::Taken(other) => {
                return Err(Error::AlreadyExists(format!(
                    "container name {:?} (attempt {}) in pod {} is reserved by container {other}",
                    spec.name, spec.attempt, pod.id
                )));
            }
        };
        crate::reservations::make_detached(
            self.clone(),
            |c| &c.names,
            ticket,
            self.unclaimed_timeout,
            move |this| async move { this.create_reserved(pod, spec, image, volumes).await },
            |this, id| async move {
                let _ = this.stop(&id, Duration::ZERO).await;
                if let Err(e) = this.remove(&id).await {
                    tracing::warn!(container = %id, error = %e, "removing an unclaimed container");
                }
            },
        )
        .await
        .unwrap_or_else(|| Err(Error::Internal("the container creation task failed".into())))
    }

    /// CreateContainer with its name reserved.
    async fn create_reserved(
        &self,
        pod: Arc<Pod>,
        spec: ContainerSpec,
        image: Arc<Image>,
        volumes: Vec<Arc<Image>>,
    ) -> Result<String> {
        // Serialized with the pod's Stop/Remove: no container appears in a pod going away.
        let _pod_op = pod.lock().await;
        let p = pod.record();
        if p.state != PodState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                p.id
            )));
        }
        self.check(&spec, &p)?;
        let id = crate::sandbox::new_id();
        let dir = self.ctr_dir(&id);
        crate::layout::private_dir(&dir).map_err(internal("creating the container directory"))?;
        if let Some(u) = p.spec.namespaces.user {
            crate::layout::hand_to(&dir, u.uids.host, u.gids.host).map_err(internal(
                "handing the container directory to the pod's root",
            ))?;
        }
        let mut rec = new_record(&id, &p, spec, &image)?;
        if let Err(e) = self.persist(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        crate::failpoint::hit("create:recorded").await;
        let ctr = Arc::new(Ctr {
            id: id.clone(),
            record: RwLock::new(rec.clone()),
            op: tokio::sync::Mutex::new(()),
            exited: watch::channel(false).0,
            starting: Default::default(),
            publishing: Default::default(),
        });
        // Registered while Creating (not listed), so an exit event racing the answer finds it.
        self.ctrs
            .write()
            .expect("containers poisoned")
            .insert(id.clone(), ctr.clone());
        match self.make(&mut rec, &p, &image, &volumes).await {
            Ok(()) => {
                rec.state = CtrState::Created;
                let persisted = self.persist(&rec);
                *ctr.record.write().expect("container record poisoned") = rec.clone();
                if let Err(e) = persisted {
                    self.undo(&rec).await;
                    return Err(e);
                }
                tracing::info!(container = %id, pod = %p.id, name = %rec.spec.name, image = %rec.image_name, "container created");
                self.publish(&id, &p.id, super::EventKind::Created, None);
                Ok(id)
            }
            Err(e) => {
                tracing::info!(container = %id, pod = %p.id, error = %e, "container creation failed; undoing");
                self.undo(&rec).await;
                Err(e)
            }
        }
    }

    /// The steps of CreateContainer, in order. The record written before them lets `undo`
    /// take back whatever exists (each of its steps is safe when its object is missing).
    async fn make(
        &self,
        rec: &mut ContainerRecord,
        p: &PodRecord,
        image: &Image,
        volumes: &[Arc<Image>],
    ) -> Result<()> {
        let t0 = std::time::Instant::now();
        let held: Vec<&Image> = std::iter::once(image)
            .chain(volumes.iter().map(|v| v.as_ref()))
            .collect();
        self.images
            .hold(&rec.id, &held)
            .await
            .map_err(|e| match e {
                crate::image::ImageError::NotFound(_) => Error::NotFound(e.to_string()),
                e => Error::Internal(e.to_string()),
            })?;
        let rootfs_dir = self.make_rootfs(&rec.id, image, p)?;
        // Before any runtime sees the root: its /dev and the rest must not lead out of it.
        rootfs::check_runtime_dirs(&rootfs_dir)
            .map_err(|e| Error::InvalidArgument(format!("image {}: {e}", rec.image_name)))?;
        crate::failpoint::hit("create:rootfs").await;
        let t_mount = t0.elapsed();
        rec.user = self.resolve_user(rec, image, &rootfs_dir).await?;
        rec.mounts = volumes::host_mounts(&rec.spec.mounts)?;
        rec.spec.resources.hugepage_limits = super::update::enforceable_hugepages(
            &rec.spec.resources.hugepage_limits,
            self.pods.cgroups.has_controller("hugetlb"),
        )?;
        // What the runtime binds: attached (idmapped copies, image volumes) until the
        // container holds its binds of them.
        let (attached, mounts) = self.volume_sources(rec, p, volumes)?;
        self.ensure_targets(rec, image, &rootfs_dir, &mounts)?;
        self.write_spec(rec, p, image, &rootfs_dir, &mounts)?;
        crate::failpoint::hit("create:spec").await;
        // The record written at the start already lets an undo reach the monitor: nothing
        // new is needed on disk before the container is made.
        let t_spec = t0.elapsed();
        let runtime_us = self.monitor_create(rec, p).await?;
        drop(attached);
        if self.cpuset_by_berth(p) {
            self.set_scope_properties(rec).await?;
        }
        crate::failpoint::hit("create:made").await;
        tracing::debug!(
            container = %rec.id,
            runtime_us,
            mount_us = t_mount.as_micros() as u64,
            spec_us = (t_spec - t_mount).as_micros() as u64,
            monitor_create_us = (t0.elapsed() - t_spec).as_micros() as u64,
            "container made"
        );
        Ok(())
    }

    /// The container's root filesystem: the writable layer, the overlay, and targets for the
    /// pod's file mounts.
    fn make_rootfs(&self, id: &str, image: &Image, p: &PodRecord) -> Result<PathBuf> {
        let dir = self.ctr_dir(id);
        let upper = self.layout.layers().join(id);
        // The writable layer's directory is root's alone; the upper dir in it is the root
        // directory the container sees (overlayfs takes its mode from there), so 0755.
        crate::layout::private_dir(&upper).map_err(internal("creating the container's layer"))?;
        for d in [upper.join("upper"), upper.join("work"), dir.join("rootfs")] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&d)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(internal("creating the container's directories"))?;
        }
        let rootfs_dir = dir.join("rootfs");
        let userns = p
            .spec
            .namespaces
            .user
            .map(|u| (self.pods.ns_dir(&p.id).join("user"), u));
        if let Some((_, u)) = &userns {
            // The container's root directory is its root's, who is a node id.
            std::os::unix::fs::chown(upper.join("upper"), Some(u.uids.host), Some(u.gids.host))
                .map_err(internal("handing the writable layer to the pod's root"))?;
        }
        super::overlay::mount_overlay(
            &self.images.lower_dirs(image),
            &upper.join("upper"),
            &upper.join("work"),
            &rootfs_dir,
            userns.as_ref().map(|(ns, _)| ns.as_path()),
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        rootfs::ensure_file_targets(
            &rootfs_dir,
            &["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"],
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(rootfs_dir)
    }

    /// Who the process runs as, names resolved through the image's own files.
    async fn resolve_user(
        &self,
        rec: &ContainerRecord,
        image: &Image,
        rootfs_dir: &Path,
    ) -> Result<user::User> {
        let s = &rec.spec;
        if s.security.run_as_group.is_some()
            && s.security.run_as_user.is_none()
            && s.security.run_as_username.is_empty()
        {
            return Err(Error::InvalidArgument(
                "run_as_group is set without run_as_user or run_as_username".into(),
            ));
        }
        let rc = image.config.config.clone().unwrap_or_default();
        let image_file = |e: image_file::ImageFileError| match e {
            image_file::ImageFileError::TimedOut { .. } => Error::DeadlineExceeded(e.to_string()),
            image_file::ImageFileError::Io { .. } => Error::Internal(e.to_string()),
            _ => Error::InvalidArgument(format!("image {}: {e}", rec.image_name)),
        };
        let passwd = image_file::read(rootfs_dir, "/etc/passwd")
            .await
            .map_err(image_file)?;
        let group = image_file::read(rootfs_dir, "/etc/group")
            .await
            .map_err(image_file)?;
        user::resolve(
            &user::Wanted {
                uid: s.security.run_as_user,
                username: &s.security.run_as_username,
                gid: s.security.run_as_group,
                image_user: &rc.user,
                supplemental: &s.security.supplemental_groups,
                strict: s.security.strict_groups,
            },
            passwd.as_deref(),
            group.as_deref(),
        )
        .map_err(|e| Error::InvalidArgument(format!("image {}: {e}", rec.image_name)))
    }

    /// The OCI spec, written to the bundle; the process's environment and working directory
    /// recorded for ExecSync.
    fn write_spec(
        &self,
        rec: &mut ContainerRecord,
        p: &PodRecord,
        image: &Image,
        rootfs_dir: &Path,
        mounts: &[(MountSpec, PathBuf)],
    ) -> Result<()> {
        let s = &rec.spec;
        let target_pid = match s.security.pid_mode {
            Some(NsMode::Target) => {
                let t = self.get(&s.security.target_id)?.record();
                if t.state != CtrState::Running {
                    return Err(Error::FailedPrecondition(format!(
                        "target container {} is not running",
                        t.id
                    )));
                }
                Some(t.pid)
            }
            _ => None,
        };
        let oci = spec::build(
            &spec::Inputs {
                spec: s,
                image: &image.config,
                pod: p,
                pod_dir: &self.pods.files_dir(&p.id),
                ns_dir: &self.pods.ns_dir(&p.id),
                rootfs: rootfs_dir,
                user: &rec.user,
                id: &rec.id,
                cgroup_mode: self.pods.cgroups.mode,
                cgroups_path: self.pods.cgroups.spec_cgroups_path(&p.cgroup, &rec.id),
                cpuset_by_berth: self.cpuset_by_berth(p),
                cgroup_view: self.cgroup_view(p, &rec.id),
                target_pid,
                allowed_caps: &self.allowed_caps,
            },
            mounts,
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The spec holds the container's environment: 0600, like every record.
        let json = serde_json::to_vec(&oci).expect("OCI specs serialize");
        store::write_atomic_volatile(&self.ctr_dir(&rec.id).join("config.json"), &json)
            .map_err(|e| Error::Internal(format!("writing the OCI spec: {e}")))?;
        rec.env = oci
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default();
        rec.cwd = spec::working_dir(&rec.spec, &image.config);
        Ok(())
    }

    /// On a v1 host, the container's view of its cgroups: its own directory in the hierarchies
    /// the runtime manages, the monitor's in the others (where it inherits that).
    fn cgroup_view(&self, p: &PodRecord, id: &str) -> Option<Vec<super::cgroup_view::ViewMount>> {
        if self.pods.cgroups.mode != crate::cgroup::Mode::Legacy {
            return None;
        }
        let monitor = p
            .monitor
            .and_then(|(pid, _)| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok())
            .unwrap_or_default();
        Some(super::cgroup_view::v1_view(
            &self.pods.cgroups,
            &self.pods.cgroups.container_cgroup(&p.cgroup, id),
            &monitor,
        ))
    }

    /// The pod's monitor creates the container (its init waits for Start); returns how long
    /// the runtime took, in microseconds.
    async fn monitor_create(&self, rec: &mut ContainerRecord, p: &PodRecord) -> Result<u64> {
        let id = rec.id.clone();
        let dir = self.ctr_dir(&id);
        let oom = (rec.spec.resources.oom_score_adj != 0 || self.own_oom != 0)
            .then(|| rec.spec.resources.oom_score_adj.max(self.own_oom));
        let userns = p.spec.namespaces.user;
        let host = |id: u32, r: Option<crate::sandbox::IdRange>| {
            r.map_or(Some(id), |r| r.to_host(id)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "container {id_}: id {id} is not mapped by the pod's user namespace",
                    id_ = rec.id
                ))
            })
        };
        let host_uid = host(rec.user.uid, userns.map(|u| u.uids))?;
        let host_gid = host(rec.user.gid, userns.map(|u| u.gids))?;
        let created = self
            .monitor(&p.id)
            .call(
                request::Op::Create(proto::Create {
                    container_id: id.clone(),
                    bundle: dir.to_string_lossy().into_owned(),
                    log_path: rec
                        .log_path
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    stdin: rec.spec.stdin,
                    stdin_once: rec.spec.stdin_once,
                    tty: rec.spec.tty,
                    exit_file: dir.join("exit.json").to_string_lossy().into_owned(),
                    oom_score_adj: oom.unwrap_or(0) as i32,
                    set_oom_score_adj: oom.is_some(),
                    cgroup_procs: self
                        .pods
                        .cgroups
                        .procs_file(&self.pods.cgroups.container_cgroup(&p.cgroup, &id))
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    shielded: super::shares_pid_namespace(&rec.spec, p),
                    runtime: self.runtime_binary(p),
                    systemd_cgroup: self.pods.cgroups.driver == crate::cgroup::Driver::Systemd,
                    host_uid,
                    host_gid,
                    log_directory: p.spec.log_directory.clone(),
                }),
                Some(Duration::from_secs(60)),
            )
            .await
            .map_err(|e| match e {
                MonitorError::Failed { message, .. } => {
                    Error::Internal(format!("creating container {id}: {message}"))
                }
                e => mon_err(e),
            })?;
        match created.result {
            Some(proto::response::Result::Created(c)) => {
                rec.pid = c.pid;
                Ok(c.micros)
            }
            _ => Ok(0),
        }
    }

    /// Whether berth sets the container's cpuset and device rules itself: with the systemd
    /// driver and the embedded runtime, whose systemd manager sends `AllowedCPUs` in a form
    /// systemd refuses and sets no device rules at all.
    fn cpuset_by_berth(&self, p: &PodRecord) -> bool {
        self.pods.cgroups.systemd.is_some() && self.runtime_binary(p).is_empty()
    }

    /// What a container made with `cpuset_by_berth` gets from its scope's properties before it
    /// starts: `AllowedCPUs`/`AllowedMemoryNodes`, and `DevicePolicy`/`DeviceAllow` (systemd's
    /// device filter, from the spec's device rules).
    async fn set_scope_properties(&self, rec: &ContainerRecord) -> Result<()> {
        let Some(sd) = self.pods.cgroups.systemd.clone() else {
            return Ok(());
        };
        if let Ok(pod) = self.pods.get(&rec.pod_id) {
            self.pods.cgroups.note_oom_baseline(&pod.cgroup());
        }
        let cpuset = super::update::cpuset_properties(&rec.spec.resources)
            .map_err(Error::InvalidArgument)?;
        let (_, rules) =
            spec::devices(&rec.spec).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let proc_devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
        let (policy, allow) = crate::systemd::device_properties(&rules, &proc_devices)
            .map_err(|e| Error::Internal(format!("container {}: {e}", rec.id)))?;
        let mut props = cpuset;
        props.push(("DevicePolicy", super::update::Prop::Str(policy)));
        props.push(("DeviceAllow", super::update::Prop::Pairs(allow)));
        super::update::set_scope_properties(sd, &rec.id, props)
            .await
            .map_err(|e| {
                Error::Internal(format!(
                    "container {}: setting its cpuset and device rules: {e}",
                    rec.id
                ))
            })
    }

    /// Kills what runs in a container's cgroup: for when its monitor, which would have, is
    /// gone (its processes outlive it when the pod does not share one PID namespace).
    pub(super) fn kill_orphans(&self, rec: &ContainerRecord) {
        let Ok(pod) = self.pods.get(&rec.pod_id) else {
            return;
        };
        if let Some(procs) = self.pods.cgroups.procs_file(
            &self
                .pods
                .cgroups
                .container_cgroup(&pod.record().cgroup, &rec.id),
        ) {
            crate::cgroup::kill_procs(&procs);
        }
    }

    /// Undoes a container that is not (or no longer) wanted: monitor state, rootfs, dirs, hold.
    pub(super) async fn undo(&self, rec: &ContainerRecord) {
        self.kill_orphans(rec);
        let _ = self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Delete(proto::Delete {
                    container_id: rec.id.clone(),
                    force: true,
                }),
                Some(Duration::from_secs(10)),
            )
            .await;
        self.remove_files(&rec.id).await;
        self.ctrs
            .write()
            .expect("containers poisoned")
            .remove(&rec.id);
    }

    pub(super) async fn remove_files(&self, id: &str) {
        self.forget_stats(id);
        // The copy first: a copy never outlives its record.
        if let Err(e) = self.copies.remove(id) {
            tracing::warn!(container = id, error = %e, "removing the container record's copy");
        }
        let dir = self.ctr_dir(id);
        super::overlay::unmount(&dir.join("rootfs"));
        volumes_idmapped::detach_left(&self.layout.idmapped(), Some(id));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.layout.layers().join(id));
        // The monitor removes it at Delete; not when the monitor is gone.
        let _ = std::fs::remove_dir_all(self.layout.lc_root().join(crate::monitor::lc_id(id)));
        if let Err(e) = self.images.release(id).await {
            tracing::warn!(container = id, error = %e, "releasing the image hold");
        }
    }
}

/// The record of a container about to be made (state Creating).
fn new_record(
    id: &str,
    p: &PodRecord,
    spec: ContainerSpec,
    image: &Image,
) -> Result<ContainerRecord> {
    let rc = image.config.config.clone().unwrap_or_default();
    Ok(ContainerRecord {
        id: id.to_string(),
        pod_id: p.id.clone(),
        image_id: image.record.id.clone(),
        image_name: image
            .record
            .repo_tags
            .first()
            .cloned()
            .unwrap_or_else(|| spec.image.clone()),
        state: CtrState::Creating,
        created_at: now_ns(),
        started_at: 0,
        finished_at: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        pid: 0,
        user: user::User::default(),
        env: Vec::new(),
        cwd: String::new(),
        stop_signal: spec
            .stop_signal
            .clone()
            .unwrap_or_else(|| rc.stop_signal.clone()),
        log_path: log_path(&p.spec.log_directory, &spec.log_path)?,
        mounts: Vec::new(),
        spec,
    })
}

/// `log_directory/log_path`, with the relative part checked.
fn log_path(dir: &str, rel: &str) -> Result<Option<PathBuf>> {
    if dir.is_empty() || rel.is_empty() {
        return Ok(None);
    }
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::InvalidArgument(format!(
            "log path {rel:?} must be relative to the pod's log directory without '..'"
        )));
    }
    Ok(Some(Path::new(dir).join(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_stay_in_the_log_directory() {
        assert_eq!(
            log_path("/var/log/pods/x", "c/0.log").unwrap(),
            Some(PathBuf::from("/var/log/pods/x/c/0.log"))
        );
        assert!(log_path("/var/log/pods/x", "../escape.log").is_err());
        assert!(log_path("/var/log/pods/x", "/abs.log").is_err());
        assert_eq!(log_path("", "c/0.log").unwrap(), None);
    }
}
