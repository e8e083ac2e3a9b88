//! `/health` and `/metrics` over a minimal HTTP/1.1 responder.
//!
//! `/health` answers 503 when buffered work has made no progress for
//! `server.stall_after_ms` (a stalled consumer must not look healthy).

use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

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
                "/metrics" => ("200 OK", metrics.render()),
                "/health" | "/healthz" => match metrics.stalled_for() {
                    Some(d) if d > stall_after => (
                        "503 Service Unavailable",
                        format!("stalled: no progress for {} s\n", d.as_secs()),
                    ),
                    _ => ("200 OK", "ok\n".to_string()),
                },
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
