//! The Telematics SDK dialect (SPEC §6, `seeds/telematics-sdk-realtime-api.txt`) on
//! `/realtime/api/v1/ws/realtime`, end to end with the in-process broker: the reply order,
//! instance and single-device mode, raw units, `date_format` x `timezone` (daylight saving
//! included), shared frames, the error codes, the JSON heartbeat, no snapshot, tenant
//! isolation, and the SPEC §8 limits as a Telematics client sees them.
//!
//! Positions are published by a native service connection with `ack: true`, one at a time,
//! and each is awaited by its subscribers before the next goes out: the next message a
//! subscriber reads is then the one it should get, and anything that should not reach it
//! shows up in its place or in a final silence check.

use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;

const PATH: &str = "/realtime/api/v1/ws/realtime";

/// Winter and summer instants (the publishers' own `timestamp`), with milliseconds.
const WINTER: &str = "2024-01-15T17:30:45.123Z";
const SUMMER: &str = "2024-07-04T16:00:00.250Z";
const WINTER_UNIX: u64 = 1_705_339_845;
const SUMMER_UNIX: u64 = 1_720_108_800;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn viewer(tenant: &str) -> String {
    key(tenant, Role::Viewer)
}

fn jwt(tenant: &str, exp: u64) -> String {
    mint_hs256(SECRET, "tm-dashboard", tenant, Role::Viewer, exp, None).unwrap()
}

/// An `authenticate` message: `token` for `instance`, ISO timestamps in UTC.
fn authenticate(token: &str, instance: &str) -> Value {
    json!({"type": "authenticate", "access_token": token, "instance_id": instance,
        "units": "metric", "timezone": "UTC", "date_format": "iso"})
}

fn open(b: &Broker) -> Client {
    Client::connect(&b.url(PATH))
}

/// Connects and sends `auth`: the next three messages must be `authenticated`, `welcome`
/// and `subscribed` to `topic`, in this order. Returns the client and the welcome.
fn connect(b: &Broker, auth: Value, topic: &str) -> (Client, Value) {
    let mut c = open(b);
    c.send(auth.clone());
    let types: Vec<Value> = (0..3).map(|_| c.recv()).collect();
    assert_eq!(
        types.iter().map(|m| m["type"].clone()).collect::<Vec<_>>(),
        ["authenticated", "welcome", "subscribed"],
        "{auth}: {types:?}"
    );
    assert_eq!(types[2]["topic"], topic, "{auth}: {}", types[2]);
    (c, types[1].clone())
}

/// An instance-mode connection of `tenant` with `date_format` in `timezone`.
fn instance(b: &Broker, tenant: &str, date_format: &str, timezone: &str) -> Client {
    let mut auth = authenticate(&viewer(tenant), tenant);
    auth["date_format"] = json!(date_format);
    auth["timezone"] = json!(timezone);
    connect(b, auth, "instance").0
}

/// A single-device connection of `tenant` following `vehicle`.
fn device(b: &Broker, tenant: &str, vehicle: &str) -> Client {
    let mut auth = authenticate(&viewer(tenant), tenant);
    auth["device_token"] = json!(vehicle);
    connect(b, auth, &format!("device/{vehicle}")).0
}

/// A native service connection of `tenant` (the publisher).
fn publisher(b: &Broker, tenant: &str) -> Client {
    b.connect_key(&key(tenant, Role::Service))
}

/// A native `location_update` of `vehicle` on trip `trip_<vehicle>`: 36 km/h, heading
/// 90, accuracy 4.5 m.
fn position(vehicle: &str, lat: f64) -> Value {
    json!({"type": "location_update", "payload": {"vehicle_id": vehicle,
        "trip_id": format!("trip_{vehicle}"),
        "location": {"latitude": lat, "longitude": 13.4, "speed": 36.0, "heading": 90.0,
                     "accuracy": 4.5}}})
}

fn stamped(mut msg: Value, timestamp: &str) -> Value {
    msg["timestamp"] = json!(timestamp);
    msg
}

/// Publishes with `ack: true`; the publisher's next message must be the accepted ack.
fn publish(p: &mut Client, mut msg: Value, id: &str) {
    msg["id"] = json!(id);
    msg["ack"] = json!(true);
    p.send(msg);
    let m = p.recv();
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["status"]),
        (&json!("ack"), &json!(id), &json!("accepted")),
        "publish {id}: {m}"
    );
}

