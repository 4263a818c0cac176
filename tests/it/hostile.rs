//! Bad input (SPEC §8, issue 3): every kind of hostile client gets its specified `error`
//! reply or close code, and no other connection notices. The last test runs hostile
//! clients of every kind beside well-behaved ones and checks that the well-behaved ones
//! receive exactly what was published to them.

use crate::raw::{self, *};
use crate::security::*;
use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---------------------------------------------------------------- helpers

fn key_path(tenant: &str, role: Role) -> String {
    format!("/v1/streaming/websocket?api_key={}", key(tenant, role))
}

/// A raw client upgraded with `role`'s key of `tenant` in the query string.
fn raw_as(b: &Broker, tenant: &str, role: Role) -> Raw {
    Raw::connect(b.addr, &key_path(tenant, role))
}

/// Asserts that `m` is an `error` answering `id` with `code`, naming `field` when given.
#[track_caller]
fn assert_error(m: &Value, id: Value, code: u64, field: Option<&str>) {
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["id"], id, "{m}");
    assert_eq!(m["payload"]["code"], code, "{m}");
    assert!(
        m["payload"]["message"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "error without a message: {m}"
    );
    if let Some(f) = field {
        assert_eq!(m["payload"]["field"], f, "{m}");
    }
}

/// Sends `text` and returns the next message.
fn ask(c: &mut Client, text: &str) -> Value {
    c.send_text(text);
    c.recv()
}

/// The connection still works: a JSON ping is answered next, by its pong.
#[track_caller]
fn assert_usable(c: &mut Client, id: &str) {
    c.send(json!({"type":"ping","id":id}));
    let m = c.recv();
    assert_eq!(m["type"], "pong", "{m}");
    assert_eq!(m["id"], id, "{m}");
}

/// Sum of the samples of metric `name` whose labels contain `label`.
fn metric_sum(b: &Broker, name: &str, label: &str) -> u64 {
    let (status, body) = b.get("/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bad metric line {l:?}")) as u64
        })
        .sum()
}

/// Waits (up to 5 s) until the node counts exactly `want` open native connections.
#[track_caller]
fn wait_native_open(b: &Broker, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = metric_sum(b, "fleetcast_connections_open", "dialect=\"native\"");
        if open == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} native connections open, expected {want}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn assert_healthy(b: &Broker) {
    assert_eq!(b.get("/healthz"), (200, "ok\n".into()));
    let (status, body) = b.get("/readyz");
    assert_eq!(status, 200, "{body}");
}

fn alert_msg(id: &str, extra: Value) -> Value {
    let mut m = alert(&format!("a-{id}"), "v1", "high");
    m["id"] = json!(id);
    m["ack"] = json!(true);
    if let (Some(p), Some(e)) = (m["payload"].as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    m
}

/// Well-behaved clients of both fleets watching the channels hostile clients aim at.
/// [`Bystanders::check`] proves that nothing reached them since the last check and that
/// they still work.
struct Bystanders {
    viewer_a: Client,
    viewer_b: Client,
    service_a: Client,
    service_b: Client,
    checks: u32,
}

impl Bystanders {
    fn new(b: &Broker) -> Bystanders {
        let mut viewer_a = b.connect_key(&key("fleet_a", Role::Viewer));
        let mut viewer_b = b.connect_key(&key("fleet_b", Role::Viewer));
        for v in [&mut viewer_a, &mut viewer_b] {
            for channel in ["alerts", "vehicle_locations", "trip_events", "telemetry"] {
                v.subscribe(channel, json!({}));
            }
        }
        Bystanders {
            viewer_a,
            viewer_b,
            service_a: b.connect_key(&key("fleet_a", Role::Service)),
            service_b: b.connect_key(&key("fleet_b", Role::Service)),
            checks: 0,
        }
    }

    /// Each fleet's viewer receives nothing but a fresh alert of its own fleet.
    fn check(&mut self) {
        self.check_after(&[]);
    }

    /// As [`Bystanders::check`], after fleet_a's viewer received events `before_a`.
    fn check_after(&mut self, before_a: &[&str]) {
        self.checks += 1;
        let n = self.checks;
        for (fleet, service, viewer, before) in [
            ("a", &mut self.service_a, &mut self.viewer_a, before_a),
            ("b", &mut self.service_b, &mut self.viewer_b, &[][..]),
        ] {
            let id = format!("bystander-{fleet}-{n}");
            service.send(alert_msg(&id, json!({})));
            let ack = service.recv();
            assert_eq!(
                (&ack["type"], &ack["id"]),
                (&json!("ack"), &json!(id)),
                "{ack}"
            );
            for want in before.iter().copied().chain([id.as_str()]) {
                let ev = viewer.recv();
                assert_eq!(ev["id"], want, "fleet_{fleet} bystander got {ev}");
            }
        }
    }
}

// ---------------------------------------------------------------- per kind

#[test]
fn malformed_json_is_400_and_the_connection_stays_open() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    // Before authentication too: the decoder runs first.
    let mut anon = Client::connect(&b.url("/v1/streaming/websocket"));
    let malformed = [
        "",
        " ",
        "{",
        "}",
        r#"{"type":"ping""#,
        r#"{"type":"ping",}"#,
        r#"{'type':'ping'}"#,
        r#"{"type":"ping" "id":"x"}"#,
        r#"{"type":"ping","id":"x"} trailing"#,
        r#"{"type":"ping","id":"x"}{}"#,
        r#"{"type":"\ud800"#,
        "not json",
        "NaN",
        "{\"type\":\"ping\",\"id\":\"a\u{0}b\"}",
    ];
    for text in malformed {
        for client in [&mut c, &mut anon] {
            let m = ask(client, text);
            assert_error(&m, Value::Null, 400, None);
        }
    }
    // Valid JSON that is not an object.
    for text in ["[1,2]", "42", "\"ping\"", "null", "true", "[]"] {
        let m = ask(&mut c, text);
        assert_error(&m, Value::Null, 400, None);
    }
    assert_usable(&mut c, "after-malformed");
    assert_usable(&mut anon, "anon-after-malformed");
    // The anonymous connection can still authenticate.
    anon.send(json!({"type":"auth","id":"a1","payload":{"api_key":key("fleet_a", Role::Viewer)}}));
    assert_eq!(anon.recv()["type"], "auth_success");
    by.check();
    assert_healthy(&b);
}

