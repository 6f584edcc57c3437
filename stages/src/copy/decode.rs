//! Reading a binary COPY stream: [`header_len`] and [`next_unit`] work on a buffer that may end
//! anywhere (they answer `Ok(None)` until the header or the next tuple is complete, so a
//! streaming reader keeps the tail and tries again with more bytes); [`split`] cuts a whole
//! stream at tuple boundaries. Neither copies field bytes: a [`Tuple`] borrows them.

use std::ops::Range;

use super::{FIXED_HEADER_LEN, SIGNATURE};

/// Why bytes are not a binary COPY stream. Byte offsets are from the start of the buffer given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad signature")]
    Signature,
    #[error("negative header extension length {0}")]
    HeaderExtension(i32),
    #[error("tuple at byte {at} has field count {count}")]
    FieldCount { at: usize, count: i16 },
    #[error("tuple at byte {at} has {count} fields, expected {expected}")]
    UnexpectedFieldCount {
        at: usize,
        count: i16,
        expected: usize,
    },
    #[error("field length {len} in the tuple at byte {at}")]
    FieldLength { at: usize, len: i32 },
    #[error("truncated {what} at byte {at} ({left} bytes left)")]
    Truncated {
        what: &'static str,
        at: usize,
        left: usize,
    },
    #[error("{0} bytes after the trailer")]
    AfterTrailer(usize),
}

fn be_i16(buf: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The length of the header (signature, flags, extension) at the start of `buf`, or `None`
/// while `buf` holds only part of it.
pub fn header_len(buf: &[u8]) -> Result<Option<usize>, FormatError> {
    let sig = SIGNATURE.len();
    if buf.len() >= sig && &buf[..sig] != SIGNATURE {
        return Err(FormatError::Signature);
    }
    let Some(ext) = be_i32(buf, FIXED_HEADER_LEN - 4) else {
        return Ok(None);
    };
    let ext = usize::try_from(ext).map_err(|_| FormatError::HeaderExtension(ext))?;
    let len = FIXED_HEADER_LEN + ext;
    Ok((buf.len() >= len).then_some(len))
}

/// What follows the header, unit by unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit<'a> {
    /// One row.
    Tuple(Tuple<'a>),
    /// The end of the data (2 bytes).
    Trailer,
}

/// One complete tuple, its field lengths checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    /// The whole tuple, field count included.
    bytes: &'a [u8],
    /// Its field count.
    count: usize,
}

impl<'a> Tuple<'a> {
    /// Bytes of the tuple, field count included: where the next unit starts.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the tuple has no fields (its length is then 2).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many fields it has.
    pub fn field_count(&self) -> usize {
        self.count
    }

    /// Its fields in order: `None` for NULL.
    pub fn fields(&self) -> Fields<'a> {
        Fields {
            rest: &self.bytes[2..],
            left: self.count,
        }
    }
}

/// The fields of a [`Tuple`].
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The lengths were checked when the tuple was found.
        let len = be_i32(self.rest, 0).expect("checked field length");
        self.rest = &self.rest[4..];
        if len < 0 {
            return Some(None);
        }
        let (value, rest) = self.rest.split_at(len as usize);
        self.rest = rest;
        Some(Some(value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Fields<'_> {}

/// The unit starting at `buf[at..]` (after the header), or `None` while `buf` ends before it
/// does. With `expected`, a tuple with another field count is an error as soon as its count is
/// read.
pub fn next_unit(
    buf: &[u8],
    at: usize,
    expected: Option<usize>,
) -> Result<Option<Unit<'_>>, FormatError> {
    let Some(count) = be_i16(buf, at) else {
        return Ok(None);
    };
    if count == -1 {
        return Ok(Some(Unit::Trailer));
    }
    if count < 0 {
        return Err(FormatError::FieldCount { at, count });
    }
    if expected.is_some_and(|n| n != count as usize) {
        return Err(FormatError::UnexpectedFieldCount {
            at,
            count,
            expected: expected.unwrap_or_default(),
        });
    }
    let mut p = at + 2;
    for _ in 0..count {
        let Some(len) = be_i32(buf, p) else {
            return Ok(None);
        };
        p += 4;
        match len {
            -1 => {}
            len if len >= 0 => {
                p += len as usize;
                if p > buf.len() {
                    return Ok(None);
                }
            }
            len => return Err(FormatError::FieldLength { at, len }),
        }
    }
    Ok(Some(Unit::Tuple(Tuple {
        bytes: &buf[at..p],
        count: count as usize,
    })))
}

/// A whole binary COPY stream cut at tuple boundaries.
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
    /// How many tuples.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The bytes of tuples `range` (by tuple index).
    pub fn span(&self, range: Range<usize>) -> Range<usize> {
        let from = self.starts.get(range.start).copied().unwrap_or(self.end);
        let to = self.starts.get(range.end).copied().unwrap_or(self.end);
        from..to
    }
}

