#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a running pipeline:
# services (if missing) → release build → strata migrate → demo load through the hot path →
# events/s, end-to-end latency and where to look.
#   EVENTS=1000000 scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_toolchain
ensure_redis
ensure_postgres
log "building strata (release)"
cargo build --release --quiet -p strata
strata="${CARGO_TARGET_DIR:-target}/release/strata"
log "strata migrate"
"$strata" migrate
log "demo: ${EVENTS:-1000000} events through ingest → batch-writer"
RUST_LOG="${RUST_LOG:-warn}" "$strata" demo --table metrics --count "${EVENTS:-1000000}"
