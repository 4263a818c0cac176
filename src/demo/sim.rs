//! The simulated fleet: pure and deterministic. Vehicles drive shortest routes between
//! intersections of the embedded city, speeding up and slowing for turns, and park
//! between trips. Alerts come from the motion itself: a harsh braking alert when the
//! reported speeds show a deceleration over [`HARSH_BRAKING_MS2`], a speeding alert when
//! a vehicle stays over its street's limit. No clock and no IO: the caller says how much
//! time passed and when it is, and gets native publish messages back.

use super::roads::{Point, Roads};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::sync::Arc;

/// Deceleration (m/s²) above which braking counts as harsh (about 0.4 g).
pub const HARSH_BRAKING_MS2: f64 = 4.0;
/// Comfortable acceleration and braking (m/s²).
const ACCEL_MS2: f64 = 2.0;
const BRAKE_MS2: f64 = 2.5;
/// An emergency stop's deceleration (m/s²): a pedestrian, a car pulling out; from a
/// firm stop to full braking on dry asphalt.
const EMERGENCY_MS2: std::ops::Range<f64> = 3.0..8.0;
/// Chance per second, while moving faster than 30 km/h, of an emergency stop.
const EMERGENCY_PER_S: f64 = 0.002;
/// Over the limit by this factor for [`SPEEDING_FOR_S`] seconds: a speeding alert.
const SPEEDING_FACTOR: f64 = 1.1;
const SPEEDING_FOR_S: f64 = 3.0;
/// At most one speeding alert per vehicle in this time.
const SPEEDING_COOLDOWN_S: f64 = 90.0;
const TELEMETRY_EVERY_S: f64 = 5.0;
/// Tyre pressure (kPa) below which a maintenance alert is raised; one vehicle in ten has
/// a slow leak, and its tyres are pumped up at the end of the trip after the alert.
const TYRE_LOW_KPA: f64 = 200.0;
const TYRE_FULL_KPA: f64 = 240.0;
const PROGRESS_EVERY_S: f64 = 10.0;

/// One outgoing message: its native `type` and the complete message text.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub kind: &'static str,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Parked until the vehicle's clock reaches this second.
    Parked {
        until_s: f64,
    },
    Driving,
}

#[derive(Debug)]
struct Vehicle {
    id: String,
    driver: String,
    rng: ChaCha8Rng,
    /// The vehicle's own clock (seconds since it was created).
    t: f64,
    mode: Mode,
    /// The intersection last passed (or parked at).
    at: usize,
    /// The intersections still ahead on this trip.
    route: Vec<usize>,
    /// Metres travelled along the street from `at` to `route[0]`.
    along: f64,
    speed_ms: f64,
    heading: f64,
    /// How this driver treats limits (1.0: exactly at the limit).
    temper: f64,
    /// Seconds of emergency braking left, and how hard.
    emergency_s: f64,
    emergency_ms2: f64,
    over_limit_s: f64,
    last_speeding_s: f64,
    trips: u32,
    trip_m: f64,
    trip_total_m: f64,
    fuel: f64,
    tyre_kpa: f64,
    /// kPa lost per second (a slow puncture), 0 for most.
    leak_kpa_s: f64,
    tyre_warned: bool,
    engine_temp: f64,
    odometer_m: f64,
    next_telemetry_s: f64,
    next_progress_s: f64,
    next_status_s: f64,
    signal_weak: bool,
    alerts: u32,
    /// Set when state changes that a message must report (trip start).
    pending: Vec<Msg>,
}

/// A vehicle's motion as its last location update reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Motion {
    pub position: Point,
    pub speed_kmh: f64,
    pub heading: f64,
    pub limit_kmh: f64,
}

pub struct Fleet {
    roads: Arc<Roads>,
    vehicles: Vec<Vehicle>,
}

