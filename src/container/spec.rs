//! The OCI runtime spec of a container, from the CRI's container config, the image config and
//! the pod. Written as JSON and read back through `oci_spec::runtime::Spec`, so what reaches the
//! runtime is a spec oci-spec accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::capabilities::{Wanted, ambient, capabilities};
use super::user::User;
use super::{ContainerSpec, MountSpec, Propagation};
use crate::cgroup::Mode as CgroupMode;
use crate::image::manifest::ImageConfig;
use crate::sandbox::{NsMode, PodRecord};

/// A spec that cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// Everything the spec is made from.
pub struct Inputs<'a> {
    /// The request.
    pub spec: &'a ContainerSpec,
    /// The image config.
    pub image: &'a ImageConfig,
    /// The pod.
    pub pod: &'a PodRecord,
    /// The pod's files (hostname, hosts, resolv.conf, shm).
    pub pod_dir: &'a Path,
    /// The pod's namespace pins.
    pub ns_dir: &'a Path,
    /// The mounted root filesystem.
    pub rootfs: &'a Path,
    /// Who the process runs as.
    pub user: &'a User,
    /// The container id (its cgroup's name).
    pub id: &'a str,
    /// v1 or v2.
    pub cgroup_mode: CgroupMode,
    /// The spec's cgroupsPath (a path, or `slice:prefix:name` with the systemd driver).
    pub cgroups_path: String,
    /// berth sets the cpuset itself after create (`Containers::cpuset_by_berth`): the spec
    /// leaves it out.
    pub cpuset_by_berth: bool,
    /// On a v1 host, what the container sees at /sys/fs/cgroup (in place of a `cgroup`
    /// mount; see `cgroup_view`).
    pub cgroup_view: Option<Vec<super::cgroup_view::ViewMount>>,
    /// The pid of a TARGET container's init, when the PID namespace is TARGET.
    pub target_pid: Option<i32>,
    /// Capabilities the daemon may hand out.
    pub allowed_caps: &'a [&'a str],
}

/// The process's argv: CRI command replaces ENTRYPOINT, CRI args replace CMD.
pub fn argv(spec: &ContainerSpec, image: &ImageConfig) -> Result<Vec<String>, SpecError> {
    let rc = image.config.clone().unwrap_or_default();
    let mut argv = if !spec.command.is_empty() {
        let mut v = spec.command.clone();
        v.extend(spec.args.iter().cloned());
        v
    } else {
        let mut v = rc.entrypoint.unwrap_or_default();
        if spec.args.is_empty() {
            v.extend(rc.cmd.unwrap_or_default());
        } else {
            v.extend(spec.args.iter().cloned());
        }
        v
    };
    argv.retain(|_| true);
    if argv.is_empty() {
        return Err(SpecError(
            "no command: neither the request nor the image gives one".into(),
        ));
    }
    Ok(argv)
}

/// The environment: the image's, overridden by the request's, with PATH and HOME defaulted.
pub fn environment(spec: &ContainerSpec, image: &ImageConfig, user: &User) -> Vec<String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(key, _)| key == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    for kv in image
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
    {
        let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
        set(k, v);
    }
    for (k, v) in &spec.envs {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), user.home.clone()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The working directory: the request's, the image's, or /.
pub fn working_dir(spec: &ContainerSpec, image: &ImageConfig) -> String {
    if !spec.working_dir.is_empty() {
        return spec.working_dir.clone();
    }
    match image.config.as_ref().map(|c| c.working_dir.as_str()) {
        Some(w) if !w.is_empty() => w.to_string(),
        _ => "/".into(),
    }
}

fn bind(dest: &str, src: &Path, ro: bool, extra: &[&str]) -> Value {
    let mut opts = vec!["rbind", "rprivate"];
    opts.extend_from_slice(extra);
    if ro {
        opts.push("ro");
    }
    json!({"destination": dest, "type": "bind", "source": src, "options": opts})
}

fn user_mount(m: &MountSpec, resolved_source: &Path) -> Value {
    let prop = match m.propagation {
        Propagation::Private => "rprivate",
        Propagation::HostToContainer => "rslave",
        Propagation::Bidirectional => "rshared",
    };
    let mut opts = vec!["rbind", prop];
    if m.readonly {
        opts.push(if m.recursive_read_only { "rro" } else { "ro" });
    }
    opts.extend(m.options.iter().map(String::as_str));
    json!({"destination": m.container_path, "type": "bind", "source": resolved_source, "options": opts})
}