/// Finds the header and every tuple of the whole stream `data`, checking it ends with the
/// trailer and nothing after it.
pub fn split(data: &[u8]) -> Result<Tuples, FormatError> {
    let truncated = |what, at: usize| FormatError::Truncated {
        what,
        at,
        left: data.len().saturating_sub(at),
    };
    let header_len = header_len(data)?.ok_or_else(|| truncated("header", 0))?;
    let mut starts = Vec::new();
    let mut at = header_len;
    loop {
        match next_unit(data, at, None)?.ok_or_else(|| truncated("tuple", at))? {
            Unit::Trailer => {
                let after = data.len() - (at + 2);
                if after > 0 {
                    return Err(FormatError::AfterTrailer(after));
                }
                return Ok(Tuples {
                    header_len,
                    starts,
                    end: at,
                });
            }
            Unit::Tuple(t) => {
                starts.push(at);
                at += t.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{begin_tuple, put_cell, HEADER, TRAILER};
    use bytes::BytesMut;
    use strata_pipeline::frame::CellRef;
    use strata_pipeline::schema::{ColumnType, PG_EPOCH_OFFSET_US};

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
        let t = split(&data).unwrap();
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
        let t = split(&data).unwrap();
        assert_eq!((t.len(), t.end), (0, t.header_len));
    }

    #[test]
    fn rejects_truncated_and_malformed_data() {
        let data = stream(&[&[Some(b"abc")]]);
        let err = split(&data[..data.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut bad = data.clone();
        bad[0] = b'X';
        assert_eq!(split(&bad).unwrap_err().to_string(), "bad signature");
        let mut extra = data.clone();
        extra.push(0);
        assert!(split(&extra)
            .unwrap_err()
            .to_string()
            .contains("after the trailer"));
        let mut negative = data;
        negative[23 + 2..23 + 6].copy_from_slice(&(-7i32).to_be_bytes());
        assert_eq!(
            split(&negative).unwrap_err(),
            FormatError::FieldLength { at: 23, len: -7 }
        );
    }

    #[test]
    fn a_unit_is_found_only_once_it_is_complete() {
        let data = stream(&[&[Some(b"abc"), None]]);
        for cut in 0..data.len() {
            let buf = &data[..cut];
            match header_len(buf).unwrap() {
                None => assert!(cut < 23, "{cut}"),
                Some(h) => {
                    assert_eq!(h, 23);
                    let unit = next_unit(buf, h, Some(2)).unwrap();
                    assert_eq!(unit.is_some(), cut >= h + 2 + 7 + 4, "{cut}");
                }
            }
        }
        assert_eq!(
            next_unit(&data, 23, Some(3)).unwrap_err(),
            FormatError::UnexpectedFieldCount {
                at: 23,
                count: 2,
                expected: 3
            }
        );
    }

    #[test]
    fn what_the_encoder_writes_the_decoder_reads() {
        let types = [
            ColumnType::Timestamptz,
            ColumnType::Text,
            ColumnType::Jsonb,
            ColumnType::Int4,
            ColumnType::Bool,
        ];
        let cells = [
            CellRef::Int(1_793_491_200_000_000),
            CellRef::Str("h1"),
            CellRef::Str("{}"),
            CellRef::Null,
            CellRef::Bool(true),
        ];
        let mut buf = BytesMut::new();
        assert_eq!(
            put_cell(&mut buf, ColumnType::Int4, CellRef::Int(1 << 40), 3),
            Err(crate::copy::CellMismatch { column: 3 })
        );
        assert!(
            buf.is_empty(),
            "nothing written for a cell that does not fit"
        );
        buf.extend_from_slice(HEADER);
        for _ in 0..2 {
            begin_tuple(&mut buf, types.len());
            for (col, (ty, cell)) in types.iter().zip(cells).enumerate() {
                put_cell(&mut buf, *ty, cell, col).unwrap();
            }
        }
        buf.extend_from_slice(TRAILER);
        let data = &buf[..];
        let tuples = split(data).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tuples.len(), 2, "{tuples:?}");
        let Some(Unit::Tuple(t)) = next_unit(data, tuples.starts[1], Some(5)).unwrap() else {
            panic!("a tuple");
        };
        let fields: Vec<Option<&[u8]>> = t.fields().collect();
        let time = (1_793_491_200_000_000 - PG_EPOCH_OFFSET_US).to_be_bytes();
        assert_eq!(
            fields,
            [
                Some(&time[..]),
                Some(&b"h1"[..]),
                Some(&b"\x01{}"[..]),
                None,
                Some(&[1u8][..])
            ]
        );
    }
}
