//! The HTTP side of `tally ingest`: OPA's decision-log upload API, plus
//! `/livez`, `/readyz` and `/metrics` on the same listener.
//!
//! Guarantee: `POST <ingest.path>` answers 200 only after every event of the
//! upload was acknowledged by Kafka ([`super::forward`]); a body that is not a
//! whole gzip (or identity) JSON array within the limits is refused before
//! anything is produced (400, 413), as is a request without the configured
//! bearer token (401); anything transient is a 5xx so OPA retries. On shutdown
//! the listener closes first, uploads in flight finish (bounded by
//! `ingest.shutdown_grace_ms`), then the process exits.

use super::body::{self, BodyError, Encoding};
use super::forward::{ForwardError, Forwarder};
use super::metrics::{IngestMetrics, Outcome};
use crate::config::IngestConfig;
use crate::streams::policy::opa::OpaMapping;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

type Resp = Response<Full<Bytes>>;

/// Everything a request needs.
pub struct Ingest {
    pub cfg: IngestConfig,
    pub token: Option<String>,
    pub mapping: OpaMapping,
    pub forwarder: Forwarder,
    pub metrics: IngestMetrics,
    pub uploads: Semaphore,
    pub draining: AtomicBool,
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    diff == 0
}

/// Whether `header` is `Bearer <token>` (the scheme in any case).
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    if h.len() < 7 || !h[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    same(h[7..].trim_ascii(), token.as_bytes())
}

impl Ingest {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let path = req.uri().path().to_string();
        let resp = match (req.method(), path.as_str()) {
            (&Method::POST, p) if p == self.cfg.path => {
                let started = Instant::now();
                let (outcome, resp) = self.upload(req).await;
                self.metrics.request(outcome);
                if outcome == Outcome::Accepted {
                    self.metrics
                        .upload_duration
                        .record(started.elapsed().as_secs_f64());
                }
                resp
            }
            (_, p) if p == self.cfg.path => {
                self.metrics.request(Outcome::MethodNotAllowed);
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
                r
            }
            (&Method::GET, "/livez") => text(StatusCode::OK, "alive"),
            (&Method::GET, "/readyz") if self.draining.load(Ordering::SeqCst) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            }
            (&Method::GET, "/readyz") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => {
                self.metrics.request(Outcome::NotFound);
                text(
                    StatusCode::NOT_FOUND,
                    format!("not found; uploads go to POST {}", self.cfg.path),
                )
            }
        };
        Ok(resp)
    }

    async fn upload(&self, req: Request<Incoming>) -> (Outcome, Resp) {
        if let Some(token) = &self.token {
            let h = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            if !authorized(h, token) {
                let mut r = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                return (Outcome::Unauthorized, r);
            }
        }
        let enc_header = req
            .headers()
            .get(CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?"));
        let Some(enc) = Encoding::from_header(enc_header) else {
            return (
                Outcome::UnsupportedEncoding,
                text(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "unsupported Content-Encoding {:?}: send gzip (as OPA does) or identity",
                        enc_header.unwrap_or_default()
                    ),
                ),
            );
        };
        let limit = self.cfg.max_body_bytes;
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            // Read what was sent (up to a bound) so the client sees the 413
            // rather than a reset connection.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), read_body(req.into_body(), 0)).await;
            return self.refuse(&BodyError::TooLarge { limit });
        }
        let Ok(_permit) = self.uploads.try_acquire() else {
            return (
                Outcome::Busy,
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{} uploads in progress (ingest.max_concurrent_uploads); retry later",
                        self.cfg.max_concurrent_uploads
                    ),
                ),
            );
        };
        self.metrics.in_flight.increment(1.0);
        let r = self.receive_and_forward(req, enc).await;
        self.metrics.in_flight.decrement(1.0);
        r
    }

    fn refuse(&self, e: &BodyError) -> (Outcome, Resp) {
        self.metrics.rejected(e);
        let (outcome, status) = if e.status() == 413 {
            (Outcome::TooLarge, StatusCode::PAYLOAD_TOO_LARGE)
        } else {
            (Outcome::BadRequest, StatusCode::BAD_REQUEST)
        };
        (outcome, text(status, e.to_string()))
    }

    async fn receive_and_forward(&self, req: Request<Incoming>, enc: Encoding) -> (Outcome, Resp) {
        let limit = self.cfg.max_body_bytes;
        let timeout = Duration::from_millis(self.cfg.request_timeout_ms);
        let raw = match tokio::time::timeout(timeout, read_body(req.into_body(), limit)).await {
            Err(_) => {
                return (
                    Outcome::Timeout,
                    text(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body did not arrive within {} ms",
                            self.cfg.request_timeout_ms
                        ),
                    ),
                )
            }
            Ok(Err(ReadError::TooLarge)) => return self.refuse(&BodyError::TooLarge { limit }),
            Ok(Err(ReadError::Failed(e))) => {
                return (
                    Outcome::BadRequest,
                    text(
                        StatusCode::BAD_REQUEST,
                        format!("reading the body failed: {e}"),
                    ),
                )
            }
            Ok(Ok(b)) => b,
        };
        self.metrics.body_bytes.increment(raw.len() as u64);
        let (max_plain, max_events, mapping) = (
            self.cfg.max_decompressed_bytes,
            self.cfg.max_events,
            self.mapping.clone(),
        );
        let parsed = tokio::task::spawn_blocking(move || {
            let json = body::decode(raw, enc, max_plain)?;
            let events = body::split(&json, max_events, &mapping)?;
            Ok::<_, BodyError>((json, events))
        })
        .await;
        let (json, events) = match parsed {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return self.refuse(&e),
            Err(e) => {
                return (
                    Outcome::BadRequest,
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("decoding failed: {e}"),
                    ),
                )
            }
        };
        self.metrics.decompressed_bytes.increment(json.len() as u64);
        match self.forwarder.forward(&json, &events).await {
            Ok(()) => {
                let unkeyed = events.iter().filter(|e| e.key.is_none()).count();
                self.metrics.events.increment(events.len() as u64);
                self.metrics.events_unkeyed.increment(unkeyed as u64);
                (
                    Outcome::Accepted,
                    text(StatusCode::OK, format!("accepted {} events", events.len())),
                )
            }
            Err(e @ ForwardError::EventTooLarge { .. }) => {
                tracing::warn!(error = %e, "upload refused");
                (
                    Outcome::TooLarge,
                    text(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "upload not acknowledged; OPA will retry it");
                (
                    Outcome::KafkaUnavailable,
                    text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                )
            }
        }
    }
}

