//! Frames: many validated rows in one `rows:{T}` entry, MessagePack compressed with zstd.
//!
//! A frame is one MessagePack array, so any MessagePack tool can read it after `zstd -d`:
//! `[1, [column names…], <bin: one type code per column>, [[cell, …], …]]`.
//! Cells are nil, booleans, integers (timestamps as microseconds since the Unix epoch),
//! 64-bit floats, and strings (text and JSON).
//!
//! The stream entry that carries a frame has the fields `frame` (the bytes), `rows` (how many),
//! and `first_ms` (the XADD time of the oldest source event, for end-to-end latency).

use std::cell::RefCell;

use zstd::bulk::{Compressor, Decompressor};

use crate::schema::{Cell, ColumnType, Schema};

/// Field names of a frame entry in `rows:{T}`.
pub const FRAME_FIELD: &str = "frame";
pub const ROWS_FIELD: &str = "rows";
pub const FIRST_MS_FIELD: &str = "first_ms";

const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid zstd")]
    Zstd(#[source] std::io::Error),
    #[error("frame declares {declared} bytes of content, more than the limit of {max_bytes}")]
    TooLarge { declared: u64, max_bytes: usize },
    #[error("frame is malformed: {0}")]
    Malformed(&'static str),
    #[error("frame version {0} is not supported")]
    Version(u8),
}

/// Builds one frame row by row. A row can be abandoned halfway (a later field failed to
/// validate) without leaving a trace.
pub struct FrameBuilder {
    /// The uncompressed MessagePack, header included.
    buf: Vec<u8>,
    /// Where the rows array's 32-bit length is patched in by `finish`.
    count_at: usize,
    /// Rows completed so far.
    rows: u32,
}

impl FrameBuilder {
    pub fn new(schema: &Schema) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.push(0x94); // fixarray(4)
        buf.push(VERSION);
        rmp::encode::write_array_len(&mut buf, schema.columns.len() as u32).expect("vec write");
        for c in &schema.columns {
            rmp::encode::write_str(&mut buf, &c.name).expect("vec write");
        }
        let codes: Vec<u8> = schema.columns.iter().map(|c| c.ty.code()).collect();
        rmp::encode::write_bin(&mut buf, &codes).expect("vec write");
        buf.push(0xdd); // array32, length patched by `finish`
        let count_at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        Self {
            buf,
            count_at,
            rows: 0,
        }
    }

    pub fn rows(&self) -> u32 {
        self.rows
    }

    pub fn uncompressed_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one row; `cells` are in schema column order.
    pub fn push_row(&mut self, cells: &[Cell]) {
        rmp::encode::write_array_len(&mut self.buf, cells.len() as u32).expect("vec write");
        for cell in cells {
            write_cell(&mut self.buf, cell);
        }
        self.rows += 1;
    }

    /// The compressed frame.
    pub fn finish(mut self, zstd_level: i32) -> Vec<u8> {
        self.buf[self.count_at..self.count_at + 4].copy_from_slice(&self.rows.to_be_bytes());
        with_context(
            &COMPRESSOR,
            || Compressor::new(zstd_level),
            |c| {
                c.set_compression_level(zstd_level)?;
                c.compress(&self.buf)
            },
        )
        .expect("zstd compression of memory cannot fail")
    }
}

thread_local! {
    /// Each thread keeps its zstd contexts: a new one allocates its tables (hundreds of KiB for
    /// a compressor) and the kernel maps them in page by page, for every frame.
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's context in `slot`, made by `new` on first use.
fn with_context<C: 'static, R>(
    slot: &'static std::thread::LocalKey<RefCell<Option<C>>>,
    new: impl FnOnce() -> std::io::Result<C>,
    f: impl FnOnce(&mut C) -> std::io::Result<R>,
) -> std::io::Result<R> {
    slot.with(|cell| {
        let mut cell = cell.borrow_mut();
        let context = match &mut *cell {
            Some(c) => c,
            None => cell.insert(new()?),
        };
        f(context)
    })
}

