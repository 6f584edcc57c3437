//! The ingest stage: validates producer events against the table schema and forwards the valid
//! rows of a batch as one frame to `rows:{T}`; each invalid entry is dead-lettered on its own.
//!
//! # Layout
//! - [`STAGE`]: its registry entry (`telemetry:{T}` → `rows:{T}` as group `ingest`) and
//!   [`IngestConfig`], its `[ingest]` section.
//! - [`Ingest`]: the [`Stage`]; [`InvalidEvent`]: why an event is refused.
//! - the validation of events, fields and MessagePack payloads.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use strata_pipeline::config::BatchLimits;
use strata_pipeline::frame::{FrameBuilder, FIRST_MS_FIELD, FRAME_FIELD, ROWS_FIELD};
use strata_pipeline::pg_limits::{self, BTREE_MAX_INDEX_ROW, MSGPACK_MAX_DEPTH};
use strata_pipeline::runner::{run_loop, Batch, DeadLetter, Outcome, Stage};
use strata_pipeline::schema::{
    Cell, SchemaRef, UnknownFields, ValueError, MSGPACK_FIELD, TRACEPARENT_FIELD,
};
use strata_pipeline::streams::{Entry, StreamKind};
use strata_pipeline::trace::{self, TRACEPARENTS_FIELD};
use strata_pipeline::StageError;

use crate::config::Config;
use crate::registry::{StageSpec, StartContext, Tasks};

strata_pipeline::batched_section! {
    /// `[ingest]`. Its batch keys bound the entries validated into one frame: flush at
    /// `max_batch_rows` rows, or `max_batch_bytes` bytes of entry fields, or `linger_ms` after
    /// the first entry arrived.
    pub struct IngestConfig {
        /// An entry whose fields and values add up to more bytes than this is dead-lettered.
        pub max_event_bytes: usize,
        /// Batches validated at once per consumer.
        pub workers: usize,
        /// Consumers per table in each ingest process, each reading on its own connection.
        pub consumers: usize,
        /// zstd level of frames (1 is fast and already compact).
        pub zstd_level: i32,
        /// Back-pressure: while `rows:{T}` holds more entries (frames) than this, ingest stops
        /// reading.
        pub max_rows_backlog: u64,
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch: BatchLimits {
                max_batch_rows: 2000,
                max_batch_bytes: 4 << 20,
                linger_ms: 20,
            },
            max_event_bytes: 64 << 10,
            workers: 2,
            consumers: 1,
            zstd_level: 1,
            max_rows_backlog: 1_000,
        }
    }
}

/// The ingest stage's registry entry.
pub const STAGE: StageSpec = StageSpec {
    name: "ingest",
    about: "Run the ingest stage: telemetry:{T} → validated frames on rows:{T}",
    input: Some(StreamKind::Telemetry),
    output: Some(StreamKind::Rows),
    section: "ingest",
    validate: validate_config,
    needs_postgres: false,
    effects_outside_redis: false,
    // Per partition, each consumer holds its read connection and one per worker.
    redis_connections: |c, partitions| {
        partitions as usize * c.ingest.consumers * (1 + c.ingest.workers)
    },
    postgres_connections: |_, _| 0,
    start,
};

fn validate_config(config: &Config) -> Result<(), String> {
    let c = &config.ingest;
    c.batch.validate(STAGE.section)?;
    if c.workers == 0 || c.consumers == 0 {
        return Err("[ingest] workers and [ingest] consumers must be > 0".into());
    }
    Ok(())
}

/// Starts `consumers` loops of ingest on each of `partitions` of `schema`'s table; several
/// consumers per process read (and parse) in parallel. One loop per partition: each batch
/// becomes one frame on its own partition's `rows`, in its order.
fn start<'a>(
    ctx: &'a StartContext<'a>,
    schema: &'a SchemaRef,
    partitions: std::ops::Range<u32>,
    tasks: &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>> {
    Box::pin(async move {
        let config = &ctx.config.ingest;
        let stage = Arc::new(Ingest {
            schema: schema.clone(),
            max_event_bytes: config.max_event_bytes,
            zstd_level: config.zstd_level,
            max_event_spans: ctx.config.tracing.max_event_spans_per_batch,
        });
        for partition in partitions.flat_map(|p| std::iter::repeat_n(p, config.consumers)) {
            let mut spec = STAGE.loop_spec(
                &schema.table,
                partition,
                config.batch,
                config.workers,
                ctx.config,
            );
            spec.output_high_watermark = Some(config.max_rows_backlog);
            spec.read_from = Some(ctx.redis_read.clone());
            tasks.spawn(run_loop(
                stage.clone(),
                spec,
                ctx.redis.clone(),
                ctx.shutdown.clone(),
                ctx.stats.ingest.clone(),
            ));
        }
        Ok(())
    })
}

