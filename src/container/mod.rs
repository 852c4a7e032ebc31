//! Containers: CreateContainer builds the root filesystem (an overlay of the image's
//! snapshots) and the OCI spec, and asks the pod's monitor to create the container; Start,
//! Stop, Remove, Status, List, ReopenContainerLog and ExecSync follow. Each container has a
//! record in `state/containers/<id>/container.json`, written before anything is made, so a
//! failure or a restart can undo or adopt it. Exit statuses come from the monitors as events
//! (and from the exit files they write first, when berthd was away).

pub mod image_file;
pub mod rootfs;
pub mod spec;
pub mod user;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::image::{Image, ImageStore};
use crate::monitor::client::{ExitEvent, MonitorClient, MonitorError};
use crate::monitor::proto::{self, request};
use crate::runtime::{Error, Result};
use crate::sandbox::{NsMode, Pod, PodState, Sandboxes};
use crate::store;

/// How much of an exec'd command's output is kept, per stream: both together stay under the
/// 16 MiB kubelet accepts in one gRPC message.
pub const EXEC_OUTPUT_LIMIT: u64 = (8 << 20) - 4096;

/// Mount propagation of a bind mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Propagation {
    /// Nothing propagates.
    #[default]
    Private,
    /// Host mounts appear in the container.
    HostToContainer,
    /// Both ways.
    Bidirectional,
}

/// A host path mounted into the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Where in the container.
    pub container_path: String,
    /// Which host path.
    pub host_path: String,
    /// Read-only.
    pub readonly: bool,
    /// Read-only all the way down (`rro`).
    pub recursive_read_only: bool,
    /// Propagation.
    pub propagation: Propagation,
}

/// A host device given to the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Path in the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// cgroup permissions (`rwm`).
    pub permissions: String,
}

/// Resource limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CFS period (µs).
    pub cpu_period: i64,
    /// CFS quota (µs).
    pub cpu_quota: i64,
    /// CPU shares.
    pub cpu_shares: i64,
    /// Memory limit (bytes).
    pub memory_limit: i64,
    /// Memory + swap limit (bytes).
    pub memory_swap_limit: i64,
    /// OOM score adjustment (clamped to what berthd may set).
    pub oom_score_adj: i64,
    /// cpuset cpus.
    pub cpuset_cpus: String,
    /// cpuset mems.
    pub cpuset_mems: String,
    /// Hugepage limits: (page size like `2MB`, bytes).
    pub hugepage_limits: Vec<(String, u64)>,
    /// cgroup v2 files.
    pub unified: BTreeMap<String, String>,
}

/// Security settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSecurity {
    /// Privileged.
    pub privileged: bool,
    /// run_as_user.
    pub run_as_user: Option<i64>,
    /// run_as_username.
    pub run_as_username: String,
    /// run_as_group.
    pub run_as_group: Option<i64>,
    /// supplemental_groups.
    pub supplemental_groups: Vec<i64>,
    /// SupplementalGroupsPolicy Strict.
    pub strict_groups: bool,
    /// readonly_rootfs.
    pub readonly_rootfs: bool,
    /// no_new_privs.
    pub no_new_privs: bool,
    /// Capabilities to add.
    pub add_caps: Vec<String>,
    /// Capabilities to drop.
    pub drop_caps: Vec<String>,
    /// masked_paths, when given.
    pub masked_paths: Option<Vec<String>>,
    /// readonly_paths, when given.
    pub readonly_paths: Option<Vec<String>>,
    /// The container's PID namespace mode, when it names one.
    pub pid_mode: Option<NsMode>,
    /// The container whose PID namespace TARGET joins.
    pub target_id: String,
    /// AppArmor profile (none on this kernel).
    pub apparmor_profile: String,
    /// A seccomp section for the OCI spec, when one applies.
    pub seccomp: Option<serde_json::Value>,
}

