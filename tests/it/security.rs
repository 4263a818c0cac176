//! Security fixes through real sockets: every reply counts against the outbound bound,
//! snapshot requests and publishes have their own rates, a device names only what its
//! credential covers (failing closed), HTTP publishes are checked like WebSocket ones,
//! dedup is per publisher, HTTP parsing does not echo raw bytes, future timestamps do not
//! freeze state, pre-upgrade connections are capped, and JWT and `/metrics` settings.
//!
//! Breaches are read from `fleetcast_limit_breaches_total{kind}`, summed over shards.

use crate::raw::{OP_CLOSE, OP_PING, OP_TEXT, frame, parse_server_frame, upgrade_request};
use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::config::{ApiKeyConfig, Config};
use fleetcast::model::Role;
use fleetcast::node::Node;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;

// ---------------------------------------------------------------- helpers

pub(crate) fn breaches(b: &Broker, kind: &str) -> u64 {
    b.metric(
        "fleetcast_limit_breaches_total",
        &format!("kind=\"{kind}\""),
    )
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The device key of support.rs bound to vehicle `v1` of fleet_a.
pub(crate) const DEVICE_V1: &str = "key-fleet_a-device-v1-0123456789";

/// Adds an API key to `cfg`.
pub(crate) fn add_key(
    cfg: &mut Config,
    key: &str,
    tenant: &str,
    role: Role,
    vehicles: &[&str],
    drivers: &[&str],
    trips: &[&str],
) {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    cfg.auth.api_keys.push(ApiKeyConfig {
        key: key.into(),
        key_sha256: None,
        user_id: format!("user-{key}"),
        tenant: tenant.into(),
        role,
        vehicles: list(vehicles),
        drivers: list(drivers),
        trips: list(trips),
    });
}

/// `msg` with an `id` and `"ack": true`.
pub(crate) fn acked(mut msg: Value, id: &str) -> Value {
    msg["id"] = json!(id);
    msg["ack"] = json!(true);
    msg
}

/// A location update of `vehicle` without a trip (support's `location` names `trip_1`).
pub(crate) fn bare_location(vehicle: &str, lat: f64) -> Value {
    json!({"type":"location_update","payload":{"vehicle_id":vehicle,
        "location":{"latitude":lat,"longitude":-74.006,"speed":35.2,"heading":245.5}}})
}

pub(crate) fn driver_status(vehicle: Option<&str>, driver: &str) -> Value {
    let mut p = json!({"driver_id":driver,"status":"on_duty"});
    if let Some(v) = vehicle {
        p["vehicle_id"] = json!(v);
    }
    json!({"type":"driver_status","payload":p})
}

pub(crate) fn telemetry(vehicle: &str) -> Value {
    json!({"type":"telemetry_update","payload":{"vehicle_id":vehicle,"fuel_level":50}})
}

pub(crate) fn trip_event(trip: &str, vehicle: Option<&str>, driver: Option<&str>) -> Value {
    let mut p = json!({"trip_id":trip,"event":"trip_started"});
    if let Some(v) = vehicle {
        p["vehicle_id"] = json!(v);
    }
    if let Some(d) = driver {
        p["driver_id"] = json!(d);
    }
    json!({"type":"trip_event","payload":p})
}

/// Reads replies until the one answering `id` (data events and others are skipped).
#[track_caller]
pub(crate) fn reply_to(c: &mut Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let m = c.recv();
        if m["id"] == id && m["channel"].is_null() {
            return m;
        }
    }
    panic!("no reply to {id}")
}

/// Sends `msg` and returns the reply to its id.
#[track_caller]
pub(crate) fn publish(c: &mut Client, msg: Value) -> Value {
    let id = msg["id"].as_str().expect("publish with an id").to_string();
    c.send(msg);
    reply_to(c, &id)
}

#[track_caller]
pub(crate) fn assert_accepted(reply: &Value) {
    assert_eq!(
        (&reply["type"], &reply["payload"]["status"]),
        (&json!("ack"), &json!("accepted")),
        "{reply}"
    );
}

#[track_caller]
pub(crate) fn assert_error(reply: &Value, id: &str, code: u64) {
    assert_eq!(
        (&reply["type"], &reply["id"], &reply["payload"]["code"]),
        (&json!("error"), &json!(id), &json!(code)),
        "{reply}"
    );
}

/// Reads the data events a viewer receives next, up to and including the one with id
/// `last`; returns their ids.
#[track_caller]
pub(crate) fn events_until(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no {last} within 5 s: {got:?}");
        let m = c.recv();
        assert!(m["channel"].is_string(), "not a data event: {m}");
        let id = m["id"].as_str().unwrap_or_default().to_string();
        got.push(id.clone());
        if id == last {
            return got;
        }
    }
}

/// `POST /v1/publish` with a service/device key; returns (status, raw body).
pub(crate) fn post_raw(b: &Broker, key: &str, body: &str) -> (u16, String) {
    b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// `POST /v1/publish`; returns (status, results).
#[track_caller]
pub(crate) fn post(b: &Broker, key: &str, body: &str) -> (u16, Vec<Value>) {
    let (status, text) = post_raw(b, key, body);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text:?}"));
    let results = v["results"].as_array().cloned().unwrap_or_default();
    (status, results)
}

/// A TCP connection from local address `from` to the broker.
pub(crate) fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
    s.connect(&SockAddr::from(to))?;
    Ok(TcpStream::from(s))
}

/// A viewer connected from local address `from`, answering a ping.
pub(crate) fn viewer_from(b: &Broker, from: IpAddr) -> Result<Client, String> {
    let s = tcp_from(from, b.addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let url = b.url(&format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    ));
    let (ws, _) =
        tungstenite::client(url.into_client_request().unwrap(), s).map_err(|e| format!("{e:?}"))?;
    let mut c = Client { ws };
    c.send(json!({"type":"ping","id":"hello"}));
    match c.next(Duration::from_secs(2)) {
        Ok(m) if m["type"] == "pong" => Ok(c),
        other => Err(format!("{other:?}")),
    }
}

