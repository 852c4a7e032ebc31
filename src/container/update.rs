//! UpdateContainerResources: new CPU, cpuset and memory limits written to a created or running
//! container's cgroup files at once (v1 controllers or the v2 hierarchy). All of it or none: each
//! file's value is read before it is written, and a write the kernel refuses (a memory limit
//! below what the container uses) puts back every value already changed.

use std::path::{Path, PathBuf};

use super::{Containers, CtrState, Resources};
use crate::cgroup::{Cgroups, Mode};
use crate::error::{Error, Result};

impl Containers {
    /// Applies `new` to container `id`'s cgroup and records it; fields left 0 (or empty) keep
    /// their current value.
    pub async fn update_resources(&self, id: &str, new: Resources) -> Result<()> {
        let ctr = self.get(id)?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        if !matches!(rec.state, CtrState::Created | CtrState::Running) {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited: its resources cannot be updated",
                rec.id
            )));
        }
        // kubelet sends the pod's hugepage limits with every update (a zero for each page size
        // the kernel knows). They are filtered as create filtered them, so limits berth does
        // not manage compare equal to what create applied; only a real change is refused.
        let mut new = new;
        new.hugepage_limits = enforceable_hugepages(
            &new.hugepage_limits,
            self.pods.cgroups.has_controller("hugetlb"),
        )?;
        if !new.hugepage_limits.is_empty()
            && new.hugepage_limits != rec.spec.resources.hugepage_limits
        {
            return Err(Error::InvalidArgument(format!(
                "container {}: hugepage limits cannot be changed after create",
                rec.id
            )));
        }
        let pod = self.pods.get(&rec.pod_id)?.record();
        let rel = self.pods.cgroups.container_cgroup(&pod.cgroup, &rec.id);
        let writes = planned_writes(&self.pods.cgroups, &rel, &new)?;
        // With systemd the scope's properties go first (systemd rewrites the unit's files
        // from them whenever it sets any), then the files; without them a daemon-reload would
        // put the old limits back.
        if let Some(sd) = self.pods.cgroups.systemd.clone() {
            let props = unit_properties(&new).map_err(Error::InvalidArgument)?;
            if !props.is_empty() {
                set_scope_properties(sd, &rec.id, props)
                    .await
                    .map_err(|e| {
                        Error::Internal(format!(
                            "container {}: systemd did not take the new limits: {e}",
                            rec.id
                        ))
                    })?;
            }
        }
        apply_all(&writes).map_err(|e| {
            Error::FailedPrecondition(format!(
                "updating the resources of container {}: {e}; nothing was changed",
                rec.id
            ))
        })?;
        let mut r = ctr.record.write().expect("container record poisoned");
        let old = &mut r.spec.resources;
        let keep = |n: i64, o: i64| if n != 0 { n } else { o };
        old.cpu_period = keep(new.cpu_period, old.cpu_period);
        old.cpu_quota = keep(new.cpu_quota, old.cpu_quota);
        old.cpu_shares = keep(new.cpu_shares, old.cpu_shares);
        old.memory_limit = keep(new.memory_limit, old.memory_limit);
        old.memory_swap_limit = keep(new.memory_swap_limit, old.memory_swap_limit);
        if !new.cpuset_cpus.is_empty() {
            old.cpuset_cpus = new.cpuset_cpus;
        }
        if !new.cpuset_mems.is_empty() {
            old.cpuset_mems = new.cpuset_mems;
        }
        old.unified.extend(new.unified);
        self.persist(&r)?;
        tracing::info!(container = %r.id, "container resources updated");
        Ok(())
    }
}

/// One cgroup file and the value it gets.
#[derive(Debug, PartialEq)]
struct Write {
    file: PathBuf,
    value: String,
}

