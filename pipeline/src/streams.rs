//! Every Redis Streams call strata makes: key names, consumer groups, reading, claiming, and the
//! one atomic step that forwards a stage's output, dead-letters, and acknowledges.

use std::collections::HashMap;

use redis::Value;

/// Consumer-group names, which are also the stage names in dead letters, logs and metrics.
pub const INGEST: &str = "ingest";
pub const BATCH_WRITER: &str = "batch-writer";
pub const CHUNK_WATCHER: &str = "chunk-watcher";
pub const ARCHIVER: &str = "archiver";
pub const CONFIRMER: &str = "confirmer";

/// Dead-letter field added to the original fields of a rejected entry: why it was rejected.
pub const DLQ_ERROR: &str = "error";
/// Dead-letter field: the stage (consumer group) that rejected it.
pub const DLQ_STAGE: &str = "stage";
/// Dead-letter field: the rejected entry's ID in its stream.
pub const DLQ_SOURCE_ID: &str = "source_id";
/// Dead-letter field: how many times the entry had been delivered.
pub const DLQ_DELIVERIES: &str = "deliveries";
/// Dead-letter field: the SQLSTATE, for rows PostgreSQL refused.
pub const DLQ_SQLSTATE: &str = "sqlstate";
/// Dead-letter field holding the original fields packed (see [`dead_letter_fields`]).
pub const DLQ_PACKED: &str = "fields";

/// A rejected entry with more field pairs than this is dead-lettered with its fields packed
/// into one field [`DLQ_PACKED`], so every dead letter stays well within what one XADD from a
/// script can write ([`MAX_SCRIPT_FIELDS`]).
pub const DLQ_PACK_THRESHOLD: usize = 1_000;

/// The most values strata's scripts pass to one `redis.call` (command name included). Lua in
/// Redis refuses more than about 8,000 (LUAI_MAXCSTACK: "too many results to unpack").
pub const MAX_SCRIPT_CALL_ARGS: usize = 7_900;

/// The most field pairs of one entry a script can XADD (`XADD key * f v …`).
pub const MAX_SCRIPT_FIELDS: usize = (MAX_SCRIPT_CALL_ARGS - 3) / 2;

/// Error code of a script step refused before any write because it exceeds a script limit or
/// its arguments are malformed (an entry without fields or with more than
/// [`MAX_SCRIPT_FIELDS`], an invalid ID). Not transient: the same step is refused again.
pub const ERR_LIMIT: &str = "STRATA_LIMIT";
/// Error code of a script step refused before any write because a key it writes exists and is
/// not a stream. Not transient until an operator removes or renames the key.
pub const ERR_WRONGTYPE: &str = "STRATA_WRONGTYPE";
/// Error code of a script step in which a write failed: every entry it had added was deleted
/// again and nothing was acknowledged or removed, so it may be retried as it is. Whether a
/// retry can succeed depends on Redis's error, which follows the code.
pub const ERR_ROLLBACK: &str = "STRATA_ROLLBACK";
/// Error code of a commit step whose second or later XACK failed after an earlier one
/// succeeded (every ID is checked first, so this is not expected to happen): the outputs stay,
/// some entries are acknowledged. Not transient; nothing can be undone.
pub const ERR_PARTIAL: &str = "STRATA_PARTIAL";

/// Why one of strata's scripts refused or undid a step, from its reply's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptFailure {
    /// [`ERR_LIMIT`]: refused, nothing written.
    Limit,
    /// [`ERR_WRONGTYPE`]: refused, nothing written.
    WrongType,
    /// [`ERR_ROLLBACK`]: a write failed and was undone; nothing remains of the step.
    RolledBack,
    /// [`ERR_PARTIAL`]: partly applied.
    Partial,
}

impl ScriptFailure {
    /// Every failure, for lookups by code.
    pub const ALL: [ScriptFailure; 4] = [
        ScriptFailure::Limit,
        ScriptFailure::WrongType,
        ScriptFailure::RolledBack,
        ScriptFailure::Partial,
    ];

