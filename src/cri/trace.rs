//! One tracing span per RPC, its latency at debug level and in the metrics. Failures are logged at debug too,
//! except internal ones (a bug or a sick host), which warn: kubelet's routine NotFound calls must
//! not flood the log.

use std::future::Future;
use std::time::Instant;

use tonic::{Code, Response, Status};
use tracing::Instrument;

/// Runs one RPC body inside a span named after its method.
pub(super) async fn rpc<T, F>(method: &'static str, body: F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let span = tracing::info_span!(
        "rpc",
        method,
        pod = tracing::field::Empty,
        container = tracing::field::Empty,
        image = tracing::field::Empty
    );
    let start = Instant::now();
    let result = body.instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let latency_us = elapsed.as_micros() as u64;
    let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
    crate::telemetry::rpc_done(method, code, elapsed.as_secs_f64());
    let _entered = span.enter();
    match &result {
        Ok(_) => tracing::debug!(latency_us, "ok"),
        Err(s) if matches!(s.code(), Code::Internal | Code::Unknown) => {
            tracing::warn!(latency_us, code = ?s.code(), error = s.message(), "failed")
        }
        Err(s) => tracing::debug!(latency_us, code = ?s.code(), error = s.message(), "failed"),
    }
    result.map(Response::new)
}