/// The files `new` changes under `rel`, in the order they are written.
fn planned_writes(cg: &Cgroups, rel: &Path, new: &Resources) -> Result<Vec<Write>> {
    let dir = |controller: &str| -> Result<PathBuf> {
        cg.dir_of(controller, rel).ok_or_else(|| {
            Error::FailedPrecondition(format!("this node has no {controller} cgroup controller"))
        })
    };
    let mut w = Vec::new();
    let mut put = |d: PathBuf, file: &str, value: String| {
        w.push(Write {
            file: d.join(file),
            value,
        })
    };
    if new.cpu_quota < -1 || new.cpu_period < 0 || new.cpu_shares < 0 || new.memory_limit < 0 {
        return Err(Error::InvalidArgument(format!(
            "linux resources: negative values (cpu_quota {}, cpu_period {}, cpu_shares {}, \
             memory_limit_in_bytes {})",
            new.cpu_quota, new.cpu_period, new.cpu_shares, new.memory_limit
        )));
    }
    match cg.mode {
        Mode::Legacy => {
            if !new.unified.is_empty() {
                return Err(Error::InvalidArgument(
                    "linux resources: unified needs a cgroup v2 node; this one is cgroup v1".into(),
                ));
            }
            if new.cpu_shares > 0 {
                put(dir("cpu")?, "cpu.shares", new.cpu_shares.to_string());
            }
            if new.cpu_period > 0 {
                put(dir("cpu")?, "cpu.cfs_period_us", new.cpu_period.to_string());
            }
            if new.cpu_quota != 0 {
                put(dir("cpu")?, "cpu.cfs_quota_us", new.cpu_quota.to_string());
            }
            if !new.cpuset_cpus.is_empty() {
                put(dir("cpuset")?, "cpuset.cpus", new.cpuset_cpus.clone());
            }
            if !new.cpuset_mems.is_empty() {
                put(dir("cpuset")?, "cpuset.mems", new.cpuset_mems.clone());
            }
            if new.memory_limit > 0 {
                let d = dir("memory")?;
                let memsw = d.join("memory.memsw.limit_in_bytes");
                let swap = (new.memory_swap_limit > 0 && memsw.exists())
                    .then(|| new.memory_swap_limit.to_string());
                let current: i64 = read(&d.join("memory.limit_in_bytes"))
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MAX);
                // memory+swap is never below memory: raised first when memory grows.
                let grows = new.memory_limit > current;
                if let (Some(s), true) = (&swap, grows) {
                    put(d.clone(), "memory.memsw.limit_in_bytes", s.clone());
                }
                put(
                    d.clone(),
                    "memory.limit_in_bytes",
                    new.memory_limit.to_string(),
                );
                if let (Some(s), false) = (swap, grows) {
                    put(d, "memory.memsw.limit_in_bytes", s);
                }
            }
        }
        Mode::Unified => {
            let d = dir("cpu")?;
            if new.cpu_shares > 0 {
                put(
                    d.clone(),
                    "cpu.weight",
                    cpu_weight(new.cpu_shares).to_string(),
                );
            }
            if new.cpu_quota != 0 || new.cpu_period > 0 {
                let quota = if new.cpu_quota > 0 {
                    new.cpu_quota.to_string()
                } else {
                    "max".into()
                };
                let period = if new.cpu_period > 0 {
                    new.cpu_period
                } else {
                    100_000
                };
                put(d.clone(), "cpu.max", format!("{quota} {period}"));
            }
            if !new.cpuset_cpus.is_empty() {
                put(d.clone(), "cpuset.cpus", new.cpuset_cpus.clone());
            }
            if !new.cpuset_mems.is_empty() {
                put(d.clone(), "cpuset.mems", new.cpuset_mems.clone());
            }
            if new.memory_limit > 0 {
                put(d.clone(), "memory.max", new.memory_limit.to_string());
                if new.memory_swap_limit > 0 {
                    let swap = new
                        .memory_swap_limit
                        .saturating_sub(new.memory_limit)
                        .max(0);
                    put(d.clone(), "memory.swap.max", swap.to_string());
                }
            }
            for (k, v) in &new.unified {
                crate::cgroup::check_unified_key(k, Some(&d))
                    .map_err(|e| Error::InvalidArgument(format!("linux resources: {e}")))?;
                put(d.clone(), k, v.clone());
            }
        }
    }
    Ok(w)
}