    /// The error code the scripts reply with.
    pub const fn code(self) -> &'static str {
        match self {
            ScriptFailure::Limit => ERR_LIMIT,
            ScriptFailure::WrongType => ERR_WRONGTYPE,
            ScriptFailure::RolledBack => ERR_ROLLBACK,
            ScriptFailure::Partial => ERR_PARTIAL,
        }
    }

    /// The failure a script's error reply reports, by its code; None for any other error.
    pub fn of(err: &redis::RedisError) -> Option<ScriptFailure> {
        let code = err.code()?;
        Self::ALL.into_iter().find(|f| f.code() == code)
    }
}

/// The Lua source of a strata script: `body` after the shared prelude (the error codes and
/// [`MAX_SCRIPT_CALL_ARGS`] as locals, and helpers `refuse`, `err_text`, `not_a_stream`,
/// `valid_id`; see `scripts/prelude.lua`).
pub fn script_source(body: &str) -> String {
    let transient: Vec<String> = crate::error::REDIS_TRANSIENT_CODES
        .iter()
        .map(|c| format!("['{c}'] = true"))
        .collect();
    format!(
        "local E_LIMIT, E_WRONGTYPE, E_ROLLBACK, E_PARTIAL, MAX_ARGS = '{ERR_LIMIT}', '{ERR_WRONGTYPE}', '{ERR_ROLLBACK}', '{ERR_PARTIAL}', {MAX_SCRIPT_CALL_ARGS}\nlocal TRANSIENT = {{{}}}\n{}\n{body}",
        transient.join(", "),
        include_str!("scripts/prelude.lua")
    )
}

/// A strata script: `body` after the shared prelude (see [`script_source`]).
pub fn script(body: &str) -> redis::Script {
    redis::Script::new(&script_source(body))
}

/// The fields of a dead letter: the rejected entry's `original` fields, then `error`, `stage`,
/// `source_id`, `deliveries` and (when given) `sqlstate`, in that order, always last.
///
/// With more than [`DLQ_PACK_THRESHOLD`] original pairs, or when the original is exactly one
/// field named [`DLQ_PACKED`] (which would otherwise read as packed), the original fields are
/// packed into one field [`DLQ_PACKED`] (see [`pack_fields`]); `strata dlq` unpacks them.
pub fn dead_letter_fields(
    original: Fields,
    error: &str,
    stage: &str,
    source_id: &str,
    deliveries: u64,
    sqlstate: Option<&str>,
) -> Fields {
    let pack =
        original.len() > DLQ_PACK_THRESHOLD || (original.len() == 1 && original[0].0 == DLQ_PACKED);
    let mut fields = if pack {
        vec![(DLQ_PACKED.to_string(), pack_fields(&original))]
    } else {
        original
    };
    fields.reserve(5);
    fields.push((DLQ_ERROR.into(), error.as_bytes().to_vec()));
    fields.push((DLQ_STAGE.into(), stage.as_bytes().to_vec()));
    fields.push((DLQ_SOURCE_ID.into(), source_id.as_bytes().to_vec()));
    fields.push((DLQ_DELIVERIES.into(), deliveries.to_string().into_bytes()));
    if let Some(code) = sqlstate {
        fields.push((DLQ_SQLSTATE.into(), code.as_bytes().to_vec()));
    }
    fields
}

/// Fields packed as one MessagePack value: an array of `[name, value]` arrays, both binary
/// (bin 8/16/32), in order, duplicates kept.
pub fn pack_fields(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 11).sum();
    let mut buf = Vec::with_capacity(size + 5);
    rmp::encode::write_array_len(&mut buf, fields.len() as u32).expect("vec write");
    for (k, v) in fields {
        rmp::encode::write_array_len(&mut buf, 2).expect("vec write");
        rmp::encode::write_bin(&mut buf, k.as_bytes()).expect("vec write");
        rmp::encode::write_bin(&mut buf, v).expect("vec write");
    }
    buf
}