#[test]
fn wrong_types_are_400_naming_the_field() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    let loc = |location: Value| {
        json!({"type":"location_update","id":"w","payload":{"vehicle_id":"v1","location":location}})
            .to_string()
    };
    let cases: Vec<(String, Value, &str)> = vec![
        (r#"{"type":5,"id":"w1"}"#.into(), json!("w1"), "type"),
        (r#"{"type":null,"id":"w1b"}"#.into(), json!("w1b"), "type"),
        (r#"{"type":["ping"],"id":"w1c"}"#.into(), json!("w1c"), "type"),
        (
            r#"{"type":"location_update","id":"w2","payload":"x"}"#.into(),
            json!("w2"),
            "payload",
        ),
        (
            r#"{"type":"safety_alert","id":"w2b","payload":[1]}"#.into(),
            json!("w2b"),
            "payload",
        ),
        (
            loc(json!({"latitude":"1","longitude":2})),
            json!("w"),
            "latitude",
        ),
        (
            loc(json!({"latitude":1,"longitude":true})),
            json!("w"),
            "longitude",
        ),
        (loc(json!({"latitude":1,"longitude":null})), json!("w"), "longitude"),
        (loc(json!("here")), json!("w"), "location"),
        (
            loc(json!({"latitude":1,"longitude":2,"speed":"fast"})),
            json!("w"),
            "location",
        ),
        (
            r#"{"type":"location_update","id":"w6","payload":{"vehicle_id":{},"location":{"latitude":1,"longitude":2}}}"#.into(),
            json!("w6"),
            "vehicle_id",
        ),
        (
            r#"{"type":"location_update","id":"w6b","payload":{"vehicle_id":"","location":{"latitude":1,"longitude":2}}}"#.into(),
            json!("w6b"),
            "vehicle_id",
        ),
        (
            r#"{"type":"subscribe","id":"w7","payload":{"channel":7}}"#.into(),
            json!("w7"),
            "channel",
        ),
        (
            r#"{"type":"subscribe","id":"w8","payload":{"channel":"alerts","filters":[1]}}"#.into(),
            json!("w8"),
            "filters",
        ),
        (
            r#"{"type":"subscribe","id":"w9","payload":{"channel":"alerts","filters":{"severity":[1]}}}"#.into(),
            json!("w9"),
            "severity",
        ),
        (
            r#"{"type":"subscribe","id":"w9b","payload":{"action":5,"channel":"alerts"}}"#.into(),
            json!("w9b"),
            "action",
        ),
        (
            r#"{"type":"safety_alert","id":"w10","payload":{"alert_id":"a","severity":3,"category":"x"}}"#.into(),
            json!("w10"),
            "severity",
        ),
        (
            r#"{"type":"safety_alert","id":"w10b","payload":{"alert_id":"a","severity":"extreme","category":"x"}}"#.into(),
            json!("w10b"),
            "severity",
        ),
        (
            r#"{"type":"trip_event","id":11,"payload":{"trip_id":"t","event":5}}"#.into(),
            json!(11),
            "event",
        ),
        (
            r#"{"type":"batch","id":"w12","messages":"x"}"#.into(),
            json!("w12"),
            "messages",
        ),
        (
            r#"{"type":"location_update","id":"w13","timestamp":5,"payload":{"vehicle_id":"v1","location":{"latitude":1,"longitude":2}}}"#.into(),
            json!("w13"),
            "timestamp",
        ),
        (
            r#"{"type":"auth","id":"w14","payload":{"api_key":5}}"#.into(),
            json!("w14"),
            "api_key",
        ),
    ];
    for (text, id, field) in &cases {
        let m = ask(&mut c, text);
        assert_error(&m, id.clone(), 400, Some(field));
    }
    assert_usable(&mut c, "after-wrong-types");
    // Nothing of it was routed.
    by.check();
    assert_healthy(&b);
}

#[test]
fn huge_numbers_get_a_reply_and_harm_nothing() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    // A latitude that is infinite, or not representable at all, is never valid.
    for lat in ["1e400", "-1e400", "123456789012345678901234567890"] {
        let text = format!(
            r#"{{"type":"location_update","id":"h1","ack":true,"payload":{{"vehicle_id":"v1","location":{{"latitude":{lat},"longitude":2}}}}}}"#
        );
        let m = ask(&mut c, &text);
        assert_eq!(m["type"], "error", "{text}: {m}");
        assert_eq!(m["payload"]["code"], 400, "{text}: {m}");
    }
    // Elsewhere the broker may accept or refuse a huge number, but it answers.
    let digits = "9".repeat(700);
    let maybe = [
        r#"{"type":"telemetry_update","id":"h2","ack":true,"payload":{"vehicle_id":"v1","telemetry":{"speed":1e400}}}"#.to_string(),
        r#"{"type":"telemetry_update","id":"h3","ack":true,"payload":{"vehicle_id":"v1","odometer":123456789012345678901234567890}}"#.into(),
        r#"{"type":"telemetry_update","id":"h4","ack":true,"payload":{"vehicle_id":123456789012345678901234567890}}"#.into(),
        r#"{"type":"telemetry_update","id":"h5","ack":true,"payload":{"vehicle_id":"v1","tiny":-1e-400}}"#.into(),
        format!(r#"{{"type":"telemetry_update","id":"h6","ack":true,"payload":{{"vehicle_id":"v1","n":{digits}}}}}"#),
        format!(r#"{{"type":"telemetry_update","id":"h7","ack":true,"payload":{{"vehicle_id":"v1","n":0.{digits}e-99999999999}}}}"#),
    ];
    let mut accepted = Vec::new();
    for text in &maybe {
        let m = ask(&mut c, text);
        match m["type"].as_str() {
            Some("ack") => accepted.push(m["id"].as_str().unwrap().to_string()),
            Some("error") => assert_eq!(m["payload"]["code"], 400, "{text}: {m}"),
            _ => panic!("{text}: unexpected reply {m}"),
        }
    }
    // Huge ids: echoed or refused, never a crash.
    for id in ["123456789012345678901234567890", "1e400", "-0.0e-400"] {
        let m = ask(&mut c, &format!(r#"{{"type":"ping","id":{id}}}"#));
        assert!(
            m["type"] == "pong" || (m["type"] == "error" && m["payload"]["code"] == 400),
            "id {id}: {m}"
        );
    }
    assert_usable(&mut c, "after-huge-numbers");
    // Accepted telemetry reached the fleet's telemetry subscribers, in order; nothing else.
    let accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
    by.check_after(&accepted);
    assert_healthy(&b);
}

#[test]
fn deep_nesting_is_400() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    let arrays = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let telemetry = |id: &str, x: String| {
        format!(
            r#"{{"type":"telemetry_update","id":"{id}","ack":true,"payload":{{"vehicle_id":"v1","x":{x}}}}}"#
        )
    };
    let cases = [
        (arrays(500), Value::Null),
        (
            format!(r#"{{"type":{},"id":"d2"}}"#, arrays(480)),
            json!("d2"),
        ),
        (
            format!("{}1{}", r#"{"":"#.repeat(200), "}".repeat(200)),
            Value::Null,
        ),
        (
            format!(
                r#"{{"type":"safety_alert","id":"d4","payload":{{"alert_id":{},"severity":"high","category":"x"}}}}"#,
                arrays(400)
            ),
            json!("d4"),
        ),
        (
            format!(
                r#"{{"type":"location_update","id":"d5","payload":{{"vehicle_id":"v1","location":{}}}}}"#,
                arrays(450)
            ),
            json!("d5"),
        ),
        // Where the broker does not look: it would be forwarded to every subscriber.
        (telemetry("d6", arrays(440)), json!("d6")),
        // One level over the limit (the message is level 1, its payload level 2).
        (telemetry("d7", arrays(31)), json!("d7")),
        (
            telemetry(
                "d8",
                format!(r#"{}"deep"{}"#, "{\"a\":".repeat(31), "}".repeat(31)),
            ),
            json!("d8"),
        ),
    ];
    for (text, id) in &cases {
        assert!(text.len() <= 1024, "within the 1 KiB message limit");
        let m = ask(&mut c, text);
        assert_error(&m, id.clone(), 400, None);
    }
    // At the limit: accepted, and subscribers can parse it.
    let m = ask(&mut c, &telemetry("d9", arrays(30)));
    assert_eq!((&m["type"], &m["id"]), (&json!("ack"), &json!("d9")), "{m}");
    assert_usable(&mut c, "after-deep-nesting");
    by.check_after(&["d9"]);
    assert_healthy(&b);
}

#[test]
fn invalid_utf8_text_closes_1007() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let single: [&[u8]; 6] = [
        b"{\"type\":\"ping\",\"id\":\"\xff\"}",
        b"{\"type\":\"ping\",\"id\":\"\xc0\xaf\"}", // overlong '/'
        b"{\"type\":\"ping\",\"id\":\"\xed\xa0\x80\"}", // UTF-16 surrogate
        b"{\"type\":\"ping\",\"id\":\"\xf4\x90\x80\x80\"}", // above U+10FFFF
        b"{\"type\":\"ping\",\"id\":\"ok\"}\xe2\x82", // truncated at the end
        b"\xfe\xff",
    ];
    for payload in single {
        let mut r = raw_as(&b, "fleet_a", Role::Service);
        r.send(OP_TEXT, payload);
        assert_eq!(r.expect_close(), 1007, "{payload:02x?}");
    }
    // Split across fragments: each fragment may end inside a character, but the whole
    // message must be valid.
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    r.send_raw(&frame_bytes(
        false,
        0,
        OP_TEXT,
        b"{\"type\":\"ping\",\"id\":\"h\xc3",
        true,
    ))
    .unwrap();
    r.send_raw(&frame_bytes(true, 0, OP_CONT, b"\xa9\"}", true))
        .unwrap();
    let m = r.next_json();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("h\u{e9}")),
        "{m}"
    );
    r.send_raw(&frame_bytes(
        false,
        0,
        OP_TEXT,
        b"{\"type\":\"ping\",\"id\":\"h\xc3",
        true,
    ))
    .unwrap();
    r.send_raw(&frame_bytes(true, 0, OP_CONT, b"\x28\"}", true))
        .unwrap();
    assert_eq!(r.expect_close(), 1007);
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, b"{\"type\":", true))
        .unwrap();
    r.send_raw(&frame_bytes(false, 0, OP_CONT, b"\"\xff", true))
        .unwrap();
    r.send_raw(&frame_bytes(true, 0, OP_CONT, b"\"}", true))
        .unwrap();
    assert_eq!(r.expect_close(), 1007);
    // A close reason must be UTF-8 too.
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    r.send(OP_CLOSE, &close_payload(1000, b"bye \xff"));
    assert_eq!(r.expect_close(), 1007);
    by.check();
    assert_healthy(&b);
}

#[test]
fn binary_frames_close_1003() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    // A valid publish, but in a binary frame: refused and not routed.
    let publish = alert_msg("bin-1", json!({})).to_string();
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    r.send(OP_BINARY, publish.as_bytes());
    assert_eq!(r.expect_close(), 1003);
    // Fragmented binary.
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    r.send_raw(&frame_bytes(
        false,
        0,
        OP_BINARY,
        &publish.as_bytes()[..10],
        true,
    ))
    .unwrap();
    r.send_raw(&frame_bytes(
        true,
        0,
        OP_CONT,
        &publish.as_bytes()[10..],
        true,
    ))
    .unwrap();
    assert_eq!(r.expect_close(), 1003);
    // Before authentication, and from tungstenite.
    let mut anon = Client::connect(&b.url("/v1/streaming/websocket"));
    anon.ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(anon.expect_close(), Some(1003));
    by.check();
    assert_healthy(&b);
}

#[test]
fn unknown_types_and_channels_are_400_with_field() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut c = b.connect_key(&key("fleet_a", Role::Service));
    let cases = [
        (
            r#"{"type":"teleport","id":"u1","payload":{}}"#,
            "u1",
            "type",
        ),
        (r#"{"type":"","id":"u2"}"#, "u2", "type"),
        (r#"{"id":"u3","payload":{}}"#, "u3", "type"),
        (r#"{"type":"PING","id":"u4"}"#, "u4", "type"),
        (
            r#"{"type":"subscribe","id":"u5","payload":{"channel":"weather"}}"#,
            "u5",
            "channel",
        ),
        (
            r#"{"type":"subscribe","id":"u6","payload":{"channel":""}}"#,
            "u6",
            "channel",
        ),
        (
            r#"{"type":"subscribe","id":"u6b","payload":{"action":"subscribe"}}"#,
            "u6b",
            "channel",
        ),
        (
            r#"{"type":"unsubscribe","id":"u7","payload":{"channel":"weather"}}"#,
            "u7",
            "channel",
        ),
        (
            r#"{"type":"publish","id":"u8","channel":"weather","payload":{"x":1}}"#,
            "u8",
            "channel",
        ),
        (
            r#"{"type":"publish","id":"u9","channel":"system","payload":{"x":1}}"#,
            "u9",
            "channel",
        ),
        (
            r#"{"type":"publish","id":"u10","payload":{"x":1}}"#,
            "u10",
            "channel",
        ),
        (
            r#"{"type":"auth","id":"u11","payload":{"subscriptions":["weather"]}}"#,
            "u11",
            "subscriptions",
        ),
        (
            r#"{"type":"subscribe","id":"u12","payload":{"action":"explode","channel":"alerts"}}"#,
            "u12",
            "action",
        ),
    ];
    for (text, id, field) in cases {
        let m = ask(&mut c, text);
        assert_error(&m, json!(id), 400, Some(field));
    }
    assert_usable(&mut c, "after-unknown");
    by.check();
    assert_healthy(&b);
}

#[test]
fn reserved_bits_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let publish = alert_msg("rsv", json!({})).to_string();
    for rsv in [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3] {
        for opcode in [OP_TEXT, OP_PING] {
            let mut r = raw_as(&b, "fleet_a", Role::Service);
            let payload: &[u8] = if opcode == OP_TEXT {
                publish.as_bytes()
            } else {
                b"p"
            };
            r.send_raw(&frame_bytes(true, rsv, opcode, payload, true))
                .unwrap();
            assert_eq!(r.expect_close(), 1002, "rsv {rsv:#x} opcode {opcode}");
        }
    }
    by.check();
    assert_healthy(&b);
}

#[test]
fn reserved_opcodes_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        let mut r = raw_as(&b, "fleet_a", Role::Service);
        r.send(opcode, br#"{"type":"ping","id":"x"}"#);
        assert_eq!(r.expect_close(), 1002, "opcode {opcode:#x}");
    }
    by.check();
    assert_healthy(&b);
}

#[test]
fn control_frames_over_125_bytes_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    // 125 bytes is the largest control payload: answered.
    let mut r = raw_as(&b, "fleet_a", Role::Viewer);
    r.assert_ping_pong(&[b'p'; 125]);
    r.assert_ping_pong(b"");
    for (opcode, len) in [
        (OP_PING, 126),
        (OP_PING, 70_000), // 64-bit length field
        (OP_PONG, 126),
        (OP_CLOSE, 200),
    ] {
        let mut r = raw_as(&b, "fleet_a", Role::Viewer);
        let mut payload = vec![b'x'; len];
        if opcode == OP_CLOSE {
            payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        }
        // The header alone is refused; the server may close before reading the payload.
        let _ = r.send_raw(&frame(opcode, &payload));
        assert_eq!(r.expect_close(), 1002, "opcode {opcode:#x} len {len}");
    }
    by.check();
    assert_healthy(&b);
}

