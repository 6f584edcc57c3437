//! Delivering one batch: process it, then commit its outcome in one atomic Redis step per input
//! the batch holds entries of; split batches whose entries fail (or whose commit keeps failing)
//! until each fails alone.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::error::{RetryHint, StageError};
use crate::observe::{DeadLetterReason, LoopMetrics};
use crate::streams::{self, CommitStep, Entry, Fields, StreamId};

use super::{Backoff, Batch, DeadLetter, LoopSpec, LoopStats, Outcome, Stage};

/// Processes and commits the batches of one loop (one per `workers`).
pub(super) struct Worker<S> {
    /// The stage that turns batches into outcomes.
    pub(super) stage: Arc<S>,
    /// Per input of the loop (indexed by [`Entry::input`]): its stream, group, consumer; the
    /// first input's limits and stream settings are the loop's.
    pub(super) inputs: Arc<[Arc<LoopSpec>]>,
    /// Connections for the commit step.
    pub(super) redis: crate::db::RedisPool,
    /// Stops retries at shutdown (or after a fatal error elsewhere).
    pub(super) stop: CancellationToken,
    /// Counters for summaries.
    pub(super) stats: Arc<LoopStats>,
    /// Per input (as `inputs`): per-batch counters.
    pub(super) metrics: Arc<[LoopMetrics]>,
}

/// Where the outcome of a batch came from, which decides its dead letters' `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The stage made it (its dead letters are classed by SQLSTATE).
    Stage,
    /// The runner dead-letters entries delivered more than `max_deliveries` times.
    MaxDeliveries,
    /// The runner dead-letters one entry whose commit step kept failing on its own.
    CommitFailed,
}

/// A batch waiting to be delivered, with its outcome when it is already known.
pub(super) struct Todo {
    batch: Batch,
    outcome: Option<(Outcome, Origin)>,
}

impl Todo {
    /// `batch` to be processed by the stage.
    fn process(batch: Batch) -> Self {
        Todo {
            batch,
            outcome: None,
        }
    }

    /// The lone entry of `batch`, dead-lettered with `error`.
    fn dead_letter_alone(
        batch: Batch,
        error: String,
        sqlstate: Option<String>,
        origin: Origin,
    ) -> Self {
        let dead_letter = DeadLetter {
            entry: 0,
            fields: None,
            error,
            sqlstate,
        };
        let outcome = Outcome {
            forward: Vec::new(),
            dead_letters: vec![dead_letter],
        };
        Todo {
            batch,
            outcome: Some((outcome, origin)),
        }
    }
}

/// Commit attempts that fail for a reason that is not transient before the batch is split.
pub const MAX_COMMIT_ATTEMPTS: u32 = 3;

/// Why a commit step did not apply.
pub(super) enum CommitFailure {
    /// It failed [`MAX_COMMIT_ATTEMPTS`] times for a reason that is not transient.
    Stuck(StageError),
    /// Redis refused it in a way no retry mends (permissions): stop the process.
    Fatal(StageError),
}

impl<S: Stage> Worker<S> {
    /// The loop's settings (its first input's).
    fn spec(&self) -> &LoopSpec {
        &self.inputs[0]
    }

    /// The input `entry` was read from (its reader set [`Entry::input`] to its index).
    fn input_of(&self, entry: &Entry) -> &LoopSpec {
        &self.inputs[usize::from(entry.input)]
    }

    /// The metrics of the input `entry` was read from.
    fn metrics_of(&self, entry: &Entry) -> &LoopMetrics {
        &self.metrics[usize::from(entry.input)]
    }

