//! `strata.chunks`, the lifecycle table, and the chunk state machine: the only module that
//! writes to it.
//!
//! One row per chunk incarnation, moved along by the three stages:
//!
//! ```text
//!                 record (watcher)
//!                        │
//!                        ▼
//!   ┌──────────────▶ pending ──begin_archiving──▶ archiving ──mark_archived──▶ archived ──mark_verified──▶ verified ──mark_dropped──▶ dropped
//!   │                 │  ▲                         │   ▲ begin_archiving          │                          │
//!   │                 │  └───────────────────────── send_back_to_pending ◀────────┴──────────────────────────┘
//!   │                 │                            │     (a check failed, or rows arrived late; new event id)
//!   │                 └────────mark_failed─────────┴──▶ failed
//!   └───────────────────────replay_failed (`strata dlq replay`)──┘
//! ```
//!
//! Every transition is a function of its own ([`begin_archiving`], [`mark_archived`],
//! [`mark_verified`], [`mark_dropped`], [`send_back_to_pending`], [`mark_failed`],
//! [`replay_failed`]) and one `UPDATE … WHERE id = $1 AND event_id = $2 AND state = ANY(…)`:
//! it names the states it may move from ([`Transition::from`]) and the row's current
//! `event_id`, so an illegal transition, a stale event or confirmation, or the loser of two
//! concurrent attempts changes nothing and gets [`TransitionError::Refused`] saying what it
//! found. Callers decide what a refusal means (usually: someone else got there first).
//!
//! # Layout
//! - [`ChunkState`], [`Transition`]: the states and the allowed moves between them.
//! - [`ChunkRow`], [`Key`]: a row, and the (id, event id) a transition names.
//! - the transitions, [`TransitionError`].
//! - the watcher's bookkeeping: [`record_closed`], [`claim_reemission`], [`count_by_state`];
//!   [`load`] for everyone.

use chrono::{DateTime, Utc};
use strata_pipeline::StageError;
use tokio_postgres::types::ToSql;

use crate::catalog::{ident, CHUNKS};

use super::events::ArchivalEvent;

/// Where a chunk is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkState {
    /// Recorded by the watcher; its archival event is on `archive:{T}`.
    Pending,
    /// An archiver is writing (or crashed while writing) the object at `lake_path`.
    Archiving,
    /// The object is complete; the confirmer has not verified it yet.
    Archived,
    /// The object was read back and matches the chunk.
    Verified,
    /// The chunk is gone from PostgreSQL; its archive is the only copy.
    Dropped,
    /// Given up: the reason is in `last_error`, the event in `archive:{T}:dlq`.
    Failed,
}

impl ChunkState {
    /// Every state, in lifecycle order.
    pub const ALL: [ChunkState; 6] = [
        ChunkState::Pending,
        ChunkState::Archiving,
        ChunkState::Archived,
        ChunkState::Verified,
        ChunkState::Dropped,
        ChunkState::Failed,
    ];

    /// States the watcher still re-emits events for (the chunk is not in the lake, verified).
    pub const OPEN: [ChunkState; 3] = [
        ChunkState::Pending,
        ChunkState::Archiving,
        ChunkState::Archived,
    ];

    /// The value of the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkState::Pending => "pending",
            ChunkState::Archiving => "archiving",
            ChunkState::Archived => "archived",
            ChunkState::Verified => "verified",
            ChunkState::Dropped => "dropped",
            ChunkState::Failed => "failed",
        }
    }

    /// The state a `state` column value names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl std::fmt::Display for ChunkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An allowed move of the state machine; each has its own function below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// [`begin_archiving`]: an archiver starts (or, after a crash, restarts) writing an object.
    BeginArchiving,
    /// [`mark_archived`]: the object is complete.
    MarkArchived,
    /// [`mark_verified`]: the confirmer read the object back and it matches.
    MarkVerified,
    /// [`mark_dropped`]: the chunk was dropped from PostgreSQL (or found gone).
    MarkDropped,
    /// [`send_back_to_pending`]: a check failed, or rows arrived late: archive again, with a new
    /// event id.
    SendBackToPending,
    /// [`mark_failed`]: given up; the event is dead-lettered.
    MarkFailed,
    /// [`replay_failed`]: `strata dlq replay` sent a failed chunk's event back.
    ReplayFailed,
}

