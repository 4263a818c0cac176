//! Slow consumers (SPEC §7): a reader that stops reading never delays anyone else; past
//! the soft bound its state channels are conflated to the newest value per entity, event
//! channels are never dropped silently, and past the hard bound it is closed with 1013.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::BTreeMap;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn broker(soft: usize, hard: usize) -> Broker {
    let mut cfg = config(2);
    cfg.limits.soft_outbound_bytes = soft;
    cfg.limits.max_outbound_bytes = hard;
    Broker::start(cfg)
}

/// A viewer subscribed to `channels`; the caller then stops reading it. Its receive buffer
/// is shrunk and it announces a small MSS: on loopback (MSS 64 KiB) the server's kernel
/// send buffer would otherwise start near 4 MiB and absorb every test's whole stream; this
/// way the kernel holds ~100 KB and the broker's own queue bounds are what is tested.
fn stalled_viewer(b: &Broker, channels: &[&str]) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_tcp_mss(536).unwrap();
    socket.connect(&SockAddr::from(b.addr)).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let url = b.url(&format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    ));
    let (ws, _) = tungstenite::client(url.into_client_request().unwrap(), stream)
        .unwrap_or_else(|e| panic!("stalled viewer: {e}"));
    let mut c = Client { ws };
    for ch in channels {
        c.subscribe(ch, json!({}));
    }
    c
}

/// How a stream read after a stall ended.
#[derive(Debug, PartialEq)]
enum End {
    /// A close frame with this code.
    Close(Option<u16>),
    /// The server ended the TCP connection without (a readable) close frame.
    Dropped,
    /// Nothing more arrived.
    Quiet,
}

/// Reads everything a stalled client was sent, until the stream ends or goes quiet.
/// Any other read error (a corrupt frame) fails the test.
fn drain(c: &mut Client, quiet: Duration, max: usize) -> (Vec<Value>, End) {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    c.set_timeout(quiet);
    while Instant::now() < deadline && got.len() < max {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => got.push(
                serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("corrupt message after {} ({e}): {t}", got.len())),
            ),
            Ok(tungstenite::Message::Close(f)) => {
                return (got, End::Close(f.map(|f| u16::from(f.code))));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (got, End::Quiet);
            }
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return (got, End::Dropped);
            }
            Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            ) => return (got, End::Dropped),
            Err(e) => panic!(
                "stalled client: corrupt stream after {} messages: {e}",
                got.len()
            ),
        }
    }
    panic!(
        "stalled client still reading after 8 s ({} messages)",
        got.len()
    )
}

/// How long the broker lets a closing connection linger for its close frame to be read
/// (`CLOSE_LINGER` in the shard) before it drops the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Asserts a stalled client was closed as a slow consumer. When it resumed reading within
/// the linger after the close (which came after `not_before`), the close frame itself must
/// have arrived, intact after the frame it interrupted; later, the socket may be gone.
fn assert_closed_slow(end: &End, not_before: Instant, resumed: Instant, got: usize) {
    let soon =
        resumed.saturating_duration_since(not_before) < CLOSE_LINGER - Duration::from_millis(200);
    if soon {
        assert_eq!(*end, End::Close(Some(1013)), "after {got} messages");
    } else {
        assert!(
            matches!(end, End::Close(Some(1013)) | End::Dropped),
            "{end:?} after {got} messages"
        );
    }
}

fn slow_consumers(b: &Broker) -> u64 {
    b.metric("fleetcast_limit_breaches_total", "kind=\"slow_consumer\"")
}

fn drops(b: &Broker, reason: &str) -> u64 {
    b.metric("fleetcast_drops_total", &format!("reason=\"{reason}\""))
}

// ---------------------------------------------------------------- one stalled among 100

const HEALTHY: usize = 100;
const VEHICLES: usize = 50;
const ROUNDS: usize = 20;
const ALERTS_PER_ROUND: usize = 20;

/// Client-side delivery latencies of one healthy viewer, in microseconds.
type Latencies = Vec<u64>;

