//! `strata status [--json] [--watch]`.

use strata_pipeline::config::Config;
use strata_pipeline::schema::SchemaRef;

use super::OpsError;

/// Options of `strata status`.
#[derive(Debug, Clone, Default)]
pub struct StatusOptions {
    /// One JSON document instead of a table.
    pub json: bool,
    /// Refresh every 2 s until interrupted.
    pub watch: bool,
}

/// Prints the status of every table's streams and chunks to `out`.
pub async fn status(
    _config: &Config,
    _schemas: &[SchemaRef],
    _opts: &StatusOptions,
    _out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    Err(OpsError::Usage("strata status is not built yet".into()))
}
