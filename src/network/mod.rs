//! The pod network: built in (a bridge, a veth pair per pod, host-local IPAM and nftables NAT),
//! or in CNI mode the cluster's plugins (`cni`).
//!
//! berthd sets the bridge up when it starts (creating it if missing). A failure there does not
//! stop berthd: NetworkReady reports it, host-network pods still run, and every pod network
//! attach tries the bridge again, so fixing the cause heals the node without a restart.

pub mod cidr;
pub mod cni;
mod config;
pub mod ipam;
pub mod netlink;
pub mod nft;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use cidr::{Ipv4Cidr, Ipv6Cidr};
pub use config::{CniConfig, NetworkConfig, NetworkMode};
use ipam::{Ipam, IpamError};
use netlink::NetlinkError;
use nft::{HostPort, Nft, NftError, Proto};

/// Whether `name` is acceptable to the kernel as an interface name.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// A pod's port mapping as requested (before it has an address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The protocol.
    pub proto: Proto,
    /// The pod's port.
    pub container_port: u16,
    /// The node's port (0: no mapping on the node).
    pub host_port: u16,
    /// Only this node address, if given (its family picks the pod address it maps to).
    pub host_ip: Option<IpAddr>,
}

/// What a pod's network is made of, recorded with the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNet {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The default gateway (the bridge).
    pub gateway: Ipv4Addr,
    /// The host end of the veth pair.
    pub veth: String,
    /// The hostPorts mapped to it.
    pub host_ports: Vec<HostPort>,
    /// Its IPv6 address, prefix length and gateway, on a dual-stack node.
    #[serde(default)]
    pub ip6: Option<(Ipv6Addr, u8, Ipv6Addr)>,
}

