//! `strata inspect STREAM [--count N] [--from ID]`.

use strata_pipeline::config::Config;
use strata_pipeline::schema::SchemaRef;

use super::OpsError;

/// Options of `strata inspect`.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// Stream key, e.g. `rows:{metrics}`.
    pub stream: String,
    /// Entries to print at most.
    pub count: usize,
    /// First entry ID (inclusive); default the oldest.
    pub from: Option<String>,
}

/// Prints entries of a stream as JSON lines to `out`, decoding frames into rows.
pub async fn inspect(
    _config: &Config,
    _schemas: &[SchemaRef],
    _opts: &InspectOptions,
    _out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    Err(OpsError::Usage("strata inspect is not built yet".into()))
}
