//! UpdateContainerResources: new limits land in the container's cgroup files at once, are seen
//! from inside the container and in ContainerStatus, and a change the kernel refuses changes
//! nothing.

mod common;

use std::path::PathBuf;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

const MIB: i64 = 1024 * 1024;

/// The container's cgroup directory of a v1 controller (or the v2 one), from its
/// /proc/self/cgroup (the node's cgroup namespace on v1 hosts).
async fn cgroup_dir(w: &mut World, id: &str, controller: &str) -> PathBuf {
    let text = w.out(id, &["cat", "/proc/self/cgroup"]).await;
    for line in text.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next(), p.next().unwrap(), p.next().unwrap());
        if ctrls.split(',').any(|c| c == controller) {
            let mount = format!("/sys/fs/cgroup/{ctrls}");
            return PathBuf::from(mount).join(path.trim_start_matches('/'));
        }
    }
    panic!("no {controller} cgroup in {text}");
}

fn read(p: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(p.join(file))
        .unwrap()
        .trim()
        .to_string()
}

async fn update(
    w: &mut World,
    id: &str,
    r: cri::LinuxContainerResources,
) -> Result<(), tonic::Status> {
    w.rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.into(),
        linux: Some(r),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_updates_reach_the_cgroup_or_change_nothing() {
    let mut w = World::new().await;
    let pod = w.pod("resize").await;
    let mut c = container("app", &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 256 * MIB,
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    let mem = cgroup_dir(&mut w, &id, "memory").await;
    let cpu = cgroup_dir(&mut w, &id, "cpu").await;
    let cpuset = cgroup_dir(&mut w, &id, "cpuset").await;
    assert_eq!(read(&mem, "memory.limit_in_bytes"), (256 * MIB).to_string());

    let new = cri::LinuxContainerResources {
        memory_limit_in_bytes: 128 * MIB,
        cpu_shares: 256,
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpuset_cpus: "0".into(),
        ..Default::default()
    };
    update(&mut w, &id, new.clone()).await.unwrap();
    assert_eq!(read(&mem, "memory.limit_in_bytes"), (128 * MIB).to_string());
    assert_eq!(read(&cpu, "cpu.shares"), "256");
    assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
    assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "50000");
    assert_eq!(read(&cpuset, "cpuset.cpus"), "0");
    // The container's own view of its cgroup says the same.
    let inside = w
        .out(&id, &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
        .await;
    assert_eq!(inside, (128 * MIB).to_string());
    let r = w.status(&id).await.resources.unwrap().linux.unwrap();
    assert_eq!(
        (
            r.memory_limit_in_bytes,
            r.cpu_shares,
            r.cpu_quota,
            r.cpuset_cpus.as_str()
        ),
        (128 * MIB, 256, 50_000, "0")
    );

    // 40 MiB in a tmpfs cannot be reclaimed: a 16 MiB limit is refused, and the CPU change
    // sent with it is put back.
    let (code, out) = w
        .sh(&id, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=40 2>&1")
        .await;
    assert_eq!(code, 0, "{out}");
    let err = update(
        &mut w,
        &id,
        cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 * MIB,
            cpu_shares: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("memory.limit_in_bytes"),
        "{}",
        err.message()
    );
    assert_eq!(read(&mem, "memory.limit_in_bytes"), (128 * MIB).to_string());
    assert_eq!(read(&cpu, "cpu.shares"), "256");
    let r = w.status(&id).await.resources.unwrap().linux.unwrap();
    assert_eq!((r.memory_limit_in_bytes, r.cpu_shares), (128 * MIB, 256));

    // Unknown and exited containers, and bad values.
    let err = update(&mut w, "feedface", new.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bad = cri::LinuxContainerResources {
        cpu_quota: -7,
        ..Default::default()
    };
    let err = update(&mut w, &id, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    w.stop(&id, 0).await;
    let err = update(&mut w, &id, new).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    w.remove_pod(&pod.0).await;
}

/// kubelet (1.37) sends a limit for every huge page size the node knows, zero where the pod
/// asks for none, at create and again with every resize.
fn zero_hugepage_limits() -> Vec<cri::HugepageLimit> {
    ["2MB", "1GB"]
        .into_iter()
        .map(|size| cri::HugepageLimit {
            page_size: size.into(),
            limit: 0,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_with_kubelets_zero_hugepage_limits_reaches_the_cgroup() {
    let mut w = World::new().await;
    let pod = w.pod("resize-hp").await;
    let mut c = container("app", &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 256 * MIB,
            cpu_shares: 512,
            hugepage_limits: zero_hugepage_limits(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    let mem = cgroup_dir(&mut w, &id, "memory").await;
    let cpu = cgroup_dir(&mut w, &id, "cpu").await;
    let resize = cri::LinuxContainerResources {
        memory_limit_in_bytes: 192 * MIB,
        cpu_shares: 768,
        hugepage_limits: zero_hugepage_limits(),
        ..Default::default()
    };
    update(&mut w, &id, resize).await.unwrap();
    assert_eq!(read(&mem, "memory.limit_in_bytes"), (192 * MIB).to_string());
    assert_eq!(read(&cpu, "cpu.shares"), "768");
    w.remove_pod(&pod.0).await;
}
