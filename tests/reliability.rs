//! Reliability: what a busy or unlucky node does to berth. Each test reproduces a failure found
//! under load or after a fault — calls failing under churn, creates failing in shared-PID pods,
//! cancelled calls leaving things behind — and checks that every call succeeds and nothing is
//! left.

mod common;

use std::time::Duration;

use berth::cri::v1 as cri;
use common::world::*;

/// Found under a kubelet-like load: pods sharing one cgroup parent failed RemoveContainer and
/// CreateContainer with cgroup errors, one pod's teardown removing directories another's
/// containers were using.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_at_parallelism_ten_under_one_cgroup_parent_fails_no_call() {
    let w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let shared = common::pod_cgroup_parent(&w.env.berthd.cgroup_root, "shared");
    let mut configs: Vec<cri::PodSandboxConfig> = (0..40)
        .map(|i| {
            let mut c = w.pod_config(&format!("churn{i}"), cri::NamespaceMode::Container);
            c.linux.as_mut().unwrap().cgroup_parent = shared.clone();
            c
        })
        .collect();
    let t = common::churn::run(&w.rt, 10, Duration::from_millis(200), move || configs.pop()).await;
    assert!(
        t.errors.is_empty(),
        "{} failed calls: {:#?}",
        t.errors.len(),
        t.errors
    );
    assert_eq!(t.pods, 40);
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// Found in shared-PID pods: about one CreateContainer in ten failed with a bare "failed to
/// prepare rootfs", and a long-lived pod ended failing every create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_creates_in_a_shared_pid_pod_all_succeed() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
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
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
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

/// A pod's state as PodSandboxStatus reports it.
async fn pod_state(rt: &mut Rt, pod: &str) -> i32 {
    pod_status(rt, pod).await.state
}

/// The steps of CreateContainer and RunPodSandbox where a failpoint can act.
#[cfg(feature = "failpoints")]
const CREATE_STEPS: &[&str] = &[
    "create:recorded",
    "create:rootfs",
    "create:spec",
    "create:made",
];
#[cfg(feature = "failpoints")]
const RUN_STEPS: &[&str] = &[
    "run:recorded",
    "run:cgroup",
    "run:namespaces",
    "run:network",
    "run:monitor",
];

/// Each step pauses this long, so a client deadline of (k + 0.5) pauses cancels the call
/// while it is at step k.
#[cfg(feature = "failpoints")]
const PAUSE_MS: u64 = 300;

#[cfg(feature = "failpoints")]
fn pausing_at(steps: &[&str]) -> common::Options {
    common::Options {
        env: vec![(
            "BERTH_FAILPOINTS".into(),
            steps
                .iter()
                .map(|s| format!("{s}=sleep({PAUSE_MS})"))
                .collect::<Vec<_>>()
                .join(","),
        )],
        extra_config: "unclaimed_timeout_seconds = 3\n".into(),
        ..Default::default()
    }
}

/// The deadline that cancels a call at its step `k`.
#[cfg(feature = "failpoints")]
fn deadline_at(k: usize) -> Duration {
    Duration::from_millis(PAUSE_MS * k as u64 + PAUSE_MS / 2)
}

/// Sends `req` as a client with a deadline does: the grpc-timeout header, and the call
/// dropped (its stream reset) when the deadline passes.
#[cfg(feature = "failpoints")]
async fn with_deadline<T, F>(d: Duration, call: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(d, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}", s.code())),
        Err(_) => Err("client deadline".into()),
    }
}

#[cfg(feature = "failpoints")]
fn timed<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}

#[cfg(feature = "failpoints")]
async fn containers_named(rt: &mut Rt, name: &str) -> Vec<cri::Container> {
    rt.list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
        .collect()
}

