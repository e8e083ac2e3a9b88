//! The one error type of this crate, [`DecodeError`], with stable class names
//! for metrics and dead-letter routing, and the mapping from `serde_json` and
//! `apache_avro` errors onto it.

use std::io;

/// Why a payload could not be turned into a valid event.
///
/// [`DecodeError::class`] gives a stable snake_case name per variant; use it
/// for metric labels and dead-letter reasons (the `Display` text is not stable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload has no bytes (or only whitespace).
    #[error("empty payload")]
    Empty,
    /// The first byte is no known wire-format marker.
    #[error("unknown wire format: first byte 0x{0:02x}")]
    WrongMagic(u8),
    /// The payload ended before `what` was complete.
    #[error("truncated {what}: ran out of bytes at offset {offset}")]
    Truncated {
        /// The part being read (a header or the Avro body).
        what: &'static str,
        /// Byte offset (within that part) at which more bytes were needed.
        offset: usize,
    },
    /// A Confluent schema id that was not registered with this decoder.
    #[error("confluent schema id {0} is not registered")]
    UnknownSchemaId(u32),
    /// A single-object fingerprint of no bundled schema version.
    #[error("unknown schema fingerprint 0x{0:016x}")]
    UnknownFingerprint(u64),
    /// The writer schema cannot be resolved to the reader's (e.g. another subject).
    #[error("writer schema does not match reader: {0}")]
    SchemaMismatch(String),
    /// A string is not valid UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// Malformed JSON, or JSON of the wrong shape.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(String),
    /// A uuid field does not hold a UUID.
    #[error("invalid uuid: {0}")]
    InvalidUuid(String),
    /// A timestamp that cannot be parsed, or lies outside the accepted range.
    #[error("invalid timestamp: {0}")]
    InvalidTimestamp(String),
    /// An enum symbol (or symbol index) this schema does not know.
    #[error("unknown symbol `{value}` for enum field `{field}`")]
    UnknownEnumSymbol {
        /// The field (or enum) name.
        field: String,
        /// The offending symbol or index.
        value: String,
    },
    /// A field that must not be negative is.
    #[error("field `{field}` must not be negative")]
    NegativeValue {
        /// The field name.
        field: &'static str,
    },
    /// A value too large to be plausible.
    #[error("field `{field}` has an absurd value {value}")]
    AbsurdValue {
        /// The field name.
        field: &'static str,
        /// The value (or its size) as text.
        value: String,
    },
    /// A required text field is empty.
    #[error("field `{field}` must not be empty")]
    EmptyField {
        /// The field name.
        field: &'static str,
    },
    /// A currency that is not three upper-case ASCII letters.
    #[error("invalid currency code {0:?}")]
    InvalidCurrency(String),
    /// A decimal that cannot be parsed or does not fit the schema's decimal.
    #[error("invalid decimal: {0}")]
    InvalidDecimal(String),
    /// Any other Avro decoding or schema error.
    #[error("avro: {0}")]
    Avro(String),
}

impl DecodeError {
    /// Stable snake_case name of the variant, e.g. `"missing_field"`.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::WrongMagic(_) => "wrong_magic",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::UnknownFingerprint(_) => "unknown_fingerprint",
            DecodeError::SchemaMismatch(_) => "schema_mismatch",
            DecodeError::InvalidUtf8 => "invalid_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::InvalidUuid(_) => "invalid_uuid",
            DecodeError::InvalidTimestamp(_) => "invalid_timestamp",
            DecodeError::UnknownEnumSymbol { .. } => "unknown_enum_symbol",
            DecodeError::NegativeValue { .. } => "negative_value",
            DecodeError::AbsurdValue { .. } => "absurd_value",
            DecodeError::EmptyField { .. } => "empty_field",
            DecodeError::InvalidCurrency(_) => "invalid_currency",
            DecodeError::InvalidDecimal(_) => "invalid_decimal",
            DecodeError::Avro(_) => "avro",
        }
    }

    /// Every class name [`DecodeError::class`] can return.
    pub const CLASSES: [&'static str; 18] = [
        "empty",
        "wrong_magic",
        "truncated",
        "unknown_schema_id",
        "unknown_fingerprint",
        "schema_mismatch",
        "invalid_utf8",
        "invalid_json",
        "missing_field",
        "invalid_uuid",
        "invalid_timestamp",
        "unknown_enum_symbol",
        "negative_value",
        "absurd_value",
        "empty_field",
        "invalid_currency",
        "invalid_decimal",
        "avro",
    ];
}