/// Decompresses a frame into a buffer of the size its zstd header declares (ingest's frames
/// declare it) rather than of `max_bytes`; a frame that declares none gets `max_bytes` and the
/// decoder stops there.
fn decompress(compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let capacity = match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(declared)) if declared > max_bytes as u64 => {
            return Err(FrameError::TooLarge {
                declared,
                max_bytes,
            })
        }
        Ok(Some(declared)) => declared as usize,
        // No size declared, or no zstd header: the decoder tells which.
        Ok(None) | Err(_) => max_bytes,
    };
    with_context(&DECOMPRESSOR, Decompressor::new, |d| {
        d.decompress(compressed, capacity)
    })
    .map_err(FrameError::Zstd)
}

fn write_cell(buf: &mut Vec<u8>, cell: &Cell) {
    match cell {
        Cell::Null => buf.push(0xc0),
        Cell::Bool(b) => buf.push(if *b { 0xc3 } else { 0xc2 }),
        Cell::Int4(n) => {
            rmp::encode::write_sint(buf, *n as i64).expect("vec write");
        }
        Cell::Int8(n) | Cell::Time(n) => {
            rmp::encode::write_sint(buf, *n).expect("vec write");
        }
        Cell::Float8(f) => rmp::encode::write_f64(buf, *f).expect("vec write"),
        Cell::Text(s) | Cell::Json(s) => rmp::encode::write_str(buf, s).expect("vec write"),
    }
}

/// A cell read from a frame, borrowing strings from the decompressed buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CellRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

impl CellRef<'_> {
    /// The owned cell for a column of type `ty`.
    pub fn to_cell(self, ty: ColumnType) -> Result<Cell, FrameError> {
        Ok(match (self, ty) {
            (CellRef::Null, _) => Cell::Null,
            (CellRef::Bool(b), ColumnType::Bool) => Cell::Bool(b),
            (CellRef::Int(n), ColumnType::Int4) => Cell::Int4(
                i32::try_from(n).map_err(|_| FrameError::Malformed("int4 out of range"))?,
            ),
            (CellRef::Int(n), ColumnType::Int8) => Cell::Int8(n),
            (CellRef::Int(n), ColumnType::Timestamptz) => Cell::Time(n),
            (CellRef::Float(f), ColumnType::Float8) => Cell::Float8(f),
            (CellRef::Str(s), ColumnType::Text) => Cell::Text(s.to_string()),
            (CellRef::Str(s), ColumnType::Jsonb) => Cell::Json(s.to_string()),
            _ => return Err(FrameError::Malformed("cell does not match its column type")),
        })
    }
}

/// A decompressed frame: its columns and a cursor over its rows.
pub struct Frame {
    /// Decompressed MessagePack.
    data: Vec<u8>,
    /// Column names and types as the producing ingest knew them.
    pub columns: Vec<(String, ColumnType)>,
    /// Number of rows.
    pub rows: usize,
    /// Offset of the first row in `data`.
    rows_at: usize,
}

impl Frame {
    /// Decompresses and reads the header. `max_bytes` bounds the decompressed size.
    pub fn decode(compressed: &[u8], max_bytes: usize) -> Result<Self, FrameError> {
        let data = decompress(compressed, max_bytes)?;
        let mut r: &[u8] = &data;
        if take(&mut r, 1)? != [0x94] {
            return Err(FrameError::Malformed("not a 4-element array"));
        }
        let version = take(&mut r, 1)?[0];
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let ncols = read_array_len(&mut r)?;
        // Each name takes at least a byte: a lying length cannot reserve more than that.
        let mut names = Vec::with_capacity(ncols.min(r.len()));
        for _ in 0..ncols {
            match read_value(&mut r)? {
                CellRef::Str(s) => names.push(s.to_string()),
                _ => return Err(FrameError::Malformed("column name is not a string")),
            }
        }
        let codes = read_bin(&mut r)?;
        if codes.len() != ncols {
            return Err(FrameError::Malformed("type codes do not match the columns"));
        }
        let mut columns = Vec::with_capacity(names.len());
        for (name, code) in names.into_iter().zip(codes) {
            let ty =
                ColumnType::from_code(*code).ok_or(FrameError::Malformed("unknown type code"))?;
            columns.push((name, ty));
        }
        let rows = read_array_len(&mut r)?;
        let rows_at = data.len() - r.len();
        Ok(Self {
            data,
            columns,
            rows,
            rows_at,
        })
    }

