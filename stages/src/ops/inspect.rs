//! `strata inspect STREAM [--count N] [--from ID]`: entries as JSON lines
//! `{"id": …, "fields": {…}}`, oldest first, with frames decoded into rows and other binary
//! values shown safely (see [`super::render`]).
//!
//! Works for every stream strata writes: `telemetry:{T}`, `rows:{T}`, `archive:{T}`,
//! `archived:{T}` and their `:dlq` streams. Any other existing stream can be inspected too.

use crate::config::Config;
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{self, Entry, StreamId};

use super::redis_info;
use super::render::{fields_json, Ordered, Rendered};
use super::{check_id, OpsError, StreamName, STREAM_FORMS};

/// Options of `strata inspect`.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// Stream key, e.g. `rows:{metrics}`.
    pub stream: String,
    /// Entries to print at most.
    pub count: usize,
    /// First entry ID (inclusive); default the oldest.
    pub from: Option<String>,
}

/// Prints entries of a stream as JSON lines to `out`, decoding frames into rows.
///
/// A strata stream that does not exist yet prints nothing; any other missing key is an error,
/// so a typo does not look like an empty stream.
pub async fn inspect(
    config: &Config,
    schemas: &[SchemaRef],
    opts: &InspectOptions,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    if opts.count == 0 {
        return Err(OpsError::Usage("--count must be at least 1".into()));
    }
    if let Some(from) = &opts.from {
        check_id(from)?;
    }
    let mut conn = redis_info::connect(config).await?;
    let exists = redis_info::stream_exists(&mut conn, &opts.stream).await?;
    if !exists {
        return match StreamName::parse(&opts.stream) {
            Some(name) if schemas.is_empty() || schemas.iter().any(|s| s.table == name.table) => {
                Ok(())
            }
            Some(name) => Err(OpsError::UnknownStream {
                stream: opts.stream.clone(),
                reason: format!(
                    "it does not exist and no schema in {} names table `{}` (known: {})",
                    config.schemas_dir.display(),
                    name.table,
                    schemas
                        .iter()
                        .map(|s| s.table.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
            None => Err(OpsError::UnknownStream {
                stream: opts.stream.clone(),
                reason: format!("no such key; {STREAM_FORMS}"),
            }),
        };
    }
    let start = opts.from.as_deref().unwrap_or("-");
    let entries = streams::range(&mut conn, &opts.stream, start, "+", opts.count).await?;
    for entry in &entries {
        let line = serde_json::to_string(&entry_json(entry)).map_err(std::io::Error::from)?;
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// One line of `inspect`: the entry's ID first, then its fields in order.
#[derive(Debug, serde::Serialize)]
pub struct EntryJson {
    /// The stream ID.
    pub id: StreamId,
    /// The fields, rendered.
    pub fields: Ordered<Rendered>,
}

/// One entry as `{"id": …, "fields": {…}}`.
pub fn entry_json(entry: &Entry) -> EntryJson {
    EntryJson {
        id: entry.id,
        fields: fields_json(&entry.fields.to_vec()),
    }
}
