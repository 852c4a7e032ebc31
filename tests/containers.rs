//! Containers in real pods from real images: lifecycle, what the process sees (env, args,
//! user, groups, cwd, volumes), CRI logs and their rotation, ExecSync, exit codes, surviving a
//! berthd crash, and bad input that must fail cleanly.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busybox_container_lives_and_goes_without_leftovers() {
    let mut w = World::new().await;
    let pod = w.pod("life").await;
    let before = w.leftovers();
    let id = w
        .create(&pod, container("sleeper", &["sleep", "3600"]))
        .await
        .unwrap();
    let s = w.status(&id).await;
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert_eq!(
        s.image_ref,
        common::tag("e2e-test-images/busybox:1.29-2").image_id
    );
    assert_eq!(s.image_id, s.image_ref);
    w.start(&id).await.unwrap();
    let s = w.status(&id).await;
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    assert!(s.started_at >= s.created_at && s.created_at > 0);
    assert_eq!(s.labels["app"], "sleeper");
    assert!(s.log_path.ends_with("sleeper/0.log"));

    let list = |f: cri::ContainerFilter| {
        let mut rt = w.rt.clone();
        async move {
            rt.list_containers(cri::ListContainersRequest { filter: Some(f) })
                .await
                .unwrap()
                .into_inner()
                .containers
        }
    };
    assert_eq!(
        list(cri::ContainerFilter {
            pod_sandbox_id: pod.0.clone(),
            ..Default::default()
        })
        .await
        .len(),
        1
    );
    assert_eq!(
        list(cri::ContainerFilter {
            id: id[..12].into(),
            ..Default::default()
        })
        .await[0]
            .id,
        id
    );
    let running = cri::ContainerStateValue {
        state: cri::ContainerState::ContainerRunning as i32,
    };
    assert_eq!(
        list(cri::ContainerFilter {
            state: Some(running),
            ..Default::default()
        })
        .await
        .len(),
        1
    );
    assert!(
        list(cri::ContainerFilter {
            label_selector: HashMap::from([("app".into(), "other".into())]),
            ..Default::default()
        })
        .await
        .is_empty()
    );

    // sleep is PID 1 of its own namespace and ignores SIGTERM: SIGKILL after the timeout.
    w.stop(&id, 1).await;
    let s = w.status(&id).await;
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 137);
    assert_eq!(s.reason, "Error");
    assert!(s.finished_at >= s.started_at);
    // Idempotent.
    w.stop(&id, 1).await;
    w.remove(&id).await;
    w.remove(&id).await;
    w.stop(&"f".repeat(64), 1).await;
    let err =
        w.rt.container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_args_user_groups_and_cwd_are_what_the_process_sees() {
    let mut w = World::new().await;
    let pod = w.pod("ident").await;
    let mut c = container("ident", &["sh", "-c"]);
    c.args = vec![
        "echo \"$0 $1\"; sleep 3600".into(),
        "arg-zero".into(),
        "arg-one".into(),
    ];
    c.envs = vec![
        cri::KeyValue {
            key: "FOO".into(),
            value: "bar baz".into(),
        },
        cri::KeyValue {
            key: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        },
    ];
    c.working_dir = "/tmp".into();
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            run_as_group: Some(cri::Int64Value { value: 2000 }),
            supplemental_groups: vec![3000],
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    assert_eq!(w.out(&id, &["id", "-u"]).await, "1000");
    assert_eq!(w.out(&id, &["id", "-g"]).await, "2000");
    let groups = w.out(&id, &["id", "-G"]).await;
    assert!(groups.split(' ').any(|g| g == "3000"), "{groups}");
    assert_eq!(w.out(&id, &["pwd"]).await, "/tmp");
    let env = w.out(&id, &["env"]).await;
    assert!(env.lines().any(|l| l == "FOO=bar baz"), "{env}");
    assert!(env.lines().any(|l| l == "PATH=/bin:/usr/bin"), "{env}");
    let log = w
        .logs()
        .join(&pod.1.metadata.as_ref().unwrap().uid)
        .join("ident/0.log");
    eventually("the args reach the log", || {
        log_lines(&log).iter().any(|l| l.2 == "arg-zero arg-one")
    })
    .await;

    // A name from the image's /etc/passwd; the image's own USER with a group.
    let mut c = container("named", &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "www-data".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let named = w.run(&pod, c).await;
    assert_eq!(w.out(&named, &["id", "-un"]).await, "www-data");
    assert_eq!(w.out(&named, &["id", "-g"]).await, "33");
    let user = w.status(&named).await.user.unwrap().linux.unwrap();
    assert_eq!((user.uid, user.gid), (33, 33));

    let mut images = w.env.berthd.images().await;
    let img = "gcr.io/k8s-staging-cri-tools/test-image-user-username-group";
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: img.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut c = container("imguser", &["sleep", "3600"]);
    c.image = Some(cri::ImageSpec {
        image: img.into(),
        ..Default::default()
    });
    let iu = w.run(&pod, c).await;
    assert_eq!(w.out(&iu, &["id", "-u"]).await, "33");
    assert_eq!(w.out(&iu, &["id", "-g"]).await, "1004");

    // run_as_group without a user is refused.
    let mut c = container("badgroup", &["sleep", "1"]);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 5 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        w.create(&pod, c).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_path_volumes_plain_symlinked_and_read_only() {
    let mut w = World::new().await;
    let pod = w.pod("vol").await;
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir(host.path().join("real")).unwrap();
    std::fs::write(host.path().join("real/hello.txt"), "from the host\n").unwrap();
    std::os::unix::fs::symlink(host.path().join("real"), host.path().join("link")).unwrap();
    let mut c = container("vol", &["sleep", "3600"]);
    c.mounts = vec![
        cri::Mount {
            container_path: "/mnt/plain".into(),
            host_path: host.path().join("real").to_string_lossy().into(),
            ..Default::default()
        },
        cri::Mount {
            container_path: "/mnt/link".into(),
            host_path: host.path().join("link").to_string_lossy().into(),
            ..Default::default()
        },
        cri::Mount {
            container_path: "/mnt/ro".into(),
            host_path: host.path().join("real").to_string_lossy().into(),
            readonly: true,
            ..Default::default()
        },
    ];
    let id = w.run(&pod, c).await;
    assert_eq!(
        w.out(&id, &["cat", "/mnt/plain/hello.txt"]).await,
        "from the host"
    );
    assert_eq!(
        w.out(&id, &["cat", "/mnt/link/hello.txt"]).await,
        "from the host"
    );
    w.out(&id, &["sh", "-c", "echo back > /mnt/plain/written"])
        .await;
    assert_eq!(
        std::fs::read_to_string(host.path().join("real/written")).unwrap(),
        "back\n"
    );
    let r = w
        .exec(&id, &["sh", "-c", "echo x > /mnt/ro/nope"], 10)
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0, "a read-only mount refused the write");
    let mounts = w.status(&id).await.mounts;
    let link = mounts
        .iter()
        .find(|m| m.container_path == "/mnt/link")
        .unwrap();
    assert_eq!(
        Path::new(&link.host_path),
        std::fs::canonicalize(host.path().join("real")).unwrap()
    );
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_interleave_streams_split_long_lines_and_follow_a_reopen() {
    let mut w = World::new().await;
    let pod = w.pod("logs").await;
    // Two pipes carry the streams: their relative order holds for writes apart in time.
    let script = "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; \
                  head -c 40960 /dev/zero | tr '\\0' x; echo; \
                  i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done";
    let id = w
        .run(&pod, container("logger", &["sh", "-c", script]))
        .await;
    let log = w
        .logs()
        .join(&pod.1.metadata.as_ref().unwrap().uid)
        .join("logger/0.log");
    eventually("the first ticks are logged", || {
        log_lines(&log).iter().any(|l| l.2 == "tick 2")
    })
    .await;
    let lines = log_lines(&log);
    assert_eq!(lines[0], ("stdout".into(), "F".into(), "one".into()));
    assert_eq!(lines[1], ("stderr".into(), "F".into(), "two".into()));
    assert_eq!(lines[2], ("stdout".into(), "F".into(), "three".into()));
    // 40 KiB: two 16 KiB partial records and the rest in a full one.
    assert_eq!(lines[3].1, "P");
    assert_eq!(lines[3].2.len(), 16384);
    assert_eq!(lines[4].1, "P");
    assert_eq!(lines[5].1, "F");
    assert_eq!(
        lines[3].2.len() + lines[4].2.len() + lines[5].2.len(),
        40960
    );

    // kubelet's rotation: rename, then ReopenContainerLog.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    w.rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    eventually("new lines go to the new file", || {
        log_lines(&log).iter().any(|l| l.2.starts_with("tick"))
    })
    .await;
    let first_new: u32 = log_lines(&log)[0]
        .2
        .trim_start_matches("tick ")
        .parse()
        .unwrap();
    let last_old: u32 = log_lines(&rotated)
        .last()
        .unwrap()
        .2
        .trim_start_matches("tick ")
        .parse()
        .unwrap();
    assert!(
        first_new > last_old,
        "no line lost or repeated across the reopen ({last_old} then {first_new})"
    );
    // Reopen of a stopped container is an error.
    w.stop(&id, 0).await;
    let err =
        w.rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sync_returns_output_and_codes_and_a_timeout_kills_only_the_exec() {
    let mut w = World::new().await;
    let pod = w.pod("exec").await;
    let id = w.run(&pod, container("target", &["sleep", "3600"])).await;
    let r = w
        .exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (3, &b"out\n"[..], &b"err\n"[..])
    );
    let r = w.exec(&id, &["no-such-command"], 10).await.unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-such-command"));
    // A big output is capped, not fatal, and fits in what kubelet accepts (16 MiB a message).
    let mut kubelet_like = w.rt.clone().max_decoding_message_size(16 << 20);
    let r = kubelet_like
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2".into(),
            ],
            timeout: 30,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.stdout.len() < 8 << 20 && r.stdout.len() > 8_000_000,
        "{}",
        r.stdout.len()
    );
    assert!(String::from_utf8_lossy(&r.stdout[r.stdout.len() - 64..]).contains("output cut"));

    let err = w
        .exec(&id, &["sh", "-c", "sleep 30 & sleep 31"], 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert_eq!(
        w.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32,
        "the container lives on"
    );
    let ps = w.out(&id, &["ps"]).await;
    assert!(
        !ps.contains("sleep 30") && !ps.contains("sleep 31"),
        "the exec's whole tree is gone:\n{ps}"
    );
    w.stop(&id, 0).await;
    let err = w.exec(&id, &["true"], 10).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_that_exit_report_their_code_and_reason() {
    let mut w = World::new().await;
    let pod = w.pod("exits").await;
    let ok = w.run(&pod, container("ok", &["true"])).await;
    let bad = w.run(&pod, container("bad", &["sh", "-c", "exit 7"])).await;
    let s = w
        .wait_state(&ok, cri::ContainerState::ContainerExited)
        .await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    let s = w
        .wait_state(&bad, cri::ContainerState::ContainerExited)
        .await;
    assert_eq!((s.exit_code, s.reason.as_str()), (7, "Error"));
    // A PID namespace shared by the pod: stopping the container takes its children too.
    let shared = w.pod_config("shared", cri::NamespaceMode::Pod);
    let spod =
        w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(shared.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let spod = (spod, shared);
    let kids = w
        .run(
            &spod,
            container("kids", &["sh", "-c", "sleep 1000 & sleep 1001 & wait"]),
        )
        .await;
    let watcher = w.run(&spod, container("watcher", &["sleep", "3600"])).await;
    eventually_async(&mut w, &watcher, "sleep 1001", true).await;
    w.stop(&kids, 0).await;
    eventually_async(&mut w, &watcher, "sleep 1001", false).await;
    w.remove_pod(&spod.0).await;
    w.remove_pod(&pod.0).await;
}

/// Waits until `ps` in `id` does (or does not) show `what`.
async fn eventually_async(w: &mut World, id: &str, what: &str, present: bool) {
    for _ in 0..100 {
        let ps = w.out(id, &["ps"]).await;
        if ps.contains(what) == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} present={present} never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_a_berthd_crash_and_keep_logging() {
    let mut w = World::new().await;
    let pod = w.pod("survive").await;
    let ticker = w
        .run(
            &pod,
            container(
                "ticker",
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
                ],
            ),
        )
        .await;
    let quitter = w
        .run(&pod, container("quitter", &["sh", "-c", "sleep 1; exit 5"]))
        .await;
    let log = w
        .logs()
        .join(&pod.1.metadata.as_ref().unwrap().uid)
        .join("ticker/0.log");
    eventually("ticking", || log_lines(&log).len() > 2).await;
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    let n = log_lines(&log).len();
    // While berthd is gone the monitor keeps logging, and the quitter exits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        log_lines(&log).len() > n + 5,
        "logging went on without berthd"
    );
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(
        w.status(&ticker).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    let s = w.status(&quitter).await;
    assert_eq!(
        (s.state, s.exit_code),
        (cri::ContainerState::ContainerExited as i32, 5)
    );
    assert_eq!(w.out(&ticker, &["echo", "still here"]).await, "still here");
    let n = log_lines(&log).len();
    eventually("still logging after the restart", || {
        log_lines(&log).len() > n + 3
    })
    .await;
    w.stop(&ticker, 0).await;
    assert_eq!(
        w.status(&ticker).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_by_name_and_leave_nothing() {
    let mut w = World::new().await;
    let pod = w.pod("bad").await;
    let before = w.leftovers();

    let mut c = container("noimage", &["true"]);
    c.image = Some(cri::ImageSpec {
        image: "never/pulled:1".into(),
        ..Default::default()
    });
    let e = w.create(&pod, c).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("never/pulled:1"), "{}", e.message());

    let nopod = ("0".repeat(64), pod.1.clone());
    assert_eq!(
        w.create(&nopod, container("x", &["true"]))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    for (host, why) in [
        ("relative/path", "must be absolute"),
        ("/no/such/berth/path", "cannot be used"),
    ] {
        let mut c = container("mount", &["true"]);
        c.mounts = vec![cri::Mount {
            container_path: "/m".into(),
            host_path: host.into(),
            ..Default::default()
        }];
        let e = w.create(&pod, c).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{host}");
        assert!(
            e.message().contains(host) && e.message().contains(why),
            "{}",
            e.message()
        );
    }
    assert_eq!(w.leftovers(), before);

    let first = w
        .create(&pod, container("dup", &["sleep", "3600"]))
        .await
        .unwrap();
    let e = w
        .create(&pod, container("dup", &["sleep", "3600"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains(&first), "{}", e.message());
    w.remove(&first).await;
    assert_eq!(w.leftovers(), before);

    // A command that does not exist: Create works, Start fails naming it, the container ends
    // Exited with a non-zero code. runc looks the command up at create: there Create fails
    // naming it and leaves nothing.
    if !common::handler().is_empty() {
        let e = w
            .create(&pod, container("nocmd", &["/no/such/command"]))
            .await
            .unwrap_err();
        assert!(e.message().contains("/no/such/command"), "{}", e.message());
        assert_eq!(w.leftovers(), before);
    } else {
        let id = w
            .create(&pod, container("nocmd", &["/no/such/command"]))
            .await
            .unwrap();
        let e = w.start(&id).await.unwrap_err();
        assert!(e.message().contains("/no/such/command"), "{}", e.message());
        let s = w
            .wait_state(&id, cri::ContainerState::ContainerExited)
            .await;
        assert_ne!(s.exit_code, 0);
        assert_eq!(s.reason, "StartError");
        assert!(s.message.contains("/no/such/command"));
        w.remove(&id).await;
        assert_eq!(w.leftovers(), before);
    }

    // A stopped pod takes no containers.
    w.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .unwrap();
    let e = w
        .create(&pod, container("late", &["true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_and_removing_a_pod_takes_its_containers_along() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let pod = w.pod("bulk").await;
    let a = w.run(&pod, container("a", &["sleep", "3600"])).await;
    let b = w.run(&pod, container("b", &["sleep", "3600"])).await;
    let monitor = w.monitor_pid(&pod.0);
    w.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .unwrap();
    for id in [&a, &b] {
        assert_eq!(
            w.status(id).await.state,
            cri::ContainerState::ContainerExited as i32
        );
    }
    w.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .unwrap();
    let left =
        w.rt.list_containers(cri::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
    assert!(left.is_empty());
    assert_eq!(w.leftovers(), before);
    eventually("the pod's monitor exits", || !alive(monitor)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_with_a_terminal_logs_what_it_prints() {
    let mut w = World::new().await;
    let pod = w.pod("tty").await;
    let mut c = container("tty", &["sh", "-c", "tty; echo on a terminal; sleep 3600"]);
    c.tty = true;
    c.stdin = true;
    let id = w.run(&pod, c).await;
    let log = w
        .logs()
        .join(&pod.1.metadata.as_ref().unwrap().uid)
        .join("tty/0.log");
    eventually("the terminal's output is logged", || {
        log_lines(&log)
            .iter()
            .any(|l| l.2.trim_end_matches('\r') == "on a terminal")
    })
    .await;
    assert!(
        log_lines(&log).iter().any(|l| l.2.starts_with("/dev/pts/")),
        "{:?}",
        log_lines(&log)
    );
    assert_eq!(
        w.out(&id, &["echo", "exec works too"]).await,
        "exec works too"
    );
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_over_its_memory_limit_ends_oom_killed() {
    let mut w = World::new().await;
    let pod = w.pod("oom").await;
    // The shell keeps 64 MiB in a variable under a 16 MiB limit.
    let mut c = container(
        "hog",
        &[
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    let s = w
        .wait_state(&id, cri::ContainerState::ContainerExited)
        .await;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"));
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_that_died_with_berthd_leaves_no_container_running() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let pod = w.pod("orphans").await;
    let id = w.run(&pod, container("sleeper", &["sleep", "3600"])).await;
    assert!(!processes_in_cgroup_of(&id).is_empty());
    let monitor = w.monitor_pid(&pod.0);
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the monitor is dead", || !alive(monitor)).await;
    // Each container has its own PID namespace here: its process outlived the monitor.
    assert!(!processes_in_cgroup_of(&id).is_empty());
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    let s = w.status(&id).await;
    assert_eq!(
        (s.state, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, "Unknown")
    );
    eventually("the orphaned container process is killed", || {
        processes_in_cgroup_of(&id).is_empty()
    })
    .await;
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_half_made_when_berthd_died_is_undone_at_restart() {
    let mut w = World::new().await;
    let before = w.leftovers();
    let pod = w.pod("halfmade").await;
    let with_pod = w.leftovers();
    let id = w
        .create(&pod, container("half", &["sleep", "3600"]))
        .await
        .unwrap();
    assert!(!processes_in_cgroup_of(&id).is_empty());
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    // What a berthd killed inside CreateContainer leaves: the monitor made the container,
    // the record still says Creating.
    let record = w
        .env
        .berthd
        .state
        .join("containers")
        .join(&id)
        .join("container.json");
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains(r#""state":"Created""#), "{text}");
    std::fs::write(
        &record,
        text.replace(r#""state":"Created""#, r#""state":"Creating""#),
    )
    .unwrap();
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    let err =
        w.rt.container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    eventually("the half-made container's process is killed", || {
        processes_in_cgroup_of(&id).is_empty()
    })
    .await;
    assert_eq!(w.leftovers(), with_pod, "the undo left state behind");
    // The pod is intact: a container with the same name can be made again.
    let again = w.run(&pod, container("half", &["sleep", "3600"])).await;
    assert_eq!(w.out(&again, &["echo", "ok"]).await, "ok");
    w.remove_pod(&pod.0).await;
    assert_eq!(w.leftovers(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelets_hugepage_limits_do_not_stop_a_container_on_a_node_without_hugepages() {
    // kubelet sends a limit of 0 for every page size the kernel knows. This host's hugetlb
    // controller is on cgroup2 only; with no pages of a size there is nothing to enforce.
    let sizes: Vec<String> = std::fs::read_dir("/sys/kernel/mm/hugepages")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let kb: u64 = n
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    let pages = std::fs::read_to_string(e.path().join("nr_hugepages")).ok()?;
                    (pages.trim() == "0").then(|| {
                        if kb >= 1 << 20 {
                            format!("{}GB", kb >> 20)
                        } else {
                            format!("{}MB", kb >> 10)
                        }
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut w = World::new().await;
    let pod = w.pod("hugepages").await;
    let mut c = container("c", &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            hugepage_limits: sizes
                .iter()
                .map(|s| cri::HugepageLimit {
                    page_size: s.clone(),
                    limit: 0,
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    assert_eq!(
        w.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    w.remove_pod(&pod.0).await;
}
