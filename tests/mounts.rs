//! Volumes: recursive read-only mounts and mount propagation (private, host to container,
//! both ways), seen from inside the container and from the node.

mod common;

use std::path::{Path, PathBuf};

use berth::cri::v1 as cri;
use common::world::*;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tonic::Code;

/// A mount made for a test, unmounted with everything below it when dropped (a failing test
/// included).
struct TestMount(PathBuf);

impl TestMount {
    /// A small tmpfs at `at`.
    fn tmpfs(at: &Path) -> TestMount {
        std::fs::create_dir_all(at).unwrap();
        mount(
            Some("berth-test"),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        TestMount(at.to_path_buf())
    }

    /// `at` bind-mounted onto itself with the propagation `flag` (MS_SHARED, MS_PRIVATE).
    fn bind_self(at: &Path, flag: MsFlags) -> TestMount {
        std::fs::create_dir_all(at).unwrap();
        mount(
            Some(at),
            at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        let m = TestMount(at.to_path_buf());
        mount(
            None::<&str>,
            at,
            None::<&str>,
            flag | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        m
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursive_read_only_volumes_hold_their_submounts_read_only_too() {
    let mut w = World::new().await;
    let status = w.runtime_status().await;
    let handler = &status.runtime_handlers[0];
    assert!(handler.features.unwrap().recursive_read_only_mounts);
    let vol = w.env.berthd.dir.path().join("vol");
    let _sub = TestMount::tmpfs(&vol.join("sub"));
    let pod = w.pod("rro").await;
    let volume = |recursive: bool, readonly: bool, propagation: cri::MountPropagation| cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.to_string_lossy().into_owned(),
        readonly,
        recursive_read_only: recursive,
        propagation: propagation as i32,
        ..Default::default()
    };
    let private = cri::MountPropagation::PropagationPrivate;
    let mut outcomes = Vec::new();
    for recursive in [false, true] {
        let mut c = container(if recursive { "rro" } else { "ro" }, &["sleep", "3600"]);
        c.mounts = vec![volume(recursive, true, private)];
        let id = w.run(&pod, c).await;
        let (top, _) = w.sh(&id, "touch /vol/f").await;
        let (sub, out) = w.sh(&id, "touch /vol/sub/f && rm /vol/sub/f").await;
        assert_ne!(top, 0, "the volume itself is read-only");
        outcomes.push((sub == 0, out));
        let m = &w.status(&id).await.mounts[0];
        assert_eq!(m.recursive_read_only, recursive);
    }
    assert!(
        outcomes[0].0,
        "a plain read-only volume leaves its submount as it is: {:?}",
        outcomes[0]
    );
    assert!(
        !outcomes[1].0,
        "a recursive one does not: {:?}",
        outcomes[1]
    );
    assert!(outcomes[1].1.contains("Read-only"), "{}", outcomes[1].1);
    // Recursive read-only needs read-only and private propagation.
    let before = w.leftovers();
    for m in [
        volume(true, false, private),
        volume(
            true,
            true,
            cri::MountPropagation::PropagationHostToContainer,
        ),
    ] {
        let mut c = container("bad", &["sleep", "3600"]);
        c.mounts = vec![m];
        let err = w.create(&pod, c).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("recursive_read_only"),
            "{}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_propagation_goes_the_ways_the_volume_asks() {
    let mut w = World::new().await;
    let base = w.env.berthd.dir.path().to_path_buf();
    let pod = w.privileged_pod("propagation").await;
    use cri::MountPropagation as P;
    for (name, propagation, host_flag, to_container, to_host) in [
        (
            "private",
            P::PropagationPrivate,
            MsFlags::MS_PRIVATE,
            false,
            false,
        ),
        (
            "slave",
            P::PropagationHostToContainer,
            MsFlags::MS_SHARED,
            true,
            false,
        ),
        (
            "shared",
            P::PropagationBidirectional,
            MsFlags::MS_SHARED,
            true,
            true,
        ),
    ] {
        let src = base.join(name);
        let _src = TestMount::bind_self(&src, host_flag);
        let mut c = privileged_container(name, &["sleep", "3600"]);
        c.mounts = vec![cri::Mount {
            container_path: "/vol".into(),
            host_path: src.to_string_lossy().into_owned(),
            propagation: propagation as i32,
            ..Default::default()
        }];
        let id = w.run(&pod, c).await;
        assert_eq!(
            w.status(&id).await.mounts[0].propagation,
            propagation as i32
        );
        // A mount the node makes after the start…
        let from_host = TestMount::tmpfs(&src.join("from-host"));
        std::fs::write(src.join("from-host/flag"), "node").unwrap();
        let (code, _) = w.sh(&id, "test -f /vol/from-host/flag").await;
        assert_eq!(
            code == 0,
            to_container,
            "{name}: the node's mount in the container"
        );
        // …and one the container makes.
        let (code, out) = w
            .sh(
                &id,
                "mkdir -p /vol/from-ctr && mount -t tmpfs c /vol/from-ctr && \
                 echo c > /vol/from-ctr/flag",
            )
            .await;
        assert_eq!(code, 0, "{name}: {out}");
        let seen = src.join("from-ctr/flag").exists();
        assert_eq!(seen, to_host, "{name}: the container's mount on the node");
        drop(from_host);
        let _ = umount2(&src.join("from-ctr"), MntFlags::MNT_DETACH);
        w.remove(&id).await;
    }
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_options_noexec_nodev_nosuid_reach_the_bind_mount() {
    let mut w = World::new().await;
    let vol = w.env.berthd.dir.path().join("optvol");
    std::fs::create_dir_all(&vol).unwrap();
    let pod = w.pod("mountopts").await;
    let volume = |options: &[&str]| cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.to_string_lossy().into_owned(),
        mount_options: options.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    // The container copies its own sh into the volume and runs it from there (busybox picks
    // its applet by the program's name, so the copy keeps it).
    let try_exec = "mkdir -p /vol/bin && cp /bin/sh /vol/bin/sh && /vol/bin/sh -c 'echo ran'";
    let mut plain = container("plain", &["sleep", "3600"]);
    plain.mounts = vec![volume(&[])];
    let id = w.run(&pod, plain).await;
    let (code, out) = w.sh(&id, try_exec).await;
    assert_eq!(
        (code, out.trim()),
        (0, "ran"),
        "without options the volume runs programs"
    );
    w.remove(&id).await;
    std::fs::remove_dir_all(vol.join("bin")).unwrap();

    let mut opts = container("opts", &["sleep", "3600"]);
    opts.mounts = vec![volume(&["noexec", "nodev", "nosuid"])];
    let id = w.run(&pod, opts).await;
    let (code, out) = w.sh(&id, try_exec).await;
    assert_ne!(code, 0, "noexec: {out}");
    assert!(out.contains("denied"), "{out}");
    let (_, line) = w.sh(&id, "grep ' /vol ' /proc/self/mountinfo").await;
    let flags = line
        .split_whitespace()
        .nth(5)
        .unwrap_or_default()
        .to_string();
    for f in ["noexec", "nodev", "nosuid"] {
        assert!(flags.split(',').any(|x| x == f), "{f} missing in {line}");
    }
    assert_eq!(
        w.status(&id).await.mounts[0].mount_options,
        ["noexec", "nodev", "nosuid"]
    );
    // Anything else fails the call by name, leaving nothing behind.
    let before = w.leftovers();
    for bad in ["exec", "suid", "rw", "bind"] {
        let mut c = container("bad", &["sleep", "3600"]);
        c.mounts = vec![volume(&[bad])];
        let err = w.create(&pod, c).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(&format!("{bad:?}")),
            "{}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}
