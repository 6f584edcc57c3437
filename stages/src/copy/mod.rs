//! PostgreSQL's binary COPY format, in one place: the writer encodes with it (`COPY … FROM STDIN
//! (FORMAT binary)`), the archiver decodes `COPY … TO STDOUT (FORMAT binary)` with it, and the
//! benchmark splits a stream at tuple boundaries with it.
//!
//! Format (PostgreSQL docs, "COPY … binary format"): the 11-byte [`SIGNATURE`], an i32 flags
//! field, an i32 header-extension length and that many bytes; then per tuple an i16 field
//! count followed by, per field, an i32 length (-1 = NULL) and that many bytes; then the
//! [`TRAILER`], an i16 -1. All integers are big-endian.
//!
//! # Layout
//! - this file: the signature, header and trailer.
//! - [`encode`]: tuples written straight from frame cells, no per-row allocation (the hot path).
//! - [`decode`]: the header, tuples and fields of a stream, from a buffer that may end
//!   anywhere (the archiver feeds it pieces), or a whole stream split at tuple boundaries.

pub mod decode;
pub mod encode;

pub use encode::{begin_tuple, put_cell, CellMismatch};

/// The 11-byte signature every binary COPY stream starts with.
pub const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Bytes of the header before its extension: the signature, the flags field and the
/// extension length.
pub const FIXED_HEADER_LEN: usize = SIGNATURE.len() + 8;

/// The header strata writes: the signature, no flags, no header extension.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The end of a stream: a tuple field count of -1.
pub const TRAILER: &[u8] = &[0xff, 0xff];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_signature_without_flags_or_extension() {
        assert_eq!(HEADER.len(), FIXED_HEADER_LEN);
        assert_eq!(&HEADER[..SIGNATURE.len()], SIGNATURE);
        assert_eq!(decode::header_len(HEADER), Ok(Some(HEADER.len())));
        assert_eq!(TRAILER, (-1i16).to_be_bytes());
    }
}