/// Why a pod's network could not be set up, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The bridge is not usable.
    #[error("network setup: {0}")]
    Bridge(NetlinkError),
    /// No address left.
    #[error("network setup: {0}")]
    Ipam(#[from] IpamError),
    /// Creating or configuring the veth pair failed.
    #[error("network setup: {0}")]
    Link(NetlinkError),
    /// The hostPorts could not be added.
    #[error("network setup: {0}")]
    HostPorts(NftError),
    /// A request the network cannot serve.
    #[error("network setup: {0}")]
    Invalid(String),
    /// The CNI plugins failed (CNI mode).
    #[error("network setup: {0}")]
    Cni(#[from] cni::CniError),
}

/// The hostPorts of a pod at `ip` (and `ip6` on a dual-stack node): a mapping without a node
/// address goes to both families, one with an address to that address's family only.
fn host_ports(ports: &[PortSpec], ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Vec<HostPort> {
    let mut out = Vec::new();
    for p in ports.iter().filter(|p| p.host_port != 0) {
        let host_ip = p.host_ip.filter(|a| !a.is_unspecified());
        let wants = |v6: bool| host_ip.is_none_or(|a| a.is_ipv6() == v6);
        let targets = [
            wants(false).then_some(IpAddr::V4(ip)),
            ip6.filter(|_| wants(true)).map(IpAddr::V6),
        ];
        for pod_ip in targets.into_iter().flatten() {
            out.push(HostPort {
                proto: p.proto,
                host_ip,
                host_port: p.host_port,
                pod_ip,
                container_port: p.container_port,
            });
        }
    }
    out
}

/// The veth name of a pod: derived from its id, so a restart can always find it.
pub fn veth_name(pod_id: &str) -> String {
    format!("veth{}", &pod_id[..10.min(pod_id.len())])
}

struct State {
    /// The bridge's index, or why it is not usable.
    bridge: Result<u32, String>,
    /// Subnet new pods get addresses from.
    subnet: Ipv4Cidr,
    /// The IPv6 subnet of a dual-stack node.
    subnet6: Option<Ipv6Cidr>,
    /// Every subnet the bridge serves (the configured one and a pod CIDR from kubelet).
    subnets: Vec<Ipv4Cidr>,
}

/// The node's pod network.
pub struct Network {
    cfg: NetworkConfig,
    ipam: Ipam,
    nft: Nft,
    host: rtnetlink::Handle,
    state: RwLock<State>,
    /// Serializes table rebuilds against per-pod changes.
    nft_lock: tokio::sync::Mutex<()>,
    /// Veth removals and address releases still running, by pod.
    pending: std::sync::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
    /// In CNI mode, the plugins (the bridge, IPAM and nftables above are then unused).
    cni: Option<cni::Cni>,
}

impl Network {
    /// Opens the network: IPAM records in `ipam_dir`, a netlink socket in berthd's namespace,
    /// then the bridge and the nftables table (with the hostPorts of `pods`, which exist); in
    /// CNI mode, the CNI configuration directory (watched) and the cache in `cni_cache`
    /// instead of the bridge and the table.
    pub async fn start(
        cfg: &NetworkConfig,
        ipam_dir: &Path,
        cni_cache: &Path,
        pods: &[PodNet],
    ) -> Result<Network, String> {
        let ipam = Ipam::open(ipam_dir).map_err(|e| e.to_string())?;
        let (conn, host, _) =
            rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
        tokio::spawn(conn);
        let n = Network {
            cfg: cfg.clone(),
            ipam,
            nft: Nft::new(&cfg.nft_table),
            host,
            state: RwLock::new(State {
                bridge: Err("not set up yet".into()),
                subnet: cfg.subnet.v4,
                subnet6: cfg.subnet.v6,
                subnets: vec![cfg.subnet.v4],
            }),
            nft_lock: tokio::sync::Mutex::new(()),
            pending: Default::default(),
            cni: match cfg.mode {
                NetworkMode::Cni => Some(cni::Cni::open(
                    &cfg.cni.conf_dir,
                    &cfg.cni.bin_dirs,
                    std::time::Duration::from_secs(cfg.cni.plugin_timeout_seconds),
                    cni_cache,
                )?),
                NetworkMode::Builtin => None,
            },
        };
        if n.cni.is_some() {
            return Ok(n);
        }
        // Subnets of existing pods stay served (their pod CIDR may have come from kubelet).
        for p in pods {
            let s = Ipv4Cidr::new(p.ip, p.prefix_len).expect("recorded prefix is valid");
            let mut st = n.state.write().expect("network state poisoned");
            if !st.subnets.contains(&s) {
                st.subnets.push(s);
            }
        }
        let ports: Vec<HostPort> = pods
            .iter()
            .flat_map(|p| p.host_ports.iter().copied())
            .collect();
        match n.setup_bridge().await {
            Ok(_) => {
                if let Err(e) = n.sync_table(&ports).await {
                    n.state.write().expect("network state poisoned").bridge = Err(e.to_string());
                    tracing::warn!(error = %e, "network not ready");
                }
            }
            Err(e) => tracing::warn!(error = %e, "network not ready"),
        }
        Ok(n)
    }

    /// (Re)creates the bridge with its addresses and the sysctls it needs; records the outcome.
    async fn setup_bridge(&self) -> Result<u32, NetError> {
        let (gateways, bridge_name) = {
            let st = self.state.read().expect("network state poisoned");
            let mut g: Vec<(IpAddr, u8)> = st
                .subnets
                .iter()
                .map(|s| (IpAddr::V4(s.gateway()), s.prefix_len()))
                .collect();
            g.extend(
                st.subnet6
                    .map(|s| (IpAddr::V6(s.gateway()), s.prefix_len())),
            );
            (g, self.cfg.bridge.clone())
        };
        let r = netlink::ensure_bridge(&self.host, &bridge_name, &gateways, self.cfg.mtu).await;
        let r = match r {
            Ok(idx) => {
                // Forwarding for pod traffic leaving the node and hostPorts from outside;
                // route_localnet for 127.0.0.1:hostPort (the DNATed packet keeps its
                // loopback source until masqueraded on the way out to the bridge).
                let mut sysctls = vec![
                    ("net/ipv4/ip_forward".to_string(), "1"),
                    (format!("net/ipv4/conf/{bridge_name}/route_localnet"), "1"),
                ];
                if gateways.iter().any(|(g, _)| g.is_ipv6()) {
                    sysctls.push(("net/ipv6/conf/all/forwarding".to_string(), "1"));
                }
                for (k, v) in sysctls {
                    if let Err(e) = std::fs::write(Path::new("/proc/sys").join(&k), v) {
                        tracing::warn!(sysctl = %k, error = %e, "could not set sysctl");
                    }
                }
                Ok(idx)
            }
            Err(e) => Err(NetError::Bridge(e)),
        };
        let mut st = self.state.write().expect("network state poisoned");
        let was_ready = st.bridge.is_ok();
        st.bridge = r.as_ref().map(|i| *i).map_err(|e| e.to_string());
        match (&r, was_ready) {
            (Ok(_), false) => {
                tracing::info!(bridge = %bridge_name, subnets = ?st.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "bridge ready")
            }
            (Err(e), true) => tracing::warn!(error = %e, "bridge not usable"),
            _ => {}
        }
        r
    }

    async fn sync_table(&self, ports: &[HostPort]) -> Result<(), NftError> {
        let _l = self.nft_lock.lock().await;
        let (subnets, subnet6) = {
            let st = self.state.read().expect("network state poisoned");
            (st.subnets.clone(), st.subnet6)
        };
        self.nft
            .sync(
                &self.cfg.bridge,
                &subnets,
                subnet6,
                self.cfg.masquerade,
                ports,
            )
            .await
    }

    /// The bridge's index as last set up, or why it is not usable.
    fn known_bridge(&self) -> Result<u32, String> {
        self.state
            .read()
            .expect("network state poisoned")
            .bridge
            .clone()
    }

    /// NetworkReady: `None` when ready, else the reason (a CamelCase word) and why not.
    pub fn not_ready(&self) -> Option<(&'static str, String)> {
        if let Some(c) = &self.cni {
            return c.not_ready().map(|m| ("NetworkPluginNotReady", m));
        }
        self.state
            .read()
            .expect("network state poisoned")
            .bridge
            .as_ref()
            .err()
            .map(|e| ("BridgeNetworkNotReady", e.clone()))
    }

    /// Whether pods are connected by CNI plugins.
    pub fn is_cni(&self) -> bool {
        self.cni.is_some()
    }

    /// CNI mode: the pod's loopback up, then ADD through the plugins.
    pub async fn attach_cni(
        &self,
        pod_handle: &rtnetlink::Handle,
        pod: &cni::PodAttach,
    ) -> Result<cni::CniNet, NetError> {
        let c = self.cni.as_ref().expect("attach_cni in CNI mode");
        netlink::loopback_up(pod_handle)
            .await
            .map_err(NetError::Link)?;
        Ok(c.add(pod).await?)
    }

    /// CNI mode: DEL from the cache (nothing to do for a pod that is not attached).
    pub async fn detach_cni(&self, pod_id: &str) -> Result<(), NetError> {
        match &self.cni {
            Some(c) => Ok(c.del(pod_id).await?),
            None => Ok(()),
        }
    }

    /// The subnet new pods get addresses from.
    pub fn subnet(&self) -> Ipv4Cidr {
        self.state.read().expect("network state poisoned").subnet
    }

    /// Switches new pods to `cidr` (kubelet's pod CIDR); the bridge serves it from now on.
    /// In CNI mode it is offered to the plugins (capability `ipRanges`).
    pub async fn set_pod_cidr(&self, cidr: Ipv4Cidr, ports: &[HostPort]) {
        if let Some(c) = &self.cni {
            c.set_pod_cidr(cidr.to_string());
            return;
        }
        {
            let mut st = self.state.write().expect("network state poisoned");
            if st.subnet == cidr {
                return;
            }
            st.subnet = cidr;
            if !st.subnets.contains(&cidr) {
                st.subnets.push(cidr);
            }
        }
        if self.setup_bridge().await.is_ok()
            && let Err(e) = self.sync_table(ports).await
        {
            tracing::warn!(error = %e, "updating nftables for the new pod CIDR");
        }
    }

    /// Connects a pod: an address, a veth pair into `netns` (configured through `pod_handle`,
    /// a netlink handle inside it) and its hostPorts. All or nothing: on failure what was made
    /// is undone and the error names the step.
    pub async fn attach(
        &self,
        pod_id: &str,
        netns: BorrowedFd<'_>,
        pod_handle: &rtnetlink::Handle,
        ports: &[PortSpec],
    ) -> Result<PodNet, NetError> {
        let bridge = match self.known_bridge() {
            Ok(i) => i,
            Err(_) => self.setup_bridge().await?,
        };
        let subnet = self.subnet();
        let subnet6 = self.state.read().expect("network state poisoned").subnet6;
        if subnet6.is_none()
            && let Some(p) = ports
                .iter()
                .find(|p| p.host_ip.is_some_and(|a| a.is_ipv6()))
        {
            return Err(NetError::Invalid(format!(
                "port mapping host_ip {} is IPv6, but this node has no IPv6 pod subnet \
                 (network.subnet)",
                p.host_ip.expect("found above")
            )));
        }
        let ip = self.ipam.allocate(&subnet, pod_id)?;
        let ip6 = match subnet6 {
            Some(s) => match self.ipam.allocate6(&s, pod_id) {
                Ok(a) => Some((a, s.prefix_len(), s.gateway())),
                Err(e) => {
                    self.ipam.release(ip.into(), pod_id);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let veth = veth_name(pod_id);
        let net = PodNet {
            ip,
            prefix_len: subnet.prefix_len(),
            gateway: subnet.gateway(),
            veth: veth.clone(),
            host_ports: host_ports(ports, ip, ip6.map(|(a, _, _)| a)),
            ip6,
        };
        let r: Result<(), NetError> = async {
            netlink::loopback_up(pod_handle)
                .await
                .map_err(NetError::Link)?;
            netlink::create_veth(&self.host, &veth, bridge, netns, self.cfg.mtu)
                .await
                .map_err(NetError::Link)?;
            netlink::configure_pod_eth0(pod_handle, ip, subnet.prefix_len(), subnet.gateway(), ip6)
                .await
                .map_err(NetError::Link)?;
            if !net.host_ports.is_empty() {
                let _l = self.nft_lock.lock().await;
                self.nft
                    .add_ports(&net.host_ports)
                    .await
                    .map_err(NetError::HostPorts)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            // Undo in reverse; hostPorts were all-or-nothing and are not there.
            let _ = netlink::delete_link(&self.host, &veth).await;
            self.ipam.release_owner(pod_id);
            return Err(e);
        }
        Ok(net)
    }

    /// Disconnects a pod: its hostPorts at once, then (in the background) its veth and its
    /// address. The caller unpins the pod's network namespace right after this returns: the
    /// kernel then destroys the namespace, and with it the veth pair, in its own batched
    /// cleanup, which is far cheaper than deleting links one by one under the rtnl lock. Only
    /// once the veth is gone is the address released, so no two live links ever share it.
    /// Safe to run twice and on partial state; a restart finishes what was pending.
    pub async fn detach(self: &std::sync::Arc<Self>, pod_id: &str, net: Option<&PodNet>) {
        if let Some(net) = net
            && !net.host_ports.is_empty()
        {
            let _l = self.nft_lock.lock().await;
            self.nft.remove_ports(&net.host_ports).await;
        }
        let this = self.clone();
        let id = pod_id.to_string();
        // Inserted under the lock the task needs to remove itself: its removal comes after.
        let mut pending = self.pending.lock().expect("pending releases poisoned");
        let task = tokio::spawn(async move {
            this.release(&id).await;
            this.pending
                .lock()
                .expect("pending releases poisoned")
                .remove(&id);
        });
        pending.insert(pod_id.to_string(), task);
    }

    /// Waits until a detached pod's veth is gone and its address free (a failed creation is
    /// undone completely before it answers).
    pub async fn released(&self, pod_id: &str) {
        let task = self
            .pending
            .lock()
            .expect("pending releases poisoned")
            .remove(pod_id);
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Waits for the pod's veth to vanish (deleting it after 2 s if something keeps the
    /// namespace alive), then releases its address.
    async fn release(&self, pod_id: &str) {
        let veth = veth_name(pod_id);
        let mut gone = false;
        for _ in 0..200 {
            match netlink::link_by_name(&self.host, &veth).await {
                Ok(None) => {
                    gone = true;
                    break;
                }
                Ok(Some(_)) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                Err(_) => break,
            }
        }
        if !gone && let Err(e) = netlink::delete_link(&self.host, &veth).await {
            tracing::warn!(pod = pod_id, error = %e, "deleting the pod's veth");
        }
        self.ipam.release_owner(pod_id);
    }

    /// Gives new pods IPv6 addresses from `cidr` (the IPv6 half of kubelet's dual-stack pod
    /// CIDR); the bridge serves it from now on. In CNI mode it is offered as a second range.
    pub async fn set_pod_cidr6(&self, cidr: Ipv6Cidr, ports: &[HostPort]) {
        if let Some(c) = &self.cni {
            c.set_pod_cidr6(cidr.to_string());
            return;
        }
        {
            let mut st = self.state.write().expect("network state poisoned");
            if st.subnet6 == Some(cidr) {
                return;
            }
            st.subnet6 = Some(cidr);
        }
        if self.setup_bridge().await.is_ok()
            && let Err(e) = self.sync_table(ports).await
        {
            tracing::warn!(error = %e, "updating nftables for the new IPv6 pod CIDR");
        }
    }

    /// After a restart: releases addresses and deletes veths of pods that are not `live`; in
    /// CNI mode, DEL for cached attachments of pods that are not, and GC.
    pub async fn reconcile(&self, live: &[String]) {
        if let Some(c) = &self.cni {
            c.reconcile(live).await;
            return;
        }
        for (ip, owner) in self.ipam.allocations() {
            if !live.contains(&owner) {
                tracing::info!(%ip, pod = %owner, "releasing the address of a pod that is gone");
                let _ = netlink::delete_link(&self.host, &veth_name(&owner)).await;
                self.ipam.release(ip, &owner);
            }
        }
        let Ok(bridge) = self.known_bridge() else {
            return;
        };
        let live_veths: Vec<String> = live.iter().map(|id| veth_name(id)).collect();
        if let Ok(ports) = netlink::bridge_ports(&self.host, bridge).await {
            for p in ports {
                if p.starts_with("veth") && !live_veths.contains(&p) {
                    tracing::info!(veth = %p, "deleting the veth of a pod that is gone");
                    let _ = netlink::delete_link(&self.host, &p).await;
                }
            }
        }
    }

    /// The configured bridge's name.
    pub fn bridge_name(&self) -> &str {
        &self.cfg.bridge
    }
}
