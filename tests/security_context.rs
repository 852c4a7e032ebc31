//! A container's security context as seen from inside it and from its exec'd processes:
//! seccomp profiles (RuntimeDefault, Localhost, Unconfined, privileged), ambient capabilities,
//! and an exec'd process holding exactly what the container's own process holds.

mod common;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

use cri::security_profile::ProfileType;

fn with_sc(
    name: &str,
    cmd: &[&str],
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    with_security(container(name, cmd), sc)
}

/// A security profile (seccomp or AppArmor) of type `t`.
fn seccomp(t: ProfileType, path: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: path.into(),
    })
}

fn caps(add: &[&str], drop: &[&str]) -> Option<cri::Capability> {
    Some(cri::Capability {
        add_capabilities: add.iter().map(|s| s.to_string()).collect(),
        drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

/// A field of /proc/<who>/status in the container.
async fn status_field(w: &mut World, id: &str, who: &str, field: &str) -> String {
    let (code, out) = w
        .sh(id, &format!("grep '^{field}:' /proc/{who}/status"))
        .await;
    assert_eq!(code, 0, "{out}");
    out.split_once(':').unwrap().1.trim().to_string()
}

const BLOCK_CHMOD: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_profiles_confine_the_container_and_every_exec() {
    let mut w = World::new().await;
    let dir = w.env.berthd.dir.path().to_path_buf();
    let block_chmod = dir.join("block-chmod.json");
    std::fs::write(&block_chmod, BLOCK_CHMOD).unwrap();
    let block_chmod = block_chmod.to_string_lossy().into_owned();
    let pod = w.pod("seccomp").await;
    let sleep = ["sleep", "3600"];

    // RuntimeDefault: a filter on the container's process and on every exec; a new user
    // namespace (reachable without any capability) is refused, while the same call passes
    // unconfined.
    let default = w
        .run(
            &pod,
            with_sc(
                "default",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    seccomp: seccomp(ProfileType::RuntimeDefault, ""),
                    ..Default::default()
                },
            ),
        )
        .await;
    let open = w
        .run(
            &pod,
            with_sc(
                "open",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    seccomp: seccomp(ProfileType::Unconfined, ""),
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(status_field(&mut w, &default, "1", "Seccomp").await, "2");
    assert_eq!(status_field(&mut w, &default, "self", "Seccomp").await, "2");
    assert_eq!(
        status_field(&mut w, &default, "self", "NoNewPrivs").await,
        "0"
    );
    assert_eq!(status_field(&mut w, &open, "1", "Seccomp").await, "0");
    assert_eq!(status_field(&mut w, &open, "self", "Seccomp").await, "0");
    let (code, out) = w.sh(&default, "unshare -U true").await;
    assert_ne!(code, 0, "a user namespace under RuntimeDefault: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (code, out) = w.sh(&open, "unshare -U true").await;
    assert_eq!(code, 0, "a user namespace unconfined: {out}");
    // Ordinary work goes on under it: files, processes, pipes, sockets, threads of a shell.
    let (code, out) = w
        .sh(
            &default,
            "mkdir -p /tmp/d && echo hi > /tmp/d/f && chmod 600 /tmp/d/f && cat /tmp/d/f | wc -c \
         && ls -l /tmp/d >/dev/null && (sleep 0 &) && wait && nc -l -p 9 -w 1 </dev/null; true",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with('3'), "{out}");
    // With CAP_SYS_ADMIN the calls it gates are open (a mount in the container's namespace).
    let admin = w
        .run(
            &pod,
            with_sc(
                "admin",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    seccomp: seccomp(ProfileType::RuntimeDefault, ""),
                    capabilities: caps(&["SYS_ADMIN"], &[]),
                    ..Default::default()
                },
            ),
        )
        .await;
    let (code, out) = w
        .sh(&admin, "mkdir -p /mnt/t && mount -t tmpfs t /mnt/t")
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status_field(&mut w, &admin, "self", "Seccomp").await, "2");

    // Localhost: the node's profile, on the process and the execs.
    let local = w
        .run(
            &pod,
            with_sc(
                "local",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    seccomp: seccomp(ProfileType::Localhost, &block_chmod),
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(status_field(&mut w, &local, "1", "Seccomp").await, "2");
    let (code, out) = w.sh(&local, "chmod 400 /").await;
    assert_ne!(code, 0);
    assert!(out.contains("Operation not permitted"), "{out}");
    // And with no_new_privs, loaded after the capabilities are dropped.
    let nnp = w
        .run(
            &pod,
            with_sc(
                "nnp",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    seccomp: seccomp(ProfileType::RuntimeDefault, ""),
                    no_new_privs: true,
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(status_field(&mut w, &nnp, "1", "NoNewPrivs").await, "1");
    assert_eq!(status_field(&mut w, &nnp, "self", "NoNewPrivs").await, "1");
    assert_eq!(status_field(&mut w, &nnp, "self", "Seccomp").await, "2");

    // A privileged container runs without a filter, whatever it names.
    let ppod = w.privileged_pod("privileged").await;
    let privileged = w
        .run(
            &ppod,
            with_sc(
                "privileged",
                &sleep,
                cri::LinuxContainerSecurityContext {
                    privileged: true,
                    seccomp: seccomp(ProfileType::Localhost, &block_chmod),
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(
        status_field(&mut w, &privileged, "self", "Seccomp").await,
        "0"
    );
    let (code, out) = w.sh(&privileged, "chmod 755 /").await;
    assert_eq!(code, 0, "{out}");

    // Profiles that cannot be read or are not OCI seccomp sections fail the call by name and
    // leave nothing.
    let before = w.leftovers();
    let not_json = dir.join("not-json.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let bad_action = dir.join("bad-action.json");
    std::fs::write(&bad_action, r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#).unwrap();
    let missing = dir.join("missing.json");
    for path in [
        not_json.to_string_lossy().into_owned(),
        bad_action.to_string_lossy().into_owned(),
        missing.to_string_lossy().into_owned(),
        "relative/profile.json".to_string(),
        dir.to_string_lossy().into_owned(),
    ] {
        let c = with_sc(
            "bad",
            &sleep,
            cri::LinuxContainerSecurityContext {
                seccomp: seccomp(ProfileType::Localhost, &path),
                ..Default::default()
            },
        );
        let err = w.create(&pod, c).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{path}: {}",
            err.message()
        );
        assert!(err.message().contains(&path), "{path}: {}", err.message());
    }
    #[allow(deprecated)]
    let old_form = with_sc(
        "old",
        &sleep,
        cri::LinuxContainerSecurityContext {
            seccomp_profile_path: "runtime/default".into(),
            ..Default::default()
        },
    );
    assert_eq!(w.leftovers(), before);
    let old = w.run(&pod, old_form).await;
    assert_eq!(status_field(&mut w, &old, "self", "Seccomp").await, "2");
    w.remove_pod(&ppod.0).await;
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_holds_what_the_containers_process_holds() {
    let mut w = World::new().await;
    let pod = w.pod("exec-identity").await;
    for (name, sc) in [
        (
            "root",
            cri::LinuxContainerSecurityContext {
                capabilities: caps(&["SYS_ADMIN", "NET_ADMIN"], &["CHOWN", "KILL"]),
                seccomp: seccomp(ProfileType::RuntimeDefault, ""),
                ..Default::default()
            },
        ),
        (
            "user",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1234 }),
                run_as_group: Some(cri::Int64Value { value: 2345 }),
                supplemental_groups: vec![3456, 4567],
                no_new_privs: true,
                capabilities: caps(&[], &["ALL"]),
                ..Default::default()
            },
        ),
        (
            "ambient",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1234 }),
                capabilities: Some(cri::Capability {
                    drop_capabilities: vec!["ALL".into()],
                    add_ambient_capabilities: vec!["NET_ADMIN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    ] {
        let id = w.run(&pod, with_sc(name, &["sleep", "3600"], sc)).await;
        if name == "ambient" {
            // A non-root process keeps an ambient capability across exec: effective too.
            for field in ["CapAmb", "CapInh", "CapEff", "CapPrm", "CapBnd"] {
                let v = status_field(&mut w, &id, "1", field).await;
                assert_eq!(v, "0000000000001000", "{field}");
            }
        }
        for field in [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ] {
            let init = status_field(&mut w, &id, "1", field).await;
            let exec = status_field(&mut w, &id, "self", field).await;
            assert_eq!(init, exec, "{name}: {field}");
        }
        let (_, init) = w.sh(&id, "cat /proc/1/cgroup; readlink /proc/1/ns/*").await;
        let (_, exec) = w
            .sh(&id, "cat /proc/self/cgroup; readlink /proc/self/ns/*")
            .await;
        assert_eq!(init, exec, "{name}: cgroups and namespaces");
        let (_, limits) = w.sh(&id, "cat /proc/1/limits /proc/1/oom_score_adj").await;
        let (_, own) = w
            .sh(&id, "cat /proc/self/limits /proc/self/oom_score_adj")
            .await;
        assert_eq!(limits, own, "{name}: limits");
        // The working directory and environment are the container's.
        assert_eq!(w.out(&id, &["pwd"]).await, "/");
        let env = w.out(&id, &["env"]).await;
        assert!(env.contains("PATH="), "{env}");
    }
    // A command that is not there is a shell's 127 with the reason.
    let any = w.run(&pod, container("plain", &["sleep", "3600"])).await;
    let r = w.exec(&any, &["no-such-command"], 10).await.unwrap();
    assert_eq!(r.exit_code, 127);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("no-such-command"), "{err}");
    w.remove_pod(&pod.0).await;
}

/// The groups line of /proc/1/status as numbers, sorted.
async fn process_groups(w: &mut World, id: &str) -> Vec<i64> {
    let mut g: Vec<i64> = status_field(w, id, "1", "Groups")
        .await
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    g.sort();
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplemental_groups_merge_or_not_and_status_says_what_the_process_got() {
    let mut w = World::new().await;
    let status = w.runtime_status().await;
    // kubelet admits Strict pods only on a runtime that says it supports the policy.
    assert!(status.features.unwrap().supplemental_groups_policy);
    let img = "gcr.io/k8s-staging-cri-tools/test-image-predefined-group";
    pull(&w.env.berthd, img).await;
    let pod = w.pod("groups").await;
    // The image's default-user (1000) is a member of group 50000 in its /etc/group.
    for (name, policy, want) in [
        (
            "merge",
            cri::SupplementalGroupsPolicy::Merge,
            vec![1000, 1234, 50000],
        ),
        (
            "strict",
            cri::SupplementalGroupsPolicy::Strict,
            vec![1000, 1234],
        ),
    ] {
        let mut c = with_sc(
            name,
            &["sleep", "3600"],
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                supplemental_groups: vec![1234],
                supplemental_groups_policy: policy as i32,
                ..Default::default()
            },
        );
        c.image = Some(cri::ImageSpec {
            image: img.into(),
            ..Default::default()
        });
        let id = w.run(&pod, c).await;
        assert_eq!(
            process_groups(&mut w, &id).await,
            want,
            "{name}: the process"
        );
        let user = w.status(&id).await.user.unwrap().linux.unwrap();
        let mut reported = user.supplemental_groups.clone();
        reported.sort();
        assert_eq!(reported, want, "{name}: ContainerStatus.user");
        assert_eq!((user.uid, user.gid), (1000, 1000), "{name}");
        let mut exec: Vec<i64> = w
            .out(&id, &["id", "-G"])
            .await
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        exec.sort();
        assert_eq!(exec, want, "{name}: an exec");
    }
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apparmor_takes_what_berth_can_honour_and_refuses_the_rest_by_name() {
    let mut w = World::new().await;
    // berth loads no AppArmor profiles. Without AppArmor in the kernel RuntimeDefault is no
    // profile and is taken; with it (the cgroup v2 guest's Debian kernel) it is refused.
    let kernel_has_it = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y");
    let status =
        w.rt.status(cri::StatusRequest { verbose: true })
            .await
            .unwrap()
            .into_inner();
    let said = if kernel_has_it { "enabled" } else { "disabled" };
    assert!(status.info["apparmor"].contains(said), "{:?}", status.info);
    let pod = w.pod("apparmor").await;
    let default = with_sc(
        "default",
        &["sleep", "3600"],
        cri::LinuxContainerSecurityContext {
            apparmor: seccomp(ProfileType::RuntimeDefault, ""),
            ..Default::default()
        },
    );
    if kernel_has_it {
        let err = w.create(&pod, default).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("does not load AppArmor profiles"),
            "{}",
            err.message()
        );
    } else {
        w.run(&pod, default).await;
    }
    let before = w.leftovers();
    #[allow(deprecated)]
    for sc in [
        cri::LinuxContainerSecurityContext {
            apparmor: seccomp(ProfileType::Localhost, "deny-writes"),
            ..Default::default()
        },
        cri::LinuxContainerSecurityContext {
            apparmor_profile: "localhost/deny-writes".into(),
            ..Default::default()
        },
    ] {
        let err = w
            .create(&pod, with_sc("named", &["true"], sc))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let why = if kernel_has_it {
            "does not load AppArmor profiles"
        } else {
            "no AppArmor"
        };
        assert!(err.message().contains(why), "{}", err.message());
        if !kernel_has_it {
            assert!(err.message().contains("deny-writes"), "{}", err.message());
        }
    }
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}
