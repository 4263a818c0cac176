//! The iTrack dialect (`/event/subscription`) end to end, as a client that does what
//! atmosphere.js does over the websocket transport: it logs in with `user/auth`, opens the
//! Atmosphere URL, reads the handshake frame, answers heartbeats, subscribes to trackers
//! with its session hash, gets their current state and then every change, unsubscribes.
//! Also: the transports it does not serve, every error code, positions from every
//! publishing surface, tenant isolation and the SPEC §8 limits in this dialect's shape.
//!
//! Login users (argon2 hashes made here, with small parameters): `alice` follows every
//! tracker of fleet_a, `bob` only 15564 and 15565 of fleet_a, `carol` every tracker of
//! fleet_b. Every wait is bounded.

use crate::support::*;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, Params};
use fleetcast::config::{Config, LoginUser};
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;

/// The query atmosphere.js 2.3.6 sends over the websocket transport (the seed's).
const QUERY: &str = "X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript\
                     &X-Atmosphere-Transport=websocket&Content-Type=application/json\
                     &X-atmo-protocol=true";

// ---------------------------------------------------------------- helpers

fn password(login: &str) -> String {
    format!("{login}-pass-0123")
}

/// An argon2id PHC string of `password` (small parameters: tests log in often).
fn password_hash(password: &str) -> String {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).unwrap();
    let salt = SaltString::encode_b64(&salt).unwrap();
    let argon = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        Params::new(64, 1, 1, None).unwrap(),
    );
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// The test broker's config with the three login users and state thresholds: moving
/// above 5 km/h, parked after a minute at rest, idle after 5 minutes, offline after 15.
fn itrack_config() -> Config {
    let mut cfg = config(2);
    for (login, tenant, trackers) in [
        ("alice", "fleet_a", &["*"][..]),
        ("bob", "fleet_a", &["15564", "15565"][..]),
        ("carol", "fleet_b", &["*"][..]),
    ] {
        cfg.itrack.users.push(LoginUser {
            login: login.into(),
            password_hash: password_hash(&password(login)),
            tenant: tenant.into(),
            trackers: trackers.iter().map(|t| t.to_string()).collect(),
        });
    }
    cfg.itrack.moving_kmh = 5;
    cfg.itrack.parked_after_ms = 60_000;
    cfg.itrack.idle_after_ms = 300_000;
    cfg.itrack.offline_after_ms = 900_000;
    cfg
}

fn broker() -> Broker {
    Broker::start(itrack_config())
}

fn broker_with(f: impl FnOnce(&mut Config)) -> Broker {
    let mut cfg = itrack_config();
    f(&mut cfg);
    Broker::start(cfg)
}

