//! Pre-flight check for the general Avro path: walks a body with its writer schema before
//! `apache_avro` decodes it, so that no length, block count or nesting in a hostile payload
//! can make the decoder allocate, loop or recurse beyond what the body's size allows.
//!
//! Why: `apache_avro` allocates a length's worth of bytes (up to 512 MiB) before reading a
//! string, and reserves a block count's worth of values (a map of 2^28 entries asks for
//! tens of GB and aborts the process) before reading the first one; a recursive schema
//! recurses once per byte. After this check every length and count fits in the bytes that
//! follow it, items that take no bytes are capped, and nesting is at most [`MAX_DEPTH`].

use crate::fast::Reader;
use crate::DecodeError;
use apache_avro::schema::{
    ArraySchema, DecimalSchema, FixedSchema, MapSchema, Name, Namespace, RecordSchema,
    ResolvedSchema,
};
use apache_avro::Schema;
use std::collections::HashMap;

/// Deepest nesting of records, arrays, maps and unions a body may use.
pub const MAX_DEPTH: usize = 64;
/// Most array items that take no bytes (nulls, empty records) a body may hold.
pub const MAX_EMPTY_ITEMS: usize = 1 << 12;

/// The named types of a writer schema, owned (looked up for `Schema::Ref`).
#[derive(Debug, Default)]
pub(crate) struct Names(HashMap<Name, Schema>);

impl Names {
    pub(crate) fn of(schema: &Schema) -> Self {
        match ResolvedSchema::try_from(schema) {
            Ok(r) => Names(
                r.get_names()
                    .iter()
                    .map(|(n, s)| (n.clone(), (*s).clone()))
                    .collect(),
            ),
            // apache_avro reports the same problem when it decodes.
            Err(_) => Names::default(),
        }
    }
}

/// Checks that `body` holds one datum of `schema` within the bounds above. Errors are
/// classified like the decoder's: a length or count past the end is `Truncated`.
pub(crate) fn check(schema: &Schema, names: &Names, body: &[u8]) -> Result<(), DecodeError> {
    let mut w = Walk {
        r: Reader::new(body),
        names,
        empty_items: 0,
    };
    w.datum(schema, &None, 0)
}

struct Walk<'a, 'n> {
    r: Reader<'a>,
    names: &'n Names,
    empty_items: usize,
}

impl Walk<'_, '_> {
    fn datum(&mut self, s: &Schema, ns: &Namespace, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::Avro(format!(
                "datum nested deeper than {MAX_DEPTH} levels"
            )));
        }
        match s {
            Schema::Null => Ok(()),
            Schema::Boolean => self.r.skip(1),
            Schema::Float => self.r.skip(4),
            Schema::Double => self.r.skip(8),
            Schema::Duration => self.r.skip(12),
            Schema::Fixed(FixedSchema { size, .. }) => self.r.skip(*size),
            Schema::Int
            | Schema::Long
            | Schema::Enum(_)
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.r.long().map(drop),
            Schema::Bytes | Schema::String | Schema::BigDecimal | Schema::Uuid => {
                self.r.bytes().map(drop)
            }
            Schema::Decimal(DecimalSchema { inner, .. }) => self.datum(inner, ns, depth + 1),
            Schema::Union(u) => {
                let i = self.r.long()?;
                let branch = usize::try_from(i)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or_else(|| DecodeError::Avro(format!("union index {i} out of range")))?;
                self.datum(branch, ns, depth + 1)
            }
            Schema::Record(RecordSchema { name, fields, .. }) => {
                let inner_ns = name.fully_qualified_name(ns).namespace;
                for f in fields {
                    self.datum(&f.schema, &inner_ns, depth + 1)?;
                }
                Ok(())
            }
            Schema::Array(ArraySchema { items, .. }) => {
                let empty = takes_no_bytes(items, self.names, ns, 0);
                self.blocks(empty, |w| w.datum(items, ns, depth + 1))
            }
            Schema::Map(MapSchema { types, .. }) => self.blocks(false, |w| {
                w.r.bytes()?;
                w.datum(types, ns, depth + 1)
            }),
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                let target = self.names.0.get(&full).ok_or_else(|| {
                    DecodeError::Avro(format!("unknown named type {}", full.fullname(None)))
                })?;
                self.datum(target, &full.namespace, depth + 1)
            }
        }
    }

    /// Array or map blocks: a count (negative: followed by a byte size), that many items,
    /// until a zero count.
    fn blocks(
        &mut self,
        empty_items: bool,
        mut item: impl FnMut(&mut Self) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        loop {
            let count = self.r.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                self.r.long()?;
            }
            let n = usize::try_from(count.unsigned_abs()).unwrap_or(usize::MAX);
            if empty_items {
                self.empty_items = self.empty_items.saturating_add(n);
                if self.empty_items > MAX_EMPTY_ITEMS {
                    return Err(DecodeError::Avro(format!(
                        "more than {MAX_EMPTY_ITEMS} array items that take no bytes"
                    )));
                }
            } else if n > self.r.remaining() {
                // Every item takes at least a byte: the block cannot fit.
                return Err(self.r.truncated());
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }
}

