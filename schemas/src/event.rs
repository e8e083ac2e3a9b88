//! The [`Event`] trait (subject name + semantic validation) and its
//! implementations for the four event types.

use crate::avro::AvroRecord;
use crate::types::{AuditEvent, ComplianceViolation, PolicyDecision, UsageEvent};
use crate::DecodeError;
use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An event type with a schema subject. Every decode path ends in
/// [`Event::validate`], so a decoded value is always a valid one.
pub trait Event: Sized + Serialize + DeserializeOwned + AvroRecord {
    /// Schema subject (also the Kafka topic family), e.g. `"llm.usage.v1"`.
    const SUBJECT: &'static str;
    /// Semantic checks beyond what the schema expresses.
    fn validate(&self) -> Result<(), DecodeError>;
}

/// Longest accepted identifier-like text field, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Largest accepted count in any one token field.
pub const MAX_TOKENS: i64 = 100_000_000;
/// Largest accepted latency or evaluation time (one day), in milliseconds.
pub const MAX_MS: i64 = 86_400_000;
/// Largest accepted free-text field (reason, details, message), in bytes.
pub const MAX_TEXT_LEN: usize = 1 << 20;

fn ident(field: &'static str, v: &str) -> Result<(), DecodeError> {
    if v.is_empty() {
        return Err(DecodeError::EmptyField { field });
    }
    if v.len() > MAX_ID_LEN {
        return Err(DecodeError::AbsurdValue {
            field,
            value: format!("{} bytes", v.len()),
        });
    }
    Ok(())
}

fn opt_ident(field: &'static str, v: &Option<String>) -> Result<(), DecodeError> {
    match v {
        Some(s) if s.len() > MAX_ID_LEN => Err(DecodeError::AbsurdValue {
            field,
            value: format!("{} bytes", s.len()),
        }),
        _ => Ok(()),
    }
}

fn text(field: &'static str, v: &str) -> Result<(), DecodeError> {
    if v.len() > MAX_TEXT_LEN {
        return Err(DecodeError::AbsurdValue {
            field,
            value: format!("{} bytes", v.len()),
        });
    }
    Ok(())
}

fn bounded(field: &'static str, v: i64, max: i64) -> Result<(), DecodeError> {
    if v < 0 {
        return Err(DecodeError::NegativeValue { field });
    }
    if v > max {
        return Err(DecodeError::AbsurdValue {
            field,
            value: v.to_string(),
        });
    }
    Ok(())
}

fn timestamp(field: &'static str, t: &DateTime<Utc>) -> Result<(), DecodeError> {
    if !(2000..=2100).contains(&t.year()) {
        return Err(DecodeError::InvalidTimestamp(format!(
            "{field}: year {} outside 2000..=2100",
            t.year()
        )));
    }
    Ok(())
}

/// Checks that `d` fits an Avro `decimal(precision, 9)`.
fn decimal(field: &'static str, d: &Decimal, precision: u32) -> Result<(), DecodeError> {
    let n = d.normalize();
    if n.scale() > 9 {
        return Err(DecodeError::InvalidDecimal(format!(
            "{field}: {d} has more than 9 fractional digits"
        )));
    }
    // |d| < 10^(precision - 9)
    let limit = Decimal::from_i128_with_scale(10i128.pow(precision - 9), 0);
    if n.abs() >= limit {
        return Err(DecodeError::AbsurdValue {
            field,
            value: d.to_string(),
        });
    }
    Ok(())
}

