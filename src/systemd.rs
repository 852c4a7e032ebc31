//! The systemd cgroup driver's conversation with systemd (PID 1) over D-Bus: transient slice
//! and scope units for pods, their removal, and unit properties for resource updates. Uses
//! zbus; berth's own code here is only the few Manager methods it calls and the waits for the
//! cgroup a job makes or removes. Containers' scopes are made by the OCI runtime (libcontainer
//! or runc with its systemd cgroup flag), as runc does for containerd and CRI-O.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zbus::zvariant::{OwnedObjectPath, Value};

/// How long a start or stop job may take to show in the cgroup tree (a slow node under load).
const JOB_WAIT: Duration = Duration::from_secs(20);

/// Talking to systemd failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// No systemd (or no system bus) to talk to, or a node the driver cannot run on.
    #[error("the systemd cgroup driver needs a running systemd on a cgroup v2 node: {0}")]
    NotRunning(String),
    /// systemd answered a call with an error.
    #[error("systemd {call} {unit}: {source}")]
    Call {
        /// The Manager method.
        call: &'static str,
        /// The unit it was about.
        unit: String,
        /// systemd's answer.
        source: Box<zbus::Error>,
    },
    /// The job did not make (or remove) the unit's cgroup in time.
    #[error("systemd unit {unit}: {what} within {secs} s")]
    Timeout {
        /// The unit.
        unit: String,
        /// What was awaited.
        what: &'static str,
        /// How long berth waited.
        secs: u64,
    },
    /// A name that is no valid unit name of its kind.
    #[error("{0}")]
    BadName(String),
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_async = false,
    gen_blocking = true,
    blocking_name = "ManagerProxyBlocking"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// A connection to systemd on the system bus, made again when it broke.
#[derive(Debug)]
pub struct Systemd {
    conn: Mutex<Option<zbus::blocking::Connection>>,
    /// Per pod slice (its cgroup path), the OOM kills its `memory.events` counted when berth
    /// last looked: what tells an OOM kill of a container whose scope systemd removed.
    oom_seen: Mutex<std::collections::HashMap<PathBuf, u64>>,
    /// Where the unified hierarchy (or the v1 name=systemd one) is mounted: units' cgroups are
    /// looked for under it.
    root: PathBuf,
}

impl Systemd {
    /// Connects, and checks that systemd answers. `root` is the cgroup mount units appear in.
    pub fn connect(root: &Path) -> Result<Systemd, SystemdError> {
        if !Path::new("/run/systemd/system").is_dir() {
            return Err(SystemdError::NotRunning(
                "/run/systemd/system does not exist (systemd is not PID 1 here); use \
                 cgroup_driver = \"cgroupfs\""
                    .into(),
            ));
        }
        let s = Systemd {
            conn: Mutex::new(None),
            oom_seen: Mutex::new(Default::default()),
            root: root.to_path_buf(),
        };
        let version = s
            .call("Version", "", |m| m.version())
            .map_err(|e| SystemdError::NotRunning(e.to_string()))?;
        tracing::info!(version = %version, "systemd cgroup driver: systemd answers");
        Ok(s)
    }

