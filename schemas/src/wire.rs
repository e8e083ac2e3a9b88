//! Wire formats: Confluent framing (`0x00` + 4-byte big-endian schema id),
//! Avro single-object encoding (`0xC3 0x01` + 8-byte little-endian
//! fingerprint) and JSON; format detection and the encoders.

use crate::avro::{narrow_decimals, widen_decimals};
use crate::registry::{rabin_fingerprint, record_name, Registry};
use crate::{DecodeError, Event};
use apache_avro::Schema;

/// Single-object encoding marker.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Confluent wire-format marker.
pub const CONFLUENT_MAGIC: u8 = 0x00;
/// Header length of the Confluent framing.
pub const CONFLUENT_HEADER_LEN: usize = 5;
/// Header length of single-object encoding.
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// The framing of a payload, as told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Confluent Schema Registry framing; the Avro body starts at byte 5.
    Confluent { schema_id: u32 },
    /// Avro single-object encoding; the Avro body starts at byte 10.
    SingleObject { fingerprint: u64 },
    /// A JSON object.
    Json,
}

/// Tells the wire format of `payload` from its first bytes.
///
/// An empty or whitespace-only payload is [`DecodeError::Empty`]; a header
/// cut short is [`DecodeError::Truncated`]; any other first byte is
/// [`DecodeError::WrongMagic`].
pub fn detect(payload: &[u8]) -> Result<WireFormat, DecodeError> {
    let Some(&first) = payload.first() else {
        return Err(DecodeError::Empty);
    };
    match first {
        CONFLUENT_MAGIC => {
            let id = payload
                .get(1..CONFLUENT_HEADER_LEN)
                .ok_or(DecodeError::Truncated {
                    what: "confluent header",
                    offset: payload.len(),
                })?;
            let mut b = [0u8; 4];
            b.copy_from_slice(id);
            Ok(WireFormat::Confluent {
                schema_id: u32::from_be_bytes(b),
            })
        }
        0xC3 if payload.get(1) == Some(&SINGLE_OBJECT_MAGIC[1]) || payload.len() == 1 => {
            let fp = payload
                .get(2..SINGLE_OBJECT_HEADER_LEN)
                .ok_or(DecodeError::Truncated {
                    what: "single-object header",
                    offset: payload.len(),
                })?;
            let mut b = [0u8; 8];
            b.copy_from_slice(fp);
            Ok(WireFormat::SingleObject {
                fingerprint: u64::from_le_bytes(b),
            })
        }
        _ => match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(WireFormat::Json),
            Some(&b) => Err(DecodeError::WrongMagic(b)),
            None => Err(DecodeError::Empty),
        },
    }
}

/// Appends the Avro body of `e` in the current schema of its subject.
pub(crate) fn write_body<T: Event>(e: &T, out: &mut Vec<u8>) {
    if e.encode_fast(out) {
        return;
    }
    let schema = &Registry::get().current(T::SUBJECT).schema;
    // The bundled schema and `to_avro_value` are tested to agree, so this
    // only fails on a programming error in this crate.
    let body = apache_avro::to_avro_datum(schema, e.to_avro_value())
        .unwrap_or_else(|err| panic!("{} value does not fit its schema: {err}", T::SUBJECT));
    out.extend_from_slice(&body);
}

/// Avro single-object encoding of `e` with the current schema of its subject.
pub fn encode_single_object<T: Event>(e: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    let fp = Registry::get().current(T::SUBJECT).fingerprint;
    out.extend_from_slice(&fp.to_le_bytes());
    write_body(e, &mut out);
    out
}

/// Confluent framing of `e` with the current schema of its subject, which
/// the caller has registered under `schema_id`.
pub fn encode_confluent<T: Event>(e: &T, schema_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    write_body(e, &mut out);
    out
}

/// Avro body of `e` written with an arbitrary writer schema of the same
/// record (e.g. an older version); fields the writer lacks are dropped and
/// fields only the writer has take its defaults.
pub fn encode_avro_body_with<T: Event>(e: &T, writer: &Schema) -> Result<Vec<u8>, DecodeError> {
    let reader = &Registry::get().current(T::SUBJECT).schema;
    if record_name(writer) != record_name(reader) {
        return Err(DecodeError::SchemaMismatch(format!(
            "writer record {:?} is not {:?}",
            record_name(writer),
            record_name(reader)
        )));
    }
    let value = widen_decimals(e.to_avro_value())
        .resolve(writer)
        .map_err(|err| DecodeError::SchemaMismatch(err.to_string()))?;
    apache_avro::to_avro_datum(writer, narrow_decimals(value))
        .map_err(|err| DecodeError::Avro(err.to_string()))
}

/// Single-object encoding of `e` with the given writer schema text (for
/// schema-evolution tests and producers pinned to an older version).
pub fn encode_single_object_with<T: Event>(
    e: &T,
    schema_text: &str,
) -> Result<Vec<u8>, DecodeError> {
    let writer =
        Schema::parse_str(schema_text).map_err(|err| DecodeError::Avro(err.to_string()))?;
    let body = encode_avro_body_with(e, &writer)?;
    let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + body.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&rabin_fingerprint(&writer).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Confluent framing of `e` with the given writer schema text, registered by
/// the caller under `schema_id`.
pub fn encode_confluent_with<T: Event>(
    e: &T,
    schema_id: u32,
    schema_text: &str,
) -> Result<Vec<u8>, DecodeError> {
    let writer =
        Schema::parse_str(schema_text).map_err(|err| DecodeError::Avro(err.to_string()))?;
    let body = encode_avro_body_with(e, &writer)?;
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + body.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect(&[0, 0, 0, 1, 7, 9]).unwrap(),
            WireFormat::Confluent { schema_id: 263 }
        );
        let mut so = vec![0xC3, 0x01];
        so.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(
            detect(&so).unwrap(),
            WireFormat::SingleObject { fingerprint: 42 }
        );
        assert_eq!(detect(b"  \n{\"a\":1}").unwrap(), WireFormat::Json);
        assert_eq!(detect(b"").unwrap_err(), DecodeError::Empty);
        assert_eq!(detect(b"  ").unwrap_err(), DecodeError::Empty);
        assert_eq!(detect(b"[1]").unwrap_err(), DecodeError::WrongMagic(b'['));
        assert_eq!(detect(&[0xC3, 0x02]).unwrap_err().class(), "wrong_magic");
        assert_eq!(detect(&[0, 0, 1]).unwrap_err().class(), "truncated");
        assert_eq!(detect(&[0xC3]).unwrap_err().class(), "truncated");
        assert_eq!(detect(&so[..9]).unwrap_err().class(), "truncated");
    }
}
