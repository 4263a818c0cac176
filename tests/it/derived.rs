//! Events the broker derives itself: `fleet_metrics` per tenant and `system` status.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn next_derived(c: &mut Client, ty: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let m = c.expect(ty);
        if ty != "fleet_metrics" || m["payload"]["derived"] == true {
            return m;
        }
    }
    panic!("no derived {ty}")
}

#[test]
fn fleet_metrics_are_derived_from_the_live_stream_and_merged() {
    let mut cfg = config(2);
    cfg.history.metrics_interval_ms = 200;
    let b = Broker::start(cfg);
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("fleet_metrics", json!({}));
    let mut other = b.connect_key(&key("fleet_b", Role::Viewer));
    other.subscribe("fleet_metrics", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    for (v, trip, speed) in [("v1", "t1", 30.0), ("v2", "t2", 50.0)] {
        svc.send(
            json!({"type":"location_update","payload":{"vehicle_id":v,"trip_id":trip,
            "location":{"latitude":1.0,"longitude":2.0,"speed":speed}}}),
        );
    }
    for (i, sev) in ["high", "high", "low"].iter().enumerate() {
        svc.send(alert(&format!("al{i}"), "v1", sev));
    }
    svc.send(
        json!({"type":"fleet_metrics","payload":{"fleet_id":"fleet_a",
        "metrics":{"on_time_percentage":94.2,"active_vehicles":999},
        "performance_trends":{"safety_trend":"-0.5%"}}}),
    );
    // The service's own event is delivered as published...
    let published = dash.expect("fleet_metrics");
    assert_eq!(published["payload"]["metrics"]["active_vehicles"], 999);
    // ...and the broker's derived one merges it with what it measured.
    let m = next_derived(&mut dash, "fleet_metrics");
    let p = &m["payload"];
    assert_eq!(m["channel"], "fleet_metrics");
    assert_eq!(p["fleet_id"], "fleet_a");
    assert_eq!(p["metrics"]["active_vehicles"], 2, "{m}");
    assert_eq!(p["metrics"]["average_speed"], 40.0);
    assert_eq!(p["metrics"]["active_trips"], 2);
    assert_eq!(p["metrics"]["on_time_percentage"], 94.2);
    assert_eq!(
        p["alerts_summary"],
        json!({"critical":0,"high":2,"medium":0,"low":1})
    );
    assert_eq!(p["performance_trends"]["safety_trend"], "-0.5%");
    // Another tenant's metrics are its own.
    let m = next_derived(&mut other, "fleet_metrics");
    assert_eq!(m["payload"]["fleet_id"], "fleet_b");
    assert_eq!(m["payload"]["metrics"]["active_vehicles"], 0);
}

#[test]
fn admins_receive_system_status() {
    let mut cfg = config(2);
    cfg.history.metrics_interval_ms = 200;
    let b = Broker::start(cfg);
    let mut admin = b.connect_key(&key("fleet_a", Role::Admin));
    admin.subscribe("system", json!({}));
    let _first = next_derived(&mut admin, "system_status");
    let m = next_derived(&mut admin, "system_status");
    assert_eq!(m["channel"], "system");
    let p = &m["payload"];
    assert!(p["memory_rss_bytes"].as_u64().unwrap() > 1_000_000, "{m}");
    assert!(p["cpu_percent"].as_f64().is_some());
    assert_eq!(p["active_connections"], 1);
    assert_eq!(p["shards"], 2);
    assert!(p["deliveries_per_second"].as_f64().is_some());
    // The dashboard's node panel: connections by dialect, loop load per shard, drops by
    // reason, publish-to-write p99 (null in an interval without publishes).
    assert_eq!(p["connections_by_dialect"]["native"], 1, "{m}");
    assert_eq!(p["connections_by_dialect"]["valtronics"], 0, "{m}");
    let busy = p["shard_busy_percent"].as_array().unwrap();
    assert_eq!(busy.len(), 2, "{m}");
    assert!(
        busy.iter()
            .all(|b| (0.0..=100.0).contains(&b.as_f64().unwrap())),
        "{m}"
    );
    assert_eq!(p["drops_per_second"]["slow_consumer"], 0.0, "{m}");
    assert!(p.get("publish_to_write_p99_ms").is_some(), "{m}");
}
