//! Pod sandboxes: shared namespaces pinned by bind mounts (no pause image), the pod's files
//! and /dev/shm, its cgroup, its network, and for pods sharing one PID namespace a tiny init.
//!
//! Every pod has a record in `state/pods/<id>/pod.json`, written before any side effect with
//! what will be made (namespace pins, veth name and cgroup directories follow from the id and
//! the config), so an undo can always run: when a step fails, when berthd restarts in the
//! middle of a RunPodSandbox, and for Stop/Remove. Each undo step is safe to run twice.
//!
//! Here: the types and lookups. `run` makes a pod step by step, `stop_remove` undoes it,
//! `reconcile` opens the store at start and finishes what a previous berthd left.

mod cgroups;
pub mod files;
pub mod init;
pub mod namespaces;
mod reconcile;
mod run;
mod stop_remove;
pub mod sysctl;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroups;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::network::{Network, PodNet, PortSpec};
use crate::store;

/// How a pod uses a kind of namespace (the CRI's NamespaceMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NsMode {
    /// One for the pod.
    #[default]
    Pod,
    /// One per container.
    Container,
    /// The node's.
    Node,
    /// Another container's.
    Target,
}

/// The pod's namespace choices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsModes {
    /// Network.
    pub network: NsMode,
    /// PID.
    pub pid: NsMode,
    /// IPC.
    pub ipc: NsMode,
    /// The container whose namespace TARGET means.
    pub target_id: String,
    /// A user namespace of the pod's own (none: the node's).
    #[serde(default)]
    pub user: Option<UserNs>,
}

/// One id range of a user namespace: ids `container..container+len` inside are
/// `host..host+len` on the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// First id inside.
    pub container: u32,
    /// First id on the node.
    pub host: u32,
    /// How many.
    pub len: u32,
}

impl IdRange {
    /// The node's id for `id` inside, if the range maps it.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        let off = id.checked_sub(self.container)?;
        (off < self.len)
            .then(|| self.host.checked_add(off))
            .flatten()
    }
}

/// A pod's own user namespace (userns_options mode POD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNs {
    /// The uid mapping.
    pub uids: IdRange,
    /// The gid mapping.
    pub gids: IdRange,
}

/// DNS settings for the pod's resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// Options.
    pub options: Vec<String>,
}

/// The pod-level security settings containers inherit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSecurity {
    /// Privileged pod.
    pub privileged: bool,
    /// run_as_user.
    pub run_as_user: Option<i64>,
    /// run_as_group.
    pub run_as_group: Option<i64>,
    /// supplemental_groups.
    pub supplemental_groups: Vec<i64>,
    /// readonly_rootfs.
    pub readonly_rootfs: bool,
}

/// What RunPodSandbox asks for, in berth's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// metadata.name.
    pub name: String,
    /// metadata.uid.
    pub uid: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.attempt.
    pub attempt: u32,
    /// The hostname (config hostname, else the pod name).
    pub hostname: String,
    /// Where kubelet wants container logs.
    pub log_directory: String,
    /// DNS settings.
    pub dns: Option<DnsConfig>,
    /// Port mappings.
    pub ports: Vec<PortSpec>,
    /// Labels, verbatim.
    pub labels: BTreeMap<String, String>,
    /// Annotations, verbatim.
    pub annotations: BTreeMap<String, String>,
    /// The cgroup parent (cgroupfs path); empty = berth's default.
    pub cgroup_parent: String,
    /// Sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// Namespace choices.
    pub namespaces: NsModes,
    /// Security settings.
    pub security: PodSecurity,
    /// The runtime handler.
    pub runtime_handler: String,
}

impl PodSpec {
    /// The key a pod's name is reserved under.
    pub fn name_key(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.name, self.namespace, self.uid, self.attempt
        )
    }

    fn host_network(&self) -> bool {
        self.namespaces.network == NsMode::Node
    }
}

