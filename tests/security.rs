//! Security: what a pod, an image or a node user can reach of the node through berth. Each test
//! is a way in that was found open (in berth or in its peers) and must stay closed: the pod
//! init's /proc/1 links, inherited descriptors, sysctl names, node users walking into images and
//! records, privileged containers in unprivileged pods, image files that are traps, runtime
//! handlers berth cannot honour, and credentials sent to the wrong party.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth::cri::v1 as cri;
use common::fake_http::{FakeHttp, Reply};
use common::world::*;
use common::{Netns, Options};
use tonic::Code;

fn with_caps(mut c: cri::ContainerConfig, add: &[&str]) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// A pod sharing one PID namespace, with a running container that may trace its processes.
async fn shared_pid_pod_with_tracer(
    w: &mut World,
    name: &str,
) -> ((String, cri::PodSandboxConfig), String) {
    let c = w.pod_config(name, cri::NamespaceMode::Pod);
    let pod = w.run_pod(c).await;
    let tracer = w
        .run(
            &pod,
            with_caps(container("tracer", &["sleep", "3600"]), &["SYS_PTRACE"]),
        )
        .await;
    (pod, tracer)
}

/// RunPodSandbox that must fail: its error.
async fn refused_pod(w: &mut World, c: cri::PodSandboxConfig, handler: &str) -> tonic::Status {
    w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(c),
        runtime_handler: handler.into(),
    })
    .await
    .expect_err("RunPodSandbox should fail")
}

/// (pid, start time) of a pod's init, from berthd's record.
fn init_of(w: &World, pod: &str) -> (i64, u64) {
    let path = w.env.berthd.state.join("pods").join(pod).join("pod.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    (
        v["init"][0].as_i64().expect("an init pid"),
        v["init"][1].as_u64().expect("an init start time"),
    )
}

/// A live process's start time; `None` once it exited (a zombie waiting for its reaper too).
fn start_time(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    if rest.starts_with('Z') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// Runs `sh -c script` in the container; (exit code, stdout, stderr).
async fn sh(w: &mut World, id: &str, script: &str) -> (i32, String, String) {
    let r = w.exec(id, &["sh", "-c", script], 10).await.unwrap();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).trim().to_string(),
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
    )
}

