//! Stream entries as a stage sees them: an ID, the fields as Redis sent them, the delivery
//! count, and the read they came in.

use std::borrow::Cow;
use std::fmt;

use bytes::{Bytes, BytesMut};

use super::codec::{put_bulk, split_bulk};
use super::id::StreamId;

/// A field list to write to a stream, in order.
pub type Fields = Vec<(String, Vec<u8>)>;

/// The fields of one stream entry, as the RESP bulk strings Redis sent (`$<len>\r\n<bytes>\r\n`
/// for each name and value in turn), sharing the buffer of the reply they came in.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RawFields {
    /// The encoded names and values.
    resp: Bytes,
    /// How many name/value pairs.
    pairs: u32,
    /// Names plus values, in bytes: what `max_event_bytes` and the batch limits count.
    bytes: u32,
}

impl RawFields {
    /// Encodes name/value pairs (for entries that did not come through [`super::ReadConnection`]).
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut buf = BytesMut::new();
        let (mut n, mut bytes) = (0u32, 0u32);
        for (k, v) in pairs {
            for part in [k.as_ref(), v.as_ref()] {
                put_bulk(&mut buf, part);
                bytes += part.len() as u32;
            }
            n += 1;
        }
        Self {
            resp: buf.freeze(),
            pairs: n,
            bytes,
        }
    }

    /// Number of name/value pairs.
    pub fn len(&self) -> usize {
        self.pairs as usize
    }

    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// Names plus values, in bytes.
    pub fn size(&self) -> usize {
        self.bytes as usize
    }

    /// The pairs in order, names as bytes.
    pub fn iter_bytes(&self) -> RawFieldsIter<'_> {
        RawFieldsIter {
            rest: &self.resp,
            left: self.pairs,
        }
    }

    /// The pairs in order; a name that is not UTF-8 is shown with replacement characters.
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'_, str>, &[u8])> {
        self.iter_bytes().map(|(k, v)| {
            let name = match std::str::from_utf8(k) {
                Ok(name) => Cow::Borrowed(name),
                Err(_) => String::from_utf8_lossy(k),
            };
            (name, v)
        })
    }

    /// The value of the first field called `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter_bytes()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// Owned pairs, e.g. to dead-letter the entry with extra fields.
    pub fn to_vec(&self) -> Fields {
        self.iter()
            .map(|(k, v)| (k.into_owned(), v.to_vec()))
            .collect()
    }
}

impl fmt::Debug for RawFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(v).into_owned())),
            )
            .finish()
    }
}

/// Iterator over [`RawFields`].
pub struct RawFieldsIter<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Iterator for RawFieldsIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated when the fields were built, so these cannot fail.
        let (k, rest) = split_bulk(self.rest)?;
        let (v, rest) = split_bulk(rest)?;
        self.rest = rest;
        Some((k, v))
    }
}

impl RawFields {
    /// Fields already encoded as `pairs` name/value bulk strings in `resp` (validated by the
    /// reply reader), `bytes` long without the framing.
    pub(crate) fn from_resp(resp: Bytes, pairs: u32, bytes: u32) -> Self {
        Self { resp, pairs, bytes }
    }
}

/// The smallest and largest ID of one read: while any entry of it is unacknowledged, the
/// consumer's entries in that range are kept from looking idle (see
/// [`super::Consumer::touch`]).
#[derive(Debug)]
pub struct ReadSpan {
    pub first: StreamId,
    pub last: StreamId,
}

/// The read an entry came in, kept alive by its entries: when the last one is dropped (its
/// batch committed), the span stops being touched. Entries that were not read by a stage loop
/// hold none.
#[derive(Debug, Clone, Default)]
pub struct Held(pub Option<std::sync::Arc<ReadSpan>>);

/// One stream entry as delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The stream ID; `id.ms` is when the entry was added.
    pub id: StreamId,
    /// The fields as the producer sent them.
    pub fields: RawFields,
    /// How many times the group has delivered this entry (1 on first read).
    pub deliveries: u64,
    /// The read it came in, while that read is in flight.
    pub held: Held,
    /// Which input of the loop that read it (an index into its inputs): a loop over several
    /// streams (the partitions of a table, [`crate::runner::run_loop_over`]) batches their
    /// entries together, and each entry is acknowledged on the stream it came from. 0 in a loop
    /// of one input and for entries no loop read.
    pub input: u16,
}

impl Entry {
    /// An entry built from name/value pairs (tests, tools).
    ///
    /// # Panics
    /// If `id` is not a stream ID (`<ms>-<seq>`).
    pub fn new<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        id: impl AsRef<str>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let id = id.as_ref();
        Self {
            id: id.parse().unwrap_or_else(|e| panic!("Entry::new: {e}")),
            fields: RawFields::from_pairs(fields),
            deliveries: 1,
            held: Held::default(),
            input: 0,
        }
    }

    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name)
    }

    /// Field names plus values in bytes.
    pub fn size(&self) -> usize {
        self.fields.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_fields_round_trip() {
        let f = RawFields::from_pairs([("time", &b"17"[..]), ("tags", b"{\"a\":\"\r\n\"}")]);
        assert_eq!(f.len(), 2);
        assert_eq!(f.size(), 4 + 2 + 4 + 10);
        assert_eq!(f.get("tags"), Some(&b"{\"a\":\"\r\n\"}"[..]));
        assert_eq!(f.get("nope"), None);
        assert_eq!(
            f.to_vec(),
            vec![
                ("time".to_string(), b"17".to_vec()),
                ("tags".to_string(), b"{\"a\":\"\r\n\"}".to_vec())
            ]
        );
    }
}
