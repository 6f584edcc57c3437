//! The one reader of Redis replies: the zero-copy scanner and cursor the hot read path uses
//! (over raw RESP bytes), and the helpers that read the `redis` client's [`Value`] replies of
//! every other stream command (entries, XINFO GROUPS and CONSUMERS, XPENDING), for the stages
//! and the operator commands alike. Replies in RESP2 or RESP3.

use bytes::Bytes;
use redis::Value;

use super::codec::{line, number_line};
use super::entry::{Entry, Held, RawFields};
use super::id::StreamId;

/// A reply that is an error or not what the command returns.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// An error reply, e.g. `NOGROUP …`.
    #[error("redis replied: {0}")]
    Server(String),
    #[error("redis reply is malformed: {0}")]
    Protocol(&'static str),
    /// A Redis Cluster node does not serve the key's slot: `MOVED` (the slot lives elsewhere
    /// now) or `ASK` (it is being migrated; ask the other node this once, after `ASKING`). The
    /// command was not run.
    #[error("redis cluster redirect: {0}")]
    Redirect(Redirect),
}

/// Where a Redis Cluster node sent a command (`-MOVED 3999 127.0.0.1:6381`,
/// `-ASK 3999 127.0.0.1:6381`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `MOVED` (`false`) or `ASK` (`true`).
    pub ask: bool,
    /// The key's hash slot.
    pub slot: u16,
    /// `host:port` of the node to go to.
    pub node: String,
}

impl std::fmt::Display for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = if self.ask { "ASK" } else { "MOVED" };
        write!(f, "{code} {} {}", self.slot, self.node)
    }
}

impl ReplyError {
    /// The code of an error reply: its first word (RESP error replies read `CODE message`).
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplyError::Server(message) => message.split(' ').next().filter(|c| !c.is_empty()),
            ReplyError::Protocol(_) => None,
            ReplyError::Redirect(r) => Some(if r.ask { "ASK" } else { "MOVED" }),
        }
    }

    /// The error reply `message` (without its `-`): a [`Redirect`] for `MOVED`/`ASK`, else
    /// [`ReplyError::Server`].
    pub(crate) fn from_reply(message: &[u8]) -> Self {
        let text = String::from_utf8_lossy(message).into_owned();
        let mut words = text.split(' ');
        let ask = match words.next() {
            Some("MOVED") => false,
            Some("ASK") => true,
            _ => return ReplyError::Server(text),
        };
        match (words.next().and_then(|s| s.parse().ok()), words.next()) {
            (Some(slot), Some(node)) if !node.is_empty() => ReplyError::Redirect(Redirect {
                ask,
                slot,
                node: node.to_owned(),
            }),
            _ => ReplyError::Server(text),
        }
    }
}

/// Finds where the reply starting at the front of a buffer ends, across partial reads: the
/// state survives a short buffer, so a large reply is scanned once.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    /// Bytes of the reply scanned so far.
    pos: usize,
    /// Elements still to scan (1 for the reply itself; arrays add their items).
    left: usize,
}

impl Scanner {
    /// `Ok(Some(len))` once the whole reply is in `buf`, `Ok(None)` if more is needed.
    pub(crate) fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ReplyError> {
        if self.left == 0 {
            self.left = 1;
        }
        while self.left > 0 {
            let rest = &buf[self.pos..];
            let next = match rest.first() {
                None => return Ok(None),
                Some(b'$' | b'*') => {
                    let Some((kind, n, at)) = number_line(rest) else {
                        return match line(rest) {
                            None => Ok(None),
                            Some(_) => Err(ReplyError::Protocol("bad length")),
                        };
                    };
                    let mut next = self.pos + at;
                    if kind == b'*' && n > 0 {
                        // Nested lying counts must not overflow (a panic in debug builds, a
                        // wrong reply end in release); saturated, the scan just waits.
                        self.left = self.left.saturating_add(n as usize);
                    } else if kind == b'$' && n >= 0 {
                        next += n as usize + 2;
                        if buf.len() < next {
                            return Ok(None);
                        }
                    }
                    next
                }
                Some(b'+' | b'-' | b':') => match line(rest) {
                    None => return Ok(None),
                    // Past the LF, even a bare one (`header.len() + 2` would overshoot it).
                    Some((_, after)) => self.pos + (rest.len() - after.len()),
                },
                Some(_) => return Err(ReplyError::Protocol("unknown reply type")),
            };
            self.pos = next;
            self.left -= 1;
        }
        let len = self.pos;
        *self = Self::default();
        Ok(Some(len))
    }
}

