//! Servers a test owns: see the `strata-testkit` crate, shared with the benchmarks.

#[allow(unused_imports)]
pub use strata_testkit::{rss_kb, OwnPostgres, OwnRedis};
