//! SPEC §8 limits through real sockets, one test per limit: what the client sees, and the
//! breach counted in `/metrics` (`fleetcast_limit_breaches_total{kind}`, summed over shards).
//!
//! Every test starts from `config(n)`, whose rate and connection limits are relaxed, and
//! sets the one limit it tests back to a small value.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

fn breaches(b: &Broker, kind: &str) -> u64 {
    b.metric(
        "fleetcast_limit_breaches_total",
        &format!("kind=\"{kind}\""),
    )
}

/// The HTTP status and JSON body of an upgrade the broker refuses.
fn refused(url: &str) -> (u16, Value) {
    match Client::try_connect(url) {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Ok(_) => panic!("{url}: upgrade accepted, expected a refusal"),
        Err(e) => panic!("{url}: expected an HTTP refusal, got {e}"),
    }
}

fn key_url(b: &Broker, key: &str) -> String {
    b.url(&format!("/v1/streaming/websocket?api_key={key}"))
}

/// Closes a client with a close handshake and waits for the end of the stream.
fn close_client(mut c: Client) {
    let _ = c.ws.close(None);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match c.next(Duration::from_millis(200)) {
            Ok(_) | Err(Ended::Timeout) => continue,
            Err(_) => break,
        }
    }
}

/// Waits until the node has forgotten closed connections: `open` WebSocket connections left.
fn wait_open(b: &Broker, open: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = b.metric("fleetcast_connections_open", "");
        if now == open {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} connections open, waiting for {open}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads replies until one with `id` arrives; returns it.
fn reply_to(c: &mut Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let m = c.recv();
        if m["id"] == id {
            return m;
        }
    }
    panic!("no reply to {id}")
}

