//! From raw measurements to the report: accounting (expected vs delivered per
//! subscriber), percentiles, the text summary, the JSON file and the HTML page.

use crate::engine::{DashResult, Second, WorkerResult, latency_histogram};
use crate::scenario::{LocSub, Plan};
use crate::svg::{self, COLORS, Chart, Series};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds, in milliseconds.
    pub fn from_us(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub tenants: usize,
    pub vehicles: u64,
    pub vehicle_connections: usize,
    pub service_connections: usize,
    pub dashboards: usize,
    pub dashboard_groups: Vec<String>,
    pub duration_s: f64,
    pub ramp_up_s: f64,
    pub offered_location_updates_per_s: f64,
    pub offered_alerts_per_s: f64,
    pub offered_trip_events_per_s: f64,
    pub offered_deliveries_per_s: f64,
    pub threads: usize,
    pub cpus: usize,
    pub source_addresses: u32,
    pub fd_soft_limit: u64,
    pub fd_hard_limit: u64,
    pub max_connections: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    pub planned: u64,
    pub ready: u64,
    pub failed: u64,
    /// TCP connect + WebSocket upgrade.
    pub connect_ms: Percentiles,
    /// Dashboards: the part of it before the generator called `connect()` (its own
    /// queue: the other sockets due at the same time are created first).
    #[serde(default)]
    pub queue_ms: Percentiles,
    /// Dashboards: the TCP part of it (the `connect()` call until the socket is
    /// writable, as the generator's event loop sees it).
    #[serde(default)]
    pub tcp_ms: Percentiles,
    /// Dashboards: first subscribe sent to the last `subscribed` received.
    pub subscribe_ms: Percentiles,
    /// From the first connect to all connections ready (or given up).
    pub setup_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub location_updates: u64,
    pub alerts: u64,
    pub trip_events: u64,
    pub total: u64,
    /// Refused by the broker with an `error` naming the publish.
    pub rejected: u64,
    pub per_second: f64,
    /// Actual send minus scheduled send.
    pub send_lag_ms: Percentiles,
    /// Publishes written behind unsent bytes (the broker was not reading).
    pub backpressured: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Deliveries owed: accepted publishes x subscribers whose subscription matches.
    pub expected: u64,
    /// Live deliveries received (snapshots and earlier runs' events excluded).
    pub delivered: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub duplicates: u64,
    /// Events outside the subscription, or more than were owed.
    pub unexpected: u64,
    /// Events from before this run (snapshots), not counted.
    pub stale: u64,
    /// Events without a readable `t_us`.
    pub unparsed: u64,
    /// Delivered over the window and the drain after it.
    pub per_second: f64,
    pub mib_per_second: f64,
    pub subscribers: u64,
    pub subscribers_with_loss: u64,
    pub worst_subscriber_loss: u64,
    /// Subscribers whose connection ended during the run (e.g. close 1013).
    pub subscribers_ended_early: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcUse {
    pub pid: Option<u32>,
    /// The CPUs it may run on (its affinity).
    pub cpus: Vec<usize>,
    /// Over the publishing window; 100 = one core.
    pub cpu_avg_pct: f64,
    pub cpu_max_pct: f64,
    pub cpu_seconds: f64,
    pub rss_mib_end: f64,
    pub rss_mib_peak: f64,
}

/// One CPU of the machine over the publishing window (from /proc/stat): everything it
/// ran, including kernel softirq work (loopback TCP) that no process is charged for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub cpu: usize,
    pub busy_avg_pct: f64,
    pub softirq_avg_pct: f64,
    pub busy_max_pct: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    pub group: String,
    pub dashboards: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriberRow {
    pub tenant: String,
    pub group: u32,
    pub index: u32,
    pub subscription: String,
    pub ready: bool,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub ended: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimePoint {
    /// Seconds since the generator started connecting.
    pub t_s: f64,
    pub sent: u64,
    pub delivered: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub open_connections: i64,
    pub generator_cpu_pct: f64,
    pub broker_cpu_pct: Option<f64>,
    pub broker_rss_mib: Option<f64>,
    /// Busy % of each CPU of the machine in that second.
    pub machine_cpu_busy_pct: Vec<f64>,
}

/// Phase boundaries in seconds since the generator started connecting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub connected_s: f64,
    pub start_s: f64,
    pub end_s: f64,
    pub drained_s: f64,
    /// The drain stopped waiting before every owed delivery arrived.
    pub drain_timed_out: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub held: bool,
    pub slo_p99_ms: f64,
    pub slo_loss: f64,
    pub slo_max_errors: u64,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    pub description: String,
    /// What was varied (capacity steps), else empty.
    pub label: String,
    pub started_at: String,
    pub url: String,
    pub setup: Setup,
    pub window: Window,
    pub connections: Connections,
    pub published: Published,
    pub delivery: Delivery,
    /// End to end, from the scheduled send time to the subscriber's read.
    pub latency_ms: Percentiles,
    /// (percentile, ms) points of the latency distribution.
    pub latency_curve: Vec<(f64, f64)>,
    /// From the scheduled send time to the kernel's receive time on the dashboard's
    /// socket: the same deliveries without the generator's queueing before its read.
    pub socket_latency_ms: Percentiles,
    pub socket_latency_curve: Vec<(f64, f64)>,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub generator: ProcUse,
    pub broker: Option<ProcUse>,
    /// Every CPU of the machine over the window.
    pub machine_cpus: Vec<CpuUse>,
    /// Deltas of the broker's own counters over the run (fleetcast's /metrics), if any.
    pub broker_metrics: BTreeMap<String, f64>,
    pub groups: Vec<GroupRow>,
    pub subscribers: Vec<SubscriberRow>,
    pub timeline: Vec<TimePoint>,
    pub warnings: Vec<String>,
    pub verdict: Option<Verdict>,
    /// The reconnect storm (scenarios with `[storm]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormReport>,
}

impl Report {
    /// The latency that describes the broker: to the dashboard socket's kernel receive
    /// time when it was measured (`socket_timestamps`), else to the generator's read.
    pub fn headline_latency(&self) -> &Percentiles {
        if self.socket_latency_ms.count > 0 {
            &self.socket_latency_ms
        } else {
            &self.latency_ms
        }
    }
}

/// What a reconnect storm cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    pub at_s: f64,
    pub spread_s: f64,
    pub settle_s: f64,
    /// Dashboards cut at once.
    pub cut: u64,
    /// Of those, every subscription answered again (snapshot and `since` resume asked).
    pub resumed: u64,
    /// From the cut until 99 % / 100 % of the cut dashboards were resumed (ms); `None`
    /// when that many never were.
    pub resumed_99_ms: Option<f64>,
    pub resumed_100_ms: Option<f64>,
    /// TCP + upgrade of the reconnects.
    pub reconnect_ms: Percentiles,
    /// `subscribed` replies saying `"recovered":false` (history gap: events lost).
    pub not_recovered: u64,
    /// Alerts and trip events owed to the cut dashboards over the whole run, and how
    /// many of them never arrived (must be 0: `since` resume).
    pub events_owed: u64,
    pub events_lost: u64,
    /// Events beyond what was owed (a replay that duplicates).
    pub events_extra: u64,
    /// Latency of the control group (dashboards not cut) by publish time.
    pub control_before_ms: Percentiles,
    pub control_during_ms: Percentiles,
    pub control_after_ms: Percentiles,
}