#[test]
fn fragmented_control_frames_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        let mut r = raw_as(&b, "fleet_a", Role::Viewer);
        let payload = if opcode == OP_CLOSE {
            close_payload(1000, b"")
        } else {
            b"p".to_vec()
        };
        r.send_raw(&frame_bytes(false, 0, opcode, &payload, true))
            .unwrap();
        assert_eq!(r.expect_close(), 1002, "opcode {opcode:#x}");
    }
    // A final ping between the fragments of a text message is fine...
    let mut r = raw_as(&b, "fleet_a", Role::Viewer);
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, br#"{"type":"pi"#, true))
        .unwrap();
    r.send(OP_PING, b"mid");
    r.send_raw(&frame_bytes(true, 0, OP_CONT, br#"ng","id":"frag"}"#, true))
        .unwrap();
    let f = r.next();
    assert_eq!((f.opcode, &f.payload[..]), (OP_PONG, &b"mid"[..]));
    let m = r.next_json();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("frag")),
        "{m}"
    );
    // ...a fragmented one is not.
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, br#"{"type":"pi"#, true))
        .unwrap();
    r.send_raw(&frame_bytes(false, 0, OP_PING, b"mid", true))
        .unwrap();
    assert_eq!(r.expect_close(), 1002);
    by.check();
    assert_healthy(&b);
}

