//! `strata dlq list|replay|purge --stream S [--count N] [--id ID]`.
//!
//! `S` is a stream (`telemetry:{metrics}`) or its dead-letter stream (`telemetry:{metrics}:dlq`);
//! either way the dead letters of that stream are meant. A dead letter is the rejected entry's
//! original fields followed by the fields the runner added: `error`, `stage`, `source_id`,
//! `deliveries` and, for rows PostgreSQL refused, `sqlstate` (see
//! [`streams::dead_letter_fields`]). The added fields are always the last ones, so an original
//! field with one of those names stays original; original fields packed into one field
//! [`streams::DLQ_PACKED`] are unpacked.
//!
//! - **list** prints each as a JSON line: its ID, the added fields, where `replay` would send
//!   it, and the original `fields` (rendered as by `strata inspect`).
//! - **replay** re-adds the original fields (without the added ones) to the source stream and
//!   deletes the dead letter, in one Lua script per batch (`replay.lua`): check which entries
//!   are still in the dead-letter stream, XADD them to their targets, then XDEL them; a failed
//!   write deletes what the step added and removes no dead letter. A crash, a Redis error or a
//!   concurrent replay never loses an entry nor adds it twice. Every key shares the table's hash
//!   tag, so this also holds on Redis Cluster.
//!   - A dead letter with more fields than one XADD from a script can take
//!     ([`streams::MAX_SCRIPT_FIELDS`]; a packed dead letter of a huge entry) is replayed on its
//!     own in a transaction instead: WATCH the dead-letter stream, check the entry is still
//!     there, then MULTI, a script recording the target's length in a marker key, XADD, a
//!     script that XDELs the dead letter only if the target grew by exactly that entry, EXEC.
//!     A concurrent change of the dead-letter stream aborts the EXEC and the step is tried again
//!     (at most [`WATCH_ATTEMPTS`] times).
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

use crate::config::Config;
use serde_json::Value;
use strata_pipeline::frame::FRAME_FIELD;
use strata_pipeline::schema::{self, SchemaRef, MSGPACK_FIELD};
use strata_pipeline::streams::{
    self, Entry, Fields, StreamId, DLQ_DELIVERIES, DLQ_ERROR, DLQ_PACKED, DLQ_SOURCE_ID,
    DLQ_SQLSTATE, DLQ_STAGE, MAX_SCRIPT_FIELDS,
};

use super::render::{bytes_json, field_json, fields_json, Ordered, Rendered};
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

/// The replay step of a batch of dead letters (see `replay.lua`).
static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| streams::script(include_str!("replay.lua")));

/// Times the transaction replaying one large dead letter is tried while the dead-letter stream
/// keeps changing under its WATCH.
pub const WATCH_ATTEMPTS: usize = 20;

/// Inside the transaction of a large dead letter, before its XADD (`mark.lua`): records the
/// target's length in a marker key.
///
/// After the XADD, `unmark.lua` XDELs the dead letter only if the target grew by exactly one
/// entry since the marker was set, i.e. the XADD happened (a failed command does not stop a
/// transaction).
static MARK: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| streams::script_source(include_str!("mark.lua")));
static UNMARK: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| streams::script_source(include_str!("unmark.lua")));

/// A dead letter split into what the producer (or stage) sent and what the runner added.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its ID in the dead-letter stream.
    pub id: StreamId,
    /// The rejected entry's fields (or, for a refused row, its column values), in order.
    pub original: Fields,
    /// The fields added on dead-lettering: `error`, `stage`, `source_id`, `deliveries`,
    /// `sqlstate`.
    pub added: Fields,
    /// True when the original fields were packed into one field [`DLQ_PACKED`].
    pub packed: bool,
}

