//! Subscriptions in the native dialect: entity and value filters, unsubscribe, endpoint
//! scope, limits, and what a subscriber receives from valid and invalid publishes.
//!
//! Publishers and subscribers sit on separate connections. "Nothing else arrived" is shown
//! by a final marker event from the same publisher on the same (tenant, channel) stream:
//! events of one publisher on one stream arrive in order (SPEC §7), so anything that
//! should have been filtered out would have shown up before the marker.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::time::Duration;
use tungstenite::Message;

fn viewer(b: &Broker) -> Client {
    b.connect_auth(&key("fleet_a", Role::Viewer))
}

fn service(b: &Broker) -> Client {
    b.connect_key(&key("fleet_a", Role::Service))
}

/// The next message, which must be a data event of type `ty`.
fn event(c: &mut Client, ty: &str) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], ty, "expected a {ty} event, got {m}");
    m
}

/// The next `n` messages, which must be `location_update`s: (vehicle_id, latitude).
fn locations(c: &mut Client, n: usize) -> Vec<(String, f64)> {
    (0..n)
        .map(|_| {
            let m = event(c, "location_update");
            assert_eq!(m["channel"], "vehicle_locations");
            let p = &m["payload"];
            (
                p["vehicle_id"].as_str().unwrap().to_string(),
                p["location"]["latitude"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn owned(v: &[(&str, f64)]) -> Vec<(String, f64)> {
    v.iter().map(|(s, x)| (s.to_string(), *x)).collect()
}

/// The next `n` messages, which must be events of type `ty`: the value of `field` in each.
fn fields(c: &mut Client, ty: &str, field: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| event(c, ty)["payload"][field].as_str().unwrap().to_string())
        .collect()
}

/// The next text message as raw text (serde_json's map would reorder keys).
fn next_text(c: &mut Client) -> String {
    c.set_timeout(Duration::from_secs(5));
    loop {
        match c.ws.read().expect("a message within 5 s") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => continue,
        }
    }
}

/// The next message, which must be an `error` answering `id` with `code`; returns its payload.
fn error(c: &mut Client, id: &str, code: u64) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], "error", "expected an error, got {m}");
    assert_eq!(m["id"], id, "error must echo the id it answers: {m}");
    assert_eq!(m["payload"]["code"], code, "{m}");
    m["payload"].clone()
}

fn alert_with(id: &str, vehicle: &str, driver: &str, severity: &str, category: &str) -> Value {
    json!({"type":"safety_alert","payload":{"alert_id":id,"severity":severity,
        "category":category,"vehicle_id":vehicle,"driver_id":driver}})
}

fn trip_event(trip: &str, event: &str) -> Value {
    json!({"type":"trip_event","payload":{"event":event,"trip_id":trip,"vehicle_id":"v1"}})
}

#[test]
fn vehicle_id_filter_selects_one_vehicle() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    let s = v.subscribe("vehicle_locations", json!({"vehicle_id":"v1"}));
    assert_eq!(s["payload"]["channel"], "vehicle_locations");
    assert_eq!(s["payload"]["filters"]["vehicle_ids"], json!(["v1"]));
    let mut svc = service(&b);
    for (veh, lat) in [("v2", 1.0), ("v1", 2.0), ("v3", 3.0), ("v1", 4.0)] {
        svc.send(location(veh, lat));
    }
    assert_eq!(locations(&mut v, 2), owned(&[("v1", 2.0), ("v1", 4.0)]));
}

#[test]
fn vehicle_ids_list_selects_each_listed_vehicle() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({"vehicle_ids":["v1","v3"]}));
    let mut svc = service(&b);
    for (veh, lat) in [
        ("v1", 1.0),
        ("v2", 2.0),
        ("v3", 3.0),
        ("v4", 4.0),
        ("v1", 5.0),
    ] {
        svc.send(location(veh, lat));
    }
    assert_eq!(
        locations(&mut v, 3),
        owned(&[("v1", 1.0), ("v3", 3.0), ("v1", 5.0)])
    );
}