/// `GET /v2/user/auth?login=&password=`: the session hash.
fn login(b: &Broker, who: &str) -> String {
    let (status, body) = b.get(&format!(
        "/v2/user/auth?login={who}&password={}",
        password(who)
    ));
    assert_eq!(status, 200, "user/auth as {who}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["success"], true, "{v}");
    v["hash"].as_str().expect("a hash").to_owned()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// RFC 3339 UTC, `ms_ago` milliseconds ago.
fn rfc3339_ago(ms_ago: i64) -> String {
    fleetcast::dialect::native::format_rfc3339_ms(unix_ms() - ms_ago)
}

/// A client of the Atmosphere WebSocket transport: text frames are JSON, except the
/// handshake frame and the heartbeats `X`.
struct Atmo {
    c: Client,
    /// Heartbeats heard from the server.
    heartbeats: usize,
}

impl Atmo {
    /// Opens `path` with the seed's query and returns the client and the first frame.
    fn open(b: &Broker, path: &str) -> (Atmo, String) {
        let c = Client::connect(&b.url(&format!("{path}?{QUERY}")));
        let mut a = Atmo { c, heartbeats: 0 };
        let first = a
            .frame(Duration::from_secs(5))
            .expect("the handshake frame");
        (a, first)
    }

    /// Opens the seed's URL and checks the handshake frame.
    fn connect(b: &Broker) -> Atmo {
        let (a, first) = Atmo::open(b, "/v2/event/subscription");
        assert!(first.ends_with("|30000|X|"), "{first}");
        a
    }

    /// The next text frame, whatever it holds.
    fn frame(&mut self, timeout: Duration) -> Result<String, Ended> {
        self.c.set_timeout(timeout);
        loop {
            match self.c.ws.read() {
                Ok(Message::Text(t)) => return Ok(t.as_str().to_owned()),
                Ok(Message::Close(f)) => return Err(Ended::Closed(f.map(|f| u16::from(f.code)))),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Ended::Timeout);
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Err(Ended::Closed(None));
                }
                Err(e) => return Err(Ended::Error(e.to_string())),
            }
        }
    }

    /// The next JSON message (heartbeats are counted and skipped), or how it ended.
    fn next(&mut self, timeout: Duration) -> Result<Value, Ended> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Ended::Timeout);
            }
            let text = self.frame(left)?;
            if text == "X" {
                self.heartbeats += 1;
                continue;
            }
            return Ok(serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a JSON frame ({e}): {text:?}")));
        }
    }

    fn recv(&mut self) -> Value {
        self.next(Duration::from_secs(5))
            .expect("a message within 5 s")
    }

    fn send(&mut self, v: Value) {
        self.c.send(v);
    }

    fn expect_silence(&mut self, d: Duration) {
        match self.next(d) {
            Err(Ended::Timeout) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.next(Duration::from_secs(10)) {
                Ok(_) => continue,
                Err(Ended::Closed(c)) => return c,
                Err(e) => panic!("waiting for close: {e:?}"),
            }
        }
        panic!("no close within 10 s")
    }

    /// Sends `{action, hash, events:["state"], trackers}` and returns the answer.
    fn ask(&mut self, action: &str, hash: &str, trackers: Value) -> Value {
        self.send(json!({"action":action,"hash":hash,"events":["state"],"trackers":trackers}));
        self.recv()
    }

    /// Subscribes; the answer must be the response listing every tracker as normal.
    fn subscribe(&mut self, hash: &str, trackers: Value) {
        let m = self.ask("subscribe", hash, trackers.clone());
        let state: serde_json::Map<String, Value> = trackers
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (id_text(t), json!("normal")))
            .collect();
        assert_eq!(
            m,
            json!({"type":"response","action":"subscription/subscribe","events":["state"],
                "data":{"state":state}}),
            "subscribe {trackers}"
        );
    }

    fn unsubscribe(&mut self, hash: &str, trackers: Value) {
        let m = self.ask("unsubscribe", hash, trackers.clone());
        assert_eq!(
            m,
            json!({"type":"response","action":"subscription/unsubscribe","events":["state"],
                "data":trackers}),
            "unsubscribe"
        );
    }
}

/// A tracker id as a JSON object key.
fn id_text(t: &Value) -> String {
    t.as_str().map_or_else(|| t.to_string(), str::to_owned)
}

/// `"YYYY-MM-DD HH:MM:SS"` within a minute of `expected_ms`.
fn check_time(v: &Value, expected_ms: i64, what: &str) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v}"));
    let b = s.as_bytes();
    assert!(
        b.len() == 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b' ' && b[13] == b':',
        "{what}: YYYY-MM-DD HH:MM:SS: {s}"
    );
    let iso = format!("{}T{}Z", &s[..10], &s[11..]);
    let ms = fleetcast::dialect::native::parse_rfc3339_ms(&iso).unwrap();
    assert!(
        (ms - expected_ms).abs() < 60_000,
        "{what}: {s} is not near {}",
        fleetcast::dialect::native::format_rfc3339_ms(expected_ms)
    );
}