enum ReadError {
    TooLarge,
    Failed(hyper::Error),
}

/// A body over `limit` bytes is read on and dropped up to [`DRAIN_CAP`] more, so
/// the client, still sending, gets the 413 instead of a reset connection.
const DRAIN_CAP: u64 = 8 << 20;

/// The whole body, or `TooLarge` past `limit` bytes.
async fn read_body(mut body: Incoming, limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Failed)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > limit.saturating_add(DRAIN_CAP) {
            break;
        }
        if total <= limit {
            out.extend_from_slice(&data);
        }
    }
    if total > limit {
        return Err(ReadError::TooLarge);
    }
    Ok(out)
}

/// Serves until `shutdown` turns true, then drains (see the module docs).
pub async fn serve(
    ingest: Arc<Ingest>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ingest accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { drop(shutdown.wait_for(|s| *s).await) } => break,
        };
        let ingest = ingest.clone();
        let mut stop = shutdown.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| ingest.clone().handle(req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(sock), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "ingest connection ended with an error");
            }
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    ingest.draining.store(true, Ordering::SeqCst);
    let grace = Duration::from_millis(ingest.cfg.shutdown_grace_ms);
    tracing::info!(
        connections = conns.len(),
        "ingest: listener closed, finishing uploads in flight"
    );
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            grace_ms = ingest.cfg.shutdown_grace_ms,
            "ingest: connections still open after the grace period; closing them (their uploads get no answer, OPA retries them)"
        );
        conns.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(authorized(Some(b"Bearer s3cret"), "s3cret"));
        assert!(authorized(Some(b"bearer s3cret "), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cretx"), "s3cret"));
        assert!(!authorized(Some(b"Basic s3cret"), "s3cret"));
        assert!(!authorized(Some(b"Bearer"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