/// Found: a CreateContainer whose caller gave up still made the container, which nothing
/// listed and only the pod's removal cleaned. Now, cancelled at each of its steps, the
/// making ends; a retry claims the container (one container, not two), and one nobody
/// claims goes after the unclaimed timeout.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cancelled_at_any_step_is_claimed_by_a_retry_or_removed() {
    let mut w = World::with(pausing_at(CREATE_STEPS)).await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    for (k, step) in CREATE_STEPS.iter().enumerate() {
        let pod = w.pod(&format!("cancel{k}")).await;
        let req = |name: &str| cri::CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(container(name, &["sleep", "3600"])),
            sandbox_config: Some(pod.1.clone()),
        };
        let d = deadline_at(k);
        // Retried: the retry gets the container the cancelled call made.
        let mut rt = w.rt.clone();
        let first = with_deadline(d, rt.create_container(timed(req("retried"), d))).await;
        assert!(first.is_err(), "step {}: {first:?}", step);
        let id = w
            .create(&pod, req("retried").config.unwrap())
            .await
            .unwrap();
        let listed = containers_named(&mut w.rt, "retried").await;
        assert_eq!(listed.len(), 1, "step {}", step);
        assert_eq!(listed[0].id, id);
        w.start(&id).await.unwrap();
        // Not retried: the container is made, listed, and goes by itself; the claimed one
        // outlives the unclaimed timeout.
        let mut rt = w.rt.clone();
        let gone = with_deadline(d, rt.create_container(timed(req("abandoned"), d))).await;
        assert!(gone.is_err(), "step {}: {gone:?}", step);
        let mut rt = w.rt.clone();
        eventually_async(&mut rt, "abandoned", 1).await;
        eventually_async(&mut rt, "abandoned", 0).await;
        assert_eq!(containers_named(&mut w.rt, "retried").await.len(), 1);
        w.remove_pod(&pod.0).await;
    }
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

