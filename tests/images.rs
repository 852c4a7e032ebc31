//! The ImageService against a real registry (Debian docker-registry) serving images built
//! offline: every manifest kind through a mirror, every reference form, removal and garbage
//! collection, hostile and corrupt layers, a full disk, cancelled, stalled and slow pulls, auth.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::image_service_client::ImageServiceClient;
use common::proxy::{Mode, Proxy};
use common::{Berthd, Env, Netns, Options, Registry, mirror_config, tag};
use tonic::transport::Channel;
use tonic::{Code, Status};

type Images = ImageServiceClient<Channel>;

fn spec(name: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: name.to_string(),
        ..Default::default()
    })
}

async fn pull(c: &mut Images, name: &str) -> Result<String, Status> {
    pull_auth(c, name, None).await
}

async fn pull_auth(
    c: &mut Images,
    name: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, Status> {
    c.pull_image(cri::PullImageRequest {
        image: spec(name),
        auth,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

async fn status(c: &mut Images, name: &str) -> Option<cri::Image> {
    c.image_status(cri::ImageStatusRequest {
        image: spec(name),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .image
}

async fn list(c: &mut Images) -> Vec<cri::Image> {
    c.list_images(cri::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images
}

async fn remove(c: &mut Images, name: &str) {
    c.remove_image(cri::RemoveImageRequest { image: spec(name) })
        .await
        .unwrap();
}

/// Directory entries of `dir` (names).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshot directories (temporary ones included).
fn snapshots(root: &Path) -> Vec<String> {
    entries(&root.join("snapshots"))
}

/// Fails if a pull left temporary files or directories behind.
fn assert_no_temp_files(root: &Path) {
    let tmp: Vec<String> = snapshots(root)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(tmp.is_empty(), "temporary snapshots left: {tmp:?}");
    let ingest = entries(&root.join("content/ingest"));
    assert!(ingest.is_empty(), "ingest files left: {ingest:?}");
}

/// Waits (bounded) for a condition that cleanup in another thread makes true.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_kind_pulls_through_a_mirror_and_image_ref_is_the_id() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    for (name, fixture) in [
        // Docker manifest list
        (
            "registry.k8s.io/e2e-test-images/busybox:1.29-2",
            "e2e-test-images/busybox:1.29-2",
        ),
        // OCI index
        ("registry.k8s.io/pause:3.9", "pause:3.9"),
        // Docker v2 schema 2, three layers with a whiteout
        (
            "registry.k8s.io/e2e-test-images/nginx:1.14-2",
            "e2e-test-images/nginx:1.14-2",
        ),
        // OCI manifest
        (
            "gcr.io/k8s-staging-cri-tools/test-image-1",
            "k8s-staging-cri-tools/test-image-1:latest",
        ),
    ] {
        let t = tag(fixture);
        let id = pull(&mut c, name)
            .await
            .unwrap_or_else(|e| panic!("pull {name}: {e:?}"));
        assert_eq!(id, t.image_id, "{name}");
        let img = status(&mut c, name).await.expect(name);
        assert_eq!(img.id, id);
        let normalized = if name.contains(':') {
            name.to_string()
        } else {
            format!("{name}:latest")
        };
        assert!(img.repo_tags.contains(&normalized), "{:?}", img.repo_tags);
        let repo = normalized.rsplit_once(':').unwrap().0;
        assert!(
            img.repo_digests.contains(&format!("{repo}@{}", t.digest)),
            "{:?}",
            img.repo_digests
        );
        assert!(img.size > 0);
    }
    assert_eq!(list(&mut c).await.len(), 4);
    assert_no_temp_files(&env.berthd.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_status_finds_the_image_by_every_reference_form() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let t = tag("library/busybox:latest");
    let id = pull(&mut c, "busybox").await.unwrap();
    assert_eq!(id, t.image_id);
    let hex = id.strip_prefix("sha256:").unwrap();
    for form in [
        "busybox".to_string(),
        "busybox:latest".to_string(),
        "docker.io/library/busybox".to_string(),
        "docker.io/library/busybox:latest".to_string(),
        format!("busybox@{}", t.digest),
        format!("docker.io/library/busybox@{}", t.digest),
        id.clone(),
        hex.to_string(),
        hex[..12].to_string(),
    ] {
        let img = status(&mut c, &form)
            .await
            .unwrap_or_else(|| panic!("not found by {form}"));
        assert_eq!(img.id, id, "{form}");
    }
    // Pulling by digest finds the same image and records the digest form.
    let by_digest = pull(&mut c, &format!("busybox@{}", t.digest))
        .await
        .unwrap();
    assert_eq!(by_digest, id);
    // The uid/username and spec are filled.
    let img = status(&mut c, "busybox").await.unwrap();
    assert_eq!(
        img.repo_tags,
        vec!["docker.io/library/busybox:latest".to_string()]
    );
    assert_eq!(img.spec.unwrap().image, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_image_has_an_empty_status_not_an_error() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    assert!(status(&mut c, "busybox").await.is_none());
    assert!(
        status(
            &mut c,
            "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        )
        .await
        .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tags_of_one_image_are_one_image_with_three_repo_tags() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let mut ids = Vec::new();
    for t in ["1", "2", "3"] {
        ids.push(
            pull(
                &mut c,
                &format!("gcr.io/k8s-staging-cri-tools/test-image-tags:{t}"),
            )
            .await
            .unwrap(),
        );
    }
    assert!(ids.iter().all(|i| *i == ids[0]));
    let all = list(&mut c).await;
    assert_eq!(all.len(), 1);
    let mut tags = all[0].repo_tags.clone();
    tags.sort();
    assert_eq!(
        tags,
        ["1", "2", "3"].map(|t| format!("gcr.io/k8s-staging-cri-tools/test-image-tags:{t}"))
    );
    // The filter finds it by any of them.
    let filtered = c
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: spec("gcr.io/k8s-staging-cri-tools/test-image-tags:2"),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_and_username_come_from_the_image_user() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    for (image, uid, username) in [
        ("test-image-user-uid", Some(1002), ""),
        ("test-image-user-username", None, "www-data"),
        ("test-image-user-uid-group", Some(1003), ""),
        ("test-image-user-username-group", None, "www-data"),
    ] {
        let name = format!("gcr.io/k8s-staging-cri-tools/{image}");
        pull(&mut c, &name).await.unwrap();
        let img = status(&mut c, &name).await.unwrap();
        assert_eq!(img.uid.map(|u| u.value), uid, "{image}");
        assert_eq!(img.username, username, "{image}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_image_removes_every_tag_is_idempotent_and_collects_unshared_layers() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let root = env.berthd.root.clone();
    pull(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-tags:1")
        .await
        .unwrap();
    pull(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-tags:2")
        .await
        .unwrap();
    pull(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-1")
        .await
        .unwrap();
    // busybox base shared by both, plus one layer each.
    assert_eq!(snapshots(&root).len(), 3);

    remove(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-tags:1").await;
    assert!(
        status(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-tags:2")
            .await
            .is_none()
    );
    assert_eq!(
        snapshots(&root).len(),
        2,
        "the shared base layer stays, the unshared one goes"
    );
    // Again, and by a name that never existed: both succeed.
    remove(&mut c, "gcr.io/k8s-staging-cri-tools/test-image-tags:1").await;
    remove(&mut c, "never/pulled:anything").await;

    let id = tag("k8s-staging-cri-tools/test-image-1:latest").image_id;
    remove(&mut c, &id).await;
    assert!(list(&mut c).await.is_empty());
    assert!(snapshots(&root).is_empty());
    assert!(
        entries(&root.join("content/sha256")).is_empty(),
        "manifests and configs collected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_survive_a_restart() {
    let mut env = Env::new();
    let mut c = env.berthd.images().await;
    let id = pull(&mut c, "registry.k8s.io/e2e-test-images/busybox:1.29-2")
        .await
        .unwrap();
    drop(c);
    assert!(env.berthd.terminate().success());
    env.berthd.restart();
    let mut c = env.berthd.images().await;
    let img = status(&mut c, "registry.k8s.io/e2e-test-images/busybox:1.29-2")
        .await
        .unwrap();
    assert_eq!(img.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_status_carries_the_image_config() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    pull(&mut c, "registry.k8s.io/e2e-test-images/nginx:1.14-2")
        .await
        .unwrap();
    let r = c
        .image_status(cri::ImageStatusRequest {
            image: spec("registry.k8s.io/e2e-test-images/nginx:1.14-2"),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&r.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["Cmd"][0], "nginx");
    assert_eq!(info["chainIDs"].as_array().unwrap().len(), 3);
}

/// Lower dirs of an image, top first (from verbose status).
async fn lower_dirs(c: &mut Images, name: &str) -> Vec<PathBuf> {
    let r = c
        .image_status(cri::ImageStatusRequest {
            image: spec(name),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&r.info["info"]).unwrap();
    info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| PathBuf::from(v.as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_and_opaque_dirs_become_overlay_markers() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let name = format!("{}/berth-test/whiteout:latest", env.registry.addr);
    pull(&mut c, &name).await.unwrap();
    let dirs = lower_dirs(&mut c, &name).await;
    assert_eq!(dirs.len(), 3);
    let (upper, lower) = (&dirs[0], &dirs[1]);
    let gone = std::fs::symlink_metadata(upper.join("gone.txt")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "whiteout is a 0/0 char device"
    );
    let out = std::process::Command::new("getfattr")
        .args([
            "--absolute-names",
            "-n",
            "trusted.overlay.opaque",
            "--only-values",
        ])
        .arg(upper.join("data"))
        .output();
    let opaque = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            // getfattr is not installed everywhere: read the xattr directly.
            let mut buf = [0u8; 8];
            let n = rustix_getxattr(&upper.join("data"), &mut buf);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    };
    assert_eq!(opaque, "y");
    assert!(!upper.join("data/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::read_to_string(upper.join("data/c")).unwrap(),
        "only c survives in /data\n"
    );
    assert!(lower.join("data/a").exists() && lower.join("gone.txt").exists());
}

fn rustix_getxattr(p: &Path, buf: &mut [u8]) -> usize {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = c"trusted.overlay.opaque";
    // SAFETY: both strings are NUL-terminated and buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n >= 0,
        "getxattr failed: {}",
        std::io::Error::last_os_error()
    );
    n as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_uncompressed_layers_pull() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    for (image, file) in [
        ("zstd", "zstd-layer.txt"),
        ("uncompressed", "plain-layer.txt"),
    ] {
        let name = format!("{}/berth-test/{image}:latest", env.registry.addr);
        let id = pull(&mut c, &name).await.unwrap();
        assert_eq!(id, tag(&format!("berth-test/{image}:latest")).image_id);
        let dirs = lower_dirs(&mut c, &name).await;
        assert!(dirs[0].join(file).exists(), "{image}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_fail_naming_the_entry_and_write_nothing_outside() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let root = env.berthd.root.clone();
    for (image, entry) in [
        ("dotdot", "a/../../berth-escape-dotdot"),
        ("absolute", "/tmp/berth-escape-absolute"),
        ("symlink", "evil/berth-escape-symlink"),
        ("hardlink", "hl"),
        ("hardlink-abs", "hl"),
        ("symlink-dir", "d"),
    ] {
        let name = format!("{}/berth-test/hostile-{image}:latest", env.registry.addr);
        let err = pull(&mut c, &name).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{image}: {}",
            err.message()
        );
        assert!(
            err.message().contains(&format!("{entry:?}")),
            "{image}: {}",
            err.message()
        );
        assert!(status(&mut c, &name).await.is_none());
    }
    for escaped in [
        "/tmp/berth-escape-absolute",
        "/tmp/berth-escape-symlink",
        "/tmp/berth-escape-symlink-dir",
    ] {
        assert!(!Path::new(escaped).exists(), "{escaped} was written");
    }
    assert!(
        !root.join("berth-escape-dotdot").exists()
            && !root.join("snapshots/berth-escape-dotdot").exists()
    );
    eventually("no temp files remain", || {
        snapshots(&root).iter().all(|n| !n.starts_with('.'))
    })
    .await;
    assert_no_temp_files(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_references_are_invalid_arguments_naming_them() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    for bad in ["UPPER/case", "busybox@sha256:123", "a b", "busybox:-x"] {
        let err = pull(&mut c, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(err.message().contains(bad), "{}", err.message());
    }
    let err = c
        .pull_image(cri::PullImageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_tag_is_not_found_naming_it() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let name = format!("{}/berth-test/whiteout:no-such-tag", env.registry.addr);
    let err = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(err.message().contains("no-such-tag"), "{}", err.message());
    assert_no_temp_files(&env.berthd.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_down_is_named_in_the_error() {
    let ns = Netns::new();
    let b = Berthd::start_with(Options {
        extra_config: "[registries.\"registry.k8s.io\"]\nmirrors = [\"http://127.0.0.1:5999\"]\n\
                       [registries.\"127.0.0.1:5998\"]\ninsecure = true\n"
            .into(),
        netns: Some(ns.path.clone()),
        ..Default::default()
    });
    let mut c = b.images().await;
    let err = pull(&mut c, "127.0.0.1:5998/any/image:1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("127.0.0.1:5998"),
        "{}",
        err.message()
    );
    // Through a dead mirror, then the (unresolvable, offline) host: both are named.
    let err = pull(&mut c, "registry.k8s.io/pause:3.9").await.unwrap_err();
    assert!(
        err.message().contains("127.0.0.1:5999"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("registry.k8s.io"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_whose_bytes_do_not_match_its_digest_fails_and_leaves_nothing() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let name = format!("{}/berth-test/corrupt:latest", env.registry.addr);
    let err = pull(&mut c, &name).await.unwrap_err();
    assert!(err.message().contains("digest"), "{}", err.message());
    assert!(status(&mut c, &name).await.is_none());
    let root = env.berthd.root.clone();
    eventually("the temp snapshot is gone", || snapshots(&root).is_empty()).await;
    assert_no_temp_files(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_pull_cleanly_and_later_pulls_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    common::run(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&root),
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(root.clone());
    let env = Env::with(Options {
        root: Some(root.clone()),
        ..Default::default()
    });
    let mut c = env.berthd.images().await;
    let err = pull(
        &mut c,
        &format!("{}/berth-test/big:latest", env.registry.addr),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().to_lowercase().contains("space"),
        "{}",
        err.message()
    );
    eventually("temp snapshots are gone", || {
        snapshots(&root).iter().all(|n| !n.starts_with('.'))
    })
    .await;
    assert_no_temp_files(&root);
    // The disk is usable again: nothing of the failed pull is kept but shared, complete layers.
    let id = pull(
        &mut c,
        &format!("{}/berth-test/whiteout:latest", env.registry.addr),
    )
    .await
    .unwrap();
    assert_eq!(id, tag("berth-test/whiteout:latest").image_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_cancelled_by_its_deadline_stops_and_leaves_no_temp_files() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let name = format!("{}/berth-test/big:latest", env.registry.addr);
    let mut req = tonic::Request::new(cri::PullImageRequest {
        image: spec(&name),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(300));
    let err = c.pull_image(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let root = env.berthd.root.clone();
    // A blob being written when the call ended (a blocking write runs to its end) is renamed
    // into place, or removed, a moment later.
    eventually("temp snapshots and ingest files are gone", || {
        snapshots(&root).iter().all(|n| !n.starts_with('.'))
            && entries(&root.join("content/ingest")).is_empty()
    })
    .await;
    assert_no_temp_files(&root);
    assert!(status(&mut c, &name).await.is_none());
    // A later pull of the same image completes.
    pull(&mut c, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_images_sharing_layers_download_each_layer_once() {
    let env = Env::new();
    let c = env.berthd.images().await;
    let names = [
        "registry.k8s.io/e2e-test-images/nginx:1.14-2",
        "registry.k8s.io/e2e-test-images/nginx:1.14-2",
        "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64",
        "registry.k8s.io/e2e-test-images/busybox:1.29-2",
    ];
    let mut tasks = Vec::new();
    for n in names {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { pull(&mut c, n).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // busybox + nginx are shared; each layer is unpacked exactly once.
    let log = env.berthd.log_text();
    let mut unpacked: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("layer unpacked"))
        .filter_map(|l| {
            l.split("layer=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
        })
        .collect();
    let total = unpacked.len();
    unpacked.sort();
    unpacked.dedup();
    assert_eq!(total, unpacked.len(), "a layer was unpacked twice:\n{log}");
    assert_eq!(total, 4, "busybox, nginx, nginx cleanup, hostnet config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_fails_saying_so() {
    let netns = Netns::new();
    let registry = Registry::start(&netns, 5000);
    let proxy = Proxy::start(
        &netns,
        5001,
        &registry.addr,
        Mode::Stall { after: 64 * 1024 },
    );
    let b = Berthd::start_with(Options {
        extra_config: format!(
            "[registries.\"{}\"]\ninsecure = true\n[images]\npull_progress_timeout_seconds = 2\n",
            proxy.addr
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let mut c = b.images().await;
    let err = pull(&mut c, &format!("{}/library/busybox:latest", proxy.addr))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("no progress for 2s"),
        "{}",
        err.message()
    );
    eventually("temp snapshots are gone", || {
        snapshots(&b.root).iter().all(|n| !n.starts_with('.'))
    })
    .await;
    assert_no_temp_files(&b.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pull_that_moves_completes_and_lists_answer_meanwhile() {
    let netns = Netns::new();
    let registry = Registry::start(&netns, 5000);
    // busybox's layer is ~1.4 MB: at 256 KiB/s it takes several times the 2 s stall timeout.
    let proxy = Proxy::start(
        &netns,
        5001,
        &registry.addr,
        Mode::Throttle {
            after: 64 * 1024,
            bytes_per_sec: 256 * 1024,
        },
    );
    let b = Berthd::start_with(Options {
        extra_config: format!(
            "[registries.\"{}\"]\ninsecure = true\n[images]\npull_progress_timeout_seconds = 2\n",
            proxy.addr
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let c = b.images().await;
    let name = format!("{}/library/busybox:latest", proxy.addr);
    let mut pc = c.clone();
    let n2 = name.clone();
    let pulling = tokio::spawn(async move { pull(&mut pc, &n2).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While the pull runs, list and status answer.
    let mut lc = c.clone();
    assert!(list(&mut lc).await.is_empty());
    assert!(status(&mut lc, &name).await.is_none());
    assert!(!pulling.is_finished(), "the pull should still be running");
    let id = pulling.await.unwrap().unwrap();
    assert_eq!(id, tag("library/busybox:latest").image_id);
    assert!(b.log_text().contains("pull progress"), "progress is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_the_cri_or_the_credentials_file() {
    use base64::Engine;
    let netns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let line =
        common::run(std::process::Command::new("htpasswd").args(["-Bbn", "alice", "s3cret"]));
    std::fs::write(&htpasswd, line).unwrap();
    let registry = Registry::start_with(
        &netns,
        5002,
        &common::fixtures().join("registry"),
        true,
        &format!(
            "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let creds = dir.path().join("auth.json");
    let b = Berthd::start_with(Options {
        extra_config: format!(
            "{}[images]\ncredentials_file = \"{}\"\n",
            mirror_config(&registry.addr),
            creds.display()
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let mut c = b.images().await;
    let name = format!("{}/berth-test/zstd:latest", registry.addr);

    let err = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let wrong = cri::AuthConfig {
        username: "alice".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&mut c, &name, Some(wrong))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let good = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    pull_auth(&mut c, &name, Some(good)).await.unwrap();
    remove(&mut c, &name).await;

    let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let encoded = cri::AuthConfig {
        auth: b64.clone(),
        ..Default::default()
    };
    pull_auth(&mut c, &name, Some(encoded)).await.unwrap();
    remove(&mut c, &name).await;

    std::fs::write(
        &creds,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{b64}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    pull(&mut c, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_reports_real_usage() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    let before = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let used = |r: &cri::ImageFsInfoResponse| r.image_filesystems[0].used_bytes.unwrap().value;
    let inodes = |r: &cri::ImageFsInfoResponse| r.image_filesystems[0].inodes_used.unwrap().value;
    pull(&mut c, "registry.k8s.io/e2e-test-images/nginx:1.14-2")
        .await
        .unwrap();
    let after = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        used(&after) > used(&before) + 1_000_000,
        "{} -> {}",
        used(&before),
        used(&after)
    );
    assert!(inodes(&after) > inodes(&before) + 100);
    assert!(
        after.image_filesystems[0]
            .fs_id
            .as_ref()
            .unwrap()
            .mountpoint
            .ends_with("snapshots")
    );
    assert_eq!(after.container_filesystems.len(), 1);
    remove(&mut c, "registry.k8s.io/e2e-test-images/nginx:1.14-2").await;
    let gone = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(used(&gone), used(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flows_anonymous_basic_identity_and_registry_token() {
    use common::token::{Policy, TokenServer};
    let netns = Netns::new();
    let storage = common::fixtures().join("registry");
    // An open registry (anonymous tokens) and a closed one (tokens for credentials only).
    let open_tokens = TokenServer::start(
        &netns,
        5005,
        Policy {
            anonymous: true,
            user: None,
            refresh_token: None,
        },
    );
    let open = Registry::start_with(&netns, 5004, &storage, true, &open_tokens.registry_auth());
    let closed_tokens = TokenServer::start(
        &netns,
        5007,
        Policy {
            anonymous: false,
            user: Some(("alice".into(), "s3cret".into())),
            refresh_token: Some("idt-alice".into()),
        },
    );
    let closed = Registry::start_with(&netns, 5006, &storage, true, &closed_tokens.registry_auth());
    let b = Berthd::start_with(Options {
        extra_config: format!(
            "[registries.\"{}\"]\ninsecure = true\n[registries.\"{}\"]\ninsecure = true\n",
            open.addr, closed.addr
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let mut c = b.images().await;

    // Anonymous token flow.
    pull(&mut c, &format!("{}/berth-test/zstd:latest", open.addr))
        .await
        .unwrap();

    let name = format!("{}/berth-test/uncompressed:latest", closed.addr);
    let err = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    // Basic credentials exchanged for a token.
    let basic = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    pull_auth(&mut c, &name, Some(basic)).await.unwrap();
    remove(&mut c, &name).await;
    // An identity token (OAuth2 refresh token) exchanged for an access token.
    let bad = cri::AuthConfig {
        identity_token: "idt-mallory".into(),
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&mut c, &name, Some(bad))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let idt = cri::AuthConfig {
        identity_token: "idt-alice".into(),
        ..Default::default()
    };
    pull_auth(&mut c, &name, Some(idt)).await.unwrap();
    remove(&mut c, &name).await;
    // A registry token presented as is (the registry checks its signature: a forged one fails).
    let forged = cri::AuthConfig {
        registry_token: "eyJhbGciOiJFUzI1NiJ9.e30.AAAA".into(),
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&mut c, &name, Some(forged))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let token = closed_tokens.token("repository:berth-test/uncompressed:pull");
    let rt = cri::AuthConfig {
        registry_token: token,
        ..Default::default()
    };
    pull_auth(&mut c, &name, Some(rt)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_ca_certificates_fails_the_pull_and_berthd_lives_on() {
    // An empty trust store (as on a node without the ca-certificates package): the registry
    // client cannot be built. Found in the cgroup v2 guest, where berthd's worker panicked.
    let env = Env::with(Options {
        env: vec![
            ("SSL_CERT_FILE".into(), "/dev/null".into()),
            ("SSL_CERT_DIR".into(), "".into()),
        ],
        ..Default::default()
    });
    let mut c = env.berthd.images().await;
    let err = pull(&mut c, "registry.k8s.io/e2e-test-images/busybox:1.29-2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("CA certificates"),
        "{}",
        err.message()
    );
    // The daemon still answers.
    assert!(list(&mut c).await.is_empty());
}

/// berthd's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_claiming_a_huge_extension_header_is_refused_before_it_is_read() {
    let env = Env::new();
    let mut c = env.berthd.images().await;
    // Warm up: the first pull's own allocations are not the bomb's.
    pull(
        &mut c,
        &format!("{}/berth-test/zstd:latest", env.registry.addr),
    )
    .await
    .unwrap();
    let before = peak_rss_kib(env.berthd.pid());
    let name = format!("{}/berth-test/pax-bomb:latest", env.registry.addr);
    let digest = tag("berth-test/pax-bomb:latest").layers[0].clone();
    let err = pull(&mut c, &name).await.unwrap_err();
    let grew = peak_rss_kib(env.berthd.pid()).saturating_sub(before);
    // The 1 GiB the header claims was never read into memory.
    assert!(grew < 64 * 1024, "berthd's peak memory grew by {grew} KiB");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    for part in [digest.as_str(), "PaxHeaders.0/bomb", "1073741824"] {
        assert!(err.message().contains(part), "{part}: {}", err.message());
    }
    assert!(status(&mut c, &name).await.is_none());
    let root = env.berthd.root.clone();
    eventually("temp snapshots are gone", || {
        snapshots(&root).iter().all(|n| !n.starts_with('.'))
    })
    .await;
    assert_no_temp_files(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_or_shorter_than_its_descriptor_fails_at_once() {
    let netns = Netns::new();
    let registry = Registry::start(&netns, 5000);
    let t = tag("berth-test/uncompressed:latest");
    let layer = t.layers[0].clone();
    let (addr, path) = (
        registry.addr.clone(),
        format!("/v2/berth-test/uncompressed/blobs/{layer}"),
    );
    let real = netns.run_in(move || common::fake_http::get(&addr, "GET", &path, &[]).body);
    // A plain tar whose one file claims 8 GiB, then zeros for as long as anyone reads: an
    // endless answer for a small layer, or the first half of the real blob and a close.
    let mut endless = tar::Header::new_gnu();
    endless.set_path("fill").unwrap();
    endless.set_size(8 << 30);
    endless.set_mode(0o644);
    endless.set_cksum();
    let prefix = endless.as_bytes().to_vec();
    let (up, blob_path) = (
        registry.addr.clone(),
        format!("/v2/berth-test/uncompressed/blobs/{layer}"),
    );
    let half = real[..real.len() / 2].to_vec();
    let mk = |port: u16, endless: bool| {
        let (up, blob_path, prefix, half) =
            (up.clone(), blob_path.clone(), prefix.clone(), half.clone());
        common::fake_http::FakeHttp::start(&netns, "127.0.0.1", port, move |r| {
            if r.method == "GET" && r.path == blob_path {
                return if endless {
                    common::fake_http::Reply {
                        status: 200,
                        body: prefix.clone(),
                        then_zeros: Some(1 << 30),
                        ..Default::default()
                    }
                } else {
                    common::fake_http::Reply {
                        status: 200,
                        body: half.clone(),
                        then_zeros: Some(0),
                        ..Default::default()
                    }
                };
            }
            let accept = r.header("accept").unwrap_or("*/*").to_string();
            common::fake_http::get(&up, &r.method, &r.path, &[("Accept", &accept)])
        })
    };
    let (long, short) = (mk(5001, true), mk(5002, false));
    let b = Berthd::start_with(Options {
        extra_config: format!(
            "[registries.\"{}\"]\ninsecure = true\n[registries.\"{}\"]\ninsecure = true\n",
            long.addr, short.addr
        ),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    let mut c = b.images().await;
    let err = pull(
        &mut c,
        &format!("{}/berth-test/uncompressed:latest", long.addr),
    )
    .await
    .unwrap_err();
    // Stopped at the declared size (plus what was in flight), not after a gigabyte.
    assert!(long.sent() < 32 << 20, "{} bytes were taken", long.sent());
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let declared = format!("declares {} bytes", real.len());
    for part in [layer.as_str(), declared.as_str(), "sent more than"] {
        assert!(err.message().contains(part), "{part}: {}", err.message());
    }
    let err = pull(
        &mut c,
        &format!("{}/berth-test/uncompressed:latest", short.addr),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let sent = format!(
        "declares {} bytes, the registry sent {}",
        real.len(),
        half.len()
    );
    assert!(err.message().contains(&sent), "{}", err.message());
    eventually("temp snapshots are gone", || {
        snapshots(&b.root).iter().all(|n| !n.starts_with('.'))
    })
    .await;
    assert_no_temp_files(&b.root);
    assert!(snapshots(&b.root).is_empty(), "{:?}", snapshots(&b.root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_past_the_configured_bytes_or_entries_fail_naming_the_limit() {
    for (limit, key) in [
        ("max_layer_bytes = 100000", "max_layer_bytes"),
        ("max_layer_inodes = 5", "max_layer_inodes"),
    ] {
        let env = Env::with(Options {
            extra_config: format!("[images]\n{limit}\n"),
            ..Default::default()
        });
        let mut c = env.berthd.images().await;
        let name = format!("{}/library/busybox:latest", env.registry.addr);
        let err = pull(&mut c, &name).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(key), "{key}: {}", err.message());
        assert!(status(&mut c, &name).await.is_none());
        let root = env.berthd.root.clone();
        eventually("temp snapshots are gone", || snapshots(&root).is_empty()).await;
        assert_no_temp_files(&root);
    }
}
