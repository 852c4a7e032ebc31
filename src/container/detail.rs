//! The figures only ListPodSandboxMetrics carries (cAdvisor's fuller set): cfs throttling, the
//! limits in force, memory extras, block io per device, threads, open files and sockets, and
//! the layer filesystem's size. Read from the container's cgroup files and its processes'
//! /proc entries when the metrics are asked for, not on the stats calls' path.

use std::collections::HashMap;
use std::path::Path;

use crate::cgroup::{Cgroups, Mode};

/// cfs bandwidth accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cfs {
    /// Enforcement periods that have passed.
    pub periods: u64,
    /// Periods in which the cgroup used its whole quota.
    pub throttled_periods: u64,
    /// Time spent throttled, ns.
    pub throttled_ns: u64,
}

/// The limits in force, as the cgroup files say (none where unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// cfs period, µs.
    pub cpu_period_us: Option<u64>,
    /// cfs quota, µs per period.
    pub cpu_quota_us: Option<u64>,
    /// cpu shares (cgroup v1 only: v2 holds a weight).
    pub cpu_shares: Option<u64>,
    /// Memory limit, bytes.
    pub memory: Option<u64>,
    /// Memory plus swap (v1) or swap (v2) limit, bytes.
    pub swap: Option<u64>,
    /// Most tasks.
    pub pids: Option<u64>,
}

/// One block device's io.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIo {
    /// major:minor.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// /dev name, when sysfs has it.
    pub name: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
}

/// A filesystem's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsSize {
    /// Bytes.
    pub bytes: u64,
    /// Inodes.
    pub inodes: u64,
    /// Free inodes.
    pub inodes_free: u64,
}

/// Everything below, each where this node has it.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// cfs accounting.
    pub cfs: Option<Cfs>,
    /// Limits in force.
    pub limits: Limits,
    /// Times the memory limit was hit.
    pub memory_failcnt: Option<u64>,
    /// Kernel memory, bytes.
    pub memory_kernel: Option<u64>,
    /// Mapped files, bytes.
    pub memory_mapped_file: Option<u64>,
    /// Highest memory usage seen, bytes.
    pub memory_max_usage: Option<u64>,
    /// Block io per device.
    pub io: Vec<DeviceIo>,
    /// Threads of the cgroup's processes.
    pub threads: Option<u64>,
    /// Open file descriptors of the cgroup's processes.
    pub fds: Option<u64>,
    /// Of those, sockets.
    pub sockets: Option<u64>,
    /// The writable layer's filesystem.
    pub fs: Option<FsSize>,
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn num(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.trim().parse().ok()
}