#[cfg(feature = "failpoints")]
async fn eventually_async(rt: &mut Rt, name: &str, count: usize) {
    for _ in 0..200 {
        if containers_named(rt, name).await.len() == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {count} containers named {name}");
}

#[cfg(feature = "failpoints")]
async fn pods_named(rt: &mut Rt, name: &str) -> Vec<cri::PodSandbox> {
    rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .collect()
}

/// RunPodSandbox cancelled at each step: the retry gets the pod the cancelled call made (no
/// "name reserved", no second pod), and a pod nobody claims goes after the unclaimed timeout,
/// with its network and cgroup.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cancelled_at_any_step_is_claimed_by_a_retry_or_removed() {
    let mut w = World::with(pausing_at(RUN_STEPS)).await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    for (k, step) in RUN_STEPS.iter().enumerate() {
        let d = deadline_at(k);
        let retried = w.pod_config(&format!("retried{k}"), cri::NamespaceMode::Pod);
        let req = |c: &cri::PodSandboxConfig| cri::RunPodSandboxRequest {
            config: Some(c.clone()),
            runtime_handler: String::new(),
        };
        let mut rt = w.rt.clone();
        let first = with_deadline(d, rt.run_pod_sandbox(timed(req(&retried), d))).await;
        assert!(first.is_err(), "step {}: {first:?}", step);
        let (id, _) = w.run_pod(retried.clone()).await;
        let listed = pods_named(&mut w.rt, &format!("retried{k}")).await;
        assert_eq!(listed.len(), 1, "step {}", step);
        assert_eq!(listed[0].id, id);
        let abandoned = w.pod_config(&format!("abandoned{k}"), cri::NamespaceMode::Pod);
        let mut rt = w.rt.clone();
        let gone = with_deadline(d, rt.run_pod_sandbox(timed(req(&abandoned), d))).await;
        assert!(gone.is_err(), "step {}: {gone:?}", step);
        let name = format!("abandoned{k}");
        let mut appeared = false;
        for _ in 0..200 {
            let n = pods_named(&mut w.rt, &name).await.len();
            appeared |= n == 1;
            if appeared && n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(appeared, "step {}: the abandoned pod never showed", step);
        assert!(
            pods_named(&mut w.rt, &name).await.is_empty(),
            "step {}: still there",
            step
        );
        // The claimed pod outlived the timeout and still takes containers.
        let pod = (id, retried);
        let c = w.run(&pod, container("app", &["sleep", "3600"])).await;
        assert_eq!(w.out(&c, &["echo", "ok"]).await, "ok");
        w.stop(&c, 0).await;
        w.remove(&c).await;
        w.remove_pod(&pod.0).await;
    }
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// Checks that berthd's failpoints killed it `n` times in all (the test's kills happened).
#[cfg(feature = "failpoints")]
fn assert_killed(w: &World, n: usize) {
    let kills = w
        .env
        .berthd
        .log_text()
        .matches("failpoint: killing berthd")
        .count();
    assert_eq!(kills, n, "failpoint kills");
}

/// Restarts the world's berthd with `failpoints` in its environment (empty: none).
#[cfg(feature = "failpoints")]
async fn restart_with(w: &mut World, failpoints: &str) {
    let b = &mut w.env.berthd;
    if b.running() {
        b.terminate();
    }
    b.env = if failpoints.is_empty() {
        Vec::new()
    } else {
        vec![("BERTH_FAILPOINTS".into(), failpoints.into())]
    };
    b.restart();
    w.rt = b.runtime().await;
}

/// berthd killed at each step of CreateContainer and started again: the half-made container
/// is undone, the retried call succeeds with one container of that name, and once all is
/// removed nothing of it is left on the node.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_killed_at_any_step_of_a_create_comes_back_whole() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let pod = w.pod("killed").await;
    let keeper = w.run(&pod, container("keeper", &["sleep", "3600"])).await;
    for step in CREATE_STEPS {
        restart_with(&mut w, &format!("{step}=kill")).await;
        let name = step.replace(':', "-");
        let r = w.create(&pod, container(&name, &["sleep", "3600"])).await;
        assert!(r.is_err(), "{step}: berthd answered {r:?}");
        w.env.berthd.wait_exit(Duration::from_secs(10));
        restart_with(&mut w, "").await;
        let id = w
            .create(&pod, container(&name, &["sleep", "3600"]))
            .await
            .unwrap_or_else(|e| panic!("{step}: the retry failed: {e:?}"));
        w.start(&id).await.unwrap();
        assert_eq!(w.out(&id, &["echo", "up"]).await, "up", "{step}");
        let named =
            w.rt.list_containers(cri::ListContainersRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .containers
                .into_iter()
                .filter(|c| c.metadata.as_ref().unwrap().name == name)
                .count();
        assert_eq!(named, 1, "{step}");
        // The container running before every kill still runs.
        assert_eq!(w.out(&keeper, &["echo", "alive"]).await, "alive", "{step}");
        w.stop(&id, 0).await;
        w.remove(&id).await;
    }
    // Each step's failpoint did kill berthd.
    assert_killed(&w, CREATE_STEPS.len());
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// berthd killed at each step of RunPodSandbox: the retry makes the pod, and after removal
/// no link, address, pin, mount or cgroup of the half-made one is left.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_killed_at_any_step_of_a_run_comes_back_whole() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    for step in RUN_STEPS {
        restart_with(&mut w, &format!("{step}=kill")).await;
        let config = w.pod_config(&step.replace(':', "-"), cri::NamespaceMode::Pod);
        let r =
            w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await;
        assert!(r.is_err(), "{step}: berthd answered {r:?}");
        w.env.berthd.wait_exit(Duration::from_secs(10));
        restart_with(&mut w, "").await;
        let pod = w.run_pod(config).await;
        let c = w.run(&pod, container("app", &["sleep", "3600"])).await;
        assert_eq!(w.out(&c, &["echo", "up"]).await, "up", "{step}");
        w.stop(&c, 0).await;
        w.remove(&c).await;
        w.remove_pod(&pod.0).await;
    }
    assert_killed(&w, RUN_STEPS.len());
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// Found: an image whose /etc/resolv.conf links to /run/systemd/resolve/stub-resolv.conf (as
/// images made for systemd-resolved ship it) failed every CreateContainer with "failed to
/// prepare rootfs". The pod's files, the WORKDIR and a volume's target are made where the
/// image's links point, inside the image, with the directories leading there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_workdir_and_volumes_behind_dangling_links_are_made_inside_the_image() {
    const IMAGE: &str = "docker.io/berth-test/resolved-links:latest";
    let mut w = World::new().await;
    pull(&w.env.berthd, IMAGE).await;
    let before = w.leftovers();
    let mut c = w.pod_config("links", cri::NamespaceMode::Container);
    c.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.0.0.10".into()],
        ..Default::default()
    });
    let pod = w.run_pod(c).await;
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("marker"), "from the node\n").unwrap();
    let mut c = container("links", &["sleep", "3600"]);
    c.image = Some(cri::ImageSpec {
        image: IMAGE.into(),
        ..Default::default()
    });
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: volume.path().to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let id = w.run(&pod, c).await;
    // The runtime is handed destinations without links: it need not walk `..` itself (its
    // walk fails EAGAIN while mounts happen elsewhere on the node).
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            w.env
                .berthd
                .state
                .join("containers")
                .join(&id)
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dests: Vec<&str> = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["destination"].as_str())
        .collect();
    for (link, real) in [
        ("/etc/hosts", "/run/netconf/hosts"),
        ("/etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf"),
        ("/etc/hostname", "/etc/hostname.real"),
        ("/data", "/var/lib/appdata"),
    ] {
        assert!(
            dests.contains(&real) && !dests.contains(&link),
            "{link}: {dests:?}"
        );
    }
    let resolv = w
        .out(&id, &["cat", "/run/systemd/resolve/stub-resolv.conf"])
        .await;
    assert!(resolv.contains("nameserver 10.0.0.10"), "{resolv}");
    assert_eq!(w.out(&id, &["cat", "/etc/resolv.conf"]).await, resolv);
    let hosts = w.out(&id, &["cat", "/run/netconf/hosts"]).await;
    assert!(hosts.contains("managed by berth"), "{hosts}");
    assert_eq!(w.out(&id, &["cat", "/etc/hostname"]).await, "links");
    assert_eq!(w.out(&id, &["pwd", "-P"]).await, "/srv/app");
    assert_eq!(
        w.out(&id, &["cat", "/var/lib/appdata/marker"]).await,
        "from the node"
    );
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
}