/// Validates `telemetry:{T}` entries into frames.
pub struct Ingest {
    /// The table's schema: what every entry is checked against.
    pub schema: SchemaRef,
    /// Larger entries are dead-lettered unread.
    pub max_event_bytes: usize,
    /// zstd level of the frames.
    pub zstd_level: i32,
    /// Per batch, at most this many traced events get spans.
    pub max_event_spans: usize,
}

/// Why ingest refused an event, and where: which field, which element of a MessagePack array.
/// Its text is the dead letter's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The entry is larger than `max_event_bytes`; it is not read.
    #[error("entry is {size} bytes, more than max_event_bytes = {max}")]
    TooLarge { size: usize, max: usize },
    /// A `msgpack` entry also carries a column field.
    #[error("field `{field}`: an entry with a `{MSGPACK_FIELD}` field carries no other columns")]
    BesideMsgpack { field: String },
    /// A field naming no column, under `unknown_fields = "reject"`.
    #[error("field `{field}`: no such column in table `{table}` (set unknown_fields = \"ignore\" in its schema to drop such fields)")]
    UnknownField { field: String, table: String },
    /// A column given twice.
    #[error("field `{field}` appears twice")]
    Duplicate { field: String },
    /// A required column absent or empty.
    #[error("missing required field `{field}`")]
    Missing { field: String },
    /// A value its column cannot hold.
    #[error("field `{field}`: {problem}")]
    Value { field: String, problem: ValueError },
    /// A MessagePack map key that is not a string.
    #[error("map key {key} is not a string")]
    KeyNotString { key: String },
    /// The `msgpack` payload itself is unusable.
    #[error("field `{MSGPACK_FIELD}`: {problem}")]
    Msgpack { problem: String },
    /// In the one map of a `msgpack` payload.
    #[error("{MSGPACK_FIELD}: {0}")]
    InMap(Box<InvalidEvent>),
    /// In element `index` of a `msgpack` array (the whole entry is refused).
    #[error("{MSGPACK_FIELD}[{index}]: {inner}")]
    InElement {
        index: usize,
        inner: Box<InvalidEvent>,
    },
    /// Element `index` of a `msgpack` array is not a map.
    #[error("{MSGPACK_FIELD}[{index}]: expected a map")]
    NotAMap { index: usize },
    /// No time field, and the entry ID's time is outside the accepted range.
    #[error("no field `{field}`, and {problem}")]
    IdTimeOutOfRange { field: String, problem: String },
    /// The row's entry in an index would exceed PostgreSQL's B-tree maximum.
    #[error(
        "field `{field}`: too large for index ({index}): its entry would take about {size} bytes, \
         more than PostgreSQL's B-tree maximum of {max} (text counts its length, jsonb {factor}× \
         its length)",
        max = BTREE_MAX_INDEX_ROW,
        factor = pg_limits::JSONB_INDEX_FACTOR
    )]
    IndexEntryTooLarge {
        field: String,
        index: String,
        size: usize,
    },
}

