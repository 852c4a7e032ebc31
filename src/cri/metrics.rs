//! ListMetricDescriptors and ListPodSandboxMetrics: the figures of the stats calls under the
//! names and labels cAdvisor gives them, so kubelet can serve them at /metrics/cadvisor and
//! dashboards written for cAdvisor keep working. Values are whole units of the name (the CRI
//! carries integers), so the cpu `_seconds_total` counters move in steps of a second.

use crate::cri::v1 as cri;

use super::Cri;
use super::metric_descs::{DESCS, label_keys};
use crate::cgroup::pressure::Pressure;
use crate::container::detail::Detail;
use crate::container::stats::{Memory, PodStats, Pressures, Stats};

const NS: u64 = 1_000_000_000;

/// Collects one subject's metrics (a container, or the pod's own cgroup): its base label
/// values and timestamp are fixed, each metric adds its extra label values.
struct Sink {
    base: [String; 6],
    at: i64,
    out: Vec<cri::Metric>,
}

impl Sink {
    /// A subject with base label values `base` (in `BASE_LABELS`' order), read at `at`.
    fn new(base: [&str; 6], at: i64) -> Sink {
        Sink {
            base: base.map(str::to_string),
            at,
            out: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, extra: &[&str], value: u64) {
        let desc = DESCS
            .iter()
            .find(|d| d.name == name)
            .expect("every metric berth reports has a descriptor");
        debug_assert_eq!(desc.extra.len(), extra.len(), "labels of {name}");
        let mut labels: Vec<String> = self.base.to_vec();
        labels.extend(extra.iter().map(|s| s.to_string()));
        self.out.push(cri::Metric {
            name: name.to_string(),
            timestamp: self.at,
            metric_type: desc.kind as i32,
            label_values: labels,
            value: Some(cri::UInt64Value { value }),
        });
    }

    /// The pressure files' totals (cgroup v2): `waiting` is some tasks, `stalled` all.
    fn pressure(&mut self, p: &Pressures) {
        for (what, file) in [("cpu", p.cpu), ("memory", p.memory), ("io", p.io)] {
            let Some(Pressure { some, full }) = file else {
                continue;
            };
            let name = |kind: &str| format!("container_pressure_{what}_{kind}_seconds_total");
            self.push(&name("waiting"), &[], some.total_ns / NS);
            if let Some(full) = full {
                self.push(&name("stalled"), &[], full.total_ns / NS);
            }
        }
    }

    /// The figures only the metrics carry; `layer` names the writable layer's filesystem.
    fn detail(&mut self, d: &Detail, layer: Option<&str>) {
        if let Some(c) = d.cfs {
            self.push("container_cpu_cfs_periods_total", &[], c.periods);
            self.push(
                "container_cpu_cfs_throttled_periods_total",
                &[],
                c.throttled_periods,
            );
            self.push(
                "container_cpu_cfs_throttled_seconds_total",
                &[],
                c.throttled_ns / NS,
            );
        }
        let l = &d.limits;
        for (name, v) in [
            ("container_spec_cpu_period", l.cpu_period_us),
            ("container_spec_cpu_quota", l.cpu_quota_us),
            ("container_spec_cpu_shares", l.cpu_shares),
            ("container_spec_memory_limit_bytes", l.memory),
            ("container_spec_memory_swap_limit_bytes", l.swap),
            ("container_memory_failcnt", d.memory_failcnt),
            ("container_memory_kernel_usage", d.memory_kernel),
            ("container_memory_mapped_file", d.memory_mapped_file),
            ("container_memory_max_usage_bytes", d.memory_max_usage),
            ("container_threads", d.threads),
            ("container_file_descriptors", d.fds),
            ("container_sockets", d.sockets),
        ] {
            if let Some(v) = v {
                self.push(name, &[], v);
            }
        }
        // The pids limit, or 0 for none (as the descriptor says).
        if d.threads.is_some() {
            self.push("container_threads_max", &[], l.pids.unwrap_or(0));
        }
        if let (Some(fs), Some(dev)) = (d.fs, layer) {
            self.push("container_fs_limit_bytes", &[dev], fs.bytes);
            self.push("container_fs_inodes_total", &[dev], fs.inodes);
            self.push("container_fs_inodes_free", &[dev], fs.inodes_free);
        }
        for io in &d.io {
            let dev = [io.name.as_str()];
            self.push("container_fs_reads_bytes_total", &dev, io.read_bytes);
            self.push("container_fs_reads_total", &dev, io.reads);
            self.push("container_fs_writes_bytes_total", &dev, io.write_bytes);
            self.push("container_fs_writes_total", &dev, io.writes);
            let (major, minor) = (io.major.to_string(), io.minor.to_string());
            for (op, v) in [("Read", io.read_bytes), ("Write", io.write_bytes)] {
                let labels = [io.name.as_str(), &major, &minor, op];
                self.push("container_blkio_device_usage_total", &labels, v);
            }
        }
    }

    fn cpu(&mut self, usage_ns: Option<u64>) {
        if let Some(u) = usage_ns {
            self.push("container_cpu_usage_seconds_total", &["total"], u / NS);
        }
    }

    fn memory(&mut self, m: Option<&Memory>) {
        let Some(m) = m else { return };
        self.push("container_memory_usage_bytes", &[], m.usage);
        self.push("container_memory_working_set_bytes", &[], m.working_set);
        self.push("container_memory_rss", &[], m.rss);
        self.push("container_memory_cache", &[], m.cache);
        if let Some(s) = m.swap {
            self.push("container_memory_swap", &[], s);
        }
        // berth reads the hierarchical counters (v1 total_*, v2's own are hierarchical).
        let f = "container_memory_failures_total";
        self.push(f, &["pgfault", "hierarchy"], m.page_faults);
        self.push(f, &["pgmajfault", "hierarchy"], m.major_page_faults);
        if let Some(n) = m.oom_kills {
            self.push("container_oom_events_total", &[], n);
        }
    }
}

/// A container's metrics.
fn container_metrics(s: &Stats, d: &Detail, namespace: &str, pod: &str) -> cri::ContainerMetrics {
    let r = &s.record;
    let image = if r.image_name.is_empty() {
        &r.spec.image
    } else {
        &r.image_name
    };
    let mut k = Sink::new(
        [&r.spec.name, &r.id, image, &r.id, namespace, pod],
        s.timestamp,
    );
    k.cpu(s.cpu_usage_ns);
    if let Some((user, system)) = s.cpu_user_system_ns {
        k.push("container_cpu_user_seconds_total", &[], user / NS);
        k.push("container_cpu_system_seconds_total", &[], system / NS);
    }
    k.memory(s.memory.as_ref());
    if let Some((dir, bytes, inodes)) = &s.layer {
        let dev = dir.to_string_lossy();
        k.push("container_fs_usage_bytes", &[&dev], *bytes);
        k.push("container_fs_inodes_used", &[&dev], *inodes);
    }
    if let Some(n) = s.processes {
        k.push("container_processes", &[], n);
    }
    if r.started_at > 0 {
        k.push(
            "container_start_time_seconds",
            &[],
            r.started_at as u64 / NS,
        );
    }
    k.push("container_last_seen", &[], s.timestamp.max(0) as u64 / NS);
    k.pressure(&s.pressure);
    k.detail(
        d,
        s.layer.as_ref().map(|l| l.0.to_string_lossy()).as_deref(),
    );
    cri::ContainerMetrics {
        container_id: r.id.clone(),
        metrics: k.out,
    }
}

/// A pod's metrics: its own cgroup's and its interfaces' (labelled with container "" as
/// cAdvisor labels a pod's cgroup), and each container's.
/// `details` are the containers' detail, in `p.containers`' order.
fn pod_metrics(p: &PodStats, details: &[Detail]) -> cri::PodSandboxMetrics {
    let r = &p.record;
    let (ns, name) = (&r.spec.namespace, &r.spec.name);
    let mut k = Sink::new(["", &r.id, "", &r.id, ns, name], p.timestamp);
    k.cpu(p.cpu_usage_ns);
    k.memory(p.memory.as_ref());
    if let Some(n) = p.processes {
        k.push("container_processes", &[], n);
    }
    k.pressure(&p.pressure);
    for i in p.interfaces.iter().flatten() {
        let n = [i.name.as_str()];
        for (dir, c) in [("receive", i.rx), ("transmit", i.tx)] {
            let m = |what: &str| format!("container_network_{dir}_{what}_total");
            k.push(&m("bytes"), &n, c.bytes);
            k.push(&m("packets"), &n, c.packets);
            k.push(&m("errors"), &n, c.errors);
            k.push(&m("packets_dropped"), &n, c.dropped);
        }
    }
    cri::PodSandboxMetrics {
        pod_sandbox_id: r.id.clone(),
        metrics: k.out,
        container_metrics: p
            .containers
            .iter()
            .zip(details.iter().chain(std::iter::repeat(&Detail::default())))
            .map(|(c, d)| container_metrics(c, d, ns, name))
            .collect(),
    }
}

impl Cri {
    pub(super) fn list_metric_descriptors(&self) -> cri::ListMetricDescriptorsResponse {
        cri::ListMetricDescriptorsResponse {
            descriptors: DESCS
                .iter()
                .map(|d| cri::MetricDescriptor {
                    name: d.name.to_string(),
                    help: d.help.to_string(),
                    label_keys: label_keys(d),
                })
                .collect(),
        }
    }