/// A cursor over one complete reply.
pub(crate) struct Reader {
    pub(crate) buf: Bytes,
    pub(crate) pos: usize,
}

impl Reader {
    /// An array's length; `None` for a nil array.
    pub(crate) fn array(&mut self) -> Result<Option<usize>, ReplyError> {
        let rest = &self.buf[self.pos..];
        if let Some((b'*', n, at)) = number_line(rest) {
            self.pos += at;
            return Ok(usize::try_from(n).ok());
        }
        match line(rest) {
            Some((msg, _)) if msg.first() == Some(&b'-') => Err(ReplyError::from_reply(&msg[1..])),
            _ => Err(ReplyError::Protocol("expected an array")),
        }
    }

    /// A bulk string's byte range.
    pub(crate) fn bulk(&mut self) -> Result<std::ops::Range<usize>, ReplyError> {
        match number_line(&self.buf[self.pos..]) {
            Some((b'$', n, at)) if n >= 0 => {
                let start = self.pos + at;
                self.pos = start + n as usize + 2;
                Ok(start..start + n as usize)
            }
            _ => Err(ReplyError::Protocol("expected a bulk string")),
        }
    }

    /// `[[id, [name, value, …] | nil], …]`: entries, and IDs deleted while pending.
    pub(crate) fn entries(
        &mut self,
        deliveries: u64,
    ) -> Result<(Vec<Entry>, Vec<StreamId>), ReplyError> {
        let n = self.array()?.unwrap_or(0);
        // Each entry takes bytes of the reply: a lying count cannot reserve more than that.
        let mut entries = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        let mut deleted = Vec::new();
        for _ in 0..n {
            if self.array()? != Some(2) {
                return Err(ReplyError::Protocol("an entry is not [id, fields]"));
            }
            let id = self.bulk()?;
            let id = StreamId::from_bytes(&self.buf[id])
                .ok_or(ReplyError::Protocol("entry ID is not <ms>-<seq>"))?;
            let Some(items) = self.array()? else {
                deleted.push(id);
                continue;
            };
            if items % 2 != 0 {
                return Err(ReplyError::Protocol("odd number of field items"));
            }
            let start = self.pos;
            let mut bytes = 0;
            for _ in 0..items {
                bytes += self.bulk()?.len();
            }
            entries.push(Entry {
                id,
                fields: RawFields::from_resp(
                    self.buf.slice(start..self.pos),
                    (items / 2) as u32,
                    bytes as u32,
                ),
                deliveries,
                held: Held::default(),
                input: 0,
            });
        }
        Ok((entries, deleted))
    }
}

// ---- Replies of the `redis` client ----

/// Parses `[[id, [f, v, …]], …]` into entries; entries whose fields are nil (deleted while
/// pending) come back in the second list.
pub fn parse_entries(value: Value, deliveries: u64) -> (Vec<Entry>, Vec<StreamId>) {
    let mut entries = Vec::new();
    let mut deleted = Vec::new();
    let Value::Array(items) = value else {
        return (entries, deleted);
    };
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let Some(id) = pair.pop().and_then(stream_id) else {
            continue;
        };
        match fields {
            Some(Value::Array(flat)) => {
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Some(k), Some(v)) = (bulk_bytes(k), bulk_bytes(v)) {
                        pairs.push((k, v));
                    }
                }
                entries.push(Entry {
                    id,
                    fields: RawFields::from_pairs(pairs),
                    deliveries,
                    held: Held::default(),
                    input: 0,
                });
            }
            _ => deleted.push(id),
        }
    }
    (entries, deleted)
}

/// A reply of field/value pairs (a flat RESP2 array or a RESP3 map) as pairs, keys as text.
pub fn field_pairs(v: Value) -> Vec<(String, Value)> {
    let flat = match v {
        Value::Map(m) => {
            return m
                .into_iter()
                .filter_map(|(k, v)| Some((text(k)?, v)))
                .collect()
        }
        Value::Array(flat) => flat,
        _ => return Vec::new(),
    };
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(k) = text(k) {
            out.push((k, v));
        }
    }
    out
}