#[test]
fn trip_id_filter_selects_one_trip() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("trip_events", json!({"trip_id":"t1"}));
    let mut svc = service(&b);
    for (trip, ev) in [
        ("t2", "trip_started"),
        ("t1", "trip_started"),
        ("t3", "trip_started"),
        ("t1", "trip_completed"),
    ] {
        svc.send(trip_event(trip, ev));
    }
    let got: Vec<(String, String)> = (0..2)
        .map(|_| {
            let m = event(&mut v, "trip_event");
            assert_eq!(m["channel"], "trip_events");
            let p = &m["payload"];
            (
                p["trip_id"].as_str().unwrap().into(),
                p["event"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("t1".to_string(), "trip_started".to_string()),
            ("t1".into(), "trip_completed".into())
        ]
    );
}

#[test]
fn driver_id_filter_selects_one_driver() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("driver_status", json!({"driver_id":"d1"}));
    let mut svc = service(&b);
    for (driver, vehicle, status) in [
        ("d2", "v2", "driving"),
        ("d1", "v1", "driving"),
        ("d3", "v3", "off_duty"),
        ("d1", "v1", "on_break"),
    ] {
        svc.send(json!({"type":"driver_status","payload":{"driver_id":driver,"vehicle_id":vehicle,"status":status}}));
    }
    let got: Vec<(String, String)> = (0..2)
        .map(|_| {
            let m = event(&mut v, "driver_status");
            assert_eq!(m["channel"], "driver_status");
            let p = &m["payload"];
            (
                p["driver_id"].as_str().unwrap().into(),
                p["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("d1".to_string(), "driving".to_string()),
            ("d1".into(), "on_break".into())
        ]
    );
}

#[test]
fn entity_filters_match_any_named_entity_and_accumulate() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    // One subscription naming a vehicle and a driver: events about either are selected.
    v.subscribe("alerts", json!({"vehicle_id":"v1","driver_id":"d9"}));
    let mut svc = service(&b);
    svc.send(alert_with("a1", "v2", "d1", "high", "speeding"));
    svc.send(alert_with("a2", "v1", "d2", "high", "speeding"));
    svc.send(alert_with("a3", "v3", "d9", "high", "speeding"));
    svc.send(alert_with("a4", "v4", "d4", "high", "speeding"));
    svc.send(alert_with("a5", "v1", "d9", "high", "speeding"));
    // About both named entities: delivered once.
    assert_eq!(
        fields(&mut v, "safety_alert", "alert_id", 3),
        ["a2", "a3", "a5"]
    );
    // A second subscribe on the same channel adds v5; v1 and d9 stay selected.
    v.subscribe("alerts", json!({"vehicle_id":"v5"}));
    svc.send(alert_with("a6", "v5", "d5", "high", "speeding"));
    svc.send(alert_with("a7", "v6", "d6", "high", "speeding"));
    svc.send(alert_with("a8", "v1", "d1", "high", "speeding"));
    svc.send(alert_with("a9", "v7", "d9", "high", "speeding"));
    assert_eq!(
        fields(&mut v, "safety_alert", "alert_id", 3),
        ["a6", "a8", "a9"]
    );
}

#[test]
fn severity_filter_selects_listed_severities() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    let s = v.subscribe("alerts", json!({"severity":["high","critical"]}));
    assert_eq!(
        s["payload"]["filters"]["severity"],
        json!(["high", "critical"])
    );
    let mut svc = service(&b);
    for (id, sev) in [
        ("a1", "low"),
        ("a2", "high"),
        ("a3", "medium"),
        ("a4", "critical"),
        ("a5", "low"),
        ("a6", "high"),
    ] {
        svc.send(alert(id, "v1", sev));
    }
    let got: Vec<(String, String)> = (0..3)
        .map(|_| {
            let m = event(&mut v, "safety_alert");
            let p = &m["payload"];
            (
                p["alert_id"].as_str().unwrap().into(),
                p["severity"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a2".to_string(), "high".to_string()),
            ("a4".into(), "critical".into()),
            ("a6".into(), "high".into())
        ]
    );
}

#[test]
fn category_filter_selects_listed_categories() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("alerts", json!({"category":["collision_risk","speeding"]}));
    let mut svc = service(&b);
    for (id, cat) in [
        ("a1", "harsh_braking"),
        ("a2", "collision_risk"),
        ("a3", "route_deviation"),
        ("a4", "speeding"),
        ("a5", "harsh_braking"),
        ("a6", "collision_risk"),
    ] {
        svc.send(alert_with(id, "v1", "d1", "medium", cat));
    }
    assert_eq!(
        fields(&mut v, "safety_alert", "alert_id", 3),
        ["a2", "a4", "a6"]
    );
}

#[test]
fn metrics_filter_projects_telemetry_and_keeps_other_fields() {
    let b = Broker::with_shards(2);
    let mut projected = viewer(&b);
    let s = projected.subscribe("telemetry", json!({"metrics":["engine_temp","fuel_level"]}));
    assert_eq!(
        s["payload"]["filters"]["metrics"],
        json!(["engine_temp", "fuel_level"])
    );
    let mut full = viewer(&b);
    full.subscribe("telemetry", json!({}));
    let mut svc = service(&b);
    let payload = r#"{"vehicle_id":"v1","telemetry":{"fuel_level":75.5,"engine_rpm":2100,"odometer":45678.2,"engine_temp":92.3},"note":"keep me","extra":{"a":[1,2]}}"#;
    svc.send_text(&format!(
        r#"{{"type":"telemetry_update","id":"tel-1","payload":{payload}}}"#
    ));

    // Only the listed metrics remain, in their published order; every other field is kept.
    let text = next_text(&mut projected);
    let m: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&m["type"], &m["channel"], &m["id"]),
        (
            &json!("telemetry_update"),
            &json!("telemetry"),
            &json!("tel-1")
        )
    );
    let expected = r#"{"vehicle_id":"v1","telemetry":{"fuel_level":75.5,"engine_temp":92.3},"note":"keep me","extra":{"a":[1,2]}}"#;
    assert!(
        text.ends_with(&format!(r#","payload":{expected}}}"#)),
        "{text}"
    );

    // A subscriber without the filter gets the payload untouched (the shared frame is not altered).
    let text = next_text(&mut full);
    assert!(
        text.ends_with(&format!(r#","payload":{payload}}}"#)),
        "{text}"
    );
}

#[test]
fn unsubscribe_stops_delivery() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    v.subscribe("alerts", json!({}));
    let mut svc = service(&b);
    svc.send(location("v1", 1.0));
    assert_eq!(locations(&mut v, 1), owned(&[("v1", 1.0)]));

    v.send(json!({"type":"subscribe","id":"u1","payload":{"action":"unsubscribe","channel":"vehicle_locations"}}));
    let m = v.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("unsubscribed"), &json!("u1")),
        "{m}"
    );
    assert_eq!(m["payload"]["channel"], "vehicle_locations");

    // The location is published before the alert by the same publisher and would be
    // delivered first if the unsubscribe had not taken.
    svc.send(location("v1", 2.0));
    svc.send(alert("marker", "v1", "low"));
    assert_eq!(fields(&mut v, "safety_alert", "alert_id", 1), ["marker"]);
}