impl Fleet {
    /// `n` vehicles; the same `seed` gives the same fleet and the same routes.
    pub fn new(seed: u64, n: usize) -> Fleet {
        let roads = Arc::new(Roads::city());
        let vehicles = (0..n)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                // One driver in five speeds.
                let temper = if rng.gen_bool(0.2) {
                    rng.gen_range(1.15..1.35)
                } else {
                    rng.gen_range(0.85..1.02)
                };
                Vehicle {
                    id: format!("vehicle_{:03}", i + 1),
                    driver: format!("driver_{:03}", i + 1),
                    at: rng.gen_range(0..roads.nodes.len()),
                    // Staggered first departures over the first half minute.
                    mode: Mode::Parked {
                        until_s: rng.gen_range(0.0..30.0),
                    },
                    temper,
                    fuel: rng.gen_range(35.0..95.0),
                    engine_temp: rng.gen_range(20.0..40.0),
                    odometer_m: rng.gen_range(10_000.0..250_000.0) * 1000.0,
                    next_status_s: rng.gen_range(60.0..600.0),
                    tyre_kpa: rng.gen_range(215.0..TYRE_FULL_KPA),
                    leak_kpa_s: if rng.gen_bool(0.1) {
                        rng.gen_range(0.03..0.12)
                    } else {
                        0.0
                    },
                    tyre_warned: false,
                    rng,
                    t: 0.0,
                    route: Vec::new(),
                    along: 0.0,
                    speed_ms: 0.0,
                    heading: 0.0,
                    emergency_s: 0.0,
                    emergency_ms2: 0.0,
                    over_limit_s: 0.0,
                    last_speeding_s: -SPEEDING_COOLDOWN_S,
                    trips: 0,
                    trip_m: 0.0,
                    trip_total_m: 0.0,
                    next_telemetry_s: 0.0,
                    next_progress_s: 0.0,
                    signal_weak: false,
                    alerts: 0,
                    pending: Vec::new(),
                }
            })
            .collect();
        Fleet { roads, vehicles }
    }

    pub fn len(&self) -> usize {
        self.vehicles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vehicles.is_empty()
    }

    pub fn vehicle_id(&self, i: usize) -> &str {
        &self.vehicles[i].id
    }

    /// Where vehicle `i` is now.
    pub fn motion(&self, i: usize) -> Motion {
        let v = &self.vehicles[i];
        Motion {
            position: self.position(v),
            speed_kmh: v.speed_ms * 3.6,
            heading: v.heading,
            limit_kmh: self.limit(v),
        }
    }

    /// The messages vehicle `i` sends when it starts: its device comes online.
    pub fn hello(&mut self, i: usize, now_ms: i64) -> Vec<Msg> {
        let v = &self.vehicles[i];
        let mut out = Vec::new();
        let status = json!({"vehicle_id": v.id, "device_id": format!("dev_{}", &v.id[8..]),
            "status": "online", "reason": "power_on"});
        push(&mut out, "device_status", None, now_ms, status);
        let driver = json!({"driver_id": v.driver, "vehicle_id": v.id, "status": "on_duty"});
        push(&mut out, "driver_status", None, now_ms, driver);
        out
    }

    /// Advances vehicle `i` by `dt_s` seconds; `now_ms` is the wall-clock time of the
    /// update. Returns its location update and whatever else happened meanwhile.
    pub fn step(&mut self, i: usize, dt_s: f64, now_ms: i64) -> Vec<Msg> {
        let roads = self.roads.clone();
        let v = &mut self.vehicles[i];
        let dt = dt_s.clamp(0.05, 10.0);
        v.t += dt;
        let mut out = std::mem::take(&mut v.pending);
        let before = v.speed_ms;
        match v.mode {
            Mode::Parked { until_s } if v.t >= until_s => start_trip(v, &roads, now_ms, &mut out),
            Mode::Parked { .. } => {}
            Mode::Driving => drive(v, &roads, dt),
        }
        if v.mode == Mode::Driving && v.route.is_empty() && v.speed_ms == 0.0 {
            end_trip(v, now_ms, &mut out);
        }
        let limit = limit_of(v, &roads);
        self.alerts(i, before, dt, limit, now_ms, &mut out);
        let v = &mut self.vehicles[i];
        fuel_and_engine(v, dt);
        let mut msgs = vec![location(v, &roads, limit, now_ms)];
        if v.tyre_kpa < TYRE_LOW_KPA && !v.tyre_warned {
            v.tyre_warned = true;
            let p = json!({"vehicle_id": v.id, "severity": "medium",
                "alert_type": "tire_pressure",
                "message": format!("tyre pressure {:.0} kPa: check for a puncture", v.tyre_kpa)});
            push(&mut msgs, "maintenance_alert", None, now_ms, p);
        }
        if v.t >= v.next_telemetry_s {
            v.next_telemetry_s = v.t + TELEMETRY_EVERY_S;
            msgs.push(telemetry(v, now_ms));
        }
        if v.mode == Mode::Driving && v.t >= v.next_progress_s {
            v.next_progress_s = v.t + PROGRESS_EVERY_S;
            msgs.push(progress(v, now_ms));
        }
        if v.t >= v.next_status_s {
            v.next_status_s = v.t + v.rng.gen_range(120.0..900.0);
            v.signal_weak = !v.signal_weak;
            let (status, reason) = if v.signal_weak {
                ("degraded", "weak_gps_signal")
            } else {
                ("online", "signal_restored")
            };
            let p = json!({"vehicle_id": v.id, "device_id": format!("dev_{}", &v.id[8..]),
                "status": status, "reason": reason});
            push(&mut msgs, "device_status", None, now_ms, p);
        }
        msgs.extend(out);
        msgs
    }

    fn position(&self, v: &Vehicle) -> Point {
        position_of(v, &self.roads)
    }

    fn limit(&self, v: &Vehicle) -> f64 {
        limit_of(v, &self.roads)
    }

    /// Alerts from the motion of the last `dt` seconds (the speed was `before` m/s).
    fn alerts(
        &mut self,
        i: usize,
        before: f64,
        dt: f64,
        limit: f64,
        now_ms: i64,
        out: &mut Vec<Msg>,
    ) {
        let roads = self.roads.clone();
        let v = &mut self.vehicles[i];
        let kmh = v.speed_ms * 3.6;
        let decel = (before - v.speed_ms) / dt;
        if decel > HARSH_BRAKING_MS2 {
            let severity = if decel > 6.0 { "high" } else { "medium" };
            let msg = format!(
                "harsh braking: {:.1} m/s² from {:.0} km/h",
                decel,
                before * 3.6
            );
            alert(v, &roads, "harsh_braking", severity, msg, now_ms, out);
        }
        if v.mode == Mode::Driving && kmh > limit * SPEEDING_FACTOR {
            v.over_limit_s += dt;
        } else {
            v.over_limit_s = 0.0;
        }
        if v.over_limit_s >= SPEEDING_FOR_S && v.t - v.last_speeding_s >= SPEEDING_COOLDOWN_S {
            v.last_speeding_s = v.t;
            let severity = if kmh > limit * 1.3 { "high" } else { "medium" };
            let msg = format!("speeding: {kmh:.0} km/h where the limit is {limit:.0}");
            alert(v, &roads, "speeding", severity, msg, now_ms, out);
        }
    }
}

