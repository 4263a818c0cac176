//! The Tracking API dialect (`/v1/track`) end to end: drivers and offices authenticate
//! with the identity they claim, offices get exactly what drivers sent, native publishes
//! reach offices and drivers' updates reach native subscribers, every error has its name,
//! companies are isolated, and the SPEC §8 limits that apply show up as a Tracking client
//! sees them.
//!
//! Drivers and offices authenticate with JWTs whose `sub` is the `user_id` they claim
//! (a driver's token also lists its vehicle, which is its user_id), or with the test API
//! keys. Every wait is bounded (`Client::recv`: 5 s).

use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::config::Config;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;

// ---------------------------------------------------------------- helpers

fn jwt(sub: &str, company: &str, role: Role) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3_600;
    let vehicle = (role == Role::Device).then_some(sub);
    mint_hs256(SECRET, sub, company, role, exp, vehicle).unwrap()
}

fn connect(b: &Broker) -> Client {
    Client::connect(&b.url("/v1/track"))
}

/// Sends `authenticate` and returns the answer.
fn authenticate(c: &mut Client, user_id: &str, role: &str, token: &str) -> Value {
    c.send(json!({"action":"authenticate",
        "payload":{"user_id":user_id,"role":role,"token":token}}));
    c.recv()
}

/// A connection authenticated as `user_id` in `role`; the answer must be `authenticated`.
fn login(b: &Broker, user_id: &str, role: &str, token: &str) -> Client {
    let mut c = connect(b);
    let m = authenticate(&mut c, user_id, role, token);
    assert_eq!(
        m,
        json!({"type":"authenticated","payload":{"user_id":user_id,"role":role}}),
        "{user_id} as {role}"
    );
    c
}

fn driver(b: &Broker, company: &str, vehicle: &str) -> Client {
    login(b, vehicle, "driver", &jwt(vehicle, company, Role::Device))
}

fn office(b: &Broker, company: &str, user: &str) -> Client {
    login(b, user, "office", &jwt(user, company, Role::Viewer))
}

/// Sends a subscribe-like message; the next message must be `reply` with `payload`.
fn subscribe(c: &mut Client, msg: Value, reply: &str, payload: Value) {
    c.send(msg);
    let m = c.recv();
    assert_eq!(
        m,
        json!({"type":reply,"payload":payload}),
        "answer to a {reply}"
    );
}

fn locate(c: &mut Client, lat: f64, lng: f64, speed: f64, bearing: f64) {
    c.send(json!({"action":"location_update",
        "payload":{"lat":lat,"lng":lng,"speed":speed,"bearing":bearing}}));
}

/// The next message, which must be a `location_update` of `driver` with these values.
fn expect_location(c: &mut Client, who: &str, driver: &str, values: [f64; 4]) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], "location_update", "{who}: {m}");
    let p = &m["payload"];
    assert_eq!(p["driver_id"], driver, "{who}: {m}");
    let got = ["lat", "lng", "speed", "bearing"].map(|k| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("{who}: {k} not a number: {m}"))
    });
    assert_eq!(got, values, "{who}: exactly the values sent: {m}");
    let ts = p["timestamp"].as_str().expect("timestamp");
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
        "{who}: RFC 3339 timestamp: {m}"
    );
    assert_eq!(
        p.as_object().unwrap().len(),
        6,
        "{who}: driver_id, lat, lng, speed, bearing, timestamp: {m}"
    );
    m
}

/// The next message, which must be an `error` named `name` (with `field` when given).
fn expect_error(c: &mut Client, name: &str, field: Option<&str>) -> Value {
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["error"]),
        (&json!("error"), &json!(name)),
        "{m}"
    );
    assert!(
        m["message"].as_str().is_some_and(|s| !s.is_empty()),
        "an error says what went wrong: {m}"
    );
    if let Some(f) = field {
        assert_eq!(m["field"], f, "the error names the field: {m}");
    }
    m
}

/// Nothing is pending for this client: the answer to a JSON ping is the next message.
fn nothing_more(c: &mut Client, who: &str) {
    c.send(json!({"action":"ping","id":"end"}));
    assert_eq!(c.recv(), json!({"action":"pong","id":"end"}), "{who}");
}

