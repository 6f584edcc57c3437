//! The chunk state machine (`strata_stages::lifecycle::registry`) against the real PostgreSQL:
//! every legal transition moves a row and writes its columns, every illegal one (wrong state,
//! stale event, no row) is refused and changes nothing, and of two concurrent transactions
//! attempting conflicting transitions exactly one wins.

mod common;

use std::time::Duration;

use common::TestEnv;
use strata_stages::lifecycle::registry::{
    self, Archive, ChunkRow, ChunkState, Found, Key, Transition, TransitionError,
};

/// The state machine as documented, written out independently of `Transition::from`.
fn legal(t: Transition, from: ChunkState) -> bool {
    use ChunkState::*;
    matches!(
        (t, from),
        (Transition::BeginArchiving, Pending | Archiving)
            | (Transition::MarkArchived, Archiving)
            | (Transition::MarkVerified, Archived)
            | (Transition::MarkDropped, Verified)
            | (Transition::SendBackToPending, Archived | Verified)
            | (Transition::MarkFailed, Pending | Archiving)
            | (Transition::ReplayFailed, Failed)
    )
}

struct Env {
    env: TestEnv,
    pool: deadpool_postgres::Pool,
}

async fn setup() -> Env {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let pool = strata_pipeline::db::postgres_pool(&env.config, 4).unwrap();
    Env { env, pool }
}