    /// Iterates rows; each row yields its cells in frame column order.
    pub fn rows(&self) -> RowIter<'_> {
        RowIter {
            rest: &self.data[self.rows_at..],
            left: self.rows,
            ncols: self.columns.len(),
        }
    }

    /// Every row as owned cells (for `inspect` and dead letters; not the hot path).
    pub fn to_cells(&self) -> Result<Vec<Vec<Cell>>, FrameError> {
        // Each row takes at least a byte: a lying count cannot reserve more than that.
        let mut out = Vec::with_capacity(self.rows.min(self.data.len() - self.rows_at));
        let mut it = self.rows();
        let mut row = Vec::new();
        while it.next_row(&mut row)? {
            out.push(
                row.iter()
                    .zip(&self.columns)
                    .map(|(c, (_, ty))| c.to_cell(*ty))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok(out)
    }
}

/// Cursor over the rows of a frame.
pub struct RowIter<'a> {
    rest: &'a [u8],
    left: usize,
    ncols: usize,
}

impl<'a> RowIter<'a> {
    /// Reads the next row into `out`; false at the end.
    pub fn next_row(&mut self, out: &mut Vec<CellRef<'a>>) -> Result<bool, FrameError> {
        if self.left == 0 {
            return Ok(false);
        }
        self.left -= 1;
        out.clear();
        if read_array_len(&mut self.rest)? != self.ncols {
            return Err(FrameError::Malformed(
                "row length does not match the columns",
            ));
        }
        for _ in 0..self.ncols {
            out.push(read_value(&mut self.rest)?);
        }
        Ok(true)
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], FrameError> {
    if r.len() < n {
        return Err(FrameError::Malformed("truncated"));
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Ok(head)
}

fn be(r: &mut &[u8], n: usize) -> Result<u64, FrameError> {
    Ok(take(r, n)?
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | *b as u64))
}

fn read_array_len(r: &mut &[u8]) -> Result<usize, FrameError> {
    let m = take(r, 1)?[0];
    Ok(match m {
        0x90..=0x9f => (m & 0x0f) as usize,
        0xdc => be(r, 2)? as usize,
        0xdd => be(r, 4)? as usize,
        _ => return Err(FrameError::Malformed("expected an array")),
    })
}

fn read_bin<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], FrameError> {
    let m = take(r, 1)?[0];
    let n = match m {
        0xc4 => be(r, 1)?,
        0xc5 => be(r, 2)?,
        0xc6 => be(r, 4)?,
        _ => return Err(FrameError::Malformed("expected binary")),
    } as usize;
    take(r, n)
}

