//! The Valtronics dialect (`/ws`, `/ws/telemetry|alerts|devices|system`) end to end, beside
//! the native one: every publishing surface reaches every subscribing dialect in its own
//! shape, filters, path presets, tenant isolation, bad input and the connection gauge.
//!
//! Publishes are sent with `ack: true` (and a fresh id) and each event is awaited by its
//! subscribers before the next one goes out: the next message a subscriber reads is then
//! exactly the event it should get, and anything that should have been filtered out would
//! show up in its place (events of one stream arrive in order, SPEC §7).

use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A Valtronics connection on `path`, authenticated with an `auth` message: the first
/// message the server sends must be a successful `auth_response`.
fn valtronics(b: &Broker, path: &str, token: &str) -> Client {
    let mut c = Client::connect(&b.url(path));
    c.send(json!({"type":"auth","token":token}));
    let m = c.recv();
    assert_eq!(m["type"], "auth_response", "{path}: first message {m}");
    assert_eq!(m["success"], true, "{path}: {m}");
    assert!(m["user_id"].is_string(), "{path}: {m}");
    c
}

/// Sends a Valtronics subscribe and returns the `subscribed` reply (the next message).
fn v_subscribe(c: &mut Client, msg: Value) -> Value {
    let channel = msg["channel"].clone();
    c.send(msg);
    let m = c.recv();
    assert_eq!(m["type"], "subscribed", "{m}");
    assert_eq!(m["channel"], channel, "{m}");
    m
}

/// Sends `msg` with `id` and `ack: true`; the next message must be an accepted ack (native
/// acks carry their status in `payload`, Valtronics ones at the top level).
fn publish(c: &mut Client, mut msg: Value, id: &str) {
    msg["id"] = json!(id);
    msg["ack"] = json!(true);
    c.send(msg);
    let m = c.recv();
    assert_eq!(m["type"], "ack", "publish {id} was not accepted: {m}");
    assert_eq!(m["id"], id, "{m}");
    let status = if m["payload"].is_object() {
        &m["payload"]["status"]
    } else {
        &m["status"]
    };
    assert_eq!(status, "accepted", "publish {id}: {m}");
}

/// The next message, which must be a data event of type `ty`.
fn event(c: &mut Client, who: &str, ty: &str) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], ty, "{who}: expected a {ty} event, got {m}");
    m
}

/// The next message, which must be a Valtronics `error` with `code` (echoing `id` when
/// given); returns it.
fn v_error(c: &mut Client, id: Option<&str>, code: u64) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], "error", "expected an error frame, got {m}");
    assert_eq!(m["code"], code, "{m}");
    assert!(
        m["message"].as_str().is_some_and(|s| !s.is_empty()),
        "an error says what went wrong: {m}"
    );
    match id {
        Some(id) => assert_eq!(m["id"], id, "the error echoes the id it answers: {m}"),
        None => assert!(m.get("id").is_none(), "{m}"),
    }
    m
}

