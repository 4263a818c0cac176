//! Shard overload (`limits.overload_lag_ms`): a burst fanned out to hundreds of viewers on
//! one shard makes it deliver in batches, keeping only the newest location per vehicle in
//! each batch. What a viewer relies on still holds: every alert exactly once and in order,
//! per vehicle locations only ever newer, and the newest one always arrives. The metrics
//! account for every skipped update.
//!
//! Whether the overload path skips anything depends on timing (see the test), so a burst
//! that skipped nothing is repeated on a fresh node, up to three times.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::thread;
use std::time::{Duration, Instant};

const VIEWERS: usize = 300;
const VEHICLES: u64 = 20;
/// Location updates per vehicle in the burst (counters 0..ROUNDS); the final one is ROUNDS.
const ROUNDS: u64 = 150;
/// One alert after every this many locations of the burst.
const ALERT_EVERY: u64 = 10;
const ALERTS: u64 = ROUNDS * VEHICLES / ALERT_EVERY;
const BATCH: usize = 50;
const WAVE: usize = 200;
const GAP: Duration = Duration::from_millis(10);

fn loc(v: u64, n: u64) -> Value {
    json!({"type":"location_update","payload":{"vehicle_id": format!("veh-{v}"), "v": v,
        "n": n, "location":{"latitude": 40.0 + n as f64 / 1000.0, "longitude": -74.0}}})
}

fn numbered_alert(k: u64) -> Value {
    json!({"type":"safety_alert","payload":{"alert_id": format!("al-{k}"), "severity": "high",
        "category": "harsh_braking", "vehicle_id": format!("veh-{}", k % VEHICLES), "k": k}})
}

/// Sends `items` as batches of at most 50, a wave of `WAVE` items at a time, `GAP` apart:
/// spread over the time the shard takes to write a wave to 300 viewers, so that a batch
/// of an overloaded shard holds several updates of a vehicle.
fn publish(svc: &mut Client, items: &[Value]) {
    for wave in items.chunks(WAVE) {
        for chunk in wave.chunks(BATCH) {
            svc.send(json!({"type":"batch","messages": chunk}));
        }
        thread::sleep(GAP);
    }
}

/// Checks with a ping that the broker read everything the publisher sent and refused
/// nothing (an error would arrive before the pong).
fn sync(svc: &mut Client, ping_id: &str) {
    svc.send(json!({"type":"ping","id": ping_id}));
    let m = svc
        .next(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("publisher: {e:?}"));
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!(ping_id)),
        "publisher: {m}"
    );
}

/// Reads until viewer `i` has every alert and every vehicle's final location, checking
/// each message as it comes; then checks that nothing else is pending. Returns the number
/// of locations it received.
fn read_all(i: usize, mut c: Client) -> u64 {
    let mut last = vec![None::<u64>; VEHICLES as usize];
    let (mut next_alert, mut locations) = (0u64, 0u64);
    let done = |last: &[Option<u64>], next_alert| {
        next_alert == ALERTS && last.iter().all(|n| *n == Some(ROUNDS))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    c.set_timeout(Duration::from_secs(5));
    while !done(&last, next_alert) {
        assert!(
            Instant::now() < deadline,
            "viewer {i}: {next_alert} alerts, last locations {last:?} after 20 s"
        );
        let t = match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => t,
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => continue,
            other => panic!("viewer {i}: {other:?} after {locations} locations"),
        };
        let t = t.as_str();
        if t.starts_with("{\"type\":\"location_update\"") {
            let v = num(t, "\"v\":").unwrap_or_else(|| panic!("viewer {i}: {t}"));
            let n = num(t, "\"n\":").unwrap_or_else(|| panic!("viewer {i}: {t}"));
            let prev = &mut last[v as usize];
            assert!(
                prev.is_none_or(|p| n > p),
                "viewer {i}: vehicle {v} sent {n} after {prev:?} (reordered or repeated)"
            );
            *prev = Some(n);
            locations += 1;
        } else if t.starts_with("{\"type\":\"safety_alert\"") {
            let k = num(t, "\"k\":").unwrap_or_else(|| panic!("viewer {i}: {t}"));
            assert_eq!(
                k, next_alert,
                "viewer {i}: alert lost, repeated or reordered"
            );
            next_alert += 1;
        } else {
            panic!("viewer {i}: unexpected {t}");
        }
    }
    // No surplus (a late duplicate): the answer to a ping is the next message.
    c.expect_nothing_more(&format!("viewer {i}"));
    locations
}

#[test]
fn overloaded_shard_keeps_every_alert_and_the_newest_location() {
    // With a 1 ms limit, 300 viewers and this burst the shard is overloaded and skips
    // superseded locations in nearly every run (this failed in ~40% of runs while a stray
    // writable pass with nothing written could end overload at once; see
    // `judge_overload`). Whether a drained batch holds two updates of one vehicle still
    // depends on timing (CI once saw a burst with none skipped), so a burst that skipped
    // nothing, its guarantees checked all the same, is tried again on a fresh node: the
    // overload path must run in one of three.
    for attempt in 1..=3 {
        if burst_on_a_fresh_node() > 0 {
            return;
        }
        println!("overload: burst {attempt} skipped nothing; again");
    }
    panic!("the overload path did not run in 3 bursts");
}

