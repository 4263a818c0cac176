#!/usr/bin/env python3
"""Measures the broker's memory cost per vehicle of last known state and per event of
history: RSS growth of a release `fleetcast` while vehicles and alerts are published over
the HTTP API. Run: cargo build --release -p fleetcast && python3 benches/state_memory.py
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "memory-service-key-0123456789"
VEHICLES = int(os.environ.get("VEHICLES", "100000"))
EVENTS = int(os.environ.get("EVENTS", "3000"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def post(port, messages):
    body = json.dumps({"messages": messages}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/publish", data=body, method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        out = json.load(r)
    bad = [x for x in out["results"] if x["status"] != "accepted"]
    if bad:
        sys.exit(f"refused: {bad[:2]}")


def main():
    port = free_port()
    cfg = f"""
[server]
listen = "127.0.0.1:{port}"
shards = 1
[limits]
location_update_interval_ms = 0
max_vehicles_per_tenant = 1000000
max_http_body_bytes = 1048576
[limits.roles.service]
messages_per_second = 10000000
[history]
max_events = {EVENTS}
[[auth.api_keys]]
key = "{KEY}"
user_id = "memory"
tenant = "fleet_001"
role = "service"
"""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg)
    broker = subprocess.Popen([os.path.join(ROOT, "target/release/fleetcast"), "serve", "--config", f.name],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                time.sleep(0.05)
        post(port, [loc(0)])
        time.sleep(0.2)
        base = rss(broker.pid)
        for start in range(1, VEHICLES, 50):
            post(port, [loc(i) for i in range(start, min(start + 50, VEHICLES))])
        time.sleep(0.2)
        after_vehicles = rss(broker.pid)
        for start in range(0, EVENTS, 50):
            post(port, [alert(i) for i in range(start, min(start + 50, EVENTS))])
        time.sleep(0.2)
        after_events = rss(broker.pid)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        os.unlink(f.name)
    per_vehicle = (after_vehicles - base) / (VEHICLES - 1)
    per_event = (after_events - after_vehicles) / EVENTS
    print(f"vehicles={VEHICLES} rss_before={base} rss_after={after_vehicles} bytes_per_vehicle={per_vehicle:.0f}")
    print(f"events={EVENTS} rss_after={after_events} bytes_per_event={per_event:.0f}")
    print(f"payload bytes per location_update={len(json.dumps(loc(1)['payload']))}, per alert={len(json.dumps(alert(1)['payload']))}")


def loc(i):
    return {"type": "location_update", "payload": {
        "vehicle_id": f"vehicle_{i:06d}", "trip_id": f"trip_{i:06d}",
        "location": {"latitude": 40.7128, "longitude": -74.006, "accuracy": 5.2,
                     "altitude": 12.0, "heading": 245.5, "speed": 35.2},
        "driver_status": "driving"}}


def alert(i):
    return {"type": "safety_alert", "payload": {
        "alert_id": f"alert_{i:06d}", "severity": "high", "category": "harsh_braking",
        "vehicle_id": f"vehicle_{i % 1000:06d}", "driver_id": "driver_456",
        "location": {"latitude": 40.7128, "longitude": -74.006}}}


if __name__ == "__main__":
    main()