impl DeadLetter {
    /// Splits an entry. The runner appends its fields after the original ones, starting with
    /// `error` and with no other `error` after it, so the added fields are the trailing run
    /// that starts at the last `error` and holds only added names; an original field that
    /// happens to have one of those names (even `error`) stays original, in its place. An
    /// entry not written by the runner (no such run) has as added fields only its trailing run
    /// of added names. An original that is exactly one field [`DLQ_PACKED`] holding packed
    /// fields is unpacked.
    pub fn from_entry(entry: Entry) -> DeadLetter {
        const AFTER_ERROR: [&str; 4] = [DLQ_STAGE, DLQ_SOURCE_ID, DLQ_DELIVERIES, DLQ_SQLSTATE];
        let mut original = entry.fields.to_vec();
        let split = (0..original.len())
            .rev()
            .find(|&i| {
                original[i].0 == DLQ_ERROR
                    && original[i + 1..]
                        .iter()
                        .all(|(k, _)| AFTER_ERROR.contains(&k.as_str()))
            })
            .unwrap_or_else(|| {
                original
                    .iter()
                    .rposition(|(k, _)| k != DLQ_ERROR && !AFTER_ERROR.contains(&k.as_str()))
                    .map_or(0, |i| i + 1)
            });
        let added = original.split_off(split);
        let unpacked = match original.as_slice() {
            [(name, value)] if name == DLQ_PACKED => streams::unpack_fields(value),
            _ => None,
        };
        let packed = unpacked.is_some();
        DeadLetter {
            id: entry.id,
            original: unpacked.unwrap_or(original),
            added,
            packed,
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
            let found = streams::range(&mut conn, &dlq_key, id, id, 1).await?;
            if found.is_empty() {
                return Err(OpsError::NoSuchEntry {
                    stream: dlq_key,
                    id: id.clone(),
                });
            }
            found
        }
        None => streams::range(&mut conn, &dlq_key, "-", "+", opts.count).await?,
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
            let total = streams::len(&mut conn, &dlq_key).await?;
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
            let ids: Vec<StreamId> = letters.iter().map(|d| d.id).collect();
            let deleted: u64 = if ids.is_empty() {
                0
            } else {
                redis::cmd("XDEL")
                    .arg(&dlq_key)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await?
            };
            let left = streams::len(&mut conn, &dlq_key).await?;
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
        // Back to ingest, in the partition it came from.
        StreamKind::Rows if !d.has(FRAME_FIELD) => {
            StreamKind::Telemetry.partition_key(&name.table, name.partition)
        }
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
    let to_ingest = StreamName::parse(target)
        .is_some_and(|n| n.kind == StreamKind::Telemetry && n.table == schema.table && !n.dlq);
    if !to_ingest {
        return fields;
    }
    let time_col = &schema.columns[schema.time_index].name;
    let Some(time) = d
        .added(DLQ_SOURCE_ID)
        .and_then(|id| id.parse::<StreamId>().ok())
        .map(|id| id.ms)
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
    let mut value = rmpv::decode::read_value_with_max_depth(
        &mut rd,
        strata_pipeline::pg_limits::MSGPACK_MAX_DEPTH,
    )
    .ok()?;
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
    id: StreamId,
    /// `error`, `stage`, `source_id`, `deliveries` (a number), `sqlstate`.
    #[serde(flatten)]
    added: Ordered<Value>,
    /// Where `replay` would send it.
    replay_to: String,
    /// True when the dead letter holds its original fields packed (omitted otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    packed: bool,
    /// What `replay` would send (before restoring a missing time).
    fields: OriginalJson,
}

/// The original fields of `list`: an object in field order, or, when a name occurs more than
/// once, an array of `[name, value]` pairs, so every field shows.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
enum OriginalJson {
    Object(Ordered<Rendered>),
    Pairs(Vec<(String, Rendered)>),
}

fn original_json(fields: &Fields) -> OriginalJson {
    let mut names = std::collections::HashSet::new();
    if fields.iter().all(|(k, _)| names.insert(k.as_str())) {
        OriginalJson::Object(fields_json(fields))
    } else {
        OriginalJson::Pairs(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), field_json(k, v)))
                .collect(),
        )
    }
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
        id: d.id,
        added,
        replay_to: replay_target(name, d),
        packed: d.packed,
        fields: original_json(&d.original),
    }
}

/// One dead letter to replay: it, its target, the fields to add there.
type Work<'a> = (&'a DeadLetter, String, Fields);

