//! Events the broker publishes itself, from shard 0 every `history.metrics_interval_ms`:
//! `fleet_metrics` derived per tenant from the live stream (SPEC §5), merged with the
//! fields a service published, and `system_status` on the admin-only `system` channel.
//! Computed only for tenants with subscribers on those channels.

use super::Store;
use crate::event::Publication;
use crate::hub::TenantHub;
use crate::json;
use crate::metrics::ShardStats;
use crate::model::{Channel, EntityKeys};
use crate::session::Now;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A vehicle counts as active when it reported within this window.
const ACTIVE_WINDOW: Duration = Duration::from_secs(300);

/// Previous readings, for rates.
#[derive(Debug, Default)]
pub struct Derived {
    tenant_seqs: HashMap<Arc<str>, (u64, Instant)>,
    node: Option<NodeReading>,
}

#[derive(Debug, Clone)]
struct NodeReading {
    at: Instant,
    cpu_ticks: u64,
    messages_in: u64,
    deliveries: u64,
    publishes: u64,
    /// Publish-to-write latency buckets, summed over shards.
    publish_to_write: crate::metrics::Buckets,
    drops: [u64; crate::metrics::Drop::ALL.len()],
    /// Time each shard's loop spent working (not waiting in poll).
    busy_ns: Vec<u64>,
}

impl Derived {
    /// Computes the derived events due now and hands each to `emit` (which publishes it
    /// through [`Store::broadcast`]).
    pub fn tick(
        &mut self,
        store: &Store<'_>,
        stats: &[ShardStats],
        now: Now,
        mut emit: impl FnMut(&TenantHub, Publication),
    ) {
        let mut system: Option<Vec<u8>> = None;
        for hub in store.hubs.all() {
            let wants = |c| hub.channel(c).lock().shard_mask != 0;
            if wants(Channel::FleetMetrics) {
                let payload = self.fleet_metrics(store, &hub, now);
                emit(&hub, broker_event(Channel::FleetMetrics, payload, now));
            }
            if wants(Channel::System) {
                let payload = system
                    .get_or_insert_with(|| self.system_status(store, stats, now))
                    .clone();
                emit(&hub, broker_event(Channel::System, payload, now));
            }
        }
    }

