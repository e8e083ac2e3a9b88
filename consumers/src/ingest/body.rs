//! An upload's body, from bytes on the wire to the events it carries (pure).
//!
//! Guarantee: a body is accepted only whole: gzip (or identity) within the
//! compressed and decompressed limits, then one JSON array of at most
//! `max_events` elements. Each event is returned as the exact bytes it had in
//! the array (never re-serialised), so the pipeline sees what OPA wrote. Any
//! problem is an [`BodyError`] naming it; nothing is accepted in part.

use crate::streams::policy::opa::{self, OpaMapping};
use serde_json::Value;
use std::io::Read;
use std::ops::Range;

/// Why a body was refused: 400 (malformed) or 413 (too large), with a specific message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("body is empty")]
    Empty,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is a JSON {0}, not an array of decision-log events")]
    NotAnArray(&'static str),
    #[error("malformed JSON array: {0}")]
    BadArray(String),
    #[error("request body is larger than {limit} bytes (ingest.max_body_bytes)")]
    TooLarge { limit: u64 },
    #[error("body decompresses to more than {limit} bytes (ingest.max_decompressed_bytes)")]
    DecompressedTooLarge { limit: u64 },
    #[error("upload holds more than {limit} events (ingest.max_events)")]
    TooManyEvents { limit: u64 },
}

impl BodyError {
    /// The HTTP status: 413 for the size limits, 400 for the rest.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge { .. }
            | BodyError::DecompressedTooLarge { .. }
            | BodyError::TooManyEvents { .. } => 413,
            _ => 400,
        }
    }

    /// Stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::BadGzip(_) => "bad_gzip",
            BodyError::Empty => "empty",
            BodyError::NotJson(_) => "not_json",
            BodyError::NotAnArray(_) => "not_an_array",
            BodyError::BadArray(_) => "bad_array",
            BodyError::TooLarge { .. } => "too_large",
            BodyError::DecompressedTooLarge { .. } => "decompressed_too_large",
            BodyError::TooManyEvents { .. } => "too_many_events",
        }
    }

    pub const REASONS: [&'static str; 8] = [
        "bad_gzip",
        "empty",
        "not_json",
        "not_an_array",
        "bad_array",
        "too_large",
        "decompressed_too_large",
        "too_many_events",
    ];
}

/// How the body is encoded (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Identity,
}

impl Encoding {
    /// From the `Content-Encoding` header (absent: identity); None: unsupported.
    pub fn from_header(value: Option<&str>) -> Option<Self> {
        match value.map(|v| v.trim().to_ascii_lowercase()) {
            None => Some(Encoding::Identity),
            Some(v) if v.is_empty() || v == "identity" => Some(Encoding::Identity),
            Some(v) if v == "gzip" || v == "x-gzip" => Some(Encoding::Gzip),
            Some(_) => None,
        }
    }
}

/// The decompressed body; at most `max_decompressed` bytes.
pub fn decode(body: Vec<u8>, enc: Encoding, max_decompressed: u64) -> Result<Vec<u8>, BodyError> {
    match enc {
        Encoding::Identity if body.len() as u64 > max_decompressed => {
            Err(BodyError::DecompressedTooLarge {
                limit: max_decompressed,
            })
        }
        Encoding::Identity => Ok(body),
        Encoding::Gzip => {
            if body.is_empty() {
                return Err(BodyError::BadGzip("no bytes".into()));
            }
            // Several gzip members in a row are one gzip stream (RFC 1952).
            let mut out = Vec::new();
            let mut dec = flate2::read::MultiGzDecoder::new(&body[..]).take(max_decompressed + 1);
            dec.read_to_end(&mut out)
                .map_err(|e| BodyError::BadGzip(e.to_string()))?;
            if out.len() as u64 > max_decompressed {
                return Err(BodyError::DecompressedTooLarge {
                    limit: max_decompressed,
                });
            }
            Ok(out)
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// One event of an upload: its bytes in the body and the tenant it is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub bytes: Range<usize>,
    pub key: Option<String>,
}

/// Splits a JSON array into its elements (exact byte ranges, outer whitespace
/// trimmed), parsing each once to find its key (see [`event_key`]).
pub fn split(json: &[u8], max_events: u64, m: &OpaMapping) -> Result<Vec<Event>, BodyError> {
    let start = skip_ws(json, 0);
    match json.get(start) {
        None => return Err(BodyError::Empty),
        Some(b'[') => {}
        Some(_) => {
            return Err(match serde_json::from_slice::<Value>(json) {
                Ok(v) => BodyError::NotAnArray(kind(&v)),
                Err(e) => BodyError::NotJson(e.to_string()),
            })
        }
    }
    let mut out = Vec::new();
    let mut i = skip_ws(json, start + 1);
    if json.get(i) == Some(&b']') {
        return trailing(json, i + 1).map(|()| out);
    }
    loop {
        let mut values = serde_json::Deserializer::from_slice(&json[i..]).into_iter::<Value>();
        let value = match values.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(BodyError::BadArray(format!("element {}: {e}", out.len()))),
            None => return Err(BodyError::BadArray("unterminated array".into())),
        };
        let end = i + values.byte_offset();
        if out.len() as u64 >= max_events {
            return Err(BodyError::TooManyEvents { limit: max_events });
        }
        out.push(Event {
            bytes: i..end,
            key: event_key(&value, m),
        });
        i = skip_ws(json, end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b']') => return trailing(json, i + 1).map(|()| out),
            Some(c) => {
                return Err(BodyError::BadArray(format!(
                    "expected `,` or `]` after element {} at byte {i}, found {:?}",
                    out.len() - 1,
                    char::from(*c)
                )))
            }
            None => return Err(BodyError::BadArray("unterminated array".into())),
        }
    }
}