fn breaches(b: &Broker, kind: &str) -> u64 {
    b.metric(
        "fleetcast_limit_breaches_total",
        &format!("kind=\"{kind}\""),
    )
}

fn with(f: impl FnOnce(&mut Config)) -> Broker {
    let mut cfg = config(2);
    f(&mut cfg);
    Broker::start(cfg)
}

// ---------------------------------------------------------------- data flow

#[test]
fn offices_get_exactly_what_the_driver_sent() {
    let b = Broker::with_shards(2);
    let mut one = office(&b, "fleet_a", "ops-one");
    subscribe(
        &mut one,
        json!({"action":"subscribe","payload":{"driver_id":"truck-7"}}),
        "subscribed",
        json!({"driver_id":"truck-7"}),
    );
    let mut all = office(&b, "fleet_a", "ops-all");
    subscribe(
        &mut all,
        json!({"action":"subscribe_all"}),
        "subscribed",
        json!({"all":true}),
    );
    // The other spelling of "all drivers", fields at the top level.
    let mut all2 = office(&b, "fleet_a", "ops-all-2");
    subscribe(
        &mut all2,
        json!({"action":"subscribe","all":true}),
        "subscribed",
        json!({"all":true}),
    );

    let mut d7 = driver(&b, "fleet_a", "truck-7");
    let sent = [
        [40.7128, -74.006, 36.0, 245.5],
        [-33.86882, 151.209295, 0.0, 0.0],
        [89.999999, -179.999999, 123.456789, 359.9],
        [0.1 + 0.2, 1e-7, 7.25, 90.0],
    ];
    for v in sent {
        locate(&mut d7, v[0], v[1], v[2], v[3]);
        expect_location(&mut one, "ops-one", "truck-7", v);
        expect_location(&mut all, "ops-all", "truck-7", v);
        expect_location(&mut all2, "ops-all-2", "truck-7", v);
    }
    // Another driver: only the offices watching every driver see it.
    let mut d8 = driver(&b, "fleet_a", "truck-8");
    let v = [51.5, -0.12, 50.0, 10.0];
    locate(&mut d8, v[0], v[1], v[2], v[3]);
    expect_location(&mut all, "ops-all", "truck-8", v);
    expect_location(&mut all2, "ops-all-2", "truck-8", v);
    nothing_more(&mut one, "ops-one does not watch truck-8");
    // Drivers get no answer to an accepted update (Tracking has no ack).
    nothing_more(&mut d7, "driver truck-7");
    nothing_more(&mut d8, "driver truck-8");

    // Unsubscribing stops the stream.
    subscribe(
        &mut one,
        json!({"action":"unsubscribe","payload":{"driver_id":"truck-7"}}),
        "unsubscribed",
        json!({"driver_id":"truck-7"}),
    );
    subscribe(
        &mut all,
        json!({"action":"unsubscribe_all"}),
        "unsubscribed",
        json!({"all":true}),
    );
    locate(&mut d7, 1.0, 2.0, 3.0, 4.0);
    expect_location(&mut all2, "ops-all-2", "truck-7", [1.0, 2.0, 3.0, 4.0]);
    nothing_more(&mut one, "ops-one after unsubscribe");
    nothing_more(&mut all, "ops-all after unsubscribe_all");
}

#[test]
fn an_office_subscribing_gets_each_drivers_last_location_first() {
    let b = Broker::with_shards(2);
    let mut d = driver(&b, "fleet_a", "truck-7");
    locate(&mut d, 10.0, 20.0, 30.0, 40.0);
    locate(&mut d, 11.0, 21.0, 31.0, 41.0);
    nothing_more(&mut d, "driver");
    let mut o = office(&b, "fleet_a", "ops");
    subscribe(
        &mut o,
        json!({"action":"subscribe","payload":{"driver_id":"truck-7"}}),
        "subscribed",
        json!({"driver_id":"truck-7"}),
    );
    expect_location(&mut o, "snapshot", "truck-7", [11.0, 21.0, 31.0, 41.0]);
    locate(&mut d, 12.0, 22.0, 32.0, 42.0);
    expect_location(&mut o, "live", "truck-7", [12.0, 22.0, 32.0, 42.0]);
    nothing_more(&mut o, "office");
}

