//! Binary COPY encoding, written straight from frame cells (no per-row allocation): a stream is
//! [`HEADER`](super::HEADER), per row [`begin_tuple`] and one [`put_cell`] per column, then
//! [`TRAILER`](super::TRAILER).

use bytes::{BufMut, BytesMut};
use strata_pipeline::frame::CellRef;
use strata_pipeline::schema::{ColumnType, PG_EPOCH_OFFSET_US};

/// Why a cell cannot be encoded for its column.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: the cell does not fit the column's type")]
pub struct CellMismatch {
    /// Index of the column.
    pub column: usize,
}

/// Starts a tuple of `ncols` fields.
pub fn begin_tuple(buf: &mut BytesMut, ncols: usize) {
    buf.put_i16(ncols as i16);
}

/// Appends one field of type `ty`.
pub fn put_cell(
    buf: &mut BytesMut,
    ty: ColumnType,
    cell: CellRef<'_>,
    column: usize,
) -> Result<(), CellMismatch> {
    match (ty, cell) {
        (_, CellRef::Null) => buf.put_i32(-1),
        (ColumnType::Bool, CellRef::Bool(b)) => {
            buf.put_i32(1);
            buf.put_u8(b as u8);
        }
        (ColumnType::Int4, CellRef::Int(n)) => {
            let n = i32::try_from(n).map_err(|_| CellMismatch { column })?;
            buf.put_i32(4);
            buf.put_i32(n);
        }
        (ColumnType::Int8, CellRef::Int(n)) => {
            buf.put_i32(8);
            buf.put_i64(n);
        }
        (ColumnType::Timestamptz, CellRef::Int(us)) => {
            buf.put_i32(8);
            buf.put_i64(us - PG_EPOCH_OFFSET_US);
        }
        (ColumnType::Float8, CellRef::Float(f)) => {
            buf.put_i32(8);
            buf.put_f64(f);
        }
        (ColumnType::Text, CellRef::Str(s)) => {
            buf.put_i32(s.len() as i32);
            buf.put_slice(s.as_bytes());
        }
        (ColumnType::Jsonb, CellRef::Str(s)) => {
            buf.put_i32(s.len() as i32 + 1);
            buf.put_u8(1); // jsonb binary format version
            buf.put_slice(s.as_bytes());
        }
        _ => return Err(CellMismatch { column }),
    }
    Ok(())
}
