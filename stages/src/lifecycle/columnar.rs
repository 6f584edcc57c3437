//! PostgreSQL binary COPY → Arrow record batches, typed from the table schema.
//!
//! | schema type | COPY binary | Arrow |
//! | --- | --- | --- |
//! | timestamptz | i64 µs since 2000-01-01 | Timestamp(Microsecond, "UTC") |
//! | text | UTF-8 bytes | Utf8 |
//! | float8 | f64 | Float64 |
//! | int8 | i64 | Int64 |
//! | int4 | i32 | Int32 |
//! | bool | u8 | Boolean |
//! | jsonb | version byte 1 + JSON text | Utf8 (JSON text) |
//!
//! The decoder is fed the COPY stream in pieces of any size (a tuple may straddle two pieces)
//! and emits a batch every `batch_rows` rows, so memory is one batch plus one piece.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema as ArrowSchema, SchemaRef as ArrowSchemaRef, TimeUnit};
use strata_pipeline::schema::{ColumnType, Schema, PG_EPOCH_OFFSET_US};

use crate::copy::decode::{self, FormatError, Unit};

/// The Arrow type archived for a column type.
pub fn arrow_type(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Text | ColumnType::Jsonb => DataType::Utf8,
        ColumnType::Float8 => DataType::Float64,
        ColumnType::Int8 => DataType::Int64,
        ColumnType::Int4 => DataType::Int32,
        ColumnType::Bool => DataType::Boolean,
    }
}

/// The column type PostgreSQL's `format_type` names, if strata archives it.
pub fn column_type_from_sql(name: &str) -> Option<ColumnType> {
    Some(match name {
        "timestamp with time zone" => ColumnType::Timestamptz,
        "text" => ColumnType::Text,
        "double precision" => ColumnType::Float8,
        "bigint" => ColumnType::Int8,
        "integer" => ColumnType::Int4,
        "boolean" => ColumnType::Bool,
        "jsonb" => ColumnType::Jsonb,
        _ => return None,
    })
}

/// The Arrow schema of a table's archives: its columns in table order; required columns are
/// non-nullable.
pub fn arrow_schema(schema: &Schema) -> ArrowSchemaRef {
    Arc::new(ArrowSchema::new(
        schema
            .columns
            .iter()
            .map(|c| Field::new(&c.name, arrow_type(c.ty), !c.required))
            .collect::<Vec<_>>(),
    ))
}

