#!/usr/bin/env bash
# What observability and exactly-once cost on the hot path: strata-bench runs, interleaved,
# for three configurations (medians of RUNS runs each):
#   off    metrics and tracing off ([admin] enabled = false, no OTLP exporter)
#   on     metrics on, tracing on at the default sampling, exported over OTLP/HTTP to a local sink
#   no_eo  like `off`, but [batch_writer] exactly_once = false (no applied-frame bookkeeping)
# Usage: bench/overheads.sh [RUNS] (default 3), after `cargo build --release -p strata -p strata-bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
target="${CARGO_TARGET_DIR:-target}"
work=$(mktemp -d)
trap 'kill "${sink:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

variant() { # name, sed expressions
  local name=$1; shift
  sed -e "s|^schemas_dir = .*|schemas_dir = \"$PWD/schemas\"|" "$@" config.toml > "$work/$name.toml"
}
variant off -e 's|^enabled = true |enabled = false |'
variant on
variant no_eo -e 's|^enabled = true |enabled = false |' -e 's|^exactly_once = true |exactly_once = false |'
grep -q '^enabled = false' "$work/off.toml" && grep -q '^exactly_once = false' "$work/no_eo.toml"

# An OTLP/HTTP sink on loopback that accepts every export.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 - "$port" <<'PY' &
import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
sink=$!

for i in $(seq "$runs"); do
  for v in off on no_eo; do
    if [ "$v" = on ]; then export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$port"; else unset OTEL_EXPORTER_OTLP_ENDPOINT; fi
    "$target/release/strata-bench" --config "$work/$v.toml" --json 2>/dev/null | tail -n 1 | sed "s/^/$v /" >> "$work/results"
    echo "run $i $v: $(tail -n 1 "$work/results" | python3 -c 'import sys,json; l=sys.stdin.read().split(" ",1); print(json.loads(l[1])["strata_events_per_s"])')" >&2
  done
done
python3 - "$work/results" <<'PY'
import sys, json, statistics
runs = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    r = json.loads(js)
    runs.setdefault(name, []).append(r["strata_events_per_s"])
med = {k: statistics.median(v) for k, v in runs.items()}
for k, v in runs.items():
    print(f"{k:6} median {med[k]:>10,.0f} events/s   runs: {', '.join(f'{x:,.0f}' for x in v)}")
print(f"observability on/off: {med['on'] / med['off']:.3f}  (loss {(1 - med['on'] / med['off']) * 100:.1f} %, target <= 5 %)")
print(f"exactly-once cost:    {med['off'] / med['no_eo']:.3f}  (cost {(1 - med['off'] / med['no_eo']) * 100:.1f} %, target <= 10 %)")
PY