#[test]
fn native_and_tracking_publishes_reach_each_other() {
    let b = Broker::with_shards(2);
    let mut o = office(&b, "fleet_a", "ops");
    subscribe(
        &mut o,
        json!({"action":"subscribe","payload":{"driver_id":"truck-7"}}),
        "subscribed",
        json!({"driver_id":"truck-7"}),
    );
    let mut nat = b.connect_key(&key("fleet_a", Role::Viewer));
    nat.subscribe("vehicle_locations", json!({"vehicle_ids":["truck-7"]}));

    // A native device's location_update: speed stays in km/h, heading is the bearing.
    let mut dev = b.connect_key(&key("fleet_a", Role::Device));
    dev.send(json!({"type":"location_update","timestamp":"2024-03-15T14:30:00.000Z",
        "payload":{"vehicle_id":"truck-7","trip_id":"trip_1",
        "location":{"latitude":40.7128,"longitude":-74.006,"speed":36,"heading":245.5,"accuracy":5}}}));
    let m = expect_location(&mut o, "office", "truck-7", [40.7128, -74.006, 36.0, 245.5]);
    assert_eq!(m["payload"]["timestamp"], "2024-03-15T14:30:00.000Z", "{m}");
    assert_eq!(m["payload"]["speed"], json!(36), "{m}");
    assert_eq!(
        nat.expect("location_update")["payload"]["vehicle_id"],
        "truck-7"
    );

    // A Tracking driver's update reaches the native subscriber in the native shape.
    let mut d = driver(&b, "fleet_a", "truck-7");
    locate(&mut d, 48.8566, 2.3522, 42.5, 90.0);
    let m = nat.recv();
    assert_eq!(
        (&m["type"], &m["channel"]),
        (&json!("location_update"), &json!("vehicle_locations")),
        "{m}"
    );
    assert_eq!(
        m["payload"],
        json!({"vehicle_id":"truck-7","location":
            {"latitude":48.8566,"longitude":2.3522,"speed":42.5,"heading":90}}),
        "{m}"
    );
    assert!(m["id"].is_string() && m["timestamp"].is_string(), "{m}");
    expect_location(&mut o, "office", "truck-7", [48.8566, 2.3522, 42.5, 90.0]);

    // A native location without speed or heading: null, not made up.
    dev.send(
        json!({"type":"location_update","payload":{"vehicle_id":"truck-7",
        "location":{"latitude":1.5,"longitude":2.5}}}),
    );
    let m = o.recv();
    assert_eq!(
        (
            &m["payload"]["lat"],
            &m["payload"]["speed"],
            &m["payload"]["bearing"]
        ),
        (&json!(1.5), &Value::Null, &Value::Null),
        "{m}"
    );
    // Other channels have no Tracking shape: an office subscribed to all sees none.
    let mut all = office(&b, "fleet_a", "ops-all");
    subscribe(
        &mut all,
        json!({"action":"subscribe_all"}),
        "subscribed",
        json!({"all":true}),
    );
    // (its snapshot: truck-7's last location)
    assert_eq!(all.recv()["payload"]["driver_id"], "truck-7");
    dev.send(alert("a1", "truck-7", "high"));
    dev.send(
        json!({"type":"telemetry_update","payload":{"vehicle_id":"truck-7",
        "telemetry":{"fuel_level":50}}}),
    );
    nothing_more(&mut all, "office: only locations");
}

// ---------------------------------------------------------------- errors

