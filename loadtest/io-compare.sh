#!/usr/bin/env bash
# mio against io_uring (`[server] io`), as reported in docs/performance.md ("IO drivers").
# The same broker config and binary for both, with `--io mio` or `--io io_uring`; broker
# pinned to cpu0 (one shard), generator to cpu1. Scenarios, per driver and run:
#   fanout-1x    fanout.toml as shipped: 1 000 dashboards, 1 M deliveries/s offered
#   fanout-cap   fanout.toml --dashboards 7000: 7 M/s offered, past one core's capacity
#   latency      fanout.toml --rate-multiplier 0.02: 1 000 dashboards, 20 updates/s
#   city         city-fleet.toml as shipped
# Per run, from the generator's report.json: deliveries per second, loss, the broker's CPU
# seconds over the window (/proc) per delivery, and latency (p50/p99, to the kernel's
# receive time with --socket-timestamps, and to the reader).
#   cargo build --release -p fleetcast -p fleetcast-load
#   loadtest/io-compare.sh [RUNS] [PORT]       # default 3 runs of each, port 18017
# Work files and reports: target/io-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${2:-18017}
DURATION=${DURATION:-10}
R=$PWD/target/release
W=target/io-bench
mkdir -p $W
cd $W
for s in fanout city-fleet; do
  sed "s/127.0.0.1:8000/127.0.0.1:$PORT/" ../../loadtest/scenarios/$s.broker.toml > $s.broker.toml
done
ulimit -n 20000
summary() { # report.json -> one line of figures
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d = r["delivery"]["delivered"]
cpu = (r.get("broker") or {}).get("cpu_seconds", 0.0)
lat = r.get("latency_ms", {})
k = r.get("socket_latency_ms") or {}
print(f"delivered={d} per_s={r['delivery']['per_second']:.0f} lost={r['delivery']['lost']} "
      f"broker_cpu_s={cpu:.2f} cpu_us_per_delivery={cpu / max(d, 1) * 1e6:.3f} "
      f"p50_ms={lat.get('p50', 0)} p99_ms={lat.get('p99', 0)} "
      f"kernel_p50_ms={k.get('p50', '-')} kernel_p99_ms={k.get('p99', '-')}")
PY
}
run() { # name io scenario-name extra...
  local name=$1 io=$2 scen=$3; shift 3
  ip tcp_metrics flush all 2>/dev/null || true
  taskset -c 0 $R/fleetcast serve --config $scen.broker.toml --io "$io" > broker-$name.log 2>&1 &
  local pid=$!
  sleep 1
  taskset -c 1 $R/fleetcast-load run --scenario ../../loadtest/scenarios/$scen.toml \
    --url ws://127.0.0.1:$PORT --broker-pid $pid --quiet --socket-timestamps \
    --duration "$DURATION" --out out/$name "$@" > run-$name.txt 2>&1 || true
  kill $pid
  wait $pid 2>/dev/null || true
  echo "$name $(summary out/$name/report.json)"
}
for i in $(seq 1 "$RUNS"); do
  for io in mio io_uring; do
    run fanout-1x-$io-$i $io fanout
    run fanout-cap-$io-$i $io fanout --dashboards 7000
    run latency-$io-$i $io fanout --rate-multiplier 0.02
    run city-$io-$i $io city-fleet
  done
done
