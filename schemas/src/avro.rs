//! Mapping between the event structs and `apache_avro::types::Value` (the
//! general, schema-resolving path), plus the Avro decimal byte conversions
//! shared with the hand-written fast path.

use crate::fast::FastLayout;
use crate::types::*;
use crate::DecodeError;
use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// How an event type maps onto Avro. Implemented for the four event types;
/// the default methods mean "no hand-written fast path".
pub trait AvroRecord: Sized {
    /// The event as an Avro value of its subject's current schema.
    fn to_avro_value(&self) -> Value;
    /// Builds the event from a record value already resolved to the current
    /// schema (no validation).
    fn from_avro_value(v: Value) -> Result<Self, DecodeError>;
    /// Decodes an Avro body written with a known layout straight into the
    /// struct, or `None` if this type has no fast path for `layout`.
    fn decode_fast(_layout: FastLayout, _body: &[u8]) -> Option<Result<Self, DecodeError>> {
        None
    }
    /// Appends the Avro body in the current schema; `false` if this type has
    /// no hand-written encoder (the caller then goes through [`Value`]).
    fn encode_fast(&self, _out: &mut Vec<u8>) -> bool {
        false
    }
}

const SCALE: u32 = 9;

/// Unscaled value of `d` at scale 9 (rounded half-even beyond 9 digits,
/// which validation rejects anyway).
pub(crate) fn decimal_unscaled(d: &Decimal) -> i128 {
    let r = d.round_dp(SCALE);
    r.mantissa() * 10i128.pow(SCALE - r.scale())
}

