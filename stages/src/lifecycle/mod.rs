//! The chunk lifecycle: chunk-watcher → archiver → confirmer. Closed chunks become Parquet
//! objects in the lake, are read back and verified, and only then dropped.
//!
//! ```text
//! chunk-watcher ──XADD──▶ archive:{T} ──archiver──▶ lake (Parquet) + archived:{T} ──confirmer──▶ verified, dropped
//!                              ▲                                                        │ mismatch
//!                              └──────────────────── archive again (bounded) ◀──────────┘
//! ```
//!
//! # Layout
//! - [`watcher`]: the periodic scan that records closed chunks and emits archival events.
//! - [`archiver`]: the [`Stage`](strata_pipeline::runner::Stage) writing one object per chunk.
//! - [`confirmer`]: the stage verifying archives and dropping chunks.
//! - each of these three holds its config section and its registry entry (`STAGE`, listed in
//!   [`crate::registry::STAGES`]), which starts it.
//! - [`registry`]: `strata.chunks` and the chunk state machine (pending → archiving → archived →
//!   verified → dropped, or failed): the only writer of that table, one typed function per
//!   transition.
//! - [`events`]: the stream entries (ArchivalEvent, ArchivalConfirmation).
//! - [`columnar`]: binary COPY → Arrow; [`export`]: Arrow → Parquet → upload.
//! - [`lake`]: `[lake]`, the object stores and the bounded multipart upload.
//! - `pg`: the transaction with a bounded lock wait, PostgreSQL errors that keep their cause.
//! - this file: the module list and [`deps`].

pub mod archiver;
pub mod columnar;
pub mod confirmer;
pub mod events;
pub mod export;
pub mod lake;
mod pg;
pub mod registry;
pub mod watcher;

/// The crates archives are made with, for callers that read them back (tests, benchmarks)
/// with exactly the versions strata writes with.
pub mod deps {
    pub use arrow_array;
    pub use arrow_schema;
    pub use bytes;
    pub use futures_util;
    pub use object_store;
    pub use parquet;
    pub use sha2;
}
