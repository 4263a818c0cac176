#!/usr/bin/env bash
# ws:// against wss:// with fleetcast-load, as reported in docs/performance.md ("TLS").
# Broker pinned to cpu0 (one shard), generator to cpu1. For each run: the broker's CPU
# time (utime+stime from /proc, 10 ms ticks) over the whole run, and the generator's
# report. Needs openssl (for the test CA) and a release build:
#   cargo build --release -p fleetcast -p fleetcast-load
#   loadtest/tls-compare.sh [RUNS]            # default 3 runs of each
# Work files and reports: target/tls-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
R=$PWD/target/release
W=target/tls-bench
mkdir -p $W
cd $W
if [ ! -f cert.pem ]; then
  # An ECDSA P-256 CA and a leaf for localhost and 127.0.0.1.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
    -out ca.pem -days 30 -subj "/CN=fleetcast bench CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem \
    -out leaf.csr -subj "/CN=localhost" 2>/dev/null
  printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > ext.cnf
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
    -days 30 -extfile ext.cnf 2>/dev/null
fi
# The scenarios' broker configs plus a TLS listener on 8443.
for s in fanout idle; do
  (cat ../../loadtest/scenarios/$s.broker.toml
   printf '\n[server.tls]\nlisten = "127.0.0.1:8443"\ncert_file = "cert.pem"\nkey_file = "key.pem"\n') \
    > $s-tls.broker.toml
done
# A connect burst: idle.toml with every connection started at once (512 in flight).
sed 's/^ramp_up_s = 1/ramp_up_s = 0/' ../../loadtest/scenarios/idle.toml > idle-burst.toml
ulimit -n 20000
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # name scenario broker-config url extra...
  local name=$1 scen=$2 conf=$3 url=$4; shift 4
  taskset -c 0 $R/fleetcast serve --config $conf > broker-$name.log 2>&1 &
  local pid=$!
  sleep 1
  local c0
  c0=$(cpu $pid)
  taskset -c 1 $R/fleetcast-load run --scenario $scen --url $url --ca-file ca.pem \
    --broker-pid $pid --quiet --no-metrics --out out/$name "$@" > run-$name.txt 2>&1 || true
  local c1
  c1=$(cpu $pid)
  kill $pid
  wait $pid 2>/dev/null || true
  echo "$name broker_cpu_ticks=$((c1 - c0))"
  grep -E "connections |delivered |latency |loss |broker " run-$name.txt | sed 's/  */ /g'
}
F=../../loadtest/scenarios/fanout.toml
for i in $(seq 1 "$RUNS"); do
  run long-ws-$i $F fanout-tls.broker.toml ws://127.0.0.1:8000 --dashboards 200 --duration 15
  run long-wss-$i $F fanout-tls.broker.toml wss://localhost:8443 --dashboards 200 --duration 15
  run burst-ws-$i idle-burst.toml idle-tls.broker.toml ws://127.0.0.1:8000 --dashboards 3000 --duration 1
  run burst-wss-$i idle-burst.toml idle-tls.broker.toml wss://localhost:8443 --dashboards 3000 --duration 1
done