#[test]
fn unsubscribe_with_entity_filter_keeps_the_rest() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({"vehicle_ids":["v1","v2"]}));
    v.send(json!({"type":"unsubscribe","id":"u1","payload":{"channel":"vehicle_locations","filters":{"vehicle_id":"v1"}}}));
    let m = v.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("unsubscribed"), &json!("u1")),
        "{m}"
    );
    let mut svc = service(&b);
    for (veh, lat) in [("v1", 1.0), ("v2", 2.0), ("v1", 3.0), ("v2", 4.0)] {
        svc.send(location(veh, lat));
    }
    assert_eq!(locations(&mut v, 2), owned(&[("v2", 2.0), ("v2", 4.0)]));
}

#[test]
fn vehicle_endpoint_scopes_every_subscription() {
    let b = Broker::with_shards(2);
    let url = b.url(&format!(
        "/v1/streaming/websocket/vehicle/v1?api_key={}",
        key("fleet_a", Role::Viewer)
    ));
    let mut v = Client::connect(&url);
    let s = v.subscribe("vehicle_locations", json!({}));
    assert_eq!(s["payload"]["filters"]["vehicle_ids"], json!(["v1"]));
    v.subscribe("alerts", json!({"vehicle_id":"v1"}));
    let mut svc = service(&b);
    svc.send(location("v2", 1.0));
    svc.send(location("v1", 2.0));
    svc.send(alert("a1", "v2", "high"));
    svc.send(alert("a2", "v1", "high"));
    svc.send(location("v3", 3.0));
    svc.send(location("v1", 4.0));
    assert_eq!(locations(&mut v, 1), owned(&[("v1", 2.0)]));
    assert_eq!(fields(&mut v, "safety_alert", "alert_id", 1), ["a2"]);
    assert_eq!(locations(&mut v, 1), owned(&[("v1", 4.0)]));

    // A filter naming another vehicle is outside the endpoint's scope.
    v.send(
        json!({"type":"subscribe","id":"out-of-scope","payload":{"action":"subscribe",
        "channel":"vehicle_locations","filters":{"vehicle_id":"v2"}}}),
    );
    error(&mut v, "out-of-scope", 403);
    v.send(
        json!({"type":"subscribe","id":"by-trip","payload":{"action":"subscribe",
        "channel":"trip_events","filters":{"trip_id":"t1"}}}),
    );
    error(&mut v, "by-trip", 403);
    // The refused requests changed nothing.
    svc.send(location("v2", 5.0));
    svc.send(location("v1", 6.0));
    assert_eq!(locations(&mut v, 1), owned(&[("v1", 6.0)]));
}

