//! `serve --demo`: the simulated fleet is deterministic, every message it makes passes
//! the broker's own decoder and limits, and its motion is physically plausible (speeds,
//! decelerations, headings and distances between consecutive updates).

use crate::support::{Broker, Client};
use fleetcast::config::{Config, Limits};
use fleetcast::demo::sim::{Fleet, HARSH_BRAKING_MS2, Msg};
use fleetcast::demo::{Demo, Settings};
use fleetcast::dialect::native::{Command, Parser};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const T0_MS: i64 = 1_796_000_000_000;

/// `seconds` of simulation of every vehicle, one step per second (as the driver does).
fn run(fleet: &mut Fleet, seconds: usize) -> Vec<(usize, usize, Msg)> {
    let mut out = Vec::new();
    for i in 0..fleet.len() {
        for m in fleet.hello(i, T0_MS) {
            out.push((0, i, m));
        }
    }
    for step in 1..=seconds {
        for i in 0..fleet.len() {
            for m in fleet.step(i, 1.0, T0_MS + step as i64 * 1000) {
                out.push((step, i, m));
            }
        }
    }
    out
}

fn payload(m: &Msg) -> Value {
    let v: Value = serde_json::from_str(&m.text).expect("a message is JSON");
    v["payload"].clone()
}

#[test]
fn demo_fixed_seed_gives_fixed_routes() {
    let a = run(&mut Fleet::new(7, 20), 240);
    let b = run(&mut Fleet::new(7, 20), 240);
    assert_eq!(a, b, "the same seed must give the same messages");
    let c = run(&mut Fleet::new(8, 20), 240);
    assert_ne!(a, c, "another seed must give another fleet");
    // A fixed seed gives this route: vehicle_001's first trip, pinned so that a change of
    // the simulation or the road graph is noticed.
    let first_trip: Vec<Value> = a
        .iter()
        .filter(|(_, i, m)| *i == 0 && m.kind == "trip_event")
        .map(|(_, _, m)| payload(m))
        .take(1)
        .collect();
    assert_eq!(
        first_trip.len(),
        1,
        "vehicle_001 starts a trip within 4 minutes"
    );
    let t = &first_trip[0];
    assert_eq!(t["event"], "trip_started");
    assert_eq!(t["trip_id"], "trip_001_1");
    let pinned = json!({
        "origin": t["origin"], "destination": t["destination"],
        "planned_distance_km": t["planned_distance_km"]});
    // Recorded from the first run of this test (seed 7).
    let expected = json!({
        "origin": {"latitude": 52.510298, "longitude": 13.423365},
        "destination": {"latitude": 52.52521, "longitude": 13.431455},
        "planned_distance_km": 2.2});
    assert_eq!(pinned, expected, "seed 7's first route changed");
}

#[test]
fn demo_messages_pass_the_broker_validation() {
    let msgs = run(&mut Fleet::new(3, 120), 900);
    let mut parser = Parser::default();
    let limit = Limits::default().max_message_bytes;
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    let mut categories = HashSet::new();
    let mut trip_events = HashSet::new();
    for (step, i, m) in &msgs {
        assert!(
            m.text.len() <= limit,
            "{} bytes over the {limit}-byte limit: {}",
            m.text.len(),
            m.text
        );
        let (_, cmd) = parser.decode(m.text.as_bytes());
        match cmd {
            Ok(Command::Publish(p)) => {
                assert_eq!(p.channel.event_type(), m.kind, "{}", m.text);
                assert_eq!(
                    p.keys.vehicle.as_deref(),
                    Some(format!("vehicle_{:03}", i + 1).as_str()),
                    "{}",
                    m.text
                );
                let (_, ts) = p.timestamp.expect("every message carries its timestamp");
                assert_eq!(ts, T0_MS + *step as i64 * 1000);
            }
            Ok(_) => panic!("not a publish: {}", m.text),
            Err(e) => panic!("refused by the native decoder ({e:?}): {}", m.text),
        }
        *kinds.entry(m.kind).or_default() += 1;
        let p = payload(m);
        if m.kind == "safety_alert" {
            categories.insert(p["category"].as_str().unwrap().to_string());
        }
        if m.kind == "trip_event" {
            trip_events.insert(p["event"].as_str().unwrap().to_string());
        }
    }
    // Every vehicle reports its location once a simulated second.
    assert_eq!(kinds["location_update"], 120 * 900);
    for kind in [
        "maintenance_alert",
        "telemetry_update",
        "trip_event",
        "driver_status",
        "device_status",
        "route_progress",
        "safety_alert",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 0),
            "no {kind} in {kinds:?}"
        );
    }
    assert!(
        categories.contains("harsh_braking") && categories.contains("speeding"),
        "{categories:?}"
    );
    assert!(
        trip_events.contains("trip_started") && trip_events.contains("trip_completed"),
        "{trip_events:?}"
    );
}

