//! [`Decoder`]: detects the wire format, finds the writer schema (bundled
//! versions by fingerprint, Confluent ids as registered), decodes — through
//! the hand-written fast path when the writer schema is a bundled layout,
//! otherwise through `apache_avro` schema resolution — and validates.

use crate::bounds::{self, Names};
use crate::error::from_avro_decode_error;
use crate::fast::FastLayout;
use crate::json::decode_json;
use crate::registry::{record_name, strict_key, Registry};
use crate::wire::{detect, WireFormat, CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN};
use crate::{DecodeError, Event};
use apache_avro::Schema;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A parsed writer schema, ready for decoding.
#[derive(Debug)]
struct Writer {
    schema: Schema,
    /// Its named types, for the bounds check of the general path.
    names: Names,
    /// Full record name, to reject other subjects early.
    name: Option<String>,
    /// Hand-written decoder for this exact layout, if any.
    fast: Option<FastLayout>,
    /// Subject whose current schema this is exactly (no resolution needed).
    current_of: Option<&'static str>,
}

impl Writer {
    fn new(schema: Schema) -> Self {
        let reg = Registry::get();
        let key = strict_key(&schema);
        let same = reg.all.iter().find(|b| b.strict == key);
        let fast = same.and_then(|b| FastLayout::of(b.subject, b.version));
        let current_of = same
            .filter(|b| reg.current(b.subject).version == b.version)
            .map(|b| b.subject);
        Writer {
            name: record_name(&schema),
            names: Names::of(&schema),
            schema,
            fast,
            current_of,
        }
    }
}

/// Decodes payloads of any supported wire format into validated events.
///
/// `Send + Sync`; share one in an `Arc`. Schemas are parsed once: bundled
/// ones at construction, Confluent ones at registration.
#[derive(Debug)]
pub struct Decoder {
    by_fingerprint: HashMap<u64, Arc<Writer>>,
    confluent: RwLock<HashMap<u32, Arc<Writer>>>,
    fast_path: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder that knows every bundled version of every subject by its
    /// single-object fingerprint, and no Confluent ids yet.
    pub fn new() -> Self {
        let by_fingerprint = Registry::get()
            .all
            .iter()
            .map(|b| (b.fingerprint, Arc::new(Writer::new(b.schema.clone()))))
            .collect();
        Decoder {
            by_fingerprint,
            confluent: RwLock::new(HashMap::new()),
            fast_path: true,
        }
    }

    /// Turns the hand-written fast path off, so every Avro payload goes
    /// through `apache_avro` values (for benchmarks and equivalence tests).
    pub fn without_fast_path(mut self) -> Self {
        self.fast_path = false;
        self
    }

    /// Whether Confluent schema `id` has been registered.
    pub fn has_confluent_schema(&self, id: u32) -> bool {
        self.confluent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Parses `schema_json` once and caches it as Confluent schema `id`
    /// (replacing any earlier registration of `id`).
    pub fn register_confluent_schema(&self, id: u32, schema_json: &str) -> Result<(), DecodeError> {
        let schema =
            Schema::parse_str(schema_json).map_err(|e| DecodeError::Avro(e.to_string()))?;
        let writer = Arc::new(Writer::new(schema));
        self.confluent
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, writer);
        Ok(())
    }

    /// Detects the format, decodes and validates one payload.
    pub fn decode<T: Event>(&self, payload: &[u8]) -> Result<T, DecodeError> {
        let event = match detect(payload)? {
            WireFormat::Json => decode_json::<T>(payload)?,
            WireFormat::SingleObject { fingerprint } => {
                let writer = self
                    .by_fingerprint
                    .get(&fingerprint)
                    .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
                self.decode_avro(writer, &payload[SINGLE_OBJECT_HEADER_LEN..])?
            }
            WireFormat::Confluent { schema_id } => {
                let writer = self
                    .confluent
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&schema_id)
                    .cloned()
                    .ok_or(DecodeError::UnknownSchemaId(schema_id))?;
                self.decode_avro(&writer, &payload[CONFLUENT_HEADER_LEN..])?
            }
        };
        event.validate()?;
        Ok(event)
    }

    fn decode_avro<T: Event>(&self, writer: &Writer, body: &[u8]) -> Result<T, DecodeError> {
        let reader = Registry::get().current(T::SUBJECT);
        if writer.name != reader.name {
            return Err(DecodeError::SchemaMismatch(format!(
                "writer record {:?} cannot be read as {:?} ({})",
                writer.name,
                reader.name,
                T::SUBJECT
            )));
        }
        if self.fast_path {
            if let Some(layout) = writer.fast {
                if let Some(result) = T::decode_fast(layout, body) {
                    return result;
                }
            }
        }
        decode_with_values::<T>(
            writer,
            writer.current_of == Some(T::SUBJECT),
            &reader.schema,
            body,
        )
    }
}

/// A byte-slice reader that remembers whether anyone read past its end.
struct EofWatch<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl std::io::Read for EofWatch<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.rest.is_empty() && !out.is_empty() {
            self.hit_eof = true;
            return Ok(0);
        }
        let n = out.len().min(self.rest.len());
        out[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

/// The general path: check the body's bounds, decode with the writer schema into a
/// `Value`, resolve it to the reader schema unless they are the same, then map to `T`.
fn decode_with_values<T: Event>(
    writer: &Writer,
    writer_is_reader: bool,
    reader: &Schema,
    body: &[u8],
) -> Result<T, DecodeError> {
    bounds::check(&writer.schema, &writer.names, body)?;
    let writer = &writer.schema;
    let mut cursor = EofWatch {
        rest: body,
        hit_eof: false,
    };
    let decoded = apache_avro::from_avro_datum(writer, &mut cursor, None);
    if cursor.hit_eof {
        // Running out of bytes wins over whatever apache_avro made of it: it
        // reads a union index cut off by the end of input as `null`, and
        // reports some short reads as type errors.
        return Err(DecodeError::Truncated {
            what: "avro body",
            offset: body.len(),
        });
    }
    let value = decoded.map_err(|e| from_avro_decode_error(e, body.len()))?;
    if !cursor.rest.is_empty() {
        return Err(DecodeError::Avro(format!(
            "{} trailing bytes after the record",
            cursor.rest.len()
        )));
    }
    let value = if writer_is_reader {
        value
    } else {
        crate::avro::widen_decimals(value)
            .resolve(reader)
            .map_err(|e| DecodeError::SchemaMismatch(e.to_string()))?
    };
    T::from_avro_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn decoder_is_send_and_sync() {
        assert_send_sync::<Decoder>();
    }

    #[test]
    fn bundled_current_usage_is_fast_and_current() {
        let reg = Registry::get();
        let b = reg.current("llm.usage.v1");
        let w = Writer::new(b.schema.clone());
        assert_eq!(w.fast, Some(FastLayout::UsageV2));
        assert_eq!(w.current_of, Some("llm.usage.v1"));
        let v1 = reg.version("llm.usage.v1", 1).unwrap();
        let w = Writer::new(v1.schema.clone());
        assert_eq!(w.fast, Some(FastLayout::UsageV1));
        assert_eq!(w.current_of, None);
        let p = Writer::new(reg.current("policy.decision.v1").schema.clone());
        assert_eq!(p.fast, None);
        assert_eq!(p.current_of, Some("policy.decision.v1"));
    }
}
