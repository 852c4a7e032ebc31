//! berthd's own metrics endpoint: it parses as Prometheus text, counts CRI calls by method and
//! code, follows pods, containers and monitors as they come and go, and counts pulled bytes.

mod common;

use std::collections::HashMap;

use berth::cri::v1 as cri;
use common::Options;
use common::world::*;

const ADDRESS: &str = "127.0.0.1:9470";

/// One sample: metric name and its labels, rendered `name{k="v",...}` in label order.
type Samples = HashMap<String, f64>;

/// Parses Prometheus text format 0.0.4 strictly enough to fail on anything a scraper would
/// refuse: every line a comment (`# HELP`/`# TYPE`) or `name{labels} value`, names and label
/// names well formed, label values quoted, values numbers, each family typed once before its
/// samples.
fn parse(text: &str) -> Samples {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut samples = Samples::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line:?}"));
            assert!(name_ok(name), "bad name in {line:?}");
            match kind {
                Some("HELP") => {}
                Some("TYPE") => {
                    let t = what.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type in {line:?}"
                    );
                    assert!(
                        typed.insert(name.to_string(), t.to_string()).is_none(),
                        "{name} typed twice"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in\n{text}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad name in {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(name_ok(k), "bad label name in {line:?}");
                assert!(
                    !v.trim_end_matches('"').contains('"'),
                    "unescaped quote in {line:?}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            typed.contains_key(family) || typed.contains_key(name),
            "sample before its TYPE: {line:?}"
        );
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

fn scrape(w: &World) -> (String, Samples) {
    let reply = w
        .env
        .netns
        .run_in(|| common::fake_http::get(ADDRESS, "GET", "/metrics", &[]));
    assert_eq!(reply.status, 200);
    let ct = reply
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = String::from_utf8(reply.body).unwrap();
    let samples = parse(&text);
    (text, samples)
}

fn get(s: &Samples, series: &str, text: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_follows_calls_pods_containers_and_pulls() {
    let mut w = World::with(Options {
        extra_config: format!("[metrics]\naddress = \"{ADDRESS}\"\n"),
        ..Default::default()
    })
    .await;
    let pod = w.pod("metrics").await;
    let ctr = w.run(&pod, container("sleeper", &["sleep", "3600"])).await;
    let missing =
        w.rt.container_status(cri::ContainerStatusRequest {
            container_id: "no-such-container".into(),
            verbose: false,
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    let (text, s) = scrape(&w);
    assert_eq!(get(&s, "berth_pods{state=\"ready\"}", &text), 1.0);
    assert_eq!(get(&s, "berth_containers{state=\"running\"}", &text), 1.0);
    assert_eq!(get(&s, "berth_monitors_alive", &text), 1.0);
    let not_found = "berth_cri_requests_total{method=\"ContainerStatus\",code=\"NotFound\"}";
    assert_eq!(get(&s, not_found, &text), 1.0);
    let runs = "berth_cri_requests_total{method=\"RunPodSandbox\",code=\"OK\"}";
    assert_eq!(get(&s, runs, &text), 1.0);
    // busybox's layer came from the registry: its bytes were counted.
    assert!(get(&s, "berth_image_pull_bytes_total", &text) > 100_000.0);
    assert_eq!(
        get(
            &s,
            "berth_image_pull_duration_seconds_count{result=\"ok\"}",
            &text
        ),
        1.0
    );
    assert!(get(&s, "berth_process_resident_memory_bytes", &text) > 1e6);
    // A histogram's buckets only grow and end at its count.
    let prefix = "berth_cri_request_duration_seconds_bucket{method=\"CreateContainer\",le=\"";
    let mut buckets: Vec<(f64, f64)> = s
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                },
                *v,
            ))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{text}");
    assert!(buckets.windows(2).all(|p| p[0].1 <= p[1].1), "{buckets:?}");
    let count = "berth_cri_request_duration_seconds_count{method=\"CreateContainer\"}";
    assert_eq!(buckets.last().unwrap().1, get(&s, count, &text));
    assert_eq!(get(&s, count, &text), 1.0);

    // OpenMetrics for a scraper that asks for it.
    let om = w.env.netns.run_in(|| {
        common::fake_http::get(
            ADDRESS,
            "GET",
            "/metrics",
            &[("Accept", "application/openmetrics-text;version=1.0.0")],
        )
    });
    assert!(String::from_utf8_lossy(&om.body).ends_with("# EOF\n"));

    w.stop(&ctr, 0).await;
    w.remove(&ctr).await;
    w.remove_pod(&pod.0).await;
    let (text, s) = scrape(&w);
    assert_eq!(get(&s, "berth_pods{state=\"ready\"}", &text), 0.0);
    assert_eq!(get(&s, "berth_containers{state=\"running\"}", &text), 0.0);
    assert_eq!(get(&s, "berth_monitors_alive", &text), 0.0);
    let nothing = w
        .env
        .netns
        .run_in(|| common::fake_http::get(ADDRESS, "GET", "/other", &[]));
    assert_eq!(nothing.status, 404);
    assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
}