#[test]
fn every_error_has_its_name() {
    let b = Broker::with_shards(2);

    // A bad token: Unauthorized, then the connection is closed.
    for token in ["not-a-key-0123456789", "a.b.c"] {
        let mut c = connect(&b);
        let m = authenticate(&mut c, "ops", "office", token);
        assert_eq!(
            (&m["type"], &m["error"]),
            (&json!("error"), &json!("Unauthorized"))
        );
        assert_eq!(m["code"], 401, "{m}");
        assert_eq!(c.expect_close(), Some(1008));
    }
    // No token at all: Unauthorized too.
    let mut c = connect(&b);
    c.send(json!({"action":"authenticate","payload":{"user_id":"ops","role":"office"}}));
    expect_error(&mut c, "Unauthorized", None);
    assert_eq!(c.expect_close(), Some(1008));

    // Before authentication: location updates and subscribes are Unauthorized, the
    // connection stays open and may still authenticate.
    let mut c = connect(&b);
    locate(&mut c, 1.0, 2.0, 3.0, 4.0);
    expect_error(&mut c, "Unauthorized", None);
    c.send(json!({"action":"subscribe_all"}));
    expect_error(&mut c, "Unauthorized", None);
    let m = authenticate(
        &mut c,
        "ops",
        "office",
        &jwt("ops", "fleet_a", Role::Viewer),
    );
    assert_eq!(m["type"], "authenticated", "{m}");

    // An unknown action: InvalidAction; so is a message without one.
    c.send(json!({"action":"teleport","payload":{}}));
    let m = expect_error(&mut c, "InvalidAction", Some("action"));
    assert!(m["message"].as_str().unwrap().contains("teleport"), "{m}");
    c.send(json!({"payload":{"driver_id":"x"}}));
    expect_error(&mut c, "InvalidAction", Some("action"));
    // Malformed JSON, a subscribe without a driver: BadPayload.
    c.send_text("{\"action\":");
    expect_error(&mut c, "BadPayload", None);
    c.send(json!({"action":"subscribe","payload":{}}));
    expect_error(&mut c, "BadPayload", Some("driver_id"));
    // An office may not send locations: Forbidden.
    locate(&mut c, 1.0, 2.0, 3.0, 4.0);
    expect_error(&mut c, "Forbidden", None);
    nothing_more(&mut c, "office after its errors");

    // A driver: missing and ill-typed fields are BadPayload naming the field.
    let mut d = driver(&b, "fleet_a", "truck-7");
    let bad = [
        (json!({"lng":2.0,"speed":3,"bearing":4}), "lat"),
        (json!({"lat":1.0,"speed":3,"bearing":4}), "lng"),
        (json!({"lat":"1.0","lng":2.0}), "lat"),
        (json!({"lat":1.0,"lng":"east"}), "lng"),
        (json!({"lat":91.0,"lng":2.0}), "lat"),
        (json!({"lat":1.0,"lng":180.5}), "lng"),
        (json!({"lat":1.0,"lng":2.0,"speed":"fast"}), "speed"),
        (json!({"lat":1.0,"lng":2.0,"bearing":{"deg":4}}), "bearing"),
    ];
    for (payload, field) in bad {
        d.send(json!({"action":"location_update","payload":payload}));
        expect_error(&mut d, "BadPayload", Some(field));
    }
    // A driver that subscribes: Forbidden.
    d.send(json!({"action":"subscribe","payload":{"driver_id":"truck-8"}}));
    expect_error(&mut d, "Forbidden", None);
    d.send(json!({"action":"subscribe_all"}));
    expect_error(&mut d, "Forbidden", None);
    nothing_more(&mut d, "driver after its errors");
}

#[test]
fn a_credential_for_another_user_or_role_is_unauthorized() {
    let b = Broker::with_shards(1);
    let refused = |user: &str, role: &str, token: &str| {
        let mut c = connect(&b);
        let m = authenticate(&mut c, user, role, token);
        assert_eq!(
            (&m["type"], &m["error"], &m["code"]),
            (&json!("error"), &json!("Unauthorized"), &json!(401)),
            "{user} as {role}: {m}"
        );
        assert_eq!(c.expect_close(), Some(1008), "{user} as {role}");
    };
    let d7 = jwt("truck-7", "fleet_a", Role::Device);
    let ops = jwt("ops-1", "fleet_a", Role::Viewer);
    refused("truck-8", "driver", &d7);
    refused("truck-7", "office", &d7);
    refused("ops-2", "office", &ops);
    refused("ops-1", "driver", &ops);
    // The test config's API keys: the viewer key is its own user only; the device key may
    // act for any vehicle of its company; a service may act for any office user.
    refused("someone", "office", &key("fleet_a", Role::Viewer));
    refused("truck-7", "driver", &key("fleet_a", Role::Viewer));
    refused("truck-9", "driver", &key("fleet_a", Role::Service));
    refused("truck-2", "driver", "key-fleet_a-device-v1-0123456789");
    login(
        &b,
        "fleet_a-viewer",
        "office",
        &key("fleet_a", Role::Viewer),
    );
    login(&b, "truck-9", "driver", &key("fleet_a", Role::Device));
    login(&b, "v1", "driver", "key-fleet_a-device-v1-0123456789");
    login(&b, "dispatch", "office", &key("fleet_a", Role::Service));
}

