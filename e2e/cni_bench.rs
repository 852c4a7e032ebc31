//! Pod sandbox latency in CNI mode, berth against containerd (Debian's package) with the same
//! plugins and the same kind of configuration list (Debian's bridge + host-local + portmap),
//! side by side in one run, and berth's built-in network for reference: RunPodSandbox, then
//! StopPodSandbox + RemovePodSandbox, sequential. The plugins' work is the same for both
//! runtimes; what differs is the runtime's own. Figures only.
//!
//! Run with `e2e/bench-cni` (installs containerd and the plugins). `BENCH_PODS` sets the
//! pods per runtime (default 50).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "containerd.rs"]
mod containerd;

use std::path::Path;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, Netns, Options, Registry, mirror_config};
use tonic::transport::Channel;

/// A conflist of Debian's bridge (on `bridge`, addresses from `subnet`), host-local (leases
/// in `leases`) and portmap.
fn conflist(bridge: &str, subnet: &str, leases: &Path) -> String {
    serde_json::json!({"cniVersion": "1.0.0", "name": "bench", "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": leases.display().to_string()}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]})
    .to_string()
}

fn config(logs: &Path, cgroup_root: &str, i: usize) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("bench-{i}"),
            uid: format!("uid-{i}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{cgroup_root}/pod{i}"),
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

/// Run and Stop+Remove times of `n` pods one after the other (after 5 unmeasured).
async fn series(
    rt: &mut RuntimeServiceClient<Channel>,
    logs: &Path,
    cgroup_root: &str,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut run, mut down) = (Vec::new(), Vec::new());
    for i in 0..n + 5 {
        let t = Instant::now();
        let id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config(logs, cgroup_root, i)),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id;
        let r = t.elapsed();
        let t = Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap();
        if i >= 5 {
            run.push(r);
            down.push(t.elapsed());
        }
    }
    (run, down)
}

fn median_p99(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
    (ms(v[v.len() / 2]), ms(p99))
}

fn report(label: &str, run: &mut [Duration], down: &mut [Duration]) -> (f64, f64) {
    let (rm, rp) = median_p99(run);
    let (dm, dp) = median_p99(down);
    println!(
        "  {label:<22} RunPodSandbox median {rm:7.2} ms p99 {rp:7.2} ms   Stop+Remove median {dm:7.2} ms p99 {dp:7.2} ms"
    );
    (rm, dm)
}

/// Removes a cgroup tree (depth first) in every hierarchy.
fn remove_cgroups(root: &str) {
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let top = h.path().join(root);
        let mut dirs = vec![top.clone()];
        let mut all = Vec::new();
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
            all.push(d);
        }
        for d in all.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let ns = Netns::new();
    let registry = Registry::start(&ns, 5000);
    let work = tempfile::tempdir().unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    println!("Pod sandboxes, {n} sequential each (after 5 unmeasured), in one network namespace:");

    let builtin = {
        let b = Berthd::start_with(Options {
            extra_config: mirror_config(&registry.addr),
            netns: Some(ns.path.clone()),
            log_level: Some("warn".into()),
            ..Default::default()
        });
        let (mut r, mut d) = series(&mut b.runtime().await, &logs, &b.cgroup_root, n).await;
        report("berth, built-in", &mut r, &mut d)
    };

    let berth_cni = {
        let dir = work.path().join("berth-cni");
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::write(
            dir.join("net.d/10-bench.conflist"),
            conflist("cnib0", "10.97.0.0/16", &dir.join("leases")),
        )
        .unwrap();
        let b = Berthd::start_with(Options {
            extra_config: format!(
                "{}\n[network]\nmode = \"cni\"\n[network.cni]\nconf_dir = {:?}\nbin_dirs = [\"/usr/lib/cni\"]\n",
                mirror_config(&registry.addr),
                dir.join("net.d").display().to_string()
            ),
            netns: Some(ns.path.clone()),
            log_level: Some("warn".into()),
            ..Default::default()
        });
        let (mut r, mut d) = series(&mut b.runtime().await, &logs, &b.cgroup_root, n).await;
        report("berth, CNI", &mut r, &mut d)
    };

    if !containerd::installed() {
        println!("  containerd not installed: no side-by-side figures (e2e/bench-cni installs it)");
        return;
    }
    let dir = work.path().join("ctrd-cni");
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    std::fs::write(
        dir.join("net.d/10-bench.conflist"),
        conflist("cnic0", "10.98.0.0/16", &dir.join("leases")),
    )
    .unwrap();
    let c = containerd::Containerd::start(
        &ns,
        &registry.addr,
        &format!(
            "  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = \"/usr/lib/cni\"\n    conf_dir = \"{}\"\n",
            dir.join("net.d").display()
        ),
    );
    let channel = common::connect(&c.socket).await;
    berth::cri::v1::image_service_client::ImageServiceClient::new(channel.clone())
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("{}/pause:3.9", registry.addr),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("containerd pulls its sandbox image");
    let root = format!("berth-bench-ctrd-{}", std::process::id());
    let (mut r, mut d) = series(&mut RuntimeServiceClient::new(channel), &logs, &root, n).await;
    let ctrd = report("containerd, CNI", &mut r, &mut d);
    drop(c);
    remove_cgroups(&root);
    println!(
        "  berth CNI / containerd (medians): RunPodSandbox {:.2}, Stop+Remove {:.2};  built-in / containerd: {:.2}, {:.2}",
        berth_cni.0 / ctrd.0,
        berth_cni.1 / ctrd.1,
        builtin.0 / ctrd.0,
        builtin.1 / ctrd.1
    );
}