/// `key value` lines.
fn table(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// The detail of cgroup `rel`, whose writable layer (if any) is at `layer`.
pub fn read_detail(cg: &Cgroups, rel: &Path, layer: Option<&Path>) -> Detail {
    let mut d = match cg.mode {
        Mode::Legacy => v1(cg, rel),
        Mode::Unified => cg
            .dir_of("memory", rel)
            .map(|dir| v2(&dir))
            .unwrap_or_default(),
    };
    if let Some(procs) = cg.procs_file(rel) {
        let pids: Vec<i32> = read(procs.parent().unwrap_or(Path::new("/")), "cgroup.procs")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let (threads, fds, sockets) = processes(&pids);
        d.threads = Some(threads);
        d.fds = Some(fds);
        d.sockets = Some(sockets);
    }
    d.fs = layer.and_then(fs_size);
    d
}

fn v1(cg: &Cgroups, rel: &Path) -> Detail {
    let mut d = Detail::default();
    if let Some(cpu) = cg.dir_of("cpu", rel) {
        d.cfs = read(&cpu, "cpu.stat").map(|t| {
            let t = table(&t);
            Cfs {
                periods: t.get("nr_periods").copied().unwrap_or(0),
                throttled_periods: t.get("nr_throttled").copied().unwrap_or(0),
                throttled_ns: t.get("throttled_time").copied().unwrap_or(0),
            }
        });
        d.limits.cpu_period_us = num(&cpu, "cpu.cfs_period_us");
        // -1: no quota.
        d.limits.cpu_quota_us = read(&cpu, "cpu.cfs_quota_us").and_then(|v| v.trim().parse().ok());
        d.limits.cpu_shares = num(&cpu, "cpu.shares");
    }
    if let Some(mem) = cg.dir_of("memory", rel) {
        // The kernel's "no limit" is the page-rounded largest signed value.
        let limit = |f: &str| num(&mem, f).filter(|&v| v < (1 << 62));
        d.limits.memory = limit("memory.limit_in_bytes");
        d.limits.swap = limit("memory.memsw.limit_in_bytes");
        d.memory_failcnt = num(&mem, "memory.failcnt");
        d.memory_kernel = num(&mem, "memory.kmem.usage_in_bytes");
        d.memory_max_usage = num(&mem, "memory.max_usage_in_bytes");
        d.memory_mapped_file =
            read(&mem, "memory.stat").and_then(|t| table(&t).get("total_mapped_file").copied());
    }
    if let Some(pids) = cg.dir_of("pids", rel) {
        d.limits.pids = num(&pids, "pids.max");
    }
    if let Some(blkio) = cg.dir_of("blkio", rel) {
        let bytes = read(&blkio, "blkio.throttle.io_service_bytes_recursive").unwrap_or_default();
        let ops = read(&blkio, "blkio.throttle.io_serviced_recursive").unwrap_or_default();
        d.io = blkio_v1(&bytes, &ops);
    }
    d
}

fn v2(dir: &Path) -> Detail {
    let cfs = read(dir, "cpu.stat").map(|t| {
        let t = table(&t);
        Cfs {
            periods: t.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: t.get("nr_throttled").copied().unwrap_or(0),
            throttled_ns: t.get("throttled_usec").copied().unwrap_or(0) * 1000,
        }
    });
    // cpu.weight holds the shares converted by a curve the runtimes do not invert exactly;
    // the metrics report the shares the container was given instead.
    let mut limits = Limits {
        memory: num(dir, "memory.max"),
        swap: num(dir, "memory.swap.max"),
        pids: num(dir, "pids.max"),
        ..Default::default()
    };
    if let Some(max) = read(dir, "cpu.max") {
        let mut w = max.split_whitespace();
        limits.cpu_quota_us = w.next().and_then(|q| q.parse().ok());
        limits.cpu_period_us = w.next().and_then(|p| p.parse().ok());
    }
    let stat = read(dir, "memory.stat").unwrap_or_default();
    let stat = table(&stat);
    Detail {
        cfs,
        limits,
        memory_failcnt: read(dir, "memory.events").and_then(|t| table(&t).get("max").copied()),
        memory_max_usage: num(dir, "memory.peak"),
        memory_kernel: stat.get("kernel").copied(),
        memory_mapped_file: stat.get("file_mapped").copied(),
        io: read(dir, "io.stat")
            .map(|t| io_stat_v2(&t))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// The device's /dev name from sysfs ("sda"), or its numbers.
fn device_name(major: u64, minor: u64) -> String {
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(|n| format!("/dev/{n}")))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

fn dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// v1's two tables (`MAJ:MIN Read|Write|... N` lines).
fn blkio_v1(bytes: &str, ops: &str) -> Vec<DeviceIo> {
    let mut out: Vec<DeviceIo> = Vec::new();
    for (text, is_bytes) in [(bytes, true), (ops, false)] {
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [d, op, v] = f[..] else { continue };
            let (Some((major, minor)), Ok(v)) = (dev(d), v.parse::<u64>()) else {
                continue;
            };
            let i = match out
                .iter()
                .position(|x| (x.major, x.minor) == (major, minor))
            {
                Some(i) => i,
                None => {
                    out.push(DeviceIo {
                        major,
                        minor,
                        name: device_name(major, minor),
                        ..Default::default()
                    });
                    out.len() - 1
                }
            };
            let e = &mut out[i];
            match (op, is_bytes) {
                ("Read", true) => e.read_bytes = v,
                ("Write", true) => e.write_bytes = v,
                ("Read", false) => e.reads = v,
                ("Write", false) => e.writes = v,
                _ => {}
            }
        }
    }
    out
}

/// v2's `io.stat` (`MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...`).
fn io_stat_v2(text: &str) -> Vec<DeviceIo> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (major, minor) = dev(w.next()?)?;
            let mut e = DeviceIo {
                major,
                minor,
                name: device_name(major, minor),
                ..Default::default()
            };
            for kv in w {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.read_bytes = v,
                    "wbytes" => e.write_bytes = v,
                    "rios" => e.reads = v,
                    "wios" => e.writes = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

/// Threads, open descriptors and sockets of `pids` (a process gone meanwhile counts 0).
fn processes(pids: &[i32]) -> (u64, u64, u64) {
    let (mut threads, mut fds, mut sockets) = (0, 0, 0);
    for pid in pids {
        threads += std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            fds += 1;
            if std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            {
                sockets += 1;
            }
        }
    }
    (threads, fds, sockets)
}

fn fs_size(dir: &Path) -> Option<FsSize> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(FsSize {
        bytes: s.f_blocks.saturating_mul(s.f_frsize),
        inodes: s.f_files,
        inodes_free: s.f_ffree,
    })
}

impl super::Containers {
    /// The detail of container `rec`'s cgroup and processes; `layer` is its writable layer.
    pub fn detail(&self, rec: &super::ContainerRecord, layer: Option<&Path>) -> Detail {
        let Ok(pod) = self.pods.get(&rec.pod_id) else {
            return Detail::default();
        };
        let rel = self.pods.cgroups.container_cgroup(&pod.cgroup(), &rec.id);
        let mut d = read_detail(&self.pods.cgroups, &rel, layer);
        // cgroup v2 holds a weight made from the shares: report the shares given.
        if d.limits.cpu_shares.is_none() && rec.spec.resources.cpu_shares > 0 {
            d.limits.cpu_shares = Some(rec.spec.resources.cpu_shares as u64);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_io_from_v1_tables_and_v2_io_stat() {
        let v1 = blkio_v1(
            "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\nTotal 4608\n",
            "8:0 Read 3\n8:0 Write 1\nTotal 4\n",
        );
        assert_eq!(v1.len(), 1);
        assert_eq!(
            (
                v1[0].major,
                v1[0].minor,
                v1[0].read_bytes,
                v1[0].write_bytes,
                v1[0].reads,
                v1[0].writes
            ),
            (8, 0, 4096, 512, 3, 1)
        );
        let v2 = io_stat_v2("259:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(
            (
                v2[0].major,
                v2[0].read_bytes,
                v2[0].write_bytes,
                v2[0].reads,
                v2[0].writes
            ),
            (259, 10, 20, 1, 2)
        );
    }

    #[test]
    fn this_process_has_threads_and_descriptors() {
        let (threads, fds, _) = processes(&[std::process::id() as i32]);
        assert!(threads >= 1 && fds >= 3, "{threads} {fds}");
    }
}