/// Whether the broker has ended `s` (EOF or reset), without waiting; data it sent before
/// closing (an HTTP error) is read and skipped.
pub(crate) fn ended_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Opens `n` TCP connections from `from` that send nothing; then watches them for up to
/// `within` or until `expect_closed` were closed, and 200 ms more. Returns the ones still
/// open and how many the broker closed.
pub(crate) fn idle_connections(
    to: SocketAddr,
    from: IpAddr,
    n: usize,
    expect_closed: usize,
    within: Duration,
) -> (Vec<TcpStream>, usize) {
    let mut open: Vec<TcpStream> = (0..n)
        .map(|_| tcp_from(from, to).expect("tcp connect"))
        .collect();
    let started = Instant::now();
    let mut closed = 0;
    loop {
        let before = open.len();
        open.retain_mut(|s| !ended_now(s));
        closed += before - open.len();
        if started.elapsed() >= within || closed >= expect_closed {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    // A moment more: nothing beyond the cap may stay, but nothing else is closed either.
    thread::sleep(Duration::from_millis(200));
    let before = open.len();
    open.retain_mut(|s| !ended_now(s));
    closed += before - open.len();
    for s in &open {
        s.set_nonblocking(false).unwrap();
    }
    (open, closed)
}

/// A viewer from `from` connects within 3 s (the broker noticed closed connections).
#[track_caller]
pub(crate) fn connects_again(b: &Broker, from: IpAddr) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match viewer_from(b, from) {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect again: {e}"),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- a client that never reads

/// How a flooder's stream ended.
#[derive(Debug, PartialEq)]
pub(crate) enum End {
    /// A close frame with this code.
    Close(u16),
    /// EOF or reset without a close frame.
    Dropped,
    /// Nothing more arrived and the connection is still open.
    Quiet,
}

/// A WebSocket client that writes without reading: a small receive buffer and MSS (so
/// the kernel holds ~100 KB, not megabytes) and non-blocking writes of hand-made frames.
pub(crate) struct Flooder {
    s: TcpStream,
    /// Frames read after the upgrade and not yet parsed.
    buf: Vec<u8>,
    /// The start of the first text frame drained (for failure messages).
    first_text: String,
}

impl Flooder {
    pub(crate) fn connect(b: &Broker, api_key: &str) -> Flooder {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.set_tcp_mss(536).unwrap();
        socket.connect(&SockAddr::from(b.addr)).unwrap();
        let mut s = TcpStream::from(socket);
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            upgrade_request(&format!("/v1/streaming/websocket?api_key={api_key}")).as_bytes(),
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert!(head.len() < 4096, "response head too long");
            s.read_exact(&mut byte).expect("upgrade response");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Flooder {
            s,
            buf: Vec::new(),
            first_text: String::new(),
        }
    }

    /// Writes up to `budget` frames made by `make` without reading anything. Stops early
    /// when `closed()` (checked every 20 ms) says the broker closed the connection, or when
    /// a write fails (it dropped it). Returns the frames written completely.
    pub(crate) fn flood(
        &mut self,
        budget: usize,
        make: impl Fn(usize) -> Vec<u8>,
        closed: impl Fn() -> bool,
    ) -> usize {
        self.s.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut next, mut done) = (0, 0);
        let mut pending: Vec<u8> = Vec::new();
        let mut frame_ends: Vec<usize> = Vec::new();
        let mut at = 0;
        let mut checked = Instant::now();
        while Instant::now() < deadline {
            if checked.elapsed() >= Duration::from_millis(20) {
                if closed() {
                    break;
                }
                checked = Instant::now();
            }
            if at == pending.len() {
                done += frame_ends.len();
                pending.clear();
                frame_ends.clear();
                at = 0;
                while next < budget && pending.len() < 32 * 1024 {
                    pending.extend(make(next));
                    frame_ends.push(pending.len());
                    next += 1;
                }
                if pending.is_empty() {
                    break;
                }
            }
            match self.s.write(&pending[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        done + frame_ends.iter().filter(|&&end| end <= at).count()
    }

    /// Reads what the broker sent until its close frame, the end of the stream, or 1.5 s
    /// of silence; returns how it ended and the text frames read before.
    pub(crate) fn drain(&mut self) -> (End, usize) {
        self.s.set_nonblocking(false).unwrap();
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut texts = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        while Instant::now() < deadline {
            while let Some((f, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                match f.opcode {
                    OP_CLOSE => return (End::Close(f.close_code().unwrap_or(0)), texts),
                    OP_TEXT => {
                        if texts == 0 {
                            let t = String::from_utf8_lossy(&f.payload);
                            self.first_text = format!("{} bytes: {:.200}", t.len(), t);
                        }
                        texts += 1;
                    }
                    _ => {}
                }
            }
            self.s
                .set_read_timeout(Some(Duration::from_millis(1_500)))
                .unwrap();
            match self.s.read(&mut chunk) {
                Ok(0) => return (End::Dropped, texts),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return (End::Quiet, texts);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return (End::Dropped, texts),
            }
        }
        (End::Quiet, texts)
    }

    /// Floods until the broker counts a slow consumer (the only one on `b` at the time:
    /// the caller makes sure), then reads what it was sent and expects its close 1013.
    #[track_caller]
    pub(crate) fn expect_slow_consumer_close(
        &mut self,
        b: &Broker,
        what: &str,
        budget: usize,
        make: impl Fn(usize) -> Vec<u8>,
    ) {
        let before = breaches(b, "slow_consumer");
        let closed = || breaches(b, "slow_consumer") > before;
        let started = Instant::now();
        let sent = self.flood(budget, make, closed);
        // The broker may still be working through input it has not read yet: the
        // connection is a slow consumer only once the replies overflow what the kernel
        // takes, which a reader would prevent.
        let deadline = started + Duration::from_secs(10);
        while !closed() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let counted = started.elapsed();
        let (end, texts) = self.drain();
        assert_eq!(
            end,
            End::Close(1013),
            "{what}: {sent} of {budget} frames written, slow consumer counted after \
             {counted:?} ({}), {texts} text frames read, after {:?}; the first: {}",
            closed(),
            started.elapsed(),
            self.first_text
        );
    }
}

// Flood sizes. The replies must overflow the broker's outbound bound after the kernel
// took what it could: the flooder's receive buffer is 4 KiB, but the broker's send buffer
// grows up to `net.ipv4.tcp_wmem` max (4 MiB), and with TCP metrics cached for loopback
// from earlier connections (reordering, cwnd) it does so at once. So each flood brings
// about 8 MB of replies.

/// Snapshot requests of ~100 KB replies.
pub(crate) const REQUESTS: usize = 80;
/// WebSocket pings of 125 bytes (pongs of 127).
pub(crate) const WS_PINGS: usize = 64_000;
/// JSON pings (pongs of ~117 bytes).
pub(crate) const JSON_PINGS: usize = 70_000;

pub(crate) fn request_frame(i: usize) -> Vec<u8> {
    frame(
        OP_TEXT,
        format!(
            r#"{{"type":"subscribe","id":"r{i}","payload":{{"action":"request","channel":"vehicle_locations"}}}}"#
        )
        .as_bytes(),
    )
}

pub(crate) fn ws_ping_frame(_: usize) -> Vec<u8> {
    frame(OP_PING, &[b'p'; 125])
}

pub(crate) fn json_ping_frame(i: usize) -> Vec<u8> {
    frame(
        OP_TEXT,
        format!(r#"{{"type":"ping","id":"p{i}"}}"#).as_bytes(),
    )
}

/// Publishes the location of `n` vehicles (`veh-000`...) with a padded payload, so that a
/// snapshot of `vehicle_locations` is about `n` x 520 bytes (under half of a 256 KiB
/// bound: larger ones are refused with 413, not queued).
pub(crate) fn publish_fleet_state(b: &Broker, n: usize) {
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let pad = "x".repeat(300);
    for v in 0..n {
        svc.send(json!({"type":"location_update","payload":{
            "vehicle_id": format!("veh-{v:03}"), "pad": pad,
            "location":{"latitude": 40.0, "longitude": -74.0}}}));
    }
    svc.send(json!({"type":"ping","id":"state-done"}));
    assert_eq!(reply_to(&mut svc, "state-done")["type"], "pong");
}

/// Config with small outbound bounds and no request rate to speak of.
pub(crate) fn flood_config(max_outbound: usize) -> Config {
    let mut cfg = config(2);
    cfg.limits.max_outbound_bytes = max_outbound;
    cfg.limits.soft_outbound_bytes = max_outbound / 4;
    cfg.limits.requests_per_second = 1_000_000;
    cfg
}

/// A healthy viewer of fleet_a's alerts, with one alert already published to it.
pub(crate) fn healthy_viewer(b: &Broker) -> (Client, Client) {
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    viewer.subscribe("alerts", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    assert_accepted(&publish(&mut svc, acked(alert("h-1", "v1", "high"), "h-1")));
    (viewer, svc)
}

/// After the flood: one more alert, and the viewer received both, nothing else.
#[track_caller]
pub(crate) fn healthy_viewer_still_served(viewer: &mut Client, svc: &mut Client) {
    assert_accepted(&publish(svc, acked(alert("h-2", "v1", "high"), "h-2")));
    assert_eq!(events_until(viewer, "h-2"), ["h-1", "h-2"]);
    viewer.expect_nothing_more("healthy viewer");
}

// ---------------------------------------------------------------- 1. replies are bounded

#[test]
pub(crate) fn snapshot_replies_to_a_client_that_never_reads_close_1013() {
    let b = Broker::start(flood_config(256 * 1024));
    publish_fleet_state(&b, 200);
    let (mut viewer, mut svc) = healthy_viewer(&b);
    let before = breaches(&b, "slow_consumer");
    // The request is answered with a snapshot (~100 KB, under half the bound), not 413.
    let mut reader = b.connect_key(&key("fleet_a", Role::Viewer));
    let r = burst_replies(&mut reader, &[request_msg("r", "vehicle_locations")]);
    assert_eq!(r[0]["type"], "snapshot", "{:.300}", r[0].to_string());
    assert_eq!(r[0]["payload"]["items"].as_array().unwrap().len(), 200);
    let mut f = Flooder::connect(&b, &key("fleet_a", Role::Viewer));
    f.expect_slow_consumer_close(&b, "request flood", REQUESTS, request_frame);
    assert_eq!(breaches(&b, "slow_consumer"), before + 1);
    healthy_viewer_still_served(&mut viewer, &mut svc);
}

#[test]
pub(crate) fn pongs_to_a_client_that_never_reads_close_1013() {
    let b = Broker::start(flood_config(64 * 1024));
    let (mut viewer, mut svc) = healthy_viewer(&b);
    let mut f = Flooder::connect(&b, &key("fleet_a", Role::Viewer));
    f.expect_slow_consumer_close(&b, "WebSocket ping flood", WS_PINGS, ws_ping_frame);
    assert_eq!(breaches(&b, "slow_consumer"), 1);
    healthy_viewer_still_served(&mut viewer, &mut svc);
}

#[test]
pub(crate) fn json_pongs_to_a_client_that_never_reads_close_1013() {
    let b = Broker::start(flood_config(64 * 1024));
    let (mut viewer, mut svc) = healthy_viewer(&b);
    let mut f = Flooder::connect(&b, &key("fleet_a", Role::Viewer));
    f.expect_slow_consumer_close(&b, "JSON ping flood", JSON_PINGS, json_ping_frame);
    assert_eq!(breaches(&b, "slow_consumer"), 1);
    healthy_viewer_still_served(&mut viewer, &mut svc);
}

// ---------------------------------------------------------------- 2. request rate

pub(crate) fn request_msg(id: &str, channel: &str) -> Value {
    json!({"type":"subscribe","id":id,"payload":{"action":"request","channel":channel}})
}

pub(crate) fn since_msg(id: &str) -> Value {
    json!({"type":"subscribe","id":id,"payload":{"action":"subscribe","channel":"alerts",
        "since":{"epoch":1,"seq":0}}})
}

/// Sends every message at once, then returns the replies in order.
pub(crate) fn burst_replies(c: &mut Client, msgs: &[Value]) -> Vec<Value> {
    for m in msgs {
        c.send(m.clone());
    }
    msgs.iter()
        .map(|m| reply_to(c, m["id"].as_str().unwrap()))
        .collect()
}

#[test]
pub(crate) fn snapshot_requests_and_since_replays_are_rate_limited() {
    let mut cfg = config(1);
    cfg.limits.requests_per_second = 5;
    let b = Broker::start(cfg);

    // Six requests back to back: five snapshots, the sixth refused with its id.
    let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
    let msgs: Vec<Value> = (1..=6)
        .map(|i| request_msg(&format!("r{i}"), "vehicle_locations"))
        .collect();
    let replies = burst_replies(&mut c, &msgs);
    for r in &replies[..5] {
        assert_eq!(r["type"], "snapshot", "{r}");
    }
    assert_error(&replies[5], "r6", 429);
    assert_eq!(breaches(&b, "request_rate"), 1);
    // The connection is usable, and a second later the bucket has refilled.
    c.send(json!({"type":"ping","id":"p"}));
    assert_eq!(reply_to(&mut c, "p")["type"], "pong");
    thread::sleep(Duration::from_millis(1_100));
    let r = burst_replies(&mut c, &[request_msg("r7", "vehicle_locations")]);
    assert_eq!(r[0]["type"], "snapshot", "{}", r[0]);

    // `subscribe` with `since` draws from the same bucket, both ways round.
    thread::sleep(Duration::from_millis(1_100));
    let mut c2 = b.connect_key(&key("fleet_a", Role::Viewer));
    let mut msgs: Vec<Value> = (1..=5).map(|i| since_msg(&format!("s{i}"))).collect();
    msgs.push(request_msg("r8", "vehicle_locations"));
    let replies = burst_replies(&mut c2, &msgs);
    for r in &replies[..5] {
        assert_eq!(r["type"], "subscribed", "{r}");
    }
    assert_error(&replies[5], "r8", 429);
    assert_eq!(breaches(&b, "request_rate"), 2);

    thread::sleep(Duration::from_millis(1_100));
    let mut c3 = b.connect_key(&key("fleet_a", Role::Viewer));
    let mut msgs: Vec<Value> = (1..=5)
        .map(|i| request_msg(&format!("q{i}"), "driver_status"))
        .collect();
    msgs.push(since_msg("s6"));
    let replies = burst_replies(&mut c3, &msgs);
    for r in &replies[..5] {
        assert_eq!(r["type"], "snapshot", "{r}");
    }
    assert_error(&replies[5], "s6", 429);
    assert_eq!(breaches(&b, "request_rate"), 3);
}

// ---------------------------------------------------------------- 3, 4. device scope

/// A viewer of the whole tenant's state channels.
pub(crate) fn state_watcher(b: &Broker) -> Client {
    let mut w = b.connect_key(&key("fleet_a", Role::Viewer));
    for ch in ["driver_status", "vehicle_locations", "telemetry"] {
        w.subscribe(ch, json!({}));
    }
    w
}

/// The entity ids (`field` of each item's payload) of a `request` snapshot of `channel`.
pub(crate) fn snapshot_ids(c: &mut Client, channel: &str, field: &str) -> Vec<String> {
    let id = format!("req-{channel}");
    c.send(request_msg(&id, channel));
    let r = reply_to(c, &id);
    assert_eq!(r["type"], "snapshot", "{r}");
    let mut ids: Vec<String> = r["payload"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {r}"))
        .iter()
        .map(|i| i["payload"][field].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
pub(crate) fn device_scope_covers_drivers_trips_and_device_ids() {
    let mut cfg = config(2);
    add_key(
        &mut cfg,
        "dev-d3-key-0123456789",
        "fleet_a",
        Role::Device,
        &["v1"],
        &["d3"],
        &[],
    );
    let b = Broker::start(cfg);
    let mut victim = b.connect_key(&key("fleet_a", Role::Viewer));
    victim.subscribe("driver_status", json!({"driver_id":["d_victim"]}));
    let mut watch = state_watcher(&b);
    let mut dev = b.connect_key(DEVICE_V1);

    // Another driver, an unbound trip, another device id: each 403 with its id.
    let refused = [
        (
            "d1",
            json!({"type":"driver_status","id":"d1","payload":{"vehicle_id":"v1","driver_id":"d_victim","status":"on_duty"}}),
        ),
        ("d2", acked(driver_status(None, "d_victim"), "d2")),
        ("l1", {
            let mut m = acked(bare_location("v1", 10.0), "l1");
            m["payload"]["trip_id"] = json!("t8");
            m
        }),
        ("l2", {
            let mut m = acked(bare_location("v1", 10.0), "l2");
            m["payload"]["device_id"] = json!("v2");
            m
        }),
        ("tm1", {
            let mut m = acked(telemetry("v1"), "tm1");
            m["payload"]["device_id"] = json!("v2");
            m
        }),
        (
            "tm2",
            json!({"type":"telemetry_update","id":"tm2","ack":true,"payload":{"device_id":"v2"}}),
        ),
    ];
    for (id, m) in refused {
        assert_error(&publish(&mut dev, m), id, 403);
    }
    // Over HTTP too.
    let mut m = acked(bare_location("v1", 10.0), "h1");
    m["payload"]["trip_id"] = json!("t8");
    let (status, r) = post(&b, DEVICE_V1, &m.to_string());
    assert_eq!(status, 202, "{r:?}");
    assert_eq!(
        (&r[0]["status"], &r[0]["error"]["code"]),
        (&json!("rejected"), &json!(403)),
        "{r:?}"
    );
    victim.expect_nothing_more("victim's viewer");
    watch.expect_nothing_more("watcher");
    assert!(snapshot_ids(&mut watch, "driver_status", "driver_id").is_empty());
    let (_, body) = b.http(&format!(
        "GET /v1/fleets/fleet_a/vehicles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        key("fleet_a", Role::Viewer)
    ));
    assert!(!body.contains("d_victim") && !body.contains("t8"), "{body}");

    // A service binds trip t9 and driver d7 to v1: the device may name them now.
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    assert_accepted(&publish(
        &mut svc,
        acked(trip_event("t9", Some("v1"), Some("d7")), "bind"),
    ));
    let mut m = acked(bare_location("v1", 11.0), "l3");
    m["payload"]["trip_id"] = json!("t9");
    assert_accepted(&publish(&mut dev, m));
    assert_accepted(&publish(
        &mut dev,
        acked(driver_status(Some("v1"), "d7"), "d7s"),
    ));
    // But still not another trip or driver.
    let mut m = acked(bare_location("v1", 12.0), "l4");
    m["payload"]["trip_id"] = json!("t8");
    assert_error(&publish(&mut dev, m), "l4", 403);
    assert_error(
        &publish(&mut dev, acked(driver_status(Some("v1"), "d_victim"), "d4")),
        "d4",
        403,
    );

    // A key listing driver d3 may publish for d3, and still not for the victim.
    let mut dev3 = b.connect_key("dev-d3-key-0123456789");
    assert_accepted(&publish(
        &mut dev3,
        acked(driver_status(Some("v1"), "d3"), "d3s"),
    ));
    assert_error(
        &publish(
            &mut dev3,
            acked(driver_status(Some("v1"), "d_victim"), "d5"),
        ),
        "d5",
        403,
    );

    let mut got = events_until(&mut watch, "d3s");
    got.sort();
    assert_eq!(got, ["d3s", "d7s", "l3"]);
    watch.expect_nothing_more("watcher");
    victim.expect_nothing_more("victim's viewer");
    assert_eq!(
        snapshot_ids(&mut watch, "driver_status", "driver_id"),
        ["d3", "d7"]
    );
}

#[test]
pub(crate) fn device_credentials_fail_closed() {
    let mut cfg = config(1);
    add_key(
        &mut cfg,
        "dev-none-key-0123456789",
        "fleet_a",
        Role::Device,
        &[],
        &[],
        &[],
    );
    add_key(
        &mut cfg,
        "dev-star-key-0123456789",
        "fleet_a",
        Role::Device,
        &["*"],
        &[],
        &[],
    );
    let b = Broker::start(cfg);
    let mut watch = state_watcher(&b);

    // No vehicles listed: no vehicle at all, over WebSocket and HTTP.
    let mut none = b.connect_key("dev-none-key-0123456789");
    assert_error(
        &publish(&mut none, acked(bare_location("v1", 1.0), "n1")),
        "n1",
        403,
    );
    assert_error(&publish(&mut none, acked(telemetry("v7"), "n2")), "n2", 403);
    assert_error(
        &publish(&mut none, acked(driver_status(None, "dx"), "n3")),
        "n3",
        403,
    );
    let (_, r) = post(
        &b,
        "dev-none-key-0123456789",
        &acked(bare_location("v1", 1.0), "n4").to_string(),
    );
    assert_eq!(r[0]["error"]["code"], 403, "{r:?}");

    // A device JWT without a vehicle claim: none either.
    let exp = unix_now() + 3_600;
    let token = mint_hs256(SECRET, "dev-jwt", "fleet_a", Role::Device, exp, None).unwrap();
    let mut jwt = Client::connect(&b.url(&format!("/v1/streaming/websocket?token={token}")));
    assert_error(
        &publish(&mut jwt, acked(bare_location("v1", 1.0), "j1")),
        "j1",
        403,
    );
    // One naming v1: v1 only.
    let token = mint_hs256(
        SECRET,
        "dev-jwt-v1",
        "fleet_a",
        Role::Device,
        exp,
        Some("v1"),
    )
    .unwrap();
    let mut jwt1 = Client::connect(&b.url(&format!("/v1/streaming/websocket?token={token}")));
    assert_accepted(&publish(&mut jwt1, acked(bare_location("v1", 2.0), "j2")));
    assert_error(
        &publish(&mut jwt1, acked(bare_location("v2", 2.0), "j3")),
        "j3",
        403,
    );

    // `*`: any vehicle of its own tenant.
    let mut star = b.connect_key("dev-star-key-0123456789");
    assert_accepted(&publish(&mut star, acked(bare_location("v5", 3.0), "s1")));
    assert_accepted(&publish(&mut star, acked(telemetry("v6"), "s2")));
    let mut other_tenant = acked(bare_location("v5", 3.0), "s3");
    other_tenant["payload"]["fleet_id"] = json!("fleet_b");
    assert_error(&publish(&mut star, other_tenant), "s3", 403);

    let got = events_until(&mut watch, "s2");
    assert_eq!(got, ["j2", "s1", "s2"]);
    watch.expect_nothing_more("watcher");
}

// ---------------------------------------------------------------- 5, 6. HTTP publishes

#[track_caller]
pub(crate) fn assert_result(r: &Value, index: usize, id: Value, status: &str, code: Option<u64>) {
    assert_eq!(r["index"], index, "{r}");
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["status"], status, "{r}");
    if let Some(code) = code {
        assert_eq!(r["error"]["code"], code, "{r}");
    }
}

#[test]
pub(crate) fn http_nested_batches_are_refused_per_item() {
    let b = Broker::start(config(1));
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    let svc = key("fleet_a", Role::Service);
    let nested = json!({"type":"batch","id":"nested","messages":[
        acked(alert("LEAK-1", "v1", "high"), "LEAK-1"),
        acked(alert("LEAK-2", "v1", "high"), "LEAK-2")]});
    let body = json!({"messages":[
        acked(alert("ok-1", "v1", "high"), "ok-1"),
        nested,
        alert("ok-noid", "v1", "low"),
        acked(alert("ok-2", "v1", "high"), "ok-2")]});
    let (status, r) = post(&b, &svc, &body.to_string());
    assert_eq!(status, 202, "{r:?}");
    assert_eq!(r.len(), 4, "{r:?}");
    assert_result(&r[0], 0, json!("ok-1"), "accepted", None);
    assert_result(&r[1], 1, json!("nested"), "rejected", Some(400));
    assert_result(&r[2], 2, Value::Null, "accepted", None);
    assert_result(&r[3], 3, json!("ok-2"), "accepted", None);

    // NDJSON: the same.
    let nd = format!(
        "{}\n{}\n",
        nested_line("nested-2"),
        alert("ok-3", "v1", "low")
    );
    let (status, r) = post(&b, &svc, &nd);
    assert_eq!(status, 202, "{r:?}");
    assert_eq!(r.len(), 2, "{r:?}");
    assert_result(&r[0], 0, json!("nested-2"), "rejected", Some(400));
    assert_result(&r[1], 1, Value::Null, "accepted", None);

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(dash.expect("safety_alert")["payload"]["alert_id"].clone());
    }
    assert_eq!(
        got,
        [
            json!("ok-1"),
            json!("ok-noid"),
            json!("ok-2"),
            json!("ok-3")
        ]
    );
    dash.expect_nothing_more("dashboard");
}

pub(crate) fn nested_line(id: &str) -> Value {
    json!({"type":"batch","id":id,"messages":[acked(alert("LEAK-3", "v1", "high"), "LEAK-3")]})
}

#[test]
pub(crate) fn http_and_websocket_publishes_share_one_bucket_per_user() {
    const RATE: u64 = 10;
    let mut cfg = config(1);
    cfg.limits.roles.service.publishes_per_second = Some(RATE as u32);
    let b = Broker::start(cfg);
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("trip_events", json!({}));
    let svc_key = key("fleet_a", Role::Service);
    // Authenticated in the upgrade request, and with an `auth` message.
    let mut ws = b.connect_key(&svc_key);
    let mut ws_auth = b.connect_auth(&svc_key);

    let started = Instant::now();
    let mut accepted: Vec<String> = Vec::new();
    let mut rejected = 0u64;
    for req in 0..5 {
        let ids: Vec<String> = (0..10).map(|i| format!("te-{req}-{i}")).collect();
        let items: Vec<Value> = ids
            .iter()
            .map(|id| acked(trip_event(&format!("trip-{id}"), None, None), id))
            .collect();
        let (status, r) = post(&b, &svc_key, &json!({ "messages": items }).to_string());
        assert_eq!(status, 202, "{r:?}");
        assert_eq!(r.len(), 10, "request {req}: {r:?}");
        for (i, res) in r.iter().enumerate() {
            assert_eq!(
                (&res["index"], &res["id"]),
                (&json!(i), &json!(ids[i])),
                "{res}"
            );
            match res["status"].as_str() {
                Some("accepted") => accepted.push(ids[i].clone()),
                Some("rejected") => {
                    assert_eq!(res["error"]["code"], 429, "{res}");
                    rejected += 1;
                }
                _ => panic!("unexpected {res}"),
            }
        }
        if req == 0 {
            assert_eq!(
                accepted.len(),
                10,
                "the first request fits the burst: {r:?}"
            );
        }
    }
    let http_accepted = accepted.len();
    // The same user's WebSocket publishes draw from the same bucket.
    let mut ws_refused = Vec::new();
    for (how, c) in [("upgrade", &mut ws), ("auth message", &mut ws_auth)] {
        let ws_msgs: Vec<Value> = (0..5)
            .map(|i| {
                let id = format!("ws-{}-{i}", how.len());
                acked(trip_event(&format!("trip-{id}"), None, None), &id)
            })
            .collect();
        let mut refused = 0;
        for r in burst_replies(c, &ws_msgs) {
            match r["type"].as_str() {
                Some("ack") => {
                    assert_eq!(r["payload"]["status"], "accepted", "{r}");
                    accepted.push(r["id"].as_str().unwrap().to_string());
                }
                Some("error") => {
                    assert_eq!(r["payload"]["code"], 429, "{r}");
                    refused += 1;
                    rejected += 1;
                }
                _ => panic!("unexpected {r}"),
            }
        }
        ws_refused.push((how, refused));
    }
    let ws_refused_total: usize = ws_refused.iter().map(|(_, n)| n).sum();
    let elapsed = started.elapsed();
    let refill = (elapsed.as_secs_f64() * RATE as f64).ceil() as usize;
    assert!(
        accepted.len() >= RATE as usize && accepted.len() <= RATE as usize + refill,
        "{} accepted ({http_accepted} over HTTP; WebSocket refusals {ws_refused:?}) in \
         {elapsed:?} at {RATE}/s",
        accepted.len()
    );
    assert!(
        ws_refused_total >= 10 - refill.min(10),
        "WebSocket publishes refused {ws_refused:?} after {elapsed:?}"
    );
    assert_eq!(accepted.len() as u64 + rejected, 60);
    assert_eq!(breaches(&b, "publish_rate"), rejected);
    // Exactly the accepted ones were delivered, in order.
    let last = accepted.last().unwrap().clone();
    assert_eq!(events_until(&mut dash, &last), accepted);
    dash.expect_nothing_more("dashboard");
}

#[test]
pub(crate) fn http_items_over_the_message_size_are_413() {
    let b = Broker::start(config(1));
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    dash.subscribe("vehicle_locations", json!({}));
    let svc = key("fleet_a", Role::Service);
    let mut big = acked(bare_location("v1", 1.0), "big-1");
    big["payload"]["extra"] = json!("x".repeat(60_000));
    let body = json!({"messages":[
        acked(alert("s-1", "v1", "low"), "s-1"), big, acked(alert("s-2", "v1", "low"), "s-2")]})
    .to_string();
    assert!(body.len() < 64 * 1024);
    let (status, r) = post(&b, &svc, &body);
    assert_eq!(status, 202, "{r:?}");
    assert_eq!(r.len(), 3, "{r:?}");
    assert_result(&r[0], 0, json!("s-1"), "accepted", None);
    assert_result(&r[1], 1, json!("big-1"), "rejected", Some(413));
    assert_result(&r[2], 2, json!("s-2"), "accepted", None);
    assert_eq!(breaches(&b, "message_size"), 1);

    // NDJSON, and just over the limit.
    let mut big = acked(bare_location("v2", 1.0), "big-2");
    big["payload"]["extra"] = json!("");
    let pad = 1025 - big.to_string().len();
    big["payload"]["extra"] = json!("x".repeat(pad));
    assert_eq!(big.to_string().len(), 1025);
    let nd = format!("{big}\n{}\n", acked(alert("s-3", "v1", "low"), "s-3"));
    let (status, r) = post(&b, &svc, &nd);
    assert_eq!(status, 202, "{r:?}");
    assert_result(&r[0], 0, json!("big-2"), "rejected", Some(413));
    assert_result(&r[1], 1, json!("s-3"), "accepted", None);
    assert_eq!(breaches(&b, "message_size"), 2);

    assert_eq!(events_until(&mut dash, "s-3"), ["s-1", "s-2", "s-3"]);
    dash.expect_nothing_more("dashboard");
}

// ---------------------------------------------------------------- 7. dedup

#[test]
pub(crate) fn dedup_is_per_publisher_and_channel() {
    let b = Broker::start(config(2));
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    dash.subscribe("telemetry", json!({}));
    let mut dev = b.connect_key(DEVICE_V1);
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));

    let ack = publish(&mut dev, acked(telemetry("v1"), "alert-77"));
    assert_accepted(&ack);
    assert_eq!(dash.expect("telemetry_update")["id"], "alert-77");
    // Another publisher, another channel, the same id: a new event.
    let ack = publish(
        &mut svc,
        acked(alert("al-77", "v1", "critical"), "alert-77"),
    );
    assert_accepted(&ack);
    let ev = dash.expect("safety_alert");
    assert_eq!(
        (&ev["id"], &ev["payload"]["alert_id"]),
        (&json!("alert-77"), &json!("al-77"))
    );
    // Another publisher on the same channel: new too.
    let ack = publish(&mut svc, acked(telemetry("v1"), "alert-77"));
    assert_accepted(&ack);
    assert_eq!(dash.expect("telemetry_update")["id"], "alert-77");
    // The same publisher, channel and id: duplicates, over WebSocket and HTTP.
    for (c, m) in [
        (&mut dev, acked(telemetry("v1"), "alert-77")),
        (
            &mut svc,
            acked(alert("al-77", "v1", "critical"), "alert-77"),
        ),
    ] {
        let ack = publish(c, m);
        assert_eq!(
            (&ack["type"], &ack["payload"]["status"]),
            (&json!("ack"), &json!("duplicate")),
            "{ack}"
        );
    }
    let (_, r) = post(
        &b,
        &key("fleet_a", Role::Service),
        &acked(alert("al-77", "v1", "critical"), "alert-77").to_string(),
    );
    assert_eq!(r[0]["status"], "duplicate", "{r:?}");
    dash.expect_nothing_more("dashboard");
}

// ---------------------------------------------------------------- 8. HTTP parsing

#[test]
pub(crate) fn duplicate_content_length_is_400() {
    let b = Broker::start(config(1));
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    let body = acked(alert("cl", "v1", "high"), "cl").to_string();
    let svc = key("fleet_a", Role::Service);
    for (first, second) in [
        (body.len(), body.len() + 5),
        (body.len() + 5, body.len()),
        (body.len(), body.len()),
    ] {
        let (status, text) = b.http(&format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {svc}\r\n\
             Content-Length: {first}\r\nContent-Length: {second}\r\n\r\n{body}xxxxx"
        ));
        assert_eq!(status, 400, "Content-Length {first} and {second}: {text}");
    }
    dash.expect_nothing_more("dashboard");
}

#[test]
pub(crate) fn http_results_never_echo_raw_ids() {
    let b = Broker::start(config(1));
    let svc = key("fleet_a", Role::Service);
    let lines = [
        r#"{"id":"x\"},{\"evil\":1","type":"bogus"}"#,
        r#"{"id":"y\"}]},{\"evil\":2","type":"safety_alert","payload":"#,
        r#"{"type":"bogus","id":"w\"}]}"#,
        r#"{"id":"z\\","type":"bogus"}"#,
        r#"{"id":"\u0022,\"evil\":3,\"x\":\"","type":"bogus"}"#,
        r#"{"id":123abc,"type":"bogus"}"#,
        r#"{"id":"a\u0000b","type":"bogus"}"#,
        r#"{"id":"},{"evil":4},{","type":"bogus"}"#,
    ];
    let check = |what: &str, status: u16, text: &str, lines: &[&str]| {
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{what}: response is not JSON ({e}): {text}"));
        let Some(results) = v["results"].as_array() else {
            // A body of one line may be refused as a whole.
            assert!(
                lines.len() == 1 && status == 400 && v["error"]["code"] == 400,
                "{what}: no results: {status} {text}"
            );
            return;
        };
        assert_eq!(status, 202, "{what}: {text}");
        assert_eq!(results.len(), lines.len(), "{what}: {text}");
        for (i, (r, line)) in results.iter().zip(lines).enumerate() {
            let sent_id = serde_json::from_str::<Value>(line)
                .ok()
                .map(|v| v["id"].clone());
            assert!(
                r["id"].is_null() || Some(&r["id"]) == sent_id.as_ref(),
                "{what} line {i}: id {} for {line}",
                r["id"]
            );
            assert_eq!(
                (&r["index"], &r["status"]),
                (&json!(i), &json!("rejected")),
                "{r}"
            );
            let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
            assert!(
                keys.iter()
                    .all(|k| ["index", "id", "status", "channel", "seq", "error"]
                        .contains(&k.as_str())),
                "{what} line {i}: {r}"
            );
        }
    };
    let nd: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (status, text) = post_raw(&b, &svc, &nd);
    assert_eq!(status, 202, "{text}");
    check("NDJSON", status, &text, &lines);
    // One per request, and wrapped.
    for (i, line) in lines.iter().enumerate() {
        let (status, text) = post_raw(&b, &svc, line);
        check(&format!("line {i} alone"), status, &text, &[line]);
    }
    let wrapped = format!("{{\"messages\":[{}]}}", lines[0]);
    let (status, text) = post_raw(&b, &svc, &wrapped);
    check("wrapped", status, &text, &lines[..1]);
}

// ---------------------------------------------------------------- 9. future timestamps

#[test]
pub(crate) fn future_timestamps_are_refused_and_do_not_freeze_state() {
    let b = Broker::start(config(2));
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("vehicle_locations", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    assert_accepted(&publish(
        &mut svc,
        acked(bare_location("v1", 10.0), "now-1"),
    ));
    let mut fut = acked(bare_location("v1", 50.0), "fut");
    fut["timestamp"] = json!("2099-01-01T00:00:00Z");
    let e = publish(&mut svc, fut.clone());
    assert_error(&e, "fut", 400);
    assert_eq!(e["payload"]["field"], "timestamp", "{e}");
    assert_eq!(breaches(&b, "future_timestamp"), 1);
    // From a device, and over HTTP.
    let mut dev = b.connect_key(DEVICE_V1);
    let e = publish(&mut dev, fut.clone());
    assert_error(&e, "fut", 400);
    assert_eq!(e["payload"]["field"], "timestamp", "{e}");
    let (_, r) = post(&b, &key("fleet_a", Role::Service), &fut.to_string());
    assert_eq!(
        (&r[0]["status"], &r[0]["error"]["code"]),
        (&json!("rejected"), &json!(400)),
        "{r:?}"
    );
    assert_eq!(breaches(&b, "future_timestamp"), 3);

    assert_accepted(&publish(
        &mut svc,
        acked(bare_location("v1", 20.0), "now-2"),
    ));
    assert_eq!(events_until(&mut dash, "now-2"), ["now-1", "now-2"]);
    dash.expect_nothing_more("dashboard");
    let mut late = b.connect_key(&key("fleet_a", Role::Viewer));
    late.subscribe("vehicle_locations", json!({"vehicle_id":"v1"}));
    let snap = late.expect("location_update");
    assert_eq!(
        (&snap["id"], &snap["payload"]["location"]["latitude"]),
        (&json!("now-2"), &json!(20.0)),
        "{snap}"
    );
    late.expect_nothing_more("late subscriber");
}

// ---------------------------------------------------------------- 10. pre-upgrade connections

pub(crate) const HOSTILE_IP: [u8; 4] = [127, 0, 0, 2];

#[test]
pub(crate) fn pending_connections_are_capped_per_ip() {
    let mut cfg = config(2);
    cfg.limits.max_pending_connections_per_ip = 20;
    cfg.limits.handshake_timeout_ms = 10_000;
    let b = Broker::start(cfg);
    let hostile = IpAddr::from(HOSTILE_IP);
    let started = Instant::now();
    let (held, closed) = idle_connections(b.addr, hostile, 40, 20, Duration::from_secs(2));
    assert!(
        held.len() <= 20 && closed >= 20,
        "{} held, {closed} closed after {:?}",
        held.len(),
        started.elapsed()
    );
    // Others are served meanwhile.
    let mut c = viewer_from(&b, IpAddr::from([127, 0, 0, 1])).expect("a client from elsewhere");
    c.send(json!({"type":"ping","id":"p"}));
    assert_eq!(reply_to(&mut c, "p")["type"], "pong");
    assert_eq!(breaches(&b, "pending_connections_per_ip"), closed as u64);
    assert_eq!(breaches(&b, "pending_connections"), 0);
    // Once they are gone, the address can connect again.
    drop(held);
    connects_again(&b, hostile);
}

#[test]
pub(crate) fn pending_connections_are_capped_per_node() {
    let mut cfg = config(2);
    cfg.limits.max_pending_connections = 10;
    cfg.limits.handshake_timeout_ms = 10_000;
    let b = Broker::start(cfg);
    let hostile = IpAddr::from([127, 0, 0, 3]);
    let (held, closed) = idle_connections(b.addr, hostile, 20, 10, Duration::from_secs(2));
    assert!(
        held.len() <= 10 && closed >= 10,
        "{} held, {closed} closed",
        held.len()
    );
    drop(held);
    // Let the broker see them close first: a connect racing their release would be
    // refused (and counted), and reading /metrics needs a connection too.
    thread::sleep(Duration::from_millis(500));
    connects_again(&b, IpAddr::from([127, 0, 0, 1]));
    assert_eq!(breaches(&b, "pending_connections"), closed as u64);
}

// ---------------------------------------------------------------- 11. JWT and /metrics

#[test]
pub(crate) fn short_hs256_secret_fails_config_validation() {
    let mut cfg = config(1);
    cfg.auth.jwt_hs256_secret = Some("x".repeat(31));
    assert!(cfg.validate().is_err(), "31-byte secret accepted");
    cfg.auth.jwt_hs256_secret = Some("x".repeat(32));
    cfg.validate().expect("32-byte secret");
    let toml = "[auth]\njwt_hs256_secret = \"0123456789012345678901234567890\"\n";
    assert!(
        Config::from_toml(toml).is_err(),
        "31-byte secret in TOML accepted"
    );
}

#[test]
pub(crate) fn short_hs256_secret_fails_node_start() {
    let mut cfg = config(1);
    cfg.auth.jwt_hs256_secret = Some("short-secret".into());
    let started = Node::start(cfg);
    assert!(
        started.is_err(),
        "Node::start accepted a 12-byte HS256 secret"
    );
}

/// An HS256 token with exactly these claims.
pub(crate) fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn upgrade_status(b: &Broker, token: &str) -> u16 {
    match Client::try_connect(&b.url(&format!("/v1/streaming/websocket?token={token}"))) {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("upgrade: {e}"),
    }
}

#[test]
pub(crate) fn tokens_without_exp_are_refused_when_required() {
    let no_exp = token(json!({"sub":"noexp","tenant":"fleet_a","role":"viewer"}));
    let with_exp = token(json!({"sub":"exp","tenant":"fleet_a","role":"viewer",
        "exp": unix_now() + 3_600}));
    // Not required: both are fine (the token is otherwise valid).
    let b = Broker::start(config(1));
    assert_eq!(upgrade_status(&b, &no_exp), 101);
    drop(b);

    let mut cfg = config(1);
    cfg.auth.require_exp = true;
    let b = Broker::start(cfg);
    assert_eq!(upgrade_status(&b, &no_exp), 401);
    assert_eq!(upgrade_status(&b, &with_exp), 101);
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(json!({"type":"auth","id":"a1","payload":{"token":no_exp}}));
    let e = c.expect("auth_error");
    assert_eq!(e["payload"]["code"], 401, "{e}");
    // Over HTTP too.
    let (status, body) = b.http(&format!(
        "GET /v1/fleets/fleet_a/vehicles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {no_exp}\r\n\r\n"
    ));
    assert_eq!(status, 401, "{body}");
}

#[test]
pub(crate) fn metrics_token_guards_metrics() {
    const TOKEN: &str = "m-token-0123456789abcdef";
    let mut cfg = config(1);
    cfg.server.metrics_token = Some(TOKEN.into());
    let b = Broker::start(cfg);
    assert_eq!(b.get("/metrics").0, 401);
    let get = |auth: &str| {
        b.http(&format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n"
        ))
    };
    assert_eq!(get("Bearer m-token-0123456789abcdeX").0, 401);
    assert_eq!(
        get(&format!("Bearer {}", key("fleet_a", Role::Admin))).0,
        401
    );
    let (status, body) = get(&format!("Bearer {TOKEN}"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("fleetcast_connections_accepted_total"),
        "{body}"
    );
    // Health checks stay open.
    assert_eq!(b.get("/healthz").0, 200);
}

// ---------------------------------------------------------------- all of it at once

/// As [`events_until`], with the patience of a loaded run.
pub(crate) fn events_until_long(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no {last} within 20 s: {got:?}");
        let m = c
            .next(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("waiting for {last}: {e:?} after {got:?}"));
        assert!(m["channel"].is_string(), "not a data event: {m}");
        let id = m["id"].as_str().unwrap_or_default().to_string();
        got.push(id.clone());
        if id == last {
            return got;
        }
    }
}
