//! iTrack sessions: `user/auth` and `user/logout` over HTTP (GET and POST, with and
//! without `/v2`), session hashes that expire and end, the restricted viewer a hash
//! stands for, and failed-login rate limits.

use crate::support::{Broker, config, key};
use fleetcast::config::{Config, LoginUser};
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

const PASSWORD: &str = "correct horse battery staple";

fn user(login: &str, password: &str, tenant: &str, trackers: &[&str]) -> LoginUser {
    LoginUser {
        login: login.into(),
        // The default parameters, as `fleetcast hash-password` makes them.
        password_hash: fleetcast::sessions::hash_password(password).unwrap(),
        tenant: tenant.into(),
        trackers: trackers.iter().map(|t| t.to_string()).collect(),
    }
}

/// A node with login `ops` (fleet_a, every tracker) and `limited` (fleet_a, tracker
/// 15564 only), both with [`PASSWORD`].
fn broker(tweak: impl FnOnce(&mut Config)) -> Broker {
    let mut cfg = config(2);
    cfg.itrack.users = vec![
        user("ops", PASSWORD, "fleet_a", &["*"]),
        user("limited", PASSWORD, "fleet_a", &["15564"]),
    ];
    tweak(&mut cfg);
    Broker::start(cfg)
}

/// Status, content type and JSON body of a raw request.
fn call(b: &Broker, raw: &str) -> (u16, String, Value) {
    let mut s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body: {body:?}"));
    (status, ctype, json)
}

