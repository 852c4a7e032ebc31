//! Pods with a user namespace of their own (userns_options mode POD): the mapping the
//! container sees, its root filesystem owned by its own root through an idmapped mount, node
//! ids outside 0, volumes and image volumes idmapped, and the requests berth cannot honour yet
//! refused by name. Not yet claimed in the handler features: shared PID namespaces and volumes
//! are still refused.

mod common;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

const HOST_ID: u32 = 300_000;

fn mapping(container: u32, host: u32, len: u32) -> cri::IdMapping {
    cri::IdMapping {
        container_id: container,
        host_id: host,
        length: len,
    }
}

/// A pod config whose user namespace options are `u` (pid CONTAINER unless `pid` says).
fn userns_pod(
    w: &World,
    name: &str,
    u: cri::UserNamespace,
    pid: cri::NamespaceMode,
) -> cri::PodSandboxConfig {
    let mut c = w.pod_config(name, pid);
    let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.namespace_options.as_mut().unwrap().userns_options = Some(u);
    c
}

fn pod_mode(maps: Vec<cri::IdMapping>) -> cri::UserNamespace {
    cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: maps.clone(),
        gids: maps,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_user_namespace_maps_root_to_a_node_id_and_owns_its_root_filesystem() {
    if !common::handler().is_empty() {
        eprintln!(
            "skipped: the embedded runtime's user namespaces (tests/security.rs checks the refusal under a handler)"
        );
        return;
    }
    let mut w = World::new().await;
    let c = userns_pod(
        &w,
        "userns",
        pod_mode(vec![mapping(0, HOST_ID, 65_536)]),
        cri::NamespaceMode::Container,
    );
    let pod = w.run_pod(c).await;
    let id = w.run(&pod, container("app", &["sleep", "3600"])).await;
    let map: Vec<String> = w
        .out(&id, &["cat", "/proc/self/uid_map"])
        .await
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(map, ["0", &HOST_ID.to_string(), "65536"]);
    assert_eq!(w.out(&id, &["id", "-u"]).await, "0");
    // The image's files are its root's, and it can write where root may.
    assert_eq!(w.out(&id, &["stat", "-c", "%u:%g", "/bin"]).await, "0:0");
    let (code, out) = w
        .sh(
            &id,
            "echo hi > /root-owned && chmod 600 /root-owned && cat /root-owned",
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "hi"));
    // On the node its processes run as the mapped id, not as root.
    let procs = processes_in_cgroup_of(&id);
    assert!(!procs.is_empty());
    for p in procs {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace()
                .skip(1)
                .all(|u| u == HOST_ID.to_string()),
            "{uid}"
        );
    }
    // Its namespaces are the user namespace's: it may change its own hostname, which the
    // node's root cannot stop it from with a missing capability.
    assert_eq!(w.out(&id, &["hostname"]).await, "userns");
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespace_requests_berth_cannot_honour_are_refused_by_name() {
    if !common::handler().is_empty() {
        eprintln!(
            "skipped: the embedded runtime's user namespaces (tests/security.rs checks the refusal under a handler)"
        );
        return;
    }
    let mut w = World::new().await;
    let before = w.leftovers();
    let good = || vec![mapping(0, HOST_ID, 65_536)];
    let cases = [
        (
            "exactly one uid mapping",
            pod_mode(vec![mapping(0, HOST_ID, 10), mapping(10, 1, 5)]),
            cri::NamespaceMode::Container,
        ),
        (
            "container id 0",
            pod_mode(vec![mapping(1, HOST_ID, 10)]),
            cri::NamespaceMode::Container,
        ),
        (
            "not a range",
            pod_mode(vec![mapping(0, u32::MAX, 10)]),
            cri::NamespaceMode::Container,
        ),
        (
            "CONTAINER",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Container as i32,
                ..Default::default()
            },
            cri::NamespaceMode::Container,
        ),
        (
            "TARGET",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Target as i32,
                ..Default::default()
            },
            cri::NamespaceMode::Container,
        ),
    ];
    for (what, u, pid) in cases {
        let c = userns_pod(&w, "bad", u, pid);
        let err =
            w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(c),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(
            err.message().contains("userns_options"),
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains(what), "{what}: {}", err.message());
    }
    assert_eq!(w.leftovers(), before);
    // A volume whose propagation would reach the host's mount: an idmapped copy cannot.
    let c = userns_pod(&w, "vol", pod_mode(good()), cri::NamespaceMode::Container);
    let pod = w.run_pod(c).await;
    let before = w.leftovers();
    let mut c = container("vol", &["sleep", "3600"]);
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: w.env.berthd.dir.path().to_string_lossy().into_owned(),
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..Default::default()
    }];
    let err = w.create(&pod, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("/data") && err.message().contains("user namespace"),
        "{}",
        err.message()
    );
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_a_user_namespaced_pod_are_idmapped() {
    if !common::handler().is_empty() {
        eprintln!("skipped: the embedded runtime's user namespaces");
        return;
    }
    let mut w = World::new().await;
    let before = w.leftovers();
    // A directory and a file of the node's root, as kubelet's emptyDir and termination log.
    let host = w.env.berthd.dir.path().join("vol");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("from-node"), "node\n").unwrap();
    let file = w.env.berthd.dir.path().join("termination-log");
    std::fs::write(&file, "").unwrap();
    let c = userns_pod(
        &w,
        "vols",
        pod_mode(vec![mapping(0, HOST_ID, 65_536)]),
        cri::NamespaceMode::Pod,
    );
    let pod = w.run_pod(c).await;
    // Mappings other than the pod's, or on a pod without a user namespace: refused.
    let before_vols = w.leftovers();
    let mut c = container("bad-map", &["sleep", "3600"]);
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: host.to_string_lossy().into_owned(),
        uid_mappings: vec![mapping(0, HOST_ID + 1, 65_536)],
        gid_mappings: vec![mapping(0, HOST_ID + 1, 65_536)],
        ..Default::default()
    }];
    let err = w.create(&pod, c.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("/data"), "{}", err.message());
    let plain = w.pod("no-userns").await;
    let err = w.create(&plain, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("no user namespace"),
        "{}",
        err.message()
    );
    w.remove_pod(&plain.0).await;
    assert_eq!(w.leftovers(), before_vols);
    // As kubelet sends them: each volume with the pod's own mappings (or none).
    let mut c = container("vols", &["sleep", "3600"]);
    c.mounts = vec![
        cri::Mount {
            container_path: "/data".into(),
            host_path: host.to_string_lossy().into_owned(),
            uid_mappings: vec![mapping(0, HOST_ID, 65_536)],
            gid_mappings: vec![mapping(0, HOST_ID, 65_536)],
            ..Default::default()
        },
        cri::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: file.to_string_lossy().into_owned(),
            ..Default::default()
        },
        cri::Mount {
            container_path: "/ro".into(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        },
        // An image volume: its layers are idmapped like the root filesystem's.
        cri::Mount {
            container_path: "/iv".into(),
            readonly: true,
            image: Some(cri::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let id = w.run(&pod, c).await;
    assert_eq!(
        w.out(&id, &["stat", "-c", "%u:%g", "/iv/bin/sh"]).await,
        "0:0"
    );
    assert_eq!(w.out(&id, &["/iv/bin/echo", "ran"]).await, "ran");
    // The node's root's files are the pod root's inside; what it writes is the node's root's
    // on the node (the copy maps ids both ways).
    assert_eq!(
        w.out(&id, &["stat", "-c", "%u:%g", "/data/from-node"])
            .await,
        "0:0"
    );
    assert_eq!(w.out(&id, &["cat", "/data/from-node"]).await, "node");
    let (code, _) = w
        .sh(
            &id,
            "echo pod > /data/from-pod && echo done > /dev/termination-log",
        )
        .await;
    assert_eq!(code, 0);
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(host.join("from-pod")).unwrap();
    assert_eq!((made.uid(), made.gid()), (0, 0));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "done\n");
    let (code, _) = w.sh(&id, "touch /ro/nope").await;
    assert_ne!(code, 0, "a read-only volume took a write");
    // Nothing stays attached on the node once the container holds its mounts.
    let idmapped = w.env.berthd.state.join("idmapped");
    assert_eq!(std::fs::read_dir(&idmapped).unwrap().count(), 0);
    w.remove_pod(&pod.0).await;
    assert_eq!(
        std::fs::read_to_string(host.join("from-pod")).unwrap(),
        "pod\n"
    );
    assert_eq!(w.leftovers(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_user_namespace_with_a_shared_pid_namespace_owns_it() {
    if !common::handler().is_empty() {
        eprintln!("skipped: the embedded runtime's user namespaces");
        return;
    }
    let mut w = World::new().await;
    let before = w.leftovers();
    let c = userns_pod(
        &w,
        "userns-pid",
        pod_mode(vec![mapping(0, HOST_ID, 65_536)]),
        cri::NamespaceMode::Pod,
    );
    let pod = w.run_pod(c).await;
    let a = w.run(&pod, container("a", &["sleep", "3600"])).await;
    let b = w.run(&pod, container("b", &["sleep", "3601"])).await;
    // One PID namespace: the pod's init is PID 1, and each container sees the other's
    // process in its own /proc (mounted in a namespace the pod's user namespace owns).
    let ps = w.out(&b, &["ps", "-o", "pid,user,args"]).await;
    assert!(
        ps.contains("sleep 3600") && ps.contains("sleep 3601"),
        "{ps}"
    );
    let init = w.out(&a, &["cat", "/proc/1/cmdline"]).await;
    assert!(init.starts_with("berth-init"), "{init:?}");
    // The init runs as 65535 inside, the mapped id outside, with nothing of the node.
    let status = w.out(&a, &["cat", "/proc/1/status"]).await;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        field("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == "65535"),
        "{status}"
    );
    assert_eq!(field("CapEff:"), "CapEff:\t0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "NoNewPrivs:\t1");
    let init_pid = pod_init_pid(&w, &pod.0);
    let node_view = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    let uid = node_view.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let mapped = (HOST_ID + 65535).to_string();
    assert!(uid.split_whitespace().skip(1).all(|u| u == mapped), "{uid}");
    // Its PID namespace belongs to the pod's user namespace.
    let pid_ns_owner = nix_ns_owner(init_pid, "pid");
    let user_ns = std::fs::metadata(format!("/proc/{init_pid}/ns/user")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(pid_ns_owner, (user_ns.dev(), user_ns.ino()));
    // An exec joins it too.
    let (code, out) = w.sh(&a, "ps | grep -c 'sleep 360[01]'").await;
    assert_eq!((code, out.trim()), (0, "2"));
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
}

/// The pod's init pid, from berthd's record.
fn pod_init_pid(w: &World, pod: &str) -> i64 {
    let path = w.env.berthd.state.join("pods").join(pod).join("pod.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["init"][0].as_i64().expect("an init pid")
}

/// (dev, ino) of the user namespace owning process `pid`'s namespace of `kind`
/// (ioctl NS_GET_USERNS).
fn nix_ns_owner(pid: i64, kind: &str) -> (u64, u64) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/{kind}")).unwrap();
    // NS_GET_USERNS = _IO(0xb7, 0x1).
    // SAFETY: the ioctl takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), 0xb701) };
    assert!(
        fd >= 0,
        "NS_GET_USERNS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just made this descriptor for us.
    let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let m = owner.metadata().unwrap();
    (m.dev(), m.ino())
}

/// berthd killed while a volume's idmapped copy is attached (after the spec, before the
/// runtime made the container): the restart detaches it without touching the host's data,
/// and the retried create works.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_with_a_volume_copy_attached_leaves_the_host_data_and_no_mount() {
    if !common::handler().is_empty() {
        eprintln!("skipped: the embedded runtime's user namespaces");
        return;
    }
    let mut w = World::new().await;
    let before = w.leftovers();
    let host = w.env.berthd.dir.path().join("precious");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("keep"), "mine\n").unwrap();
    let c = userns_pod(
        &w,
        "vol-kill",
        pod_mode(vec![mapping(0, HOST_ID, 65_536)]),
        cri::NamespaceMode::Container,
    );
    let pod = w.run_pod(c).await;
    let volume = |name: &str| {
        let mut c = container(name, &["sleep", "3600"]);
        c.mounts = vec![
            cri::Mount {
                container_path: "/data".into(),
                host_path: host.to_string_lossy().into_owned(),
                ..Default::default()
            },
            // An image volume's overlay and its sub path's copy are attached the same way.
            cri::Mount {
                container_path: "/ibin".into(),
                readonly: true,
                image: Some(cri::ImageSpec {
                    image: BUSYBOX.into(),
                    ..Default::default()
                }),
                image_sub_path: "bin".into(),
                ..Default::default()
            },
        ];
        c
    };
    let b = &mut w.env.berthd;
    b.terminate();
    b.env = vec![("BERTH_FAILPOINTS".into(), "create:spec=kill".into())];
    b.restart();
    w.rt = w.env.berthd.runtime().await;
    assert!(w.create(&pod, volume("v")).await.is_err());
    w.env.berthd.wait_exit(std::time::Duration::from_secs(10));
    // The copy, the image's overlay and its sub path's copy are still attached, as the kill
    // left them.
    let idmapped = w.env.berthd.state.join("idmapped");
    let mut left: Vec<String> = std::fs::read_dir(&idmapped)
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .split_once('.')
                .unwrap()
                .1
                .to_string()
        })
        .collect();
    left.sort();
    assert_eq!(left, ["0", "img1", "img1.sub"]);
    let b = &mut w.env.berthd;
    b.env = Vec::new();
    b.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(std::fs::read_dir(&idmapped).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_to_string(host.join("keep")).unwrap(),
        "mine\n"
    );
    let id = w.run(&pod, volume("v")).await;
    assert_eq!(w.out(&id, &["cat", "/data/keep"]).await, "mine");
    assert_eq!(w.out(&id, &["/ibin/echo", "ran"]).await, "ran");
    w.remove_pod(&pod.0).await;
    assert_eq!(
        std::fs::read_to_string(host.join("keep")).unwrap(),
        "mine\n"
    );
    assert_eq!(w.leftovers(), before);
}
