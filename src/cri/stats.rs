//! ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats: the
//! domain's figures (`container::stats`) in the CRI's terms.

use crate::cri::v1 as cri;
use tonic::Status;

use super::Cri;
use super::container::metadata;
use crate::cgroup::pressure::{Pressure, Stall};
use crate::container::CtrFilter;
use crate::container::stats::{PodStats, Pressures, Stats};

impl Cri {
    pub(super) fn container_stats(
        &self,
        req: cri::ContainerStatsRequest,
    ) -> Result<cri::ContainerStatsResponse, Status> {
        let rec = self.rt.containers.get(&req.container_id)?.record();
        let id = rec.id.clone();
        let stats = self.rt.containers.stats(vec![rec]);
        let s = stats.into_iter().next().ok_or_else(|| {
            Status::not_found(format!(
                "container {id} is not running or created: no stats"
            ))
        })?;
        Ok(cri::ContainerStatsResponse {
            stats: Some(cri_stats(s)),
        })
    }

    pub(super) fn list_container_stats(
        &self,
        req: cri::ListContainerStatsRequest,
    ) -> Result<cri::ListContainerStatsResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let filter = CtrFilter {
            id: Some(f.id).filter(|s| !s.is_empty()),
            pod_id: Some(f.pod_sandbox_id).filter(|s| !s.is_empty()),
            labels: f.label_selector.into_iter().collect(),
            ..Default::default()
        };
        let records = self.rt.containers.list(&filter);
        Ok(cri::ListContainerStatsResponse {
            stats: self
                .rt
                .containers
                .stats(records)
                .into_iter()
                .map(cri_stats)
                .collect(),
        })
    }

    pub(super) fn pod_sandbox_stats(
        &self,
        req: cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse, Status> {
        let rec = self.rt.pods.get(&req.pod_sandbox_id)?.record();
        let id = rec.id.clone();
        let s = self.rt.containers.pod_stats(vec![rec]).into_iter().next();
        let s =
            s.ok_or_else(|| Status::not_found(format!("pod sandbox {id} is not ready: no stats")))?;
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(cri_pod_stats(s)),
        })
    }

    pub(super) fn list_pod_sandbox_stats(
        &self,
        req: cri::ListPodSandboxStatsRequest,
    ) -> Result<cri::ListPodSandboxStatsResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let pods = self.rt.pods.list(&crate::sandbox::PodFilter {
            id: Some(f.id).filter(|s| !s.is_empty()),
            labels: f.label_selector.into_iter().collect(),
            ..Default::default()
        });
        Ok(cri::ListPodSandboxStatsResponse {
            stats: self
                .rt
                .containers
                .pod_stats(pods)
                .into_iter()
                .map(cri_pod_stats)
                .collect(),
        })
    }
}

/// The CRI's view of a pod's figures.
fn cri_pod_stats(s: PodStats) -> cri::PodSandboxStats {
    let v = |value: u64| Some(cri::UInt64Value { value });
    let r = &s.record;
    let iface = |i: &crate::container::stats::Interface| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: v(i.rx.bytes),
        rx_errors: v(i.rx.errors),
        tx_bytes: v(i.tx.bytes),
        tx_errors: v(i.tx.errors),
    };
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: r.id.clone(),
            metadata: Some(cri::PodSandboxMetadata {
                name: r.spec.name.clone(),
                uid: r.spec.uid.clone(),
                namespace: r.spec.namespace.clone(),
                attempt: r.spec.attempt,
            }),
            labels: r.spec.labels.clone().into_iter().collect(),
            annotations: r.spec.annotations.clone().into_iter().collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu_usage(
                s.timestamp,
                s.cpu_usage_ns,
                s.cpu_nano_cores,
                &s.pressure,
            )),
            memory: Some(memory_usage(
                s.timestamp,
                s.memory.as_ref(),
                psi(s.pressure.memory),
            )),
            io: io_usage(s.timestamp, &s.pressure),
            network: s.interfaces.as_ref().map(|ifs| cri::NetworkUsage {
                timestamp: s.timestamp,
                default_interface: ifs.first().map(iface),
                interfaces: ifs.iter().map(iface).collect(),
            }),
            process: s.processes.map(|n| cri::ProcessUsage {
                timestamp: s.timestamp,
                process_count: v(n),
            }),
            containers: s.containers.into_iter().map(cri_stats).collect(),
        }),
        windows: None,
    }
}

/// Memory figures as the CRI has them (only a timestamp when they could not be read).
fn memory_usage(
    timestamp: i64,
    m: Option<&crate::container::stats::Memory>,
    psi: Option<cri::PsiStats>,
) -> cri::MemoryUsage {
    let v = |value: u64| Some(cri::UInt64Value { value });
    match m {
        Some(m) => cri::MemoryUsage {
            timestamp,
            working_set_bytes: v(m.working_set),
            available_bytes: m.available.and_then(v),
            usage_bytes: v(m.usage),
            rss_bytes: v(m.rss),
            page_faults: v(m.page_faults),
            major_page_faults: v(m.major_page_faults),
            psi,
        },
        None => cri::MemoryUsage {
            timestamp,
            psi,
            ..Default::default()
        },
    }
}

/// A pressure file as the CRI has it. A missing `full` line (cpu before Linux 5.13) is left
/// out rather than reported as zero.
fn psi(p: Option<Pressure>) -> Option<cri::PsiStats> {
    let data = |s: Stall| cri::PsiData {
        total: s.total_ns,
        avg10: s.avg10,
        avg60: s.avg60,
        avg300: s.avg300,
    };
    p.map(|p| cri::PsiStats {
        full: p.full.map(data),
        some: Some(data(p.some)),
    })
}

/// cpu figures as the CRI has them.
fn cpu_usage(at: i64, ns: Option<u64>, nano_cores: Option<u64>, p: &Pressures) -> cri::CpuUsage {
    let v = |value: u64| Some(cri::UInt64Value { value });
    cri::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: ns.and_then(v),
        usage_nano_cores: nano_cores.and_then(v),
        psi: psi(p.cpu),
    }
}

/// IO figures: only pressure, and only where the cgroup has it (v2).
fn io_usage(timestamp: i64, p: &Pressures) -> Option<cri::IoUsage> {
    p.io.map(|_| cri::IoUsage {
        timestamp,
        psi: psi(p.io),
    })
}

/// The CRI's view of a container's figures.
fn cri_stats(s: Stats) -> cri::ContainerStats {
    let v = |value: u64| Some(cri::UInt64Value { value });
    let r = &s.record;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(metadata(r)),
            labels: r.spec.labels.clone().into_iter().collect(),
            annotations: r.spec.annotations.clone().into_iter().collect(),
        }),
        cpu: Some(cpu_usage(
            s.timestamp,
            s.cpu_usage_ns,
            s.cpu_nano_cores,
            &s.pressure,
        )),
        memory: Some(memory_usage(
            s.timestamp,
            s.memory.as_ref(),
            psi(s.pressure.memory),
        )),
        io: io_usage(s.timestamp, &s.pressure),
        swap: s
            .memory
            .as_ref()
            .and_then(|m| m.swap)
            .map(|used| cri::SwapUsage {
                timestamp: s.timestamp,
                swap_usage_bytes: v(used),
                swap_available_bytes: None,
            }),
        writable_layer: s
            .layer
            .as_ref()
            .map(|(dir, bytes, inodes)| cri::FilesystemUsage {
                timestamp: s.timestamp,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: dir.to_string_lossy().into_owned(),
                }),
                used_bytes: v(*bytes),
                inodes_used: v(*inodes),
            }),
    }
}