/// The next message must be the `state` of `tracker` at `lat` (longitude -74.006,
/// heading 245.5, altitude 12) going `speed` km/h, with these statuses.
fn expect_state(
    c: &mut Atmo,
    tracker: &Value,
    lat: f64,
    speed: f64,
    statuses: (&str, &str),
) -> Value {
    let m = c.recv();
    assert_eq!(
        (&m["type"], &m["event"]),
        (&json!("event"), &json!("state")),
        "{m}"
    );
    let d = &m["data"];
    assert_eq!(&d["source_id"], tracker, "{m}");
    let gps = &d["gps"];
    assert_eq!(gps["location"]["lat"].as_f64(), Some(lat), "{m}");
    assert_eq!(gps["location"]["lng"].as_f64(), Some(-74.006), "{m}");
    assert_eq!(gps["speed"].as_f64(), Some(speed), "km/h as published: {m}");
    assert_eq!(gps["heading"].as_f64(), Some(245.5), "{m}");
    assert_eq!(gps["alt"].as_f64(), Some(12.0), "{m}");
    assert_eq!(
        (
            d["connection_status"].as_str().unwrap(),
            d["movement_status"].as_str().unwrap()
        ),
        statuses,
        "{m}"
    );
    check_time(&m["user_time"], unix_ms(), "user_time");
    m
}

/// A native location update for `vehicle` (as published: latitude, longitude -74.006,
/// speed, heading 245.5, altitude 12), with the publisher's timestamp if given.
fn native_location(vehicle: &str, lat: f64, speed: f64, timestamp: Option<&str>) -> Value {
    static N: AtomicU64 = AtomicU64::new(0);
    let id = format!("{vehicle}-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut m = json!({"type":"location_update","ack":true,"id":id,
        "payload":{"vehicle_id":vehicle,"location":{"latitude":lat,"longitude":-74.006,
        "speed":speed,"heading":245.5,"altitude":12}}});
    if let Some(t) = timestamp {
        m["timestamp"] = json!(t);
    }
    m
}

/// A native device of `tenant` that publishes positions (each acknowledged).
struct Device(Client);

impl Device {
    fn new(b: &Broker, tenant: &str) -> Device {
        Device(b.connect_auth(&key(tenant, Role::Device)))
    }

    fn locate(&mut self, vehicle: &str, lat: f64, speed: f64) {
        self.locate_at(vehicle, lat, speed, None);
    }

    fn locate_at(&mut self, vehicle: &str, lat: f64, speed: f64, timestamp: Option<&str>) {
        self.0.send(native_location(vehicle, lat, speed, timestamp));
        let a = self.0.expect("ack");
        assert_eq!(a["payload"]["status"], "accepted", "{a}");
    }
}

/// The next message must be an error with this API code for `action`.
fn expect_error(c: &mut Atmo, code: u64, description: &str, action: Value) -> Value {
    let m = c.recv();
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(
        m["status"],
        json!({"code":code,"description":description}),
        "{m}"
    );
    assert_eq!(m["action"], action, "{m}");
    assert!(
        m["message"].as_str().is_some_and(|s| !s.is_empty()),
        "says why: {m}"
    );
    m
}

// ---------------------------------------------------------------- the seed's client

