//! Pull benchmark: berth against containerd (Debian package) side by side, pulling the ~100 MB
//! seven-layer `berth-test/big` image from the same local registry, a cold store each run, runs
//! interleaved; then ListImages and ImageStatus latency with 100 images present.
//!
//! Run with `e2e/bench-pull` (installs containerd and the fixtures, then `cargo bench --bench
//! pull`). `BENCH_RUNS` sets the number of pulls per runtime (default 5). Figures only: nothing
//! here asserts a time.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "containerd.rs"]
mod containerd;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::image_service_client::ImageServiceClient;
use common::{Berthd, Netns, Options, Registry, mirror_config};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

fn spec(name: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: name.into(),
        ..Default::default()
    })
}

async fn timed_pull(c: &mut ImageServiceClient<Channel>, image: &str) -> Duration {
    let t = Instant::now();
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("pull {image}: {e}"));
    t.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).min(v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Pushes `n` tiny single-layer images `bench/img-<i>:v1` to a writable registry.
async fn push_small_images(registry: &str, n: usize) {
    let http = reqwest::Client::new();
    for i in 0..n {
        let mut b = tar::Builder::new(Vec::new());
        let data = format!("image {i}\n");
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("file-{i}")).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
        let tar = b.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let layer = gz.finish().unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["sh"], "User": "1000"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        })
        .to_string()
        .into_bytes();
        let repo = format!("bench/img-{i}");
        let mut descs = Vec::new();
        for blob in [&layer, &config] {
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(blob)));
            let r = http
                .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            let loc = r.headers()["location"].to_str().unwrap().to_string();
            let loc = if loc.starts_with('/') {
                format!("http://{registry}{loc}")
            } else {
                loc
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let r = http
                .put(format!("{loc}{sep}digest={digest}"))
                .body(blob.clone())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "blob upload: {}", r.status());
            descs.push((digest, blob.len()));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": descs[1].0, "size": descs[1].1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": descs[0].0, "size": descs[0].1}],
        });
        let r = http
            .put(format!("http://{registry}/v2/{repo}/manifests/v1"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "manifest upload: {}", r.status());
    }
}

/// Latency of ListImages and ImageStatus over `n` calls each.
async fn list_status_latency(
    c: &mut ImageServiceClient<Channel>,
    names: &[String],
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut list = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let r = c
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner();
        list.push(t.elapsed());
        assert!(r.images.len() >= names.len());
        let t = Instant::now();
        let s = c
            .image_status(cri::ImageStatusRequest {
                image: spec(&names[i % names.len()]),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        status.push(t.elapsed());
        assert!(s.image.is_some());
    }
    (list, status)
}

fn remove_tree(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let ns = Netns::new();
    let registry = Registry::start(&ns, 5000);
    let image = format!("{}/berth-test/big:latest", registry.addr);
    let have_containerd = containerd::installed();
    if !have_containerd {
        eprintln!("containerd not installed: berth figures only (e2e/bench-pull installs it)");
    }

    // Warm the page cache with the registry's blobs so every measured run reads them alike.
    {
        let b = Berthd::start_with(Options {
            extra_config: mirror_config(&registry.addr),
            netns: Some(ns.path.clone()),
            log_level: Some("warn".into()),
            ..Default::default()
        });
        timed_pull(&mut b.images().await, &image).await;
    }

    let mut berth = Vec::new();
    let mut ctrd = Vec::new();
    for run in 0..runs {
        {
            let b = Berthd::start_with(Options {
                extra_config: mirror_config(&registry.addr),
                netns: Some(ns.path.clone()),
                log_level: Some("warn".into()),
                ..Default::default()
            });
            let d = timed_pull(&mut b.images().await, &image).await;
            eprintln!("run {run}: berth      {}", ms(d));
            berth.push(d);
            remove_tree(&b.root);
        }
        if have_containerd {
            let c = containerd::Containerd::start(&ns, &registry.addr, "");
            let mut client = ImageServiceClient::new(common::connect(&c.socket).await);
            let d = timed_pull(&mut client, &image).await;
            eprintln!("run {run}: containerd {}", ms(d));
            ctrd.push(d);
        }
    }

    println!("\nPullImage {image} (~100 MB, 7 layers), cold store, {runs} runs each:");
    let bm = median(&mut berth);
    println!(
        "  berth:      median {}  min {}  max {}",
        ms(bm),
        ms(berth[0]),
        ms(*berth.last().unwrap())
    );
    if have_containerd {
        let cm = median(&mut ctrd);
        println!(
            "  containerd: median {}  min {}  max {}",
            ms(cm),
            ms(ctrd[0]),
            ms(*ctrd.last().unwrap())
        );
        println!(
            "  berth / containerd (median): {:.2}",
            bm.as_secs_f64() / cm.as_secs_f64()
        );
    }

    // 100 images: ListImages and ImageStatus latency.
    let storage = tempfile::tempdir().unwrap();
    let writable = Registry::start_with(&ns, 5001, storage.path(), false, "");
    let addr = writable.addr.clone();
    ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(push_small_images(&addr, 100))
    });
    let names: Vec<String> = (0..100)
        .map(|i| format!("{}/bench/img-{i}:v1", writable.addr))
        .collect();
    let calls = 1000;
    println!("\nListImages / ImageStatus with 100 images, {calls} calls each:");
    {
        let b = Berthd::start_with(Options {
            extra_config: mirror_config(&writable.addr),
            netns: Some(ns.path.clone()),
            log_level: Some("warn".into()),
            ..Default::default()
        });
        let mut c = b.images().await;
        for n in &names {
            timed_pull(&mut c, n).await;
        }
        let (mut l, mut s) = list_status_latency(&mut c, &names, calls).await;
        println!(
            "  berth:      ListImages median {} p99 {};  ImageStatus median {} p99 {}",
            us(median(&mut l)),
            us(pct(&mut l, 0.99)),
            us(median(&mut s)),
            us(pct(&mut s, 0.99))
        );
    }
    if have_containerd {
        let cd = containerd::Containerd::start(&ns, &writable.addr, "");
        let mut c = ImageServiceClient::new(common::connect(&cd.socket).await);
        for n in &names {
            timed_pull(&mut c, n).await;
        }
        let (mut l, mut s) = list_status_latency(&mut c, &names, calls).await;
        println!(
            "  containerd: ListImages median {} p99 {};  ImageStatus median {} p99 {}",
            us(median(&mut l)),
            us(pct(&mut l, 0.99)),
            us(median(&mut s)),
            us(pct(&mut s, 0.99))
        );
    }
}
