//! What kubelet's polling costs: with N pods of one running busybox `sleep 3600` each (default
//! 100) on a release berthd, the latency of ListContainerStats, ListPodSandboxStats,
//! ListPodSandboxMetrics, ListContainers and ListPodSandbox (median, p99 of repeated calls, one
//! at a time, as kubelet makes them). Goals of the stats issue: stats lists ≤ 20 ms, plain
//! lists ≤ 1 ms at 100 pods. Figures only.
//!
//! Run with `cargo bench --bench stats` (as root, fixtures built: hack/fixtures/build).
//! `BENCH_PODS` sets the number of pods, `BENCH_CALLS` the calls timed per RPC (default 200).

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::Options;
use common::world::{Rt, World, container, pod_config_for};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Times `calls` sequential calls of `f` after five that warm up; prints median and p99.
async fn time<F, Fut>(what: &str, calls: usize, rt: &mut Rt, mut f: F)
where
    F: FnMut(Rt) -> Fut,
    Fut: Future<Output = usize>,
{
    let mut v = Vec::with_capacity(calls);
    let mut items = 0;
    for i in 0..calls + 5 {
        let t = Instant::now();
        items = f(rt.clone()).await;
        if i >= 5 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
    println!(
        "  {what:24} median {:7.3} ms  p99 {:7.3} ms  ({items} items)",
        ms(v[v.len() / 2]),
        ms(p99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods = env_number("BENCH_PODS", 100);
    let calls = env_number("BENCH_CALLS", 200);
    let mut w = World::with(Options {
        log_level: Some("warn".into()),
        ..Default::default()
    })
    .await;
    let logs = w.logs();
    let mut ids = Vec::new();
    for i in 0..pods {
        let pc = pod_config_for(
            &logs,
            &w.env.berthd.cgroup_root,
            &format!("stats-{i}"),
            cri::NamespaceMode::Container,
        );
        let pod = w.run_pod(pc).await;
        w.run(&pod, container("sleeper", &["sleep", "3600"])).await;
        ids.push(pod.0);
    }
    // Each container's cpu rate needs a previous sample: kubelet's first poll makes them.
    let mut rt = w.rt.clone();
    let _ = rt
        .list_container_stats(cri::ListContainerStatsRequest::default())
        .await
        .unwrap();
    println!("{pods} pods x 1 running container, {calls} calls each, one at a time:");
    time("ListContainerStats", calls, &mut rt, |mut rt| async move {
        let r = rt.list_container_stats(cri::ListContainerStatsRequest::default());
        r.await.unwrap().into_inner().stats.len()
    })
    .await;
    time("ListPodSandboxStats", calls, &mut rt, |mut rt| async move {
        let r = rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default());
        r.await.unwrap().into_inner().stats.len()
    })
    .await;
    time(
        "ListPodSandboxMetrics",
        calls,
        &mut rt,
        |mut rt| async move {
            let r = rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest::default());
            r.await.unwrap().into_inner().pod_metrics.len()
        },
    )
    .await;
    time("ListContainers", calls, &mut rt, |mut rt| async move {
        let r = rt.list_containers(cri::ListContainersRequest::default());
        r.await.unwrap().into_inner().containers.len()
    })
    .await;
    time("ListPodSandbox", calls, &mut rt, |mut rt| async move {
        let r = rt.list_pod_sandbox(cri::ListPodSandboxRequest::default());
        r.await.unwrap().into_inner().items.len()
    })
    .await;
    for id in ids {
        w.remove_pod(&id).await;
    }
    let left = w.leftovers();
    if !left.is_empty() {
        println!("left behind: {left:?}");
    }
}