/// Minimal big-endian two's-complement bytes of `u`: (buffer, start index).
pub(crate) fn unscaled_bytes(u: i128) -> ([u8; 16], usize) {
    let b = u.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let redundant = (b[start] == 0x00 && b[start + 1] & 0x80 == 0)
            || (b[start] == 0xff && b[start + 1] & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    (b, start)
}

/// Decimal from big-endian two's-complement unscaled bytes at scale 9.
///
/// No bytes is no number (Java's `BigInteger` and `apache_avro` refuse it too), so both
/// decode paths reject it alike.
pub(crate) fn decimal_from_bytes(b: &[u8], field: &str) -> Result<Decimal, DecodeError> {
    if b.is_empty() {
        return Err(DecodeError::InvalidDecimal(format!(
            "{field}: no bytes for the unscaled value"
        )));
    }
    let (head, tail) = b.split_at(b.len().saturating_sub(16));
    let sign = if tail[0] & 0x80 != 0 { 0xff } else { 0x00 };
    if head.iter().any(|&x| x != sign) {
        return Err(DecodeError::InvalidDecimal(format!(
            "{field}: {} bytes do not fit 128 bits",
            b.len()
        )));
    }
    let mut buf = [sign; 16];
    buf[16 - tail.len()..].copy_from_slice(tail);
    let unscaled = i128::from_be_bytes(buf);
    Decimal::try_from_i128_with_scale(unscaled, SCALE)
        .map_err(|e| DecodeError::InvalidDecimal(format!("{field}: {e}")))
}

fn decimal_value(d: &Decimal) -> Value {
    let (b, start) = unscaled_bytes(decimal_unscaled(d));
    Value::Decimal(apache_avro::Decimal::from(b[start..].to_vec()))
}

/// Rewrites every decimal in `v` (recursively) through `f`.
fn map_decimals(v: Value, f: &impl Fn(Vec<u8>) -> Vec<u8>) -> Value {
    match v {
        Value::Decimal(d) => match <Vec<u8>>::try_from(&d) {
            Ok(b) => Value::Decimal(apache_avro::Decimal::from(f(b))),
            Err(_) => Value::Decimal(d),
        },
        Value::Union(i, inner) => Value::Union(i, Box::new(map_decimals(*inner, f))),
        Value::Record(fields) => Value::Record(
            fields
                .into_iter()
                .map(|(n, x)| (n, map_decimals(x, f)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|x| map_decimals(x, f)).collect())
        }
        Value::Map(m) => Value::Map(
            m.into_iter()
                .map(|(k, x)| (k, map_decimals(x, f)))
                .collect(),
        ),
        other => other,
    }
}

/// Sign-extends every bytes-backed decimal to at least 16 bytes.
///
/// `apache_avro` 0.21 `Value::resolve` rejects a bytes-backed decimal whose
/// byte length could not hold the schema's full precision (e.g. the minimal
/// 3-byte encoding of 0.001234567 against `decimal(18, 9)`), although the
/// Avro spec allows any length. Widening first (16 bytes hold 38 digits)
/// keeps resolution working; the value is unchanged.
pub(crate) fn widen_decimals(v: Value) -> Value {
    map_decimals(v, &|b: Vec<u8>| {
        if b.len() >= 16 {
            return b;
        }
        let sign = if b.first().is_some_and(|x| x & 0x80 != 0) {
            0xff
        } else {
            0x00
        };
        let mut out = vec![sign; 16 - b.len()];
        out.extend_from_slice(&b);
        out
    })
}

/// Undoes [`widen_decimals`]: minimal two's-complement bytes again.
pub(crate) fn narrow_decimals(v: Value) -> Value {
    map_decimals(v, &|b: Vec<u8>| {
        let mut start = 0;
        while start + 1 < b.len() {
            let redundant = (b[start] == 0x00 && b[start + 1] & 0x80 == 0)
                || (b[start] == 0xff && b[start + 1] & 0x80 != 0);
            if !redundant {
                break;
            }
            start += 1;
        }
        b[start..].to_vec()
    })
}

fn opt_string_value(v: &Option<String>) -> Value {
    match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn string_array_value(v: &[String]) -> Value {
    Value::Array(v.iter().cloned().map(Value::String).collect())
}

fn ts_value(t: &DateTime<Utc>) -> Value {
    Value::TimestampMicros(t.timestamp_micros())
}

fn envelope_values(
    event_id: &Uuid,
    occurred_at: &DateTime<Utc>,
    tenant_id: &str,
    opts: [&Option<String>; 3],
    source: &str,
    tags: &BTreeMap<String, String>,
) -> Vec<(String, Value)> {
    let tags: HashMap<String, Value> = tags
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    vec![
        ("event_id".into(), Value::Uuid(*event_id)),
        ("occurred_at".into(), ts_value(occurred_at)),
        ("tenant_id".into(), Value::String(tenant_id.into())),
        ("team_id".into(), opt_string_value(opts[0])),
        ("project_id".into(), opt_string_value(opts[1])),
        ("user_id".into(), opt_string_value(opts[2])),
        ("source".into(), Value::String(source.into())),
        ("tags".into(), Value::Map(tags)),
    ]
}

fn wrong_type(field: &str, want: &str, got: &Value) -> DecodeError {
    DecodeError::Avro(format!("field `{field}`: expected {want}, got {got:?}"))
}

/// The fields of a record value, taken out by name.
struct Fields {
    fields: Vec<(String, Value)>,
    cursor: usize,
}

impl Fields {
    fn new(v: Value) -> Result<Self, DecodeError> {
        match v {
            Value::Record(fields) => Ok(Fields { fields, cursor: 0 }),
            other => Err(wrong_type("<root>", "a record", &other)),
        }
    }

    /// Takes field `name`; fields are usually asked for in schema order, so
    /// the search starts where the last one was found.
    fn take(&mut self, name: &'static str) -> Result<Value, DecodeError> {
        let n = self.fields.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if self.fields[i].0 == name {
                self.cursor = i + 1;
                return Ok(std::mem::replace(&mut self.fields[i].1, Value::Null));
            }
        }
        Err(DecodeError::MissingField(name.to_string()))
    }

    fn string(&mut self, name: &'static str) -> Result<String, DecodeError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            Value::Uuid(u) => Ok(u.to_string()),
            other => Err(wrong_type(name, "a string", &other)),
        }
    }

    fn opt_string(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Err(wrong_type(name, "null or a string", &other)),
        }
    }

    fn long(&mut self, name: &'static str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::Long(x) => Ok(x),
            Value::Int(x) => Ok(i64::from(x)),
            other => Err(wrong_type(name, "a long", &other)),
        }
    }

    fn boolean(&mut self, name: &'static str) -> Result<bool, DecodeError> {
        match self.take(name)? {
            Value::Boolean(b) => Ok(b),
            other => Err(wrong_type(name, "a boolean", &other)),
        }
    }

    fn uuid(&mut self, name: &'static str) -> Result<Uuid, DecodeError> {
        match self.take(name)? {
            Value::Uuid(u) => Ok(u),
            Value::String(s) => {
                Uuid::parse_str(&s).map_err(|e| DecodeError::InvalidUuid(format!("{name}: {e}")))
            }
            other => Err(wrong_type(name, "a uuid", &other)),
        }
    }

    fn timestamp(&mut self, name: &'static str) -> Result<DateTime<Utc>, DecodeError> {
        let t = match self.take(name)? {
            Value::TimestampMicros(m) | Value::Long(m) => DateTime::from_timestamp_micros(m),
            Value::TimestampMillis(m) => DateTime::from_timestamp_millis(m),
            other => return Err(wrong_type(name, "a timestamp", &other)),
        };
        t.ok_or_else(|| DecodeError::InvalidTimestamp(format!("{name}: out of range")))
    }

    fn decimal(&mut self, name: &'static str) -> Result<Decimal, DecodeError> {
        decimal_of(name, self.take(name)?)
    }

    fn opt_decimal(&mut self, name: &'static str) -> Result<Option<Decimal>, DecodeError> {
        match unwrap_union(self.take(name)?) {
            Value::Null => Ok(None),
            other => decimal_of(name, other).map(Some),
        }
    }

    fn symbol<E>(
        &mut self,
        name: &'static str,
        parse: fn(&str) -> Option<E>,
    ) -> Result<E, DecodeError> {
        match self.take(name)? {
            Value::Enum(_, s) | Value::String(s) => {
                parse(&s).ok_or_else(|| DecodeError::UnknownEnumSymbol {
                    field: name.to_string(),
                    value: s,
                })
            }
            other => Err(wrong_type(name, "an enum symbol", &other)),
        }
    }

    fn string_map(&mut self, name: &'static str) -> Result<BTreeMap<String, String>, DecodeError> {
        match self.take(name)? {
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => Err(wrong_type(name, "string map values", &other)),
                })
                .collect(),
            other => Err(wrong_type(name, "a map", &other)),
        }
    }

    fn string_array(&mut self, name: &'static str) -> Result<Vec<String>, DecodeError> {
        match self.take(name)? {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(wrong_type(name, "string items", &other)),
                })
                .collect(),
            other => Err(wrong_type(name, "an array", &other)),
        }
    }
}