/// The metric names of a Valtronics telemetry event, sorted.
fn metric_names(m: &Value) -> Vec<String> {
    let mut names: Vec<String> = m["telemetry"]
        .as_object()
        .unwrap_or_else(|| panic!("telemetry object: {m}"))
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

/// Checks one metric of a Valtronics telemetry event: `{value, unit, timestamp}` with the
/// event's own timestamp.
fn assert_metric(m: &Value, name: &str, value: &Value, unit: &str) {
    let x = &m["telemetry"][name];
    assert_eq!(&x["value"], value, "{name}: {m}");
    assert_eq!(x["unit"], unit, "{name}: {m}");
    assert!(x["timestamp"].is_string(), "{name}: {m}");
    assert_eq!(x["timestamp"], m["timestamp"], "{name}: {m}");
}

// ------------------------------------------------------------------------ 1. matrix

#[derive(Clone, Copy, Debug, PartialEq)]
enum Surface {
    NativeService,
    NativeDevice,
    ValtronicsService,
    ValtronicsDevice,
}

impl Surface {
    fn connect(self, b: &Broker) -> Client {
        match self {
            Surface::NativeService => b.connect_key(&key("fleet_a", Role::Service)),
            Surface::NativeDevice => b.connect_key(&key("fleet_a", Role::Device)),
            Surface::ValtronicsService => valtronics(b, "/ws", &key("fleet_a", Role::Service)),
            Surface::ValtronicsDevice => valtronics(b, "/ws", &key("fleet_a", Role::Device)),
        }
    }

    fn native(self) -> bool {
        matches!(self, Surface::NativeService | Surface::NativeDevice)
    }
}

/// What one publish in the matrix carries, and what each dialect must show of it.
struct Round {
    surface: Surface,
    temperature: f64,
    fuel_gal: u64,
    severity: &'static str,
    status: &'static str,
    reason: &'static str,
}

#[test]
fn every_publishing_surface_reaches_native_and_valtronics_subscribers_in_their_shapes() {
    let b = Broker::with_shards(2);
    // Subscribers of vehicle "1" in both dialects: the native one names it as a string,
    // the Valtronics one as the number 1; both are the same entity.
    let mut nat = b.connect_key(&key("fleet_a", Role::Viewer));
    for channel in ["telemetry", "alerts", "device_status"] {
        nat.subscribe(channel, json!({"vehicle_ids":["1"]}));
    }
    let mut val = valtronics(&b, "/ws", &key("fleet_a", Role::Viewer));
    for channel in ["telemetry", "alerts", "devices"] {
        let m = v_subscribe(
            &mut val,
            json!({"type":"subscribe","channel":channel,"device_id":1}),
        );
        assert_eq!(m["device_id"], json!([1]), "numeric device ids: {m}");
    }

    let rounds = [
        Round {
            surface: Surface::NativeService,
            temperature: 21.5,
            fuel_gal: 40,
            severity: "warning",
            status: "online",
            reason: "boot",
        },
        Round {
            surface: Surface::NativeDevice,
            temperature: 22.5,
            fuel_gal: 41,
            severity: "info",
            status: "offline",
            reason: "Connection lost",
        },
        Round {
            surface: Surface::ValtronicsService,
            temperature: 23.5,
            fuel_gal: 42,
            severity: "critical",
            status: "maintenance",
            reason: "scheduled service",
        },
        Round {
            surface: Surface::ValtronicsDevice,
            temperature: 24.5,
            fuel_gal: 43,
            severity: "low",
            status: "online",
            reason: "back in range",
        },
    ];
    let mut previous_status: Option<&str> = None;
    for (i, r) in rounds.iter().enumerate() {
        let who = format!("{:?}", r.surface);
        let mut p = r.surface.connect(&b);
        let telemetry = json!({"temperature": r.temperature,
            "fuel_level": {"value": r.fuel_gal, "unit": "gal"},
            "door_cycles": 32});

        // Telemetry.
        let msg = if r.surface.native() {
            json!({"type":"telemetry_update","payload":{"vehicle_id":"1","telemetry":telemetry}})
        } else {
            json!({"type":"telemetry_update","device_id":1,"telemetry":telemetry})
        };
        publish(&mut p, msg, &format!("tel-{i}"));
        let n = event(&mut nat, &who, "telemetry_update");
        assert_eq!(n["channel"], "telemetry", "{who}: {n}");
        assert_eq!(
            n["payload"]["vehicle_id"], "1",
            "{who}: native ids are strings: {n}"
        );
        assert_eq!(
            n["payload"]["telemetry"]["temperature"], r.temperature,
            "{who}: {n}"
        );
        assert_eq!(
            n["payload"]["telemetry"]["fuel_level"],
            json!({"value": r.fuel_gal, "unit": "gal"}),
            "{who}: {n}"
        );
        assert_eq!(n["payload"]["telemetry"]["door_cycles"], 32, "{who}: {n}");
        let v = event(&mut val, &who, "telemetry_update");
        assert_eq!(v["channel"], "telemetry", "{who}: {v}");
        assert_eq!(
            v["device_id"],
            json!(1),
            "{who}: Valtronics ids are numbers: {v}"
        );
        assert!(v["timestamp"].is_string(), "{who}: {v}");
        assert_eq!(
            metric_names(&v),
            ["door_cycles", "fuel_level", "temperature"],
            "{who}: {v}"
        );
        // A bare number gets the metric's default unit, {value, unit} keeps its own, an
        // unknown metric gets "".
        assert_metric(&v, "temperature", &json!(r.temperature), "°C");
        assert_metric(&v, "fuel_level", &json!(r.fuel_gal), "gal");
        assert_metric(&v, "door_cycles", &json!(32), "");

        // Alert: the native publish has no title (the Valtronics title is its category);
        // the Valtronics service gives one, the Valtronics device only an alert_type.
        let (msg, alert_id, category, title, metadata) = match r.surface {
            Surface::NativeService | Surface::NativeDevice => (
                json!({"type":"safety_alert","payload":{"alert_id":format!("al-{i}"),
                    "severity":r.severity,"category":"harsh_braking","vehicle_id":"1",
                    "message":"Hard stop detected"}}),
                json!(format!("al-{i}")),
                "harsh_braking",
                "harsh_braking",
                json!({}),
            ),
            Surface::ValtronicsService => (
                json!({"type":"alert","device_id":1,"alert_id":100 + i,
                    "severity":r.severity,"title":"Engine hot","alert_type":"overheat",
                    "message":"Hard stop detected","metadata":{"zone":"north","threshold":90}}),
                json!(100 + i),
                "overheat",
                "Engine hot",
                json!({"zone":"north","threshold":90}),
            ),
            Surface::ValtronicsDevice => (
                json!({"type":"alert","device_id":1,"alert_id":100 + i,
                    "severity":r.severity,"alert_type":"overheat",
                    "message":"Hard stop detected"}),
                json!(100 + i),
                "overheat",
                "overheat",
                json!({}),
            ),
        };
        publish(&mut p, msg, &format!("alert-{i}"));
        let n = event(&mut nat, &who, "safety_alert");
        assert_eq!(n["channel"], "alerts", "{who}: {n}");
        let np = &n["payload"];
        assert_eq!(np["vehicle_id"], "1", "{who}: {n}");
        assert_eq!(np["alert_id"], alert_id, "{who}: {n}");
        assert_eq!(
            np["severity"], r.severity,
            "{who}: severities pass unchanged: {n}"
        );
        assert_eq!(np["category"], category, "{who}: {n}");
        assert_eq!(np["message"], "Hard stop detected", "{who}: {n}");
        let v = event(&mut val, &who, "alert");
        assert_eq!(v["channel"], "alerts", "{who}: {v}");
        assert_eq!(v["alert_id"], alert_id, "{who}: {v}");
        assert_eq!(v["device_id"], json!(1), "{who}: {v}");
        assert_eq!(
            v["severity"], r.severity,
            "{who}: severities pass unchanged: {v}"
        );
        assert_eq!(v["title"], title, "{who}: {v}");
        assert_eq!(v["message"], "Hard stop detected", "{who}: {v}");
        assert!(v["timestamp"].is_string(), "{who}: {v}");
        assert_eq!(v["metadata"], metadata, "{who}: {v}");

        // Device status: Valtronics subscribers see the status it replaces.
        let msg = if r.surface.native() {
            json!({"type":"device_status","payload":{"vehicle_id":"1","status":r.status,
                "reason":r.reason}})
        } else {
            json!({"type":"device_status_update","device_id":1,"new_status":r.status,
                "reason":r.reason})
        };
        publish(&mut p, msg, &format!("status-{i}"));
        let n = event(&mut nat, &who, "device_status");
        assert_eq!(n["channel"], "device_status", "{who}: {n}");
        assert_eq!(n["payload"]["vehicle_id"], "1", "{who}: {n}");
        assert_eq!(n["payload"]["status"], r.status, "{who}: {n}");
        assert_eq!(n["payload"]["reason"], r.reason, "{who}: {n}");
        let v = event(&mut val, &who, "device_status_update");
        assert_eq!(v["channel"], "devices", "{who}: {v}");
        assert_eq!(v["device_id"], json!(1), "{who}: {v}");
        assert_eq!(v["old_status"], json!(previous_status), "{who}: {v}");
        assert_eq!(v["new_status"], r.status, "{who}: {v}");
        assert_eq!(v["reason"], r.reason, "{who}: {v}");
        assert!(v["timestamp"].is_string(), "{who}: {v}");
        previous_status = Some(r.status);
    }
    nat.expect_nothing_more("native subscriber");
    val.expect_nothing_more("valtronics subscriber");
}

/// A Valtronics publish that carries its own `timestamp` keeps it (on the event and on
/// every metric), and a native subscriber gets the same instant. Bare metrics take their
/// unit from `telemetry.units` (defaults plus what the config adds), whichever dialect
/// published them.
#[test]
fn a_valtronics_publish_keeps_its_timestamp_and_units_come_from_the_config() {
    let mut cfg = config(2);
    cfg.telemetry
        .units
        .insert("load_weight".into(), "kg".into());
    let b = Broker::start(cfg);
    let mut nat = b.connect_key(&key("fleet_a", Role::Viewer));
    nat.subscribe("telemetry", json!({}));
    let mut val = valtronics(&b, "/ws/telemetry", &key("fleet_a", Role::Viewer));
    let m = val.recv();
    assert_eq!(
        (&m["type"], &m["channel"]),
        (&json!("subscribed"), &json!("telemetry")),
        "{m}"
    );
    let mut dev = valtronics(&b, "/ws", &key("fleet_a", Role::Device));
    let ts = "2024-01-15T10:30:00Z";
    publish(
        &mut dev,
        json!({"type":"telemetry_update","device_id":7,"timestamp":ts,
            "telemetry":{"speed":88,"battery_voltage":{"value":12.6,"unit":"mV"},
                "load_weight":1200}}),
        "ts-1",
    );
    let v = event(&mut val, "valtronics", "telemetry_update");
    assert_eq!(v["timestamp"], ts, "{v}");
    assert_eq!(v["device_id"], 7, "{v}");
    assert_metric(&v, "speed", &json!(88), "km/h");
    assert_metric(&v, "battery_voltage", &json!(12.6), "mV");
    assert_metric(&v, "load_weight", &json!(1200), "kg");
    let n = event(&mut nat, "native", "telemetry_update");
    assert_eq!(n["timestamp"], ts, "{n}");
    assert_eq!(n["payload"]["vehicle_id"], "7", "{n}");
    assert_eq!(n["payload"]["telemetry"]["speed"], 88, "{n}");

    // A native publish of bare numbers: the same units.
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    publish(
        &mut svc,
        json!({"type":"telemetry_update","payload":{"vehicle_id":"8",
            "telemetry":{"load_weight":900,"humidity":55,"door_cycles":3}}}),
        "ts-2",
    );
    let v = event(&mut val, "valtronics", "telemetry_update");
    assert_eq!(v["device_id"], 8, "{v}");
    assert_metric(&v, "load_weight", &json!(900), "kg");
    assert_metric(&v, "humidity", &json!(55), "%");
    assert_metric(&v, "door_cycles", &json!(3), "");
    let n = event(&mut nat, "native", "telemetry_update");
    assert_eq!(n["payload"]["telemetry"]["load_weight"], 900, "{n}");
}

// ----------------------------------------------------------------------- 2. filters

#[test]
fn valtronics_filters_select_devices_severities_alert_types_and_metrics() {
    let b = Broker::with_shards(2);
    let viewer = key("fleet_a", Role::Viewer);
    // A: filters at the top level (the seed's JavaScript class).
    let mut a = valtronics(&b, "/ws", &viewer);
    let m = v_subscribe(
        &mut a,
        json!({"type":"subscribe","id":"a1","channel":"telemetry","device_id":1}),
    );
    assert_eq!(
        (&m["id"], &m["device_id"]),
        (&json!("a1"), &json!([1])),
        "{m}"
    );
    v_subscribe(
        &mut a,
        json!({"type":"subscribe","channel":"alerts","severity":["critical"]}),
    );
    // B: filters nested under `filters` (the seed's Python class).
    let mut bb = valtronics(&b, "/ws", &viewer);
    let m = v_subscribe(
        &mut bb,
        json!({"type":"subscribe","channel":"telemetry",
            "filters":{"device_id":[2,3],"metrics":["temperature","speed"]}}),
    );
    assert_eq!(m["device_id"], json!([2, 3]), "{m}");
    v_subscribe(
        &mut bb,
        json!({"type":"subscribe","channel":"alerts",
            "filters":{"device_id":2,"severity":"warning","alert_type":["overheat"]}}),
    );
    // C: both at once, merged.
    let mut c = valtronics(&b, "/ws", &viewer);
    v_subscribe(
        &mut c,
        json!({"type":"subscribe","channel":"telemetry","device_id":1,
            "filters":{"metrics":["humidity"]}}),
    );

    let mut svc = valtronics(&b, "/ws", &key("fleet_a", Role::Service));
    // (device, telemetry, which of A, B, C get it, the metric names each sees)
    type Sees = [Option<&'static [&'static str]>; 3];
    let telemetry: [(u64, Value, Sees); 6] = [
        (4, json!({"temperature": 23.5}), [None, None, None]),
        (
            3,
            json!({"temperature": 22.5, "fuel_level": 10}),
            [None, Some(&["temperature"]), None],
        ),
        (
            2,
            json!({"temperature": 21.5, "humidity": 41, "speed": 51}),
            [None, Some(&["speed", "temperature"]), None],
        ),
        (
            1,
            json!({"temperature": 20.5, "humidity": 40, "speed": 50}),
            [
                Some(&["humidity", "speed", "temperature"]),
                None,
                Some(&["humidity"]),
            ],
        ),
        (
            2,
            json!({"temperature": 1.5}),
            [None, Some(&["temperature"]), None],
        ),
        (
            1,
            json!({"temperature": 2.5, "humidity": 3}),
            [
                Some(&["humidity", "temperature"]),
                None,
                Some(&["humidity"]),
            ],
        ),
    ];
    for (i, (device, t, sees)) in telemetry.iter().enumerate() {
        publish(
            &mut svc,
            json!({"type":"telemetry_update","device_id":device,"telemetry":t}),
            &format!("t{i}"),
        );
        for (sub, (name, names)) in [&mut a, &mut bb, &mut c]
            .into_iter()
            .zip(["A", "B", "C"].into_iter().zip(sees))
        {
            let Some(names) = names else { continue };
            let m = event(sub, name, "telemetry_update");
            assert_eq!(m["device_id"], *device, "{name}, publish {i}: {m}");
            assert_eq!(metric_names(&m), *names, "{name}, publish {i}: {m}");
            for n in names.iter() {
                assert_eq!(m["telemetry"][n]["value"], t[n], "{name}, publish {i}: {m}");
            }
        }
    }

    // (device, severity, alert_type, A gets it, B gets it)
    let alerts = [
        (1, "warning", "overheat", false, false),
        (2, "warning", "low_fuel", false, false),
        (2, "critical", "overheat", true, false),
        (2, "warning", "overheat", false, true),
        (3, "critical", "low_fuel", true, false),
        (2, "info", "overheat", false, false),
        (1, "critical", "overheat", true, false),
        (2, "warning", "overheat", false, true),
    ];
    for (i, (device, severity, kind, to_a, to_b)) in alerts.into_iter().enumerate() {
        publish(
            &mut svc,
            json!({"type":"alert","device_id":device,"alert_id":i,"severity":severity,
                "alert_type":kind,"title":"t","message":"m"}),
            &format!("a{i}"),
        );
        for (sub, name, gets) in [(&mut a, "A", to_a), (&mut bb, "B", to_b)] {
            if gets {
                let m = event(sub, name, "alert");
                assert_eq!(
                    (&m["alert_id"], &m["device_id"], &m["severity"]),
                    (&json!(i), &json!(device), &json!(severity)),
                    "{name}, alert {i}: {m}"
                );
            }
        }
    }
    a.expect_nothing_more("A");
    bb.expect_nothing_more("B");
    c.expect_nothing_more("C");
}

