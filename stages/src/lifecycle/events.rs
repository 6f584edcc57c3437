//! The two messages of the lifecycle, as stream entry fields (values as text, like every strata
//! stream): an [`ArchivalEvent`] per chunk on `archive:{T}` and an [`ArchivalConfirmation`] per
//! archive on `archived:{T}`. Field names follow the seeds' ArchivalEvent / ArchivalConfirmation;
//! `chunk_id` (the row of `strata.chunks`) and `attempt` are strata's own additions.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use strata_pipeline::streams::{Entry, Fields};

/// Formats µs since the Unix epoch as RFC 3339 UTC with microseconds.
pub fn rfc3339_us(us: i64) -> String {
    Utc.timestamp_micros(us)
        .single()
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| us.to_string())
}

/// Which field of a lifecycle stream entry is wrong, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}`: not valid UTF-8")]
    NotUtf8 {
        field: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("field `{field}`: not an RFC 3339 time: {value:?}")]
    NotTime {
        field: &'static str,
        value: String,
        #[source]
        source: chrono::ParseError,
    },
    #[error("field `{field}`: not an integer: {value:?}")]
    NotInteger {
        field: &'static str,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("field `{field}`: unknown status {value:?}")]
    UnknownStatus { field: &'static str, value: String },
}

impl FieldError {
    /// The field it is about.
    pub fn field(&self) -> &'static str {
        match self {
            FieldError::Missing(field)
            | FieldError::NotUtf8 { field, .. }
            | FieldError::NotTime { field, .. }
            | FieldError::NotInteger { field, .. }
            | FieldError::UnknownStatus { field, .. } => field,
        }
    }
}

fn parse_time(entry: &Entry, field: &'static str) -> Result<i64, FieldError> {
    let text = text(entry, field)?;
    DateTime::parse_from_rfc3339(text)
        .map(|d| d.timestamp_micros())
        .map_err(|source| FieldError::NotTime {
            field,
            value: text.to_string(),
            source,
        })
}

fn text<'a>(entry: &'a Entry, field: &'static str) -> Result<&'a str, FieldError> {
    let raw = entry.field(field).ok_or(FieldError::Missing(field))?;
    std::str::from_utf8(raw).map_err(|source| FieldError::NotUtf8 { field, source })
}

fn number<T>(entry: &Entry, field: &'static str) -> Result<T, FieldError>
where
    T: std::str::FromStr<Err = std::num::ParseIntError>,
{
    let t = text(entry, field)?;
    t.parse().map_err(|source| FieldError::NotInteger {
        field,
        value: t.to_string(),
        source,
    })
}

fn push(fields: &mut Fields, name: &str, value: impl Into<String>) {
    fields.push((name.to_string(), value.into().into_bytes()));
}

/// "Archive this chunk": one per chunk, from chunk-watcher (or from the confirmer, to archive a
/// chunk again after its archive failed verification) to the archiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivalEvent {
    /// Identifies this request; the chunk's row holds the current one, so a superseded event
    /// (its chunk re-archived meanwhile) is recognised and ignored.
    pub event_id: String,
    /// The row of `strata.chunks` describing the chunk.
    pub chunk_id: i64,
    /// The table the chunk belongs to.
    pub table: String,
    /// The chunk: a native partition's name or a TimescaleDB chunk's `schema.name`.
    pub chunk: String,
    /// Start of the chunk's time range (µs since the Unix epoch, inclusive).
    pub range_start_us: i64,
    /// End of the chunk's time range (µs, exclusive).
    pub range_end_us: i64,
    /// When the chunk was first recorded as due for archiving (µs).
    pub created_at_us: i64,
    /// 1 for the first archive of the chunk, n + 1 after n failed verifications.
    pub attempt: i32,
}

impl ArchivalEvent {
    pub fn to_fields(&self) -> Fields {
        let mut f = Fields::with_capacity(8);
        push(&mut f, "event_id", self.event_id.clone());
        push(&mut f, "table", self.table.clone());
        push(&mut f, "chunk", self.chunk.clone());
        push(&mut f, "range_start", rfc3339_us(self.range_start_us));
        push(&mut f, "range_end", rfc3339_us(self.range_end_us));
        push(&mut f, "created_at", rfc3339_us(self.created_at_us));
        push(&mut f, "chunk_id", self.chunk_id.to_string());
        push(&mut f, "attempt", self.attempt.to_string());
        f
    }

    /// Reads an entry of `archive:{T}`; `Err` says which field is wrong.
    pub fn from_entry(entry: &Entry) -> Result<Self, FieldError> {
        Ok(Self {
            event_id: text(entry, "event_id")?.to_string(),
            chunk_id: number(entry, "chunk_id")?,
            table: text(entry, "table")?.to_string(),
            chunk: text(entry, "chunk")?.to_string(),
            range_start_us: parse_time(entry, "range_start")?,
            range_end_us: parse_time(entry, "range_end")?,
            created_at_us: parse_time(entry, "created_at")?,
            attempt: number(entry, "attempt").unwrap_or(1),
        })
    }
}

