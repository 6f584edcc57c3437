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
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
# --show-output lets tests that skip (TimescaleDB absent) say so.
cargo test --workspace --no-fail-fast "$@" -- --show-output 2>&1 | tee "$out" | grep -v '^    [a-z_:]*$' || status=$?
echo
grep '^SKIP ' "$out" || true
# One closing line for the whole run (cargo prints one per test binary); a test that skipped
# counts as skipped, not passed.
awk '/^SKIP / { k++ }
     /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1); if ($(i) ~ /^ignored/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - k, f, s + k }' "$out"
exit "$status"
