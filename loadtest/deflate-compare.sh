#!/usr/bin/env bash
# Without and with permessage-deflate, as reported in docs/performance.md ("Compression").
# The same broker config for both, with `compression = "on"` added to the scenario's
# (the default is off); the generator offers the extension only with --deflate, so
# "plain" runs are the uncompressed path and "deflate" runs the compressed one (the
# `negotiated` column shows the upgrades that agreed on it). Broker pinned to cpu0 (one shard), generator to cpu1.
# Per run, from the generator's report.json: deliveries, the broker's CPU seconds over the
# window (/proc), and the broker's own /metrics deltas (bytes written to sockets, events
# delivered), hence bytes on the wire and broker CPU per delivery; the generator's CPU
# (its inflate cost) and, with --socket-timestamps, latency to the kernel's receive time.
# bytes_out and deflate_negotiated read 0 before fleetcast-load scraped those names.
#   cargo build --release -p fleetcast -p fleetcast-load
#   loadtest/deflate-compare.sh [RUNS] [PORT]       # default 3 runs of each, port 18016
# Work files and reports: target/deflate-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${2:-18016}
R=$PWD/target/release
W=target/deflate-bench
mkdir -p $W
cd $W
for s in fanout city-fleet; do
  sed -e "s/127.0.0.1:8000/127.0.0.1:$PORT/" -e '/^\[server\]$/a compression = "on"' \
    ../../loadtest/scenarios/$s.broker.toml > $s.broker.toml
done
ulimit -n 20000
summary() { # report.json -> one line of figures
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.get("broker_metrics", {})
def total(prefix):
    return sum(v for k, v in m.items() if k.startswith(prefix))
d = r["delivery"]["delivered"]
cpu = (r.get("broker") or {}).get("cpu_seconds", 0.0)
gen = r.get("generator") or {}
out = total("fleetcast_bytes_out_total")
deliv = total("fleetcast_deliveries_total")
sock = r.get("socket_latency_ms") or {}
print(f"delivered={d} lost={r['delivery']['lost']} broker_cpu_s={cpu:.2f} "
      f"cpu_us_per_delivery={cpu / max(d, 1) * 1e6:.3f} "
      f"gen_cpu_s={gen.get('cpu_seconds', 0.0):.2f} gen_cpu_avg_pct={gen.get('cpu_avg_pct', 0.0)} "
      f"gen_cpu_max_pct={gen.get('cpu_max_pct', 0.0)} "
      f"bytes_out={out:.0f} wire_bytes_per_delivery={out / max(deliv, 1):.1f} "
      f"negotiated={total('fleetcast_deflate_negotiated_total'):.0f} "
      f"p50_ms={r['latency_ms'].get('p50', 0)} p99_ms={r['latency_ms'].get('p99', 0)} "
      f"sock_p50_ms={sock.get('p50', 0)} sock_p99_ms={sock.get('p99', 0)}")
EOF
}
run() { # name scenario-name extra...
  local name=$1 scen=$2; shift 2
  taskset -c 0 $R/fleetcast serve --config $scen.broker.toml > broker-$name.log 2>&1 &
  local pid=$!
  sleep 1
  taskset -c 1 $R/fleetcast-load run --scenario ../../loadtest/scenarios/$scen.toml \
    --url ws://127.0.0.1:$PORT --broker-pid $pid --quiet --socket-timestamps --out out/$name "$@" \
    > run-$name.txt 2>&1 || true
  kill $pid
  wait $pid 2>/dev/null || true
  echo "$name $(summary out/$name/report.json)"
}
# FANOUT_DASHBOARDS (default 200) sizes the fanout runs; ONLY=fanout skips city-fleet
# (e.g. FANOUT_DASHBOARDS=20 ONLY=fanout: a load the generator inflates without
# saturating its core, to tell its inflate cost from the broker's).
D=${FANOUT_DASHBOARDS:-200}
for i in $(seq 1 "$RUNS"); do
  run fanout$D-plain-$i fanout --dashboards $D --duration 10
  run fanout$D-deflate-$i fanout --dashboards $D --duration 10 --deflate
  if [ "${ONLY:-}" != fanout ]; then
    run city-plain-$i city-fleet --duration 10
    run city-deflate-$i city-fleet --duration 10 --deflate
  fi
done