/// One burst to 300 viewers on a new node with a 1 ms overload limit: checks every
/// guarantee and the accounting, and returns the updates the overload path skipped.
fn burst_on_a_fresh_node() -> u64 {
    let started = Instant::now();
    // config() relaxes the limits (rates, per-vehicle location interval, connection caps).
    let mut cfg = config(1);
    cfg.limits.overload_lag_ms = 1;
    // Room for batches of 50 publishes in one message.
    cfg.limits.max_message_bytes = 64 * 1024;
    let b = Broker::start(cfg);

    let readers: Vec<_> = (0..VIEWERS)
        .map(|i| {
            let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
            c.subscribe("vehicle_locations", json!({}));
            c.subscribe("alerts", json!({}));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || read_all(i, c))
                .unwrap()
        })
        .collect();
    let connected = started.elapsed();

    // The burst: per round one location of every vehicle, an alert after every tenth.
    let mut burst = Vec::new();
    for n in 0..ROUNDS {
        for v in 0..VEHICLES {
            burst.push(loc(v, n));
            if (n * VEHICLES + v + 1).is_multiple_of(ALERT_EVERY) {
                burst.push(numbered_alert((n * VEHICLES + v) / ALERT_EVERY));
            }
        }
    }
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    publish(&mut svc, &burst);
    sync(&mut svc, "burst");
    let finals: Vec<Value> = (0..VEHICLES).map(|v| loc(v, ROUNDS)).collect();
    publish(&mut svc, &finals);
    sync(&mut svc, "finals");

    let received: Vec<u64> = readers
        .into_iter()
        .map(|r| r.join().expect("viewer"))
        .collect();
    let elapsed = started.elapsed();

    // Every viewer has read its final locations, which were published last: every counter
    // below is final (deliveries and drops are counted when an event is queued or skipped,
    // before it is written).
    let viewers = VIEWERS as u64;
    let published = b.metric("fleetcast_publishes_total", "channel=\"vehicle_locations\"");
    assert_eq!(published, VEHICLES * (ROUNDS + 1));
    assert_eq!(
        b.metric("fleetcast_publishes_total", "channel=\"alerts\""),
        ALERTS
    );
    let delivered = b.metric(
        "fleetcast_deliveries_total",
        "channel=\"vehicle_locations\"",
    );
    let overload = b.metric("fleetcast_drops_total", "reason=\"overload\"");
    let conflated = b.metric("fleetcast_drops_total", "reason=\"conflated\"");
    assert_eq!(
        b.metric("fleetcast_drops_total", "reason=\"slow_consumer\""),
        0
    );
    assert_eq!(
        b.metric("fleetcast_limit_breaches_total", "kind=\"slow_consumer\""),
        0
    );
    // Alerts are never skipped: one delivery per alert and viewer.
    assert_eq!(
        b.metric("fleetcast_deliveries_total", "channel=\"alerts\""),
        ALERTS * viewers
    );
    let got: u64 = received.iter().sum();
    // How the counters are defined (src/shard/mod.rs `deliver`, `drain_inbox`):
    // - an update the overloaded shard skips is counted once (one shard), and then reaches
    //   none of the viewers (all subscribe to the whole fleet): `overload * viewers`;
    // - every other update is queued to each viewer and counted as a delivery, also when
    //   it then replaces a pending unwritten value in a viewer's queue (conflation past
    //   the soft bound): the replaced value was counted as delivered but is never written,
    //   and is counted once more as `conflated`. So deliveries count queued, not written:
    //     published * viewers == delivered + overload * viewers
    //     delivered           == received + conflated
    assert_eq!(
        published * viewers,
        delivered + overload * viewers,
        "delivered {delivered}, overload drops {overload}"
    );
    assert_eq!(
        delivered,
        got + conflated,
        "received {got}, conflated {conflated}"
    );
    assert_eq!(published * viewers, got + overload * viewers + conflated);

    println!(
        "overload: {VIEWERS} viewers connected in {connected:?}, all read in {elapsed:?}; \
         {published} locations published, {got} received ({:.1}% of {}), overload drops \
         {overload} (overload path ran: {}), conflated {conflated}",
        100.0 * got as f64 / (published * viewers) as f64,
        published * viewers,
        overload > 0
    );

    // Quiet again, the shard leaves overload (each /metrics request is a loop turn).
    let deadline = Instant::now() + Duration::from_secs(3);
    while b.metric("fleetcast_shard_overloaded", "shard=\"0\"") != 0 {
        assert!(
            Instant::now() < deadline,
            "still overloaded 3 s after the burst"
        );
        thread::sleep(Duration::from_millis(20));
    }
    overload
}