#[test]
fn bad_continuations_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    // A continuation of nothing.
    for fin in [true, false] {
        let mut r = raw_as(&b, "fleet_a", Role::Viewer);
        r.send_raw(&frame_bytes(fin, 0, OP_CONT, br#"{"type":"ping"}"#, true))
            .unwrap();
        assert_eq!(r.expect_close(), 1002);
    }
    // A new message inside a fragmented one.
    for opcode in [OP_TEXT, OP_BINARY] {
        let mut r = raw_as(&b, "fleet_a", Role::Viewer);
        r.send_raw(&frame_bytes(false, 0, OP_TEXT, br#"{"type":"#, true))
            .unwrap();
        r.send_raw(&frame_bytes(true, 0, opcode, br#"{"type":"ping"}"#, true))
            .unwrap();
        assert_eq!(r.expect_close(), 1002);
    }
    by.check();
    assert_healthy(&b);
}

#[test]
fn unmasked_client_frames_close_1002() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let publish = alert_msg("unmasked", json!({})).to_string();
    for (opcode, payload) in [
        (OP_TEXT, publish.as_bytes().to_vec()),
        (OP_PING, b"p".to_vec()),
        (OP_CLOSE, close_payload(1000, b"")),
    ] {
        let mut r = raw_as(&b, "fleet_a", Role::Service);
        r.send_raw(&frame_bytes(true, 0, opcode, &payload, false))
            .unwrap();
        assert_eq!(r.expect_close(), 1002, "opcode {opcode:#x}");
    }
    // An unmasked frame after good ones: the good ones were answered first.
    let mut r = raw_as(&b, "fleet_a", Role::Service);
    let mut bytes = frame(OP_TEXT, br#"{"type":"ping","id":"ok"}"#);
    bytes.extend(frame_bytes(true, 0, OP_TEXT, publish.as_bytes(), false));
    r.send_raw(&bytes).unwrap();
    let m = r.next_json();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("ok")),
        "{m}"
    );
    assert_eq!(r.expect_close(), 1002);
    by.check();
    assert_healthy(&b);
}

#[test]
fn oversized_messages_close_1009() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let big = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(1100));
    let mut r = raw_as(&b, "fleet_a", Role::Viewer);
    let _ = r.send_raw(&frame(OP_TEXT, big.as_bytes()));
    assert_eq!(r.expect_close(), 1009);
    // Each fragment small, the whole too big.
    let mut r = raw_as(&b, "fleet_a", Role::Viewer);
    let bytes = big.as_bytes();
    let _ = r.send_raw(&frame_bytes(false, 0, OP_TEXT, &bytes[..600], true));
    let _ = r.send_raw(&frame_bytes(true, 0, OP_CONT, &bytes[600..], true));
    assert_eq!(r.expect_close(), 1009);
    // A header announcing 2^40 bytes is refused without waiting for them.
    let mut r = raw_as(&b, "fleet_a", Role::Viewer);
    let mut hdr = vec![0x81, 0x80 | 127];
    hdr.extend_from_slice(&(1u64 << 40).to_be_bytes());
    hdr.extend_from_slice(&[1, 2, 3, 4]);
    r.send_raw(&hdr).unwrap();
    assert_eq!(r.expect_close(), 1009);
    by.check();
    assert_healthy(&b);
}

#[test]
fn half_open_sockets_are_closed_while_others_are_served() {
    const HEARTBEAT_MS: u64 = 300;
    let mut cfg = config(2);
    cfg.limits.heartbeat_interval_ms = HEARTBEAT_MS;
    cfg.limits.handshake_timeout_ms = 400;
    cfg.limits.auth_timeout_ms = 400;
    let b = Broker::start(cfg);
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    viewer.subscribe("alerts", json!({}));
    let mut service = b.connect_key(&key("fleet_a", Role::Service));

    // Upgraded and authenticated, then silent and never reading.
    let mut half_open = raw_as(&b, "fleet_a", Role::Viewer);
    half_open.send_text(r#"{"type":"subscribe","id":"s","payload":{"channel":"alerts"}}"#);
    // Upgraded, never authenticating.
    let mut anon = Raw::connect(b.addr, "/v1/streaming/websocket");
    // A TCP connection that never sends a byte, and one that stops mid-request (slowloris).
    let mut silent = TcpStream::connect(b.addr).unwrap();
    let mut slowloris = TcpStream::connect(b.addr).unwrap();
    slowloris
        .write_all(b"GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\nUpgr")
        .unwrap();

    // Meanwhile the healthy pair keeps working for several heartbeat intervals.
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(5 * HEARTBEAT_MS) {
        n += 1;
        let id = format!("live-{n}");
        service.send(alert_msg(&id, json!({})));
        assert_eq!(service.recv()["type"], "ack");
        assert_eq!(viewer.recv()["id"], id.as_str());
        assert_usable(&mut viewer, &format!("ping-{n}"));
        thread::sleep(Duration::from_millis(40));
    }

    // The half-open subscriber got its reply, the live alerts and pings, then 4008.
    assert_eq!(half_open.next_json()["type"], "subscribed");
    assert_eq!(half_open.expect_close(), 4008);
    // The anonymous one: error 408, then 1008.
    let m = anon.next_json();
    assert_error(&m, Value::Null, 408, None);
    assert_eq!(anon.expect_close(), 1008);
    // The handshakes that never completed were dropped without a word.
    for s in [&mut silent, &mut slowloris] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
    assert!(
        metric_sum(
            &b,
            "fleetcast_limit_breaches_total",
            "kind=\"handshake_timeout\""
        ) >= 2
    );
    assert!(
        metric_sum(
            &b,
            "fleetcast_limit_breaches_total",
            "kind=\"auth_timeout\""
        ) >= 1
    );
    assert_usable(&mut viewer, "at-the-end");
    assert_usable(&mut service, "at-the-end");
    wait_native_open(&b, 2);
    assert_healthy(&b);
}

#[test]
fn resets_mid_frame_leave_the_broker_unaffected() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let publish = alert_msg("reset", json!({})).to_string();
    let whole = frame(OP_TEXT, publish.as_bytes());
    for round in 0..5 {
        // Mid-header, mid-payload, mid-fragmented-message.
        for cut in [1, 2, 6, whole.len() / 2, whole.len() - 1] {
            let mut r = raw_as(&b, "fleet_a", Role::Service);
            r.send_raw(&whole[..cut]).unwrap();
            r.reset();
        }
        let mut r = raw_as(&b, "fleet_a", Role::Service);
        r.send_raw(&frame_bytes(
            false,
            0,
            OP_TEXT,
            &publish.as_bytes()[..20],
            true,
        ))
        .unwrap();
        r.send_raw(&frame_bytes(true, 0, OP_CONT, &publish.as_bytes()[20..], true)[..10])
            .unwrap();
        r.reset();
        // Mid-handshake.
        let mut s = TcpStream::connect(b.addr).unwrap();
        s.write_all(&raw::upgrade_request(&key_path("fleet_a", Role::Service)).as_bytes()[..40])
            .unwrap();
        raw::reset(s);
        // A subscriber reset while events are on their way to it.
        let mut r = raw_as(&b, "fleet_a", Role::Viewer);
        r.send_text(r#"{"type":"subscribe","id":"s","payload":{"channel":"alerts"}}"#);
        assert_eq!(r.next_json()["type"], "subscribed");
        let id = format!("during-reset-{round}");
        by.service_a.send(alert_msg(&id, json!({})));
        r.reset();
        assert_eq!(by.service_a.recv()["type"], "ack");
        assert_eq!(by.viewer_a.recv()["id"], id.as_str());
    }
    by.check();
    // Every reset connection is gone; the bystanders remain.
    wait_native_open(&b, 4);
    assert_healthy(&b);
}

#[test]
fn unauthorized_subscriptions_and_publishes_are_403() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    let m = ask(
        &mut viewer,
        r#"{"type":"subscribe","id":"s1","payload":{"channel":"system"}}"#,
    );
    assert_error(&m, json!("s1"), 403, None);
    let m = ask(&mut viewer, &alert_msg("v-pub", json!({})).to_string());
    assert_error(&m, json!("v-pub"), 403, None);
    assert_usable(&mut viewer, "viewer-after-403");

    let mut device = b.connect_key("key-fleet_a-device-v1-0123456789");
    let m = ask(
        &mut device,
        r#"{"type":"subscribe","id":"s2","payload":{"channel":"alerts"}}"#,
    );
    assert_error(&m, json!("s2"), 403, None);
    // A device publishing for another vehicle, or on a channel devices may not use.
    let mut other = location("v2", 1.0);
    other["id"] = json!("d-v2");
    let m = ask(&mut device, &other.to_string());
    assert_error(&m, json!("d-v2"), 403, None);
    // Devices report alerts they detect (Valtronics `alert`), never trip events.
    let mut trip = crate::security::trip_event("t1", Some("v1"), None);
    trip["id"] = json!("d-trip");
    let m = ask(&mut device, &trip.to_string());
    assert_error(&m, json!("d-trip"), 403, None);
    assert_usable(&mut device, "device-after-403");

    // Not yet authenticated: 401.
    let mut anon = Client::connect(&b.url("/v1/streaming/websocket"));
    let m = ask(
        &mut anon,
        r#"{"type":"subscribe","id":"s3","payload":{"channel":"alerts"}}"#,
    );
    assert_error(&m, json!("s3"), 401, None);
    assert_usable(&mut anon, "anon-after-401");

    // An admin may subscribe to system.
    let mut admin = b.connect_key(&key("fleet_a", Role::Admin));
    admin.subscribe("system", json!({}));
    by.check();
    assert_healthy(&b);
}

#[test]
fn cross_tenant_upgrades_are_403() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let a_key = key("fleet_a", Role::Viewer);
    for path in [
        format!("/v1/streaming/websocket/fleet/fleet_b?api_key={a_key}"),
        format!("/v1/streaming/websocket?api_key={a_key}&fleet_id=fleet_b"),
        format!("/v1/streaming/websocket/fleet/fleet_b?api_key={a_key}&fleet_id=fleet_a"),
    ] {
        let refused = Raw::try_connect(b.addr, &path)
            .err()
            .unwrap_or_else(|| panic!("{path} was upgraded"));
        assert_eq!(refused.status, 403, "{path}: {refused:?}");
        let body: Value = serde_json::from_str(&refused.body).expect("JSON error body");
        assert_eq!(body["error"]["code"], 403, "{body}");
    }
    // The right fleet is upgraded.
    let mut ok = Raw::connect(
        b.addr,
        &format!("/v1/streaming/websocket/fleet/fleet_a?api_key={a_key}"),
    );
    ok.assert_ping_pong(b"fleet-a");
    // With the credential in an `auth` message: auth_error 403, then close 1008.
    for (path, fleet_id) in [
        ("/v1/streaming/websocket/fleet/fleet_b", None),
        ("/v1/streaming/websocket", Some("fleet_b")),
    ] {
        let mut r = Raw::connect(b.addr, path);
        let mut auth = json!({"type":"auth","id":"x1","payload":{"api_key":a_key}});
        if let Some(f) = fleet_id {
            auth["payload"]["fleet_id"] = json!(f);
        }
        r.send_text(&auth.to_string());
        let m = r.next_json();
        assert_eq!(m["type"], "auth_error", "{m}");
        assert_eq!(
            (&m["id"], &m["payload"]["code"]),
            (&json!("x1"), &json!(403))
        );
        assert_eq!(r.expect_close(), 1008);
    }
    by.check();
    assert_healthy(&b);
}

