//! Container latency and memory: CreateContainer, StartContainer, StopContainer and
//! RemoveContainer for busybox `sleep 3600` on a release berthd (median, p99), then the
//! proportional memory (Pss, /proc/PID/smaps_rollup) of berthd idle and of each pod's monitor
//! with 10 pods of one container each. Figures only.
//!
//! Run with `cargo bench --bench containers` (as root, fixtures built: hack/fixtures/build).
//! `BENCH_CONTAINERS` sets the number of containers timed (default 100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::{Env, Options};

const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn children_named(comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == comm)
            .unwrap_or(false)
        {
            out.push(pid);
        }
    }
    out
}

fn stats(v: &mut [Duration]) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
    format!(
        "median {:6.2} ms  p99 {:6.2} ms",
        ms(v[v.len() / 2]),
        ms(p99)
    )
}

fn pod_config(env: &Env, i: usize) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("bench-{i}"),
            uid: format!("uid-{i}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: env
            .berthd
            .dir
            .path()
            .join("logs")
            .join(i.to_string())
            .to_string_lossy()
            .into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/pod{i}", env.berthd.cgroup_root),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(i: usize) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: format!("c{i}"),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        log_path: format!("c{i}.log"),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // BENCH_FAVOR_DYNMODS=1: berthd remounts cgroup2 with favordynmods (undone at the end).
    let favor = std::env::var("BENCH_FAVOR_DYNMODS").is_ok_and(|v| v == "1");
    let cgroup2_opts = cgroup2_options();
    let env = Env::with(Options {
        log_level: Some("warn".into()),
        extra_config: if favor {
            "cgroup_favor_dynmods = true\n".into()
        } else {
            String::new()
        },
        ..Default::default()
    });
    println!(
        "cgroup2 favordynmods: {}",
        if favor {
            "on (for this run)"
        } else {
            "as the host has it"
        }
    );
    let mut images = env.berthd.images().await;
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rt = env.berthd.runtime().await;

    // Memory of berthd with nothing running (images pulled).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let berthd_idle = pss_kib(env.berthd.pid());

    let pc = pod_config(&env, 0);
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pc.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let (mut create, mut start, mut create_start, mut stop, mut remove) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 5 {
        let t = Instant::now();
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(i)),
                sandbox_config: Some(pc.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        let c = t.elapsed();
        let t2 = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        let s = t2.elapsed();
        let t3 = Instant::now();
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
        let st = t3.elapsed();
        let t4 = Instant::now();
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .unwrap();
        let r = t4.elapsed();
        if i >= 5 {
            // the first five warm caches up
            create.push(c);
            start.push(s);
            create_start.push(c + s);
            stop.push(st);
            remove.push(r);
        }
    }
    println!("busybox `sleep 3600`, {n} containers, one at a time:");
    println!("  CreateContainer   {}", stats(&mut create));
    println!("  StartContainer    {}", stats(&mut start));
    println!("  Create + Start    {}", stats(&mut create_start));
    println!(
        "  StopContainer     {}  (timeout 0: SIGKILL)",
        stats(&mut stop)
    );
    println!("  RemoveContainer   {}", stats(&mut remove));
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();

    // 10 pods with one container each.
    let mut pods = Vec::new();
    for i in 1..=10 {
        let pc = pod_config(&env, i);
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pc.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(i)),
                sandbox_config: Some(pc),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest { container_id: id })
            .await
            .unwrap();
        pods.push(pod);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let monitors = children_named("berth-monitor");
    let pss: Vec<u64> = monitors.iter().map(|p| pss_kib(*p)).collect();
    let berthd_busy = pss_kib(env.berthd.pid());
    println!("\nmemory (Pss, smaps_rollup):");
    println!("  berthd idle                  {berthd_idle:6} KiB");
    println!("  berthd with 10 pods          {berthd_busy:6} KiB");
    if !pss.is_empty() {
        println!(
            "  monitor, 10 pods x 1 container: mean {} KiB, max {} KiB ({} monitors)",
            pss.iter().sum::<u64>() / pss.len() as u64,
            pss.iter().max().unwrap(),
            pss.len()
        );
    }
    for pod in pods {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    }
    if favor && let Some((mount, opts)) = cgroup2_opts {
        // Leave the host as it was.
        let _ = nix::mount::mount(
            None::<&str>,
            mount.as_str(),
            Some("cgroup2"),
            nix::mount::MsFlags::MS_REMOUNT,
            Some(opts.as_str()),
        );
    }
}

/// The cgroup2 mount point and its options, as they are before the run.
fn cgroup2_options() -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find(|l| l.contains(" - cgroup2 ")).map(|l| {
        let mount = l.split(' ').nth(4).unwrap_or("").to_string();
        let opts = l
            .split(" - ")
            .nth(1)
            .and_then(|p| p.split(' ').nth(2))
            .unwrap_or("rw")
            .to_string();
        (mount, opts)
    })
}