/// Builds the spec. `mounts` are the request's mounts with their sources resolved.
pub fn build(
    i: &Inputs<'_>,
    mounts: &[(MountSpec, PathBuf)],
) -> Result<oci_spec::runtime::Spec, SpecError> {
    let s = i.spec;
    let sec = &s.security;
    let (devices, device_rules) = devices(s)?;
    let mut resources = resources(&s.resources, i.cgroup_mode, i.cpuset_by_berth);
    resources["devices"] = Value::Array(device_rules);
    let (masked, readonly) = if sec.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            sec.masked_paths
                .clone()
                .unwrap_or_else(oci_spec::runtime::get_default_maskedpaths),
            sec.readonly_paths
                .clone()
                .unwrap_or_else(oci_spec::runtime::get_default_readonly_paths),
        )
    };
    let mut linux = json!({
        "namespaces": namespaces(i)?,
        "cgroupsPath": i.cgroups_path,
        "resources": resources,
        "maskedPaths": masked,
        "readonlyPaths": readonly,
        "devices": devices,
    });
    // A Bidirectional volume is a peer of its host mount only if the container's mount
    // namespace stays shared: libcontainer would make every mount a slave of the host's.
    if mounts
        .iter()
        .any(|(m, _)| m.propagation == Propagation::Bidirectional)
    {
        linux["rootfsPropagation"] = json!("shared");
    }
    let wanted = Wanted {
        privileged: sec.privileged,
        add: &sec.add_caps,
        drop: &sec.drop_caps,
        ambient: &sec.ambient_caps,
    };
    let caps = capabilities(wanted, i.allowed_caps);
    let ambient = ambient(wanted, i.allowed_caps);
    // A privileged container runs without a filter, whatever profile it names, as on other
    // runtimes (kubelet and the validation suite rely on it).
    if !sec.privileged {
        if let Some(seccomp) = &sec.seccomp {
            linux["seccomp"] = seccomp.clone();
        } else if sec.seccomp_runtime_default {
            linux["seccomp"] = super::seccomp::runtime_default(&caps);
        }
    }
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process(i, &caps, &ambient)?,
        "root": {"path": i.rootfs, "readonly": sec.readonly_rootfs},
        "mounts": all_mounts(i, mounts),
        "annotations": annotations(i),
        "linux": linux,
    });
    serde_json::from_value(spec)
        .map_err(|e| SpecError(format!("the generated OCI spec is invalid: {e}")))
}

/// The process: argv, environment, identity, working directory, capabilities.
fn process(i: &Inputs<'_>, caps: &[String], ambient: &[String]) -> Result<Value, SpecError> {
    let s = i.spec;
    let sec = &s.security;
    let mut process = json!({
        "terminal": s.tty,
        "user": {"uid": i.user.uid, "gid": i.user.gid, "additionalGids": i.user.additional_gids},
        "args": argv(s, i.image)?,
        "env": environment(s, i.image, i.user),
        "cwd": working_dir(s, i.image),
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                         "inheritable": ambient, "ambient": ambient},
    });
    // Only when true: libcontainer takes a present `false` for "set" and then loads the
    // seccomp filter after dropping CAP_SYS_ADMIN, which the kernel refuses without
    // no_new_privs (EACCES, reported by libseccomp as ECANCELED).
    if sec.no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    if !sec.apparmor_profile.is_empty() && sec.apparmor_profile != "unconfined" {
        process["apparmorProfile"] = json!(sec.apparmor_profile);
    }
    Ok(process)
}