fn position_of(v: &Vehicle, roads: &Roads) -> Point {
    let a = roads.nodes[v.at];
    match v.route.first() {
        Some(&next) => {
            let b = roads.nodes[next];
            let len = a.distance(b).max(1e-9);
            let f = (v.along / len).clamp(0.0, 1.0);
            Point {
                x: a.x + (b.x - a.x) * f,
                y: a.y + (b.y - a.y) * f,
            }
        }
        None => a,
    }
}

fn limit_of(v: &Vehicle, roads: &Roads) -> f64 {
    v.route
        .first()
        .and_then(|&n| roads.edge(v.at, n))
        .map_or(50.0, |e| e.limit_kmh)
}

/// The speed (m/s) a turn from `a` through `b` to `c` can be taken at.
fn turn_speed(roads: &Roads, a: usize, b: usize, c: usize) -> f64 {
    let (pa, pb, pc) = (roads.nodes[a], roads.nodes[b], roads.nodes[c]);
    let turn = (pa.bearing(pb) - pb.bearing(pc)).abs() % 360.0;
    let turn = turn.min(360.0 - turn);
    // Straight on: no slowing; a right angle: about 20 km/h; a U-turn: walking pace.
    let kmh = (70.0 - turn * 0.55).max(8.0);
    kmh / 3.6
}

fn start_trip(v: &mut Vehicle, roads: &Roads, now_ms: i64, out: &mut Vec<Msg>) {
    let n = roads.nodes.len();
    let mut to = v.rng.gen_range(0..n);
    while to == v.at || roads.nodes[to].distance(roads.nodes[v.at]) < 1200.0 {
        to = v.rng.gen_range(0..n);
    }
    v.route = roads.route(v.at, to);
    v.along = 0.0;
    v.trips += 1;
    v.trip_m = 0.0;
    let mut at = v.at;
    v.trip_total_m = 0.0;
    for &next in &v.route {
        v.trip_total_m += roads.edge(at, next).map_or(0.0, |e| e.length_m);
        at = next;
    }
    if let Some(&next) = v.route.first() {
        v.heading = roads.nodes[v.at].bearing(roads.nodes[next]);
    }
    v.mode = Mode::Driving;
    v.next_progress_s = v.t;
    let (lat, lon) = roads.nodes[v.at].lat_lon();
    let (dlat, dlon) = roads.nodes[to].lat_lon();
    let p = json!({"trip_id": trip_id(v), "vehicle_id": v.id, "driver_id": v.driver,
        "event": "trip_started",
        "origin": {"latitude": round6(lat), "longitude": round6(lon)},
        "destination": {"latitude": round6(dlat), "longitude": round6(dlon)},
        "planned_distance_km": round1(v.trip_total_m / 1000.0)});
    push(out, "trip_event", None, now_ms, p);
    let d = json!({"driver_id": v.driver, "vehicle_id": v.id, "trip_id": trip_id(v),
        "status": "driving"});
    push(out, "driver_status", None, now_ms, d);
}