/// A string-like reply's bytes (an integer as its digits).
pub fn bulk_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// A string-like reply as text; bytes that are not UTF-8 become replacement characters.
pub fn text(v: Value) -> Option<String> {
    bulk_bytes(v).map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// The `last-generated-id` of an XINFO STREAM reply: the ID of the newest entry ever added.
pub fn last_generated_id(reply: Value) -> Option<StreamId> {
    field_pairs(reply)
        .into_iter()
        .find(|(k, _)| k == "last-generated-id")
        .and_then(|(_, v)| stream_id(v))
}

/// A reply holding a stream ID.
pub fn stream_id(v: Value) -> Option<StreamId> {
    match v {
        Value::BulkString(b) => StreamId::from_bytes(&b),
        Value::SimpleString(s) => StreamId::from_bytes(s.as_bytes()),
        _ => None,
    }
}

/// An integer reply.
pub fn signed(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// A non-negative integer reply, or a bulk string of digits (XPENDING's per-consumer counts).
pub fn count(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// True for the error XINFO replies for a stream that does not exist: `ERR no such key`. ERR
/// is Redis's generic code; XINFO GROUPS and CONSUMERS reply with it only for a missing key
/// and for malformed arguments, which these calls never send.
pub fn is_no_such_key(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
}

/// True for `NOGROUP`: the group, or for XPENDING the stream, does not exist.
pub fn is_no_group(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// Consumer-group counters of one stream, from XINFO GROUPS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered (None when Redis cannot tell, after deletions).
    pub lag: Option<u64>,
    pub consumers: u64,
    pub last_delivered_id: StreamId,
}

/// The groups of an XINFO GROUPS reply.
pub fn groups(reply: Value) -> Vec<GroupInfo> {
    let Value::Array(groups) = reply else {
        return Vec::new();
    };
    groups
        .into_iter()
        .map(|g| {
            let mut info = GroupInfo::default();
            for (k, v) in field_pairs(g) {
                match k.as_str() {
                    "name" => info.name = text(v).unwrap_or_default(),
                    "pending" => info.pending = count(&v).unwrap_or(0),
                    "lag" => info.lag = signed(&v).and_then(|n| u64::try_from(n).ok()),
                    "consumers" => info.consumers = count(&v).unwrap_or(0),
                    "last-delivered-id" => {
                        info.last_delivered_id = stream_id(v).unwrap_or_default()
                    }
                    _ => {}
                }
            }
            info
        })
        .collect()
}

/// One consumer of a group, from XINFO CONSUMERS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// The consumer name (`<stage>-<host>-<pid>-<random>` for strata's stages).
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last asked for entries (read or claim).
    pub idle_ms: u64,
    /// Milliseconds since it last got entries; Redis 7.2 and later, None before (or never).
    pub inactive_ms: Option<u64>,
}

/// The consumers of an XINFO CONSUMERS reply.
pub fn consumers(reply: Value) -> Vec<ConsumerInfo> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            let mut c = ConsumerInfo::default();
            for (k, v) in field_pairs(item) {
                match k.as_str() {
                    "name" => c.name = text(v).unwrap_or_default(),
                    "pending" => c.pending = count(&v).unwrap_or(0),
                    "idle" => c.idle_ms = count(&v).unwrap_or(0),
                    // -1 means the consumer never got an entry.
                    "inactive" => c.inactive_ms = signed(&v).and_then(|n| u64::try_from(n).ok()),
                    _ => {}
                }
            }
            c
        })
        .collect()
}

/// XPENDING's summary form for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    /// Entries delivered and not acknowledged.
    pub count: u64,
    /// The smallest pending ID: the oldest entry still in flight.
    pub smallest: Option<StreamId>,
    /// The largest pending ID.
    pub largest: Option<StreamId>,
    /// Pending entries per consumer that holds any.
    pub per_consumer: Vec<(String, u64)>,
}

/// An XPENDING summary reply (`XPENDING stream group`).
pub fn pending_summary(reply: Value) -> PendingSummary {
    let Value::Array(parts) = reply else {
        return PendingSummary::default();
    };
    let mut it = parts.into_iter();
    let count_ = it.next().as_ref().and_then(count).unwrap_or(0);
    let smallest = it.next().and_then(stream_id);
    let largest = it.next().and_then(stream_id);
    let mut per_consumer = Vec::new();
    if let Some(Value::Array(rows)) = it.next() {
        for row in rows {
            if let Value::Array(cols) = row {
                let mut c = cols.into_iter();
                if let (Some(name), Some(n)) = (c.next().and_then(text), c.next()) {
                    per_consumer.push((name, count(&n).unwrap_or(0)));
                }
            }
        }
    }
    PendingSummary {
        count: count_,
        smallest,
        largest,
        per_consumer,
    }
}

