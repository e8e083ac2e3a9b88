//! Decode stage: wire format detection, schema lookup, decoding and validation
//! of one stream's messages (the stream parses; see `Stream::parse`).
//!
//! Guarantee: every message ends up either as a valid event or as a poison
//! verdict with a specific error class; nothing is dropped here. A schema
//! registry outage is Retryable (the batch waits), an unknown schema id is
//! poison. The verdict depends only on the message and on the batch's dedup
//! clock and cutoff, which the claim records, so a replayed batch decodes
//! exactly as before.

use crate::config::Config;
use crate::engine::breaker::Step;
use crate::engine::registry_client::RegistryClient;
use crate::engine::retry::retry;
use crate::engine::stream::Stream;
use crate::errors::StageError;
use crate::metrics::StreamMetrics;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use std::time::Duration;
use tally_schemas::{Decoder, WireFormat};

/// An event may claim to occur at most this long after the batch's dedup
/// clock (clock skew); later than that it would open future rollup buckets
/// and budget periods, so it is dead-lettered instead.
const FUTURE_TOLERANCE_HOURS: i64 = 24;

/// The dead-letter classes the engine itself assigns (besides the stream's
/// parse classes): in-batch or claimed key conflicts, and the dedup clock checks.
pub const ENGINE_CLASSES: [&str; 3] =
    ["dedup_conflict", "future_timestamp", "beyond_dedup_horizon"];

/// One decoded message of a batch.
pub enum Decoded<E> {
    Event(Box<E>),
    Poison {
        class: &'static str,
        message: String,
    },
}

pub struct Decoding {
    decoder: Decoder,
    registry: Option<RegistryClient>,
    max_retries: usize,
}

impl Decoding {
    pub fn new(cfg: &Config) -> Self {
        let registry = (!cfg.registry.url.is_empty()).then(|| {
            RegistryClient::from_config(&cfg.registry).unwrap_or_else(|e| {
                // The CA file was checked at load; this cannot happen in practice.
                tracing::error!(error = %e, "schema registry TLS setup failed; using the system CAs");
                RegistryClient::new(
                    &cfg.registry.url,
                    Duration::from_millis(cfg.registry.timeout_ms),
                )
            })
        });
        Self {
            decoder: Decoder::new(),
            registry,
            max_retries: cfg.pipeline.max_retries,
        }
    }

    /// Decodes one payload. `clock` is the batch's dedup clock (a time the
    /// producer cannot set) and `cutoff` the dedup cutoff applied: an event
    /// older than the cutoff cannot be checked for re-sends and is poison
    /// (`beyond_dedup_horizon`) rather than a possible double count; one more
    /// than a day after the clock is poison too (`future_timestamp`).
    pub async fn decode<S: Stream>(
        &self,
        stream: &S,
        payload: &[u8],
        clock: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        sm: &StreamMetrics,
    ) -> Result<Decoded<S::Event>, StageError> {
        if let (Ok(WireFormat::Confluent { schema_id }), Some(reg)) =
            (tally_schemas::detect(payload), &self.registry)
        {
            if !self.decoder.has_confluent_schema(schema_id) {
                // Registered or unknown: either way the decoder now knows what to say.
                retry(sm, self.max_retries, Step::SchemaRegistry, || {
                    reg.ensure(&self.decoder, schema_id)
                })
                .await?;
            }
        }
        Ok(match stream.parse(&self.decoder, payload) {
            Ok(e) => {
                let occurred_at = stream.occurred_at(&e);
                if occurred_at > clock + ChronoDuration::hours(FUTURE_TOLERANCE_HOURS) {
                    Decoded::Poison {
                        class: "future_timestamp",
                        message: format!(
                            "occurred_at {} is more than {FUTURE_TOLERANCE_HOURS} h after the dedup clock {}",
                            occurred_at.to_rfc3339(),
                            clock.to_rfc3339()
                        ),
                    }
                } else if occurred_at < cutoff {
                    Decoded::Poison {
                        class: "beyond_dedup_horizon",
                        message: format!(
                            "occurred_at {} is older than the dedup cutoff {} (look-back before the dedup clock {})",
                            occurred_at.to_rfc3339(),
                            cutoff.to_rfc3339(),
                            clock.to_rfc3339()
                        ),
                    }
                } else {
                    Decoded::Event(Box::new(e))
                }
            }
            Err((class, message)) => Decoded::Poison { class, message },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of<E>(d: &Decoded<E>) -> &'static str {
        match d {
            Decoded::Event(_) => "event",
            Decoded::Poison { class, .. } => class,
        }
    }

    #[tokio::test]
    async fn event_time_must_be_near_the_message_time() {
        let cfg = Config::load_from(None, &[]).expect("defaults");
        let decoding = Decoding::new(&cfg);
        let stream = crate::streams::usage::UsageStream::new(&cfg);
        let metrics = crate::metrics::Metrics::default();
        let metrics = metrics.stream("usage");
        let now = Utc::now();
        let mut e = tally_schemas::sample_usage();
        let mut verdict = |at: DateTime<Utc>| {
            e.occurred_at = at;
            let payload = tally_schemas::encode_json(&e);
            let decoding = &decoding;
            let metrics = &*metrics;
            let stream = &stream;
            async move {
                class_of(
                    &decoding
                        .decode(
                            stream,
                            &payload,
                            now,
                            now - ChronoDuration::days(7),
                            metrics,
                        )
                        .await
                        .expect("decode"),
                )
            }
        };
        assert_eq!(verdict(now - ChronoDuration::hours(3)).await, "event");
        assert_eq!(
            verdict(now + ChronoDuration::hours(2)).await,
            "event",
            "clock skew is tolerated"
        );
        assert_eq!(
            verdict(now + ChronoDuration::days(3)).await,
            "future_timestamp"
        );
        assert_eq!(
            verdict(now - ChronoDuration::days(30)).await,
            "beyond_dedup_horizon"
        );
        let garbage = decoding
            .decode(
                &stream,
                b"{not json",
                now,
                now - ChronoDuration::days(7),
                &metrics,
            )
            .await
            .expect("decode");
        assert_eq!(class_of(&garbage), "invalid_json");
        for class in ["dedup_conflict", "future_timestamp", "beyond_dedup_horizon"] {
            assert!(ENGINE_CLASSES.contains(&class), "{class}");
        }
    }
}
