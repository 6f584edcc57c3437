//! Commands on streams, consumer groups and consumers, over the pooled `redis` client: a
//! [`ConsumerGroup`] (stream and group) and a [`Consumer`] of it are small borrowed handles,
//! so no call takes a row of positional names.

use std::collections::HashMap;
use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Value};

use super::entry::{Entry, Fields, ReadSpan};
use super::id::StreamId;
use super::keys::claims_key;
use super::reply::{self, ConsumerInfo, GroupInfo, PendingEntry, PendingSummary};
use super::scripts;

/// XLEN of `stream` (0 when it does not exist).
pub async fn len<C: ConnectionLike>(conn: &mut C, stream: &str) -> RedisResult<u64> {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(super::acl::denied("XLEN", stream))
}

/// XRANGE `stream` `start` `end` COUNT `count` (`-`, `+`, an ID or a bare millisecond time).
pub async fn range<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    start: &str,
    end: &str,
    count: usize,
) -> RedisResult<Vec<Entry>> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(super::acl::denied("XRANGE", stream))?;
    Ok(reply::parse_entries(reply, 0).0)
}

/// `XINFO <sub> <stream> [<group>]`; None when the stream (or the group) does not exist. A
/// refusal names the command and the stream.
async fn xinfo<C: ConnectionLike>(
    conn: &mut C,
    sub: &str,
    stream: &str,
    group: Option<&str>,
) -> RedisResult<Option<redis::Value>> {
    let mut cmd = redis::cmd("XINFO");
    cmd.arg(sub).arg(stream);
    if let Some(group) = group {
        cmd.arg(group);
    }
    match cmd.query_async(conn).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if reply::is_no_such_key(&e) || reply::is_no_group(&e) => Ok(None),
        Err(e) => Err(super::acl::denied(&format!("XINFO {sub}"), stream)(e)),
    }
}

/// The ID of the newest entry ever added to `stream` (XINFO STREAM); None when it does not exist.
pub async fn last_generated_id<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> RedisResult<Option<StreamId>> {
    Ok(xinfo(conn, "STREAM", stream, None)
        .await?
        .and_then(reply::last_generated_id))
}

/// XINFO GROUPS of `stream`; empty when the stream does not exist.
pub async fn groups<C: ConnectionLike>(conn: &mut C, stream: &str) -> RedisResult<Vec<GroupInfo>> {
    Ok(xinfo(conn, "GROUPS", stream, None)
        .await?
        .map(reply::groups)
        .unwrap_or_default())
}

/// Trims what every group of `stream` has acknowledged (`scripts/trim.lua`): up to the oldest
/// entry some group still needs. A stream without groups is left alone. Returns the entries
/// removed.
pub async fn trim_acknowledged<C: ConnectionLike>(conn: &mut C, stream: &str) -> RedisResult<u64> {
    scripts::TRIM
        .key(stream)
        .invoke_async(conn)
        .await
        .map_err(super::acl::denied("EVALSHA trim.lua", stream))
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

/// A consumer group of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerGroup<'a> {
    /// The stream key.
    pub stream: &'a str,
    /// The group name (a stage name for strata's own groups).
    pub name: &'a str,
}

impl<'a> ConsumerGroup<'a> {
    pub const fn new(stream: &'a str, name: &'a str) -> Self {
        Self { stream, name }
    }

