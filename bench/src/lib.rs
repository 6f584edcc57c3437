//! What strata-bench's binaries share: reading the machine and processes from `/proc`
//! ([`machine`]), and the error type, formatting, database and Redis helpers ([`common`]).

pub mod common;
pub mod machine;
