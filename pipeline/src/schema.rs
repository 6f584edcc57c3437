//! Table schemas: one TOML file per table in `schemas/`, and the typed cells they describe.
//!
//! ```toml
//! table = "metrics"
//! time_column = "time"
//! time_unit = "ms"          # unit of integer epochs: s, ms, us, ns
//! chunk_interval = "1 day"
//! unknown_fields = "reject" # or "ignore"
//!
//! [[columns]]
//! name = "time"
//! type = "timestamptz"
//! required = true
//!
//! [[indexes]]
//! columns = ["source", "time"]
//! ```
//!
//! `partitions = N` (default 1) spreads a table's streams over N Redis Cluster slots (see
//! [`crate::streams::keys`]); `partition_key = "source"` names the column whose value
//! producers hash to pick a partition ([`crate::streams::partition::of_key`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use serde::Deserialize;

use crate::error::ConfigError;
use crate::pg_limits;

/// Field names with a meaning of their own in producer events; no column may use them.
pub const MSGPACK_FIELD: &str = "msgpack";
pub const TRACEPARENT_FIELD: &str = "traceparent";
const RESERVED_FIELDS: [&str; 2] = [MSGPACK_FIELD, TRACEPARENT_FIELD];

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Timestamptz,
    Text,
    Float8,
    Int8,
    Int4,
    Bool,
    Jsonb,
}

impl ColumnType {
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Text => "text",
            ColumnType::Float8 => "double precision",
            ColumnType::Int8 => "bigint",
            ColumnType::Int4 => "integer",
            ColumnType::Bool => "boolean",
            ColumnType::Jsonb => "jsonb",
        }
    }

    /// The name `information_schema.columns.data_type` reports for this type.
    pub fn information_schema_name(self) -> &'static str {
        match self {
            ColumnType::Timestamptz => "timestamp with time zone",
            other => other.sql(),
        }
    }

    /// A one-byte code used in frame headers.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        use ColumnType::*;
        [Timestamptz, Text, Float8, Int8, Int4, Bool, Jsonb]
            .get(code as usize)
            .copied()
    }
}

/// Unit of integer epochs in the time column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    S,
    #[default]
    Ms,
    Us,
    Ns,
}

impl TimeUnit {
    fn to_micros(self, v: i64) -> Option<i64> {
        match self {
            TimeUnit::S => v.checked_mul(1_000_000),
            TimeUnit::Ms => v.checked_mul(1_000),
            TimeUnit::Us => Some(v),
            TimeUnit::Ns => Some(v.div_euclid(1_000)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            TimeUnit::S => "s",
            TimeUnit::Ms => "ms",
            TimeUnit::Us => "us",
            TimeUnit::Ns => "ns",
        }
    }
}

/// What ingest does with an event field that names no column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    #[default]
    Reject,
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// SQL column name and event field name.
    pub name: String,
    /// SQL type, and how event text is parsed.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// A missing or empty value is an error rather than NULL.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Indexed columns in order.
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    table: String,
    time_column: String,
    #[serde(default)]
    time_unit: TimeUnit,
    #[serde(default = "default_chunk_interval")]
    chunk_interval: String,
    #[serde(default)]
    unknown_fields: UnknownFields,
    columns: Vec<Column>,
    #[serde(default)]
    indexes: Vec<Index>,
    /// Archive a chunk to the lake once its range ended this long ago (e.g. "7 days").
    #[serde(default)]
    archive_after: Option<String>,
    /// Drop a chunk once its archive is verified.
    #[serde(default)]
    drop_after_archive: bool,
    /// TimescaleDB only: compress chunks older than this.
    #[serde(default)]
    compress_after: Option<String>,
    /// Streams per table (Redis Cluster slots its traffic spreads over).
    #[serde(default = "default_partitions")]
    partitions: u32,
    /// The column whose value picks an event's partition.
    #[serde(default)]
    partition_key: Option<String>,
}

fn default_partitions() -> u32 {
    1
}

fn default_chunk_interval() -> String {
    "1 day".into()
}

/// A validated table schema.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Table name, also the `{T}` of every stream key of this table.
    pub table: String,
    /// Columns in table order (the order of COPY).
    pub columns: Vec<Column>,
    /// Index into `columns` of the time column (required timestamptz).
    pub time_index: usize,
    /// Unit of integer epochs in the time column.
    pub time_unit: TimeUnit,
    /// Width of one chunk (hypertable chunk or native partition) in microseconds.
    pub chunk_interval_us: i64,
    /// The interval as written, for messages and for TimescaleDB.
    pub chunk_interval: String,
    /// Reject or ignore event fields naming no column.
    pub unknown_fields: UnknownFields,
    /// Secondary indexes created by `migrate`.
    pub indexes: Vec<Index>,
    /// For each of `indexes`, the positions of its columns in `columns` (for the index entry
    /// size check on every row).
    pub index_columns: Vec<Vec<usize>>,
    /// What happens to chunks as they age.
    pub policy: LifecyclePolicy,
    /// How many partitions the table's producer-facing streams have (1 ..= 1024): partition
    /// `p` of `telemetry` and `rows` lives under the hash tag `{T:p}` (`{T}` for 0), so a
    /// table's traffic spreads over that many Redis Cluster slots. What a process starts with;
    /// running processes follow the count recorded in Redis
    /// ([`crate::streams::partition`]).
    pub partitions: u32,
    /// Index into `columns` of the column producers hash to pick a partition (events with the
    /// same value stay in order); None: producers spread events as they like.
    pub partition_key: Option<usize>,
}

