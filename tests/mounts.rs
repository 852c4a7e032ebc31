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

/// A read-only image volume of `image` at `at`, all of it or `sub`.
fn image_volume(at: &str, image: &str, sub: &str) -> cri::Mount {
    cri::Mount {
        container_path: at.into(),
        readonly: true,
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        image_sub_path: sub.into(),
        ..Default::default()
    }
}

const VOLUME_LINKS: &str = "docker.io/berth-test/volume-links:latest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volumes_give_an_image_read_only_whole_or_one_path_never_a_node_path() {
    let mut w = World::new().await;
    let bb = pull(&w.env.berthd, BUSYBOX).await;
    let links = pull(&w.env.berthd, VOLUME_LINKS).await;
    let pod = w.pod("imagevol").await;
    let before = w.leftovers();
    let mut c = container("iv", &["sleep", "3600"]);
    c.mounts = vec![
        image_volume("/iv", &bb, ""),
        // Named by tag, as kubelet may: reported by the ID it was found as.
        image_volume("/etcv", VOLUME_LINKS, "escape-abs/etc"),
        image_volume("/relv", &links, "escape-rel/etc"),
        image_volume("/data.txt", &links, "lib/app/data.txt"),
    ];
    let id = w.run(&pod, c).await;
    // The whole image: its files, read-only, its programs runnable from there.
    assert_eq!(w.out(&id, &["ls", "/iv/bin/sh"]).await.trim(), "/iv/bin/sh");
    let (code, out) = w.sh(&id, "touch /iv/written").await;
    assert_ne!(code, 0, "the image volume took a write: {out}");
    assert!(out.contains("Read-only"), "{out}");
    assert!(w.out(&id, &["/iv/bin/ls", "/iv"]).await.contains("bin"));
    // Sub paths through links resolve inside the image: the node's /etc never shows.
    assert_eq!(
        w.out(&id, &["ls", "-A", "/etcv"]).await.trim(),
        "volume-marker"
    );
    assert_eq!(
        w.out(&id, &["ls", "-A", "/relv"]).await.trim(),
        "volume-marker"
    );
    assert_eq!(w.out(&id, &["cat", "/data.txt"]).await, "data of the image");
    let (_, info) = w
        .sh(&id, "grep -E ' /(iv|etcv|data.txt) ' /proc/self/mountinfo")
        .await;
    assert_eq!(info.lines().count(), 3, "{info}");
    for l in info.lines() {
        let flags = l.split_whitespace().nth(5).unwrap_or_default();
        assert!(flags.split(',').any(|f| f == "ro"), "not read-only: {l}");
    }
    let st = w.status(&id).await;
    let reported: Vec<(String, String, String, String, bool)> = st
        .mounts
        .iter()
        .filter_map(|m| {
            let i = m.image.as_ref()?;
            Some((
                m.container_path.clone(),
                i.image_ref.clone(),
                m.image_sub_path.clone(),
                m.host_path.clone(),
                m.readonly,
            ))
        })
        .collect();
    let want = |p: &str, r: &str, s: &str| {
        (
            p.to_string(),
            r.to_string(),
            s.to_string(),
            String::new(),
            true,
        )
    };
    assert_eq!(
        reported,
        [
            want("/iv", &bb, ""),
            want("/etcv", &links, "escape-abs/etc"),
            want("/relv", &links, "escape-rel/etc"),
            want("/data.txt", &links, "lib/app/data.txt"),
        ]
    );
    // The container holds its volume's image: removing the image and collecting leaves the
    // files it reads.
    w.env
        .berthd
        .images()
        .await
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: links.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert_eq!(w.out(&id, &["cat", "/data.txt"]).await, "data of the image");
    assert_eq!(
        w.out(&id, &["ls", "-A", "/etcv"]).await.trim(),
        "volume-marker"
    );
    w.remove(&id).await;
    // Nothing staged for the runtime stays mounted on the node.
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volumes_that_cannot_be_given_as_asked_fail_by_name_leaving_nothing() {
    let mut w = World::new().await;
    let bb = pull(&w.env.berthd, BUSYBOX).await;
    let links = pull(&w.env.berthd, VOLUME_LINKS).await;
    let fifo = pull(&w.env.berthd, "docker.io/berth-test/fifo-passwd:latest").await;
    let pod = w.pod("imagevol-bad").await;
    let before = w.leftovers();
    let writable = cri::Mount {
        readonly: false,
        ..image_volume("/v", &bb, "")
    };
    let with_host = cri::Mount {
        host_path: "/tmp".into(),
        ..image_volume("/v", &bb, "")
    };
    let shared = cri::Mount {
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..image_volume("/v", &bb, "")
    };
    let sub_alone = cri::Mount {
        container_path: "/v".into(),
        host_path: "/tmp".into(),
        image_sub_path: "etc".into(),
        ..Default::default()
    };
    let cases = [
        (writable, Code::InvalidArgument, "readonly must be set"),
        (
            with_host,
            Code::InvalidArgument,
            "host_path \"/tmp\" is given too",
        ),
        (shared, Code::InvalidArgument, "propagation must be private"),
        (
            sub_alone,
            Code::InvalidArgument,
            "image_sub_path \"etc\" is given without an image",
        ),
        (
            image_volume("/v", &bb, "../etc"),
            Code::InvalidArgument,
            "without '..'",
        ),
        (
            image_volume("/v", &bb, "/etc"),
            Code::InvalidArgument,
            "without '..'",
        ),
        (
            image_volume("/v", &links, "not-existing"),
            Code::InvalidArgument,
            "does not exist in the image",
        ),
        (
            image_volume("/v", &fifo, "etc/passwd"),
            Code::InvalidArgument,
            "only a directory or a regular file",
        ),
        (
            image_volume("/v", "docker.io/berth-test/never-pulled:latest", ""),
            Code::NotFound,
            "not found (pull it first)",
        ),
    ];
    for (m, code, says) in cases {
        let mut c = container("bad", &["sleep", "3600"]);
        c.mounts = vec![m];
        let err = w.create(&pod, c).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message().contains(says)),
            (code, true),
            "{says}: {err:?}"
        );
        assert!(err.message().contains("/v"), "{}", err.message());
    }
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}
