//! ContainerStats: cpu, memory and writable-layer figures of a container, read from its
//! cgroup files (v1 cpuacct/memory, or v2 cpu.stat/memory.*) and its writable layer. The layer
//! is measured at most every `LAYER_REFRESH` (a walk of its tree), the cpu rate is the change
//! since this container's previous sample.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{ContainerRecord, Containers, CtrState};
use crate::cgroup::{Cgroups, Mode};

/// How long a writable layer's measurement is reused.
const LAYER_REFRESH: Duration = Duration::from_secs(10);

/// One container's figures.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The container.
    pub record: ContainerRecord,
    /// When they were read, ns since the epoch.
    pub timestamp: i64,
    /// cpu time used, ns.
    pub cpu_usage_ns: Option<u64>,
    /// cpu use since the previous sample, in nano-cores.
    pub cpu_nano_cores: Option<u64>,
    /// cpu time in user and in kernel mode, ns.
    pub cpu_user_system_ns: Option<(u64, u64)>,
    /// Memory: usage, working set (usage − inactive file), rss, page faults, major faults,
    /// and what is left below the limit.
    pub memory: Option<Memory>,
    /// The writable layer's directory, bytes and inodes.
    pub layer: Option<(PathBuf, u64, u64)>,
    /// Processes in the container's cgroup.
    pub processes: Option<u64>,
}

/// Memory figures.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Usage, bytes.
    pub usage: u64,
    /// Working set, bytes.
    pub working_set: u64,
    /// RSS (anonymous memory), bytes.
    pub rss: u64,
    /// Page faults.
    pub page_faults: u64,
    /// Major page faults.
    pub major_page_faults: u64,
    /// Limit − working set, when there is a limit.
    pub available: Option<u64>,
    /// Page cache, bytes.
    pub cache: u64,
    /// Swap in use, bytes, where the cgroup reports it.
    pub swap: Option<u64>,
    /// Processes the kernel's OOM killer ended in this cgroup, where it reports them.
    pub oom_kills: Option<u64>,
}

/// One interface's counters, from /proc/PID/net/dev.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    /// Its name in the pod's network namespace.
    pub name: String,
    /// Bytes, packets, errors and drops received.
    pub rx: Counters,
    /// Bytes, packets, errors and drops sent.
    pub tx: Counters,
}

/// One direction's counters of an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
    /// Errors.
    pub errors: u64,
    /// Packets dropped.
    pub dropped: u64,
}

/// A pod's figures: its cgroup's cpu and memory, its interfaces, its processes, its
/// containers'.
#[derive(Debug, Clone)]
pub struct PodStats {
    /// The pod.
    pub record: crate::sandbox::PodRecord,
    /// When they were read, ns since the epoch.
    pub timestamp: i64,
    /// cpu time used by the pod's cgroup, ns.
    pub cpu_usage_ns: Option<u64>,
    /// cpu use since the previous sample, in nano-cores.
    pub cpu_nano_cores: Option<u64>,
    /// The pod cgroup's memory.
    pub memory: Option<Memory>,
    /// Interfaces of the pod's network namespace but loopback. None for a pod on the node's
    /// network.
    pub interfaces: Option<Vec<Interface>>,
    /// Processes in the pod's cgroup.
    pub processes: Option<u64>,
    /// Its containers'.
    pub containers: Vec<Stats>,
}