/// One coordinator sample (once a second).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t_s: f64,
    pub open: i64,
    pub generator_cpu_pct: f64,
    pub broker_cpu_pct: Option<f64>,
    pub broker_rss: Option<u64>,
    /// (busy %, softirq %) of each CPU in the last second.
    pub machine: Vec<(f64, f64)>,
}

/// Everything a run measured.
pub struct RunData {
    pub plan: Plan,
    pub label: String,
    pub url: String,
    pub started_unix_s: u64,
    pub threads: usize,
    pub cpus: usize,
    pub fd: crate::sys::FdLimit,
    pub window: Window,
    pub workers: Vec<WorkerResult>,
    pub seconds: Vec<Second>,
    pub samples: Vec<Sample>,
    pub generator: ProcUse,
    pub broker: Option<ProcUse>,
    pub machine_cpus: Vec<CpuUse>,
    pub broker_metrics: BTreeMap<String, f64>,
}

/// What a subscriber is owed, given the accepted publishes of its tenant.
pub struct Accepted {
    pub locations: Vec<u64>,
    pub alerts: [u64; 4],
    pub trips: u64,
}

impl Accepted {
    /// Alerts and trip events owed (event channels: complete after a `since` resume).
    pub fn owed_events(&self, d: &DashResult) -> u64 {
        let alerts: u64 = (0..4)
            .filter(|i| d.sub.alert_mask & (1 << i) != 0)
            .map(|i| self.alerts[i])
            .sum();
        alerts + if d.sub.trips { self.trips } else { 0 }
    }

    pub fn owed(&self, d: &DashResult) -> u64 {
        let loc = match &d.sub.locations {
            LocSub::None => 0,
            LocSub::Fleet => self.locations.iter().sum(),
            LocSub::Vehicles(vs) => vs
                .iter()
                .map(|&v| self.locations.get(v as usize).copied().unwrap_or(0))
                .sum(),
        };
        let alerts: u64 = (0..4)
            .filter(|i| d.sub.alert_mask & (1 << i) != 0)
            .map(|i| self.alerts[i])
            .sum();
        loc + alerts + if d.sub.trips { self.trips } else { 0 }
    }
}