/// What CreateContainer asks for, in berth's terms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// metadata.name.
    pub name: String,
    /// metadata.attempt.
    pub attempt: u32,
    /// The image as requested.
    pub image: String,
    /// command (replaces ENTRYPOINT).
    pub command: Vec<String>,
    /// args (replace CMD).
    pub args: Vec<String>,
    /// working_dir.
    pub working_dir: String,
    /// envs.
    pub envs: Vec<(String, String)>,
    /// Host paths to mount.
    pub mounts: Vec<MountSpec>,
    /// Devices.
    pub devices: Vec<DeviceSpec>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Log path, relative to the pod's log directory.
    pub log_path: String,
    /// stdin.
    pub stdin: bool,
    /// stdin_once.
    pub stdin_once: bool,
    /// tty.
    pub tty: bool,
    /// Resources.
    pub resources: Resources,
    /// Security.
    pub security: ContainerSecurity,
}

/// A container's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtrState {
    /// CreateContainer has not finished.
    Creating,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
}

/// A container as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex digits.
    pub id: String,
    /// Its pod.
    pub pod_id: String,
    /// What was asked for.
    pub spec: ContainerSpec,
    /// The image's ID.
    pub image_id: String,
    /// The image's name (a repo tag, or the reference given).
    pub image_name: String,
    /// Lifecycle state.
    pub state: CtrState,
    /// Times, ns since the epoch (0 = not yet).
    pub created_at: i64,
    /// Started.
    pub started_at: i64,
    /// Finished.
    pub finished_at: i64,
    /// Exit code.
    pub exit_code: i32,
    /// Completed, Error, StartError, Unknown.
    pub reason: String,
    /// Details of an abnormal end.
    pub message: String,
    /// The init's pid (berthd's PID namespace).
    pub pid: i32,
    /// Who it runs as.
    pub user: user::User,
    /// Its environment (for ExecSync).
    pub env: Vec<String>,
    /// Its working directory (for ExecSync).
    pub cwd: String,
    /// The image's STOPSIGNAL.
    pub stop_signal: String,
    /// The CRI log file, if any.
    pub log_path: Option<PathBuf>,
    /// Mounts with their resolved host paths.
    pub mounts: Vec<(MountSpec, PathBuf)>,
}

/// One container.
pub struct Ctr {
    /// Its id.
    pub id: String,
    record: RwLock<ContainerRecord>,
    op: tokio::sync::Mutex<()>,
    exited: watch::Sender<bool>,
}

impl Ctr {
    /// A copy of the record.
    pub fn record(&self) -> ContainerRecord {
        self.record
            .read()
            .expect("container record poisoned")
            .clone()
    }
}

/// Filter of ListContainers.
#[derive(Debug, Default)]
pub struct CtrFilter {
    /// Id or unique prefix.
    pub id: Option<String>,
    /// Pod id.
    pub pod_id: Option<String>,
    /// State.
    pub state: Option<CtrState>,
    /// Labels that must all match.
    pub labels: BTreeMap<String, String>,
}

