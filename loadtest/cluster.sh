#!/usr/bin/env bash
# Runs a fleetcast-load scenario against N fleetcast nodes in cluster mode on one
# nats-server (JetStream), all on this machine, and prints the broker side's CPU.
#
#   loadtest/cluster.sh SCENARIO NODES [fleetcast-load run args...]
#
# SCENARIO is a name under loadtest/scenarios (its .broker.toml is every node's config,
# with a [cluster] section added). NODES = 0 runs one plain node (no cluster) as the
# baseline. Brokers and nats-server are pinned to core 0 and the generator to core 1
# (taskset), as in docs/performance.md. Connections are spread round-robin over the
# nodes (fleetcast-load's comma-separated URL list). Needs a release build:
#   cargo build --release -p fleetcast -p fleetcast-load
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=$1
nodes=$2
shift 2
dir=$(mktemp -d /tmp/fleetcast-cluster-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cpu_ticks() { # utime + stime of every pid, in clock ticks
    local sum=0
    for p in "${pids[@]}"; do
        read -r -a f < "/proc/$p/stat"
        sum=$((sum + f[13] + f[14]))
    done
    echo "$sum"
}

nats_port=14222
if [ "$nodes" -gt 0 ]; then
    taskset -c 0 nats-server -a 127.0.0.1 -p $nats_port -js -sd "$dir/js" >"$dir/nats.log" 2>&1 &
    pids+=($!)
    sleep 0.5
fi
urls=()
for i in $(seq 0 $(( nodes > 0 ? nodes - 1 : 0 ))); do
    cfg="$dir/node$i.toml"
    cp "loadtest/scenarios/$scenario.broker.toml" "$cfg"
    if [ "$nodes" -gt 0 ]; then
        printf '\n[cluster]\nnats_url = "nats://127.0.0.1:%s"\nnode_name = "node%s"\n' \
            "$nats_port" "$i" >>"$cfg"
    fi
    port=$((8000 + i))
    taskset -c 0 target/release/fleetcast serve --config "$cfg" --listen "127.0.0.1:$port" \
        --shards 1 >"$dir/node$i.log" 2>&1 &
    pids+=($!)
    urls+=("ws://127.0.0.1:$port")
done
sleep 1
url=$(IFS=,; echo "${urls[*]}")
before=$(cpu_ticks)
start=$(date +%s.%N)
taskset -c 1 target/release/fleetcast-load run --scenario "loadtest/scenarios/$scenario.toml" \
    --url "$url" --quiet "$@"
end=$(date +%s.%N)
after=$(cpu_ticks)
hz=$(getconf CLK_TCK)
echo "broker side (${#pids[@]} processes: nodes + nats-server): $(echo "scale=2; ($after - $before) / $hz" | bc) CPU s over $(echo "scale=1; $end - $start" | bc) s"