// ---------------------------------------------------------------- heartbeat

#[test]
fn json_and_websocket_pings_are_answered() {
    let b = with(|c| c.limits.heartbeat_interval_ms = 100);
    let mut c = connect(&b);
    // Before and after authentication.
    c.send(json!({"action":"ping"}));
    assert_eq!(c.recv(), json!({"action":"pong"}));
    let mut c = {
        let m = authenticate(
            &mut c,
            "ops",
            "office",
            &jwt("ops", "fleet_a", Role::Viewer),
        );
        assert_eq!(m["type"], "authenticated");
        c
    };
    c.send(json!({"action":"ping"}));
    assert_eq!(c.recv(), json!({"action":"pong"}));
    // A JSON pong (the seed tells clients to answer the heartbeat) is accepted silently.
    c.send(json!({"action":"pong"}));
    // A WebSocket ping gets a pong with its payload; the server's heartbeat is a WebSocket
    // ping (tungstenite answers it while reading).
    c.ws.send(Message::Ping(b"hb".to_vec().into())).unwrap();
    let (mut pong, mut pings) = (false, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !(pong && pings >= 2) {
        c.set_timeout(Duration::from_millis(50));
        match c.ws.read() {
            Ok(Message::Pong(p)) => {
                assert_eq!(p.as_ref(), b"hb");
                pong = true;
            }
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(pong, "no pong frame");
    assert!(pings >= 2, "{pings} heartbeat pings in 3 s at 100 ms");
    nothing_more(&mut c, "answering client is kept");

    // A client that stays silent is closed after two intervals.
    let mut silent = office(&b, "fleet_a", "ops-silent");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(silent.expect_close(), Some(4008));
}

// ---------------------------------------------------------------- isolation and caps

#[test]
fn an_office_never_sees_another_companys_drivers() {
    let b = Broker::with_shards(2);
    let mut a_all = office(&b, "fleet_a", "ops-a");
    subscribe(
        &mut a_all,
        json!({"action":"subscribe_all"}),
        "subscribed",
        json!({"all":true}),
    );
    let mut a_one = office(&b, "fleet_a", "ops-a-1");
    subscribe(
        &mut a_one,
        json!({"action":"subscribe","payload":{"driver_id":"truck-7"}}),
        "subscribed",
        json!({"driver_id":"truck-7"}),
    );
    let mut b_all = office(&b, "fleet_b", "ops-b");
    subscribe(
        &mut b_all,
        json!({"action":"subscribe_all"}),
        "subscribed",
        json!({"all":true}),
    );
    // Company B's driver has the same id as one of company A's.
    let mut db = driver(&b, "fleet_b", "truck-7");
    locate(&mut db, 5.0, 6.0, 7.0, 8.0);
    expect_location(&mut b_all, "ops-b", "truck-7", [5.0, 6.0, 7.0, 8.0]);
    let mut da = driver(&b, "fleet_a", "truck-7");
    locate(&mut da, 1.0, 2.0, 3.0, 4.0);
    expect_location(&mut a_all, "ops-a", "truck-7", [1.0, 2.0, 3.0, 4.0]);
    expect_location(&mut a_one, "ops-a-1", "truck-7", [1.0, 2.0, 3.0, 4.0]);
    nothing_more(&mut a_all, "ops-a");
    nothing_more(&mut a_one, "ops-a-1");
    nothing_more(&mut b_all, "ops-b");
    // A new office of company A gets A's last location only.
    let mut late = office(&b, "fleet_a", "ops-a-late");
    subscribe(
        &mut late,
        json!({"action":"subscribe","payload":{"driver_id":"truck-7"}}),
        "subscribed",
        json!({"driver_id":"truck-7"}),
    );
    expect_location(&mut late, "late", "truck-7", [1.0, 2.0, 3.0, 4.0]);
    nothing_more(&mut late, "late");
}

#[test]
fn the_per_company_connection_cap_refuses_with_limit_exceeded() {
    let b = with(|c| c.limits.max_connections_per_tenant = 1);
    let mut first = office(&b, "fleet_a", "ops-1");
    let mut second = connect(&b);
    let m = authenticate(
        &mut second,
        "ops-2",
        "office",
        &jwt("ops-2", "fleet_a", Role::Viewer),
    );
    assert_eq!(
        (&m["type"], &m["error"], &m["code"]),
        (&json!("error"), &json!("LimitExceeded"), &json!(429)),
        "{m}"
    );
    assert!(
        m["message"].as_str().unwrap().contains("company"),
        "the message says which cap: {m}"
    );
    assert_eq!(second.expect_close(), Some(1008));
    // A driver of the same company counts too; another company is not affected.
    let mut d = connect(&b);
    let m = authenticate(
        &mut d,
        "truck-7",
        "driver",
        &jwt("truck-7", "fleet_a", Role::Device),
    );
    assert_eq!(m["error"], "LimitExceeded", "{m}");
    let mut other = office(&b, "fleet_b", "ops-b");
    nothing_more(&mut other, "other company");
    nothing_more(&mut first, "first office");
    assert_eq!(breaches(&b, "connections_per_tenant"), 2);

    // Once the first office leaves, its place is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = connect(&b);
        let m = authenticate(
            &mut c,
            "ops-2",
            "office",
            &jwt("ops-2", "fleet_a", Role::Viewer),
        );
        if m["type"] == "authenticated" {
            break;
        }
        assert!(Instant::now() < deadline, "the cap was not released: {m}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_per_user_connection_cap_refuses_with_limit_exceeded() {
    let b = with(|c| c.limits.max_connections_per_user = 1);
    let mut first = office(&b, "fleet_a", "ops");
    let mut second = connect(&b);
    let m = authenticate(
        &mut second,
        "ops",
        "office",
        &jwt("ops", "fleet_a", Role::Viewer),
    );
    assert_eq!(
        (&m["error"], &m["code"]),
        (&json!("LimitExceeded"), &json!(429)),
        "{m}"
    );
    assert_eq!(second.expect_close(), Some(1008));
    nothing_more(&mut first, "first connection");
}

// ---------------------------------------------------------------- SPEC §8 limits

#[test]
fn one_location_update_per_driver_per_second() {
    let b = with(|c| c.limits.location_update_interval_ms = 1_000);
    let mut o = office(&b, "fleet_a", "ops");
    subscribe(
        &mut o,
        json!({"action":"subscribe_all"}),
        "subscribed",
        json!({"all":true}),
    );
    let mut d = driver(&b, "fleet_a", "truck-7");
    let started = Instant::now();
    locate(&mut d, 1.0, 2.0, 3.0, 4.0);
    locate(&mut d, 1.5, 2.5, 3.5, 4.5);
    let m = expect_error(&mut d, "BadPayload", None);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the test is meant to send within the interval"
    );
    assert_eq!(
        (&m["code"], &m["limit"]),
        (&json!(429), &json!("location_rate")),
        "{m}"
    );
    let text = m["message"].as_str().unwrap();
    assert!(
        text.contains("location_rate") && text.contains("location update"),
        "the message names the limit: {m}"
    );
    expect_location(&mut o, "office", "truck-7", [1.0, 2.0, 3.0, 4.0]);
    nothing_more(&mut o, "the refused update is not delivered");
    assert_eq!(breaches(&b, "location_rate"), 1);
    // Another driver is not affected; after the interval the driver is accepted again.
    let mut other = driver(&b, "fleet_a", "truck-8");
    locate(&mut other, 9.0, 9.0, 9.0, 9.0);
    expect_location(&mut o, "office", "truck-8", [9.0; 4]);
    thread::sleep(
        Duration::from_secs(1).saturating_sub(started.elapsed()) + Duration::from_millis(50),
    );
    locate(&mut d, 2.0, 3.0, 4.0, 5.0);
    expect_location(&mut o, "office", "truck-7", [2.0, 3.0, 4.0, 5.0]);
    nothing_more(&mut d, "driver");
}

#[test]
fn an_oversized_message_closes_with_1009() {
    let b = Broker::with_shards(1);
    let mut ok = office(&b, "fleet_a", "ops");
    // Exactly 1 KiB is fine.
    let head = r#"{"action":"ping","id":"at-limit","pad":""#;
    let fits = format!("{head}{}\"}}", "x".repeat(1024 - head.len() - 2));
    assert_eq!(fits.len(), 1024);
    ok.send_text(&fits);
    assert_eq!(ok.recv(), json!({"action":"pong","id":"at-limit"}));
    // One byte more: close 1009 (before or after authentication).
    let over = format!("{head}{}\"}}", "x".repeat(1025 - head.len() - 2));
    ok.send_text(&over);
    assert_eq!(ok.expect_close(), Some(1009));
    let mut anon = connect(&b);
    anon.send_text(&over);
    assert_eq!(anon.expect_close(), Some(1009));
    assert_eq!(breaches(&b, "message_size"), 2);
}

#[test]
fn no_authentication_in_time_is_unauthorized_then_closed() {
    let b = with(|c| c.limits.auth_timeout_ms = 300);
    let mut c = connect(&b);
    let started = Instant::now();
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["error"], &m["code"]),
        (&json!("error"), &json!("Unauthorized"), &json!(408)),
        "{m}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250), "{m}");
    assert_eq!(c.expect_close(), Some(1008));
    assert_eq!(breaches(&b, "auth_timeout"), 1);
}

#[test]
fn the_message_rate_is_rate_limited_then_closed_on_sustained_abuse() {
    let b = with(|c| {
        c.limits.messages_per_second = 20;
        c.limits.abuse_close_after_ms = 500;
    });
    let mut c = office(&b, "fleet_a", "ops");
    for i in 0..60 {
        c.send(json!({"action":"ping","id":i}));
    }
    let (mut pongs, mut refused) = (0, 0);
    for i in 0..60 {
        let m = c.recv();
        assert_eq!(m["id"], i, "one answer per message, in order: {m}");
        if m["action"] == "pong" {
            pongs += 1;
        } else {
            assert_eq!(
                (&m["error"], &m["code"]),
                (&json!("RateLimited"), &json!(429)),
                "{m}"
            );
            assert!(
                m["message"].as_str().unwrap().contains("20"),
                "names the rate: {m}"
            );
            refused += 1;
        }
    }
    assert!(
        pongs >= 15 && refused >= 30,
        "{pongs} answered, {refused} refused"
    );
    // Keep abusing: closed with 1008 once it lasted abuse_close_after.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut code = None;
    'abuse: while Instant::now() < deadline {
        if c.ws
            .send(Message::text(json!({"action":"ping"}).to_string()))
            .is_err()
        {
            break;
        }
        loop {
            match c.next(Duration::from_millis(5)) {
                Ok(m) => assert!(m["action"] == "pong" || m["error"] == "RateLimited", "{m}"),
                Err(Ended::Timeout) => break,
                Err(Ended::Closed(cc)) => {
                    code = cc;
                    break 'abuse;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    if code.is_none() {
        code = c.expect_close();
    }
    assert_eq!(code, Some(1008));
    assert_eq!(breaches(&b, "message_rate_abuse"), 1);
}

#[test]
fn the_subscription_cap_is_a_bad_payload_naming_it() {
    let b = with(|c| c.limits.max_subscriptions = 2);
    let mut o = office(&b, "fleet_a", "ops");
    for d in ["d1", "d2"] {
        subscribe(
            &mut o,
            json!({"action":"subscribe","payload":{"driver_id":d}}),
            "subscribed",
            json!({"driver_id":d}),
        );
    }
    o.send(json!({"action":"subscribe","payload":{"driver_id":"d3"}}));
    let m = expect_error(&mut o, "BadPayload", None);
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 subscriptions"),
        "{m}"
    );
    assert_eq!(breaches(&b, "subscriptions"), 1);
    nothing_more(&mut o, "office");
}