/// A pod's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// RunPodSandbox has not finished.
    Creating,
    /// Running.
    Ready,
    /// Stopped (or its init died).
    NotReady,
}

/// A pod as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    /// 64 hex digits.
    pub id: String,
    /// What was asked for.
    pub spec: PodSpec,
    /// Lifecycle state.
    pub state: PodState,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// The cgroup, relative to each hierarchy's root.
    pub cgroup: PathBuf,
    /// Its network, while it has one (built-in mode).
    pub net: Option<PodNet>,
    /// Its network from the CNI plugins, while it has one (CNI mode).
    #[serde(default)]
    pub cni: Option<crate::network::cni::CniNet>,
    /// The pod init (pid, start time), for PID namespace POD.
    pub init: Option<(i32, u64)>,
    /// The pod's monitor (pid, start time).
    #[serde(default)]
    pub monitor: Option<(i32, u64)>,
    /// Whether it has its own /dev/shm mount.
    pub shm: bool,
}

impl PodRecord {
    /// Every address of the pod, the first IPv4 first (what PodSandboxStatus reports).
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        match (&self.net, &self.cni) {
            (Some(n), _) => std::iter::once(n.ip.into())
                .chain(n.ip6.map(|(a, _, _)| a.into()))
                .collect(),
            (None, Some(c)) => c.ips.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// The pod's IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips().into_iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
    }
}

/// One pod: its record and a lock serializing operations on it.
pub struct Pod {
    /// The id.
    pub id: String,
    record: RwLock<PodRecord>,
    op: tokio::sync::Mutex<()>,
}

impl Pod {
    /// A copy of the record.
    pub fn record(&self) -> PodRecord {
        self.record.read().expect("pod record poisoned").clone()
    }

    /// Its cgroup, relative to each hierarchy's root (without copying the whole record).
    pub fn cgroup(&self) -> PathBuf {
        self.record
            .read()
            .expect("pod record poisoned")
            .cgroup
            .clone()
    }

    /// The current state.
    pub fn state(&self) -> PodState {
        self.record.read().expect("pod record poisoned").state
    }

    /// Serializes lifecycle operations on this pod.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.op.lock().await
    }
}

/// Filter of ListPodSandbox.
#[derive(Debug, Default)]
pub struct PodFilter {
    /// Id or unique id prefix.
    pub id: Option<String>,
    /// State.
    pub state: Option<PodState>,
    /// Labels that must all match.
    pub labels: BTreeMap<String, String>,
}

/// All pods of this node.
pub struct Sandboxes {
    layout: Layout,
    pods: RwLock<HashMap<String, Arc<Pod>>>,
    names: crate::reservations::Names,
    /// How long a pod whose creator left waits for a retry to claim it.
    unclaimed_timeout: std::time::Duration,
    /// The pod network.
    pub network: Arc<Network>,
    /// The host's cgroup hierarchies.
    pub cgroups: Cgroups,
    default_cgroup_parent: String,
    /// The runtime handlers pods may name.
    pub handlers: crate::handlers::Handlers,
    /// Forks the pods' inits and monitors.
    zygote: crate::zygote::Zygote,
    /// Cgroup directories berth made (and only these it removes) and the pods using them.
    pod_cgroups: cgroups::PodCgroups,
    /// What the reconcile at start did.
    pub reconciled: crate::store::Tally,
    /// The records' copies in `--root`, for after a reboot.
    copies: store::Copies,
    /// The TCP addresses berthd itself serves on (streaming, metrics): no hostPort may
    /// shadow one.
    own_endpoints: std::sync::Mutex<Vec<std::net::SocketAddr>>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A new random 64-hex-digit id.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    // getrandom(2) does not fail for 32 bytes once the pool is initialized.
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).expect("getrandom");
    hex::encode(b)
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| crate::error::from_io(what, e)
}