fn read_value<'a>(r: &mut &'a [u8]) -> Result<CellRef<'a>, FrameError> {
    let m = take(r, 1)?[0];
    let str_of = |r: &mut &'a [u8], n: usize| -> Result<CellRef<'a>, FrameError> {
        let bytes = take(r, n)?;
        std::str::from_utf8(bytes)
            .map(CellRef::Str)
            .map_err(|_| FrameError::Malformed("string is not UTF-8"))
    };
    Ok(match m {
        0xc0 => CellRef::Null,
        0xc2 => CellRef::Bool(false),
        0xc3 => CellRef::Bool(true),
        0x00..=0x7f => CellRef::Int(m as i64),
        0xe0..=0xff => CellRef::Int(m as i8 as i64),
        0xcc => CellRef::Int(be(r, 1)? as i64),
        0xcd => CellRef::Int(be(r, 2)? as i64),
        0xce => CellRef::Int(be(r, 4)? as i64),
        0xcf => CellRef::Int(
            i64::try_from(be(r, 8)?).map_err(|_| FrameError::Malformed("u64 out of range"))?,
        ),
        0xd0 => CellRef::Int(be(r, 1)? as u8 as i8 as i64),
        0xd1 => CellRef::Int(be(r, 2)? as u16 as i16 as i64),
        0xd2 => CellRef::Int(be(r, 4)? as u32 as i32 as i64),
        0xd3 => CellRef::Int(be(r, 8)? as i64),
        0xca => CellRef::Float(f32::from_bits(be(r, 4)? as u32) as f64),
        0xcb => CellRef::Float(f64::from_bits(be(r, 8)?)),
        0xa0..=0xbf => return str_of(r, (m & 0x1f) as usize),
        0xd9 => {
            let n = be(r, 1)? as usize;
            return str_of(r, n);
        }
        0xda => {
            let n = be(r, 2)? as usize;
            return str_of(r, n);
        }
        0xdb => {
            let n = be(r, 4)? as usize;
            return str_of(r, n);
        }
        _ => return Err(FrameError::Malformed("unexpected value type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_every_type_and_reads_as_plain_msgpack() {
        let schema = Schema::from_toml(
            "t.toml",
            r#"
table = "t"
time_column = "time"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "a"
type = "int4"
[[columns]]
name = "b"
type = "int8"
[[columns]]
name = "c"
type = "float8"
[[columns]]
name = "d"
type = "text"
[[columns]]
name = "e"
type = "bool"
[[columns]]
name = "f"
type = "jsonb"
"#,
        )
        .unwrap();
        let rows = vec![
            vec![
                Cell::Time(1_793_491_200_123_456),
                Cell::Int4(-7),
                Cell::Int8(i64::MIN),
                Cell::Float8(12.5),
                Cell::Text("héllo".repeat(100)),
                Cell::Bool(true),
                Cell::Json("{\"a\":1}".into()),
            ],
            vec![
                Cell::Time(-5),
                Cell::Null,
                Cell::Int8(300),
                Cell::Null,
                Cell::Text(String::new()),
                Cell::Bool(false),
                Cell::Null,
            ],
        ];
        let mut b = FrameBuilder::new(&schema);
        for r in &rows {
            b.push_row(r);
        }
        let bytes = b.finish(1);
        let frame = Frame::decode(&bytes, 1 << 20).unwrap();
        assert_eq!(frame.rows, 2);
        // The thread's compressor takes each frame's level.
        let build = |level| {
            let mut b = FrameBuilder::new(&schema);
            for i in 0..2000 {
                let mut row = rows[i % 2].clone();
                row[4] = Cell::Text(format!("{} {}", i * 7919 % 1000, i % 13));
                b.push_row(&row);
            }
            b.finish(level)
        };
        let (fast, dense) = (build(1), build(19));
        assert!(dense.len() < fast.len(), "{} {}", dense.len(), fast.len());
        assert_eq!(build(1), fast);
        assert_eq!(
            zstd::bulk::decompress(&dense, 1 << 20).unwrap(),
            zstd::bulk::decompress(&fast, 1 << 20).unwrap()
        );
        assert_eq!(frame.columns[3], ("c".to_string(), ColumnType::Float8));
        assert_eq!(frame.to_cells().unwrap(), rows);
        let raw = zstd::bulk::decompress(&bytes, 1 << 20).unwrap();
        let v = rmpv::decode::read_value(&mut &raw[..]).unwrap();
        assert_eq!(v[3].as_array().unwrap().len(), 2);
        assert!(Frame::decode(&bytes[..bytes.len() / 2], 1 << 20).is_err());
    }

    fn sample_frame() -> Vec<u8> {
        let schema = Schema::from_toml(
            "t.toml",
            r#"
table = "t"
time_column = "time"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "d"
type = "text"
[[columns]]
name = "f"
type = "jsonb"
[[columns]]
name = "c"
type = "float8"
"#,
        )
        .unwrap();
        let mut b = FrameBuilder::new(&schema);
        for i in 0..5 {
            b.push_row(&[
                Cell::Time(i),
                Cell::Text(format!("row {i}")),
                Cell::Json("{\"a\":[1,2]}".into()),
                Cell::Float8(i as f64 / 3.0),
            ]);
        }
        zstd::bulk::decompress(&b.finish(1), 1 << 20).unwrap()
    }

    /// Decodes and reads every row, as batch-writer and `inspect` do.
    fn decode_all(compressed: &[u8]) -> Result<usize, FrameError> {
        let frame = Frame::decode(compressed, 1 << 20)?;
        let mut it = frame.rows();
        let mut row = Vec::new();
        let mut n = 0;
        while it.next_row(&mut row)? {
            n += 1;
        }
        frame.to_cells()?;
        Ok(n)
    }

    /// Random bytes, and valid frames mutated and truncated before compression: decoding
    /// never panics, and never allocates more than the input justifies.
    #[test]
    fn decode_survives_arbitrary_frames() {
        use rand::{Rng, SeedableRng};
        let good = sample_frame();
        assert_eq!(
            decode_all(&zstd::bulk::compress(&good, 1).unwrap()).unwrap(),
            5
        );
        let mut decoded = 0;
        for seed in 0..3000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let bytes: Vec<u8> = if seed % 4 == 0 {
                (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect()
            } else {
                let mut m = good.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..m.len());
                    match rng.random_range(0..4) {
                        0 => m[at] = rng.random(),
                        1 => m.truncate(at.max(1)),
                        2 => m[at] = [0xdd, 0xdb, 0xc6, 0xcf, 0xff][rng.random_range(0..5)],
                        _ => m.insert(at, 0xff),
                    }
                }
                zstd::bulk::compress(&m, 1).unwrap()
            };
            decoded += usize::from(decode_all(&bytes).is_ok());
        }
        assert!(decoded > 0, "no mutated frame decoded");
    }

    #[test]
    fn lying_lengths_do_not_preallocate() {
        // 2^32 − 1 columns, and 2^32 − 1 rows of nothing.
        for raw in [
            &b"\x94\x01\xdd\xff\xff\xff\xff"[..],
            b"\x94\x01\x90\xc4\x00\xdd\xff\xff\xff\xff",
        ] {
            let frame = zstd::bulk::compress(raw, 1).unwrap();
            assert!(matches!(
                decode_all(&frame),
                Err(FrameError::Malformed("truncated"))
            ));
        }
    }

    #[test]
    fn a_zstd_bomb_is_bounded_by_max_bytes() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert!(matches!(
            Frame::decode(&bomb, 1 << 20),
            Err(FrameError::TooLarge {
                declared,
                max_bytes: 1048576
            }) if declared == 64 << 20
        ));
        // Without a declared size (a streaming encoder), the decoder stops at max_bytes.
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &vec![0u8; 64 << 20]).unwrap();
        let streamed = encoder.finish().unwrap();
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&streamed),
            Ok(None)
        ));
        assert!(matches!(
            Frame::decode(&streamed, 1 << 20),
            Err(FrameError::Zstd(_))
        ));
    }

    #[test]
    fn a_frame_that_declares_less_than_it_holds_is_refused_and_the_next_one_decodes() {
        let good = zstd::bulk::compress(&sample_frame(), 3).unwrap();
        // Two zstd frames back to back: the header read is the first's (a few bytes), the
        // second's content would not fit.
        let mut lying = zstd::bulk::compress(b"\x94", 1).unwrap();
        lying.extend_from_slice(&zstd::bulk::compress(&vec![7u8; 1 << 16], 1).unwrap());
        assert!(matches!(
            Frame::decode(&lying, 1 << 20),
            Err(FrameError::Zstd(_))
        ));
        // The thread's decompressor is not left in a state that spoils the next frame.
        assert_eq!(Frame::decode(&good, 1 << 20).unwrap().rows, 5);
        assert!(matches!(
            Frame::decode(b"not zstd at all", 1 << 20),
            Err(FrameError::Zstd(_))
        ));
        assert_eq!(Frame::decode(&good, 1 << 20).unwrap().rows, 5);
    }
}