impl Containers {
    /// Figures of the ready pods among `pods` (a pod gone meanwhile is left out).
    pub fn pod_stats(&self, pods: Vec<crate::sandbox::PodRecord>) -> Vec<PodStats> {
        let cg = &self.pods.cgroups;
        let mut out = Vec::new();
        for p in pods {
            if p.state != crate::sandbox::PodState::Ready {
                continue;
            }
            let cpu = cpu_usage_ns(cg, &p.cgroup);
            let memory = memory(cg, &p.cgroup);
            if cpu.is_none() && memory.is_none() {
                continue;
            }
            let nano_cores = cpu.and_then(|u| self.rate(&format!("pod/{}", p.id), u));
            let processes = cg
                .procs_file(&p.cgroup)
                .and_then(|f| f.parent().map(count_processes));
            let ctrs = self.list(&super::CtrFilter {
                pod_id: Some(p.id.clone()),
                ..Default::default()
            });
            // Read through any process in the pod's network namespace: its init (when the pod
            // has one) or a running container's.
            let interfaces = p.net.as_ref().and_then(|_| {
                let running = ctrs
                    .iter()
                    .filter(|c| c.state == CtrState::Running && c.pid > 0)
                    .map(|c| c.pid);
                p.init
                    .map(|(pid, _)| pid)
                    .into_iter()
                    .chain(running)
                    .find_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok())
                    .map(|t| net_dev(&t))
            });
            out.push(PodStats {
                timestamp: super::now_ns(),
                cpu_usage_ns: cpu,
                cpu_nano_cores: nano_cores,
                memory,
                interfaces,
                processes,
                containers: self.stats(ctrs),
                record: p,
            });
        }
        out
    }

    /// The rate of `key`'s cpu time since its previous sample, in nano-cores.
    fn rate(&self, key: &str, usage: u64) -> Option<u64> {
        let now = Instant::now();
        let mut samples = self.samples.lock().expect("stats samples poisoned");
        let (t, p) = samples.cpu.insert(key.to_string(), (now, usage))?;
        let dt = now.duration_since(t).as_nanos() as u64;
        (dt > 0 && usage >= p).then(|| (usage - p) * 1_000_000_000 / dt)
    }

    /// Figures of the containers `records` (created or running; others are left out, as are
    /// containers whose cgroup is already gone: a list never fails as a whole).
    pub fn stats(&self, records: Vec<ContainerRecord>) -> Vec<Stats> {
        let cg = &self.pods.cgroups;
        let mut out = Vec::new();
        for rec in records {
            if !matches!(rec.state, CtrState::Created | CtrState::Running) {
                continue;
            }
            let Ok(pod) = self.pods.get(&rec.pod_id) else {
                continue;
            };
            let rel = pod.record().cgroup.join(&rec.id);
            let now = Instant::now();
            let cpu = cpu_usage_ns(cg, &rel);
            let memory = memory(cg, &rel);
            if cpu.is_none() && memory.is_none() {
                continue; // gone meanwhile
            }
            let cpu_user_system_ns = cpu_user_system_ns(cg, &rel);
            let processes = cg
                .procs_file(&rel)
                .and_then(|f| f.parent().map(count_processes));
            let nano_cores = cpu.and_then(|u| self.rate(&rec.id, u));
            let mut samples = self.samples.lock().expect("stats samples poisoned");
            let dir = self.layout.layers().join(&rec.id).join("upper");
            let layer = match samples.layers.get(&rec.id) {
                Some((t, b, i)) if now.duration_since(*t) < LAYER_REFRESH => Some((*b, *i)),
                _ => {
                    let (b, i) = crate::fsutil::disk_usage(&dir);
                    samples.layers.insert(rec.id.clone(), (now, b, i));
                    Some((b, i))
                }
            };
            drop(samples);
            out.push(Stats {
                timestamp: super::now_ns(),
                cpu_usage_ns: cpu,
                cpu_nano_cores: nano_cores,
                cpu_user_system_ns,
                memory,
                layer: layer.map(|(b, i)| (dir.clone(), b, i)),
                processes,
                record: rec,
            });
        }
        out
    }

    /// Forgets the samples of a removed container, and of pods that are gone (a pod's last
    /// container removal comes at or before the pod's own).
    pub(super) fn forget_stats(&self, id: &str) {
        let mut s = self.samples.lock().expect("stats samples poisoned");
        s.cpu.remove(id);
        s.layers.remove(id);
        s.cpu.retain(|k, _| {
            k.strip_prefix("pod/")
                .is_none_or(|pod| self.pods.get(pod).is_ok())
        });
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `key value` lines of a stat file.
fn stat_file(p: &Path) -> Option<HashMap<String, u64>> {
    let text = std::fs::read_to_string(p).ok()?;
    Some(parse_stat(&text))
}

fn parse_stat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn cpu_usage_ns(cg: &Cgroups, rel: &Path) -> Option<u64> {
    match cg.mode {
        Mode::Legacy => read_u64(&cg.dir_of("cpuacct", rel)?.join("cpuacct.usage")),
        Mode::Unified => stat_file(&cg.dir_of("cpu", rel)?.join("cpu.stat"))?
            .get("usage_usec")
            .map(|u| u * 1000),
    }
}

/// cpu time in user and kernel mode (v1 `cpuacct.usage_user`/`usage_sys`, v2 `cpu.stat`).
fn cpu_user_system_ns(cg: &Cgroups, rel: &Path) -> Option<(u64, u64)> {
    match cg.mode {
        Mode::Legacy => {
            let d = cg.dir_of("cpuacct", rel)?;
            Some((
                read_u64(&d.join("cpuacct.usage_user"))?,
                read_u64(&d.join("cpuacct.usage_sys"))?,
            ))
        }
        Mode::Unified => {
            let st = stat_file(&cg.dir_of("cpu", rel)?.join("cpu.stat"))?;
            Some((st.get("user_usec")? * 1000, st.get("system_usec")? * 1000))
        }
    }
}

fn memory(cg: &Cgroups, rel: &Path) -> Option<Memory> {
    let d = cg.dir_of("memory", rel)?;
    let (usage, limit, stat, events) = match cg.mode {
        Mode::Legacy => (
            read_u64(&d.join("memory.usage_in_bytes"))?,
            read_u64(&d.join("memory.limit_in_bytes")),
            stat_file(&d.join("memory.stat"))?,
            stat_file(&d.join("memory.oom_control")),
        ),
        Mode::Unified => (
            read_u64(&d.join("memory.current"))?,
            read_u64(&d.join("memory.max")),
            stat_file(&d.join("memory.stat"))?,
            stat_file(&d.join("memory.events")),
        ),
    };
    let mut m = memory_from(cg.mode, usage, limit, &stat);
    m.oom_kills = events.and_then(|e| e.get("oom_kill").copied());
    if cg.mode == Mode::Unified {
        m.swap = read_u64(&d.join("memory.swap.current"));
    }
    Some(m)
}

/// The figures from a cgroup's usage, limit and memory.stat (v1 `total_*` keys, v2 names).
fn memory_from(mode: Mode, usage: u64, limit: Option<u64>, stat: &HashMap<String, u64>) -> Memory {
    let get = |v1: &str, v2: &str| {
        let k = if mode == Mode::Legacy { v1 } else { v2 };
        stat.get(k).copied().unwrap_or(0)
    };
    let inactive = get("total_inactive_file", "inactive_file");
    let working_set = usage.saturating_sub(inactive);
    // v1 reports "no limit" as a huge page-rounded number.
    let limit = limit.filter(|l| *l < (1 << 62));
    Memory {
        usage,
        working_set,
        rss: get("total_rss", "anon"),
        page_faults: get("total_pgfault", "pgfault"),
        major_page_faults: get("total_pgmajfault", "pgmajfault"),
        available: limit.map(|l| l.saturating_sub(working_set)),
        cache: get("total_cache", "file"),
        // v1 has the key only with swap accounting on; v2 has its own file (read by the caller).
        swap: (mode == Mode::Legacy)
            .then(|| stat.get("total_swap").copied())
            .flatten(),
        oom_kills: None,
    }
}

/// Processes in the cgroup directory `dir` and those below it (the containers' cgroups).
fn count_processes(dir: &Path) -> u64 {
    let here = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0);
    let below: u64 = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| count_processes(&e.path()))
        .sum();
    here + below
}