#[test]
fn cross_tenant_publishes_are_403() {
    let b = Broker::with_shards(2);
    let mut by = Bystanders::new(&b);
    let mut service = b.connect_key(&key("fleet_a", Role::Service));
    let m = ask(
        &mut service,
        &alert_msg("x-alert", json!({"fleet_id":"fleet_b"})).to_string(),
    );
    assert_error(&m, json!("x-alert"), 403, None);
    let mut loc = location("v1", 1.0);
    loc["id"] = json!("x-loc");
    loc["payload"]["fleet_id"] = json!("fleet_b");
    let m = ask(&mut service, &loc.to_string());
    assert_error(&m, json!("x-loc"), 403, None);
    // In a batch the cross-tenant item is refused and the others go through.
    let batch = json!({"type":"batch","id":"x-batch","messages":[
        alert_msg("x-ok", json!({"fleet_id":"fleet_a"})),
        alert_msg("x-bad", json!({"fleet_id":"fleet_b"})),
    ]});
    service.send(batch);
    assert_eq!(service.recv()["id"], "x-ok");
    assert_error(&service.recv(), json!("x-bad"), 403, None);
    // A device, too.
    let mut device = b.connect_key("key-fleet_a-device-v1-0123456789");
    let m = ask(&mut device, &loc.to_string());
    assert_error(&m, json!("x-loc"), 403, None);
    // fleet_b's own service naming fleet_a.
    let mut service_b = b.connect_key(&key("fleet_b", Role::Service));
    let m = ask(
        &mut service_b,
        &alert_msg("x-b", json!({"fleet_id":"fleet_a"})).to_string(),
    );
    assert_error(&m, json!("x-b"), 403, None);
    assert_usable(&mut service, "service-after-403");
    by.check_after(&["x-ok"]);
    assert_healthy(&b);
}

// ---------------------------------------------------------------- all at once

/// Every kind of hostile client, as one short-lived connection each.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    MalformedJson,
    WrongTypes,
    HugeNumbers,
    DeepNesting,
    InvalidUtf8,
    Binary,
    UnknownTypeAndChannel,
    ReservedBits,
    ReservedOpcode,
    BigPing,
    FragmentedPing,
    Unmasked,
    Oversized,
    HalfOpen,
    SilentTcp,
    Slowloris,
    ResetMidFrame,
    Unauthorized,
    CrossTenantUpgrade,
    CrossTenantPublish,
}

const HOSTILE_KINDS: [Hostile; 20] = [
    Hostile::MalformedJson,
    Hostile::WrongTypes,
    Hostile::HugeNumbers,
    Hostile::DeepNesting,
    Hostile::InvalidUtf8,
    Hostile::Binary,
    Hostile::UnknownTypeAndChannel,
    Hostile::ReservedBits,
    Hostile::ReservedOpcode,
    Hostile::BigPing,
    Hostile::FragmentedPing,
    Hostile::Unmasked,
    Hostile::Oversized,
    Hostile::HalfOpen,
    Hostile::SilentTcp,
    Hostile::Slowloris,
    Hostile::ResetMidFrame,
    Hostile::Unauthorized,
    Hostile::CrossTenantUpgrade,
    Hostile::CrossTenantPublish,
];

/// Connections left open on purpose, checked once the broker had time to close them.
#[derive(Default)]
struct Lingering {
    half_open: Vec<Raw>,
    never_completed: Vec<TcpStream>,
}

/// A valid alert publish of fleet_a: refused by every hostile path that carries it, so
/// a healthy fleet_a viewer receiving it would show a leak.
fn leak_probe(tag: &str) -> String {
    alert_msg(&format!("LEAK-{tag}"), json!({})).to_string()
}

impl Hostile {
    /// Leaves a connection open for the broker to close.
    fn lingers(self) -> bool {
        matches!(
            self,
            Hostile::HalfOpen | Hostile::SilentTcp | Hostile::Slowloris
        )
    }

