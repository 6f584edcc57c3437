//! RESP2 framing: the `<kind><integer>\r\n` headers and `$<len>\r\n<bytes>\r\n` bulk strings
//! that [`super::entry::RawFields`], the reply reader and the read connection share.

use bytes::{BufMut, BytesMut};

/// Appends `data` as one bulk string.
pub(crate) fn put_bulk(buf: &mut BytesMut, data: &[u8]) {
    buf.put_u8(b'$');
    buf.put_slice(itoa::Buffer::new().format(data.len()).as_bytes());
    buf.put_slice(b"\r\n");
    buf.put_slice(data);
    buf.put_slice(b"\r\n");
}

/// Splits one `$<len>\r\n<bytes>\r\n` off the front of `buf`.
pub(crate) fn split_bulk(buf: &[u8]) -> Option<(&[u8], &[u8])> {
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
pub(crate) fn number_line(buf: &[u8]) -> Option<(u8, i64, usize)> {
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
pub(crate) fn line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let lf = memchr::memchr(b'\n', buf)?;
    let end = if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    Some((&buf[..end], &buf[lf + 1..]))
}