/// Whether a datum of `s` can be encoded in zero bytes (null, empty records, `fixed(0)`).
fn takes_no_bytes(s: &Schema, names: &Names, ns: &Namespace, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    match s {
        Schema::Null => true,
        Schema::Fixed(FixedSchema { size, .. }) => *size == 0,
        Schema::Decimal(DecimalSchema { inner, .. }) => takes_no_bytes(inner, names, ns, depth + 1),
        Schema::Record(RecordSchema { name, fields, .. }) => {
            let inner_ns = name.fully_qualified_name(ns).namespace;
            fields
                .iter()
                .all(|f| takes_no_bytes(&f.schema, names, &inner_ns, depth + 1))
        }
        Schema::Ref { name } => {
            let full = name.fully_qualified_name(ns);
            names
                .0
                .get(&full)
                .is_some_and(|t| takes_no_bytes(t, names, &full.namespace, depth + 1))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> (Schema, Names) {
        let s = Schema::parse_str(text).unwrap();
        let n = Names::of(&s);
        (s, n)
    }

    /// Zig-zag varint of `n`.
    fn long(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while z > 0x7f {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    #[test]
    fn lengths_and_counts_must_fit_the_body() {
        let (s, n) = schema(r#""string""#);
        check(&s, &n, &[4, b'a', b'b']).unwrap();
        assert_eq!(
            check(&s, &n, &[6, b'a', b'b']).unwrap_err().class(),
            "truncated"
        );
        // A length prefix claiming 2^60 bytes: refused before anything is allocated.
        assert_eq!(
            check(&s, &n, &long(1 << 60)).unwrap_err().class(),
            "truncated"
        );
        assert_eq!(check(&s, &n, &long(-1)).unwrap_err().class(), "avro");
        let (m, n) = schema(r#"{"type":"map","values":"long"}"#);
        let mut body = long(1 << 28);
        body.extend_from_slice(&[2, b'k', 0, 0]);
        assert_eq!(check(&m, &n, &body).unwrap_err().class(), "truncated");
        let mut ok = long(1);
        ok.extend_from_slice(&[2, b'k', 0, 0]);
        check(&m, &n, &ok).unwrap();
        let mut neg = long(-1);
        neg.extend_from_slice(&[8, 2, b'k', 0, 0]);
        check(&m, &n, &neg).unwrap();
    }

    #[test]
    fn empty_items_and_nesting_are_capped() {
        let (a, n) = schema(r#"{"type":"array","items":"null"}"#);
        let mut body = long(1000);
        body.push(0);
        check(&a, &n, &body).unwrap();
        let mut body = long(1 << 40);
        body.push(0);
        assert_eq!(check(&a, &n, &body).unwrap_err().class(), "avro");
        let (r, n) = schema(
            r#"{"type":"record","name":"N","fields":[{"name":"next","type":["null","N"]}]}"#,
        );
        let mut body = vec![2u8; 10];
        body.push(0);
        check(&r, &n, &body).unwrap();
        let deep = vec![2u8; 100_000];
        assert_eq!(check(&r, &n, &deep).unwrap_err().class(), "avro");
    }
}
