#!/usr/bin/env bash
# fleetcast-load against two independent clients on the same workload (docs/performance.md,
# "Can an operator trust fleetcast-load's latency figures?"): 1 000 fleet-wide dashboards,
# 20 location updates/s (fanout.toml --rate-multiplier 0.02), a fresh broker per run on
# cpu0 (one shard), the client on cpu1. Per run and client: latency p50/p90/p99/p99.9 (ms).
#   fleetcast-load   to the dashboard socket's kernel receive time (its headline) and to its read
#   tokio            examples/plain_client --tokio: a tokio-tungstenite task per dashboard
#   threads          examples/plain_client: a blocking tungstenite thread per dashboard
#   cargo build --release -p fleetcast -p fleetcast-load --examples
#   loadtest/latency-compare.sh [RUNS] [PORT]     # default 3, 18019
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${2:-18019}
DURATION=${DURATION:-10}
R=$PWD/target/release
W=target/latency-bench
mkdir -p $W
cd $W
sed "s/127.0.0.1:8000/127.0.0.1:$PORT/" ../../loadtest/scenarios/fanout.broker.toml > broker.toml
ulimit -n 20000
broker() {
  ip tcp_metrics flush all 2>/dev/null || true
  taskset -c 0 $R/fleetcast serve --config broker.toml > broker.log 2>&1 &
  pid=$!
  sleep 1
}
for i in $(seq 1 "$RUNS"); do
  broker
  taskset -c 1 $R/fleetcast-load run --scenario ../../loadtest/scenarios/fanout.toml \
    --url ws://127.0.0.1:$PORT --broker-pid $pid --quiet --rate-multiplier 0.02 \
    --duration "$DURATION" --out out/load-$i > load-$i.txt 2>&1 || true
  kill $pid; wait $pid 2>/dev/null || true
  python3 - out/load-$i/report.json "$i" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = lambda p: " ".join(f"{k} {p.get(k, 0):.2f}" for k in ("p50", "p90", "p99", "p999"))
print(f"fleetcast-load-{sys.argv[2]} socket: {f(r['socket_latency_ms'])} | read: {f(r['latency_ms'])} | lost {r['delivery']['lost']}")
PY
  for mode in tokio threads; do
    broker
    flag=""; [ $mode = tokio ] && flag=--tokio
    taskset -c 1 $R/examples/plain_client --addr 127.0.0.1:$PORT --duration "$DURATION" $flag \
      > $mode-$i.txt 2>&1 || true
    kill $pid; wait $pid 2>/dev/null || true
    echo "$mode-$i $(grep -h 'latency ms' $mode-$i.txt) $(grep -ho 'received [0-9]* of [0-9]*' $mode-$i.txt)"
  done
done
