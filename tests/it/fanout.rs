//! Fan-out across shards: many viewers spread over 4 shards, two publishers, every viewer
//! gets every event exactly once and each publisher's events in order (SPEC §1, §7).

use crate::support::*;
use fleetcast::model::Role;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const VIEWERS: usize = 40;
const PUBLISHERS: usize = 2;
const PER_PUBLISHER: u64 = 200;

/// Connects with an `auth` message; returns the client and the shard its connection id names.
fn viewer_on_shard(b: &Broker) -> (Client, usize) {
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(
        json!({"type":"auth","id":"auth-1","payload":{"api_key": key("fleet_a", Role::Viewer)}}),
    );
    let m = c.expect("auth_success");
    let id = m["payload"]["connection_id"]
        .as_str()
        .expect("connection_id")
        .to_string();
    // "c{shard}-{slot}-{gen}"
    let shard = id
        .strip_prefix('c')
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected connection id {id:?}"));
    (c, shard)
}

fn deliveries_total(b: &Broker) -> u64 {
    let (status, body) = b.get("/metrics");
    assert_eq!(status, 200);
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("fleetcast_deliveries_total"))
        .collect();
    assert!(
        !lines.is_empty(),
        "no fleetcast_deliveries_total in /metrics:\n{body}"
    );
    lines
        .iter()
        .map(|l| {
            l.rsplit(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad line {l:?}"))
        })
        .sum()
}

#[test]
fn every_viewer_gets_every_event_once_in_publisher_order() {
    let b = Broker::with_shards(4);
    let mut shards = BTreeSet::new();
    let mut viewers = Vec::new();
    for _ in 0..VIEWERS {
        let (mut c, shard) = viewer_on_shard(&b);
        shards.insert(shard);
        c.subscribe("vehicle_locations", json!({}));
        viewers.push(c);
    }
    assert!(
        shards.len() >= 2,
        "all {VIEWERS} viewers landed on shards {shards:?}"
    );

    let readers: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                let expected = PUBLISHERS * PER_PUBLISHER as usize;
                let mut next = [0u64; PUBLISHERS];
                let deadline = Instant::now() + Duration::from_secs(30);
                for got in 0..expected {
                    assert!(
                        Instant::now() < deadline,
                        "viewer {i}: only {got} of {expected} events in 30 s"
                    );
                    let m = c.next(Duration::from_secs(10)).unwrap_or_else(|e| {
                        panic!("viewer {i}: {e:?} after {got} of {expected} events")
                    });
                    assert_eq!(m["type"], "location_update", "viewer {i}: {m}");
                    let p = m["payload"]["publisher"].as_u64().unwrap() as usize;
                    let n = m["payload"]["n"].as_u64().unwrap();
                    assert_eq!(n, next[p], "viewer {i}: publisher {p} out of order");
                    assert_eq!(m["payload"]["vehicle_id"], format!("p{p}-v{n}"));
                    next[p] += 1;
                }
                next
            })
        })
        .collect();

    let start = Arc::new(Barrier::new(PUBLISHERS));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let mut c = b.connect_key(&key("fleet_a", Role::Device));
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                for n in 0..PER_PUBLISHER {
                    c.send(json!({"type":"location_update","payload":{
                        "vehicle_id": format!("p{p}-v{n}"), "publisher": p, "n": n,
                        "location":{"latitude": 40.0 + n as f64 / 1000.0, "longitude": -74.0}}}));
                }
                // Keep the connection open until the broker has read everything.
                c.send(json!({"type":"ping","id":"done"}));
                assert_eq!(c.recv()["type"], "pong");
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    for r in readers {
        let next = r.join().expect("viewer");
        assert_eq!(next, [PER_PUBLISHER; PUBLISHERS]);
    }
    // Every viewer has read all 400; the counter is bumped before the bytes are written, so
    // it is final now, and an extra (duplicate) delivery anywhere would show as a surplus.
    let want = (VIEWERS * PUBLISHERS) as u64 * PER_PUBLISHER;
    assert_eq!(deliveries_total(&b), want);
}
