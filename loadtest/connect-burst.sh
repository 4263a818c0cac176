#!/usr/bin/env bash
# 1 000 dashboards connecting at the same instant (docs/performance.md, "Connect
# latency"): the idle scenario with 1 000 dashboards, `ramp_up_s = 0` and 1 000 connects
# in flight, against each IO driver. Broker pinned to cpu0 (one shard), generator to cpu1.
# Per run: connect (TCP + upgrade) p50/p99, its parts (queued in the generator before its
# connect() call; connect() to writable), subscribe p50/p99, and the time
# until all 1 000 were subscribed.
#   cargo build --release -p fleetcast -p fleetcast-load
#   loadtest/connect-burst.sh [RUNS] [PORT] [DRIVERS]   # default 3, 18018, "mio io_uring"
# Work files and reports: target/connect-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${2:-18018}
DRIVERS=${3:-mio io_uring}
R=$PWD/target/release
W=target/connect-bench
mkdir -p $W
cd $W
sed "s/127.0.0.1:8000/127.0.0.1:$PORT/" ../../loadtest/scenarios/idle.broker.toml > broker.toml
sed -e "s/^ramp_up_s = .*/ramp_up_s = 0/" -e "s/^connect_concurrency = .*/connect_concurrency = 1000/" \
    -e "s/^count = 15000/count = 1000/" ../../loadtest/scenarios/idle.toml > burst.toml
ulimit -n 20000
summary() {
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["connections"]
f = lambda p, k: p.get(k, 0)
print(f"ready={c['ready']} failed={c['failed']} setup_s={c['setup_s']:.3f} "
      f"connect_p50={f(c['connect_ms'],'p50')} connect_p99={f(c['connect_ms'],'p99')} "
      f"queued_p50={f(c.get('queue_ms',{}),'p50')} queued_p99={f(c.get('queue_ms',{}),'p99')} "
      f"tcp_p50={f(c.get('tcp_ms',{}),'p50')} tcp_p99={f(c.get('tcp_ms',{}),'p99')} "
      f"subscribe_p50={f(c['subscribe_ms'],'p50')} subscribe_p99={f(c['subscribe_ms'],'p99')}")
PY
}
for i in $(seq 1 "$RUNS"); do
  for io in $DRIVERS; do
    name=$io-$i
    ip tcp_metrics flush all 2>/dev/null || true
    taskset -c 0 $R/fleetcast serve --config broker.toml --io "$io" > broker-$name.log 2>&1 &
    pid=$!
    sleep 1
    taskset -c 1 $R/fleetcast-load run --scenario burst.toml --url ws://127.0.0.1:$PORT \
      --broker-pid $pid --quiet --duration 2 --out out/$name > run-$name.txt 2>&1 || true
    kill $pid
    wait $pid 2>/dev/null || true
    echo "$name $(summary out/$name/report.json)"
  done
done