fn unwrap_union(v: Value) -> Value {
    match v {
        Value::Union(_, inner) => *inner,
        other => other,
    }
}

fn decimal_of(name: &str, v: Value) -> Result<Decimal, DecodeError> {
    match v {
        Value::Decimal(d) => {
            let bytes = <Vec<u8>>::try_from(&d)
                .map_err(|e| DecodeError::InvalidDecimal(format!("{name}: {e}")))?;
            decimal_from_bytes(&bytes, name)
        }
        Value::Bytes(b) | Value::Fixed(_, b) => decimal_from_bytes(&b, name),
        other => Err(wrong_type(name, "a decimal", &other)),
    }
}

impl AvroRecord for UsageEvent {
    fn to_avro_value(&self) -> Value {
        let mut f = envelope_values(
            &self.event_id,
            &self.occurred_at,
            &self.tenant_id,
            [&self.team_id, &self.project_id, &self.user_id],
            &self.source,
            &self.tags,
        );
        let long = |x: i64| Value::Long(x);
        f.extend([
            ("request_id".into(), Value::String(self.request_id.clone())),
            ("provider".into(), Value::String(self.provider.clone())),
            ("model".into(), Value::String(self.model.clone())),
            ("input_tokens".into(), long(self.input_tokens)),
            ("cached_input_tokens".into(), long(self.cached_input_tokens)),
            ("cache_write_tokens".into(), long(self.cache_write_tokens)),
            ("output_tokens".into(), long(self.output_tokens)),
            ("reasoning_tokens".into(), long(self.reasoning_tokens)),
            ("latency_ms".into(), long(self.latency_ms)),
            (
                "status".into(),
                Value::Enum(self.status.index(), self.status.as_str().into()),
            ),
            (
                "reported_cost".into(),
                match &self.reported_cost {
                    Some(d) => Value::Union(1, Box::new(decimal_value(d))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("currency".into(), Value::String(self.currency.clone())),
            ("region".into(), opt_string_value(&self.region)),
        ]);
        Value::Record(f)
    }

    fn from_avro_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(v)?;
        Ok(UsageEvent {
            event_id: f.uuid("event_id")?,
            occurred_at: f.timestamp("occurred_at")?,
            tenant_id: f.string("tenant_id")?,
            team_id: f.opt_string("team_id")?,
            project_id: f.opt_string("project_id")?,
            user_id: f.opt_string("user_id")?,
            source: f.string("source")?,
            tags: f.string_map("tags")?,
            request_id: f.string("request_id")?,
            provider: f.string("provider")?,
            model: f.string("model")?,
            input_tokens: f.long("input_tokens")?,
            cached_input_tokens: f.long("cached_input_tokens")?,
            cache_write_tokens: f.long("cache_write_tokens")?,
            output_tokens: f.long("output_tokens")?,
            reasoning_tokens: f.long("reasoning_tokens")?,
            latency_ms: f.long("latency_ms")?,
            status: f.symbol("status", UsageStatus::from_symbol)?,
            reported_cost: f.opt_decimal("reported_cost")?,
            currency: f.string("currency")?,
            region: match f.opt_string("region") {
                Err(DecodeError::MissingField(_)) => None,
                other => other?,
            },
        })
    }

    fn decode_fast(layout: FastLayout, body: &[u8]) -> Option<Result<Self, DecodeError>> {
        Some(crate::fast::decode_usage(layout, body))
    }

    fn encode_fast(&self, out: &mut Vec<u8>) -> bool {
        crate::fast::encode_usage(self, out);
        true
    }
}

impl AvroRecord for PolicyDecision {
    fn to_avro_value(&self) -> Value {
        let mut f = envelope_values(
            &self.event_id,
            &self.occurred_at,
            &self.tenant_id,
            [&self.team_id, &self.project_id, &self.user_id],
            &self.source,
            &self.tags,
        );
        f.extend([
            (
                "decision_id".into(),
                Value::String(self.decision_id.clone()),
            ),
            ("request_id".into(), Value::String(self.request_id.clone())),
            ("policy_id".into(), Value::String(self.policy_id.clone())),
            (
                "policy_version".into(),
                Value::String(self.policy_version.clone()),
            ),
            (
                "decision".into(),
                Value::Enum(self.decision.index(), self.decision.as_str().into()),
            ),
            (
                "enforcement".into(),
                Value::Enum(self.enforcement.index(), self.enforcement.as_str().into()),
            ),
            (
                "severity".into(),
                Value::Enum(self.severity.index(), self.severity.as_str().into()),
            ),
            ("rule_ids".into(), string_array_value(&self.rule_ids)),
            ("reason".into(), Value::String(self.reason.clone())),
            ("evaluation_ms".into(), Value::Long(self.evaluation_ms)),
        ]);
        Value::Record(f)
    }

    fn from_avro_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(v)?;
        Ok(PolicyDecision {
            event_id: f.uuid("event_id")?,
            occurred_at: f.timestamp("occurred_at")?,
            tenant_id: f.string("tenant_id")?,
            team_id: f.opt_string("team_id")?,
            project_id: f.opt_string("project_id")?,
            user_id: f.opt_string("user_id")?,
            source: f.string("source")?,
            tags: f.string_map("tags")?,
            decision_id: f.string("decision_id")?,
            request_id: f.string("request_id")?,
            policy_id: f.string("policy_id")?,
            policy_version: f.string("policy_version")?,
            decision: f.symbol("decision", Decision::from_symbol)?,
            enforcement: f.symbol("enforcement", Enforcement::from_symbol)?,
            severity: f.symbol("severity", Severity::from_symbol)?,
            rule_ids: f.string_array("rule_ids")?,
            reason: f.string("reason")?,
            evaluation_ms: f.long("evaluation_ms")?,
        })
    }
}

impl AvroRecord for AuditEvent {
    fn to_avro_value(&self) -> Value {
        let mut f = envelope_values(
            &self.event_id,
            &self.occurred_at,
            &self.tenant_id,
            [&self.team_id, &self.project_id, &self.user_id],
            &self.source,
            &self.tags,
        );
        f.extend([
            (
                "actor_type".into(),
                Value::Enum(self.actor_type.index(), self.actor_type.as_str().into()),
            ),
            ("actor_id".into(), Value::String(self.actor_id.clone())),
            ("action".into(), Value::String(self.action.clone())),
            (
                "resource_type".into(),
                Value::String(self.resource_type.clone()),
            ),
            (
                "resource_id".into(),
                Value::String(self.resource_id.clone()),
            ),
            (
                "outcome".into(),
                Value::Enum(self.outcome.index(), self.outcome.as_str().into()),
            ),
            ("ip".into(), opt_string_value(&self.ip)),
            ("user_agent".into(), opt_string_value(&self.user_agent)),
            ("details".into(), Value::String(self.details.clone())),
            ("personal_data".into(), Value::Boolean(self.personal_data)),
        ]);
        Value::Record(f)
    }