impl Transition {
    /// Every transition.
    pub const ALL: [Transition; 7] = [
        Transition::BeginArchiving,
        Transition::MarkArchived,
        Transition::MarkVerified,
        Transition::MarkDropped,
        Transition::SendBackToPending,
        Transition::MarkFailed,
        Transition::ReplayFailed,
    ];

    /// The states this transition may start from.
    pub const fn from(self) -> &'static [ChunkState] {
        use ChunkState::*;
        match self {
            Transition::BeginArchiving => &[Pending, Archiving],
            Transition::MarkArchived => &[Archiving],
            Transition::MarkVerified => &[Archived],
            Transition::MarkDropped => &[Verified],
            Transition::SendBackToPending => &[Archived, Verified],
            Transition::MarkFailed => &[Pending, Archiving],
            Transition::ReplayFailed => &[Failed],
        }
    }

    /// The state it ends in.
    pub const fn to(self) -> ChunkState {
        match self {
            Transition::BeginArchiving => ChunkState::Archiving,
            Transition::MarkArchived => ChunkState::Archived,
            Transition::MarkVerified => ChunkState::Verified,
            Transition::MarkDropped => ChunkState::Dropped,
            Transition::SendBackToPending | Transition::ReplayFailed => ChunkState::Pending,
            Transition::MarkFailed => ChunkState::Failed,
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Transition::BeginArchiving => "begin archiving",
            Transition::MarkArchived => "mark archived",
            Transition::MarkVerified => "mark verified",
            Transition::MarkDropped => "mark dropped",
            Transition::SendBackToPending => "send back to pending",
            Transition::MarkFailed => "mark failed",
            Transition::ReplayFailed => "replay failed",
        }
    }
}

/// The row and archival event a transition is for: it applies only while `event_id` is the
/// row's current event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    /// The row's primary key (`chunk_id` in events).
    pub id: i64,
    /// The archival event the caller is acting on.
    pub event_id: &'a str,
}

impl<'a> Key<'a> {
    /// The key an archival event names.
    pub fn of_event(event: &'a ArchivalEvent) -> Self {
        Key {
            id: event.chunk_id,
            event_id: &event.event_id,
        }
    }
}

/// What a refused transition found instead of a row in one of its `from` states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No row with that id.
    NoRow,
    /// The row has moved on to another event (the caller's event is stale).
    Superseded { current_event: String },
    /// The row is at the caller's event, in a state the transition does not start from.
    State(ChunkState),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::NoRow => f.write_str("there is no such row"),
            Found::Superseded { current_event } => {
                write!(f, "the row has moved on to event {current_event}")
            }
            Found::State(s) => write!(f, "the row is {s}"),
        }
    }
}

