//! SPEC §2: credentials in the handshake (query, bearer header) or in an `auth` message,
//! refusals before the upgrade, auth timeout, token expiry, and role permissions.

use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn request(url: &str) -> Request {
    url.into_client_request().unwrap()
}

fn bearer(url: &str, credential: &str) -> Request {
    let mut req = request(url);
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    req
}

/// The HTTP status and JSON body of a handshake the broker refuses.
fn refused(req: Request) -> (u16, Value) {
    let what = req.uri().to_string();
    match Client::try_connect_request(req) {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Ok(_) => panic!("{what}: upgrade accepted, expected a refusal"),
        Err(e) => panic!("{what}: expected an HTTP refusal, got {e}"),
    }
}

/// Asks an authenticated connection who it is: an `auth` without a credential is
/// answered with the connection's current principal.
fn whoami(c: &mut Client) -> Value {
    c.send(json!({"type":"auth","id":"who","payload":{}}));
    let m = c.expect("auth_success");
    assert_eq!(m["id"], "who");
    m["payload"].clone()
}

#[test]
fn query_api_key_then_repeated_auth_is_idempotent() {
    let b = Broker::with_shards(2);
    let k = key("fleet_a", Role::Viewer);
    let mut c = b.connect_key(&k);
    let mut first: Option<Value> = None;
    for id in ["auth-1", "auth-2"] {
        c.send(json!({"type":"auth","id":id,"payload":{"api_key":k}}));
        let m = c.expect("auth_success");
        assert_eq!(m["id"], id, "{m}");
        assert!(m["timestamp"].is_string(), "{m}");
        let p = &m["payload"];
        assert!(
            p["connection_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{m}"
        );
        assert_eq!(p["user_id"], "fleet_a-viewer");
        assert_eq!(p["fleet_id"], "fleet_a");
        assert_eq!(p["role"], "viewer");
        assert!(p["server_time"].is_string(), "{m}");
        assert_eq!(p["limits"]["max_message_bytes"], 1024, "{m}");
        assert_eq!(p["limits"]["max_batch"], 50, "{m}");
        assert_eq!(p["limits"]["max_subscriptions"], 256, "{m}");
        assert!(p["limits"]["heartbeat_interval_ms"].is_u64(), "{m}");
        match &first {
            None => first = Some(p.clone()),
            Some(f) => assert_eq!(f["connection_id"], p["connection_id"], "same connection"),
        }
    }
    // Still one healthy connection.
    let s = c.subscribe("alerts", json!({}));
    assert_eq!(s["payload"]["channel"], "alerts");
}

#[test]
fn bearer_header_api_key() {
    let b = Broker::with_shards(1);
    let url = b.url("/v1/streaming/websocket");
    let mut c = Client::try_connect_request(bearer(&url, &key("fleet_b", Role::Service))).unwrap();
    let p = whoami(&mut c);
    assert_eq!(p["user_id"], "fleet_b-service");
    assert_eq!(p["fleet_id"], "fleet_b");
    assert_eq!(p["role"], "service");
}

#[test]
fn bearer_header_jwt() {
    let b = Broker::with_shards(1);
    let token = mint_hs256(
        SECRET,
        "ops-1",
        "fleet_a",
        Role::Admin,
        unix_now() + 3600,
        None,
    )
    .unwrap();
    let url = b.url("/v1/streaming/websocket");
    let mut c = Client::try_connect_request(bearer(&url, &token)).unwrap();
    let p = whoami(&mut c);
    assert_eq!(
        (&p["user_id"], &p["fleet_id"], &p["role"]),
        (&json!("ops-1"), &json!("fleet_a"), &json!("admin"))
    );
}

#[test]
fn query_token_jwt() {
    let b = Broker::with_shards(2);
    let token = mint_hs256(
        SECRET,
        "dash-7",
        "fleet_b",
        Role::Viewer,
        unix_now() + 3600,
        None,
    )
    .unwrap();
    let mut c = Client::connect(&b.url(&format!("/v1/streaming/websocket?token={token}")));
    let p = whoami(&mut c);
    assert_eq!(p["user_id"], "dash-7");
    assert_eq!(p["fleet_id"], "fleet_b");
    assert_eq!(p["role"], "viewer");
    // The token's tenant is the one the connection streams.
    c.subscribe("vehicle_locations", json!({}));
    let mut dev = b.connect_key(&key("fleet_b", Role::Device));
    dev.send(location("v9", 10.0));
    assert_eq!(c.expect("location_update")["payload"]["vehicle_id"], "v9");
}

#[test]
fn bad_credentials_are_refused_before_upgrade() {
    let b = Broker::with_shards(2);
    let ws = b.url("/v1/streaming/websocket");

    let (status, body) = refused(request(&format!(
        "{ws}?api_key=key-fleet_a-nobody-0123456789"
    )));
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], 401, "{body}");

    let (status, _) = refused(bearer(&ws, "key-fleet_a-nobody-0123456789"));
    assert_eq!(status, 401);

    let forged = mint_hs256(
        "another-secret-another-secret",
        "x",
        "fleet_a",
        Role::Admin,
        unix_now() + 3600,
        None,
    )
    .unwrap();
    assert_eq!(refused(request(&format!("{ws}?token={forged}"))).0, 401);
    assert_eq!(refused(bearer(&ws, &forged)).0, 401);

    let expired = mint_hs256(SECRET, "x", "fleet_a", Role::Viewer, unix_now() - 10, None).unwrap();
    assert_eq!(refused(request(&format!("{ws}?token={expired}"))).0, 401);

    assert_eq!(refused(request(&format!("{ws}?token=not.a.jwt"))).0, 401);
}

