//! Containers: CreateContainer builds the root filesystem (an overlay of the image's
//! snapshots) and the OCI spec, and asks the pod's monitor to create the container; Start,
//! Stop, Remove, Status, List, ReopenContainerLog and ExecSync follow. Each container has a
//! record in `state/containers/<id>/container.json`, written before anything is made, so a
//! failure or a restart can undo or adopt it. Exit statuses come from the monitors as events
//! (and from the exit files they write first, when berthd was away).
//!
//! Here: the types, the store and lookups. `create` makes a container step by step and undoes
//! it (`checks` first), `lifecycle` starts, stops and removes, `exec` runs ExecSync, `reconcile` adopts at start,
//! `volumes_idmapped` hands volumes to user-namespaced pods.

pub mod capabilities;
mod cgroup_view;
mod checks;
mod create;
pub mod detail;
mod exec;
mod exits;
pub mod image_file;
mod image_volumes;
mod lifecycle;
pub use lifecycle::signal_number;
mod overlay;
mod reconcile;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod stats;
mod update;
pub mod user;
mod volumes;
mod volumes_idmapped;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::image::ImageStore;
use crate::layout::Layout;
use crate::monitor::client::{ExitEvent, MonitorClient, MonitorError};
use crate::monitor::proto::{self, request};
use crate::sandbox::{NsMode, Sandboxes};
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
    /// The uid and gid mappings of an idmapped mount (kubelet gives a user-namespaced pod's
    /// own with each of its volumes).
    #[serde(default)]
    pub idmap: Option<crate::sandbox::UserNs>,
    /// Flags for the bind mount: `noexec`, `nodev`, `nosuid` (CRI mount_options).
    #[serde(default)]
    pub options: Vec<String>,
    /// An image volume: the files of this image instead of a host path.
    #[serde(default)]
    pub image: Option<ImageVolume>,
}

/// An image volume's source (CRI `Mount.image`, `image_sub_path`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVolume {
    /// The image as the request named it.
    pub image: String,
    /// The image's ID, found when the container is made.
    #[serde(default)]
    pub image_id: String,
    /// A directory or file of the image, relative to its root, given instead of all of it.
    #[serde(default)]
    pub sub_path: String,
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
    /// Ambient capabilities to add.
    #[serde(default)]
    pub ambient_caps: Vec<String>,
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
    /// A Localhost seccomp section for the OCI spec, when one applies.
    pub seccomp: Option<serde_json::Value>,
    /// The RuntimeDefault seccomp profile (`seccomp::runtime_default`) applies.
    #[serde(default)]
    pub seccomp_runtime_default: bool,
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
    /// The signal a stop sends first (a name, "SIGUSR1"), over the image's STOPSIGNAL.
    #[serde(default)]
    pub stop_signal: Option<String>,
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

/// What happened to a container, or (under the pod's own id) to a pod sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created.
    Created,
    /// Started.
    Started,
    /// Exited, or the pod stopped.
    Stopped,
    /// Removed.
    Deleted,
}

/// One lifecycle event, with its pod and the pod's containers as they were right after it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The container's id, or the pod's for a pod event.
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When, ns since the epoch.
    pub at: i64,
    /// The pod (none if it is gone).
    pub pod: Option<crate::sandbox::PodRecord>,
    /// The pod's containers (not those still being created).
    pub containers: Vec<ContainerRecord>,
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
    /// A StartContainer is waiting for the monitor's answer: an exit reported meanwhile is
    /// of a container that did start.
    starting: std::sync::atomic::AtomicBool,
    /// Held from a state change to its event, so events leave in the order of the changes
    /// (a container that exits at once is Started, then Stopped).
    publishing: std::sync::Mutex<()>,
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

/// Every container of this node.
pub struct Containers {
    layout: Layout,
    ctrs: RwLock<HashMap<String, Arc<Ctr>>>,
    names: crate::reservations::Names,
    /// How long a container whose creator left waits for a retry to claim it.
    unclaimed_timeout: Duration,
    /// What the reconcile at start did.
    pub reconciled: crate::store::Tally,
    monitors: Mutex<HashMap<String, Arc<MonitorClient>>>,
    events: mpsc::UnboundedSender<ExitEvent>,
    images: Arc<ImageStore>,
    pods: Arc<Sandboxes>,
    allowed_caps: Vec<&'static str>,
    own_oom: i64,
    samples: Mutex<StatSamples>,
    /// Lifecycle events of containers and pods, for GetContainerEvents.
    pub changes: crate::events::Hub<Event>,
    /// The records' copies in `--root`, for after a reboot.
    copies: store::Copies,
}

/// The previous stats samples (see `stats`): cpu times for rates, layer sizes to reuse.
#[derive(Default)]
struct StatSamples {
    cpu: HashMap<String, (std::time::Instant, u64)>,
    layers: HashMap<String, (std::time::Instant, u64, u64)>,
}

/// The key a container's name is reserved under: pod, name and attempt.
fn name_key(pod: &str, name: &str, attempt: u32) -> String {
    format!("{pod}/{name}/{attempt}")
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| crate::error::from_io(what, e)
}