    /// The stream a batch's first entry came from, to name it in logs and spans.
    fn stream_of<'b>(&'b self, batch: &Batch) -> &'b str {
        batch
            .entries
            .first()
            .map_or(&self.spec().input, |e| &self.input_of(e).input)
    }

    /// Entries delivered more than `max_deliveries` times, each with its dead letter.
    fn over_delivered(&self, batch: Batch) -> Todo {
        let max = self.spec().streams.max_deliveries;
        let outcome = Outcome {
            forward: Vec::new(),
            dead_letters: batch
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| DeadLetter {
                    entry: i,
                    fields: None,
                    error: format!(
                        "delivered {} times, more than max_deliveries = {max}",
                        e.deliveries
                    ),
                    sqlstate: None,
                })
                .collect(),
        };
        Todo {
            batch,
            outcome: Some((outcome, Origin::MaxDeliveries)),
        }
    }

    /// Delivers one batch: Ok once every entry is acknowledged (or left pending at shutdown).
    pub(super) async fn handle(&self, batch: Batch) -> Result<(), StageError> {
        let stage = self.spec().stage;
        let max = self.spec().streams.max_deliveries;
        let (over, fresh): (Vec<Entry>, Vec<Entry>) =
            if batch.entries.iter().any(|e| e.deliveries > max) {
                batch.entries.into_iter().partition(|e| e.deliveries > max)
            } else {
                (Vec::new(), batch.entries)
            };
        let mut todo = Vec::new();
        if !over.is_empty() {
            todo.push(self.over_delivered(Batch { entries: over }));
        }
        if !fresh.is_empty() {
            todo.push(Todo::process(Batch { entries: fresh }));
        }
        let mut backoff = Backoff::new(self.spec().streams.max_backoff_ms);
        while let Some(Todo { mut batch, outcome }) = todo.pop() {
            let result = match outcome {
                Some(ready) => Ok(ready),
                None => {
                    let span = tracing::info_span!("process", stage, stream = %self.stream_of(&batch), entries = batch.entries.len());
                    self.stage
                        .process(&batch)
                        .instrument(span)
                        .await
                        .map(|o| (o, Origin::Stage))
                }
            };
            match result {
                Ok((outcome, origin)) => {
                    // What the commit leaves in `batch` is still to be delivered.
                    match self.commit(&mut batch, outcome, origin, &mut backoff).await {
                        Ok(()) => {
                            if !batch.entries.is_empty() {
                                todo.push(Todo::process(batch));
                            }
                        }
                        Err(CommitFailure::Fatal(e)) => return Err(e),
                        Err(CommitFailure::Stuck(e)) if origin == Origin::CommitFailed => {
                            // Even the entry's own dead letter cannot be written (the
                            // dead-letter stream is broken): leave the entry pending, so the rest
                            // keeps flowing; it is claimed and tried again after claim_idle_ms.
                            let entry = &batch.entries[0];
                            let input = &self.input_of(entry).input;
                            self.metrics_of(entry).stuck.increment(1);
                            tracing::error!(stage, stream = %input, entry = %entry.id, dlq = %streams::dlq_stream(input), error = %e.reason(), "cannot dead-letter this entry: leaving it pending");
                        }
                        Err(CommitFailure::Stuck(e)) => {
                            let stream = self.stream_of(&batch).to_string();
                            self.metrics_of(&batch.entries[0]).splits.increment(1);
                            if batch.entries.len() > 1 {
                                warn!(stage, %stream, error = %e.reason(), entries = batch.entries.len(), attempts = MAX_COMMIT_ATTEMPTS, "commit keeps failing: splitting the batch");
                                let right = Batch {
                                    entries: batch.entries.split_off(batch.entries.len() / 2),
                                };
                                for half in [right, batch] {
                                    todo.push(match origin {
                                        Origin::MaxDeliveries => self.over_delivered(half),
                                        _ => Todo::process(half),
                                    });
                                }
                            } else {
                                warn!(stage, %stream, error = %e.reason(), entry = %batch.entries[0].id, "commit keeps failing for this entry alone: dead-lettering it");
                                let error = format!(
                                    "the commit step failed {MAX_COMMIT_ATTEMPTS} times for this entry alone: {}",
                                    e.reason()
                                );
                                todo.push(Todo::dead_letter_alone(
                                    batch,
                                    error,
                                    None,
                                    Origin::CommitFailed,
                                ));
                            }
                        }
                    }
                    backoff.reset();
                }
                Err(e) => match e.hint {
                    RetryHint::Backoff => {
                        if let Some(first) = batch.entries.first() {
                            self.metrics_of(first).retries.increment(1);
                        }
                        warn!(stage, error = %e.reason(), entries = batch.entries.len(), "transient failure, retrying");
                        if !backoff.wait(&self.stop).await {
                            return Ok(()); // shutdown: the entries stay pending
                        }
                        todo.push(Todo::process(batch));
                    }
                    RetryHint::DeadLetter if batch.entries.len() > 1 => {
                        debug!(stage, error = %e.reason(), "splitting batch to isolate a poison entry");
                        let right = Batch {
                            entries: batch.entries.split_off(batch.entries.len() / 2),
                        };
                        todo.push(Todo::process(right));
                        todo.push(Todo::process(batch));
                    }
                    RetryHint::DeadLetter => {
                        let (error, sqlstate) = (e.reason(), e.sqlstate_code());
                        todo.push(Todo::dead_letter_alone(
                            batch,
                            error,
                            sqlstate,
                            Origin::Stage,
                        ));
                    }
                    RetryHint::Fatal => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// `[redis] wait_replicas`: returns once the replicas hold the step just applied on `conn`
    /// (`acked` of them did within the WAIT sent with it). A shortfall is counted and the step
    /// run again with `verify` on the same connection, WAIT with it: on the same node the
    /// re-run finds its entries acknowledged and writes nothing, and the WAIT covers the first
    /// run (a connection's WAIT covers all its earlier writes); after a failover the re-run
    /// either finds the step on the promoted master or applies it there, under its WAIT. (A
    /// bare WAIT could be routed to the promoted master and pass there without the step.)
    /// Err when the connection fails: the caller retries the step with `verify`.
    async fn replicated(
        input: &LoopSpec,
        metrics: &LoopMetrics,
        conn: &mut crate::db::RedisConnection,
        step: &mut CommitStep<'_>,
        wait: crate::db::ReplicaWait,
        mut acked: u64,
    ) -> Result<(), redis::RedisError> {
        step.verify = true;
        while acked < u64::from(wait.replicas) {
            metrics.replica_shortfalls.increment(1);
            warn!(stage = input.stage, stream = %input.input, acked, wanted = wait.replicas, "commit step not replicated in time, waiting again");
            let (_, again) = step.run_then_wait(conn, Some(wait)).await?;
            acked = again.unwrap_or(0);
        }
        Ok(())
    }

    /// Commits `outcome` of `batch`: one atomic step per input the batch holds entries of
    /// (acknowledging its entries, adding their dead letters to its dead-letter stream and the
    /// forwarded entries to its output), in input order. Leaves in `batch` what must be
    /// delivered again: the entries of a step that lost some of its entries to another consumer
    /// (nothing of that step was written; the lost ones are gone from the batch), and with
    /// `Stuck` the entries of every step that kept failing. A step that applied is never
    /// redone.
    async fn commit(
        &self,
        batch: &mut Batch,
        outcome: Outcome,
        origin: Origin,
        backoff: &mut Backoff,
    ) -> Result<(), CommitFailure> {
        let Outcome {
            mut forward,
            dead_letters,
        } = outcome;
        let mut by_input: BTreeMap<u16, (Vec<StreamId>, Vec<&DeadLetter>)> = BTreeMap::new();
        for e in &batch.entries {
            by_input.entry(e.input).or_default().0.push(e.id);
        }
        if by_input.len() > 1 && !forward.is_empty() {
            // `check_inputs` keeps stages that forward to loops of one input.
            return Err(CommitFailure::Fatal(StageError::fatal(format!(
                "stage {}: a batch of several inputs forwarded entries",
                self.spec().stage
            ))));
        }
        for d in &dead_letters {
            let input = batch.entries[d.entry].input;
            by_input.entry(input).or_default().1.push(d);
        }
        // What stays in the batch: per input, None = all of its entries (stuck), Some(lost) =
        // all but those (another consumer owns them now).
        let mut redo: BTreeMap<u16, Option<HashSet<StreamId>>> = BTreeMap::new();
        let mut stuck = None;
        for (input, (ids, dead)) in by_input {
            let spec = &self.inputs[usize::from(input)];
            let metrics = &self.metrics[usize::from(input)];
            let dlq = streams::dlq_stream(&spec.input);
            let reasons: Vec<DeadLetterReason> = dead
                .iter()
                .map(|d| match origin {
                    Origin::Stage => DeadLetterReason::of_sqlstate(d.sqlstate.as_deref()),
                    Origin::MaxDeliveries => DeadLetterReason::MaxDeliveries,
                    Origin::CommitFailed => DeadLetterReason::CommitFailed,
                })
                .collect();
            let dead_letters: Vec<Fields> = dead
                .iter()
                .map(|d| {
                    let entry = &batch.entries[d.entry];
                    streams::dead_letter_fields(
                        d.fields.clone().unwrap_or_else(|| entry.fields.to_vec()),
                        &d.error,
                        spec.stage,
                        entry.id,
                        entry.deliveries,
                        d.sqlstate.as_deref(),
                    )
                })
                .collect();
            let step = CommitStep {
                consumer: spec.consumer(),
                output: spec.output.as_deref().unwrap_or(&dlq),
                dlq: &dlq,
                ids,
                forward: std::mem::take(&mut forward),
                dead_letters,
                verify: false,
            };
            match Self::commit_step(
                spec,
                metrics,
                &self.redis,
                &self.stats,
                step,
                &reasons,
                backoff,
            )
            .await
            {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => {
                    info!(
                        stage = spec.stage,
                        stream = %spec.input,
                        count = lost.len(),
                        "entries are no longer pending (claimed by another consumer, or acknowledged by an earlier attempt of this commit); redoing the rest"
                    );
                    redo.insert(input, Some(lost.into_iter().collect()));
                }
                Err(CommitFailure::Stuck(e)) => {
                    redo.insert(input, None);
                    stuck.get_or_insert(e);
                }
                Err(fatal @ CommitFailure::Fatal(_)) => return Err(fatal),
            }
        }
        batch.entries.retain(|e| match redo.get(&e.input) {
            None => false,
            Some(None) => true,
            Some(Some(lost)) => !lost.contains(&e.id),
        });
        match stuck {
            Some(e) => Err(CommitFailure::Stuck(e)),
            None => Ok(()),
        }
    }

    /// Runs one input's atomic commit step, retrying transient Redis faults for as long as it
    /// takes (a shutdown that outlasts `[shutdown] timeout_ms` abandons it: the entries stay
    /// pending and are claimed by another consumer). Returns entries lost to another consumer
    /// (nothing was written then).
    async fn commit_step(
        spec: &LoopSpec,
        metrics: &LoopMetrics,
        redis: &crate::db::RedisPool,
        stats: &LoopStats,
        mut step: CommitStep<'_>,
        reasons: &[DeadLetterReason],
        backoff: &mut Backoff,
    ) -> Result<Vec<StreamId>, CommitFailure> {
        let mut refused = 0;
        loop {
            let res = match redis.get().await {
                Ok(mut conn) => match step.run_then_wait(&mut conn, spec.replicas).await {
                    Ok((lost, acked)) => {
                        let written = lost.is_empty();
                        match (spec.replicas, acked) {
                            (Some(wait), Some(acked)) if written => {
                                Self::replicated(spec, metrics, &mut conn, &mut step, wait, acked)
                                    .await
                                    .map(|()| lost)
                                    .map_err(|e| {
                                        let e = StageError::backoff("waiting for replicas")
                                            .with_source(e);
                                        (e, RetryHint::Backoff)
                                    })
                            }
                            _ => Ok(lost),
                        }
                    }
                    Err(e) => {
                        // A step that acknowledged part of its entries must not be redone.
                        let hint = match streams::ScriptFailure::of(&e) {
                            Some(streams::ScriptFailure::Partial) => RetryHint::Fatal,
                            _ => crate::error::redis_hint(&e),
                        };
                        Err((StageError::from(e), hint))
                    }
                },
                Err(e) => Err((StageError::from(e), RetryHint::Backoff)),
            };
            match res {
                Ok(lost) => {
                    if lost.is_empty() {
                        stats
                            .acked
                            .fetch_add(step.ids.len() as u64, Ordering::Relaxed);
                        stats
                            .dead_lettered
                            .fetch_add(step.dead_letters.len() as u64, Ordering::Relaxed);
                        metrics.acked.increment(step.ids.len() as u64);
                        for reason in reasons {
                            metrics.dead_lettered(*reason, 1);
                        }
                        if !step.dead_letters.is_empty() {
                            warn!(stage = spec.stage, count = step.dead_letters.len(), dlq = %step.dlq, "dead-lettered");
                        }
                    }
                    return Ok(lost);
                }
                Err((e, RetryHint::Fatal)) => return Err(CommitFailure::Fatal(e)),
                Err((e, RetryHint::DeadLetter)) => {
                    refused += 1;
                    warn!(stage = spec.stage, stream = %spec.input, error = %e.reason(), attempt = refused, "commit step refused");
                    if refused >= MAX_COMMIT_ATTEMPTS {
                        return Err(CommitFailure::Stuck(e));
                    }
                    step.verify = true;
                    backoff.wait(&CancellationToken::new()).await;
                }
                Err((e, RetryHint::Backoff)) => {
                    warn!(stage = spec.stage, stream = %spec.input, error = %e.reason(), "commit failed, retrying");
                    // The step may have been applied with only its reply lost.
                    step.verify = true;
                    // The outcome is only in memory (and maybe committed to PostgreSQL): keep
                    // retrying during shutdown too, until the shutdown timeout gives up on it.
                    backoff.wait(&CancellationToken::new()).await;
                }
            }
        }
    }
}
