//! ContainerStats, ListContainerStats and the pod's: figures read from the cgroups, the writable
//! layer and the pod's interfaces, filters, and containers that are gone left out rather than
//! failing the list.

mod common;

use std::collections::HashMap;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

const MIB: u64 = 1024 * 1024;

async fn list(w: &mut World, f: cri::ContainerStatsFilter) -> Vec<cri::ContainerStats> {
    w.rt.list_container_stats(cri::ListContainerStatsRequest { filter: Some(f) })
        .await
        .unwrap()
        .into_inner()
        .stats
}

fn value(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map(|v| v.value).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_cpu_memory_and_the_writable_layer_of_each_container() {
    let mut w = World::new().await;
    let pod = w.pod("stats").await;
    let busy = w
        .run(
            &pod,
            container("busy", &["sh", "-c", "while :; do :; done"]),
        )
        .await;
    let holder = w.run(&pod, container("holder", &["sleep", "3600"])).await;
    let (code, out) = w
        .sh(
            &holder,
            "dd if=/dev/zero of=/dev/shm/held bs=1M count=50 2>&1 && \
             dd if=/dev/urandom of=/layer-file bs=1M count=2 2>&1",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let first = list(&mut w, Default::default()).await;
    let by_id: HashMap<String, &cri::ContainerStats> = first
        .iter()
        .map(|s| (s.attributes.as_ref().unwrap().id.clone(), s))
        .collect();
    assert!(
        by_id.contains_key(&busy) && by_id.contains_key(&holder),
        "{:?}",
        by_id.keys()
    );
    let h = by_id[&holder];
    let mem = h.memory.as_ref().unwrap();
    assert!(value(&mem.working_set_bytes) >= 45 * MIB, "{mem:?}");
    assert!(value(&mem.usage_bytes) >= value(&mem.working_set_bytes));
    let layer = h.writable_layer.as_ref().unwrap();
    assert!(value(&layer.used_bytes) >= 2 * MIB, "{layer:?}");
    assert!(value(&layer.inodes_used) >= 1);
    assert_eq!(
        h.attributes
            .as_ref()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .name,
        "holder"
    );
    // The busy one's cpu time grows between samples; the second sample has a rate.
    let cpu0 = value(&by_id[&busy].cpu.as_ref().unwrap().usage_core_nano_seconds);
    assert!(cpu0 > 0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let again =
        w.rt.container_stats(cri::ContainerStatsRequest {
            container_id: busy.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let cpu = again.cpu.unwrap();
    assert!(value(&cpu.usage_core_nano_seconds) > cpu0);
    assert!(value(&cpu.usage_nano_cores) > 0, "{cpu:?}");

    // Filters: id, pod, labels.
    let only = list(
        &mut w,
        cri::ContainerStatsFilter {
            label_selector: HashMap::from([("app".to_string(), "busy".to_string())]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].attributes.as_ref().unwrap().id, busy);
    let none = list(
        &mut w,
        cri::ContainerStatsFilter {
            pod_sandbox_id: "feedface".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
    // The pod: its cgroup's figures, its containers', its processes, its interface, whose
    // counters grow with traffic.
    let pod_stats = |w: &mut World| {
        let mut rt = w.rt.clone();
        let id = pod.0.clone();
        async move {
            rt.pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: id })
                .await
                .unwrap()
                .into_inner()
                .stats
                .unwrap()
                .linux
                .unwrap()
        }
    };
    let before = pod_stats(&mut w).await;
    assert!(value(&before.memory.as_ref().unwrap().working_set_bytes) >= 45 * MIB);
    assert!(value(&before.cpu.as_ref().unwrap().usage_core_nano_seconds) >= cpu0);
    assert_eq!(before.containers.len(), 2);
    assert!(value(&before.process.as_ref().unwrap().process_count) >= 2);
    let iface = before
        .network
        .as_ref()
        .unwrap()
        .default_interface
        .clone()
        .unwrap();
    let (code, out) = w
        .sh(
            &holder,
            "ping -c 3 -W 1 $(ip route | awk '/default/ {print $3}') 2>&1",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let after = pod_stats(&mut w).await;
    let iface2 = after.network.unwrap().default_interface.unwrap();
    assert_eq!(iface.name, iface2.name);
    assert!(
        value(&iface2.tx_bytes) > value(&iface.tx_bytes),
        "{iface:?} -> {iface2:?}"
    );
    assert!(
        value(&iface2.rx_bytes) > value(&iface.rx_bytes),
        "{iface:?} -> {iface2:?}"
    );
    let listed =
        w.rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .stats;
    assert!(
        listed
            .iter()
            .any(|p| p.attributes.as_ref().unwrap().id == pod.0)
    );

    // An exited container has no figures: left out of the list, NotFound alone.
    w.stop(&busy, 0).await;
    let after = list(&mut w, Default::default()).await;
    assert!(
        after
            .iter()
            .all(|s| s.attributes.as_ref().unwrap().id != busy)
    );
    let err =
        w.rt.container_stats(cri::ContainerStatsRequest {
            container_id: busy.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_metrics_match_their_descriptors_and_show_the_containers_figures() {
    let mut w = World::new().await;
    let descs =
        w.rt.list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
            .await
            .unwrap()
            .into_inner()
            .descriptors;
    let keys: HashMap<String, Vec<String>> =
        descs.into_iter().map(|d| (d.name, d.label_keys)).collect();
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_rss",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
        "container_fs_usage_bytes",
    ] {
        assert!(keys.contains_key(name), "no descriptor {name}");
    }
    let pod = w.pod("metrics").await;
    let mut c = container("holder", &["sleep", "3600"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 20_000,
            cpu_shares: 1024,
            memory_limit_in_bytes: 64 * MIB as i64,
            memory_swap_limit_in_bytes: 64 * MIB as i64,
            ..Default::default()
        }),
        ..Default::default()
    });
    let holder = w.run(&pod, c).await;
    let (code, out) = w
        .sh(
            &holder,
            "dd if=/dev/zero of=/dev/shm/held bs=1M count=20 2>&1 && \
             ping -c 2 -W 1 $(ip route | awk '/default/ {print $3}') 2>&1",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let all =
        w.rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pod_metrics;
    let pm = all
        .iter()
        .find(|p| p.pod_sandbox_id == pod.0)
        .expect("the pod's metrics");
    // kubelet builds a Prometheus metric from each: unknown names or a label count unlike the
    // descriptor's would make it drop the whole scrape.
    let labels = |m: &cri::Metric| -> HashMap<String, String> {
        let k = keys
            .get(&m.name)
            .unwrap_or_else(|| panic!("{} has no descriptor", m.name));
        assert_eq!(k.len(), m.label_values.len(), "labels of {}", m.name);
        k.iter()
            .cloned()
            .zip(m.label_values.iter().cloned())
            .collect()
    };
    let rx = pm
        .metrics
        .iter()
        .find(|m| m.name == "container_network_receive_bytes_total")
        .expect("the pod's network figures");
    let l = labels(rx);
    assert_eq!(
        (
            l["pod"].as_str(),
            l["namespace"].as_str(),
            l["container"].as_str()
        ),
        ("metrics", "test", "")
    );
    assert!(rx.value.unwrap().value > 0);
    for m in &pm.metrics {
        labels(m);
    }
    assert_eq!(pm.container_metrics.len(), 1);
    let cm = &pm.container_metrics[0];
    assert_eq!(cm.container_id, holder);
    let ws = cm
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_working_set_bytes")
        .expect("the container's working set");
    assert!(ws.value.unwrap().value >= 18 * MIB, "{ws:?}");
    let l = labels(ws);
    assert_eq!(
        (l["container"].as_str(), l["id"].as_str()),
        ("holder", holder.as_str())
    );
    assert!(l["image"].contains("busybox"), "{l:?}");
    assert!(ws.timestamp > 0);
    for m in &cm.metrics {
        labels(m);
    }
    assert!(
        cm.metrics
            .iter()
            .any(|m| m.name == "container_processes" && m.value.unwrap().value >= 1)
    );
    // The limits in force and the process figures, as the cgroup v1 files and /proc say (the
    // v2 files' figures are held in tests/cgroup_v2.rs; v2 reports swap alone, not memsw).
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory").exists();
    let value = |name: &str| {
        cm.metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.value.map(|v| v.value))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    if v1 {
        v1_limits(&value);
    }
    for name in [
        "container_threads",
        "container_file_descriptors",
        "container_fs_limit_bytes",
    ] {
        assert!(value(name) > 0, "{name}");
    }
    assert!(value("container_fs_inodes_total") >= value("container_fs_inodes_free"));
    // Every name the CRI validation suite v1.37 asks a runtime to describe.
    for name in [
        "container_cpu_cfs_throttled_seconds_total",
        "container_fs_reads_bytes_total",
        "container_blkio_device_usage_total",
        "container_memory_kernel_usage",
        "container_memory_mapped_file",
        "container_sockets",
        "container_pressure_io_stalled_seconds_total",
    ] {
        assert!(keys.contains_key(name), "no descriptor {name}");
    }
    w.remove_pod(&pod.0).await;
}

/// The limits a v1 node's files hold for the container made above.
fn v1_limits(value: &dyn Fn(&str) -> u64) {
    assert_eq!(value("container_spec_cpu_period"), 100_000);
    assert_eq!(value("container_spec_cpu_quota"), 20_000);
    assert_eq!(value("container_spec_cpu_shares"), 1024);
    assert_eq!(value("container_spec_memory_limit_bytes"), 64 * MIB);
    assert_eq!(value("container_spec_memory_swap_limit_bytes"), 64 * MIB);
    assert!(value("container_memory_max_usage_bytes") >= 18 * MIB);
    value("container_cpu_cfs_periods_total");
    value("container_memory_failcnt");
    value("container_threads_max");
}