struct Fix {
    step: usize,
    lat: f64,
    lon: f64,
    kmh: f64,
    heading: f64,
}

fn metres(a: &Fix, b: &Fix) -> (f64, f64) {
    let k = 111_320.0;
    let dx = (b.lon - a.lon) * k * a.lat.to_radians().cos();
    let dy = (b.lat - a.lat) * k;
    (dx, dy)
}

#[test]
fn demo_motion_is_physically_plausible() {
    let msgs = run(&mut Fleet::new(11, 60), 900);
    let mut fixes: HashMap<usize, Vec<Fix>> = HashMap::new();
    let mut harsh: Vec<(usize, usize)> = Vec::new();
    for (step, i, m) in &msgs {
        let p = payload(m);
        if m.kind == "location_update" {
            let l = &p["location"];
            fixes.entry(*i).or_default().push(Fix {
                step: *step,
                lat: l["latitude"].as_f64().unwrap(),
                lon: l["longitude"].as_f64().unwrap(),
                kmh: l["speed"].as_f64().unwrap(),
                heading: l["heading"].as_f64().unwrap(),
            });
        }
        if m.kind == "safety_alert" && p["category"] == "harsh_braking" {
            harsh.push((*i, *step));
        }
    }
    let (mut moving, mut aligned) = (0, 0);
    for (i, fs) in &fixes {
        for w in fs.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let dt = (b.step - a.step) as f64;
            assert!(dt == 1.0, "vehicle {i}: one update per second");
            assert!(
                (0.0..=130.0).contains(&b.kmh),
                "vehicle {i}: {} km/h",
                b.kmh
            );
            assert!((0.0..360.0).contains(&b.heading), "heading {}", b.heading);
            let accel = (b.kmh - a.kmh) / 3.6 / dt;
            assert!(
                (-8.1..=2.1).contains(&accel),
                "vehicle {i} step {}: {accel:.2} m/s² ({} -> {} km/h)",
                b.step,
                a.kmh,
                b.kmh
            );
            // The distance covered fits the speeds reported (rounding: 1 m, 0.1 km/h).
            let (dx, dy) = metres(a, b);
            let dist = dx.hypot(dy);
            let most = (a.kmh.max(b.kmh) + 0.2) / 3.6 * dt + 1.0;
            assert!(
                dist <= most,
                "vehicle {i} step {}: {dist:.1} m > {most:.1} m",
                b.step
            );
            if dist > 8.0 {
                moving += 1;
                let bearing = (dx.atan2(dy).to_degrees() + 360.0) % 360.0;
                let off = (bearing - b.heading).abs() % 360.0;
                if off.min(360.0 - off) < 3.0 {
                    aligned += 1;
                }
            }
        }
    }
    // Along a street the heading is the direction of travel; past an intersection the
    // displacement cuts the corner, so a few differ.
    assert!(moving > 10_000, "only {moving} moving updates");
    assert!(
        aligned as f64 >= 0.85 * moving as f64,
        "heading matches the direction of travel in {aligned} of {moving} updates"
    );
    // Harsh braking alerts come from the motion: the reported speed fell that fast.
    assert!(
        !harsh.is_empty(),
        "no harsh braking in 15 minutes of 60 vehicles"
    );
    for (i, step) in harsh {
        let fs = &fixes[&i];
        let k = fs.iter().position(|f| f.step == step).unwrap();
        let decel = (fs[k - 1].kmh - fs[k].kmh) / 3.6;
        assert!(
            decel > HARSH_BRAKING_MS2 - 0.1,
            "vehicle {i} step {step}: harsh braking alert at {decel:.2} m/s²"
        );
    }
}