#[test]
fn trip_endpoint_scopes_every_subscription() {
    let b = Broker::with_shards(2);
    let url = b.url(&format!(
        "/v1/streaming/websocket/trip/t1?api_key={}",
        key("fleet_a", Role::Viewer)
    ));
    let mut v = Client::connect(&url);
    let s = v.subscribe("trip_events", json!({}));
    assert_eq!(s["payload"]["filters"]["trip_ids"], json!(["t1"]));
    let mut svc = service(&b);
    for (trip, ev) in [
        ("t2", "trip_started"),
        ("t1", "trip_started"),
        ("t3", "trip_started"),
        ("t1", "waypoint_reached"),
    ] {
        svc.send(trip_event(trip, ev));
    }
    let got: Vec<(String, String)> = (0..2)
        .map(|_| {
            let p = event(&mut v, "trip_event")["payload"].clone();
            (
                p["trip_id"].as_str().unwrap().into(),
                p["event"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("t1".to_string(), "trip_started".to_string()),
            ("t1".into(), "waypoint_reached".into())
        ]
    );

    v.send(
        json!({"type":"subscribe","id":"other-trip","payload":{"action":"subscribe",
        "channel":"trip_events","filters":{"trip_id":"t2"}}}),
    );
    error(&mut v, "other-trip", 403);
    v.send(
        json!({"type":"subscribe","id":"by-vehicle","payload":{"action":"subscribe",
        "channel":"vehicle_locations","filters":{"vehicle_id":"v1"}}}),
    );
    error(&mut v, "by-vehicle", 403);
    svc.send(trip_event("t2", "trip_completed"));
    svc.send(trip_event("t1", "trip_completed"));
    assert_eq!(fields(&mut v, "trip_event", "trip_id", 1), ["t1"]);
}

#[test]
fn unknown_channel_is_refused_naming_the_field() {
    let b = Broker::with_shards(1);
    let mut v = viewer(&b);
    v.send(json!({"type":"subscribe","id":"s-weather","payload":{"action":"subscribe","channel":"weather"}}));
    let p = error(&mut v, "s-weather", 400);
    assert_eq!(p["field"], "channel");
    // A numeric id is echoed as given.
    v.send(json!({"type":"subscribe","id":42,"payload":{"action":"subscribe","data":{"channel":"nope"}}}));
    let m = v.recv();
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["field"]),
        (&json!("error"), &json!(42), &json!("channel"))
    );
    // The seed's shape, with the channel inside payload.data, is accepted.
    v.send(json!({"type":"subscribe","id":"s-data","payload":{"action":"subscribe","data":{"channel":"alerts"}}}));
    let m = v.recv();
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["channel"]),
        (&json!("subscribed"), &json!("s-data"), &json!("alerts"))
    );
}