/// Found: requests over 4 MiB were refused (OutOfRange) where kubelet sends up to 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_up_to_kubelets_16_mib_are_taken() {
    let w = World::new().await;
    let mut rt = berth::cri::v1::runtime_service_client::RuntimeServiceClient::new(
        w.env.berthd.channel().await,
    )
    .max_decoding_message_size(16 << 20)
    // Larger than berthd takes, so that berthd is the one to refuse below.
    .max_encoding_message_size(64 << 20);
    let big = "x".repeat(10 << 20);
    let r = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: std::collections::HashMap::from([("k".to_string(), big)]),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert!(r.into_inner().containers.is_empty());
    // Past the limit: refused by size, and berthd keeps serving.
    let huge = "x".repeat(17 << 20);
    let e = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: std::collections::HashMap::from([("k".to_string(), huge)]),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    rt.version(cri::VersionRequest::default()).await.unwrap();
}

/// Runs berthd on the world's directories expecting it to refuse to start; returns what it
/// said.
fn refused_start(w: &World) -> String {
    let out = w
        .env
        .berthd
        .command("info")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "berthd started on a broken store");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A record berthd cannot read stops its start with a message naming the file, and nothing
/// is changed: once the file is repaired, everything is there as before. The same for a
/// store written in a newer format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_store_stops_the_start_and_is_left_untouched() {
    let mut w = World::new().await;
    let pod = w.pod("kept").await;
    let id = w.run(&pod, container("kept", &["sleep", "3600"])).await;
    w.env.berthd.terminate();
    let record = w
        .env
        .berthd
        .state
        .join("containers")
        .join(&id)
        .join("container.json");
    let good = std::fs::read(&record).unwrap();
    std::fs::write(&record, b"{\"id\": \"torn").unwrap();
    let said = refused_start(&w);
    assert!(
        said.contains(&record.display().to_string()) && said.contains("does not start"),
        "{said}"
    );
    assert_eq!(std::fs::read(&record).unwrap(), b"{\"id\": \"torn");
    assert!(w.env.berthd.state.join("pods").join(&pod.0).exists());
    std::fs::write(&record, &good).unwrap();

    let schema = w.env.berthd.root.join("schema.json");
    let current = std::fs::read(&schema).unwrap();
    std::fs::write(&schema, b"{\"schema\": 99}").unwrap();
    let said = refused_start(&w);
    assert!(said.contains("format 99"), "{said}");
    std::fs::write(&schema, &current).unwrap();

    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(
        w.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    assert_eq!(w.out(&id, &["echo", "still"]).await, "still");
    w.remove_pod(&pod.0).await;
}