/// The fields [`pack_fields`] packed; None unless `packed` is exactly such an array (names
/// and values binary or text, names UTF-8) with nothing after it.
pub fn unpack_fields(packed: &[u8]) -> Option<Fields> {
    let mut rd = packed;
    let value =
        rmpv::decode::read_value_with_max_depth(&mut rd, crate::pg_limits::MSGPACK_MAX_DEPTH)
            .ok()?;
    if !rd.is_empty() {
        return None;
    }
    let rmpv::Value::Array(items) = value else {
        return None;
    };
    let bytes = |v: rmpv::Value| match v {
        rmpv::Value::Binary(b) => Some(b),
        rmpv::Value::String(s) => Some(s.into_bytes()),
        _ => None,
    };
    items
        .into_iter()
        .map(|item| {
            let rmpv::Value::Array(pair) = item else {
                return None;
            };
            let [k, v]: [rmpv::Value; 2] = pair.try_into().ok()?;
            Some((String::from_utf8(bytes(k)?).ok()?, bytes(v)?))
        })
        .collect()
}

/// The stream producers XADD to for table `table`. The braces are a Redis Cluster hash tag.
pub fn telemetry_stream(table: &str) -> String {
    format!("telemetry:{{{table}}}")
}

/// The stream of validated frames between ingest and batch-writer.
pub fn rows_stream(table: &str) -> String {
    format!("rows:{{{table}}}")
}

/// One archival event per closed chunk, from chunk-watcher to archiver.
pub fn archive_stream(table: &str) -> String {
    format!("archive:{{{table}}}")
}

/// One confirmation per archived chunk, from archiver to confirmer.
pub fn archived_stream(table: &str) -> String {
    format!("archived:{{{table}}}")
}

/// The dead-letter stream of `stream`.
pub fn dlq_stream(stream: &str) -> String {
    format!("{stream}:dlq")
}

/// The hash recording, per `<group> <consumer>`, how many of the consumer's entries were claimed
/// (by another consumer of `stream`, or back by itself). A consumer listed there checks, when it commits, that it
/// still owns each entry; one not listed has had nothing taken (see [`autoclaim`]). A record
/// outlives its consumer's removal from the group, so a process that stalled past
/// `forget_consumer_after_ms` and wakes up still checks; names are unique per process start,
/// so the hash grows by one field per process that ever lost entries.
pub fn claims_key(stream: &str) -> String {
    format!("{stream}:claimed")
}

/// A field list to write to a stream, in order.
pub type Fields = Vec<(String, Vec<u8>)>;

pub use crate::resp::RawFields;

/// The smallest and largest ID of one read: while any entry of it is unacknowledged, the
/// consumer's entries in that range are kept from looking idle (see [`touch`]).
#[derive(Debug)]
pub struct ReadSpan {
    pub first: String,
    pub last: String,
}

/// The read an entry came in, kept alive by its entries: when the last one is dropped (its
/// batch committed), the span stops being touched. Entries that were not read by a stage loop
/// hold none.
#[derive(Debug, Clone, Default)]
pub struct Held(pub Option<std::sync::Arc<ReadSpan>>);

/// One stream entry as delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The stream ID (`<ms>-<seq>`).
    pub id: String,
    /// The fields as the producer sent them.
    pub fields: RawFields,
    /// How many times the group has delivered this entry (1 on first read).
    pub deliveries: u64,
    /// The read it came in, while that read is in flight.
    pub held: Held,
}

impl Entry {
    /// The milliseconds part of the ID: when the entry was added.
    pub fn ms(&self) -> u64 {
        self.id
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// An entry built from name/value pairs (tests, tools).
    pub fn new<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        id: impl Into<String>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            id: id.into(),
            fields: RawFields::from_pairs(fields),
            deliveries: 1,
            held: Held::default(),
        }
    }

    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name)
    }

    /// Field names plus values in bytes.
    pub fn size(&self) -> usize {
        self.fields.size()
    }
}

/// Parses `[[id, [f, v, …]], …]` into entries; entries whose fields are nil (deleted while
/// pending) come back in the second list.
pub fn parse_entries(value: Value, deliveries: u64) -> (Vec<Entry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut deleted = Vec::new();
    let Value::Array(items) = value else {
        return (entries, deleted);
    };
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let Some(id) = pair.pop().and_then(bulk_string) else {
            continue;
        };
        match fields {
            Some(Value::Array(flat)) => {
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Some(k), Some(v)) = (bulk_bytes(k), bulk_bytes(v)) {
                        pairs.push((k, v));
                    }
                }
                entries.push(Entry {
                    id,
                    fields: RawFields::from_pairs(pairs),
                    deliveries,
                    held: Held::default(),
                });
            }
            _ => deleted.push(id),
        }
    }
    (entries, deleted)
}