/// What ExecSync returns.
#[derive(Debug)]
pub struct ExecOutput {
    /// stdout.
    pub stdout: Vec<u8>,
    /// stderr.
    pub stderr: Vec<u8>,
    /// Exit code.
    pub exit_code: i32,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn mon_err(e: MonitorError) -> Error {
    match e {
        MonitorError::Unreachable { .. } => Error::Unavailable(e.to_string()),
        MonitorError::Failed { kind, message } => match kind {
            proto::ErrorKind::NotFound => Error::NotFound(message),
            proto::ErrorKind::Invalid => Error::FailedPrecondition(message),
            _ => Error::Internal(message),
        },
    }
}

/// The monitor's socket for a pod: short, as unix socket paths are limited to 108 bytes.
pub fn monitor_socket(state: &Path, pod_id: &str) -> PathBuf {
    state
        .join("mon")
        .join(format!("{}.sock", &pod_id[..16.min(pod_id.len())]))
}

/// Where libcontainer keeps its state.
pub fn lc_root(state: &Path) -> PathBuf {
    state.join("lc")
}

/// Every container of this node.
pub struct Containers {
    dir: PathBuf,
    upper: PathBuf,
    state: PathBuf,
    ctrs: RwLock<HashMap<String, Arc<Ctr>>>,
    names: Mutex<HashMap<String, String>>,
    monitors: Mutex<HashMap<String, Arc<MonitorClient>>>,
    events: mpsc::UnboundedSender<ExitEvent>,
    images: Arc<ImageStore>,
    pods: Arc<Sandboxes>,
    allowed_caps: Vec<&'static str>,
    own_oom: i64,
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Internal(format!("{what}: {e}"))
}

impl Containers {
    /// Opens the container store, adopts what the monitors hold and cleans what nothing does.
    pub async fn open(
        root: &Path,
        state: &Path,
        images: Arc<ImageStore>,
        pods: Arc<Sandboxes>,
    ) -> Result<Arc<Containers>> {
        let dir = state.join("containers");
        let upper = root.join("containers");
        for d in [&dir, &upper, &state.join("mon"), &lc_root(state)] {
            crate::layout::private_dir(d).map_err(internal("creating container directories"))?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let c = Arc::new(Containers {
            dir,
            upper,
            state: state.to_owned(),
            ctrs: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            monitors: Mutex::new(HashMap::new()),
            events: tx,
            images,
            pods,
            allowed_caps: spec::own_capabilities(),
            own_oom: spec::own_oom_score_adj(),
        });
        c.reconcile().await;
        let weak = Arc::downgrade(&c);
        tokio::spawn(events_loop(weak, rx));
        Ok(c)
    }

    fn ctr_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn persist(&self, r: &ContainerRecord) -> Result<()> {
        store::write_json_volatile(&self.ctr_dir(&r.id).join("container.json"), r)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The client of a pod's monitor.
    pub fn monitor(&self, pod_id: &str) -> Arc<MonitorClient> {
        let mut m = self.monitors.lock().expect("monitors poisoned");
        m.entry(pod_id.to_string())
            .or_insert_with(|| {
                Arc::new(MonitorClient::new(
                    pod_id,
                    &monitor_socket(&self.state, pod_id),
                    self.events.clone(),
                ))
            })
            .clone()
    }

    /// Greets a pod's new monitor (which exits unless greeted within a minute) and checks it
    /// answers.
    pub async fn greet(&self, pod_id: &str) -> Result<()> {
        self.monitor(pod_id)
            .call(
                request::Op::List(proto::List {}),
                Some(Duration::from_secs(10)),
            )
            .await
            .map(|_| ())
            .map_err(mon_err)
    }

    /// Forgets a pod's monitor client (the pod is gone).
    pub fn drop_monitor(&self, pod_id: &str) {
        self.monitors
            .lock()
            .expect("monitors poisoned")
            .remove(pod_id);
    }

    /// A container by id or unique id prefix.
    pub fn get(&self, id: &str) -> Result<Arc<Ctr>> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("container id is empty".into()));
        }
        match crate::idmap::find(&self.ctrs.read().expect("containers poisoned"), id) {
            crate::idmap::Lookup::Found(c) => Ok(c),
            crate::idmap::Lookup::Ambiguous => Err(Error::InvalidArgument(format!(
                "container id prefix {id:?} is ambiguous"
            ))),
            crate::idmap::Lookup::Missing => {
                Err(Error::NotFound(format!("container {id:?} not found")))
            }
        }
    }

    /// Ids of a pod's containers.
    pub fn of_pod(&self, pod_id: &str) -> Vec<String> {
        self.ctrs
            .read()
            .expect("containers poisoned")
            .values()
            .filter(|c| c.record().pod_id == pod_id)
            .map(|c| c.id.clone())
            .collect()
    }