    /// The consumer `name` of this group.
    pub const fn consumer(self, name: &'a str) -> Consumer<'a> {
        Consumer { group: self, name }
    }

    /// Creates the group (and the stream) if missing, reading from the beginning.
    pub async fn ensure<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<()> {
        let res: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream)
            .arg(self.name)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XGROUP CREATE", self.stream));
        match res {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Plain XACK, for entries that need no forwarding (deleted while pending).
    pub async fn ack<C: ConnectionLike>(&self, conn: &mut C, ids: &[StreamId]) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        redis::cmd("XACK")
            .arg(self.stream)
            .arg(self.name)
            .arg(ids)
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XACK", self.stream))
    }

    /// The group's counters (XINFO GROUPS); None when the stream or the group is absent.
    pub async fn info<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<Option<GroupInfo>> {
        Ok(groups(conn, self.stream)
            .await?
            .into_iter()
            .find(|g| g.name == self.name))
    }

    /// True when the group has read every entry of the stream and acknowledged all it read.
    pub async fn drained<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<bool> {
        match self.info(conn).await? {
            Some(g) if g.pending == 0 => Ok(!self.has_undelivered(conn, &g).await?),
            _ => Ok(false),
        }
    }

    /// Whether the stream holds entries after `info`'s last delivered one. By IDs, not by
    /// XINFO's `lag`: after a failover, Redis 7.0's promoted replica reports a lag that never
    /// returns to 0 (its `entries-read` was not replicated), and the lag is unknown after
    /// deletions.
    pub async fn has_undelivered<C: ConnectionLike>(
        &self,
        conn: &mut C,
        info: &GroupInfo,
    ) -> RedisResult<bool> {
        if info.lag == Some(0) {
            return Ok(false);
        }
        Ok(last_generated_id(conn, self.stream)
            .await?
            .is_some_and(|last| last > info.last_delivered_id))
    }

    /// The oldest entry the group may still see again: its oldest pending entry, else its last
    /// delivered one. Every entry before it is acknowledged for good. None if the group is
    /// absent.
    pub async fn oldest_unacknowledged<C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<Option<StreamId>> {
        let Some(info) = self.info(conn).await? else {
            return Ok(None);
        };
        if info.pending == 0 {
            return Ok(Some(info.last_delivered_id));
        }
        let summary = self.pending_summary(conn).await?;
        Ok(Some(summary.smallest.unwrap_or(info.last_delivered_id)))
    }

    /// XINFO CONSUMERS; empty when the stream or the group is absent.
    pub async fn consumers<C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<Vec<ConsumerInfo>> {
        Ok(xinfo(conn, "CONSUMERS", self.stream, Some(self.name))
            .await?
            .map(reply::consumers)
            .unwrap_or_default())
    }

    /// XPENDING's summary; empty when the stream or the group is absent.
    pub async fn pending_summary<C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<PendingSummary> {
        match redis::cmd("XPENDING")
            .arg(self.stream)
            .arg(self.name)
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XPENDING", self.stream))
        {
            Ok(v) => Ok(reply::pending_summary(v)),
            Err(e) if reply::is_no_group(&e) => Ok(PendingSummary::default()),
            Err(e) => Err(e),
        }
    }

    /// The pending entry `id`, if it is pending.
    pub async fn pending_entry<C: ConnectionLike>(
        &self,
        conn: &mut C,
        id: StreamId,
    ) -> RedisResult<Option<PendingEntry>> {
        match redis::cmd("XPENDING")
            .arg(self.stream)
            .arg(self.name)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XPENDING", self.stream))
        {
            Ok(v) => Ok(reply::pending_entries(v).into_iter().next()),
            Err(e) if reply::is_no_group(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes `consumer` from the group if it owns nothing (`scripts/remove_consumer.lua`:
    /// XGROUP DELCONSUMER drops a consumer's pending entries, so it checks first, atomically).
    pub async fn remove_consumer_if_idle<C: ConnectionLike>(
        &self,
        conn: &mut C,
        consumer: &str,
    ) -> RedisResult<()> {
        let _: Value = scripts::REMOVE_CONSUMER
            .key(self.stream)
            .arg(self.name)
            .arg(consumer)
            .invoke_async(conn)
            .await
            .map_err(super::acl::denied(
                "EVALSHA remove_consumer.lua",
                self.stream,
            ))?;
        Ok(())
    }
}

/// One consumer of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer<'a> {
    pub group: ConsumerGroup<'a>,
    /// The consumer name (see [`consumer_name`]).
    pub name: &'a str,
}

/// What one XAUTOCLAIM step took.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The entries now owned by this consumer, with their delivery counts.
    pub entries: Vec<Entry>,
    /// IDs that were pending but deleted from the stream (Redis removed them from the pending
    /// list).
    pub deleted: Vec<StreamId>,
    /// Where the next step starts; [`StreamId::ZERO`] when the scan is done.
    pub next: StreamId,
}

impl<'a> Consumer<'a> {
    pub const fn new(stream: &'a str, group: &'a str, name: &'a str) -> Self {
        ConsumerGroup::new(stream, group).consumer(name)
    }

    /// XREADGROUP of new entries (`>`), blocking up to `block_ms`; also the IDs the reply had
    /// no fields for. The stage loops read through [`super::ReadConnection`] instead.
    pub async fn read_new<C: ConnectionLike>(
        &self,
        conn: &mut C,
        count: usize,
        block_ms: u64,
    ) -> RedisResult<(Vec<Entry>, Vec<StreamId>)> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(self.group.name)
            .arg(self.name)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(self.group.stream)
            .arg(">")
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XREADGROUP", self.group.stream))?;
        // [[stream, entries]] or nil on timeout
        let mut out = (Vec::new(), Vec::new());
        let Value::Array(streams) = reply else {
            return Ok(out);
        };
        for s in streams {
            if let Value::Array(mut kv) = s {
                if let Some(entries) = kv.pop() {
                    let (e, d) = reply::parse_entries(entries, 1);
                    out.0.extend(e);
                    out.1.extend(d);
                }
            }
        }
        Ok(out)
    }

    /// One XAUTOCLAIM step from `cursor` (`scripts/claim.lua`): entries idle longer than
    /// `min_idle_ms` move to this consumer, with their delivery counts.
    ///
    /// The script records, in the same atomic step, whose entries it took (in
    /// [`claims_key`]), this consumer's own included: an entry it takes back from itself (idle
    /// after a Redis restart or a long stall) may still be in flight here, and only the
    /// per-entry check of the commit step keeps the two copies from both being forwarded.
    /// XAUTOCLAIM looks at no more than 10 × COUNT pending entries from the cursor, so the idle
    /// entries among the first 10 × COUNT are all it can take. The claims hash is checked
    /// first, so a step never claims entries it then fails to record.
    pub async fn autoclaim<C: ConnectionLike>(
        &self,
        conn: &mut C,
        min_idle_ms: u64,
        cursor: StreamId,
        count: usize,
    ) -> RedisResult<Claimed> {
        let stream = self.group.stream;
        let reply: Value = scripts::CLAIM
            .key(stream)
            .key(claims_key(stream))
            .arg(self.group.name)
            .arg(self.name)
            .arg(min_idle_ms)
            .arg(cursor)
            .arg(count)
            .invoke_async(conn)
            .await
            .map_err(super::acl::denied("EVALSHA claim.lua", stream))?;
        let Value::Array(mut parts) = reply else {
            return Ok(Claimed::default());
        };
        parts.truncate(2);
        let entries = parts.pop().unwrap_or(Value::Nil);
        let next = parts.pop().and_then(reply::stream_id).unwrap_or_default();
        let (mut entries, deleted) = reply::parse_entries(entries, 0);
        if !entries.is_empty() {
            let counts = self.delivery_counts(conn, &entries).await?;
            for e in &mut entries {
                e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
            }
        }
        Ok(Claimed {
            entries,
            deleted,
            next,
        })
    }

    /// How often each of `entries` (in ID order, owned by this consumer) was delivered.
    async fn delivery_counts<C: ConnectionLike>(
        &self,
        conn: &mut C,
        entries: &[Entry],
    ) -> RedisResult<HashMap<StreamId, u64>> {
        let reply: Value = redis::cmd("XPENDING")
            .arg(self.group.stream)
            .arg(self.group.name)
            .arg(entries[0].id)
            .arg(entries[entries.len() - 1].id)
            .arg(entries.len() * 2)
            .arg(self.name)
            .query_async(conn)
            .await
            .map_err(super::acl::denied("XPENDING", self.group.stream))?;
        Ok(reply::pending_entries(reply)
            .into_iter()
            .map(|p| (p.id, p.deliveries))
            .collect())
    }

    /// Resets the idle time of the entries this consumer owns within `spans`
    /// (`scripts/touch.lua`: XCLAIM … JUSTID, which does not count a delivery), so entries held
    /// through a long retry are not claimed by anyone else. Only the spans of reads still in
    /// flight are given: an entry whose read reply was lost (the connection dropped) is owned
    /// but never arrived, and must become idle so a claim delivers it again. Returns how many
    /// were touched.
    pub async fn touch<C: ConnectionLike>(
        &self,
        conn: &mut C,
        spans: &[Arc<ReadSpan>],
    ) -> RedisResult<u64> {
        if spans.is_empty() {
            return Ok(0);
        }
        let mut inv = scripts::TOUCH.prepare_invoke();
        inv.key(self.group.stream)
            .arg(self.group.name)
            .arg(self.name);
        for s in spans {
            inv.arg(s.first).arg(s.last);
        }
        inv.invoke_async(conn)
            .await
            .map_err(super::acl::denied("EVALSHA touch.lua", self.group.stream))
    }

    /// [`Self::touch`] followed by `WAIT` in the same round trip on the stream's node: the
    /// touch is a write (XCLAIM), so once `wait.replicas` replicas acknowledge it they hold
    /// everything the node had before it, the entries this consumer read included. Replies how
    /// many entries were touched and how many replicas acknowledged. (A WAIT right after
    /// XREADGROUP is not enough: Redis 7.0 does not count a blocked XREADGROUP served later as
    /// the connection's write.)
    pub async fn touch_then_wait<C: ConnectionLike>(
        &self,
        conn: &mut C,
        spans: &[Arc<ReadSpan>],
        wait: crate::db::ReplicaWait,
    ) -> RedisResult<(u64, u64)> {
        let mut inv = scripts::TOUCH.prepare_invoke();
        inv.key(self.group.stream)
            .arg(self.group.name)
            .arg(self.name);
        for s in spans {
            inv.arg(s.first).arg(s.last);
        }
        let (touched, acked) = scripts::invoke_then_wait(conn, &inv, Some(wait))
            .await
            .map_err(super::acl::denied("EVALSHA touch.lua", self.group.stream))?;
        let touched = match touched {
            Value::Int(n) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        };
        Ok((touched, acked.unwrap_or(0)))
    }

    /// Removes this consumer from its group if it owns nothing.
    pub async fn remove_if_idle<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<()> {
        self.group.remove_consumer_if_idle(conn, self.name).await
    }
}

/// What one atomic commit step writes: checks `consumer` still owns every entry, then XADDs
/// the outputs and the dead letters and XACKs the entries. If any entry has moved to another
/// consumer, nothing is written and the moved IDs are returned. All or nothing: limits (fields
/// per entry, key types, IDs) are checked before the first write, and a write that fails
/// anyway is undone (see `scripts/commit.lua` and [`scripts::ScriptFailure`]).
///
/// Entries move between consumers only through [`Consumer::autoclaim`], which records the
/// consumers it took from in the claims hash; a consumer not recorded there still owns
/// everything it read, so the per-entry check (most of the step's cost) runs only for
/// consumers that lost entries, and for a retried step (`verify`), whose first attempt may have
/// been applied with its reply lost: then the entries are no longer pending and nothing is
/// written twice.
pub struct CommitStep<'a> {
    /// The consumer whose ownership is checked; its group's stream is the stage's input, whose
    /// entries are acknowledged.
    pub consumer: Consumer<'a>,
    /// Where forwarded entries go (ignored when `forward` is empty).
    pub output: &'a str,
    /// The input's dead-letter stream.
    pub dlq: &'a str,
    /// Entry IDs to acknowledge.
    pub ids: Vec<StreamId>,
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
    /// was written). An error whose [`scripts::ScriptFailure::of`] is `Some` left nothing
    /// written (except [`scripts::ScriptFailure::Partial`]); any other error may have been
    /// applied with its reply lost, so retry with `verify` set.
    pub async fn run<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<Vec<StreamId>> {
        self.run_then_wait(conn, None).await.map(|(lost, _)| lost)
    }

    /// [`Self::run`] and, with `wait`, `WAIT` in the same round trip on the node that ran it
    /// (`[redis] wait_replicas`): also replies how many replicas acknowledged the step's writes
    /// (`None` without `wait`).
    pub async fn run_then_wait<C: ConnectionLike>(
        &self,
        conn: &mut C,
        wait: Option<crate::db::ReplicaWait>,
    ) -> RedisResult<(Vec<StreamId>, Option<u64>)> {
        let input = self.consumer.group.stream;
        let mut inv = scripts::COMMIT.prepare_invoke();
        inv.key(input)
            .key(self.output)
            .key(self.dlq)
            .key(claims_key(input));
        // The batch's smallest and largest ID (entries may be out of order after a claim or a
        // split).
        let lo = self.ids.iter().min().copied().unwrap_or_default();
        let hi = self.ids.iter().max().copied().unwrap_or_default();
        inv.arg(self.consumer.group.name)
            .arg(self.consumer.name)
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
        let (reply, acked) = scripts::invoke_then_wait(conn, &inv, wait)
            .await
            .map_err(|e| {
                let keys = [input, self.output, self.dlq].join("`, `");
                super::acl::denied("EVALSHA commit.lua", &keys)(e)
            })?;
        let Value::Array(items) = reply else {
            return Ok((Vec::new(), acked));
        };
        Ok((
            items.into_iter().filter_map(reply::stream_id).collect(),
            acked,
        ))
    }
}