/// How an archive attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchivalStatus {
    /// The object is complete in the lake; the confirmer verifies it next.
    Archived,
    /// The chunk could not be archived (the reason is in `error_message`).
    Failed,
}

impl ArchivalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchivalStatus::Archived => "archived",
            ArchivalStatus::Failed => "failed",
        }
    }
}

/// "This chunk is in the lake": from the archiver to the confirmer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivalConfirmation {
    /// The archival event this answers.
    pub event_id: String,
    /// The row of `strata.chunks` describing the chunk.
    pub chunk_id: i64,
    /// The table the chunk belongs to (for people reading the stream).
    pub table: String,
    /// The chunk (for people reading the stream).
    pub chunk: String,
    /// Archived or failed.
    pub status: ArchivalStatus,
    /// When the object was complete (µs).
    pub completed_at_us: i64,
    /// URL of the object (`file://`, `s3://`, `az://`, `gs://`).
    pub lakehouse_path: String,
    /// Rows in the object.
    pub rows: i64,
    /// Size of the object in bytes.
    pub bytes: i64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: String,
    /// Why the archive failed; empty when it did not.
    pub error_message: String,
}

impl ArchivalConfirmation {
    pub fn to_fields(&self) -> Fields {
        let mut f = Fields::with_capacity(11);
        push(&mut f, "event_id", self.event_id.clone());
        push(&mut f, "status", self.status.as_str());
        push(&mut f, "completed_at", rfc3339_us(self.completed_at_us));
        push(&mut f, "lakehouse_path", self.lakehouse_path.clone());
        push(&mut f, "rows", self.rows.to_string());
        push(&mut f, "bytes", self.bytes.to_string());
        push(&mut f, "sha256", self.sha256.clone());
        push(&mut f, "error_message", self.error_message.clone());
        push(&mut f, "chunk_id", self.chunk_id.to_string());
        push(&mut f, "table", self.table.clone());
        push(&mut f, "chunk", self.chunk.clone());
        f
    }

    /// Reads an entry of `archived:{T}`; `Err` says which field is wrong.
    pub fn from_entry(entry: &Entry) -> Result<Self, FieldError> {
        let status = match text(entry, "status")? {
            "archived" => ArchivalStatus::Archived,
            "failed" => ArchivalStatus::Failed,
            other => {
                return Err(FieldError::UnknownStatus {
                    field: "status",
                    value: other.to_string(),
                })
            }
        };
        Ok(Self {
            event_id: text(entry, "event_id")?.to_string(),
            chunk_id: number(entry, "chunk_id")?,
            table: text(entry, "table").unwrap_or_default().to_string(),
            chunk: text(entry, "chunk").unwrap_or_default().to_string(),
            status,
            completed_at_us: parse_time(entry, "completed_at")?,
            lakehouse_path: text(entry, "lakehouse_path")
                .unwrap_or_default()
                .to_string(),
            rows: number(entry, "rows").unwrap_or(0),
            bytes: number(entry, "bytes").unwrap_or(0),
            sha256: text(entry, "sha256").unwrap_or_default().to_string(),
            error_message: text(entry, "error_message").unwrap_or_default().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: Fields) -> Entry {
        Entry::new("1-0", fields)
    }

    #[test]
    fn events_round_trip_through_fields() {
        let e = ArchivalEvent {
            event_id: "e1".into(),
            chunk_id: 7,
            table: "metrics".into(),
            chunk: "metrics_p20261101_000000".into(),
            range_start_us: 1_793_491_200_000_000,
            range_end_us: 1_793_494_800_000_000,
            created_at_us: 1_793_500_000_123_456,
            attempt: 2,
        };
        let fields = e.to_fields();
        assert_eq!(
            String::from_utf8_lossy(&fields[3].1),
            "2026-11-01T00:00:00.000000Z"
        );
        assert_eq!(ArchivalEvent::from_entry(&entry(fields)).unwrap(), e);
        let c = ArchivalConfirmation {
            event_id: "e1".into(),
            chunk_id: 7,
            table: "metrics".into(),
            chunk: "c".into(),
            status: ArchivalStatus::Archived,
            completed_at_us: 1_793_500_000_000_000,
            lakehouse_path: "file:///lake/x.parquet".into(),
            rows: 10,
            bytes: 2000,
            sha256: "ab".into(),
            error_message: String::new(),
        };
        assert_eq!(
            ArchivalConfirmation::from_entry(&entry(c.to_fields())).unwrap(),
            c
        );
        let err = ArchivalEvent::from_entry(&entry(vec![("event_id".into(), b"x".to_vec())]))
            .unwrap_err();
        assert_eq!(err.to_string(), "missing field `chunk_id`");
        assert_eq!(err, FieldError::Missing("chunk_id"));
        let mut bad = e.to_fields();
        bad[6].1 = b"seven".to_vec();
        let err = ArchivalEvent::from_entry(&entry(bad)).unwrap_err();
        assert_eq!(err.field(), "chunk_id");
        assert_eq!(
            err.to_string(),
            "field `chunk_id`: not an integer: \"seven\""
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the parse error is kept"
        );
    }
}
