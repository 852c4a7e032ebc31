//! RunPodSandbox: the request checked before anything is made, the name reserved (a retry
//! after a client timeout waits for the first attempt instead of failing), the record written,
//! then each step of making the pod. A failed step undoes everything made before it.

use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};

use super::{
    NsMode, Pod, PodRecord, PodSpec, PodState, Sandboxes, files, init, internal, namespaces,
    new_id, now_ns, sysctl,
};
use crate::error::{Error, Result};
use crate::network::PodNet;
use crate::reservations::Reserved;

impl Sandboxes {
    /// Checks what can be checked before anything is made.
    fn validate(&self, spec: &PodSpec) -> Result<()> {
        if spec.name.is_empty() || spec.uid.is_empty() || spec.namespace.is_empty() {
            return Err(Error::InvalidArgument(
                "pod metadata needs a name, a uid and a namespace".into(),
            ));
        }
        let Some(handler) = self.handlers.get(&spec.runtime_handler) else {
            let known: Vec<String> = self
                .handlers
                .all()
                .iter()
                .map(|h| format!("{:?}", h.name))
                .collect();
            return Err(Error::InvalidArgument(format!(
                "unknown runtime handler {:?}: berth serves {}",
                spec.runtime_handler,
                known.join(", ")
            )));
        };
        if spec.namespaces.user.is_some() {
            self.check_traversable_for_userns()?;
        }
        if spec.namespaces.user.is_some() && !handler.features.user_namespaces {
            return Err(Error::InvalidArgument(format!(
                "runtime handler {:?} ({}) cannot run pods with a user namespace of their own: \
                 it has no idmapped mounts",
                spec.runtime_handler, handler.version
            )));
        }
        validate_names(spec)?;
        if spec.namespaces.network == NsMode::Target || spec.namespaces.ipc == NsMode::Target {
            return Err(Error::InvalidArgument(
                "network and IPC namespaces cannot be TARGET".into(),
            ));
        }
        if !spec.cgroup_parent.is_empty() {
            self.cgroups
                .pod_cgroup(&spec.cgroup_parent)
                .map_err(Error::InvalidArgument)?;
        }
        validate_sysctls(spec)?;
        validate_ports(spec)?;
        let own = self.own_endpoints.lock().unwrap_or_else(|e| e.into_inner());
        not_over_own_endpoints(spec, &own)
    }

    /// RunPodSandbox: returns the new pod's id. A call whose client goes away still finishes
    /// (in the background): a retry of it claims the finished pod, and a pod nobody claims
    /// within the unclaimed timeout is removed. A name is never reserved forever.
    pub async fn run(self: &Arc<Self>, spec: PodSpec) -> Result<String> {
        self.validate(&spec)?;
        let key = spec.name_key();
        let ticket = match self.names.reserve(&key).await {
            Reserved::Mine(t) => t,
            Reserved::Claimed(id) => {
                tracing::info!(pod = %id, "a retried RunPodSandbox claims the pod its caller left");
                return Ok(id);
            }
            Reserved::Taken(id) => {
                return Err(Error::AlreadyExists(format!(
                    "pod sandbox name {key} is reserved by sandbox {id}"
                )));
            }
        };
        crate::reservations::make_detached(
            self.clone(),
            |s| &s.names,
            ticket,
            self.unclaimed_timeout,
            |this| async move {
                let id = new_id();
                this.create(&id, spec).await.map(|()| id)
            },
            |this, id| async move {
                let _ = this.stop(&id).await;
                if let Err(e) = this.remove(&id).await {
                    tracing::warn!(pod = %id, error = %e, "removing an unclaimed pod");
                }
            },
        )
        .await
        .unwrap_or_else(|| Err(Error::Internal("the pod creation task failed".into())))
    }

    /// A call that knows the pod's id used it (a container is made in it): it is claimed.
    pub fn claim(&self, pod: &Pod) {
        // The key only: no copy of the whole record on every CreateContainer.
        let key = pod
            .record
            .read()
            .expect("pod record poisoned")
            .spec
            .name_key();
        self.names.claim(&key, &pod.id);
    }