/// The next message, which must be a device_update of `vehicle`.
fn update(c: &mut Client, who: &str, vehicle: &str) -> Value {
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["device_token"]),
        (&json!("device_update"), &json!(vehicle)),
        "{who}: expected the update of {vehicle}, got {m}"
    );
    m
}

/// The next message, which must be `{type:"error", code, message}` with a message.
fn error(c: &mut Client, who: &str, code: u64) -> Value {
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("error"), &json!(code)),
        "{who}: expected error {code}, got {m}"
    );
    assert!(
        m["message"].as_str().is_some_and(|s| !s.is_empty()),
        "{who}: an error says what went wrong: {m}"
    );
    m
}

/// The next text frame, as sent.
fn raw_text(c: &mut Client) -> String {
    c.set_timeout(Duration::from_secs(5));
    loop {
        match c.ws.read().expect("a frame within 5 s") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

fn f64_of(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

// ------------------------------------------------------------------ handshake

#[test]
fn replies_authenticated_welcome_subscribed_in_this_order() {
    let b = Broker::with_shards(2);

    // An API key, instance mode, every preference given.
    let mut c = open(&b);
    c.send(
        json!({"type": "authenticate", "access_token": viewer("fleet_a"),
        "instance_id": "fleet_a", "client_id": "dash-7", "units": "imperial",
        "timezone": "Europe/Berlin", "date_format": "localized"}),
    );
    let auth = c.recv();
    assert_eq!(auth["type"], "authenticated", "first: {auth}");
    let welcome = c.recv();
    assert_eq!(welcome["type"], "welcome", "second: {welcome}");
    assert!(
        welcome["connection_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{welcome}"
    );
    let server_time: jiff::Timestamp = welcome["server_time"]
        .as_str()
        .unwrap_or_else(|| panic!("server_time: {welcome}"))
        .parse()
        .unwrap_or_else(|e| panic!("server_time is not RFC 3339 ({e}): {welcome}"));
    let skew = (server_time.as_second() - unix_now() as i64).abs();
    assert!(skew <= 5, "server_time {server_time} is {skew} s off");
    for (k, v) in [
        ("instance_id", "fleet_a"),
        ("client_id", "dash-7"),
        ("units", "imperial"),
        ("timezone", "Europe/Berlin"),
        ("date_format", "localized"),
    ] {
        assert_eq!(welcome[k], v, "welcome.{k}: {welcome}");
    }
    let sub = c.recv();
    assert_eq!(
        (&sub["type"], &sub["topic"]),
        (&json!("subscribed"), &json!("instance")),
        "third: {sub}"
    );
    // Nothing more (no snapshot), and a client ping is answered.
    c.expect_silence(Duration::from_millis(200));
    c.send(json!({"type": "ping"}));
    assert_eq!(c.recv()["type"], "pong");

    // A JWT, single-device mode: the same order, the device's topic. Another connection
    // of the same JWT has its own connection_id.
    let token = jwt("fleet_a", unix_now() + 600);
    let mut auth = authenticate(&token, "fleet_a");
    auth["device_token"] = json!("v7");
    let (_d, w) = connect(&b, auth, "device/v7");
    assert_eq!(w["instance_id"], "fleet_a", "{w}");
    assert_ne!(w["connection_id"], welcome["connection_id"]);
    // `device_token: null` is instance mode (the seed's Python client sends it).
    let mut auth = authenticate(&token, "fleet_a");
    auth["device_token"] = Value::Null;
    connect(&b, auth, "instance");
}

/// SPEC §2: a repeated authenticate of the same principal is answered again, and changes
/// nothing of what the connection receives (no second subscription, no duplicate).
#[test]
fn a_repeated_authenticate_is_answered_again_without_duplicates() {
    let b = Broker::with_shards(2);
    let auth = authenticate(&viewer("fleet_a"), "fleet_a");
    let (mut c, first) = connect(&b, auth.clone(), "instance");
    c.send(auth);
    for ty in ["authenticated", "welcome", "subscribed"] {
        let m = c.recv();
        assert_eq!(m["type"], ty, "{m}");
        if ty == "welcome" {
            assert_eq!(
                m["connection_id"], first["connection_id"],
                "the same connection"
            );
        }
    }
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    update(&mut c, "re-authenticated", "v1");
    c.expect_silence(Duration::from_millis(300));
}

// ------------------------------------------------------------------ modes

#[test]
fn instance_mode_gets_every_vehicle_single_device_mode_only_its_own() {
    let b = Broker::with_shards(2);
    let mut inst = instance(&b, "fleet_a", "unix", "UTC");
    let mut dev = device(&b, "fleet_a", "v2");
    let mut p = publisher(&b, "fleet_a");

    publish(&mut p, position("v1", 1.0), "p1");
    update(&mut inst, "instance", "v1");
    publish(&mut p, position("v2", 2.0), "p2");
    update(&mut inst, "instance", "v2");
    let m = update(&mut dev, "device v2", "v2");
    assert_eq!(m["position"]["Latitude"], 2.0, "{m}");
    publish(&mut p, position("v3", 3.0), "p3");
    update(&mut inst, "instance", "v3");
    publish(&mut p, position("v2", 2.5), "p4");
    update(&mut inst, "instance", "v2");
    // The device connection's next message is v2's second position: v1 and v3 never came.
    let m = update(&mut dev, "device v2", "v2");
    assert_eq!(m["position"]["Latitude"], 2.5, "{m}");

    // Events that are not positions reach neither (the API streams positions).
    publish(&mut p, alert("al-1", "v2", "high"), "p5");
    publish(
        &mut p,
        json!({"type":"telemetry_update","payload":{"vehicle_id":"v2","telemetry":{"fuel_level":50.0}}}),
        "p6",
    );
    publish(
        &mut p,
        json!({"type":"driver_status","payload":{"driver_id":"d1","vehicle_id":"v2","status":"on_break"}}),
        "p7",
    );
    inst.expect_silence(Duration::from_millis(300));
    dev.expect_silence(Duration::from_millis(50));
}

#[test]
fn positions_are_in_metres_per_second_and_metres_whatever_the_units() {
    let b = Broker::with_shards(2);
    let mut metric = instance(&b, "fleet_a", "unix", "UTC");
    let mut auth = authenticate(&viewer("fleet_a"), "fleet_a");
    auth["units"] = json!("imperial");
    auth["date_format"] = json!("unix");
    let (mut imperial, w) = connect(&b, auth, "instance");
    assert_eq!(w["units"], "imperial", "{w}");
    let mut p = publisher(&b, "fleet_a");

    publish(&mut p, stamped(position("v1", 52.52), WINTER), "p1");
    let a = update(&mut metric, "metric", "v1");
    let i = update(&mut imperial, "imperial", "v1");
    assert_eq!(a, i, "units change nothing raw");
    assert_eq!(a["track_token"], "trip_v1", "{a}");
    let pos = &a["position"];
    assert_eq!(f64_of(&pos["Latitude"], "Latitude"), 52.52, "{a}");
    assert_eq!(f64_of(&pos["Longitude"], "Longitude"), 13.4, "{a}");
    let speed = f64_of(&pos["Speed"], "Speed");
    assert!((speed - 10.0).abs() < 1e-9, "36 km/h is 10 m/s: {a}");
    assert_eq!(f64_of(&pos["Accuracy"], "Accuracy"), 4.5, "metres: {a}");
    assert_eq!(f64_of(&pos["Heading"], "Heading"), 90.0, "{a}");
    assert_eq!(pos["Timestamp"], WINTER_UNIX, "{a}");
    let mut keys: Vec<&String> = pos.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "Accuracy",
            "Heading",
            "Latitude",
            "Longitude",
            "Speed",
            "Timestamp"
        ],
        "{a}"
    );

    // No trip, no speed, heading or accuracy: track_token null, the rest not made up.
    publish(
        &mut p,
        json!({"type":"location_update","payload":{"vehicle_id":"v9",
            "location":{"latitude":1.5,"longitude":2.5}}}),
        "p2",
    );
    let m = update(&mut metric, "metric", "v9");
    assert!(m["track_token"].is_null(), "{m}");
    for k in ["Speed", "Accuracy", "Heading"] {
        assert!(m["position"][k].is_null(), "no {k} was published: {m}");
    }
    assert!(m["position"]["Timestamp"].is_u64(), "{m}");
    update(&mut imperial, "imperial", "v9");

    // Standing still, and the HTTP publish surface.
    let body = json!({"messages": [{"type":"location_update","payload":{"vehicle_id":"v1",
        "location":{"latitude":52.5,"longitude":13.4,"speed":0.0,"heading":0.0}}}]})
    .to_string();
    let (status, text) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        key("fleet_a", Role::Service),
        body.len()
    ));
    assert_eq!(status, 202, "{text}");
    let m = update(&mut metric, "metric", "v1");
    assert_eq!(f64_of(&m["position"]["Speed"], "Speed"), 0.0, "{m}");
    update(&mut imperial, "imperial", "v1");
}