    fn from_avro_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(v)?;
        Ok(AuditEvent {
            event_id: f.uuid("event_id")?,
            occurred_at: f.timestamp("occurred_at")?,
            tenant_id: f.string("tenant_id")?,
            team_id: f.opt_string("team_id")?,
            project_id: f.opt_string("project_id")?,
            user_id: f.opt_string("user_id")?,
            source: f.string("source")?,
            tags: f.string_map("tags")?,
            actor_type: f.symbol("actor_type", ActorType::from_symbol)?,
            actor_id: f.string("actor_id")?,
            action: f.string("action")?,
            resource_type: f.string("resource_type")?,
            resource_id: f.string("resource_id")?,
            outcome: f.symbol("outcome", Outcome::from_symbol)?,
            ip: f.opt_string("ip")?,
            user_agent: f.opt_string("user_agent")?,
            details: f.string("details")?,
            personal_data: f.boolean("personal_data")?,
        })
    }
}

impl AvroRecord for ComplianceViolation {
    fn to_avro_value(&self) -> Value {
        Value::Record(vec![
            ("violation_id".into(), Value::Uuid(self.violation_id)),
            ("rule".into(), Value::String(self.rule.clone())),
            (
                "severity".into(),
                Value::Enum(self.severity.index(), self.severity.as_str().into()),
            ),
            ("tenant_id".into(), Value::String(self.tenant_id.clone())),
            (
                "subject_type".into(),
                Value::String(self.subject_type.clone()),
            ),
            ("subject_id".into(), Value::String(self.subject_id.clone())),
            ("window_start".into(), ts_value(&self.window_start)),
            ("window_end".into(), ts_value(&self.window_end)),
            ("observed".into(), decimal_value(&self.observed)),
            ("threshold".into(), decimal_value(&self.threshold)),
            (
                "evidence_event_ids".into(),
                string_array_value(&self.evidence_event_ids),
            ),
            ("detected_at".into(), ts_value(&self.detected_at)),
            ("message".into(), Value::String(self.message.clone())),
        ])
    }