    fn run(self, b: &Broker, n: usize, lingering: &Mutex<Lingering>) {
        let tag = format!("{self:?}-{n}");
        let probe = leak_probe(&tag);
        match self {
            Hostile::MalformedJson => {
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let m = ask(&mut c, &probe[..probe.len() - 1]);
                assert_error(&m, Value::Null, 400, None);
                assert_usable(&mut c, &tag);
            }
            Hostile::WrongTypes => {
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let bad = format!(
                    r#"{{"type":"location_update","id":"{tag}","payload":{{"vehicle_id":"v1","location":{{"latitude":"1","longitude":2}}}}}}"#
                );
                assert_error(&ask(&mut c, &bad), json!(tag), 400, Some("latitude"));
                let bad = probe.replacen("\"high\"", "7", 1);
                assert_error(
                    &ask(&mut c, &bad),
                    json!(format!("LEAK-{tag}")),
                    400,
                    Some("severity"),
                );
            }
            Hostile::HugeNumbers => {
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let bad = format!(
                    r#"{{"type":"location_update","id":"{tag}","payload":{{"vehicle_id":"v1","location":{{"latitude":1e400,"longitude":2}}}}}}"#
                );
                let m = ask(&mut c, &bad);
                assert_eq!(
                    (&m["type"], &m["payload"]["code"]),
                    (&json!("error"), &json!(400)),
                    "{m}"
                );
                // Telemetry, which the healthy viewers do not subscribe to.
                let maybe = format!(
                    r#"{{"type":"telemetry_update","id":"{tag}","ack":true,"payload":{{"vehicle_id":"v1","x":123456789012345678901234567890,"y":1e400}}}}"#
                );
                let m = ask(&mut c, &maybe);
                assert!(m["type"] == "ack" || m["payload"]["code"] == 400, "{m}");
            }
            Hostile::DeepNesting => {
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
                assert_error(&ask(&mut c, &deep), Value::Null, 400, None);
                // A valid alert but for an array 40 deep in its payload.
                let arrays = format!("{}{}", "[".repeat(40), "]".repeat(40));
                let deep = probe.replacen("\"high\"", &format!("\"high\",\"x\":{arrays}"), 1);
                assert_error(&ask(&mut c, &deep), json!(format!("LEAK-{tag}")), 400, None);
            }
            Hostile::InvalidUtf8 => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                let mut bytes = probe.into_bytes();
                bytes[30] = 0xff;
                r.send(OP_TEXT, &bytes);
                assert_eq!(r.expect_close(), 1007, "{tag}");
            }
            Hostile::Binary => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                r.send(OP_BINARY, probe.as_bytes());
                assert_eq!(r.expect_close(), 1003, "{tag}");
            }
            Hostile::UnknownTypeAndChannel => {
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let bad = probe.replacen("safety_alert", "safety_alarm", 1);
                assert_error(
                    &ask(&mut c, &bad),
                    json!(format!("LEAK-{tag}")),
                    400,
                    Some("type"),
                );
                let bad = format!(
                    r#"{{"type":"publish","id":"{tag}","channel":"alertz","payload":{{"x":1}}}}"#
                );
                assert_error(&ask(&mut c, &bad), json!(tag), 400, Some("channel"));
            }
            Hostile::ReservedBits => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                let rsv = [RSV1, RSV2, RSV3][n % 3];
                r.send_raw(&frame_bytes(true, rsv, OP_TEXT, probe.as_bytes(), true))
                    .unwrap();
                assert_eq!(r.expect_close(), 1002, "{tag}");
            }
            Hostile::ReservedOpcode => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                let opcodes = [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF];
                r.send(opcodes[n % opcodes.len()], probe.as_bytes());
                assert_eq!(r.expect_close(), 1002, "{tag}");
            }
            Hostile::BigPing => {
                let mut r = raw_as(b, "fleet_a", Role::Viewer);
                let _ = r.send_raw(&frame(OP_PING, &[b'p'; 126]));
                assert_eq!(r.expect_close(), 1002, "{tag}");
            }
            Hostile::FragmentedPing => {
                let mut r = raw_as(b, "fleet_a", Role::Viewer);
                r.send_raw(&frame_bytes(false, 0, OP_PING, b"p", true))
                    .unwrap();
                assert_eq!(r.expect_close(), 1002, "{tag}");
            }
            Hostile::Unmasked => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                r.send_raw(&frame_bytes(true, 0, OP_TEXT, probe.as_bytes(), false))
                    .unwrap();
                assert_eq!(r.expect_close(), 1002, "{tag}");
            }
            Hostile::Oversized => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                let big = alert_msg(&format!("LEAK-{tag}"), json!({"padding":"x".repeat(1100)}));
                let _ = r.send_raw(&frame(OP_TEXT, big.to_string().as_bytes()));
                assert_eq!(r.expect_close(), 1009, "{tag}");
            }
            Hostile::HalfOpen => {
                // Subscribed, then neither reading nor sending: closed by the heartbeat.
                let mut r = raw_as(b, "fleet_a", Role::Viewer);
                r.send_text(r#"{"type":"subscribe","id":"s","payload":{"channel":"alerts"}}"#);
                lingering.lock().unwrap().half_open.push(r);
            }
            Hostile::SilentTcp => {
                let s = TcpStream::connect(b.addr).unwrap();
                lingering.lock().unwrap().never_completed.push(s);
            }
            Hostile::Slowloris => {
                let mut s = TcpStream::connect(b.addr).unwrap();
                s.write_all(b"GET /v1/streaming/websocket HTTP/1.1\r\nHo")
                    .unwrap();
                lingering.lock().unwrap().never_completed.push(s);
            }
            Hostile::ResetMidFrame => {
                let mut r = raw_as(b, "fleet_a", Role::Service);
                let f = frame(OP_TEXT, probe.as_bytes());
                r.send_raw(&f[..f.len() - 1 - n % 20]).unwrap();
                r.reset();
            }
            Hostile::Unauthorized => {
                let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
                let sub = format!(
                    r#"{{"type":"subscribe","id":"{tag}","payload":{{"channel":"system"}}}}"#
                );
                assert_error(&ask(&mut c, &sub), json!(tag), 403, None);
                assert_error(
                    &ask(&mut c, &probe),
                    json!(format!("LEAK-{tag}")),
                    403,
                    None,
                );
            }
            Hostile::CrossTenantUpgrade => {
                let path = format!(
                    "/v1/streaming/websocket/fleet/fleet_b?api_key={}",
                    key("fleet_a", Role::Service)
                );
                let refused = Raw::try_connect(b.addr, &path).err().expect("refused");
                assert_eq!(refused.status, 403, "{refused:?}");
            }
            Hostile::CrossTenantPublish => {
                // fleet_b's service naming fleet_a: would reach fleet_a's viewers if accepted.
                let mut c = b.connect_key(&key("fleet_b", Role::Service));
                let bad = alert_msg(&format!("LEAK-{tag}"), json!({"fleet_id":"fleet_a"}));
                assert_error(
                    &ask(&mut c, &bad.to_string()),
                    json!(format!("LEAK-{tag}")),
                    403,
                    None,
                );
                let mut c = b.connect_key(&key("fleet_a", Role::Service));
                let bad = alert_msg(&format!("LEAK-{tag}-b"), json!({"fleet_id":"fleet_b"}));
                assert_error(
                    &ask(&mut c, &bad.to_string()),
                    json!(format!("LEAK-{tag}-b")),
                    403,
                    None,
                );
            }
        }
    }
}

/// Reads data events until the one with id `last`; returns their (type, id), then checks
/// that nothing follows.
fn collect_until(c: &mut Client, last: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "no {last} within 15 s");
        let m = c
            .next(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("waiting for {last}: {e:?} after {} events", got.len()));
        assert!(m["channel"].is_string(), "not a data event: {m}");
        let id = m["id"].as_str().unwrap_or_default().to_string();
        got.push((
            m["type"].as_str().unwrap_or_default().to_string(),
            id.clone(),
        ));
        if id == last {
            break;
        }
    }
    c.expect_silence(Duration::from_millis(300));
    got
}