impl Stage for Ingest {
    async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
        let mut frame = FrameBuilder::new(&self.schema);
        let mut outcome = Outcome::default();
        let mut first_ms = u64::MAX;
        let mut rows = Vec::new();
        let mut traced = Vec::new();
        for (i, entry) in batch.entries.iter().enumerate() {
            rows.clear();
            match self.validate(entry, &mut rows) {
                Ok(()) => {
                    for row in &rows {
                        frame.push_row(row);
                    }
                    first_ms = first_ms.min(entry.id.ms);
                    if let Some(tp) = self.event_span(entry, traced.len()) {
                        traced.push(tp);
                    }
                }
                Err(error) => outcome.dead_letters.push(DeadLetter {
                    entry: i,
                    fields: None,
                    error: error.to_string(),
                    sqlstate: None,
                }),
            }
        }
        if frame.rows() > 0 {
            let n = frame.rows();
            outcome.forward.push(vec![
                (ROWS_FIELD.to_string(), n.to_string().into_bytes()),
                (
                    FIRST_MS_FIELD.to_string(),
                    first_ms.to_string().into_bytes(),
                ),
                (FRAME_FIELD.to_string(), frame.finish(self.zstd_level)),
            ]);
            if !traced.is_empty() {
                let fields = &mut outcome.forward[0];
                fields.push((
                    TRACEPARENTS_FIELD.to_string(),
                    traced.join(" ").into_bytes(),
                ));
            }
        }
        Ok(outcome)
    }
}

impl Ingest {
    /// For an entry carrying a `traceparent`, records an `ingest.event` span under it and
    /// returns that span's traceparent, for the writer to continue the trace.
    fn event_span(&self, entry: &Entry, traced_so_far: usize) -> Option<String> {
        if !trace::enabled() || traced_so_far >= self.max_event_spans {
            return None;
        }
        let parent = std::str::from_utf8(entry.field(TRACEPARENT_FIELD)?).ok()?;
        let span =
            tracing::info_span!("ingest.event", table = %self.schema.table, entry_id = %entry.id);
        trace::set_remote_parent(&span, parent);
        trace::traceparent(&span)
    }

    /// Turns one entry into rows (one, or one per map of a MessagePack array), or says which
    /// field (of which array element) is wrong and why.
    pub fn validate(&self, entry: &Entry, rows: &mut Vec<Vec<Cell>>) -> Result<(), InvalidEvent> {
        let size = entry.size();
        if size > self.max_event_bytes {
            return Err(InvalidEvent::TooLarge {
                size,
                max: self.max_event_bytes,
            });
        }
        let mut cells = vec![None; self.schema.columns.len()];
        // Names are compared as bytes; they become text only for an error message.
        let text = |name: &[u8]| String::from_utf8_lossy(name).into_owned();
        for (name, value) in entry.fields.iter_bytes() {
            if name == TRACEPARENT_FIELD.as_bytes() {
                continue;
            }
            if name == MSGPACK_FIELD.as_bytes() {
                if let Some((k, _)) = entry
                    .fields
                    .iter()
                    .find(|(k, _)| k != MSGPACK_FIELD && k != TRACEPARENT_FIELD)
                {
                    return Err(InvalidEvent::BesideMsgpack {
                        field: k.into_owned(),
                    });
                }
                return self.validate_msgpack(entry, value, rows);
            }
            let Some(col) = self.schema.column_index(name) else {
                match self.schema.unknown_fields {
                    UnknownFields::Ignore => continue,
                    UnknownFields::Reject => return Err(self.unknown(&text(name))),
                }
            };
            if cells[col].is_some() {
                return Err(InvalidEvent::Duplicate { field: text(name) });
            }
            let cell =
                self.schema
                    .parse_text(col, value)
                    .map_err(|problem| InvalidEvent::Value {
                        field: text(name),
                        problem,
                    })?;
            cells[col] = Some(cell);
        }
        rows.push(self.complete(entry, cells)?);
        Ok(())
    }