/// One pending entry, from XPENDING's extended form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    /// The entry's stream ID.
    pub id: StreamId,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How often it has been delivered.
    pub deliveries: u64,
}

/// The rows of an extended XPENDING reply (`XPENDING stream group start end count …`).
pub fn pending_entries(reply: Value) -> Vec<PendingEntry> {
    let Value::Array(rows) = reply else {
        return Vec::new();
    };
    rows.into_iter()
        .filter_map(|row| {
            let Value::Array(cols) = row else {
                return None;
            };
            let mut c = cols.into_iter();
            let (Some(id), Some(consumer), Some(idle), Some(n)) = (
                c.next().and_then(stream_id),
                c.next().and_then(text),
                c.next(),
                c.next(),
            ) else {
                return None;
            };
            Some(PendingEntry {
                id,
                consumer,
                idle_ms: count(&idle).unwrap_or(0),
                deliveries: count(&n).unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
fn parse_entries_resp(buf: &[u8]) -> Result<(Vec<Entry>, Vec<StreamId>), ReplyError> {
    let mut scanner = Scanner::default();
    assert_eq!(scanner.scan(buf)?, Some(buf.len()));
    Reader {
        buf: Bytes::copy_from_slice(buf),
        pos: 0,
    }
    .entries(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_and_groups_are_told_by_code() {
        let no_key = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "no such key",
        ));
        assert!(is_no_such_key(&no_key));
        let no_group = redis::make_extension_error("NOGROUP".into(), Some("No such key".into()));
        assert!(is_no_group(&no_group) && !is_no_such_key(&no_group));
    }

    #[test]
    fn value_replies_parse_in_resp2_and_resp3() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let g = vec![
            bulk("name"),
            bulk("ingest"),
            bulk("pending"),
            Value::Int(2),
            bulk("lag"),
            Value::Nil,
            bulk("last-delivered-id"),
            bulk("5-1"),
        ];
        let resp3 = Value::Map(g.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect());
        for reply in [Value::Array(g), resp3] {
            let got = groups(Value::Array(vec![reply]));
            assert_eq!(got.len(), 1);
            assert_eq!(
                (got[0].name.as_str(), got[0].pending, got[0].lag),
                ("ingest", 2, None)
            );
            assert_eq!(got[0].last_delivered_id, StreamId::new(5, 1));
        }
        let summary = pending_summary(Value::Array(vec![
            Value::Int(3),
            bulk("1-0"),
            bulk("9-0"),
            Value::Array(vec![Value::Array(vec![bulk("c"), bulk("3")])]),
        ]));
        assert_eq!(summary.smallest, Some(StreamId::new(1, 0)));
        assert_eq!(summary.per_consumer, vec![("c".to_string(), 3)]);
    }

    #[test]
    fn scanner_handles_every_split_point() {
        let reply = b"*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\na\r\n$4\r\nx\r\ny\r\n$1\r\nb\r\n$0\r\n\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";
        for cut in 0..reply.len() {
            let mut s = Scanner::default();
            assert_eq!(s.scan(&reply[..cut]).unwrap(), None, "cut at {cut}");
            assert_eq!(s.scan(reply).unwrap(), Some(reply.len()));
        }
        let (entries, deleted) = parse_entries_resp(reply).unwrap();
        assert_eq!(deleted, vec!["2-0".to_string()]);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].fields.get("a"), Some(&b"x\r\ny"[..]));
        assert_eq!(entries[0].fields.get("b"), Some(&b""[..]));
        assert_eq!(entries[0].fields.size(), 6);
    }

    #[test]
    fn errors_are_replies_not_hangs() {
        let mut s = Scanner::default();
        let err = b"-NOGROUP No such key\r\n";
        assert_eq!(s.scan(err).unwrap(), Some(err.len()));
        let mut r = Reader {
            buf: Bytes::from_static(err),
            pos: 0,
        };
        let e = r.array().unwrap_err();
        assert!(
            matches!(&e, ReplyError::Server(m) if m == "NOGROUP No such key"),
            "{e:?}"
        );
        assert!(Scanner::default().scan(b"?what\r\n").is_err());
    }

    #[test]
    fn cluster_redirects_are_typed() {
        let read = |reply: &'static [u8]| {
            Reader {
                buf: Bytes::from_static(reply),
                pos: 0,
            }
            .array()
            .unwrap_err()
        };
        let moved = read(b"-MOVED 3999 127.0.0.1:6381\r\n");
        assert_eq!(
            moved,
            ReplyError::Redirect(Redirect {
                ask: false,
                slot: 3999,
                node: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(moved.code(), Some("MOVED"));
        let ask = read(b"-ASK 12 ::1:7000\r\n");
        assert!(
            matches!(&ask, ReplyError::Redirect(r) if r.ask && r.slot == 12 && r.node == "::1:7000")
        );
        // Not a redirect without a slot and a node.
        assert!(matches!(read(b"-MOVED\r\n"), ReplyError::Server(_)));
    }

    /// Scans `buf` as one read would (in `cuts` pieces), then parses what the scanner says is
    /// a whole reply: what `ReadConnection` does with bytes from the socket.
    fn scan_and_parse(buf: &[u8], cuts: &[usize]) -> Result<Option<usize>, ReplyError> {
        let mut s = Scanner::default();
        for &cut in cuts.iter().filter(|&&c| c < buf.len()) {
            if let Some(len) = s.scan(&buf[..cut])? {
                return parse_prefix(buf, len);
            }
        }
        match s.scan(buf)? {
            Some(len) => parse_prefix(buf, len),
            None => Ok(None),
        }
    }

    fn parse_prefix(buf: &[u8], len: usize) -> Result<Option<usize>, ReplyError> {
        assert!(len <= buf.len());
        let mut r = Reader {
            buf: Bytes::copy_from_slice(&buf[..len]),
            pos: 0,
        };
        let (entries, _) = r.entries(1)?;
        for e in &entries {
            assert!(e.fields.iter_bytes().count() == e.fields.len());
        }
        Ok(Some(entries.len()))
    }

    /// Random, mutated and truncated replies: no panic, no allocation beyond the reply.
    #[test]
    fn reader_survives_arbitrary_replies() {
        use rand::{Rng, SeedableRng};
        let good: &[u8] = b"*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\na\r\n$4\r\nx\r\ny\r\n$1\r\nb\r\n$0\r\n\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";
        assert_eq!(scan_and_parse(good, &[]).unwrap(), Some(1));
        const BYTES: &[u8] = b"*$+-:0123456789\r\n";
        let mut parsed = 0;
        for seed in 0..5000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut m = good.to_vec();
            if seed % 5 == 0 {
                m = (0..rng.random_range(0..100))
                    .map(|_| BYTES[rng.random_range(0..BYTES.len())])
                    .collect();
            }
            for _ in 0..rng.random_range(0..4) {
                if m.is_empty() {
                    break;
                }
                let at = rng.random_range(0..m.len());
                match rng.random_range(0..3) {
                    0 => m[at] = BYTES[rng.random_range(0..BYTES.len())],
                    1 => m.truncate(at),
                    _ => m.insert(at, rng.random()),
                }
            }
            // A connection's buffer only grows between scans.
            let mut cuts: Vec<usize> = (0..3).map(|_| rng.random_range(0..=m.len())).collect();
            cuts.sort_unstable();
            parsed += usize::from(matches!(scan_and_parse(&m, &cuts), Ok(Some(_))));
        }
        assert!(parsed > 0, "no mutated reply parsed");
    }

    #[test]
    fn huge_counts_wait_for_data_instead_of_reserving_it() {
        for header in [
            &b"*2147483647\r\n"[..],
            b"$999999999999999999\r\n",
            b"*1\r\n$2147483647\r\nab",
        ] {
            assert_eq!(Scanner::default().scan(header).unwrap(), None);
        }
        // Counts that would overflow the elements still to scan.
        let nested = b"*999999999999999999\r\n".repeat(30);
        assert_eq!(Scanner::default().scan(&nested).unwrap(), None);
        let mut r = Reader {
            buf: Bytes::from_static(b"*2147483647\r\n"),
            pos: 0,
        };
        assert!(r.entries(1).is_err());
    }

    #[test]
    fn a_bare_lf_ends_a_line_where_it_is() {
        assert_eq!(Scanner::default().scan(b"+OK\n").unwrap(), Some(4));
        assert_eq!(
            Scanner::default().scan(b"*2\r\n:1\n:2\r\n").unwrap(),
            Some(11)
        );
    }
}