#[test]
fn hostile_clients_beside_healthy_ones() {
    const VIEWERS_A: usize = 10;
    const VIEWERS_B: usize = 3;
    const LOCATIONS: usize = 300;
    const ALERTS: usize = 100;
    const HOSTILE_THREADS: usize = 4;
    const MIN_ROUNDS: usize = 3;
    const MAX_ROUNDS: usize = 100;
    const HEARTBEAT_MS: u64 = 1_000;

    let mut cfg = config(2);
    // Short enough that half-open and never-completed connections are closed within the
    // test, long enough that no healthy client is at risk.
    cfg.limits.heartbeat_interval_ms = HEARTBEAT_MS;
    cfg.limits.handshake_timeout_ms = 500;
    let b = Arc::new(Broker::start(cfg));

    let subscribe = |tenant: &str| {
        let mut c = b.connect_key(&key(tenant, Role::Viewer));
        c.subscribe("vehicle_locations", json!({}));
        c.subscribe("alerts", json!({}));
        c
    };
    let viewers_a: Vec<Client> = (0..VIEWERS_A).map(|_| subscribe("fleet_a")).collect();
    let viewers_b: Vec<Client> = (0..VIEWERS_B).map(|_| subscribe("fleet_b")).collect();

    // The published sequence: three location updates, then an alert, 100 times.
    let mut sequence: Vec<(String, String, Value)> = Vec::new();
    let (mut locs, mut alerts) = (0, 0);
    for i in 0..LOCATIONS + ALERTS {
        let id = format!("seq-{i}");
        if i % 4 == 3 && alerts < ALERTS {
            alerts += 1;
            let m = alert_msg(&id, json!({"n": i}));
            sequence.push(("safety_alert".into(), id, m));
        } else {
            locs += 1;
            let mut m = location(&format!("v{}", i % 7), (i % 180) as f64 * 0.5 - 45.0);
            m["id"] = json!(id);
            m["ack"] = json!(true);
            m["payload"]["n"] = json!(i);
            sequence.push(("location_update".into(), id, m));
        }
    }
    assert_eq!((locs, alerts), (LOCATIONS, ALERTS));
    let mut expected: Vec<(String, String)> = sequence
        .iter()
        .map(|(t, id, _)| (t.clone(), id.clone()))
        .collect();
    expected.push(("safety_alert".into(), "end".into()));

    let start = Arc::new(Barrier::new(VIEWERS_A + VIEWERS_B + HOSTILE_THREADS + 1));
    let lingering = Arc::new(Mutex::new(Lingering::default()));

    let readers_a: Vec<_> = viewers_a
        .into_iter()
        .map(|mut c| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                (collect_until(&mut c, "end"), c)
            })
        })
        .collect();
    let readers_b: Vec<_> = viewers_b
        .into_iter()
        .map(|mut c| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                (collect_until(&mut c, "end-b"), c)
            })
        })
        .collect();
    // Hostile clients keep coming for as long as the publisher publishes (at least
    // MIN_ROUNDS rounds of every kind per thread, at most MAX_ROUNDS).
    let publishing = Arc::new(AtomicBool::new(true));
    let hostiles: Vec<_> = (0..HOSTILE_THREADS)
        .map(|t| {
            let (b, start, lingering) = (b.clone(), start.clone(), lingering.clone());
            let publishing = publishing.clone();
            thread::spawn(move || {
                start.wait();
                let mut runs = 0;
                for round in 0..MAX_ROUNDS {
                    if round >= MIN_ROUNDS && !publishing.load(Ordering::Relaxed) {
                        break;
                    }
                    for k in 0..HOSTILE_KINDS.len() {
                        // Each thread goes through the kinds in its own order.
                        let kind = HOSTILE_KINDS[(k + t * 5) % HOSTILE_KINDS.len()];
                        // Connections left open are only opened in the first rounds.
                        if round >= MIN_ROUNDS && kind.lingers() {
                            continue;
                        }
                        kind.run(&b, round * HOSTILE_THREADS + t, &lingering);
                        runs += 1;
                    }
                }
                runs
            })
        })
        .collect();

    let mut publisher = b.connect_key(&key("fleet_a", Role::Service));
    start.wait();
    for chunk in sequence.chunks(20) {
        for (_, _, m) in chunk {
            publisher.send(m.clone());
        }
        for (_, id, _) in chunk {
            let ack = publisher.recv();
            assert_eq!(
                (&ack["type"], &ack["id"]),
                (&json!("ack"), &json!(id)),
                "{ack}"
            );
        }
        thread::sleep(Duration::from_millis(40));
    }
    publishing.store(false, Ordering::Relaxed);
    // The publisher stays alive (heartbeat) while the hostile threads finish.
    while hostiles.iter().any(|h| !h.is_finished()) {
        assert_usable(&mut publisher, "waiting");
        thread::sleep(Duration::from_millis(100));
    }
    let mut runs = 0;
    for h in hostiles {
        runs += h.join().expect("hostile thread");
    }
    assert!(runs >= HOSTILE_THREADS * MIN_ROUNDS * HOSTILE_KINDS.len());
    // Only now the end marker: anything a hostile client slipped in came before it.
    publisher.send(alert_msg("end", json!({})));
    assert_eq!(publisher.recv()["type"], "ack");
    let mut service_b = b.connect_key(&key("fleet_b", Role::Service));
    service_b.send(alert_msg("end-b", json!({})));
    assert_eq!(service_b.recv()["type"], "ack");

    let mut healthy = vec![publisher, service_b];
    for (i, r) in readers_a.into_iter().enumerate() {
        let (got, c) = r.join().expect("fleet_a viewer");
        assert_eq!(got.len(), expected.len(), "fleet_a viewer {i}: count");
        assert_eq!(got, expected, "fleet_a viewer {i}: sequence");
        healthy.push(c);
    }
    for (i, r) in readers_b.into_iter().enumerate() {
        let (got, c) = r.join().expect("fleet_b viewer");
        assert_eq!(
            got,
            vec![("safety_alert".to_string(), "end-b".to_string())],
            "fleet_b viewer {i} saw another fleet's data"
        );
        healthy.push(c);
    }

    // The connections left open were closed by the broker (heartbeat, handshake timeout),
    // checked in a thread while the healthy clients keep answering.
    let lingering = std::mem::take(&mut *lingering.lock().unwrap());
    assert_eq!(lingering.half_open.len(), HOSTILE_THREADS * MIN_ROUNDS);
    let checker = thread::spawn(move || {
        for mut r in lingering.half_open {
            assert_eq!(r.next_json()["type"], "subscribed");
            assert_eq!(r.expect_close(), 4008);
        }
        for mut s in lingering.never_completed {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("expected the server to close, got {other:?}"),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(8);
    while !checker.is_finished() && Instant::now() < deadline {
        for (i, c) in healthy.iter_mut().enumerate() {
            assert_usable(c, &format!("keepalive-{i}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
    checker
        .join()
        .expect("lingering connections closed by the broker");

    // The healthy ones are all still connected and answering; nothing else is open.
    for (i, c) in healthy.iter_mut().enumerate() {
        assert_usable(c, &format!("healthy-{i}"));
    }
    wait_native_open(&b, healthy.len() as u64);
    assert!(
        metric_sum(
            &b,
            "fleetcast_limit_breaches_total",
            "kind=\"protocol_error\""
        ) > 0
    );
    assert_healthy(&b);
}

// ------------------------------------------------- kinds added with issue 9

/// One of each new kind of hostile client, beside healthy viewers receiving a known
/// sequence: every viewer gets exactly the sequence, and each breach is counted exactly.
#[test]
fn new_hostile_kinds_beside_healthy_ones() {
    const VIEWERS: usize = 4;
    const ALERTS: usize = 100;
    const FUTURE: usize = 5;
    const IDLE: usize = 30;
    const PENDING_PER_IP: usize = 20;
    const RATE_DEVICE: &str = "dev-rate-key-0123456789";

    let mut cfg = config(2);
    cfg.limits.max_outbound_bytes = 256 * 1024;
    cfg.limits.soft_outbound_bytes = 64 * 1024;
    cfg.limits.requests_per_second = 2 * REQUESTS as u32;
    cfg.limits.max_pending_connections_per_ip = PENDING_PER_IP;
    cfg.limits.handshake_timeout_ms = 10_000;
    cfg.limits.roles.device.publishes_per_second = Some(10);
    add_key(
        &mut cfg,
        RATE_DEVICE,
        "fleet_b",
        Role::Device,
        &["*"],
        &[],
        &[],
    );
    let b = Arc::new(Broker::start(cfg));
    publish_fleet_state(&b, 200);

    // Healthy viewers watch every channel the hostile clients aim at.
    let viewers: Vec<Client> = (0..VIEWERS)
        .map(|_| {
            let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
            c.subscribe("alerts", json!({}));
            c.subscribe("driver_status", json!({}));
            c.subscribe("telemetry", json!({}));
            c.subscribe("vehicle_locations", json!({"vehicle_ids":["v1","v2"]}));
            c
        })
        .collect();
    let mut expected: Vec<String> = (0..ALERTS).map(|i| format!("seq-{i}")).collect();
    expected.push("end".into());

    type Job = Box<dyn FnOnce(&Broker) -> String + Send>;
    let jobs: Vec<(&str, Job)> = vec![
        (
            // One after the other, so that each knows the slow consumer counted is itself.
            "flooders that never read",
            Box::new(|b: &Broker| {
                let mut f = Flooder::connect(b, &key("fleet_a", Role::Viewer));
                // Fewer than the request burst: closed for its size, not its rate.
                f.expect_slow_consumer_close(b, "request flood", REQUESTS, request_frame);
                let mut f = Flooder::connect(b, &key("fleet_a", Role::Viewer));
                f.expect_slow_consumer_close(b, "WebSocket ping flood", WS_PINGS, ws_ping_frame);
                let mut f = Flooder::connect(b, &key("fleet_a", Role::Viewer));
                f.expect_slow_consumer_close(b, "JSON ping flood", JSON_PINGS, json_ping_frame);
                String::new()
            }),
        ),
        (
            "request rate",
            Box::new(|b: &Broker| {
                // Another user than the flooders, whatever the bucket's scope.
                let mut c = b.connect_key(&key("fleet_a", Role::Admin));
                let msgs: Vec<Value> = (0..3 * REQUESTS)
                    .map(|i| request_msg(&format!("rr-{i}"), "driver_status"))
                    .collect();
                let refused = burst_replies(&mut c, &msgs)
                    .iter()
                    .filter(|r| match r["type"].as_str() {
                        Some("snapshot") => false,
                        Some("error") if r["payload"]["code"] == 429 => true,
                        _ => panic!("request rate: unexpected {r}"),
                    })
                    .count();
                assert!(
                    refused >= REQUESTS / 2,
                    "only {refused} of {} requests refused at {}/s",
                    3 * REQUESTS,
                    2 * REQUESTS
                );
                format!("request_rate={refused}")
            }),
        ),
        (
            "publish rate",
            Box::new(|b: &Broker| {
                let mut c = b.connect_key(RATE_DEVICE);
                let started = Instant::now();
                let msgs: Vec<Value> = (0..30)
                    .map(|i| acked(telemetry(&format!("v{i}")), &format!("pr-{i}")))
                    .collect();
                let replies = burst_replies(&mut c, &msgs);
                let refill = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
                let refused = replies
                    .iter()
                    .filter(|r| match r["type"].as_str() {
                        Some("ack") => false,
                        Some("error") if r["payload"]["code"] == 429 => true,
                        _ => panic!("publish rate: unexpected {r}"),
                    })
                    .count();
                assert!(
                    30 - refused >= 10 && 30 - refused <= 10 + refill,
                    "{refused} of 30 refused at 10/s"
                );
                format!("publish_rate={refused}")
            }),
        ),
        (
            "out-of-scope device",
            Box::new(|b: &Broker| {
                let mut dev = b.connect_key(DEVICE_V1);
                let mut trip = acked(bare_location("v1", 1.0), "LEAK-trip");
                trip["payload"]["trip_id"] = json!("t8");
                let mut other = acked(telemetry("v1"), "LEAK-dev");
                other["payload"]["device_id"] = json!("v2");
                let mut other_loc = acked(bare_location("v1", 1.0), "LEAK-devloc");
                other_loc["payload"]["device_id"] = json!("v2");
                for m in [
                    acked(driver_status(Some("v1"), "d_victim"), "LEAK-driver"),
                    trip,
                    other,
                    other_loc,
                ] {
                    let id = m["id"].as_str().unwrap().to_string();
                    crate::security::assert_error(&publish(&mut dev, m), &id, 403);
                }
                String::new()
            }),
        ),
        (
            "future timestamps",
            Box::new(|b: &Broker| {
                let mut svc = b.connect_key(&key("fleet_a", Role::Service));
                for i in 0..FUTURE {
                    let id = format!("LEAK-fut-{i}");
                    let mut m = acked(bare_location("v1", 1.0), &id);
                    m["timestamp"] = json!("2099-01-01T00:00:00Z");
                    let e = publish(&mut svc, m);
                    crate::security::assert_error(&e, &id, 400);
                    assert_eq!(e["payload"]["field"], "timestamp", "{e}");
                }
                String::new()
            }),
        ),
        (
            "nested HTTP batch",
            Box::new(|b: &Broker| {
                let body = json!({"messages":[nested_line("LEAK-nested")]}).to_string();
                let (_, r) = post(b, &key("fleet_a", Role::Service), &body);
                assert_result(&r[0], 0, json!("LEAK-nested"), "rejected", Some(400));
                String::new()
            }),
        ),
        (
            "oversized HTTP item",
            Box::new(|b: &Broker| {
                let mut big = acked(bare_location("v1", 1.0), "LEAK-big");
                big["payload"]["extra"] = json!("x".repeat(60_000));
                let body = json!({ "messages": [big] }).to_string();
                let (_, r) = post(b, &key("fleet_a", Role::Service), &body);
                assert_result(&r[0], 0, json!("LEAK-big"), "rejected", Some(413));
                String::new()
            }),
        ),
        (
            "idle pre-upgrade sockets",
            Box::new(|b: &Broker| {
                let (held, closed) = idle_connections(
                    b.addr,
                    std::net::IpAddr::from(HOSTILE_IP),
                    IDLE,
                    IDLE - PENDING_PER_IP,
                    Duration::from_secs(2),
                );
                assert!(
                    held.len() <= PENDING_PER_IP,
                    "{} idle connections held",
                    held.len()
                );
                // Held until the end of the job; the broker may close them later.
                drop(held);
                format!("pending_connections_per_ip={closed}")
            }),
        ),
    ];

    let start = Arc::new(Barrier::new(VIEWERS + jobs.len() + 1));
    let readers: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let got = events_until_long(&mut c, "end");
                (i, got, c)
            })
        })
        .collect();
    let hostiles: Vec<_> = jobs
        .into_iter()
        .map(|(name, job)| {
            let (b, start) = (b.clone(), start.clone());
            (
                name,
                thread::spawn(move || {
                    start.wait();
                    job(&b)
                }),
            )
        })
        .collect();

    let mut publisher = b.connect_key(&key("fleet_a", Role::Service));
    start.wait();
    for chunk in expected[..ALERTS].chunks(10) {
        for id in chunk {
            publisher.send(acked(alert(id, "v1", "high"), id));
        }
        for id in chunk {
            let ack = publisher.recv();
            assert_eq!(
                (&ack["type"], &ack["id"]),
                (&json!("ack"), &json!(id)),
                "{ack}"
            );
        }
        thread::sleep(Duration::from_millis(30));
    }
    let mut counted: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    for (name, h) in hostiles {
        match h.join() {
            Ok(s) if s.is_empty() => {}
            Ok(s) => counted.push(s),
            Err(e) => failures.push(format!(
                "{name}: {}",
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    // Only now the end marker: anything a hostile client slipped in came before it.
    assert_accepted(&publish(
        &mut publisher,
        acked(alert("end", "v1", "high"), "end"),
    ));
    for r in readers {
        let (i, got, mut c) = r.join().expect("healthy viewer");
        assert_eq!(got, expected, "healthy viewer {i}");
        c.expect_nothing_more(&format!("healthy viewer {i}"));
    }
    assert!(failures.is_empty(), "hostile clients: {failures:#?}");

    let want = |kind: &str| -> u64 {
        counted
            .iter()
            .find_map(|s| s.strip_prefix(&format!("{kind}=")))
            .map_or(0, |n| n.parse().unwrap())
    };
    for (kind, n) in [
        ("slow_consumer", 3),
        ("request_rate", want("request_rate")),
        ("publish_rate", want("publish_rate")),
        ("future_timestamp", FUTURE as u64),
        ("message_size", 1),
        (
            "pending_connections_per_ip",
            want("pending_connections_per_ip"),
        ),
        ("pending_connections", 0),
    ] {
        assert_eq!(breaches(&b, kind), n, "breaches of {kind}");
    }
    assert!(want("pending_connections_per_ip") >= (IDLE - PENDING_PER_IP) as u64);
}