    fn validate_msgpack(
        &self,
        entry: &Entry,
        packed: &[u8],
        rows: &mut Vec<Vec<Cell>>,
    ) -> Result<(), InvalidEvent> {
        let msgpack = |problem: String| InvalidEvent::Msgpack { problem };
        let mut rd = packed;
        let value = rmpv::decode::read_value_with_max_depth(&mut rd, MSGPACK_MAX_DEPTH)
            .map_err(|e| msgpack(format!("not valid MessagePack ({e})")))?;
        if !rd.is_empty() {
            return Err(msgpack(format!(
                "{} bytes after the MessagePack value",
                rd.len()
            )));
        }
        match value {
            rmpv::Value::Map(pairs) => rows.push(
                self.msgpack_row(entry, &pairs)
                    .map_err(|e| InvalidEvent::InMap(Box::new(e)))?,
            ),
            rmpv::Value::Array(items) => {
                if items.is_empty() {
                    return Err(msgpack("the array holds no maps".into()));
                }
                for (i, item) in items.iter().enumerate() {
                    let rmpv::Value::Map(pairs) = item else {
                        return Err(InvalidEvent::NotAMap { index: i });
                    };
                    rows.push(self.msgpack_row(entry, pairs).map_err(|e| {
                        InvalidEvent::InElement {
                            index: i,
                            inner: Box::new(e),
                        }
                    })?);
                }
            }
            _ => return Err(msgpack("expected a map or an array of maps".into())),
        }
        Ok(())
    }

    fn msgpack_row(
        &self,
        entry: &Entry,
        pairs: &[(rmpv::Value, rmpv::Value)],
    ) -> Result<Vec<Cell>, InvalidEvent> {
        let mut cells = vec![None; self.schema.columns.len()];
        for (k, v) in pairs {
            let name = k
                .as_str()
                .ok_or_else(|| InvalidEvent::KeyNotString { key: k.to_string() })?;
            let Some(col) = self.schema.column_index(name) else {
                match self.schema.unknown_fields {
                    UnknownFields::Ignore => continue,
                    UnknownFields::Reject => return Err(self.unknown(name)),
                }
            };
            if cells[col].is_some() {
                return Err(InvalidEvent::Duplicate { field: name.into() });
            }
            cells[col] =
                Some(
                    self.schema
                        .parse_msgpack(col, v)
                        .map_err(|problem| InvalidEvent::Value {
                            field: name.into(),
                            problem,
                        })?,
                );
        }
        self.complete(entry, cells)
    }

    fn unknown(&self, name: &str) -> InvalidEvent {
        InvalidEvent::UnknownField {
            field: name.into(),
            table: self.schema.table.clone(),
        }
    }