/// Replays dead letters with at most [`MAX_SCRIPT_FIELDS`] fields each in one script step;
/// returns per dead letter its new ID, or None when it was gone already.
async fn replay_batch<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
    batch: &[Work<'_>],
) -> Result<Vec<Option<String>>, OpsError> {
    let mut inv = SCRIPT.prepare_invoke();
    for k in keys {
        inv.key(k.as_str());
    }
    inv.arg(batch.len());
    for (d, target, fields) in batch {
        let t = keys.iter().position(|k| k == target).unwrap_or(1) + 1;
        inv.arg(d.id).arg(t).arg(fields.len());
        for (k, v) in fields {
            inv.arg(k.as_str()).arg(v.as_slice());
        }
    }
    let new_ids: Vec<redis::Value> = inv.invoke_async(conn).await?;
    Ok(new_ids
        .into_iter()
        .map(|v| match v {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        })
        .collect())
}

/// Replays one dead letter of any size in a WATCH/MULTI/EXEC transaction (see the module
/// documentation); returns its new ID, or None when it was gone already.
async fn replay_large<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    dlq_key: &str,
    target: &str,
    id: StreamId,
    fields: &Fields,
) -> Result<Option<String>, OpsError> {
    let id_text = id.to_string();
    let failed = |source: redis::RedisError| OpsError::ReplayFailed {
        stream: dlq_key.to_string(),
        id: id.to_string(),
        source,
    };
    for _ in 0..WATCH_ATTEMPTS {
        let () = redis::cmd("WATCH").arg(dlq_key).query_async(conn).await?;
        let checked = async {
            if streams::range(conn, dlq_key, &id_text, &id_text, 1)
                .await?
                .is_empty()
            {
                return Ok(false);
            }
            redis_info::stream_exists(conn, target).await?;
            Ok::<_, OpsError>(true)
        }
        .await;
        if !matches!(checked, Ok(true)) {
            let () = redis::cmd("UNWATCH").query_async(conn).await?;
            return checked.map(|_| None);
        }
        let marker = format!("{dlq_key}:replaying:{:016x}", rand::random::<u64>());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("MULTI");
        pipe.cmd("EVAL")
            .arg(MARK.as_str())
            .arg(2)
            .arg(target)
            .arg(&marker);
        let xadd = pipe.cmd("XADD").arg(target).arg("*");
        for (k, v) in fields {
            xadd.arg(k.as_str()).arg(v.as_slice());
        }
        pipe.cmd("EVAL")
            .arg(UNMARK.as_str())
            .arg(3)
            .arg(target)
            .arg(&marker)
            .arg(dlq_key)
            .arg(id);
        pipe.cmd("EXEC");
        let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        match replies.pop() {
            // The dead-letter stream changed after WATCH: nothing ran; look again.
            Some(redis::Value::Nil) => continue,
            Some(redis::Value::Array(done)) if done.len() == 3 => {
                let mut done = done.into_iter().skip(1);
                let (added, removed) = (done.next(), done.next());
                return match (added, removed) {
                    (Some(redis::Value::ServerError(e)), _)
                    | (_, Some(redis::Value::ServerError(e))) => Err(failed(e.into())),
                    (Some(redis::Value::BulkString(new)), _) => {
                        Ok(Some(String::from_utf8_lossy(&new).into_owned()))
                    }
                    (other, _) => Err(failed(unexpected(other))),
                };
            }
            Some(redis::Value::ServerError(e)) => return Err(failed(e.into())),
            other => return Err(failed(unexpected(other))),
        }
    }
    Err(OpsError::ReplayContended {
        stream: dlq_key.to_string(),
        id: id.to_string(),
        attempts: WATCH_ATTEMPTS,
    })
}

