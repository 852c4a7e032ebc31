//! A world for container tests: a namespace with the fixture registry, a berthd that pulled
//! busybox, and helpers to make pods and containers and look at what they leave.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use super::{Env, Options};

/// A RuntimeService client.
pub type Rt = RuntimeServiceClient<Channel>;

pub const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";

pub struct World {
    /// The namespace, registry and berthd.
    pub env: Env,
    /// A RuntimeService client.
    pub rt: Rt,
}

impl World {
    pub async fn new() -> World {
        World::with(Options::default()).await
    }

    pub async fn with(opts: Options) -> World {
        let env = Env::with(opts);
        pull(&env.berthd, BUSYBOX).await;
        let rt = env.berthd.runtime().await;
        World { env, rt }
    }

    pub fn logs(&self) -> PathBuf {
        self.env.berthd.dir.path().join("logs")
    }

    pub fn pod_config(&self, name: &str, pid: cri::NamespaceMode) -> cri::PodSandboxConfig {
        pod_config_for(&self.logs(), &self.env.berthd.cgroup_root, name, pid)
    }

    pub async fn pod(&mut self, name: &str) -> (String, cri::PodSandboxConfig) {
        let c = self.pod_config(name, cri::NamespaceMode::Container);
        self.run_pod(c).await
    }

    /// Runs a pod sandbox from `c`; panics if that fails.
    /// A running pod whose security context is privileged.
    pub async fn privileged_pod(&mut self, name: &str) -> (String, cri::PodSandboxConfig) {
        let mut c = self.pod_config(name, cri::NamespaceMode::Container);
        let linux = c.linux.get_or_insert_default();
        linux.security_context.get_or_insert_default().privileged = true;
        self.run_pod(c).await
    }

    pub async fn run_pod(&mut self, c: cri::PodSandboxConfig) -> (String, cri::PodSandboxConfig) {
        let id = self
            .rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(c.clone()),
                runtime_handler: super::handler(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        (id, c)
    }

    pub async fn create(
        &mut self,
        pod: &(String, cri::PodSandboxConfig),
        c: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.0.clone(),
                config: Some(c),
                sandbox_config: Some(pod.1.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    pub async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn run(
        &mut self,
        pod: &(String, cri::PodSandboxConfig),
        c: cri::ContainerConfig,
    ) -> String {
        let id = self.create(pod, c).await.unwrap();
        self.start(&id).await.unwrap();
        id
    }

    pub async fn status(&mut self, id: &str) -> cri::ContainerStatus {
        self.rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    pub async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Runs `sh -c script` in the container; (exit code, stdout and stderr together).
    pub async fn sh(&mut self, id: &str, script: &str) -> (i32, String) {
        let r = self.exec(id, &["sh", "-c", script], 10).await.unwrap();
        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&r.stderr));
        (r.exit_code, out.trim().to_string())
    }

    /// The runtime's Status (not verbose).
    pub async fn runtime_status(&mut self) -> cri::StatusResponse {
        self.rt
            .status(cri::StatusRequest { verbose: false })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn out(&mut self, id: &str, cmd: &[&str]) -> String {
        let r = self.exec(id, cmd, 10).await.unwrap();
        assert_eq!(
            r.exit_code,
            0,
            "{cmd:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).trim().to_string()
    }

    pub async fn wait_state(
        &mut self,
        id: &str,
        state: cri::ContainerState,
    ) -> cri::ContainerStatus {
        for _ in 0..200 {
            let s = self.status(id).await;
            if s.state == state as i32 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("container {id} never reached {state:?}");
    }

    pub async fn stop(&mut self, id: &str, timeout: i64) {
        self.rt
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await
            .unwrap();
    }

    pub async fn remove(&mut self, id: &str) {
        self.rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap();
    }

    pub async fn remove_pod(&mut self, pod: &str) {
        self.rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .unwrap();
        self.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .unwrap();
    }

    /// The pid of a pod's monitor, from berthd's record of the pod.
    pub fn monitor_pid(&self, pod: &str) -> i32 {
        let path = self
            .env
            .berthd
            .state
            .join("pods")
            .join(pod)
            .join("pod.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["monitor"][0].as_i64().expect("a monitor pid") as i32
    }

    /// What containers leave on the machine: mounts, state and layer directories, cgroups.
    pub fn leftovers(&self) -> Vec<String> {
        let b = &self.env.berthd;
        let mut mounts = super::mounts_under(b.dir.path());
        if !b.state.starts_with(b.dir.path()) {
            mounts.extend(super::mounts_under(&b.state));
        }
        let mut v: Vec<String> = mounts
            .into_iter()
            .filter(|m| {
                !m.ends_with("state/ns")
                    && !m.to_string_lossy().contains("/pods/")
                    && !m.to_string_lossy().contains("/state/ns/")
            })
            .map(|m| format!("mount {}", m.display()))
            .collect();
        for m in super::cgroup_mounts() {
            let mut stack = vec![m.join(&b.cgroup_root)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        v.push(format!("cgroup {}", e.path().display()));
                        stack.push(e.path());
                    }
                }
            }
        }
        for (d, path) in [
            ("state/containers", b.state.join("containers")),
            ("state/lc", b.state.join("lc")),
            ("root/containers", b.root.join("containers")),
            ("root/records/pods", b.root.join("records/pods")),
            ("root/records/containers", b.root.join("records/containers")),
        ] {
            if let Ok(rd) = std::fs::read_dir(path) {
                v.extend(
                    rd.flatten()
                        .map(|e| format!("{d}/{}", e.file_name().to_string_lossy())),
                );
            }
        }
        v.sort();
        v
    }
}

/// Pulls `image` into `b` and returns its image_ref (the image ID); panics if that fails.
pub async fn pull(b: &super::Berthd, image: &str) -> String {
    b.images()
        .await
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref
}

/// PodSandboxStatus of `id`; panics if the call fails.
pub async fn pod_status(rt: &mut Rt, id: &str) -> cri::PodSandboxStatus {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

/// A pod config with a fresh uid, its logs under `logs`, its cgroup under `cgroup_root`.
pub fn pod_config_for(
    logs: &Path,
    cgroup_root: &str,
    name: &str,
    pid: cri::NamespaceMode,
) -> cri::PodSandboxConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let uid = format!(
        "uid-{name}-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "test".into(),
            attempt: 0,
        }),
        log_directory: logs.join(&uid).to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: super::pod_cgroup_parent(cgroup_root, &format!("pod{uid}")),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: pid as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn container(name: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// `c` with the security context `sc`.
pub fn with_security(
    c: cri::ContainerConfig,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..c
    }
}

/// A privileged busybox container running `cmd`.
pub fn privileged_container(name: &str, cmd: &[&str]) -> cri::ContainerConfig {
    with_security(
        container(name, cmd),
        cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        },
    )
}

/// Parsed CRI log lines: (stream, tag, content).
pub fn log_lines(p: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let ts = f.next().unwrap();
            assert!(
                ts.ends_with('Z') && ts.contains('T') && ts.contains('.'),
                "bad timestamp in {l:?}"
            );
            (
                f.next().unwrap().into(),
                f.next().unwrap().into(),
                f.next().unwrap_or("").into(),
            )
        })
        .collect()
}

pub fn alive(pid: i32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// The processes whose cgroup path names `id` (a container's cgroup is named by its id).
pub fn processes_in_cgroup_of(id: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(id))
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}
