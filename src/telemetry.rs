//! berthd's own metrics for Prometheus: counters and histograms the layers bump as they work
//! (CRI calls, image pulls), gauges filled from a census of the stores at each scrape, and the
//! HTTP endpoint (`[metrics] address`) that serves them as Prometheus or OpenMetrics text.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A CRI method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

/// A CRI method and the gRPC code it answered with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    method: &'static str,
    code: &'static str,
}

/// A state of a pod or a container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// How a pull ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to ~65 s: from a List call to a slow start or stop.
fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// 10 ms to ~20 min: from a cached pull to a big image over a slow link.
fn pull_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Every metric berthd exports, registered once per process.
struct Metrics {
    registry: Registry,
    rpc_duration: Histograms<MethodLabel>,
    rpc_requests: Family<CodeLabels, Counter>,
    pull_bytes: Counter,
    pull_duration: Histograms<ResultLabel>,
    pods: Family<StateLabel, Gauge>,
    containers: Family<StateLabel, Gauge>,
    monitors: Gauge,
    resident: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let rpc_duration = Histograms::<MethodLabel>::new_with_constructor(rpc_histogram as _);
        registry.register(
            "cri_request_duration_seconds",
            "Latency of CRI calls, by method",
            rpc_duration.clone(),
        );
        let rpc_requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "cri_requests",
            "CRI calls answered, by method and gRPC code",
            rpc_requests.clone(),
        );
        let pull_bytes = Counter::default();
        registry.register(
            "image_pull_bytes",
            "Bytes of image blobs downloaded from registries",
            pull_bytes.clone(),
        );
        let pull_duration = Histograms::<ResultLabel>::new_with_constructor(pull_histogram as _);
        registry.register(
            "image_pull_duration_seconds",
            "Duration of PullImage, by result (ok or error)",
            pull_duration.clone(),
        );
        let pods = Family::<StateLabel, Gauge>::default();
        registry.register("pods", "Pod sandboxes, by state", pods.clone());
        let containers = Family::<StateLabel, Gauge>::default();
        registry.register("containers", "Containers, by state", containers.clone());
        let monitors = Gauge::default();
        registry.register(
            "monitors_alive",
            "Pod monitor processes that are running",
            monitors.clone(),
        );
        let resident = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "berthd's resident memory (monitors not included)",
            resident.clone(),
        );
        let started: Gauge = Gauge::default();
        started.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        registry.register(
            "process_start_time_seconds",
            "When berthd started, in seconds since the epoch",
            started,
        );
        Metrics {
            registry,
            rpc_duration,
            rpc_requests,
            pull_bytes,
            pull_duration,
            pods,
            containers,
            monitors,
            resident,
        }
    }
}

/// Counts one answered CRI call.
pub fn rpc_done(method: &'static str, code: tonic::Code, seconds: f64) {
    let m = &*METRICS;
    m.rpc_duration
        .get_or_create(&MethodLabel { method })
        .observe(seconds);
    m.rpc_requests
        .get_or_create(&CodeLabels {
            method,
            code: code_name(code),
        })
        .inc();
}

/// Counts bytes of a blob as they arrive from a registry.
pub fn pulled_bytes(n: u64) {
    METRICS.pull_bytes.inc_by(n);
}

/// Counts one finished PullImage.
pub fn pull_done(ok: bool, seconds: f64) {
    let result = if ok { "ok" } else { "error" };
    METRICS
        .pull_duration
        .get_or_create(&ResultLabel { result })
        .observe(seconds);
}

/// The gRPC name of a code, as other gRPC servers label it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// What the stores hold at one instant: the gauges of a scrape.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Census {
    /// Pods by state name (creating, ready, notready).
    pub pods: Vec<(&'static str, i64)>,
    /// Containers by state name (creating, created, running, exited).
    pub containers: Vec<(&'static str, i64)>,
    /// Pods whose monitor process is alive.
    pub monitors_alive: i64,
}

/// The metrics as text: OpenMetrics when `openmetrics`, else Prometheus text 0.0.4.
pub fn render(census: &Census, openmetrics: bool) -> String {
    let m = &*METRICS;
    for (family, counts) in [(&m.pods, &census.pods), (&m.containers, &census.containers)] {
        for &(state, n) in counts {
            family.get_or_create(&StateLabel { state }).set(n);
        }
    }
    m.monitors.set(census.monitors_alive);
    m.resident.set(resident_bytes());
    let mut out = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry)
    };
    // Writing into a String cannot fail; an encoder error would be a bug in a metric.
    encoded.expect("encoding metrics into a string");
    out
}

/// RSS from /proc/self/statm (pages × page size); 0 if unreadable.
fn resident_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as i64
}

/// The endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {address}: {message}")]
pub struct ServeError {
    /// The configured address.
    pub address: String,
    /// Why.
    pub message: String,
}

/// Binds the metrics endpoint at `address` (host:port) and serves GET /metrics until
/// `shutdown` resolves; `census` is taken at each scrape. Returns the bound address.
pub async fn serve<C, S>(
    address: &str,
    census: C,
    shutdown: S,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError>
where
    C: Fn() -> Census + Send + Sync + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    use axum::http::{HeaderMap, StatusCode, header};
    let err = |message: String| ServeError {
        address: address.to_string(),
        message,
    };
    let addr: SocketAddr = address
        .parse()
        .map_err(|e| err(format!("not a host:port: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| err(format!("binding: {e}")))?;
    let bound = listener.local_addr().map_err(|e| err(e.to_string()))?;
    let census = Arc::new(census);
    let scrape = move |headers: HeaderMap| {
        let census = census.clone();
        async move {
            let openmetrics = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            // The census reads /proc and takes store locks: off the async workers.
            let body = tokio::task::spawn_blocking(move || render(&census(), openmetrics)).await;
            match body {
                Ok(body) => {
                    let content_type = if openmetrics {
                        "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    } else {
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
                    };
                    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body)
                }
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    format!("taking the census failed: {e}"),
                ),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    // 1/64 of the descriptor limit (16 of 1024), at most 32: a scraper or two keep one
    // connection each; anyone else on the node waits behind them, not in berthd's table.
    let listener = crate::listen_guard::GuardedListener::new(
        listener,
        crate::listen_guard::cap(64, 32),
        "metrics",
    );
    let prepare = |conn, _| std::future::ready(Some(conn));
    let task = tokio::spawn(crate::listen_guard::serve(listener, prepare, app, shutdown));
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_family_and_the_census() {
        rpc_done("Version", tonic::Code::Ok, 0.001);
        rpc_done("ContainerStatus", tonic::Code::NotFound, 0.002);
        pulled_bytes(1234);
        pull_done(true, 0.5);
        let census = Census {
            pods: vec![("ready", 3), ("notready", 1)],
            containers: vec![("running", 5)],
            monitors_alive: 3,
        };
        let text = render(&census, false);
        for line in [
            "berth_cri_requests_total{method=\"ContainerStatus\",code=\"NotFound\"} 1",
            "berth_pods{state=\"ready\"} 3",
            "berth_containers{state=\"running\"} 5",
            "berth_monitors_alive 3",
            "# TYPE berth_cri_request_duration_seconds histogram",
            "berth_cri_request_duration_seconds_count{method=\"Version\"} 1",
            "berth_image_pull_duration_seconds_count{result=\"ok\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("berth_image_pull_bytes_total ")),
            "{text}"
        );
        let om = render(&census, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