pub fn build(data: RunData) -> Report {
    let plan = &data.plan;
    let s = &plan.scenario;
    let mut latency = latency_histogram(3);
    let mut socket_latency = latency_histogram(3);
    let mut send_lag = latency_histogram(3);
    let mut connect = latency_histogram(3);
    let mut tcp = latency_histogram(3);
    let mut connect_queue = latency_histogram(3);
    let mut subscribe = latency_histogram(3);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut accepted: Vec<Accepted> = plan
        .tenants
        .iter()
        .map(|t| Accepted {
            locations: vec![0; t.vehicles as usize],
            alerts: [0; 4],
            trips: 0,
        })
        .collect();
    let mut published = Published::default();
    let mut unparsed = 0;
    let mut bytes_in = 0;
    let mut control = [
        latency_histogram(3),
        latency_histogram(3),
        latency_histogram(3),
    ];
    let mut reconnect = latency_histogram(3);
    let mut not_recovered = 0;
    for w in &data.workers {
        for (c, wc) in control.iter_mut().zip(&w.control) {
            let _ = c.add(wc);
        }
        let _ = reconnect.add(&w.reconnect);
        not_recovered += w.not_recovered;
        let _ = latency.add(&w.latency);
        let _ = socket_latency.add(&w.socket_latency);
        let _ = send_lag.add(&w.send_lag);
        let _ = connect.add(&w.connect);
        let _ = tcp.add(&w.tcp);
        let _ = connect_queue.add(&w.connect_queue);
        let _ = subscribe.add(&w.subscribe);
        for (k, v) in &w.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        unparsed += w.unparsed;
        bytes_in += w.bytes_in;
        published.backpressured += w.backpressured;
        for v in &w.vehicles {
            let a = &mut accepted[v.tenant as usize];
            for (s, (&sent, &rej)) in v.sent.iter().zip(&v.rejected).enumerate() {
                a.locations[v.first as usize + s] += (sent as u64).saturating_sub(rej as u64);
                published.location_updates += sent as u64;
                published.rejected += rej as u64;
            }
        }
        for sc in &w.services {
            let a = &mut accepted[sc.tenant as usize];
            for i in 0..4 {
                a.alerts[i] += sc.alerts_sent[i].saturating_sub(sc.alerts_rejected[i]);
                published.alerts += sc.alerts_sent[i];
                published.rejected += sc.alerts_rejected[i];
            }
            a.trips += sc.trips_sent.saturating_sub(sc.trips_rejected);
            published.trip_events += sc.trips_sent;
            published.rejected += sc.trips_rejected;
        }
    }
    let window_s = (data.window.end_s - data.window.start_s).max(1e-9);
    published.total = published.location_updates + published.alerts + published.trip_events;
    published.per_second = (published.total as f64 / window_s * 10.0).round() / 10.0;
    published.send_lag_ms = Percentiles::from_us(&send_lag);

    // Per subscriber.
    let mut delivery = Delivery {
        unparsed,
        ..Default::default()
    };
    let mut groups: Vec<GroupRow> = plan
        .groups
        .iter()
        .map(|g| GroupRow {
            group: g.clone(),
            ..Default::default()
        })
        .collect();
    let mut subscribers = Vec::new();
    let mut dashes: Vec<&DashResult> = data.workers.iter().flat_map(|w| &w.dashboards).collect();
    dashes.sort_by_key(|d| (d.tenant, d.index));
    let mut storm = s.storm.map(|st| StormReport {
        at_s: st.at_s,
        spread_s: st.spread_s,
        settle_s: st.settle_s,
        reconnect_ms: Percentiles::from_us(&reconnect),
        not_recovered,
        control_before_ms: Percentiles::from_us(&control[0]),
        control_during_ms: Percentiles::from_us(&control[1]),
        control_after_ms: Percentiles::from_us(&control[2]),
        ..Default::default()
    });
    let mut resume_us: Vec<u64> = Vec::new();
    for d in dashes {
        let received = d.locations + d.alerts + d.trips;
        let valid = received.saturating_sub(d.duplicates + d.unexpected);
        let (expected, lost, extra) = if d.ready && d.cut {
            // Cut by the storm: its locations come back as a snapshot (a state
            // channel: what was published while it was away is superseded, not owed);
            // its alerts and trip events are owed in full (`since` resume).
            let e = accepted[d.tenant as usize].owed_events(d);
            let got = d.events;
            if let Some(st) = storm.as_mut() {
                st.cut += 1;
                st.events_owed += e;
                st.events_lost += e.saturating_sub(got);
                st.events_extra += got.saturating_sub(e);
            }
            if let Some(us) = d.resumed_after_us {
                resume_us.push(us);
            }
            (e, e.saturating_sub(got), got.saturating_sub(e))
        } else if d.ready {
            let e = accepted[d.tenant as usize].owed(d);
            (e, e.saturating_sub(valid), valid.saturating_sub(e))
        } else {
            (0, 0, 0)
        };
        let unexpected = d.unexpected + extra;
        delivery.stale += d.stale;
        if d.ready {
            delivery.subscribers += 1;
            delivery.expected += expected;
            delivery.delivered += received;
            delivery.lost += lost;
            delivery.duplicates += d.duplicates;
            delivery.unexpected += unexpected;
            if lost > 0 {
                delivery.subscribers_with_loss += 1;
            }
            delivery.worst_subscriber_loss = delivery.worst_subscriber_loss.max(lost);
            if d.ended.is_some() {
                delivery.subscribers_ended_early += 1;
            }
            if let Some(g) = groups.get_mut(d.group as usize) {
                g.dashboards += 1;
                g.expected += expected;
                g.delivered += received;
                g.lost += lost;
            }
        }
        subscribers.push(SubscriberRow {
            tenant: plan.tenants[d.tenant as usize].id.clone(),
            group: d.group,
            index: d.index,
            subscription: d.sub.describe(),
            ready: d.ready,
            expected,
            delivered: received,
            lost,
            duplicates: d.duplicates,
            unexpected,
            ended: d.ended.clone(),
        });
    }
    if let Some(st) = storm.as_mut() {
        resume_us.sort_unstable();
        st.resumed = resume_us.len() as u64;
        let at = |q: f64| {
            let need = ((st.cut as f64 * q).ceil() as usize).max(1);
            resume_us.get(need - 1).map(|&us| us as f64 / 1000.0)
        };
        if st.cut > 0 {
            st.resumed_99_ms = at(0.99);
            st.resumed_100_ms = at(1.0);
        }
    }
    delivery.loss_ratio = if delivery.expected > 0 {
        delivery.lost as f64 / delivery.expected as f64
    } else {
        0.0
    };
    // Over the window and the drain: a broker that falls behind delivers after the
    // window, and dividing by the window alone would overstate what it sustained.
    let deliver_s = (data.window.drained_s - data.window.start_s).max(window_s);
    delivery.per_second = (delivery.delivered as f64 / deliver_s).round();
    delivery.mib_per_second =
        (bytes_in as f64 / deliver_s / (1024.0 * 1024.0) * 100.0).round() / 100.0;

    let connections = Connections {
        planned: plan.conns.len() as u64,
        ready: 0,
        failed: 0,
        connect_ms: Percentiles::from_us(&connect),
        queue_ms: Percentiles::from_us(&connect_queue),
        tcp_ms: Percentiles::from_us(&tcp),
        subscribe_ms: Percentiles::from_us(&subscribe),
        setup_s: data.window.connected_s,
    };

    // Timeline: threads' seconds merged, joined with the coordinator's samples.
    let mut by_sec: BTreeMap<u32, Second> = BTreeMap::new();
    for sec in data.seconds {
        match by_sec.get_mut(&sec.sec) {
            Some(m) => {
                m.sent += sec.sent;
                m.delivered += sec.delivered;
                m.errors += sec.errors;
                let _ = m.latency.add(&sec.latency);
            }
            None => {
                by_sec.insert(sec.sec, sec);
            }
        }
    }
    let last_sec = by_sec
        .keys()
        .last()
        .copied()
        .unwrap_or(0)
        .max(data.samples.len() as u32);
    let mut timeline = Vec::new();
    for sec in 0..=last_sec {
        let m = by_sec.get(&sec);
        let sample = data.samples.get(sec as usize);
        let ms = |q: f64| {
            m.filter(|m| !m.latency.is_empty())
                .map(|m| m.latency.value_at_quantile(q) as f64 / 1000.0)
                .unwrap_or(0.0)
        };
        timeline.push(TimePoint {
            t_s: sec as f64 + 1.0,
            sent: m.map(|m| m.sent).unwrap_or(0),
            delivered: m.map(|m| m.delivered).unwrap_or(0),
            errors: m.map(|m| m.errors).unwrap_or(0),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: m
                .filter(|m| !m.latency.is_empty())
                .map(|m| m.latency.max() as f64 / 1000.0)
                .unwrap_or(0.0),
            open_connections: sample.map(|s| s.open).unwrap_or(0),
            generator_cpu_pct: sample.map(|s| s.generator_cpu_pct).unwrap_or(0.0),
            broker_cpu_pct: sample.and_then(|s| s.broker_cpu_pct),
            broker_rss_mib: sample.and_then(|s| s.broker_rss.map(mib)),
            machine_cpu_busy_pct: sample
                .map(|s| {
                    s.machine
                        .iter()
                        .map(|m| (m.0 * 10.0).round() / 10.0)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    // Drop trailing empty seconds past the last sample.
    while timeline.len() > data.samples.len().max(1)
        && timeline
            .last()
            .is_some_and(|t| t.sent == 0 && t.delivered == 0)
    {
        timeline.pop();
    }

    let latency_curve = curve(&latency);
    let socket_latency_curve = curve(&socket_latency);

    let error_total = errors.values().sum();
    let (loc, al, tr) = plan.offered_rates();
    let mut report = Report {
        tool: "fleetcast-load".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        scenario: s.name.clone(),
        description: s.description.clone(),
        label: data.label.clone(),
        started_at: crate::clock::rfc3339(data.started_unix_s),
        url: data.url.clone(),
        setup: Setup {
            tenants: plan.tenants.len(),
            vehicles: plan.vehicles(),
            vehicle_connections: plan
                .count(|k| matches!(k, crate::scenario::ConnKind::Vehicles { .. })),
            service_connections: plan
                .count(|k| matches!(k, crate::scenario::ConnKind::Service { .. })),
            dashboards: plan.dashboards(),
            dashboard_groups: plan.groups.clone(),
            duration_s: s.duration_s,
            ramp_up_s: s.ramp_up_s,
            offered_location_updates_per_s: loc,
            offered_alerts_per_s: al,
            offered_trip_events_per_s: tr,
            offered_deliveries_per_s: plan.offered_deliveries(),
            threads: data.threads,
            cpus: data.cpus,
            source_addresses: s.source_addresses,
            fd_soft_limit: data.fd.soft,
            fd_hard_limit: data.fd.hard,
            max_connections: data.fd.max_connections(),
        },
        window: data.window.clone(),
        connections,
        published,
        delivery,
        latency_ms: Percentiles::from_us(&latency),
        latency_curve,
        socket_latency_ms: Percentiles::from_us(&socket_latency),
        socket_latency_curve,
        errors,
        error_total,
        generator: data.generator.clone(),
        broker: data.broker.clone(),
        machine_cpus: data.machine_cpus.clone(),
        broker_metrics: data.broker_metrics.clone(),
        groups,
        subscribers,
        timeline,
        warnings: Vec::new(),
        verdict: None,
        storm,
    };
    let failed: u64 = report
        .errors
        .iter()
        .filter(|(k, _)| is_connect_failure(k))
        .map(|(_, v)| v)
        .sum();
    report.connections.failed = failed;
    report.connections.ready = report.connections.planned.saturating_sub(failed);
    report.warnings = warnings(&report);
    report
}

/// (percentile, ms) from 0 % to 99.999 % in steps of a tenth of a "nine", then 100 %.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    for i in 0..=50 {
        let q = 1.0 - 10f64.powf(-(i as f64) / 10.0);
        out.push((
            (q * 100.0 * 1e5).round() / 1e5,
            h.value_at_quantile(q) as f64 / 1000.0,
        ));
    }
    out.push((100.0, h.max() as f64 / 1000.0));
    out
}

fn is_connect_failure(key: &str) -> bool {
    key.starts_with("tcp connect")
        || key.starts_with("http ")
        || key.starts_with("timeout")
        || key.starts_with("subscribe refused")
        || key == "eof during upgrade"
        || key.starts_with("protocol: bad Sec")
}

pub fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

/// What a reader should know before trusting the figures.
pub fn warnings(r: &Report) -> Vec<String> {
    let mut w = Vec::new();
    let cores = r.setup.cpus.max(1) as f64;
    let own: Vec<&CpuUse> = r
        .machine_cpus
        .iter()
        .filter(|c| r.generator.cpus.contains(&c.cpu))
        .collect();
    let own_busy = if own.is_empty() {
        0.0
    } else {
        own.iter().map(|c| c.busy_avg_pct).sum::<f64>() / own.len() as f64
    };
    if r.generator.cpu_max_pct >= 90.0 * cores || own_busy >= 95.0 {
        w.push(format!(
            "the generator may have been the bottleneck: its process used {:.0}% CPU on \
             average ({:.0}% max; {:.0}% = all of its {} CPU(s)) and its CPU(s) {:?} were \
             {:.0}% busy in all (kernel softirq work and other processes included); check the \
             send lag",
            r.generator.cpu_avg_pct,
            r.generator.cpu_max_pct,
            100.0 * cores,
            r.setup.cpus,
            r.generator.cpus,
            own_busy
        ));
    }
    // A core much busier than the process that has it to itself: something else ran
    // there (this kernel charges softirq work to the process it interrupts).
    let mut alone = vec![("generator", &r.generator)];
    if let Some(b) = &r.broker {
        alone.push(("broker", b));
    }
    for (name, p) in alone {
        if let [cpu] = p.cpus[..]
            && let Some(c) = r.machine_cpus.iter().find(|c| c.cpu == cpu)
            && c.busy_avg_pct - p.cpu_avg_pct > 15.0
        {
            w.push(format!(
                "cpu{cpu} was {:.0}% busy but the {name} pinned to it used {:.0}%: other \
                 processes competed for it, so these figures are not reliable",
                c.busy_avg_pct, p.cpu_avg_pct
            ));
        }
    }
    if let Some(b) = &r.broker {
        let shared: Vec<usize> = b
            .cpus
            .iter()
            .filter(|c| r.generator.cpus.contains(c))
            .copied()
            .collect();
        if !shared.is_empty() {
            w.push(format!(
                "the broker and the generator share CPU(s) {shared:?}: pin them apart \
                 (taskset) for figures that measure the broker"
            ));
        }
    }
    if r.published.send_lag_ms.p99 > 1.0 {
        w.push(format!(
            "publishes went out late (send lag p99 {:.2} ms, max {:.2} ms); latency is \
             measured from the scheduled time, so it includes this",
            r.published.send_lag_ms.p99, r.published.send_lag_ms.max
        ));
    }
    if r.connections.failed > 0 {
        w.push(format!(
            "{} of {} connections never became ready (see errors)",
            r.connections.failed, r.connections.planned
        ));
    }
    if r.window.drain_timed_out && r.delivery.lost > 0 {
        w.push(format!(
            "the drain gave up {:.1} s after the window with deliveries outstanding",
            r.window.drained_s - r.window.end_s
        ));
    }
    if r.delivery.unparsed > 0 {
        w.push(format!(
            "{} events carried no readable t_us (not from this generator?)",
            r.delivery.unparsed
        ));
    }
    if r.delivery.duplicates > 0 || r.delivery.unexpected > 0 {
        w.push(format!(
            "{} duplicate or out-of-order and {} unexpected deliveries (outside the \
             subscription or more than published)",
            r.delivery.duplicates, r.delivery.unexpected
        ));
    }
    for (k, v) in &r.broker_metrics {
        if k.contains("reason=\"conflated\"") && *v > 0.0 {
            w.push(format!(
                "the broker conflated {v} state updates for slow consumers \
                 (limits.soft_outbound_bytes): those count as lost here"
            ));
        }
        if k.contains("reason=\"overload\"") && *v > 0.0 {
            w.push(format!(
                "the broker was overloaded and skipped {v} superseded state updates \
                 (limits.overload_lag_ms; each is lost for every subscriber of it)"
            ));
        }
    }
    if r.published.backpressured > 0 {
        w.push(format!(
            "{} publishes waited behind unsent bytes (the broker was not reading fast enough)",
            r.published.backpressured
        ));
    }
    w
}

fn pct_row(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        ms3(p.p50),
        ms3(p.p90),
        ms3(p.p99),
        ms3(p.p999),
        ms3(p.max)
    )
}

/// Milliseconds with three significant digits.
pub fn ms3(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Integer with thin grouping: 1234567 -> "1 234 567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The summary table printed at the end of a run.
pub fn summary(r: &Report) -> String {
    let mut o = String::new();
    let st = &r.setup;
    let _ = writeln!(
        o,
        "fleetcast-load {}{}{} — {} tenant(s), {} vehicles on {} connections, {} service \
         connection(s), {} dashboards, {} s window",
        r.scenario,
        if r.label.is_empty() { "" } else { " · " },
        r.label,
        st.tenants,
        group(st.vehicles),
        group(st.vehicle_connections as u64),
        st.service_connections,
        group(st.dashboards as u64),
        st.duration_s
    );
    let row = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "  {k:<14} {v}");
    };
    row(
        &mut o,
        "connections",
        format!(
            "{} ready, {} failed, set up in {:.1} s; connect (TCP+upgrade) ms: {}",
            group(r.connections.ready),
            r.connections.failed,
            r.connections.setup_s,
            pct_row(&r.connections.connect_ms)
        ),
    );
    if let Some(st) = &r.storm {
        let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0} ms"));
        row(
            &mut o,
            "storm",
            format!(
                "{} cut at {} s, reconnecting over {} s: {} resumed; 99 % after {}, 100 % after {}; \
                 reconnect (TCP+upgrade) ms: {}",
                group(st.cut),
                st.at_s,
                st.spread_s,
                group(st.resumed),
                ms(st.resumed_99_ms),
                ms(st.resumed_100_ms),
                pct_row(&st.reconnect_ms)
            ),
        );
        row(
            &mut o,
            "storm events",
            format!(
                "alerts/trips owed to the cut dashboards {}, lost {}, extra {}; recovered:false {}",
                group(st.events_owed),
                st.events_lost,
                st.events_extra,
                st.not_recovered
            ),
        );
        row(
            &mut o,
            "control",
            format!(
                "latency ms before: {} | during: {} | after: {}",
                pct_row(&st.control_before_ms),
                pct_row(&st.control_during_ms),
                pct_row(&st.control_after_ms)
            ),
        );
    }
    if r.connections.tcp_ms.count > 0 {
        row(
            &mut o,
            "  of it queued",
            format!(
                "ms: {}  (dashboards: in the generator before its connect() call)",
                pct_row(&r.connections.queue_ms)
            ),
        );
        row(
            &mut o,
            "  of it TCP",
            format!(
                "ms: {}  (dashboards: connect() until the socket is writable)",
                pct_row(&r.connections.tcp_ms)
            ),
        );
    }
    if r.connections.subscribe_ms.count > 0 {
        row(
            &mut o,
            "subscribe",
            format!("ms: {}", pct_row(&r.connections.subscribe_ms)),
        );
    }
    let p = &r.published;
    row(
        &mut o,
        "published",
        format!(
            "{} ({:.0}/s; offered {:.0}/s): {} location_update, {} safety_alert, {} trip_event; {} rejected",
            group(p.total),
            p.per_second,
            st.offered_location_updates_per_s
                + st.offered_alerts_per_s
                + st.offered_trip_events_per_s,
            group(p.location_updates),
            group(p.alerts),
            group(p.trip_events),
            group(p.rejected)
        ),
    );
    row(
        &mut o,
        "send lag",
        format!("ms: {}", pct_row(&p.send_lag_ms)),
    );
    let d = &r.delivery;
    row(
        &mut o,
        "delivered",
        format!(
            "{} ({:.0}/s, {:.1} MiB/s; offered {:.0}/s)",
            group(d.delivered),
            d.per_second,
            d.mib_per_second,
            st.offered_deliveries_per_s
        ),
    );
    row(
        &mut o,
        "loss",
        format!(
            "expected {}, lost {} ({:.4}%), {} of {} subscribers lost some (worst {}); \
             duplicates {}, unexpected {}, ended early {}",
            group(d.expected),
            group(d.lost),
            d.loss_ratio * 100.0,
            d.subscribers_with_loss,
            d.subscribers,
            group(d.worst_subscriber_loss),
            d.duplicates,
            d.unexpected,
            d.subscribers_ended_early
        ),
    );
    if r.socket_latency_ms.count > 0 {
        row(
            &mut o,
            "latency",
            format!(
                "ms: {}  (from the scheduled send to the dashboard socket's kernel receive \
                 time: the broker and the network, without the generator's queueing)",
                pct_row(&r.socket_latency_ms)
            ),
        );
        row(
            &mut o,
            "  to the read",
            format!(
                "ms: {}  (to the generator's read of it; {} samples)",
                pct_row(&r.latency_ms),
                group(r.latency_ms.count)
            ),
        );
    } else {
        row(
            &mut o,
            "latency",
            format!(
                "ms: {}  (from the scheduled send to the read; {} samples)",
                pct_row(&r.latency_ms),
                group(r.latency_ms.count)
            ),
        );
    }
    let errs = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(&mut o, "errors", errs);
    let g = &r.generator;
    row(
        &mut o,
        "generator",
        format!(
            "CPU {:.0}% avg, {:.0}% max (100% = one core; {} thread(s) on {} CPU(s)), RSS {:.0} MiB",
            g.cpu_avg_pct, g.cpu_max_pct, st.threads, st.cpus, g.rss_mib_peak
        ),
    );
    match &r.broker {
        Some(b) => row(
            &mut o,
            "broker",
            format!(
                "pid {}: CPU {:.0}% avg, {:.0}% max; RSS {:.0} MiB at end, {:.0} MiB peak",
                b.pid.unwrap_or(0),
                b.cpu_avg_pct,
                b.cpu_max_pct,
                b.rss_mib_end,
                b.rss_mib_peak
            ),
        ),
        None => row(
            &mut o,
            "broker",
            "(pass --broker-pid for CPU and RSS)".into(),
        ),
    }
    if !r.machine_cpus.is_empty() {
        let cores: Vec<String> = r
            .machine_cpus
            .iter()
            .map(|c| {
                let who = [
                    (r.generator.cpus.contains(&c.cpu), "generator"),
                    (
                        r.broker.as_ref().is_some_and(|b| b.cpus.contains(&c.cpu)),
                        "broker",
                    ),
                ]
                .iter()
                .filter(|x| x.0)
                .map(|x| x.1)
                .collect::<Vec<_>>()
                .join("+");
                format!(
                    "cpu{} {:.0}% busy (softirq {:.0}%){}",
                    c.cpu,
                    c.busy_avg_pct,
                    c.softirq_avg_pct,
                    if who.is_empty() {
                        String::new()
                    } else {
                        format!(" [{who}]")
                    }
                )
            })
            .collect();
        row(&mut o, "machine", cores.join(", "));
    }
    if !r.broker_metrics.is_empty() {
        let m: Vec<String> = r
            .broker_metrics
            .iter()
            .map(|(k, v)| format!("{}={}", k.trim_start_matches("fleetcast_"), v))
            .collect();
        row(&mut o, "broker stats", m.join(", "));
    }
    if let Some(v) = &r.verdict {
        row(
            &mut o,
            "SLO",
            if v.held {
                format!(
                    "held (p99 <= {} ms, loss <= {}, errors <= {})",
                    v.slo_p99_ms, v.slo_loss, v.slo_max_errors
                )
            } else {
                format!("BROKEN: {}", v.reasons.join("; "))
            },
        );
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    o
}

const CSS: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1100px}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;\
text-align:right;font-size:13px;white-space:nowrap}th{background:#f4f4f4}\
td.l,th.l{text-align:left;white-space:normal}\
.ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}\
.warn{background:#fff4e5;border:1px solid #f0c36d;padding:6px 10px;margin:4px 0}\
figure{margin:10px 0}small{color:#666}";

fn esc(s: &str) -> String {
    svg::escape(s)
}

fn table(o: &mut String, head: &[&str], rows: &[Vec<String>]) {
    o.push_str("<table><tr>");
    for (i, h) in head.iter().enumerate() {
        let _ = write!(
            o,
            "<th{}>{}</th>",
            if i == 0 { " class=l" } else { "" },
            esc(h)
        );
    }
    o.push_str("</tr>");
    for r in rows {
        o.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let _ = write!(
                o,
                "<td{}>{}</td>",
                if i == 0 { " class=l" } else { "" },
                esc(c)
            );
        }
        o.push_str("</tr>");
    }
    o.push_str("</table>");
}

fn pct_cells(p: &Percentiles) -> Vec<String> {
    vec![
        group(p.count),
        ms3(p.p50),
        ms3(p.p90),
        ms3(p.p99),
        ms3(p.p999),
        ms3(p.max),
    ]
}

/// Charts of one run.
pub fn charts(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let vlines = vec![
        (r.window.start_s, "start".to_string()),
        (r.window.end_s, "end".to_string()),
    ];
    // Latency distribution.
    let xs = |p: f64| -(1.0 - p / 100.0).max(1e-6).log10();
    let curve: Vec<(f64, f64)> = r
        .latency_curve
        .iter()
        .filter(|(p, _)| *p < 100.0)
        .map(|&(p, v)| (xs(p), v))
        .collect();
    let l = &r.latency_ms;
    let mut markers = Vec::new();
    if l.count > 0 {
        for (p, v, name) in [
            (50.0, l.p50, "p50"),
            (90.0, l.p90, "p90"),
            (99.0, l.p99, "p99"),
            (99.9, l.p999, "p99.9"),
        ] {
            markers.push((xs(p), v, format!("{name} {} ms", ms3(v))));
        }
        markers.push((5.0, l.max, format!("max {} ms", ms3(l.max))));
    }
    let ticks = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
        .map(|(i, s)| (i as f64, s.to_string()))
        .collect();
    out.push(svg::render(&Chart {
        title: "End-to-end latency by percentile (from scheduled send)".into(),
        x_label: "percentile".into(),
        y_label: "latency (ms)".into(),
        series: vec![
            Series::new("to read", COLORS[0], curve),
            Series::new(
                "to socket (kernel receive)",
                COLORS[2],
                r.socket_latency_curve
                    .iter()
                    .filter(|(p, _)| *p < 100.0)
                    .map(|&(p, v)| (xs(p), v))
                    .collect(),
            )
            .dashed(),
        ],
        log_y: l.max > 0.0 && l.max > 20.0 * l.p50.max(0.001),
        x_ticks: Some(ticks),
        markers,
        vlines: vec![],
    }));
    let tl = &r.timeline;
    let pts = |f: &dyn Fn(&TimePoint) -> f64| -> Vec<(f64, f64)> {
        tl.iter().map(|t| (t.t_s, f(t))).collect()
    };
    let offered = r.setup.offered_deliveries_per_s;
    out.push(svg::render(&Chart {
        title: "Deliveries per second".into(),
        x_label: "seconds since the first connect".into(),
        y_label: "deliveries/s".into(),
        series: vec![
            Series::new("delivered", COLORS[2], pts(&|t| t.delivered as f64)),
            Series::new(
                "offered",
                "#999",
                vec![(r.window.start_s, offered), (r.window.end_s, offered)],
            )
            .dashed(),
        ],
        vlines: vlines.clone(),
        ..Default::default()
    }));
    out.push(svg::render(&Chart {
        title: "Publishes per second".into(),
        x_label: "seconds since the first connect".into(),
        y_label: "publishes/s".into(),
        series: vec![Series::new("sent", COLORS[3], pts(&|t| t.sent as f64))],
        vlines: vlines.clone(),
        ..Default::default()
    }));
    let lat_pts = |f: &dyn Fn(&TimePoint) -> f64| -> Vec<(f64, f64)> {
        tl.iter()
            .filter(|t| t.delivered > 0)
            .map(|t| (t.t_s, f(t)))
            .collect()
    };
    out.push(svg::render(&Chart {
        title: "Latency per second".into(),
        x_label: "seconds since the first connect".into(),
        y_label: "latency (ms)".into(),
        series: vec![
            Series::new("p50", COLORS[0], lat_pts(&|t| t.p50_ms)),
            Series::new("p99", COLORS[1], lat_pts(&|t| t.p99_ms)),
            Series::new("max", COLORS[4], lat_pts(&|t| t.max_ms)).dashed(),
        ],
        log_y: true,
        vlines: vlines.clone(),
        ..Default::default()
    }));
    out.push(svg::render(&Chart {
        title: "Open connections".into(),
        x_label: "seconds since the first connect".into(),
        y_label: "connections".into(),
        series: vec![Series::new(
            "open",
            COLORS[5],
            pts(&|t| t.open_connections as f64),
        )],
        vlines: vlines.clone(),
        ..Default::default()
    }));
    let mut cpu = vec![Series::new(
        "generator",
        COLORS[3],
        pts(&|t| t.generator_cpu_pct),
    )];
    if r.broker.is_some() {
        cpu.push(Series::new(
            "broker",
            COLORS[1],
            pts(&|t| t.broker_cpu_pct.unwrap_or(0.0)),
        ));
    }
    for c in &r.machine_cpus {
        let i = c.cpu;
        cpu.push(
            Series::new(
                &format!("cpu{i} busy"),
                ["#7f7f7f", "#bcbd22", "#17becf", "#e377c2"][i % 4],
                tl.iter()
                    .filter_map(|t| t.machine_cpu_busy_pct.get(i).map(|b| (t.t_s, *b)))
                    .collect(),
            )
            .dashed(),
        );
    }
    out.push(svg::render(&Chart {
        title: "CPU: processes and whole cores (100% = one core)".into(),
        x_label: "seconds since the first connect".into(),
        y_label: "CPU %".into(),
        series: cpu,
        vlines: vlines.clone(),
        ..Default::default()
    }));
    if r.broker.is_some() {
        out.push(svg::render(&Chart {
            title: "Broker resident memory".into(),
            x_label: "seconds since the first connect".into(),
            y_label: "RSS (MiB)".into(),
            series: vec![Series::new(
                "RSS",
                COLORS[4],
                pts(&|t| t.broker_rss_mib.unwrap_or(0.0)),
            )],
            vlines,
            ..Default::default()
        }));
    }
    out
}

pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n",
        esc(title)
    )
}