// ------------------------------------------------------------------ date_format, timezone

#[test]
fn timestamps_follow_date_format_in_the_timezone_across_daylight_saving() {
    let b = Broker::with_shards(2);
    // (date_format, timezone, winter, summer)
    let cases: [(&str, &str, Value, Value); 8] = [
        ("unix", "UTC", json!(WINTER_UNIX), json!(SUMMER_UNIX)),
        (
            "unix",
            "America/New_York",
            json!(WINTER_UNIX),
            json!(SUMMER_UNIX),
        ),
        (
            "iso",
            "America/New_York",
            json!("2024-01-15T12:30:45.123-05:00"),
            json!("2024-07-04T12:00:00.250-04:00"),
        ),
        (
            "iso",
            "Australia/Sydney",
            json!("2024-01-16T04:30:45.123+11:00"),
            json!("2024-07-05T02:00:00.250+10:00"),
        ),
        (
            "iso",
            "Asia/Kolkata",
            json!("2024-01-15T23:00:45.123+05:30"),
            json!("2024-07-04T21:30:00.250+05:30"),
        ),
        (
            "iso",
            "UTC",
            json!("2024-01-15T17:30:45.123+00:00"),
            json!("2024-07-04T16:00:00.250+00:00"),
        ),
        (
            "localized",
            "Europe/Berlin",
            json!("Mon, Jan 15, 2024, 6:30:45 PM CET"),
            json!("Thu, Jul 4, 2024, 6:00:00 PM CEST"),
        ),
        (
            "localized",
            "America/New_York",
            json!("Mon, Jan 15, 2024, 12:30:45 PM EST"),
            json!("Thu, Jul 4, 2024, 12:00:00 PM EDT"),
        ),
    ];
    let mut clients: Vec<Client> = cases
        .iter()
        .map(|(f, tz, _, _)| instance(&b, "fleet_a", f, tz))
        .collect();
    // Neither given: unix seconds (the seed's example format).
    let (mut default, w) = connect(
        &b,
        json!({"type":"authenticate","access_token":viewer("fleet_a"),"instance_id":"fleet_a"}),
        "instance",
    );
    println!("welcome without preferences: {w}");
    let mut p = publisher(&b, "fleet_a");
    for (i, (ts, vehicle)) in [(WINTER, "winter"), (SUMMER, "summer")]
        .into_iter()
        .enumerate()
    {
        publish(&mut p, stamped(position(vehicle, 1.0), ts), vehicle);
        for (c, (f, tz, winter, summer)) in clients.iter_mut().zip(&cases) {
            let who = format!("{f} in {tz}");
            let m = update(c, &who, vehicle);
            let want = if i == 0 { winter } else { summer };
            assert_eq!(&m["position"]["Timestamp"], want, "{who}: {m}");
        }
        let m = update(&mut default, "default", vehicle);
        let want = if i == 0 { WINTER_UNIX } else { SUMMER_UNIX };
        assert_eq!(m["position"]["Timestamp"], want, "default: {m}");
    }
    // Every ISO one is the same instant as published.
    for (_, _, winter, summer) in cases.iter().filter(|c| c.0 == "iso") {
        for (shown, published) in [(winter, WINTER), (summer, SUMMER)] {
            let a: jiff::Timestamp = shown.as_str().unwrap().parse().unwrap();
            let b: jiff::Timestamp = published.parse().unwrap();
            assert_eq!(a, b, "{shown}");
        }
    }
}

