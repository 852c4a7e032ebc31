//! RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox.

use std::collections::{BTreeMap, HashMap};

use crate::cri::v1 as cri;
use tonic::Status;

use super::{Cri, ns_mode};
use crate::network::PortSpec;
use crate::network::nft::Proto;
use crate::sandbox::{
    DnsConfig, IdRange, NsMode, NsModes, PodFilter, PodRecord, PodSecurity, PodSpec, PodState,
    UserNs,
};

fn cri_ns_mode(m: NsMode) -> i32 {
    (match m {
        NsMode::Pod => cri::NamespaceMode::Pod,
        NsMode::Container => cri::NamespaceMode::Container,
        NsMode::Node => cri::NamespaceMode::Node,
        NsMode::Target => cri::NamespaceMode::Target,
    }) as i32
}

fn port(p: &cri::PortMapping) -> Result<PortSpec, Status> {
    let proto = match cri::Protocol::try_from(p.protocol) {
        Ok(cri::Protocol::Tcp) => Proto::Tcp,
        Ok(cri::Protocol::Udp) => Proto::Udp,
        Ok(cri::Protocol::Sctp) => Proto::Sctp,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "port mapping has an unknown protocol {}",
                p.protocol
            )));
        }
    };
    let range = |v: i32, what: &str| {
        u16::try_from(v).map_err(|_| {
            Status::invalid_argument(format!("port mapping {what} {v} is out of range"))
        })
    };
    let host_ip = match p.host_ip.as_str() {
        "" => None,
        s => Some(s.parse::<std::net::IpAddr>().map_err(|_| {
            Status::invalid_argument(format!("port mapping host_ip {s:?} is not an IP address"))
        })?),
    };
    Ok(PortSpec {
        proto,
        container_port: range(p.container_port, "container_port")?,
        host_port: range(p.host_port, "host_port")?,
        host_ip,
    })
}

/// The pod name as hostname, cut to 63 characters as kubelet cuts it (a hostname has 64 at
/// most), without a trailing '-' or '.'.
fn default_hostname(name: &str) -> String {
    let mut h: String = name.chars().take(63).collect();
    while h.ends_with(['-', '.']) {
        h.pop();
    }
    h
}

/// The domain's view of a PodSandboxConfig.
fn pod_spec(c: cri::PodSandboxConfig, runtime_handler: String) -> Result<PodSpec, Status> {
    let md = c
        .metadata
        .ok_or_else(|| Status::invalid_argument("pod sandbox config has no metadata"))?;
    let linux = c.linux.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    let ns = sc.namespace_options.unwrap_or_default();
    let user = user_ns(ns.userns_options.as_ref(), sc.privileged)?;
    if user.is_some()
        && (ns.network == cri::NamespaceMode::Node as i32
            || ns.pid == cri::NamespaceMode::Node as i32
            || ns.ipc == cri::NamespaceMode::Node as i32)
    {
        return Err(Status::invalid_argument(
            "userns_options mode POD cannot be combined with the node's network, PID or IPC \
             namespace (namespace_options)",
        ));
    }
    Ok(PodSpec {
        hostname: if c.hostname.is_empty() {
            default_hostname(&md.name)
        } else {
            c.hostname
        },
        name: md.name,
        uid: md.uid,
        namespace: md.namespace,
        attempt: md.attempt,
        log_directory: c.log_directory,
        dns: c.dns_config.map(|d| DnsConfig {
            servers: d.servers,
            searches: d.searches,
            options: d.options,
        }),
        ports: c.port_mappings.iter().map(port).collect::<Result<_, _>>()?,
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        cgroup_parent: linux.cgroup_parent,
        sysctls: linux.sysctls.into_iter().collect(),
        namespaces: NsModes {
            network: ns_mode(ns.network)?,
            pid: ns_mode(ns.pid)?,
            ipc: ns_mode(ns.ipc)?,
            target_id: ns.target_id,
            user,
        },
        security: PodSecurity {
            privileged: sc.privileged,
            run_as_user: sc.run_as_user.map(|v| v.value),
            run_as_group: sc.run_as_group.map(|v| v.value),
            supplemental_groups: sc.supplemental_groups,
            readonly_rootfs: sc.readonly_rootfs,
        },
        runtime_handler,
    })
}