    /// Every container matching `f`.
    pub fn list(&self, f: &CtrFilter) -> Vec<ContainerRecord> {
        let ctrs = self.ctrs.read().expect("containers poisoned");
        let picked: Vec<Arc<Ctr>> = match f.id.as_deref().filter(|i| !i.is_empty()) {
            Some(id) => match crate::idmap::find(&ctrs, id) {
                crate::idmap::Lookup::Found(c) => vec![c],
                _ => Vec::new(),
            },
            None => ctrs.values().cloned().collect(),
        };
        picked
            .iter()
            .map(|c| c.record())
            .filter(|r| r.state != CtrState::Creating)
            .filter(|r| {
                f.pod_id
                    .as_deref()
                    .is_none_or(|p| p.is_empty() || r.pod_id.starts_with(p))
            })
            .filter(|r| f.state.is_none_or(|s| r.state == s))
            .filter(|r| {
                f.labels
                    .iter()
                    .all(|(k, v)| r.spec.labels.get(k) == Some(v))
            })
            .collect()
    }

    /// CreateContainer.
    pub async fn create(
        &self,
        pod: Arc<Pod>,
        spec: ContainerSpec,
        image: Arc<Image>,
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
        // Privilege is the pod's to grant: a container alone cannot take the node.
        if spec.security.privileged && !p.spec.security.privileged {
            return Err(Error::InvalidArgument(format!(
                "container {:?} asks for privileged, but pod sandbox {} is not privileged \
                 (linux.security_context.privileged of the pod)",
                spec.name, p.id
            )));
        }
        // Mounts that propagate back to the node are the node's to grant, as Kubernetes does.
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
        let key = format!("{}/{}/{}", p.id, spec.name, spec.attempt);
        if let Some(other) = self.names.lock().expect("names poisoned").get(&key) {
            return Err(Error::AlreadyExists(format!(
                "container name {:?} (attempt {}) in pod {} is reserved by container {other}",
                spec.name, spec.attempt, p.id
            )));
        }
        let id = crate::sandbox::new_id();
        let dir = self.ctr_dir(&id);
        crate::layout::private_dir(&dir).map_err(internal("creating the container directory"))?;
        let log_path = log_path(&p.spec.log_directory, &spec.log_path)?;
        let rc = image.config.config.clone().unwrap_or_default();
        let mut rec = ContainerRecord {
            id: id.clone(),
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
            stop_signal: rc.stop_signal.clone(),
            log_path,
            mounts: Vec::new(),
            spec,
        };
        if let Err(e) = self.persist(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let ctr = Arc::new(Ctr {
            id: id.clone(),
            record: RwLock::new(rec.clone()),
            op: tokio::sync::Mutex::new(()),
            exited: watch::channel(false).0,
        });
        // Registered while Creating (not listed), so an exit event racing the answer finds it.
        self.ctrs
            .write()
            .expect("containers poisoned")
            .insert(id.clone(), ctr.clone());
        match self.make(&mut rec, &p, &image).await {
            Ok(()) => {
                rec.state = CtrState::Created;
                let persisted = self.persist(&rec);
                *ctr.record.write().expect("container record poisoned") = rec.clone();
                if let Err(e) = persisted {
                    self.undo(&rec).await;
                    return Err(e);
                }
                self.names
                    .lock()
                    .expect("names poisoned")
                    .insert(key, id.clone());
                tracing::info!(container = %id, pod = %p.id, name = %rec.spec.name, image = %rec.image_name, "container created");
                Ok(id)
            }
            Err(e) => {
                tracing::info!(container = %id, pod = %p.id, error = %e, "container creation failed; undoing");
                self.undo(&rec).await;
                Err(e)
            }
        }
    }

    async fn make(
        &self,
        rec: &mut ContainerRecord,
        p: &crate::sandbox::PodRecord,
        image: &Image,
    ) -> Result<()> {
        let id = rec.id.clone();
        let dir = self.ctr_dir(&id);
        let upper = self.upper.join(&id);
        let t0 = std::time::Instant::now();
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
        self.images
            .hold(&id, image)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let rootfs_dir = dir.join("rootfs");
        rootfs::mount_overlay(
            &self.images.lower_dirs(image),
            &upper.join("upper"),
            &upper.join("work"),
            &rootfs_dir,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        rootfs::ensure_file_targets(
            &rootfs_dir,
            &["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"],
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        let t_mount = t0.elapsed();

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
        let passwd = image_file::read(&rootfs_dir, "/etc/passwd")
            .await
            .map_err(image_file)?;
        let group = image_file::read(&rootfs_dir, "/etc/group")
            .await
            .map_err(image_file)?;
        let u = user::resolve(
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
        .map_err(Error::InvalidArgument)?;

        // Host paths: absolute, existing; symlinks resolved so the mount shows the target.
        let mut mounts = Vec::new();
        for m in &s.mounts {
            if m.container_path.is_empty() || !m.container_path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "mount container path {:?} must be absolute",
                    m.container_path
                )));
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
            mounts.push((m.clone(), resolved));
        }
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
                rootfs: &rootfs_dir,
                user: &u,
                id: &id,
                cgroup_mode: self.pods.cgroups.mode,
                target_pid,
                allowed_caps: &self.allowed_caps,
            },
            &mounts,
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The spec holds the container's environment: 0600, like every record.
        let json = serde_json::to_vec(&oci).expect("OCI specs serialize");
        store::write_atomic_volatile(&dir.join("config.json"), &json)
            .map_err(|e| Error::Internal(format!("writing the OCI spec: {e}")))?;
        rec.env = oci
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default();
        rec.cwd = spec::working_dir(s, &image.config);
        rec.user = u;
        rec.mounts = mounts;
        // The record written at the start already lets an undo reach the monitor: nothing
        // new is needed on disk before the container is made.
        let t_spec = t0.elapsed();
        let oom = (rec.spec.resources.oom_score_adj != 0 || self.own_oom != 0)
            .then(|| rec.spec.resources.oom_score_adj.max(self.own_oom));
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
                        .procs_file(&p.cgroup.join(&id))
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
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
        let mut runtime_us = 0;
        if let Some(proto::response::Result::Created(c)) = created.result {
            rec.pid = c.pid;
            runtime_us = c.micros;
        }
        tracing::debug!(
            container = %id,
            runtime_us,
            mount_us = t_mount.as_micros() as u64,
            spec_us = (t_spec - t_mount).as_micros() as u64,
            monitor_create_us = (t0.elapsed() - t_spec).as_micros() as u64,
            "container made"
        );
        Ok(())
    }