fn envelope(
    tenant_id: &str,
    source: &str,
    occurred_at: &DateTime<Utc>,
    optionals: [(&'static str, &Option<String>); 3],
) -> Result<(), DecodeError> {
    ident("tenant_id", tenant_id)?;
    ident("source", source)?;
    timestamp("occurred_at", occurred_at)?;
    for (field, v) in optionals {
        opt_ident(field, v)?;
    }
    Ok(())
}

impl Event for UsageEvent {
    const SUBJECT: &'static str = "llm.usage.v1";

    fn validate(&self) -> Result<(), DecodeError> {
        envelope(
            &self.tenant_id,
            &self.source,
            &self.occurred_at,
            [
                ("team_id", &self.team_id),
                ("project_id", &self.project_id),
                ("user_id", &self.user_id),
            ],
        )?;
        ident("request_id", &self.request_id)?;
        ident("provider", &self.provider)?;
        ident("model", &self.model)?;
        bounded("input_tokens", self.input_tokens, MAX_TOKENS)?;
        bounded("cached_input_tokens", self.cached_input_tokens, MAX_TOKENS)?;
        bounded("cache_write_tokens", self.cache_write_tokens, MAX_TOKENS)?;
        bounded("output_tokens", self.output_tokens, MAX_TOKENS)?;
        bounded("reasoning_tokens", self.reasoning_tokens, MAX_TOKENS)?;
        bounded("latency_ms", self.latency_ms, MAX_MS)?;
        let c = self.currency.as_bytes();
        if c.len() != 3 || !c.iter().all(u8::is_ascii_uppercase) {
            return Err(DecodeError::InvalidCurrency(self.currency.clone()));
        }
        if let Some(cost) = &self.reported_cost {
            if cost.is_sign_negative() && !cost.is_zero() {
                return Err(DecodeError::NegativeValue {
                    field: "reported_cost",
                });
            }
            decimal("reported_cost", cost, 18)?;
        }
        opt_ident("region", &self.region)?;
        Ok(())
    }
}

impl Event for PolicyDecision {
    const SUBJECT: &'static str = "policy.decision.v1";

    fn validate(&self) -> Result<(), DecodeError> {
        envelope(
            &self.tenant_id,
            &self.source,
            &self.occurred_at,
            [
                ("team_id", &self.team_id),
                ("project_id", &self.project_id),
                ("user_id", &self.user_id),
            ],
        )?;
        ident("decision_id", &self.decision_id)?;
        ident("policy_id", &self.policy_id)?;
        text("reason", &self.reason)?;
        bounded("evaluation_ms", self.evaluation_ms, MAX_MS)
    }
}

impl Event for AuditEvent {
    const SUBJECT: &'static str = "audit.event.v1";

    fn validate(&self) -> Result<(), DecodeError> {
        envelope(
            &self.tenant_id,
            &self.source,
            &self.occurred_at,
            [
                ("team_id", &self.team_id),
                ("project_id", &self.project_id),
                ("user_id", &self.user_id),
            ],
        )?;
        ident("actor_id", &self.actor_id)?;
        ident("action", &self.action)?;
        text("details", &self.details)
    }
}

impl Event for ComplianceViolation {
    const SUBJECT: &'static str = "compliance.violation.v1";

    fn validate(&self) -> Result<(), DecodeError> {
        ident("tenant_id", &self.tenant_id)?;
        ident("rule", &self.rule)?;
        timestamp("window_start", &self.window_start)?;
        timestamp("window_end", &self.window_end)?;
        timestamp("detected_at", &self.detected_at)?;
        if self.window_start > self.window_end {
            return Err(DecodeError::InvalidTimestamp(
                "window_start is after window_end".into(),
            ));
        }
        decimal("observed", &self.observed, 28)?;
        decimal("threshold", &self.threshold, 28)?;
        text("message", &self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    #[test]
    fn samples_are_valid() {
        sample_usage().validate().unwrap();
        sample_policy_decision().validate().unwrap();
        sample_audit_event().validate().unwrap();
        sample_compliance_violation().validate().unwrap();
    }

    #[test]
    fn usage_rules() {
        let class = |f: &dyn Fn(&mut UsageEvent)| {
            let mut e = sample_usage();
            f(&mut e);
            e.validate().map_err(|e| e.class()).err()
        };
        assert_eq!(class(&|e| e.model.clear()), Some("empty_field"));
        assert_eq!(class(&|e| e.model = "m".repeat(257)), Some("absurd_value"));
        assert_eq!(class(&|e| e.model = "m".repeat(256)), None);
        assert_eq!(class(&|e| e.output_tokens = -1), Some("negative_value"));
        assert_eq!(
            class(&|e| e.input_tokens = MAX_TOKENS + 1),
            Some("absurd_value")
        );
        assert_eq!(class(&|e| e.latency_ms = MAX_MS + 1), Some("absurd_value"));
        assert_eq!(
            class(&|e| e.currency = "usd".into()),
            Some("invalid_currency")
        );
        assert_eq!(
            class(&|e| e.currency = "EURO".into()),
            Some("invalid_currency")
        );
        assert_eq!(
            class(&|e| e.reported_cost = Some(Decimal::new(-1, 2))),
            Some("negative_value")
        );
        assert_eq!(
            class(&|e| e.reported_cost = Some(Decimal::new(1, 10))),
            Some("invalid_decimal")
        );
        assert_eq!(
            class(&|e| e.reported_cost = Some(Decimal::new(1_000_000_000, 0))),
            Some("absurd_value")
        );
        assert_eq!(class(&|e| e.reported_cost = Some(Decimal::ZERO)), None);
        assert_eq!(
            class(&|e| e.occurred_at = DateTime::UNIX_EPOCH),
            Some("invalid_timestamp")
        );
    }
}
