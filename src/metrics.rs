//! Per-shard counters, written by their shard only (relaxed atomics, no contention) and
//! summed when `/metrics` is read.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct ShardStats {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub publishes: AtomicU64,
    pub deliveries: AtomicU64,
    pub slow_consumers_closed: AtomicU64,
    pub turns: AtomicU64,
    pub busy_ns: AtomicU64,
    /// UNIX ms at the end of the last loop turn (readiness).
    pub last_turn_ms: AtomicU64,
}

/// Name, type, help text, and the counter it reads.
type Metric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardStats) -> &AtomicU64,
);

/// Prometheus text exposition of every shard's counters.
pub fn render(stats: &[ShardStats]) -> String {
    let mut out = String::new();
    let metrics: [Metric; 12] = [
        (
            "fleetcast_connections_accepted_total",
            "counter",
            "TCP connections accepted",
            |s| &s.connections_accepted,
        ),
        (
            "fleetcast_connections_open",
            "gauge",
            "WebSocket connections open",
            |s| &s.connections_open,
        ),
        (
            "fleetcast_handshakes_ok_total",
            "counter",
            "WebSocket upgrades completed",
            |s| &s.handshakes_ok,
        ),
        (
            "fleetcast_handshakes_failed_total",
            "counter",
            "Upgrades refused (bad request, auth)",
            |s| &s.handshakes_failed,
        ),
        (
            "fleetcast_messages_in_total",
            "counter",
            "WebSocket messages received",
            |s| &s.messages_in,
        ),
        (
            "fleetcast_bytes_in_total",
            "counter",
            "Bytes read from clients",
            |s| &s.bytes_in,
        ),
        (
            "fleetcast_bytes_out_total",
            "counter",
            "Bytes written to clients",
            |s| &s.bytes_out,
        ),
        (
            "fleetcast_publishes_total",
            "counter",
            "Events accepted from publishers",
            |s| &s.publishes,
        ),
        (
            "fleetcast_deliveries_total",
            "counter",
            "Events queued to subscribers",
            |s| &s.deliveries,
        ),
        (
            "fleetcast_slow_consumers_closed_total",
            "counter",
            "Connections closed 1013 (outbound queue full)",
            |s| &s.slow_consumers_closed,
        ),
        (
            "fleetcast_loop_turns_total",
            "counter",
            "Event-loop iterations",
            |s| &s.turns,
        ),
        (
            "fleetcast_loop_busy_seconds_total",
            "counter",
            "Time spent working in the event loop",
            |s| &s.busy_ns,
        ),
    ];
    for (name, kind, help, get) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in stats.iter().enumerate() {
            let v = get(s).load(Ordering::Relaxed);
            if name.ends_with("_seconds_total") {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", v as f64 / 1e9);
            } else {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {v}");
            }
        }
    }
    out
}
