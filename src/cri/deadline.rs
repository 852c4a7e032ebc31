//! The client's deadline (`grpc-timeout`), answered DeadlineExceeded when it passes on the
//! server. tonic's own timeout, which sits outside every layer berth can add, answers it
//! `Cancelled`; gRPC clients (critest's "public image should timeout") expect
//! DEADLINE_EXCEEDED. This layer runs inside tonic's and ends the call a millisecond earlier,
//! so its answer is the one sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http;

/// Ends each call at the client's deadline with DeadlineExceeded.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// See `DeadlineLayer`.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

/// How much earlier than tonic's own timer this layer ends a call: both timers fire on the
/// same millisecond tick otherwise, and tonic's could be the one polled.
const MARGIN: Duration = Duration::from_millis(1);

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout);
        let call = self.inner.call(req);
        Box::pin(async move {
            let Some(t) = timeout else {
                return call.await;
            };
            match tokio::time::timeout(t.saturating_sub(MARGIN), call).await {
                Ok(answered) => answered,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the client's deadline of {t:?} passed before the call finished"
                ))
                .into_http()),
            }
        })
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at_checked(v.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_by_unit_and_bad_ones_are_ignored() {
        assert_eq!(parse_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_timeout("20S"), Some(Duration::from_secs(20)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789S", "1x", "-1S", "1.5S", "1 S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