/// A table's chunk lifecycle: archive to the lake, verify, then maybe drop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// Archive chunks whose range ended more than this many µs ago (None: never archive).
    pub archive_after_us: Option<i64>,
    /// Drop a chunk once its archive is verified.
    pub drop_after_archive: bool,
    /// TimescaleDB only: compress chunks older than this many µs.
    pub compress_after_us: Option<i64>,
}

pub type SchemaRef = Arc<Schema>;

/// Parses intervals such as `1 day`, `6 hours`, `30m`, `1h`.
pub fn parse_interval_us(text: &str) -> Option<i64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let n: i64 = t[..split].parse().ok()?;
    let unit = t[split..].trim();
    let us: i64 = match unit {
        "s" | "sec" | "second" | "seconds" => 1_000_000,
        "m" | "min" | "minute" | "minutes" => 60_000_000,
        "h" | "hour" | "hours" => 3_600_000_000,
        "d" | "day" | "days" => 86_400_000_000,
        "w" | "week" | "weeks" => 7 * 86_400_000_000,
        _ => return None,
    };
    n.checked_mul(us).filter(|v| *v > 0)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 40
}

impl Schema {
    pub fn from_toml(path: &str, text: &str) -> Result<Self, ConfigError> {
        let file: SchemaFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_string(),
            message,
        };
        if !is_identifier(&file.table) {
            return Err(invalid(format!(
                "table `{}`: use lowercase letters, digits and _ (at most 40)",
                file.table
            )));
        }
        let mut seen = HashSet::new();
        for c in &file.columns {
            if !is_identifier(&c.name) {
                return Err(invalid(format!(
                    "column `{}`: use lowercase letters, digits and _ (at most 40)",
                    c.name
                )));
            }
            if RESERVED_FIELDS.contains(&c.name.as_str()) {
                return Err(invalid(format!(
                    "column `{}`: the name is reserved for events",
                    c.name
                )));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(format!("column `{}` appears twice", c.name)));
            }
        }
        let time_index = file
            .columns
            .iter()
            .position(|c| c.name == file.time_column)
            .ok_or_else(|| {
                invalid(format!(
                    "time_column `{}` is not a column",
                    file.time_column
                ))
            })?;
        let tc = &file.columns[time_index];
        if tc.ty != ColumnType::Timestamptz {
            return Err(invalid(format!(
                "time_column `{}` must have type timestamptz",
                tc.name
            )));
        }
        for index in &file.indexes {
            if index.columns.is_empty() {
                return Err(invalid("an index needs at least one column".into()));
            }
            if let Some(missing) = index.columns.iter().find(|c| !seen.contains(c.as_str())) {
                return Err(invalid(format!("index column `{missing}` is not a column")));
            }
        }
        let chunk_interval_us = parse_interval_us(&file.chunk_interval).ok_or_else(|| {
            invalid(format!(
                "chunk_interval `{}`: expected e.g. \"1 day\", \"6 hours\", \"30m\"",
                file.chunk_interval
            ))
        })?;
        let interval = |field: &str, text: &Option<String>| -> Result<Option<i64>, ConfigError> {
            match text {
                None => Ok(None),
                Some(t) => parse_interval_us(t).map(Some).ok_or_else(|| {
                    invalid(format!(
                        "{field} `{t}`: expected e.g. \"7 days\", \"12 hours\""
                    ))
                }),
            }
        };
        let policy = LifecyclePolicy {
            archive_after_us: interval("archive_after", &file.archive_after)?,
            drop_after_archive: file.drop_after_archive,
            compress_after_us: interval("compress_after", &file.compress_after)?,
        };
        if policy.drop_after_archive && policy.archive_after_us.is_none() {
            return Err(invalid(
                "drop_after_archive = true needs archive_after".into(),
            ));
        }
        let index_columns = file
            .indexes
            .iter()
            .map(|index| {
                index
                    .columns
                    .iter()
                    .filter_map(|name| file.columns.iter().position(|c| &c.name == name))
                    .collect()
            })
            .collect();
        if file.partitions == 0 || file.partitions > crate::streams::keys::MAX_PARTITIONS {
            return Err(invalid(format!(
                "partitions = {}: expected 1 to {}",
                file.partitions,
                crate::streams::keys::MAX_PARTITIONS
            )));
        }
        let partition_key = match &file.partition_key {
            None => None,
            Some(name) => Some(
                file.columns
                    .iter()
                    .position(|c| &c.name == name)
                    .ok_or_else(|| invalid(format!("partition_key `{name}` is not a column")))?,
            ),
        };
        let mut columns = file.columns;
        // The time column is never NULL: a missing time takes the entry ID's milliseconds.
        columns[time_index].required = true;
        Ok(Schema {
            table: file.table,
            columns,
            time_index,
            time_unit: file.time_unit,
            chunk_interval_us,
            chunk_interval: file.chunk_interval,
            unknown_fields: file.unknown_fields,
            indexes: file.indexes,
            index_columns,
            policy,
            partitions: file.partitions,
            partition_key,
        })
    }

    /// The position of the column called `name` (a field name as sent, not always UTF-8).
    pub fn column_index(&self, name: impl AsRef<[u8]>) -> Option<usize> {
        let name = name.as_ref();
        self.columns.iter().position(|c| c.name.as_bytes() == name)
    }

    /// Parses one text value (as `redis-cli` sends it) for column `col`.
    /// An empty value of a non-text column is NULL.
    pub fn parse_text(&self, col: usize, raw: &[u8]) -> Result<Cell, ValueError> {
        self.parse_text_inner(col, raw).map_err(ValueError)
    }

    fn parse_text_inner(&self, col: usize, raw: &[u8]) -> Result<Cell, String> {
        let column = &self.columns[col];
        let text = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
        if text.is_empty() && column.ty != ColumnType::Text {
            return Ok(Cell::Null);
        }
        let t = text.trim();
        Ok(match column.ty {
            ColumnType::Text => {
                pg_limits::check_text(raw)?;
                Cell::Text(text.to_string())
            }
            ColumnType::Float8 => Cell::Float8(parse_float8(t)?),
            ColumnType::Int8 => Cell::Int8(
                t.parse::<i64>()
                    .map_err(|_| format!("not a 64-bit integer: {}", quote(text)))?,
            ),
            ColumnType::Int4 => Cell::Int4(
                t.parse::<i32>()
                    .map_err(|_| format!("not a 32-bit integer: {}", quote(text)))?,
            ),
            ColumnType::Bool => Cell::Bool(match t.to_ascii_lowercase().as_str() {
                "true" | "t" | "1" | "yes" | "on" => true,
                "false" | "f" | "0" | "no" | "off" => false,
                _ => return Err(format!("not a boolean: {}", quote(text))),
            }),
            ColumnType::Jsonb => {
                check_json_text(t)?;
                Cell::Json(t.to_string())
            }
            ColumnType::Timestamptz => Cell::Time(self.parse_time_text(t)?),
        })
    }

    fn parse_time_text(&self, t: &str) -> Result<i64, String> {
        if let Ok(n) = t.parse::<i64>() {
            return self.epoch_to_micros(n);
        }
        let time = DateTime::parse_from_rfc3339(t).map_err(|_| {
            format!(
                "not RFC 3339 or an integer epoch in {}: {}",
                self.time_unit.name(),
                quote(t)
            )
        })?;
        // chrono reads `:60` as a nanosecond count of 1e9 or more; PostgreSQL takes `:60` as the
        // next second but refuses a fraction on it.
        if time.nanosecond() > LEAP_SECOND_NANOS {
            return Err(format!(
                "time {}: a leap second (:60) cannot have a fraction",
                quote(t)
            ));
        }
        let us = time.timestamp() * 1_000_000 + pg_fraction_micros(t, time.nanosecond());
        if !pg_limits::time_in_range(us) {
            return Err(pg_limits::time_out_of_range(format_args!(
                "time {}",
                quote(t)
            )));
        }
        Ok(us)
    }

    fn epoch_to_micros(&self, n: i64) -> Result<i64, String> {
        self.time_unit
            .to_micros(n)
            .filter(|us| pg_limits::time_in_range(*us))
            .ok_or_else(|| {
                pg_limits::time_out_of_range(format_args!("epoch {n} {}", self.time_unit.name()))
            })
    }

    /// Converts one MessagePack value for column `col`.
    pub fn parse_msgpack(&self, col: usize, v: &rmpv::Value) -> Result<Cell, ValueError> {
        self.parse_msgpack_inner(col, v).map_err(ValueError)
    }

    fn parse_msgpack_inner(&self, col: usize, v: &rmpv::Value) -> Result<Cell, String> {
        use rmpv::Value as V;
        let column = &self.columns[col];
        if v.is_nil() {
            return Ok(Cell::Null);
        }
        let wrong = |what: &str| format!("expected {what}, got {}", short(v));
        Ok(match column.ty {
            ColumnType::Text => match v {
                V::String(s) => {
                    let text = s.as_str().ok_or("not valid UTF-8")?;
                    pg_limits::check_text(text.as_bytes())?;
                    Cell::Text(text.to_string())
                }
                _ => return Err(wrong("a string")),
            },
            ColumnType::Float8 => match v {
                V::F64(f) => Cell::Float8(*f),
                V::F32(f) => Cell::Float8(*f as f64),
                V::Integer(i) => Cell::Float8(i.as_f64().ok_or_else(|| wrong("a number"))?),
                V::String(s) => return self.parse_text_inner(col, s.as_bytes()),
                _ => return Err(wrong("a number")),
            },
            ColumnType::Int8 | ColumnType::Int4 => match v {
                V::Integer(i) => {
                    let n = i.as_i64().ok_or_else(|| wrong("a 64-bit integer"))?;
                    if column.ty == ColumnType::Int4 {
                        Cell::Int4(i32::try_from(n).map_err(|_| wrong("a 32-bit integer"))?)
                    } else {
                        Cell::Int8(n)
                    }
                }
                V::String(s) => return self.parse_text_inner(col, s.as_bytes()),
                _ => return Err(wrong("an integer")),
            },
            ColumnType::Bool => match v {
                V::Boolean(b) => Cell::Bool(*b),
                V::String(s) => return self.parse_text_inner(col, s.as_bytes()),
                _ => return Err(wrong("a boolean")),
            },
            ColumnType::Jsonb => match v {
                V::String(s) => return self.parse_text_inner(col, s.as_bytes()),
                other => {
                    let json = msgpack_to_json(other)?.to_string();
                    pg_limits::check_json(json.as_bytes()).map_err(|e| e.to_string())?;
                    Cell::Json(json)
                }
            },
            ColumnType::Timestamptz => match v {
                V::Integer(i) => {
                    Cell::Time(self.epoch_to_micros(i.as_i64().ok_or_else(|| wrong("an epoch"))?)?)
                }
                V::String(s) => {
                    Cell::Time(self.parse_time_text(s.as_str().ok_or("not valid UTF-8")?.trim())?)
                }
                V::Ext(MSGPACK_TIMESTAMP_EXT, data) => Cell::Time(msgpack_timestamp(data)?),
                _ => return Err(wrong("a timestamp")),
            },
        })
    }
}

