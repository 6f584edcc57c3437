//! strata's one Redis Streams layer: every Redis Streams call strata makes, from key names
//! and stream IDs to consumer groups, reading, claiming, and the one atomic step that forwards
//! a stage's output, dead-letters, and acknowledges.
//!
//! # Layout
//! - [`id`]: [`StreamId`], the one parser of `<ms>-<seq>`.
//! - [`keys`]: every key (`telemetry:{T}`, `rows:{T}`, `archive:{T}`,
//!   `archived:{T}`, `<stream>:dlq`, `<stream>:claimed`), [`StreamKind`], [`StreamName`].
//! - [`entry`]: [`Entry`], its zero-copy [`RawFields`], [`Fields`] to write, the read span an
//!   entry holds.
//! - `codec`: RESP2 framing shared by the fields, the reply reader and the read connection.
//! - [`reply`]: the one reply reader: the zero-copy scanner of the read path, and the readers
//!   of `redis::Value` replies (entries, XINFO GROUPS/CONSUMERS, XPENDING) for stages and
//!   operator commands alike.
//! - [`group`]: [`ConsumerGroup`] and [`Consumer`] handles (ensure, read, claim, ack, touch,
//!   pending, remove), [`CommitStep`], and stream-wide calls (length, range, groups, trim).
//! - [`read`]: [`ReadConnection`], the hot read path's own connection.
//! - [`dead_letter`]: the fields of a dead letter, packed when there are many.
//! - [`partition`]: partitioned tables: the producers' hash, the recorded partition count.
//! - [`acl`]: the least-privilege Redis ACL rule (key patterns and commands), and NOPERM errors
//!   that name the command and key.
//! - [`scripts`]: the Lua scripts, one `.lua` file each, and the error codes they reply with.

pub mod acl;
mod codec;
pub mod dead_letter;
pub mod entry;
pub mod group;
pub mod id;
pub mod keys;
pub mod partition;
pub mod read;
pub mod reply;
pub mod scripts;

pub use dead_letter::{
    dead_letter_fields, pack_fields, unpack_fields, DLQ_DELIVERIES, DLQ_ERROR, DLQ_PACKED,
    DLQ_PACK_THRESHOLD, DLQ_SOURCE_ID, DLQ_SQLSTATE, DLQ_STAGE,
};
pub use entry::{Entry, Fields, Held, RawFields, RawFieldsIter, ReadSpan};
pub use group::{
    consumer_name, groups, len, range, trim_acknowledged, Claimed, CommitStep, Consumer,
    ConsumerGroup,
};
pub use id::{InvalidStreamId, StreamId};
pub use keys::{
    archive_stream, archived_stream, claims_key, dlq_stream, partition_tag, partitions_key,
    rows_stream, telemetry_stream, StreamKind, StreamName, MAX_PARTITIONS,
};
pub use read::{ReadConnection, ReadError, ReadTarget};
pub use reply::{
    parse_entries, ConsumerInfo, GroupInfo, PendingEntry, PendingSummary, Redirect, ReplyError,
};
pub use scripts::{
    script, script_source, ScriptFailure, ERR_LIMIT, ERR_PARTIAL, ERR_ROLLBACK, ERR_WRONGTYPE,
    MAX_SCRIPT_CALL_ARGS, MAX_SCRIPT_FIELDS,
};