/// A unit property's value: a number, a bitmask (`AllowedCPUs`), a word (`DevicePolicy`) or
/// pairs (`DeviceAllow`).
pub(super) enum Prop {
    U64(u64),
    Bytes(Vec<u8>),
    Str(String),
    Pairs(Vec<(String, String)>),
}

impl Prop {
    fn value(&self) -> zbus::zvariant::Value<'_> {
        use zbus::zvariant::Value;
        match self {
            Prop::U64(n) => Value::from(*n),
            Prop::Bytes(b) => Value::from(b.as_slice()),
            Prop::Str(s) => Value::from(s.as_str()),
            Prop::Pairs(p) => Value::from(p.clone()),
        }
    }
}

/// Sets properties of container `id`'s scope (`berth-<id>.scope`), off the async threads.
pub(super) async fn set_scope_properties(
    sd: std::sync::Arc<crate::systemd::Systemd>,
    id: &str,
    props: Vec<(&'static str, Prop)>,
) -> std::result::Result<(), String> {
    let unit = format!("{}-{id}.scope", crate::cgroup::SCOPE_PREFIX);
    tokio::task::spawn_blocking(move || {
        let props: Vec<(&str, zbus::zvariant::Value<'_>)> =
            props.iter().map(|(k, v)| (*k, v.value())).collect();
        sd.set_properties(&unit, &props).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("setting unit properties: {e}"))?
}

/// The systemd unit properties of an update: the ones systemd has for what the CRI sets,
/// `unified` keys included where systemd names them (the rest are files only).
fn unit_properties(new: &Resources) -> std::result::Result<Vec<(&'static str, Prop)>, String> {
    let mut p = cpuset_properties(new)?;
    if new.memory_limit > 0 {
        p.push(("MemoryMax", Prop::U64(new.memory_limit as u64)));
    }
    if new.cpu_shares > 0 {
        p.push(("CPUWeight", Prop::U64(cpu_weight(new.cpu_shares) as u64)));
    }
    for (k, v) in &new.unified {
        let name = match k.as_str() {
            "memory.high" => "MemoryHigh",
            "memory.low" => "MemoryLow",
            "memory.min" => "MemoryMin",
            "memory.max" => "MemoryMax",
            "memory.swap.max" => "MemorySwapMax",
            "pids.max" => "TasksMax",
            "cpu.weight" => "CPUWeight",
            _ => continue,
        };
        // "max" is systemd's infinity; a value that is no number is left to the file write.
        let n = match v.trim() {
            "max" => u64::MAX,
            v => match v.parse() {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        p.push((name, Prop::U64(n)));
    }
    if new.cpu_quota > 0 {
        let period = if new.cpu_period > 0 {
            new.cpu_period
        } else {
            100_000
        };
        // systemd takes the quota per second; it writes cpu.max with the period it is given.
        p.push((
            "CPUQuotaPerSecUSec",
            Prop::U64((new.cpu_quota as u64).saturating_mul(1_000_000) / period as u64),
        ));
        p.push(("CPUQuotaPeriodUSec", Prop::U64(period as u64)));
    }
    Ok(p)
}

/// `AllowedCPUs` / `AllowedMemoryNodes` of a cpuset (berth sets them itself: libcontainer's
/// systemd manager sends them as 64-bit words, which systemd refuses).
pub(super) fn cpuset_properties(
    r: &Resources,
) -> std::result::Result<Vec<(&'static str, Prop)>, String> {
    let mut p = Vec::new();
    if !r.cpuset_cpus.is_empty() {
        let mask = crate::systemd::cpuset_mask(&r.cpuset_cpus)?;
        p.push(("AllowedCPUs", Prop::Bytes(mask)));
    }
    if !r.cpuset_mems.is_empty() {
        let mask = crate::systemd::cpuset_mask(&r.cpuset_mems)?;
        p.push(("AllowedMemoryNodes", Prop::Bytes(mask)));
    }
    Ok(p)
}

/// The cgroup v2 weight of v1 CPU shares (2…262144 onto 1…10000), by the conversion runc 1.3+,
/// crun and libcontainer (which sets it at create) use: a curve through 2 → 1, 1024 → 100 (the
/// defaults of each) and 262144 → 10000, where the older straight line put 1024 at 39.
fn cpu_weight(shares: i64) -> i64 {
    if shares <= 2 {
        return 1;
    }
    if shares >= 262_144 {
        return 10_000;
    }
    let l = (shares as f64).log2();
    let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
    10f64.powf(exponent).ceil() as i64
}

fn read(f: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(f).map(|s| s.trim().to_string())
}

/// Writes every file; on a refusal puts the written ones back, newest first.
fn apply_all(writes: &[Write]) -> std::result::Result<(), String> {
    let mut done: Vec<(&Path, String)> = Vec::new();
    for w in writes {
        let old = read(&w.file).map_err(|e| format!("{}: {e}", w.file.display()))?;
        if let Err(e) = std::fs::write(&w.file, &w.value) {
            for (f, v) in done.iter().rev() {
                // v1 cpu.cfs_quota_us reads -1 and v2 cpu.max "max 100000": both take that back.
                if let Err(back) = std::fs::write(f, v) {
                    tracing::warn!(file = %f.display(), error = %back, "cannot put a cgroup value back");
                }
            }
            return Err(format!("{} = {}: {e}", w.file.display(), w.value));
        }
        done.push((&w.file, old));
    }
    Ok(())
}

/// The hugepage limits the runtime is given. kubelet sends one for every page size the kernel
/// knows (0 = none allowed). Without a hugetlb controller (this hybrid host has it only on
/// cgroup2, which the v1 runtime does not manage) a limit cannot be enforced: it is dropped
/// where the node has no pages of that size (there is nothing to take), and otherwise the call
/// fails, as a limit berth cannot honour must.
pub(super) fn enforceable_hugepages(
    limits: &[(String, u64)],
    controller: bool,
) -> Result<Vec<(String, u64)>> {
    if controller {
        return Ok(limits.to_vec());
    }
    for (size, limit) in limits {
        match crate::cgroup::hugepages(size) {
            None | Some(0) => {}
            Some(n) => {
                return Err(Error::FailedPrecondition(format!(
                    "hugepage limit {limit} for {size} pages cannot be enforced: this node has \
                     {n} such pages but no hugetlb cgroup controller the runtime manages"
                )));
            }
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Hierarchy;

    fn v1() -> Cgroups {
        let h = |c: &str| Hierarchy {
            mount: PathBuf::from(format!("/sys/fs/cgroup/{c}")),
            controllers: c.split(',').map(String::from).collect(),
            v2: false,
        };
        Cgroups {
            driver: crate::cgroup::Driver::Cgroupfs,
            systemd: None,
            mode: Mode::Legacy,
            hierarchies: vec![h("cpu,cpuacct"), h("cpuset"), h("memory")],
        }
    }

    #[test]
    fn only_what_is_asked_is_written_in_an_order_the_kernel_takes() {
        let r = Resources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpuset_cpus: "0".into(),
            ..Default::default()
        };
        let w = planned_writes(&v1(), Path::new("pod/c"), &r).unwrap();
        let files: Vec<String> = w.iter().map(|w| w.file.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/cpu,cpuacct/pod/c/cpu.cfs_period_us",
                "/sys/fs/cgroup/cpu,cpuacct/pod/c/cpu.cfs_quota_us",
                "/sys/fs/cgroup/cpuset/pod/c/cpuset.cpus",
            ]
        );
        let bad = Resources {
            cpu_quota: -5,
            ..Default::default()
        };
        assert!(planned_writes(&v1(), Path::new("pod/c"), &bad).is_err());
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(512), 59);
        assert_eq!(cpu_weight(1024), 100);
        assert_eq!(cpu_weight(2048), 174);
        assert_eq!(cpu_weight(262_144), 10_000);
    }
}
