//! Configuration of the chunk lifecycle: `[lake]`, `[chunk_watcher]`, `[archiver]`, `[confirmer]`.

use serde::Deserialize;

/// Where archives go (`[lake]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {}

/// `[chunk_watcher]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkWatcherConfig {}

/// `[archiver]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {}

/// `[confirmer]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfirmerConfig {}
