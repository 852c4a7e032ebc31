//! ContainerStats: cpu, memory and writable-layer figures of a container, read from its
//! cgroup files (v1 cpuacct/memory, or v2 cpu.stat/memory.*) and its writable layer. The layer
//! is measured at most every `LAYER_REFRESH` (a walk of its tree), the cpu rate is the change
//! since this container's previous sample.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fd::OwnedFd;
use rustix::fs::{Mode as FileMode, OFlags};

use super::{ContainerRecord, Containers, CtrState};
use crate::cgroup::pressure::{self, Pressure};
use crate::cgroup::{Cgroups, Mode};

/// At most this many threads read one list's figures.
const PARALLEL_READERS: usize = 4;

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
    /// cpu, memory and io pressure (cgroup v2 only).
    pub pressure: Pressures,
}

/// A cgroup's pressure files, each where the node has it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pressures {
    /// `cpu.pressure`.
    pub cpu: Option<Pressure>,
    /// `memory.pressure`.
    pub memory: Option<Pressure>,
    /// `io.pressure`.
    pub io: Option<Pressure>,
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
    /// The pod cgroup's pressure (cgroup v2 only).
    pub pressure: Pressures,
    /// Its containers'.
    pub containers: Vec<Stats>,
}

impl Containers {
    /// Figures of the ready pods among `pods` (a pod gone meanwhile is left out).
    pub fn pod_stats(&self, pods: Vec<crate::sandbox::PodRecord>) -> Vec<PodStats> {
        in_parallel(pods, |p| self.one_pod(p))
    }

    fn one_pod(&self, p: crate::sandbox::PodRecord) -> Option<PodStats> {
        if p.state != crate::sandbox::PodState::Ready {
            return None;
        }
        let Figures {
            cpu,
            memory,
            processes,
            pressure,
            ..
        } = figures(&self.pods.cgroups, &p.cgroup);
        if cpu.is_none() && memory.is_none() {
            return None; // gone meanwhile
        }
        let nano_cores = cpu.and_then(|u| self.rate(&format!("pod/{}", p.id), u));
        let ctrs = self.list(&super::CtrFilter {
            pod_id: Some(p.id.clone()),
            ..Default::default()
        });
        // Read through any process in the pod's network namespace: its init (when the pod
        // has one) or a running container's.
        // A network of its own, made by berth's bridge or by the CNI plugins.
        let own_network = p.net.is_some() || p.cni.is_some();
        let interfaces = own_network.then_some(()).and_then(|_| {
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
        Some(PodStats {
            timestamp: super::now_ns(),
            cpu_usage_ns: cpu,
            cpu_nano_cores: nano_cores,
            memory,
            interfaces,
            processes,
            pressure,
            containers: ctrs.into_iter().filter_map(|c| self.one(c)).collect(),
            record: p,
        })
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
        in_parallel(records, |r| self.one(r))
    }

    fn one(&self, rec: ContainerRecord) -> Option<Stats> {
        if !matches!(rec.state, CtrState::Created | CtrState::Running) {
            return None;
        }
        let pod = self.pods.get(&rec.pod_id).ok()?.cgroup();
        let rel = self.pods.cgroups.container_cgroup(&pod, &rec.id);
        let Figures {
            cpu,
            cpu_user_system_ns,
            memory,
            processes,
            pressure,
        } = figures(&self.pods.cgroups, &rel);
        if cpu.is_none() && memory.is_none() {
            return None; // gone meanwhile
        }
        let nano_cores = cpu.and_then(|u| self.rate(&rec.id, u));
        let dir = self.layout.layers().join(&rec.id).join("upper");
        let now = Instant::now();
        let cached = self
            .samples
            .lock()
            .expect("stats samples poisoned")
            .layers
            .get(&rec.id)
            .copied();
        let (bytes, inodes) = match cached {
            Some((t, b, i)) if now.duration_since(t) < LAYER_REFRESH => (b, i),
            // Walked without the lock: other containers' figures need it meanwhile.
            _ => {
                let (b, i) = crate::fsutil::disk_usage(&dir);
                let mut samples = self.samples.lock().expect("stats samples poisoned");
                samples.layers.insert(rec.id.clone(), (now, b, i));
                (b, i)
            }
        };
        Some(Stats {
            timestamp: super::now_ns(),
            cpu_usage_ns: cpu,
            cpu_nano_cores: nano_cores,
            cpu_user_system_ns,
            memory,
            layer: Some((dir, bytes, inodes)),
            processes,
            pressure,
            record: rec,
        })
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

/// `f` of each item, in order, on up to `PARALLEL_READERS` threads when there are many: the
/// figures are kernel file reads (cpu-bound in the kernel), and kubelet waits for the whole
/// list, so two cores halve its wait.
fn in_parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> Option<R> + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(PARALLEL_READERS)
        .min(items.len() / 8)
        .max(1);
    if threads == 1 {
        return items.into_iter().filter_map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut rest = chunks.into_iter();
        let first = rest.next().unwrap_or_default();
        let others: Vec<_> = rest
            .map(|c| scope.spawn(move || c.into_iter().filter_map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.into_iter().filter_map(f).collect();
        for h in others {
            // A panic in a reader is a bug; surface it here as it would be without threads.
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        out
    })
}

/// A cgroup directory opened once; its files are then opened by name, so each open walks one
/// path component instead of all of /sys/fs/cgroup/<ctrl>/<parent>/<pod>/<ctr>/<file>: those
/// walks were a fifth of a 100-container ListContainerStats (perf, kernel 6.18).
struct CgDir(OwnedFd);

impl CgDir {
    fn at(p: &Path) -> Option<CgDir> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(p, flags, FileMode::empty())
            .ok()
            .map(CgDir)
    }

    fn of(cg: &Cgroups, controller: &str, rel: &Path) -> Option<CgDir> {
        CgDir::at(&cg.dir_of(controller, rel)?)
    }

    /// A file's text, read without a stat first (cgroup files all claim 4096 bytes).
    fn read(&self, name: &str) -> Option<String> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, FileMode::empty()).ok()?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(len * 2, 0);
            }
            match rustix::io::read(&fd, &mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return None,
            }
        }
        buf.truncate(len);
        String::from_utf8(buf).ok()
    }

