//! The hot read path's own Redis connection, and entry fields kept as Redis sent them.
//!
//! Reading is where a stage spends most of its own CPU: every event arrives as a dozen RESP
//! bulk strings. The generic client turns each reply into a tree of owned values; here a reply
//! is read into one buffer, and each [`RawFields`] is a slice of it, so a thousand entries cost
//! one allocation, not twenty-five thousand. Only `XREADGROUP` goes through [`ReadConnection`];
//! every other call uses the pooled `redis` client.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::streams::{Entry, Fields};

/// Failures of the read connection.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("redis connection failed")]
    Io(#[from] std::io::Error),
    #[error("invalid redis URL")]
    Url(#[source] redis::RedisError),
    #[error("redis over TLS is not supported by this build")]
    Tls,
    /// An error reply, e.g. `NOGROUP …`.
    #[error("redis replied: {0}")]
    Server(String),
    #[error("redis reply is malformed: {0}")]
    Protocol(&'static str),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis closed the connection")]
    Closed,
}

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
    /// Encodes name/value pairs (for entries that did not come through [`ReadConnection`]).
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

fn put_bulk(buf: &mut BytesMut, data: &[u8]) {
    buf.put_u8(b'$');
    buf.put_slice(itoa::Buffer::new().format(data.len()).as_bytes());
    buf.put_slice(b"\r\n");
    buf.put_slice(data);
    buf.put_slice(b"\r\n");
}

/// Splits one `$<len>\r\n<bytes>\r\n` off the front of `buf`.
fn split_bulk(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (b'$', len, at) = number_line(buf)? else {
        return None;
    };
    let len = usize::try_from(len).ok()?;
    let rest = &buf[at..];
    if rest.len() < len + 2 {
        return None;
    }
    Some((&rest[..len], &rest[len + 2..]))
}

/// A `<kind><integer>\r\n` header (`$`, `*`, `:`) at the front of `buf`: its kind, its
/// integer, and where what follows it starts. One pass over a few bytes, which is what almost
/// every header of a stream reply is.
fn number_line(buf: &[u8]) -> Option<(u8, i64, usize)> {
    let (&kind, rest) = buf.split_first()?;
    let (negative, digits) = match rest.first() {
        Some(b'-') => (true, &rest[1..]),
        _ => (false, rest),
    };
    let mut n: i64 = 0;
    for (i, &d) in digits.iter().enumerate() {
        match d {
            b'0'..=b'9' if i < 18 => n = n * 10 + (d - b'0') as i64,
            b'\r' if i > 0 => {
                let end = 1 + usize::from(negative) + i;
                return (buf.get(end + 1) == Some(&b'\n')).then_some((
                    kind,
                    if negative { -n } else { n },
                    end + 2,
                ));
            }
            _ => return None,
        }
    }
    None
}

/// The line at the front of `buf` (without its CRLF) and what follows it. Only headers are
/// read as lines, and they hold no LF.
fn line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let lf = memchr::memchr(b'\n', buf)?;
    let end = if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    Some((&buf[..end], &buf[lf + 1..]))
}

/// Finds where the reply starting at the front of a buffer ends, across partial reads: the
/// state survives a short buffer, so a large reply is scanned once.
#[derive(Debug, Default)]
struct Scanner {
    /// Bytes of the reply scanned so far.
    pos: usize,
    /// Elements still to scan (1 for the reply itself; arrays add their items).
    left: usize,
}

impl Scanner {
    /// `Ok(Some(len))` once the whole reply is in `buf`, `Ok(None)` if more is needed.
    fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, RespError> {
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
                            Some(_) => Err(RespError::Protocol("bad length")),
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
                Some(_) => return Err(RespError::Protocol("unknown reply type")),
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
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// An array's length; `None` for a nil array.
    fn array(&mut self) -> Result<Option<usize>, RespError> {
        let rest = &self.buf[self.pos..];
        if let Some((b'*', n, at)) = number_line(rest) {
            self.pos += at;
            return Ok(usize::try_from(n).ok());
        }
        match line(rest) {
            Some((msg, _)) if msg.first() == Some(&b'-') => Err(RespError::Server(
                String::from_utf8_lossy(&msg[1..]).into_owned(),
            )),
            _ => Err(RespError::Protocol("expected an array")),
        }
    }

    /// A bulk string's byte range.
    fn bulk(&mut self) -> Result<std::ops::Range<usize>, RespError> {
        match number_line(&self.buf[self.pos..]) {
            Some((b'$', n, at)) if n >= 0 => {
                let start = self.pos + at;
                self.pos = start + n as usize + 2;
                Ok(start..start + n as usize)
            }
            _ => Err(RespError::Protocol("expected a bulk string")),
        }
    }

    /// `[[id, [name, value, …] | nil], …]`: entries, and IDs deleted while pending.
    fn entries(&mut self, deliveries: u64) -> Result<(Vec<Entry>, Vec<String>), RespError> {
        let n = self.array()?.unwrap_or(0);
        // Each entry takes bytes of the reply: a lying count cannot reserve more than that.
        let mut entries = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        let mut deleted = Vec::new();
        for _ in 0..n {
            if self.array()? != Some(2) {
                return Err(RespError::Protocol("an entry is not [id, fields]"));
            }
            let id = self.bulk()?;
            let id = std::str::from_utf8(&self.buf[id])
                .map_err(|_| RespError::Protocol("entry ID is not UTF-8"))?
                .to_owned();
            let Some(items) = self.array()? else {
                deleted.push(id);
                continue;
            };
            if items % 2 != 0 {
                return Err(RespError::Protocol("odd number of field items"));
            }
            let start = self.pos;
            let mut bytes = 0;
            for _ in 0..items {
                bytes += self.bulk()?.len();
            }
            entries.push(Entry {
                id,
                fields: RawFields {
                    resp: self.buf.slice(start..self.pos),
                    pairs: (items / 2) as u32,
                    bytes: bytes as u32,
                },
                deliveries,
                held: Default::default(),
            });
        }
        Ok((entries, deleted))
    }
}

/// A byte stream to Redis: TCP or a Unix socket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection used only to read entries (`XREADGROUP`).
pub struct ReadConnection {
    /// The socket.
    io: Box<dyn Io>,
    /// Bytes received and not yet handed out; each reply is split off and shared by its entries.
    buf: BytesMut,
    /// Where the reply being received ends, so far.
    scanner: Scanner,
    /// The command being sent, reused between calls.
    out: BytesMut,
}

/// Replies are read in pieces of at least this much.
const READ_CHUNK: usize = 256 * 1024;

/// How long past its BLOCK time a read may take before the connection is given up.
const REPLY_GRACE: Duration = Duration::from_secs(10);

impl ReadConnection {
    /// Connects as `url` says (host and port or a Unix socket, user, password, database).
    pub async fn connect(url: &str) -> Result<Self, RespError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(RespError::Url)?;
        let io: Box<dyn Io> = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
            _ => return Err(RespError::Tls),
        };
        let mut conn = Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            scanner: Scanner::default(),
            out: BytesMut::new(),
        };
        let settings = info.redis_settings();
        let timeout = Duration::from_secs(10);
        if let Some(password) = settings.password() {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = settings.username() {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.simple(&args, timeout).await?;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            conn.simple(&[b"SELECT", db.as_bytes()], timeout).await?;
        }
        Ok(conn)
    }

    /// Sends a command whose reply is a status or an error.
    async fn simple(&mut self, args: &[&[u8]], timeout: Duration) -> Result<(), RespError> {
        let reply = self.call(args, timeout).await?;
        match reply.first() {
            Some(b'-') => Err(RespError::Server(
                String::from_utf8_lossy(&reply[1..reply.len().saturating_sub(2)]).into_owned(),
            )),
            _ => Ok(()),
        }
    }

    /// Sends one command and returns its whole reply.
    async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Bytes, RespError> {
        self.out.clear();
        self.out.put_u8(b'*');
        self.out
            .put_slice(itoa::Buffer::new().format(args.len()).as_bytes());
        self.out.put_slice(b"\r\n");
        for a in args {
            put_bulk(&mut self.out, a);
        }
        let work = async {
            self.io.write_all(&self.out).await?;
            loop {
                if let Some(len) = self.scanner.scan(&self.buf)? {
                    return Ok(self.buf.split_to(len).freeze());
                }
                self.buf.reserve(READ_CHUNK);
                if self.io.read_buf(&mut self.buf).await? == 0 {
                    return Err(RespError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| RespError::Timeout(timeout))?
    }

    /// `XREADGROUP GROUP group consumer COUNT count BLOCK block_ms STREAMS stream >`: new
    /// entries (none when the block time passed).
    pub async fn read_new(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Entry>, RespError> {
        let (mut count_buf, mut block_buf) = (itoa::Buffer::new(), itoa::Buffer::new());
        let args: [&[u8]; 10] = [
            b"XREADGROUP",
            b"GROUP",
            group.as_bytes(),
            consumer.as_bytes(),
            b"COUNT",
            count_buf.format(count).as_bytes(),
            b"BLOCK",
            block_buf.format(block_ms).as_bytes(),
            b"STREAMS",
            stream.as_bytes(),
        ];
        let mut all: Vec<&[u8]> = args.to_vec();
        all.push(b">");
        let reply = self
            .call(&all, Duration::from_millis(block_ms) + REPLY_GRACE)
            .await?;
        let mut r = Reader { buf: reply, pos: 0 };
        // [[stream, entries]], or nil when the block time passed.
        let Some(streams) = r.array()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for _ in 0..streams {
            if r.array()? != Some(2) {
                return Err(RespError::Protocol("a stream is not [name, entries]"));
            }
            r.bulk()?;
            let (entries, _deleted) = r.entries(1)?;
            if out.is_empty() {
                out = entries;
            } else {
                out.extend(entries);
            }
        }
        Ok(out)
    }
}

/// Parses `[[id, fields], …]` as RESP bytes (used by tests of the parser).
#[cfg(test)]
fn parse_entries_resp(buf: &[u8]) -> Result<(Vec<Entry>, Vec<String>), RespError> {
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
            matches!(&e, RespError::Server(m) if m == "NOGROUP No such key"),
            "{e:?}"
        );
        assert!(Scanner::default().scan(b"?what\r\n").is_err());
    }

    /// Scans `buf` as one read would (in `cuts` pieces), then parses what the scanner says is
    /// a whole reply: what `ReadConnection` does with bytes from the socket.
    fn scan_and_parse(buf: &[u8], cuts: &[usize]) -> Result<Option<usize>, RespError> {
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

    fn parse_prefix(buf: &[u8], len: usize) -> Result<Option<usize>, RespError> {
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