// ------------------------------------------------------------------ 3. path presets

#[test]
fn preset_paths_subscribe_their_channel_without_a_subscribe() {
    let b = Broker::with_shards(2);
    let viewer = key("fleet_a", Role::Viewer);
    let mut presets: Vec<(&str, &str, Client)> = Vec::new();
    for (path, channel) in [
        ("/ws/telemetry", "telemetry"),
        ("/ws/alerts", "alerts"),
        ("/ws/devices", "devices"),
    ] {
        let mut c = valtronics(&b, path, &viewer);
        let m = c.recv();
        assert_eq!(
            (&m["type"], &m["channel"]),
            (&json!("subscribed"), &json!(channel)),
            "{path}: {m}"
        );
        presets.push((path, channel, c));
    }
    // On `/ws` nothing is subscribed until asked.
    let mut plain = valtronics(&b, "/ws", &viewer);

    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    publish(
        &mut svc,
        json!({"type":"telemetry_update","payload":{"vehicle_id":"5","telemetry":{"speed":61}}}),
        "p-tel",
    );
    publish(&mut svc, alert("p-al", "5", "high"), "p-alert");
    publish(
        &mut svc,
        json!({"type":"device_status","payload":{"vehicle_id":"5","status":"online"}}),
        "p-status",
    );
    for (path, channel, c) in &mut presets {
        let m = c.recv();
        let want = match *channel {
            "telemetry" => "telemetry_update",
            "alerts" => "alert",
            _ => "device_status_update",
        };
        assert_eq!(m["type"], want, "{path}: {m}");
        assert_eq!(m["channel"], *channel, "{path}: {m}");
        assert_eq!(m["device_id"], 5, "{path}: {m}");
        match *channel {
            "telemetry" => assert_metric(&m, "speed", &json!(61), "km/h"),
            "alerts" => {
                assert_eq!(m["alert_id"], "p-al", "{m}");
                assert_eq!(m["severity"], "high", "{m}");
                assert_eq!(m["title"], "harsh_braking", "{m}");
            }
            _ => {
                assert_eq!(m["new_status"], "online", "{m}");
                assert_eq!(m["old_status"], Value::Null, "{m}");
            }
        }
    }
    // A second alert: each preset connection got only its own channel.
    publish(&mut svc, alert("p-al-2", "5", "low"), "p-alert-2");
    let m = event(&mut presets[1].2, "/ws/alerts", "alert");
    assert_eq!(m["alert_id"], "p-al-2", "{m}");
    for (path, _, c) in &mut presets {
        c.expect_nothing_more(path);
    }
    plain.expect_nothing_more("/ws without a subscribe");
}

