//! Tenant isolation (SPEC §2): no byte of one fleet's data reaches another fleet's
//! connection, even when both fleets use the same vehicle, alert and message ids and share
//! every shard.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message;

const FLEETS: [&str; 2] = ["fleet_a", "fleet_b"];
/// A string that appears in every payload of one fleet and nowhere else.
const MARKERS: [&str; 2] = ["only-in-fleet-a-7f3a", "only-in-fleet-b-9c1d"];
const PER_PUBLISHER: u64 = 200;

/// The next text message as raw text, or None on timeout.
fn next_text(c: &mut Client, timeout: Duration) -> Option<String> {
    c.set_timeout(timeout);
    loop {
        match c.ws.read() {
            Ok(Message::Text(t)) => return Some(t.as_str().to_string()),
            Ok(Message::Close(f)) => panic!("closed: {f:?}"),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Authenticates with an `auth` message; returns the client and its shard.
fn connect_on_shard(b: &Broker, tenant: &str, role: Role) -> (Client, usize) {
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(json!({"type":"auth","id":"auth-1","payload":{"api_key": key(tenant, role)}}));
    let m = c.expect("auth_success");
    assert_eq!(m["payload"]["fleet_id"], tenant);
    let id = m["payload"]["connection_id"].as_str().unwrap();
    let shard = id[1..].split('-').next().unwrap().parse().unwrap();
    (c, shard)
}

fn location_of(fleet: usize, n: u64) -> Value {
    // Same vehicle ids and message ids in both fleets.
    json!({"type":"location_update","id":format!("loc-{n}"),"payload":{"vehicle_id":format!("v{n}"),
        "marker":MARKERS[fleet],"n":n,"location":{"latitude":10.0 + fleet as f64,"longitude":20.0}}})
}

fn alert_of(fleet: usize, n: u64) -> Value {
    json!({"type":"safety_alert","id":format!("alert-{n}"),"payload":{"alert_id":format!("a{n}"),
        "severity":"high","category":"harsh_braking","vehicle_id":format!("v{n}"),"marker":MARKERS[fleet],"n":n}})
}

#[test]
fn concurrent_fleets_never_see_each_other() {
    let b = Broker::with_shards(4);
    // Viewers of both fleets, alternately, until each fleet spans two shards and the fleets
    // share at least one shard (so one shard's index holds both tenants).
    let mut viewers: Vec<(usize, Client)> = Vec::new();
    let mut shards = [BTreeSet::new(), BTreeSet::new()];
    while viewers.len() < 8
        || shards[0].len() < 2
        || shards[1].len() < 2
        || shards[0].is_disjoint(&shards[1])
    {
        assert!(
            viewers.len() < 64,
            "connections do not spread over shards: {shards:?}"
        );
        let fleet = viewers.len() % 2;
        let (mut c, shard) = connect_on_shard(&b, FLEETS[fleet], Role::Viewer);
        c.subscribe("vehicle_locations", json!({}));
        c.subscribe("alerts", json!({}));
        shards[fleet].insert(shard);
        viewers.push((fleet, c));
    }

    let readers: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, (fleet, mut c))| {
            thread::spawn(move || {
                let other = MARKERS[1 - fleet];
                let mut next = [0u64; 2]; // locations, alerts
                let deadline = Instant::now() + Duration::from_secs(30);
                // 200 locations, 200 alerts, then the end marker.
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "viewer {i} ({}) stuck at {next:?}",
                        FLEETS[fleet]
                    );
                    let text = next_text(&mut c, Duration::from_secs(10)).unwrap_or_else(|| {
                        panic!("viewer {i} ({}): silent at {next:?}", FLEETS[fleet])
                    });
                    assert!(
                        !text.contains(other),
                        "viewer {i} of {} got {text}",
                        FLEETS[fleet]
                    );
                    assert!(
                        !text.contains(FLEETS[1 - fleet]),
                        "viewer {i} of {} got {text}",
                        FLEETS[fleet]
                    );
                    let m: Value = serde_json::from_str(&text).unwrap();
                    if m["payload"]["alert_id"] == "end" {
                        break;
                    }
                    assert_eq!(m["payload"]["marker"], MARKERS[fleet], "viewer {i}: {text}");
                    let k = match m["type"].as_str() {
                        Some("location_update") => 0,
                        Some("safety_alert") => 1,
                        _ => panic!("viewer {i}: unexpected {text}"),
                    };
                    assert_eq!(m["payload"]["n"], next[k], "viewer {i}: {text}");
                    next[k] += 1;
                }
                (fleet, next)
            })
        })
        .collect();

    // Per fleet a device publishing locations and a service publishing alerts, all at once.
    let start = Arc::new(Barrier::new(4));
    let mut publishers = Vec::new();
    for (fleet, tenant) in FLEETS.iter().enumerate() {
        for role in [Role::Device, Role::Service] {
            let mut c = b.connect_key(&key(tenant, role));
            let start = start.clone();
            publishers.push(thread::spawn(move || {
                start.wait();
                for n in 0..PER_PUBLISHER {
                    c.send(if role == Role::Device {
                        location_of(fleet, n)
                    } else {
                        alert_of(fleet, n)
                    });
                }
                // Everything before the ping has been handled once the pong arrives.
                c.send(json!({"type":"ping","id":"done"}));
                let m = c.recv();
                assert_eq!(m["type"], "pong", "{role:?} of {tenant}: {m}");
            }));
        }
    }
    for p in publishers {
        p.join().expect("publisher");
    }
    // Every publish of both fleets is accepted; now each fleet's end marker.
    for (fleet, tenant) in FLEETS.iter().enumerate() {
        let mut svc = b.connect_key(&key(tenant, Role::Service));
        let mut end = alert_of(fleet, PER_PUBLISHER);
        end["payload"]["alert_id"] = json!("end");
        end["id"] = json!("end");
        end["ack"] = json!(true);
        svc.send(end);
        assert_eq!(svc.recv()["type"], "ack");
    }
    for r in readers {
        let (fleet, next) = r.join().expect("viewer");
        assert_eq!(next, [PER_PUBLISHER; 2], "{}", FLEETS[fleet]);
    }
}

