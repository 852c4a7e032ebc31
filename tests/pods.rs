//! Pod sandboxes against a real berthd in a namespace the test made: lifecycle, reachability,
//! hostPorts (TCP and UDP, from 127.0.0.1, the node and another namespace), concurrency,
//! idempotence, name reservation, sysctls, PID sharing, restarts, and failures injected at
//! several steps, each checked to leave nothing behind.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, Netns, Options, node};
use tonic::Code;
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

fn pod_config(b: &Berthd, name: &str) -> cri::PodSandboxConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let uid = format!("uid-{name}-{}", N.fetch_add(1, Ordering::Relaxed));
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "test".into(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: b
            .dir
            .path()
            .join("logs")
            .join(&uid)
            .to_string_lossy()
            .into_owned(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        annotations: HashMap::from([("note".to_string(), "kept verbatim: ✓".to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: common::pod_cgroup_parent(&b.cgroup_root, &format!("pod{uid}")),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_ns(
    mut c: cri::PodSandboxConfig,
    f: impl FnOnce(&mut cri::NamespaceOption),
) -> cri::PodSandboxConfig {
    let linux = c.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    let ns = sc.namespace_options.get_or_insert_with(Default::default);
    f(ns);
    c
}

async fn run(rt: &mut Rt, c: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(c),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn status(rt: &mut Rt, id: &str) -> cri::PodSandboxStatus {
    common::world::pod_status(rt, id).await
}

async fn stop(rt: &mut Rt, id: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .unwrap();
}

async fn remove(rt: &mut Rt, id: &str) {
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .unwrap();
}

fn ip_of(s: &cri::PodSandboxStatus) -> String {
    s.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default()
}

fn netns_pin(b: &Berthd, id: &str) -> PathBuf {
    b.state.join("ns").join(id).join("net")
}

/// A TCP echo server inside the namespace at `ns`, until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn tcp(ns: &Path, port: u16) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let ns = ns.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Both families (an IPv6 socket takes IPv4 too, as v4-mapped addresses).
            let l = std::net::TcpListener::bind(("::", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = [0u8; 64];
                        if let Ok(n) = c.read(&mut buf) {
                            let _ = c.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
        Echo {
            stop,
            thread: Some(thread),
        }
    }

    fn udp(ns: &Path, port: u16) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let ns = ns.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let s = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv().unwrap();
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends "ping" over TCP from inside `ns` to `addr`; the echo, or the error.
fn tcp_ping(ns: &Path, addr: &str) -> Result<String, String> {
    let ns = ns.to_owned();
    let addr: SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 16];
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .unwrap()
}

/// Opens a TCP connection from inside `ns` to `addr`, and closes it.
fn tcp_connect_only(ns: &Path, addr: &str) -> Result<(), String> {
    let ns = ns.to_owned();
    let addr: SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .join()
    .unwrap()
}

/// The same over UDP.
fn udp_ping(ns: &Path, addr: &str) -> Result<String, String> {
    let ns = ns.to_owned();
    let addr: SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        Err("no answer".into())
    })
    .join()
    .unwrap()
}

/// Reads a sysctl as seen from inside the namespace pinned at `pin` (of kind `kind`).
fn sysctl_in(pin: &Path, kind: nix::sched::CloneFlags, key: &str) -> String {
    let pin = pin.to_owned();
    let key = key.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&pin).unwrap();
        nix::sched::setns(&f, kind).unwrap();
        std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
            .unwrap()
            .trim()
            .to_string()
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_answers_status_and_stops_and_removes_without_leftovers() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let before = node::snapshot(&b);
    let c = pod_config(&b, "web");
    let id = run(&mut rt, c.clone()).await.unwrap();
    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));

    let s = status(&mut rt, &id).await;
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(s.metadata.as_ref().unwrap().name, "web");
    assert_eq!(s.labels, c.labels);
    assert_eq!(s.annotations, c.annotations);
    let ip: Ipv4Addr = ip_of(&s).parse().unwrap();
    assert_eq!(ip.octets()[..2], [10, 88]);
    assert!(s.created_at > 0);
    let opts = s.linux.unwrap().namespaces.unwrap().options.unwrap();
    assert_eq!(opts.network, cri::NamespaceMode::Pod as i32);

    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);

    // Files: hostname (the pod name), hosts with the pod's address, the node's resolv.conf.
    let dir = b.state.join("pods").join(&id);
    assert_eq!(
        std::fs::read_to_string(dir.join("hostname")).unwrap(),
        "web\n"
    );
    assert!(
        std::fs::read_to_string(dir.join("hosts"))
            .unwrap()
            .contains(&format!("{ip}\tweb\n"))
    );

    stop(&mut rt, &id).await;
    let s = status(&mut rt, &id).await;
    assert_eq!(s.state, cri::PodSandboxState::SandboxNotready as i32);
    assert_eq!(ip_of(&s), "", "a stopped pod has no address");
    remove(&mut rt, &id).await;
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    node::assert_back_to(&b, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_ip_answers_from_the_node_side() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let id = run(&mut rt, pod_config(&b, "reach")).await.unwrap();
    let ip = ip_of(&status(&mut rt, &id).await);
    let _echo = Echo::tcp(&netns_pin(&b, &id), 8080);
    let node = b.netns.clone().unwrap();
    assert_eq!(tcp_ping(&node, &format!("{ip}:8080")).unwrap(), "ping");
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_pod_answers_on_both_families_and_so_do_its_host_ports() {
    let b = Berthd::start_with(Options {
        extra_config: "[network]\nsubnet = [\"10.124.0.0/24\", \"fd00:124::/64\"]\n".into(),
        ..Default::default()
    });
    let mut rt = b.runtime().await;
    let before = node::snapshot(&b);
    let mut c = pod_config(&b, "dual");
    c.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 18090,
        host_ip: String::new(),
    }];
    let id = run(&mut rt, c).await.unwrap();
    let st = status(&mut rt, &id).await;
    let ip = ip_of(&st);
    let net = st.network.unwrap();
    assert!(ip.starts_with("10.124.0."), "{ip}");
    assert_eq!(net.additional_ips.len(), 1, "{net:?}");
    let ip6 = net.additional_ips[0].ip.clone();
    assert!(ip6.starts_with("fd00:124::"), "{ip6}");
    let _echo = Echo::tcp(&netns_pin(&b, &id), 8080);
    let node = b.netns.clone().unwrap();
    assert_eq!(tcp_ping(&node, &format!("{ip}:8080")).unwrap(), "ping");
    assert_eq!(tcp_ping(&node, &format!("[{ip6}]:8080")).unwrap(), "ping");
    // The hostPort on both families, through the bridge's addresses (local on the node).
    assert_eq!(tcp_ping(&node, "10.124.0.1:18090").unwrap(), "ping");
    assert_eq!(tcp_ping(&node, "[fd00:124::1]:18090").unwrap(), "ping");
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    node::assert_back_to(&b, &before).await;
    // Nothing of the IPv6 half either: no address leased, no hostPort element.
    let leased: Vec<String> = std::fs::read_dir(b.state.join("ipam"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect();
    assert!(leased.is_empty(), "{leased:?}");
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["list", "table", "ip6", "berth"]);
    common::in_netns(&mut cmd, &node);
    let table = String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned();
    assert!(table.contains("map hostports"), "{table}");
    assert!(!table.contains("elements"), "{table}");

    // On a node without an IPv6 subnet, a hostPort on an IPv6 address is refused by name.
    let b4 = Berthd::start();
    let mut rt4 = b4.runtime().await;
    let mut c = pod_config(&b4, "v6-port");
    c.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port: 18091,
        host_ip: "fd00::1".into(),
    }];
    let err = run(&mut rt4, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("fd00::1"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ports_work_from_loopback_the_node_and_another_namespace() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let before = node::snapshot(&b);
    let node = b.netns.clone().unwrap();
    let node_name = node.file_name().unwrap().to_str().unwrap().to_string();
    // Another host: a namespace joined to the node by a veth pair.
    let client = Netns::new();
    common::run(std::process::Command::new("ip").args([
        "-n",
        &node_name,
        "link",
        "add",
        "vb-uplink",
        "type",
        "veth",
        "peer",
        "name",
        "vc-uplink",
        "netns",
        &client.name,
    ]));
    for (ns, dev, addr) in [
        (&node_name, "vb-uplink", "192.168.77.1/24"),
        (&client.name, "vc-uplink", "192.168.77.2/24"),
    ] {
        common::run(
            std::process::Command::new("ip").args(["-n", ns, "addr", "add", addr, "dev", dev]),
        );
        common::run(std::process::Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
    }
    let before_pods = node::snapshot(&b);

    let mut c = pod_config(&b, "ports");
    c.port_mappings = vec![
        cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port: 18080,
            host_ip: String::new(),
        },
        cri::PortMapping {
            protocol: cri::Protocol::Udp as i32,
            container_port: 53,
            host_port: 15353,
            host_ip: String::new(),
        },
        cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 81,
            host_port: 18081,
            host_ip: "127.0.0.1".into(),
        },
        // Only a container port: nothing to map.
        cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 9000,
            host_port: 0,
            host_ip: String::new(),
        },
    ];
    let id = run(&mut rt, c).await.unwrap();
    let pin = netns_pin(&b, &id);
    let _tcp = Echo::tcp(&pin, 80);
    let _tcp81 = Echo::tcp(&pin, 81);
    let _udp = Echo::udp(&pin, 53);
    assert_eq!(
        tcp_ping(&node, "127.0.0.1:18080").unwrap(),
        "ping",
        "from 127.0.0.1 on the node"
    );
    assert_eq!(
        tcp_ping(&node, "192.168.77.1:18080").unwrap(),
        "ping",
        "from the node to its own address"
    );
    assert_eq!(
        tcp_ping(&client.path, "192.168.77.1:18080").unwrap(),
        "ping",
        "from another host"
    );
    assert_eq!(
        udp_ping(&client.path, "192.168.77.1:15353").unwrap(),
        "ping",
        "UDP from another host"
    );
    assert_eq!(
        tcp_ping(&node, "127.0.0.1:18081").unwrap(),
        "ping",
        "host_ip mapping on its address"
    );
    assert!(
        tcp_ping(&client.path, "192.168.77.1:18081").is_err(),
        "host_ip mapping only on its address"
    );

    // Egress: the pod's traffic to another host leaves masqueraded as the node's address.
    let peer_seen = {
        let client_path = client.path.clone();
        let listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&client_path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind("192.168.77.2:19000").unwrap();
            let (_c, peer) = l.accept().unwrap();
            peer.ip().to_string()
        });
        std::thread::sleep(Duration::from_millis(100));
        let _ = tcp_connect_only(&pin, "192.168.77.2:19000");
        listener.join().unwrap()
    };
    assert_eq!(peer_seen, "192.168.77.1", "egress is masqueraded");

    stop(&mut rt, &id).await;
    assert!(
        tcp_ping(&node, "127.0.0.1:18080").is_err(),
        "the mapping goes with the pod"
    );
    remove(&mut rt, &id).await;
    node::assert_back_to(&b, &before_pods).await;
    common::run(std::process::Command::new("ip").args([
        "-n",
        &node_name,
        "link",
        "del",
        "vb-uplink",
    ]));
    node::assert_back_to(&b, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_held_by_another_pod_fails_the_second_pod_cleanly() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let mut c = pod_config(&b, "first");
    c.port_mappings = vec![cri::PortMapping {
        protocol: 0,
        container_port: 80,
        host_port: 18090,
        host_ip: String::new(),
    }];
    let first = run(&mut rt, c).await.unwrap();
    let before = node::snapshot(&b);
    let mut c = pod_config(&b, "second");
    c.port_mappings = vec![cri::PortMapping {
        protocol: 0,
        container_port: 80,
        host_port: 18090,
        host_ip: String::new(),
    }];
    let err = run(&mut rt, c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("hostPort") || err.message().contains("host port"),
        "{}",
        err.message()
    );
    node::assert_back_to(&b, &before).await;
    stop(&mut rt, &first).await;
    remove(&mut rt, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pods_started_at_once_get_fifty_addresses_and_all_tear_down() {
    let b = Berthd::start_with(Options {
        log_level: Some("info".into()),
        ..Default::default()
    });
    let rt = b.runtime().await;
    let before = node::snapshot(&b);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut rt = rt.clone();
        let c = pod_config(&b, &format!("many{i}"));
        tasks.push(tokio::spawn(async move { run(&mut rt, c).await.unwrap() }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let mut ips = Vec::new();
    for id in &ids {
        ips.push(ip_of(&status(&mut rt.clone(), id).await));
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "addresses: {ips:?}");
    let mut tasks = Vec::new();
    for id in ids {
        let mut rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            stop(&mut rt, &id).await;
            remove(&mut rt, &id).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    node::assert_back_to(&b, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_remove_are_idempotent() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let id = run(&mut rt, pod_config(&b, "idem")).await.unwrap();
    stop(&mut rt, &id).await;
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    let unknown = "0".repeat(64);
    stop(&mut rt, &unknown).await;
    remove(&mut rt, &unknown).await;
    // Remove without stop first works too.
    let id = run(&mut rt, pod_config(&b, "idem2")).await.unwrap();
    remove(&mut rt, &id).await;
    assert!(
        rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_metadata_is_refused_while_the_pod_exists_naming_it() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let c = pod_config(&b, "dup");
    let id = run(&mut rt, c.clone()).await.unwrap();
    let err = run(&mut rt, c.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains(&id), "{}", err.message());
    // Concurrent retries with the same metadata converge: one wins, the rest name it.
    remove(&mut rt, &id).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut rt = rt.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move { run(&mut rt, c).await }));
    }
    let results: Vec<_> = futures_collect(tasks).await;
    let ok: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(e.message().contains(ok[0].as_str()), "{}", e.message());
        }
    }
    remove(&mut rt, ok[0]).await;
}

async fn futures_collect<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_client_timeout_converges() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let c = pod_config(&b, "timeout");
    let mut req = tonic::Request::new(cri::RunPodSandboxRequest {
        config: Some(c.clone()),
        runtime_handler: String::new(),
    });
    req.set_timeout(Duration::from_millis(1));
    let _ = rt.run_pod_sandbox(req).await;
    // The first attempt finishes in the background; the retry meets it, not a stuck name.
    let retry = run(&mut rt, c.clone()).await;
    let id = match retry {
        Ok(id) => id,
        Err(e) => {
            assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
            let items = rt
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .items;
            assert_eq!(items.len(), 1);
            assert!(e.message().contains(&items[0].id));
            items[0].id.clone()
        }
    };
    remove(&mut rt, &id).await;
    run(&mut rt, c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_id_prefix_state_and_labels() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let a = run(&mut rt, pod_config(&b, "alpha")).await.unwrap();
    let z = run(&mut rt, pod_config(&b, "zeta")).await.unwrap();
    stop(&mut rt, &z).await;
    let list = |f: cri::PodSandboxFilter| {
        let mut rt = rt.clone();
        async move {
            rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(f) })
                .await
                .unwrap()
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(cri::PodSandboxFilter {
            id: a[..12].into(),
            ..Default::default()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32
            }),
            ..Default::default()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(cri::PodSandboxFilter {
            label_selector: HashMap::from([("app".into(), "zeta".into())]),
            ..Default::default()
        })
        .await,
        vec![z.clone()]
    );
    assert!(
        list(cri::PodSandboxFilter {
            id: "ffff".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_sysctls_are_applied_and_the_others_refused_by_name() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let before = node::snapshot(&b);
    let mut c = pod_config(&b, "sysctl");
    c.linux.as_mut().unwrap().sysctls = HashMap::from([
        ("net.ipv4.ip_unprivileged_port_start".into(), "443".into()),
        ("kernel.shm_rmid_forced".into(), "1".into()),
    ]);
    let id = run(&mut rt, c).await.unwrap();
    let ns = b.state.join("ns").join(&id);
    assert_eq!(
        sysctl_in(
            &ns.join("net"),
            nix::sched::CloneFlags::CLONE_NEWNET,
            "net.ipv4.ip_unprivileged_port_start"
        ),
        "443"
    );
    assert_eq!(
        sysctl_in(
            &ns.join("ipc"),
            nix::sched::CloneFlags::CLONE_NEWIPC,
            "kernel.shm_rmid_forced"
        ),
        "1"
    );
    remove(&mut rt, &id).await;
    node::assert_back_to(&b, &before).await;

    // Not namespaced: refused before anything is made.
    let mut c = pod_config(&b, "bad-sysctl");
    c.linux.as_mut().unwrap().sysctls = HashMap::from([("vm.swappiness".into(), "10".into())]);
    let err = run(&mut rt, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("vm.swappiness"), "{}", err.message());
    // Namespaced but not allowed with the node's network.
    let c = with_ns(pod_config(&b, "hostnet-sysctl"), |n| {
        n.network = cri::NamespaceMode::Node as i32
    });
    let mut c = c;
    c.linux.as_mut().unwrap().sysctls = HashMap::from([("net.ipv4.ip_forward".into(), "1".into())]);
    let err = run(&mut rt, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("net.ipv4.ip_forward"),
        "{}",
        err.message()
    );
    // A value the kernel refuses: fails after the namespaces were made, and undoes them.
    let mut c = pod_config(&b, "bad-value");
    c.linux.as_mut().unwrap().sysctls =
        HashMap::from([("net.ipv4.ip_local_port_range".into(), "not a range".into())]);
    let err = run(&mut rt, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("net.ipv4.ip_local_port_range"),
        "{}",
        err.message()
    );
    node::assert_back_to(&b, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_address_pool_fails_cleanly() {
    // A /30 holds exactly one pod.
    let b = Berthd::start_with(Options {
        extra_config: "[network]\nsubnet = \"10.123.0.0/30\"\n".into(),
        ..Default::default()
    });
    let mut rt = b.runtime().await;
    let one = run(&mut rt, pod_config(&b, "one")).await.unwrap();
    assert_eq!(ip_of(&status(&mut rt, &one).await), "10.123.0.2");
    let before = node::snapshot(&b);
    let err = run(&mut rt, pod_config(&b, "two")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("10.123.0.0/30"), "{}", err.message());
    node::assert_back_to(&b, &before).await;
    // Freed (once the kernel has destroyed the old namespace, in the background), the address
    // serves the next pod.
    remove(&mut rt, &one).await;
    let mut three = None;
    for _ in 0..100 {
        match run(&mut rt, pod_config(&b, "three")).await {
            Ok(id) => {
                three = Some(id);
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let three = three.expect("the address was never released");
    assert_eq!(ip_of(&status(&mut rt, &three).await), "10.123.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_name_taken_by_another_link_fails_pods_and_reports_network_not_ready() {
    let ns = Netns::new();
    common::run(std::process::Command::new("ip").args([
        "-n",
        &ns.name,
        "link",
        "add",
        "brtaken",
        "type",
        "veth",
        "peer",
        "name",
        "brtaken-p",
    ]));
    let b = Berthd::start_with(Options {
        extra_config: "[network]\nbridge = \"brtaken\"\n".into(),
        netns: Some(ns.path.clone()),
        ..Default::default()
    });
    let mut rt = b.runtime().await;
    let s = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let net = s
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(!net.status);
    assert!(
        net.message.contains("brtaken") && net.message.contains("not a bridge"),
        "{net:?}"
    );
    let before = node::snapshot(&b);
    let err = run(&mut rt, pod_config(&b, "nobridge")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("network setup") && err.message().contains("brtaken"),
        "{}",
        err.message()
    );
    node::assert_back_to(&b, &before).await;
    // Host-network pods do not need the bridge.
    let c = with_ns(pod_config(&b, "hostnet"), |n| {
        n.network = cri::NamespaceMode::Node as i32
    });
    let id = run(&mut rt, c).await.unwrap();
    remove(&mut rt, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_have_no_namespace_or_address_of_their_own() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let before = node::snapshot(&b);
    let c = with_ns(pod_config(&b, "hostnet"), |n| {
        n.network = cri::NamespaceMode::Node as i32;
        n.ipc = cri::NamespaceMode::Node as i32;
    });
    let id = run(&mut rt, c).await.unwrap();
    let s = status(&mut rt, &id).await;
    assert_eq!(ip_of(&s), "");
    let pins = b.state.join("ns").join(&id);
    assert!(!pins.join("net").exists() && !pins.join("uts").exists() && !pins.join("ipc").exists());
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        std::fs::read_to_string(b.state.join("pods").join(&id).join("hostname")).unwrap(),
        format!("{host}\n")
    );
    remove(&mut rt, &id).await;
    node::assert_back_to(&b, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_config_and_hostname_make_the_pod_files() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let mut c = pod_config(&b, "dns");
    c.hostname = "custom-host".into();
    c.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["test.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let id = run(&mut rt, c).await.unwrap();
    let dir = b.state.join("pods").join(&id);
    assert_eq!(
        std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
        "search test.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("hostname")).unwrap(),
        "custom-host\n"
    );
    // The UTS namespace carries it.
    let uts = b.state.join("ns").join(&id).join("uts");
    let name = std::thread::spawn(move || {
        let f = std::fs::File::open(&uts).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWUTS).unwrap();
        nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    })
    .join()
    .unwrap();
    assert_eq!(name, "custom-host");
    // A /dev/shm of its own.
    assert!(common::mounts_under(&dir).contains(&dir.join("shm")));
    remove(&mut rt, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_runtime_handler_is_refused_by_name() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(&b, "handler")),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("kata"), "{}", err.message());
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: None,
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_sharing_its_pid_namespace_gets_an_init_in_its_cgroup_v1_and_v2() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let c = pod_config(&b, "pidpod");
    let given = c.linux.as_ref().unwrap().cgroup_parent.clone();
    // The pod's directory: the path, or the slice nested under the test's top slice.
    let pod_dir = if common::systemd_driver() {
        format!("{}.slice/{given}", b.cgroup_root)
    } else {
        given.trim_start_matches('/').to_string()
    };
    let id = run(&mut rt, c).await.unwrap();
    // On a v2-only node the pod's directory hands controllers down and so holds no process:
    // the init is in a leaf below it (a scope with the systemd driver).
    let v2_only = !common::cgroup_mounts()
        .iter()
        .any(|m| m.ends_with("unified"))
        && Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let parent = match (v2_only, common::systemd_driver()) {
        (false, _) => pod_dir.clone(),
        (true, false) => format!("{pod_dir}/init"),
        (true, true) => format!("{pod_dir}/berth-init-{id}.scope"),
    };
    let pid_pin = b.state.join("ns").join(&id).join("pid");
    assert!(pid_pin.exists());
    let host_pidns = std::fs::metadata("/proc/self/ns/pid").unwrap();
    let pod_pidns = std::fs::metadata(&pid_pin).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        host_pidns.ino(),
        pod_pidns.ino(),
        "the pod has a PID namespace of its own"
    );
    // The init is in the pod cgroup in the v1 hierarchies and in the v2 (unified) one.
    let mut seen_v2 = false;
    for m in common::cgroup_mounts() {
        let procs = std::fs::read_to_string(m.join(&parent).join("cgroup.procs")).unwrap();
        assert_eq!(procs.lines().count(), 1, "{}", m.display());
        let pid = procs.trim();
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap()
                .trim(),
            "berth-init"
        );
        if m.ends_with("unified") || !m.join("cgroup.controllers").exists() {
            continue;
        }
        seen_v2 = true;
        // What this host allows of cgroup v2 on the unified mount.
        for f in ["cgroup.kill", "cgroup.freeze", "cgroup.events"] {
            assert!(m.join(&pod_dir).join(f).exists(), "{f} on {}", m.display());
        }
    }
    let _ = seen_v2;
    stop(&mut rt, &id).await;
    for m in common::cgroup_mounts() {
        let p = m.join(&parent).join("cgroup.procs");
        for _ in 0..100 {
            if std::fs::read_to_string(&p)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            std::fs::read_to_string(&p)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true),
            "init still runs"
        );
    }
    remove(&mut rt, &id).await;
    for m in common::cgroup_mounts() {
        assert!(
            !m.join(&pod_dir).exists(),
            "pod cgroup left in {}",
            m.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_survive_a_berthd_restart_and_a_dead_init_makes_its_pod_not_ready() {
    let mut b = Berthd::start();
    let mut rt = b.runtime().await;
    let alive = run(&mut rt, pod_config(&b, "alive")).await.unwrap();
    let dying = run(&mut rt, pod_config(&b, "dying")).await.unwrap();
    let ip = ip_of(&status(&mut rt, &alive).await);
    drop(rt);
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(Duration::from_secs(10));
    // The dying pod's init is killed while berthd is down.
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.state.join("pods").join(&dying).join("pod.json")).unwrap(),
    )
    .unwrap();
    let pid = rec["init"][0].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.restart();
    let mut rt = b.runtime().await;
    let s = status(&mut rt, &alive).await;
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(ip_of(&s), ip);
    let _echo = Echo::tcp(&netns_pin(&b, &alive), 8080);
    assert_eq!(
        tcp_ping(&b.netns.clone().unwrap(), &format!("{ip}:8080")).unwrap(),
        "ping"
    );
    let s = status(&mut rt, &dying).await;
    assert_eq!(s.state, cri::PodSandboxState::SandboxNotready as i32);
    // A new pod does not get the live pod's address.
    let other = run(&mut rt, pod_config(&b, "other")).await.unwrap();
    assert_ne!(ip_of(&status(&mut rt, &other).await), ip);
    for id in [&alive, &dying, &other] {
        remove(&mut rt, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cidr_from_kubelet_addresses_new_pods() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    let old = run(&mut rt, pod_config(&b, "old")).await.unwrap();
    rt.update_runtime_config(cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: "10.244.3.0/24".into(),
            }),
        }),
    })
    .await
    .unwrap();
    let new = run(&mut rt, pod_config(&b, "new")).await.unwrap();
    let ip = ip_of(&status(&mut rt, &new).await);
    assert!(ip.starts_with("10.244.3."), "{ip}");
    let _echo = Echo::tcp(&netns_pin(&b, &new), 8080);
    assert_eq!(
        tcp_ping(&b.netns.clone().unwrap(), &format!("{ip}:8080")).unwrap(),
        "ping"
    );
    assert!(ip_of(&status(&mut rt, &old).await).starts_with("10.88."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_pod_creation_leaks_nothing_after_a_restart() {
    let mut b = Berthd::start_with(Options {
        log_level: Some("info".into()),
        ..Default::default()
    });
    let before = node::snapshot(&b);
    let rt = b.runtime().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut rt = rt.clone();
        let mut c = pod_config(&b, &format!("crash{i}"));
        c.port_mappings = vec![cri::PortMapping {
            protocol: 0,
            container_port: 80,
            host_port: 20000 + i,
            host_ip: String::new(),
        }];
        tasks.push(tokio::spawn(async move { run(&mut rt, c).await }));
    }
    // Kill berthd once some pods are up and others are half made.
    for _ in 0..500 {
        if b.log_text().matches("pod sandbox ready").count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(Duration::from_secs(10));
    for t in tasks {
        let _ = t.await;
    }
    drop(rt);
    b.restart();
    let mut rt = b.runtime().await;
    let items = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    let log = b.log_text();
    eprintln!(
        "{} pods survived the kill; {} creations were undone at restart",
        items.len(),
        log.matches("undoing a pod whose creation was interrupted")
            .count()
    );
    for p in &items {
        // Whatever survived is whole: ready, with its address answering.
        assert_eq!(p.state, cri::PodSandboxState::SandboxReady as i32);
        let ip = ip_of(&status(&mut rt, &p.id).await);
        let _echo = Echo::tcp(&netns_pin(&b, &p.id), 8080);
        assert_eq!(
            tcp_ping(&b.netns.clone().unwrap(), &format!("{ip}:8080")).unwrap(),
            "ping"
        );
    }
    for p in &items {
        remove(&mut rt, &p.id).await;
    }
    node::assert_back_to(&b, &before).await;
}
