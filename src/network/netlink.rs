//! rtnetlink operations of the pod network: the bridge, veth pairs created with their pod end
//! already inside the pod's namespace and named `eth0`, addresses and routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// A failed netlink operation, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct NetlinkError {
    /// What was being done.
    pub what: String,
    /// What the kernel said.
    pub message: String,
    /// The errno, when the kernel gave one.
    pub errno: Option<i32>,
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
            _ => None,
        };
        let message = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        NetlinkError {
            what,
            message,
            errno,
        }
    }
}

/// A link's index and kind.
pub struct LinkFacts {
    /// Interface index.
    pub index: u32,
    /// `bridge`, `veth`, ... (empty for links without a kind, such as physical NICs).
    pub kind: String,
}

fn kind_of(m: &LinkMessage) -> String {
    for a in &m.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                if let LinkInfo::Kind(k) = i {
                    return k.to_string();
                }
            }
        }
    }
    String::new()
}

/// Looks a link up by name; `None` if there is none.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkFacts>, NetlinkError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(Some(m)) => Ok(Some(LinkFacts {
            index: m.header.index,
            kind: kind_of(&m),
        })),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => Ok(None),
        Err(e) => Err(nl_err(format!("looking up link {name}"))(e)),
    }
}

/// Makes sure the bridge exists, is up and holds `gateways` (address/prefix each; IPv6 ones
/// without duplicate address detection, so they serve at once). A link of the same name that
/// is not a bridge is an error: berth never repurposes someone else's link.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    gateways: &[(IpAddr, u8)],
    mtu: u32,
) -> Result<u32, NetlinkError> {
    let index = match link_by_name(h, name).await? {
        Some(l) if l.kind == "bridge" => l.index,
        Some(l) => {
            return Err(NetlinkError {
                what: format!("bridge {name}"),
                message: format!(
                    "a link named {name} exists and is {}, not a bridge",
                    if l.kind.is_empty() {
                        "a device without a kind"
                    } else {
                        &l.kind
                    }
                ),
                errno: Some(libc::EEXIST),
            });
        }
        None => {
            let mut b = LinkBridge::new(name).up();
            if mtu > 0 {
                b = b.mtu(mtu);
            }
            match h.link().add(b.build()).execute().await {
                Ok(()) => {}
                // Created concurrently by someone else: fine if it is a bridge (checked below).
                Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::EEXIST => {}
                Err(e) => return Err(nl_err(format!("creating bridge {name}"))(e)),
            }
            match link_by_name(h, name).await? {
                Some(l) if l.kind == "bridge" => l.index,
                _ => {
                    return Err(NetlinkError {
                        what: format!("bridge {name}"),
                        message: "vanished or changed kind while being created".into(),
                        errno: None,
                    });
                }
            }
        }
    };
    let existing: Vec<(IpAddr, u8)> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .map_ok(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                netlink_packet_route::address::AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            (ip, m.header.prefix_len)
        })
        .try_filter_map(|(ip, p)| async move { Ok(ip.map(|ip| (ip, p))) })
        .try_collect()
        .await
        .map_err(nl_err(format!("listing addresses of {name}")))?;
    for (gw, prefix) in gateways {
        if !existing.contains(&(*gw, *prefix)) {
            match add_address(h, index, *gw, *prefix).await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::EEXIST => {}
                Err(e) => return Err(nl_err(format!("adding {gw}/{prefix} to {name}"))(e)),
            }
        }
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err(format!("setting {name} up")))?;
    Ok(index)
}

/// Creates a veth pair: `host_name` on the bridge, up; its peer `eth0` inside the namespace
/// `netns`, created there directly (never visible in the host namespace).
pub async fn create_veth(
    h: &Handle,
    host_name: &str,
    bridge: u32,
    netns: BorrowedFd<'_>,
    mtu: u32,
) -> Result<(), NetlinkError> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".to_string())
        .setns_by_fd(netns.as_raw_fd());
    let mut host = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string())
        .controller(bridge)
        .up();
    if mtu > 0 {
        peer = peer.mtu(mtu);
        host = host.mtu(mtu);
    }
    let msg = host
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl_err(format!("creating veth {host_name}")))
}

/// Deletes a link by name; a missing one is fine.
pub async fn delete_link(h: &Handle, name: &str) -> Result<(), NetlinkError> {
    let Some(l) = link_by_name(h, name).await? else {
        return Ok(());
    };
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => Ok(()),
        Err(e) => Err(nl_err(format!("deleting {name}"))(e)),
    }
}

/// Names of the links enslaved to the bridge with index `bridge`.
pub async fn bridge_ports(h: &Handle, bridge: u32) -> Result<Vec<String>, NetlinkError> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("listing links"))?;
    Ok(links
        .iter()
        .filter(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge))
        })
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        })
        .collect())
}

/// Brings `lo` up (in whatever namespace `h` lives in).
pub async fn loopback_up(h: &Handle) -> Result<(), NetlinkError> {
    h.link()
        .set(LinkUnspec::new_with_index(1).up().build())
        .execute()
        .await
        .map_err(nl_err("setting lo up"))
}

/// Adds `ip/prefix` to link `index`; an IPv6 address without duplicate address detection (the
/// subnet's addresses are handed out by berth alone), so it serves at once.
async fn add_address(
    h: &Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    let mut req = h.address().add(index, ip, prefix);
    if ip.is_ipv6() {
        req.message_mut().header.flags |= netlink_packet_route::address::AddressHeaderFlags::Nodad;
    }
    req.execute().await
}

/// Inside the pod: `eth0` gets `ip/prefix` (and `ip6` on a dual-stack node), goes up, and the
/// default routes point at the gateways.
pub async fn configure_pod_eth0(
    h: &Handle,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    ip6: Option<(Ipv6Addr, u8, Ipv6Addr)>,
) -> Result<(), NetlinkError> {
    let eth0 = link_by_name(h, "eth0").await?.ok_or_else(|| NetlinkError {
        what: "configuring eth0".into(),
        message: "eth0 is missing in the pod's namespace".into(),
        errno: Some(libc::ENODEV),
    })?;
    h.address()
        .add(eth0.index, IpAddr::V4(ip), prefix)
        .execute()
        .await
        .map_err(nl_err(format!("adding {ip}/{prefix} to eth0")))?;
    h.link()
        .set(LinkUnspec::new_with_index(eth0.index).up().build())
        .execute()
        .await
        .map_err(nl_err("setting eth0 up"))?;
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err(format!("adding the default route via {gateway}")))?;
    if let Some((ip6, prefix6, gateway6)) = ip6 {
        add_address(h, eth0.index, IpAddr::V6(ip6), prefix6)
            .await
            .map_err(nl_err(format!("adding {ip6}/{prefix6} to eth0")))?;
        h.route()
            .add(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(gateway6)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(format!("adding the default route via {gateway6}")))?;
    }
    Ok(())
}
