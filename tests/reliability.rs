//! Reliability: what a busy or unlucky node does to berth. Each test reproduces a failure found
//! under load or after a fault — calls failing under churn, creates failing in shared-PID pods,
//! cancelled calls leaving things behind — and checks that every call succeeds and nothing is
//! left.

mod common;

use std::time::Duration;

use common::world::*;
use k8s_cri::v1 as cri;

/// One kubelet-like pod life: a pod of two containers, created, started, stopped, removed.
/// Returns the failed calls, by name and status.
async fn pod_life(mut rt: Rt, config: cri::PodSandboxConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |what: &str, e: tonic::Status| errors.push(format!("{what}: {e:?}"));
    let pod = match rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => {
            note("RunPodSandbox", e);
            return errors;
        }
    };
    let mut ids = Vec::new();
    for name in ["app", "sidecar"] {
        let r = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container(name, &["sleep", "3600"])),
                sandbox_config: Some(config.clone()),
            })
            .await;
        match r {
            Ok(r) => ids.push(r.into_inner().container_id),
            Err(e) => note("CreateContainer", e),
        }
    }
    for id in &ids {
        if let Err(e) = rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            note("StartContainer", e);
        }
    }
    for id in &ids {
        if let Err(e) = rt
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
        {
            note("StopContainer", e);
        }
        if let Err(e) = rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            note("RemoveContainer", e);
        }
    }
    if let Err(e) = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
    {
        note("StopPodSandbox", e);
    }
    if let Err(e) = rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
    {
        note("RemovePodSandbox", e);
    }
    errors
}

/// Found under a kubelet-like load: pods sharing one cgroup parent failed RemoveContainer and
/// CreateContainer with cgroup errors, one pod's teardown removing directories another's
/// containers were using.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_at_parallelism_ten_under_one_cgroup_parent_fails_no_call() {
    let w = World::new().await;
    let before = w.leftovers();
    let shared = format!("/{}/shared", w.env.berthd.cgroup_root);
    let configs: Vec<cri::PodSandboxConfig> = (0..40)
        .map(|i| {
            let mut c = w.pod_config(&format!("churn{i}"), cri::NamespaceMode::Container);
            c.linux.as_mut().unwrap().cgroup_parent = shared.clone();
            c
        })
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(configs));
    let mut workers = Vec::new();
    for _ in 0..10 {
        let rt = w.rt.clone();
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            loop {
                let next = queue.lock().unwrap().pop();
                let Some(c) = next else { break };
                errors.extend(pod_life(rt.clone(), c).await);
            }
            errors
        }));
    }
    // A poller lists, as kubelet's relist does, all the while.
    let mut poll_rt = w.rt.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let poller = tokio::spawn(async move {
        let mut errors = Vec::new();
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = poll_rt
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
            {
                errors.push(format!("ListPodSandbox: {e:?}"));
            }
            if let Err(e) = poll_rt
                .list_containers(cri::ListContainersRequest { filter: None })
                .await
            {
                errors.push(format!("ListContainers: {e:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        errors
    });
    let mut errors = Vec::new();
    for wk in workers {
        errors.extend(wk.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    errors.extend(poller.await.unwrap());
    assert!(
        errors.is_empty(),
        "{} failed calls: {errors:#?}",
        errors.len()
    );
    assert_eq!(w.leftovers(), before);
}

/// Found in shared-PID pods: about one CreateContainer in ten failed with a bare "failed to
/// prepare rootfs", and a long-lived pod ended failing every create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_creates_in_a_shared_pid_pod_all_succeed() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let c = w.pod_config("shared", cri::NamespaceMode::Pod);
    let pod = w.run_pod(c).await;
    let keeper = w.run(&pod, container("keeper", &["sleep", "3600"])).await;
    let mut errors = Vec::new();
    for i in 0..200 {
        let mut c = container(&format!("c{i}"), &["true"]);
        c.log_path = format!("c{i}.log");
        let id = match w.create(&pod, c).await {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("create {i}: {e:?}"));
                continue;
            }
        };
        if let Err(e) = w.start(&id).await {
            errors.push(format!("start {i}: {e:?}"));
        }
        w.stop(&id, 0).await;
        w.remove(&id).await;
    }
    assert!(errors.is_empty(), "{} failed: {errors:#?}", errors.len());
    assert_eq!(w.out(&keeper, &["echo", "alive"]).await, "alive");
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
}

/// The cgroup view berth mounts in place of the runtime's (which failed in shared-PID pods):
/// the container's own directory in each hierarchy, read-only, comounts under each name,
/// and no room to make anything in the tmpfs holding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_see_their_own_cgroups_read_only_in_either_pid_mode() {
    let mut w = World::new().await;
    for mode in [cri::NamespaceMode::Container, cri::NamespaceMode::Pod] {
        let c = w.pod_config("view", mode);
        let pod = w.run_pod(c).await;
        let mut c = container("limited", &["sleep", "3600"]);
        c.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 96 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = w.run(&pod, c).await;
        assert_eq!(
            w.out(&id, &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
                .await,
            (96u64 << 20).to_string(),
            "{mode:?}"
        );
        // Its own processes are what its cgroup lists.
        let procs = w
            .out(&id, &["cat", "/sys/fs/cgroup/pids/cgroup.procs"])
            .await;
        assert!(!procs.is_empty(), "{mode:?}");
        for hierarchy in common::cgroup_mounts() {
            let name = hierarchy
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if name == "unified" {
                continue;
            }
            let r = w
                .exec(
                    &id,
                    &["ls", &format!("/sys/fs/cgroup/{name}/cgroup.procs")],
                    10,
                )
                .await
                .unwrap();
            assert_eq!(r.exit_code, 0, "{mode:?}: /sys/fs/cgroup/{name} missing");
        }
        for cmd in [
            "echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes",
            "mkdir /sys/fs/cgroup/memory/escape",
            "mkdir /sys/fs/cgroup/new",
            "touch /sys/fs/cgroup/file",
        ] {
            let r = w.exec(&id, &["sh", "-c", cmd], 10).await.unwrap();
            assert_ne!(r.exit_code, 0, "{mode:?}: {cmd} succeeded");
        }
        w.remove_pod(&pod.0).await;
    }
}
