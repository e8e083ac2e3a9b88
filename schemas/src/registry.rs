//! Bundled Avro schema history (`schemas/avro/<subject>/v<N>.avsc`), the
//! Parsing Canonical Form, and CRC-64-AVRO (Rabin) fingerprints.
//!
//! The highest version of a subject is its current (reader and writer) schema.

use apache_avro::Schema;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Every bundled schema: (subject, version, text), versions ascending per subject.
const BUNDLED: &[(&str, u32, &str)] = &[
    (
        "llm.usage.v1",
        1,
        include_str!("../avro/llm.usage.v1/v1.avsc"),
    ),
    (
        "llm.usage.v1",
        2,
        include_str!("../avro/llm.usage.v1/v2.avsc"),
    ),
    (
        "policy.decision.v1",
        1,
        include_str!("../avro/policy.decision.v1/v1.avsc"),
    ),
    (
        "audit.event.v1",
        1,
        include_str!("../avro/audit.event.v1/v1.avsc"),
    ),
    (
        "compliance.violation.v1",
        1,
        include_str!("../avro/compliance.violation.v1/v1.avsc"),
    ),
];

/// The subjects with bundled schemas.
pub const SUBJECTS: [&str; 4] = [
    "llm.usage.v1",
    "policy.decision.v1",
    "audit.event.v1",
    "compliance.violation.v1",
];

/// Text of the latest bundled schema version of `subject`.
pub fn current_schema_text(subject: &str) -> Option<&'static str> {
    schema_history(subject).last().map(|(_, text)| *text)
}

/// All bundled versions of `subject` as `(version, text)`, ascending.
pub fn schema_history(subject: &str) -> Vec<(u32, &'static str)> {
    BUNDLED
        .iter()
        .filter(|(s, _, _)| *s == subject)
        .map(|(_, v, t)| (*v, *t))
        .collect()
}

const CRC64_EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const fn crc64_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (CRC64_EMPTY & (0u64.wrapping_sub(fp & 1)));
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
}

static CRC64_TABLE: [u64; 256] = crc64_table();

