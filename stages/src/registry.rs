//! The stages, declared once: one [`StageSpec`] per stage, defined next to the stage (each
//! stage file exports `pub const STAGE: StageSpec`) and listed in [`STAGES`].
//!
//! Everything that differs by stage derives from the list: the `strata <stage>` subcommands
//! and their help, what `strata run` starts, [`crate::start`]'s dispatch and pool sizes, which
//! processes `/readyz` checks PostgreSQL for, the validation of each stage's config section, and
//! the streams `strata status` shows with their groups. Adding a stage is one new file (the
//! stage, its config section, its `STAGE`) plus one entry here (and its section's field in
//! [`Config`]).
//!
//! # Layout
//! - [`StageSpec`]: what one entry declares; [`StartContext`] and [`StartFn`]: how it starts.
//! - [`STAGES`], [`HOT_PATH`], [`find`]: the list.
//! - [`ONE_AT_A_TIME`], [`own_postgres_pool`]: shared by the start functions.

use futures_util::future::BoxFuture;
use strata_pipeline::config::BatchLimits;
use strata_pipeline::runner::LoopSpec;
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::StreamKind;
use strata_pipeline::StageError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::lifecycle::{archiver, confirmer, watcher};
use crate::{ingest, writer, ProcessStats};

/// The tasks of a process's stages: one or more per (stage, table).
pub type Tasks = JoinSet<Result<(), StageError>>;

/// What a stage of one process is started with (the same for every stage and table).
pub struct StartContext<'a> {
    /// The whole configuration: the stage reads its own section.
    pub config: &'a Config,
    /// The process's Redis pool, sized by [`StageSpec::redis_connections`].
    pub redis: &'a strata_pipeline::db::RedisPool,
    /// Where the hot loops open their own read connections (URL and TLS config, built once).
    pub redis_read: &'a strata_pipeline::streams::ReadTarget,
    /// The process's PostgreSQL pool, sized by [`StageSpec::postgres_connections`] (a stage
    /// holding several connections per item makes its own, [`own_postgres_pool`]).
    pub pg: &'a deadpool_postgres::Pool,
    /// Fires on SIGTERM/SIGINT: stop after the work in flight.
    pub shutdown: &'a CancellationToken,
    /// The process's counters.
    pub stats: &'a ProcessStats,
}

/// Starts a stage for a range of partitions of one table (a stage whose input is not
/// [partitioned](StreamKind::partitioned) only for `0..1`), adding its task(s) to the
/// process's: a stage that forwards runs a loop per partition (its output keeps each
/// partition's order and slot), one that forwards nothing may read them all in one loop
/// ([`strata_pipeline::runner::run_loop_over`]). Fails fatally (a missing migration, a lake that
/// cannot be opened) or once the task(s) run.
pub type StartFn = for<'a> fn(
    &'a StartContext<'a>,
    &'a SchemaRef,
    std::ops::Range<u32>,
    &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>>;

/// One stage, as the rest of strata sees it.
#[derive(Clone, Copy)]
pub struct StageSpec {
    /// The stage's name: its `strata <name>` subcommand, its consumer group, and the `stage` of
    /// its dead letters, logs and metrics.
    pub name: &'static str,
    /// The subcommand's one line in `strata --help`.
    pub about: &'static str,
    /// The stream of each table it reads, as consumer group [`name`](Self::name); `None` for a
    /// stage that reads no stream (the chunk-watcher scans PostgreSQL).
    pub input: Option<StreamKind>,
    /// The stream of each table it writes to, if any.
    pub output: Option<StreamKind>,
    /// Its section of `config.toml` (a field of [`Config`]).
    pub section: &'static str,
    /// Checks its section once the file is read; `Err` names the key.
    pub validate: fn(&Config) -> Result<(), String>,
    /// Whether it needs PostgreSQL (then `/readyz` checks PostgreSQL too).
    pub needs_postgres: bool,
    /// Whether applying a batch has effects outside Redis (PostgreSQL rows, lake objects,
    /// dropped chunks). With `[redis] wait_replicas`, such a stage applies only entries the
    /// replicas hold ([`LoopSpec::wait_before_apply`]); a stage whose only effect is its commit
    /// step in the same slot (ingest) needs no such wait.
    pub effects_outside_redis: bool,
    /// Redis connections it holds at most when started for this many partitions of a table.
    pub redis_connections: fn(&Config, u32) -> usize,
    /// Connections of the process's PostgreSQL pool it holds when started for this many
    /// partitions of a table.
    pub postgres_connections: fn(&Config, u32) -> usize,
    /// Starts it for a range of partitions of one table.
    pub start: StartFn,
}

impl std::fmt::Debug for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageSpec")
            .field("name", &self.name)
            .field("input", &self.input)
            .field("output", &self.output)
            .field("section", &self.section)
            .finish_non_exhaustive()
    }
}

