#!/usr/bin/env bash
# Start the daemon on the shipped model, drive it with Triton's perf_analyzer, stop it.
#   benchmarks/perf_analyzer_daemon.sh [extra perf_analyzer args, e.g. -b 8 --concurrency-range 4]
# Needs the checkout's .venv (README quick start); scripts/perf_analyzer fetches perf_analyzer.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-18001}
log=$(mktemp)
.venv/bin/edge-agent serve --grpc-address "127.0.0.1:$port" --log-format json >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 60); do grep -q agent.started "$log" && break; sleep 0.5; done
grep -q agent.started "$log" || { cat "$log"; exit 1; }
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--concurrency-range 1:16:3)
scripts/perf_analyzer -m digits -u "127.0.0.1:$port" -i grpc -s 30 "${args[@]}"