#[test]
fn subscription_limit_is_256_per_connection() {
    let b = Broker::with_shards(1);
    let mut v = viewer(&b);
    let ids: Vec<String> = (0..256).map(|i| format!("x{i:03}")).collect();
    // Four lists of 64 keep each message under the 1 KiB frame limit.
    for chunk in ids.chunks(64) {
        let s = v.subscribe("vehicle_locations", json!({"vehicle_ids": chunk}));
        assert_eq!(
            s["payload"]["filters"]["vehicle_ids"]
                .as_array()
                .unwrap()
                .len(),
            64
        );
    }
    // The 257th, on the same channel or on another one, is refused.
    v.send(
        json!({"type":"subscribe","id":"sub-257","payload":{"action":"subscribe",
        "channel":"vehicle_locations","filters":{"vehicle_id":"x256"}}}),
    );
    error(&mut v, "sub-257", 400);
    v.send(json!({"type":"subscribe","id":"sub-alerts","payload":{"action":"subscribe","channel":"alerts"}}));
    error(&mut v, "sub-alerts", 400);
    // Repeating a key already held adds nothing and is fine.
    v.subscribe("vehicle_locations", json!({"vehicle_id":"x000"}));

    // The refused key was not indexed: x256 is not delivered, x001 is.
    let mut svc = service(&b);
    svc.send(location("x256", 1.0));
    svc.send(location("x001", 2.0));
    assert_eq!(locations(&mut v, 1), owned(&[("x001", 2.0)]));

    // Freeing one makes room for one.
    v.send(
        json!({"type":"subscribe","id":"u0","payload":{"action":"unsubscribe",
        "channel":"vehicle_locations","filters":{"vehicle_id":"x000"}}}),
    );
    assert_eq!(v.recv()["type"], "unsubscribed");
    v.subscribe("vehicle_locations", json!({"vehicle_id":"x256"}));
    // Its last known state first (the snapshot), then live.
    assert_eq!(locations(&mut v, 1), owned(&[("x256", 1.0)]));
    svc.send(location("x000", 3.0));
    svc.send(location("x256", 4.0));
    assert_eq!(locations(&mut v, 1), owned(&[("x256", 4.0)]));
}

#[test]
fn unknown_payload_fields_pass_through_byte_for_byte() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    let mut svc = service(&b);
    // Unknown fields before and after the known ones, nested values, odd spacing,
    // escapes and numbers in forms serde would rewrite.
    let payload = r#"{"zeta": 1, "vehicle_id":"v1","custom":{"b":[1, 2.50, {"c":null}],"a":"caf\u00e9 \"q\""},"location":{"latitude":40.7128,"longitude":-74.0060,"speed":35.2,"vendor":"x"},"alpha":true,"big":1e3}"#;
    svc.send_text(&format!(
        r#"{{"type":"location_update","id":"raw-1","payload":{payload}}}"#
    ));
    let text = next_text(&mut v);
    assert!(
        text.ends_with(&format!(r#","payload":{payload}}}"#)),
        "payload altered: {text}"
    );
    let m: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&m["id"], &m["channel"]),
        (&json!("raw-1"), &json!("vehicle_locations"))
    );
}