/// The pod's user namespace from `userns_options`: NODE (or nothing) is none; POD takes
/// exactly one uid and one gid mapping, each mapping container id 0 (as kubelet sends);
/// CONTAINER and TARGET are not modes a pod can have. A mapping onto the node's root (host
/// id 0) is taken only for a privileged pod, which holds the node anyway: for any other, root
/// in the pod would be root of the node. None may reach 4294967295, `(uid_t)-1`.
fn user_ns(u: Option<&cri::UserNamespace>, privileged: bool) -> Result<Option<UserNs>, Status> {
    let Some(u) = u else { return Ok(None) };
    let bad = |m: String| Status::invalid_argument(format!("userns_options: {m}"));
    match cri::NamespaceMode::try_from(u.mode) {
        Ok(cri::NamespaceMode::Node) => {
            if !u.uids.is_empty() || !u.gids.is_empty() {
                return Err(bad("mode NODE takes no uid or gid mappings".into()));
            }
            Ok(None)
        }
        Ok(cri::NamespaceMode::Pod) => {
            let one = |what: &str, m: &[cri::IdMapping]| -> Result<IdRange, Status> {
                let [m] = m else {
                    return Err(bad(format!(
                        "mode POD needs exactly one {what} mapping, got {}",
                        m.len()
                    )));
                };
                if m.container_id != 0 {
                    return Err(bad(format!(
                        "the {what} mapping must map container id 0 (it starts at {})",
                        m.container_id
                    )));
                }
                if m.length == 0 {
                    return Err(bad(format!(
                        "the {what} mapping {}+0 is not a range of ids",
                        m.host_id
                    )));
                }
                if m.host_id.checked_add(m.length).is_none() {
                    return Err(bad(format!(
                        "the {what} mapping {}+{} is not a range of node ids: it reaches \
                         4294967295 ((uid_t)-1)",
                        m.host_id, m.length
                    )));
                }
                if m.host_id == 0 && !privileged {
                    return Err(bad(format!(
                        "the {what} mapping {}+{} maps onto the node's root (host id 0); only a \
                         privileged pod may",
                        m.host_id, m.length
                    )));
                }
                Ok(IdRange {
                    container: m.container_id,
                    host: m.host_id,
                    len: m.length,
                })
            };
            Ok(Some(UserNs {
                uids: one("uid", &u.uids)?,
                gids: one("gid", &u.gids)?,
            }))
        }
        _ => Err(bad(format!(
            "mode {} is not supported for a pod (NODE or POD)",
            cri::NamespaceMode::try_from(u.mode)
                .map(|m| m.as_str_name().to_string())
                .unwrap_or_else(|_| u.mode.to_string())
        ))),
    }
}

/// A pod's status as PodSandboxStatus and GetContainerEvents answer it.
pub(super) fn pod_status(r: &PodRecord) -> cri::PodSandboxStatus {
    let ns = &r.spec.namespaces;
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(metadata(r)),
        state: state(r.state),
        created_at: r.created_at,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: r.ips().first().map(|ip| ip.to_string()).unwrap_or_default(),
            additional_ips: r
                .ips()
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.to_string() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: cri_ns_mode(ns.network),
                    pid: cri_ns_mode(ns.pid),
                    ipc: cri_ns_mode(ns.ipc),
                    target_id: ns.target_id.clone(),
                    userns_options: None,
                }),
            }),
        }),
        labels: map(&r.spec.labels),
        annotations: map(&r.spec.annotations),
        runtime_handler: r.spec.runtime_handler.clone(),
    }
}

fn metadata(r: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.spec.name.clone(),
        uid: r.spec.uid.clone(),
        namespace: r.spec.namespace.clone(),
        attempt: r.spec.attempt,
    }
}

fn state(s: PodState) -> i32 {
    (match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady,
        PodState::Creating | PodState::NotReady => cri::PodSandboxState::SandboxNotready,
    }) as i32
}

