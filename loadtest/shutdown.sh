#!/bin/sh
# Graceful shutdown paced across 15 000 clients (docs/performance.md): the idle
# scenario's 15 000 subscribed dashboards, then SIGTERM to the broker; prints how long
# the broker took to exit and what the dashboards saw (close codes). $RUNS runs
# (default 3); reports under $OUT, deleted unless KEEP=1.
set -eu
ulimit -n 20000
B=target/release/fleetcast
G=target/release/fleetcast-load
OUT=${OUT:-target/fleetcast-load/shutdown}
mkdir -p "$OUT"
for run in $(seq 1 "${RUNS:-3}"); do
  taskset -c 0 "$B" serve --config loadtest/scenarios/idle.broker.toml >"$OUT/broker.log" 2>&1 &
  pid=$!
  sleep 1
  dir="$OUT/run$run"
  taskset -c 1 "$G" run --scenario loadtest/scenarios/idle.toml --broker-pid "$pid" --duration 20 \
    --quiet --no-metrics --out "$dir" >"$dir.txt" 2>&1 &
  gen=$!
  # Connected within ~1-3 s; the window is 20 s: stop the broker in the middle of it.
  sleep 8
  rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  t0=$(date +%s%N)
  kill -TERM "$pid"
  wait "$pid" && code=0 || code=$?
  t1=$(date +%s%N)
  wait "$gen" || true
  echo "run $run: broker RSS ${rss} KiB at SIGTERM, exit $code after $(( (t1 - t0) / 1000000 )) ms;" \
    "dashboards saw: $(jq -c '.errors' "$dir/report.json" 2>/dev/null || tail -3 "$dir.txt")"
done
[ "${KEEP:-0}" = 1 ] || rm -rf "$OUT"
