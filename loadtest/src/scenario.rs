//! Scenario files and the plan of connections a run opens.
//!
//! A scenario is TOML (see `loadtest/scenarios/*.toml` and the README for every key).
//! Command-line flags override its main knobs ([`Overrides`]); [`Plan::build`] turns the
//! result into the list of connections, their subscriptions and publishing rates.

use crate::schedule::{Route, SEVERITIES};
use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Broker base URL (`ws://host:port`); a path here replaces `path`. Several
    /// brokers (a cluster), comma-separated, share the connections round-robin.
    #[serde(default = "default_url")]
    pub url: String,
    /// WebSocket path of the native dialect.
    #[serde(default = "default_path")]
    pub path: String,
    /// Seconds of publishing (the measurement window).
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// Connections are opened evenly over this many seconds (0: as fast as allowed).
    #[serde(default)]
    pub ramp_up_s: f64,
    /// After the window, how long to wait at most for in-flight deliveries.
    #[serde(default = "default_drain")]
    pub drain_s: f64,
    /// Give up on a connection (TCP + upgrade + subscriptions) after this long.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: f64,
    /// Connections being opened at once, over all threads.
    #[serde(default = "default_connect_concurrency")]
    pub connect_concurrency: usize,
    /// Client sockets are bound to 127.0.0.1 ..= 127.0.0.N (loopback targets only).
    #[serde(default = "default_sources")]
    pub source_addresses: u32,
    /// I/O threads; 0 = one per CPU this process may run on.
    #[serde(default)]
    pub threads: usize,
    /// Keep dashboard sockets in delayed-ACK mode (TCP_QUICKACK off after each read):
    /// fewer ACKs, whose processing loopback would charge to the generator's core.
    #[serde(default = "yes")]
    pub delayed_acks: bool,
    /// Ask the kernel for each dashboard read's receive time (SO_TIMESTAMPNS): the
    /// headline latency then runs to the socket, leaving out the generator's own queueing
    /// before its read (latency to the read is reported beside it). On by default; it
    /// costs the generator ~5 % of a core at 1 M deliveries/s, and the kernel then stamps
    /// every received segment (on loopback partly on the broker's core, a clock read per
    /// segment).
    #[serde(default = "yes")]
    pub socket_timestamps: bool,
    /// Never sleep in epoll: poll without a timeout and send at the due time. On a
    /// virtual machine a halted vCPU can take milliseconds to wake, which shows up as
    /// send lag; spinning removes it at the price of a whole core (CPU then reads 100 %).
    #[serde(default)]
    pub busy_poll: bool,
    /// Service-level objective, used by `capacity` and printed by `run`.
    #[serde(default)]
    pub slo: SloConfig,
    /// A reconnect storm (`reconnect-storm`): the dashboards of groups with
    /// `storm = true` are all cut at once and reconnect with snapshot and `since`.
    #[serde(default)]
    pub storm: Option<StormConfig>,
    pub tenants: Vec<Tenant>,
}

/// When the storm hits and how the cut dashboards come back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StormConfig {
    /// Seconds into the publishing window at which every storm dashboard's socket is
    /// closed by the generator.
    pub at_s: f64,
    /// The reconnects are spread evenly over this many seconds after the cut (0: all at
    /// once, limited only by `connect_concurrency`).
    #[serde(default)]
    pub spread_s: f64,
    /// The control group's latency "during the storm" is the deliveries published in
    /// [at_s, at_s + spread_s + settle_s).
    #[serde(default = "default_settle")]
    pub settle_s: f64,
}

fn default_settle() -> f64 {
    5.0
}