    fn from_avro_value(v: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(v)?;
        Ok(ComplianceViolation {
            violation_id: f.uuid("violation_id")?,
            rule: f.string("rule")?,
            severity: f.symbol("severity", Severity::from_symbol)?,
            tenant_id: f.string("tenant_id")?,
            subject_type: f.string("subject_type")?,
            subject_id: f.string("subject_id")?,
            window_start: f.timestamp("window_start")?,
            window_end: f.timestamp("window_end")?,
            observed: f.decimal("observed")?,
            threshold: f.decimal("threshold")?,
            evidence_event_ids: f.string_array("evidence_event_ids")?,
            detected_at: f.timestamp("detected_at")?,
            message: f.string("message")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_bytes_round_trip() {
        for s in [
            "0",
            "1",
            "-1",
            "0.000000001",
            "-0.000000001",
            "123.456",
            "-999999999.999999999",
            "9999999999999999999.999999999",
        ] {
            let d: Decimal = s.parse().unwrap();
            let (b, start) = unscaled_bytes(decimal_unscaled(&d));
            let back = decimal_from_bytes(&b[start..], "x").unwrap();
            assert_eq!(back, d, "{s}");
        }
        assert_eq!(unscaled_bytes(0).1, 15);
        // Found by the fuzzer: the fast path read no bytes as 0, apache_avro refuses them.
        assert_eq!(
            decimal_from_bytes(&[], "x").unwrap_err().class(),
            "invalid_decimal"
        );
        assert_eq!(unscaled_bytes(127).1, 15);
        assert_eq!(unscaled_bytes(128).1, 14);
        assert_eq!(unscaled_bytes(-128).1, 15);
        assert_eq!(unscaled_bytes(-129).1, 14);
        let mut long = vec![0u8; 4];
        long.extend_from_slice(&5i128.to_be_bytes());
        assert_eq!(decimal_from_bytes(&long, "x").unwrap(), Decimal::new(5, 9));
        long[0] = 1;
        assert_eq!(
            decimal_from_bytes(&long, "x").unwrap_err().class(),
            "invalid_decimal"
        );
        // 2^100 unscaled does not fit rust_decimal's 96-bit mantissa.
        let big = (1i128 << 100).to_be_bytes();
        assert_eq!(
            decimal_from_bytes(&big, "x").unwrap_err().class(),
            "invalid_decimal"
        );
    }
}
