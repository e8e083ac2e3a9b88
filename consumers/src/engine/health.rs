//! `/livez`, `/readyz` and `/metrics` over a minimal HTTP/1.1 responder.
//!
//! Guarantee: `/livez` answers 200 while the process and its runtime answer,
//! whatever the sinks do (a ClickHouse or Postgres outage must never make
//! Kubernetes restart the pod: the pipeline waits it out). `/readyz` answers 503
//! whenever tally is not making progress: buffered or lagging work has not
//! moved for `server.stall_after_ms`, a sink's circuit breaker is open
//! (consumption paused), or the violation relay is down or stuck. `/health` and
//! `/healthz` are aliases of `/readyz` (the old single endpoint).

use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The relay's own report of whether it works (set by the relay and its supervisor).
pub struct RelayHealth {
    inner: Mutex<RelayState>,
}

struct RelayState {
    /// The relay task is running (false while it waits to be restarted).
    up: bool,
    /// It completed a step (a publish pass as leader, a lock poll as follower)
    /// since it was last (re)started.
    confirmed: bool,
    last_progress: Instant,
    down_reason: String,
}

impl Default for RelayHealth {
    fn default() -> Self {
        Self {
            inner: Mutex::new(RelayState {
                up: false,
                confirmed: false,
                last_progress: Instant::now(),
                down_reason: "not started".into(),
            }),
        }
    }
}

impl RelayHealth {
    /// The supervisor (re)started the relay task.
    pub fn started(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.up = true;
            s.confirmed = false;
            s.last_progress = Instant::now();
        }
    }

    /// The relay task ended with `reason`; the supervisor restarts it later.
    pub fn stopped(&self, reason: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.up = false;
            s.down_reason = reason.to_string();
        }
    }

    /// The relay completed a step.
    pub fn progressed(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.confirmed = true;
            s.last_progress = Instant::now();
        }
    }

    /// Why the relay does not count as working (None: it works). A relay that
    /// has made no progress for `stall_after` (at least 5 s: a follower polls
    /// the lock every 2 s) is stuck, e.g. retrying an error that does not heal.
    pub fn problem(&self, stall_after: Duration) -> Option<String> {
        let s = self.inner.lock().ok()?;
        if !s.up {
            return Some(format!("violation relay down: {}", s.down_reason));
        }
        let quiet = s.last_progress.elapsed();
        if quiet > stall_after.max(Duration::from_secs(5)) {
            return Some(format!(
                "violation relay made no progress for {} s",
                quiet.as_secs()
            ));
        }
        if !s.confirmed {
            return Some("violation relay starting".into());
        }
        None
    }
}

/// Why this instance is not ready (empty: ready).
pub fn not_ready(metrics: &Metrics, stall_after: Duration) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = metrics.stalled_for() {
        if d > stall_after {
            out.push(format!("stalled: no progress for {} s", d.as_secs()));
        }
    }
    for (sink, d) in metrics.sinks.open() {
        out.push(format!(
            "circuit open: {} failing, consumption paused for {} s",
            sink.name(),
            d.as_secs()
        ));
    }
    if let Some(p) = metrics.relay.problem(stall_after) {
        out.push(p);
    }
    out
}

pub async fn serve(
    listen: String,
    metrics: Arc<Metrics>,
    stall_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "health and metrics server listening");
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // e.g. too many open files: keep serving
                    tracing::warn!(error = %e, "health server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render(stall_after)),
                "/livez" => ("200 OK", "alive\n".to_string()),
                "/readyz" | "/health" | "/healthz" => {
                    let problems = not_ready(&metrics, stall_after);
                    if problems.is_empty() {
                        ("200 OK", "ok\n".to_string())
                    } else {
                        ("503 Service Unavailable", problems.join("\n") + "\n")
                    }
                }
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_health_states() {
        let r = RelayHealth::default();
        let stall = Duration::from_secs(60);
        assert!(r.problem(stall).unwrap().contains("down"));
        r.started();
        assert!(r.problem(stall).unwrap().contains("starting"));
        r.progressed();
        assert_eq!(r.problem(stall), None);
        r.stopped("fatal: boom");
        assert!(r.problem(stall).unwrap().contains("boom"));
        r.started();
        assert!(r.problem(stall).is_some(), "not ready until it progresses");
    }

    #[test]
    fn readiness_reports_open_circuits() {
        let m = Metrics::default();
        m.relay.started();
        m.relay.progressed();
        let stall = Duration::from_secs(60);
        assert!(not_ready(&m, stall).is_empty());
        let p = crate::engine::breaker::Policy {
            open_after_failures: 1,
            open_after: Duration::from_secs(60),
            max_backoff: Duration::from_secs(1),
        };
        m.sinks
            .failure(crate::engine::breaker::Sink::ClickHouse, Instant::now(), &p);
        let problems = not_ready(&m, stall);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("clickhouse"), "{problems:?}");
        m.sinks.success(crate::engine::breaker::Sink::ClickHouse);
        assert!(not_ready(&m, stall).is_empty());
    }
}
