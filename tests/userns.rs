//! Pods with a user namespace of their own (userns_options mode POD): the mapping the
//! container sees, its root filesystem owned by its own root through an idmapped mount, node
//! ids outside 0, and the requests berth cannot honour yet refused by name. Not yet claimed in
//! the handler features: shared PID namespaces and volumes are still refused.

mod common;

use common::world::*;
use k8s_cri::v1 as cri;
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
        ("pid POD", pod_mode(good()), cri::NamespaceMode::Pod),
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
    // Volumes would need idmapped mounts of their own: refused, nothing left.
    let c = userns_pod(&w, "vol", pod_mode(good()), cri::NamespaceMode::Container);
    let pod = w.run_pod(c).await;
    let before = w.leftovers();
    let mut c = container("vol", &["sleep", "3600"]);
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: w.env.berthd.dir.path().to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let err = w.create(&pod, c).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("user namespace"),
        "{}",
        err.message()
    );
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}
