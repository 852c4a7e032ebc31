//! The OCI runtime spec of a container, from the CRI's container config, the image config and
//! the pod. Written as JSON and read back through `oci_spec::runtime::Spec`, so what reaches the
//! runtime is a spec oci-spec accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::user::User;
use super::{ContainerSpec, MountSpec, Propagation};
use crate::cgroup::Mode as CgroupMode;
use crate::image::manifest::ImageConfig;
use crate::sandbox::{NsMode, PodRecord};

/// What runtimes grant a container by default (containerd's list).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Capability names by number (capability.h), for reading the daemon's own bounding set.
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities this daemon holds in its bounding set: a container never gets more.
pub fn own_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    CAP_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bnd & (1u64 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// This daemon's oom_score_adj: without CAP_SYS_RESOURCE a container cannot go below it.
pub fn own_oom_score_adj() -> i64 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

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

fn capabilities(spec: &ContainerSpec, allowed: &[&str]) -> Vec<String> {
    let sec = &spec.security;
    let upper = |c: &str| c.trim().trim_start_matches("CAP_").to_uppercase();
    let mut caps: Vec<String> = if sec.privileged {
        allowed.iter().map(|c| c.to_string()).collect()
    } else {
        DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
    };
    if !sec.privileged {
        for a in &sec.add_caps {
            if upper(a) == "ALL" {
                caps = allowed.iter().map(|c| c.to_string()).collect();
            } else if !caps.contains(&upper(a)) {
                caps.push(upper(a));
            }
        }
        for d in &sec.drop_caps {
            if upper(d) == "ALL" {
                caps.clear();
            } else {
                caps.retain(|c| *c != upper(d));
            }
        }
        // An explicit add after ALL was dropped still counts.
        if sec.drop_caps.iter().any(|d| upper(d) == "ALL") {
            for a in &sec.add_caps {
                if upper(a) != "ALL" && !caps.contains(&upper(a)) {
                    caps.push(upper(a));
                }
            }
        }
    }
    caps.retain(|c| allowed.contains(&c.as_str()));
    caps.into_iter().map(|c| format!("CAP_{c}")).collect()
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
    json!({"destination": m.container_path, "type": "bind", "source": resolved_source, "options": opts})
}

/// Builds the spec. `mounts` are the request's mounts with their sources resolved.
pub fn build(
    i: &Inputs<'_>,
    mounts: &[(MountSpec, PathBuf)],
) -> Result<oci_spec::runtime::Spec, SpecError> {
    let s = i.spec;
    let sec = &s.security;
    let pod_ns = &i.pod.spec.namespaces;
    let host_net = pod_ns.network == NsMode::Node;
    let host_ipc = pod_ns.ipc == NsMode::Node;
    let pid_mode = sec.pid_mode.unwrap_or(pod_ns.pid);
    let argv = argv(s, i.image)?;
    let env = environment(s, i.image, i.user);
    let caps = capabilities(s, i.allowed_caps);

    // Namespaces: the pod's pinned ones joined, a mount namespace (and on v2 a cgroup one) of
    // its own.
    let mut namespaces = vec![json!({"type": "mount"})];
    if !host_net {
        namespaces.push(json!({"type": "network", "path": i.ns_dir.join("net")}));
        namespaces.push(json!({"type": "uts", "path": i.ns_dir.join("uts")}));
    }
    if !host_ipc {
        namespaces.push(json!({"type": "ipc", "path": i.ns_dir.join("ipc")}));
    }
    match pid_mode {
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

    // Mounts: runtime defaults, the pod's files, then the request's (which win on a clash).
    let user_dests: Vec<&str> = mounts
        .iter()
        .map(|(m, _)| m.container_path.as_str())
        .collect();
    let mut mounts_json: Vec<Value> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| m.destination() != Path::new("/dev/shm"))
        .map(|m| serde_json::to_value(m).expect("mounts serialize"))
        .collect();
    if sec.privileged {
        // A privileged container sees /sys read-write, as other runtimes do.
        for m in &mut mounts_json {
            if (m["destination"] == "/sys" || m["destination"] == "/sys/fs/cgroup")
                && let Some(opts) = m["options"].as_array_mut()
            {
                opts.retain(|o| o != "ro");
            }
        }
    }
    let shm_src = if host_ipc {
        PathBuf::from("/dev/shm")
    } else {
        i.pod_dir.join("shm")
    };
    for (dest, src, ro) in [
        (
            "/etc/hostname",
            i.pod_dir.join("hostname"),
            sec.readonly_rootfs,
        ),
        ("/etc/hosts", i.pod_dir.join("hosts"), sec.readonly_rootfs),
        (
            "/etc/resolv.conf",
            i.pod_dir.join("resolv.conf"),
            sec.readonly_rootfs,
        ),
        ("/dev/shm", shm_src, false),
    ] {
        if !user_dests.contains(&dest) {
            let extra: &[&str] = if dest == "/dev/shm" {
                &["nosuid", "nodev", "noexec"]
            } else {
                &[]
            };
            mounts_json.push(bind(dest, &src, ro, extra));
        }
    }
    for (m, src) in mounts {
        mounts_json.push(user_mount(m, src));
    }

    // Resources.
    let r = &s.resources;
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
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
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
    if i.cgroup_mode == CgroupMode::Unified && !r.unified.is_empty() {
        resources["unified"] = json!(r.unified);
    }
    let mut devices = Vec::new();
    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    if sec.privileged {
        device_rules = vec![json!({"allow": true, "access": "rwm"})];
    }
    for d in &s.devices {
        let meta = std::fs::metadata(&d.host_path)
            .map_err(|e| SpecError(format!("device {}: {e}", d.host_path)))?;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
        device_rules.push(
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
        device_rules.push(rule);
    }
    resources["devices"] = Value::Array(device_rules);

    let masked = match &sec.masked_paths {
        _ if sec.privileged => Vec::new(),
        Some(p) => p.clone(),
        None => oci_spec::runtime::get_default_maskedpaths(),
    };
    let readonly = match &sec.readonly_paths {
        _ if sec.privileged => Vec::new(),
        Some(p) => p.clone(),
        None => oci_spec::runtime::get_default_readonly_paths(),
    };

    let mut process = json!({
        "terminal": s.tty,
        "user": {"uid": i.user.uid, "gid": i.user.gid, "additionalGids": i.user.additional_gids},
        "args": argv,
        "env": env,
        "cwd": working_dir(s, i.image),
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": sec.no_new_privs,
    });
    if !sec.apparmor_profile.is_empty() && sec.apparmor_profile != "unconfined" {
        process["apparmorProfile"] = json!(sec.apparmor_profile);
    }
    let annotations: BTreeMap<String, String> = s
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
                s.name.clone(),
            ),
        ])
        .collect();
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": format!("/{}/{}", i.pod.cgroup.display(), i.id),
        "resources": resources,
        "maskedPaths": masked,
        "readonlyPaths": readonly,
        "devices": devices,
    });
    if let Some(seccomp) = &sec.seccomp {
        linux["seccomp"] = seccomp.clone();
    }
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": i.rootfs, "readonly": sec.readonly_rootfs},
        "mounts": mounts_json,
        "annotations": annotations,
        "linux": linux,
    });
    serde_json::from_value(spec)
        .map_err(|e| SpecError(format!("the generated OCI spec is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ContainerSecurity;

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

    #[test]
    fn capabilities_add_drop_all_and_stay_within_the_daemons() {
        let allowed: Vec<&str> = CAP_NAMES
            .iter()
            .copied()
            .filter(|c| *c != "SYS_RESOURCE")
            .collect();
        let mut s = ContainerSpec::default();
        assert_eq!(capabilities(&s, &allowed).len(), DEFAULT_CAPS.len());
        s.security = ContainerSecurity {
            add_caps: vec!["SYS_ADMIN".into(), "SYS_RESOURCE".into()],
            drop_caps: vec!["CHOWN".into()],
            ..Default::default()
        };
        let c = capabilities(&s, &allowed);
        assert!(c.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(
            !c.contains(&"CAP_SYS_RESOURCE".to_string()),
            "the daemon does not hold it"
        );
        assert!(!c.contains(&"CAP_CHOWN".to_string()));
        s.security = ContainerSecurity {
            drop_caps: vec!["ALL".into()],
            add_caps: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        assert_eq!(capabilities(&s, &allowed), ["CAP_NET_ADMIN"]);
        s.security = ContainerSecurity {
            add_caps: vec!["ALL".into()],
            ..Default::default()
        };
        assert_eq!(capabilities(&s, &allowed).len(), allowed.len());
    }
}
