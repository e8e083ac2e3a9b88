//! Schema compatibility checks between versions of a subject.
//!
//! `apache_avro` 0.21's `SchemaCompatibility::can_read` answers
//! "Inconclusive" for any field whose reader type is a `decimal` logical type
//! (it is missing from its list of leaf types). [`can_read`] therefore checks
//! the schemas with decimals lowered to their underlying `bytes` through
//! `can_read`, and checks decimals itself: a field that is a decimal in both
//! schemas must keep its scale and may only widen its precision.

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::Value;
use std::collections::BTreeMap;

/// Whether data written with `writer_text` can be read with `reader_text`
/// (both Avro schema JSON texts). The error explains the first problem.
pub fn can_read(writer_text: &str, reader_text: &str) -> Result<(), String> {
    let writer: Value = serde_json::from_str(writer_text).map_err(|e| format!("writer: {e}"))?;
    let reader: Value = serde_json::from_str(reader_text).map_err(|e| format!("reader: {e}"))?;
    let w_dec = decimal_fields(&writer);
    let r_dec = decimal_fields(&reader);
    for field in w_dec.keys().chain(r_dec.keys()) {
        let (Some((wp, ws)), Some((rp, rs))) = (w_dec.get(field), r_dec.get(field)) else {
            if field_exists(&writer, field) && field_exists(&reader, field) {
                return Err(format!("field `{field}` is a decimal in only one schema"));
            }
            continue;
        };
        {
            if ws != rs {
                return Err(format!(
                    "decimal `{field}`: scale changed from {ws} to {rs}"
                ));
            }
            if rp < wp {
                return Err(format!(
                    "decimal `{field}`: precision narrowed from {wp} to {rp}"
                ));
            }
        }
    }
    let lower = |v: &Value| -> Result<Schema, String> {
        let mut v = v.clone();
        lower_decimals(&mut v);
        Schema::parse(&v).map_err(|e| e.to_string())
    };
    SchemaCompatibility::can_read(&lower(&writer)?, &lower(&reader)?).map_err(|e| e.to_string())
}

/// `field name -> (precision, scale)` for every decimal-typed record field
/// (directly or as a union branch), at any depth.
fn decimal_fields(v: &Value) -> BTreeMap<String, (u64, u64)> {
    fn decimal_of(t: &Value) -> Option<(u64, u64)> {
        match t {
            Value::Object(o) if o.get("logicalType") == Some(&Value::from("decimal")) => Some((
                o.get("precision").and_then(Value::as_u64).unwrap_or(0),
                o.get("scale").and_then(Value::as_u64).unwrap_or(0),
            )),
            Value::Array(branches) => branches.iter().find_map(decimal_of),
            _ => None,
        }
    }
    fn walk(v: &Value, prefix: &str, out: &mut BTreeMap<String, (u64, u64)>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Array(fields)) = o.get("fields") {
                    for f in fields {
                        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
                        let path = format!("{prefix}{name}");
                        if let Some(t) = f.get("type") {
                            if let Some(d) = decimal_of(t) {
                                out.insert(path.clone(), d);
                            }
                            walk(t, &format!("{path}."), out);
                        }
                    }
                }
                for key in ["items", "values"] {
                    if let Some(t) = o.get(key) {
                        walk(t, prefix, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|t| walk(t, prefix, out)),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(v, "", &mut out);
    out
}

/// Whether a top-level record field `name` exists in `schema`.
fn field_exists(schema: &Value, name: &str) -> bool {
    schema
        .get("fields")
        .and_then(Value::as_array)
        .is_some_and(|fs| fs.iter().any(|f| f.get("name") == Some(&Value::from(name))))
}

/// Replaces every `{"type": "bytes", "logicalType": "decimal", ...}` by `"bytes"`.
fn lower_decimals(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("logicalType") == Some(&Value::from("decimal")) {
                if let Some(inner) = o.get("type").cloned() {
                    if inner.is_string() {
                        *v = inner;
                        return;
                    }
                }
            }
            o.values_mut().for_each(lower_decimals);
        }
        Value::Array(items) => items.iter_mut().for_each(lower_decimals),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cost: &str) -> String {
        format!(
            r#"{{"type":"record","name":"R","fields":[{{"name":"c","type":["null",{cost}],"default":null}}]}}"#
        )
    }

    #[test]
    fn decimals_are_checked_by_hand() {
        let d = |p, s| {
            format!(r#"{{"type":"bytes","logicalType":"decimal","precision":{p},"scale":{s}}}"#)
        };
        assert!(can_read(&rec(&d(18, 9)), &rec(&d(18, 9))).is_ok());
        assert!(can_read(&rec(&d(18, 9)), &rec(&d(28, 9))).is_ok());
        assert!(can_read(&rec(&d(28, 9)), &rec(&d(18, 9))).is_err());
        assert!(can_read(&rec(&d(18, 9)), &rec(&d(18, 6))).is_err());
        assert!(can_read(&rec(&d(18, 9)), &rec(r#""string""#)).is_err());
    }

    #[test]
    fn a_new_required_field_is_not_backward_compatible() {
        let old = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"}]}"#;
        let new = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"},{"name":"b","type":"string"}]}"#;
        assert!(can_read(old, new).is_err());
        assert!(can_read(new, old).is_ok());
    }
}