/// Reads exactly every published event: per vehicle every counter in order, every alert in
/// seq order without a gap; then nothing else.
fn healthy_reader(i: usize, mut c: Client) -> Latencies {
    let want_locations = VEHICLES * ROUNDS;
    let want_alerts = ROUNDS * ALERTS_PER_ROUND;
    let mut next_n = vec![0u64; VEHICLES];
    let (mut locations, mut alerts) = (0, 0);
    let mut last_seq = None;
    let mut lat = Vec::with_capacity(want_locations + want_alerts);
    let deadline = Instant::now() + Duration::from_secs(15);
    c.set_timeout(Duration::from_secs(5));
    while locations < want_locations || alerts < want_alerts {
        assert!(
            Instant::now() < deadline,
            "viewer {i}: {locations} locations, {alerts} alerts after 15 s"
        );
        let t = match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => t,
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => continue,
            other => panic!("viewer {i}: {other:?} after {locations} locations, {alerts} alerts"),
        };
        let t = t.as_str();
        let now = now_us();
        let sent = num(t, "\"sent_us\":").unwrap_or_else(|| panic!("viewer {i}: {t}"));
        lat.push(now.saturating_sub(sent));
        if t.starts_with("{\"type\":\"location_update\"") {
            let v = num(t, "\"v\":").unwrap() as usize;
            let n = num(t, "\"n\":").unwrap();
            assert_eq!(n, next_n[v], "viewer {i}: vehicle {v} skipped or repeated");
            next_n[v] += 1;
            locations += 1;
        } else if t.starts_with("{\"type\":\"safety_alert\"") {
            let seq = num(t, "\"seq\":").unwrap();
            if let Some(last) = last_seq {
                assert_eq!(seq, last + 1, "viewer {i}: alert gap");
            }
            last_seq = Some(seq);
            alerts += 1;
        } else {
            panic!("viewer {i}: unexpected {t}");
        }
    }
    // No surplus: the answer to a ping is the next message.
    c.expect_nothing_more(&format!("viewer {i}"));
    lat
}

/// Rounds of one location per vehicle and a few alerts, each round one burst, 40 ms apart.
fn publish_rounds(svc: &mut Client) {
    let pad = "x".repeat(300);
    for r in 0..ROUNDS {
        for v in 0..VEHICLES {
            svc.send(json!({"type":"location_update","payload":{
                "vehicle_id": format!("veh-{v}"), "v": v, "n": r, "sent_us": now_us(),
                "location":{"latitude": 40.0 + r as f64 / 1000.0, "longitude": -74.0}}}));
        }
        for a in 0..ALERTS_PER_ROUND {
            svc.send(json!({"type":"safety_alert","payload":{
                "alert_id": format!("al-{r}-{a}"), "severity": "high",
                "category": "harsh_braking", "vehicle_id": format!("veh-{a}"),
                "note": pad, "sent_us": now_us()}}));
        }
        thread::sleep(Duration::from_millis(40));
    }
    svc.send(json!({"type":"ping","id":"published"}));
    assert_eq!(svc.expect("pong")["id"], "published");
}

struct Summary {
    max_us: u64,
    p99_us: u64,
    p50_us: u64,
}

fn summarize(all: &mut [u64]) -> Summary {
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    Summary {
        max_us: *all.last().unwrap(),
        p99_us: at(0.99),
        p50_us: at(0.50),
    }
}

struct Run {
    b: Broker,
    latency: Summary,
    stalled: Option<Client>,
    published_from: Instant,
}

/// One run: 100 healthy viewers (and maybe one stalled one) on a 2-shard broker with
/// 16 KiB / 64 KiB outbound bounds, a service publishing 1000 locations and 400 alerts.
fn run(stalled: bool) -> Run {
    let b = broker(16 * 1024, 64 * 1024);
    let stalled = stalled.then(|| stalled_viewer(&b, &["vehicle_locations", "alerts"]));
    let readers: Vec<_> = (0..HEALTHY)
        .map(|i| {
            let mut c = b.connect_key(&key("fleet_a", Role::Viewer));
            c.subscribe("vehicle_locations", json!({}));
            c.subscribe("alerts", json!({}));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || healthy_reader(i, c))
                .unwrap()
        })
        .collect();
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let published_from = Instant::now();
    publish_rounds(&mut svc);
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.join().expect("healthy viewer"));
    }
    Run {
        b,
        latency: summarize(&mut all),
        stalled,
        published_from,
    }
}