fn end_trip(v: &mut Vehicle, now_ms: i64, out: &mut Vec<Msg>) {
    let p = json!({"trip_id": trip_id(v), "vehicle_id": v.id, "driver_id": v.driver,
        "event": "trip_completed", "distance_km": round1(v.trip_m / 1000.0)});
    push(out, "trip_event", None, now_ms, p);
    let d = json!({"driver_id": v.driver, "vehicle_id": v.id, "status": "on_break"});
    push(out, "driver_status", None, now_ms, d);
    v.mode = Mode::Parked {
        until_s: v.t + v.rng.gen_range(15.0..90.0),
    };
    if v.fuel < 15.0 {
        let p = json!({"vehicle_id": v.id, "severity": "low", "alert_type": "low_fuel",
            "message": format!("fuel at {:.0}%: refuelled at the stop", v.fuel)});
        push(out, "maintenance_alert", None, now_ms, p);
        v.fuel = v.rng.gen_range(85.0..100.0);
    }
    if v.tyre_warned {
        v.tyre_warned = false;
        v.tyre_kpa = TYRE_FULL_KPA;
    }
}

/// Moves a driving vehicle along its route for `dt` seconds.
fn drive(v: &mut Vehicle, roads: &Roads, dt: f64) {
    let Some(&next) = v.route.first() else {
        v.speed_ms = (v.speed_ms - BRAKE_MS2 * dt).max(0.0);
        return;
    };
    let edge = *roads.edge(v.at, next).expect("routes follow streets");
    let left = (edge.length_m - v.along).max(0.0);
    // The speed to be at when reaching the next intersection.
    let end_speed = match v.route.get(1) {
        Some(&after) => turn_speed(roads, v.at, next, after).min(edge.limit_kmh / 3.6),
        None => 0.0,
    };
    let mut target = edge.limit_kmh / 3.6 * v.temper;
    // Brake comfortably so as to reach `end_speed` at the intersection.
    target = target.min((end_speed * end_speed + 2.0 * BRAKE_MS2 * left).sqrt());
    if v.emergency_s > 0.0 {
        v.emergency_s -= dt;
        target = 0.0;
    } else if v.speed_ms > 30.0 / 3.6 && v.rng.gen_bool((EMERGENCY_PER_S * dt).min(1.0)) {
        v.emergency_s = v.rng.gen_range(1.0..2.5);
        v.emergency_ms2 = v.rng.gen_range(EMERGENCY_MS2);
        target = 0.0;
    }
    let old = v.speed_ms;
    v.speed_ms = if target > old {
        (old + ACCEL_MS2 * dt).min(target)
    } else {
        let brake = if v.emergency_s > 0.0 {
            v.emergency_ms2
        } else {
            BRAKE_MS2
        };
        (old - brake * dt).max(target)
    };
    // A creeping minimum so that a vehicle always arrives.
    if v.speed_ms < 1.0 && v.emergency_s <= 0.0 && left > 0.5 {
        v.speed_ms = v.speed_ms.max(1.0f64.min(old + ACCEL_MS2 * dt));
    }
    let mut dist = (old + v.speed_ms) / 2.0 * dt;
    v.trip_m += dist;
    v.odometer_m += dist;
    while let Some(&next) = v.route.first() {
        let len = roads.edge(v.at, next).map_or(0.0, |e| e.length_m);
        v.heading = roads.nodes[v.at].bearing(roads.nodes[next]);
        if v.along + dist < len {
            v.along += dist;
            return;
        }
        dist -= len - v.along;
        v.at = next;
        v.along = 0.0;
        v.route.remove(0);
    }
    // Arrived: at the destination, still rolling to a stop (`drive` brakes next turn).
}

