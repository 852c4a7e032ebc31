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
    /// Memory: usage, working set (usage − inactive file), rss, page faults, major faults,
    /// and what is left below the limit.
    pub memory: Option<Memory>,
    /// The writable layer's directory, bytes and inodes.
    pub layer: Option<(PathBuf, u64, u64)>,
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
}

impl Containers {
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
            let mut samples = self.samples.lock().expect("stats samples poisoned");
            let nano_cores = cpu.and_then(|u| {
                let prev = samples.cpu.insert(rec.id.clone(), (now, u));
                prev.and_then(|(t, p)| {
                    let dt = now.duration_since(t).as_nanos() as u64;
                    (dt > 0 && u >= p).then(|| (u - p) * 1_000_000_000 / dt)
                })
            });
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
                memory,
                layer: layer.map(|(b, i)| (dir.clone(), b, i)),
                record: rec,
            });
        }
        out
    }

    /// Forgets the samples of a removed container.
    pub(super) fn forget_stats(&self, id: &str) {
        let mut s = self.samples.lock().expect("stats samples poisoned");
        s.cpu.remove(id);
        s.layers.remove(id);
    }
}

fn dir(cg: &Cgroups, controller: &str, rel: &Path) -> Option<PathBuf> {
    cg.dir_of(controller, rel)
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
        Mode::Legacy => read_u64(&dir(cg, "cpuacct", rel)?.join("cpuacct.usage")),
        Mode::Unified => stat_file(&dir(cg, "cpu", rel)?.join("cpu.stat"))?
            .get("usage_usec")
            .map(|u| u * 1000),
    }
}

fn memory(cg: &Cgroups, rel: &Path) -> Option<Memory> {
    let d = dir(cg, "memory", rel)?;
    let (usage, limit, stat) = match cg.mode {
        Mode::Legacy => (
            read_u64(&d.join("memory.usage_in_bytes"))?,
            read_u64(&d.join("memory.limit_in_bytes")),
            stat_file(&d.join("memory.stat"))?,
        ),
        Mode::Unified => (
            read_u64(&d.join("memory.current"))?,
            read_u64(&d.join("memory.max")),
            stat_file(&d.join("memory.stat"))?,
        ),
    };
    Some(memory_from(cg.mode, usage, limit, &stat))
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_set_and_available_from_v1_and_v2_files() {
        let v1 = parse_stat(
            "total_inactive_file 1000\ntotal_rss 3000\ntotal_pgfault 7\ntotal_pgmajfault 1\n",
        );
        let m = memory_from(Mode::Legacy, 5000, Some(9_223_372_036_854_771_712), &v1);
        assert_eq!(
            (m.working_set, m.rss, m.page_faults, m.available),
            (4000, 3000, 7, None)
        );
        let v2 = parse_stat("anon 2048\ninactive_file 1024\npgfault 9\npgmajfault 2\n");
        let m = memory_from(Mode::Unified, 4096, Some(8192), &v2);
        assert_eq!((m.working_set, m.rss, m.major_page_faults), (3072, 2048, 2));
        assert_eq!(m.available, Some(5120));
    }
}