#[test]
fn an_atmosphere_client_follows_its_trackers() {
    let b = broker();
    let mut dev = Device::new(&b, "fleet_a");
    // Tracker 15564 has a position before anyone subscribes: its current state.
    dev.locate("15564", 40.7128, 36.0);

    let hash = login(&b, "alice");
    assert_eq!(hash.len(), 32, "{hash}");
    let (mut c, first) = Atmo::open(&b, "/event/subscription");
    // `<uuid>|<heartbeat ms>|X|`, a version 4 UUID.
    let parts: Vec<&str> = first.split('|').collect();
    assert_eq!(parts.len(), 4, "{first}");
    assert_eq!(&parts[1..], ["30000", "X", ""], "{first}");
    let uuid = parts[0];
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert!(
        uuid.char_indices()
            .all(|(i, ch)| if [8, 13, 18, 23].contains(&i) {
                ch == '-'
            } else {
                ch.is_ascii_hexdigit()
            }),
        "{uuid}"
    );
    assert_eq!(&uuid[14..15], "4", "{uuid}");

    c.subscribe(&hash, json!([15564, 15565]));
    // The current state of 15564 (15565 has none yet).
    let t = json!(15564);
    let m = expect_state(&mut c, &t, 40.7128, 36.0, ("active", "moving"));
    check_time(&m["data"]["last_update"], unix_ms(), "last_update");
    assert_eq!(m["data"]["last_update"], m["data"]["gps"]["updated"]);
    c.expect_silence(Duration::from_millis(200));

    // Then every change, as published.
    dev.locate("15564", 40.7130, 4.0);
    expect_state(&mut c, &t, 40.7130, 4.0, ("active", "stopped"));
    dev.locate("15564", 40.7131, 0.0);
    expect_state(&mut c, &t, 40.7131, 0.0, ("active", "stopped"));
    dev.locate("15564", 40.7135, 88.5);
    expect_state(&mut c, &t, 40.7135, 88.5, ("active", "moving"));
    dev.locate("15565", -33.5, 12.25);
    expect_state(&mut c, &json!(15565), -33.5, 12.25, ("active", "moving"));
    // A tracker not subscribed: nothing.
    dev.locate("15566", 1.0, 1.0);
    c.expect_silence(Duration::from_millis(200));

    // Unsubscribing 15564 stops it; 15565 goes on.
    c.unsubscribe(&hash, json!([15564]));
    dev.locate("15564", 41.0, 10.0);
    dev.locate("15565", -33.6, 10.0);
    expect_state(&mut c, &json!(15565), -33.6, 10.0, ("active", "moving"));
    c.unsubscribe(&hash, json!([15565]));
    dev.locate("15565", -33.7, 10.0);
    dev.locate("15564", 41.1, 10.0);
    c.expect_silence(Duration::from_millis(300));

    // Subscribing again gives the current state first.
    c.subscribe(&hash, json!(["15564"]));
    expect_state(&mut c, &t, 41.1, 10.0, ("active", "moving"));
}

#[test]
fn every_path_spelling_is_served() {
    let b = broker();
    Device::new(&b, "fleet_a").locate("77", 10.0, 0.0);
    let hash = login(&b, "alice");
    for path in [
        "/event/subscription",
        "/event/subscription/",
        "/v2/event/subscription",
        "/v2/event/subscription/",
    ] {
        let (mut c, first) = Atmo::open(&b, path);
        assert!(first.ends_with("|30000|X|"), "{path}: {first}");
        c.subscribe(&hash, json!([77]));
        let m = c.recv();
        assert_eq!(m["data"]["source_id"], 77, "{path}: {m}");
    }
    // A plain WebSocket client without the Atmosphere parameters is served too.
    let c = Client::connect(&b.url("/v2/event/subscription"));
    let mut c = Atmo { c, heartbeats: 0 };
    let first = c.frame(Duration::from_secs(5)).unwrap();
    assert!(first.ends_with("|30000|X|"), "{first}");
    c.subscribe(&hash, json!(["77"]));
}