fn fuel_and_engine(v: &mut Vehicle, dt: f64) {
    let moving = v.speed_ms > 0.5;
    // About 9 l/100 km from a 60 l tank, plus idling.
    v.fuel -= (v.speed_ms * dt / 1000.0) * (9.0 / 100.0) / 60.0 * 100.0;
    if matches!(v.mode, Mode::Driving) {
        v.fuel -= 0.0005 * dt;
    }
    v.fuel = v.fuel.max(2.0);
    v.tyre_kpa = (v.tyre_kpa - v.leak_kpa_s * dt).max(80.0);
    let warm = if matches!(v.mode, Mode::Driving) {
        90.0
    } else {
        45.0
    };
    let pull = if moving { 0.02 } else { 0.01 };
    v.engine_temp += (warm - v.engine_temp) * (pull * dt).min(1.0) + v.rng.gen_range(-0.2..0.2);
}

fn trip_id(v: &Vehicle) -> String {
    format!("trip_{}_{}", &v.id[8..], v.trips)
}

fn location(v: &Vehicle, roads: &Roads, limit: f64, now_ms: i64) -> Msg {
    let (lat, lon) = position_of(v, roads).lat_lon();
    let moving = v.speed_ms > 0.5;
    let mut p = json!({"vehicle_id": v.id, "driver_id": v.driver,
        "location": {"latitude": round6(lat), "longitude": round6(lon),
            "speed": round1(v.speed_ms * 3.6), "heading": round1(v.heading),
            "accuracy": if v.signal_weak { 25 } else { 5 }},
        "status": if moving { "moving" } else if v.mode == Mode::Driving { "stopped" } else { "parked" },
        "speed_limit": limit});
    if v.mode == Mode::Driving {
        p["trip_id"] = trip_id(v).into();
    }
    let mut out = Vec::new();
    push(&mut out, "location_update", None, now_ms, p);
    out.pop().expect("pushed")
}

fn telemetry(v: &mut Vehicle, now_ms: i64) -> Msg {
    let moving = v.speed_ms > 0.5;
    let rpm = if moving {
        900.0 + v.speed_ms * 3.6 * 28.0 + v.rng.gen_range(-80.0..80.0)
    } else if v.mode == Mode::Driving {
        750.0 + v.rng.gen_range(-30.0..30.0)
    } else {
        0.0
    };
    let p = json!({"vehicle_id": v.id, "telemetry": {
        "fuel_level": round1(v.fuel), "engine_rpm": rpm.round(),
        "engine_temp": round1(v.engine_temp), "speed": round1(v.speed_ms * 3.6),
        "tire_pressure": round1(v.tyre_kpa),
        "odometer": (v.odometer_m / 1000.0).round()},
        "units": {"fuel_level": "%", "engine_rpm": "rpm", "engine_temp": "celsius",
            "speed": "km/h", "odometer": "km", "tire_pressure": "kPa"}});
    let mut out = Vec::new();
    push(&mut out, "telemetry_update", None, now_ms, p);
    out.pop().expect("pushed")
}

fn progress(v: &Vehicle, now_ms: i64) -> Msg {
    let total = v.trip_total_m.max(1.0);
    let done = v.trip_m.min(total);
    let left = total - done;
    let p = json!({"vehicle_id": v.id, "trip_id": trip_id(v),
        "progress_percent": round1(done / total * 100.0),
        "remaining_km": round1(left / 1000.0),
        "eta_seconds": (left / (40.0 / 3.6)).round()});
    let mut out = Vec::new();
    push(&mut out, "route_progress", None, now_ms, p);
    out.pop().expect("pushed")
}

fn alert(
    v: &mut Vehicle,
    roads: &Roads,
    category: &str,
    severity: &str,
    message: String,
    now_ms: i64,
    out: &mut Vec<Msg>,
) {
    v.alerts += 1;
    let id = format!("al_{}_{}_{}", &v.id[8..], v.alerts, now_ms);
    let (lat, lon) = position_of(v, roads).lat_lon();
    let mut p = json!({"alert_id": id, "vehicle_id": v.id, "driver_id": v.driver,
        "severity": severity, "category": category, "message": message,
        "location": {"latitude": round6(lat), "longitude": round6(lon)}});
    if v.mode == Mode::Driving {
        p["trip_id"] = trip_id(v).into();
    }
    // The alert id doubles as the message id: a resend after a reconnect is deduplicated.
    push(out, "safety_alert", Some(id), now_ms, p);
}

fn push(out: &mut Vec<Msg>, kind: &'static str, id: Option<String>, now_ms: i64, payload: Value) {
    let mut m = json!({"type": kind,
        "timestamp": crate::dialect::native::format_rfc3339_ms(now_ms),
        "payload": payload});
    if let Some(id) = id {
        m["id"] = id.into();
    }
    out.push(Msg {
        kind,
        text: m.to_string(),
    });
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}
