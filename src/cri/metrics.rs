//! ListMetricDescriptors and ListPodSandboxMetrics: the figures of the stats calls under the
//! names and labels cAdvisor gives them, so kubelet can serve them at /metrics/cadvisor and
//! dashboards written for cAdvisor keep working. Values are whole units of the name (the CRI
//! carries integers), so the cpu `_seconds_total` counters move in steps of a second.

use k8s_cri::v1 as cri;
use k8s_cri::v1::MetricType::{Counter, Gauge};

use super::Cri;
use crate::container::stats::{Memory, PodStats, Stats};

/// The labels every metric has, as cAdvisor names them: the container's CRI name (empty for
/// the pod's own cgroup), the container's id (the pod's for pod-level figures), its image, the
/// runtime's name for it (its id here), and the pod's namespace and name.
const BASE_LABELS: [&str; 6] = ["container", "id", "image", "name", "namespace", "pod"];

/// One metric berth reports: name, help, type and the labels it adds to the base ones.
struct Desc {
    name: &'static str,
    help: &'static str,
    kind: cri::MetricType,
    extra: &'static [&'static str],
}

const fn d(
    name: &'static str,
    help: &'static str,
    kind: cri::MetricType,
    extra: &'static [&'static str],
) -> Desc {
    Desc {
        name,
        help,
        kind,
        extra,
    }
}

const NET: &[&str] = &["interface"];

/// Every metric berth can report; ListMetricDescriptors answers these.
const DESCS: &[Desc] = &[
    d(
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        Counter,
        &["cpu"],
    ),
    d(
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        Counter,
        &[],
    ),
    d(
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        Counter,
        &[],
    ),
    d(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        Gauge,
        &[],
    ),
    d("container_memory_rss", "Size of RSS in bytes.", Gauge, &[]),
    d(
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_swap",
        "Container swap usage in bytes.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures.",
        Counter,
        &["failure_type", "scope"],
    ),
    d(
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        Counter,
        &[],
    ),
    d(
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        Gauge,
        &["device"],
    ),
    d(
        "container_fs_inodes_used",
        "Number of inodes the container's writable layer uses.",
        Gauge,
        &["device"],
    ),
    d(
        "container_processes",
        "Number of processes running inside the container.",
        Gauge,
        &[],
    ),
    d(
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        Gauge,
        &[],
    ),
    d(
        "container_last_seen",
        "Last time a container was seen by the exporter.",
        Gauge,
        &[],
    ),
    d(
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        Counter,
        NET,
    ),
    d(
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        Counter,
        NET,
    ),
    d(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        Counter,
        NET,
    ),
    d(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        Counter,
        NET,
    ),
    d(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        Counter,
        NET,
    ),
    d(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        Counter,
        NET,
    ),
    d(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        Counter,
        NET,
    ),
    d(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        Counter,
        NET,
    ),
];

const NS: u64 = 1_000_000_000;

/// A metric's label keys: the base ones, then its own.
fn label_keys(d: &Desc) -> Vec<String> {
    BASE_LABELS
        .iter()
        .chain(d.extra)
        .map(|s| s.to_string())
        .collect()
}

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
fn container_metrics(s: &Stats, namespace: &str, pod: &str) -> cri::ContainerMetrics {
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
    cri::ContainerMetrics {
        container_id: r.id.clone(),
        metrics: k.out,
    }
}

/// A pod's metrics: its own cgroup's and its interfaces' (labelled with container "" as
/// cAdvisor labels a pod's cgroup), and each container's.
fn pod_metrics(p: &PodStats) -> cri::PodSandboxMetrics {
    let r = &p.record;
    let (ns, name) = (&r.spec.namespace, &r.spec.name);
    let mut k = Sink::new(["", &r.id, "", &r.id, ns, name], p.timestamp);
    k.cpu(p.cpu_usage_ns);
    k.memory(p.memory.as_ref());
    if let Some(n) = p.processes {
        k.push("container_processes", &[], n);
    }
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
            .map(|c| container_metrics(c, ns, name))
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
                .map(pod_metrics)
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
            assert_eq!(d.kind == Counter, d.name.ends_with("_total"), "{}", d.name);
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
            containers: Vec::new(),
        };
        let m = pod_metrics(&p);
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