/// The seed's clients always send `auth` after connecting; one that also put its
/// credential in the URL still reads `auth_response` first (SPEC §6: "auth_response is
/// the first message the server sends on this dialect"). On a preset path the broker
/// sends the preset's `subscribed` before it, which the seed's Python class takes for a
/// failed authentication.
#[test]
fn auth_response_comes_first_even_with_a_credential_in_the_url() {
    let b = Broker::with_shards(1);
    let viewer = key("fleet_a", Role::Viewer);
    for path in ["/ws", "/ws/alerts"] {
        let mut c = Client::connect(&b.url(&format!("{path}?api_key={viewer}")));
        c.send(json!({"type":"auth","token":viewer}));
        let m = c.recv();
        assert_eq!(
            (&m["type"], &m["success"]),
            (&json!("auth_response"), &json!(true)),
            "{path}?api_key=...: first message {m}"
        );
    }
}

fn system_update(c: &mut Client, who: &str) -> Value {
    let m = c.expect("system_status_update");
    assert_eq!(m["channel"], "system", "{who}: {m}");
    assert!(m["metrics"].is_object(), "{who}: {m}");
    m
}

#[test]
fn ws_system_gives_viewers_their_own_fleet_and_admins_the_node() {
    let mut cfg = config(2);
    cfg.history.metrics_interval_ms = 200;
    let b = Broker::start(cfg);
    let mut a = valtronics(&b, "/ws/system", &key("fleet_a", Role::Viewer));
    let mut bv = valtronics(&b, "/ws/system", &key("fleet_b", Role::Viewer));
    let mut admin = valtronics(&b, "/ws/system", &key("fleet_a", Role::Admin));
    for (who, c) in [
        ("fleet_a", &mut a),
        ("fleet_b", &mut bv),
        ("admin", &mut admin),
    ] {
        let m = c.recv();
        assert_eq!(
            (&m["type"], &m["channel"]),
            (&json!("subscribed"), &json!("system")),
            "{who}: {m}"
        );
    }
    // fleet_a has 2 vehicles on the road, fleet_b 3.
    for (tenant, vehicles) in [("fleet_a", 2), ("fleet_b", 3)] {
        let mut svc = b.connect_key(&key(tenant, Role::Service));
        for v in 0..vehicles {
            publish(
                &mut svc,
                location(&format!("{tenant}-v{v}"), 1.0),
                &format!("loc-{v}"),
            );
        }
    }
    for (who, c, mine, theirs) in [("fleet_a", &mut a, 2, 3), ("fleet_b", &mut bv, 3, 2)] {
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            assert!(
                Instant::now() < deadline,
                "{who}: no update with its {mine} vehicles"
            );
            let m = system_update(c, who);
            assert_eq!(m["scope"], "fleet", "{who}: a viewer sees its fleet: {m}");
            let metrics = &m["metrics"];
            for node_only in ["memory_rss_bytes", "shards", "cpu_usage"] {
                assert!(metrics.get(node_only).is_none(), "{who}: node figure: {m}");
            }
            let active = metrics["active_vehicles"].as_u64();
            assert_ne!(active, Some(theirs), "{who}: another fleet's figures: {m}");
            if active == Some(mine) {
                break;
            }
        }
    }
    let m = system_update(&mut admin, "admin");
    assert_eq!(m["scope"], "node", "{m}");
    assert!(m["metrics"]["cpu_usage"].is_number(), "{m}");
    assert!(
        m["metrics"]["memory_rss_bytes"].as_u64().unwrap_or(0) > 1_000_000,
        "{m}"
    );
    assert!(
        m["metrics"]["active_connections"].as_u64().unwrap_or(0) >= 3,
        "{m}"
    );
}