impl StageSpec {
    /// The consumer group it reads its input as: its name.
    pub const fn group(&self) -> &'static str {
        self.name
    }

    /// Whether it runs once per partition of a table (its input is partitioned) rather than
    /// once per table.
    pub fn partitioned(&self) -> bool {
        self.input.is_some_and(StreamKind::partitioned)
    }

    /// How many of `partitions` it reads: all, or only partition 0.
    pub fn partitions_read(&self, partitions: u32) -> u32 {
        if self.partitioned() {
            partitions
        } else {
            1
        }
    }

    /// Its input stream of partition `partition` of `table`.
    pub fn input_key(&self, table: &str, partition: u32) -> Option<String> {
        self.input.map(|k| k.partition_key(table, partition))
    }

    /// Its output stream of partition `partition` of `table`: the same partition for a
    /// partitioned output, else the table's one stream.
    pub fn output_key(&self, table: &str, partition: u32) -> Option<String> {
        self.output
            .map(|k| k.partition_key(table, if k.partitioned() { partition } else { 0 }))
    }

    /// A runner loop of this stage on partition `partition` of `table`: its group, input and
    /// output from this entry. Only for a stage with an input.
    pub fn loop_spec(
        &self,
        table: &str,
        partition: u32,
        limits: BatchLimits,
        workers: usize,
        config: &Config,
    ) -> LoopSpec {
        let input = self
            .input_key(table, partition)
            .unwrap_or_else(|| panic!("stage {} reads no stream", self.name));
        let mut spec = LoopSpec::new(
            self.name,
            input,
            self.output_key(table, partition),
            limits,
            workers,
            config.streams.clone(),
        );
        spec.replicas = strata_pipeline::db::ReplicaWait::of(&config.redis);
        spec.wait_before_apply = self.effects_outside_redis;
        spec
    }
}

/// Every stage, in pipeline order: what `strata run` starts, the order of `strata --help` and
/// of the streams in `strata status`.
pub const STAGES: &[StageSpec] = &[
    ingest::STAGE,
    writer::STAGE,
    watcher::STAGE,
    archiver::STAGE,
    confirmer::STAGE,
];

/// The hot path, in order: producer events to rows in PostgreSQL.
pub const HOT_PATH: [StageSpec; 2] = [ingest::STAGE, writer::STAGE];

/// The stage named `name`.
pub fn find(name: &str) -> Option<&'static StageSpec> {
    STAGES.iter().find(|s| s.name == name)
}

/// Each partitioned stream kind with the consumer group that reads it: what must be drained
/// before a table's partitions shrink.
pub fn partitioned_readers() -> Vec<(StreamKind, &'static str)> {
    STAGES
        .iter()
        .filter(|s| s.partitioned())
        .filter_map(|s| s.input.map(|k| (k, s.group())))
        .collect()
}

/// One entry per batch: each event is a whole item (a chunk), processed and acknowledged on
/// its own.
pub const ONE_AT_A_TIME: BatchLimits = BatchLimits {
    max_batch_rows: 1,
    max_batch_bytes: usize::MAX,
    linger_ms: 0,
};

/// A PostgreSQL pool of a stage's own, so a stage holding two connections per item never starves
/// the others.
pub fn own_postgres_pool(
    config: &Config,
    size: usize,
) -> Result<deadpool_postgres::Pool, StageError> {
    strata_pipeline::db::postgres_pool(config, size)
        .map_err(|e| StageError::fatal(strata_pipeline::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_each_section_is_in_the_file() {
        let names: HashSet<_> = STAGES.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), STAGES.len());
        for s in STAGES {
            assert!(
                toml::from_str::<Config>(&format!("[{}]\n", s.section)).is_ok(),
                "[{}] is not a section of Config",
                s.section
            );
            assert_eq!(find(s.name).map(|f| f.name), Some(s.name));
            assert!((s.validate)(&Config::default()).is_ok(), "{}", s.name);
        }
        assert!(toml::from_str::<Config>("[no_such_stage]\n").is_err());
    }

    #[test]
    fn each_stream_kind_is_read_by_one_stage_in_pipeline_order() {
        let read: Vec<_> = STAGES.iter().filter_map(|s| s.input).collect();
        assert_eq!(read, StreamKind::ALL);
        let rows = STAGES
            .iter()
            .find(|s| s.input == Some(StreamKind::Rows))
            .unwrap();
        assert_eq!(
            (rows.group(), rows.section),
            ("batch-writer", "batch_writer")
        );
        assert_eq!(
            HOT_PATH.map(|s| s.name),
            ["ingest", "batch-writer"],
            "the hot path"
        );
        assert!(
            HOT_PATH.iter().all(StageSpec::partitioned),
            "the hot path is partitioned"
        );
        assert_eq!(
            partitioned_readers(),
            [
                (StreamKind::Telemetry, "ingest"),
                (StreamKind::Rows, "batch-writer")
            ]
        );
        let ingest = find("ingest").unwrap();
        assert_eq!(ingest.output_key("m", 2).as_deref(), Some("rows:{m:2}"));
        let watcher_out = STAGES
            .iter()
            .find(|s| s.output == Some(StreamKind::Archive));
        assert_eq!(
            watcher_out.and_then(|s| s.output_key("m", 2)).as_deref(),
            Some("archive:{m}"),
            "the lifecycle stays on the table's one stream"
        );
        assert_eq!(
            STAGES.iter().map(|s| s.name).collect::<Vec<_>>(),
            [
                "ingest",
                "batch-writer",
                "chunk-watcher",
                "archiver",
                "confirmer"
            ]
        );
    }
}