impl Containers {
    /// Opens the container store, adopts what the monitors hold and cleans what nothing does.
    pub async fn open(
        layout: &Layout,
        images: Arc<ImageStore>,
        pods: Arc<Sandboxes>,
        unclaimed_timeout: Duration,
    ) -> Result<Arc<Containers>> {
        for d in [
            layout.containers(),
            layout.layers(),
            layout.monitors(),
            layout.lc_root(),
        ] {
            crate::layout::private_dir(&d).map_err(internal("creating container directories"))?;
        }
        for d in layout.traversable_dirs() {
            crate::layout::traversable_dir(&d)
                .map_err(internal("creating container directories"))?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let c = Arc::new(Containers {
            layout: layout.clone(),
            ctrs: RwLock::new(HashMap::new()),
            names: Default::default(),
            unclaimed_timeout,
            reconciled: Default::default(),
            monitors: Mutex::new(HashMap::new()),
            events: tx,
            images,
            pods,
            allowed_caps: capabilities::own_capabilities(),
            own_oom: capabilities::own_oom_score_adj(),
            samples: Default::default(),
            changes: Default::default(),
            copies: store::Copies::open(&layout.container_copies()),
        });
        c.reconcile().await?;
        c.follow_monitors(rx);
        Ok(c)
    }

    fn ctr_dir(&self, id: &str) -> PathBuf {
        self.layout.containers().join(id)
    }

    /// Writes the record, then its copy in `--root` when the container is made and when it
    /// has exited (a container still being created leaves nothing worth listing after a
    /// reboot, and a restore makes a created and a running one the same ended one; its exit
    /// code is what a later copy adds).
    fn persist(&self, r: &ContainerRecord) -> Result<()> {
        store::write_json_volatile(&self.ctr_dir(&r.id).join("container.json"), r)
            .map_err(crate::error::from_store)?;
        let phase = match r.state {
            CtrState::Creating => return Ok(()),
            CtrState::Created | CtrState::Running => "made",
            CtrState::Exited => "exited",
        };
        self.copies
            .write(&r.id, phase, r)
            .map_err(crate::error::from_store)
    }

    /// The client of a pod's monitor.
    pub fn monitor(&self, pod_id: &str) -> Arc<MonitorClient> {
        let mut m = self.monitors.lock().expect("monitors poisoned");
        m.entry(pod_id.to_string())
            .or_insert_with(|| {
                Arc::new(MonitorClient::new(
                    pod_id,
                    &self.layout.monitor_socket(pod_id),
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

    /// Whether a process ExecSync starts in this container could be traced by a process of the
    /// pod before it execs: the container's PID namespace is shared, or the container may hold
    /// CAP_SYS_PTRACE (anything else cannot trace a root process with every capability).
    fn exec_traceable(&self, rec: &ContainerRecord) -> bool {
        let Ok(pod) = self.pods.get(&rec.pod_id) else {
            return true;
        };
        let sec = &rec.spec.security;
        let caps = capabilities::capabilities(
            capabilities::Wanted {
                privileged: sec.privileged,
                add: &sec.add_caps,
                drop: &sec.drop_caps,
                ambient: &sec.ambient_caps,
            },
            &self.allowed_caps,
        );
        shares_pid_namespace(&rec.spec, &pod.record()) || caps.iter().any(|c| c == "CAP_SYS_PTRACE")
    }

    /// The record of a running container (FailedPrecondition if it is not running).
    fn running(&self, id: &str) -> Result<ContainerRecord> {
        let rec = self.get(id)?.record();
        if rec.state != CtrState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        Ok(rec)
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

    /// Tells the event subscribers what happened to container (or pod) `id` of `pod_id`;
    /// `pod` is the pod's record when the caller has it (a pod being removed is gone after).
    /// Call it with no record lock held.
    pub fn publish(
        &self,
        id: &str,
        pod_id: &str,
        kind: EventKind,
        pod: Option<crate::sandbox::PodRecord>,
    ) {
        self.changes.publish(|| Event {
            id: id.to_string(),
            kind,
            at: now_ns(),
            pod: pod.or_else(|| self.pods.get(pod_id).ok().map(|p| p.record())),
            containers: self.list(&CtrFilter {
                pod_id: Some(pod_id.to_string()),
                ..Default::default()
            }),
        });
    }

    /// Every container's state (for the metrics census; no record is copied).
    pub fn states(&self) -> Vec<CtrState> {
        let ctrs = self.ctrs.read().expect("containers poisoned");
        let state = |c: &Arc<Ctr>| c.record.read().expect("container record poisoned").state;
        ctrs.values().map(state).collect()
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
        // Filtered under each record's read lock, copied only when picked: a pod's stats list
        // its containers out of every container of the node.
        let wanted = |r: &ContainerRecord| {
            r.state != CtrState::Creating
                && f.pod_id
                    .as_deref()
                    .is_none_or(|p| p.is_empty() || r.pod_id.starts_with(p))
                && f.state.is_none_or(|s| r.state == s)
                && f.labels
                    .iter()
                    .all(|(k, v)| r.spec.labels.get(k) == Some(v))
        };
        picked
            .iter()
            .filter_map(|c| {
                let r = c.record.read().expect("container record poisoned");
                wanted(&r).then(|| r.clone())
            })
            .collect()
    }
}

/// Whether the container's processes live in a PID namespace other containers see: the pod's
/// shared one, or another container's (TARGET). A container's own namespace, or the node's
/// (where a process that can trace it owns the node already), is not. A container waiting for
/// Start in a shared one must be shielded from its neighbours (see `monitor::helper`).
pub fn shares_pid_namespace(spec: &ContainerSpec, pod: &crate::sandbox::PodRecord) -> bool {
    matches!(
        spec.security.pid_mode.unwrap_or(pod.spec.namespaces.pid),
        NsMode::Pod | NsMode::Target
    )
}
