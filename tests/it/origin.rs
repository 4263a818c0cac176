//! Browsers (issue 15): the `Origin` allow-list before every WebSocket upgrade of every
//! dialect, and CORS for the HTTP API, both from `server.allowed_origins`.

use crate::support::*;
use fleetcast::config::Config;
use fleetcast::model::Role;
use fleetcast::origin::AllowedOrigins;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::client::IntoClientRequest;

const ALLOWED: &str = "https://app.example.com";

fn broker_with(origins: &[&str]) -> Broker {
    let mut cfg: Config = config(1);
    cfg.server.allowed_origins = AllowedOrigins::new(origins).unwrap();
    Broker::start(cfg)
}

/// Every WebSocket path: the native one and each dialect's.
fn websocket_paths() -> Vec<String> {
    let mut paths = vec!["/v1/streaming/websocket".to_string()];
    paths.extend(
        fleetcast::dialect::ENDPOINTS
            .iter()
            .map(|(p, _, _)| p.to_string()),
    );
    paths
}

/// The status of an upgrade to `path` with this `Origin` (none: no header): 101 when
/// upgraded, else the HTTP status of the refusal.
fn upgrade_status(b: &Broker, path: &str, origin: Option<&str>) -> u16 {
    let mut req = b.url(path).into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match Client::try_connect_request(req) {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{path} with origin {origin:?}: {e}"),
    }
}

/// A raw HTTP exchange: the whole response text.
fn raw(b: &Broker, request: &str) -> String {
    let mut s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn origin_allowed_refused_and_absent_on_every_websocket_path() {
    let b = broker_with(&[ALLOWED, "https://*.fleet.example"]);
    let paths = websocket_paths();
    assert_eq!(paths.len(), 10, "{paths:?}");
    for path in &paths {
        assert_eq!(upgrade_status(&b, path, Some(ALLOWED)), 101, "{path}");
        assert_eq!(
            upgrade_status(&b, path, Some("https://ops.eu.fleet.example")),
            101,
            "{path}: a wildcard subdomain"
        );
        // Not a browser: never refused for the lack of an Origin.
        assert_eq!(upgrade_status(&b, path, None), 101, "{path}");
        for evil in [
            "https://evil.example",
            "http://app.example.com",
            "https://app.example.com.evil.example",
            "https://fleet.example",
            "null",
        ] {
            assert_eq!(
                upgrade_status(&b, path, Some(evil)),
                403,
                "{path} from {evil}"
            );
        }
    }
    // Refused before the credential is even looked at: a good key does not help.
    let with_key = format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    );
    assert_eq!(
        upgrade_status(&b, &with_key, Some("https://evil.example")),
        403
    );
    let forbidden = b.metric("fleetcast_handshakes_total", "outcome=\"forbidden\"");
    assert_eq!(forbidden, 10 * 5 + 1);
}

#[test]
fn an_empty_list_allows_every_origin_to_upgrade() {
    let b = broker_with(&[]);
    for path in websocket_paths() {
        assert_eq!(
            upgrade_status(&b, &path, Some("https://anywhere.example")),
            101,
            "{path}"
        );
    }
}

#[test]
fn cors_preflight_and_headers_for_allowed_origins_only() {
    let b = broker_with(&[ALLOWED]);
    let preflight = |origin: &str, path: &str, method: &str| {
        raw(
            &b,
            &format!(
                "OPTIONS {path} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: {method}\r\n\
                 Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
            ),
        )
    };
    let ok = preflight(ALLOWED, "/v1/publish", "POST");
    assert!(ok.starts_with("HTTP/1.1 204 "), "{ok}");
    assert_eq!(header(&ok, "Access-Control-Allow-Origin"), Some(ALLOWED));
    assert_eq!(header(&ok, "Vary"), Some("Origin"));
    assert_eq!(
        header(&ok, "Access-Control-Allow-Methods"),
        Some("POST, OPTIONS")
    );
    let allowed_headers = header(&ok, "Access-Control-Allow-Headers").unwrap();
    assert!(
        allowed_headers.contains("Authorization") && allowed_headers.contains("Content-Type"),
        "{ok}"
    );
    let polling = preflight(ALLOWED, "/v1/fleets/fleet_a/vehicles", "GET");
    assert!(polling.starts_with("HTTP/1.1 204 "), "{polling}");
    assert_eq!(
        header(&polling, "Access-Control-Allow-Methods"),
        Some("GET, OPTIONS")
    );
    // A method the endpoint does not answer, and an origin not listed.
    let wrong_method = preflight(ALLOWED, "/v1/publish", "DELETE");
    assert!(wrong_method.starts_with("HTTP/1.1 405 "), "{wrong_method}");
    let evil = preflight("https://evil.example", "/v1/publish", "POST");
    assert!(evil.starts_with("HTTP/1.1 403 "), "{evil}");
    assert_eq!(header(&evil, "Access-Control-Allow-Origin"), None);

    // The actual request: the allowed origin is echoed, with Vary.
    let body = r#"{"type":"location_update","payload":{"vehicle_id":"v1","location":{"latitude":1.0,"longitude":2.0}}}"#;
    let publish = |origin: &str| {
        raw(
            &b,
            &format!(
                "POST /v1/publish HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                key("fleet_a", Role::Service),
                body.len()
            ),
        )
    };
    let accepted = publish(ALLOWED);
    assert!(accepted.starts_with("HTTP/1.1 202 "), "{accepted}");
    assert_eq!(
        header(&accepted, "Access-Control-Allow-Origin"),
        Some(ALLOWED)
    );
    assert_eq!(header(&accepted, "Vary"), Some("Origin"));
    // Another origin's request is answered (a browser will not show it to the page),
    // without CORS headers.
    let other = publish("https://evil.example");
    assert!(other.starts_with("HTTP/1.1 202 "), "{other}");
    assert_eq!(header(&other, "Access-Control-Allow-Origin"), None);
    // Errors carry the headers too, so that the page can read why.
    let unauthorized = raw(
        &b,
        &format!(
            "GET /v1/fleets/fleet_a/vehicles HTTP/1.1\r\nHost: x\r\nOrigin: {ALLOWED}\r\n\r\n"
        ),
    );
    assert!(unauthorized.starts_with("HTTP/1.1 401 "), "{unauthorized}");
    assert_eq!(
        header(&unauthorized, "Access-Control-Allow-Origin"),
        Some(ALLOWED)
    );
}

#[test]
fn without_a_list_cors_is_closed() {
    let b = broker_with(&[]);
    let r = raw(
        &b,
        "OPTIONS /v1/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\n\
         Access-Control-Request-Method: POST\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
    assert_eq!(header(&r, "Access-Control-Allow-Origin"), None);
    let h = raw(
        &b,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\n\r\n",
    );
    assert!(h.starts_with("HTTP/1.1 200 "), "{h}");
    assert_eq!(header(&h, "Access-Control-Allow-Origin"), None);
}