#[test]
fn connections_with_the_same_view_get_byte_identical_frames() {
    let b = Broker::with_shards(1);
    let mut ny1 = instance(&b, "fleet_a", "iso", "America/New_York");
    let mut ny2 = instance(&b, "fleet_a", "iso", "America/New_York");
    let mut ny_dev = device(&b, "fleet_a", "v1");
    let mut berlin = instance(&b, "fleet_a", "iso", "Europe/Berlin");
    let mut loc1 = instance(&b, "fleet_a", "localized", "America/New_York");
    let mut loc2 = instance(&b, "fleet_a", "localized", "America/New_York");
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, stamped(position("v1", 40.0), SUMMER), "p1");

    let a = raw_text(&mut ny1);
    assert_eq!(a, raw_text(&mut ny2), "same date_format and timezone");
    let l = raw_text(&mut loc1);
    assert_eq!(l, raw_text(&mut loc2), "same date_format and timezone");
    let d = raw_text(&mut ny_dev);
    let g = raw_text(&mut berlin);
    assert_ne!(a, g, "another zone, another Timestamp");
    assert_ne!(a, l);
    // They differ by the Timestamp only; the single-device connection's default view is UTC.
    let strip = |t: &str| {
        let mut v: Value = serde_json::from_str(t).unwrap();
        v["position"]["Timestamp"] = Value::Null;
        v
    };
    assert_eq!(strip(&a), strip(&g));
    assert_eq!(strip(&a), strip(&l));
    assert_eq!(strip(&a), strip(&d));
    let v: Value = serde_json::from_str(&a).unwrap();
    assert_eq!(
        v["position"]["Timestamp"], "2024-07-04T12:00:00.250-04:00",
        "{a}"
    );
}