/// Why a transition did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// The row was not in a state the transition starts from (or not at this event): nothing
    /// changed.
    #[error("{CHUNKS} row {id}, event {event_id}: cannot {}: {found}", transition.name())]
    Refused {
        transition: Transition,
        id: i64,
        event_id: String,
        found: Found,
    },
    /// PostgreSQL failed.
    #[error("{CHUNKS} row {id}: {}", transition.name())]
    Postgres {
        transition: Transition,
        id: i64,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl TransitionError {
    /// What a refusal found; `None` for a PostgreSQL failure.
    pub fn found(&self) -> Option<&Found> {
        match self {
            TransitionError::Refused { found, .. } => Some(found),
            TransitionError::Postgres { .. } => None,
        }
    }
}

/// A refusal is a race lost to another worker: retried with backoff, when the caller reloads
/// the row and sees what happened. A PostgreSQL failure is classified by its SQLSTATE and kept
/// as the source.
impl From<TransitionError> for StageError {
    fn from(e: TransitionError) -> Self {
        let message = e.to_string();
        match e {
            TransitionError::Refused { .. } => StageError::backoff(message),
            TransitionError::Postgres { source, .. } => super::pg::error(&message, source),
        }
    }
}

/// One row of `strata.chunks`.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    /// Primary key, carried in events as `chunk_id`.
    pub id: i64,
    /// The table (hypertable or partitioned parent).
    pub table_name: String,
    /// Schema of the chunk relation.
    pub chunk_schema: String,
    /// Name of the chunk relation.
    pub chunk: String,
    /// OID of the chunk relation: tells this incarnation from one made again for late rows.
    pub chunk_oid: u32,
    /// Start of the time range (µs, inclusive).
    pub range_start_us: i64,
    /// End of the time range (µs, exclusive).
    pub range_end_us: i64,
    /// Where it is in its lifecycle.
    pub state: ChunkState,
    /// The current archival event; older events and confirmations are stale.
    pub event_id: String,
    /// Archive attempts started.
    pub attempts: i32,
    /// Archives that failed verification.
    pub verify_failures: i32,
    /// When the watcher recorded it (µs).
    pub created_at_us: i64,
    /// Object key of the current (or last started) archive.
    pub lake_path: Option<String>,
    /// Rows in the archive.
    pub rows: Option<i64>,
    /// Size of the archive in bytes.
    pub bytes: Option<i64>,
    /// SHA-256 of the archive, lowercase hex.
    pub sha256: Option<String>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Columns selected into a [`ChunkRow`], in order.
pub const ROW_COLUMNS: &str = "id, table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, state, event_id, attempts, verify_failures, created_at, lake_path, rows, bytes, sha256, last_error";

impl ChunkRow {
    pub fn from_row(row: &tokio_postgres::Row) -> Result<Self, StageError> {
        let state: String = row.get(7);
        let us = |i: usize| row.get::<_, DateTime<Utc>>(i).timestamp_micros();
        Ok(Self {
            id: row.get(0),
            table_name: row.get(1),
            chunk_schema: row.get(2),
            chunk: row.get(3),
            chunk_oid: row.get(4),
            range_start_us: us(5),
            range_end_us: us(6),
            state: ChunkState::parse(&state)
                .ok_or_else(|| StageError::fatal(format!("{CHUNKS}: unknown state {state:?}")))?,
            event_id: row.get(8),
            attempts: row.get(9),
            verify_failures: row.get(10),
            created_at_us: us(11),
            lake_path: row.get(12),
            rows: row.get(13),
            bytes: row.get(14),
            sha256: row.get(15),
            last_error: row.get(16),
        })
    }

    /// The key transitions of this row at its current event name.
    pub fn key(&self) -> Key<'_> {
        Key {
            id: self.id,
            event_id: &self.event_id,
        }
    }

    /// The chunk relation, quoted for SQL.
    pub fn relation(&self) -> String {
        format!("{}.{}", ident(&self.chunk_schema), ident(&self.chunk))
    }

    /// How events and logs name the chunk: the bare name for native partitions, `schema.name`
    /// for TimescaleDB chunks.
    pub fn display_name(&self) -> String {
        if self.chunk_schema == "public" {
            self.chunk.clone()
        } else {
            format!("{}.{}", self.chunk_schema, self.chunk)
        }
    }

    /// The archival event for the row's current `event_id`.
    pub fn event(&self) -> ArchivalEvent {
        ArchivalEvent {
            event_id: self.event_id.clone(),
            chunk_id: self.id,
            table: self.table_name.clone(),
            chunk: self.display_name(),
            range_start_us: self.range_start_us,
            range_end_us: self.range_end_us,
            created_at_us: self.created_at_us,
            attempt: self.verify_failures + 1,
        }
    }
}

fn rows(rows: &[tokio_postgres::Row]) -> Result<Vec<ChunkRow>, StageError> {
    rows.iter().map(ChunkRow::from_row).collect()
}

/// Reads row `id`.
pub async fn load(
    client: &impl deadpool_postgres::GenericClient,
    id: i64,
) -> Result<Option<ChunkRow>, StageError> {
    client
        .query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM {CHUNKS} WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| super::pg::error(&format!("reading {CHUNKS} row {id}"), e))?
        .map(|r| ChunkRow::from_row(&r))
        .transpose()
}

