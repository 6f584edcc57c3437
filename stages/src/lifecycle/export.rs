//! One chunk → one Parquet object, streaming: binary COPY out of PostgreSQL, decoded into Arrow
//! batches and encoded to Parquet on a blocking thread, uploaded part by part. Three stages run
//! at once, joined by small bounded channels, so memory is about one row group (plus a part or
//! two in flight) whatever the chunk's size. The object becomes visible only if all three
//! succeed; otherwise the upload is aborted.

use super::archiver::ArchiverConfig;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};
use strata_pipeline::schema::Schema;
use tokio::sync::mpsc;

use super::columnar::{CopyDecoder, DecodeError};
use super::lake::{hex, Upload};

/// Footer key-value metadata every archive carries.
pub const META_TABLE: &str = "strata.table";
pub const META_CHUNK: &str = "strata.chunk";
pub const META_RANGE_START: &str = "strata.range_start";
pub const META_RANGE_END: &str = "strata.range_end";
pub const META_ROWS: &str = "strata.rows";

/// COPY pieces are gathered to this size before they cross to the encoder thread (PostgreSQL
/// sends one message per row).
const PIECE_BYTES: usize = 256 << 10;

/// Why a chunk could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("COPY out of PostgreSQL")]
    Postgres(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("encoding Parquet")]
    Parquet(#[from] ParquetError),
    #[error("uploading to the lake")]
    Store(#[source] object_store::Error),
    #[error("the Parquet encoder stopped unexpectedly: {0}")]
    Encoder(String),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Rows in the object.
    pub rows: u64,
    /// Object size.
    pub bytes: u64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: String,
}

/// Parquet settings of every archive: zstd, row groups of `row_group_rows` rows (or
/// `row_group_bytes`), page-level statistics (so chunk-level min/max too), the time column
/// delta-encoded (it is nearly sorted), `kv` in the footer.
pub fn writer_properties(
    schema: &Schema,
    config: &ArchiverConfig,
    kv: Vec<KeyValue>,
) -> Result<WriterProperties, ParquetError> {
    let time = ColumnPath::from(schema.columns[schema.time_index].name.as_str());
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(config.zstd_level)?))
        .set_max_row_group_row_count(Some(config.row_group_rows.max(1)))
        .set_max_row_group_bytes(Some(config.row_group_bytes.max(1 << 20)))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_column_dictionary_enabled(time.clone(), false)
        .set_column_encoding(time, Encoding::DELTA_BINARY_PACKED)
        .set_created_by(format!("strata {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(kv))
        .build())
}

/// Streams `copy` (a `COPY (SELECT <schema columns>) TO STDOUT (FORMAT binary)`) into `upload`
/// as Parquet. On success the object is complete; on failure it was aborted.
pub async fn export(
    copy: tokio_postgres::CopyOutStream,
    schema: &Schema,
    props: WriterProperties,
    batch_rows: usize,
    upload: Upload,
) -> Result<Exported, ExportError> {
    let decoder = CopyDecoder::new(schema, batch_rows);
    let (raw_tx, raw_rx) = mpsc::channel::<Bytes>(4);
    let (enc_tx, mut enc_rx) = mpsc::channel::<Bytes>(1);
    let encoder = tokio::task::spawn_blocking(move || encode(raw_rx, enc_tx, decoder, props));

    let read = async move {
        futures_util::pin_mut!(copy);
        let mut piece = BytesMut::with_capacity(PIECE_BYTES * 2);
        while let Some(msg) = copy.next().await {
            piece.extend_from_slice(&msg.map_err(ExportError::Postgres)?);
            if piece.len() >= PIECE_BYTES && raw_tx.send(piece.split().freeze()).await.is_err() {
                return Ok(()); // the encoder failed; its error is the one to report
            }
        }
        if !piece.is_empty() {
            let _ = raw_tx.send(piece.freeze()).await;
        }
        Ok::<(), ExportError>(())
    };
    let write = async move {
        let mut upload = upload;
        while let Some(bytes) = enc_rx.recv().await {
            if let Err(e) = upload.write(bytes).await {
                return (upload, Err(e));
            }
        }
        (upload, Ok(()))
    };
    let (read, (upload, written)) = tokio::join!(read, write);
    let encoded = match encoder.await {
        Ok(r) => r,
        Err(e) => Err(ExportError::Encoder(e.to_string())),
    };
    let result = read.and(written.map_err(ExportError::Store)).and(encoded);
    match result {
        Ok((rows, sha256)) => {
            let bytes = upload.finish().await.map_err(ExportError::Store)?;
            Ok(Exported {
                rows,
                bytes,
                sha256,
            })
        }
        Err(e) => {
            upload.abort().await;
            Err(e)
        }
    }
}

/// The encoder thread: decodes COPY pieces, encodes Parquet, hashes and hands over the encoded
/// bytes. Returns the row count and the object's SHA-256.
fn encode(
    mut rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Bytes>,
    mut decoder: CopyDecoder,
    props: WriterProperties,
) -> Result<(u64, String), ExportError> {
    let schema = decoder.schema();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema, Some(props))?;
    let mut hasher = Sha256::new();
    let mut hand_over = |writer: &mut ArrowWriter<Vec<u8>>| -> Result<(), ExportError> {
        if writer.inner().is_empty() {
            return Ok(());
        }
        let buf = Bytes::from(std::mem::take(writer.inner_mut()));
        hasher.update(&buf);
        tx.blocking_send(buf)
            .map_err(|_| ExportError::Encoder("the upload stopped".into()))
    };
    while let Some(piece) = rx.blocking_recv() {
        decoder.push::<ExportError>(&piece, &mut |batch| {
            writer.write(&batch)?;
            hand_over(&mut writer)
        })?;
    }
    drop(rx);
    let rows = decoder.rows();
    if let Some(batch) = decoder.finish()? {
        writer.write(&batch)?;
    }
    writer.append_key_value_metadata(KeyValue::new(META_ROWS.to_string(), rows.to_string()));
    writer.finish()?;
    hand_over(&mut writer)?;
    Ok((rows, hex(&hasher.finalize())))
}

/// The footer metadata of an archive of `chunk` (strata.rows is added at the end).
pub fn footer(table: &str, chunk: &str, range_start: &str, range_end: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new(META_TABLE.to_string(), table.to_string()),
        KeyValue::new(META_CHUNK.to_string(), chunk.to_string()),
        KeyValue::new(META_RANGE_START.to_string(), range_start.to_string()),
        KeyValue::new(META_RANGE_END.to_string(), range_end.to_string()),
    ]
}
