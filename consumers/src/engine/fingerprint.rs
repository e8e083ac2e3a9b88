//! Event fingerprints: what tells a re-send (same content) from a conflict
//! (same dedup key, other content).
//!
//! Guarantee: the fingerprint is a function of the decoded event alone, over
//! every field in declaration order (names and values, each type-tagged and
//! length-prefixed), so one event gives one fingerprint whatever encoding it
//! arrived in; the byte layout and the hash (XXH3-64, seed 0) are fixed,
//! because claims store fingerprints and later processes compare with them.
//! Claims written before this layout hold the v1 fingerprint (canonical
//! JSON, UUID v5): [`v1`] is kept to recognise their re-sends.

use serde::ser::{self, Serialize};
use std::fmt;
use std::hash::Hasher;
use twox_hash::XxHash3_64;
use uuid::Uuid;

/// The fingerprint of an event's content.
pub fn fingerprint<E: tally_schemas::Event>(e: &E) -> i64 {
    thread_local! {
        static LAYOUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LAYOUT.with(|cell| {
        let mut buf = cell.take();
        buf.clear();
        let mut c = Canon(Layout(buf));
        // Serializing these plain structs into a buffer cannot fail.
        let _ = e.serialize(&mut c);
        let hash = c.0.finish();
        cell.replace(c.0 .0);
        i64::from_be_bytes(hash.to_be_bytes())
    })
}

/// The layout's bytes, hashed in one go when finished: XXH3-64 of the whole
/// equals the streaming hash of its pieces, at a fraction of the cost of
/// many small streaming writes.
struct Layout(Vec<u8>);

impl Hasher for Layout {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn finish(&self) -> u64 {
        XxHash3_64::oneshot_with_seed(0, &self.0)
    }
}

const FINGERPRINT_NS: Uuid = Uuid::from_u128(0x7a11_f1a9_0000_4000_8000_0000_0000_0001);

/// The v1 fingerprint (before XXH3): the first 8 bytes of a UUID v5 over the
/// event's canonical JSON. Only consulted when a key's stored fingerprint
/// differs from the current one.
pub fn v1<E: tally_schemas::Event>(e: &E) -> i64 {
    let body = tally_schemas::encode_json(e);
    let u = Uuid::new_v5(&FINGERPRINT_NS, &body);
    let mut head = [0u8; 8];
    head.copy_from_slice(&u.as_bytes()[..8]);
    i64::from_be_bytes(head)
}

/// Type tags of the layout (never renumber: stored fingerprints depend on them).
mod tag {
    pub const BOOL: u8 = 1;
    pub const INT: u8 = 2;
    pub const UINT: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const CHAR: u8 = 5;
    pub const STR: u8 = 6;
    pub const BYTES: u8 = 7;
    pub const NONE: u8 = 8;
    pub const SOME: u8 = 9;
    pub const UNIT: u8 = 10;
    pub const VARIANT: u8 = 11;
    pub const SEQ: u8 = 12;
    pub const MAP: u8 = 13;
    pub const STRUCT: u8 = 14;
    pub const END: u8 = 15;
    pub const INT128: u8 = 16;
}

/// A serde serializer that writes the layout.
struct Canon(Layout);

impl Canon {
    fn tag(&mut self, t: u8) {
        self.0.write_u8(t);
    }
    fn str(&mut self, s: &str) {
        self.tag(tag::STR);
        self.0.write_u64(s.len() as u64);
        self.0.write(s.as_bytes());
    }
    fn variant(&mut self, index: u32, name: &str) {
        self.tag(tag::VARIANT);
        self.0.write_u32(index);
        self.str(name);
    }
}

#[derive(Debug)]
pub struct Never(String);

impl fmt::Display for Never {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Never {}
impl ser::Error for Never {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Never(msg.to_string())
    }
}

type R = Result<(), Never>;

impl ser::Serializer for &mut Canon {
    type Ok = ();
    type Error = Never;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> R {
        self.tag(tag::BOOL);
        self.0.write_u8(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> R {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i16(self, v: i16) -> R {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i32(self, v: i32) -> R {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i64(self, v: i64) -> R {
        self.tag(tag::INT);
        self.0.write(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> R {
        self.tag(tag::INT128);
        self.0.write(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> R {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u16(self, v: u16) -> R {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u32(self, v: u32) -> R {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u64(self, v: u64) -> R {
        self.tag(tag::UINT);
        self.0.write(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> R {
        self.tag(tag::INT128);
        self.0.write(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> R {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> R {
        self.tag(tag::FLOAT);
        self.0.write(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> R {
        self.tag(tag::CHAR);
        self.0.write_u32(u32::from(v));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> R {
        self.str(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> R {
        self.tag(tag::BYTES);
        self.0.write_u64(v.len() as u64);
        self.0.write(v);
        Ok(())
    }
    fn serialize_none(self) -> R {
        self.tag(tag::NONE);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> R {
        self.tag(tag::SOME);
        value.serialize(self)
    }
    fn serialize_unit(self) -> R {
        self.tag(tag::UNIT);
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> R {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, index: u32, variant: &'static str) -> R {
        self.variant(index, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _name: &'static str, value: &T) -> R {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> R {
        self.variant(index, variant);
        value.serialize(self)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, Never> {
        self.tag(tag::SEQ);
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self, Never> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Never> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Never> {
        self.variant(index, variant);
        self.tag(tag::SEQ);
        Ok(self)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self, Never> {
        self.tag(tag::MAP);
        Ok(self)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, Never> {
        self.tag(tag::STRUCT);
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Never> {
        self.variant(index, variant);
        self.tag(tag::STRUCT);
        Ok(self)
    }
}

/// Elements of sequences, tuples and maps; ended by END.
macro_rules! elements {
    ($($t:ident :: $f:ident),*) => {$(
        impl ser::$t for &mut Canon {
            type Ok = ();
            type Error = Never;
            fn $f<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
                value.serialize(&mut **self)
            }
            fn end(self) -> R {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}
elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for &mut Canon {
    type Ok = ();
    type Error = Never;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> R {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        self.tag(tag::END);
        Ok(())
    }
}

/// Struct fields: name, then value; ended by END. A skipped field hashes as
/// nothing at all (as it is absent from the JSON of v1).
macro_rules! fields {
    ($($t:ident),*) => {$(
        impl ser::$t for &mut Canon {
            type Ok = ();
            type Error = Never;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> R {
                self.str(key);
                value.serialize(&mut **self)
            }
            fn end(self) -> R {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}
fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_pinned() {
        // Claims store fingerprints: this value must never change.
        let e = tally_schemas::sample_usage();
        assert_eq!(fingerprint(&e), fingerprint(&e.clone()));
        assert_eq!(fingerprint(&e), PINNED_SAMPLE_USAGE);
    }

    const PINNED_SAMPLE_USAGE: i64 = -4_805_938_706_850_766_491;

    #[test]
    fn equal_across_encodings() {
        let e = tally_schemas::sample_usage();
        let d = tally_schemas::Decoder::default();
        for bytes in [
            tally_schemas::encode_json(&e),
            tally_schemas::encode_single_object(&e),
        ] {
            let back: tally_schemas::UsageEvent = d.decode(&bytes).expect("decodes");
            assert_eq!(fingerprint(&back), fingerprint(&e));
        }
    }

    #[test]
    fn sees_every_field() {
        let e = tally_schemas::sample_usage();
        let mut f = e.clone();
        f.output_tokens += 1;
        assert_ne!(fingerprint(&e), fingerprint(&f));
        let mut g = e.clone();
        g.tags.insert("k".into(), "v".into());
        assert_ne!(fingerprint(&e), fingerprint(&g));
        let mut h = e.clone();
        h.team_id = None;
        h.project_id = Some("team-search".into());
        assert_ne!(fingerprint(&e), fingerprint(&h));
        // A value moved between fields of the same type is another event.
        let mut i = e.clone();
        (i.input_tokens, i.output_tokens) = (e.output_tokens, e.input_tokens);
        assert_ne!(fingerprint(&e), fingerprint(&i));
    }
}
