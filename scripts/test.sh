#!/usr/bin/env bash
# The whole test suite against real Redis and PostgreSQL (installed and started if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_toolchain
ensure_redis
ensure_postgres
ensure_test_tools
log "cargo test --workspace"
cargo test --workspace --no-fail-fast "$@"
