//! Pod sandboxes: shared namespaces pinned by bind mounts (no pause image), the pod's files
//! and /dev/shm, its cgroup, its network, and for pods sharing one PID namespace a tiny init.
//!
//! Every pod has a record in `state/pods/<id>/pod.json`, written before any side effect with
//! what will be made (namespace pins, veth name and cgroup directories follow from the id and
//! the config), so an undo can always run: when a step fails, when berthd restarts in the
//! middle of a RunPodSandbox, and for Stop/Remove. Each undo step is safe to run twice.

pub mod files;
pub mod init;
pub mod namespaces;
pub mod sysctl;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroups};
use crate::network::{Network, PodNet, PortSpec};
use crate::runtime::{Error, Result};
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
    /// Its network, while it has one.
    pub net: Option<PodNet>,
    /// The pod init (pid, start time), for PID namespace POD.
    pub init: Option<(i32, u64)>,
    /// The pod's monitor (pid, start time).
    #[serde(default)]
    pub monitor: Option<(i32, u64)>,
    /// Whether it has its own /dev/shm mount.
    pub shm: bool,
}

enum Name {
    Creating(tokio::sync::watch::Receiver<bool>),
    Taken(String),
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
    pods_dir: PathBuf,
    ns_dir: PathBuf,
    pods: RwLock<HashMap<String, Arc<Pod>>>,
    names: Mutex<HashMap<String, Name>>,
    /// The pod network.
    pub network: Arc<Network>,
    /// The host's cgroup hierarchies.
    pub cgroups: Cgroups,
    default_cgroup_parent: String,
    handlers: Vec<String>,
    /// Forks the pods' inits and monitors.
    zygote: crate::zygote::Zygote,
    state_dir: PathBuf,
    /// Cgroup directories berth made (and only these it removes), across pods.
    owned_cgroups: Mutex<std::collections::BTreeSet<PathBuf>>,
    owned_cgroups_file: PathBuf,
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
    move |e| Error::Internal(format!("{what}: {e}"))
}

