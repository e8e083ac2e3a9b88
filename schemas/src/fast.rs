//! Hand-written Avro binary reader and writer for `llm.usage.v1`, used when
//! the writer schema is exactly a bundled version (v1 or v2). It decodes
//! straight into [`UsageEvent`] without building an `apache_avro` `Value`.
//!
//! Binary rules implemented: zig-zag varint longs, length-prefixed strings
//! and bytes, union branch index, enum symbol index, map blocks (including
//! negative block counts followed by a byte size), and decimals as
//! big-endian two's-complement unscaled bytes at scale 9.

use crate::avro::{decimal_from_bytes, decimal_unscaled, unscaled_bytes};
use crate::types::{UsageEvent, UsageStatus};
use crate::DecodeError;
use chrono::DateTime;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A writer-schema layout that has a hand-written decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastLayout {
    /// `llm.usage.v1` schema version 1 (no `region`).
    UsageV1,
    /// `llm.usage.v1` schema version 2 (`region` appended).
    UsageV2,
}

impl FastLayout {
    /// The layout of a bundled schema version, if it has one.
    pub(crate) fn of(subject: &str, version: u32) -> Option<Self> {
        match (subject, version) {
            ("llm.usage.v1", 1) => Some(FastLayout::UsageV1),
            ("llm.usage.v1", 2) => Some(FastLayout::UsageV2),
            _ => None,
        }
    }
}

/// A cursor over an Avro binary body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            what: "avro body",
            offset: self.buf.len(),
        }
    }

    #[inline]
    pub(crate) fn long(&mut self) -> Result<i64, DecodeError> {
        let mut z: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.truncated());
            };
            self.pos += 1;
            // Like apache_avro: at most 10 bytes, excess high bits dropped.
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            if shift == 63 {
                return Err(DecodeError::Avro("varint longer than 10 bytes".into()));
            }
            shift += 7;
        }
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Skips `n` bytes.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(())
    }

    #[inline]
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.long()?;
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::Avro(format!("negative length {len}")))?;
        let end = self.pos.checked_add(len).ok_or_else(|| self.truncated())?;
        let Some(s) = self.buf.get(self.pos..end) else {
            return Err(self.truncated());
        };
        self.pos = end;
        Ok(s)
    }

    #[inline]
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    #[inline]
    fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// Reads a `["null", T]` union branch: `false` for null.
    #[inline]
    fn present(&mut self, field: &str) -> Result<bool, DecodeError> {
        match self.long()? {
            0 => Ok(false),
            1 => Ok(true),
            i => Err(DecodeError::Avro(format!(
                "field `{field}`: union index {i} out of range"
            ))),
        }
    }

    fn opt_string(&mut self, field: &str) -> Result<Option<String>, DecodeError> {
        if self.present(field)? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }

    fn string_map(&mut self) -> Result<BTreeMap<String, String>, DecodeError> {
        let mut map = BTreeMap::new();
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(map);
            }
            let count = if count < 0 {
                self.long()?; // block size in bytes, not needed
                count
                    .checked_neg()
                    .ok_or_else(|| DecodeError::Avro("map block count overflow".into()))?
            } else {
                count
            };
            for _ in 0..count {
                let k = self.string()?;
                let v = self.string()?;
                map.insert(k, v);
            }
        }
    }

    fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// Decodes a usage-event body written with `layout` (no validation).
