//! Splitting a PostgreSQL binary COPY stream into tuples, so the ceiling can replay the rows
//! strata committed in two halves.
//!
//! Format (PostgreSQL docs, "COPY … binary format"): an 11-byte signature, an i32 flags field, an
//! i32 header-extension length and that many bytes; then per tuple an i16 field count followed
//! by, per field, an i32 length (-1 = NULL) and that many bytes; then the trailer, an i16 -1.

use std::ops::Range;

/// The 11-byte signature every binary COPY stream starts with.
pub const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// A binary COPY stream cut at tuple boundaries.
#[derive(Debug, PartialEq, Eq)]
pub struct Tuples {
    /// Length of the header (signature, flags, extension), which a COPY FROM needs too.
    pub header_len: usize,
    /// Byte offset of each tuple's start.
    pub starts: Vec<usize>,
    /// Byte offset just past the last tuple (where the trailer begins).
    pub end: usize,
}

impl Tuples {
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// The bytes of tuples `range` (by tuple index).
    pub fn span(&self, range: Range<usize>) -> Range<usize> {
        let from = self.starts.get(range.start).copied().unwrap_or(self.end);
        let to = self.starts.get(range.end).copied().unwrap_or(self.end);
        from..to
    }
}

/// Why a buffer is not a binary COPY stream.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed binary COPY data: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], ParseError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(ParseError(format!(
                "truncated {what} at byte {} (needs {n} bytes, {} left)",
                self.at,
                self.data.len() - self.at
            )));
        };
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn i16(&mut self, what: &str) -> Result<i16, ParseError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, ParseError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Finds the header and every tuple of `data`, checking the stream ends with the trailer.
pub fn parse(data: &[u8]) -> Result<Tuples, ParseError> {
    let mut r = Reader { data, at: 0 };
    if r.take(SIGNATURE.len(), "signature")? != SIGNATURE {
        return Err(ParseError("bad signature".into()));
    }
    let _flags = r.i32("flags field")?;
    let ext = r.i32("header extension length")?;
    let ext = usize::try_from(ext)
        .map_err(|_| ParseError(format!("negative header extension length {ext}")))?;
    r.take(ext, "header extension")?;
    let header_len = r.at;
    let mut starts = Vec::new();
    loop {
        let start = r.at;
        let fields = r.i16("tuple field count")?;
        if fields == -1 {
            if r.at != data.len() {
                return Err(ParseError(format!(
                    "{} bytes after the trailer",
                    data.len() - r.at
                )));
            }
            return Ok(Tuples {
                header_len,
                starts,
                end: start,
            });
        }
        if fields < 0 {
            return Err(ParseError(format!(
                "tuple at byte {start} has field count {fields}"
            )));
        }
        for _ in 0..fields {
            match r.i32("field length")? {
                -1 => {}
                len if len >= 0 => {
                    r.take(len as usize, "field")?;
                }
                len => {
                    return Err(ParseError(format!(
                        "field length {len} in the tuple at byte {start}"
                    )))
                }
            }
        }
        starts.push(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(tuples: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(b"ext!");
        for t in tuples {
            b.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for f in *t {
                match f {
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn finds_header_tuples_and_trailer() {
        let data = stream(&[
            &[Some(b"ab"), None],
            &[Some(b""), Some(b"xyz")],
            &[None, None],
        ]);
        let t = parse(&data).unwrap();
        assert_eq!(t.header_len, 19 + 4);
        assert_eq!(t.len(), 3);
        // tuple 0: 2 + (4 + 2) + 4 = 12 bytes; tuple 1: 2 + 4 + (4 + 3) = 13 bytes.
        assert_eq!(t.starts, vec![23, 35, 48]);
        assert_eq!(t.end, 48 + 2 + 4 + 4);
        assert_eq!(t.span(0..2), 23..48);
        assert_eq!(t.span(2..3), 48..t.end);
        assert_eq!(t.end + 2, data.len());
    }

    #[test]
    fn empty_stream_has_no_tuples() {
        let data = stream(&[]);
        let t = parse(&data).unwrap();
        assert_eq!((t.len(), t.end), (0, t.header_len));
    }

    #[test]
    fn rejects_truncated_and_malformed_data() {
        let data = stream(&[&[Some(b"abc")]]);
        let err = parse(&data[..data.len() - 3]).unwrap_err();
        assert!(err.0.contains("truncated"), "{err}");
        let mut bad = data.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad).unwrap_err().0, "bad signature");
        let mut extra = data;
        extra.push(0);
        assert!(parse(&extra).unwrap_err().0.contains("after the trailer"));
    }
}