    /// Runs `f` with the Manager proxy; once more on a fresh connection if the first failed
    /// for want of one (systemd or the bus restarted).
    fn call<T>(
        &self,
        call: &'static str,
        unit: &str,
        f: impl Fn(&ManagerProxyBlocking<'_>) -> zbus::Result<T>,
    ) -> Result<T, SystemdError> {
        let mut last = None;
        for _ in 0..2 {
            let mut guard = self.conn.lock().expect("systemd connection lock poisoned");
            if guard.is_none() {
                match zbus::blocking::Connection::system() {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let conn = guard.as_ref().expect("connection just made");
            let result = ManagerProxyBlocking::new(conn).and_then(|m| f(&m));
            match result {
                Ok(v) => return Ok(v),
                // An answer from systemd is final; a broken connection is tried once more.
                Err(e @ zbus::Error::MethodError(..)) => {
                    return Err(SystemdError::Call {
                        call,
                        unit: unit.to_string(),
                        source: Box::new(e),
                    });
                }
                Err(e) => {
                    *guard = None;
                    last = Some(e);
                }
            }
        }
        Err(SystemdError::Call {
            call,
            unit: unit.to_string(),
            source: Box::new(last.unwrap_or(zbus::Error::Unsupported)),
        })
    }

    /// Starts transient slice `name` (e.g. `kubepods-burstable-pod1.slice`), and waits for
    /// its cgroup. Its parents are systemd's to make.
    pub fn start_slice(&self, name: &str) -> Result<(), SystemdError> {
        let rel = expand_slice(name)?;
        let props: Vec<(&str, Value<'_>)> = vec![
            (
                "Description",
                Value::from(format!("berth pod slice {name}")),
            ),
            ("DefaultDependencies", Value::from(false)),
            ("MemoryAccounting", Value::from(true)),
            ("CPUAccounting", Value::from(true)),
            ("IOAccounting", Value::from(true)),
            ("TasksAccounting", Value::from(true)),
        ];
        self.call("StartTransientUnit", name, |m| {
            m.start_transient_unit(name, "replace", &props, &[])
        })?;
        let dir = self.root.join(rel);
        self.wait(name, "its cgroup did not appear", || dir.is_dir())
    }

    /// Starts transient scope `name` in slice `slice` holding process `pid`, and waits until
    /// the process is in the scope's cgroup.
    pub fn start_scope(&self, name: &str, slice: &str, pid: u32) -> Result<(), SystemdError> {
        check_unit_name(name, ".scope")?;
        let rel = expand_slice(slice)?.join(name);
        let props: Vec<(&str, Value<'_>)> = vec![
            ("Description", Value::from(format!("berth {name}"))),
            ("Slice", Value::from(slice)),
            ("Delegate", Value::from(true)),
            ("DefaultDependencies", Value::from(false)),
            ("PIDs", Value::from(vec![pid])),
        ];
        self.call("StartTransientUnit", name, |m| {
            m.start_transient_unit(name, "replace", &props, &[])
        })?;
        let procs = self.root.join(rel).join("cgroup.procs");
        self.wait(name, "the process did not reach its cgroup", || {
            std::fs::read_to_string(&procs)
                .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
        })
    }

    /// Stops unit `name` (its processes are killed), waits until its cgroup `dir` is gone and
    /// forgets a failed state. A unit systemd does not know is already stopped.
    pub fn stop(&self, name: &str, dir: &Path) -> Result<(), SystemdError> {
        match self.call("StopUnit", name, |m| m.stop_unit(name, "replace")) {
            Ok(_) => {}
            Err(e) if no_such_unit(&e) => {}
            Err(e) => return Err(e),
        }
        self.wait(name, "its cgroup is still there after stopping", || {
            !dir.exists()
        })?;
        match self.call("ResetFailedUnit", name, |m| m.reset_failed_unit(name)) {
            Ok(()) => Ok(()),
            Err(e) if no_such_unit(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether systemd knows unit `name` (loaded: running, or failed and not reset).
    pub fn exists(&self, name: &str) -> Result<bool, SystemdError> {
        match self.call("GetUnit", name, |m| m.get_unit(name)) {
            Ok(_) => Ok(true),
            Err(e) if no_such_unit(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether scope `name` ended by the OOM killer (its `Result` is `oom-kill`): for a
    /// container whose cgroup systemd removed as it emptied. Waits (up to 2 s) for systemd to
    /// have seen the scope stop; a scope systemd no longer knows ended without failing.
    pub fn scope_oom_killed(&self, name: &str) -> bool {
        let t0 = Instant::now();
        loop {
            let path = match self.call("GetUnit", name, |m| m.get_unit(name)) {
                Ok(p) => p,
                Err(_) => return false,
            };
            let prop = |iface: &'static str, prop: &'static str| {
                self.call("Get", name, |m| {
                    let props =
                        zbus::blocking::fdo::PropertiesProxy::builder(m.inner().connection())
                            .destination("org.freedesktop.systemd1")?
                            .path(path.clone())?
                            .build()?;
                    let v = props.get(zbus::names::InterfaceName::from_static_str(iface)?, prop)?;
                    String::try_from(v).map_err(zbus::Error::from)
                })
            };
            let state = prop("org.freedesktop.systemd1.Unit", "ActiveState").unwrap_or_default();
            if !matches!(state.as_str(), "active" | "deactivating" | "activating")
                || t0.elapsed() > Duration::from_secs(2)
            {
                return prop("org.freedesktop.systemd1.Scope", "Result")
                    .is_ok_and(|r| r == "oom-kill");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Remembers pod slice `pod`'s OOM kill count `n`, unless one is known (a container of
    /// the pod is being made).
    pub fn note_pod_oom(&self, pod: &Path, n: u64) {
        self.oom_seen
            .lock()
            .expect("oom counts poisoned")
            .entry(pod.to_path_buf())
            .or_insert(n);
    }

    /// Whether pod slice `pod`'s OOM kill count grew past what berth saw last (then noted).
    /// With none seen before, no: a kill is never claimed without a count to hold it against.
    pub fn pod_oom_grew(&self, pod: &Path, n: u64) -> bool {
        let prev = self
            .oom_seen
            .lock()
            .expect("oom counts poisoned")
            .insert(pod.to_path_buf(), n);
        prev.is_some_and(|p| n > p)
    }

    /// Sets runtime properties of unit `name` (a resource update: `MemoryMax`, `CPUWeight`…).
    pub fn set_properties(
        &self,
        name: &str,
        props: &[(&str, Value<'_>)],
    ) -> Result<(), SystemdError> {
        self.call("SetUnitProperties", name, |m| {
            m.set_unit_properties(name, true, props)
        })
    }

    fn wait(
        &self,
        unit: &str,
        what: &'static str,
        done: impl Fn() -> bool,
    ) -> Result<(), SystemdError> {
        let t0 = Instant::now();
        while !done() {
            if t0.elapsed() > JOB_WAIT {
                return Err(SystemdError::Timeout {
                    unit: unit.to_string(),
                    what,
                    secs: JOB_WAIT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn no_such_unit(e: &SystemdError) -> bool {
    match e {
        SystemdError::Call { source, .. } => matches!(&**source,
            zbus::Error::MethodError(name, _, _)
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit"),
        _ => false,
    }
}

/// Checks a unit name berth makes or is given: `[A-Za-z0-9:_.-]` (and `\` escapes), the
/// suffix of its kind, at most 255 bytes.
fn check_unit_name(name: &str, suffix: &str) -> Result<(), SystemdError> {
    let stem = name.strip_suffix(suffix).unwrap_or("");
    let ok = !stem.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'\\'));
    if ok {
        Ok(())
    } else {
        Err(SystemdError::BadName(format!(
            "{name:?} is not a systemd {} unit name",
            &suffix[1..]
        )))
    }
}

/// The cgroup path (relative to the hierarchy root) of slice `name`, as systemd nests slices
/// by the dashes of their names: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`. The root
/// slice and names with empty parts are refused.
pub fn expand_slice(name: &str) -> Result<PathBuf, SystemdError> {
    check_unit_name(name, ".slice")?;
    let stem = &name[..name.len() - ".slice".len()];
    let bad = || {
        SystemdError::BadName(format!(
            "{name:?} is not a slice a pod can go in (parts between dashes must not be empty)"
        ))
    };
    if stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(bad());
    }
    let mut out = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        out.push(format!("{prefix}{part}.slice"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Ok(out)
}

/// The device rules of an OCI spec (`linux.resources.devices`: deny all, then allows; or one
/// allow-all for a privileged container) as systemd's `DevicePolicy` and `DeviceAllow`:
/// `/dev/char/M:N` for a node, `char-<driver>` (named in `proc_devices`, the text of
/// /proc/devices) for a whole major. Rules it cannot say exactly are an error, never dropped.
pub fn device_properties(
    rules: &[serde_json::Value],
    proc_devices: &str,
) -> Result<(String, Vec<(String, String)>), String> {
    let mut allow = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let allows = r["allow"].as_bool().unwrap_or(false);
        let kind = r["type"].as_str().unwrap_or("a");
        let access = r["access"].as_str().unwrap_or("rwm").to_string();
        if kind == "a" && r["major"].is_null() && r["minor"].is_null() {
            if allows {
                // Every device: systemd's default policy, no list.
                return Ok(("auto".into(), Vec::new()));
            }
            if i == 0 {
                continue;
            }
        }
        if !allows {
            return Err(format!("device rule {r}: a deny after the first rule"));
        }
        let dir = match kind {
            "c" => "char",
            "b" => "block",
            _ => return Err(format!("device rule {r}: type {kind:?}")),
        };
        let major = r["major"]
            .as_i64()
            .ok_or_else(|| format!("device rule {r}: no major number"))?;
        let spec = match r["minor"].as_i64() {
            Some(minor) => format!("/dev/{dir}/{major}:{minor}"),
            None => {
                // /proc/devices lists "Character devices:" then "Block devices:".
                let section = if kind == "c" { "Character" } else { "Block" };
                let name = proc_devices
                    .split("\n\n")
                    .find(|s| s.trim_start().starts_with(section))
                    .and_then(|s| {
                        s.lines().find_map(|l| {
                            let (m, n) = l.trim().split_once(' ')?;
                            (m.parse::<i64>().ok()? == major).then(|| n.trim().to_string())
                        })
                    })
                    .ok_or_else(|| format!("device rule {r}: no driver of major {major}"))?;
                format!("{dir}-{name}")
            }
        };
        allow.push((spec, access));
    }
    Ok(("strict".into(), allow))
}

/// A cpuset list (`0-3,8`) as systemd's `AllowedCPUs`/`AllowedMemoryNodes` take it: a bitmask,
/// byte `i` bit `j` for number `8i + j`.
pub fn cpuset_mask(list: &str) -> Result<Vec<u8>, String> {
    let mut mask = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n < 8192)
                .ok_or_else(|| format!("cpuset {list:?}: {s:?} is not a cpu or node number"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("cpuset {list:?}: range {part:?} runs backwards"));
        }
        for n in a..=b {
            if mask.len() <= n / 8 {
                mask.resize(n / 8 + 1, 0);
            }
            mask[n / 8] |= 1 << (n % 8);
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_rules_become_a_strict_allow_list() {
        let proc_devices = "Character devices:\n  1 mem\n136 pts\n\nBlock devices:\n  8 sd\n";
        let rules = vec![
            serde_json::json!({"allow": false, "access": "rwm"}),
            serde_json::json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}),
            serde_json::json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}),
            serde_json::json!({"allow": true, "type": "b", "major": 8, "minor": 0, "access": "r"}),
        ];
        let (policy, allow) = device_properties(&rules, proc_devices).unwrap();
        assert_eq!(policy, "strict");
        let want: Vec<(String, String)> = [
            ("/dev/char/1:3", "rwm"),
            ("char-pts", "rwm"),
            ("/dev/block/8:0", "r"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(allow, want);
        let privileged = vec![serde_json::json!({"allow": true, "access": "rwm"})];
        assert_eq!(
            device_properties(&privileged, proc_devices).unwrap(),
            ("auto".to_string(), vec![])
        );
        let late_deny = vec![
            rules[0].clone(),
            serde_json::json!({"allow": false, "type": "c", "major": 1, "minor": 3}),
        ];
        assert!(device_properties(&late_deny, proc_devices).is_err());
        let unknown = vec![
            rules[0].clone(),
            serde_json::json!({"allow": true, "type": "c", "major": 250}),
        ];
        assert!(device_properties(&unknown, proc_devices).is_err());
    }

    #[test]
    fn cpusets_become_bitmasks() {
        assert_eq!(cpuset_mask("0").unwrap(), vec![1]);
        assert_eq!(cpuset_mask("0-2,9").unwrap(), vec![0b111, 0b10]);
        assert_eq!(cpuset_mask(" 1 , 3-3 ").unwrap(), vec![0b1010]);
        assert!(cpuset_mask("3-1").is_err());
        assert!(cpuset_mask("x").is_err());
        assert!(cpuset_mask("99999").is_err());
    }

    #[test]
    fn slices_nest_by_their_dashes() {
        assert_eq!(
            expand_slice("kubepods-burstable-pod1_2.slice").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice"
            )
        );
        assert_eq!(
            expand_slice("berth.slice").unwrap(),
            PathBuf::from("berth.slice")
        );
        for bad in [
            "-.slice",
            ".slice",
            "a--b.slice",
            "a-.slice",
            "-a.slice",
            "a/b.slice",
            "a.scope",
            "../x.slice",
            "kubepods",
            "a b.slice",
        ] {
            assert!(expand_slice(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scope_names_are_checked() {
        assert!(check_unit_name("berth-abc.scope", ".scope").is_ok());
        assert!(check_unit_name(".scope", ".scope").is_err());
        assert!(check_unit_name("a/b.scope", ".scope").is_err());
        assert!(check_unit_name(&format!("{}.scope", "a".repeat(250)), ".scope").is_err());
    }
}
