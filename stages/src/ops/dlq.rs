//! `strata dlq list|replay|purge --stream S [--count N] [--id ID]`.

use strata_pipeline::config::Config;

use super::OpsError;

/// What to do with dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqAction {
    /// Print them as JSON lines.
    List,
    /// Re-add their original fields to the source stream, then remove them from the DLQ.
    Replay,
    /// Delete them.
    Purge,
}

/// Options of `strata dlq`.
#[derive(Debug, Clone)]
pub struct DlqOptions {
    pub action: DlqAction,
    /// The source stream (e.g. `telemetry:{metrics}`) or its dead-letter stream.
    pub stream: String,
    /// At most this many entries.
    pub count: usize,
    /// Only this dead-letter entry.
    pub id: Option<String>,
}

/// Runs a dead-letter command, reporting to `out`.
pub async fn dlq(
    _config: &Config,
    _opts: &DlqOptions,
    _out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    Err(OpsError::Usage("strata dlq is not built yet".into()))
}