#[test]
fn stalled_reader_does_not_delay_a_hundred_healthy_ones() {
    let baseline = run(false);
    assert_eq!(slow_consumers(&baseline.b), 0);
    assert_eq!(drops(&baseline.b, "conflated"), 0);
    let base = baseline.latency;
    drop(baseline.b);

    let Run {
        b,
        latency: with,
        stalled,
        published_from,
    } = run(true);
    let mut stalled = stalled.unwrap();
    println!(
        "healthy latency without / with a stalled reader: p50 {} / {} us, p99 {} / {} us, \
         max {} / {} us (p99 ratio {:.2})",
        base.p50_us,
        with.p50_us,
        base.p99_us,
        with.p99_us,
        base.max_us,
        with.max_us,
        with.p99_us as f64 / base.p99_us.max(1) as f64
    );
    assert!(
        with.max_us < 1_000_000,
        "a healthy viewer waited {} us for an event",
        with.max_us
    );

    // The stalled reader was closed with 1013, and what it got before that holds no gap
    // in the alerts.
    let resumed = Instant::now();
    let (got, end) = drain(&mut stalled, Duration::from_secs(3), 10_000);
    assert_closed_slow(&end, published_from, resumed, got.len());
    let seqs: Vec<u64> = got
        .iter()
        .filter(|m| m["type"] == "safety_alert")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in the alerts of the stalled reader: {seqs:?}"
    );
    assert!(
        seqs.len() < ROUNDS * ALERTS_PER_ROUND,
        "the stalled reader got everything"
    );

    assert_eq!(
        slow_consumers(&b),
        1,
        "only the stalled reader is a slow consumer"
    );
    // Its locations were conflated before alerts pushed it past the hard bound.
    assert!(drops(&b, "conflated") > 0);
    assert!(drops(&b, "slow_consumer") > 0);
}

// ---------------------------------------------------------------- conflation

#[test]
fn conflated_state_ends_with_the_newest_value_per_vehicle() {
    const FIVE: usize = 5;
    const UPDATES: u64 = 600;
    // Soft bound small, hard bound far away: conflated, never closed.
    let b = broker(4096, 16 * 1024 * 1024);
    let mut viewer = stalled_viewer(&b, &["vehicle_locations"]);
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    for n in 0..UPDATES {
        for v in 0..FIVE {
            svc.send(json!({"type":"location_update","payload":{
                "vehicle_id": format!("veh-{v}"), "n": n,
                "location":{"latitude": 40.0, "longitude": -74.0}}}));
        }
    }
    svc.send(json!({"type":"ping","id":"published"}));
    assert_eq!(svc.expect("pong")["id"], "published");
    // Let the broker route the last ones to the viewer's shard, then resume reading.
    thread::sleep(Duration::from_millis(200));
    let published = UPDATES as usize * FIVE;
    let (got, end) = drain(&mut viewer, Duration::from_millis(500), published + 1);
    assert_eq!(end, End::Quiet, "the viewer was not to be closed");

    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in &got {
        assert_eq!(m["type"], "location_update", "{m}");
        let v = m["payload"]["vehicle_id"].as_str().unwrap().to_string();
        let n = m["payload"]["n"].as_u64().unwrap();
        if let Some(&prev) = last.get(&v) {
            assert!(n > prev, "{v}: {n} after {prev}");
        }
        last.insert(v, n);
    }
    let want: BTreeMap<String, u64> = (0..FIVE)
        .map(|v| (format!("veh-{v}"), UPDATES - 1))
        .collect();
    assert_eq!(last, want, "not the newest value of every vehicle");
    assert!(
        got.len() < published,
        "nothing was conflated: {} of {published}",
        got.len()
    );
    // Every update it did not get was replaced by a newer one, and counted so.
    assert_eq!(drops(&b, "conflated") as usize, published - got.len());
    assert_eq!(slow_consumers(&b), 0);
}

// ---------------------------------------------------------------- events are never dropped