/// A reply of field/value pairs (a flat RESP2 array or a RESP3 map) as pairs.
fn field_pairs(v: Value) -> Option<Vec<(Value, Value)>> {
    match v {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(val)) = (it.next(), it.next()) {
                pairs.push((k, val));
            }
            Some(pairs)
        }
        Value::Map(m) => Some(m),
        _ => None,
    }
}

fn bulk_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn bulk_string(v: Value) -> Option<String> {
    bulk_bytes(v).map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// Creates `group` on `stream` (and the stream) if missing, reading from the beginning.
pub async fn ensure_group<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> redis::RedisResult<()> {
    let res: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match res {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// XREADGROUP of new entries (`>`), blocking up to `block_ms`.
pub async fn read_new<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block_ms: u64,
) -> redis::RedisResult<(Vec<Entry>, Vec<String>)> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    // [[stream, entries]] or nil on timeout
    let Value::Array(streams) = reply else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut out = (Vec::new(), Vec::new());
    for s in streams {
        if let Value::Array(mut kv) = s {
            if let Some(entries) = kv.pop() {
                let (e, d) = parse_entries(entries, 1);
                out.0.extend(e);
                out.1.extend(d);
            }
        }
    }
    Ok(out)
}

/// XAUTOCLAIM that records, in the same atomic step, whose entries it took (in [`claims_key`]),
/// its own consumer's included: an entry it takes back from itself (idle after a Redis restart
/// or a long stall) may still be in flight there, and only the per-entry check keeps the two
/// copies from both being forwarded.
/// XAUTOCLAIM looks at no more than 10 × COUNT pending entries from the cursor, so the idle
/// entries among the first 10 × COUNT are all it can take.
/// The claims hash is checked first, so a step never claims entries it then fails to record.
const CLAIM_SCRIPT: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'hash' and t ~= 'none' then return refuse(E_WRONGTYPE, KEYS[2] .. ' is a ' .. t .. ', not a hash') end
local owner = {}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], group, 'IDLE', ARGV[3], ARGV[4], '+', 10 * tonumber(ARGV[5]))) do
  owner[e[1]] = e[2]
end
local reply = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local taken = {}
for _, e in ipairs(reply[2]) do
  local from = type(e) == 'table' and owner[e[1]]
  if from then taken[from] = (taken[from] or 0) + 1 end
end
for from, n in pairs(taken) do
  redis.call('HINCRBY', KEYS[2], group .. ' ' .. from, n)
end
return reply
"#;

static CLAIM: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| script(CLAIM_SCRIPT));

/// One XAUTOCLAIM step: entries idle longer than `min_idle_ms` move to `consumer`, with their
/// delivery counts. Returns the claimed entries, IDs deleted while pending (already removed
/// from the pending list by Redis), and the cursor for the next call (`0-0` when done).
pub async fn autoclaim<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    cursor: &str,
    count: usize,
) -> redis::RedisResult<(Vec<Entry>, Vec<String>, String)> {
    let reply: Value = CLAIM
        .key(stream)
        .key(claims_key(stream))
        .arg(group)
        .arg(consumer)
        .arg(min_idle_ms)
        .arg(cursor)
        .arg(count)
        .invoke_async(conn)
        .await?;
    let Value::Array(mut parts) = reply else {
        return Ok((Vec::new(), Vec::new(), "0-0".into()));
    };
    parts.truncate(2);
    let entries = parts.pop().unwrap_or(Value::Nil);
    let next = parts
        .pop()
        .and_then(bulk_string)
        .unwrap_or_else(|| "0-0".into());
    let (mut entries, deleted) = parse_entries(entries, 0);
    if !entries.is_empty() {
        let counts = delivery_counts(conn, stream, group, consumer, &entries).await?;
        for e in &mut entries {
            e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
        }
    }
    Ok((entries, deleted, next))
}