// ------------------------------------------------------------------ errors

#[test]
fn bad_messages_get_400_and_the_connection_can_still_authenticate() {
    let b = Broker::with_shards(2);
    let mut c = open(&b);
    c.send_text("{\"type\": \"authenticate\", \"access_token\": ");
    error(&mut c, "invalid JSON", 400);
    c.send_text("[1, 2, 3]");
    error(&mut c, "a JSON array", 400);

    let mut bad = authenticate(&viewer("fleet_a"), "fleet_a");
    bad["timezone"] = json!("Mars/Olympus_Mons");
    c.send(bad);
    let m = error(&mut c, "unknown timezone", 400);
    assert!(
        m["message"].as_str().unwrap().contains("Mars/Olympus_Mons"),
        "the error names the zone: {m}"
    );

    let mut bad = authenticate(&viewer("fleet_a"), "fleet_a");
    bad["date_format"] = json!("julian");
    c.send(bad);
    let m = error(&mut c, "unknown date_format", 400);
    assert!(m["message"].as_str().unwrap().contains("julian"), "{m}");

    let mut bad = authenticate(&viewer("fleet_a"), "fleet_a");
    bad["units"] = json!("furlongs");
    c.send(bad);
    error(&mut c, "unknown units", 400);

    let mut bad = authenticate(&viewer("fleet_a"), "fleet_a");
    bad["timezone"] = json!(5);
    c.send(bad);
    error(&mut c, "a timezone that is not a string", 400);

    c.send(json!({"type":"authenticate","instance_id":"fleet_a"}));
    error(&mut c, "no access_token", 400);
    c.send(json!({"type":"authenticate","access_token":viewer("fleet_a")}));
    error(&mut c, "no instance_id", 400);
    c.send(json!({"type":"subscribe","topic":"instance"}));
    error(&mut c, "unknown type", 400);
    c.send(json!({"access_token":viewer("fleet_a")}));
    error(&mut c, "no type", 400);

    // None of it closed the connection or authenticated it.
    c.send(authenticate(&viewer("fleet_a"), "fleet_a"));
    for ty in ["authenticated", "welcome", "subscribed"] {
        let m = c.recv();
        assert_eq!(m["type"], ty, "{m}");
    }
    // After authentication too: an error, and the stream goes on.
    c.send_text("nope");
    error(&mut c, "invalid JSON after auth", 400);
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    update(&mut c, "after the errors", "v1");
}

/// An authentication failure: the error, then the server closes the connection.
fn refused(b: &Broker, auth: Value, code: u64) -> Value {
    let mut c = open(b);
    c.send(auth.clone());
    let m = error(&mut c, &auth.to_string(), code);
    let close = c.expect_close();
    assert!(close.is_some(), "{auth}: closed without a close frame");
    m
}

#[test]
fn another_tenants_instance_is_403_an_unknown_instance_404() {
    let b = Broker::with_shards(2);
    refused(&b, authenticate(&viewer("fleet_a"), "fleet_b"), 403);
    refused(
        &b,
        authenticate(&jwt("fleet_b", unix_now() + 600), "fleet_a"),
        403,
    );
    let m = refused(&b, authenticate(&viewer("fleet_a"), "fleet_zzz"), 404);
    println!("unknown instance: {m}");
    refused(
        &b,
        authenticate(&jwt("fleet_a", unix_now() + 600), "fleet_zzz"),
        404,
    );
    // A device key may not widen itself to another tenant either.
    refused(
        &b,
        authenticate(&key("fleet_b", Role::Device), "fleet_a"),
        403,
    );
    // fleet_b's own subscribers are unaffected.
    let mut ok = instance(&b, "fleet_b", "unix", "UTC");
    let mut p = publisher(&b, "fleet_b");
    publish(&mut p, position("v1", 1.0), "p1");
    update(&mut ok, "fleet_b", "v1");
}