#[test]
fn foreign_fleet_is_refused_before_upgrade() {
    let b = Broker::with_shards(2);
    let ka = key("fleet_a", Role::Viewer);

    let (status, body) = refused(request(&b.url(&format!(
        "/v1/streaming/websocket?api_key={ka}&fleet_id=fleet_b"
    ))));
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], 403, "{body}");

    let (status, _) = refused(request(&b.url(&format!(
        "/v1/streaming/websocket/fleet/fleet_b?api_key={ka}"
    ))));
    assert_eq!(status, 403);

    let fleet_b = b.url("/v1/streaming/websocket/fleet/fleet_b");
    assert_eq!(refused(bearer(&fleet_b, &ka)).0, 403);

    // The same credential on its own fleet is accepted.
    let mut c = b.connect_key(&format!("{ka}&fleet_id=fleet_a"));
    assert_eq!(whoami(&mut c)["fleet_id"], "fleet_a");
    let mut c = Client::connect(&b.url(&format!(
        "/v1/streaming/websocket/fleet/fleet_a?api_key={ka}"
    )));
    assert_eq!(whoami(&mut c)["fleet_id"], "fleet_a");
}

#[test]
fn auth_message_on_foreign_fleet_endpoint_is_refused() {
    let b = Broker::with_shards(1);
    let mut c = Client::connect(&b.url("/v1/streaming/websocket/fleet/fleet_b"));
    c.send(json!({"type":"auth","id":"a1","payload":{"api_key": key("fleet_a", Role::Viewer)}}));
    let m = c.expect("auth_error");
    assert_eq!(m["payload"]["code"], 403, "{m}");
    assert_eq!(c.expect_close(), Some(1008));
}

#[test]
fn auth_message_with_bad_key_gets_auth_error_and_close() {
    let b = Broker::with_shards(1);
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(json!({"type":"auth","id":"a1","payload":{"api_key":"key-fleet_a-nobody-0123456789"}}));
    let m = c.recv();
    assert_eq!(m["type"], "auth_error", "{m}");
    assert_eq!(m["id"], "a1");
    assert_eq!(m["payload"]["code"], 401, "{m}");
    assert!(m["payload"]["message"].is_string(), "{m}");
    assert_eq!(c.expect_close(), Some(1008));
}

#[test]
fn message_before_auth_is_refused_but_connection_stays_usable() {
    let b = Broker::with_shards(1);
    let mut c = Client::connect(&b.url("/v1/streaming/websocket"));
    c.send(
        json!({"type":"subscribe","id":"s1","payload":{"action":"subscribe","channel":"alerts"}}),
    );
    let m = c.recv();
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["id"], "s1");
    assert_eq!(m["payload"]["code"], 401, "{m}");
    c.send(location("v1", 1.0));
    assert_eq!(c.expect("error")["payload"]["code"], 401);

    c.send(json!({"type":"auth","id":"a1","payload":{"api_key": key("fleet_a", Role::Viewer)}}));
    assert_eq!(c.expect("auth_success")["payload"]["role"], "viewer");
    c.subscribe("alerts", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    svc.send(alert("al-1", "v1", "high"));
    assert_eq!(c.expect("safety_alert")["payload"]["alert_id"], "al-1");
}