/// A reply of an unexpected shape, as an error.
fn unexpected(reply: Option<redis::Value>) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply to the replay transaction",
        format!("{reply:?}"),
    ))
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
    let mut work: Vec<Work> = Vec::new();
    for d in letters {
        if d.original.is_empty() {
            skipped.push(d.id);
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
    let large = |w: &Work| w.2.len() > MAX_SCRIPT_FIELDS;
    let mut start = 0;
    while start < work.len() {
        let (step, results) = if large(&work[start]) {
            let (d, target, fields) = &work[start];
            let new = replay_large(conn, &dlq_key, target, d.id, fields).await?;
            (&work[start..=start], vec![new])
        } else {
            let end = work[start..]
                .iter()
                .take(REPLAY_BATCH)
                .position(large)
                .map_or((start + REPLAY_BATCH).min(work.len()), |p| start + p);
            let step = &work[start..end];
            (step, replay_batch(conn, &keys, step).await?)
        };
        for ((d, target, _), new) in step.iter().zip(results) {
            match new {
                Some(new) => {
                    writeln!(out, "{} → {target} {new}", d.id)?;
                    *replayed.entry(target.as_str()).or_default() += 1;
                }
                None => gone += 1,
            }
        }
        start += step.len();
    }
    let left = streams::len(conn, &dlq_key).await?;
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
            skipped
                .iter()
                .map(StreamId::to_string)
                .collect::<Vec<_>>()
                .join(", ")
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
    fn colliding_names_stay_original_and_packed_fields_unpack() {
        let original: Fields = [
            ("fields", "f"),
            ("deliveries", "d"),
            ("x", "1"),
            ("x", "2"),
            ("error", "e"),
            ("stage", "s"),
            ("source_id", "i"),
            ("sqlstate", "q"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        for sqlstate in [None, Some("23514")] {
            let fields = streams::dead_letter_fields(
                original.clone(),
                "bad",
                "ingest",
                StreamId::new(1, 0),
                3,
                sqlstate,
            );
            let d = DeadLetter::from_entry(Entry::new("9-0", fields));
            assert_eq!(d.original, original);
            assert!(!d.packed);
            assert_eq!(d.added(DLQ_ERROR).as_deref(), Some("bad"));
            assert_eq!(d.added(DLQ_SQLSTATE).as_deref(), sqlstate);
            assert_eq!(d.added.len(), 4 + sqlstate.is_some() as usize);
        }
        let many: Fields = (0..1_500)
            .map(|i| (format!("f{}", i % 700), vec![i as u8, 0xff]))
            .chain(original.clone())
            .collect();
        let fields = streams::dead_letter_fields(
            many.clone(),
            "bad",
            "ingest",
            StreamId::new(1, 0),
            1,
            None,
        );
        assert_eq!(fields.len(), 5);
        let d = DeadLetter::from_entry(Entry::new("9-0", fields));
        assert!(d.packed);
        assert_eq!(d.original, many);
        let line =
            serde_json::to_value(list_line(&StreamName::parse("telemetry:{m}").unwrap(), &d))
                .unwrap();
        assert_eq!(line["packed"], true);
        assert_eq!(line["fields"].as_array().unwrap().len(), many.len());
        assert_eq!(line["error"], "bad");
    }

    #[test]
    fn rows_go_to_telemetry_frames_back_to_rows_and_times_are_kept() {
        let name = StreamName::parse("rows:{m}:dlq").unwrap();
        let row = DeadLetter::from_entry(entry(&[("value", "-1"), ("error", "x")]));
        assert_eq!(replay_target(&name, &row), "telemetry:{m}");
        let frame = DeadLetter::from_entry(entry(&[("frame", "zz"), ("error", "x")]));
        assert_eq!(replay_target(&name, &frame), "rows:{m}");
        // A partition's dead letters go back to the same partition.
        let p3 = StreamName::parse("rows:{m:3}:dlq").unwrap();
        assert_eq!(replay_target(&p3, &row), "telemetry:{m:3}");
        assert_eq!(replay_target(&p3, &frame), "rows:{m:3}");
        let t3 = StreamName::parse("telemetry:{m:3}:dlq").unwrap();
        assert_eq!(replay_target(&t3, &row), "telemetry:{m:3}");

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
        // Into a partition's telemetry too, never into another table's or a rows stream.
        assert_eq!(replay_fields("telemetry:{m:3}", Some(&schema), &d), fields);
        assert_eq!(
            replay_fields("telemetry:{other}", Some(&schema), &d),
            d.original
        );
        assert_eq!(replay_fields("rows:{m:3}", Some(&schema), &d), d.original);
        let mut packed = Vec::new();
        rmpv::encode::write_value(&mut packed, &rmpv::Value::Map(vec![("x".into(), 1.into())]))
            .unwrap();
        let d = DeadLetter {
            id: StreamId::new(1, 0),
            original: vec![("msgpack".into(), packed)],
            added: vec![("source_id".into(), b"1793491200123-4".to_vec())],
            packed: false,
        };
        let fields = replay_fields("telemetry:{m}", Some(&schema), &d);
        let v = rmpv::decode::read_value(&mut &fields[0].1[..]).unwrap();
        assert_eq!(v["t"].as_str(), Some("2026-11-01T00:00:00.123Z"));
    }
}