#[test]
fn events_are_never_dropped_silently() {
    const ALERTS: usize = 1000;
    let b = broker(4096, 16 * 1024);
    let mut viewer = stalled_viewer(&b, &["alerts"]);
    let mut healthy = b.connect_key(&key("fleet_a", Role::Viewer));
    healthy.subscribe("alerts", json!({}));
    let healthy = thread::spawn(move || {
        let mut seqs = Vec::new();
        while seqs.len() < ALERTS {
            let m = healthy
                .next(Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("healthy viewer: {e:?} after {}", seqs.len()));
            seqs.push(m["seq"].as_u64().unwrap());
        }
        seqs
    });
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let pad = "x".repeat(300);
    let published_from = Instant::now();
    for n in 0..ALERTS {
        svc.send(json!({"type":"safety_alert","payload":{
            "alert_id": format!("al-{n}"), "severity": "high", "category": "harsh_braking",
            "vehicle_id": "v1", "note": pad}}));
    }
    svc.send(json!({"type":"ping","id":"published"}));
    assert_eq!(svc.expect("pong")["id"], "published");

    let resumed = Instant::now();
    let (got, end) = drain(&mut viewer, Duration::from_millis(500), ALERTS + 1);
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "safety_alert", "{m}");
            m["seq"].as_u64().unwrap()
        })
        .collect();
    // Contiguous as far as it goes: never a gap followed by more alerts.
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in the alerts: {seqs:?}"
    );
    // Either all of them, or a close. With ~100 KB in the kernel and a 16 KiB queue,
    // 550 KB of alerts cannot all fit: it is the close.
    assert!(seqs.len() < ALERTS, "the stalled viewer got every alert");
    assert_closed_slow(&end, published_from, resumed, seqs.len());
    assert_eq!(slow_consumers(&b), 1);
    assert!(drops(&b, "slow_consumer") > 0);
    assert_eq!(drops(&b, "conflated"), 0);

    // The healthy viewer beside it got every alert, in order (a burst of a thousand
    // within few loop turns does not make it a slow consumer).
    let all = healthy.join().expect("healthy viewer");
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
}

/// Issue 5: a slow consumer closed with 1013 that resumes with `since` has lost nothing
/// on an event channel.
#[test]
fn slow_consumer_closed_then_resumed_with_since_loses_nothing() {
    const ALERTS: u64 = 600;
    let b = broker(4096, 16 * 1024);
    let mut viewer = stalled_viewer(&b, &["alerts"]);
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let pad = "x".repeat(300);
    for n in 0..ALERTS {
        svc.send(json!({"type":"safety_alert","payload":{
            "alert_id": format!("al-{n}"), "severity": "high", "category": "harsh_braking",
            "vehicle_id": "v1", "note": pad}}));
    }
    svc.send(json!({"type":"ping","id":"published"}));
    assert_eq!(svc.expect("pong")["id"], "published");
    let (got, end) = drain(&mut viewer, Duration::from_millis(500), ALERTS as usize + 1);
    assert!(
        matches!(end, End::Close(Some(1013)) | End::Dropped),
        "{end:?}"
    );
    assert!(
        (got.len() as u64) < ALERTS,
        "the stalled viewer got every alert"
    );
    // Its position: the last alert it read (or the start of the stream).
    let (epoch, last) = match got.last() {
        Some(m) => (m["epoch"].as_u64().unwrap(), m["seq"].as_u64().unwrap()),
        None => {
            let mut probe = b.connect_key(&key("fleet_a", Role::Viewer));
            let reply = probe.subscribe("alerts", json!({}));
            (reply["payload"]["epoch"].as_u64().unwrap(), 0)
        }
    };

    let mut again = b.connect_key(&key("fleet_a", Role::Viewer));
    again.send(
        json!({"type":"subscribe","id":"resume","payload":{"action":"subscribe",
        "channel":"alerts","since":{"epoch":epoch,"seq":last}}}),
    );
    let reply = again.expect("subscribed");
    assert_eq!(reply["payload"]["recovered"], true, "{reply}");
    let mut seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    while (seqs.len() as u64) < ALERTS {
        let m = again.expect("safety_alert");
        seqs.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seqs,
        (1..=ALERTS).collect::<Vec<_>>(),
        "the full sequence, once each"
    );
    again.expect_silence(Duration::from_millis(200));
}
