//! Stream entry IDs: `<milliseconds>-<sequence>`, parsed in this one place.

use std::fmt;
use std::str::FromStr;

/// A stream entry ID. Ordered as Redis orders entries: by milliseconds, then sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// When the entry was added (the server's clock, in milliseconds since the epoch).
    pub ms: u64,
    /// Its number among the entries of that millisecond.
    pub seq: u64,
}

/// Text that is not a stream ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream ID `{0}`: expected <milliseconds>-<sequence>")]
pub struct InvalidStreamId(pub String);

/// The longest ID as text: two 20-digit numbers and a dash.
const MAX_LEN: usize = 41;

/// A decimal `u64` of ASCII digits only (no sign, no spaces).
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &d in s {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(n)
}

impl StreamId {
    /// `0-0`: before every entry (also the XAUTOCLAIM cursor that starts and ends a scan).
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// Parses `<ms>-<seq>` as Redis sends it.
    pub fn from_bytes(text: &[u8]) -> Option<Self> {
        let dash = memchr::memchr(b'-', text)?;
        Some(Self {
            ms: digits(&text[..dash])?,
            seq: digits(&text[dash + 1..])?,
        })
    }

    /// Parses `<ms>-<seq>` or a bare `<ms>` (sequence 0), as commands such as XRANGE accept.
    pub fn parse_loose(text: &str) -> Result<Self, InvalidStreamId> {
        match digits(text.as_bytes()) {
            Some(ms) => Ok(Self::new(ms, 0)),
            None => text.parse(),
        }
    }

    /// Writes the ID into `buf` and returns it as text, without allocating.
    pub fn write<'a>(&self, buf: &'a mut IdBuf) -> &'a str {
        let mut ms = itoa::Buffer::new();
        let mut seq = itoa::Buffer::new();
        let (ms, seq) = (
            ms.format(self.ms).as_bytes(),
            seq.format(self.seq).as_bytes(),
        );
        let bytes = &mut buf.0;
        bytes[..ms.len()].copy_from_slice(ms);
        bytes[ms.len()] = b'-';
        let end = ms.len() + 1 + seq.len();
        bytes[ms.len() + 1..end].copy_from_slice(seq);
        std::str::from_utf8(&bytes[..end]).expect("digits and a dash")
    }
}

/// Room for one ID as text (see [`StreamId::write`]).
pub struct IdBuf([u8; MAX_LEN]);

impl Default for IdBuf {
    fn default() -> Self {
        Self([0; MAX_LEN])
    }
}

impl FromStr for StreamId {
    type Err = InvalidStreamId;

    /// Parses a strict `<ms>-<seq>`, both parts decimal digits within 64 bits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(s.as_bytes()).ok_or_else(|| InvalidStreamId(s.to_string()))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write(&mut IdBuf::default()))
    }
}

impl PartialEq<str> for StreamId {
    fn eq(&self, other: &str) -> bool {
        other.parse::<StreamId>().is_ok_and(|id| id == *self)
    }
}

impl PartialEq<&str> for StreamId {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for StreamId {
    fn eq(&self, other: &String) -> bool {
        *self == *other.as_str()
    }
}

/// Serialized as its text, `<ms>-<seq>`.
impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.write(&mut IdBuf::default()))
    }
}

impl redis::ToRedisArgs for StreamId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg(self.write(&mut IdBuf::default()).as_bytes());
    }
}

impl redis::ToSingleRedisArg for StreamId {}

impl redis::FromRedisValue for StreamId {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let parsed = match &v {
            redis::Value::BulkString(b) => StreamId::from_bytes(b),
            redis::Value::SimpleString(s) => StreamId::from_bytes(s.as_bytes()),
            _ => None,
        };
        parsed.ok_or_else(|| format!("not a stream ID: {v:?}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_order() {
        let id: StreamId = "1793491200000-7".parse().unwrap();
        assert_eq!(id, StreamId::new(1_793_491_200_000, 7));
        assert_eq!(id.to_string(), "1793491200000-7");
        let max = StreamId::new(u64::MAX, u64::MAX);
        assert_eq!(max.to_string().parse::<StreamId>().unwrap(), max);
        assert!(StreamId::new(2, 0) > StreamId::new(1, 9));
        assert!(
            StreamId::new(10, 0) > StreamId::new(9, 99),
            "numeric, not text order"
        );
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "a-1",
            "1-+2",
            " 1-2",
            "18446744073709551616-0",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
        assert_eq!(StreamId::parse_loose("5").unwrap(), StreamId::new(5, 0));
        assert!(StreamId::parse_loose("abc").is_err());
        assert_eq!(id, "1793491200000-7");
        assert!(id != "1793491200000-8");
    }
}