// --------------------------------------------------------------- 4. tenant isolation

#[test]
fn a_valtronics_subscriber_never_sees_another_fleets_events() {
    let b = Broker::with_shards(2);
    // fleet_b: one subscriber by JWT on /ws (every channel, no filter), one by API key on
    // the alerts preset, one filtered on the device id that fleet_a uses too.
    let jwt = mint_hs256(
        SECRET,
        "b-dash",
        "fleet_b",
        Role::Viewer,
        unix_now() + 600,
        None,
    )
    .unwrap();
    let mut b_all = valtronics(&b, "/ws", &jwt);
    for channel in ["telemetry", "alerts", "devices"] {
        v_subscribe(&mut b_all, json!({"type":"subscribe","channel":channel}));
    }
    let mut b_alerts = valtronics(&b, "/ws/alerts", &key("fleet_b", Role::Viewer));
    assert_eq!(b_alerts.recv()["type"], "subscribed");
    let mut b_dev1 = valtronics(&b, "/ws", &key("fleet_b", Role::Viewer));
    for channel in ["telemetry", "alerts", "devices"] {
        v_subscribe(
            &mut b_dev1,
            json!({"type":"subscribe","channel":channel,"device_id":1}),
        );
    }
    // fleet_a's own subscriber shows that its events were routed.
    let mut a_all = valtronics(&b, "/ws", &key("fleet_a", Role::Viewer));
    for channel in ["telemetry", "alerts", "devices"] {
        v_subscribe(&mut a_all, json!({"type":"subscribe","channel":channel}));
    }

    let mut a_native = b.connect_key(&key("fleet_a", Role::Service));
    let mut a_device = valtronics(&b, "/ws", &key("fleet_a", Role::Device));
    publish(
        &mut a_native,
        json!({"type":"telemetry_update","payload":{"vehicle_id":"1","telemetry":{"speed":11}}}),
        "a-t1",
    );
    assert_eq!(
        event(&mut a_all, "fleet_a", "telemetry_update")["telemetry"]["speed"]["value"],
        11
    );
    publish(
        &mut a_device,
        json!({"type":"telemetry_update","device_id":1,"telemetry":{"speed":12}}),
        "a-t2",
    );
    assert_eq!(
        event(&mut a_all, "fleet_a", "telemetry_update")["telemetry"]["speed"]["value"],
        12
    );
    publish(&mut a_native, alert("a-al", "1", "critical"), "a-a1");
    assert_eq!(event(&mut a_all, "fleet_a", "alert")["alert_id"], "a-al");
    publish(
        &mut a_device,
        json!({"type":"alert","device_id":1,"alert_id":"a-al-2","severity":"critical",
            "alert_type":"overheat"}),
        "a-a2",
    );
    assert_eq!(event(&mut a_all, "fleet_a", "alert")["alert_id"], "a-al-2");
    publish(
        &mut a_device,
        json!({"type":"device_status_update","device_id":1,"new_status":"online"}),
        "a-s1",
    );
    assert_eq!(
        event(&mut a_all, "fleet_a", "device_status_update")["new_status"],
        "online"
    );

    // fleet_b's own events: the first thing its subscribers get, and device 1's status in
    // fleet_b has no history (fleet_a's "online" is not its old_status).
    let mut b_svc = valtronics(&b, "/ws", &key("fleet_b", Role::Service));
    publish(
        &mut b_svc,
        json!({"type":"telemetry_update","device_id":1,"telemetry":{"speed":99}}),
        "b-t1",
    );
    publish(
        &mut b_svc,
        json!({"type":"alert","device_id":1,"alert_id":"b-al","severity":"info"}),
        "b-a1",
    );
    publish(
        &mut b_svc,
        json!({"type":"device_status_update","device_id":1,"new_status":"offline"}),
        "b-s1",
    );
    for (who, c) in [("b_all", &mut b_all), ("b_dev1", &mut b_dev1)] {
        let m = event(c, who, "telemetry_update");
        assert_eq!(m["telemetry"]["speed"]["value"], 99, "{who}: {m}");
        let m = event(c, who, "alert");
        assert_eq!(m["alert_id"], "b-al", "{who}: {m}");
        let m = event(c, who, "device_status_update");
        assert_eq!(
            (&m["old_status"], &m["new_status"]),
            (&Value::Null, &json!("offline")),
            "{who}: {m}"
        );
        c.expect_nothing_more(who);
    }
    let m = event(&mut b_alerts, "b_alerts", "alert");
    assert_eq!(m["alert_id"], "b-al", "{m}");
    b_alerts.expect_nothing_more("b_alerts");
    // And nothing of fleet_b's reached fleet_a.
    a_all.expect_nothing_more("fleet_a");
}

