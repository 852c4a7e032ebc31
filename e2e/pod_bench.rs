//! Pod sandbox latency: RunPodSandbox, StopPodSandbox and RemovePodSandbox on a release
//! berthd in a namespace of its own; sequential and 10 clients in parallel; pods as kubelet
//! asks for them (own network, PID namespace per container) and, separately, pods sharing one
//! PID namespace (which start an init). Figures only.
//!
//! Run with `cargo bench --bench pods` (as root). `BENCH_PODS` sets pods per series (default 200).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, Options};
use tonic::transport::Channel;

fn config(b: &Berthd, i: usize, shared_pid: bool) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("bench-{i}"),
            uid: format!("uid-{i}-{shared_pid}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: b.dir.path().join("logs").to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/pod{i}", b.cgroup_root),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: if shared_pid {
                        cri::NamespaceMode::Pod
                    } else {
                        cri::NamespaceMode::Container
                    } as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[derive(Default)]
struct Times {
    run: Vec<Duration>,
    stop: Vec<Duration>,
    remove: Vec<Duration>,
}

async fn one(rt: &mut RuntimeServiceClient<Channel>, c: cri::PodSandboxConfig, t: &mut Times) {
    let s = Instant::now();
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(c),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    t.run.push(s.elapsed());
    let s = Instant::now();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .unwrap();
    t.stop.push(s.elapsed());
    let s = Instant::now();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .unwrap();
    t.remove.push(s.elapsed());
}

fn stats(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (ms(v[v.len() / 2]), ms(p99), mean)
}

fn report(label: &str, t: &mut Times) {
    let (rm, rp, ra) = stats(&mut t.run);
    let (sm, sp, sa) = stats(&mut t.stop);
    let (xm, xp, xa) = stats(&mut t.remove);
    let mut both: Vec<Duration> = t.stop.iter().zip(&t.remove).map(|(a, b)| *a + *b).collect();
    let (bm, bp, _) = stats(&mut both);
    println!("{label} ({} pods)", t.run.len());
    println!("  RunPodSandbox     median {rm:6.2} ms  p99 {rp:6.2} ms  mean {ra:6.2} ms");
    println!("  StopPodSandbox    median {sm:6.2} ms  p99 {sp:6.2} ms  mean {sa:6.2} ms");
    println!("  RemovePodSandbox  median {xm:6.2} ms  p99 {xp:6.2} ms  mean {xa:6.2} ms");
    println!("  Stop + Remove     median {bm:6.2} ms  p99 {bp:6.2} ms");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let b = Berthd::start_with(Options {
        log_level: Some("warn".into()),
        ..Default::default()
    });
    let rt = b.runtime().await;
    // Warm up (bridge, table, page cache).
    for i in 0..10 {
        one(
            &mut rt.clone(),
            config(&b, 100_000 + i, false),
            &mut Times::default(),
        )
        .await;
    }
    for shared_pid in [false, true] {
        let kind = if shared_pid {
            "pods sharing a PID namespace (with init)"
        } else {
            "pods as kubelet asks (PID namespace per container)"
        };
        let mut t = Times::default();
        for i in 0..n {
            one(&mut rt.clone(), config(&b, i, shared_pid), &mut t).await;
        }
        report(&format!("sequential, {kind}"), &mut t);

        let mut tasks = Vec::new();
        for w in 0..10 {
            let mut rt = rt.clone();
            let cfgs: Vec<_> = (0..n / 10)
                .map(|i| config(&b, 10_000 + w * 1000 + i, shared_pid))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut t = Times::default();
                for c in cfgs {
                    one(&mut rt, c, &mut t).await;
                }
                t
            }));
        }
        let mut all = Times::default();
        for task in tasks {
            let t = task.await.unwrap();
            all.run.extend(t.run);
            all.stop.extend(t.stop);
            all.remove.extend(t.remove);
        }
        report(&format!("10 in parallel, {kind}"), &mut all);
    }
}