/// berthd killed at a step of StartContainer, StopContainer, RemoveContainer, StopPodSandbox,
/// RemovePodSandbox or PullImage: after a restart the call, retried, succeeds (or the
/// operation already stands done), and once everything is removed nothing is left.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_killed_inside_start_stop_remove_and_pull_comes_back_whole() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let running = cri::ContainerState::ContainerRunning as i32;
    let exited = cri::ContainerState::ContainerExited as i32;
    let steps = [
        "start:started",
        "stop:killed",
        "remove:deleted",
        "stoppod:torn-down",
        "removepod:removed",
        "pull:unpacked",
    ];
    for step in steps {
        // Made before the failpoint is armed.
        let pod = w.pod(&step.replace(':', "-")).await;
        let id = w
            .create(&pod, container("c", &["sleep", "3600"]))
            .await
            .unwrap();
        if step != "start:started" {
            w.start(&id).await.unwrap();
        }
        if matches!(step, "remove:deleted" | "removepod:removed") {
            w.stop(&id, 0).await;
        }
        if step == "removepod:removed" {
            w.remove(&id).await;
            w.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.0.clone(),
            })
            .await
            .unwrap();
        }
        let snapshots_before = dir_names(&w.env.berthd.root.join("snapshots"));
        restart_with(&mut w, &format!("{step}=kill")).await;
        let mut images = w.env.berthd.images().await;
        let pull = |images: &mut berth::cri::v1::image_service_client::ImageServiceClient<_>| {
            let mut images = images.clone();
            async move {
                images
                    .pull_image(cri::PullImageRequest {
                        image: Some(cri::ImageSpec {
                            image: "docker.io/berth-test/zstd:latest".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
            }
        };
        let stop_pod = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.0.clone(),
        };
        let remove_pod = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.0.clone(),
        };
        let interrupted = match step {
            "start:started" => w.start(&id).await.is_err(),
            "stop:killed" => {
                w.rt.stop_container(cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 0,
                })
                .await
                .is_err()
            }
            "remove:deleted" => {
                w.rt.remove_container(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .is_err()
            }
            "stoppod:torn-down" => w.rt.stop_pod_sandbox(stop_pod.clone()).await.is_err(),
            "removepod:removed" => w.rt.remove_pod_sandbox(remove_pod.clone()).await.is_err(),
            _ => pull(&mut images).await.is_err(),
        };
        assert!(interrupted, "{step}: the call was answered");
        w.env.berthd.wait_exit(Duration::from_secs(10));
        restart_with(&mut w, "").await;
        let mut images = w.env.berthd.images().await;
        match step {
            // Start went through before the kill: the container runs; a retry says so.
            "start:started" => {
                assert_eq!(w.status(&id).await.state, running, "{step}");
                assert_eq!(w.out(&id, &["echo", "up"]).await, "up", "{step}");
            }
            "stop:killed" => {
                w.stop(&id, 0).await;
                assert_eq!(w.status(&id).await.state, exited, "{step}");
            }
            "remove:deleted" => {
                w.remove(&id).await;
                let left = containers_named(&mut w.rt, "c").await;
                assert!(left.iter().all(|c| c.id != id), "{step}: still listed");
            }
            "stoppod:torn-down" => {
                w.rt.stop_pod_sandbox(stop_pod).await.unwrap();
                assert_eq!(
                    pod_state(&mut w.rt, &pod.0).await,
                    cri::PodSandboxState::SandboxNotready as i32,
                    "{step}"
                );
                assert_eq!(w.status(&id).await.state, exited, "{step}");
            }
            "removepod:removed" => {
                w.rt.remove_pod_sandbox(remove_pod).await.unwrap();
                assert!(
                    pods_named(&mut w.rt, &step.replace(':', "-"))
                        .await
                        .is_empty()
                );
            }
            _ => {
                // The layers the killed pull unpacked belonged to no image: collected at start.
                assert_eq!(
                    dir_names(&w.env.berthd.root.join("snapshots")),
                    snapshots_before,
                    "{step}: snapshots of the interrupted pull were kept"
                );
                pull(&mut images)
                    .await
                    .unwrap_or_else(|e| panic!("{step}: {e:?}"));
                let st = images
                    .image_status(cri::ImageStatusRequest {
                        image: Some(cri::ImageSpec {
                            image: "docker.io/berth-test/zstd:latest".into(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(st.image.is_some(), "{step}: the image is not there");
            }
        }
        w.remove_pod(&pod.0).await;
    }
    assert_killed(&w, steps.len());
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// Snapshots are unpacked without an fsync per file; one syncfs after the pull marks them
/// durable. After a reboot (the kernel's boot id changed), a snapshot never marked so may be
/// torn: it is dropped with its image, and a pull rebuilds it. Without a reboot it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_never_synced_are_dropped_after_a_reboot_and_rebuilt() {
    let mut w = World::new().await;
    let busybox_status = |images: &mut berth::cri::v1::image_service_client::ImageServiceClient<
        tonic::transport::Channel,
    >| {
        let mut images = images.clone();
        async move {
            images
                .image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: BUSYBOX.into(),
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .image
        }
    };
    let snapshots = w.env.berthd.root.join("snapshots");
    let metas = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("meta.json"))
            .filter(|p| p.exists())
            .collect()
    };
    // The pull's sync has marked every snapshot durable.
    eventually("the snapshots are durable", || {
        metas().iter().all(|m| {
            std::fs::read_to_string(m)
                .unwrap()
                .contains("\"durable\":true")
        })
    })
    .await;
    // As if berthd had been killed before the sync: unmarked. Same boot: kept (and synced).
    let unmark = |metas: &[std::path::PathBuf]| {
        for m in metas {
            let t = std::fs::read_to_string(m).unwrap();
            std::fs::write(m, t.replace("\"durable\":true", "\"durable\":false")).unwrap();
        }
    };
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    unmark(&metas());
    w.env.berthd.restart();
    let mut images = w.env.berthd.images().await;
    assert!(
        busybox_status(&mut images).await.is_some(),
        "dropped without a reboot"
    );
    // Unmarked again, and the node "rebooted": dropped, and the image with them.
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    unmark(&metas());
    std::fs::write(w.env.berthd.root.join("boot_id"), "an-earlier-boot\n").unwrap();
    w.env.berthd.restart();
    let mut images = w.env.berthd.images().await;
    assert!(
        busybox_status(&mut images).await.is_none(),
        "a torn snapshot kept"
    );
    assert!(metas().is_empty());
    // A pull rebuilds it and containers run from it.
    pull(&w.env.berthd, BUSYBOX).await;
    w.rt = w.env.berthd.runtime().await;
    let pod = w.pod("rebuilt").await;
    let id = w.run(&pod, container("c", &["sleep", "3600"])).await;
    assert_eq!(w.out(&id, &["echo", "ok"]).await, "ok");
    w.remove_pod(&pod.0).await;
}

/// berthd killed at random moments under a kubelet-like load, three times, restarted at once:
/// ten pods running through it all keep running, listed and logging; whatever the interrupted calls left
/// is listed, and once everything listed is removed nothing is left on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_at_random_moments_under_load_lose_and_leak_nothing() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    // Pods that run through every kill, their containers printing all the while.
    let mut keepers = Vec::new();
    for i in 0..10 {
        let pod = w.pod(&format!("keeper{i}")).await;
        let mut c = container(
            &format!("ticker{i}"),
            &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
        );
        c.log_path = format!("ticker{i}.log");
        let id = w.run(&pod, c).await;
        let log = std::path::Path::new(&pod.1.log_directory).join(format!("ticker{i}.log"));
        keepers.push((pod, id, log));
    }
    let (logs, cgroup_root) = (w.logs(), w.env.berthd.cgroup_root.clone());
    let mut n = 0;
    let rt = w.rt.clone();
    // The load goes on until a while after the last kill.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = done.clone();
    let load = tokio::spawn(async move {
        common::churn::run(&rt, 5, Duration::from_millis(500), move || {
            n += 1;
            (!until.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
                pod_config_for(
                    &logs,
                    &cgroup_root,
                    &format!("load{n}"),
                    cri::NamespaceMode::Container,
                )
            })
        })
        .await
    });
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    for _ in 0..3 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(300 + (seed >> 33) % 1200)).await;
        w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
        w.env.berthd.wait_exit(Duration::from_secs(10));
        w.env.berthd.restart();
        w.rt = w.env.berthd.runtime().await;
        for (_, id, log) in &keepers {
            assert_eq!(
                w.status(id).await.state,
                cri::ContainerState::ContainerRunning as i32
            );
            let lines = std::fs::read_to_string(log).unwrap().lines().count();
            eventually("the keeper keeps logging", || {
                std::fs::read_to_string(log).unwrap().lines().count() > lines
            })
            .await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let t = load.await.unwrap();
    eprintln!(
        "{} pod lives through 3 kills; {} calls failed while berthd was down or restarting",
        t.pods,
        t.errors.len()
    );
    // Calls fail only as a client sees a runtime that is down: never a wrong answer.
    let wrong: Vec<&String> = t
        .errors
        .iter()
        .filter(|e| {
            ![
                ": Unavailable:",
                ": Cancelled:",
                ": Unknown: transport error",
            ]
            .iter()
            .any(|transport| e.contains(transport))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // What the interrupted lives left is listed: remove it all, as kubelet would.
    let pods =
        w.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
    for p in pods {
        w.remove_pod(&p.id).await;
    }
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// Found: a monitor that died while berthd ran went unnoticed: its pod stayed Ready and its
/// containers Running for kubelet, with nothing watching them. Now the pod turns NotReady, the
/// containers Exited (reason Unknown) with their processes killed, and removal leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_killed_under_a_running_berthd_makes_its_pod_not_ready() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let pod = w.pod("orphaned").await;
    let id = w.run(&pod, container("c", &["sleep", "3600"])).await;
    let other = w.pod("bystander").await;
    let kept = w.run(&other, container("kept", &["sleep", "3600"])).await;
    let monitor = w.monitor_pid(&pod.0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut ready = true;
    for _ in 0..200 {
        if pod_state(&mut w.rt, &pod.0).await == cri::PodSandboxState::SandboxNotready as i32 {
            ready = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!ready, "the pod stayed Ready after its monitor died");
    let s = w.status(&id).await;
    assert_eq!(
        (s.state, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, "Unknown")
    );
    eventually("the orphaned container's processes are killed", || {
        processes_in_cgroup_of(&id).is_empty()
    })
    .await;
    // The other pod is untouched.
    assert_eq!(w.out(&kept, &["echo", "fine"]).await, "fine");
    w.remove_pod(&pod.0).await;
    w.remove_pod(&other.0).await;
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// A pod whose RunPodSandbox caller left was never greeted, and its monitor gives up after a
/// minute: a retry that claims it then finds the monitor gone. It gets a new pod that works,
/// and the old one leaves nothing. (The monitor is killed here instead of waiting a minute.)
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_claiming_a_pod_whose_monitor_gave_up_gets_a_working_pod() {
    let mut w = World::with(pausing_at(&["run:monitor"])).await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let config = w.pod_config("abandoned-monitor", cri::NamespaceMode::Container);
    let req = cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    let d = Duration::from_millis(PAUSE_MS / 2);
    let mut rt = w.rt.clone();
    let first = with_deadline(d, rt.run_pod_sandbox(timed(req, d))).await;
    assert!(first.is_err(), "{first:?}");
    // The making ends; its pod is listed, its monitor never greeted. Kill that monitor.
    let mut old = Vec::new();
    for _ in 0..100 {
        old = pods_named(&mut w.rt, "abandoned-monitor").await;
        if !old.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(old.len(), 1);
    let monitor = w.monitor_pid(&old[0].id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the monitor is gone", || !alive(monitor)).await;
    let pod = w.run_pod(config).await;
    assert_ne!(pod.0, old[0].id, "the broken pod was handed out");
    let c = w.run(&pod, container("app", &["sleep", "3600"])).await;
    assert_eq!(w.out(&c, &["echo", "ok"]).await, "ok");
    assert_eq!(pods_named(&mut w.rt, "abandoned-monitor").await.len(), 1);
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted (lazily) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("berth-small-")
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0711").as_str()),
        )
        .unwrap();
        SmallDisk { dir }
    }

    /// Fills it: one file takes every free byte.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A full disk under the state directory during CreateContainer: the call fails with
/// ResourceExhausted naming what could not be written, nothing of the container is left, and
/// once there is room again the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_creation_fails_cleanly_and_leaves_nothing() {
    let disk = SmallDisk::new("32m");
    let state = disk.dir.path().join("state");
    let mut w = World::with(common::Options {
        state: Some(state.clone()),
        ..Default::default()
    })
    .await;
    let pod = w.pod("full").await;
    let before = w.leftovers();
    let filler = disk.fill();
    let err = w
        .create(&pod, container("c", &["sleep", "3600"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("No space left"), "{}", err.message());
    assert_eq!(w.leftovers(), before, "the failed create left something");
    std::fs::remove_file(filler).unwrap();
    let id = w.run(&pod, container("c", &["sleep", "3600"])).await;
    assert_eq!(w.out(&id, &["echo", "ok"]).await, "ok");
    w.remove_pod(&pod.0).await;
    drop(w);
    drop(disk);
}

/// A reboot: every process gone, the state directory gone (it is on tmpfs), the root
/// directory intact. berthd starts clean and still lists what was there: pods NotReady, their
/// containers Exited — those the reboot ended with exit code 255 and reason NodeRestarted, one
/// that had exited with its own code — the names free for kubelet's next attempt, and removing
/// what is listed leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_pods_are_listed_not_ready_and_their_containers_exited() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let pod = w.pod("survivor").await;
    let long = w.run(&pod, container("long", &["sleep", "3600"])).await;
    let short = w
        .run(&pod, container("short", &["sh", "-c", "exit 3"]))
        .await;
    w.wait_state(&short, cri::ContainerState::ContainerExited)
        .await;
    let idle = w.create(&pod, container("idle", &["true"])).await.unwrap();
    let stopped = w.pod("stopped").await;
    w.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: stopped.0.clone(),
    })
    .await
    .unwrap();

    // The reboot, as far as a test can make one.
    let b = &mut w.env.berthd;
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(Duration::from_secs(10));
    common::kill_pod_processes(&b.state);
    common::cleanup_cgroups(&b.cgroup_root);
    common::unmount_under(&b.state);
    std::fs::remove_dir_all(&b.state).unwrap();
    std::fs::write(b.root.join("boot_id"), "an-earlier-boot\n").unwrap();
    b.restart();
    w.rt = w.env.berthd.runtime().await;
    assert!(
        w.env.berthd.log_text().contains("pods_restored=2"),
        "{}",
        w.env.berthd.log_text()
    );

    let pods =
        w.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
    let mut seen: Vec<(String, i32)> = pods
        .iter()
        .map(|p| (p.metadata.clone().unwrap().name, p.state))
        .collect();
    seen.sort();
    let not_ready = cri::PodSandboxState::SandboxNotready as i32;
    assert_eq!(
        seen,
        vec![
            ("stopped".into(), not_ready),
            ("survivor".into(), not_ready)
        ]
    );
    assert_eq!(pod_state(&mut w.rt, &pod.0).await, not_ready);
    for (id, code, reason) in [
        (&long, 255, "NodeRestarted"),
        (&idle, 255, "NodeRestarted"),
        (&short, 3, "Error"),
    ] {
        let s = w.status(id).await;
        assert_eq!(
            (s.state, s.exit_code, s.reason.as_str()),
            (cri::ContainerState::ContainerExited as i32, code, reason),
            "{s:?}"
        );
        assert!(s.finished_at >= s.created_at, "{s:?}");
    }

    // kubelet's next attempt at the pod gets a new sandbox; its containers run.
    let mut again = pod.1.clone();
    again.metadata.as_mut().unwrap().attempt = 1;
    let again = w.run_pod(again).await;
    let id = w.run(&again, container("long", &["sleep", "3600"])).await;
    assert_eq!(w.out(&id, &["echo", "ok"]).await, "ok");

    // A restart after that (same boot) restores nothing more and keeps what it has.
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(w.status(&long).await.reason, "NodeRestarted");
    assert_eq!(w.out(&id, &["echo", "still"]).await, "still");

    for c in [&long, &short, &idle, &id] {
        w.remove(c).await;
    }
    for p in [&pod.0, &stopped.0, &again.0] {
        w.remove_pod(p).await;
    }
    assert_eq!(w.leftovers(), before);
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
}

/// The names in `dir`, sorted.
#[cfg(feature = "failpoints")]
fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
