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

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;

use crate::error::ConfigError;

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
    /// What happens to chunks as they age.
    pub policy: LifecyclePolicy,
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
            policy,
        })
    }

    /// The position of the column called `name` (a field name as sent, not always UTF-8).
    pub fn column_index(&self, name: impl AsRef<[u8]>) -> Option<usize> {
        let name = name.as_ref();
        self.columns.iter().position(|c| c.name.as_bytes() == name)
    }

    /// Parses one text value (as `redis-cli` sends it) for column `col`.
    /// An empty value of a non-text column is NULL.
    pub fn parse_text(&self, col: usize, raw: &[u8]) -> Result<Cell, String> {
        let column = &self.columns[col];
        let text = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
        if text.is_empty() && column.ty != ColumnType::Text {
            return Ok(Cell::Null);
        }
        let t = text.trim();
        Ok(match column.ty {
            ColumnType::Text => Cell::Text(text.to_string()),
            ColumnType::Float8 => Cell::Float8(
                t.parse::<f64>()
                    .map_err(|_| format!("not a number: {}", quote(text)))?,
            ),
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
                serde_json::from_str::<serde::de::IgnoredAny>(t)
                    .map_err(|e| format!("invalid JSON ({e})"))?;
                Cell::Json(t.to_string())
            }
            ColumnType::Timestamptz => Cell::Time(self.parse_time_text(t)?),
        })
    }

    fn parse_time_text(&self, t: &str) -> Result<i64, String> {
        if let Ok(n) = t.parse::<i64>() {
            return self.epoch_to_micros(n);
        }
        DateTime::parse_from_rfc3339(t)
            .map(|d| d.timestamp_micros())
            .map_err(|_| {
                format!(
                    "not RFC 3339 or an integer epoch in {}: {}",
                    self.time_unit.name(),
                    quote(t)
                )
            })
    }

    fn epoch_to_micros(&self, n: i64) -> Result<i64, String> {
        self.time_unit
            .to_micros(n)
            .filter(|us| Utc.timestamp_micros(*us).single().is_some())
            .ok_or_else(|| format!("epoch {n} {} is out of range", self.time_unit.name()))
    }

    /// Converts one MessagePack value for column `col`.
    pub fn parse_msgpack(&self, col: usize, v: &rmpv::Value) -> Result<Cell, String> {
        use rmpv::Value as V;
        let column = &self.columns[col];
        if v.is_nil() {
            return Ok(Cell::Null);
        }
        let wrong = |what: &str| format!("expected {what}, got {}", short(v));
        Ok(match column.ty {
            ColumnType::Text => match v {
                V::String(s) => Cell::Text(s.as_str().ok_or("not valid UTF-8")?.to_string()),
                _ => return Err(wrong("a string")),
            },
            ColumnType::Float8 => match v {
                V::F64(f) => Cell::Float8(*f),
                V::F32(f) => Cell::Float8(*f as f64),
                V::Integer(i) => Cell::Float8(i.as_f64().ok_or_else(|| wrong("a number"))?),
                V::String(s) => return self.parse_text(col, s.as_bytes()),
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
                V::String(s) => return self.parse_text(col, s.as_bytes()),
                _ => return Err(wrong("an integer")),
            },
            ColumnType::Bool => match v {
                V::Boolean(b) => Cell::Bool(*b),
                V::String(s) => return self.parse_text(col, s.as_bytes()),
                _ => return Err(wrong("a boolean")),
            },
            ColumnType::Jsonb => match v {
                V::String(s) => return self.parse_text(col, s.as_bytes()),
                other => Cell::Json(msgpack_to_json(other)?.to_string()),
            },
            ColumnType::Timestamptz => match v {
                V::Integer(i) => {
                    Cell::Time(self.epoch_to_micros(i.as_i64().ok_or_else(|| wrong("an epoch"))?)?)
                }
                V::String(s) => {
                    Cell::Time(self.parse_time_text(s.as_str().ok_or("not valid UTF-8")?.trim())?)
                }
                V::Ext(-1, data) => {
                    Cell::Time(msgpack_timestamp(data).ok_or_else(|| wrong("a timestamp"))?)
                }
                _ => return Err(wrong("a timestamp")),
            },
        })
    }
}

/// MessagePack's timestamp extension (type -1) in microseconds.
fn msgpack_timestamp(data: &[u8]) -> Option<i64> {
    match data.len() {
        4 => Some(u32::from_be_bytes(data.try_into().ok()?) as i64 * 1_000_000),
        8 => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            Some((v & 0x3_ffff_ffff) as i64 * 1_000_000 + (v >> 34) as i64 / 1_000)
        }
        12 => {
            let ns = u32::from_be_bytes(data[..4].try_into().ok()?) as i64;
            let s = i64::from_be_bytes(data[4..].try_into().ok()?);
            s.checked_mul(1_000_000)?.checked_add(ns / 1_000)
        }
        _ => None,
    }
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
            .unwrap_or(J::Null),
        V::F64(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or(J::Null),
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
    fn parses_values_by_type_with_clear_errors() {
        let s = Schema::from_toml("m.toml", METRICS).unwrap();
        assert_eq!(s.chunk_interval_us, 3_600_000_000);
        assert!(s.columns[0].required, "the time column is always required");
        assert_eq!(s.parse_text(1, b"12.5").unwrap(), Cell::Float8(12.5));
        assert_eq!(
            s.parse_text(1, b"abc").unwrap_err(),
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
            .contains("RFC 3339"));
        assert!(s
            .parse_text(2, b"{bad")
            .unwrap_err()
            .starts_with("invalid JSON"));
        assert_eq!(s.parse_text(2, b"").unwrap(), Cell::Null);
    }

    #[test]
    fn rejects_bad_schemas_naming_the_problem() {
        let bad = METRICS.replace("time_column = \"time\"", "time_column = \"ts\"");
        let err = Schema::from_toml("m.toml", &bad).unwrap_err().to_string();
        assert!(err.contains("time_column `ts`"), "{err}");
        let bad = METRICS.replace("\"1 hour\"", "\"soon\"");
        assert!(Schema::from_toml("m.toml", &bad)
            .unwrap_err()
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