#[test]
fn bad_or_expired_tokens_are_401() {
    let b = Broker::with_shards(2);
    refused(
        &b,
        authenticate("key-nobody-0123456789abcdef", "fleet_a"),
        401,
    );
    let forged = mint_hs256(
        "another-secret-another-secret-0123",
        "x",
        "fleet_a",
        Role::Viewer,
        unix_now() + 600,
        None,
    )
    .unwrap();
    refused(&b, authenticate(&forged, "fleet_a"), 401);
    refused(
        &b,
        authenticate(&jwt("fleet_a", unix_now() - 10), "fleet_a"),
        401,
    );
    refused(&b, authenticate("not.a.jwt", "fleet_a"), 401);
}

#[test]
fn a_token_that_expires_gets_401_and_the_connection_closes() {
    let b = Broker::with_shards(2);
    let exp = unix_now() + 2;
    let (mut c, _) = connect(
        &b,
        authenticate(&jwt("fleet_a", exp), "fleet_a"),
        "instance",
    );
    // Still live before it expires.
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    update(&mut c, "before expiry", "v1");

    let m = c
        .next(Duration::from_secs(5))
        .expect("an error when the token expires");
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("error"), &json!(401)),
        "{m}"
    );
    assert!(
        unix_now() >= exp,
        "the error came before exp ({exp}, now {})",
        unix_now()
    );
    assert_eq!(c.expect_close(), Some(4001), "SPEC §2: close 4001");
}

#[test]
fn authentication_timeout_is_408_then_close() {
    let mut cfg = config(2);
    cfg.limits.auth_timeout_ms = 300;
    let b = Broker::start(cfg);
    let started = Instant::now();
    let mut c = open(&b);
    let m = c.next(Duration::from_secs(5)).expect("the timeout error");
    let waited = started.elapsed();
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("error"), &json!(408)),
        "{m}"
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "408 after {waited:?} with a 300 ms auth timeout"
    );
    assert_eq!(c.expect_close(), Some(1008), "SPEC §8: close 1008");

    // A client that authenticates in time is not affected.
    let (mut ok, _) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");
    ok.expect_silence(Duration::from_millis(500));
}

// ------------------------------------------------------------------ heartbeat