/// The MessagePack extension type of timestamps.
const MSGPACK_TIMESTAMP_EXT: i8 = -1;

/// Nanoseconds in a second: the exclusive bound of a timestamp's nanoseconds field.
const NANOS_PER_SECOND: u32 = 1_000_000_000;

/// chrono's nanosecond field of a whole leap second (`:60`): more means a fraction on it.
const LEAP_SECOND_NANOS: u32 = NANOS_PER_SECOND;

/// The fractional second of RFC 3339 text `t` in whole microseconds, rounded the way
/// PostgreSQL's own input rounds it (the digits read as a double, times 10^6, to the nearest
/// integer, ties to even), so a time sent with more than six fractional digits is stored exactly
/// as `'…'::timestamptz` would store it. `nanos` (chrono's reading, ≥ 1e9 on a leap second)
/// is used when the text has no fraction.
fn pg_fraction_micros(t: &str, nanos: u32) -> i64 {
    // chrono accepted `t`, so it is `YYYY-MM-DDTHH:MM:SS[.digits](Z|±hh:mm)`.
    let digits = t
        .get(19..)
        .and_then(|rest| rest.strip_prefix('.'))
        .map(|rest| {
            &rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())]
        });
    match digits {
        Some(d) if d.len() > 6 => format!("0.{d}")
            .parse::<f64>()
            .map(|frac| (frac * 1e6).round_ties_even() as i64)
            .unwrap_or(i64::from(nanos / 1000)),
        _ => i64::from(nanos / 1000),
    }
}