/// Marker that our own serde `Deserialize` code puts into custom error
/// messages, so that [`from_json_error`] can recover the precise variant.
const MARK: &str = "\u{1f}tally\u{1f}";
const END: char = '\u{1e}';

/// Builds a serde error message that [`from_json_error`] maps back to a class.
pub(crate) fn marked(class: &str, field: &str, value: &str) -> String {
    format!("{MARK}{class}\u{1f}{field}\u{1f}{value}{END}")
}

/// Text between the first and second backtick of `msg`, if any.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// Maps a `serde_json` error to the most specific [`DecodeError`].
pub(crate) fn from_json_error(err: &serde_json::Error) -> DecodeError {
    let msg = err.to_string();
    if let Some(pos) = msg.find(MARK) {
        let rest = &msg[pos + MARK.len()..];
        let rest = rest.split(END).next().unwrap_or(rest);
        let mut parts = rest.splitn(3, '\u{1f}');
        let class = parts.next().unwrap_or_default();
        let field = parts.next().unwrap_or_default().to_string();
        let value = parts.next().unwrap_or_default().to_string();
        return match class {
            "invalid_uuid" => DecodeError::InvalidUuid(format!("{field}: {value}")),
            "invalid_timestamp" => DecodeError::InvalidTimestamp(format!("{field}: {value}")),
            "invalid_decimal" => DecodeError::InvalidDecimal(format!("{field}: {value}")),
            "unknown_enum_symbol" => DecodeError::UnknownEnumSymbol { field, value },
            _ => DecodeError::InvalidJson(msg),
        };
    }
    if msg.starts_with("missing field") {
        if let Some(name) = backticked(&msg) {
            return DecodeError::MissingField(name.to_string());
        }
    }
    if msg.starts_with("unknown variant") {
        if let Some(value) = backticked(&msg) {
            return DecodeError::UnknownEnumSymbol {
                field: String::new(),
                value: value.to_string(),
            };
        }
    }
    DecodeError::InvalidJson(msg)
}

/// Whether `err` or any of its sources is an unexpected end of input.
fn is_eof(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::UnexpectedEof {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Maps an `apache_avro` error raised while *decoding* a datum.
pub(crate) fn from_avro_decode_error(err: apache_avro::Error, body_len: usize) -> DecodeError {
    use apache_avro::error::Details;
    if is_eof(&err) {
        return DecodeError::Truncated {
            what: "avro body",
            offset: body_len,
        };
    }
    match err.details() {
        Details::ConvertToUtf8(_) | Details::ConvertToUtf8Error(_) => DecodeError::InvalidUtf8,
        Details::ConvertStrToUuid(e) | Details::ConvertSliceToUuid(e) => {
            DecodeError::InvalidUuid(e.to_string())
        }
        Details::GetEnumValue { index, .. } => DecodeError::UnknownEnumSymbol {
            field: String::from("<enum>"),
            value: index.to_string(),
        },
        Details::GetEnumUnknownIndexValue => DecodeError::UnknownEnumSymbol {
            field: String::from("<enum>"),
            value: String::from("<out of range>"),
        },
        _ => DecodeError::Avro(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_unique_and_listed() {
        let mut seen = std::collections::BTreeSet::new();
        for c in DecodeError::CLASSES {
            assert!(seen.insert(c), "duplicate class {c}");
        }
        assert_eq!(DecodeError::Empty.class(), "empty");
        assert_eq!(DecodeError::Avro(String::new()).class(), "avro");
    }

    #[test]
    fn marked_message_round_trips() {
        let e = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert_eq!(from_json_error(&e).class(), "invalid_json");
        let m = marked("unknown_enum_symbol", "status", "bogus");
        let e = <serde_json::Error as serde::de::Error>::custom(m);
        assert_eq!(
            from_json_error(&e),
            DecodeError::UnknownEnumSymbol {
                field: "status".into(),
                value: "bogus".into()
            }
        );
    }
}