// ------------------------------------------------------------------- 5. bad input

fn alert_item(id: u64) -> Value {
    json!({"type":"alert","device_id":1,"alert_id":id,"severity":"info"})
}

#[test]
fn bad_input_on_the_valtronics_path_gets_clear_errors_and_harms_nothing() {
    let mut cfg = config(2);
    // Room for a batch of 51 items; the size limit itself is tested below with 9 KiB.
    cfg.limits.max_message_bytes = 8 * 1024;
    let b = Broker::start(cfg);
    let mut sub = valtronics(&b, "/ws/alerts", &key("fleet_a", Role::Viewer));
    assert_eq!(sub.recv()["type"], "subscribed");
    let mut dev = valtronics(&b, "/ws", &key("fleet_a", Role::Device));

    // Invalid JSON, not an object, unknown type, missing device_id, bad field values.
    dev.send_text(r#"{"type":"telemetry_update","device_id":1,"#);
    let m = v_error(&mut dev, None, 400);
    assert!(m["message"].as_str().unwrap().contains("JSON"), "{m}");
    dev.send_text("[1,2,3]");
    v_error(&mut dev, None, 400);
    dev.send(json!({"type":"frobnicate","id":"u1"}));
    let m = v_error(&mut dev, Some("u1"), 400);
    assert_eq!(m["field"], "type", "{m}");
    dev.send(json!({"id":"u2","device_id":1}));
    assert_eq!(v_error(&mut dev, Some("u2"), 400)["field"], "type");
    dev.send(json!({"type":"telemetry_update","id":"m1","telemetry":{"speed":1}}));
    assert_eq!(v_error(&mut dev, Some("m1"), 400)["field"], "device_id");
    dev.send(json!({"type":"alert","id":"m2","alert_id":5,"severity":"info"}));
    assert_eq!(v_error(&mut dev, Some("m2"), 400)["field"], "device_id");
    dev.send(json!({"type":"device_status_update","id":"m3","new_status":"online"}));
    assert_eq!(v_error(&mut dev, Some("m3"), 400)["field"], "device_id");
    dev.send(json!({"type":"alert","id":"m4","device_id":1,"alert_id":5,
        "severity":"catastrophic"}));
    assert_eq!(v_error(&mut dev, Some("m4"), 400)["field"], "severity");
    dev.send(json!({"type":"telemetry_update","id":"m5","device_id":1,"telemetry":"hot"}));
    assert_eq!(v_error(&mut dev, Some("m5"), 400)["field"], "telemetry");
    dev.expect_nothing_more("device after 400s");

    // A batch over 50 items: one error, nothing of it routed.
    let over: Vec<Value> = (1000..1051).map(alert_item).collect();
    dev.send(json!({"type":"batch","id":"b51","messages":over}));
    let m = v_error(&mut dev, Some("b51"), 400);
    assert_eq!(m["field"], "messages", "{m}");
    // Exactly 50 is fine: every item is routed, in order (the subscriber's first alert is
    // the batch's first item, so none of the refused batch came through).
    let ok: Vec<Value> = (0..50).map(alert_item).collect();
    dev.send(json!({"type":"batch","id":"b50","messages":ok}));
    for i in 0..50u64 {
        let m = event(&mut sub, "subscriber", "alert");
        assert_eq!(m["alert_id"], i, "{m}");
    }
    dev.expect_nothing_more("device after batches");

    // Role and scope: a viewer may not publish; a device JWT for vehicle "1" may publish
    // for device 1 only.
    let mut viewer = valtronics(&b, "/ws", &key("fleet_a", Role::Viewer));
    viewer.send(json!({"type":"alert","id":"v1","device_id":1,"alert_id":7,"severity":"info"}));
    v_error(&mut viewer, Some("v1"), 403);
    viewer.send(json!({"type":"subscribe","id":"s1","channel":"weather"}));
    assert_eq!(v_error(&mut viewer, Some("s1"), 400)["field"], "channel");
    viewer.expect_nothing_more("viewer after errors");
    let jwt = mint_hs256(
        SECRET,
        "unit-1",
        "fleet_a",
        Role::Device,
        unix_now() + 600,
        Some("1"),
    )
    .unwrap();
    let mut unit = valtronics(&b, "/ws", &jwt);
    unit.send(json!({"type":"alert","id":"d2","device_id":2,"alert_id":8,"severity":"info"}));
    // The error names the field the Valtronics client sent.
    let m = v_error(&mut unit, Some("d2"), 403);
    assert_eq!(m["field"], "device_id", "{m}");
    assert!(
        m["message"].as_str().unwrap().contains("own vehicle"),
        "{m}"
    );
    publish(&mut unit, alert_item(9), "d1");
    assert_eq!(event(&mut sub, "subscriber", "alert")["alert_id"], 9);
    // A device does not subscribe.
    unit.send(json!({"type":"subscribe","id":"d-sub","channel":"alerts"}));
    v_error(&mut unit, Some("d-sub"), 403);

    // Before authenticating: 401, and the connection may still authenticate.
    let mut anon = Client::connect(&b.url("/ws"));
    anon.send(json!({"type":"subscribe","id":"early","channel":"alerts"}));
    v_error(&mut anon, Some("early"), 401);
    anon.send(json!({"type":"ping","id":"p0"}));
    let m = anon.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("p0")),
        "{m}"
    );
    anon.send(json!({"type":"auth","token":key("fleet_a", Role::Viewer)}));
    let m = anon.recv();
    assert_eq!(
        (&m["type"], &m["success"]),
        (&json!("auth_response"), &json!(true)),
        "{m}"
    );

    // An oversized message closes that connection (1009); everyone else carries on.
    let big = json!({"type":"alert","device_id":1,"alert_id":10,"severity":"info",
        "message":"x".repeat(9 * 1024)});
    dev.send(big);
    assert_eq!(dev.expect_close(), Some(1009));
    let mut dev2 = valtronics(&b, "/ws", &key("fleet_a", Role::Device));
    publish(&mut dev2, alert_item(11), "after-big");
    assert_eq!(event(&mut sub, "subscriber", "alert")["alert_id"], 11);
    sub.expect_nothing_more("subscriber");
    viewer.expect_nothing_more("viewer");
}

