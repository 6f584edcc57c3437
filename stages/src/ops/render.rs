//! Stream field values as JSON, so nothing strata writes is opaque and nothing binary breaks a
//! terminal.
//!
//! - A UTF-8 value is a JSON string.
//! - A `frame` field (see [`strata_pipeline::frame`]) is decoded:
//!   `{"columns": [names], "types": [SQL types], "rows": [{column: value}, …]}`.
//! - A `msgpack` field that decodes is `{"msgpack": <the value as JSON>}`.
//! - Anything else that is not UTF-8 is `{"base64": "…", "bytes": N}`; an undecodable frame or
//!   MessagePack value adds `"error"` to that object.
//!
//! So a value is a JSON string exactly when it was text, and an object otherwise.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};
use strata_pipeline::frame::{Frame, FRAME_FIELD};
use strata_pipeline::schema::MSGPACK_FIELD;

/// Largest decompressed frame decoded (the writer's limit too).
const MAX_FRAME_BYTES: usize = 256 << 20;

/// A JSON object that keeps its keys in the order given, as the entry had them (serde_json's
/// own map sorts them). A repeated key keeps its first place and its last value.
#[derive(Debug, Clone, PartialEq)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<V> Ordered<V> {
    /// Adds `key`, or replaces its value in place.
    pub fn insert(&mut self, key: String, value: V) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

impl<V> FromIterator<(String, V)> for Ordered<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut o = Ordered(Vec::new());
        for (k, v) in iter {
            o.insert(k, v);
        }
        o
    }
}

impl<V: Serialize> Serialize for Ordered<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One rendered field value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Rendered {
    /// Text, MessagePack, binary or an undecodable frame.
    Value(Value),
    /// A decoded frame.
    Frame {
        /// Column names, in frame order.
        columns: Vec<String>,
        /// Their SQL types.
        types: Vec<&'static str>,
        /// One object per row, keys in column order.
        rows: Vec<Ordered<Value>>,
    },
}

impl Rendered {
    /// As a plain JSON value (for tests and callers that do not care about key order).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The fields of an entry as a JSON object, in the entry's order.
pub fn fields_json(fields: &[(String, Vec<u8>)]) -> Ordered<Rendered> {
    fields
        .iter()
        .map(|(k, v)| (k.clone(), field_json(k, v)))
        .collect()
}

/// One field value as JSON, decoding frames and MessagePack by field name.
pub fn field_json(name: &str, value: &[u8]) -> Rendered {
    match name {
        FRAME_FIELD => frame_json(value),
        MSGPACK_FIELD => Rendered::Value(msgpack_json(value)),
        _ => Rendered::Value(bytes_json(value)),
    }
}

/// Text as a string; other bytes as `{"base64", "bytes"}`.
pub fn bytes_json(value: &[u8]) -> Value {
    match std::str::from_utf8(value) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => binary(value),
    }
}

fn binary(value: &[u8]) -> Value {
    json!({ "base64": base64(value), "bytes": value.len() })
}

fn undecodable(value: &[u8], error: String) -> Value {
    let mut v = binary(value);
    v["error"] = Value::String(error);
    v
}

/// A frame decoded into its columns and rows.
pub fn frame_json(value: &[u8]) -> Rendered {
    let frame = match Frame::decode(value, MAX_FRAME_BYTES) {
        Ok(f) => f,
        Err(e) => return Rendered::Value(undecodable(value, e.to_string())),
    };
    let rows = match frame.to_cells() {
        Ok(rows) => rows,
        Err(e) => return Rendered::Value(undecodable(value, e.to_string())),
    };
    let rows = rows
        .iter()
        .map(|cells| {
            frame
                .columns
                .iter()
                .zip(cells)
                .map(|((name, _), cell)| (name.clone(), cell.to_json()))
                .collect()
        })
        .collect();
    Rendered::Frame {
        columns: frame.columns.iter().map(|(n, _)| n.clone()).collect(),
        types: frame.columns.iter().map(|(_, t)| t.sql()).collect(),
        rows,
    }
}

/// A MessagePack payload as `{"msgpack": value}`, or as bytes with the decoding error.
pub fn msgpack_json(value: &[u8]) -> Value {
    let mut rd = value;
    match rmpv::decode::read_value_with_max_depth(
        &mut rd,
        strata_pipeline::pg_limits::MSGPACK_MAX_DEPTH,
    ) {
        Ok(v) if rd.is_empty() => json!({ "msgpack": msgpack_to_json(&v) }),
        Ok(_) => undecodable(
            value,
            format!("{} bytes after the MessagePack value", rd.len()),
        ),
        Err(e) => undecodable(value, format!("not valid MessagePack ({e})")),
    }
}

/// Any MessagePack value as JSON: binary and extension values as objects, map keys as text.
pub fn msgpack_to_json(v: &rmpv::Value) -> Value {
    use rmpv::Value as V;
    match v {
        V::Nil => Value::Null,
        V::Boolean(b) => Value::Bool(*b),
        V::Integer(i) => i
            .as_i64()
            .map(Value::from)
            .or_else(|| i.as_u64().map(Value::from))
            .unwrap_or(Value::Null),
        V::F32(f) => serde_json::Number::from_f64(*f as f64)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        V::F64(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        V::String(s) => match s.as_str() {
            Some(s) => Value::String(s.to_string()),
            None => binary(s.as_bytes()),
        },
        V::Binary(b) => binary(b),
        V::Array(items) => Value::Array(items.iter().map(msgpack_to_json).collect()),
        V::Map(pairs) => Value::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    (key, msgpack_to_json(v))
                })
                .collect(),
        ),
        V::Ext(ty, data) => json!({ "ext": ty, "base64": base64(data) }),
    }
}

/// Standard base64 with padding (RFC 4648).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn values_are_strings_when_text_and_objects_otherwise() {
        assert_eq!(field_json("value", b"12.5").to_value(), json!("12.5"));
        assert_eq!(
            field_json("value", b"\xff\x00").to_value(),
            json!({"base64": "/wA=", "bytes": 2})
        );
        let bad = field_json("frame", b"not zstd").to_value();
        assert_eq!(bad["bytes"], 8);
        assert!(bad["error"].as_str().unwrap().contains("zstd"), "{bad}");
        let mut packed = Vec::new();
        rmpv::encode::write_value(
            &mut packed,
            &rmpv::Value::Map(vec![("value".into(), 7.into())]),
        )
        .unwrap();
        assert_eq!(
            field_json("msgpack", &packed).to_value(),
            json!({"msgpack": {"value": 7}})
        );
        let bad = field_json("msgpack", b"\xdc\x00\x20ab").to_value();
        assert!(bad.get("error").is_some(), "{bad}");
        // Keys keep the entry's order; a repeated key keeps its first place.
        let fields = [("z", "1"), ("a", "2"), ("z", "3")]
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()));
        assert_eq!(
            serde_json::to_string(&fields_json(&fields)).unwrap(),
            r#"{"z":"3","a":"2"}"#
        );
    }
}