/// The pod's pinned namespaces joined, a mount namespace (and on v2 a cgroup one) of its own.
fn namespaces(i: &Inputs<'_>) -> Result<Vec<Value>, SpecError> {
    let pod_ns = &i.pod.spec.namespaces;
    let mut namespaces = vec![json!({"type": "mount"})];
    // Joined first by the runtime, so the mount and PID namespaces it makes are the user
    // namespace's (proc and sysfs can be mounted in them).
    if pod_ns.user.is_some() {
        namespaces.push(json!({"type": "user", "path": i.ns_dir.join("user")}));
    }
    if pod_ns.network != NsMode::Node {
        namespaces.push(json!({"type": "network", "path": i.ns_dir.join("net")}));
        namespaces.push(json!({"type": "uts", "path": i.ns_dir.join("uts")}));
    }
    if pod_ns.ipc != NsMode::Node {
        namespaces.push(json!({"type": "ipc", "path": i.ns_dir.join("ipc")}));
    }
    match i.spec.security.pid_mode.unwrap_or(pod_ns.pid) {
        NsMode::Pod if i.ns_dir.join("pid").exists() => {
            namespaces.push(json!({"type": "pid", "path": i.ns_dir.join("pid")}))
        }
        NsMode::Pod | NsMode::Container => namespaces.push(json!({"type": "pid"})),
        NsMode::Node => {}
        NsMode::Target => {
            let pid = i.target_pid.ok_or_else(|| {
                SpecError("the target container of the PID namespace is not running".into())
            })?;
            namespaces.push(json!({"type": "pid", "path": format!("/proc/{pid}/ns/pid")}));
        }
    }
    if i.cgroup_mode == CgroupMode::Unified {
        namespaces.push(json!({"type": "cgroup"}));
    }
    Ok(namespaces)
}

/// Mounts: runtime defaults, the pod's files, then the request's (which win on a clash).
fn all_mounts(i: &Inputs<'_>, mounts: &[(MountSpec, PathBuf)]) -> Vec<Value> {
    let sec = &i.spec.security;
    let user_dests: Vec<&str> = mounts
        .iter()
        .map(|(m, _)| m.container_path.as_str())
        .collect();
    let mut out: Vec<Value> = Vec::new();
    for m in oci_spec::runtime::get_default_mounts() {
        if m.destination() == Path::new("/dev/shm") {
            continue;
        }
        if m.destination() == Path::new("/sys/fs/cgroup")
            && let Some(view) = &i.cgroup_view
        {
            out.extend(super::cgroup_view::mounts(view, sec.privileged));
            continue;
        }
        out.push(serde_json::to_value(m).expect("mounts serialize"));
    }
    if sec.privileged {
        // A privileged container sees /sys read-write, as other runtimes do.
        for m in &mut out {
            if (m["destination"] == "/sys" || m["destination"] == "/sys/fs/cgroup")
                && let Some(opts) = m["options"].as_array_mut()
            {
                opts.retain(|o| o != "ro");
            }
        }
    }
    let shm_src = if i.pod.spec.namespaces.ipc == NsMode::Node {
        PathBuf::from("/dev/shm")
    } else {
        i.pod_dir.join("shm")
    };
    let ro = sec.readonly_rootfs;
    let first_own = out.len();
    for (dest, src, ro) in [
        ("/etc/hostname", i.pod_dir.join("hostname"), ro),
        ("/etc/hosts", i.pod_dir.join("hosts"), ro),
        ("/etc/resolv.conf", i.pod_dir.join("resolv.conf"), ro),
        ("/dev/shm", shm_src, false),
    ] {
        if !user_dests.contains(&dest) {
            let extra: &[&str] = if dest == "/dev/shm" {
                &["nosuid", "nodev", "noexec"]
            } else {
                &[]
            };
            out.push(bind(dest, &src, ro, extra));
        }
    }
    for (m, src) in mounts {
        out.push(user_mount(m, src));
    }
    // The pod's files and the request's mounts land where the image's links lead, named
    // without links (see `rootfs::resolve_in_root`); the runtime's own mounts stay as they are.
    // Under /dev, /proc and /sys the runtime's own file systems are what a path meets, not the
    // image's.
    let runtime_made = |d: &str| {
        ["/dev", "/proc", "/sys"]
            .iter()
            .any(|t| Path::new(d).starts_with(t))
    };
    for m in out.iter_mut().skip(first_own) {
        if let Some(dest) = m["destination"].as_str()
            && !runtime_made(dest)
            && let Some(real) = super::rootfs::resolve_in_root(i.rootfs, dest)
            && real != dest
        {
            m["destination"] = json!(real);
        }
    }
    out
}

