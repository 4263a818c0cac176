//! SPEC §4: the plain HTTP side of the listening port.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends raw bytes, reads until the server closes; returns the whole response head.
fn raw_head(b: &Broker, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    out.split_once("\r\n\r\n")
        .map(|(h, _)| h.to_string())
        .unwrap_or(out)
}

fn json_error(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON error body ({e}): {body:?}"))
}

/// Sum over shards of one metric in the Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn healthz_and_readyz() {
    let b = Broker::with_shards(2);
    assert_eq!(b.get("/healthz").0, 200);
    let (status, body) = b.get("/readyz");
    assert_eq!(status, 200, "{body}");
}

/// Regression: a shard whose thread had not finished its first loop turn yet was
/// reported as stalled, so `/readyz` answered 503 right after start (most of the time
/// with 4 shards under a parallel test run).
#[test]
fn readyz_is_green_right_after_start() {
    for _ in 0..10 {
        let b = Broker::with_shards(4);
        let (status, body) = b.get("/readyz");
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn metrics_count_open_connections() {
    let b = Broker::with_shards(2);
    let (status, body) = b.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE fleetcast_connections_open gauge"),
        "{body}"
    );
    assert_eq!(metric(&body, "fleetcast_connections_open"), 0);

    let _c = b.connect_auth(&key("fleet_a", Role::Viewer));
    let (_, body) = b.get("/metrics");
    assert_eq!(metric(&body, "fleetcast_connections_open"), 1, "{body}");
    let upgraded: u64 = body
        .lines()
        .filter(|l| {
            l.starts_with("fleetcast_handshakes_total{") && l.contains("outcome=\"upgraded\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(upgraded, 1, "{body}");
}

#[test]
fn unknown_path_is_404_with_json_error() {
    let b = Broker::with_shards(1);
    for path in [
        "/nope",
        "/v1/streaming/websocketx",
        "/v1/streaming/websocket/car/1",
    ] {
        let (status, body) = b.get(path);
        assert_eq!(status, 404, "{path}");
        let e = json_error(&body);
        assert_eq!(e["error"]["code"], 404, "{path}: {body}");
        assert!(e["error"]["message"].is_string(), "{path}: {body}");
    }
}

#[test]
fn plain_get_on_websocket_path_is_426() {
    let b = Broker::with_shards(1);
    for path in [
        "/v1/streaming/websocket",
        "/v1/streaming/websocket/fleet/fleet_a",
    ] {
        let (status, body) = b.get(path);
        assert_eq!(status, 426, "{path}");
        assert_eq!(json_error(&body)["error"]["code"], 426);
    }
    let head = raw_head(
        &b,
        b"GET /v1/streaming/websocket HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(
        head.to_ascii_lowercase().contains("\r\nupgrade: websocket"),
        "{head}"
    );
}

#[test]
fn wrong_method_is_405() {
    let b = Broker::with_shards(1);
    for path in ["/v1/streaming/websocket", "/healthz"] {
        let (status, body) = b.http(&format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"
        ));
        assert_eq!(status, 405, "{path}");
        assert_eq!(json_error(&body)["error"]["code"], 405);
    }
}

#[test]
fn garbage_request_is_400() {
    let b = Broker::with_shards(1);
    let (status, body) = b.http("\x00\x01garbage\r\n\r\n");
    assert_eq!(status, 400);
    assert_eq!(json_error(&body)["error"]["code"], 400);
}

#[test]
fn oversized_request_head_is_431() {
    let b = Broker::with_shards(1);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let (status, body) = b.http(&big);
    assert_eq!(status, 431);
    assert_eq!(json_error(&body)["error"]["code"], 431);
    // An unfinished head that grows past the limit is refused without waiting for its end.
    let partial = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(9 * 1024)
    );
    let started = Instant::now();
    assert!(raw_head(&b, partial.as_bytes()).starts_with("HTTP/1.1 431 "));
    assert!(started.elapsed() < Duration::from_secs(2));
    // The broker still answers.
    assert_eq!(b.get("/healthz").0, 200);
}