/// Everything a container can learn of the node through its pod's PID 1.
async fn assert_pid1_holds_nothing(w: &mut World, id: &str, marker: &Path) {
    let (code, out, err) = sh(w, id, "cat /proc/1/cmdline").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("berth-init "), "PID 1 is {out:?}");
    // The listings must succeed (the container may trace PID 1) and show nothing.
    for link in ["root", "cwd"] {
        let (code, out, err) = sh(w, id, &format!("ls -A /proc/1/{link}/")).await;
        assert_eq!(code, 0, "ls /proc/1/{link}: {err}");
        assert_eq!(out, "", "/proc/1/{link} shows the node");
    }
    let (code, _, _) = sh(w, id, &format!("test -e /proc/1/root{}", marker.display())).await;
    assert_eq!(
        code, 1,
        "the node's marker file is visible through /proc/1/root"
    );
    let (code, out, err) = sh(w, id, "ls -A /proc/1/fd/").await;
    assert_eq!((code, out.as_str()), (0, ""), "PID 1 holds files: {err}");
    let (code, out, err) = sh(w, id, "wc -c < /proc/1/environ").await;
    assert_eq!(
        (code, out.as_str()),
        (0, "0"),
        "PID 1 has an environment: {err}"
    );
    let (_, status, _) = sh(w, id, "cat /proc/1/status").await;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("no {k} in {status}"))
            .trim()
            .to_string()
    };
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    assert!(field("Uid").starts_with("65535"), "{}", field("Uid"));
    assert!(field("Gid").starts_with("65535"), "{}", field("Gid"));
    assert_eq!(field("Groups"), "");
    // Its binary is berthd's, on a read-only mount: not a node file to overwrite.
    let (code, _, _) = sh(w, id, "echo x >> /proc/1/exe").await;
    assert_ne!(code, 0, "/proc/1/exe is writable");
    // Joining its namespaces gives the pod's network and an empty mount namespace.
    let (_, pod_net, _) = sh(w, id, "readlink /proc/self/ns/net").await;
    let (_, init_net, _) = sh(w, id, "readlink /proc/1/ns/net").await;
    assert_eq!(pod_net, init_net, "PID 1 is in another network namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pid_pod_init_holds_nothing_of_the_node() {
    let mut w = World::new().await;
    let marker = w.env.berthd.dir.path().join("node-marker");
    std::fs::write(&marker, "the node's\n").unwrap();
    let (pod, tracer) = shared_pid_pod_with_tracer(&mut w, "shared").await;
    let all = w
        .run(
            &pod,
            with_caps(container("all", &["sleep", "3600"]), &["ALL"]),
        )
        .await;
    assert_pid1_holds_nothing(&mut w, &tracer, &marker).await;
    assert_pid1_holds_nothing(&mut w, &all, &marker).await;

    // What ps shows for berth's processes.
    let init = init_of(&w, &pod.0);
    let cmdline = |pid: i64| {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
            .trim_end_matches('\0')
            .to_string()
    };
    assert_eq!(cmdline(init.0), format!("berth-init {}", pod.0));
    assert_eq!(
        cmdline(w.monitor_pid(&pod.0) as i64),
        format!("berth-monitor {}", pod.0)
    );

    // Signals from inside the pod do not end its PID 1.
    let (code, _, err) = sh(
        &mut w,
        &all,
        "kill -TERM 1; kill -INT 1; kill -USR1 1; kill -HUP 1; kill -9 1; sleep 0.2",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(start_time(init.0), Some(init.1), "the pod init died");
    assert_eq!(
        w.status(&tracer).await.state,
        cri::ContainerState::ContainerRunning as i32
    );

    // A restarted berthd adopts the init as it is.
    w.env.berthd.signal(nix::sys::signal::Signal::SIGKILL);
    w.env.berthd.wait_exit(Duration::from_secs(10));
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert_eq!(init_of(&w, &pod.0), init, "the init was re-made");
    assert_pid1_holds_nothing(&mut w, &tracer, &marker).await;
    w.remove_pod(&pod.0).await;
    assert_eq!(start_time(init.0), None, "StopPodSandbox ends the init");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_and_exec_processes_hold_only_their_stdio() {
    let mut w = World::new().await;
    let pod = w.pod("fds").await;
    let id = w.run(&pod, container("c", &["sleep", "3600"])).await;
    // The container's init (PID 1 of its own PID namespace).
    let (code, out, err) = sh(&mut w, &id, "ls /proc/1/fd | tr '\\n' ' '").await;
    assert_eq!((code, out.as_str()), (0, "0 1 2"), "{err}");
    // A process started by ExecSync: what it holds, seen from outside it.
    let (code, pid, err) = sh(&mut w, &id, "sleep 60 </dev/null >/dev/null 2>&1 & echo $!").await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = sh(&mut w, &id, &format!("ls /proc/{pid}/fd | tr '\\n' ' '")).await;
    assert_eq!((code, out.as_str()), (0, "0 1 2"), "{err}");
    // And the exec'd process itself: its own descriptors, but for the one `ls` opens.
    let (code, out, err) = sh(
        &mut w,
        &id,
        "ls -l /proc/self/fd/ | grep -v ' 3 -> ' | grep -c -- '->'",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "3"), "{err}");
}

/// A sysctl of the node, put back as it was however the test ends.
struct NodeSysctl {
    path: &'static str,
    was: String,
}

impl NodeSysctl {
    fn read(path: &'static str) -> NodeSysctl {
        NodeSysctl {
            path,
            was: std::fs::read_to_string(path).unwrap(),
        }
    }

    fn now(&self) -> String {
        std::fs::read_to_string(self.path).unwrap()
    }
}

impl Drop for NodeSysctl {
    fn drop(&mut self) {
        if self.now() != self.was {
            let _ = std::fs::write(self.path, &self.was);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctl_names_that_leave_the_pods_namespaces_are_refused() {
    let mut w = World::new().await;
    let node = NodeSysctl::read("/proc/sys/vm/stat_interval");
    let other = (node.was.trim().parse::<u32>().unwrap() % 7 + 2).to_string();
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let before = w.leftovers();
    for (name, value) in [
        ("net/../vm/stat_interval", other.as_str()),
        ("net.ipv4/../../vm.stat_interval", other.as_str()),
        ("net/ipv4/../../vm/stat_interval", other.as_str()),
        // The value is the node's own: nothing would change even if it were written.
        ("net/../kernel/core_pattern", core_pattern.trim()),
        ("/net/ipv4/ip_forward", "1"),
        ("net..ipv4.ip_forward", "1"),
        ("net.ipv4.ip_forward ", "1"),
        ("vm/stat_interval", other.as_str()),
        ("kernel.domainname", "x"),
    ] {
        let mut c = w.pod_config("sysctl", cri::NamespaceMode::Container);
        c.linux.as_mut().unwrap().sysctls = HashMap::from([(name.to_string(), value.to_string())]);
        let err = refused_pod(&mut w, c, "").await;
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().contains("sysctl"),
            "{name}: {}",
            err.message()
        );
    }
    assert_eq!(node.now(), node.was, "the node's vm.stat_interval changed");
    assert_eq!(w.leftovers(), before);
    // Both spellings of a namespaced sysctl work, and only inside the pod.
    let mut c = w.pod_config("sysctl-ok", cri::NamespaceMode::Container);
    c.linux.as_mut().unwrap().sysctls = HashMap::from([
        ("net/ipv4/ip_unprivileged_port_start".into(), "444".into()),
        ("net.ipv4.ping_group_range".into(), "0 0".into()),
    ]);
    let pod = w.run_pod(c).await;
    let id = w.run(&pod, container("c", &["sleep", "3600"])).await;
    assert_eq!(
        w.out(
            &id,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        )
        .await,
        "444"
    );
    w.remove_pod(&pod.0).await;
}

/// Runs `sh -c script` as uid/gid 65534 on the node; whether it succeeded.
fn as_node_user(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("running setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_users_reach_nothing_under_root_and_state() {
    let mut w = World::new().await;
    // The test's own temp dir is root's: open it, so berth's modes are what keeps users out.
    let top = w.env.berthd.dir.path().to_owned();
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pod = w.pod("node-user").await;
    let id = w
        .run(
            &pod,
            cri::ContainerConfig {
                envs: vec![cri::KeyValue {
                    key: "SECRET".into(),
                    value: "hunter2".into(),
                }],
                ..container("c", &["sleep", "3600"])
            },
        )
        .await;
    let b = &w.env.berthd;
    let (root, state) = (b.root.clone(), b.state.clone());
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&state), 0o711);
    let ctr = state.join("containers").join(&id);
    for f in [
        ctr.join("config.json"),
        ctr.join("container.json"),
        state.join("pods").join(&pod.0).join("pod.json"),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // The busybox binary of a snapshot and of the container's root filesystem, the records
    // holding the environment, the writable layer: neither readable nor executable.
    let snapshot_bin = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs/bin/busybox"))
        .find(|p| p.exists())
        .expect("a snapshot with busybox");
    for p in [
        snapshot_bin.clone(),
        ctr.join("rootfs/bin/busybox"),
        ctr.join("config.json"),
        ctr.join("container.json"),
        state.join("pods").join(&pod.0).join("pod.json"),
        root.join("containers").join(&id).join("upper"),
    ] {
        assert!(p.exists(), "{} should exist for root", p.display());
        for script in [
            format!("cat '{}' > /dev/null", p.display()),
            format!("'{}' true", p.display()),
            format!("ls '{}' > /dev/null", p.display()),
        ] {
            let (ok, err) = as_node_user(&script);
            assert!(!ok, "a node user could: {script}");
            assert!(err.contains("ermission denied"), "{script}: {err}");
        }
    }
    // Blocked at the first directory.
    for d in [root.clone(), state.join("containers"), state.join("pods")] {
        let (ok, _) = as_node_user(&format!("ls '{}'", d.display()));
        assert!(!ok, "a node user lists {}", d.display());
    }

    // A tree left wider (by an older berthd, or by hand) is narrowed at start.
    w.env.berthd.terminate();
    for (p, m) in [
        (&root, 0o755),
        (&state.join("containers"), 0o755),
        (&ctr, 0o755),
        (&ctr.join("config.json"), 0o644),
        (&root.join("snapshots"), 0o755),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    w.env.berthd.restart();
    assert_eq!(mode(&root), 0o700);
    // Traversable, not listable: a user-namespaced container's runtime steps go through it.
    assert_eq!(mode(&state.join("containers")), 0o711);
    assert_eq!(mode(&ctr), 0o700);
    assert_eq!(mode(&ctr.join("config.json")), 0o600);
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    let (ok, _) = as_node_user(&format!("'{}' true", snapshot_bin.display()));
    assert!(!ok);
    w.rt = w.env.berthd.runtime().await;
    w.remove_pod(&pod.0).await;
}

/// The node's disk (the first block device that is no loop, ram or zram one): `major:minor`.
fn node_disk() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !["loop", "ram", "zram"].iter().any(|p| n.starts_with(p)))
        .collect();
    names.sort();
    let dev = std::fs::read_to_string(format!("/sys/block/{}/dev", names.first()?)).ok()?;
    Some(dev.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_open_the_nodes_disk_through_a_node_it_makes() {
    // CAP_MKNOD is in the default set: only the device cgroup (v1 devices.deny, v2 an eBPF
    // program) keeps a container from reading the node's disk through a node of its own.
    let disk = node_disk().expect("this node has a disk");
    let (major, minor) = disk.split_once(':').unwrap();
    let mut w = World::new().await;
    let pod = w.pod("mknod").await;
    let id = w.run(&pod, container("app", &["sleep", "3600"])).await;
    // The disk, and /dev/kmsg (1:11: the node's kernel log, readable by root).
    for (kind, major, minor, what) in [("b", major, minor, "disk"), ("c", "1", "11", "kmsg")] {
        let script = format!(
            "mknod /tmp/{what} {kind} {major} {minor} || exit 3; \
             head -c 64 /tmp/{what} >/dev/null && echo READ"
        );
        // The filter may refuse the mknod already (systemd's does; runc's rules allow it):
        // either way the answer is EPERM, and nothing is read.
        let (code, out, err) = sh(&mut w, &id, &script).await;
        assert!(
            !out.contains("READ"),
            "the node's {what} ({major}:{minor}) was read"
        );
        assert!(err.contains("not permitted"), "{what}: {code} {out} {err}");
    }
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privileged_container_needs_a_privileged_pod() {
    let mut w = World::new().await;
    let pod = w.pod("unprivileged").await;
    let before = w.leftovers();
    let privileged = |name: &str| privileged_container(name, &["sleep", "3600"]);
    let err = w.create(&pod, privileged("p")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("privileged"), "{}", err.message());
    assert_eq!(
        w.leftovers(),
        before,
        "the refused container left something"
    );

    let ppod = w.privileged_pod("privileged").await;
    let id = w.run(&ppod, privileged("p")).await;
    let status = w.out(&id, &["cat", "/proc/self/status"]).await;
    assert!(
        !status.contains("CapEff:\t0000000000000000"),
        "a privileged container has capabilities"
    );
    w.remove_pod(&ppod.0).await;
    w.remove_pod(&pod.0).await;
}

/// Pulls each of `names` through berthd.
async fn pull_all(w: &World, names: &[&str]) {
    for name in names {
        common::world::pull(&w.env.berthd, name).await;
    }
}

fn in_image(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..container(name, cmd)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_users_outside_the_id_range_never_run_and_never_pass_for_non_root() {
    let mut w = World::new().await;
    let minus_one = "docker.io/berth-test/user-uid-minus-one:latest";
    let by_name = [
        (
            "docker.io/berth-test/user-numeric-name-4294967296:latest",
            "4294967296",
        ),
        (
            "docker.io/berth-test/user-numeric-name-minus-one:latest",
            "-1",
        ),
        (
            "docker.io/berth-test/user-numeric-name-i64-max:latest",
            "9223372036854775807",
        ),
    ];
    let mut all = vec![minus_one];
    all.extend(by_name.iter().map(|(i, _)| *i));
    pull_all(&w, &all).await;
    // ImageStatus never reports such a USER as a uid: kubelet's runAsNonRoot check cannot
    // pass on it (it reads a uid of 4294967295 as non-root).
    let mut images = w.env.berthd.images().await;
    for (image, user) in [(minus_one, "4294967295")].into_iter().chain(by_name) {
        let img = images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap();
        assert_eq!(img.uid, None, "{image} reported uid {:?}", img.uid);
        assert_eq!(img.username, user, "{image}");
    }
    let pod = w.pod("ids").await;
    let before = w.leftovers();
    // Each image is refused at create, naming the image and the value; none runs (as root).
    for (image, user) in [(minus_one, "4294967295")].into_iter().chain(by_name) {
        let err = w
            .create(&pod, in_image("u", image, &["id", "-u"]))
            .await
            .expect_err(&format!("{image} was created"));
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(image) && err.message().contains(&format!("{user:?}")),
            "{}",
            err.message()
        );
    }
    // The request's ids: the same range.
    let busybox = BUSYBOX;
    for (what, sc) in [
        (
            "run_as_user 4294967295",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 4294967295 }),
                ..Default::default()
            },
        ),
        (
            "run_as_user -1",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: -1 }),
                ..Default::default()
            },
        ),
        (
            "run_as_group 2147483648",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                run_as_group: Some(cri::Int64Value { value: 2147483648 }),
                ..Default::default()
            },
        ),
        (
            "supplemental group 4294967295",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                supplemental_groups: vec![4294967295],
                ..Default::default()
            },
        ),
    ] {
        let mut c = in_image("r", busybox, &["id"]);
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        });
        let err = w
            .create(&pod, c)
            .await
            .expect_err(&format!("{what} was taken"));
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before, "a refused container left something");
    // The largest id there is still runs, as that id.
    let mut c = in_image("max", busybox, &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 2147483647 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = w.run(&pod, c).await;
    assert_eq!(w.out(&id, &["id", "-u"]).await.trim(), "2147483647");
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_dev_is_a_symlink_is_refused_before_a_runtime_sees_it() {
    let mut w = World::new().await;
    let images = [
        ("docker.io/berth-test/dev-symlink-abs:latest", "/dev"),
        ("docker.io/berth-test/dev-symlink-rel:latest", "/dev"),
        ("docker.io/berth-test/dev-symlink-shm:latest", "/dev/shm"),
    ];
    pull_all(&w, &images.map(|(i, _)| i)).await;
    // The node directory the images' links name, with a node file called ptmx in it.
    let target = Path::new("/tmp/berth-dev-target");
    let _ = std::fs::remove_dir_all(target);
    std::fs::create_dir(target).unwrap();
    std::fs::write(target.join("ptmx"), b"node file\n").unwrap();
    let pod = w.pod("dev").await;
    let before = w.leftovers();
    let mut results = Vec::new();
    for (image, path) in images {
        let r = w.create(&pod, in_image("d", image, &["true"])).await;
        if let Ok(id) = &r {
            // The old behaviour: the runtime writes its /dev links into the node directory.
            let _ = w.start(id).await;
        }
        results.push((image, path, r));
    }
    let mut in_target: Vec<String> = std::fs::read_dir(target)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    in_target.sort();
    let ptmx = std::fs::read(target.join("ptmx")).ok();
    let _ = std::fs::remove_dir_all(target);
    assert_eq!(
        in_target,
        ["ptmx"],
        "the runtime wrote into the node directory"
    );
    assert_eq!(ptmx.as_deref(), Some(&b"node file\n"[..]));
    for (image, path, r) in results {
        let err = r.expect_err(&format!("{image} was created"));
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(&format!("{path} is")),
            "{image}: {}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before, "a refused container left something");
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_at_a_containers_log_path_is_never_written_through() {
    let mut w = World::new().await;
    let pod = w.pod("loglinks").await;
    let logs = Path::new(&pod.1.log_directory).to_path_buf();
    // A node file the links point at, outside the pod's log directory.
    let node_dir = tempfile::tempdir().unwrap();
    let node_file = node_dir.path().join("node-file");
    std::fs::write(&node_file, b"node\n").unwrap();
    std::fs::create_dir_all(logs.join("direct")).unwrap();
    std::os::unix::fs::symlink(&node_file, logs.join("direct/0.log")).unwrap();
    std::os::unix::fs::symlink(node_dir.path(), logs.join("via-dir")).unwrap();
    let before = w.leftovers();
    for (name, log_path) in [("direct", "direct/0.log"), ("via", "via-dir/node-file")] {
        let mut c = container(name, &["sh", "-c", "echo written"]);
        c.log_path = log_path.into();
        let err = w
            .create(&pod, c)
            .await
            .expect_err(&format!("a container logging to {log_path} was created"));
        assert!(err.message().contains(log_path), "{}", err.message());
    }
    assert_eq!(w.leftovers(), before, "a refused container left something");
    // After a rotation, a link put where the log was is not followed by the reopen.
    let id = w
        .run(
            &pod,
            container(
                "rot",
                &["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
            ),
        )
        .await;
    let log = logs.join("rot/0.log");
    std::fs::rename(&log, logs.join("rot/0.log.1")).unwrap();
    std::os::unix::fs::symlink(&node_file, &log).unwrap();
    let reopened =
        w.rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await;
    assert!(reopened.is_err(), "the reopen went through a link");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read(&node_file).unwrap(), b"node\n");
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_cannot_shadow_berthds_own_servers() {
    let mut w = World::with(Options {
        extra_config: "[streaming]\nport = 10350\n[metrics]\naddress = \"127.0.0.1:10351\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    let before = w.leftovers();
    let mapping = |host_port: i32, host_ip: &str, protocol: cri::Protocol| cri::PortMapping {
        protocol: protocol as i32,
        container_port: 80,
        host_port,
        host_ip: host_ip.into(),
    };
    for (m, names) in [
        (
            mapping(10350, "127.0.0.1", cri::Protocol::Tcp),
            "127.0.0.1:10350",
        ),
        (mapping(10350, "", cri::Protocol::Tcp), "127.0.0.1:10350"),
        (
            mapping(10351, "0.0.0.0", cri::Protocol::Tcp),
            "127.0.0.1:10351",
        ),
    ] {
        let mut c = w.pod_config("shadow", cri::NamespaceMode::Container);
        c.port_mappings = vec![m];
        let err = refused_pod(&mut w, c, &common::handler()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(names) && err.message().contains("host port"),
            "{}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before, "a refused pod left something");
    // Other ports, other addresses and other protocols are taken.
    let mut c = w.pod_config("fine", cri::NamespaceMode::Container);
    c.port_mappings = vec![
        mapping(10352, "", cri::Protocol::Tcp),
        mapping(10350, "", cri::Protocol::Udp),
        mapping(10351, "127.0.0.2", cri::Protocol::Tcp),
    ];
    let pod = w.run_pod(c).await;
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_namespace_mapped_onto_the_nodes_root_is_refused() {
    let mut w = World::new().await;
    let before = w.leftovers();
    for (uid_host, gid_host) in [(0, 300_000), (300_000, 0), (0, 0)] {
        let mut c = w.pod_config("rootmap", cri::NamespaceMode::Pod);
        let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        let map = |host_id| cri::IdMapping {
            container_id: 0,
            host_id,
            length: 65_536,
        };
        sc.namespace_options.as_mut().unwrap().userns_options = Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: vec![map(uid_host)],
            gids: vec![map(gid_host)],
        });
        let err = refused_pod(&mut w, c, &common::handler()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("node's root"), "{}", err.message());
    }
    assert_eq!(w.leftovers(), before, "a refused pod left something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_files_that_are_traps_fail_cleanly_and_never_stall_berthd() {
    let mut w = World::new().await;
    let mut images = w.env.berthd.images().await;
    for name in [
        "docker.io/berth-test/fifo-passwd:latest",
        "docker.io/berth-test/symlinked-etc:latest",
    ] {
        images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let pod = w.pod("traps").await;
    let before = w.leftovers();
    let in_image = |name: &str, image: &str| cri::ContainerConfig {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..container(name, &["sleep", "3600"])
    };
    // A FIFO /etc/passwd: refused by name, and berthd answers other calls meanwhile.
    let mut rt2 = w.env.berthd.runtime().await;
    let (created, version) = tokio::join!(
        w.create(
            &pod,
            in_image("fifo", "docker.io/berth-test/fifo-passwd:latest")
        ),
        async {
            tokio::time::timeout(
                Duration::from_secs(5),
                rt2.version(cri::VersionRequest::default()),
            )
            .await
        }
    );
    let err = created.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("/etc/passwd") && err.message().contains("FIFO"),
        "{}",
        err.message()
    );
    assert!(version.expect("Version timed out").is_ok());
    assert_eq!(
        w.leftovers(),
        before,
        "the refused container left something"
    );

    // /etc/hosts and /etc/resolv.conf symlinked out of the image: the pod's files are mounted
    // inside the image, never on the node's paths the links name.
    let escapes = ["/tmp/berth-escape-hosts", "/tmp/berth-escape-resolv"];
    for e in escapes {
        let _ = std::fs::remove_file(e);
    }
    let id = w
        .run(
            &pod,
            in_image("links", "docker.io/berth-test/symlinked-etc:latest"),
        )
        .await;
    for e in escapes {
        assert!(!Path::new(e).exists(), "{e} was made on the node");
    }
    let hosts = w.out(&id, &["cat", "/etc/hosts"]).await;
    assert!(hosts.contains("managed by berth"), "{hosts}");
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_handlers_berth_cannot_run_are_refused_not_ignored() {
    // A configured runc under a name of the test's own (BERTH_TEST_HANDLER may add "runc"):
    // Debian's, for what it lacks (idmapped mounts), taken although it lacks the 2025 fixes.
    let mut w = World::with(Options {
        extra_config: "[runtimes.rc]\npath = \"/usr/sbin/runc\"\nallow_vulnerable = true\n".into(),
        ..Default::default()
    })
    .await;
    let status =
        w.rt.status(cri::StatusRequest { verbose: false })
            .await
            .unwrap()
            .into_inner();
    let rc = status
        .runtime_handlers
        .iter()
        .find(|h| h.name == "rc")
        .expect("the configured handler is listed");
    let features = rc.features.unwrap();
    // Debian 12's runc 1.1 has no idmapped mounts: no user namespaces claimed for it.
    let idmap = std::process::Command::new("/usr/sbin/runc")
        .arg("features")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"idmap\""))
        .unwrap_or(false);
    if !idmap {
        assert!(!features.user_namespaces, "{features:?}");
    }
    let before = w.leftovers();
    // Handlers that are not configured.
    for handler in ["kata", "gvisor"] {
        let c = w.pod_config("handler", cri::NamespaceMode::Container);
        let err = refused_pod(&mut w, c, handler).await;
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(handler), "{}", err.message());
    }
    // A user namespace under a runtime without idmapped mounts.
    if !features.user_namespaces {
        let mut c = w.pod_config("handler", cri::NamespaceMode::Container);
        let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        let map = cri::IdMapping {
            container_id: 0,
            host_id: 300_000,
            length: 65_536,
        };
        sc.namespace_options.as_mut().unwrap().userns_options = Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: vec![map],
            gids: vec![map],
        });
        let err = refused_pod(&mut w, c, "rc").await;
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("\"rc\"") && err.message().contains("user namespace"),
            "{}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before);
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn pull(
    b: &common::Berthd,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    b.images()
        .await
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// A registry mirror that wants Basic credentials for everything.
fn greedy_mirror(ns: &Netns, port: u16) -> FakeHttp {
    FakeHttp::start(ns, "127.0.0.1", port, |_| Reply {
        status: 401,
        headers: vec![("WWW-Authenticate".into(), "Basic realm=\"mirror\"".into())],
        body: b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"credentials\"}]}".to_vec(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_credentials_reach_only_the_registry_they_are_for() {
    let netns = Netns::new();
    let mirror = greedy_mirror(&netns, 5001);
    let star = greedy_mirror(&netns, 5002);
    let dir = tempfile::tempdir().unwrap();
    let creds_file = dir.path().join("auth.json");
    std::fs::write(
        &creds_file,
        format!(
            r#"{{"auths": {{"{}": {{"username": "operator", "password": "op-pw"}}}}}}"#,
            star.addr
        ),
    )
    .unwrap();
    let b = common::Berthd::start_with(Options {
        extra_config: format!(
            "[images]\ncredentials_file = \"{}\"\n\
             [registries.\"registry.example.com\"]\nmirrors = [\"http://{}\"]\n\
             [registries.\"*\"]\nmirrors = [\"http://{}\"]\n",
            creds_file.display(),
            mirror.addr,
            star.addr
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    // kubelet's pull secret for registry.example.com, in both forms it sends.
    for auth in [
        cri::AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            server_address: "registry.example.com".into(),
            ..Default::default()
        },
        cri::AuthConfig {
            auth: basic("alice", "s3cret")["Basic ".len()..].to_string(),
            ..Default::default()
        },
    ] {
        let err = pull(&b, "registry.example.com/app:1", Some(auth))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
    let alice = basic("alice", "s3cret");
    for m in [&mirror, &star] {
        let seen = m.seen();
        assert!(!seen.is_empty(), "the mirror {} was never asked", m.addr);
        for r in &seen {
            assert_ne!(
                r.header("authorization"),
                Some(alice.as_str()),
                "mirror {} got the pull secret: {} {}",
                m.addr,
                r.method,
                r.path
            );
        }
    }
    // A mirror presents the credentials-file entry for its own host, and only those.
    let operator = basic("operator", "op-pw");
    assert!(
        star.seen()
            .iter()
            .any(|r| r.header("authorization") == Some(operator.as_str())),
        "the * mirror did not get its own credentials"
    );
    assert!(
        mirror
            .seen()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "the host mirror got credentials it has no entry for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_credentials_do_not_follow_a_redirect_to_another_host() {
    let netns = Netns::new();
    let registry = common::Registry::start(&netns, 5000);
    let upstream = registry.addr.clone();
    // Blobs served from another host (as registries redirect to a CDN), recording headers.
    let up = upstream.clone();
    let cdn = FakeHttp::start(&netns, "127.0.0.2", 5010, move |r| {
        common::fake_http::get(&up, &r.method, &r.path, &[])
    });
    let cdn_addr = cdn.addr.clone();
    let alice = basic("alice", "s3cret");
    let want = alice.clone();
    let up = upstream.clone();
    let front = FakeHttp::start(&netns, "127.0.0.1", 5011, move |r| {
        if r.header("authorization") != Some(want.as_str()) {
            return Reply {
                status: 401,
                headers: vec![("WWW-Authenticate".into(), "Basic realm=\"front\"".into())],
                body: Vec::new(),
                ..Default::default()
            };
        }
        if r.path.contains("/blobs/") {
            return Reply {
                status: 307,
                headers: vec![("Location".into(), format!("http://{cdn_addr}{}", r.path))],
                body: Vec::new(),
                ..Default::default()
            };
        }
        let accept = r.header("accept").unwrap_or("*/*").to_string();
        common::fake_http::get(&up, &r.method, &r.path, &[("Accept", &accept)])
    });
    let b = common::Berthd::start_with(Options {
        extra_config: format!("[registries.\"{}\"]\ninsecure = true\n", front.addr),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let image = format!("{}/berth-test/zstd:latest", front.addr);
    let auth = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    pull(&b, &image, Some(auth)).await.unwrap();
    assert!(
        front
            .seen()
            .iter()
            .any(|r| r.header("authorization") == Some(alice.as_str()))
    );
    let blobs = cdn.seen();
    assert!(
        !blobs.is_empty(),
        "the blobs did not come from the other host"
    );
    for r in &blobs {
        assert_eq!(
            r.header("authorization"),
            None,
            "the redirect target got credentials: {}",
            r.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_waiting_to_start_holds_nothing_of_the_node_or_the_monitor() {
    let mut w = World::new().await;
    let (pod, tracer) = shared_pid_pod_with_tracer(&mut w, "waiting").await;
    // Created, not started: its process waits in the pod's PID namespace until StartContainer.
    let waiting = w
        .create(&pod, container("waiting", &["sleep", "3600"]))
        .await
        .unwrap();
    // Every descriptor of every process the tracer can see (but its own shell's): no
    // directory (a procfs or a root of the node), no file but /dev/null and terminals, no
    // signalfd (the monitor's). A directory that is the root of a procfs (or `N/task/N/fd`
    // in one) is told apart when that procfs shows only processes (mounted `subset=pid`: no
    // /proc/sys, no sysrq-trigger) of this PID namespace (its `self` is the reader's own pid
    // here); a regular file says whether it opens for writing.
    let script = r#"
        own_pids_only() {
          [ -z "$(ls $1 | grep -v -e '^[0-9]*$' -e '^self$' -e '^thread-self$')" ] || return 1
          set -- $(sh -c 'echo $$; exec readlink "$0/self"' $1 2>/dev/null)
          [ -n "$1" ] && [ "$1" = "$2" ]
        }
        for p in /proc/[0-9]*; do
          n=${p#/proc/}; [ "$n" = "$$" ] && continue
          for f in $p/fd/*; do
            t=$(readlink $f) || continue
            if [ -d $f ]; then
              r=$f; i=0
              while [ ! -e $r/self ] && [ $i -lt 4 ]; do r=$r/..; i=$((i + 1)); done
              if own_pids_only $r; then
                echo "$n: $f is a directory ($t) of a procfs of this PID namespace's processes only"
              else
                echo "$n: $f is a directory ($t)"
              fi
              continue
            fi
            case "$t" in
              socket:*|pipe:*|/dev/null|/dev/pts/*) ;;
              *) w=""; [ -f $f ] && (exec 3>>$f) 2>/dev/null && w=" (writable)"
                 echo "$n: $f -> $t$w" ;;
            esac
          done
        done
        ls /proc | grep -c '^[0-9]'
    "#;
    let (code, out, err) = sh(&mut w, &tracer, script).await;
    assert_eq!(code, 0, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    let count: usize = lines.pop().unwrap().trim().parse().unwrap();
    // runc's waiting init holds the container's exec fifo (how `runc start` tells it to go)
    // and the Go runtime's own epoll and eventfd; runc 1.2+ also its read-only sealed copy of
    // itself (`/runc` on a detached mount, against CVE-2019-5736) and a procfs of the pod's
    // PID namespace showing processes only (its pathrs handle): the container's, nothing of
    // the node or the monitor. (A runc built by Go 1.25+ would also hold its cgroup's CPU
    // limit files: e2e/tools/runc/go.mod turns that off.)
    if !common::handler().is_empty() {
        let fifo = w.env.berthd.state.join("lc");
        lines.retain(|l| {
            !(l.ends_with("/exec.fifo") && l.contains(&*fifo.to_string_lossy())
                || l.ends_with("anon_inode:[eventpoll]")
                || l.ends_with("anon_inode:[eventfd]")
                || l.ends_with(" -> /runc")
                || l.ends_with("of a procfs of this PID namespace's processes only"))
        });
    }
    // On cgroup v2 libcontainer loads the container's device filter (an eBPF program) before
    // the init forks and does not close the program's descriptor (close-on-exec: gone at
    // Start). The program is the container's own; detaching or attaching with it takes
    // CAP_NET_ADMIN of the node's user namespace besides the CAP_SYS_PTRACE to take it.
    if common::handler().is_empty() {
        lines.retain(|l| !l.ends_with("anon_inode:bpf-prog"));
    }
    assert!(
        count >= 4,
        "the waiting container's process is not visible: {count} processes"
    );
    assert!(
        lines.is_empty(),
        "processes of the pod hold:\n{}",
        lines.join("\n")
    );
    let (_, titles, _) = sh(&mut w, &tracer, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").await;
    let waiting_title = if common::handler().is_empty() {
        "berth-create"
    } else {
        "runc init"
    };
    assert!(titles.contains(waiting_title), "{titles}");
    w.start(&waiting).await.unwrap();
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_berth_cannot_honour_fail_the_call_by_name() {
    let mut w = World::new().await;
    let pod = w.pod("honour").await;
    let before = w.leftovers();
    let with_sc = |sc: cri::LinuxContainerSecurityContext| cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..container("c", &["sleep", "3600"])
    };
    let mut bidirectional = container("c", &["sleep", "3600"]);
    bidirectional.mounts = vec![cri::Mount {
        container_path: "/shared".into(),
        host_path: w.env.berthd.dir.path().to_string_lossy().into_owned(),
        propagation: cri::MountPropagation::PropagationBidirectional as i32,
        ..Default::default()
    }];
    for (what, config) in [
        (
            "apparmor",
            with_sc(cri::LinuxContainerSecurityContext {
                apparmor: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: "k8s-deny-write".into(),
                }),
                ..Default::default()
            }),
        ),
        ("Bidirectional", bidirectional),
    ] {
        let err = w.create(&pod, config).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains(what), "{what}: {}", err.message());
    }
    assert_eq!(w.leftovers(), before);

    // Pod files take the hostname and DNS settings as lines: nothing may add lines.
    let mut c = w.pod_config("dns", cri::NamespaceMode::Container);
    c.hostname = "evil\n10.0.0.1 kubernetes".into();
    let err = refused_pod(&mut w, c, "").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hostname"), "{}", err.message());
    let mut c = w.pod_config("dns", cri::NamespaceMode::Container);
    c.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["svc.cluster.local\nnameserver 6.6.6.6".into()],
        options: Vec::new(),
    });
    let err = refused_pod(&mut w, c, "").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("dns_config"), "{}", err.message());
    w.remove_pod(&pod.0).await;
}

/// Runs berthd on fresh directories in a namespace of its own with `config` and waits (up to
/// 30 s) for it to exit before it serves: its exit status and what it printed. One that serves
/// instead is stopped, and the test fails.
fn berthd_refuses_to_start(config: &str) -> (std::process::ExitStatus, String) {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let cgroup_root = format!("berth-test-{}-refused", std::process::id());
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!("cgroup_parent = \"/{cgroup_root}\"\n{config}"),
    )
    .unwrap();
    let log = dir.path().join("berthd.log");
    let socket = dir.path().join("berth.sock");
    let mut cmd = Command::new(common::BERTHD);
    common::in_netns(&mut cmd, &ns.path);
    let mut child = cmd
        .arg("--config")
        .arg(&cfg)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if socket.exists() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    common::kill_pod_processes(&dir.path().join("state"));
    common::cleanup_cgroups(&cgroup_root);
    common::unmount_under(dir.path());
    let status = status.unwrap_or_else(|| panic!("berthd started (it should refuse):\n{text}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_without_the_2025_breakout_fixes_is_refused_unless_allowed() {
    // Debian 12's runc 1.1.5 lacks the November 2025 fixes (three container breakouts through
    // runc's writes to /proc; fixed in 1.2.8, 1.3.3 and 1.4.0-rc.3).
    const RUNC: &str = "/usr/sbin/runc";
    const CVES: [&str; 3] = ["CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"];
    let version = common::run(Command::new(RUNC).arg("--version"));
    assert!(
        version.starts_with("runc version 1.1."),
        "this test needs Debian 12's runc 1.1 at {RUNC}: {version}"
    );

    // Refused at start, naming the handler, the version, the CVEs and the fixed releases.
    let (status, text) = tokio::task::block_in_place(|| {
        berthd_refuses_to_start(&format!("[runtimes.rc]\npath = {RUNC:?}\n"))
    });
    assert!(!status.success(), "{status}: {text}");
    for want in [
        "runtimes.rc",
        RUNC,
        "1.1.5",
        "1.2.8",
        "1.3.3",
        "1.4.0-rc.3",
        "allow_vulnerable",
    ]
    .into_iter()
    .chain(CVES)
    {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }

    // Taken when its section says so: berthd starts, warns with the same facts, and Status
    // lists the handler.
    let b = common::Berthd::start_with(Options {
        extra_config: format!("[runtimes.rc]\npath = {RUNC:?}\nallow_vulnerable = true\n"),
        ..Default::default()
    });
    let status = b
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.runtime_handlers.iter().any(|h| h.name == "rc"),
        "{:?}",
        status.runtime_handlers
    );
    let log = b.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("CVE-2025-31133"))
        .unwrap_or_else(|| panic!("no warning about the CVEs:\n{log}"));
    for want in ["rc", "1.1.5", "1.2.8", "1.3.3", "1.4.0-rc.3"]
        .into_iter()
        .chain(CVES)
    {
        assert!(warning.contains(want), "{want} not in: {warning}");
    }
}