#[test]
fn auth_timeout_sends_408_and_closes() {
    let mut cfg = config(1);
    cfg.limits.auth_timeout_ms = 300;
    let b = Broker::start(cfg);
    let started = Instant::now();
    let mut idle = Client::connect(&b.url("/v1/streaming/websocket"));
    let mut authed = b.connect_auth(&key("fleet_a", Role::Viewer));

    let m = idle
        .next(Duration::from_secs(5))
        .expect("an error before the close");
    let waited = started.elapsed();
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["payload"]["code"], 408, "{m}");
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the timeout"
    );
    assert_eq!(idle.expect_close(), Some(1008));

    // A connection that authenticated in time outlives the deadline.
    if let Some(rest) = Duration::from_millis(600).checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    authed.send(json!({"type":"ping","id":"p"}));
    assert_eq!(authed.expect("pong")["id"], "p");
}

#[test]
fn expired_token_closes_with_4001() {
    let b = Broker::with_shards(1);
    // exp is in UNIX seconds: this token expires between 1 and 2 s from now.
    let exp = unix_now() + 2;
    let token = mint_hs256(SECRET, "short", "fleet_a", Role::Viewer, exp, None).unwrap();
    let mut c = Client::connect(&b.url(&format!("/v1/streaming/websocket?token={token}")));
    c.subscribe("alerts", json!({}));
    let m = c
        .next(Duration::from_secs(6))
        .expect("an error when the token expires");
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["payload"]["code"], 401, "{m}");
    assert!(unix_now() >= exp, "closed before the token expired");
    assert_eq!(c.expect_close(), Some(4001));
}

#[test]
fn device_may_only_publish_for_its_own_vehicle() {
    let b = Broker::with_shards(2);
    let mut dash = b.connect_auth(&key("fleet_a", Role::Viewer));
    dash.subscribe("vehicle_locations", json!({}));
    let mut dev = b.connect_key("key-fleet_a-device-v1-0123456789");

    let mut foreign = location("v2", 2.0);
    foreign["id"] = json!("pub-v2");
    dev.send(foreign);
    let m = dev.expect("error");
    assert_eq!(m["id"], "pub-v2");
    assert_eq!(m["payload"]["code"], 403, "{m}");

    let mut own = location("v1", 1.0);
    // The key lists no trips, and no trip is bound to v1 yet.
    own["payload"].as_object_mut().unwrap().remove("trip_id");
    own["id"] = json!("pub-v1");
    own["ack"] = json!(true);
    dev.send(own);
    assert_eq!(dev.expect("ack")["id"], "pub-v1");
    // Only the permitted publish was routed.
    let m = dash.expect("location_update");
    assert_eq!(m["payload"]["vehicle_id"], "v1", "{m}");
    dash.expect_silence(Duration::from_millis(200));
}

#[test]
fn viewer_may_not_publish() {
    let b = Broker::with_shards(1);
    let mut dash = b.connect_auth(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    let mut viewer = b.connect_auth(&key("fleet_a", Role::Viewer));
    for (i, mut msg) in [location("v1", 1.0), alert("al-1", "v1", "high")]
        .into_iter()
        .enumerate()
    {
        let id = format!("p{i}");
        msg["id"] = json!(id);
        viewer.send(msg);
        let m = viewer.expect("error");
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["payload"]["code"], 403, "{m}");
    }
    dash.expect_silence(Duration::from_millis(200));
}

#[test]
fn only_admin_may_subscribe_to_system() {
    let b = Broker::with_shards(1);
    let mut viewer = b.connect_auth(&key("fleet_a", Role::Viewer));
    viewer.send(
        json!({"type":"subscribe","id":"sys","payload":{"action":"subscribe","channel":"system"}}),
    );
    let m = viewer.expect("error");
    assert_eq!(m["id"], "sys");
    assert_eq!(m["payload"]["code"], 403, "{m}");

    let mut admin = b.connect_auth(&key("fleet_a", Role::Admin));
    assert_eq!(
        admin.subscribe("system", json!({}))["payload"]["channel"],
        "system"
    );
}