#[test]
fn json_heartbeat_a_pong_keeps_the_connection_silence_closes_it() {
    let mut cfg = config(2);
    cfg.limits.heartbeat_interval_ms = 200;
    let b = Broker::start(cfg);

    // Silent: pings, then closed after two intervals without a word.
    let (mut silent, w) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");
    assert_eq!(w["heartbeat_interval_ms"], 200, "{w}");
    let spoke = Instant::now();
    let mut pings = 0;
    let code = loop {
        match silent.next(Duration::from_secs(3)) {
            Ok(m) => {
                assert_eq!(m["type"], "ping", "{m}");
                pings += 1;
            }
            Err(Ended::Closed(c)) => break c,
            Err(e) => panic!("silent client: {e:?}"),
        }
    };
    let lasted = spoke.elapsed();
    assert!(pings >= 1, "no ping before the close");
    assert_eq!(code, Some(4008), "heartbeat timeout");
    assert!(
        lasted >= Duration::from_millis(380) && lasted < Duration::from_millis(1500),
        "closed {lasted:?} after the last message, with 200 ms intervals"
    );

    // Answering every ping with {type:"pong"} (as the seed does): open for many intervals.
    let (mut polite, _) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        match polite.next(Duration::from_millis(100)) {
            Ok(m) => {
                // Only pings: a pong is not answered.
                assert_eq!(m["type"], "ping", "{m}");
                assert!(m["server_time"].is_string() || m.get("server_time").is_none());
                pings += 1;
                polite.send(json!({"type":"pong","timestamp": unix_now() * 1000}));
            }
            Err(Ended::Timeout) => {}
            Err(e) => panic!("polite client after {pings} pings: {e:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings in 1.5 s at 200 ms");
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    loop {
        let m = polite.recv();
        if m["type"] == "ping" {
            continue;
        }
        assert_eq!(
            (&m["type"], &m["device_token"]),
            (&json!("device_update"), &json!("v1")),
            "{m}"
        );
        break;
    }
}

// ------------------------------------------------------------------ no snapshot

#[test]
fn no_snapshot_a_position_published_before_the_subscription_is_not_sent() {
    let b = Broker::with_shards(2);
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    publish(&mut p, position("v2", 2.0), "p2");
    // The positions are last known state: a native subscriber gets them as a snapshot.
    let mut native = b.connect_key(&viewer("fleet_a"));
    native.subscribe("vehicle_locations", json!({"vehicle_ids": ["v1"]}));
    let m = native.recv();
    assert_eq!(
        (&m["type"], &m["payload"]["vehicle_id"]),
        (&json!("location_update"), &json!("v1")),
        "the native snapshot: {m}"
    );

    // Telematics connections after them get nothing until the next live position.
    let mut inst = instance(&b, "fleet_a", "unix", "UTC");
    let mut dev = device(&b, "fleet_a", "v1");
    inst.expect_silence(Duration::from_millis(400));
    dev.expect_silence(Duration::from_millis(50));
    publish(&mut p, position("v1", 1.5), "p3");
    let m = update(&mut inst, "instance", "v1");
    assert_eq!(m["position"]["Latitude"], 1.5, "{m}");
    let m = update(&mut dev, "device", "v1");
    assert_eq!(m["position"]["Latitude"], 1.5, "{m}");
}

// ------------------------------------------------------------------ tenants

#[test]
fn tenants_are_isolated() {
    let b = Broker::with_shards(2);
    let mut a = instance(&b, "fleet_a", "unix", "UTC");
    let mut a_dev = device(&b, "fleet_a", "v1");
    let mut b_inst = instance(&b, "fleet_b", "unix", "UTC");
    let mut b_dev = device(&b, "fleet_b", "v1");
    let mut pa = publisher(&b, "fleet_a");
    let mut pb = publisher(&b, "fleet_b");

    // The same vehicle id in both tenants.
    publish(&mut pa, position("v1", 10.0), "a1");
    let m = update(&mut a, "fleet_a", "v1");
    assert_eq!(m["position"]["Latitude"], 10.0, "{m}");
    update(&mut a_dev, "fleet_a device", "v1");
    publish(&mut pb, position("v1", 20.0), "b1");
    let m = update(&mut b_inst, "fleet_b", "v1");
    assert_eq!(m["position"]["Latitude"], 20.0, "{m}");
    let m = update(&mut b_dev, "fleet_b device", "v1");
    assert_eq!(m["position"]["Latitude"], 20.0, "{m}");
    // fleet_a's next update is its own, not fleet_b's.
    publish(&mut pa, position("v2", 11.0), "a2");
    let m = update(&mut a, "fleet_a", "v2");
    assert_eq!(m["position"]["Latitude"], 11.0, "{m}");
    for (c, who) in [
        (&mut a, "fleet_a"),
        (&mut a_dev, "fleet_a device"),
        (&mut b_inst, "fleet_b"),
        (&mut b_dev, "fleet_b device"),
    ] {
        match c.next(Duration::from_millis(150)) {
            Err(Ended::Timeout) => {}
            other => panic!("{who}: {other:?}"),
        }
    }
}

// ------------------------------------------------------------------ SPEC §8 limits

fn ping_of_len(len: usize) -> String {
    let bare = r#"{"type":"ping","pad":""}"#;
    format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "a".repeat(len - bare.len())
    )
}

#[test]
fn a_message_over_1_kib_closes_1009() {
    let b = Broker::with_shards(2);
    let (mut c, _) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");
    let at = ping_of_len(1024);
    assert_eq!(at.len(), 1024);
    c.send_text(&at);
    assert_eq!(c.recv()["type"], "pong", "exactly 1 KiB is fine");
    c.send_text(&ping_of_len(1025));
    assert_eq!(c.expect_close(), Some(1009));

    // An oversized authenticate (a long token) before authentication: the same.
    let mut big = authenticate(&"x".repeat(1100), "fleet_a");
    big["client_id"] = json!("big");
    let mut c = open(&b);
    c.send(big);
    assert_eq!(c.expect_close(), Some(1009));

    // Others unharmed.
    let (mut ok, _) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");
    ok.send(json!({"type":"ping"}));
    assert_eq!(ok.recv()["type"], "pong");
}