/// Applies `transition` to the row at `key`: `SET state = <to>, <set>` where the row is in one
/// of the transition's `from` states at `key.event_id`. `extra` are the parameters of `set`,
/// from `$4`. Returns the row as it is now, or a refusal with what was found.
async fn apply(
    client: &impl deadpool_postgres::GenericClient,
    transition: Transition,
    key: Key<'_>,
    set: &str,
    extra: &[&(dyn ToSql + Sync)],
) -> Result<ChunkRow, TransitionError> {
    let pg = |source| TransitionError::Postgres {
        transition,
        id: key.id,
        source,
    };
    let from: Vec<&str> = transition.from().iter().map(|s| s.as_str()).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&key.id, &key.event_id, &from];
    params.extend_from_slice(extra);
    let to = transition.to().as_str();
    let updated = client
        .query_opt(
            &format!(
                "UPDATE {CHUNKS} SET state = '{to}', {set} \
                 WHERE id = $1 AND event_id = $2 AND state = ANY($3::text[]) \
                 RETURNING {ROW_COLUMNS}"
            ),
            &params,
        )
        .await
        .map_err(pg)?;
    if let Some(row) = updated {
        return ChunkRow::from_row(&row).map_err(|_| TransitionError::Refused {
            transition,
            id: key.id,
            event_id: key.event_id.to_string(),
            found: Found::NoRow,
        });
    }
    let found = client
        .query_opt(
            &format!("SELECT state, event_id FROM {CHUNKS} WHERE id = $1"),
            &[&key.id],
        )
        .await
        .map_err(pg)?;
    let found = match found {
        None => Found::NoRow,
        Some(r) if r.get::<_, &str>(1) != key.event_id => Found::Superseded {
            current_event: r.get(1),
        },
        Some(r) => match ChunkState::parse(r.get(0)) {
            Some(state) => Found::State(state),
            None => Found::NoRow,
        },
    };
    Err(TransitionError::Refused {
        transition,
        id: key.id,
        event_id: key.event_id.to_string(),
        found,
    })
}

/// pending | archiving → archiving: an attempt starts writing the object at `lake_path`
/// (recorded at once, so a crash leaves the key to clean up); counts the attempt.
pub async fn begin_archiving(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
    lake_path: &str,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::BeginArchiving,
        key,
        "archiving_at = now(), attempts = attempts + 1, lake_path = $4",
        &[&lake_path],
    )
    .await
}

/// What an archiver wrote: recorded by [`mark_archived`], checked by the confirmer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive<'a> {
    /// Rows in the object.
    pub rows: i64,
    /// Size of the object.
    pub bytes: i64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: &'a str,
    /// Object key in the lake.
    pub lake_path: &'a str,
}

/// archiving → archived: the object is complete.
pub async fn mark_archived(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
    archive: &Archive<'_>,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::MarkArchived,
        key,
        "archived_at = now(), rows = $4, bytes = $5, sha256 = $6, lake_path = $7, last_error = NULL",
        &[&archive.rows, &archive.bytes, &archive.sha256, &archive.lake_path],
    )
    .await
}

/// archived → verified: the object was read back and matches the chunk.
pub async fn mark_verified(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::MarkVerified,
        key,
        "verified_at = now(), last_error = NULL",
        &[],
    )
    .await
}

/// verified → dropped: the chunk was dropped, in the caller's transaction. `note` goes to
/// `last_error` (the chunk was already gone); `None` leaves it as it is.
pub async fn mark_dropped(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
    note: Option<&str>,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::MarkDropped,
        key,
        "dropped_at = now(), last_error = coalesce($4, last_error)",
        &[&note],
    )
    .await
}

/// archived | verified → pending: the archive failed a check (or rows arrived late). The row
/// gets a new event id (returned in the row) and one more `verify_failures`, the archive's
/// figures are cleared and `reason` goes to `last_error`.
pub async fn send_back_to_pending(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
    reason: &str,
) -> Result<ChunkRow, TransitionError> {
    let new_event = uuid::Uuid::new_v4().to_string();
    apply(
        client,
        Transition::SendBackToPending,
        key,
        "event_id = $4, verify_failures = verify_failures + 1, last_error = $5, emitted_at = now(), lake_path = NULL, rows = NULL, bytes = NULL, sha256 = NULL",
        &[&new_event, &reason],
    )
    .await
}

/// pending | archiving → failed: given up (the event is dead-lettered); `reason` goes to
/// `last_error`.
pub async fn mark_failed(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
    reason: &str,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::MarkFailed,
        key,
        "failed_at = now(), last_error = $4",
        &[&reason],
    )
    .await
}

/// failed → pending: an operator replayed the dead-lettered event (having fixed the cause),
/// so the chunk gets a fresh verification budget.
pub async fn replay_failed(
    client: &impl deadpool_postgres::GenericClient,
    key: Key<'_>,
) -> Result<ChunkRow, TransitionError> {
    apply(
        client,
        Transition::ReplayFailed,
        key,
        "verify_failures = 0, failed_at = NULL",
        &[],
    )
    .await
}