impl Sandboxes {
    /// Records a TCP address berthd serves on, so no pod's hostPort can take its traffic.
    pub fn reserve_own_endpoint(&self, addr: std::net::SocketAddr) {
        self.own_endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(addr);
    }

    fn pod_dir(&self, id: &str) -> PathBuf {
        self.layout.pods().join(id)
    }

    /// Where the pins of a pod's namespaces live.
    pub fn ns_dir(&self, id: &str) -> PathBuf {
        self.layout.ns().join(id)
    }

    /// Writes the record, then, the first time it is not `Creating`, its copy in `--root`
    /// (a pod still being created leaves nothing worth listing after a reboot, and a restore
    /// makes a ready and a stopped pod the same stopped one).
    fn persist(&self, r: &PodRecord) -> Result<()> {
        store::write_json_volatile(&self.pod_dir(&r.id).join("pod.json"), r)
            .map_err(crate::error::from_store)?;
        if r.state != PodState::Creating {
            self.copies
                .write(&r.id, "made", r)
                .map_err(crate::error::from_store)?;
        }
        Ok(())
    }

    /// A pod by id or unique id prefix.
    pub fn get(&self, id: &str) -> Result<Arc<Pod>> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("pod sandbox id is empty".into()));
        }
        match crate::idmap::find(&self.pods.read().expect("pods poisoned"), id) {
            crate::idmap::Lookup::Found(p) => Ok(p),
            crate::idmap::Lookup::Ambiguous => Err(Error::InvalidArgument(format!(
                "pod sandbox id prefix {id:?} is ambiguous"
            ))),
            crate::idmap::Lookup::Missing => {
                Err(Error::NotFound(format!("pod sandbox {id:?} not found")))
            }
        }
    }

    /// Every pod matching `filter`.
    pub fn list(&self, filter: &PodFilter) -> Vec<PodRecord> {
        let pods = self.pods.read().expect("pods poisoned");
        let picked: Vec<Arc<Pod>> = match filter.id.as_deref().filter(|i| !i.is_empty()) {
            Some(id) => match crate::idmap::find(&pods, id) {
                crate::idmap::Lookup::Found(p) => vec![p],
                _ => Vec::new(),
            },
            None => pods.values().cloned().collect(),
        };
        picked
            .iter()
            .map(|p| p.record())
            .filter(|r| filter.state.is_none_or(|s| r.state == s))
            .filter(|r| {
                filter
                    .labels
                    .iter()
                    .all(|(k, v)| r.spec.labels.get(k) == Some(v))
            })
            .collect()
    }

    /// Every pod's id and state.
    pub fn ids(&self) -> Vec<(String, PodState)> {
        self.pods
            .read()
            .expect("pods poisoned")
            .values()
            .map(|p| (p.id.clone(), p.state()))
            .collect()
    }

    /// Paths of a pod's files, for containers.
    pub fn files_dir(&self, id: &str) -> PathBuf {
        self.pod_dir(id)
    }

    /// The pod's address, if it has one.
    pub fn ip(&self, id: &str) -> Option<Ipv4Addr> {
        self.get(id).ok()?.record().ipv4()
    }

    /// Applies kubelet's pod CIDR to the network.
    pub async fn set_pod_cidr(&self, cidr: crate::network::cidr::Ipv4Cidr) {
        self.network.set_pod_cidr(cidr, &self.host_ports()).await;
    }

    /// The hostPorts every pod holds.
    fn host_ports(&self) -> Vec<crate::network::nft::HostPort> {
        self.pods
            .read()
            .expect("pods poisoned")
            .values()
            .filter_map(|p| p.record().net)
            .flat_map(|n| n.host_ports)
            .collect()
    }

    /// Applies the IPv6 half of a dual-stack pod CIDR to the network.
    pub async fn set_pod_cidr6(&self, cidr: crate::network::cidr::Ipv6Cidr) {
        self.network.set_pod_cidr6(cidr, &self.host_ports()).await;
    }
}