#[test]
fn publishing_for_another_fleet_is_refused() {
    let b = Broker::with_shards(2);
    let mut viewer_a = b.connect_auth(&key("fleet_a", Role::Viewer));
    let mut viewer_b = b.connect_auth(&key("fleet_b", Role::Viewer));
    for v in [&mut viewer_a, &mut viewer_b] {
        v.subscribe("vehicle_locations", json!({}));
        v.subscribe("alerts", json!({}));
    }
    let mut svc_a = b.connect_key(&key("fleet_a", Role::Service));
    let mut svc_b = b.connect_key(&key("fleet_b", Role::Service));

    let mut cross = location("v1", 1.0);
    cross["id"] = json!("cross-1");
    cross["payload"]["fleet_id"] = json!("fleet_b");
    svc_a.send(cross);
    let mut cross = alert("a1", "v1", "critical");
    cross["id"] = json!("cross-2");
    cross["payload"]["fleet_id"] = json!("fleet_b");
    svc_a.send(cross);
    for id in ["cross-1", "cross-2"] {
        let m = svc_a.recv();
        assert_eq!(
            (&m["type"], &m["id"], &m["payload"]["code"]),
            (&json!("error"), &json!(id), &json!(403)),
            "{m}"
        );
    }
    // Naming its own fleet is fine.
    let mut own = location("v2", 2.0);
    own["payload"]["fleet_id"] = json!("fleet_a");
    svc_a.send(own);
    let m = viewer_a.recv();
    assert_eq!(
        (&m["type"], &m["payload"]["vehicle_id"]),
        (&json!("location_update"), &json!("v2")),
        "{m}"
    );

    // Neither refused publish reached fleet_b (nor fleet_a): their first events are markers
    // published after the refusals.
    svc_b.send(location("b-marker", 3.0));
    svc_b.send(alert("b-alert-marker", "b-marker", "low"));
    let m = viewer_b.recv();
    assert_eq!(m["payload"]["vehicle_id"], "b-marker", "{m}");
    let m = viewer_b.recv();
    assert_eq!(m["payload"]["alert_id"], "b-alert-marker", "{m}");
    svc_a.send(alert("a-alert-marker", "v1", "low"));
    let m = viewer_a.recv();
    assert_eq!(m["payload"]["alert_id"], "a-alert-marker", "{m}");
}