    /// Fills absent columns: the time from the entry ID, NULL for nullable ones; a missing or
    /// empty required field is an error. Then checks the row's index entries.
    fn complete(&self, entry: &Entry, cells: Vec<Option<Cell>>) -> Result<Vec<Cell>, InvalidEvent> {
        let row = cells
            .into_iter()
            .enumerate()
            .map(|(i, cell)| {
                let column = &self.schema.columns[i];
                match cell {
                    None if i == self.schema.time_index => self.entry_time(entry),
                    None | Some(Cell::Null) if column.required => Err(InvalidEvent::Missing {
                        field: column.name.clone(),
                    }),
                    None => Ok(Cell::Null),
                    Some(c) => Ok(c),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_index_entries(&row)?;
        Ok(row)
    }

    /// The time of an event without a time field: its entry ID's milliseconds, which a
    /// producer choosing the ID (`XADD … 18446744073709551615-0 …`) can put out of range.
    fn entry_time(&self, entry: &Entry) -> Result<Cell, InvalidEvent> {
        let ms = entry.id.ms;
        i64::try_from(ms)
            .ok()
            .and_then(|ms| ms.checked_mul(1_000))
            .filter(|us| pg_limits::time_in_range(*us))
            .map(Cell::Time)
            .ok_or_else(|| InvalidEvent::IdTimeOutOfRange {
                field: self.schema.columns[self.schema.time_index].name.clone(),
                problem: pg_limits::time_out_of_range(format_args!("the entry ID's time {ms} ms")),
            })
    }

    /// Refuses a row whose values would make a B-tree entry larger than PostgreSQL allows
    /// (SQLSTATE 54000), by [`strata_pipeline::schema::index_entry_estimate`]; the message names the largest
    /// variable-length field of the index.
    fn check_index_entries(&self, row: &[Cell]) -> Result<(), InvalidEvent> {
        for (index, positions) in self.schema.indexes.iter().zip(&self.schema.index_columns) {
            let size =
                strata_pipeline::schema::index_entry_estimate(positions.iter().map(|&p| &row[p]));
            if size <= BTREE_MAX_INDEX_ROW {
                continue;
            }
            let largest = positions
                .iter()
                .copied()
                .max_by_key(|&p| strata_pipeline::schema::index_cell_estimate(&row[p]))
                .unwrap_or(self.schema.time_index);
            return Err(InvalidEvent::IndexEntryTooLarge {
                field: self.schema.columns[largest].name.clone(),
                index: index.columns.join(", "),
                size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use strata_pipeline::schema::Schema;

    fn ingest(unknown: &str) -> Ingest {
        let schema = Schema::from_toml(
            "m.toml",
            &format!(
                r#"
table = "m"
time_column = "time"
unknown_fields = "{unknown}"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "source"
type = "text"
required = true
[[columns]]
name = "value"
type = "float8"
"#
            ),
        )
        .unwrap();
        Ingest {
            schema: Arc::new(schema),
            max_event_bytes: 200,
            zstd_level: 1,
            max_event_spans: 0,
        }
    }

    #[test]
    fn deep_messagepack_is_refused_without_exhausting_a_worker_stack() {
        // A tokio worker's stack (2 MiB), in a debug build: the deepest nesting that fits in
        // max_event_bytes must be refused, not overflow it.
        let mut ing = ingest("reject");
        ing.max_event_bytes = 65_536;
        let mut payload = vec![0x81, 0xa3, b'v', b'a', b'l'];
        payload.extend(std::iter::repeat_n(0x91, 60_000));
        payload.push(0x01);
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut rows = Vec::new();
                ing.validate(&entry(&[("msgpack", &payload)]), &mut rows)
                    .unwrap_err()
                    .to_string()
            })
            .unwrap();
        let err = handle.join().expect("no stack overflow");
        assert!(err.contains("depth"), "{err}");
    }

    fn entry(fields: &[(&str, &[u8])]) -> Entry {
        Entry::new("1793491200000-3", fields.iter().copied())
    }

    #[test]
    fn text_fields_missing_time_and_errors() {
        let ing = ingest("reject");
        let mut rows = Vec::new();
        ing.validate(&entry(&[("source", b"h1"), ("value", b"1.5")]), &mut rows)
            .unwrap();
        assert_eq!(
            rows[0],
            vec![
                Cell::Time(1_793_491_200_000_000),
                Cell::Text("h1".into()),
                Cell::Float8(1.5)
            ]
        );
        let err = ing
            .validate(&entry(&[("value", b"1")]), &mut rows)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "missing required field `source`");
        let err = ing
            .validate(&entry(&[("source", b"h"), ("colour", b"red")]), &mut rows)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("field `colour`: no such column"), "{err}");
        ingest("ignore")
            .validate(&entry(&[("source", b"h"), ("colour", b"red")]), &mut rows)
            .unwrap();
        let big = vec![b'x'; 300];
        let err = ing
            .validate(&entry(&[("source", &big)]), &mut rows)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_event_bytes = 200"), "{err}");
    }

    #[test]
    fn msgpack_arrays_are_all_or_nothing() {
        let ing = ingest("reject");
        let good = rmpv::Value::Map(vec![
            ("source".into(), "a".into()),
            ("value".into(), 2.into()),
        ]);
        let bad = rmpv::Value::Map(vec![
            ("source".into(), "b".into()),
            ("value".into(), "x".into()),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &rmpv::Value::Array(vec![good.clone(), bad])).unwrap();
        let mut rows = Vec::new();
        let err = ing
            .validate(&entry(&[("msgpack", &buf)]), &mut rows)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "msgpack[1]: field `value`: not a number: \"x\"");
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &rmpv::Value::Array(vec![good.clone(), good])).unwrap();
        let mut rows = Vec::new();
        ing.validate(&entry(&[("msgpack", &buf)]), &mut rows)
            .unwrap();
        assert_eq!(rows.len(), 2);
        let err = ing
            .validate(&entry(&[("msgpack", b"\xdc\x00\x20ab")]), &mut rows)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("field `msgpack`: not valid MessagePack"),
            "{err}"
        );
    }

    /// source text + time indexed together, tags jsonb indexed alone.
    fn indexed() -> Ingest {
        let schema = Schema::from_toml(
            "i.toml",
            r#"
table = "i"
time_column = "time"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "source"
type = "text"
[[columns]]
name = "tags"
type = "jsonb"
[[columns]]
name = "n"
type = "int4"
[[indexes]]
columns = ["source", "time"]
[[indexes]]
columns = ["tags"]
"#,
        )
        .unwrap();
        Ingest {
            schema: Arc::new(schema),
            max_event_bytes: 65536,
            zstd_level: 1,
            max_event_spans: 0,
        }
    }

    #[test]
    fn the_entry_id_time_must_be_in_range() {
        let ing = ingest("reject");
        let mut rows = Vec::new();
        for id in [
            "18446744073709551615-0",
            "9223372036854775807-0",
            "253402300800000-0",
        ] {
            let e = Entry::new(id, [("source", "h")]);
            let ms = e.id.ms;
            assert_eq!(
                ing.validate(&e, &mut rows).unwrap_err().to_string(),
                format!(
                    "no field `time`, and the entry ID's time {ms} ms is outside the accepted \
                     range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
                )
            );
        }
        let e = Entry::new("253402300799999-0", [("source", "h")]);
        ing.validate(&e, &mut rows).unwrap();
        assert_eq!(rows[0][0], Cell::Time(253_402_300_799_999_000));
        // With a time field, the ID does not matter.
        let e = Entry::new("18446744073709551615-0", [("source", "h"), ("time", "1")]);
        ing.validate(&e, &mut rows).unwrap();
    }

    #[test]
    fn index_entries_stay_under_the_btree_maximum() {
        let ing = indexed();
        let mut rows = Vec::new();
        // source + time: 16 + (8 + len) + 8 ≤ 2704.
        let ok = "x".repeat(2672);
        ing.validate(&entry(&[("source", ok.as_bytes())]), &mut rows)
            .unwrap();
        let big = "x".repeat(2673);
        assert_eq!(
            ing.validate(&entry(&[("source", big.as_bytes())]), &mut rows)
                .unwrap_err()
                .to_string(),
            "field `source`: too large for index (source, time): its entry would take about 2705 \
             bytes, more than PostgreSQL's B-tree maximum of 2704 (text counts its length, jsonb \
             8× its length)"
        );
        // tags alone: 16 + 8 + 16 + 8 × len ≤ 2704, so 333 bytes of JSON.
        let json = |len: usize| format!("\"{}\"", "y".repeat(len - 2));
        ing.validate(&entry(&[("tags", json(333).as_bytes())]), &mut rows)
            .unwrap();
        let err = ing
            .validate(&entry(&[("tags", json(334).as_bytes())]), &mut rows)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("field `tags`: too large for index (tags)"),
            "{err}"
        );
        // The same through MessagePack, naming the element.
        let row = |source: &str| {
            rmpv::Value::Map(vec![
                ("source".into(), source.into()),
                ("n".into(), 1.into()),
            ])
        };
        let mut buf = Vec::new();
        let items = vec![row("a"), row("b"), row("c"), row(&big)];
        rmpv::encode::write_value(&mut buf, &rmpv::Value::Array(items)).unwrap();
        let err = ing
            .validate(&entry(&[("msgpack", &buf)]), &mut rows)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("msgpack[3]: field `source`: too large for index (source, time)"),
            "{err}"
        );
    }

    #[test]
    fn msgpack_errors_name_the_element_and_the_limit() {
        let ing = indexed();
        let mut rows = Vec::new();
        let items = vec![
            rmpv::Value::Map(vec![("tags".into(), rmpv::Value::Array(vec![1.5.into()]))]),
            rmpv::Value::Map(vec![(
                "tags".into(),
                rmpv::Value::Array(vec![f64::NAN.into()]),
            )]),
        ];
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &rmpv::Value::Array(items)).unwrap();
        assert_eq!(
            ing.validate(&entry(&[("msgpack", &buf)]), &mut rows)
                .unwrap_err()
                .to_string(),
            "msgpack[1]: field `tags`: float NaN cannot be stored in jsonb (JSON has no NaN or \
             Infinity)"
        );
        let one = rmpv::Value::Map(vec![("source".into(), "a\0".into())]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &one).unwrap();
        assert_eq!(
            ing.validate(&entry(&[("msgpack", &buf)]), &mut rows)
                .unwrap_err()
                .to_string(),
            "msgpack: field `source`: NUL (0x00) at byte 1: PostgreSQL text cannot hold it"
        );
        assert_eq!(
            ing.validate(&entry(&[("source", b"a\0")]), &mut rows)
                .unwrap_err()
                .to_string(),
            "field `source`: NUL (0x00) at byte 1: PostgreSQL text cannot hold it"
        );
    }

    /// Checks an accepted row against what PostgreSQL refuses, independently of the parser.
    fn assert_storable(row: &[Cell]) {
        use strata_pipeline::pg_limits::{check_json, time_in_range};
        for cell in row {
            match cell {
                Cell::Text(s) => assert!(!s.contains('\0'), "{row:?}"),
                Cell::Json(s) => {
                    assert_eq!(check_json(s.as_bytes()), Ok(()), "{s}");
                    assert!(serde_json::from_str::<serde_json::Value>(s).is_ok(), "{s}");
                }
                Cell::Time(us) => assert!(time_in_range(*us), "{row:?}"),
                _ => {}
            }
        }
    }

    /// Random and mutated MessagePack payloads and random text fields: validate never panics,
    /// and every row it accepts is storable.
    #[test]
    fn validate_survives_arbitrary_input() {
        use rand::{Rng, SeedableRng};
        let ing = indexed();
        let base = rmpv::Value::Array(vec![
            rmpv::Value::Map(vec![
                (
                    "time".into(),
                    rmpv::Value::Ext(-1, vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9]),
                ),
                ("source".into(), "host-1".into()),
                (
                    "tags".into(),
                    rmpv::Value::Map(vec![
                        (
                            "a".into(),
                            rmpv::Value::Array(vec![1.into(), 2.5.into(), "x".into()]),
                        ),
                        ("b".into(), rmpv::Value::Nil),
                    ]),
                ),
                ("n".into(), 7.into()),
            ]),
            rmpv::Value::Map(vec![
                ("source".into(), "h2".into()),
                ("time".into(), 1_793_491_200_000i64.into()),
            ]),
        ]);
        let mut good = Vec::new();
        rmpv::encode::write_value(&mut good, &base).unwrap();
        const TEXTS: &[&[u8]] = &[
            b"{\"a\":[1,2,{\"b\":\"\\ud83d\\ude00\"}]}",
            b"2026-11-01T00:00:00Z",
            b"1793491200000",
            b"-1e400",
            b"[[[[[[[[]]]]]]]]",
        ];
        const NAMES: &[&str] = &["time", "source", "tags", "n", "msgpack", "other"];
        let (mut accepted, mut rows) = (0, Vec::new());
        for seed in 0..6000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let e = match seed % 3 {
                0 => {
                    let mut m = good.clone();
                    for _ in 0..rng.random_range(1..3) {
                        let at = rng.random_range(0..m.len());
                        match rng.random_range(0..3) {
                            0 => m[at] = rng.random(),
                            1 => m.truncate(at),
                            _ => m.insert(at, rng.random()),
                        }
                        if m.is_empty() {
                            break;
                        }
                    }
                    Entry::new("1793491200000-0", [("msgpack", m)])
                }
                1 => {
                    let len = rng.random_range(0..200);
                    let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    Entry::new("1793491200000-0", [("msgpack", bytes)])
                }
                _ => {
                    let fields: Vec<(&str, Vec<u8>)> = (0..rng.random_range(0..5))
                        .map(|_| {
                            let mut v = TEXTS[rng.random_range(0..TEXTS.len())].to_vec();
                            if !v.is_empty() && rng.random_bool(0.3) {
                                let at = rng.random_range(0..v.len());
                                v[at] = rng.random();
                            }
                            (NAMES[rng.random_range(0..NAMES.len())], v)
                        })
                        .collect();
                    Entry::new(format!("{}-0", rng.random::<u64>()), fields)
                }
            };
            rows.clear();
            if ing.validate(&e, &mut rows).is_ok() {
                accepted += 1;
                rows.iter().for_each(|r| assert_storable(r));
            }
        }
        assert!(
            accepted > 100,
            "the inputs are too random to test acceptance: {accepted}"
        );
    }
}