/// The cgroup limits (devices apart).
fn resources(r: &super::Resources, mode: CgroupMode, cpuset_by_berth: bool) -> Value {
    let mut resources = json!({});
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() && !cpuset_by_berth {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() && !cpuset_by_berth {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if r.memory_limit > 0 {
        resources["memory"] = json!({"limit": r.memory_limit});
        if r.memory_swap_limit > 0 {
            resources["memory"]["swap"] = json!(r.memory_swap_limit);
        }
    }
    if !r.hugepage_limits.is_empty() {
        resources["hugepageLimits"] = Value::Array(
            r.hugepage_limits
                .iter()
                .map(|(size, limit)| json!({"pageSize": size, "limit": limit}))
                .collect(),
        );
    }
    if mode == CgroupMode::Unified && !r.unified.is_empty() {
        resources["unified"] = json!(r.unified);
    }
    resources
}

/// The request's devices (nodes to make) and the device cgroup rules: deny all, the standard
/// nodes every container gets, the request's; a privileged container gets every device.
pub(super) fn devices(s: &ContainerSpec) -> Result<(Vec<Value>, Vec<Value>), SpecError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut devices = Vec::new();
    let mut rules = vec![json!({"allow": s.security.privileged, "access": "rwm"})];
    for d in &s.devices {
        let meta = std::fs::metadata(&d.host_path)
            .map_err(|e| SpecError(format!("device {}: {e}", d.host_path)))?;
        let kind = if meta.file_type().is_char_device() {
            "c"
        } else if meta.file_type().is_block_device() {
            "b"
        } else {
            return Err(SpecError(format!(
                "device {} is not a device node",
                d.host_path
            )));
        };
        let (major, minor) = (
            rustix::fs::major(meta.rdev()),
            rustix::fs::minor(meta.rdev()),
        );
        devices.push(json!({
            "path": d.container_path, "type": kind, "major": major, "minor": minor,
            "fileMode": meta.mode() & 0o7777, "uid": 0, "gid": 0,
        }));
        let access = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        rules.push(
            json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": access}),
        );
    }
    // The devices every container gets (the runtime creates the nodes; these rules allow them).
    for (kind, major, minor) in [
        ("c", 1, 3),
        ("c", 1, 5),
        ("c", 1, 7),
        ("c", 1, 8),
        ("c", 1, 9),
        ("c", 5, 0),
        ("c", 5, 1),
        ("c", 5, 2),
        ("c", 136, -1),
    ] {
        let mut rule = json!({"allow": true, "type": kind, "major": major, "access": "rwm"});
        if minor >= 0 {
            rule["minor"] = json!(minor);
        }
        rules.push(rule);
    }
    Ok((devices, rules))
}

/// The request's annotations and the CRI's own (which the request cannot override).
fn annotations(i: &Inputs<'_>) -> BTreeMap<String, String> {
    i.spec
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([
            (
                "io.kubernetes.cri.container-type".to_string(),
                "container".to_string(),
            ),
            ("io.kubernetes.cri.sandbox-id".to_string(), i.pod.id.clone()),
            (
                "io.kubernetes.cri.container-name".to_string(),
                i.spec.name.clone(),
            ),
        ])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_replaces_entrypoint_and_args_replace_cmd() {
        let image: ImageConfig = serde_json::from_value(json!({
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Entrypoint": ["/ep"], "Cmd": ["a", "b"]},
        }))
        .unwrap();
        let mut s = ContainerSpec::default();
        assert_eq!(argv(&s, &image).unwrap(), ["/ep", "a", "b"]);
        s.args = vec!["x".into()];
        assert_eq!(argv(&s, &image).unwrap(), ["/ep", "x"]);
        s.command = vec!["/bin/sh".into()];
        assert_eq!(argv(&s, &image).unwrap(), ["/bin/sh", "x"]);
        let none: ImageConfig =
            serde_json::from_value(json!({"rootfs": {"type": "layers", "diff_ids": []}})).unwrap();
        assert!(argv(&ContainerSpec::default(), &none).is_err());
    }

    #[test]
    fn request_env_overrides_image_env() {
        let image: ImageConfig = serde_json::from_value(json!({
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Env": ["PATH=/bin", "A=1", "B=2"]},
        }))
        .unwrap();
        let s = ContainerSpec {
            envs: vec![("B".into(), "3".into()), ("C".into(), "4".into())],
            ..Default::default()
        };
        let u = User {
            home: "/root".into(),
            ..Default::default()
        };
        assert_eq!(
            environment(&s, &image, &u),
            ["PATH=/bin", "A=1", "B=3", "C=4", "HOME=/root"]
        );
    }
}
