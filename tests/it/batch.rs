//! `batch` messages (SPEC §5, §8): items handled in order as if sent one by one, at most
//! 50 per batch, a bad item refused on its own, an oversized batch refused as a whole.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};

fn viewer(b: &Broker) -> Client {
    b.connect_auth(&key("fleet_a", Role::Viewer))
}

fn service(b: &Broker) -> Client {
    b.connect_key(&key("fleet_a", Role::Service))
}

fn with_id(mut msg: Value, id: &str) -> Value {
    msg["id"] = json!(id);
    msg
}

/// Sends a ping and asserts that its pong is the next thing the client hears.
fn assert_nothing_pending(c: &mut Client, ping_id: &str) {
    c.send(json!({"type":"ping","id":ping_id}));
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!(ping_id)),
        "unexpected {m}"
    );
}

/// The next message, which must be a `location_update` of `vehicle`.
fn expect_location(c: &mut Client, vehicle: &str) -> Value {
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["payload"]["vehicle_id"]),
        (&json!("location_update"), &json!(vehicle)),
        "{m}"
    );
    m
}

/// A broker whose frame limit fits batches of 50+ publishes.
fn roomy_broker() -> Broker {
    let mut cfg = config(2);
    cfg.limits.max_message_bytes = 64 * 1024;
    Broker::start(cfg)
}

fn small_location(vehicle: &str, n: usize) -> Value {
    json!({"type":"location_update","id":format!("loc-{n}"),"ack":true,
        "payload":{"vehicle_id":vehicle,"n":n,"location":{"latitude":1.5,"longitude":2.5}}})
}

#[test]
fn batch_of_mixed_publishes_is_delivered_in_order() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    for ch in ["vehicle_locations", "alerts", "telemetry"] {
        v.subscribe(ch, json!({}));
    }
    let mut svc = service(&b);
    let mut second = with_id(alert("a1", "v1", "high"), "b-2");
    second["ack"] = json!(true);
    svc.send(json!({"type":"batch","id":"batch-1","messages":[
        with_id(location("v1", 10.0), "b-1"),
        second,
        {"type":"publish","id":"b-3","channel":"telemetry",
         "payload":{"vehicle_id":"v1","telemetry":{"fuel_level":75.5}}},
    ]}));
    // The one item that asked for an ack gets it; nothing else answers the batch.
    let m = svc.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("ack"), &json!("b-2")),
        "{m}"
    );
    assert_nothing_pending(&mut svc, "p1");

    let got: Vec<(String, String, String)> = (0..3)
        .map(|_| {
            let m = v.recv();
            (
                m["type"].as_str().unwrap().into(),
                m["channel"].as_str().unwrap().into(),
                m["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("location_update", "vehicle_locations", "b-1"),
        ("safety_alert", "alerts", "b-2"),
        ("telemetry_update", "telemetry", "b-3"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    // Nothing more came of the batch: the next event is a later marker.
    svc.send(location("marker", 1.0));
    expect_location(&mut v, "marker");
}

#[test]
fn batch_of_fifty_is_accepted() {
    let b = roomy_broker();
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    let mut svc = service(&b);
    let items: Vec<Value> = (0..50)
        .map(|n| small_location(&format!("v{n}"), n))
        .collect();
    svc.send(json!({"type":"batch","id":"batch-50","messages":items}));
    for n in 0..50 {
        let m = svc.recv();
        assert_eq!(
            (&m["type"], &m["id"]),
            (&json!("ack"), &json!(format!("loc-{n}"))),
            "{m}"
        );
    }
    for n in 0..50 {
        let m = expect_location(&mut v, &format!("v{n}"));
        assert_eq!(m["payload"]["n"], n);
    }
}

#[test]
fn batch_over_fifty_is_refused_whole() {
    let b = roomy_broker();
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    let mut svc = service(&b);
    let items: Vec<Value> = (0..51)
        .map(|n| small_location(&format!("v{n}"), n))
        .collect();
    svc.send(json!({"type":"batch","id":"batch-51","messages":items}));
    let m = svc.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("error"), &json!("batch-51")),
        "{m}"
    );
    assert_eq!(
        (&m["payload"]["code"], &m["payload"]["field"]),
        (&json!(400), &json!("messages")),
        "{m}"
    );
    // No item was handled: no acks follow the error...
    assert_nothing_pending(&mut svc, "p1");
    // ...and nothing was routed: the subscriber's first event is the marker.
    svc.send(location("marker", 1.0));
    expect_location(&mut v, "marker");
    // Nor was any state recorded: a new subscriber's snapshot holds only the marker.
    let mut late = viewer(&b);
    late.subscribe("vehicle_locations", json!({}));
    expect_location(&mut late, "marker");
    svc.send(location("marker2", 1.0));
    expect_location(&mut late, "marker2");
}

#[test]
fn invalid_item_is_refused_alone() {
    let b = Broker::with_shards(2);
    let mut v = viewer(&b);
    v.subscribe("vehicle_locations", json!({}));
    let mut svc = service(&b);
    svc.send(json!({"type":"batch","id":"batch-1","messages":[
        with_id(location("v1", 10.0), "b-1"),
        with_id(location("v2", 91.0), "b-2"),
        with_id(location("v3", 30.0), "b-3"),
    ]}));
    let m = svc.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("error"), &json!("b-2")),
        "{m}"
    );
    assert_eq!(
        (&m["payload"]["code"], &m["payload"]["field"]),
        (&json!(400), &json!("latitude")),
        "{m}"
    );
    assert_nothing_pending(&mut svc, "p1");

    assert_eq!(expect_location(&mut v, "v1")["id"], "b-1");
    assert_eq!(expect_location(&mut v, "v3")["id"], "b-3");
    svc.send(location("marker", 1.0));
    expect_location(&mut v, "marker");
}
