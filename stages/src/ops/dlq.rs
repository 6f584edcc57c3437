//! `strata dlq list|replay|purge --stream S [--count N] [--id ID]`.
//!
//! `S` is a stream (`telemetry:{metrics}`) or its dead-letter stream (`telemetry:{metrics}:dlq`);
//! either way the dead letters of that stream are meant. A dead letter is the rejected entry's
//! original fields followed by the fields the runner added: `error`, `stage`, `source_id`,
//! `deliveries` and, for rows PostgreSQL refused, `sqlstate`.
//!
//! - **list** prints each as a JSON line: its ID, the added fields, where `replay` would send
//!   it, and the original `fields` (rendered as by `strata inspect`).
//! - **replay** re-adds the original fields (without the added ones) to the source stream and
//!   deletes the dead letter, in one Lua script per batch: for each entry, check it is still in
//!   the dead-letter stream, XADD it to its target, then XDEL it. A crash, a Redis error or a
//!   concurrent replay never loses an entry nor adds it twice. Every key shares the table's hash
//!   tag, so this also holds on Redis Cluster.
//!   - Dead letters of `rows:{T}` that are rows (batch-writer stores a refused row as its
//!     column values in text) go to `telemetry:{T}`, where ingest validates them again; only
//!     entries that carry a `frame` field go back to `rows:{T}`, which holds frames only.
//!   - An event that had no time field took its entry ID's time; replaying it would give it the
//!     replay time, so it is replayed with the time column set to its original time (RFC 3339,
//!     from `source_id`), also inside a `msgpack` map. This needs the table's schema.
//! - **purge** deletes them (XDEL).
//!
//! `--id` selects one dead letter (its own ID, as `list` shows it); otherwise the oldest
//! `--count` are taken.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use strata_pipeline::config::Config;
use strata_pipeline::frame::FRAME_FIELD;
use strata_pipeline::schema::{self, SchemaRef, MSGPACK_FIELD};
use strata_pipeline::streams::{
    self, Entry, Fields, DLQ_DELIVERIES, DLQ_ERROR, DLQ_SOURCE_ID, DLQ_SQLSTATE, DLQ_STAGE,
};

use super::render::{bytes_json, fields_json, Ordered, Rendered};
use super::{check_id, redis_info, OpsError, StreamKind, StreamName, STREAM_FORMS};

/// What to do with dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqAction {
    /// Print them as JSON lines.
    List,
    /// Re-add their original fields to the source stream, then remove them from the DLQ.
    Replay,
    /// Delete them.
    Purge,
}

/// Options of `strata dlq`.
#[derive(Debug, Clone)]
pub struct DlqOptions {
    pub action: DlqAction,
    /// The source stream (e.g. `telemetry:{metrics}`) or its dead-letter stream.
    pub stream: String,
    /// At most this many entries.
    pub count: usize,
    /// Only this dead-letter entry.
    pub id: Option<String>,
}

/// Entries replayed per script call: small enough not to block Redis noticeably.
const REPLAY_BATCH: usize = 100;

/// For each entry: if it is still in the dead-letter stream (KEYS[1]), XADD its original fields
/// to its target (KEYS[t]), then XDEL it. XADD comes first so an error (which keeps earlier
/// writes) never leaves an entry deleted but not re-added. Returns per entry the new ID, or 0
/// when the entry was already gone.
const REPLAY_SCRIPT: &str = r#"
local out = {}
local i = 2
for e = 1, tonumber(ARGV[1]) do
  local id, t, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if #redis.call('XRANGE', KEYS[1], id, id) == 1 then
    out[e] = redis.call('XADD', KEYS[t], '*', unpack(ARGV, i, i + 2 * n - 1))
    redis.call('XDEL', KEYS[1], id)
  else
    out[e] = 0
  end
  i = i + 2 * n
end
return out
"#;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REPLAY_SCRIPT));

/// A dead letter split into what the producer (or stage) sent and what the runner added.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its ID in the dead-letter stream.
    pub id: String,
    /// The rejected entry's fields (or, for a refused row, its column values), in order.
    pub original: Fields,
    /// The fields added on dead-lettering: `error`, `stage`, `source_id`, `deliveries`,
    /// `sqlstate`.
    pub added: Fields,
}