    fn fleet_metrics(&mut self, store: &Store<'_>, hub: &TenantHub, now: Now) -> Vec<u8> {
        let (mut active, mut speed_sum, mut speeds) = (0u64, 0f64, 0u64);
        let mut trips: HashSet<Box<str>> = HashSet::new();
        {
            let ch = hub.channel(Channel::VehicleLocations).lock();
            for ev in ch.states() {
                if now.mono.saturating_duration_since(ev.accepted_at) > ACTIVE_WINDOW {
                    continue;
                }
                active += 1;
                if let Some(s) = location_speed(ev.payload_bytes()) {
                    speed_sum += s;
                    speeds += 1;
                }
                if let Some(t) = &ev.keys.trip {
                    trips.insert(t.clone());
                }
            }
        }
        let alerts = hub
            .channel(Channel::Alerts)
            .lock()
            .alerts_last_hour(store.hubs.minute(now.mono));
        let published = hub
            .channel(Channel::FleetMetrics)
            .lock()
            .published_metrics
            .clone();
        let total: u64 = Channel::ALL
            .iter()
            .map(|c| hub.channel(*c).lock().seq)
            .sum();
        let rate = match self.tenant_seqs.insert(hub.id.clone(), (total, now.mono)) {
            Some((prev, at)) => {
                let secs = now.mono.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    (total - prev) as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        let service = published.as_ref().map(|e| e.payload_bytes());
        let mut o = Vec::with_capacity(256);
        o.extend_from_slice(b"{\"fleet_id\":");
        json::write_str(&mut o, &hub.id);
        o.extend_from_slice(b",\"metrics\":{\"active_vehicles\":");
        json::write_u64(&mut o, active);
        o.extend_from_slice(b",\"average_speed\":");
        let avg = if speeds > 0 {
            speed_sum / speeds as f64
        } else {
            0.0
        };
        o.extend_from_slice(format!("{:.1}", avg).as_bytes());
        o.extend_from_slice(b",\"active_trips\":");
        json::write_u64(&mut o, trips.len() as u64);
        o.extend_from_slice(b",\"messages_per_second\":");
        o.extend_from_slice(format!("{:.1}", rate).as_bytes());
        const DERIVED: [&str; 4] = [
            "active_vehicles",
            "average_speed",
            "active_trips",
            "messages_per_second",
        ];
        if let Some(metrics) = service.and_then(|s| json::member(s, "metrics")) {
            copy_members(&mut o, metrics, &DERIVED);
        }
        o.extend_from_slice(b"},\"alerts_summary\":{");
        for (i, name) in ["low", "medium", "high", "critical"]
            .iter()
            .enumerate()
            .rev()
        {
            json::write_key(&mut o, name);
            json::write_u64(&mut o, alerts[i] as u64);
            if i > 0 {
                o.push(b',');
            }
        }
        o.push(b'}');
        if let Some(s) = service {
            copy_members(
                &mut o,
                s,
                &["fleet_id", "metrics", "alerts_summary", "derived"],
            );
        }
        o.extend_from_slice(b",\"derived\":true}");
        o
    }

    fn system_status(&mut self, store: &Store<'_>, stats: &[ShardStats], now: Now) -> Vec<u8> {
        let sum = |f: fn(&ShardStats) -> u64| -> u64 { stats.iter().map(f).sum() };
        let reading = NodeReading {
            at: now.mono,
            cpu_ticks: proc_cpu_ticks().unwrap_or(0),
            messages_in: sum(|s| s.messages_in.load(Ordering::Relaxed)),
            deliveries: sum(|s| s.deliveries_total()),
            publishes: sum(|s| s.publishes.iter().map(|a| a.load(Ordering::Relaxed)).sum()),
            publish_to_write: stats.iter().fold([0; 14], |mut acc, s| {
                for (a, b) in acc.iter_mut().zip(s.publish_to_write.snapshot()) {
                    *a += b;
                }
                acc
            }),
            drops: std::array::from_fn(|i| {
                stats
                    .iter()
                    .map(|s| s.drops[i].load(Ordering::Relaxed))
                    .sum()
            }),
            busy_ns: stats
                .iter()
                .map(|s| s.busy_ns.load(Ordering::Relaxed))
                .collect(),
        };
        let prev = self.node.replace(reading.clone());
        let per_sec = |cur: u64, old: u64, secs: f64| {
            if secs > 0.0 {
                (cur.saturating_sub(old)) as f64 / secs
            } else {
                0.0
            }
        };
        let node = node_figures(stats, &reading, prev.as_ref());
        let (cpu, msgs, dels, pubs) = match prev {
            Some(p) => {
                let secs = reading.at.saturating_duration_since(p.at).as_secs_f64();
                (
                    // /proc reports CPU time in USER_HZ (100 per second on Linux).
                    per_sec(reading.cpu_ticks, p.cpu_ticks, secs),
                    per_sec(reading.messages_in, p.messages_in, secs),
                    per_sec(reading.deliveries, p.deliveries, secs),
                    per_sec(reading.publishes, p.publishes, secs),
                )
            }
            None => (0.0, 0.0, 0.0, 0.0),
        };
        let connections = sum(|s| {
            s.connections
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum()
        });
        let mut o = Vec::with_capacity(256);
        o.extend_from_slice(b"{\"cpu_percent\":");
        o.extend_from_slice(format!("{cpu:.1}").as_bytes());
        o.extend_from_slice(b",\"memory_rss_bytes\":");
        json::write_u64(&mut o, proc_rss_bytes().unwrap_or(0));
        o.extend_from_slice(b",\"active_connections\":");
        json::write_u64(&mut o, connections);
        o.extend_from_slice(b",\"messages_in_per_second\":");
        o.extend_from_slice(format!("{msgs:.1}").as_bytes());
        o.extend_from_slice(b",\"publishes_per_second\":");
        o.extend_from_slice(format!("{pubs:.1}").as_bytes());
        o.extend_from_slice(b",\"deliveries_per_second\":");
        o.extend_from_slice(format!("{dels:.1}").as_bytes());
        o.extend_from_slice(b",\"shards\":");
        json::write_u64(&mut o, stats.len() as u64);
        o.extend_from_slice(b",\"tenants\":");
        json::write_u64(&mut o, store.hubs.all().len() as u64);
        o.extend_from_slice(&node);
        o.extend_from_slice(b",\"uptime_seconds\":");
        json::write_u64(
            &mut o,
            now.mono
                .saturating_duration_since(store.hubs.started)
                .as_secs(),
        );
        o.push(b'}');
        o
    }
}

/// The node panel's figures of `system_status` (the dashboard's charts), as members to
/// append: connections by dialect; over the interval since `prev`, publish-to-write p99,
/// drops per second by reason and each shard loop's busy percentage.
fn node_figures(stats: &[ShardStats], cur: &NodeReading, prev: Option<&NodeReading>) -> Vec<u8> {
    let mut o = Vec::with_capacity(256);
    o.extend_from_slice(b",\"connections_by_dialect\":{");
    for (i, codec) in crate::dialect::CODECS.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        json::write_str(&mut o, codec.name());
        o.push(b':');
        let n = stats
            .iter()
            .map(|s| s.connections[i].load(Ordering::Relaxed))
            .sum();
        json::write_u64(&mut o, n);
    }
    o.push(b'}');
    let Some(p) = prev else {
        return o;
    };
    let secs = cur.at.saturating_duration_since(p.at).as_secs_f64();
    if secs <= 0.0 {
        return o;
    }
    let delta: crate::metrics::Buckets =
        std::array::from_fn(|i| cur.publish_to_write[i].saturating_sub(p.publish_to_write[i]));
    o.extend_from_slice(b",\"publish_to_write_p99_ms\":");
    match crate::metrics::quantile_ms(&delta, 0.99) {
        Some(ms) => o.extend_from_slice(format!("{ms}").as_bytes()),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"drops_per_second\":{");
    for (i, d) in crate::metrics::Drop::ALL.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        json::write_str(&mut o, d.name());
        let rate = cur.drops[i].saturating_sub(p.drops[i]) as f64 / secs;
        o.extend_from_slice(format!(":{rate:.1}").as_bytes());
    }
    o.extend_from_slice(b"},\"shard_busy_percent\":[");
    for (i, (c, old)) in cur.busy_ns.iter().zip(&p.busy_ns).enumerate() {
        if i > 0 {
            o.push(b',');
        }
        let pct = c.saturating_sub(*old) as f64 / 1e9 / secs * 100.0;
        o.extend_from_slice(format!("{pct:.1}").as_bytes());
    }
    o.push(b']');
    o
}