async fn delivery_counts<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    entries: &[Entry],
) -> redis::RedisResult<HashMap<String, u64>> {
    let first = &entries[0].id;
    let last = &entries[entries.len() - 1].id;
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(first)
        .arg(last)
        .arg(entries.len() * 2)
        .arg(consumer)
        .query_async(conn)
        .await?;
    let mut counts = HashMap::new();
    if let Value::Array(rows) = reply {
        for row in rows {
            if let Value::Array(mut cols) = row {
                if cols.len() == 4 {
                    let n = match cols.pop() {
                        Some(Value::Int(n)) => n as u64,
                        _ => 1,
                    };
                    if let Some(id) = cols.into_iter().next().and_then(bulk_string) {
                        counts.insert(id, n);
                    }
                }
            }
        }
    }
    Ok(counts)
}

/// Plain XACK, for entries that need no forwarding (deleted while pending).
pub async fn ack<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    ids: &[String],
) -> redis::RedisResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
}

/// The atomic step: checks this consumer still owns every entry, then XADDs the outputs and the
/// dead letters and XACKs the entries. If any entry has moved to another consumer, nothing is
/// written and the moved IDs are returned. All or nothing: limits (fields per entry, key types,
/// IDs) are checked before the first write, and a write that fails anyway is undone (see
/// `scripts/commit.lua` and [`ScriptFailure`]).
///
/// Entries move between consumers only through [`autoclaim`], which records the consumers it
/// took from in KEYS[4]; a consumer not recorded there still owns everything it read, so the
/// per-entry check (most of the step's cost) runs only for consumers that lost entries, and for
/// a retried step (`verify`), whose first attempt may have been applied with its reply lost:
/// then the entries are no longer pending and nothing is written twice.
static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| script(include_str!("scripts/commit.lua")));

/// What one atomic commit step writes.
pub struct CommitStep<'a> {
    /// The stage's input stream, whose entries are acknowledged.
    pub input: &'a str,
    /// Where forwarded entries go (ignored when `forward` is empty).
    pub output: &'a str,
    /// The input's dead-letter stream.
    pub dlq: &'a str,
    /// The consumer group (the stage name).
    pub group: &'a str,
    /// This process's consumer name, whose ownership is checked.
    pub consumer: &'a str,
    /// Entry IDs to acknowledge.
    pub ids: Vec<&'a str>,
    /// Entries to add to `output`.
    pub forward: Vec<Fields>,
    /// Entries to add to `dlq`.
    pub dead_letters: Vec<Fields>,
    /// Check every entry is still owned even if this consumer never lost one to a claim: set
    /// when retrying a step whose earlier attempt may have been applied.
    pub verify: bool,
}

impl CommitStep<'_> {
    /// Runs the step; `Ok(lost)` lists entries that another consumer owns now (then nothing
    /// was written). An error whose [`ScriptFailure::of`] is `Some` left nothing written
    /// (except [`ScriptFailure::Partial`]); any other error may have been applied with its
    /// reply lost, so retry with `verify` set.
    pub async fn run<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> redis::RedisResult<Vec<String>> {
        let mut inv = SCRIPT.prepare_invoke();
        inv.key(self.input)
            .key(self.output)
            .key(self.dlq)
            .key(claims_key(self.input));
        // The batch's smallest and largest ID (entries may be out of order after a claim or a
        // split).
        let ids = self.ids.iter().copied();
        let lo = ids.clone().min_by_key(|id| id_order(id)).unwrap_or("0-0");
        let hi = ids.max_by_key(|id| id_order(id)).unwrap_or("0-0");
        inv.arg(self.group)
            .arg(self.consumer)
            .arg(lo)
            .arg(hi)
            .arg(self.ids.len())
            .arg(if self.verify { "1" } else { "0" });
        for id in &self.ids {
            inv.arg(*id);
        }
        for list in [&self.forward, &self.dead_letters] {
            inv.arg(list.len());
            for fields in list {
                inv.arg(fields.len());
                for (k, v) in fields {
                    inv.arg(k.as_str()).arg(v.as_slice());
                }
            }
        }
        let reply: Value = inv.invoke_async(conn).await?;
        let Value::Array(items) = reply else {
            return Ok(Vec::new());
        };
        Ok(items.into_iter().filter_map(bulk_string).collect())
    }
}

/// Consumer-group counters of one stream, from XINFO GROUPS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered (None when Redis cannot tell, after deletions).
    pub lag: Option<u64>,
    pub consumers: u64,
    pub last_delivered_id: String,
}

