//! CreateContainer, StartContainer, StopContainer, RemoveContainer, ListContainers,
//! ContainerStatus, ReopenContainerLog and ExecSync.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::cri::v1 as cri;
use tonic::Status;

use super::{Cri, ns_mode};
use crate::container::{
    ContainerRecord, ContainerSecurity, ContainerSpec, CtrFilter, CtrState, DeviceSpec, Resources,
};

/// A CRI stop signal as the name berth records ("SIGUSR1", "SIGRTMIN+3"); none for
/// RUNTIME_DEFAULT, which leaves the image's STOPSIGNAL or SIGTERM in force.
pub(super) fn stop_signal_name(v: i32) -> Result<Option<String>, Status> {
    let sig = cri::Signal::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("stop_signal: unknown signal {v}")))?;
    if sig == cri::Signal::RuntimeDefault {
        return Ok(None);
    }
    let name = sig.as_str_name().trim_start_matches("SIGNAL_");
    let name = if let Some(n) = name.strip_prefix("SIGRTMINPLUS") {
        format!("SIGRTMIN+{n}")
    } else if let Some(n) = name.strip_prefix("SIGRTMAXMINUS") {
        format!("SIGRTMAX-{n}")
    } else {
        name.to_string()
    };
    Ok(Some(name))
}

/// The CRI value of the signal a stop sends: the recorded name's number, reported as the
/// first (canonical) CRI name with that number; SIGTERM when nothing is recorded.
pub(super) fn cri_stop_signal(name: &str) -> i32 {
    // Signal number → first CRI value naming it, built once: every ContainerStatus and
    // container event asks.
    static BY_NUMBER: std::sync::OnceLock<HashMap<i32, i32>> = std::sync::OnceLock::new();
    let table = BY_NUMBER.get_or_init(|| {
        let mut t = HashMap::new();
        for v in (1..).take_while(|&v| cri::Signal::try_from(v).is_ok()) {
            if let Some(n) = stop_signal_name(v)
                .ok()
                .flatten()
                .and_then(|s| crate::container::signal_number(&s))
            {
                t.entry(n).or_insert(v);
            }
        }
        t
    });
    let n = crate::container::signal_number(name).unwrap_or(libc::SIGTERM);
    table
        .get(&n)
        .copied()
        .unwrap_or(cri::Signal::Sigterm as i32)
}

