//! What a berthd and its pods leave on the node — links, addresses, nft elements, namespace
//! pins, mounts, cgroups, address leases — taken before and compared after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Berthd;

/// What a berthd and its pods have made, to compare before and after.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    links: Vec<String>,
    addrs: Vec<String>,
    nft_elements: Vec<String>,
    pins: Vec<String>,
    mounts: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    ipam: Vec<String>,
}

pub fn snapshot(b: &Berthd) -> Snapshot {
    let ns = b.netns.clone().unwrap();
    let exec = |args: &[&str]| {
        let mut cmd = std::process::Command::new(args[0]);
        cmd.args(&args[1..]);
        super::in_netns(&mut cmd, &ns);
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    let mut links: Vec<String> = exec(&["ip", "-o", "link"])
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap().to_string())
        })
        .collect();
    links.sort();
    let mut addrs: Vec<String> = exec(&["ip", "-o", "-4", "addr"])
        .lines()
        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
        .collect();
    addrs.sort();
    let nft_elements: Vec<String> = exec(&["nft", "list", "table", "ip", "berth"])
        .lines()
        .filter(|l| l.contains("elements"))
        .map(|l| l.trim().to_string())
        .collect();
    let list = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|n| !n.starts_with('.'));
        v.sort();
        v
    };
    let mut cgroups = Vec::new();
    for m in super::cgroup_mounts() {
        let top = m.join(&b.cgroup_root);
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                cgroups.push(d.clone());
                for e in rd.flatten() {
                    if e.file_type().unwrap().is_dir() {
                        stack.push(e.path());
                    }
                }
            }
        }
    }
    cgroups.sort();
    Snapshot {
        links,
        addrs,
        nft_elements,
        pins: list(&b.state.join("ns")),
        mounts: super::mounts_under(b.dir.path()),
        cgroups,
        ipam: list(&b.state.join("ipam")),
    }
}

/// Waits until the world is back to `before` (teardown of namespaces is asynchronous in the
/// kernel, so links vanish shortly after the call returns), then compares.
pub async fn assert_back_to(b: &Berthd, before: &Snapshot) {
    for _ in 0..100 {
        if snapshot(b) == *before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(snapshot(b), *before, "something was left behind");
}