#[test]
fn a_bad_token_gets_auth_response_invalid_token_then_close() {
    let b = Broker::with_shards(1);
    let expired = mint_hs256(
        SECRET,
        "old",
        "fleet_a",
        Role::Viewer,
        unix_now() - 10,
        None,
    )
    .unwrap();
    let forged = mint_hs256(
        "not-the-secret-not-the-secret-0123",
        "x",
        "fleet_a",
        Role::Viewer,
        unix_now() + 600,
        None,
    )
    .unwrap();
    for (what, token) in [
        ("unknown key", "key-nobody-0123456789".to_string()),
        ("expired JWT", expired),
        ("forged JWT", forged),
    ] {
        let mut c = Client::connect(&b.url("/ws/telemetry"));
        c.send(json!({"type":"auth","token":token}));
        let m = c.recv();
        assert_eq!(m["type"], "auth_response", "{what}: first message {m}");
        assert_eq!(m["success"], false, "{what}: {m}");
        assert_eq!(m["error"], "invalid_token", "{what}: {m}");
        assert!(m["message"].is_string(), "{what}: {m}");
        assert_eq!(c.expect_close(), Some(1008), "{what}");
    }
    // The broker still serves the dialect.
    let mut ok = valtronics(&b, "/ws/telemetry", &key("fleet_a", Role::Viewer));
    assert_eq!(ok.recv()["type"], "subscribed");
    ok.expect_nothing_more("valid client");
}