/// Interfaces of a /proc/PID/net/dev text but loopback.
fn net_dev(text: &str) -> Vec<Interface> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // Receive: bytes packets errs drop …; transmit from the 9th field the same.
            let dir = |i: usize| Counters {
                bytes: f[i],
                packets: f[i + 1],
                errors: f[i + 2],
                dropped: f[i + 3],
            };
            (name != "lo" && f.len() >= 16).then(|| Interface {
                name: name.to_string(),
                rx: dir(0),
                tx: dir(8),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_from_net_dev() {
        let t = "Inter-|   Receive                            |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 5000 40 2 1 0 0 0 0 7000 50 3 4 0 0 0 0\n";
        let eth0 = Interface {
            name: "eth0".into(),
            rx: Counters {
                bytes: 5000,
                packets: 40,
                errors: 2,
                dropped: 1,
            },
            tx: Counters {
                bytes: 7000,
                packets: 50,
                errors: 3,
                dropped: 4,
            },
        };
        assert_eq!(net_dev(t), [eth0]);
    }

    #[test]
    fn working_set_and_available_from_v1_and_v2_files() {
        let v1 = parse_stat(
            "total_inactive_file 1000\ntotal_rss 3000\ntotal_pgfault 7\ntotal_pgmajfault 1\n\
             total_cache 1500\ntotal_swap 64\n",
        );
        let m = memory_from(Mode::Legacy, 5000, Some(9_223_372_036_854_771_712), &v1);
        assert_eq!(
            (m.working_set, m.rss, m.page_faults, m.available),
            (4000, 3000, 7, None)
        );
        assert_eq!((m.cache, m.swap), (1500, Some(64)));
        let v2 = parse_stat("anon 2048\ninactive_file 1024\npgfault 9\npgmajfault 2\nfile 1536\n");
        let m = memory_from(Mode::Unified, 4096, Some(8192), &v2);
        assert_eq!((m.working_set, m.rss, m.major_page_faults), (3072, 2048, 2));
        assert_eq!(m.cache, 1536);
        assert_eq!(m.available, Some(5120));
    }
}