    fn u64(&self, name: &str) -> Option<u64> {
        self.read(name)?.trim().parse().ok()
    }

    /// `key value` lines of a stat file.
    fn stat(&self, name: &str) -> Option<HashMap<String, u64>> {
        Some(parse_stat(&self.read(name)?))
    }

    /// Processes in this cgroup and those below it (the containers' cgroups).
    fn processes(&self) -> u64 {
        let here = self
            .read("cgroup.procs")
            .map_or(0, |t| t.lines().count() as u64);
        // Dir::read_from would reopen with this fd's O_PATH, which cannot list.
        let listing = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(&self.0, ".", listing, FileMode::empty())
            .and_then(rustix::fs::Dir::new);
        let Ok(dir) = dir else {
            return here;
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let below: u64 = dir
            .flatten()
            .filter(|e| e.file_type() == rustix::fs::FileType::Directory)
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
            .filter_map(|e| {
                rustix::fs::openat(&self.0, e.file_name(), flags, FileMode::empty()).ok()
            })
            .map(|fd| CgDir(fd).processes())
            .sum();
        here + below
    }
}

fn parse_stat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// What one cgroup's files say.
struct Figures {
    cpu: Option<u64>,
    cpu_user_system_ns: Option<(u64, u64)>,
    memory: Option<Memory>,
    processes: Option<u64>,
    pressure: Pressures,
}

/// The figures of the cgroup `rel`: one directory opened per hierarchy (one on v2), processes
/// counted in the memory hierarchy's (every hierarchy holds the same ones).
fn figures(cg: &Cgroups, rel: &Path) -> Figures {
    let mem = CgDir::of(cg, "memory", rel);
    let cpuacct = match cg.mode {
        Mode::Legacy => CgDir::of(cg, "cpuacct", rel),
        Mode::Unified => None,
    };
    let (cpu, cpu_user_system_ns) = match (cg.mode, &cpuacct, &mem) {
        (Mode::Legacy, Some(d), _) => cpu_v1(d),
        (Mode::Unified, _, Some(d)) => cpu_v2(d),
        _ => (None, None),
    };
    let processes = match &mem {
        Some(d) => Some(d.processes()),
        None => cg
            .procs_file(rel)
            .and_then(|f| CgDir::at(f.parent()?))
            .map(|d| d.processes()),
    };
    let pressure = match (cg.mode, &mem) {
        (Mode::Unified, Some(d)) => {
            let read = |f: &str| d.read(f).as_deref().and_then(pressure::parse);
            Pressures {
                cpu: read("cpu.pressure"),
                memory: read("memory.pressure"),
                io: read("io.pressure"),
            }
        }
        _ => Pressures::default(),
    };
    Figures {
        cpu,
        cpu_user_system_ns,
        memory: mem.and_then(|d| memory(cg.mode, &d)),
        processes,
        pressure,
    }
}

/// v1 cpu time and its user and kernel parts, ns. The total is `cpuacct.usage`, charged at
/// every context switch; the parts come from `cpuacct.usage_all` (per cpu: user, system), which
/// the kernel samples at each tick: its sum moves in 4 ms steps, so an idle container's rate
/// would read 0. Without `cpuacct.usage` the table's sum is the best there is.
fn cpu_v1(d: &CgDir) -> (Option<u64>, Option<(u64, u64)>) {
    let precise = d.u64("cpuacct.usage");
    if let Some(t) = d.read("cpuacct.usage_all") {
        let (mut user, mut system) = (0u64, 0u64);
        for l in t.lines().skip(1) {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [_, u, s] = f[..] {
                user += u;
                system += s;
            }
        }
        return (Some(precise.unwrap_or(user + system)), Some((user, system)));
    }
    let parts = || Some((d.u64("cpuacct.usage_user")?, d.u64("cpuacct.usage_sys")?));
    (precise, parts())
}

/// v2 cpu time and its parts, ns, from `cpu.stat`.
fn cpu_v2(d: &CgDir) -> (Option<u64>, Option<(u64, u64)>) {
    let Some(st) = d.stat("cpu.stat") else {
        return (None, None);
    };
    let us = |k: &str| st.get(k).map(|u| u * 1000);
    (us("usage_usec"), us("user_usec").zip(us("system_usec")))
}

fn memory(mode: Mode, d: &CgDir) -> Option<Memory> {
    let (usage, limit, stat, events) = match mode {
        Mode::Legacy => (
            d.u64("memory.usage_in_bytes")?,
            d.u64("memory.limit_in_bytes"),
            d.stat("memory.stat")?,
            d.stat("memory.oom_control"),
        ),
        Mode::Unified => (
            d.u64("memory.current")?,
            d.u64("memory.max"),
            d.stat("memory.stat")?,
            d.stat("memory.events"),
        ),
    };
    let mut m = memory_from(mode, usage, limit, &stat);
    m.oom_kills = events.and_then(|e| e.get("oom_kill").copied());
    if mode == Mode::Unified {
        m.swap = d.u64("memory.swap.current");
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
    fn cpu_from_v1_usage_all_or_its_three_files_and_from_v2_cpu_stat() {
        let t = std::env::temp_dir().join(format!("berth-cpu-test-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("cpuacct.usage_all"),
            "cpu user system\n0 10 1\n1 20 2\n",
        )
        .unwrap();
        let d = CgDir::at(&t).unwrap();
        assert_eq!(cpu_v1(&d), (Some(33), Some((30, 3))));
        // The precise counter, when there, is the total; the tick table only splits it.
        std::fs::write(t.join("cpuacct.usage"), "35\n").unwrap();
        assert_eq!(cpu_v1(&d), (Some(35), Some((30, 3))));
        std::fs::remove_file(t.join("cpuacct.usage_all")).unwrap();
        for (f, v) in [
            ("cpuacct.usage", "50\n"),
            ("cpuacct.usage_user", "40\n"),
            ("cpuacct.usage_sys", "9\n"),
        ] {
            std::fs::write(t.join(f), v).unwrap();
        }
        assert_eq!(cpu_v1(&d), (Some(50), Some((40, 9))));
        std::fs::write(
            t.join("cpu.stat"),
            "usage_usec 7\nuser_usec 5\nsystem_usec 2\n",
        )
        .unwrap();
        assert_eq!(cpu_v2(&d), (Some(7000), Some((5000, 2000))));
        std::fs::remove_dir_all(&t).unwrap();
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
