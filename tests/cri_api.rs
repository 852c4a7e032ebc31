//! What the CRI gained from Kubernetes 1.33 to 1.37, through a real berthd: stop signals,
//! environment values as bytes, the streamed lists, pod-level resource updates and the
//! runtime features berth claims.

mod common;

use berth::cri::v1 as cri;
use common::world::*;
use futures::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_is_what_stop_sends_and_what_status_reports() {
    let mut w = World::new().await;
    let pod = w.pod("stopsig").await;
    // The shell waits in `wait` (not in sleep's foreground) so the trap runs at once.
    let script = "trap 'echo got-usr1; exit 42' USR1; trap 'exit 43' TERM; sleep 3600 & wait";
    let mut c = container("usr1", &["sh", "-c", script]);
    c.stop_signal = cri::Signal::Sigusr1 as i32;
    let id = w.run(&pod, c).await;
    assert_eq!(w.status(&id).await.stop_signal, cri::Signal::Sigusr1 as i32);
    // Give the shell time to set its traps.
    w.sh(&id, "sleep 0.5").await;
    w.stop(&id, 20).await;
    let s = w
        .wait_state(&id, cri::ContainerState::ContainerExited)
        .await;
    assert_eq!(
        s.exit_code, 42,
        "SIGUSR1, not SIGTERM, reached the container"
    );
    assert_eq!(s.stop_signal, cri::Signal::Sigusr1 as i32);
    // Nothing asked and no image STOPSIGNAL: SIGTERM, and status says so.
    let plain = w.run(&pod, container("plain", &["sleep", "3600"])).await;
    assert_eq!(
        w.status(&plain).await.stop_signal,
        cri::Signal::Sigterm as i32
    );
    // A real-time signal counted from the top of the range goes by its number.
    let mut rt = container("rtmax", &["sleep", "3600"]);
    rt.stop_signal = cri::Signal::Sigrtmaxminus2 as i32;
    let rt_id = w.create(&pod, rt).await.unwrap();
    assert_eq!(
        w.status(&rt_id).await.stop_signal,
        cri::Signal::Sigrtmaxminus2 as i32
    );
    // A value the API does not have fails the call by name, leaving nothing.
    let before = w.leftovers();
    let mut bad = container("bad", &["sleep", "3600"]);
    bad.stop_signal = 999;
    let err = w.create(&pod, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("stop_signal"), "{}", err.message());
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_values_are_bytes_passed_unaltered_or_refused_by_name() {
    let mut w = World::new().await;
    let pod = w.pod("envbytes").await;
    let mut c = container("utf8", &["sleep", "3600"]);
    c.envs = vec![cri::KeyValue {
        key: "GREETING".into(),
        value: "grüße, ☃".as_bytes().to_vec(),
    }];
    let id = w.run(&pod, c).await;
    assert_eq!(
        w.out(&id, &["sh", "-c", "echo \"$GREETING\""]).await,
        "grüße, ☃"
    );
    let before = w.leftovers();
    for (value, says) in [
        (vec![b'a', 0xff, b'b'], "not UTF-8"),
        (b"a\0b".to_vec(), "NUL byte"),
    ] {
        let mut c = container("bytes", &["sleep", "3600"]);
        c.envs = vec![
            cri::KeyValue {
                key: "FINE".into(),
                value: b"x".to_vec(),
            },
            cri::KeyValue {
                key: "SECRET_BLOB".into(),
                value,
            },
        ];
        let err = w.create(&pod, c).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("env SECRET_BLOB") && err.message().contains(says),
            "{}",
            err.message()
        );
    }
    assert_eq!(w.leftovers(), before);
    w.remove_pod(&pod.0).await;
}

/// Every item of a streamed list, its chunks taken apart by `items`.
async fn drain<R, T>(
    call: Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>,
    items: impl Fn(R) -> Vec<T>,
) -> Vec<T> {
    let chunks: Vec<_> = call.unwrap().into_inner().collect().await;
    chunks.into_iter().flat_map(|c| items(c.unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_lists_hold_what_the_unary_lists_hold() {
    let mut w = World::new().await;
    let pod = w.pod("streams").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let c = container(&format!("c{n}"), &["sleep", "3600"]);
        ids.push(w.run(&pod, c).await);
    }
    let unary =
        w.rt.list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers;
    let req = cri::StreamContainersRequest::default();
    let streamed = drain(w.rt.stream_containers(req).await, |c| c.containers).await;
    assert_eq!(streamed, unary);
    assert_eq!(streamed.len(), 3);
    // The filter is the unary list's filter.
    let req = cri::StreamContainersRequest {
        filter: Some(cri::ContainerFilter {
            id: ids[1].clone(),
            ..Default::default()
        }),
    };
    let one = drain(w.rt.stream_containers(req).await, |c| c.containers).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].id, ids[1]);
    let req = cri::StreamPodSandboxesRequest::default();
    let pods = drain(w.rt.stream_pod_sandboxes(req).await, |c| c.pod_sandboxes).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].id, pod.0);
    let req = cri::StreamContainerStatsRequest::default();
    let stats = drain(w.rt.stream_container_stats(req).await, |c| {
        c.container_stats
    })
    .await;
    assert_eq!(stats.len(), 3);
    let req = cri::StreamPodSandboxStatsRequest::default();
    let pod_stats = drain(w.rt.stream_pod_sandbox_stats(req).await, |c| {
        c.pod_sandbox_stats
    })
    .await;
    assert_eq!(pod_stats.len(), 1);
    let req = cri::StreamPodSandboxMetricsRequest::default();
    let metrics = drain(w.rt.stream_pod_sandbox_metrics(req).await, |c| {
        c.pod_sandbox_metrics
    })
    .await;
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0].container_metrics.len(), 3);
    let mut images = w.env.berthd.images().await;
    let listed = images
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    let req = cri::StreamImagesRequest::default();
    let streamed = drain(images.stream_images(req).await, |c| c.images).await;
    assert_eq!(streamed, listed);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_resource_updates_are_checked_and_answered() {
    let mut w = World::new().await;
    let pod = w.pod("podres").await;
    let res = cri::LinuxContainerResources {
        cpu_shares: 512,
        memory_limit_in_bytes: 256 << 20,
        ..Default::default()
    };
    w.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: pod.0.clone(),
        overhead: None,
        resources: Some(res.clone()),
    })
    .await
    .unwrap();
    let err =
        w.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "no-such-pod".into(),
            overhead: None,
            resources: Some(res),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        w.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.0.clone(),
            overhead: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: -5,
                ..Default::default()
            }),
            resources: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("overhead"), "{}", err.message());
    // Checkpointing a pod is alpha and not served: kubelet falls back on Unimplemented.
    let err =
        w.rt.checkpoint_pod(cri::CheckpointPodRequest {
            pod_sandbox_id: pod.0.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let features = w.runtime_status().await.features.unwrap();
    assert!(features.mount_options);
    assert!(!features.user_namespaces_host_network);
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_pod_removal_is_not_logged_as_a_monitor_death() {
    let mut w = World::new().await;
    for n in 0..3 {
        let pod = w.pod(&format!("quiet{n}")).await;
        w.run(&pod, container("app", &["sleep", "3600"])).await;
        w.remove_pod(&pod.0).await;
    }
    // The monitor's end is seen a moment after the removal.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let log = w.env.berthd.log_text();
    assert!(log.contains("pod sandbox removed"), "{log}");
    assert!(!log.contains("monitor died"), "{log}");
}
