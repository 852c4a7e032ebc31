//! The soak: the kubelet-like load of `common::churn` (pods of two containers at
//! parallelism 10, a poller listing pods, containers and container stats every second, every
//! container's log read) for `SOAK_SECONDS` (default 20; `e2e/soak <seconds>` for longer).
//! Prints operations, errors, p50/p99 of each RPC, berthd's RSS, open files and threads at
//! the start and the end, and what is left; fails on any error, any leftover, or descriptors
//! or threads growing past a small bound after warm-up.

mod common;

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::world::*;

/// (RSS KiB, open descriptors, threads) of a process.
fn usage(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let w = World::with(common::Options {
        log_level: Some("info".into()),
        ..Default::default()
    })
    .await;
    let before = w.leftovers();
    let node_before = common::node::snapshot(&w.env.berthd);
    let pid = w.env.berthd.pid();
    let (logs, cgroup_root) = (w.logs(), w.env.berthd.cgroup_root.clone());
    let mut n = 0;
    let mut config = move || {
        n += 1;
        pod_config_for(
            &logs,
            &cgroup_root,
            &format!("soak{n}"),
            cri::NamespaceMode::Container,
        )
    };
    // Warm-up: a first round, so the figures compared are past one-time growth.
    let mut warm: Vec<_> = (0..10).map(|_| config()).collect();
    common::churn::run(&w.rt, 10, Duration::from_secs(1), move || warm.pop()).await;
    let start = usage(pid);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(seconds);
    // berthd's RSS each minute, to tell a plateau from a leak.
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(60).min(deadline - Instant::now())).await;
            samples.push(usage(pid).0);
        }
        samples
    });
    let t = common::churn::run(&w.rt, 10, Duration::from_secs(1), move || {
        (Instant::now() < deadline).then(&mut config)
    })
    .await;
    let rss_samples = sampler.await.unwrap();
    let elapsed = t0.elapsed();
    let end = usage(pid);
    println!(
        "soak: {:.0} s, parallelism 10: {} pod lives, {} calls, {} errors",
        elapsed.as_secs_f64(),
        t.pods,
        t.calls(),
        t.errors.len()
    );
    print!("{}", t.report());
    for (rpc, n) in &t.unimplemented {
        println!("  {rpc}: Unimplemented {n} times (not counted as errors)");
    }
    println!(
        "  berthd after warm-up: RSS {} KiB, {} fds, {} threads; at the end: RSS {} KiB, {} fds, {} threads",
        start.0, start.1, start.2, end.0, end.1, end.2
    );
    println!("  berthd RSS each minute (KiB): {rss_samples:?}");
    let left = w.leftovers();
    let gone = left == before;
    println!(
        "  left behind: {}",
        if gone {
            "nothing".to_string()
        } else {
            format!("{left:?}")
        }
    );
    assert!(t.errors.is_empty(), "{:#?}", t.errors);
    assert!(gone, "{left:?}");
    common::node::assert_back_to(&w.env.berthd, &node_before).await;
    assert!(
        end.1 <= start.1 + 16,
        "descriptors grew: {} -> {}",
        start.1,
        end.1
    );
    assert!(
        end.2 <= start.2 + 4,
        "threads grew: {} -> {}",
        start.2,
        end.2
    );
}