/// MessagePack's timestamp extension (type -1) in microseconds, within the accepted range.
fn msgpack_timestamp(data: &[u8]) -> Result<i64, String> {
    let (seconds, nanos) = msgpack_timestamp_parts(data).ok_or_else(|| {
        format!(
            "a timestamp extension has 4, 8 or 12 bytes, not {}",
            data.len()
        )
    })?;
    if nanos >= NANOS_PER_SECOND {
        return Err(format!(
            "timestamp extension: nanoseconds {nanos} must be less than {NANOS_PER_SECOND}"
        ));
    }
    seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(nanos / 1_000)))
        .filter(|us| pg_limits::time_in_range(*us))
        .ok_or_else(|| {
            pg_limits::time_out_of_range(format_args!("timestamp extension {seconds} s {nanos} ns"))
        })
}

/// Seconds and nanoseconds of the 4-, 8- and 12-byte timestamp forms.
fn msgpack_timestamp_parts(data: &[u8]) -> Option<(i64, u32)> {
    match data.len() {
        4 => Some((u32::from_be_bytes(data.try_into().ok()?) as i64, 0)),
        8 => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            Some(((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32))
        }
        12 => {
            let nanos = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
            let seconds = i64::from_be_bytes(data.get(4..)?.try_into().ok()?);
            Some((seconds, nanos))
        }
        _ => None,
    }
}