#[test]
fn states_are_judged_by_the_configured_thresholds() {
    let b = broker();
    let mut dev = Device::new(&b, "fleet_a");
    // At rest for two minutes (over the minute before parked), reported just now.
    dev.locate_at("501", 1.0, 0.0, Some(&rfc3339_ago(120_000)));
    dev.locate_at("501", 1.0, 0.0, Some(&rfc3339_ago(1_000)));
    // Last heard six minutes ago (idle after five), and twenty (offline after fifteen).
    dev.locate_at("502", 2.0, 30.0, Some(&rfc3339_ago(360_000)));
    dev.locate_at("503", 3.0, 0.0, Some(&rfc3339_ago(1_200_000)));
    // Slow but not at rest (the moving threshold is 5 km/h).
    dev.locate("504", 4.0, 5.0);

    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.subscribe(&hash, json!([501, 502, 503, 504]));
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let m = c.recv();
        let d = &m["data"];
        let statuses = (
            d["connection_status"].as_str().unwrap().to_owned(),
            d["movement_status"].as_str().unwrap().to_owned(),
        );
        seen.insert(d["source_id"].as_u64().unwrap(), (statuses, m));
    }
    let statuses = |id: u64| {
        let (s, _) = &seen[&id];
        (s.0.as_str(), s.1.as_str())
    };
    assert_eq!(statuses(501), ("active", "parked"));
    assert_eq!(statuses(502), ("idle", "moving"));
    assert_eq!(statuses(503), ("offline", "parked"));
    assert_eq!(statuses(504), ("active", "stopped"));
    check_time(
        &seen[&502].1["data"]["last_update"],
        unix_ms() - 360_000,
        "last_update is the position's time",
    );
    // A tracker starting to move is moving at once.
    dev.locate("501", 1.1, 50.0);
    let m = c.recv();
    assert_eq!(
        (&m["data"]["source_id"], &m["data"]["movement_status"]),
        (&json!(501), &json!("moving")),
        "{m}"
    );
}

#[test]
fn heartbeats_go_both_ways_and_silence_closes() {
    let b = broker_with(|cfg| cfg.limits.heartbeat_interval_ms = 300);
    let hash = login(&b, "alice");
    let (mut c, first) = Atmo::open(&b, "/v2/event/subscription");
    assert!(
        first.ends_with("|300|X|"),
        "the configured interval: {first}"
    );
    c.subscribe(&hash, json!([15564]));
    // Answering the server's X keeps the connection open well past two intervals.
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        match c.frame(Duration::from_millis(500)) {
            Ok(t) => {
                assert_eq!(t, "X", "only heartbeats while nothing happens");
                c.heartbeats += 1;
                c.c.send_text("X");
            }
            Err(Ended::Timeout) => panic!("no heartbeat within 500 ms"),
            Err(e) => panic!("closed while answering heartbeats: {e:?}"),
        }
    }
    assert!(c.heartbeats >= 3, "{} heartbeats", c.heartbeats);
    // The client's X gets no answer of its own (only the server's own heartbeats).
    c.c.send_text("X");
    Device::new(&b, "fleet_a").locate("15564", 5.0, 0.0);
    assert_eq!(c.recv()["event"], "state", "still subscribed");
    // Silent for two intervals: closed.
    let t0 = Instant::now();
    assert_eq!(c.expect_close(), Some(4008), "heartbeat timeout");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn other_transports_get_an_http_error_naming_websocket() {
    let b = broker();
    for transport in ["long-polling", "sse", "streaming", "jsonp"] {
        let query = QUERY.replace("Transport=websocket", &format!("Transport={transport}"));
        for path in ["/event/subscription", "/v2/event/subscription/"] {
            // What atmosphere.js sends when it falls back: a plain GET.
            let (status, body) = b.get(&format!("{path}?{query}"));
            assert_eq!(status, 400, "{transport} {path}: {body}");
            assert!(
                body.contains("websocket") && body.contains(transport),
                "names the one transport served: {body}"
            );
            // And an upgrade that says another transport is refused before the upgrade.
            match Client::try_connect(&b.url(&format!("{path}?{query}"))) {
                Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
                other => panic!("{transport}: {:?}", other.map(|_| "upgraded")),
            }
        }
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn a_wrong_hash_is_code_3() {
    let b = broker();
    let mut c = Atmo::connect(&b);
    c.send(
        json!({"action":"subscribe","hash":"0123456789abcdef0123456789abcdef",
        "events":["state"],"trackers":[15564]}),
    );
    let m = expect_error(
        &mut c,
        3,
        "Wrong user hash",
        json!("subscription/subscribe"),
    );
    assert_eq!(
        m["data"],
        json!({"events":["state"],"trackers":[15564]}),
        "the request's parameters, without the hash: {m}"
    );
    // A failed first authentication ends the connection.
    assert_eq!(c.expect_close(), Some(1008));

    // On a connection already following trackers, a wrong hash is refused and the rest
    // goes on.
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.subscribe(&hash, json!([15564]));
    c.send(json!({"action":"unsubscribe","hash":"nope","events":["state"],"trackers":[15564]}));
    expect_error(
        &mut c,
        3,
        "Wrong user hash",
        json!("subscription/unsubscribe"),
    );
    // A missing hash is the same code.
    c.send(json!({"action":"subscribe","events":["state"],"trackers":[15564]}));
    expect_error(
        &mut c,
        3,
        "Wrong user hash",
        json!("subscription/subscribe"),
    );
    Device::new(&b, "fleet_a").locate("15564", 3.0, 20.0);
    assert_eq!(c.recv()["data"]["source_id"], 15564, "still subscribed");

    // A hash that was logged out is wrong too.
    let (status, body) = b.get(&format!("/v2/user/logout?hash={hash}"));
    assert_eq!(status, 200, "{body}");
    let mut c = Atmo::connect(&b);
    c.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[15564]}));
    expect_error(
        &mut c,
        3,
        "Wrong user hash",
        json!("subscription/subscribe"),
    );
}