/// A raw WebSocket client: a hand-made upgrade with a fixed key, then hand-built masked
/// frames, and a reader for the server's (unmasked) frames.
struct Raw {
    s: TcpStream,
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

impl Raw {
    fn upgrade(b: &Broker, path: &str) -> Raw {
        let mut s = TcpStream::connect(b.addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert!(head.len() < 4096, "response head too long");
            s.read_exact(&mut byte).expect("response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains(WS_ACCEPT), "{head}");
        Raw { s }
    }

    /// A frame header: FIN bit, opcode, mask bit and the announced length; then the mask.
    fn header(fin: bool, opcode: u8, len: u64, mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= u64::from(u16::MAX) {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&len.to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f
    }

    fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = Raw::header(fin, opcode, payload.len() as u64, mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    /// The next server frame: (opcode, payload).
    fn read_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h)?;
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.s.read_exact(&mut l)?;
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.s.read_exact(&mut l)?;
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p)?;
        Ok((h[0] & 0x0f, p))
    }

    /// Sends a ping frame and asserts the pong is the next frame: the connection is open.
    fn assert_alive(&mut self, payload: &[u8]) {
        self.frame(true, OP_PING, payload);
        let (op, p) = self.read_frame().expect("a pong");
        assert_eq!((op, &p[..]), (OP_PONG, payload));
    }

    /// Reads frames until the close frame; returns its code. Panics on a timeout or on the
    /// end of the stream before a close frame.
    fn expect_close(&mut self) -> u16 {
        for _ in 0..100 {
            let (op, p) = self
                .read_frame()
                .unwrap_or_else(|e| panic!("no close frame: {e}"));
            if op == OP_CLOSE {
                assert!(p.len() >= 2, "close frame without a code");
                // The server then ends the TCP connection.
                let mut rest = Vec::new();
                let _ = self.s.read_to_end(&mut rest);
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
        panic!("no close frame in 100 frames")
    }
}

/// A JSON ping of exactly `len` bytes.
fn ping_of_len(id: &str, len: usize) -> String {
    let bare = format!(r#"{{"type":"ping","id":"{id}","pad":""}}"#);
    let pad = "a".repeat(len - bare.len());
    format!(r#"{{"type":"ping","id":"{id}","pad":"{pad}"}}"#)
}

// ---------------------------------------------------------------- inbound frame size

#[test]
fn message_size_single_fragmented_and_announced() {
    let b = Broker::start(config(2));
    let path = format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    );

    // Exactly 1 KiB is fine.
    let mut ok = Raw::upgrade(&b, &path);
    let text = ping_of_len("at-limit", 1024);
    assert_eq!(text.len(), 1024);
    ok.frame(true, OP_TEXT, text.as_bytes());
    let (op, p) = ok.read_frame().unwrap();
    let m: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        (op, &m["type"], &m["id"]),
        (OP_TEXT, &json!("pong"), &json!("at-limit"))
    );

    // One byte more in a single frame: close 1009.
    let mut single = Raw::upgrade(&b, &path);
    single.frame(true, OP_TEXT, ping_of_len("over", 1025).as_bytes());
    assert_eq!(single.expect_close(), 1009);
    assert_eq!(breaches(&b, "message_size"), 1);

    // A fragmented message that passes 1 KiB only with its third fragment: the first two
    // (800 bytes) are fine, with control frames in between; the third closes with 1009.
    let mut frag = Raw::upgrade(&b, &path);
    let body = ping_of_len("frag", 1200);
    let (a, rest) = body.as_bytes().split_at(400);
    let (bb, c) = rest.split_at(400);
    frag.frame(false, OP_TEXT, a);
    frag.assert_alive(b"one");
    frag.frame(false, OP_CONT, bb);
    frag.assert_alive(b"two");
    frag.frame(true, OP_CONT, c);
    assert_eq!(frag.expect_close(), 1009);
    assert_eq!(breaches(&b, "message_size"), 2);

    // A header announcing 2^40 bytes, with no payload at all: refused on the header.
    let mut huge = Raw::upgrade(&b, &path);
    let started = Instant::now();
    huge.s
        .write_all(&Raw::header(true, OP_TEXT, 1 << 40, [1, 2, 3, 4]))
        .unwrap();
    assert_eq!(huge.expect_close(), 1009);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
    assert_eq!(breaches(&b, "message_size"), 3);

    // The connection at the limit is unharmed.
    ok.assert_alive(b"still");
}

// ---------------------------------------------------------------- message rate

/// Sends pings at `per_second` for `count` pings; every one must get its pong.
fn polite_pings(mut c: Client, count: usize, per_second: u64) {
    let step = Duration::from_millis(1000 / per_second);
    for i in 0..count {
        let started = Instant::now();
        let id = format!("polite-{i}");
        c.send(json!({"type":"ping","id":id}));
        let m = c.recv();
        assert_eq!(
            (&m["type"], &m["id"]),
            (&json!("pong"), &json!(id)),
            "a client within its rate was refused: {m}"
        );
        if let Some(rest) = step.checked_sub(started.elapsed()) {
            thread::sleep(rest);
        }
    }
}

#[test]
fn message_rate_429_per_dropped_message_then_1008_on_sustained_abuse() {
    let mut cfg = config(2);
    cfg.limits.messages_per_second = 20;
    cfg.limits.abuse_close_after_ms = 1_000;
    let b = Broker::start(cfg);
    let viewer = key("fleet_a", Role::Viewer);
    let mut abuser = b.connect_key(&viewer);
    // A client within its rate, on a connection of the same user, is never refused.
    let polite = {
        let c = b.connect_key(&viewer);
        thread::spawn(move || polite_pings(c, 15, 10))
    };

    // A burst of 60: the bucket holds one second (20); the rest are refused one by one.
    let started = Instant::now();
    for i in 0..60 {
        abuser.send(json!({"type":"ping","id":format!("b-{i}")}));
    }
    let (mut pongs, mut refused) = (0, 0);
    for i in 0..60 {
        let m = abuser.recv();
        assert_eq!(m["id"], format!("b-{i}"), "replies in order, one each: {m}");
        match m["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(m["payload"]["code"], 429, "{m}");
                refused += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    assert!(pongs >= 20, "only {pongs} of the burst of 20 answered");
    assert!(refused >= 30, "only {refused} of 60 refused at 20/s");

    // Keep abusing (200/s against 20/s): closed with 1008 once it lasted abuse_close_after.
    let mut code = None;
    let mut i = 0;
    let deadline = started + Duration::from_secs(4);
    'abuse: while Instant::now() < deadline {
        if abuser
            .ws
            .send(tungstenite::Message::text(
                json!({"type":"ping","id":format!("s-{i}")}).to_string(),
            ))
            .is_err()
        {
            break;
        }
        i += 1;
        loop {
            match abuser.next(Duration::from_millis(5)) {
                Ok(m) => assert!(
                    m["type"] == "pong" || m["payload"]["code"] == 429,
                    "unexpected {m}"
                ),
                Err(Ended::Timeout) => break,
                Err(Ended::Closed(c)) => {
                    code = c;
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
        "closed after {lasted:?}, before abuse_close_after"
    );
    polite.join().expect("polite client");

    let dropped = breaches(&b, "message_rate");
    assert!(
        dropped >= refused,
        "{dropped} breaches for {refused} refusals"
    );
    assert_eq!(
        b.metric("fleetcast_drops_total", "reason=\"rate_limited\""),
        dropped
    );
    assert_eq!(breaches(&b, "message_rate_abuse"), 1);
}

/// Sends `n` pings back to back; returns how many were refused with 429.
fn burst(c: &mut Client, n: usize) -> usize {
    for i in 0..n {
        c.send(json!({"type":"ping","id":format!("p-{i}")}));
    }
    (0..n)
        .filter(|_| {
            let m = c.recv();
            match m["type"].as_str() {
                Some("pong") => false,
                Some("error") if m["payload"]["code"] == 429 => true,
                _ => panic!("unexpected {m}"),
            }
        })
        .count()
}

#[test]
fn limits_per_role_override_the_defaults() {
    let mut cfg = config(2);
    cfg.limits.messages_per_second = 20;
    cfg.limits.roles.service.messages_per_second = Some(1_000);
    cfg.limits.max_connections_per_user = 1;
    cfg.limits.roles.service.max_connections_per_user = Some(3);
    let b = Broker::start(cfg);

    // Message rate: the viewer has 20/s, the service 1000/s; both authenticated in the
    // handshake and with an auth message.
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    let mut service = b.connect_key(&key("fleet_a", Role::Service));
    let mut service_msg = b.connect_auth(&key("fleet_a", Role::Service));
    assert_eq!(burst(&mut service, 200), 0, "service (query auth) refused");
    assert_eq!(
        burst(&mut service_msg, 200),
        0,
        "service (auth message) refused"
    );
    let dropped = burst(&mut viewer, 200);
    assert!(
        dropped >= 150,
        "viewer: only {dropped} of 200 refused at 20/s"
    );
    assert_eq!(breaches(&b, "message_rate"), dropped as u64);

    // Connections per user: 1 for viewers, 3 for services (2 open already).
    let (status, _) = refused(&key_url(&b, &key("fleet_a", Role::Viewer)));
    assert_eq!(status, 429);
    let third = b.connect_key(&key("fleet_a", Role::Service));
    assert_eq!(refused(&key_url(&b, &key("fleet_a", Role::Service))).0, 429);
    assert_eq!(breaches(&b, "connections_per_user"), 2);
    drop(third);
}

// ---------------------------------------------------------------- connection caps

#[test]
fn connections_per_user() {
    let mut cfg = config(2);
    cfg.limits.max_connections_per_user = 2;
    let b = Broker::start(cfg);
    let viewer = key("fleet_a", Role::Viewer);
    let first = b.connect_key(&viewer);
    let mut second = b.connect_auth(&viewer);

    // Credential in the handshake: refused with HTTP 429 before the upgrade.
    let (status, body) = refused(&key_url(&b, &viewer));
    assert_eq!(status, 429, "{body}");
    assert_eq!(breaches(&b, "connections_per_user"), 1);

    // Credential in the auth message: auth_error 429, then close 1008.
    let mut late = Client::connect(&b.url("/v1/streaming/websocket"));
    late.send(json!({"type":"auth","id":"a-3","payload":{"api_key": viewer}}));
    let m = late.recv();
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["code"]),
        (&json!("auth_error"), &json!("a-3"), &json!(429)),
        "{m}"
    );
    assert_eq!(late.expect_close(), Some(1008));
    assert_eq!(breaches(&b, "connections_per_user"), 2);

    // Another user is not affected, and the two open connections work.
    let other = b.connect_key(&key("fleet_a", Role::Service));
    second.send(json!({"type":"ping","id":"p"}));
    assert_eq!(second.expect("pong")["id"], "p");

    // Once one closes, a new one is admitted.
    close_client(first);
    drop(late);
    wait_open(&b, 2);
    let mut again = b.connect_key(&viewer);
    again.send(json!({"type":"ping","id":"again"}));
    assert_eq!(again.expect("pong")["id"], "again");
    assert_eq!(breaches(&b, "connections_per_user"), 2);
    drop(other);
}

#[test]
fn connections_per_node() {
    let mut cfg = config(2);
    cfg.limits.max_connections = 3;
    let b = Broker::start(cfg);
    let first = b.connect_key(&key("fleet_a", Role::Viewer));
    let _second = b.connect_key(&key("fleet_a", Role::Service));
    // Not yet authenticated: counts all the same.
    let _third = Client::connect(&b.url("/v1/streaming/websocket"));

    let (status, body) = refused(&key_url(&b, &key("fleet_b", Role::Viewer)));
    assert_eq!(status, 503, "{body}");
    let (status, _) = refused(&b.url("/v1/streaming/websocket"));
    assert_eq!(status, 503);
    assert_eq!(breaches(&b, "connections_per_node"), 2);
    // Plain HTTP is still served on a full node.
    assert_eq!(b.get("/healthz").0, 200);

    close_client(first);
    wait_open(&b, 2);
    let mut again = b.connect_key(&key("fleet_b", Role::Viewer));
    again.send(json!({"type":"ping","id":"again"}));
    assert_eq!(again.expect("pong")["id"], "again");
    assert_eq!(breaches(&b, "connections_per_node"), 2);
}

#[test]
fn new_connections_per_minute_per_ip() {
    let mut cfg = config(2);
    cfg.limits.new_connections_per_minute_per_ip = 3;
    let b = Broker::start(cfg);
    // Three from this address, closed again at once: the rate counts new connections.
    for role in [Role::Viewer, Role::Service, Role::Admin] {
        drop(b.connect_key(&key("fleet_a", role)));
    }
    let (status, body) = refused(&key_url(&b, &key("fleet_b", Role::Viewer)));
    assert_eq!(status, 429, "{body}");
    let (status, _) = refused(&b.url("/v1/streaming/websocket"));
    assert_eq!(status, 429);
    assert_eq!(breaches(&b, "new_connections_per_ip"), 2);
    assert_eq!(breaches(&b, "new_connections_per_user"), 0);
}

#[test]
fn new_connections_per_minute_per_user() {
    let mut cfg = config(2);
    cfg.limits.new_connections_per_minute_per_user = 3;
    let b = Broker::start(cfg);
    let viewer = key("fleet_a", Role::Viewer);
    for _ in 0..3 {
        close_client(b.connect_key(&viewer));
    }
    let (status, body) = refused(&key_url(&b, &viewer));
    assert_eq!(status, 429, "{body}");
    // The same user authenticating with a message: auth_error 429 and close.
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(json!({"type":"auth","id":"a","payload":{"api_key": viewer}}));
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["payload"]["code"]),
        (&json!("auth_error"), &json!(429)),
        "{m}"
    );
    assert_eq!(c.expect_close(), Some(1008));
    // Other users of the same address are fine.
    let mut other = b.connect_key(&key("fleet_a", Role::Service));
    other.send(json!({"type":"ping","id":"o"}));
    assert_eq!(other.expect("pong")["id"], "o");
    assert_eq!(breaches(&b, "new_connections_per_user"), 2);
    assert_eq!(breaches(&b, "new_connections_per_ip"), 0);
}

// ---------------------------------------------------------------- per-message limits

#[test]
fn batch_size_breach_is_counted() {
    let b = Broker::start(config(1));
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    let pings = |n: usize| vec![json!({"type":"ping"}); n];
    // Fits the 1 KiB frame limit either way.
    c.send(json!({"type":"batch","id":"b50","messages":pings(50)}));
    for _ in 0..50 {
        assert_eq!(c.recv()["type"], "pong");
    }
    c.send(json!({"type":"batch","id":"b51","messages":pings(51)}));
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["code"]),
        (&json!("error"), &json!("b51"), &json!(400)),
        "{m}"
    );
    c.send(json!({"type":"ping","id":"after"}));
    assert_eq!(c.recv()["id"], "after", "nothing of the batch was handled");
    assert_eq!(breaches(&b, "batch_size"), 1);
}

#[test]
fn location_updates_at_most_one_per_vehicle_per_interval() {
    let mut cfg = config(2);
    cfg.limits.location_update_interval_ms = 1_000;
    let b = Broker::start(cfg);
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    viewer.subscribe("vehicle_locations", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let publish = |svc: &mut Client, vehicle: &str, id: &str| {
        let mut m = location(vehicle, 10.0);
        m["id"] = json!(id);
        m["ack"] = json!(true);
        svc.send(m);
        svc.recv()
    };
    let started = Instant::now();
    let m = publish(&mut svc, "v1", "l1");
    assert_eq!((&m["type"], &m["id"]), (&json!("ack"), &json!("l1")), "{m}");
    let m = publish(&mut svc, "v1", "l2");
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(
        (&m["type"], &m["id"], &m["payload"]["code"]),
        (&json!("error"), &json!("l2"), &json!(429)),
        "{m}"
    );
    let m = publish(&mut svc, "v2", "l3");
    assert_eq!((&m["type"], &m["id"]), (&json!("ack"), &json!("l3")), "{m}");
    thread::sleep(Duration::from_millis(1_100).saturating_sub(started.elapsed()));
    let m = publish(&mut svc, "v1", "l4");
    assert_eq!((&m["type"], &m["id"]), (&json!("ack"), &json!("l4")), "{m}");

    // The refused update was not delivered.
    let got: Vec<Value> = (0..3).map(|_| viewer.recv()["id"].clone()).collect();
    assert_eq!(got, [json!("l1"), json!("l3"), json!("l4")]);
    viewer.expect_silence(Duration::from_millis(100));
    assert_eq!(breaches(&b, "location_rate"), 1);
}

#[test]
fn subscriptions_per_connection() {
    let b = Broker::start(config(1));
    let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
    let ids = |r: std::ops::Range<usize>| r.map(|i| format!("veh-{i:03}")).collect::<Vec<_>>();
    for chunk in 0..4 {
        let id = format!("s{chunk}");
        c.send(json!({"type":"subscribe","id":id,"payload":{"action":"subscribe",
            "channel":"vehicle_locations","filters":{"vehicle_ids":ids(chunk * 64..chunk * 64 + 64)}}}));
        assert_eq!(reply_to(&mut c, &id)["type"], "subscribed");
    }
    // The 257th: refused, whether an entity or a whole channel.
    c.send(
        json!({"type":"subscribe","id":"s257","payload":{"action":"subscribe",
        "channel":"vehicle_locations","filters":{"vehicle_ids":["veh-256"]}}}),
    );
    let m = reply_to(&mut c, "s257");
    assert_eq!(
        (&m["type"], &m["payload"]["code"]),
        (&json!("error"), &json!(400)),
        "{m}"
    );
    c.send(json!({"type":"subscribe","id":"all","payload":{"channel":"alerts"}}));
    assert_eq!(reply_to(&mut c, "all")["payload"]["code"], 400);
    // Subscribing again to what it has adds nothing and is fine.
    c.send(
        json!({"type":"subscribe","id":"same","payload":{"channel":"vehicle_locations",
        "filters":{"vehicle_ids":["veh-000"]}}}),
    );
    assert_eq!(reply_to(&mut c, "same")["type"], "subscribed");
    assert_eq!(breaches(&b, "subscriptions"), 2);

    // What it holds still delivers; freeing one makes room for another.
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    svc.send(location("veh-255", 1.0));
    assert_eq!(c.recv()["payload"]["vehicle_id"], "veh-255");
    c.send(
        json!({"type":"unsubscribe","id":"u","payload":{"channel":"vehicle_locations",
        "filters":{"vehicle_ids":["veh-000"]}}}),
    );
    assert_eq!(reply_to(&mut c, "u")["type"], "unsubscribed");
    c.send(
        json!({"type":"subscribe","id":"s256b","payload":{"channel":"vehicle_locations",
        "filters":{"vehicle_ids":["veh-256"]}}}),
    );
    assert_eq!(reply_to(&mut c, "s256b")["type"], "subscribed");
    svc.send(location("veh-256", 1.0));
    assert_eq!(c.recv()["payload"]["vehicle_id"], "veh-256");
    assert_eq!(breaches(&b, "subscriptions"), 2);
}

#[test]
fn auth_timeout_is_counted() {
    let mut cfg = config(1);
    cfg.limits.auth_timeout_ms = 300;
    let b = Broker::start(cfg);
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    let m = c.next(Duration::from_secs(3)).expect("error 408");
    assert_eq!(
        (&m["type"], &m["payload"]["code"]),
        (&json!("error"), &json!(408))
    );
    assert_eq!(c.expect_close(), Some(1008));
    assert_eq!(breaches(&b, "auth_timeout"), 1);
}

// ---------------------------------------------------------------- handshakes (slowloris)

/// Whether the server has ended the connection: EOF or reset, not a timeout.
fn ended(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn slowloris_handshakes_time_out() {
    let mut cfg = config(2);
    cfg.limits.handshake_timeout_ms = 300;
    let b = Broker::start(cfg);
    let started = Instant::now();
    // Half a request head, then nothing.
    let mut half = TcpStream::connect(b.addr).unwrap();
    half.write_all(b"GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\nUpgra")
        .unwrap();
    // A head trickled one byte every 50 ms: the deadline does not move with the bytes.
    let mut trickle = TcpStream::connect(b.addr).unwrap();
    trickle
        .write_all(b"GET /v1/streaming/websocket HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let limit = Duration::from_secs(3);
    let mut trickle_closed = None;
    while trickle_closed.is_none() && started.elapsed() < limit {
        if trickle.write_all(b"a").is_err() || ended(&mut trickle) {
            trickle_closed = Some(started.elapsed());
        }
    }
    let trickle_closed = trickle_closed.expect("trickling handshake still open after 3 s");
    half.set_read_timeout(Some(
        limit.saturating_sub(started.elapsed()) + Duration::from_millis(10),
    ))
    .unwrap();
    assert!(ended(&mut half), "half handshake still open after 3 s");
    let half_closed = started.elapsed();
    for t in [trickle_closed, half_closed] {
        assert!(
            t >= Duration::from_millis(250),
            "closed after {t:?}, before the timeout"
        );
    }
    // The deadline is checked every quarter of the timeout: ~375 ms, checked generously.
    assert!(
        trickle_closed < Duration::from_millis(1_000),
        "closed only after {trickle_closed:?}"
    );
    // Others were served meanwhile, and are after.
    let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
    c.send(json!({"type":"ping","id":"p"}));
    assert_eq!(c.expect("pong")["id"], "p");
    assert_eq!(breaches(&b, "handshake_timeout"), 2);
    assert_eq!(
        b.metric("fleetcast_handshakes_total", "outcome=\"timeout\""),
        2
    );
}

/// Sends raw bytes (without closing) and returns the status of the response.
fn status_of(b: &Broker, raw: &[u8]) -> u16 {
    let mut s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"))
}

#[test]
fn oversized_handshakes_get_431() {
    let b = Broker::start(config(1));
    // Complete but over 8 KiB.
    let big = format!(
        "GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9_000)
    );
    assert_eq!(status_of(&b, big.as_bytes()), 431);
    // Over 8 KiB and never finished: refused at once, not at the handshake timeout.
    let started = Instant::now();
    let open_ended = format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(9_000));
    assert_eq!(status_of(&b, open_ended.as_bytes()), 431);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Small, but too many header lines.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(status_of(&b, many.as_bytes()), 431);
    assert_eq!(breaches(&b, "handshake_size"), 3);
    assert_eq!(
        b.metric("fleetcast_handshakes_total", "outcome=\"too_large\""),
        3
    );
}

// ---------------------------------------------------------------- connect storm

#[test]
fn connect_storm_does_not_starve_delivery() {
    const SUBSCRIBERS: usize = 10;
    const EVENTS: u64 = 400;
    const STORM: usize = 300;
    let b = Broker::start(config(2));
    let readers: Vec<_> = (0..SUBSCRIBERS)
        .map(|i| {
            let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
            c.subscribe("alerts", json!({}));
            thread::spawn(move || {
                let mut seqs = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(8);
                while seqs.len() < EVENTS as usize && Instant::now() < deadline {
                    match c.next(Duration::from_secs(2)) {
                        Ok(m) if m["type"] == "safety_alert" => {
                            seqs.push(m["seq"].as_u64().expect("seq"));
                        }
                        Ok(m) => panic!("subscriber {i}: unexpected {m}"),
                        Err(e) => panic!("subscriber {i}: {e:?} after {} events", seqs.len()),
                    }
                }
                // Nothing more than what was published.
                c.expect_silence(Duration::from_millis(100));
                seqs
            })
        })
        .collect();

    let addr = b.addr;
    let storm = thread::spawn(move || {
        let started = Instant::now();
        let mut held = Vec::new();
        let mut connected = 0;
        for i in 0..STORM {
            if started.elapsed() > Duration::from_secs(5) {
                break;
            }
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                continue;
            };
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\n");
            }
            connected += 1;
            held.push(s);
            if held.len() >= 50 {
                held.clear();
            }
        }
        connected
    });

    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    for n in 0..EVENTS {
        svc.send(alert(&format!("al-{n}"), "v1", "high"));
        if n % 20 == 19 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    svc.send(json!({"type":"ping","id":"done"}));
    assert_eq!(svc.expect("pong")["id"], "done");
    let stormed = storm.join().expect("storm");
    assert!(stormed >= STORM / 2, "only {stormed} storm connections");
    for (i, r) in readers.into_iter().enumerate() {
        let seqs = r.join().expect("subscriber");
        assert_eq!(seqs.len(), EVENTS as usize, "subscriber {i}");
        let first = seqs[0];
        let want: Vec<u64> = (first..first + EVENTS).collect();
        assert_eq!(seqs, want, "subscriber {i}: gap, duplicate or reorder");
    }
    // The storm reached the broker: every connection was accepted.
    let want = (stormed + SUBSCRIBERS + 1) as u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let accepted = b.metric("fleetcast_connections_accepted_total", "");
        if accepted >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {accepted} of {want} connections accepted"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- memory bounds

#[test]
fn tenants_per_node_and_vehicles_per_tenant_are_bounded() {
    let mut cfg = config(2);
    cfg.limits.max_tenants = 1;
    cfg.limits.max_vehicles_per_tenant = 3;
    let b = Broker::start(cfg);
    let mut dev = b.connect_key(&key("fleet_a", Role::Device));
    // A second tenant does not fit: 503 before the upgrade, or auth_error 503.
    match Client::try_connect(&b.url(&format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_b", Role::Viewer)
    ))) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let mut late = Client::connect(&b.url("/v1/streaming/websocket"));
    late.send(json!({"type":"auth","id":"a","payload":{"api_key": key("fleet_b", Role::Viewer)}}));
    let e = late.expect("auth_error");
    assert_eq!(e["payload"]["code"], 503, "{e}");
    assert_eq!(late.expect_close(), Some(1008));
    // Three vehicles fit; a fourth is refused with 503; known ones still update.
    for (i, v) in ["v1", "v2", "v3"].iter().enumerate() {
        let mut m = location(v, 10.0);
        m["id"] = json!(format!("m{i}"));
        m["ack"] = json!(true);
        dev.send(m);
        assert_eq!(dev.expect("ack")["payload"]["status"], "accepted");
    }
    let mut m = location("v4", 10.0);
    m["id"] = json!("m4");
    dev.send(m);
    let e = dev.expect("error");
    assert_eq!(
        (e["id"].as_str(), e["payload"]["code"].as_u64()),
        (Some("m4"), Some(503))
    );
    let mut m = location("v2", 11.0);
    m["ack"] = json!(true);
    m["id"] = json!("m5");
    dev.send(m);
    assert_eq!(dev.expect("ack")["payload"]["status"], "accepted");
    assert_eq!(
        b.metric("fleetcast_limit_breaches_total", "kind=\"tenants\""),
        2
    );
    assert_eq!(
        b.metric(
            "fleetcast_limit_breaches_total",
            "kind=\"vehicles_per_tenant\""
        ),
        1
    );
}