    pub(super) fn list_pod_sandbox_metrics(&self) -> cri::ListPodSandboxMetricsResponse {
        let pods = self.rt.pods.list(&Default::default());
        cri::ListPodSandboxMetricsResponse {
            pod_metrics: self
                .rt
                .containers
                .pod_stats(pods)
                .iter()
                .map(|p| {
                    let details: Vec<Detail> = p
                        .containers
                        .iter()
                        .map(|c| {
                            let layer = c.layer.as_ref().map(|l| l.0.as_path());
                            self.rt.containers.detail(&c.record, layer)
                        })
                        .collect();
                    pod_metrics(p, &details)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_names_are_unique_and_in_prometheus_form() {
        let mut names: Vec<&str> = DESCS.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DESCS.len());
        for d in DESCS {
            assert!(
                d.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                d.name
            );
            // cAdvisor's two exceptions: a counter named after its kernel file, and a gauge
            // of how many inodes a filesystem has.
            let counter = (d.name.ends_with("_total") && d.name != "container_fs_inodes_total")
                || d.name == "container_memory_failcnt";
            assert_eq!(d.kind == cri::MetricType::Counter, counter, "{}", d.name);
        }
    }

    #[test]
    fn a_pods_metrics_carry_as_many_label_values_as_their_descriptor_has_keys() {
        use crate::container::stats::{Counters, Interface};
        let pod = crate::sandbox::PodRecord {
            id: "p1".into(),
            spec: crate::sandbox::PodSpec {
                name: "web".into(),
                namespace: "ns".into(),
                ..Default::default()
            },
            state: crate::sandbox::PodState::Ready,
            created_at: 1,
            cgroup: "/kubepods/p1".into(),
            net: None,
            cni: None,
            init: None,
            monitor: None,
            shm: false,
        };
        let mem = Memory {
            usage: 10,
            swap: Some(1),
            oom_kills: Some(2),
            ..Default::default()
        };
        let iface = Interface {
            name: "eth0".into(),
            rx: Counters {
                bytes: 5,
                ..Default::default()
            },
            tx: Counters::default(),
        };
        let p = PodStats {
            record: pod,
            timestamp: 3 * NS as i64,
            cpu_usage_ns: Some(2 * NS + 1),
            cpu_nano_cores: None,
            memory: Some(mem),
            interfaces: Some(vec![iface]),
            processes: Some(4),
            pressure: Default::default(),
            containers: Vec::new(),
        };
        let m = pod_metrics(&p, &[]);
        let descs: std::collections::HashMap<&str, Vec<String>> =
            DESCS.iter().map(|d| (d.name, label_keys(d))).collect();
        assert!(m.metrics.len() >= 15);
        for x in &m.metrics {
            let keys = &descs[x.name.as_str()];
            assert_eq!(x.label_values.len(), keys.len(), "{}", x.name);
            assert_eq!(x.label_values[1], "p1");
            assert_eq!(x.label_values[5], "web");
        }
        let rx = m
            .metrics
            .iter()
            .find(|x| x.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(rx.label_values[6], "eth0");
        assert_eq!(rx.value.unwrap().value, 5);
        let cpu = m
            .metrics
            .iter()
            .find(|x| x.name == "container_cpu_usage_seconds_total")
            .unwrap();
        assert_eq!(
            (cpu.value.unwrap().value, cpu.label_values[6].as_str()),
            (2, "total")
        );
    }
}