// ------------------------------------------------------------------ 6. /metrics

fn wait_gauge(b: &Broker, label: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = b.metric("fleetcast_connections_open", label);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fleetcast_connections_open{{{label}}}: {got}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_count_open_valtronics_connections_by_dialect() {
    let b = Broker::with_shards(2);
    let val = r#"dialect="valtronics""#;
    let nat = r#"dialect="native""#;
    wait_gauge(&b, val, 0);
    let mut v1 = valtronics(&b, "/ws", &key("fleet_a", Role::Viewer));
    let mut v2 = valtronics(&b, "/ws/alerts", &key("fleet_b", Role::Viewer));
    let mut n1 = b.connect_key(&key("fleet_a", Role::Viewer));
    v1.expect_nothing_more("v1");
    n1.expect_nothing_more("n1");
    wait_gauge(&b, val, 2);
    wait_gauge(&b, nat, 1);
    let (_, body) = b.get("/metrics");
    let lines: BTreeSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("fleetcast_connections_open{") && l.contains(val))
        .collect();
    assert_eq!(lines.len(), 2, "one valtronics series per shard: {lines:?}");
    // A closed connection is no longer counted.
    assert_eq!(v2.recv()["type"], "subscribed");
    v2.ws.close(None).unwrap();
    let _ = v2.expect_close();
    drop(v2);
    wait_gauge(&b, val, 1);
    wait_gauge(&b, nat, 1);
}