/// Records the quiet closed chunks as `pending` rows with fresh event ids, once each: of the
/// rows `closed` selects (columns `chunk_schema`, `chunk`, `chunk_oid`, `range_start`,
/// `range_end`; `$1` the table name; its parameters `params`), those whose OID is in `oids`.
/// The unique key makes exactly one of several concurrent watchers insert a chunk; returns the
/// rows this call inserted.
pub async fn record_closed(
    client: &impl deadpool_postgres::GenericClient,
    closed: &str,
    params: &[&(dyn ToSql + Sync)],
    oids: &Vec<u32>,
) -> Result<Vec<ChunkRow>, StageError> {
    let oids_param = format!("${}", params.len() + 1);
    let mut params = params.to_vec();
    params.push(oids);
    let inserted = client
        .query(
            &format!(
                "INSERT INTO {CHUNKS} (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, event_id)
                 SELECT $1::text, q.chunk_schema, q.chunk, q.chunk_oid, q.range_start, q.range_end, gen_random_uuid()::text
                 FROM ({closed}) q
                 WHERE q.chunk_oid = ANY({oids_param}::oid[])
                 ORDER BY q.range_start
                 ON CONFLICT DO NOTHING
                 RETURNING {ROW_COLUMNS}"
            ),
            &params,
        )
        .await
        .map_err(|e| super::pg::error("recording closed chunks", e))?;
    rows(&inserted)
}

/// The open rows of `table` (see [`ChunkState::OPEN`]) last emitted more than `after_us` ago,
/// their `emitted_at` moved to now: the caller emits their events again. The UPDATE decides
/// which of several watchers does it.
pub async fn claim_reemission(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
    after_us: i64,
) -> Result<Vec<ChunkRow>, StageError> {
    let open: Vec<&str> = ChunkState::OPEN.iter().map(|s| s.as_str()).collect();
    let stale = client
        .query(
            &format!(
                "UPDATE {CHUNKS} SET emitted_at = now()
                 WHERE table_name = $1 AND state = ANY($3::text[])
                   AND emitted_at < now() - $2::bigint * interval '1 microsecond'
                 RETURNING {ROW_COLUMNS}"
            ),
            &[&table, &after_us, &open],
        )
        .await
        .map_err(|e| super::pg::error("finding chunks to emit again", e))?;
    rows(&stale)
}

/// How many rows of `table` are in each state, in [`ChunkState::ALL`] order.
pub async fn count_by_state(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
) -> Result<[(ChunkState, i64); 6], StageError> {
    let by_state = client
        .query(
            &format!("SELECT state, count(*) FROM {CHUNKS} WHERE table_name = $1 GROUP BY state"),
            &[&table],
        )
        .await
        .map_err(|e| super::pg::error("counting chunks by state", e))?;
    Ok(ChunkState::ALL.map(|state| {
        let n = by_state
            .iter()
            .find(|r| r.get::<_, &str>(0) == state.as_str())
            .map_or(0, |r| r.get::<_, i64>(1));
        (state, n)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_column_values() {
        for s in ChunkState::ALL {
            assert_eq!(ChunkState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ChunkState::parse("lost"), None);
    }

    #[test]
    fn the_transition_table_is_the_documented_state_machine() {
        use ChunkState::*;
        let table: Vec<(Transition, Vec<ChunkState>, ChunkState)> = Transition::ALL
            .iter()
            .map(|t| (*t, t.from().to_vec(), t.to()))
            .collect();
        assert_eq!(
            table,
            [
                (
                    Transition::BeginArchiving,
                    vec![Pending, Archiving],
                    Archiving
                ),
                (Transition::MarkArchived, vec![Archiving], Archived),
                (Transition::MarkVerified, vec![Archived], Verified),
                (Transition::MarkDropped, vec![Verified], Dropped),
                (
                    Transition::SendBackToPending,
                    vec![Archived, Verified],
                    Pending
                ),
                (Transition::MarkFailed, vec![Pending, Archiving], Failed),
                (Transition::ReplayFailed, vec![Failed], Pending),
            ]
        );
        // Nothing leaves `dropped`.
        assert!(Transition::ALL.iter().all(|t| !t.from().contains(&Dropped)));
    }
}