/// Parses float8 text as PostgreSQL would: a finite number that overflows to infinity or
/// underflows to zero is refused (22003) rather than stored changed; `Infinity`, `inf`, `NaN`
/// (any case, signed) are their values.
fn parse_float8(t: &str) -> Result<f64, String> {
    let f = t
        .parse::<f64>()
        .map_err(|_| format!("not a number: {}", quote(t)))?;
    let word = t
        .trim_start_matches(['+', '-'])
        .starts_with(|c: char| c.is_ascii_alphabetic());
    if word {
        return Ok(f);
    }
    if f.is_infinite() {
        return Err(format!(
            "{} is out of range for float8 (largest magnitude {:e})",
            quote(t),
            f64::MAX
        ));
    }
    let mantissa = t.split(['e', 'E']).next().unwrap_or_default();
    if f == 0.0 && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9')) {
        return Err(format!(
            "{} is out of range for float8 (smallest magnitude {:e})",
            quote(t),
            f64::from_bits(1)
        ));
    }
    Ok(f)
}

/// Checks JSON text for a jsonb column: what PostgreSQL refuses first (bounded nesting also
/// keeps serde_json's recursion shallow), then the syntax.
fn check_json_text(t: &str) -> Result<(), String> {
    pg_limits::check_json(t.as_bytes()).map_err(|e| e.to_string())?;
    serde_json::from_str::<serde::de::IgnoredAny>(t).map_err(|e| format!("invalid JSON ({e})"))?;
    Ok(())
}

/// The message for a float JSON cannot represent.
fn non_finite_json(f: f64) -> String {
    format!("float {f} cannot be stored in jsonb (JSON has no NaN or Infinity)")
}

fn msgpack_to_json(v: &rmpv::Value) -> Result<serde_json::Value, String> {
    use rmpv::Value as V;
    use serde_json::Value as J;
    Ok(match v {
        V::Nil => J::Null,
        V::Boolean(b) => J::Bool(*b),
        V::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => J::from(n),
            (None, Some(n)) => J::from(n),
            _ => return Err("integer out of range".into()),
        },
        V::F32(f) => serde_json::Number::from_f64(*f as f64)
            .map(J::Number)
            .ok_or_else(|| non_finite_json(*f as f64))?,
        V::F64(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .ok_or_else(|| non_finite_json(*f))?,
        V::String(s) => J::String(s.as_str().ok_or("not valid UTF-8")?.to_string()),
        V::Binary(_) | V::Ext(..) => return Err("binary values cannot be stored as JSON".into()),
        V::Array(items) => J::Array(
            items
                .iter()
                .map(msgpack_to_json)
                .collect::<Result<_, _>>()?,
        ),
        V::Map(pairs) => {
            let mut map = serde_json::Map::new();
            for (k, val) in pairs {
                let key = k.as_str().ok_or("JSON object keys must be strings")?;
                map.insert(key.to_string(), msgpack_to_json(val)?);
            }
            J::Object(map)
        }
    })
}

fn quote(s: &str) -> String {
    let mut q: String = s.chars().take(64).collect();
    if q.len() < s.len() {
        q.push('…');
    }
    format!("{q:?}")
}

fn short(v: &rmpv::Value) -> String {
    let s = v.to_string();
    if s.len() > 64 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(64).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// Why a value cannot be stored in its column: what is wrong and the limit it breaks (the
/// caller adds which field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

/// A conservative estimate of the B-tree entry a row's `cells` make in one index (the cells of
/// the index's columns): [`pg_limits::INDEX_TUPLE_OVERHEAD`], plus per non-NULL column
/// [`pg_limits::INDEX_COLUMN_OVERHEAD`] and its data: text its length, jsonb [`pg_limits::JSONB_INDEX_FACTOR`] × its
/// length + [`pg_limits::JSONB_INDEX_BASE`], fixed-width types nothing more. Compression is not counted.
pub fn index_entry_estimate<'a>(cells: impl IntoIterator<Item = &'a Cell>) -> usize {
    pg_limits::INDEX_TUPLE_OVERHEAD + cells.into_iter().map(index_cell_estimate).sum::<usize>()
}

/// One cell's part of [`index_entry_estimate`].
pub fn index_cell_estimate(cell: &Cell) -> usize {
    match cell {
        Cell::Null => 0,
        Cell::Text(s) => pg_limits::INDEX_COLUMN_OVERHEAD + s.len(),
        Cell::Json(s) => {
            pg_limits::INDEX_COLUMN_OVERHEAD
                + pg_limits::JSONB_INDEX_BASE
                + pg_limits::JSONB_INDEX_FACTOR.saturating_mul(s.len())
        }
        _ => pg_limits::INDEX_COLUMN_OVERHEAD,
    }
}

/// One typed value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int4(i32),
    Int8(i64),
    Float8(f64),
    Text(String),
    /// JSON text, validated.
    Json(String),
    /// Microseconds since the Unix epoch.
    Time(i64),
}

impl Cell {
    /// The value as a producer would have sent it in a text field (for dead letters and `inspect`).
    pub fn to_text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Bool(b) => b.to_string(),
            Cell::Int4(n) => n.to_string(),
            Cell::Int8(n) => n.to_string(),
            Cell::Float8(f) => f.to_string(),
            Cell::Text(s) | Cell::Json(s) => s.clone(),
            Cell::Time(us) => Utc
                .timestamp_micros(*us)
                .single()
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                .unwrap_or_else(|| us.to_string()),
        }
    }

    /// The value as JSON (for `inspect`).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Cell::Null => J::Null,
            Cell::Bool(b) => J::Bool(*b),
            Cell::Int4(n) => J::from(*n),
            Cell::Int8(n) => J::from(*n),
            Cell::Float8(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            Cell::Text(s) => J::String(s.clone()),
            Cell::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String(s.clone())),
            Cell::Time(_) => J::String(self.to_text()),
        }
    }
}

