//! A cgroup v2 node (e2e/vm/run runs these in its guest, under each cgroup driver): the CRI
//! resources land in the unified hierarchy's files as kubelet and runc write them, the pod's
//! init sits in a leaf of its own, updates reach the files, unknown unified keys are refused
//! by name, and removal leaves no cgroup. On a v1 or hybrid host each test says it is skipped.

mod common;

use std::path::{Path, PathBuf};

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

const MIB: i64 = 1024 * 1024;

/// Whether this host mounts only cgroup v2; prints why a test is skipped otherwise.
fn unified(test: &str) -> bool {
    let v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !v2 {
        eprintln!("{test}: skipped: /sys/fs/cgroup is not cgroup2 here (e2e/vm/run runs it)");
    }
    v2
}

/// The container's cgroup directory on the node, from the `0::/path` line of its process as
/// the node sees it (inside, its own cgroup namespace shows `/`).
async fn cgroup_dir(_w: &mut World, id: &str) -> PathBuf {
    let pid = *processes_in_cgroup_of(id)
        .first()
        .unwrap_or_else(|| panic!("no process of container {id}"));
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup2 line in {text}"));
    Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

fn limited(c: cri::ContainerConfig, r: cri::LinuxContainerResources) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(r),
            ..Default::default()
        }),
        ..c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_land_in_the_unified_files_and_the_container_sees_its_own() {
    if !unified("limits") {
        return;
    }
    let mut w = World::new().await;
    let pod = w.pod("limits").await;
    let r = cri::LinuxContainerResources {
        cpu_shares: 512,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        memory_limit_in_bytes: 256 * MIB,
        cpuset_cpus: "0".into(),
        unified: [("pids.max".to_string(), "100".to_string())].into(),
        ..Default::default()
    };
    let id = w
        .run(&pod, limited(container("app", &["sleep", "3600"]), r))
        .await;
    let dir = cgroup_dir(&mut w, &id).await;
    // The conversion of shares onto weights runc 1.3+ and libcontainer use (1024 → 100).
    assert_eq!(read(&dir, "cpu.weight"), "59");
    assert_eq!(read(&dir, "cpu.max"), "50000 100000");
    assert_eq!(read(&dir, "memory.max"), (256 * MIB).to_string());
    assert_eq!(read(&dir, "cpuset.cpus"), "0");
    assert_eq!(read(&dir, "pids.max"), "100");
    // The container's /sys/fs/cgroup is its own directory (a cgroup namespace of its own).
    assert_eq!(
        w.out(&id, &["cat", "/sys/fs/cgroup/memory.max"]).await,
        (256 * MIB).to_string()
    );
    assert_eq!(w.out(&id, &["cat", "/proc/self/cgroup"]).await, "0::/");
    // Pressure stall figures come from the unified files, in the stats and in the metrics.
    let stats =
        w.rt.container_stats(cri::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.cpu.unwrap().psi.unwrap().some.is_some());
    assert!(stats.memory.unwrap().psi.unwrap().some.is_some());
    assert!(stats.io.unwrap().psi.unwrap().some.is_some());
    let metrics =
        w.rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pod_metrics;
    let mine = metrics
        .iter()
        .flat_map(|p| &p.container_metrics)
        .find(|c| c.container_id == id)
        .unwrap();
    let value = |name: &str| {
        mine.metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.value.map(|v| v.value))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(value("container_spec_cpu_quota"), 50_000);
    assert_eq!(value("container_spec_cpu_period"), 100_000);
    assert_eq!(value("container_spec_cpu_shares"), 512);
    assert_eq!(value("container_spec_memory_limit_bytes"), 256 * MIB as u64);
    assert_eq!(value("container_threads_max"), 100);
    value("container_pressure_cpu_waiting_seconds_total");
    // Every process of the pod is in a leaf: the kernel allows none in a cgroup that hands
    // controllers down.
    let pod_dir = dir.parent().unwrap().to_path_buf();
    assert_eq!(read(&pod_dir, "cgroup.procs"), "", "{}", pod_dir.display());
    w.remove_pod(&pod.0).await;
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(!pod_dir.exists(), "{} left", pod_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pid_namespace_puts_the_pods_init_in_a_leaf() {
    if !unified("shared pid") {
        return;
    }
    let mut w = World::new().await;
    let c = w.pod_config("shared", cri::NamespaceMode::Pod);
    let pod = w.run_pod(c).await;
    let id = w
        .run(
            &pod,
            limited(
                container("app", &["sleep", "3600"]),
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 * MIB,
                    ..Default::default()
                },
            ),
        )
        .await;
    let dir = cgroup_dir(&mut w, &id).await;
    assert_eq!(read(&dir, "memory.max"), (64 * MIB).to_string());
    let pod_dir = dir.parent().unwrap();
    assert_eq!(read(pod_dir, "cgroup.procs"), "", "{}", pod_dir.display());
    assert!(
        read(pod_dir, "cgroup.subtree_control").contains("memory"),
        "{}",
        pod_dir.display()
    );
    w.remove_pod(&pod.0).await;
    assert!(!pod_dir.exists(), "{} left", pod_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_reach_the_unified_files_and_unknown_keys_are_refused_by_name() {
    if !unified("updates") {
        return;
    }
    let mut w = World::new().await;
    let pod = w.pod("update").await;
    let base = cri::LinuxContainerResources {
        memory_limit_in_bytes: 256 * MIB,
        cpu_shares: 1024,
        ..Default::default()
    };
    let id = w
        .run(&pod, limited(container("app", &["sleep", "3600"]), base))
        .await;
    let dir = cgroup_dir(&mut w, &id).await;
    let update = |r: cri::LinuxContainerResources| cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(r),
        ..Default::default()
    };
    w.rt.update_container_resources(update(cri::LinuxContainerResources {
        memory_limit_in_bytes: 128 * MIB,
        cpu_shares: 2048,
        cpu_quota: 20_000,
        cpu_period: 100_000,
        unified: [("memory.high".to_string(), "100000000".to_string())].into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(read(&dir, "memory.max"), (128 * MIB).to_string());
    assert_eq!(read(&dir, "cpu.weight"), "174");
    assert_eq!(read(&dir, "cpu.max"), "20000 100000");
    assert_eq!(read(&dir, "memory.high"), "99999744");
    // A key that is no cgroup file: refused by name, nothing changed.
    let err =
        w.rt.update_container_resources(update(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 * MIB,
            unified: [("no.such_file".to_string(), "1".to_string())].into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("no.such_file"), "{}", err.message());
    assert_eq!(read(&dir, "memory.max"), (128 * MIB).to_string());
    // At create too, and no container is left of it.
    let err = w
        .create(
            &pod,
            limited(
                container("bad", &["sleep", "1"]),
                cri::LinuxContainerResources {
                    unified: [("../escape".to_string(), "1".to_string())].into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("../escape"), "{}", err.message());
    let list =
        w.rt.list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers;
    assert_eq!(list.len(), 1, "{list:?}");
    w.remove_pod(&pod.0).await;
}

/// `systemctl show -p <prop> --value <unit>`.
fn unit_prop(unit: &str, prop: &str) -> String {
    let out = std::process::Command::new("systemctl")
        .args(["show", "-p", prop, "--value", unit])
        .output()
        .expect("running systemctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A unit that is stopped: not active, not failed (systemd may keep an inactive slice loaded
/// while its parent is).
fn assert_gone(unit: &str) {
    let state = unit_prop(unit, "ActiveState");
    assert!(
        state == "inactive" || state.is_empty(),
        "{unit} is {state} ({})",
        unit_prop(unit, "LoadState")
    );
}

/// Whether the test's berthd runs the systemd driver (on a node with systemd); says why not.
fn systemd_run(test: &str) -> bool {
    if !common::systemd_driver() {
        eprintln!(
            "{test}: skipped: the cgroupfs driver runs (BERTH_TEST_CGROUP_DRIVER=systemd in e2e/vm/run's guest)"
        );
    }
    common::systemd_driver()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_reports_its_cgroup_version_and_driver() {
    let w = World::new().await;
    let mut rt = w.env.berthd.runtime().await;
    let info = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner()
        .info;
    let cg: serde_json::Value = serde_json::from_str(&info["cgroups"]).unwrap();
    let unified = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    let hybrid = !unified && Path::new("/sys/fs/cgroup/unified").exists();
    let version = if unified {
        "v2"
    } else if hybrid {
        "hybrid"
    } else {
        "v1"
    };
    assert_eq!(cg["version"], version, "{cg}");
    let driver = if common::systemd_driver() {
        "systemd"
    } else {
        "cgroupfs"
    };
    assert_eq!(cg["driver"], driver, "{cg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_units_hold_the_pod_and_its_containers_and_go_with_them() {
    if !systemd_run("units") {
        return;
    }
    let mut w = World::new().await;
    let c = w.pod_config("units", cri::NamespaceMode::Pod);
    let slice = c.linux.as_ref().unwrap().cgroup_parent.clone();
    let pod = w.run_pod(c).await;
    let r = cri::LinuxContainerResources {
        memory_limit_in_bytes: 96 * MIB,
        cpu_quota: 25_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    let id = w
        .run(&pod, limited(container("app", &["sleep", "3600"]), r))
        .await;
    let scope = format!("berth-{id}.scope");
    let init = format!("berth-init-{}.scope", pod.0);
    for unit in [&slice, &scope, &init] {
        assert_eq!(unit_prop(unit, "ActiveState"), "active", "{unit}");
    }
    assert_eq!(unit_prop(&scope, "Slice"), slice);
    assert_eq!(unit_prop(&scope, "Delegate"), "yes");
    assert_eq!(unit_prop(&scope, "MemoryMax"), (96 * MIB).to_string());
    let dir = cgroup_dir(&mut w, &id).await;
    assert!(
        dir.ends_with(format!("{slice}/{scope}")),
        "{}",
        dir.display()
    );
    assert_eq!(read(&dir, "cpu.max"), "25000 100000");
    // An update reaches the unit's properties and the files.
    w.rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 80 * MIB,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(unit_prop(&scope, "MemoryMax"), (80 * MIB).to_string());
    assert_eq!(read(&dir, "memory.max"), (80 * MIB).to_string());
    w.remove_pod(&pod.0).await;
    for unit in [&slice, &scope, &init] {
        assert_gone(unit);
    }
    assert!(!dir.exists(), "{} left", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_berthd_finds_its_units_again() {
    if !systemd_run("restart") {
        return;
    }
    let mut w = World::new().await;
    let c = w.pod_config("again", cri::NamespaceMode::Pod);
    let slice = c.linux.as_ref().unwrap().cgroup_parent.clone();
    let pod = w.run_pod(c).await;
    let id = w.run(&pod, container("app", &["sleep", "3600"])).await;
    let scope = format!("berth-{id}.scope");
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(std::time::Duration::from_secs(10));
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(
        w.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    assert_eq!(unit_prop(&scope, "ActiveState"), "active");
    assert_eq!(w.out(&id, &["echo", "still here"]).await, "still here");
    w.remove_pod(&pod.0).await;
    for unit in [&slice, &scope] {
        assert_gone(unit);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_init_leaf_goes_from_a_pod_cgroup_kubelet_made() {
    if !unified("kubelet's pod cgroup") || common::systemd_driver() {
        return;
    }
    let mut w = World::new().await;
    let c = w.pod_config("kubelets", cri::NamespaceMode::Pod);
    // kubelet makes the pod's cgroup before RunPodSandbox: it is not berth's to remove.
    let parent = c.linux.as_ref().unwrap().cgroup_parent.clone();
    let pod_dir = Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/'));
    std::fs::create_dir_all(&pod_dir).unwrap();
    let pod = w.run_pod(c).await;
    assert!(pod_dir.join("init").is_dir());
    w.remove_pod(&pod.0).await;
    assert!(!pod_dir.join("init").exists(), "the init leaf was left");
    assert!(pod_dir.is_dir(), "kubelet's pod cgroup was removed");
}