fn get(b: &Broker, path: &str) -> (u16, Value) {
    let (status, _, v) = call(b, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    (status, v)
}

fn post(b: &Broker, path: &str, body: &str) -> (u16, Value) {
    let (status, _, v) = call(
        b,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    (status, v)
}

fn login(b: &Broker, login: &str, password: &str) -> (u16, Value) {
    post(
        b,
        "/v2/user/auth",
        &json!({"login": login, "password": password}).to_string(),
    )
}

/// The session hash of a good login.
fn hash(b: &Broker, name: &str) -> String {
    let (status, v) = login(b, name, PASSWORD);
    assert_eq!(status, 200, "{v}");
    v["hash"].as_str().expect("a hash").to_string()
}

fn assert_hash(v: &Value) -> String {
    assert_eq!(v["success"], json!(true), "{v}");
    let h = v["hash"].as_str().unwrap_or_else(|| panic!("hash in {v}"));
    assert_eq!(h.len(), 32, "{h}");
    assert!(
        h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "{h}"
    );
    h.to_string()
}

fn assert_failure(status: u16, v: &Value, http: u16, code: u64) {
    assert_eq!((status, &v["success"]), (http, &json!(false)), "{v}");
    assert_eq!(v["status"]["code"], json!(code), "{v}");
    assert!(v["status"]["description"].is_string(), "{v}");
}

#[test]
fn logs_in_by_get_and_post_with_and_without_v2() {
    let b = broker(|_| {});
    let pw = "correct%20horse%20battery%20staple";
    let mut hashes = Vec::new();
    for path in ["/v2/user/auth", "/user/auth", "/v2/user/auth/"] {
        let (status, ctype, v) = call(
            &b,
            &format!("GET {path}?login=ops&password={pw} HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert_eq!((status, ctype.as_str()), (200, "application/json"), "{v}");
        hashes.push(assert_hash(&v));
        let body = json!({"login":"ops","password":PASSWORD}).to_string();
        let (status, v) = post(&b, path, &body);
        assert_eq!(status, 200, "{v}");
        hashes.push(assert_hash(&v));
    }
    // A form body, as Navixy's own examples send it.
    let form = format!("login=ops&password={}", pw.replace("%20", "+"));
    let (status, _, v) = call(
        &b,
        &format!(
            "POST /user/auth HTTP/1.1\r\nHost: x\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(status, 200, "{v}");
    hashes.push(assert_hash(&v));
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 7, "every login gets its own hash");
}

#[test]
fn a_body_arriving_in_pieces_is_read_whole() {
    let b = broker(|_| {});
    let body = json!({"login":"ops","password":PASSWORD}).to_string();
    let mut s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v2/user/auth HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..10]
    )
    .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&body.as_bytes()[10..]).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let v: Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_hash(&v);
}

#[test]
fn a_wrong_password_and_an_unknown_login_get_the_same_answer() {
    let b = broker(|_| {});
    let wrong = login(&b, "ops", "not the password");
    let unknown = login(&b, "nobody", PASSWORD);
    assert_failure(wrong.0, &wrong.1, 400, 102);
    assert_eq!(wrong, unknown);
    assert_eq!(
        wrong.1["status"]["description"],
        json!("Wrong login or password")
    );
    // Passwords are not logins of another user either.
    let (status, v) = login(&b, "limited", "");
    assert_failure(status, &v, 400, 7);
}

#[test]
fn missing_or_malformed_parameters_are_refused() {
    let b = broker(|_| {});
    for (path, body, code, needle) in [
        ("/v2/user/auth", r#"{"password":"x"}"#, 7, "login"),
        ("/v2/user/auth", r#"{"login":"ops"}"#, 7, "password"),
        (
            "/v2/user/auth",
            r#"{"login":"ops","password":""}"#,
            7,
            "password",
        ),
        (
            "/v2/user/auth",
            r#"{"login":15564,"password":"x"}"#,
            7,
            "login",
        ),
        ("/v2/user/auth", r#"{"login":"ops","#, 5, "format"),
        ("/v2/user/auth", r#"["ops","x"]"#, 5, "format"),
        ("/v2/user/logout", r#"{}"#, 7, "hash"),
    ] {
        let (status, v) = post(&b, path, body);
        assert_failure(status, &v, 400, code);
        let d = v["status"]["description"].as_str().unwrap();
        assert!(d.contains(needle), "{body}: {d}");
    }
    let (status, v) = get(&b, "/user/auth?login=ops");
    assert_failure(status, &v, 400, 7);
    let (status, body) = b.http("PUT /v2/user/auth HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405, "{body}");
    let big = format!(r#"{{"login":"ops","password":"{}"}}"#, "x".repeat(70_000));
    let (status, v) = post(&b, "/v2/user/auth", &big);
    assert_failure(status, &v, 413, 9);
}

#[test]
fn logout_ends_the_hash() {
    let b = broker(|_| {});
    let (h1, h2) = (hash(&b, "ops"), hash(&b, "ops"));
    let (status, v) = get(&b, &format!("/v2/user/logout?hash={h1}"));
    assert_eq!((status, &v), (200, &json!({"success":true})));
    // Ended: a second logout finds nothing; the other session of the user lives on.
    let (status, v) = get(&b, &format!("/user/logout/?hash={h1}"));
    assert_failure(status, &v, 400, 4);
    assert_eq!(
        v["status"]["description"],
        json!("User or API key not found or session ended")
    );
    let (status, v) = post(&b, "/user/logout", &json!({"hash": h2}).to_string());
    assert_eq!((status, &v), (200, &json!({"success":true})));
    let (status, v) = post(&b, "/v2/user/logout", &json!({"hash": h2}).to_string());
    assert_failure(status, &v, 400, 4);
    let (status, v) = get(&b, &format!("/v2/user/logout?hash={}", "0".repeat(32)));
    assert_failure(status, &v, 400, 4);
}

#[test]
fn session_hashes_expire() {
    // The shortest TTL validation allows.
    let b = broker(|c| c.itrack.session_ttl_ms = 1_000);
    let start = Instant::now();
    let (early, late) = (hash(&b, "ops"), hash(&b, "ops"));
    let mut ws = itrack(&b);
    ws.subscribe(&late, &[15564]);
    std::thread::sleep(Duration::from_millis(1_100).saturating_sub(start.elapsed()));
    let (status, v) = get(&b, &format!("/v2/user/logout?hash={early}"));
    assert_failure(status, &v, 400, 4);
    // WebSocket authentication counts whole seconds: by 2.1 s the hash is refused
    // everywhere, and the connection that used it was closed as its token expired.
    std::thread::sleep(Duration::from_millis(2_100).saturating_sub(start.elapsed()));
    let mut fresh = itrack(&b);
    fresh.send(json!({"action":"subscribe","hash":late,"events":["state"],"trackers":[15564]}));
    let e = fresh.json();
    assert_eq!(
        (&e["type"], &e["status"]["code"]),
        (&json!("error"), &json!(3)),
        "{e}"
    );
    assert_eq!(ws.close_code(), Some(4001));
}

#[test]
fn a_hash_follows_only_the_users_trackers_and_ends_with_logout() {
    let b = broker(|_| {});
    // Tracker 99 exists in the user's fleet, 77 in another fleet, 12345 nowhere.
    let publish = |tenant: &str, v: &str| {
        let mut service = b.connect_auth(&key(tenant, Role::Service));
        service.send(json!({"type":"location_update","payload":{"vehicle_id":v,
            "location":{"latitude":52.5,"longitude":13.4},"speed":10}}));
        service.expect_nothing_more(v);
    };
    publish("fleet_a", "99");
    publish("fleet_b", "77");
    let h = hash(&b, "limited");
    let mut ws = itrack(&b);
    ws.subscribe(&h, &[15564]);
    // Trackers outside the user's list are refused, naming the tracker, with the same
    // answer whether it exists in the fleet, in another one or nowhere.
    let mut refusals = Vec::new();
    for t in [99, 77, 12345] {
        ws.send(json!({"action":"subscribe","hash":h,"events":["state"],"trackers":[15564, t]}));
        let e = ws.json();
        assert_eq!(e["type"], json!("error"), "{e}");
        let text = e.to_string();
        assert!(text.contains(&t.to_string()), "{text}");
        refusals.push(text.replace(&t.to_string(), "<id>"));
    }
    assert!(refusals.iter().all(|r| r == &refusals[0]), "{refusals:#?}");
    publish("fleet_a", "15564");
    let ev = ws.json();
    assert_eq!(
        (&ev["type"], &ev["data"]["source_id"]),
        (&json!("event"), &json!(15564)),
        "{ev}"
    );
    // Logged out: the next message with the hash is refused.
    let (status, _) = get(&b, &format!("/v2/user/logout?hash={h}"));
    assert_eq!(status, 200);
    ws.send(json!({"action":"subscribe","hash":h,"events":["state"],"trackers":[15564]}));
    let e = ws.json();
    assert_eq!(
        (&e["type"], &e["status"]["code"]),
        (&json!("error"), &json!(3)),
        "{e}"
    );
}

#[test]
fn a_login_is_refused_after_five_failures_in_a_minute_even_with_its_password() {
    let b = broker(|_| {});
    for _ in 0..5 {
        let (status, v) = login(&b, "ops", "guess");
        assert_failure(status, &v, 400, 102);
    }
    let (status, v) = login(&b, "ops", PASSWORD);
    assert_failure(status, &v, 429, 15);
    let d = v["status"]["description"].as_str().unwrap();
    assert!(d.contains("this login") && d.contains("retry in"), "{d}");
    // Unknown logins are limited the same way (nothing tells them apart).
    for _ in 0..5 {
        login(&b, "ghost", "guess");
    }
    let (status, v) = login(&b, "ghost", "guess");
    assert_failure(status, &v, 429, 15);
    // Another login is not affected (10 failures from this address, under 20).
    let (status, v) = login(&b, "limited", PASSWORD);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        b.metric(
            "fleetcast_limit_breaches_total",
            "kind=\"login_rate_per_login\""
        ),
        2
    );
}

#[test]
fn an_address_is_refused_after_its_failures_whatever_the_login() {
    let b = broker(|c| c.limits.login_failures_per_minute_per_ip = 3);
    for name in ["a", "b", "ops"] {
        let (status, v) = login(&b, name, "guess");
        assert_failure(status, &v, 400, 102);
    }
    let (status, v) = login(&b, "limited", PASSWORD);
    assert_failure(status, &v, 429, 15);
    let d = v["status"]["description"].as_str().unwrap();
    assert!(d.contains("this address"), "{d}");
    assert_eq!(
        b.metric(
            "fleetcast_limit_breaches_total",
            "kind=\"login_rate_per_ip\""
        ),
        1
    );
    assert_eq!(
        b.metric(
            "fleetcast_limit_breaches_total",
            "kind=\"login_rate_per_login\""
        ),
        0
    );
    // Logout is not a login: it is not limited.
    let (status, v) = get(&b, &format!("/v2/user/logout?hash={}", "0".repeat(32)));
    assert_failure(status, &v, 400, 4);
}

// ------------------------------------------------------------------ an iTrack client

struct Itrack {
    ws: tungstenite::WebSocket<TcpStream>,
}

fn itrack(b: &Broker) -> Itrack {
    let url = b.url(
        "/v2/event/subscription?X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript\
         &X-Atmosphere-Transport=websocket&Content-Type=application/json&X-atmo-protocol=true",
    );
    let stream = TcpStream::connect(b.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade");
    let mut c = Itrack { ws };
    let hello = c.text();
    assert!(hello.ends_with("|X|"), "Atmosphere handshake: {hello}");
    c
}

impl Itrack {
    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    /// The next text frame that is not a heartbeat.
    fn text(&mut self) -> String {
        loop {
            match self.ws.read().expect("a frame within 5 s") {
                Message::Text(t) if t.as_str() != "X" => return t.as_str().to_string(),
                _ => continue,
            }
        }
    }

    fn json(&mut self) -> Value {
        let t = self.text();
        serde_json::from_str(&t).unwrap_or_else(|_| panic!("JSON: {t}"))
    }

    /// Reads until the server closes; its close code.
    fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("waiting for close: {e}"),
            }
        }
    }

    fn subscribe(&mut self, hash: &str, trackers: &[u64]) {
        self.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":trackers}));
        let r = self.json();
        assert_eq!(
            (&r["type"], &r["action"]),
            (&json!("response"), &json!("subscription/subscribe")),
            "{r}"
        );
    }
}