pub(crate) fn decode_usage(layout: FastLayout, body: &[u8]) -> Result<UsageEvent, DecodeError> {
    let mut r = Reader::new(body);
    let id = r.bytes()?;
    // Like apache_avro, a 16-byte value is taken as the raw UUID bytes.
    let event_id = if id.len() == 16 {
        Uuid::from_slice(id)
    } else {
        Uuid::try_parse_ascii(id)
    }
    .map_err(|e| DecodeError::InvalidUuid(format!("event_id: {e}")))?;
    let micros = r.long()?;
    let occurred_at = DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| DecodeError::InvalidTimestamp(format!("occurred_at: {micros} µs")))?;
    let tenant_id = r.string()?;
    let team_id = r.opt_string("team_id")?;
    let project_id = r.opt_string("project_id")?;
    let user_id = r.opt_string("user_id")?;
    let source = r.string()?;
    let tags = r.string_map()?;
    let request_id = r.string()?;
    let provider = r.string()?;
    let model = r.string()?;
    let input_tokens = r.long()?;
    let cached_input_tokens = r.long()?;
    let cache_write_tokens = r.long()?;
    let output_tokens = r.long()?;
    let reasoning_tokens = r.long()?;
    let latency_ms = r.long()?;
    let idx = r.long()?;
    let status = u64::try_from(idx)
        .ok()
        .and_then(UsageStatus::from_index)
        .ok_or_else(|| DecodeError::UnknownEnumSymbol {
            field: "status".into(),
            value: idx.to_string(),
        })?;
    let reported_cost = if r.present("reported_cost")? {
        Some(decimal_from_bytes(r.bytes()?, "reported_cost")?)
    } else {
        None
    };
    let currency = r.string()?;
    let region = match layout {
        FastLayout::UsageV1 => None,
        FastLayout::UsageV2 => r.opt_string("region")?,
    };
    if !r.is_done() {
        return Err(DecodeError::Avro(format!(
            "{} trailing bytes after the record",
            body.len() - r.pos
        )));
    }
    Ok(UsageEvent {
        event_id,
        occurred_at,
        tenant_id,
        team_id,
        project_id,
        user_id,
        source,
        tags,
        request_id,
        provider,
        model,
        input_tokens,
        cached_input_tokens,
        cache_write_tokens,
        output_tokens,
        reasoning_tokens,
        latency_ms,
        status,
        reported_cost,
        currency,
        region,
    })
}

#[inline]
fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7f {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[inline]
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // A Vec never holds more than isize::MAX bytes, so this cannot wrap.
    put_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

fn put_opt_str(out: &mut Vec<u8>, v: &Option<String>) {
    match v {
        Some(s) => {
            out.push(2); // union index 1
            put_bytes(out, s.as_bytes());
        }
        None => out.push(0),
    }
}

/// Appends `e` as an Avro body in the current (v2) usage schema.
pub(crate) fn encode_usage(e: &UsageEvent, out: &mut Vec<u8>) {
    out.reserve(160 + e.tags.len() * 24);
    put_bytes(
        out,
        e.event_id
            .as_hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    put_long(out, e.occurred_at.timestamp_micros());
    put_bytes(out, e.tenant_id.as_bytes());
    put_opt_str(out, &e.team_id);
    put_opt_str(out, &e.project_id);
    put_opt_str(out, &e.user_id);
    put_bytes(out, e.source.as_bytes());
    if !e.tags.is_empty() {
        put_long(out, e.tags.len() as i64);
        for (k, v) in &e.tags {
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
    }
    put_long(out, 0);
    put_bytes(out, e.request_id.as_bytes());
    put_bytes(out, e.provider.as_bytes());
    put_bytes(out, e.model.as_bytes());
    for n in [
        e.input_tokens,
        e.cached_input_tokens,
        e.cache_write_tokens,
        e.output_tokens,
        e.reasoning_tokens,
        e.latency_ms,
    ] {
        put_long(out, n);
    }
    put_long(out, i64::from(e.status.index()));
    match &e.reported_cost {
        Some(d) => {
            out.push(2);
            let (b, start) = unscaled_bytes(decimal_unscaled(d));
            put_bytes(out, &b[start..]);
        }
        None => out.push(0),
    }
    put_bytes(out, e.currency.as_bytes());
    put_opt_str(out, &e.region);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_round_trip() {
        for n in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            300,
            i64::MAX,
            i64::MIN,
            -1234567890123,
        ] {
            let mut out = Vec::new();
            put_long(&mut out, n);
            let mut r = Reader::new(&out);
            assert_eq!(r.long().unwrap(), n);
            assert!(r.is_done());
        }
        let mut r = Reader::new(&[0xff; 10]);
        assert_eq!(r.long().unwrap_err().class(), "avro");
        let mut r = Reader::new(&[0x80]);
        assert_eq!(r.long().unwrap_err().class(), "truncated");
    }

    #[test]
    fn negative_map_block_counts() {
        // One block of -2 entries with a byte size, then the end marker.
        let mut out = Vec::new();
        put_long(&mut out, -2);
        put_long(&mut out, 8);
        for s in ["a", "1", "b", "2"] {
            put_bytes(&mut out, s.as_bytes());
        }
        put_long(&mut out, 1);
        put_bytes(&mut out, b"c");
        put_bytes(&mut out, b"3");
        put_long(&mut out, 0);
        let m = Reader::new(&out).string_map().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["b"], "2");
    }
}
