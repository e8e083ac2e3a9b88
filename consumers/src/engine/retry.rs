//! Retrying Retryable steps with exponential backoff (`backon`).
//!
//! Guarantee: only steps that are safe to repeat are retried (every pipeline
//! step is idempotent or checked before it is repeated); running out of
//! retries turns the error Fatal, which stops the pipeline without committing.
//! Used where a limit makes sense (schema registry lookups, taking a
//! partition); sink writes never give up: see `breaker.rs`.

use crate::engine::breaker::Step;
use crate::errors::StageError;
use crate::metrics::StreamMetrics;
use backon::ExponentialBuilder;
use std::future::Future;
use std::time::Duration;

pub fn backoff(max_retries: usize) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(max_retries)
        .build()
}

/// Retries a Retryable step with exponential backoff (backon); anything else,
/// or running out of retries, is returned (the latter as Fatal).
pub async fn retry<T, F, Fut>(
    sm: &StreamMetrics,
    max_retries: usize,
    step: Step,
    mut f: F,
) -> Result<T, StageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StageError>>,
{
    let mut delays = backoff(max_retries);
    loop {
        match f().await {
            Err(e) if e.is_retryable() => match delays.next() {
                Some(d) => {
                    tracing::warn!(step = step.name(), error = %e, delay_ms = d.as_millis() as u64, "retrying");
                    sm.retried(step);
                    tokio::time::sleep(d).await;
                }
                None => {
                    return Err(StageError::Fatal(format!(
                        "{}: gave up after {max_retries} retries: {e}",
                        step.name()
                    )))
                }
            },
            other => return other,
        }
    }
}
