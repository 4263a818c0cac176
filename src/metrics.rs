//! Per-shard counters, written by their shard only (relaxed atomics, no contention) and
//! rendered, one series per shard, when `/metrics` is read.

use crate::model::Channel;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use crate::limit::Limit;

/// How an HTTP request head ended; counted in `fleetcast_handshakes_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Upgraded,
    Http,
    BadRequest,
    Unauthorized,
    Forbidden,
    RateLimited,
    Unavailable,
    NotFound,
    BadMethod,
    UpgradeRequired,
    TooLarge,
    Timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Upgraded,
        Outcome::Http,
        Outcome::BadRequest,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::Unavailable,
        Outcome::NotFound,
        Outcome::BadMethod,
        Outcome::UpgradeRequired,
        Outcome::TooLarge,
        Outcome::Timeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Upgraded => "upgraded",
            Outcome::Http => "http",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unavailable => "unavailable",
            Outcome::NotFound => "not_found",
            Outcome::BadMethod => "method_not_allowed",
            Outcome::UpgradeRequired => "upgrade_required",
            Outcome::TooLarge => "too_large",
            Outcome::Timeout => "timeout",
        }
    }

    pub fn from_status(status: u16) -> Outcome {
        match status {
            101 => Outcome::Upgraded,
            200 | 204 => Outcome::Http,
            401 => Outcome::Unauthorized,
            403 => Outcome::Forbidden,
            404 => Outcome::NotFound,
            405 => Outcome::BadMethod,
            408 => Outcome::Timeout,
            426 => Outcome::UpgradeRequired,
            429 => Outcome::RateLimited,
            431 => Outcome::TooLarge,
            503 => Outcome::Unavailable,
            _ => Outcome::BadRequest,
        }
    }
}

/// Why an event or message was not delivered; `fleetcast_drops_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// A pending state value replaced by a newer one for a slow consumer.
    Conflated,
    /// Queued frames discarded when a slow consumer was closed (1013).
    SlowConsumer,
    /// Inbound messages refused for rate (per connection or per vehicle).
    RateLimited,
    /// Publishes whose id was seen within the dedup window.
    Duplicate,
    /// State updates an overloaded shard skipped because a newer value of the same
    /// entity was waiting behind them (counted once per event and shard).
    Overload,
}

impl Drop {
    pub const ALL: [Drop; 5] = [
        Drop::Conflated,
        Drop::SlowConsumer,
        Drop::RateLimited,
        Drop::Duplicate,
        Drop::Overload,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Drop::Conflated => "conflated",
            Drop::SlowConsumer => "slow_consumer",
            Drop::RateLimited => "rate_limited",
            Drop::Duplicate => "duplicate",
            Drop::Overload => "overload",
        }
    }
}

/// Upper bounds of histogram buckets, in microseconds.
const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The count in each bucket so far (for a quantile over an interval: the difference
    /// of two snapshots, see [`quantile_ms`]).
    pub fn snapshot(&self) -> [u64; BUCKETS_US.len()] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, shard: usize) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {count}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {count}");
    }
}

/// Buckets of [`Histogram::snapshot`].
pub type Buckets = [u64; BUCKETS_US.len()];

/// The upper bound (ms) of the bucket holding quantile `q` of the observations counted
/// in `counts`; `None` without observations.
pub fn quantile_ms(counts: &Buckets, q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(BUCKETS_US[i] as f64 / 1000.0);
        }
    }
    BUCKETS_US.last().map(|b| *b as f64 / 1000.0)
}