fn default_url() -> String {
    "ws://127.0.0.1:8000".into()
}
fn default_path() -> String {
    "/v1/streaming/websocket".into()
}
fn default_duration() -> f64 {
    30.0
}
fn default_drain() -> f64 {
    5.0
}
fn default_connect_timeout() -> f64 {
    10.0
}
fn default_connect_concurrency() -> usize {
    256
}
fn default_sources() -> u32 {
    4
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SloConfig {
    /// p99 end-to-end latency must stay at or below this.
    pub p99_ms: f64,
    /// Lost / expected deliveries must stay at or below this (0: nothing lost).
    pub loss: f64,
    /// Errors of any kind (error frames, closes, failed connections) allowed.
    pub max_errors: u64,
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig {
            p99_ms: 10.0,
            loss: 0.0,
            max_errors: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// The tenant (fleet) id the keys belong to.
    pub id: String,
    /// Device key for the vehicles (a key without a `vehicles` list: any vehicle).
    #[serde(default)]
    pub device_key: String,
    /// Viewer key for the dashboards.
    #[serde(default)]
    pub viewer_key: String,
    /// Service key for alert and trip-event publishers.
    #[serde(default)]
    pub service_key: String,
    /// Vehicles, with ids `v0`, `v1`, ...
    #[serde(default)]
    pub vehicles: u32,
    /// Vehicles sharing one device connection (1: a connection per vehicle).
    #[serde(default = "one")]
    pub vehicles_per_connection: u32,
    /// Each vehicle publishes a location update every this many milliseconds...
    #[serde(default = "default_interval")]
    pub update_interval_ms: f64,
    /// ... plus or minus up to this much (uniform), below half the interval.
    #[serde(default)]
    pub jitter_ms: f64,
    #[serde(default)]
    pub route: Route,
    /// Safety alerts per second over the whole tenant (published by services).
    #[serde(default)]
    pub alerts_per_second: f64,
    /// Trip events per second over the whole tenant (published by services).
    #[serde(default)]
    pub trip_events_per_second: f64,
    /// Service connections sharing the alert and trip-event rates.
    #[serde(default = "one")]
    pub service_connections: u32,
    #[serde(default)]
    pub dashboards: Vec<DashboardGroup>,
}

fn one() -> u32 {
    1
}
fn default_interval() -> f64 {
    1000.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardGroup {
    pub count: u32,
    /// `fleet` (every vehicle of the tenant), `vehicles` (`vehicles_each` of them) or
    /// `none`.
    #[serde(default = "default_locations")]
    pub locations: Locations,
    #[serde(default = "default_each")]
    pub vehicles_each: u32,
    /// Subscribe to `alerts`; `alert_severities` filters (empty: every severity).
    #[serde(default)]
    pub alerts: bool,
    #[serde(default)]
    pub alert_severities: Vec<String>,
    /// Subscribe to `trip_events` (whole tenant).
    #[serde(default)]
    pub trip_events: bool,
    /// Cut and reconnected by the scenario's `[storm]` (groups without it are the
    /// control group).
    #[serde(default)]
    pub storm: bool,
}

fn default_locations() -> Locations {
    Locations::Fleet
}
fn default_each() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Locations {
    Fleet,
    Vehicles,
    None,
}

/// Command-line overrides of a scenario's main knobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub url: Option<String>,
    /// Total dashboards, spread over the groups in proportion to their counts.
    pub dashboards: Option<u32>,
    /// Total vehicles, spread over the tenants in proportion to their counts.
    pub vehicles: Option<u32>,
    /// Multiplies every publish rate (vehicle updates, alerts, trip events).
    pub rate_multiplier: Option<f64>,
    pub duration_s: Option<f64>,
    pub threads: Option<usize>,
    pub source_addresses: Option<u32>,
    /// Some(false): the kernel's default ACK behaviour.
    pub delayed_acks: Option<bool>,
    pub socket_timestamps: Option<bool>,
    pub busy_poll: Option<bool>,
    /// `[storm] spread_s`.
    pub storm_spread_s: Option<f64>,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        Scenario::from_toml(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// The scenario with the overrides applied (and validated).
    pub fn with_overrides(&self, o: &Overrides) -> anyhow::Result<Scenario> {
        let mut s = self.clone();
        if let Some(url) = &o.url {
            s.url = url.clone();
        }
        if let Some(d) = o.duration_s {
            s.duration_s = d;
        }
        if let Some(t) = o.threads {
            s.threads = t;
        }
        if let Some(n) = o.source_addresses {
            s.source_addresses = n;
        }
        if let Some(d) = o.delayed_acks {
            s.delayed_acks = d;
        }
        if let Some(t) = o.socket_timestamps {
            s.socket_timestamps = t;
        }
        if let Some(b) = o.busy_poll {
            s.busy_poll = b;
        }
        if let Some(x) = o.storm_spread_s {
            match s.storm.as_mut() {
                Some(st) => st.spread_s = x,
                None => anyhow::bail!("--storm-spread needs a scenario with [storm]"),
            }
        }
        if let Some(m) = o.rate_multiplier {
            ensure!(m > 0.0 && m.is_finite(), "--rate-multiplier must be > 0");
            for t in &mut s.tenants {
                t.update_interval_ms /= m;
                t.jitter_ms /= m;
                t.alerts_per_second *= m;
                t.trip_events_per_second *= m;
            }
        }
        if let Some(total) = o.vehicles {
            let weights: Vec<u64> = s.tenants.iter().map(|t| t.vehicles as u64).collect();
            for (t, n) in s.tenants.iter_mut().zip(apportion(total as u64, &weights)) {
                t.vehicles = n as u32;
            }
        }
        if let Some(total) = o.dashboards {
            let weights: Vec<u64> = s
                .tenants
                .iter()
                .flat_map(|t| t.dashboards.iter().map(|g| g.count as u64))
                .collect();
            ensure!(
                !weights.is_empty(),
                "--dashboards: the scenario has no dashboard group to scale"
            );
            let mut shares = apportion(total as u64, &weights).into_iter();
            for t in &mut s.tenants {
                for g in &mut t.dashboards {
                    g.count = shares.next().unwrap_or(0) as u32;
                }
            }
        }
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.name.is_empty(), "name must not be empty");
        ensure!(
            self.url.starts_with("ws://") || self.url.starts_with("wss://"),
            "url must start with ws:// or wss:// (wss needs --ca-file): {:?}",
            self.url
        );
        ensure!(self.path.starts_with('/'), "path must start with /");
        ensure!(
            self.duration_s > 0.0 && self.duration_s <= 86_400.0,
            "duration_s must be in (0, 86400]"
        );
        ensure!(
            (0.0..=3_600.0).contains(&self.ramp_up_s),
            "ramp_up_s must be in [0, 3600]"
        );
        ensure!(
            (0.0..=600.0).contains(&self.drain_s),
            "drain_s must be in [0, 600]"
        );
        if let Some(st) = &self.storm {
            ensure!(
                st.at_s >= 0.0 && st.at_s < self.duration_s,
                "storm.at_s must be in [0, duration_s)"
            );
            ensure!(
                (0.0..=600.0).contains(&st.spread_s) && (0.0..=600.0).contains(&st.settle_s),
                "storm.spread_s and storm.settle_s must be in [0, 600]"
            );
        }
        ensure!(
            self.connect_timeout_s > 0.0 && self.connect_timeout_s <= 600.0,
            "connect_timeout_s must be in (0, 600]"
        );
        ensure!(
            self.connect_concurrency >= 1,
            "connect_concurrency must be >= 1"
        );
        ensure!(
            (1..=254).contains(&self.source_addresses),
            "source_addresses must be in 1..=254 (127.0.0.1 ..= 127.0.0.N)"
        );
        ensure!(self.threads <= 256, "threads must be at most 256");
        ensure!(
            !self.tenants.is_empty(),
            "at least one [[tenants]] is needed"
        );
        ensure!(self.tenants.len() <= 1000, "at most 1000 tenants");
        let mut ids = std::collections::HashSet::new();
        for t in &self.tenants {
            ensure!(ids.insert(&t.id), "tenant {:?} appears twice", t.id);
            let ctx = |msg: &str| format!("tenant {:?}: {msg}", t.id);
            ensure!(t.vehicles <= 10_000_000, ctx("at most 10 000 000 vehicles"));
            if t.vehicles > 0 {
                ensure!(
                    t.device_key.len() >= 16,
                    ctx("device_key (at least 16 characters) is needed for vehicles")
                );
                ensure!(
                    t.vehicles_per_connection >= 1,
                    ctx("vehicles_per_connection must be >= 1")
                );
                ensure!(
                    t.update_interval_ms >= 1.0,
                    ctx("update_interval_ms must be >= 1 (after --rate-multiplier)")
                );
                ensure!(
                    t.jitter_ms >= 0.0 && t.jitter_ms * 2.0 < t.update_interval_ms,
                    ctx("jitter_ms must be >= 0 and below half of update_interval_ms")
                );
            }
            ensure!(
                t.alerts_per_second >= 0.0 && t.trip_events_per_second >= 0.0,
                ctx("rates must be >= 0")
            );
            if t.alerts_per_second > 0.0 || t.trip_events_per_second > 0.0 {
                ensure!(
                    t.service_key.len() >= 16,
                    ctx(
                        "service_key (at least 16 characters) is needed for alerts and trip events"
                    )
                );
                ensure!(
                    t.service_connections >= 1,
                    ctx("service_connections must be >= 1")
                );
                ensure!(
                    t.vehicles > 0,
                    ctx("alerts and trip events name vehicles: vehicles must be > 0")
                );
            }
            for g in &t.dashboards {
                if g.count > 0 {
                    ensure!(
                        t.viewer_key.len() >= 16,
                        ctx("viewer_key (at least 16 characters) is needed for dashboards")
                    );
                }
                if g.locations == Locations::Vehicles {
                    ensure!(
                        g.vehicles_each >= 1 && g.vehicles_each <= t.vehicles.max(1),
                        ctx("vehicles_each must be in 1..=vehicles")
                    );
                    ensure!(
                        g.vehicles_each <= 200,
                        ctx("vehicles_each must be at most 200 (one subscribe message)")
                    );
                }
                for s in &g.alert_severities {
                    ensure!(
                        SEVERITIES.contains(&s.as_str()),
                        ctx(&format!(
                            "unknown alert severity {s:?} (low, medium, high, critical)"
                        ))
                    );
                }
                ensure!(
                    g.locations != Locations::None || g.alerts || g.trip_events,
                    ctx("a dashboard group subscribes to nothing")
                );
            }
        }
        ensure!(
            self.slo.p99_ms > 0.0 && (0.0..=1.0).contains(&self.slo.loss),
            "slo: p99_ms must be > 0 and loss in [0, 1]"
        );
        Ok(())
    }
}

/// Splits `total` in proportion to `weights` (largest remainder; all-zero weights:
/// evenly). The shares add up to `total`.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return vec![];
    }
    let sum: u64 = weights.iter().sum();
    let w: Vec<u64> = if sum == 0 {
        vec![1; weights.len()]
    } else {
        weights.to_vec()
    };
    let sum: u128 = w.iter().map(|&x| x as u128).sum();
    let mut shares: Vec<u64> = w
        .iter()
        .map(|&x| (total as u128 * x as u128 / sum) as u64)
        .collect();
    let mut rem: Vec<(u128, usize)> = w
        .iter()
        .enumerate()
        .map(|(i, &x)| (total as u128 * x as u128 % sum, i))
        .collect();
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = total - shares.iter().sum::<u64>();
    for &(_, i) in rem.iter().take(left as usize) {
        shares[i] += 1;
    }
    shares
}

