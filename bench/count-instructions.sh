#!/usr/bin/env bash
# Instructions strata's stage processes execute per event, per cluster_bench configuration:
# the CPU cost that does not move with what else the machine is doing.
#
# Runs cluster_bench twice (SMALL and LARGE events per run) with every `strata` child under
# valgrind's cachegrind (`--cache-sim=no`: it only counts the instructions each process executes
# in user space, start-up to exit). Per configuration it prints the instructions per event of
# each run and the marginal cost, (I_LARGE − I_SMALL) / (LARGE − SMALL), which leaves out what a
# process costs whatever the events (start-up, connections, idle polls; printed as "fixed").
#
# Under valgrind a process runs tens of times slower, so reads and batches come back as full as
# the backlog allows: this counts the work strata's code does per event, not the effects of a
# slower or busier schedule on batch sizes (cluster_bench's own CPU-s figures show those).
#
#   CARGO_TARGET_DIR=/work/target-bench cargo build --release -p strata --bin strata \
#       -p strata-bench --bin cluster_bench
#   bench/count-instructions.sh --partitions 1,3,6 --processes 1,2
#
# Environment: STRATA (the strata binary), CLUSTER_BENCH (the benchmark), SMALL and LARGE
# (events per run; 100000 and 300000). Other arguments go to cluster_bench.
set -euo pipefail
target="${CARGO_TARGET_DIR:-target}/release"
strata="$(realpath "${STRATA:-$target/strata}")"
bench="${CLUSTER_BENCH:-$target/cluster_bench}"
small="${SMALL:-100000}"
large="${LARGE:-300000}"
command -v valgrind >/dev/null || { echo "count-instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# exec keeps the pid cluster_bench watches (and signals); %p names each process's own count.
cat >"$out/strata" <<EOF
#!/bin/sh
exec valgrind --tool=cachegrind --cache-sim=no --branch-sim=no \
  --cachegrind-out-file="$out/\$STRATA_EVENTS.%p.out" "$strata" "\$@"
EOF
chmod +x "$out/strata"

for events in "$small" "$large"; do
  echo "count-instructions: $events events per run…" >&2
  STRATA_EVENTS="$events" "$bench" --events "$events" --runs 1 --no-standalone \
    --no-standalone-replica --timeout-secs 1800 --strata "$out/strata" "$@" >"$out/bench-$events.txt" \
    || { cat "$out/bench-$events.txt" >&2; exit 1; }
done

# One line per stage process: events, configuration (the run's folder), stage, instructions.
for f in "$out"/*.out; do
  awk -v events="$(basename "$f" | cut -d. -f1)" '
    /^cmd:/ { for (i = 1; i <= NF; i++) if ($i ~ /config\.toml$/) { n = split($i, p, "/"); cfg = p[n - 1]; stage = $(i + 1) } }
    /^summary:/ { ir = $2 }
    END { if (stage == "ingest" || stage == "batch-writer") print events, cfg, stage, ir }' "$f"
done | sort -k2,2 -k1,1n | awk -v small="$small" -v large="$large" '
  { sub(/^strata-cluster-bench-[0-9]+-/, "", $2); ir[$2, $1, $3] += $4; if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 } }
  END {
    printf "%-14s %-10s %12s %12s %12s\n", "configuration", "events", "ingest/ev", "writer/ev", "total/ev"
    for (k = 1; k <= n; k++) {
      c = order[k]
      for (j = 1; j <= 2; j++) {
        e = (j == 1) ? small : large
        printf "%-14s %-10s %12.0f %12.0f %12.0f\n", c, e, ir[c, e, "ingest"] / e, ir[c, e, "batch-writer"] / e, (ir[c, e, "ingest"] + ir[c, e, "batch-writer"]) / e
      }
      mi = (ir[c, large, "ingest"] - ir[c, small, "ingest"]) / (large - small)
      mw = (ir[c, large, "batch-writer"] - ir[c, small, "batch-writer"]) / (large - small)
      fixed = ir[c, small, "ingest"] + ir[c, small, "batch-writer"] - (mi + mw) * small
      printf "%-14s %-10s %12.0f %12.0f %12.0f   fixed %.0f M instructions\n", c, "marginal", mi, mw, mi + mw, fixed / 1e6
    }
  }'
