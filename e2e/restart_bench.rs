//! Restart time: how long a release berthd takes, after `kill -9`, to answer Version and to
//! list every container of 100 pods, first with every monitor healthy, then with 5 monitors
//! stopped (SIGSTOP: alive but not answering) and 5 killed. Figures only; it also checks the
//! outcome kubelet relies on: containers of stopped monitors stay Running, those of killed
//! monitors are Exited in NotReady pods.
//!
//! Run with `cargo bench --bench restart` (as root, fixtures built: hack/fixtures/build).
//! `BENCH_PODS` sets the number of pods (default 100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::world::{BUSYBOX, container, pod_config_for, pull};
use common::{Env, Options};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn monitor_pid(env: &Env, pod: &str) -> i32 {
    let path = env.berthd.state.join("pods").join(pod).join("pod.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["monitor"][0].as_i64().unwrap() as i32
}

/// Kills berthd, starts it again and times the first answers.
async fn restart(env: &mut Env) -> (Duration, Duration, Duration, Vec<cri::Container>) {
    env.berthd.signal(Signal::SIGKILL);
    env.berthd.wait_exit(Duration::from_secs(10));
    let t0 = Instant::now();
    env.berthd.restart();
    let serving = t0.elapsed();
    let mut rt = env.berthd.runtime().await;
    rt.version(cri::VersionRequest::default()).await.unwrap();
    let version = t0.elapsed();
    let listed = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    (serving, version, t0.elapsed(), listed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let level = std::env::var("BENCH_LOG_LEVEL").ok();
    let mut env = Env::with(Options {
        log_level: Some(level.clone().unwrap_or_else(|| "warn".into())),
        ..Default::default()
    });
    pull(&env.berthd, BUSYBOX).await;
    let mut rt = env.berthd.runtime().await;
    let mut pods = Vec::new();
    for i in 0..n {
        let config = pod_config_for(
            &env.berthd.dir.path().join("logs"),
            &env.berthd.cgroup_root,
            &format!("restart-{i}"),
            // Sharing a PID namespace: the pods whose init a restart must stop.
            cri::NamespaceMode::Pod,
        );
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let mut c = container(&format!("c{i}"), &["sleep", "3600"]);
        c.log_path = format!("c{i}.log");
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(c),
                sandbox_config: Some(config),
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
    println!("{n} pods of one running container each");
    for round in 0..3 {
        let (serving, version, listed_at, listed) = restart(&mut env).await;
        println!(
            "  healthy monitors, restart {round}: socket {:7.1} ms  Version {:7.1} ms  ListContainers ({} containers) {:7.1} ms",
            ms(serving),
            ms(version),
            listed.len(),
            ms(listed_at)
        );
    }
    let stopped: Vec<i32> = pods[..5].iter().map(|p| monitor_pid(&env, p)).collect();
    let killed: Vec<i32> = pods[5..10].iter().map(|p| monitor_pid(&env, p)).collect();
    for &p in &stopped {
        kill(Pid::from_raw(p), Signal::SIGSTOP).unwrap();
    }
    for &p in &killed {
        kill(Pid::from_raw(p), Signal::SIGKILL).unwrap();
    }
    let (serving, version, listed_at, listed) = restart(&mut env).await;
    println!(
        "  5 monitors stopped, 5 killed:   socket {:7.1} ms  Version {:7.1} ms  ListContainers ({} containers) {:7.1} ms",
        ms(serving),
        ms(version),
        listed.len(),
        ms(listed_at)
    );
    for &p in &stopped {
        kill(Pid::from_raw(p), Signal::SIGCONT).unwrap();
    }
    if level.is_some() {
        // BENCH_LOG_LEVEL: what berthd logged during the last restart.
        let log = env.berthd.log_text();
        let last = log.rfind("berthd starting").unwrap_or(0);
        println!("{}", &log[last..]);
    }
    let running = cri::ContainerState::ContainerRunning as i32;
    let state_of = |pod: &str| {
        listed
            .iter()
            .find(|c| c.pod_sandbox_id == pod)
            .map(|c| c.state)
    };
    let kept = pods[..5]
        .iter()
        .filter(|p| state_of(p) == Some(running))
        .count();
    let exited = pods[5..10]
        .iter()
        .filter(|p| state_of(p) == Some(cri::ContainerState::ContainerExited as i32))
        .count();
    let others = pods[10..]
        .iter()
        .filter(|p| state_of(p) == Some(running))
        .count();
    println!(
        "  outcome: {kept}/5 containers of stopped monitors Running, {exited}/5 of killed monitors Exited, {others}/{} others Running",
        n - 10
    );
    let mut rt = env.berthd.runtime().await;
    for p in &pods {
        let _ = rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: p.clone(),
            })
            .await;
        let _ = rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: p.clone(),
            })
            .await;
    }
}
