//! JSON representation helpers: serde adapters for timestamps (RFC 3339),
//! UUIDs and decimals (emitted as strings, accepted as strings or numbers),
//! plus the JSON encode/decode entry points.
//!
//! Decode errors produced here carry a marker that [`crate::error`] maps back
//! to the precise [`DecodeError`] variant.

use crate::error::{from_json_error, marked};
use crate::{DecodeError, Event};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;
use std::str::FromStr;

/// Serializes `e` as compact JSON (field names equal the Avro field names).
pub fn encode_json<T: Event>(e: &T) -> Vec<u8> {
    // Serialization of these plain structs cannot fail: every map key is a String.
    serde_json::to_vec(e).unwrap_or_default()
}

/// Parses JSON into `T` and maps failures onto [`DecodeError`] (no validation).
pub(crate) fn decode_json<T: Event>(payload: &[u8]) -> Result<T, DecodeError> {
    let Ok(text) = std::str::from_utf8(payload) else {
        return Err(DecodeError::InvalidUtf8);
    };
    // From the validated text: serde_json then skips checking each string again.
    serde_json::from_str(text).map_err(|e| from_json_error(&e))
}

/// RFC 3339 timestamps, always in UTC with a `Z` suffix.
pub(crate) mod ts {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DateTime<Utc>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| E::custom(marked("invalid_timestamp", v, &e.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// UUIDs as hyphenated strings.
pub(crate) mod uuid_str {
    use super::*;
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(u.as_hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Uuid;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a UUID string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Uuid::parse_str(v).map_err(|e| E::custom(marked("invalid_uuid", v, &e.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct DecimalVisitor;

impl Visitor<'_> for DecimalVisitor {
    type Value = Decimal;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a decimal as a string or a number")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
        let t = v.trim();
        Decimal::from_str_exact(t)
            .or_else(|_| Decimal::from_scientific(t))
            .map_err(|e| E::custom(marked("invalid_decimal", v, &e.to_string())))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
        Ok(Decimal::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
        Ok(Decimal::from(v))
    }
    /// JSON numbers with a fraction arrive as `f64` (serde_json is built
    /// without `arbitrary_precision`). No arithmetic is done: the shortest
    /// round-trip text of the double is parsed as a decimal, which restores
    /// the sender's digits exactly for up to 15 significant digits. Senders
    /// that need more should send strings (as `encode_json` does).
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
        let text = v.to_string();
        Decimal::from_str(&text)
            .or_else(|_| Decimal::from_scientific(&text))
            .map_err(|e| E::custom(marked("invalid_decimal", &text, &e.to_string())))
    }
}

/// Decimals: emitted as strings, accepted as strings or numbers.
pub(crate) mod decimal {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&d.normalize())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        d.deserialize_any(DecimalVisitor)
    }
}

/// Optional decimals: `null`/absent is `None`.
pub(crate) mod opt_decimal {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&d.normalize()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<Decimal>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("null or a decimal")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_any(DecimalVisitor).map(Some)
            }
        }
        d.deserialize_option(V)
    }
}

/// Parses a decimal from text.
#[cfg(test)]
pub(crate) fn parse_decimal(text: &str) -> Result<Decimal, DecodeError> {
    Decimal::from_str_exact(text.trim()).map_err(|e| DecodeError::InvalidDecimal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct D {
        #[serde(with = "decimal")]
        d: Decimal,
        #[serde(default, with = "opt_decimal")]
        o: Option<Decimal>,
    }

    #[test]
    fn decimals_accept_strings_and_numbers() {
        let v: D = serde_json::from_str(r#"{"d":"1.000000001","o":0.1}"#).unwrap();
        assert_eq!(v.d, parse_decimal("1.000000001").unwrap());
        assert_eq!(v.o, Some(parse_decimal("0.1").unwrap()));
        let v: D = serde_json::from_str(r#"{"d":12,"o":null}"#).unwrap();
        assert_eq!(v.d, Decimal::from(12));
        assert_eq!(v.o, None);
        let v: D = serde_json::from_str(r#"{"d":"1e-3"}"#).unwrap();
        assert_eq!(v.d, parse_decimal("0.001").unwrap());
        let e = serde_json::from_str::<D>(r#"{"d":"abc"}"#).unwrap_err();
        assert_eq!(from_json_error(&e).class(), "invalid_decimal");
    }
}