#[test]
fn publish_with_ack_gets_an_ack_with_its_id() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("alerts", json!({}));
    let mut svc = service(&b);
    let mut msg = alert("a1", "v1", "high");
    msg["id"] = json!("pub-7");
    msg["ack"] = json!(true);
    svc.send(msg);
    let m = svc.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("ack"), &json!("pub-7")),
        "{m}"
    );
    let ev = event(&mut v, "safety_alert");
    assert_eq!(
        (&ev["id"], &ev["payload"]["alert_id"]),
        (&json!("pub-7"), &json!("a1"))
    );

    // Without "ack" there is no reply: the next thing the publisher hears is its pong.
    let mut msg = alert("a2", "v1", "high");
    msg["id"] = json!("pub-8");
    svc.send(msg);
    svc.send(json!({"type":"ping","id":"p1"}));
    let m = svc.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("p1")),
        "{m}"
    );
    assert_eq!(event(&mut v, "safety_alert")["id"], "pub-8");
}

#[test]
fn invalid_publishes_are_refused_naming_the_field_and_not_routed() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    v.subscribe("alerts", json!({}));
    let mut svc = service(&b);

    let mut bad_lat = location("v1", 91.0);
    bad_lat["id"] = json!("bad-lat");
    let no_vehicle = json!({"type":"location_update","id":"no-vehicle","payload":{"trip_id":"t1",
        "location":{"latitude":40.0,"longitude":-74.0}}});
    let mut bad_sev = alert("a1", "v1", "apocalyptic");
    bad_sev["id"] = json!("bad-sev");
    let mut bad_lng = location("v1", 40.0);
    bad_lng["id"] = json!("bad-lng");
    bad_lng["payload"]["location"]["longitude"] = json!(-180.5);
    for (msg, id, field) in [
        (bad_lat, "bad-lat", "latitude"),
        (no_vehicle, "no-vehicle", "vehicle_id"),
        (bad_sev, "bad-sev", "severity"),
        (bad_lng, "bad-lng", "longitude"),
    ] {
        svc.send(msg);
        let p = error(&mut svc, id, 400);
        assert_eq!(p["field"], field, "{p}");
    }
    // None of them was routed: the first thing the subscriber sees is the valid marker.
    svc.send(location("v1", 90.0));
    svc.send(alert("marker", "v1", "low"));
    assert_eq!(locations(&mut v, 1), owned(&[("v1", 90.0)]));
    assert_eq!(fields(&mut v, "safety_alert", "alert_id", 1), ["marker"]);
}

#[test]
fn event_channel_events_carry_increasing_seq_and_one_epoch() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("alerts", json!({}));
    let mut svc = service(&b);
    let mut other = service(&b);
    for i in 0..6 {
        // Two publishers on (probably) different shards feed one stream.
        let c = if i % 2 == 0 { &mut svc } else { &mut other };
        c.send(alert(&format!("a{i}"), "v1", "medium"));
        c.send(json!({"type":"ping","id":"sync"}));
        assert_eq!(c.recv()["type"], "pong");
    }
    let mut last_seq = 0;
    let mut epoch = None;
    for i in 0..6 {
        let m = event(&mut v, "safety_alert");
        assert_eq!(m["payload"]["alert_id"], format!("a{i}"));
        let seq = m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}"));
        let ep = m["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("no epoch: {m}"));
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        assert_eq!(*epoch.get_or_insert(ep), ep, "epoch changed mid-stream");
    }
}
