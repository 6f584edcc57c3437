//! `strata migrate` against the real PostgreSQL: idempotent, additive, clear about what it
//! refuses; TimescaleDB hypertables where the extension exists.

mod common;

use std::sync::Arc;

use common::TestEnv;
use strata_pipeline::config::TimescaleMode;
use strata_pipeline::schema::Schema;
use strata_stages::catalog::Partitioning;
use strata_stages::migrate::migrate;

fn with_column(env: &TestEnv, column: &str) -> Arc<Schema> {
    let path = env
        .dir
        .path()
        .join("schemas")
        .join(format!("{}.toml", env.table));
    let text = std::fs::read_to_string(&path).unwrap() + column;
    std::fs::write(&path, &text).unwrap();
    Arc::new(Schema::from_toml("test", &text).unwrap())
}

#[tokio::test]
async fn migrate_is_idempotent_and_creates_the_database() {
    let mut env = TestEnv::new("metrics", "").await;
    // A database that does not exist yet: migrate creates it.
    let fresh = format!("{}_new", env.db);
    env.config.postgres.url = env.db_url.replace(&env.db, &fresh);
    env.config.postgres.timescaledb = TimescaleMode::Off;
    let first = migrate(&env.config, std::slice::from_ref(&env.schema))
        .await
        .expect("first migrate");
    assert!(first[0].created);
    assert_eq!(first[0].partitioning, Partitioning::Native);
    let second = migrate(&env.config, std::slice::from_ref(&env.schema))
        .await
        .expect("second migrate");
    assert!(!second[0].created && second[0].added_columns.is_empty());
    let pg = common::connect(&env.config.postgres.url).await;
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM strata.tables WHERE name = $1",
            &[&env.table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let idx: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1 AND indexname = $2",
            &[&env.table, &format!("{}_source_time_idx", env.table)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(idx, 1, "the (source, time) index exists");
    drop(pg);
    let admin = common::connect(&env.db_url).await;
    admin
        .batch_execute(&format!("DROP DATABASE {fresh} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_nullable_column_migrates_in_place_and_a_required_one_is_refused() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let mut pg = env.pg().await;
    env.make_chunk(&mut pg, 0).await;
    pg.batch_execute(&format!(
        "INSERT INTO {} (time, source, metric, value) VALUES ('1970-01-01', 'h', 'm', 1)",
        env.table
    ))
    .await
    .unwrap();

    let schema = with_column(&env, "\n[[columns]]\nname = \"unit\"\ntype = \"text\"\n");
    let report = migrate(&env.config, std::slice::from_ref(&schema))
        .await
        .unwrap();
    assert_eq!(report[0].added_columns, vec!["unit".to_string()]);
    let (n, unit): (i64, Option<String>) = {
        let r = pg
            .query_one(
                &format!("SELECT count(*), max(unit) FROM {}", env.table),
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((n, unit), (1, None), "existing rows kept, new column NULL");

    let schema = with_column(
        &env,
        "\n[[columns]]\nname = \"owner\"\ntype = \"text\"\nrequired = true\n",
    );
    let err = migrate(&env.config, &[schema])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("new column `owner` is required"), "{err}");
}

#[tokio::test]
async fn timescaledb_hypertable_where_the_extension_exists() {
    let mut env = TestEnv::new("metrics", "").await;
    let pg = env.pg().await;
    let available = pg
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .unwrap()
        .is_some();
    if !available {
        eprintln!("SKIP timescaledb_hypertable_where_the_extension_exists: the timescaledb extension is not installed on this PostgreSQL server");
        env.config.postgres.timescaledb = TimescaleMode::Require;
        let err = migrate(&env.config, std::slice::from_ref(&env.schema))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timescaledb extension is not available"),
            "{err}"
        );
        return;
    }
    env.config.postgres.timescaledb = TimescaleMode::Require;
    let report = migrate(&env.config, std::slice::from_ref(&env.schema))
        .await
        .unwrap();
    assert_eq!(report[0].partitioning, Partitioning::Hypertable);
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = $1",
            &[&env.table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}