/// The demo driver against a node with the SPEC's default limits: everything it sends is
/// accepted (no `error` reply: no validation failure, no rate limit), and a viewer sees
/// every vehicle through the ordinary fan-out.
#[test]
fn demo_publishes_through_the_broker_within_its_limits() {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = 2;
    cfg.server.shutdown_grace_ms = 1_000;
    cfg.auth.api_keys.push(fleetcast::config::ApiKeyConfig {
        key: "viewer-key-0123456789".into(),
        key_sha256: None,
        user_id: "viewer".into(),
        tenant: "demo_fleet".into(),
        role: fleetcast::model::Role::Viewer,
        vehicles: vec![],
        drivers: vec![],
        trips: vec![],
    });
    let key = fleetcast::demo::add_credential(&mut cfg, "demo_fleet", "0123456789abcdef");
    let interval = cfg.limits.location_update_interval();
    let broker = Broker::start(cfg);
    let mut viewer: Client = broker.connect_key("viewer-key-0123456789");
    viewer.send(json!({"type":"subscribe","id":"s","payload":{"channel":"vehicle_locations"}}));
    viewer.expect("subscribed");
    let demo = Demo::start(Settings {
        addr: broker.addr,
        key,
        vehicles: 200,
        seed: 5,
        interval,
    })
    .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let Ok(m) = viewer.next(Duration::from_millis(500)) else {
            continue;
        };
        if m["type"] == "location_update" {
            *seen
                .entry(m["payload"]["vehicle_id"].as_str().unwrap().into())
                .or_default() += 1;
        }
    }
    let c = demo.counters();
    let (sent, refused) = (
        c.sent.load(std::sync::atomic::Ordering::Relaxed),
        c.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    demo.stop();
    assert_eq!(seen.len(), 200, "every vehicle reached the viewer");
    assert!(
        seen.values().all(|n| *n >= 3),
        "vehicles update about once a second: {seen:?}"
    );
    assert!(sent > 1000, "sent {sent}");
    assert_eq!(
        refused, 0,
        "the broker refused {refused} of {sent} demo messages"
    );
}

// ---------------------------------------------------------------- newcomer polish

fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn demo_newcomer_http_head_page_and_retry_after() {
    let mut cfg = crate::support::config(1);
    cfg.limits.new_connections_per_minute_per_ip = 1;
    let b = Broker::start(cfg);
    for path in ["/healthz", "/readyz", "/"] {
        let r = raw(b.addr, &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(r.starts_with("HTTP/1.1 200"), "HEAD {path}: {r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(body.is_empty(), "HEAD {path} has a body: {body:?}");
        assert!(!head.contains("Content-Length: 0"), "HEAD {path}: {head}");
    }
    let page = raw(b.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        page.contains("text/html") && page.contains("/dashboard/app.js"),
        "{page}"
    );
    let script = raw(b.addr, "GET /dashboard/app.js HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(script.starts_with("HTTP/1.1 200") && script.contains("text/javascript"));
    assert!(
        raw(
            b.addr,
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .starts_with("HTTP/1.1 405")
    );
    // The second upgrade in a minute from this address: 429 with Retry-After.
    let upgrade = format!(
        "GET /v1/streaming/websocket?api_key={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        crate::support::key("fleet_a", fleetcast::model::Role::Viewer)
    );
    let _first = Client::connect(&b.url(&format!(
        "/v1/streaming/websocket?api_key={}",
        crate::support::key("fleet_a", fleetcast::model::Role::Viewer)
    )));
    let r = raw(b.addr, &upgrade);
    assert!(
        r.starts_with("HTTP/1.1 429") && r.contains("\r\nRetry-After: 1\r\n"),
        "{r}"
    );
    // A login over its failure limit: Retry-After says when an attempt may succeed.
    let attempt = "GET /v2/user/auth?login=nobody&password=x HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..5 {
        let r = raw(b.addr, attempt);
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }
    let r = raw(b.addr, attempt);
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    let wait: u64 = r
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {r}"));
    assert!((50..=60).contains(&wait), "Retry-After: {wait}");
}

#[test]
fn demo_newcomer_banner_logs_and_errors() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_fleetcast");
    // Development mode with --demo: paste-able export lines, the dashboard URL with the
    // key in the fragment, the limits in force; logs without colour codes into a pipe.
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--demo",
            "--demo-vehicles",
            "3",
        ])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !banner.contains("listening on") {
        if out.read_line(&mut banner).unwrap_or(0) == 0 {
            break;
        }
    }
    // The simulation connects (and logs it) right after the listening line.
    std::thread::sleep(Duration::from_millis(800));
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    for role in ["DEVICE", "VIEWER", "SERVICE", "ADMIN"] {
        let line = format!("  export {role}_KEY=dev-{}-", role.to_ascii_lowercase());
        assert!(banner.contains(&line), "no {line:?} in {banner}");
    }
    assert!(banner.contains("/#key=dev-admin-"), "{banner}");
    assert!(
        banner.contains("Limits in force: 600 new connections per minute"),
        "{banner}"
    );
    assert!(banner.contains("Demo: 3 simulated vehicles"), "{banner}");
    assert!(err.contains("demo fleet connected"), "stderr: {err}");
    assert!(!err.contains('\u{1b}'), "ANSI codes in piped logs: {err:?}");

    // An error: one line, no backtrace unless asked.
    let o = Command::new(bin)
        .args(["serve", "--config", "/nonexistent/fleetcast.toml"])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: cannot read /nonexistent/fleetcast.toml"),
        "{err}"
    );
    assert!(
        !err.contains("backtrace") && err.lines().count() == 1,
        "{err}"
    );

    // check-config: every error of the file, each with its line.
    let dir = std::env::temp_dir().join(format!("fleetcast-demo-cc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = 5\n[limits]\nmax_batch = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let o = Command::new(bin)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    for at in ["line 2,", "line 4,", "line 5,", "3 error(s)"] {
        assert!(err.contains(at), "{at} missing from {err}");
    }
}

/// `--demo` with a config file: the fleet publishes into the tenant named by
/// `--demo-tenant`, where that tenant's own viewer sees it; the simulator's key is never
/// printed.
#[test]
fn demo_with_a_config_file_publishes_into_the_named_tenant() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("fleetcast-demo-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleetcast.toml");
    std::fs::write(
        &file,
        "[[auth.api_keys]]\nkey = \"acme-viewer-key-0123456789\"\nuser_id = \"acme-viewer\"\n\
         tenant = \"acme\"\nrole = \"viewer\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--demo",
            "--demo-tenant",
            "acme",
            "--demo-vehicles",
            "5",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut addr = None;
    while addr.is_none() && Instant::now() < deadline {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        printed.push_str(&line);
        addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("no listening line: {printed}");
    };
    let url = format!("ws://{addr}/v1/streaming/websocket?api_key=acme-viewer-key-0123456789");
    let mut viewer = Client::connect(&url);
    viewer.send(json!({"type":"subscribe","id":"s","payload":{"channel":"vehicle_locations"}}));
    let mut vehicles = HashSet::new();
    let until = Instant::now() + Duration::from_secs(10);
    while vehicles.len() < 5 && Instant::now() < until {
        if let Ok(m) = viewer.next(Duration::from_millis(500))
            && m["type"] == "location_update"
        {
            vehicles.insert(m["payload"]["vehicle_id"].as_str().unwrap().to_string());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(vehicles.len(), 5, "acme's viewer saw {vehicles:?}");
    assert!(
        printed.contains("Demo: 5 simulated vehicles publishing into tenant acme"),
        "{printed}"
    );
    assert!(
        !printed.contains("demo-sim-"),
        "the simulator's key was printed: {printed}"
    );
    assert!(
        !printed.contains("export "),
        "no development banner with a config: {printed}"
    );
}