fn map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Cri {
    pub(super) async fn run_pod_sandbox(
        &self,
        req: cri::RunPodSandboxRequest,
    ) -> Result<cri::RunPodSandboxResponse, Status> {
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox without a config"))?;
        let spec = pod_spec(config, req.runtime_handler)?;
        let id = self.rt.run_pod(spec).await?;
        tracing::Span::current().record("pod", &id);
        Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
    }

    pub(super) async fn stop_pod_sandbox(
        &self,
        req: cri::StopPodSandboxRequest,
    ) -> Result<cri::StopPodSandboxResponse, Status> {
        tracing::Span::current().record("pod", &req.pod_sandbox_id);
        self.rt.stop_pod(&req.pod_sandbox_id).await?;
        Ok(cri::StopPodSandboxResponse {})
    }

    pub(super) async fn remove_pod_sandbox(
        &self,
        req: cri::RemovePodSandboxRequest,
    ) -> Result<cri::RemovePodSandboxResponse, Status> {
        tracing::Span::current().record("pod", &req.pod_sandbox_id);
        self.rt.remove_pod(&req.pod_sandbox_id).await?;
        Ok(cri::RemovePodSandboxResponse {})
    }

    pub(super) fn pod_sandbox_status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse, Status> {
        tracing::Span::current().record("pod", &req.pod_sandbox_id);
        let pod = self.rt.pods.get(&req.pod_sandbox_id)?;
        let r = pod.record();
        let mut info = HashMap::new();
        if req.verbose {
            let ns_dir = self.rt.pods.ns_dir(&r.id);
            let v = serde_json::json!({
                "record": r,
                "namespacePins": {
                    "net": ns_dir.join("net"), "ipc": ns_dir.join("ipc"),
                    "uts": ns_dir.join("uts"), "pid": ns_dir.join("pid"),
                },
                "podDirectory": self.rt.pods.files_dir(&r.id),
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::PodSandboxStatusResponse {
            status: Some(pod_status(&r)),
            info,
            containers_statuses: Vec::new(),
            timestamp: 0,
        })
    }

    pub(super) fn list_pod_sandbox(
        &self,
        req: cri::ListPodSandboxRequest,
    ) -> Result<cri::ListPodSandboxResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let filter = PodFilter {
            id: Some(f.id).filter(|s| !s.is_empty()),
            state: f.state.map(|s| {
                if s.state == cri::PodSandboxState::SandboxReady as i32 {
                    PodState::Ready
                } else {
                    PodState::NotReady
                }
            }),
            labels: f.label_selector.into_iter().collect(),
        };
        let mut items: Vec<cri::PodSandbox> = self
            .rt
            .pods
            .list(&filter)
            .iter()
            .map(|r| cri::PodSandbox {
                id: r.id.clone(),
                metadata: Some(metadata(r)),
                state: state(r.state),
                created_at: r.created_at,
                labels: map(&r.spec.labels),
                annotations: map(&r.spec.annotations),
                runtime_handler: r.spec.runtime_handler.clone(),
            })
            .collect();
        items.sort_by_key(|p| std::cmp::Reverse(p.created_at));
        Ok(cri::ListPodSandboxResponse { items })
    }
}

impl Cri {
    /// UpdatePodSandboxResources (in-place resize of a pod's own limits). kubelet itself
    /// writes a pod's limits to the pod cgroup it names in `cgroup_parent`, before or after
    /// this call as the resize direction needs; the call tells the runtime, which sizes only
    /// what it owns beyond that cgroup. berth runs no VM or other per-pod machinery to resize,
    /// so it checks the pod and the values and answers; it never writes kubelet's cgroup.
    pub(super) fn update_pod_sandbox_resources(
        &self,
        req: cri::UpdatePodSandboxResourcesRequest,
    ) -> Result<cri::UpdatePodSandboxResourcesResponse, Status> {
        tracing::Span::current().record("pod", &req.pod_sandbox_id);
        let pod = self.rt.pods.get(&req.pod_sandbox_id)?;
        let v2 = self.rt.pods.cgroups.mode != crate::cgroup::Mode::Legacy;
        for (what, r) in [("overhead", &req.overhead), ("resources", &req.resources)] {
            let Some(r) = r else { continue };
            if r.cpu_quota < -1
                || r.cpu_period < 0
                || r.cpu_shares < 0
                || r.memory_limit_in_bytes < 0
            {
                return Err(Status::invalid_argument(format!(
                    "pod {}: {what}: negative values (cpu_quota {}, cpu_period {}, cpu_shares \
                     {}, memory_limit_in_bytes {})",
                    pod.id, r.cpu_quota, r.cpu_period, r.cpu_shares, r.memory_limit_in_bytes
                )));
            }
            if !r.unified.is_empty() && !v2 {
                return Err(Status::invalid_argument(format!(
                    "pod {}: {what}: unified needs a cgroup v2 node; this one is cgroup v1",
                    pod.id
                )));
            }
        }
        tracing::info!(pod = %pod.id, "pod resources updated (kubelet sizes the pod cgroup)");
        Ok(cri::UpdatePodSandboxResourcesResponse {})
    }
}