#[derive(Debug, Default)]
pub struct ShardStats {
    pub connections_accepted: AtomicU64,
    /// Open connections by dialect ([`crate::dialect::DialectId`]).
    pub connections: [AtomicU64; crate::dialect::COUNT],
    pub connections_echo: AtomicU64,
    /// Upgrades that negotiated permessage-deflate.
    pub deflate_negotiated: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub publishes: [AtomicU64; Channel::COUNT],
    pub published_bytes: [AtomicU64; Channel::COUNT],
    pub deliveries: [AtomicU64; Channel::COUNT],
    pub delivered_bytes: [AtomicU64; Channel::COUNT],
    pub breaches: [AtomicU64; Limit::ALL.len()],
    pub handshakes: [AtomicU64; Outcome::ALL.len()],
    pub drops: [AtomicU64; Drop::ALL.len()],
    pub queued_bytes: AtomicU64,
    /// 1 while the shard is overloaded (see `limits.overload_lag_ms`).
    pub overloaded: AtomicU64,
    pub publish_to_write: Histogram,
    pub loop_iteration: Histogram,
    pub turns: AtomicU64,
    pub busy_ns: AtomicU64,
    /// UNIX ms at the end of the last loop turn (readiness).
    pub last_turn_ms: AtomicU64,
    pub tls: crate::tls::TlsStats,
    /// The shard runs its plain sockets on io_uring (`[server] io`), not mio.
    pub io_uring: std::sync::atomic::AtomicBool,
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl ShardStats {
    pub fn breach(&self, l: Limit) {
        inc(&self.breaches[l as usize], 1);
    }
    pub fn handshake(&self, o: Outcome) {
        inc(&self.handshakes[o as usize], 1);
    }
    pub fn drop(&self, d: Drop, n: u64) {
        inc(&self.drops[d as usize], n);
    }
    pub fn deliveries_total(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Prometheus text exposition of every shard's counters.
pub fn render(stats: &[ShardStats]) -> String {
    let mut out = String::new();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    type Get = fn(&ShardStats) -> &AtomicU64;
    let plain: [(&str, &str, &str, Get); 8] = [
        (
            "fleetcast_connections_accepted_total",
            "counter",
            "TCP connections accepted",
            |s| &s.connections_accepted,
        ),
        (
            "fleetcast_deflate_negotiated_total",
            "counter",
            "WebSocket upgrades that negotiated permessage-deflate",
            |s| &s.deflate_negotiated,
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
            "fleetcast_outbound_queued_bytes",
            "gauge",
            "Bytes queued for clients, not yet written",
            |s| &s.queued_bytes,
        ),
        (
            "fleetcast_shard_overloaded",
            "gauge",
            "1 while the shard's connections wait longer than limits.overload_lag_ms to be written (state updates are then batched and conflated)",
            |s| &s.overloaded,
        ),
        (
            "fleetcast_loop_turns_total",
            "counter",
            "Event-loop iterations",
            |s| &s.turns,
        ),
    ];
    for (name, kind, help, get) in plain {
        header(&mut out, name, kind, help);
        for (i, s) in stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", load(get(s)));
        }
    }
    header(
        &mut out,
        "fleetcast_io_driver",
        "gauge",
        "1 for the IO driver the shard runs on (mio, or io_uring when `[server] io` asks and the kernel allows)",
    );
    for (i, s) in stats.iter().enumerate() {
        let driver = if s.io_uring.load(Ordering::Relaxed) {
            "io_uring"
        } else {
            "mio"
        };
        let _ = writeln!(
            out,
            "fleetcast_io_driver{{shard=\"{i}\",driver=\"{driver}\"}} 1"
        );
    }
    header(
        &mut out,
        "fleetcast_loop_busy_seconds_total",
        "counter",
        "Time the event loop spent working (not waiting in poll)",
    );
    for (i, s) in stats.iter().enumerate() {
        let _ = writeln!(
            out,
            "fleetcast_loop_busy_seconds_total{{shard=\"{i}\"}} {}",
            load(&s.busy_ns) as f64 / 1e9
        );
    }
    header(
        &mut out,
        "fleetcast_connections_open",
        "gauge",
        "WebSocket connections open, by shard and dialect",
    );
    for (i, s) in stats.iter().enumerate() {
        let by_dialect = crate::dialect::CODECS
            .iter()
            .map(|c| (c.name(), &s.connections[c.id().0 as usize]));
        for (dialect, a) in by_dialect.chain([("echo", &s.connections_echo)]) {
            let _ = writeln!(
                out,
                "fleetcast_connections_open{{shard=\"{i}\",dialect=\"{dialect}\"}} {}",
                load(a)
            );
        }
    }
    type PerChannel = fn(&ShardStats) -> &[AtomicU64; Channel::COUNT];
    let by_channel: [(&str, &str, PerChannel); 3] = [
        (
            "fleetcast_publishes_total",
            "Events accepted from publishers, by channel",
            |s| &s.publishes,
        ),
        (
            "fleetcast_deliveries_total",
            "Events queued to subscribers, by channel",
            |s| &s.deliveries,
        ),
        (
            "fleetcast_delivered_bytes_total",
            "Bytes of events queued to subscribers, by channel",
            |s| &s.delivered_bytes,
        ),
    ];
    for (name, help, get) in by_channel {
        header(&mut out, name, "counter", help);
        for (i, s) in stats.iter().enumerate() {
            for c in Channel::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{i}\",channel=\"{c}\"}} {}",
                    load(&get(s)[c.index()])
                );
            }
        }
    }
    header(
        &mut out,
        "fleetcast_limit_breaches_total",
        "counter",
        "Limit breaches, by kind",
    );
    for (i, s) in stats.iter().enumerate() {
        for l in Limit::ALL {
            let _ = writeln!(
                out,
                "fleetcast_limit_breaches_total{{shard=\"{i}\",kind=\"{}\"}} {}",
                l.name(),
                load(&s.breaches[l as usize])
            );
        }
    }
    header(
        &mut out,
        "fleetcast_handshakes_total",
        "counter",
        "HTTP request heads, by outcome",
    );
    for (i, s) in stats.iter().enumerate() {
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "fleetcast_handshakes_total{{shard=\"{i}\",outcome=\"{}\"}} {}",
                o.name(),
                load(&s.handshakes[o as usize])
            );
        }
    }
    header(
        &mut out,
        "fleetcast_drops_total",
        "counter",
        "Events or messages not delivered, by reason",
    );
    for (i, s) in stats.iter().enumerate() {
        for d in Drop::ALL {
            let _ = writeln!(
                out,
                "fleetcast_drops_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                d.name(),
                load(&s.drops[d as usize])
            );
        }
    }
    header(
        &mut out,
        "fleetcast_publish_to_write_seconds",
        "histogram",
        "From accepting a publish to writing it to a subscriber's socket",
    );
    for (i, s) in stats.iter().enumerate() {
        s.publish_to_write
            .render(&mut out, "fleetcast_publish_to_write_seconds", i);
    }
    header(
        &mut out,
        "fleetcast_loop_iteration_seconds",
        "histogram",
        "Work time of one event-loop iteration",
    );
    for (i, s) in stats.iter().enumerate() {
        s.loop_iteration
            .render(&mut out, "fleetcast_loop_iteration_seconds", i);
    }
    crate::tls::render(&mut out, stats.iter().map(|s| &s.tls));
    out
}