/// The self-contained HTML report of one run.
pub fn html(r: &Report) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<h1>fleetcast-load: {}{}</h1><p>{}<br><small>{} · {} · fleetcast-load {}</small></p>",
        esc(&r.scenario),
        if r.label.is_empty() {
            String::new()
        } else {
            format!(" · {}", esc(&r.label))
        },
        esc(&r.description),
        esc(&r.started_at),
        esc(&r.url),
        esc(&r.version)
    );
    if let Some(v) = &r.verdict {
        if v.held {
            let _ = write!(
                o,
                "<p class=ok>SLO held (p99 &le; {} ms, loss &le; {}, errors &le; {})</p>",
                v.slo_p99_ms, v.slo_loss, v.slo_max_errors
            );
        } else {
            let _ = write!(
                o,
                "<p class=bad>SLO broken: {}</p>",
                esc(&v.reasons.join("; "))
            );
        }
    }
    for w in &r.warnings {
        let _ = write!(o, "<div class=warn>{}</div>", esc(w));
    }
    o.push_str("<h2>Summary</h2>");
    let d = &r.delivery;
    let st = &r.setup;
    let mut rows = vec![
        vec![
            "offered deliveries/s".into(),
            format!("{:.0}", st.offered_deliveries_per_s),
        ],
        vec!["delivered/s".into(), format!("{:.0}", d.per_second)],
        vec!["delivered".into(), group(d.delivered)],
        vec!["expected".into(), group(d.expected)],
        vec![
            "lost".into(),
            format!("{} ({:.4}%)", group(d.lost), d.loss_ratio * 100.0),
        ],
        vec![
            "subscribers with loss".into(),
            format!("{} of {}", d.subscribers_with_loss, d.subscribers),
        ],
        vec![
            "duplicates / unexpected".into(),
            format!("{} / {}", d.duplicates, d.unexpected),
        ],
        vec![
            "published".into(),
            format!(
                "{} ({:.0}/s), rejected {}",
                group(r.published.total),
                r.published.per_second,
                r.published.rejected
            ),
        ],
        vec!["errors".into(), group(r.error_total)],
        vec![
            "generator CPU".into(),
            format!(
                "{:.0}% avg, {:.0}% max ({} thread(s) on CPU(s) {:?})",
                r.generator.cpu_avg_pct, r.generator.cpu_max_pct, st.threads, r.generator.cpus
            ),
        ],
    ];
    for c in &r.machine_cpus {
        rows.push(vec![
            format!("cpu{} (whole core)", c.cpu),
            format!(
                "{:.0}% busy avg, {:.0}% max, softirq {:.0}%",
                c.busy_avg_pct, c.busy_max_pct, c.softirq_avg_pct
            ),
        ]);
    }
    if let Some(b) = &r.broker {
        rows.push(vec![
            "broker CPU".into(),
            format!(
                "{:.0}% avg, {:.0}% max (CPU(s) {:?})",
                b.cpu_avg_pct, b.cpu_max_pct, b.cpus
            ),
        ]);
        rows.push(vec![
            "broker RSS".into(),
            format!(
                "{:.0} MiB end, {:.0} MiB peak",
                b.rss_mib_end, b.rss_mib_peak
            ),
        ]);
    }
    table(&mut o, &["", "value"], &rows);
    o.push_str("<h2>Latency (ms)</h2>");
    let mut lat = vec!["end to end: scheduled send to read".to_string()];
    lat.extend(pct_cells(&r.latency_ms));
    let mut sock = vec!["scheduled send to the socket's kernel receive time".to_string()];
    sock.extend(pct_cells(&r.socket_latency_ms));
    let mut lag = vec!["send lag (actual - scheduled)".to_string()];
    lag.extend(pct_cells(&r.published.send_lag_ms));
    let mut con = vec!["connect (TCP + upgrade)".to_string()];
    con.extend(pct_cells(&r.connections.connect_ms));
    let mut sub = vec!["subscribe (all subscribed)".to_string()];
    sub.extend(pct_cells(&r.connections.subscribe_ms));
    table(
        &mut o,
        &["", "count", "p50", "p90", "p99", "p99.9", "max"],
        &[lat, sock, lag, con, sub],
    );
    o.push_str("<h2>Plots</h2>");
    for c in charts(r) {
        let _ = write!(o, "<figure>{c}</figure>");
    }
    o.push_str("<h2>Dashboard groups</h2>");
    let rows: Vec<Vec<String>> = r
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                group(g.dashboards),
                group(g.expected),
                group(g.delivered),
                group(g.lost),
            ]
        })
        .collect();
    table(
        &mut o,
        &["group", "dashboards", "expected", "delivered", "lost"],
        &rows,
    );
    o.push_str("<h2>Errors by code</h2>");
    if r.errors.is_empty() {
        o.push_str("<p>none</p>");
    } else {
        let rows: Vec<Vec<String>> = r
            .errors
            .iter()
            .map(|(k, v)| vec![k.clone(), group(*v)])
            .collect();
        table(&mut o, &["error", "count"], &rows);
    }
    let mut worst: Vec<&SubscriberRow> = r
        .subscribers
        .iter()
        .filter(|s| s.lost > 0 || s.ended.is_some() || !s.ready || s.unexpected > 0)
        .collect();
    worst.sort_by_key(|s| std::cmp::Reverse(s.lost));
    let _ = write!(
        o,
        "<h2>Subscribers with loss or trouble</h2><p><small>{} of {} shown; every subscriber is in report.json</small></p>",
        worst.len().min(25),
        worst.len()
    );
    let rows: Vec<Vec<String>> = worst
        .iter()
        .take(25)
        .map(|s| {
            vec![
                format!("{} #{}", s.tenant, s.index),
                s.subscription.clone(),
                group(s.expected),
                group(s.delivered),
                group(s.lost),
                s.unexpected.to_string(),
                s.ended.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "dashboard",
            "subscription",
            "expected",
            "delivered",
            "lost",
            "unexpected",
            "ended",
        ],
        &rows,
    );
    if !r.broker_metrics.is_empty() {
        o.push_str("<h2>Broker counters (delta over the run)</h2>");
        let rows: Vec<Vec<String>> = r
            .broker_metrics
            .iter()
            .map(|(k, v)| vec![k.clone(), format!("{v}")])
            .collect();
        table(&mut o, &["series", "delta"], &rows);
    }
    o.push_str("<h2>Setup</h2>");
    let rows = vec![
        vec!["tenants".into(), st.tenants.to_string()],
        vec![
            "vehicles (connections)".into(),
            format!("{} ({})", group(st.vehicles), st.vehicle_connections),
        ],
        vec![
            "service connections".into(),
            st.service_connections.to_string(),
        ],
        vec!["dashboards".into(), group(st.dashboards as u64)],
        vec!["dashboard groups".into(), st.dashboard_groups.join("; ")],
        vec![
            "offered publishes/s".into(),
            format!(
                "{:.0} location_update, {:.1} safety_alert, {:.1} trip_event",
                st.offered_location_updates_per_s,
                st.offered_alerts_per_s,
                st.offered_trip_events_per_s
            ),
        ],
        vec![
            "window".into(),
            format!(
                "{} s (ramp-up {} s); connected after {:.1} s, drained {:.2} s after the end",
                st.duration_s,
                st.ramp_up_s,
                r.window.connected_s,
                r.window.drained_s - r.window.end_s
            ),
        ],
        vec![
            "open-file limit".into(),
            format!(
                "{} (hard {}): up to {} connections",
                st.fd_soft_limit, st.fd_hard_limit, st.max_connections
            ),
        ],
        vec![
            "source addresses".into(),
            format!("127.0.0.1 ..= 127.0.0.{}", st.source_addresses),
        ],
    ];
    table(&mut o, &["", "value"], &rows);
    page(&format!("fleetcast-load {}", r.scenario), &o)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::engine::{ServiceCounts, VehicleCounts};
    use crate::scenario::{Scenario, Sub};

    pub const SCEN: &str = r#"
name = "unit"
duration_s = 10
[[tenants]]
id = "fleet_a"
device_key = "device-key-0123456789"
viewer_key = "viewer-key-0123456789"
service_key = "service-key-0123456789"
vehicles = 4
alerts_per_second = 1
[[tenants.dashboards]]
count = 2
locations = "fleet"
alerts = true
alert_severities = ["critical"]
[[tenants.dashboards]]
count = 1
locations = "vehicles"
vehicles_each = 2
"#;

    fn dash(index: u32, group: u32, sub: Sub, loc: u64, alerts: u64) -> DashResult {
        DashResult {
            tenant: 0,
            group,
            index,
            sub,
            ready: true,
            ended: None,
            locations: loc,
            alerts,
            trips: 0,
            duplicates: 0,
            unexpected: 0,
            stale: 3,
            cut: false,
            resumed_after_us: None,
            events: 0,
        }
    }

    /// A synthetic run: 4 vehicles x 10 updates (one rejected), 10 alerts of which 2
    /// critical; dashboard 1 misses 5 updates.
    pub fn sample_data() -> RunData {
        let plan = Plan::build(&Scenario::from_toml(SCEN).unwrap()).unwrap();
        let subs: Vec<Sub> = plan
            .conns
            .iter()
            .filter_map(|c| match &c.kind {
                crate::scenario::ConnKind::Dashboard { sub, .. } => Some(sub.clone()),
                _ => None,
            })
            .collect();
        let mut latency = latency_histogram(3);
        for v in 1..=1000u64 {
            latency.record(v * 10).unwrap(); // 10 us .. 10 ms
        }
        let mut send_lag = latency_histogram(3);
        send_lag.record(50).unwrap();
        let mut d0 = dash(0, 0, subs[0].clone(), 39, 2);
        d0.ended = None;
        let d1 = dash(1, 0, subs[1].clone(), 34, 2);
        // vehicles v0, v1: 10 + 9 accepted.
        let d2 = dash(2, 1, subs[2].clone(), 19, 0);
        let w = WorkerResult {
            socket_latency: latency.clone(),
            latency,
            send_lag,
            connect: latency_histogram(3),
            tcp: latency_histogram(3),
            connect_queue: latency_histogram(3),
            subscribe: latency_histogram(3),
            errors: BTreeMap::from([("error 429".to_string(), 1)]),
            vehicles: vec![VehicleCounts {
                tenant: 0,
                first: 0,
                sent: vec![10, 10, 10, 10],
                rejected: vec![0, 1, 0, 0],
            }],
            services: vec![ServiceCounts {
                tenant: 0,
                alerts_sent: [4, 3, 1, 2],
                ..Default::default()
            }],
            dashboards: vec![d0, d1, d2],
            unparsed: 0,
            backpressured: 0,
            bytes_in: 10 * 1024 * 1024,
            control: [
                latency_histogram(3),
                latency_histogram(3),
                latency_histogram(3),
            ],
            reconnect: latency_histogram(3),
            not_recovered: 0,
        };
        let mut seconds = Vec::new();
        for sec in 0..13 {
            let mut s = Second::new(sec);
            if (2..12).contains(&sec) {
                s.sent = 5;
                s.delivered = 9;
                s.latency.record(1500).unwrap();
            }
            seconds.push(s);
        }
        RunData {
            plan,
            label: String::new(),
            url: "ws://127.0.0.1:8000".into(),
            started_unix_s: 1_795_453_200,
            threads: 1,
            cpus: 1,
            fd: crate::sys::FdLimit {
                soft_before: 20_000,
                soft: 20_000,
                hard: 20_000,
            },
            window: Window {
                connected_s: 1.5,
                start_s: 1.6,
                end_s: 11.6,
                drained_s: 11.7,
                drain_timed_out: false,
            },
            workers: vec![w],
            seconds,
            samples: (0..12)
                .map(|i| Sample {
                    t_s: i as f64 + 1.0,
                    open: 8,
                    generator_cpu_pct: 12.0,
                    broker_cpu_pct: Some(30.0),
                    broker_rss: Some(64 << 20),
                    machine: vec![(40.0, 5.0), (20.0, 2.0)],
                })
                .collect(),
            generator: ProcUse {
                cpu_avg_pct: 12.0,
                cpu_max_pct: 14.0,
                cpus: vec![1],
                ..Default::default()
            },
            machine_cpus: vec![
                CpuUse {
                    cpu: 0,
                    busy_avg_pct: 40.0,
                    softirq_avg_pct: 5.0,
                    busy_max_pct: 50.0,
                },
                CpuUse {
                    cpu: 1,
                    busy_avg_pct: 20.0,
                    softirq_avg_pct: 2.0,
                    busy_max_pct: 25.0,
                },
            ],
            broker: Some(ProcUse {
                pid: Some(42),
                cpus: vec![0],
                cpu_avg_pct: 30.0,
                cpu_max_pct: 35.0,
                cpu_seconds: 3.0,
                rss_mib_end: 64.0,
                rss_mib_peak: 70.0,
            }),
            broker_metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn accounting_per_subscriber() {
        let r = build(sample_data());
        // Accepted: 39 location updates, 2 critical alerts.
        assert_eq!(r.published.location_updates, 40);
        assert_eq!(r.published.alerts, 10);
        assert_eq!(r.published.rejected, 1);
        let s = &r.subscribers;
        assert_eq!((s[0].expected, s[0].lost), (41, 0));
        assert_eq!((s[1].expected, s[1].lost), (41, 5));
        assert_eq!((s[2].expected, s[2].lost), (19, 0));
        assert_eq!(r.delivery.expected, 41 + 41 + 19);
        assert_eq!(r.delivery.lost, 5);
        assert_eq!(r.delivery.subscribers_with_loss, 1);
        assert_eq!(r.delivery.worst_subscriber_loss, 5);
        assert_eq!(r.delivery.stale, 9);
        assert!((r.delivery.loss_ratio - 5.0 / 101.0).abs() < 1e-12);
        assert_eq!(r.groups[0].lost, 5);
        assert_eq!(r.groups[1].dashboards, 1);
        assert_eq!(r.error_total, 1);
        // Latency 10 us .. 10 ms uniform.
        assert!((r.latency_ms.p50 - 5.0).abs() < 0.01, "{:?}", r.latency_ms);
        assert!((r.latency_ms.p99 - 9.9).abs() < 0.02);
        assert!((r.latency_ms.max - 10.0).abs() < 0.02);
        assert_eq!(r.latency_curve.last().unwrap().0, 100.0);
        assert_eq!(r.timeline.len(), 12);
        assert!((r.timeline[5].p99_ms - 1.5).abs() < 0.01);
        assert_eq!(r.timeline[5].broker_rss_mib, Some(64.0));
        assert!((r.published.per_second - 5.0).abs() < 1e-9);
    }

    #[test]
    fn duplicates_and_unexpected_do_not_hide_loss() {
        let mut data = sample_data();
        let d = &mut data.workers[0].dashboards[0];
        d.duplicates = 2;
        d.unexpected = 1;
        let r = build(data);
        // 41 received, 3 of them not valid: 3 lost.
        assert_eq!(r.subscribers[0].lost, 3);
        assert!(r.warnings.iter().any(|w| w.contains("duplicate")));
    }

    #[test]
    fn extra_deliveries_are_unexpected() {
        let mut data = sample_data();
        data.workers[0].dashboards[2].locations = 25;
        let r = build(data);
        assert_eq!(r.subscribers[2].lost, 0);
        assert_eq!(r.subscribers[2].unexpected, 6);
    }

    #[test]
    fn not_ready_subscribers_are_owed_nothing() {
        let mut data = sample_data();
        data.workers[0].dashboards[1].ready = false;
        data.workers[0].dashboards[1].ended = Some("timeout: subscribe".into());
        data.workers[0]
            .errors
            .insert("timeout: subscribe".into(), 1);
        let r = build(data);
        assert_eq!(r.delivery.subscribers, 2);
        assert_eq!(r.delivery.lost, 0);
        assert_eq!(r.connections.failed, 1);
        assert!(r.warnings.iter().any(|w| w.contains("never became ready")));
    }

    #[test]
    fn json_round_trip_and_summary() {
        let r = build(sample_data());
        let json = serde_json::to_string_pretty(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.subscribers, r.subscribers);
        assert_eq!(back.delivery.lost, 5);
        assert_eq!(back.timeline.len(), r.timeline.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["latency_ms"]["p99"], serde_json::json!(r.latency_ms.p99));
        assert_eq!(v["delivery"]["expected"], 101);
        let text = summary(&r);
        assert!(text.contains("lost 5 (4.9505%)"), "{text}");
        assert!(text.contains("error 429: 1"), "{text}");
        assert!(text.contains("pid 42"), "{text}");
    }

    #[test]
    fn html_is_self_contained_with_plots() {
        let r = build(sample_data());
        let h = html(&r);
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.matches("<svg").count() >= 6, "plots");
        assert!(!h.contains("<script"));
        assert!(!h.contains("http://") || !h.contains("src=\"http"));
        assert!(h.contains("End-to-end latency by percentile"));
        assert!(h.contains("Open connections"));
        assert!(!h.contains("NaN"));
    }

    #[test]
    fn warnings_name_the_generator_when_it_is_saturated() {
        let mut data = sample_data();
        data.generator.cpu_max_pct = 97.0;
        let r = build(data);
        assert!(r.warnings.iter().any(|w| w.contains("bottleneck")));
        let r = build(sample_data());
        assert!(!r.warnings.iter().any(|w| w.contains("bottleneck")));
        assert!(!r.warnings.iter().any(|w| w.contains("share CPU")));
        // Its core was saturated by softirq work and other processes.
        let mut data = sample_data();
        data.machine_cpus[1].busy_avg_pct = 99.0;
        let r = build(data);
        assert!(r.warnings.iter().any(|w| w.contains("bottleneck")));
        // cpu1 busy with something other than the generator pinned to it.
        let mut data = sample_data();
        data.machine_cpus[1].busy_avg_pct = 60.0;
        let r = build(data);
        assert!(
            r.warnings.iter().any(|w| w.contains("competed")),
            "{:?}",
            r.warnings
        );
        assert!(
            !build(sample_data())
                .warnings
                .iter()
                .any(|w| w.contains("competed"))
        );
        let mut data = sample_data();
        data.broker.as_mut().unwrap().cpus = vec![0, 1];
        let r = build(data);
        assert!(r.warnings.iter().any(|w| w.contains("share CPU(s) [1]")));
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(1234), "1 234");
        assert_eq!(group(1_000_000), "1 000 000");
        assert_eq!(ms3(0.1234), "0.123");
        assert_eq!(ms3(12.34), "12.3");
    }
}
