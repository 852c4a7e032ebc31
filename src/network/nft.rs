//! berth's nftables table: hostPort DNAT (from outside, from the node, from 127.0.0.1) and pod
//! masquerade. Everything lives in one table of family `ip` (and, on a dual-stack node, one of
//! family `ip6` beside it); per-pod hostPorts are elements of two maps, so adding or removing a
//! pod's ports never rewrites rules. Changes go through
//! `nft -f -`, whose input is one atomic transaction.

use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::cidr::{Ipv4Cidr, Ipv6Cidr};

/// A transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    /// Its lowercase name (nftables, CNI portMappings).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One hostPort mapping of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HostPort {
    /// The protocol.
    pub proto: Proto,
    /// Only traffic to this node address, if given (of the pod address's family).
    pub host_ip: Option<IpAddr>,
    /// The node's port.
    pub host_port: u16,
    /// The pod's address (IPv4, or IPv6 on a dual-stack node).
    pub pod_ip: IpAddr,
    /// The pod's port.
    pub container_port: u16,
}

impl HostPort {
    /// The table family its elements live in.
    fn family(&self) -> &'static str {
        if self.pod_ip.is_ipv4() { "ip" } else { "ip6" }
    }

    fn key(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip} . {} . {}", self.proto, self.host_port),
            None => format!("{} . {}", self.proto, self.host_port),
        }
    }

    fn map(&self) -> &'static str {
        if self.host_ip.is_some() {
            "hostip_ports"
        } else {
            "hostports"
        }
    }

    fn element(&self) -> String {
        format!("{} : {} . {}", self.key(), self.pod_ip, self.container_port)
    }
}

/// A NAT table of `family` (`ip`, `ip6`) named `t`: hostPort DNAT from prerouting and output
/// for local destinations through two maps, and `post` as its postrouting rules.
fn table(family: &str, addr: &str, t: &str, post: &str) -> String {
    format!(
        "table {family} {t} {{\n\
         \x20 map hostports {{ type inet_proto . inet_service : {addr} . inet_service; }}\n\
         \x20 map hostip_ports {{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}\n\
         \x20 chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; fib daddr type local jump hostports; }}\n\
         \x20 chain output {{ type nat hook output priority -100; policy accept; fib daddr type local jump hostports; }}\n\
         \x20 chain hostports {{\n\
         \x20   meta l4proto {{ tcp, udp, sctp }} dnat {family} to {family} daddr . meta l4proto . th dport map @hostip_ports\n\
         \x20   meta l4proto {{ tcp, udp, sctp }} dnat {family} to meta l4proto . th dport map @hostports\n\
         \x20 }}\n\
         \x20 chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n{post}  }}\n\
         }}\n"
    )
}

/// Postrouting rules for pods of subnet `s`: hairpin (a pod reaching itself or a neighbour
/// through a hostPort), and with `masquerade` their traffic leaving the subnet.
fn pod_postrouting(family: &str, s: &str, bridge: &str, masquerade: bool) -> String {
    let mut post =
        format!("    {family} saddr {s} oifname \"{bridge}\" ct status dnat masquerade\n");
    if masquerade {
        post.push_str(&format!(
            "    {family} saddr {s} {family} daddr != {s} oifname != \"{bridge}\" masquerade\n"
        ));
    }
    post
}

/// A failed nft transaction.
#[derive(Debug, thiserror::Error)]
#[error("nftables ({what}): {message}")]
pub struct NftError {
    /// What was being changed.
    pub what: String,
    /// What nft said.
    pub message: String,
    /// Whether a hostPort was taken already.
    pub conflict: bool,
}

/// The table and how to change it.
pub struct Nft {
    table: String,
}

impl Nft {
    /// Manages the `ip` table named `table`.
    pub fn new(table: &str) -> Nft {
        Nft {
            table: table.to_string(),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn run(&self, what: &str, script: String) -> Result<(), NftError> {
        let err = |message: String| NftError {
            what: what.to_string(),
            conflict: message.contains("File exists"),
            message,
        };
        let mut cmd = tokio::process::Command::new("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::fdlimit::for_child(cmd.as_std_mut());
        let mut child = cmd.spawn().map_err(|e| err(format!("running nft: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| err(format!("writing to nft: {e}")))?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| err(format!("waiting for nft: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(err(String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " | ")))
        }
    }

    /// Replaces the whole table atomically: base chains for `bridge` and `subnets`, plus every
    /// hostPort in `ports` (what the pods that exist hold); on a dual-stack node (`subnet6`)
    /// the `ip6` table of the same name likewise, else that table is removed.
    pub async fn sync(
        &self,
        bridge: &str,
        subnets: &[Ipv4Cidr],
        subnet6: Option<Ipv6Cidr>,
        masquerade: bool,
        ports: &[HostPort],
    ) -> Result<(), NftError> {
        let t = &self.table;
        // Loopback-sourced traffic DNATed to a pod (127.0.0.1:hostPort) needs a real source.
        let mut post = format!("    ip saddr 127.0.0.0/8 oifname \"{bridge}\" masquerade\n");
        for s in subnets {
            post.push_str(&pod_postrouting("ip", &s.to_string(), bridge, masquerade));
        }
        let mut script = format!("table ip {t} {{}}\ndelete table ip {t}\n");
        script.push_str(&table("ip", "ipv4_addr", t, &post));
        script.push_str(&format!("table ip6 {t} {{}}\ndelete table ip6 {t}\n"));
        if let Some(s) = subnet6 {
            let post = pod_postrouting("ip6", &s.to_string(), bridge, masquerade);
            script.push_str(&table("ip6", "ipv6_addr", t, &post));
        }
        for p in ports {
            if p.pod_ip.is_ipv6() && subnet6.is_none() {
                continue;
            }
            script.push_str(&format!(
                "add element {} {t} {} {{ {} }}\n",
                p.family(),
                p.map(),
                p.element()
            ));
        }
        self.run("replacing the table", script).await
    }

    /// Adds a pod's hostPorts, all or none; a port another pod holds is a conflict.
    pub async fn add_ports(&self, ports: &[HostPort]) -> Result<(), NftError> {
        if ports.is_empty() {
            return Ok(());
        }
        let t = &self.table;
        let script: String = ports
            .iter()
            .map(|p| {
                format!(
                    "create element {} {t} {} {{ {} }}\n",
                    p.family(),
                    p.map(),
                    p.element()
                )
            })
            .collect();
        self.run("adding hostPorts", script).await
    }

    /// Removes a pod's hostPorts; those already gone are fine.
    pub async fn remove_ports(&self, ports: &[HostPort]) {
        if ports.is_empty() {
            return;
        }
        let t = &self.table;
        let script: String = ports
            .iter()
            .map(|p| {
                format!(
                    "delete element {} {t} {} {{ {} }}\n",
                    p.family(),
                    p.map(),
                    p.key()
                )
            })
            .collect();
        if self.run("removing hostPorts", script).await.is_ok() {
            return;
        }
        // Some were gone already (the transaction is all or nothing): one at a time.
        for p in ports {
            let _ = self
                .run(
                    "removing a hostPort",
                    format!(
                        "delete element {} {t} {} {{ {} }}\n",
                        p.family(),
                        p.map(),
                        p.key()
                    ),
                )
                .await;
        }
    }
}