impl Sandboxes {
    /// Opens the pod store under `state`, starts the network and reconciles what a previous
    /// berthd left: half-made pods are undone, pods whose init died are stopped, leftovers
    /// nothing refers to are removed.
    pub async fn open(
        state: &Path,
        net_cfg: &crate::config::NetworkConfig,
        default_cgroup_parent: &str,
        favor_dynmods: bool,
        handlers: Vec<String>,
    ) -> Result<Arc<Sandboxes>> {
        let pods_dir = state.join("pods");
        let ns_dir = state.join("ns");
        crate::layout::private_dir(&pods_dir).map_err(internal("creating the pods directory"))?;
        namespaces::prepare_pin_root(&ns_dir)
            .map_err(internal("preparing the namespace pin directory"))?;
        let mut records = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&pods_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                match store::read_json::<PodRecord>(&e.path().join("pod.json")) {
                    Ok(Some(r)) if r.id == name => records.push(r),
                    _ => {
                        tracing::warn!(pod = %name, "removing a pod directory without a record");
                        remove_pod_dirs(&e.path(), &ns_dir.join(&name));
                    }
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&ns_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !records.iter().any(|r| r.id == name) {
                    namespaces::unpin_all(&e.path());
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let live_nets: Vec<PodNet> = records
            .iter()
            .filter(|r| r.state == PodState::Ready)
            .filter_map(|r| r.net.clone())
            .collect();
        let network = Arc::new(
            Network::start(net_cfg, state, &live_nets)
                .await
                .map_err(Error::Internal)?,
        );
        let cgroups = Cgroups::detect();
        if favor_dynmods {
            match cgroups.favor_dynmods() {
                Ok(()) => tracing::info!(
                    "cgroup2 hierarchy uses favordynmods: task migrations skip an RCU grace period"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot enable favordynmods"),
            }
        }
        let s = Arc::new(Sandboxes {
            pods_dir,
            ns_dir,
            pods: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            network,
            cgroups,
            default_cgroup_parent: default_cgroup_parent.to_string(),
            handlers,
            zygote: crate::zygote::Zygote::default(),
            state_dir: state.to_owned(),
            owned_cgroups: Mutex::new(
                store::read_json(&state.join("cgroups.json"))
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            ),
            owned_cgroups_file: state.join("cgroups.json"),
        });
        for mut r in records {
            match r.state {
                PodState::Creating => {
                    tracing::info!(pod = %r.id, "undoing a pod whose creation was interrupted");
                    s.undo(&mut r).await;
                    continue;
                }
                PodState::Ready => {
                    let dead = |p: Option<(i32, u64)>| {
                        p.is_some_and(|(pid, start)| init::start_time(pid) != Some(start))
                    };
                    if dead(r.init) || dead(r.monitor) {
                        tracing::info!(pod = %r.id, "the pod's init or monitor is gone: stopping the pod");
                        s.teardown(&mut r).await;
                        r.state = PodState::NotReady;
                        let _ = s.persist(&r);
                    }
                }
                PodState::NotReady => s.teardown(&mut r).await,
            }
            s.names
                .lock()
                .expect("names poisoned")
                .insert(r.spec.name_key(), Name::Taken(r.id.clone()));
            let pod = Arc::new(Pod {
                id: r.id.clone(),
                record: RwLock::new(r),
                op: tokio::sync::Mutex::new(()),
            });
            s.pods
                .write()
                .expect("pods poisoned")
                .insert(pod.id.clone(), pod);
        }
        let live: Vec<String> = s
            .pods
            .read()
            .expect("pods poisoned")
            .values()
            .filter(|p| p.state() == PodState::Ready)
            .map(|p| p.id.clone())
            .collect();
        s.network.reconcile(&live).await;
        // Cgroup directories berth made for pods that are gone.
        let owned: Vec<PathBuf> = s
            .owned_cgroups
            .lock()
            .expect("cgroup ownership poisoned")
            .iter()
            .cloned()
            .collect();
        let in_use: Vec<PathBuf> = s
            .pods
            .read()
            .expect("pods poisoned")
            .values()
            .flat_map(|p| s.cgroups.lineage(&p.record().cgroup))
            .collect();
        let mut dead: Vec<PathBuf> = owned.into_iter().filter(|d| !in_use.contains(d)).collect();
        dead.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        {
            let mut o = s.owned_cgroups.lock().expect("cgroup ownership poisoned");
            for d in dead {
                if let Ok(true) = cgroup::remove_dir(&d) {
                    o.remove(&d);
                }
            }
            let _ = store::write_json_volatile(&s.owned_cgroups_file, &*o);
        }
        Ok(s)
    }

    fn pod_dir(&self, id: &str) -> PathBuf {
        self.pods_dir.join(id)
    }

    /// Where the pins of a pod's namespaces live.
    pub fn ns_dir(&self, id: &str) -> PathBuf {
        self.ns_dir.join(id)
    }

    fn persist(&self, r: &PodRecord) -> Result<()> {
        store::write_json_volatile(&self.pod_dir(&r.id).join("pod.json"), r)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Checks what can be checked before anything is made.
    fn validate(&self, spec: &PodSpec) -> Result<()> {
        if spec.name.is_empty() || spec.uid.is_empty() || spec.namespace.is_empty() {
            return Err(Error::InvalidArgument(
                "pod metadata needs a name, a uid and a namespace".into(),
            ));
        }
        if !spec.runtime_handler.is_empty() {
            return Err(Error::InvalidArgument(
                if self.handlers.contains(&spec.runtime_handler) {
                    format!(
                        "runtime handler {:?} is configured, but running pods with OCI runtime \
                         binaries is not implemented yet: berth runs only its embedded runtime \
                         (handler \"\")",
                        spec.runtime_handler
                    )
                } else {
                    format!(
                        "unknown runtime handler {:?}: berth serves only its embedded runtime \
                         (handler \"\")",
                        spec.runtime_handler
                    )
                },
            ));
        }
        // The hostname and DNS settings become lines of /etc/hosts and /etc/resolv.conf: a
        // newline or a space in one would add lines of the caller's choosing.
        if spec.hostname.is_empty()
            || spec.hostname.len() > 64
            || spec
                .hostname
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidArgument(format!(
                "hostname {:?} must be 1-64 characters without '/', whitespace or control \
                 characters",
                spec.hostname
            )));
        }
        if let Some(dns) = &spec.dns {
            for (what, v) in dns
                .servers
                .iter()
                .map(|v| ("server", v))
                .chain(dns.searches.iter().map(|v| ("search", v)))
                .chain(dns.options.iter().map(|v| ("option", v)))
            {
                if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(Error::InvalidArgument(format!(
                        "dns_config {what} {v:?} must be non-empty, without whitespace or \
                         control characters"
                    )));
                }
            }
        }
        if spec.namespaces.network == NsMode::Target || spec.namespaces.ipc == NsMode::Target {
            return Err(Error::InvalidArgument(
                "network and IPC namespaces cannot be TARGET".into(),
            ));
        }
        if !spec.cgroup_parent.is_empty() {
            cgroup::relative(&spec.cgroup_parent)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        }
        for (k, v) in &spec.sysctls {
            let s = sysctl::parse(k).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let host = match s.owner {
                sysctl::Owner::Net => spec.host_network(),
                sysctl::Owner::Ipc => spec.namespaces.ipc == NsMode::Node,
            };
            if host {
                return Err(Error::InvalidArgument(format!(
                    "sysctl {k} is not allowed: the pod uses the node's {} namespace",
                    s.owner
                )));
            }
            if v.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "sysctl {k}: the value holds a NUL"
                )));
            }
        }
        let mut seen = Vec::new();
        for p in &spec.ports {
            if p.container_port == 0 {
                return Err(Error::InvalidArgument(format!(
                    "port mapping {p:?} has no container port"
                )));
            }
            if p.host_port != 0 {
                let key = (p.proto, p.host_ip, p.host_port);
                if seen.contains(&key) {
                    return Err(Error::InvalidArgument(format!(
                        "host port {}/{} is mapped twice in this pod",
                        p.host_port, p.proto
                    )));
                }
                seen.push(key);
            }
        }
        Ok(())
    }

    /// RunPodSandbox: returns the new pod's id. A call whose client goes away still finishes
    /// (in the background), so a retry meets a finished pod or a released name, never a name
    /// reserved forever.
    pub async fn run(self: &Arc<Self>, spec: PodSpec) -> Result<String> {
        self.validate(&spec)?;
        let key = spec.name_key();
        let (tx, rx) = tokio::sync::watch::channel(false);
        loop {
            let wait = {
                let mut names = self.names.lock().expect("names poisoned");
                match names.get(&key) {
                    Some(Name::Taken(id)) => {
                        return Err(Error::AlreadyExists(format!(
                            "pod sandbox name {key} is reserved by sandbox {id}"
                        )));
                    }
                    Some(Name::Creating(w)) => Some(w.clone()),
                    None => {
                        names.insert(key.clone(), Name::Creating(rx.clone()));
                        None
                    }
                }
            };
            match wait {
                Some(mut w) => {
                    let _ = w.changed().await;
                }
                None => break,
            }
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let id = new_id();
            let r = this.create(&id, spec).await;
            {
                let mut names = this.names.lock().expect("names poisoned");
                match &r {
                    Ok(()) => names.insert(key, Name::Taken(id.clone())),
                    Err(_) => names.remove(&key),
                };
            }
            let _ = tx.send(true);
            r.map(|()| id)
        });
        task.await
            .map_err(|e| Error::Internal(format!("pod creation task failed: {e}")))?
    }

    async fn create(&self, id: &str, spec: PodSpec) -> Result<()> {
        let parent = if spec.cgroup_parent.is_empty() {
            format!("{}/{id}", self.default_cgroup_parent)
        } else {
            spec.cgroup_parent.clone()
        };
        let cgroup_rel =
            cgroup::relative(&parent).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut rec = PodRecord {
            id: id.to_string(),
            state: PodState::Creating,
            created_at: now_ns(),
            cgroup: cgroup_rel.clone(),
            net: None,
            init: None,
            monitor: None,
            shm: false,
            spec,
        };
        let dir = self.pod_dir(id);
        crate::layout::private_dir(&dir).map_err(internal("creating the pod directory"))?;
        // Recorded before anything else is made: a restart can undo from here on.
        if let Err(e) = self.persist(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let r = self.make(&mut rec).await;
        match r {
            Ok(launched) => {
                rec.state = PodState::Ready;
                if let Err(e) = self.persist(&rec) {
                    self.undo(&mut rec).await;
                    return Err(e);
                }
                if let Some(l) = launched {
                    l.confirm();
                }
                tracing::info!(pod = %id, name = %rec.spec.name, namespace = %rec.spec.namespace, ip = ?rec.net.as_ref().map(|n| n.ip), "pod sandbox ready");
                let pod = Arc::new(Pod {
                    id: id.to_string(),
                    record: RwLock::new(rec),
                    op: tokio::sync::Mutex::new(()),
                });
                self.pods
                    .write()
                    .expect("pods poisoned")
                    .insert(id.to_string(), pod);
                Ok(())
            }
            Err(e) => {
                tracing::info!(pod = %id, error = %e, "pod sandbox creation failed; undoing");
                self.undo(&mut rec).await;
                Err(e)
            }
        }
    }

    /// The steps of RunPodSandbox. On error the caller undoes from `rec`.
    async fn make(&self, rec: &mut PodRecord) -> Result<Option<init::Launched>> {
        let id = rec.id.clone();
        let spec = rec.spec.clone();
        let dir = self.pod_dir(&id);

        self.make_cgroup(&rec.cgroup)?;

        // Namespaces, hostname and sysctls.
        let want = namespaces::Wanted {
            net: !spec.host_network(),
            ipc: spec.namespaces.ipc != NsMode::Node,
            uts: !spec.host_network(),
        };
        let ns_dir = self.ns_dir(&id);
        crate::layout::private_dir(&ns_dir)
            .map_err(internal("creating the namespace pin directory"))?;
        let sysctls: Vec<(String, String)> = spec
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let made = namespaces::create(&ns_dir, want, &spec.hostname, &sysctls)
            .await
            .map_err(|e| {
                if e.invalid {
                    Error::InvalidArgument(format!("pod namespaces: {e}"))
                } else {
                    Error::Internal(format!("pod namespaces: {e}"))
                }
            })?;

        // /dev/shm of its own unless it shares the node's IPC namespace.
        if want.ipc {
            files::mount_shm(&dir.join("shm"))
                .map_err(|e| Error::Internal(format!("mounting the pod's /dev/shm: {e}")))?;
            rec.shm = true;
        }

        // Network.
        if let (Some(netns), Some(handle)) = (&made.netns, &made.net_handle) {
            let net = self
                .network
                .attach(&id, netns.as_fd(), handle, &spec.ports)
                .await
                .map_err(|e| match &e {
                    crate::network::NetError::Ipam(crate::network::ipam::IpamError::Exhausted(
                        _,
                    )) => Error::ResourceExhausted(e.to_string()),
                    crate::network::NetError::HostPorts(n) if n.conflict => {
                        Error::FailedPrecondition(format!(
                            "{e} (a host port of this pod is already mapped to another pod)"
                        ))
                    }
                    crate::network::NetError::Bridge(_) => Error::Unavailable(e.to_string()),
                    _ => Error::Internal(e.to_string()),
                })?;
            rec.net = Some(net);
        }
        drop(made);

        // Files.
        let hostname = if spec.host_network() {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| spec.hostname.clone())
        } else {
            spec.hostname.clone()
        };
        files::write_all(
            &dir,
            &hostname,
            rec.net.as_ref().map(|n| n.ip),
            spec.dns.as_ref(),
        )
        .map_err(internal(
            "writing the pod's hostname, hosts and resolv.conf",
        ))?;

        // The monitor that will hold the pod's containers (it exits by itself unless berthd
        // greets it within a minute, so a crash before the record is written leaks nothing).
        let socket = crate::container::monitor_socket(&self.state_dir, &id);
        let pid = self
            .zygote
            .spawn(crate::zygote::Request::Monitor {
                pod_id: id.clone(),
                socket: socket.to_string_lossy().into_owned(),
                lc_root: crate::container::lc_root(&self.state_dir)
                    .to_string_lossy()
                    .into_owned(),
            })
            .await
            .map_err(internal("starting the pod's monitor"))?;
        let start = init::start_time(pid)
            .ok_or_else(|| Error::Internal("the pod's monitor died at once".into()))?;
        rec.monitor = Some((pid, start));
        self.persist(rec)?;

        // The infra init, for a PID namespace shared by the pod.
        let mut launched = None;
        if spec.namespaces.pid == NsMode::Pod {
            // The init joins the namespaces the pod has of its own, so nothing it holds is
            // the node's.
            let pins = [("net", want.net), ("ipc", want.ipc), ("uts", want.uts)]
                .into_iter()
                .filter(|(_, own)| *own)
                .map(|(kind, _)| (kind.to_string(), namespaces::pin_path(&ns_dir, kind)))
                .collect();
            let l = init::launch(&self.zygote, &id, pins)
                .await
                .map_err(internal("starting the pod's init"))?;
            rec.init = Some((l.pid, l.start_time));
            self.persist(rec)?;
            self.cgroups.add_process(&rec.cgroup, l.pid).map_err(|e| {
                Error::Internal(format!("moving the pod's init into its cgroup: {e}"))
            })?;
            namespaces::pin(
                &format!("/proc/{}/ns/pid", l.pid),
                &namespaces::pin_path(&ns_dir, "pid"),
            )
            .map_err(|e| Error::Internal(format!("pinning the pod's PID namespace: {e}")))?;
            launched = Some(l);
        }
        Ok(launched)
    }

    /// Stops what runs and what connects the pod: its init, its hostPorts, its network
    /// namespace (the kernel frees it, and the veth in it, in its own time; the address is
    /// released once the veth is gone). Idempotent.
    async fn teardown(&self, rec: &mut PodRecord) {
        if let Some((pid, start)) = rec.init.take() {
            init::kill(pid, start).await;
        }
        if rec.net.is_some() || rec.state != PodState::NotReady {
            self.network.detach(&rec.id, rec.net.as_ref()).await;
        }
        rec.net = None;
        namespaces::unpin(&namespaces::pin_path(&self.ns_dir(&rec.id), "net"));
    }

    /// Undoes everything of a pod that failed to come up.
    async fn undo(&self, rec: &mut PodRecord) {
        self.teardown(rec).await;
        self.network.released(&rec.id).await;
        self.remove_resources(rec);
    }

    /// Removes what remains of a stopped pod: pins, /dev/shm, cgroup, directories, record.
    fn remove_resources(&self, rec: &PodRecord) {
        if let Some((pid, start)) = rec.monitor {
            init::kill_now(pid, start);
        }
        let _ = std::fs::remove_file(crate::container::monitor_socket(&self.state_dir, &rec.id));
        files::unmount_shm(&self.pod_dir(&rec.id).join("shm"));
        self.release_cgroup(&rec.cgroup);
        remove_pod_dirs(&self.pod_dir(&rec.id), &self.ns_dir(&rec.id));
    }

    /// Makes the pod's cgroup. The directories that did not exist are recorded as berth's
    /// before they are made: only those are ever removed (kubelet owns the ones it made), and
    /// a directory several pods share goes with the last of them.
    fn make_cgroup(&self, rel: &Path) -> Result<()> {
        let mut owned = self
            .owned_cgroups
            .lock()
            .expect("cgroup ownership poisoned");
        let missing = self.cgroups.missing(rel);
        if !missing.is_empty() {
            owned.extend(missing);
            store::write_json_volatile(&self.owned_cgroups_file, &*owned)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        self.cgroups
            .create(rel)
            .map_err(|e| Error::Internal(format!("creating the pod cgroup: {e}")))
    }

    /// Removes the berth-made directories of a pod's cgroup that nothing uses any more.
    fn release_cgroup(&self, rel: &Path) {
        let mut owned = self
            .owned_cgroups
            .lock()
            .expect("cgroup ownership poisoned");
        let before = owned.len();
        for d in self.cgroups.lineage(rel) {
            if !owned.contains(&d) {
                continue;
            }
            // The pod's own directory may still hold container cgroups a crashed berthd never
            // removed; its ancestors are shared and are only removed when already empty.
            let removed = if d.ends_with(rel) {
                cgroup::remove_tree(&d)
            } else {
                cgroup::remove_dir(&d)
            };
            match removed {
                Ok(true) => {
                    owned.remove(&d);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(cgroup = %d.display(), error = %e, "could not remove cgroup")
                }
            }
        }
        if owned.len() != before
            && let Err(e) = store::write_json_volatile(&self.owned_cgroups_file, &*owned)
        {
            tracing::warn!(error = %e, "recording cgroup ownership");
        }
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

    /// StopPodSandbox (after the pod's containers were stopped). Unknown or stopped: fine.
    pub async fn stop(&self, id: &str) -> Result<()> {
        let Some(pod) = crate::runtime::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = pod.lock().await;
        let mut rec = pod.record();
        if rec.state == PodState::NotReady {
            return Ok(());
        }
        self.teardown(&mut rec).await;
        rec.state = PodState::NotReady;
        self.persist(&rec)?;
        *pod.record.write().expect("pod record poisoned") = rec;
        tracing::info!(pod = %pod.id, "pod sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox (after its containers were removed). Unknown: fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(pod) = crate::runtime::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = pod.lock().await;
        let mut rec = pod.record();
        if rec.state != PodState::NotReady {
            self.teardown(&mut rec).await;
        }
        // The address comes free once the kernel has destroyed the namespace and its veth: in
        // the background, not on the caller's path.
        self.remove_resources(&rec);
        self.pods.write().expect("pods poisoned").remove(&pod.id);
        let mut names = self.names.lock().expect("names poisoned");
        if matches!(names.get(&rec.spec.name_key()), Some(Name::Taken(t)) if *t == pod.id) {
            names.remove(&rec.spec.name_key());
        }
        tracing::info!(pod = %pod.id, "pod sandbox removed");
        Ok(())
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
        self.get(id).ok()?.record().net.map(|n| n.ip)
    }

    /// Applies kubelet's pod CIDR to the network.
    pub async fn set_pod_cidr(&self, cidr: crate::network::cidr::Ipv4Cidr) {
        let ports: Vec<crate::network::nft::HostPort> = self
            .pods
            .read()
            .expect("pods poisoned")
            .values()
            .filter_map(|p| p.record().net)
            .flat_map(|n| n.host_ports)
            .collect();
        self.network.set_pod_cidr(cidr, &ports).await;
    }
}

/// Removes a pod's directory (unmounting what could be mounted there) and its pin directory.
fn remove_pod_dirs(pod_dir: &Path, ns_dir: &Path) {
    files::unmount_shm(&pod_dir.join("shm"));
    namespaces::unpin_all(ns_dir);
    let _ = std::fs::remove_dir(ns_dir);
    if let Err(e) = std::fs::remove_dir_all(pod_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %pod_dir.display(), error = %e, "could not remove the pod directory");
    }
}