fn trailing(json: &[u8], after: usize) -> Result<(), BodyError> {
    let i = skip_ws(json, after);
    if i < json.len() {
        return Err(BodyError::BadArray(format!(
            "trailing bytes after the array at byte {i}"
        )));
    }
    Ok(())
}

/// The Kafka key of an event: its tenant. An OPA-shaped event's tenant is read
/// as the pipeline's mapping reads it (`[opa] tenant`, `erased` honoured); any
/// other object's is its `tenant_id` string. None when there is no readable
/// tenant: the event is still forwarded, without a key, and the pipeline
/// dead-letters it with its reason (e.g. `opa_missing_tenant`).
pub fn event_key(v: &Value, m: &OpaMapping) -> Option<String> {
    if opa::is_opa_event(v) {
        return opa::tenant(v, m).ok();
    }
    match v.get("tenant_id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn opa(tenant: &str, id: &str) -> String {
        format!(
            r#"{{"decision_id":"{id}","path":"a/allow","input":{{"tenant_id":"{tenant}"}},"result":true,"timestamp":"2025-01-01T00:00:00Z"}}"#
        )
    }

    #[test]
    fn gzip_limits_and_errors() {
        let body = gzip(b"[1, 2]");
        assert_eq!(
            decode(body.clone(), Encoding::Gzip, 100).unwrap(),
            b"[1, 2]"
        );
        assert_eq!(
            decode(body, Encoding::Gzip, 5),
            Err(BodyError::DecompressedTooLarge { limit: 5 })
        );
        let bomb = gzip(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 4096);
        assert_eq!(
            decode(bomb, Encoding::Gzip, 1 << 16).unwrap_err().status(),
            413
        );
        let e = decode(b"[1,2]".to_vec(), Encoding::Gzip, 100).unwrap_err();
        assert_eq!((e.status(), e.reason()), (400, "bad_gzip"));
        let mut cut = gzip(b"[1, 2, 3, 4]");
        cut.truncate(cut.len() - 4);
        assert_eq!(
            decode(cut, Encoding::Gzip, 100).unwrap_err().reason(),
            "bad_gzip"
        );
        let two = [gzip(b"[1,"), gzip(b"2]")].concat();
        assert_eq!(decode(two, Encoding::Gzip, 100).unwrap(), b"[1,2]");
        assert_eq!(Encoding::from_header(Some("GZIP")), Some(Encoding::Gzip));
        assert_eq!(Encoding::from_header(None), Some(Encoding::Identity));
        assert_eq!(Encoding::from_header(Some("br")), None);
    }

    #[test]
    fn splits_exact_bytes_and_keys() {
        let m = OpaMapping::default();
        let a = opa("t1", "d1");
        let b = r#"{"tenant_id": "t2", "x": "],[\"{"}"#;
        let c = r#"{"decision_id":"d3","path":"p/allow","input":{},"result":true,"timestamp":"x"}"#;
        let body = format!(" [\n {a} ,{b},{c}, 7 ] \n");
        let evs = split(body.as_bytes(), 10, &m).unwrap();
        let texts: Vec<&str> = evs.iter().map(|e| &body[e.bytes.clone()]).collect();
        assert_eq!(texts, vec![a.as_str(), b, c, "7"]);
        let keys: Vec<Option<&str>> = evs.iter().map(|e| e.key.as_deref()).collect();
        assert_eq!(keys, vec![Some("t1"), Some("t2"), None, None]);
        assert_eq!(split(b"[]", 10, &m).unwrap(), vec![]);
        assert_eq!(
            split(body.as_bytes(), 3, &m),
            Err(BodyError::TooManyEvents { limit: 3 })
        );
    }

    #[test]
    fn erased_tenant_is_not_a_key() {
        let m = OpaMapping::default();
        let v: Value = serde_json::from_str(
            r#"{"decision_id":"d","path":"a/b","input":{"tenant_id":"t"},"erased":["/input"],"result":true,"timestamp":"2025-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(event_key(&v, &m), None);
    }

    #[test]
    fn malformed_bodies_are_named() {
        let m = OpaMapping::default();
        let r = |b: &str| split(b.as_bytes(), 10, &m).unwrap_err();
        assert_eq!(r(""), BodyError::Empty);
        assert_eq!(r(" \n"), BodyError::Empty);
        assert_eq!(r(r#"{"a": 1}"#), BodyError::NotAnArray("object"));
        assert_eq!(r("12"), BodyError::NotAnArray("number"));
        assert_eq!(r("nope").reason(), "not_json");
        assert_eq!(r("[1, 2").reason(), "bad_array");
        assert_eq!(r("[1 2]").reason(), "bad_array");
        assert_eq!(r("[1,]").reason(), "bad_array");
        assert_eq!(r("[{\"a\":}]").reason(), "bad_array");
        assert_eq!(r("[1] x").reason(), "bad_array");
        assert_eq!(r("[1][2]").reason(), "bad_array");
        assert_eq!(r("[\"\u{0}\"]").reason(), "bad_array");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[ -~\\u{e9}\\u{1F600}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\\[\\]\",]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn every_element_comes_back_byte_for_byte(
            items in prop::collection::vec(json_value(), 0..8),
            pretty in any::<bool>(),
            pad in "[ \\n\\t]{0,3}",
        ) {
            let texts: Vec<String> = items
                .iter()
                .map(|v| if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() })
                .collect();
            let body = format!("{pad}[{pad}{}{pad}]{pad}", texts.join(&format!("{pad},{pad}")));
            let evs = split(body.as_bytes(), 100, &OpaMapping::default()).unwrap();
            let got: Vec<&str> = evs.iter().map(|e| &body[e.bytes.clone()]).collect();
            prop_assert_eq!(got, texts.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