/// An env value: the OCI spec (and so every runtime berth hands it to) carries the
/// environment as UTF-8 strings, so a value that is not UTF-8 cannot reach the process byte
/// for byte. It fails the call naming the variable rather than being altered; a NUL byte
/// cannot be in an environment at all.
fn env_value(key: &str, value: Vec<u8>) -> Result<String, Status> {
    if let Some(i) = value.iter().position(|&b| b == 0) {
        return Err(Status::invalid_argument(format!(
            "env {key}: the value has a NUL byte at offset {i}, which no process environment \
             can hold"
        )));
    }
    String::from_utf8(value).map_err(|e| {
        Status::invalid_argument(format!(
            "env {key}: the value is not UTF-8 (invalid byte at offset {}); the OCI runtime \
             spec carries the environment as UTF-8 strings, so berth cannot pass it unaltered",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The domain's view of a ContainerConfig.
fn container_spec(c: cri::ContainerConfig) -> Result<ContainerSpec, Status> {
    let md = c
        .metadata
        .ok_or_else(|| Status::invalid_argument("container config has no metadata"))?;
    if md.name.is_empty() {
        return Err(Status::invalid_argument("container metadata has no name"));
    }
    if let Some(d) = c.cdi_devices.first() {
        return Err(Status::invalid_argument(format!(
            "cdi_devices: CDI device {:?} cannot be given: berth does not read CDI specs yet",
            d.name
        )));
    }
    let stop_signal = stop_signal_name(c.stop_signal)?;
    let image = c
        .image
        .map(|i| i.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Status::invalid_argument("container config names no image"))?;
    let linux = c.linux.unwrap_or_default();
    let r = linux.resources.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    let (seccomp, seccomp_runtime_default) = seccomp(&sc)?;
    apparmor(&sc)?;
    let caps = sc.capabilities.unwrap_or_default();
    let ns = sc.namespace_options;
    Ok(ContainerSpec {
        name: md.name,
        attempt: md.attempt,
        image,
        command: c.command,
        args: c.args,
        working_dir: c.working_dir,
        envs: c
            .envs
            .into_iter()
            .map(|kv| {
                let v = env_value(&kv.key, kv.value)?;
                Ok((kv.key, v))
            })
            .collect::<Result<_, Status>>()?,
        mounts: c
            .mounts
            .into_iter()
            .map(super::mounts::mount)
            .collect::<Result<_, _>>()?,
        devices: c
            .devices
            .into_iter()
            .map(|d| DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        log_path: c.log_path,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        tty: c.tty,
        resources: resources(r),
        stop_signal,
        security: ContainerSecurity {
            privileged: sc.privileged,
            run_as_user: sc.run_as_user.map(|v| v.value),
            run_as_username: sc.run_as_username,
            run_as_group: sc.run_as_group.map(|v| v.value),
            supplemental_groups: sc.supplemental_groups,
            strict_groups: sc.supplemental_groups_policy
                == cri::SupplementalGroupsPolicy::Strict as i32,
            readonly_rootfs: sc.readonly_rootfs,
            no_new_privs: sc.no_new_privs,
            add_caps: caps.add_capabilities,
            drop_caps: caps.drop_capabilities,
            ambient_caps: caps.add_ambient_capabilities,
            masked_paths: Some(sc.masked_paths).filter(|p| !p.is_empty()),
            readonly_paths: Some(sc.readonly_paths).filter(|p| !p.is_empty()),
            pid_mode: ns.as_ref().map(|n| ns_mode(n.pid)).transpose()?,
            target_id: ns.map(|n| n.target_id).unwrap_or_default(),
            apparmor_profile: String::new(),
            seccomp,
            seccomp_runtime_default,
        },
    })
}

/// The domain's view of the CRI's Linux resources.
pub(super) fn resources(r: cri::LinuxContainerResources) -> Resources {
    Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit: r.memory_limit_in_bytes,
        memory_swap_limit: r.memory_swap_limit_in_bytes,
        oom_score_adj: r.oom_score_adj,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        hugepage_limits: r
            .hugepage_limits
            .into_iter()
            .map(|h| (h.page_size, h.limit))
            .collect(),
        unified: r.unified.into_iter().collect(),
    }
}

/// The CRI's view of a container's resources, as ContainerStatus reports them.
fn cri_resources(r: &Resources) -> cri::ContainerResources {
    cri::ContainerResources {
        linux: Some(cri::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit,
            memory_swap_limit_in_bytes: r.memory_swap_limit,
            oom_score_adj: r.oom_score_adj,
            cpuset_cpus: r.cpuset_cpus.clone(),
            cpuset_mems: r.cpuset_mems.clone(),
            unified: r.unified.clone().into_iter().collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The seccomp profile the container gets, from `seccomp` or the older `seccomp_profile_path`:
/// a Localhost profile's section, or whether berth's RuntimeDefault applies. A profile berth
/// cannot read fails the call: a container asking to be confined never runs unconfined.
// The deprecated field is read on purpose: older clients still send only it.
#[allow(deprecated)]
fn seccomp(
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<(Option<serde_json::Value>, bool), Status> {
    use cri::security_profile::ProfileType;
    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::Unconfined) => Ok((None, false)),
            Ok(ProfileType::RuntimeDefault) => Ok((None, true)),
            Ok(ProfileType::Localhost) => Ok((Some(load_seccomp(&p.localhost_ref)?), false)),
            Err(_) => Err(Status::invalid_argument(format!(
                "security_context.seccomp: unknown profile type {}",
                p.profile_type
            ))),
        };
    }
    match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok((None, false)),
        "runtime/default" | "docker/default" => Ok((None, true)),
        p => match p.strip_prefix("localhost/") {
            Some(path) => Ok((Some(load_seccomp(path)?), false)),
            None => Err(Status::invalid_argument(format!(
                "security_context.seccomp_profile_path {p:?} is not unconfined, runtime/default \
                 or localhost/<path>"
            ))),
        },
    }
}

/// Whether this kernel enforces AppArmor.
pub(super) fn host_has_apparmor() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y")
}

/// AppArmor: berth loads no profiles. On a kernel without AppArmor the runtime's default is no
/// profile, so RuntimeDefault (and Unconfined) are what the container gets; a named profile
/// cannot be applied and fails the call. On a kernel with AppArmor only Unconfined is taken, as
/// berth would otherwise run the container less confined than asked.
#[allow(deprecated)]
fn apparmor(sc: &cri::LinuxContainerSecurityContext) -> Result<(), Status> {
    use cri::security_profile::ProfileType;
    let (default, named) = match &sc.apparmor {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::Unconfined) => return Ok(()),
            Ok(ProfileType::RuntimeDefault) => (true, String::new()),
            Ok(ProfileType::Localhost) => (false, p.localhost_ref.clone()),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "security_context.apparmor: unknown profile type {}",
                    p.profile_type
                )));
            }
        },
        None => match sc.apparmor_profile.as_str() {
            "" | "unconfined" => return Ok(()),
            "runtime/default" => (true, String::new()),
            p => (false, p.strip_prefix("localhost/").unwrap_or(p).to_string()),
        },
    };
    match (host_has_apparmor(), default) {
        (false, true) => Ok(()),
        (false, false) => Err(Status::invalid_argument(format!(
            "security_context.apparmor: profile {named:?} cannot be applied: this kernel has \
             no AppArmor (only Unconfined and RuntimeDefault, which is no profile here, are taken)"
        ))),
        (true, _) => Err(Status::invalid_argument(
            "security_context.apparmor: berth does not load AppArmor profiles yet; only \
             Unconfined is taken on a kernel with AppArmor",
        )),
    }
}

