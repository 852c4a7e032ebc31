//! The metrics berth reports, as cAdvisor names, describes and labels them: ListMetricDescriptors
//! answers this table, and every value metrics.rs reports is under one of its names.

use crate::cri::v1 as cri;
use crate::cri::v1::MetricType::{Counter, Gauge};

/// The labels every metric has, as cAdvisor names them: the container's CRI name (empty for
/// the pod's own cgroup), the container's id (the pod's for pod-level figures), its image, the
/// runtime's name for it (its id here), and the pod's namespace and name.
pub(super) const BASE_LABELS: [&str; 6] = ["container", "id", "image", "name", "namespace", "pod"];

/// One metric berth reports: name, help, type and the labels it adds to the base ones.
pub(super) struct Desc {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) kind: cri::MetricType,
    pub(super) extra: &'static [&'static str],
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
pub(super) const DESCS: &[Desc] = &[
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
    d(
        "container_cpu_cfs_periods_total",
        "Enforcement periods of the cfs quota that have passed.",
        Counter,
        &[],
    ),
    d(
        "container_cpu_cfs_throttled_periods_total",
        "Enforcement periods in which the container used up its cfs quota.",
        Counter,
        &[],
    ),
    d(
        "container_cpu_cfs_throttled_seconds_total",
        "Time the container was held back by its cfs quota, in seconds.",
        Counter,
        &[],
    ),
    d(
        "container_spec_cpu_period",
        "The cfs period in force, in microseconds.",
        Gauge,
        &[],
    ),
    d(
        "container_spec_cpu_quota",
        "The cfs quota in force, in microseconds per period (absent when unlimited).",
        Gauge,
        &[],
    ),
    d(
        "container_spec_cpu_shares",
        "The cpu shares in force (on cgroup v2, whose files hold a weight, the shares given).",
        Gauge,
        &[],
    ),
    d(
        "container_spec_memory_limit_bytes",
        "The memory limit in force, in bytes (absent when unlimited).",
        Gauge,
        &[],
    ),
    d(
        "container_spec_memory_swap_limit_bytes",
        "The memory-plus-swap (cgroup v1) or swap (v2) limit in force, in bytes.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_failcnt",
        "Times the container's memory use reached its limit.",
        Counter,
        &[],
    ),
    d(
        "container_memory_kernel_usage",
        "Kernel memory charged to the container, in bytes.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_mapped_file",
        "Bytes of files the container has mapped into memory.",
        Gauge,
        &[],
    ),
    d(
        "container_memory_max_usage_bytes",
        "The highest memory use recorded for the container, in bytes.",
        Gauge,
        &[],
    ),
    d(
        "container_threads",
        "Threads of the container's processes.",
        Gauge,
        &[],
    ),
    d(
        "container_threads_max",
        "Most tasks the container may have (its pids limit; 0 when unlimited).",
        Gauge,
        &[],
    ),
    d(
        "container_file_descriptors",
        "Open file descriptors of the container's processes.",
        Gauge,
        &[],
    ),
    d(
        "container_sockets",
        "Open sockets of the container's processes.",
        Gauge,
        &[],
    ),
    d(
        "container_fs_limit_bytes",
        "Size of the filesystem holding the container's writable layer, in bytes.",
        Gauge,
        &["device"],
    ),
    d(
        "container_fs_inodes_total",
        "Inodes of the filesystem holding the container's writable layer.",
        Gauge,
        &["device"],
    ),
    d(
        "container_fs_inodes_free",
        "Free inodes of the filesystem holding the container's writable layer.",
        Gauge,
        &["device"],
    ),
    d(
        "container_fs_reads_bytes_total",
        "Bytes the container read from a block device.",
        Counter,
        &["device"],
    ),
    d(
        "container_fs_reads_total",
        "Reads the container made from a block device.",
        Counter,
        &["device"],
    ),
    d(
        "container_fs_writes_bytes_total",
        "Bytes the container wrote to a block device.",
        Counter,
        &["device"],
    ),
    d(
        "container_fs_writes_total",
        "Writes the container made to a block device.",
        Counter,
        &["device"],
    ),
    d(
        "container_blkio_device_usage_total",
        "Block device io of the container, in bytes, by device and operation.",
        Counter,
        &["device", "major", "minor", "operation"],
    ),
    d(
        "container_pressure_cpu_waiting_seconds_total",
        "Time some of the container's tasks waited for a cpu, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
    d(
        "container_pressure_cpu_stalled_seconds_total",
        "Time all of the container's tasks waited for a cpu at once, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
    d(
        "container_pressure_memory_waiting_seconds_total",
        "Time some of the container's tasks waited for memory, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
    d(
        "container_pressure_memory_stalled_seconds_total",
        "Time all of the container's tasks waited for memory at once, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
    d(
        "container_pressure_io_waiting_seconds_total",
        "Time some of the container's tasks waited for io, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
    d(
        "container_pressure_io_stalled_seconds_total",
        "Time all of the container's tasks waited for io at once, in seconds (cgroup v2).",
        Counter,
        &[],
    ),
];

/// A metric's label keys: the base ones, then its own.
pub(super) fn label_keys(d: &Desc) -> Vec<String> {
    BASE_LABELS
        .iter()
        .chain(d.extra)
        .map(|s| s.to_string())
        .collect()
}