/// XINFO GROUPS of `stream`; empty when the stream does not exist.
pub async fn groups<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> redis::RedisResult<Vec<GroupInfo>> {
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    let reply = match reply {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let Value::Array(groups) = reply else {
        return Ok(out);
    };
    for g in groups {
        let mut info = GroupInfo::default();
        let Some(pairs) = field_pairs(g) else {
            continue;
        };
        for (k, v) in pairs {
            let key = bulk_string(k).unwrap_or_default();
            let int = |v: &Value| match v {
                Value::Int(n) => Some(*n as u64),
                _ => None,
            };
            match key.as_str() {
                "name" => info.name = bulk_string(v).unwrap_or_default(),
                "pending" => info.pending = int(&v).unwrap_or(0),
                "lag" => info.lag = int(&v),
                "consumers" => info.consumers = int(&v).unwrap_or(0),
                "last-delivered-id" => info.last_delivered_id = bulk_string(v).unwrap_or_default(),
                _ => {}
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// True when `group` has read every entry of `stream` and acknowledged all it read.
pub async fn drained<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> redis::RedisResult<bool> {
    Ok(groups(conn, stream)
        .await?
        .iter()
        .find(|g| g.name == group)
        .is_some_and(|g| g.pending == 0 && g.lag == Some(0)))
}

/// Removes this consumer from the group if it owns nothing.
pub async fn remove_consumer_if_idle<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
) -> redis::RedisResult<()> {
    // XGROUP DELCONSUMER drops the consumer's pending entries, so check first, atomically.
    let script = redis::Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
"#,
    );
    let _: Value = script
        .key(stream)
        .arg(group)
        .arg(consumer)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// A consumer name unique to this process: host, PID and a random suffix.
pub fn consumer_name(stage: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!(
        "{stage}-{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Resets the idle time of the entries this consumer owns within the given ID ranges (XCLAIM …
/// JUSTID, which does not count a delivery), so entries held through a long retry are not
/// claimed by anyone else. Only the ranges of reads still in flight are given: an entry whose
/// read reply was lost (the connection dropped) is owned but never arrived, and must become
/// idle so a claim delivers it again.
const TOUCH_SCRIPT: &str = r#"
local n = 0
for i = 3, #ARGV, 2 do
  local start = ARGV[i]
  while true do
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], start, ARGV[i + 1], 4000, ARGV[2])
    if #p == 0 then break end
    local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
    for _, e in ipairs(p) do args[#args + 1] = e[1] end
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    n = n + #p
    if #p < 4000 then break end
    start = '(' .. p[#p][1]
  end
end
return n
"#;

static TOUCH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TOUCH_SCRIPT));

/// Keeps the entries `consumer` owns within `spans` from looking idle; returns how many were
/// touched.
pub async fn touch<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    spans: &[std::sync::Arc<ReadSpan>],
) -> redis::RedisResult<u64> {
    if spans.is_empty() {
        return Ok(0);
    }
    let mut inv = TOUCH.prepare_invoke();
    inv.key(stream).arg(group).arg(consumer);
    for s in spans {
        inv.arg(s.first.as_str()).arg(s.last.as_str());
    }
    inv.invoke_async(conn).await
}

/// An entry ID's order: milliseconds, then sequence.
pub fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Trims `stream` up to the oldest entry some group still needs: its oldest pending entry, or,
/// with nothing pending, its last delivered one (entries after it are not yet delivered). A
/// stream without groups is left alone. Atomic, so no group moves while it decides.
const TRIM_SCRIPT: &str = r#"
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return 0 end
local function less(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local min = nil
for _, g in ipairs(groups) do
  local name, pending, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local keep = last
  if pending > 0 then keep = redis.call('XPENDING', KEYS[1], name)[2] end
  if min == nil or less(keep, min) then min = keep end
end
return redis.call('XTRIM', KEYS[1], 'MINID', min)
"#;

static TRIM: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TRIM_SCRIPT));

/// Trims what every group of `stream` has acknowledged; returns the entries removed.
pub async fn trim_acknowledged<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> redis::RedisResult<u64> {
    TRIM.key(stream).invoke_async(conn).await
}

/// The oldest entry `group` may still see again: its oldest pending entry, else its last
/// delivered one. Every entry before it is acknowledged for good. None if the group is absent.
pub async fn oldest_unacknowledged<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Option<String>> {
    let Some(info) = groups(conn, stream)
        .await?
        .into_iter()
        .find(|g| g.name == group)
    else {
        return Ok(None);
    };
    if info.pending == 0 {
        return Ok(Some(info.last_delivered_id));
    }
    let summary: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    let Value::Array(mut parts) = summary else {
        return Ok(Some(info.last_delivered_id));
    };
    parts.truncate(2);
    Ok(parts
        .pop()
        .and_then(bulk_string)
        .or(Some(info.last_delivered_id)))
}

/// One consumer of a group, from XINFO CONSUMERS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last read or claimed.
    pub idle_ms: u64,
}

/// XINFO CONSUMERS of `group` on `stream`.
pub async fn consumers<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Vec<ConsumerInfo>> {
    let reply: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    let Value::Array(list) = reply else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for c in list {
        let Some(pairs) = field_pairs(c) else {
            continue;
        };
        let mut info = ConsumerInfo {
            name: String::new(),
            pending: 0,
            idle_ms: 0,
        };
        for (k, v) in pairs {
            let n = match &v {
                Value::Int(n) => *n as u64,
                _ => 0,
            };
            match bulk_string(k).as_deref() {
                Some("name") => info.name = bulk_string(v).unwrap_or_default(),
                Some("pending") => info.pending = n,
                Some("idle") => info.idle_ms = n,
                _ => {}
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// XLEN of `stream` (0 when it does not exist).
pub async fn len<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> redis::RedisResult<u64> {
    redis::cmd("XLEN").arg(stream).query_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn dead_letter_fields_keep_few_originals_and_add_strata_fields_last() {
        let original = fields(&[("error", b"mine"), ("v", b"\x00\xff"), ("v", b"2")]);
        let got = dead_letter_fields(original.clone(), "bad", INGEST, "5-1", 2, Some("23514"));
        let mut want = original;
        want.extend(fields(&[
            (DLQ_ERROR, b"bad"),
            (DLQ_STAGE, b"ingest"),
            (DLQ_SOURCE_ID, b"5-1"),
            (DLQ_DELIVERIES, b"2"),
            (DLQ_SQLSTATE, b"23514"),
        ]));
        assert_eq!(got, want);
        let at_threshold: Fields = (0..DLQ_PACK_THRESHOLD)
            .map(|i| (format!("f{i}"), vec![1]))
            .collect();
        let got = dead_letter_fields(at_threshold, "e", INGEST, "1-0", 1, None);
        assert_eq!(got.len(), DLQ_PACK_THRESHOLD + 4);
    }

    #[test]
    fn many_fields_are_packed_in_order_with_duplicates() {
        let original: Fields = (0..5_000)
            .map(|i| (format!("f{}", i % 3_000), vec![(i % 256) as u8; i % 5]))
            .collect();
        let got = dead_letter_fields(original.clone(), "e", BATCH_WRITER, "1-0", 7, None);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                DLQ_PACKED,
                DLQ_ERROR,
                DLQ_STAGE,
                DLQ_SOURCE_ID,
                DLQ_DELIVERIES
            ]
        );
        assert_eq!(unpack_fields(&got[0].1), Some(original));
        // A lone original field named like the packed one is packed too, so it reads back.
        let lone = fields(&[(DLQ_PACKED, b"\x90")]);
        let got = dead_letter_fields(lone.clone(), "e", INGEST, "1-0", 1, None);
        assert_eq!(unpack_fields(&got[0].1), Some(lone));
        assert_eq!(unpack_fields(b"\x90\x00"), None, "trailing bytes");
        assert_eq!(unpack_fields(b"\x91\x91\xc4\x00"), None, "not a pair");
    }

    #[test]
    fn script_failures_are_classified_by_code() {
        for f in ScriptFailure::ALL {
            let e = redis::make_extension_error(f.code().to_string(), Some("detail".into()));
            assert_eq!(ScriptFailure::of(&e), Some(f));
        }
        assert_eq!(MAX_SCRIPT_FIELDS, 3_948);
    }
}
