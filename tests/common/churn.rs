//! A kubelet-like load: workers living pod lives (a pod of two containers created, started,
//! their logs read, stopped, removed) while a poller lists as kubelet's relist does. Every
//! call's latency and every failure is recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;

use super::world::{Rt, container};

/// What a load did.
#[derive(Default)]
pub struct Tally {
    /// Calls made, by RPC.
    pub latencies: BTreeMap<&'static str, Vec<Duration>>,
    /// Failed calls and failed checks, described.
    pub errors: Vec<String>,
    /// Calls answered Unimplemented (not errors: features not built yet), by RPC.
    pub unimplemented: BTreeMap<&'static str, usize>,
    /// Pod lives completed.
    pub pods: usize,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        for (k, v) in o.latencies {
            self.latencies.entry(k).or_default().extend(v);
        }
        self.errors.extend(o.errors);
        for (k, v) in o.unimplemented {
            *self.unimplemented.entry(k).or_default() += v;
        }
        self.pods += o.pods;
    }

    /// Times one call; a failure is recorded and yields None.
    async fn call<T>(
        &mut self,
        rpc: &'static str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        let t = Instant::now();
        let r = f.await;
        self.latencies.entry(rpc).or_default().push(t.elapsed());
        match r {
            Ok(r) => Some(r.into_inner()),
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                *self.unimplemented.entry(rpc).or_default() += 1;
                None
            }
            Err(e) => {
                self.errors
                    .push(format!("{rpc}: {:?}: {}", e.code(), e.message()));
                None
            }
        }
    }

    /// Calls made in all.
    pub fn calls(&self) -> usize {
        self.latencies.values().map(Vec::len).sum()
    }

    /// One line per RPC: count, p50, p99.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (rpc, v) in &self.latencies {
            let mut v = v.clone();
            v.sort();
            let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
            out.push_str(&format!(
                "  {rpc:<22} {:6} calls  p50 {:8.2} ms  p99 {:8.2} ms\n",
                v.len(),
                p(0.5).as_secs_f64() * 1000.0,
                p(0.99).as_secs_f64() * 1000.0
            ));
        }
        out
    }
}

/// One pod life: run the pod, create and start two containers that print a line, read the
/// line from each log, stop and remove the containers, stop and remove the pod.
pub async fn pod_life(mut rt: Rt, config: cri::PodSandboxConfig) -> Tally {
    let mut t = Tally::default();
    let req = cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    let Some(pod) = t.call("RunPodSandbox", rt.run_pod_sandbox(req)).await else {
        // As kubelet does, a failed pod start backs off before the next.
        tokio::time::sleep(Duration::from_millis(50)).await;
        return t;
    };
    let pod = pod.pod_sandbox_id;
    let mut ids = Vec::new();
    for name in ["app", "sidecar"] {
        let mut c = container(name, &["sh", "-c", "echo started; exec sleep 3600"]);
        c.log_path = format!("{name}.log");
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(config.clone()),
        };
        if let Some(r) = t.call("CreateContainer", rt.create_container(req)).await {
            ids.push((name, r.container_id));
        }
    }
    let mut started = Vec::new();
    for (name, id) in &ids {
        let req = cri::StartContainerRequest {
            container_id: id.clone(),
        };
        if t.call("StartContainer", rt.start_container(req))
            .await
            .is_some()
        {
            started.push(*name);
        }
    }
    // The log checker: each started container's line reaches its log.
    for name in &started {
        let log = Path::new(&config.log_directory).join(format!("{name}.log"));
        let mut seen = false;
        for _ in 0..100 {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" stdout F started")) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !seen {
            t.errors.push(format!(
                "log {}: the container's line never came",
                log.display()
            ));
        }
    }
    for (_, id) in &ids {
        let req = cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        };
        t.call("StopContainer", rt.stop_container(req)).await;
        let req = cri::RemoveContainerRequest {
            container_id: id.clone(),
        };
        t.call("RemoveContainer", rt.remove_container(req)).await;
    }
    let req = cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    };
    t.call("StopPodSandbox", rt.stop_pod_sandbox(req)).await;
    let req = cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    };
    t.call("RemovePodSandbox", rt.remove_pod_sandbox(req)).await;
    t.pods += 1;
    t
}

/// Runs `workers` workers over the pod configs `next` hands out (None: stop), with a poller
/// listing pods, containers and container stats every `poll` meanwhile.
pub async fn run(
    rt: &Rt,
    workers: usize,
    poll: Duration,
    next: impl FnMut() -> Option<cri::PodSandboxConfig> + Send + 'static,
) -> Tally {
    let next = Arc::new(Mutex::new(next));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let rt = rt.clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut t = Tally::default();
            loop {
                let c = (next.lock().unwrap())();
                let Some(c) = c else { break };
                t.merge(pod_life(rt.clone(), c).await);
            }
            t
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let mut prt = rt.clone();
    let poller = tokio::spawn(async move {
        let mut t = Tally::default();
        while !stopped.load(Ordering::Relaxed) {
            t.call(
                "ListPodSandbox",
                prt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
            )
            .await;
            t.call(
                "ListContainers",
                prt.list_containers(cri::ListContainersRequest { filter: None }),
            )
            .await;
            t.call(
                "ListContainerStats",
                prt.list_container_stats(cri::ListContainerStatsRequest { filter: None }),
            )
            .await;
            tokio::time::sleep(poll).await;
        }
        t
    });
    let mut all = Tally::default();
    for h in handles {
        all.merge(h.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    all.merge(poller.await.unwrap());
    all
}