/// What a dashboard subscribes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sub {
    pub locations: LocSub,
    /// Bit i set: alerts of severity `SEVERITIES[i]`. 0: no alerts subscription.
    pub alert_mask: u8,
    /// Send an explicit severity filter (false: whole channel).
    pub alert_filtered: bool,
    pub trips: bool,
    /// Cut by the storm and reconnected.
    pub storm: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LocSub {
    None,
    Fleet,
    /// Vehicle indexes (ids `v<i>`).
    Vehicles(Vec<u32>),
}

impl Sub {
    /// The subscribe messages, in order.
    pub fn messages(&self) -> Vec<String> {
        self.messages_since(None)
    }

    /// The subscribe messages; the alerts subscription resumes after `since`
    /// (`(epoch, seq)`) when given.
    pub fn messages_since(&self, since: Option<(u64, u64)>) -> Vec<String> {
        let mut out = Vec::new();
        match &self.locations {
            LocSub::None => {}
            LocSub::Fleet => out.push(subscribe_msg("sl", "vehicle_locations", "")),
            LocSub::Vehicles(vs) => {
                let ids: Vec<String> = vs.iter().map(|v| format!("\"v{v}\"")).collect();
                out.push(subscribe_msg(
                    "sl",
                    "vehicle_locations",
                    &format!("{{\"vehicle_ids\":[{}]}}", ids.join(",")),
                ));
            }
        }
        if self.alert_mask != 0 {
            let filters = if self.alert_filtered {
                let sev: Vec<String> = (0..4)
                    .filter(|i| self.alert_mask & (1 << i) != 0)
                    .map(|i| format!("\"{}\"", SEVERITIES[i]))
                    .collect();
                format!("{{\"severity\":[{}]}}", sev.join(","))
            } else {
                String::new()
            };
            let mut m = subscribe_msg("sa", "alerts", &filters);
            if let Some((epoch, seq)) = since {
                // `..."channel":"alerts"[,"filters":{..}]}}`: add `since` to the payload.
                m.truncate(m.len() - 2);
                m.push_str(&format!(r#","since":{{"epoch":{epoch},"seq":{seq}}}}}}}"#));
            }
            out.push(m);
        }
        if self.trips {
            out.push(subscribe_msg("st", "trip_events", ""));
        }
        out
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match &self.locations {
            LocSub::None => {}
            LocSub::Fleet => parts.push("locations:fleet".to_string()),
            LocSub::Vehicles(v) => parts.push(format!("locations:{}-vehicles", v.len())),
        }
        if self.alert_mask != 0 {
            if self.alert_filtered {
                let sev: Vec<&str> = (0..4)
                    .filter(|i| self.alert_mask & (1 << i) != 0)
                    .map(|i| SEVERITIES[i])
                    .collect();
                parts.push(format!("alerts:{}", sev.join("+")));
            } else {
                parts.push("alerts:all".into());
            }
        }
        if self.trips {
            parts.push("trip_events".into());
        }
        parts.join(",")
    }
}

fn subscribe_msg(id: &str, channel: &str, filters: &str) -> String {
    if filters.is_empty() {
        format!(
            r#"{{"type":"subscribe","id":"{id}","payload":{{"action":"subscribe","channel":"{channel}"}}}}"#
        )
    } else {
        format!(
            r#"{{"type":"subscribe","id":"{id}","payload":{{"action":"subscribe","channel":"{channel}","filters":{filters}}}}}"#
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConnKind {
    /// Publishes location updates for vehicles `first .. first + count`.
    Vehicles { first: u32, count: u32 },
    /// Service connection `index` of `of`: its share of alerts and trip events.
    Service { index: u32, of: u32 },
    /// Dashboard `index` of its tenant, in dashboard group `group` (index over the
    /// whole scenario).
    Dashboard { group: u32, index: u32, sub: Sub },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnPlan {
    pub tenant: u32,
    pub kind: ConnKind,
}

/// Per tenant: derived rates and who watches what (for the live expected count).
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPlan {
    pub id: String,
    pub vehicles: u32,
    pub interval_ns: u64,
    pub jitter_ns: u64,
    pub route: Route,
    pub alerts_per_second: f64,
    pub trip_events_per_second: f64,
    pub service_connections: u32,
    /// Dashboards receiving each vehicle's location updates.
    pub loc_watchers: Vec<u32>,
    /// Dashboards receiving alerts of each severity.
    pub alert_watchers: [u32; 4],
    pub trip_watchers: u32,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub tenants: Vec<TenantPlan>,
    pub conns: Vec<ConnPlan>,
    /// Names of the dashboard groups (`tenant/group index: subscription`).
    pub groups: Vec<String>,
}

impl Plan {
    pub fn build(s: &Scenario) -> anyhow::Result<Plan> {
        s.validate()?;
        let mut tenants = Vec::new();
        let mut conns = Vec::new();
        let mut groups = Vec::new();
        for (ti, t) in s.tenants.iter().enumerate() {
            let ti = ti as u32;
            let mut tp = TenantPlan {
                id: t.id.clone(),
                vehicles: t.vehicles,
                interval_ns: (t.update_interval_ms * 1e6).round() as u64,
                jitter_ns: (t.jitter_ms * 1e6).round() as u64,
                route: t.route,
                alerts_per_second: t.alerts_per_second,
                trip_events_per_second: t.trip_events_per_second,
                service_connections: 0,
                loc_watchers: vec![0; t.vehicles as usize],
                alert_watchers: [0; 4],
                trip_watchers: 0,
            };
            if t.alerts_per_second > 0.0 || t.trip_events_per_second > 0.0 {
                tp.service_connections = t.service_connections;
                for index in 0..t.service_connections {
                    conns.push(ConnPlan {
                        tenant: ti,
                        kind: ConnKind::Service {
                            index,
                            of: t.service_connections,
                        },
                    });
                }
            }
            let per = t.vehicles_per_connection.max(1);
            let mut first = 0;
            while first < t.vehicles {
                let count = per.min(t.vehicles - first);
                conns.push(ConnPlan {
                    tenant: ti,
                    kind: ConnKind::Vehicles { first, count },
                });
                first += count;
            }
            let mut dash_index = 0u32;
            for g in &t.dashboards {
                let group = groups.len() as u32;
                let mut alert_mask = 0u8;
                if g.alerts {
                    alert_mask = if g.alert_severities.is_empty() {
                        0b1111
                    } else {
                        g.alert_severities
                            .iter()
                            .filter_map(|s| SEVERITIES.iter().position(|x| x == s))
                            .fold(0, |m, i| m | (1 << i))
                    };
                }
                let mut label = None;
                for j in 0..g.count {
                    let locations = match g.locations {
                        Locations::None => LocSub::None,
                        Locations::Fleet => LocSub::Fleet,
                        Locations::Vehicles => {
                            let n = g.vehicles_each.min(t.vehicles);
                            let start = (j as u64 * n as u64) % t.vehicles.max(1) as u64;
                            LocSub::Vehicles(
                                (0..n as u64)
                                    .map(|k| ((start + k) % t.vehicles as u64) as u32)
                                    .collect(),
                            )
                        }
                    };
                    let sub = Sub {
                        locations,
                        alert_mask,
                        alert_filtered: !g.alert_severities.is_empty(),
                        trips: g.trip_events,
                        storm: g.storm,
                    };
                    match &sub.locations {
                        LocSub::None => {}
                        LocSub::Fleet => tp.loc_watchers.iter_mut().for_each(|w| *w += 1),
                        LocSub::Vehicles(vs) => {
                            for &v in vs {
                                tp.loc_watchers[v as usize] += 1;
                            }
                        }
                    }
                    for (i, w) in tp.alert_watchers.iter_mut().enumerate() {
                        if alert_mask & (1 << i) != 0 {
                            *w += 1;
                        }
                    }
                    if sub.trips {
                        tp.trip_watchers += 1;
                    }
                    if label.is_none() {
                        label = Some(sub.describe());
                    }
                    conns.push(ConnPlan {
                        tenant: ti,
                        kind: ConnKind::Dashboard {
                            group,
                            index: dash_index,
                            sub,
                        },
                    });
                    dash_index += 1;
                }
                groups.push(format!(
                    "{} #{}: {} x {}",
                    t.id,
                    group,
                    g.count,
                    label.unwrap_or_else(|| "-".into())
                ));
            }
            tenants.push(tp);
        }
        ensure!(!conns.is_empty(), "the scenario opens no connection");
        if conns.len() > 10_000_000 {
            bail!("the scenario opens {} connections", conns.len());
        }
        Ok(Plan {
            scenario: s.clone(),
            tenants,
            conns,
            groups,
        })
    }

    pub fn count(&self, f: impl Fn(&ConnKind) -> bool) -> usize {
        self.conns.iter().filter(|c| f(&c.kind)).count()
    }

    pub fn dashboards(&self) -> usize {
        self.count(|k| matches!(k, ConnKind::Dashboard { .. }))
    }

    pub fn vehicles(&self) -> u64 {
        self.tenants.iter().map(|t| t.vehicles as u64).sum()
    }

    /// Offered publishes per second: (location updates, alerts, trip events).
    pub fn offered_rates(&self) -> (f64, f64, f64) {
        let mut loc = 0.0;
        let mut al = 0.0;
        let mut tr = 0.0;
        for t in &self.tenants {
            if t.interval_ns > 0 {
                loc += t.vehicles as f64 * 1e9 / t.interval_ns as f64;
            }
            al += t.alerts_per_second;
            tr += t.trip_events_per_second;
        }
        (loc, al, tr)
    }

    /// Deliveries per second the scenario asks of the broker.
    pub fn offered_deliveries(&self) -> f64 {
        let mut d = 0.0;
        for t in &self.tenants {
            if t.interval_ns > 0 {
                let per_vehicle = 1e9 / t.interval_ns as f64;
                d += t.loc_watchers.iter().map(|&w| w as f64).sum::<f64>() * per_vehicle;
            }
            // Alerts: 40/30/20/10 % by severity (see schedule::alert_severity).
            let weights = [0.4, 0.3, 0.2, 0.1];
            d += t.alerts_per_second
                * (0..4)
                    .map(|i| weights[i] * t.alert_watchers[i] as f64)
                    .sum::<f64>();
            d += t.trip_events_per_second * t.trip_watchers as f64;
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
duration_s = 5
[[tenants]]
id = "fleet_a"
device_key = "device-key-0123456789"
viewer_key = "viewer-key-0123456789"
service_key = "service-key-0123456789"
vehicles = 10
vehicles_per_connection = 4
alerts_per_second = 2
trip_events_per_second = 1
service_connections = 2
[[tenants.dashboards]]
count = 3
locations = "fleet"
alerts = true
alert_severities = ["high", "critical"]
[[tenants.dashboards]]
count = 2
locations = "vehicles"
vehicles_each = 4
trip_events = true
"#;

    #[test]
    fn plan_of_a_small_scenario() {
        let s = Scenario::from_toml(BASE).unwrap();
        let p = Plan::build(&s).unwrap();
        // 2 services + ceil(10 / 4) vehicle connections + 5 dashboards.
        assert_eq!(p.conns.len(), 2 + 3 + 5);
        assert_eq!(p.conns[4].kind, ConnKind::Vehicles { first: 8, count: 2 });
        let t = &p.tenants[0];
        // Fleet dashboards watch every vehicle; the two vehicle dashboards watch v0-v3
        // and v4-v7.
        assert_eq!(t.loc_watchers, vec![4, 4, 4, 4, 4, 4, 4, 4, 3, 3]);
        assert_eq!(t.alert_watchers, [0, 0, 3, 3]);
        assert_eq!(t.trip_watchers, 2);
        let ConnKind::Dashboard { sub, .. } = &p.conns[5].kind else {
            panic!()
        };
        assert_eq!(sub.alert_mask, 0b1100);
        let msgs = sub.messages();
        assert_eq!(msgs.len(), 2);
        assert!(msgs[1].contains(r#""filters":{"severity":["high","critical"]}"#));
        let ConnKind::Dashboard { sub, .. } = &p.conns[9].kind else {
            panic!()
        };
        assert_eq!(sub.locations, LocSub::Vehicles(vec![4, 5, 6, 7]));
        assert!(sub.messages()[0].contains(r#"{"vehicle_ids":["v4","v5","v6","v7"]}"#));
        // 10 vehicles at 1/s, watched 38 times in all; alerts: 30 % high or critical
        // to 3 dashboards; trips: 1/s to 2.
        assert!((p.offered_deliveries() - (38.0 + 2.0 * 0.3 * 3.0 + 2.0)).abs() < 1e-9);
        assert_eq!(p.groups.len(), 2);
    }

    #[test]
    fn overrides_scale_counts_and_rates() {
        let s = Scenario::from_toml(BASE).unwrap();
        let o = Overrides {
            dashboards: Some(10),
            vehicles: Some(100),
            rate_multiplier: Some(4.0),
            duration_s: Some(2.0),
            ..Default::default()
        };
        let s2 = s.with_overrides(&o).unwrap();
        let counts: Vec<u32> = s2.tenants[0].dashboards.iter().map(|g| g.count).collect();
        assert_eq!(counts, vec![6, 4]);
        assert_eq!(s2.tenants[0].vehicles, 100);
        assert_eq!(s2.tenants[0].update_interval_ms, 250.0);
        assert_eq!(s2.tenants[0].alerts_per_second, 8.0);
        assert_eq!(s2.duration_s, 2.0);
    }

    #[test]
    fn apportion_is_exact_and_proportional() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(1000, &[50, 950]), vec![50, 950]);
        assert_eq!(apportion(7, &[0, 0]), vec![4, 3]);
        assert_eq!(apportion(0, &[3, 4]), vec![0, 0]);
        assert_eq!(apportion(5, &[]), Vec::<u64>::new());
        for total in 0..50 {
            assert_eq!(apportion(total, &[3, 5, 11]).iter().sum::<u64>(), total);
        }
    }

    #[test]
    fn validation_explains() {
        let bad = BASE.replace("vehicles_per_connection = 4", "jitter_ms = 600");
        let e = Scenario::from_toml(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("jitter_ms"), "{e:#}");
        let bad = BASE.replace("\"high\", \"critical\"", "\"severe\"");
        let e = Scenario::from_toml(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("severity"), "{e:#}");
        let bad = BASE.replace("name = \"t\"", "name = \"t\"\nspeed = 3");
        assert!(Scenario::from_toml(&bad).is_err());
        let s = Scenario::from_toml(BASE).unwrap();
        assert!(
            s.with_overrides(&Overrides {
                rate_multiplier: Some(0.0),
                ..Default::default()
            })
            .is_err()
        );
    }
}