/// The largest seccomp profile berth reads.
const MAX_SECCOMP_PROFILE: u64 = 1 << 20;

/// A Localhost seccomp profile (OCI JSON) read from the node: a regular file (a FIFO there
/// would block the call), bounded in size.
fn load_seccomp(path: &str) -> Result<serde_json::Value, Status> {
    let bad = |e: String| Status::invalid_argument(format!("seccomp profile {path:?}: {e}"));
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_SECCOMP_PROFILE {
        return Err(bad(format!("larger than {MAX_SECCOMP_PROFILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    // Read as the OCI section it must be, so a wrong action or field name is this call's
    // InvalidArgument rather than the runtime's error at create.
    let section: oci_spec::runtime::LinuxSeccomp =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    serde_json::to_value(section).map_err(|e| bad(e.to_string()))
}

fn state(s: CtrState) -> i32 {
    (match s {
        CtrState::Creating | CtrState::Created => cri::ContainerState::ContainerCreated,
        CtrState::Running => cri::ContainerState::ContainerRunning,
        CtrState::Exited => cri::ContainerState::ContainerExited,
    }) as i32
}

fn map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A container's status as ContainerStatus and GetContainerEvents answer it.
pub(super) fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    let mounts = r
        .mounts
        .iter()
        .map(|(m, src)| super::mounts::cri_mount(m, src))
        .collect();
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(metadata(r)),
        state: state(r.state),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: Some(cri::ImageSpec {
            image: r.image_name.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: map(&r.spec.labels),
        annotations: map(&r.spec.annotations),
        mounts,
        log_path: r
            .log_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        resources: Some(cri_resources(&r.spec.resources)),
        image_id: r.image_id.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: r.user.uid as i64,
                gid: r.user.gid as i64,
                supplemental_groups: r.user.additional_gids.iter().map(|g| *g as i64).collect(),
            }),
        }),
        stop_signal: cri_stop_signal(&r.stop_signal),
    }
}

pub(super) fn metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.spec.name.clone(),
        attempt: r.spec.attempt,
    }
}

impl Cri {
    /// ContainerStatus's verbose `info`: the record, the user and the OCI spec (as crictl
    /// inspect shows them).
    fn verbose_info(&self, r: &ContainerRecord) -> HashMap<String, String> {
        let layout = crate::layout::Layout::new(&self.rt.config().root, &self.rt.config().state);
        let spec = std::fs::read_to_string(layout.containers().join(&r.id).join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        let v = serde_json::json!({
            "pid": r.pid,
            "sandboxID": r.pod_id,
            "runtimeSpec": spec,
            "user": r.user,
            "record": r,
        });
        HashMap::from([("info".to_string(), v.to_string())])
    }

    pub(super) async fn create_container(
        &self,
        req: cri::CreateContainerRequest,
    ) -> Result<cri::CreateContainerResponse, Status> {
        tracing::Span::current().record("pod", &req.pod_sandbox_id);
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer without a config"))?;
        let spec = container_spec(config)?;
        let id = self.rt.create_container(&req.pod_sandbox_id, spec).await?;
        tracing::Span::current().record("container", &id);
        Ok(cri::CreateContainerResponse { container_id: id })
    }

    pub(super) async fn start_container(
        &self,
        req: cri::StartContainerRequest,
    ) -> Result<cri::StartContainerResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        self.rt.containers.start(&req.container_id).await?;
        Ok(cri::StartContainerResponse {})
    }