    /// Kills what runs in a container's cgroup: for when its monitor, which would have, is
    /// gone (its processes outlive it when the pod does not share one PID namespace).
    fn kill_orphans(&self, rec: &ContainerRecord) {
        let Ok(pod) = self.pods.get(&rec.pod_id) else {
            return;
        };
        if let Some(procs) = self
            .pods
            .cgroups
            .procs_file(&pod.record().cgroup.join(&rec.id))
        {
            crate::cgroup::kill_procs(&procs);
        }
    }

    /// Undoes a container that is not (or no longer) wanted: monitor state, rootfs, dirs, hold.
    async fn undo(&self, rec: &ContainerRecord) {
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

    async fn remove_files(&self, id: &str) {
        let dir = self.ctr_dir(id);
        rootfs::unmount(&dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.upper.join(id));
        // The monitor removes it at Delete; not when the monitor is gone.
        let _ =
            std::fs::remove_dir_all(lc_root(&self.state).join(crate::monitor::server::lc_id(id)));
        if let Err(e) = self.images.release(id).await {
            tracing::warn!(container = id, error = %e, "releasing the image hold");
        }
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<()> {
        let ctr = self.get(id)?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        match rec.state {
            CtrState::Created => {}
            CtrState::Running => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is already running",
                    rec.id
                )));
            }
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is {s:?}, not created",
                    rec.id
                )));
            }
        }
        let mut exited = ctr.exited.subscribe();
        let r = self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Start(proto::Start {
                    container_id: rec.id.clone(),
                }),
                Some(Duration::from_secs(60)),
            )
            .await;
        match r {
            Ok(_) => {
                let mut r = ctr.record.write().expect("container record poisoned");
                if r.state == CtrState::Created {
                    r.state = CtrState::Running;
                    r.started_at = now_ns();
                }
                let snapshot = r.clone();
                drop(r);
                self.persist(&snapshot)?;
                tracing::info!(container = %rec.id, "container started");
                Ok(())
            }
            Err(MonitorError::Failed {
                kind: proto::ErrorKind::StartFailed,
                message,
            }) => {
                {
                    let mut r = ctr.record.write().expect("container record poisoned");
                    r.started_at = now_ns();
                }
                // The process exits at once; its exit (code 128, StartError) is recorded before
                // the answer, so a status right after shows it.
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
                Err(Error::Internal(format!(
                    "starting container {}: {message}",
                    rec.id
                )))
            }
            Err(e) => Err(mon_err(e)),
        }
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout`. Unknown or stopped: fine.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        let Some(ctr) = crate::runtime::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        if !matches!(rec.state, CtrState::Created | CtrState::Running) {
            return Ok(());
        }
        let mon = self.monitor(&rec.pod_id);
        let mut exited = ctr.exited.subscribe();
        let kill = |sig: i32| {
            let mon = mon.clone();
            let id = rec.id.clone();
            async move {
                mon.call(
                    request::Op::Kill(proto::Kill {
                        container_id: id,
                        signal: sig,
                    }),
                    Some(Duration::from_secs(10)),
                )
                .await
            }
        };
        if rec.state == CtrState::Running && !timeout.is_zero() {
            let sig = signal_number(&rec.stop_signal).unwrap_or(libc::SIGTERM);
            tracing::info!(container = %rec.id, signal = sig, timeout_s = timeout.as_secs(), "stopping container");
            kill(sig).await.map_err(mon_err)?;
            if tokio::time::timeout(timeout, exited.wait_for(|e| *e))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        kill(libc::SIGKILL).await.map_err(mon_err)?;
        match tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| *e)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "container {} did not exit after SIGKILL",
                rec.id
            ))),
        }
    }

    /// RemoveContainer: stops it if it runs, then removes everything of it. Unknown: fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(ctr) = crate::runtime::optional(self.get(id))? else {
            return Ok(());
        };
        self.stop(&ctr.id, Duration::ZERO).await?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        if !self
            .ctrs
            .read()
            .expect("containers poisoned")
            .contains_key(&rec.id)
        {
            return Ok(());
        }
        match self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Delete(proto::Delete {
                    container_id: rec.id.clone(),
                    force: false,
                }),
                Some(Duration::from_secs(30)),
            )
            .await
        {
            Ok(_) | Err(MonitorError::Unreachable { .. }) => {}
            Err(e) => return Err(mon_err(e)),
        }
        self.remove_files(&rec.id).await;
        self.ctrs
            .write()
            .expect("containers poisoned")
            .remove(&rec.id);
        let key = format!("{}/{}/{}", rec.pod_id, rec.spec.name, rec.spec.attempt);
        let mut names = self.names.lock().expect("names poisoned");
        if names.get(&key) == Some(&rec.id) {
            names.remove(&key);
        }
        tracing::info!(container = %rec.id, "container removed");
        Ok(())
    }

    /// ReopenContainerLog: only for a running container.
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let ctr = self.get(id)?;
        let rec = ctr.record();
        if rec.state != CtrState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        if rec.log_path.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "container {} has no log path",
                rec.id
            )));
        }
        self.monitor(&rec.pod_id)
            .call(
                request::Op::ReopenLog(proto::ReopenLog {
                    container_id: rec.id,
                }),
                Some(Duration::from_secs(10)),
            )
            .await
            .map(|_| ())
            .map_err(mon_err)
    }

    /// ExecSync: runs `cmd` in the container; on timeout only the exec'd process tree dies.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let ctr = self.get(id)?;
        let rec = ctr.record();
        if rec.state != CtrState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        if cmd.is_empty() {
            return Err(Error::InvalidArgument("ExecSync needs a command".into()));
        }
        let wait = if timeout.is_zero() {
            None
        } else {
            Some(timeout + Duration::from_secs(30))
        };
        let r = self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Exec(proto::Exec {
                    container_id: rec.id.clone(),
                    args: cmd.clone(),
                    env: rec.env.clone(),
                    cwd: rec.cwd.clone(),
                    uid: rec.user.uid,
                    gid: rec.user.gid,
                    additional_gids: rec.user.additional_gids.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                    max_output_bytes: EXEC_OUTPUT_LIMIT,
                }),
                wait,
            )
            .await
            .map_err(mon_err)?;
        match r.result {
            Some(proto::response::Result::Exec(e)) if e.timed_out => {
                Err(Error::DeadlineExceeded(format!(
                    "command {cmd:?} timed out after {}s; it was killed (the container was not)",
                    timeout.as_secs()
                )))
            }
            Some(proto::response::Result::Exec(e)) => Ok(ExecOutput {
                stdout: e.stdout,
                stderr: e.stderr,
                exit_code: e.exit_code,
            }),
            _ => Err(Error::Internal(
                "the monitor answered ExecSync without a result".into(),
            )),
        }
    }

    /// Records an exit the monitor reported.
    fn exited(&self, ev: proto::Event) {
        let Ok(ctr) = self.get(&ev.container_id) else {
            return;
        };
        let Some(exit) = ev.exit else { return };
        // The cgroup still exists (it goes at RemoveContainer): did the OOM killer strike?
        let oom = exit.signal == libc::SIGKILL && {
            let rec = ctr.record();
            self.pods
                .get(&rec.pod_id)
                .map(|p| {
                    self.pods
                        .cgroups
                        .oom_killed(&p.record().cgroup.join(&rec.id))
                })
                .unwrap_or(false)
        };
        let snapshot = {
            let mut r = ctr.record.write().expect("container record poisoned");
            if r.state == CtrState::Exited {
                return;
            }
            apply_exit(&mut r, &exit);
            if oom {
                r.reason = "OOMKilled".into();
            }
            r.clone()
        };
        if let Err(e) = self.persist(&snapshot) {
            tracing::warn!(container = %snapshot.id, error = %e, "recording the exit");
        }
        tracing::info!(container = %snapshot.id, exit_code = snapshot.exit_code, reason = %snapshot.reason, "container exited");
        let _ = ctr.exited.send(true);
    }

    /// At start: adopts containers from the monitors, reads the exits that happened while
    /// berthd was away, undoes half-made containers and removes what nothing refers to.
    async fn reconcile(&self) {
        let mut records: Vec<ContainerRecord> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                match store::read_json::<ContainerRecord>(&e.path().join("container.json")) {
                    Ok(Some(r)) if r.id == name => records.push(r),
                    _ => {
                        tracing::warn!(container = %name, "removing a container directory without a record");
                        rootfs::unmount(&e.path().join("rootfs"));
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        // What each live pod's monitor holds.
        let pods: HashMap<String, PodState> = self.pods.ids().into_iter().collect();
        let mut held: HashMap<String, proto::ContainerState> = HashMap::new();
        for (pod, st) in &pods {
            if *st != PodState::Ready {
                continue;
            }
            match self
                .monitor(pod)
                .call(
                    request::Op::List(proto::List {}),
                    Some(Duration::from_secs(10)),
                )
                .await
            {
                Ok(r) => {
                    if let Some(proto::response::Result::States(s)) = r.result {
                        for c in s.containers {
                            held.insert(c.container_id.clone(), c);
                        }
                    }
                }
                Err(e) => tracing::warn!(pod = %pod, error = %e, "cannot reach the pod's monitor"),
            }
        }
        for mut r in records {
            if r.state == CtrState::Creating || !pods.contains_key(&r.pod_id) {
                tracing::info!(container = %r.id, "undoing a container whose creation was interrupted or whose pod is gone");
                self.ctrs.write().expect("containers poisoned").insert(
                    r.id.clone(),
                    Arc::new(Ctr {
                        id: r.id.clone(),
                        record: RwLock::new(r.clone()),
                        op: Default::default(),
                        exited: watch::channel(true).0,
                    }),
                );
                self.undo(&r).await;
                continue;
            }
            if matches!(r.state, CtrState::Created | CtrState::Running) {
                match held.get(&r.id) {
                    Some(s) if s.status == proto::Status::Exited as i32 => {
                        if let Some(e) = &s.exit {
                            apply_exit(&mut r, e);
                        }
                    }
                    Some(s) if s.status == proto::Status::Running as i32 => {
                        if r.state == CtrState::Created {
                            r.state = CtrState::Running;
                            r.started_at = now_ns();
                        }
                    }
                    Some(_) => {}
                    None => match read_exit_file(&self.ctr_dir(&r.id).join("exit.json")) {
                        Some(e) => apply_exit(&mut r, &e),
                        None => {
                            self.kill_orphans(&r);
                            r.state = CtrState::Exited;
                            r.exit_code = 255;
                            r.finished_at = now_ns();
                            r.reason = "Unknown".into();
                            r.message =
                                "the pod's monitor is gone; the container's fate is unknown".into();
                        }
                    },
                }
                let _ = self.persist(&r);
            }
            self.names.lock().expect("names poisoned").insert(
                format!("{}/{}/{}", r.pod_id, r.spec.name, r.spec.attempt),
                r.id.clone(),
            );
            let exited = r.state == CtrState::Exited;
            self.ctrs.write().expect("containers poisoned").insert(
                r.id.clone(),
                Arc::new(Ctr {
                    id: r.id.clone(),
                    record: RwLock::new(r),
                    op: tokio::sync::Mutex::new(()),
                    exited: watch::channel(exited).0,
                }),
            );
        }
        // Writable layers and image holds of containers that no longer exist.
        let live: Vec<String> = self
            .ctrs
            .read()
            .expect("containers poisoned")
            .keys()
            .cloned()
            .collect();
        if let Ok(rd) = std::fs::read_dir(&self.upper) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !live.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for owner in self.images.holders() {
            if !live.contains(&owner) {
                let _ = self.images.release(&owner).await;
            }
        }
        // libcontainer state of containers whose pod's monitor died with them (the undo above
        // could not ask it to delete them): neither a record nor a monitor refers to it.
        let known: Vec<&str> = live
            .iter()
            .chain(held.keys())
            .map(|id| crate::monitor::server::lc_id(id))
            .collect();
        if let Ok(rd) = std::fs::read_dir(lc_root(&self.state)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name.as_str()) {
                    tracing::info!(dir = %e.path().display(), "removing libcontainer state nothing refers to");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Applies a reported exit to a record.
fn apply_exit(r: &mut ContainerRecord, e: &proto::Exit) {
    r.state = CtrState::Exited;
    r.exit_code = e.code;
    r.finished_at = e.exited_at_ns;
    if e.start_failed {
        r.reason = "StartError".into();
        r.message = e.message.clone();
    } else if e.code == 0 {
        r.reason = "Completed".into();
    } else {
        r.reason = "Error".into();
    }
}

fn read_exit_file(p: &Path) -> Option<proto::Exit> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(proto::Exit {
        code: v["code"].as_i64()? as i32,
        signal: v["signal"].as_i64().unwrap_or(0) as i32,
        exited_at_ns: v["exited_at_ns"].as_i64().unwrap_or(0),
        message: v["message"].as_str().unwrap_or("").to_string(),
        start_failed: v["start_failed"].as_bool().unwrap_or(false),
    })
}

async fn events_loop(c: std::sync::Weak<Containers>, mut rx: mpsc::UnboundedReceiver<ExitEvent>) {
    while let Some((_pod, ev)) = rx.recv().await {
        let Some(c) = c.upgrade() else { return };
        c.exited(ev);
    }
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

/// A signal by name (`SIGTERM`, `TERM`, `15`).
pub fn signal_number(s: &str) -> Option<i32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    let name = if s.to_uppercase().starts_with("SIG") {
        s.to_uppercase()
    } else {
        format!("SIG{}", s.to_uppercase())
    };
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_by_name_or_number() {
        assert_eq!(signal_number("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("term"), Some(libc::SIGTERM));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number(""), None);
        assert_eq!(signal_number("NOPE"), None);
    }

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