#[test]
fn message_rate_429_per_dropped_message_then_1008_on_sustained_abuse() {
    let mut cfg = config(2);
    cfg.limits.messages_per_second = 20;
    cfg.limits.abuse_close_after_ms = 1_000;
    let b = Broker::start(cfg);
    let (mut c, _) = connect(&b, authenticate(&viewer("fleet_a"), "fleet_a"), "instance");

    let started = Instant::now();
    for _ in 0..60 {
        c.send(json!({"type":"ping"}));
    }
    let (mut pongs, mut refused) = (0, 0);
    for _ in 0..60 {
        let m = c.recv();
        match m["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(m["code"], 429, "{m}");
                refused += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    // The bucket holds one second (20), less the authenticate message just before.
    assert!(pongs >= 19, "only {pongs} of the burst of 20 answered");
    assert!(refused >= 30, "only {refused} of 60 refused at 20/s");

    let mut code = None;
    let deadline = started + Duration::from_secs(4);
    'abuse: while Instant::now() < deadline {
        if c.ws
            .send(Message::text(json!({"type":"pong"}).to_string()))
            .is_err()
        {
            break;
        }
        loop {
            match c.next(Duration::from_millis(5)) {
                Ok(m) => assert!(m["type"] == "ping" || m["code"] == 429, "unexpected {m}"),
                Err(Ended::Timeout) => break,
                Err(Ended::Closed(cc)) => {
                    code = cc;
                    break 'abuse;
                }
                Err(e) => panic!("abuser: {e:?}"),
            }
        }
    }
    let lasted = started.elapsed();
    assert_eq!(code, Some(1008), "after {lasted:?} of abuse");
    assert!(
        lasted >= Duration::from_millis(1_000),
        "closed after {lasted:?}"
    );
}

#[test]
fn connections_per_user_and_per_node() {
    let mut cfg = config(2);
    cfg.limits.max_connections_per_user = 2;
    cfg.limits.max_connections = 4;
    let b = Broker::start(cfg);
    let auth = authenticate(&viewer("fleet_a"), "fleet_a");
    let (_c1, _) = connect(&b, auth.clone(), "instance");
    let (_c2, _) = connect(&b, auth.clone(), "instance");
    // The credential comes in the authenticate message: error 429, then close.
    let m = refused(&b, auth.clone(), 429);
    println!("third connection of the user: {m}");
    // Another user is fine.
    let (_c3, _) = connect(
        &b,
        authenticate(&jwt("fleet_a", unix_now() + 600), "fleet_a"),
        "instance",
    );
    let (_c4, _) = connect(&b, authenticate(&viewer("fleet_b"), "fleet_b"), "instance");
    // The node is full: HTTP 503 before the upgrade.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Client::try_connect(&b.url(PATH)) {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 503);
                break;
            }
            // The refused connection may not be forgotten yet.
            Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            other => panic!("a fifth connection: {:?}", other.map(|_| "accepted")),
        }
    }
}

#[test]
fn new_connections_per_minute_per_user() {
    let mut cfg = config(2);
    cfg.limits.new_connections_per_minute_per_user = 2;
    let b = Broker::start(cfg);
    let auth = authenticate(&viewer("fleet_a"), "fleet_a");
    drop(connect(&b, auth.clone(), "instance"));
    drop(connect(&b, auth.clone(), "instance"));
    refused(&b, auth, 429);
}

#[test]
fn one_position_per_vehicle_per_interval_reaches_the_client() {
    let mut cfg = config(2);
    cfg.limits.location_update_interval_ms = 1_000;
    let b = Broker::start(cfg);
    let mut c = instance(&b, "fleet_a", "unix", "UTC");
    let mut p = publisher(&b, "fleet_a");
    publish(&mut p, position("v1", 1.0), "p1");
    // The second within the interval is refused to its publisher...
    let mut again = position("v1", 2.0);
    again["id"] = json!("p2");
    again["ack"] = json!(true);
    p.send(again);
    let m = p.recv();
    assert_eq!(
        (&m["type"], &m["payload"]["code"]),
        (&json!("error"), &json!(429)),
        "{m}"
    );
    // ... and the client sees the first only: its next update is another vehicle's.
    let m = update(&mut c, "client", "v1");
    assert_eq!(m["position"]["Latitude"], 1.0, "{m}");
    publish(&mut p, position("v2", 3.0), "p3");
    update(&mut c, "client", "v2");
}