#[test]
fn trackers_of_other_tenants_and_nonexistent_ones_are_refused_alike() {
    let b = broker();
    // 20001 exists in fleet_b; 20002 nowhere.
    Device::new(&b, "fleet_b").locate("20001", 9.0, 9.0);
    let hash = login(&b, "bob");
    let mut c = Atmo::connect(&b);
    let mut refusal = |tracker: u64| {
        c.send(json!({"action":"subscribe","hash":hash,"events":["state"],
            "trackers":[15564, tracker]}));
        let m = expect_error(&mut c, 11, "Access denied", json!("subscription/subscribe"));
        assert!(
            m["message"]
                .as_str()
                .unwrap()
                .contains(&tracker.to_string()),
            "names the tracker: {m}"
        );
        // The same answer but for the id.
        m.to_string().replace(&tracker.to_string(), "ID")
    };
    let other_tenant = refusal(20001);
    let nowhere = refusal(20002);
    assert_eq!(other_tenant, nowhere);
    // Nothing of the refused subscription was made; the user's own trackers are fine.
    c.subscribe(&hash, json!([15564, 15565]));
    let mut dev = Device::new(&b, "fleet_a");
    dev.locate("15564", 1.5, 0.0);
    assert_eq!(c.recv()["data"]["source_id"], 15564);
    Device::new(&b, "fleet_b").locate("20001", 9.5, 9.0);
    c.expect_silence(Duration::from_millis(300));

    // A user of every tracker of its tenant: another tenant's tracker is one of its own
    // that has no data, exactly like one that does not exist.
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.subscribe(&hash, json!([20001, 20002]));
    Device::new(&b, "fleet_b").locate("20001", 9.6, 9.0);
    c.expect_silence(Duration::from_millis(300));
}

#[test]
fn bad_requests_have_their_codes_and_leave_the_connection_open() {
    let b = broker();
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.send(
        json!({"action":"subscribe","hash":hash,"events":["state","readings"],
        "trackers":[15564]}),
    );
    let m = expect_error(
        &mut c,
        7,
        "Invalid parameters",
        json!("subscription/subscribe"),
    );
    assert!(
        m["message"].as_str().unwrap().contains("\"readings\""),
        "names the event: {m}"
    );
    assert_eq!(
        m["data"],
        json!({"events":["state","readings"],"trackers":[15564]})
    );
    for (msg, code, description, action) in [
        (
            json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[]}),
            7,
            "Invalid parameters",
            json!("subscription/subscribe"),
        ),
        (
            json!({"action":"unsubscribe","hash":hash,"events":["state"]}),
            7,
            "Invalid parameters",
            json!("subscription/unsubscribe"),
        ),
        (
            json!({"action":"subscribe","hash":hash,"trackers":[1]}),
            7,
            "Invalid parameters",
            json!("subscription/subscribe"),
        ),
        (
            json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[{"id":1}]}),
            7,
            "Invalid parameters",
            json!("subscription/subscribe"),
        ),
        (
            json!({"action":"watch","hash":hash}),
            5,
            "Wrong request format",
            Value::Null,
        ),
    ] {
        c.send(msg);
        expect_error(&mut c, code, description, action);
    }
    c.c.send_text("{\"action\":");
    let m = expect_error(&mut c, 5, "Wrong request format", Value::Null);
    assert_eq!(m["data"], Value::Null);
    c.c.send_text("hello");
    expect_error(&mut c, 5, "Wrong request format", Value::Null);
    // Still usable.
    c.subscribe(&hash, json!([15564]));
}