/// Why a COPY stream could not be turned into batches.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a binary COPY stream of the table's columns.
    #[error("binary COPY stream")]
    Format(#[from] FormatError),
    /// A field does not hold a value of its column's type.
    #[error("binary COPY stream: row {row}, column `{column}`")]
    Value {
        row: u64,
        column: String,
        #[source]
        source: ValueError,
    },
    #[error("binary COPY stream ended without its trailer")]
    Truncated,
    #[error("building an Arrow batch")]
    Arrow(#[from] arrow_schema::ArrowError),
}

/// What is wrong with one field's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("timestamp out of range")]
    TimestampOutOfRange,
    #[error("empty jsonb value")]
    EmptyJsonb,
    #[error("jsonb format version {0}, expected 1")]
    JsonbVersion(u8),
    #[error("not valid UTF-8")]
    Utf8(#[source] std::str::Utf8Error),
}

/// One column being built.
enum Builder {
    Time(TimestampMicrosecondBuilder),
    Text(StringBuilder),
    Json(StringBuilder),
    F64(Float64Builder),
    I64(Int64Builder),
    I32(Int32Builder),
    Bool(BooleanBuilder),
}

impl Builder {
    fn new(ty: ColumnType, rows: usize) -> Self {
        match ty {
            ColumnType::Timestamptz => {
                Builder::Time(TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"))
            }
            ColumnType::Text => Builder::Text(StringBuilder::with_capacity(rows, rows * 16)),
            ColumnType::Jsonb => Builder::Json(StringBuilder::with_capacity(rows, rows * 32)),
            ColumnType::Float8 => Builder::F64(Float64Builder::with_capacity(rows)),
            ColumnType::Int8 => Builder::I64(Int64Builder::with_capacity(rows)),
            ColumnType::Int4 => Builder::I32(Int32Builder::with_capacity(rows)),
            ColumnType::Bool => Builder::Bool(BooleanBuilder::with_capacity(rows)),
        }
    }

    fn append_null(&mut self) {
        match self {
            Builder::Time(b) => b.append_null(),
            Builder::Text(b) | Builder::Json(b) => b.append_null(),
            Builder::F64(b) => b.append_null(),
            Builder::I64(b) => b.append_null(),
            Builder::I32(b) => b.append_null(),
            Builder::Bool(b) => b.append_null(),
        }
    }

    /// Appends one non-NULL field; `Err` says what is wrong with it.
    fn append(&mut self, v: &[u8]) -> Result<(), ValueError> {
        match self {
            Builder::Time(b) => {
                let pg = i64::from_be_bytes(fixed(v)?);
                // ±infinity have no Arrow value; they cannot be in a chunk with bounds anyway.
                b.append_value(
                    pg.checked_add(PG_EPOCH_OFFSET_US)
                        .ok_or(ValueError::TimestampOutOfRange)?,
                );
            }
            Builder::Text(b) => b.append_value(utf8(v)?),
            Builder::Json(b) => {
                let (version, text) = v.split_first().ok_or(ValueError::EmptyJsonb)?;
                if *version != 1 {
                    return Err(ValueError::JsonbVersion(*version));
                }
                b.append_value(utf8(text)?);
            }
            Builder::F64(b) => b.append_value(f64::from_be_bytes(fixed(v)?)),
            Builder::I64(b) => b.append_value(i64::from_be_bytes(fixed(v)?)),
            Builder::I32(b) => b.append_value(i32::from_be_bytes(fixed(v)?)),
            Builder::Bool(b) => b.append_value(fixed::<1>(v)?[0] != 0),
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Time(b) => Arc::new(b.finish()),
            Builder::Text(b) | Builder::Json(b) => Arc::new(b.finish()),
            Builder::F64(b) => Arc::new(b.finish()),
            Builder::I64(b) => Arc::new(b.finish()),
            Builder::I32(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
        }
    }
}

/// The `N` bytes of a fixed-size value.
fn fixed<const N: usize>(v: &[u8]) -> Result<[u8; N], ValueError> {
    v.try_into().map_err(|_| ValueError::Length {
        got: v.len(),
        expected: N,
    })
}

fn utf8(v: &[u8]) -> Result<&str, ValueError> {
    std::str::from_utf8(v).map_err(ValueError::Utf8)
}

/// Turns a binary COPY stream (`COPY (SELECT <schema columns>) TO STDOUT (FORMAT binary)`) into
/// record batches.
pub struct CopyDecoder {
    /// The batches' schema.
    schema: ArrowSchemaRef,
    /// Column names, for error messages.
    names: Vec<String>,
    /// One builder per column.
    builders: Vec<Builder>,
    /// Rows per emitted batch.
    batch_rows: usize,
    /// Rows in the builders now.
    in_batch: usize,
    /// Rows decoded so far.
    rows: u64,
    /// The tail of the last piece: an incomplete header or tuple.
    carry: Vec<u8>,
    /// The header has been read.
    header_done: bool,
    /// The trailer has been read.
    ended: bool,
}

impl CopyDecoder {
    pub fn new(schema: &Schema, batch_rows: usize) -> Self {
        let batch_rows = batch_rows.max(1);
        Self {
            schema: arrow_schema(schema),
            names: schema.columns.iter().map(|c| c.name.clone()).collect(),
            builders: schema
                .columns
                .iter()
                .map(|c| Builder::new(c.ty, batch_rows))
                .collect(),
            batch_rows,
            in_batch: 0,
            rows: 0,
            carry: Vec::new(),
            header_done: false,
            ended: false,
        }
    }

    /// The schema of the batches.
    pub fn schema(&self) -> ArrowSchemaRef {
        self.schema.clone()
    }

    /// Rows decoded so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Feeds the next piece of the stream; calls `emit` with every full batch.
    pub fn push<E: From<DecodeError>>(
        &mut self,
        piece: &[u8],
        emit: &mut impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.carry.is_empty() {
            let used = self.decode(piece, emit)?;
            self.carry.extend_from_slice(&piece[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(piece);
            let used = self.decode(&buf, emit)?;
            buf.drain(..used);
            self.carry = buf;
        }
        Ok(())
    }

    /// Ends the stream: the last (partial) batch, or an error if the trailer is missing.
    pub fn finish(mut self) -> Result<Option<RecordBatch>, DecodeError> {
        if !self.ended || !self.carry.is_empty() {
            return Err(DecodeError::Truncated);
        }
        if self.in_batch == 0 {
            return Ok(None);
        }
        self.take_batch().map(Some)
    }

    fn take_batch(&mut self) -> Result<RecordBatch, DecodeError> {
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        self.in_batch = 0;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Decodes every complete unit in `buf`; returns the bytes used.
    fn decode<E: From<DecodeError>>(
        &mut self,
        buf: &[u8],
        emit: &mut impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut pos = 0;
        if !self.header_done {
            let Some(len) = decode::header_len(buf).map_err(DecodeError::from)? else {
                return Ok(0);
            };
            pos = len;
            self.header_done = true;
        }
        let ncols = self.builders.len();
        loop {
            if self.ended {
                if pos < buf.len() {
                    return Err(
                        DecodeError::from(FormatError::AfterTrailer(buf.len() - pos)).into(),
                    );
                }
                return Ok(pos);
            }
            let tuple = match decode::next_unit(buf, pos, Some(ncols)).map_err(DecodeError::from)? {
                None => return Ok(pos),
                Some(Unit::Trailer) => {
                    self.ended = true;
                    pos += 2;
                    continue;
                }
                Some(Unit::Tuple(t)) => t,
            };
            for (col, field) in tuple.fields().enumerate() {
                let builder = &mut self.builders[col];
                match field {
                    None => builder.append_null(),
                    Some(v) => builder.append(v).map_err(|source| DecodeError::Value {
                        row: self.rows,
                        column: self.names[col].clone(),
                        source,
                    })?,
                }
            }
            pos += tuple.len();
            self.rows += 1;
            self.in_batch += 1;
            if self.in_batch == self.batch_rows {
                let batch = self.take_batch()?;
                emit(batch)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int32Type, TimestampMicrosecondType};

    const SCHEMA: &str = r#"
table = "t"
time_column = "time"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "name"
type = "text"
[[columns]]
name = "v"
type = "float8"
[[columns]]
name = "n"
type = "int4"
[[columns]]
name = "j"
type = "jsonb"
"#;

    fn tuple(out: &mut Vec<u8>, time_us: i64, name: Option<&str>, v: f64, n: i32, j: &str) {
        out.extend_from_slice(&5i16.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&(time_us - PG_EPOCH_OFFSET_US).to_be_bytes());
        match name {
            Some(s) => {
                out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&(j.len() as i32 + 1).to_be_bytes());
        out.push(1);
        out.extend_from_slice(j.as_bytes());
    }

    #[test]
    fn decodes_a_stream_split_anywhere_into_typed_batches() {
        let schema = Schema::from_toml("t.toml", SCHEMA).unwrap();
        let mut stream = Vec::new();
        stream.extend_from_slice(crate::copy::HEADER);
        for i in 0..5 {
            let name = (i != 2).then(|| format!("h{i}"));
            tuple(
                &mut stream,
                1_793_491_200_000_000 + i,
                name.as_deref(),
                i as f64 / 2.0,
                -(i as i32),
                "{\"a\": 1}",
            );
        }
        stream.extend_from_slice(crate::copy::TRAILER);
        for split in [1, 3, 7, 19, stream.len()] {
            let mut dec = CopyDecoder::new(&schema, 2);
            let mut batches = Vec::new();
            for piece in stream.chunks(split) {
                dec.push::<DecodeError>(piece, &mut |b| {
                    batches.push(b);
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(dec.rows(), 5);
            batches.extend(dec.finish().unwrap());
            assert_eq!(
                batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
                [2, 2, 1]
            );
            let b = &batches[1];
            let t = b.column(0).as_primitive::<TimestampMicrosecondType>();
            assert_eq!(t.value(0), 1_793_491_200_000_002);
            assert!(b.column(1).is_null(0));
            assert_eq!(b.column(2).as_primitive::<Float64Type>().value(1), 1.5);
            assert_eq!(b.column(3).as_primitive::<Int32Type>().value(1), -3);
            assert_eq!(b.column(4).as_string::<i32>().value(0), "{\"a\": 1}");
            assert_eq!(
                b.schema().field(0).data_type(),
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            );
        }
        let mut dec = CopyDecoder::new(&schema, 2);
        dec.push::<DecodeError>(&stream[..stream.len() - 2], &mut |_| Ok(()))
            .unwrap();
        assert!(matches!(dec.finish(), Err(DecodeError::Truncated)));
    }

    #[test]
    fn a_bad_field_names_its_row_and_column_and_keeps_the_cause() {
        let schema = Schema::from_toml("t.toml", SCHEMA).unwrap();
        let mut stream = crate::copy::HEADER.to_vec();
        tuple(&mut stream, 0, Some("h"), 1.0, 1, "{}");
        tuple(&mut stream, 0, Some("h"), 1.0, 1, "{}");
        // Row 1, column `j` (jsonb, the last): format version 2 instead of 1.
        let version = stream.len() - "{}".len() - 1;
        stream[version] = 2;
        stream.extend_from_slice(crate::copy::TRAILER);
        let mut dec = CopyDecoder::new(&schema, 10);
        let err = dec
            .push::<DecodeError>(&stream, &mut |_| Ok(()))
            .unwrap_err();
        let DecodeError::Value {
            row,
            column,
            source,
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((*row, column.as_str()), (1, "j"));
        assert_eq!(*source, ValueError::JsonbVersion(2));
        assert_eq!(
            strata_pipeline::error_chain(&err),
            "binary COPY stream: row 1, column `j`: jsonb format version 2, expected 1"
        );
        let mut bad = stream.clone();
        bad[0] = b'X';
        let err = CopyDecoder::new(&schema, 10)
            .push::<DecodeError>(&bad, &mut |_| Ok(()))
            .unwrap_err();
        assert!(matches!(err, DecodeError::Format(FormatError::Signature)));
    }
}
