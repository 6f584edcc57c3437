//! Dead letters: a rejected entry's original fields, then the fields strata adds (why, which
//! stage, its ID, how often it was delivered), packed into one field when there are many.

use super::entry::Fields;
use super::id::StreamId;

/// Dead-letter field added to the original fields of a rejected entry: why it was rejected.
pub const DLQ_ERROR: &str = "error";
/// Dead-letter field: the stage (consumer group) that rejected it.
pub const DLQ_STAGE: &str = "stage";
/// Dead-letter field: the rejected entry's ID in its stream.
pub const DLQ_SOURCE_ID: &str = "source_id";
/// Dead-letter field: how many times the entry had been delivered.
pub const DLQ_DELIVERIES: &str = "deliveries";
/// Dead-letter field: the SQLSTATE, for rows PostgreSQL refused.
pub const DLQ_SQLSTATE: &str = "sqlstate";
/// Dead-letter field holding the original fields packed (see [`dead_letter_fields`]).
pub const DLQ_PACKED: &str = "fields";

/// A rejected entry with more field pairs than this is dead-lettered with its fields packed
/// into one field [`DLQ_PACKED`], so every dead letter stays well within what one XADD from a
/// script can write ([`super::MAX_SCRIPT_FIELDS`]).
pub const DLQ_PACK_THRESHOLD: usize = 1_000;

/// The fields of a dead letter: the rejected entry's `original` fields, then `error`, `stage`,
/// `source_id`, `deliveries` and (when given) `sqlstate`, in that order, always last.
///
/// With more than [`DLQ_PACK_THRESHOLD`] original pairs, or when the original is exactly one
/// field named [`DLQ_PACKED`] (which would otherwise read as packed), the original fields are
/// packed into one field [`DLQ_PACKED`] (see [`pack_fields`]); `strata dlq` unpacks them.
pub fn dead_letter_fields(
    original: Fields,
    error: &str,
    stage: &str,
    source_id: StreamId,
    deliveries: u64,
    sqlstate: Option<&str>,
) -> Fields {
    let pack =
        original.len() > DLQ_PACK_THRESHOLD || (original.len() == 1 && original[0].0 == DLQ_PACKED);
    let mut fields = if pack {
        vec![(DLQ_PACKED.to_string(), pack_fields(&original))]
    } else {
        original
    };
    fields.reserve(5);
    fields.push((DLQ_ERROR.into(), error.as_bytes().to_vec()));
    fields.push((DLQ_STAGE.into(), stage.as_bytes().to_vec()));
    fields.push((DLQ_SOURCE_ID.into(), source_id.to_string().into_bytes()));
    fields.push((DLQ_DELIVERIES.into(), deliveries.to_string().into_bytes()));
    if let Some(code) = sqlstate {
        fields.push((DLQ_SQLSTATE.into(), code.as_bytes().to_vec()));
    }
    fields
}

/// Fields packed as one MessagePack value: an array of `[name, value]` arrays, both binary
/// (bin 8/16/32), in order, duplicates kept.
pub fn pack_fields(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 11).sum();
    let mut buf = Vec::with_capacity(size + 5);
    rmp::encode::write_array_len(&mut buf, fields.len() as u32).expect("vec write");
    for (k, v) in fields {
        rmp::encode::write_array_len(&mut buf, 2).expect("vec write");
        rmp::encode::write_bin(&mut buf, k.as_bytes()).expect("vec write");
        rmp::encode::write_bin(&mut buf, v).expect("vec write");
    }
    buf
}

/// The fields [`pack_fields`] packed; None unless `packed` is exactly such an array (names
/// and values binary or text, names UTF-8) with nothing after it.
pub fn unpack_fields(packed: &[u8]) -> Option<Fields> {
    let mut rd = packed;
    let value =
        rmpv::decode::read_value_with_max_depth(&mut rd, crate::pg_limits::MSGPACK_MAX_DEPTH)
            .ok()?;
    if !rd.is_empty() {
        return None;
    }
    let rmpv::Value::Array(items) = value else {
        return None;
    };
    let bytes = |v: rmpv::Value| match v {
        rmpv::Value::Binary(b) => Some(b),
        rmpv::Value::String(s) => Some(s.into_bytes()),
        _ => None,
    };
    items
        .into_iter()
        .map(|item| {
            let rmpv::Value::Array(pair) = item else {
                return None;
            };
            let [k, v]: [rmpv::Value; 2] = pair.try_into().ok()?;
            Some((String::from_utf8(bytes(k)?).ok()?, bytes(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Stage names as dead letters carry them (the stages' registry is in `strata-stages`).
    const INGEST: &str = "ingest";
    const BATCH_WRITER: &str = "batch-writer";

    fn fields(pairs: &[(&str, &[u8])]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn dead_letter_fields_keep_few_originals_and_add_strata_fields_last() {
        let original = fields(&[("error", b"mine"), ("v", b"\x00\xff"), ("v", b"2")]);
        let got = dead_letter_fields(
            original.clone(),
            "bad",
            INGEST,
            StreamId::new(5, 1),
            2,
            Some("23514"),
        );
        let mut want = original;
        want.extend(fields(&[
            (DLQ_ERROR, b"bad"),
            (DLQ_STAGE, b"ingest"),
            (DLQ_SOURCE_ID, b"5-1"),
            (DLQ_DELIVERIES, b"2"),
            (DLQ_SQLSTATE, b"23514"),
        ]));
        assert_eq!(got, want);
        let at_threshold: Fields = (0..DLQ_PACK_THRESHOLD)
            .map(|i| (format!("f{i}"), vec![1]))
            .collect();
        let got = dead_letter_fields(at_threshold, "e", INGEST, StreamId::new(1, 0), 1, None);
        assert_eq!(got.len(), DLQ_PACK_THRESHOLD + 4);
    }

    #[test]
    fn many_fields_are_packed_in_order_with_duplicates() {
        let original: Fields = (0..5_000)
            .map(|i| (format!("f{}", i % 3_000), vec![(i % 256) as u8; i % 5]))
            .collect();
        let got = dead_letter_fields(
            original.clone(),
            "e",
            BATCH_WRITER,
            StreamId::new(1, 0),
            7,
            None,
        );
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                DLQ_PACKED,
                DLQ_ERROR,
                DLQ_STAGE,
                DLQ_SOURCE_ID,
                DLQ_DELIVERIES
            ]
        );
        assert_eq!(unpack_fields(&got[0].1), Some(original));
        // A lone original field named like the packed one is packed too, so it reads back.
        let lone = fields(&[(DLQ_PACKED, b"\x90")]);
        let got = dead_letter_fields(lone.clone(), "e", INGEST, StreamId::new(1, 0), 1, None);
        assert_eq!(unpack_fields(&got[0].1), Some(lone));
        assert_eq!(unpack_fields(b"\x90\x00"), None, "trailing bytes");
        assert_eq!(unpack_fields(b"\x91\x91\xc4\x00"), None, "not a pair");
    }
}