/// CRC-64-AVRO ("Rabin") fingerprint of arbitrary bytes.
pub fn crc64_avro(data: &[u8]) -> u64 {
    let mut fp = CRC64_EMPTY;
    for &b in data {
        fp = (fp >> 8) ^ CRC64_TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// Parsing Canonical Form of `schema` exactly as the Avro specification
/// defines it: only `name`, `type`, `fields`, `symbols`, `items`, `values`
/// and `size` are kept (in that order), so logical-type attributes such as
/// decimal `precision`/`scale` are stripped. This matches Java's
/// `SchemaNormalization` and therefore single-object fingerprints written by
/// other Avro implementations. (`apache_avro`'s own `canonical_form` keeps
/// `precision`, `scale` and `order`.)
pub fn parsing_canonical_form(schema: &Schema) -> String {
    let base = schema.canonical_form();
    match serde_json::from_str::<serde_json::Value>(&base) {
        Ok(v) => {
            let mut out = String::with_capacity(base.len());
            write_pcf(&v, &mut out);
            out
        }
        Err(_) => base,
    }
}

fn write_pcf(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    const KEYS: [&str; 7] = [
        "name", "type", "fields", "symbols", "items", "values", "size",
    ];
    match v {
        Value::Object(map) => {
            let kept: Vec<(&str, &Value)> = KEYS
                .iter()
                .filter_map(|k| map.get(*k).map(|v| (*k, v)))
                .collect();
            if let [("type", t @ Value::String(_))] = kept.as_slice() {
                write_pcf(t, out);
                return;
            }
            out.push('{');
            for (i, (k, v)) in kept.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(*k).to_string());
                out.push(':');
                write_pcf(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_pcf(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// CRC-64-AVRO fingerprint of the Parsing Canonical Form of `schema`
/// (the 8 bytes that follow `C3 01` in single-object encoding, little-endian).
pub fn rabin_fingerprint(canonical_or_schema: &Schema) -> u64 {
    crc64_avro(parsing_canonical_form(canonical_or_schema).as_bytes())
}

/// A strict identity of a schema for deciding whether a writer schema is
/// byte-for-byte decodable by a hand-written reader: like the canonical form
/// but keeping logical types, precision and scale (docs, aliases and defaults
/// do not change the binary encoding and are ignored).
pub(crate) fn strict_key(schema: &Schema) -> String {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("doc");
                map.remove("aliases");
                map.remove("default");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(schema).unwrap_or(serde_json::Value::Null);
    strip(&mut v);
    v.to_string()
}

/// Full name (`namespace.name`) of a record schema.
pub(crate) fn record_name(schema: &Schema) -> Option<String> {
    match schema {
        Schema::Record(r) => Some(r.name.fullname(None)),
        _ => None,
    }
}

/// One parsed bundled schema version.
#[derive(Debug)]
pub(crate) struct Bundled {
    pub subject: &'static str,
    pub version: u32,
    pub schema: Schema,
    pub fingerprint: u64,
    pub strict: String,
    /// Full record name, e.g. `tally.LlmUsage`.
    pub name: Option<String>,
}

/// All bundled schemas, parsed once per process.
#[derive(Debug)]
pub(crate) struct Registry {
    pub all: Vec<Arc<Bundled>>,
    pub current: HashMap<&'static str, Arc<Bundled>>,
}

impl Registry {
    pub fn get() -> &'static Registry {
        static REG: OnceLock<Registry> = OnceLock::new();
        REG.get_or_init(|| {
            let mut all = Vec::new();
            let mut current = HashMap::new();
            for &(subject, version, text) in BUNDLED {
                // The bundled files are checked by this crate's tests.
                let schema = Schema::parse_str(text)
                    .unwrap_or_else(|e| panic!("bundled schema {subject} v{version}: {e}"));
                let b = Arc::new(Bundled {
                    subject,
                    version,
                    fingerprint: rabin_fingerprint(&schema),
                    strict: strict_key(&schema),
                    name: record_name(&schema),
                    schema,
                });
                current.insert(subject, b.clone());
                all.push(b);
            }
            Registry { all, current }
        })
    }

    /// Current parsed schema of `subject` (panics for an unknown subject,
    /// which only a mistaken `Event` impl could ask for).
    pub fn current(&self, subject: &str) -> &Arc<Bundled> {
        self.current
            .get(subject)
            .unwrap_or_else(|| panic!("no bundled schema for subject {subject}"))
    }

    #[cfg(test)]
    pub fn version(&self, subject: &str, version: u32) -> Option<&Arc<Bundled>> {
        self.all
            .iter()
            .find(|b| b.subject == subject && b.version == version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_ascending_and_current_is_last() {
        for s in SUBJECTS {
            let h = schema_history(s);
            assert!(!h.is_empty(), "{s}");
            assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
            assert_eq!(current_schema_text(s), Some(h.last().unwrap().1));
        }
        assert_eq!(schema_history("llm.usage.v1").len(), 2);
        assert!(current_schema_text("nope").is_none());
    }

    #[test]
    fn fingerprint_matches_apache_avro_where_canonical_forms_agree() {
        // No decimals here, so the spec PCF equals apache_avro's.
        for text in [
            r#""int""#,
            r#"{"type":"record","name":"r","namespace":"x","fields":[{"name":"a","type":"long","doc":"d"},{"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]}}]}"#,
        ] {
            let s = Schema::parse_str(text).unwrap();
            let theirs = s.fingerprint::<apache_avro::rabin::Rabin>();
            let theirs = u64::from_le_bytes(theirs.bytes.try_into().unwrap());
            assert_eq!(rabin_fingerprint(&s), theirs, "{text}");
        }
    }

    #[test]
    fn canonical_form_strips_logical_attributes() {
        let s = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"c","type":["null",{"type":"bytes","logicalType":"decimal","precision":18,"scale":9}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            parsing_canonical_form(&s),
            r#"{"name":"R","type":"record","fields":[{"name":"c","type":["null","bytes"]}]}"#
        );
    }

    #[test]
    fn bundled_fingerprints_are_distinct() {
        let reg = Registry::get();
        let mut fps: Vec<u64> = reg.all.iter().map(|b| b.fingerprint).collect();
        fps.sort_unstable();
        fps.dedup();
        assert_eq!(fps.len(), reg.all.len());
        assert_eq!(reg.current("llm.usage.v1").version, 2);
        assert!(reg.version("llm.usage.v1", 1).is_some());
    }
}