/// Loads every `*.toml` in `dir`, sorted by table name.
pub fn load_dir(dir: &Path) -> Result<Vec<SchemaRef>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: dir.display().to_string(),
        source,
    };
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut schemas: Vec<SchemaRef> = Vec::new();
    for p in paths {
        let display = p.display().to_string();
        let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let schema = Schema::from_toml(&display, &text)?;
        if schemas.iter().any(|s| s.table == schema.table) {
            return Err(ConfigError::Invalid {
                path: display,
                message: format!("table `{}` is defined twice", schema.table),
            });
        }
        schemas.push(Arc::new(schema));
    }
    if schemas.is_empty() {
        return Err(ConfigError::Invalid {
            path: dir.display().to_string(),
            message: "no table schemas (*.toml) found".into(),
        });
    }
    Ok(schemas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_estimate_counts_jsonb_generously() {
        let text = Cell::Text("x".repeat(100));
        let json = Cell::Json("[1]".into());
        let time = Cell::Time(0);
        assert_eq!(index_entry_estimate([&text, &time]), 16 + 108 + 8);
        assert_eq!(index_entry_estimate([&json, &Cell::Null]), 16 + 8 + 16 + 24);
    }

    const METRICS: &str = r#"
table = "metrics"
time_column = "time"
chunk_interval = "1 hour"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "value"
type = "float8"
required = true
[[columns]]
name = "tags"
type = "jsonb"
"#;

    #[test]
    fn sub_microsecond_digits_round_as_postgresql_rounds_them() {
        let s = Schema::from_toml("m.toml", METRICS).unwrap();
        let at = |t: &str| match s.parse_text(0, t.as_bytes()).unwrap() {
            Cell::Time(us) => us - 1_793_491_200_000_000,
            other => panic!("{other:?}"),
        };
        assert_eq!(at("2026-11-01T00:00:00.1234567891Z"), 123_457);
        assert_eq!(at("2026-11-01T00:00:00.1234564Z"), 123_456);
        assert_eq!(at("2026-11-01T00:00:00.9999996Z"), 1_000_000);
        assert_eq!(at("2026-11-01T00:00:00.123456Z"), 123_456);
        assert_eq!(at("2026-11-01T00:00:00Z"), 0);
    }

    #[test]
    fn parses_values_by_type_with_clear_errors() {
        let s = Schema::from_toml("m.toml", METRICS).unwrap();
        assert_eq!(s.chunk_interval_us, 3_600_000_000);
        assert!(s.columns[0].required, "the time column is always required");
        assert_eq!(s.parse_text(1, b"12.5").unwrap(), Cell::Float8(12.5));
        assert_eq!(
            s.parse_text(1, b"abc").unwrap_err().to_string(),
            "not a number: \"abc\""
        );
        assert_eq!(
            s.parse_text(0, b"1793491200000").unwrap(),
            Cell::Time(1_793_491_200_000_000)
        );
        assert_eq!(
            s.parse_text(0, b"2026-11-01T00:00:00Z").unwrap(),
            Cell::Time(1_793_491_200_000_000)
        );
        assert!(s
            .parse_text(0, b"yesterday")
            .unwrap_err()
            .to_string()
            .contains("RFC 3339"));
        assert!(s
            .parse_text(2, b"{bad")
            .unwrap_err()
            .to_string()
            .starts_with("invalid JSON"));
        assert_eq!(s.parse_text(2, b"").unwrap(), Cell::Null);
    }

    /// time (unit as given), name text, tags jsonb, value float8, seen timestamptz.
    fn hostile(unit: &str) -> Schema {
        Schema::from_toml(
            "h.toml",
            &format!(
                r#"
table = "h"
time_column = "time"
time_unit = "{unit}"
[[columns]]
name = "time"
type = "timestamptz"
[[columns]]
name = "name"
type = "text"
[[columns]]
name = "tags"
type = "jsonb"
[[columns]]
name = "value"
type = "float8"
[[columns]]
name = "seen"
type = "timestamptz"
"#
            ),
        )
        .unwrap()
    }

    const RANGE: &str =
        "is outside the accepted range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z";

    #[test]
    fn nul_in_text_is_refused_from_text_and_msgpack() {
        let s = hostile("ms");
        let nul = "NUL (0x00) at byte 1: PostgreSQL text cannot hold it";
        assert_eq!(s.parse_text(1, b"a\0b").unwrap_err().to_string(), nul);
        assert_eq!(
            s.parse_msgpack(1, &"a\0b".into()).unwrap_err().to_string(),
            nul
        );
        assert_eq!(
            s.parse_text(1, b"a\\0b").unwrap(),
            Cell::Text("a\\0b".into())
        );
    }

    #[test]
    fn jsonb_limits_apply_to_text_and_msgpack() {
        let s = hostile("ms");
        assert_eq!(
            s.parse_text(2, br#"{"a":"\u0000"}"#)
                .unwrap_err()
                .to_string(),
            "JSON escape \\u0000 at byte 6: jsonb cannot hold NUL"
        );
        assert_eq!(
            s.parse_msgpack(2, &r#"["\udc00"]"#.into())
                .unwrap_err()
                .to_string(),
            "JSON escape \\udc00 at byte 2 is an unpaired UTF-16 surrogate"
        );
        assert!(s
            .parse_text(2, b"1e131072")
            .unwrap_err()
            .to_string()
            .starts_with("JSON number at byte 0"));
        assert_eq!(
            s.parse_text(2, b" 1e131071 ").unwrap(),
            Cell::Json("1e131071".into())
        );
        let deep = "[".repeat(129) + &"]".repeat(129);
        assert_eq!(
            s.parse_text(2, deep.as_bytes()).unwrap_err().to_string(),
            "JSON nests deeper than 128 levels (at byte 128)"
        );
        // MessagePack: a string with NUL becomes the escape \u0000.
        let map = rmpv::Value::Map(vec![("k".into(), "a\0".into())]);
        assert_eq!(
            s.parse_msgpack(2, &map).unwrap_err().to_string(),
            "JSON escape \\u0000 at byte 7: jsonb cannot hold NUL"
        );
        let mut nested = rmpv::Value::from(1);
        for _ in 0..128 {
            nested = rmpv::Value::Array(vec![nested]);
        }
        assert!(
            s.parse_msgpack(2, &nested).is_ok(),
            "128 levels are accepted"
        );
        let err = s
            .parse_msgpack(2, &rmpv::Value::Array(vec![nested]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "JSON nests deeper than 128 levels (at byte 128)");
        for (f, shown) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            let v = rmpv::Value::Array(vec![f.into()]);
            assert_eq!(
                s.parse_msgpack(2, &v).unwrap_err().to_string(),
                format!("float {shown} cannot be stored in jsonb (JSON has no NaN or Infinity)")
            );
        }
        let v = rmpv::Value::Array(vec![rmpv::Value::F32(f32::NAN)]);
        assert!(s
            .parse_msgpack(2, &v)
            .unwrap_err()
            .to_string()
            .starts_with("float NaN"));
        let v = rmpv::Value::Array(vec![f64::MAX.into(), 5e-324.into()]);
        assert_eq!(
            s.parse_msgpack(2, &v).unwrap(),
            Cell::Json("[1.7976931348623157e+308,5e-324]".into())
        );
    }

    #[test]
    fn epochs_in_every_unit_stay_in_range() {
        // (unit, the first and last accepted epoch, the first refused ones); nanoseconds in
        // an i64 only span 1677..2262, so every i64 is in range.
        let cases: [(&str, i64, i64, &[i64]); 4] = [
            (
                "s",
                -62_135_596_800,
                253_402_300_799,
                &[-62_135_596_801, 253_402_300_800, i64::MAX, i64::MIN],
            ),
            (
                "ms",
                -62_135_596_800_000,
                253_402_300_799_999,
                &[-62_135_596_800_001, 253_402_300_800_000, i64::MAX],
            ),
            (
                "us",
                -62_135_596_800_000_000,
                253_402_300_799_999_999,
                &[-62_135_596_800_000_001, 253_402_300_800_000_000, i64::MIN],
            ),
            ("ns", i64::MIN, i64::MAX, &[]),
        ];
        for (unit, min, max, refused) in cases {
            let s = hostile(unit);
            for col in [0, 4] {
                for ok in [min, max] {
                    assert!(
                        s.parse_text(col, ok.to_string().as_bytes()).is_ok(),
                        "{unit} {ok}"
                    );
                    assert!(s.parse_msgpack(col, &ok.into()).is_ok(), "{unit} {ok}");
                }
                for &bad in refused {
                    assert_eq!(
                        s.parse_text(col, bad.to_string().as_bytes())
                            .unwrap_err()
                            .to_string(),
                        format!("epoch {bad} {unit} {RANGE}")
                    );
                    assert!(s
                        .parse_msgpack(col, &bad.into())
                        .unwrap_err()
                        .to_string()
                        .ends_with(RANGE));
                }
            }
        }
    }

    #[test]
    fn rfc3339_bounds_and_corner_cases() {
        let s = hostile("ms");
        let us = |t: &str| s.parse_text(0, t.as_bytes());
        assert_eq!(
            us("9999-12-31T23:59:59.999999Z"),
            Ok(Cell::Time(crate::pg_limits::MAX_TIME_US))
        );
        assert_eq!(
            us("0001-01-01T00:00:00Z"),
            Ok(Cell::Time(crate::pg_limits::MIN_TIME_US))
        );
        assert_eq!(
            us("0001-01-01T00:00:00+00:01").unwrap_err().to_string(),
            format!("time \"0001-01-01T00:00:00+00:01\" {RANGE}")
        );
        assert!(us("9999-12-31T23:59:59-00:01")
            .unwrap_err()
            .to_string()
            .ends_with(RANGE));
        assert!(s
            .parse_msgpack(4, &"0000-06-01T00:00:00Z".into())
            .unwrap_err()
            .to_string()
            .ends_with(RANGE));
        // PostgreSQL's readings: `:60` is the next second, lowercase t/z and offsets are fine.
        assert_eq!(us("2016-12-31T23:59:60Z"), us("2017-01-01T00:00:00Z"));
        assert_eq!(us("2026-11-01t12:34:60z"), us("2026-11-01T12:35:00Z"));
        assert_eq!(us("2026-11-01T14:00:00+02:00"), us("2026-11-01T12:00:00Z"));
        assert_eq!(
            us("2016-12-31T23:59:60.5Z").unwrap_err().to_string(),
            "time \"2016-12-31T23:59:60.5Z\": a leap second (:60) cannot have a fraction"
        );
    }

    #[test]
    fn msgpack_timestamp_extension_forms() {
        let s = hostile("ms");
        let ext = |data: Vec<u8>| s.parse_msgpack(0, &rmpv::Value::Ext(-1, data));
        assert_eq!(
            ext(1_000u32.to_be_bytes().to_vec()),
            Ok(Cell::Time(1_000_000_000))
        );
        let eight = |secs: u64, nanos: u64| ext(((nanos << 34) | secs).to_be_bytes().to_vec());
        assert_eq!(eight(1, 999_999_999), Ok(Cell::Time(1_999_999)));
        assert_eq!(
            eight(1, 1_000_000_000).unwrap_err().to_string(),
            "timestamp extension: nanoseconds 1000000000 must be less than 1000000000"
        );
        let twelve = |nanos: u32, secs: i64| {
            let mut d = nanos.to_be_bytes().to_vec();
            d.extend_from_slice(&secs.to_be_bytes());
            ext(d)
        };
        assert_eq!(
            twelve(999_999_000, 253_402_300_799),
            Ok(Cell::Time(crate::pg_limits::MAX_TIME_US))
        );
        assert_eq!(
            twelve(0, 253_402_300_800).unwrap_err().to_string(),
            format!("timestamp extension 253402300800 s 0 ns {RANGE}")
        );
        assert!(twelve(0, i64::MIN)
            .unwrap_err()
            .to_string()
            .ends_with(RANGE));
        assert!(twelve(u32::MAX, 0)
            .unwrap_err()
            .to_string()
            .contains("nanoseconds 4294967295"));
        assert_eq!(
            ext(vec![0; 5]).unwrap_err().to_string(),
            "a timestamp extension has 4, 8 or 12 bytes, not 5"
        );
        assert_eq!(
            s.parse_msgpack(0, &rmpv::Value::Ext(3, vec![0; 4]))
                .unwrap_err()
                .to_string(),
            "expected a timestamp, got [3, [0, 0, 0, 0]]"
        );
    }

    #[test]
    fn float8_text_that_would_change_is_refused() {
        let s = hostile("ms");
        let f = |t: &str| s.parse_text(3, t.as_bytes());
        assert_eq!(
            f("1e400").unwrap_err().to_string(),
            "\"1e400\" is out of range for float8 (largest magnitude 1.7976931348623157e308)"
        );
        assert_eq!(
            f("-1e-400").unwrap_err().to_string(),
            "\"-1e-400\" is out of range for float8 (smallest magnitude 5e-324)"
        );
        assert_eq!(f("4.9e-324"), Ok(Cell::Float8(5e-324)));
        assert_eq!(f("0.000e-999"), Ok(Cell::Float8(0.0)));
        assert_eq!(f("1.7976931348623157e308"), Ok(Cell::Float8(f64::MAX)));
        assert_eq!(f("-Infinity"), Ok(Cell::Float8(f64::NEG_INFINITY)));
        assert_eq!(f("inf"), Ok(Cell::Float8(f64::INFINITY)));
        assert!(matches!(f("NaN"), Ok(Cell::Float8(x)) if x.is_nan()));
    }

    #[test]
    fn rejects_bad_schemas_naming_the_problem() {
        let bad = METRICS.replace("time_column = \"time\"", "time_column = \"ts\"");
        let err = Schema::from_toml("m.toml", &bad)
            .unwrap_err()
            .to_string()
            .to_string();
        assert!(err.contains("time_column `ts`"), "{err}");
        let bad = METRICS.replace("\"1 hour\"", "\"soon\"");
        assert!(Schema::from_toml("m.toml", &bad)
            .unwrap_err()
            .to_string()
            .to_string()
            .contains("chunk_interval"));
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval_us("1 day"), Some(86_400_000_000));
        assert_eq!(parse_interval_us("30m"), Some(1_800_000_000));
        assert_eq!(parse_interval_us("0 days"), None);
        assert_eq!(parse_interval_us("day"), None);
    }
}