/// A broker-made event: no id (a fresh one is given), the broker's time.
fn broker_event(channel: Channel, payload: Vec<u8>, now: Now) -> Publication {
    Publication {
        channel,
        id: None,
        payload,
        keys: EntityKeys::default(),
        severity: None,
        category: None,
        status: None,
        canon: Default::default(),
        timestamp: crate::dialect::native::format_rfc3339_ms(now.unix_ms),
        ts_ms: now.unix_ms,
        ack: false,
        publisher: "broker".into(),
        bind_check: Default::default(),
    }
}

/// Appends `,"key":value` for each member of the object `obj` not named in `skip`.
fn copy_members(o: &mut Vec<u8>, obj: &[u8], skip: &[&str]) {
    for m in json::object_members(obj).unwrap_or_default() {
        let key = &obj[m.key.clone()];
        if skip.iter().any(|s| json::key_is(key, s)) {
            continue;
        }
        o.extend_from_slice(b",\"");
        o.extend_from_slice(key);
        o.extend_from_slice(b"\":");
        o.extend_from_slice(&obj[m.value.clone()]);
    }
}

/// `location.speed` of a location payload, read without parsing the rest.
fn location_speed(payload: &[u8]) -> Option<f64> {
    let loc = json::member(payload, "location")?;
    std::str::from_utf8(json::member(loc, "speed")?)
        .ok()?
        .parse()
        .ok()
}

/// User + system CPU time of this process, in USER_HZ ticks (percent of one core when
/// divided by seconds, as USER_HZ is 100).
fn proc_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn proc_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_speed_and_copies_members() {
        assert_eq!(
            location_speed(br#"{"vehicle_id":"v","location":{"latitude":1,"speed":35.5}}"#),
            Some(35.5)
        );
        assert_eq!(location_speed(br#"{"location":{"latitude":1}}"#), None);
        let mut o = Vec::new();
        copy_members(
            &mut o,
            br#"{"a":1,"fleet_id":"x","b":{"c":[1]}}"#,
            &["fleet_id"],
        );
        assert_eq!(o, br#","a":1,"b":{"c":[1]}"#);
        assert!(proc_rss_bytes().unwrap() > 0);
        assert!(proc_cpu_ticks().is_some());
    }
}