#[test]
fn every_limit_speaks_itrack() {
    // Message rate (viewers: 3 per second) and subscriptions per connection (2).
    let b = broker_with(|cfg| {
        cfg.limits.roles.viewer.messages_per_second = Some(3);
        cfg.limits.max_subscriptions = 2;
    });
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[1, 2, 3]}));
    let m = expect_error(
        &mut c,
        7,
        "Invalid parameters",
        json!("subscription/subscribe"),
    );
    assert!(
        m["message"].as_str().unwrap().contains("2 subscriptions"),
        "{m}"
    );
    c.subscribe(&hash, json!([1, 2]));
    for _ in 0..6 {
        c.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[1]}));
    }
    let mut rate = 0;
    for _ in 0..6 {
        let m = c.recv();
        if m["type"] == "error" {
            assert_eq!(
                m["status"],
                json!({"code":15,"description":"Too many requests (rate limit exceeded)"}),
                "{m}"
            );
            rate += 1;
        }
    }
    assert!(rate >= 2, "{rate} refused");

    // Auth timeout: no subscribe within the time.
    let b = broker_with(|cfg| cfg.limits.auth_timeout_ms = 300);
    let mut c = Atmo::connect(&b);
    let m = expect_error(
        &mut c,
        4,
        "User or API key not found or session ended",
        Value::Null,
    );
    assert!(m["message"].as_str().unwrap().contains("timed out"), "{m}");
    assert_eq!(c.expect_close(), Some(1008));

    // Connections per user: the one over the cap is refused at authentication.
    let b = broker_with(|cfg| {
        cfg.limits.roles.viewer.max_connections_per_user = Some(1);
    });
    let hash = login(&b, "alice");
    let mut first = Atmo::connect(&b);
    first.subscribe(&hash, json!([1]));
    let mut second = Atmo::connect(&b);
    second.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[1]}));
    expect_error(
        &mut second,
        15,
        "Too many requests (rate limit exceeded)",
        json!("subscription/subscribe"),
    );
    assert_eq!(second.expect_close(), Some(1008));

    // Frame size: closed with 1009.
    let b = broker();
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    let many: Vec<u64> = (100_000..100_300).collect();
    c.send(json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":many}));
    assert_eq!(c.expect_close(), Some(1009));
}

// ---------------------------------------------------------------- across dialects

fn http_publish(b: &Broker, tenant: &str, body: &Value) {
    let body = body.to_string();
    let (status, reply) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        key(tenant, Role::Service),
        body.len()
    ));
    assert_eq!(status, 202, "{reply}");
}

/// Publishes a position of `vehicle` in `tenant` through `surface`.
fn publish(b: &Broker, tenant: &str, surface: &str, vehicle: &str, lat: f64) {
    let device = key(tenant, Role::Device);
    match surface {
        "native" => Device::new(b, tenant).locate(vehicle, lat, 36.0),
        "http" => http_publish(b, tenant, &native_location(vehicle, lat, 36.0, None)),
        "valtronics" => {
            let mut c = Client::connect(&b.url("/ws"));
            c.send(json!({"type":"auth","token":device}));
            assert_eq!(c.expect("auth_response")["success"], true);
            c.send(json!({"type":"telemetry_update","id":"v1","ack":true,
                "device_id":vehicle.parse::<u64>().unwrap(),
                "telemetry":{"latitude":lat,"longitude":-74.006,"speed":36.0,
                    "heading":245.5,"altitude":12}}));
            c.expect("ack");
        }
        "tracking" => {
            let mut c = Client::connect(&b.url("/v1/track"));
            c.send(json!({"action":"authenticate","payload":{
                "user_id":vehicle,"role":"driver","token":device}}));
            c.expect("authenticated");
            c.send(json!({"action":"location_update","payload":{
                "lat":lat,"lng":-74.006,"speed":36.0,"bearing":245.5}}));
        }
        other => panic!("unknown surface {other}"),
    }
}

