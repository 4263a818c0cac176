#!/bin/sh
# The reconnect-storm figures of docs/performance.md: for each spread in $SPREADS
# (default "0 1 5"), $RUNS runs (default 3) of loadtest/scenarios/reconnect-storm.toml,
# a fresh broker per run on core 0, the generator on core 1. Prints one line per run;
# reports under $OUT (default target/fleetcast-load/storm), deleted unless KEEP=1.
#
#   cargo build --release -p fleetcast -p fleetcast-load
#   loadtest/storm.sh                # or SPREADS="1" RUNS=1 loadtest/storm.sh
set -eu
ulimit -n 20000
B=target/release/fleetcast
G=target/release/fleetcast-load
OUT=${OUT:-target/fleetcast-load/storm}
mkdir -p "$OUT"
for spread in ${SPREADS:-0 1 5}; do
  for run in $(seq 1 "${RUNS:-3}"); do
    taskset -c 0 "$B" serve --config loadtest/scenarios/reconnect-storm.broker.toml >"$OUT/broker.log" 2>&1 &
    pid=$!
    sleep 1
    dir="$OUT/spread$spread-run$run"
    taskset -c 1 "$G" run --scenario loadtest/scenarios/reconnect-storm.toml --broker-pid "$pid" \
      --storm-spread "$spread" --quiet --out "$dir" ${EXTRA_ARGS:-} >"$dir.txt" 2>&1 || true
    kill "$pid"
    wait "$pid" || true
    jq -r --arg s "$spread" --arg r "$run" '
      def p(x): "\(x.p50)/\(x.p99)/\(x.max)";
      "spread \($s) s run \($r): cut \(.storm.cut) resumed \(.storm.resumed) t99 \(.storm.resumed_99_ms) ms t100 \(.storm.resumed_100_ms) ms; " +
      "events owed \(.storm.events_owed) lost \(.storm.events_lost) extra \(.storm.events_extra) recovered:false \(.storm.not_recovered); " +
      "control p50/p99/max ms before \(p(.storm.control_before_ms)) during \(p(.storm.control_during_ms)) after \(p(.storm.control_after_ms)); " +
      "reconnect p99 \(.storm.reconnect_ms.p99) ms; broker RSS peak \(.broker.rss_mib_peak) MiB, CPU \(.broker.cpu_avg_pct) %; errors \(.error_total)"' \
      "$dir/report.json" 2>/dev/null || { echo "spread $spread run $run: no report"; tail -5 "$dir.txt"; }
  done
done
[ "${KEEP:-0}" = 1 ] || rm -rf "$OUT"