impl DeadLetter {
    /// Splits an entry. The runner appends its fields after the original ones, so the added
    /// fields are the trailing run that starts at the last `error`; an original field that
    /// happens to be called `error` or `stage` stays original. An entry not written by the
    /// runner loses every field with one of those names.
    pub fn from_entry(entry: Entry) -> DeadLetter {
        let added_after = [DLQ_STAGE, DLQ_SOURCE_ID, DLQ_DELIVERIES, DLQ_SQLSTATE];
        let f = entry.fields.to_vec();
        let split = (0..f.len()).rev().find(|&i| {
            f[i].0 == DLQ_ERROR
                && f[i + 1..]
                    .iter()
                    .all(|(k, _)| added_after.contains(&k.as_str()))
        });
        let (original, added) = match split {
            Some(i) => {
                let mut original = f;
                let added = original.split_off(i);
                (original, added)
            }
            None => f
                .into_iter()
                .partition(|(k, _)| k != DLQ_ERROR && !added_after.contains(&k.as_str())),
        };
        DeadLetter {
            id: entry.id,
            original,
            added,
        }
    }

    /// An added field as text.
    pub fn added(&self, name: &str) -> Option<String> {
        self.added
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn has(&self, name: &str) -> bool {
        self.original.iter().any(|(k, _)| k == name)
    }
}

/// Runs a dead-letter command, reporting to `out`.
pub async fn dlq(
    config: &Config,
    opts: &DlqOptions,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    if opts.count == 0 {
        return Err(OpsError::Usage("--count must be at least 1".into()));
    }
    if let Some(id) = &opts.id {
        check_id(id)?;
    }
    let name = StreamName::parse(&opts.stream).ok_or_else(|| OpsError::UnknownStream {
        stream: opts.stream.clone(),
        reason: STREAM_FORMS.into(),
    })?;
    // The schema is optional: it catches typos in table names and keeps times on replay.
    let schemas = schema::load_dir(&config.schemas_dir).unwrap_or_default();
    let schema = schemas.iter().find(|s| s.table == name.table).cloned();
    let dlq_key = name.dlq_key();
    let mut conn = redis_info::connect(config).await?;
    if !redis_info::stream_exists(&mut conn, &dlq_key).await?
        && schema.is_none()
        && !redis_info::stream_exists(&mut conn, &name.source()).await?
    {
        return Err(OpsError::UnknownStream {
            stream: opts.stream.clone(),
            reason: format!(
                "no schema in {} names table `{}`, and neither {} nor {dlq_key} exists",
                config.schemas_dir.display(),
                name.table,
                name.source()
            ),
        });
    }
    let entries = match &opts.id {
        Some(id) => {
            let found = redis_info::xrange(&mut conn, &dlq_key, id, id, 1).await?;
            if found.is_empty() {
                return Err(OpsError::NoSuchEntry {
                    stream: dlq_key,
                    id: id.clone(),
                });
            }
            found
        }
        None => redis_info::xrange(&mut conn, &dlq_key, "-", "+", opts.count).await?,
    };
    let letters: Vec<DeadLetter> = entries.into_iter().map(DeadLetter::from_entry).collect();
    match opts.action {
        DlqAction::List => {
            for d in &letters {
                let line =
                    serde_json::to_string(&list_line(&name, d)).map_err(std::io::Error::from)?;
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            let total = redis_info::xlen(&mut conn, &dlq_key).await?;
            if (letters.len() as u64) < total && opts.id.is_none() {
                eprintln!(
                    "strata: showed the oldest {} of {total} dead letters in {dlq_key} (--count to see more)",
                    letters.len()
                );
            }
            Ok(())
        }
        DlqAction::Replay => replay(&mut conn, &name, schema.as_ref(), &letters, out).await,
        DlqAction::Purge => {
            let ids: Vec<&str> = letters.iter().map(|d| d.id.as_str()).collect();
            let deleted: u64 = if ids.is_empty() {
                0
            } else {
                redis::cmd("XDEL")
                    .arg(&dlq_key)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await?
            };
            let left = redis_info::xlen(&mut conn, &dlq_key).await?;
            writeln!(
                out,
                "purged {deleted} {} from {dlq_key}; {left} left",
                plural(deleted, "entry", "entries")
            )?;
            out.flush()?;
            Ok(())
        }
    }
}

/// Where `replay` sends a dead letter of stream `name`.
pub fn replay_target(name: &StreamName, d: &DeadLetter) -> String {
    match name.kind {
        StreamKind::Rows if !d.has(FRAME_FIELD) => streams::telemetry_stream(&name.table),
        _ => name.source(),
    }
}

/// The fields `replay` adds to the target: the original ones, plus the original time where the
/// event had none and was going to ingest.
pub fn replay_fields(target: &str, schema: Option<&SchemaRef>, d: &DeadLetter) -> Fields {
    let mut fields = d.original.clone();
    let Some(schema) = schema else {
        return fields;
    };
    if *target != streams::telemetry_stream(&schema.table) {
        return fields;
    }
    let time_col = &schema.columns[schema.time_index].name;
    let Some(time) = d
        .added(DLQ_SOURCE_ID)
        .and_then(|id| redis_info::id_ms(&id))
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    else {
        return fields;
    };
    if let Some(pos) = fields.iter().position(|(k, _)| k == MSGPACK_FIELD) {
        if let Some(packed) = msgpack_with_time(&fields[pos].1, time_col, &time) {
            fields[pos].1 = packed;
        }
    } else if !d.has(time_col) {
        fields.push((time_col.clone(), time.into_bytes()));
    }
    fields
}

/// The MessagePack map (or array of maps) with `time_col` set where it is missing; None when
/// nothing changes or the payload does not decode (it is then replayed as it was).
fn msgpack_with_time(packed: &[u8], time_col: &str, time: &str) -> Option<Vec<u8>> {
    let mut rd = packed;
    let mut value = rmpv::decode::read_value(&mut rd).ok()?;
    if !rd.is_empty() {
        return None;
    }
    let mut changed = false;
    let mut fix = |v: &mut rmpv::Value| {
        if let rmpv::Value::Map(pairs) = v {
            if !pairs.iter().any(|(k, _)| k.as_str() == Some(time_col)) {
                pairs.push((time_col.into(), time.into()));
                changed = true;
            }
        }
    };
    match &mut value {
        rmpv::Value::Array(items) => items.iter_mut().for_each(&mut fix),
        v => fix(v),
    }
    if !changed {
        return None;
    }
    let mut buf = Vec::with_capacity(packed.len() + 48);
    rmpv::encode::write_value(&mut buf, &value).ok()?;
    Some(buf)
}

/// One line of `list`.
#[derive(Debug, serde::Serialize)]
struct ListLine {
    /// The dead letter's own ID (what `--id` takes).
    id: String,
    /// `error`, `stage`, `source_id`, `deliveries` (a number), `sqlstate`.
    #[serde(flatten)]
    added: Ordered<Value>,
    /// Where `replay` would send it.
    replay_to: String,
    /// What `replay` would send (before restoring a missing time).
    fields: Ordered<Rendered>,
}

fn list_line(name: &StreamName, d: &DeadLetter) -> ListLine {
    let added = d
        .added
        .iter()
        .map(|(k, v)| {
            let value = match k.as_str() {
                DLQ_DELIVERIES => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(Value::from)
                    .unwrap_or_else(|| bytes_json(v)),
                _ => bytes_json(v),
            };
            (k.clone(), value)
        })
        .collect();
    ListLine {
        id: d.id.clone(),
        added,
        replay_to: replay_target(name, d),
        fields: fields_json(&d.original),
    }
}

async fn replay<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    name: &StreamName,
    schema: Option<&SchemaRef>,
    letters: &[DeadLetter],
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    let dlq_key = name.dlq_key();
    let mut skipped = Vec::new();
    let mut work: Vec<(&DeadLetter, String, Fields)> = Vec::new();
    for d in letters {
        if d.original.is_empty() {
            skipped.push(d.id.as_str());
            continue;
        }
        let target = replay_target(name, d);
        let fields = replay_fields(&target, schema, d);
        work.push((d, target, fields));
    }
    if schema.is_none() && work.iter().any(|(_, t, _)| t.starts_with("telemetry:")) {
        eprintln!(
            "strata: no schema for table `{}`: events without a time field get the replay time",
            name.table
        );
    }
    // Targets are checked before any write, so the script never fails halfway on a wrong type.
    let mut keys: Vec<String> = vec![dlq_key.clone()];
    for (_, target, _) in &work {
        if !keys.contains(target) {
            redis_info::stream_exists(conn, target).await?;
            keys.push(target.clone());
        }
    }
    let mut replayed: BTreeMap<&str, u64> = BTreeMap::new();
    let mut gone = 0u64;
    for batch in work.chunks(REPLAY_BATCH) {
        let mut inv = SCRIPT.prepare_invoke();
        for k in &keys {
            inv.key(k.as_str());
        }
        inv.arg(batch.len());
        for (d, target, fields) in batch {
            let t = keys.iter().position(|k| k == target).unwrap_or(1) + 1;
            inv.arg(d.id.as_str()).arg(t).arg(fields.len());
            for (k, v) in fields {
                inv.arg(k.as_str()).arg(v.as_slice());
            }
        }
        let new_ids: Vec<redis::Value> = inv.invoke_async(conn).await?;
        for ((d, target, _), new) in batch.iter().zip(new_ids) {
            match new {
                redis::Value::BulkString(b) => {
                    writeln!(out, "{} → {target} {}", d.id, String::from_utf8_lossy(&b))?;
                    *replayed.entry(target.as_str()).or_default() += 1;
                }
                _ => gone += 1,
            }
        }
    }
    let left = redis_info::xlen(conn, &dlq_key).await?;
    let total: u64 = replayed.values().sum();
    let mut summary = format!(
        "replayed {total} {} from {dlq_key}",
        plural(total, "entry", "entries")
    );
    match replayed.len() {
        0 => {}
        1 => {
            let _ = write!(summary, " to {}", replayed.keys().next().unwrap_or(&""));
        }
        _ => {
            let parts: Vec<String> = replayed
                .iter()
                .map(|(t, n)| format!("{n} to {t}"))
                .collect();
            let _ = write!(summary, " ({})", parts.join(", "));
        }
    }
    if gone > 0 {
        let _ = write!(
            summary,
            "; {gone} already gone (replayed or purged meanwhile)"
        );
    }
    if !skipped.is_empty() {
        let _ = write!(
            summary,
            "; skipped {} with no original fields ({}): purge them",
            skipped.len(),
            skipped.join(", ")
        );
    }
    let _ = write!(summary, "; {left} left");
    writeln!(out, "{summary}")?;
    out.flush()?;
    Ok(())
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            deliveries: 0,
            ..Entry::new("5-0", fields.iter().copied())
        }
    }

    #[test]
    fn added_fields_are_the_trailing_run_from_the_last_error() {
        let d = DeadLetter::from_entry(entry(&[
            ("error", "mine"),
            ("value", "1"),
            ("error", "field `error`: no such column"),
            ("stage", "ingest"),
            ("source_id", "1700000000000-0"),
            ("deliveries", "1"),
        ]));
        assert_eq!(d.original.len(), 2);
        assert_eq!(d.original[0].0, "error");
        assert_eq!(d.added(DLQ_STAGE).as_deref(), Some("ingest"));
        let d = DeadLetter::from_entry(entry(&[("value", "1"), ("stage", "x")]));
        assert_eq!(d.original.len(), 1);
        assert_eq!(d.added.len(), 1);
    }

    #[test]
    fn rows_go_to_telemetry_frames_back_to_rows_and_times_are_kept() {
        let name = StreamName::parse("rows:{m}:dlq").unwrap();
        let row = DeadLetter::from_entry(entry(&[("value", "-1"), ("error", "x")]));
        assert_eq!(replay_target(&name, &row), "telemetry:{m}");
        let frame = DeadLetter::from_entry(entry(&[("frame", "zz"), ("error", "x")]));
        assert_eq!(replay_target(&name, &frame), "rows:{m}");

        let schema: SchemaRef = std::sync::Arc::new(
            schema::Schema::from_toml(
                "m.toml",
                "table = \"m\"\ntime_column = \"t\"\n[[columns]]\nname = \"t\"\ntype = \"timestamptz\"\n",
            )
            .unwrap(),
        );
        let d = DeadLetter::from_entry(entry(&[
            ("x", "1"),
            ("error", "e"),
            ("source_id", "1793491200123-4"),
        ]));
        let fields = replay_fields("telemetry:{m}", Some(&schema), &d);
        assert_eq!(
            fields[1],
            ("t".to_string(), b"2026-11-01T00:00:00.123Z".to_vec())
        );
        let mut packed = Vec::new();
        rmpv::encode::write_value(&mut packed, &rmpv::Value::Map(vec![("x".into(), 1.into())]))
            .unwrap();
        let d = DeadLetter {
            id: "1-0".into(),
            original: vec![("msgpack".into(), packed)],
            added: vec![("source_id".into(), b"1793491200123-4".to_vec())],
        };
        let fields = replay_fields("telemetry:{m}", Some(&schema), &d);
        let v = rmpv::decode::read_value(&mut &fields[0].1[..]).unwrap();
        assert_eq!(v["t"].as_str(), Some("2026-11-01T00:00:00.123Z"));
    }
}