#[test]
fn positions_from_every_surface_reach_the_tracker() {
    let b = broker();
    let hash = login(&b, "alice");
    let mut c = Atmo::connect(&b);
    c.subscribe(&hash, json!([15564]));
    let mut others = Atmo::connect(&b);
    others.subscribe(&login(&b, "carol"), json!([15564]));
    for (i, surface) in ["native", "http", "valtronics", "tracking"]
        .into_iter()
        .enumerate()
    {
        let lat = 40.5 + i as f64 / 10.0;
        publish(&b, "fleet_a", surface, "15564", lat);
        let m = c.recv();
        let d = &m["data"];
        assert_eq!(d["source_id"], 15564, "from {surface}: {m}");
        assert_eq!(d["gps"]["location"]["lat"].as_f64(), Some(lat), "{m}");
        assert_eq!(d["gps"]["location"]["lng"].as_f64(), Some(-74.006), "{m}");
        assert_eq!(d["gps"]["speed"].as_f64(), Some(36.0), "km/h: {m}");
        assert_eq!(d["gps"]["heading"].as_f64(), Some(245.5), "{m}");
        assert_eq!(d["movement_status"], "moving", "{m}");
        // The Tracking API has no altitude.
        let alt = if surface == "tracking" {
            None
        } else {
            Some(12.0)
        };
        assert_eq!(d["gps"]["alt"].as_f64(), alt, "{m}");
    }
    c.expect_silence(Duration::from_millis(200));
    // fleet_b's follower of its own 15564 saw none of it.
    others.expect_silence(Duration::from_millis(200));
}

#[test]
fn tenants_are_isolated() {
    let b = broker();
    let mut a = Atmo::connect(&b);
    a.subscribe(&login(&b, "alice"), json!([15564]));
    let mut z = Atmo::connect(&b);
    z.subscribe(&login(&b, "carol"), json!([15564]));
    Device::new(&b, "fleet_b").locate("15564", -10.0, 20.0);
    expect_state(&mut z, &json!(15564), -10.0, 20.0, ("active", "moving"));
    a.expect_silence(Duration::from_millis(300));
    Device::new(&b, "fleet_a").locate("15564", 10.0, 20.0);
    expect_state(&mut a, &json!(15564), 10.0, 20.0, ("active", "moving"));
    z.expect_silence(Duration::from_millis(300));
    // A new follower in each tenant gets its own tenant's current state.
    let mut z2 = Atmo::connect(&b);
    z2.subscribe(&login(&b, "carol"), json!([15564]));
    expect_state(&mut z2, &json!(15564), -10.0, 20.0, ("active", "moving"));
}

#[test]
fn native_subscribers_see_the_same_positions() {
    // The same publication, in both dialects at once.
    let b = broker();
    let mut native = b.connect_key(&key("fleet_a", Role::Viewer));
    native.subscribe("vehicle_locations", json!({"vehicle_ids":["15564"]}));
    let mut c = Atmo::connect(&b);
    c.subscribe(&login(&b, "alice"), json!([15564]));
    Device::new(&b, "fleet_a").locate("15564", 12.5, 0.0);
    let n = native.expect("location_update");
    assert_eq!(n["payload"]["location"]["latitude"], 12.5);
    expect_state(&mut c, &json!(15564), 12.5, 0.0, ("active", "stopped"));
}