    pub(super) async fn stop_container(
        &self,
        req: cri::StopContainerRequest,
    ) -> Result<cri::StopContainerResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        let timeout = Duration::from_secs(req.timeout.max(0) as u64);
        self.rt.containers.stop(&req.container_id, timeout).await?;
        Ok(cri::StopContainerResponse {})
    }

    pub(super) async fn remove_container(
        &self,
        req: cri::RemoveContainerRequest,
    ) -> Result<cri::RemoveContainerResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        self.rt.containers.remove(&req.container_id).await?;
        Ok(cri::RemoveContainerResponse {})
    }

    pub(super) fn list_containers(
        &self,
        req: cri::ListContainersRequest,
    ) -> Result<cri::ListContainersResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let filter = CtrFilter {
            id: Some(f.id).filter(|s| !s.is_empty()),
            pod_id: Some(f.pod_sandbox_id).filter(|s| !s.is_empty()),
            state: f
                .state
                .map(|s| match cri::ContainerState::try_from(s.state) {
                    Ok(cri::ContainerState::ContainerCreated) => CtrState::Created,
                    Ok(cri::ContainerState::ContainerRunning) => CtrState::Running,
                    Ok(cri::ContainerState::ContainerExited) => CtrState::Exited,
                    // UNKNOWN: nothing is in that state.
                    _ => CtrState::Creating,
                }),
            labels: f.label_selector.into_iter().collect(),
        };
        let mut containers: Vec<cri::Container> = self
            .rt
            .containers
            .list(&filter)
            .iter()
            .map(|r| cri::Container {
                id: r.id.clone(),
                pod_sandbox_id: r.pod_id.clone(),
                metadata: Some(metadata(r)),
                image: Some(cri::ImageSpec {
                    image: r.image_name.clone(),
                    ..Default::default()
                }),
                image_ref: r.image_id.clone(),
                state: state(r.state),
                created_at: r.created_at,
                labels: map(&r.spec.labels),
                annotations: map(&r.spec.annotations),
                image_id: r.image_id.clone(),
            })
            .collect();
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(cri::ListContainersResponse { containers })
    }

    pub(super) fn container_status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        let ctr = self.rt.containers.get(&req.container_id)?;
        let r = ctr.record();
        if r.state == CtrState::Creating {
            return Err(Status::not_found(format!(
                "container {} is still being created",
                r.id
            )));
        }
        let info = if req.verbose {
            self.verbose_info(&r)
        } else {
            HashMap::new()
        };
        Ok(cri::ContainerStatusResponse {
            status: Some(container_status(&r)),
            info,
        })
    }

    pub(super) async fn update_container_resources(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<cri::UpdateContainerResourcesResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        let linux = req.linux.ok_or_else(|| {
            Status::invalid_argument(
                "UpdateContainerResources has no linux resources (only Linux containers run here)",
            )
        })?;
        self.rt
            .containers
            .update_resources(&req.container_id, resources(linux))
            .await?;
        Ok(cri::UpdateContainerResourcesResponse {})
    }

    pub(super) async fn reopen_container_log(
        &self,
        req: cri::ReopenContainerLogRequest,
    ) -> Result<cri::ReopenContainerLogResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        self.rt.containers.reopen_log(&req.container_id).await?;
        Ok(cri::ReopenContainerLogResponse {})
    }

    pub(super) async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse, Status> {
        tracing::Span::current().record("container", &req.container_id);
        let timeout = Duration::from_secs(req.timeout.max(0) as u64);
        let out = self
            .rt
            .containers
            .exec_sync(&req.container_id, req.cmd, timeout)
            .await?;
        Ok(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }
}