    async fn create(&self, id: &str, spec: PodSpec) -> Result<()> {
        let parent = if spec.cgroup_parent.is_empty() {
            self.cgroups.default_parent(&self.default_cgroup_parent, id)
        } else {
            spec.cgroup_parent.clone()
        };
        let cgroup_rel = self
            .cgroups
            .pod_cgroup(&parent)
            .map_err(Error::InvalidArgument)?;
        let mut rec = PodRecord {
            id: id.to_string(),
            state: PodState::Creating,
            created_at: now_ns(),
            cgroup: cgroup_rel.clone(),
            net: None,
            cni: None,
            init: None,
            monitor: None,
            shm: false,
            spec,
        };
        let dir = self.pod_dir(id);
        crate::layout::private_dir(&dir).map_err(internal("creating the pod directory"))?;
        if let Some(u) = rec.spec.namespaces.user {
            crate::layout::hand_to(&dir, u.uids.host, u.gids.host)
                .map_err(internal("handing the pod directory to the pod's root"))?;
        }
        // Recorded before anything else is made: a restart can undo from here on.
        if let Err(e) = self.persist(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        crate::failpoint::hit("run:recorded").await;
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
                tracing::info!(pod = %id, name = %rec.spec.name, namespace = %rec.spec.namespace, ips = ?rec.ips(), "pod sandbox ready");
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

    /// The steps of RunPodSandbox, in order; each records what it made in `rec` (and `rec` is
    /// persisted where a later step could be interrupted), so `undo` can take back exactly
    /// what exists. On error the caller undoes from `rec`.
    async fn make(&self, rec: &mut PodRecord) -> Result<Option<init::Launched>> {
        self.make_cgroup(rec)?;
        crate::failpoint::hit("run:cgroup").await;
        let (made, want) = self.make_namespaces(rec).await?;
        crate::failpoint::hit("run:namespaces").await;
        // /dev/shm of its own unless it shares the node's IPC namespace.
        if want.ipc {
            files::mount_shm(&self.pod_dir(&rec.id).join("shm"))
                .map_err(|e| Error::Internal(format!("mounting the pod's /dev/shm: {e}")))?;
            rec.shm = true;
        }
        if let (Some(netns), Some(handle)) = (&made.netns, &made.net_handle) {
            if self.network.is_cni() {
                rec.cni = Some(self.attach_cni(rec, handle).await?);
            } else {
                rec.net = Some(self.attach_network(rec, netns.as_fd(), handle).await?);
            }
            crate::failpoint::hit("run:network").await;
        }
        drop(made);
        self.write_files(rec)?;
        self.start_monitor(rec).await?;
        crate::failpoint::hit("run:monitor").await;
        if rec.spec.namespaces.pid == NsMode::Pod {
            return self.start_init(rec, want).await.map(Some);
        }
        Ok(None)
    }

    /// The pod's network, IPC and UTS namespaces (as it has them of its own), pinned, with
    /// its hostname and sysctls set inside.
    async fn make_namespaces(
        &self,
        rec: &PodRecord,
    ) -> Result<(namespaces::Made, namespaces::Wanted)> {
        let spec = &rec.spec;
        let want = namespaces::Wanted {
            user: spec.namespaces.user,
            net: !spec.host_network(),
            ipc: spec.namespaces.ipc != NsMode::Node,
            uts: !spec.host_network(),
        };
        let ns_dir = self.ns_dir(&rec.id);
        crate::layout::private_dir(&ns_dir)
            .map_err(internal("creating the namespace pin directory"))?;
        if let Some(u) = spec.namespaces.user {
            crate::layout::hand_to(&ns_dir, u.uids.host, u.gids.host)
                .map_err(internal("handing the namespace pins to the pod's root"))?;
        }
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
        Ok((made, want))
    }

    /// The veth pair, address, routes and hostPorts of the pod.
    async fn attach_network(
        &self,
        rec: &PodRecord,
        netns: std::os::fd::BorrowedFd<'_>,
        handle: &rtnetlink::Handle,
    ) -> Result<PodNet> {
        use crate::network::NetError;
        self.network
            .attach(&rec.id, netns, handle, &rec.spec.ports)
            .await
            .map_err(|e| match &e {
                NetError::Ipam(crate::network::ipam::IpamError::Exhausted(_)) => {
                    Error::ResourceExhausted(e.to_string())
                }
                NetError::HostPorts(n) if n.conflict => Error::FailedPrecondition(format!(
                    "{e} (a host port of this pod is already mapped to another pod)"
                )),
                NetError::Bridge(_) => Error::Unavailable(e.to_string()),
                NetError::Invalid(_) => Error::InvalidArgument(e.to_string()),
                _ => Error::Internal(e.to_string()),
            })
    }

    /// The pod attached by the cluster's CNI plugins (its loopback by berth).
    async fn attach_cni(
        &self,
        rec: &PodRecord,
        handle: &rtnetlink::Handle,
    ) -> Result<crate::network::cni::CniNet> {
        use crate::network::NetError;
        use crate::network::cni::{CniError, PodAttach};
        let s = &rec.spec;
        let attach = PodAttach {
            pod_id: rec.id.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            uid: s.uid.clone(),
            netns: namespaces::pin_path(&self.ns_dir(&rec.id), "net"),
            ports: s
                .ports
                .iter()
                .filter(|p| p.host_port != 0)
                .map(|p| crate::network::cni::PortMapping {
                    host_port: p.host_port,
                    container_port: p.container_port,
                    protocol: p.proto.name(),
                    host_ip: p.host_ip,
                })
                .collect(),
            annotations: s.annotations.clone(),
            dns: s
                .dns
                .as_ref()
                .map(|d| (d.servers.clone(), d.searches.clone(), d.options.clone())),
        };
        self.network
            .attach_cni(handle, &attach)
            .await
            .map_err(|e| match &e {
                NetError::Cni(CniError::Invalid(_)) => Error::InvalidArgument(e.to_string()),
                NetError::Cni(CniError::NotReady(_)) => Error::FailedPrecondition(e.to_string()),
                _ => Error::Internal(e.to_string()),
            })
    }

    /// /etc/hostname, /etc/hosts and /etc/resolv.conf of the pod's containers.
    fn write_files(&self, rec: &PodRecord) -> Result<()> {
        let spec = &rec.spec;
        let hostname = if spec.host_network() {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| spec.hostname.clone())
        } else {
            spec.hostname.clone()
        };
        files::write_all(
            &self.pod_dir(&rec.id),
            &hostname,
            rec.ipv4(),
            spec.dns.as_ref(),
        )
        .map_err(internal(
            "writing the pod's hostname, hosts and resolv.conf",
        ))
    }

    /// The monitor that will hold the pod's containers (it exits by itself unless berthd
    /// greets it within a minute, so a crash before the record is written leaks nothing).
    async fn start_monitor(&self, rec: &mut PodRecord) -> Result<()> {
        let socket = self.layout.monitor_socket(&rec.id);
        let pid = self
            .zygote
            .spawn(crate::zygote::Request::Monitor {
                pod_id: rec.id.clone(),
                socket: socket.to_string_lossy().into_owned(),
                lc_root: self.layout.lc_root().to_string_lossy().into_owned(),
            })
            .await
            .map_err(internal("starting the pod's monitor"))?;
        let start = init::start_time(pid)
            .ok_or_else(|| Error::Internal("the pod's monitor died at once".into()))?;
        rec.monitor = Some((pid, start));
        self.persist(rec)
    }

    /// The infra init of a PID namespace shared by the pod: in the pod's cgroup, its PID
    /// namespace pinned. It joins the namespaces the pod has of its own, so nothing it holds
    /// is the node's.
    async fn start_init(
        &self,
        rec: &mut PodRecord,
        want: namespaces::Wanted,
    ) -> Result<init::Launched> {
        let ns_dir = self.ns_dir(&rec.id);
        let mut pins: Vec<(String, std::path::PathBuf)> =
            [("net", want.net), ("ipc", want.ipc), ("uts", want.uts)]
                .into_iter()
                .filter(|(_, own)| *own)
                .map(|(kind, _)| (kind.to_string(), namespaces::pin_path(&ns_dir, kind)))
                .collect();
        // A pod with a user namespace of its own gets a PID namespace owned by it (its
        // containers mount /proc there); the init takes an id the namespace maps.
        if let Some(u) = rec.spec.namespaces.user {
            let id =
                crate::zygote::pod_init::INIT_ID.min(u.uids.len.min(u.gids.len).saturating_sub(1));
            pins.push(("user".into(), namespaces::pin_path(&ns_dir, "user")));
            pins.push(("init-id".into(), id.to_string().into()));
        }
        let l = init::launch(&self.zygote, &rec.id, pins)
            .await
            .map_err(internal("starting the pod's init"))?;
        rec.init = Some((l.pid, l.start_time));
        self.persist(rec)?;
        self.cgroups
            .place_init(&rec.cgroup, &rec.id, l.pid)
            .map_err(|e| Error::Internal(format!("moving the pod's init into its cgroup: {e}")))?;
        namespaces::pin(
            &format!("/proc/{}/ns/pid", l.pid),
            &namespaces::pin_path(&ns_dir, "pid"),
        )
        .map_err(|e| Error::Internal(format!("pinning the pod's PID namespace: {e}")))?;
        Ok(l)
    }

    /// Makes the pod's cgroup (see `cgroups::PodCgroups` for who owns which directory).
    fn make_cgroup(&self, rec: &PodRecord) -> Result<()> {
        self.pod_cgroups
            .make(&self.cgroups, &rec.id, &rec.cgroup)
            .map_err(Error::Internal)
    }
}

impl Sandboxes {
    /// The runtime opens the pod's namespace pins and its containers' files as the pod's root,
    /// a node id of no privilege: every directory above the state directory must let others
    /// through, or every container of a user-namespaced pod would fail with EACCES.
    fn check_traversable_for_userns(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let state = self.layout.pods();
        for dir in state.ancestors().skip(1) {
            let Ok(m) = std::fs::metadata(dir) else {
                continue;
            };
            if m.permissions().mode() & 0o001 == 0 {
                return Err(Error::FailedPrecondition(format!(
                    "pods with a user namespace of their own need every directory above berth's \
                     state directory to be searchable by others, and {} is mode {:o}",
                    dir.display(),
                    m.permissions().mode() & 0o7777
                )));
            }
        }
        Ok(())
    }
}

/// The hostname and DNS settings become lines of /etc/hosts and /etc/resolv.conf: a newline
/// or a space in one would add lines of the caller's choosing.
fn validate_names(spec: &PodSpec) -> Result<()> {
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
    Ok(())
}

/// Each sysctl is namespaced, and the pod has that namespace of its own.
fn validate_sysctls(spec: &PodSpec) -> Result<()> {
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
    Ok(())
}

/// A TCP hostPort that would take connections meant for berthd's own streaming or metrics
/// server is refused: kubelet's stream proxy would hand exec tokens and users' stdin to the
/// pod. An address matches when it is the same, or either side is unspecified (all addresses).
fn not_over_own_endpoints(spec: &PodSpec, own: &[std::net::SocketAddr]) -> Result<()> {
    use crate::network::nft::Proto;
    for p in spec.ports.iter().filter(|p| p.proto == Proto::Tcp) {
        let host_ip = p.host_ip.filter(|a| !a.is_unspecified());
        let hit = own.iter().find(|e| {
            e.port() == p.host_port
                && (e.ip().is_unspecified() || host_ip.is_none_or(|ip| ip == e.ip()))
        });
        if let Some(e) = hit {
            return Err(Error::InvalidArgument(format!(
                "host port {}/tcp{} would shadow berthd's own server at {e}",
                p.host_port,
                host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// Port mappings name a container port; no host port is mapped twice.
fn validate_ports(spec: &PodSpec) -> Result<()> {
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