impl Env {
    /// Inserts a row in `state` (with an archive recorded, a failure counted) and returns it.
    async fn row(&self, state: ChunkState) -> ChunkRow {
        let client = self.pool.get().await.unwrap();
        let chunk = format!("c_{}", common::rand_suffix());
        let id: i64 = client
            .query_one(
                "INSERT INTO strata.chunks (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, state, event_id, verify_failures, lake_path, rows, bytes, sha256)
                 VALUES ($1, 'public', $2, 1, '2026-11-01T00:00:00Z', '2026-11-01T01:00:00Z', $3, gen_random_uuid()::text, 1, 'old/key.parquet', 10, 2000, 'ab')
                 RETURNING id",
                &[&self.env.table, &chunk, &state.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        registry::load(&client, id).await.unwrap().unwrap()
    }

    async fn load(&self, id: i64) -> ChunkRow {
        let client = self.pool.get().await.unwrap();
        registry::load(&client, id).await.unwrap().unwrap()
    }
}

/// Runs transition `t` on `key` with fixed arguments.
async fn apply(
    client: &impl deadpool_postgres::GenericClient,
    t: Transition,
    key: Key<'_>,
) -> Result<ChunkRow, TransitionError> {
    match t {
        Transition::BeginArchiving => {
            registry::begin_archiving(client, key, "new/key.parquet").await
        }
        Transition::MarkArchived => {
            let archive = Archive {
                rows: 42,
                bytes: 4096,
                sha256: "cd",
                lake_path: "new/key.parquet",
            };
            registry::mark_archived(client, key, &archive).await
        }
        Transition::MarkVerified => registry::mark_verified(client, key).await,
        Transition::MarkDropped => registry::mark_dropped(client, key, Some("gone")).await,
        Transition::SendBackToPending => {
            registry::send_back_to_pending(client, key, "a check failed").await
        }
        Transition::MarkFailed => registry::mark_failed(client, key, "given up").await,
        Transition::ReplayFailed => registry::replay_failed(client, key).await,
    }
}

/// What each transition writes besides the state.
fn assert_effects(t: Transition, before: &ChunkRow, after: &ChunkRow) {
    let same_event = after.event_id == before.event_id;
    match t {
        Transition::BeginArchiving => {
            assert_eq!(after.attempts, before.attempts + 1);
            assert_eq!(after.lake_path.as_deref(), Some("new/key.parquet"));
            assert!(same_event);
        }
        Transition::MarkArchived => {
            assert_eq!(
                (after.rows, after.bytes, after.sha256.as_deref()),
                (Some(42), Some(4096), Some("cd"))
            );
            assert_eq!(after.lake_path.as_deref(), Some("new/key.parquet"));
            assert_eq!(after.last_error, None);
            assert!(same_event);
        }
        Transition::MarkVerified => {
            assert_eq!(after.last_error, None);
            assert!(same_event);
        }
        Transition::MarkDropped => {
            assert_eq!(after.last_error.as_deref(), Some("gone"));
            assert!(same_event);
        }
        Transition::SendBackToPending => {
            assert!(!same_event, "a new event id");
            assert_eq!(after.verify_failures, before.verify_failures + 1);
            assert_eq!(after.last_error.as_deref(), Some("a check failed"));
            assert_eq!(
                (&after.lake_path, after.rows, after.bytes, &after.sha256),
                (&None, None, None, &None)
            );
        }
        Transition::MarkFailed => {
            assert_eq!(after.last_error.as_deref(), Some("given up"));
            assert!(same_event);
        }
        Transition::ReplayFailed => {
            assert_eq!(after.verify_failures, 0);
            assert!(same_event);
        }
    }
}

fn unchanged(a: &ChunkRow, b: &ChunkRow) {
    assert_eq!(
        (
            a.state,
            &a.event_id,
            a.attempts,
            a.verify_failures,
            &a.lake_path,
            a.rows,
            a.bytes,
            &a.sha256,
            &a.last_error
        ),
        (
            b.state,
            &b.event_id,
            b.attempts,
            b.verify_failures,
            &b.lake_path,
            b.rows,
            b.bytes,
            &b.sha256,
            &b.last_error
        )
    );
}

#[tokio::test]
async fn every_legal_transition_moves_the_row_and_every_illegal_one_is_refused() {
    let e = setup().await;
    let client = e.pool.get().await.unwrap();
    for t in Transition::ALL {
        for state in ChunkState::ALL {
            let before = e.row(state).await;
            let result = apply(&client, t, before.key()).await;
            let now = e.load(before.id).await;
            if legal(t, state) {
                let after = result.unwrap_or_else(|err| panic!("{t:?} from {state}: {err}"));
                assert_eq!(after.state, t.to(), "{t:?} from {state}");
                assert_eq!(now.state, t.to(), "{t:?} from {state}: stored");
                assert_effects(t, &before, &after);
                unchanged(&after, &now);
            } else {
                let err = result.expect_err(&format!("{t:?} from {state} must be refused"));
                assert_eq!(err.found(), Some(&Found::State(state)), "{t:?}: {err}");
                let text = err.to_string();
                assert!(
                    text.contains(t.name()) && text.contains(state.as_str()),
                    "the refusal says what and why: {text}"
                );
                unchanged(&before, &now);
            }
        }
    }
}

#[tokio::test]
async fn a_stale_event_or_a_missing_row_is_refused() {
    let e = setup().await;
    let client = e.pool.get().await.unwrap();
    let row = e.row(ChunkState::Archived).await;
    let stale = Key {
        id: row.id,
        event_id: "an-older-event",
    };
    for t in Transition::ALL {
        let err = apply(&client, t, stale).await.unwrap_err();
        assert_eq!(
            err.found(),
            Some(&Found::Superseded {
                current_event: row.event_id.clone()
            }),
            "{t:?}"
        );
    }
    unchanged(&row, &e.load(row.id).await);
    let missing = Key {
        id: row.id + 1_000_000,
        event_id: &row.event_id,
    };
    let err = registry::mark_verified(&client, missing).await.unwrap_err();
    assert_eq!(err.found(), Some(&Found::NoRow));
    // A refusal is retried (the caller reloads the row), never dead-lettered.
    let stage: strata_pipeline::StageError = err.into();
    assert_eq!(stage.hint, strata_pipeline::RetryHint::Backoff);
}

/// `first` runs in a transaction that stays open while `second` runs in another one (it waits
/// for the row lock); after `first` commits, `second` must be refused with `found`.
async fn race(
    e: &Env,
    state: ChunkState,
    first: Transition,
    second: Transition,
    found: impl Fn(&ChunkRow) -> Found,
) {
    let row = e.row(state).await;
    let mut c1 = e.pool.get().await.unwrap();
    let tx1 = c1.transaction().await.unwrap();
    let won = apply(&tx1, first, row.key()).await.expect("the first wins");
    let pool = e.pool.clone();
    let key_event = row.event_id.clone();
    let id = row.id;
    let loser = tokio::spawn(async move {
        let mut c2 = pool.get().await.unwrap();
        let tx2 = c2.transaction().await.unwrap();
        let key = Key {
            id,
            event_id: &key_event,
        };
        let r = apply(&tx2, second, key).await;
        tx2.commit().await.unwrap();
        r
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !loser.is_finished(),
        "the second waits for the first's row lock"
    );
    tx1.commit().await.unwrap();
    let err = loser
        .await
        .unwrap()
        .expect_err(&format!("{second:?} after {first:?} must be refused"));
    assert_eq!(err.found(), Some(&found(&won)), "{err}");
    unchanged(&won, &e.load(row.id).await);
}

#[tokio::test]
async fn of_two_concurrent_transitions_only_one_wins() {
    let e = setup().await;
    // Two confirmers verifying the same archive.
    race(
        &e,
        ChunkState::Archived,
        Transition::MarkVerified,
        Transition::MarkVerified,
        |_| Found::State(ChunkState::Verified),
    )
    .await;
    // Two confirmers sending the same chunk back: the second sees the first's new event.
    race(
        &e,
        ChunkState::Archived,
        Transition::SendBackToPending,
        Transition::SendBackToPending,
        |won| Found::Superseded {
            current_event: won.event_id.clone(),
        },
    )
    .await;
    // An archiver finishing while another gives up on the same attempt.
    race(
        &e,
        ChunkState::Archiving,
        Transition::MarkArchived,
        Transition::MarkFailed,
        |_| Found::State(ChunkState::Archived),
    )
    .await;
    race(
        &e,
        ChunkState::Archiving,
        Transition::MarkFailed,
        Transition::MarkArchived,
        |_| Found::State(ChunkState::Failed),
    )
    .await;
    // A drop racing a re-archive of the same verified chunk.
    race(
        &e,
        ChunkState::Verified,
        Transition::MarkDropped,
        Transition::SendBackToPending,
        |_| Found::State(ChunkState::Dropped),
    )
    .await;
}
