//! Hot-path benches: inbound decode + parse, and encode-once fan-out into outboxes.
//! `cargo bench --bench hot_path`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fleetcast::auth::Principal;
use fleetcast::config::Limits;
use fleetcast::dialect::native::Parser;
use fleetcast::event::{Event, Publication};
use fleetcast::model::{Channel, EntityKeys, Role};
use fleetcast::route::index::SubscriberIndex;
use fleetcast::session::{Selection, Session, Verdict};
use fleetcast::shard::outbox::Outbox;
use fleetcast::wire::frame::{FrameReader, Message};
use fleetcast::wire::handshake::Scope;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const LOCATION: &str = r#"{"type":"location_update","id":"m1","timestamp":"2024-03-15T14:30:00Z","payload":{"vehicle_id":"vehicle_001","trip_id":"trip_12345","location":{"latitude":40.7128,"longitude":-74.006,"accuracy":5.2,"altitude":12.0,"heading":245.5,"speed":35.2},"telemetry":{"fuel_level":75.5,"engine_rpm":2100},"driver_status":"driving"}}"#;

fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x81, 0x80 | 126];
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn decode_parse(c: &mut Criterion) {
    let frame = client_frame(LOCATION.as_bytes());
    let mut reader = FrameReader::new(1024);
    let mut parser = Parser::default();
    let mut buf = frame.clone();
    c.bench_function("decode_parse_location_update", |b| {
        b.iter(|| {
            buf.copy_from_slice(&frame);
            reader
                .decode(&mut buf, |m| {
                    if let Message::Text(t) = m {
                        black_box(parser.decode(t).1.is_ok());
                    }
                    true
                })
                .unwrap()
        })
    });
}

fn event() -> Arc<Event> {
    let payload = fleetcast::json::member(LOCATION.as_bytes(), "payload")
        .unwrap()
        .to_vec();
    let p = Publication {
        channel: Channel::VehicleLocations,
        id: None,
        payload,
        keys: EntityKeys {
            vehicle: Some("vehicle_001".into()),
            trip: None,
            driver: None,
        },
        severity: None,
        category: None,
        status: None,
        canon: Default::default(),
        timestamp: "2024-03-15T14:30:00.000Z".into(),
        ts_ms: 0,
        ack: false,
        publisher: "broker".into(),
        bind_check: Default::default(),
    };
    Arc::new(Event::encode(
        "fleet_001".into(),
        p,
        1,
        1,
        b"\"evt_1\"",
        Instant::now(),
    ))
}

fn fanout(c: &mut Criterion) {
    let tenant: Arc<str> = "fleet_001".into();
    let limits = Limits::default();
    let principal = Principal {
        user_id: "u".into(),
        tenant: tenant.clone(),
        role: Role::Viewer,
        scope: fleetcast::auth::DeviceScope::any(),
        expires_at: None,
        credential: Default::default(),
    };
    let mut group = c.benchmark_group("fanout_one_event");
    for n in [1usize, 100, 10_000] {
        let mut index = SubscriberIndex::default();
        let mut sessions: Vec<(Session, Outbox)> = (0..n)
            .map(|i| {
                let s = Session::new(
                    format!("c{i}").into(),
                    Scope::None,
                    Some(Arc::new(principal.clone())),
                    Instant::now(),
                    &limits,
                );
                (s, Outbox::default())
            })
            .collect();
        let sel = Selection {
            all: true,
            ..Default::default()
        };
        for (i, (s, _)) in sessions.iter_mut().enumerate() {
            index.add(&tenant, Channel::VehicleLocations, &sel, i);
            // Register the subscription inside the session through its public input.
            let msg = br#"{"type":"subscribe","payload":{"channel":"vehicle_locations"}}"#;
            let mut parser = Parser::default();
            let auth = fleetcast::auth::Authenticator::new(&Default::default()).unwrap();
            let mut ctx = fleetcast::session::Ctx {
                limits: &limits,
                auth: &auth,
                parser: &mut parser,
                admission: &fleetcast::session::AdmitAll,
            };
            s.handle_message(
                fleetcast::session::Now {
                    mono: Instant::now(),
                    unix_ms: 0,
                },
                Message::Text(msg),
                &mut ctx,
            );
            while s.poll_action().is_some() {}
        }
        let ev = event();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            // The shard reads the clock once per event (it did before `frequency` too, to
            // stamp dirty connections); that read is not what this bench measures.
            let now = Instant::now();
            b.iter(|| {
                index.for_each(&ev.tenant, ev.channel, &ev.keys, |slot| {
                    let (s, out) = &mut sessions[slot];
                    if let Verdict::Shared = s.verdict(&ev, now) {
                        out.push_shared(ev.clone());
                    }
                });
                for (_, out) in sessions.iter_mut() {
                    out.clear();
                }
            })
        });
    }
    group.finish();
}

/// Index lookup and bitset iteration alone: one event about a vehicle, in a shard where
/// 1 000 connections watch the whole fleet and 1 000 watch one vehicle each.
fn route_lookup(c: &mut Criterion) {
    let tenant: Arc<str> = "fleet_001".into();
    let mut index = SubscriberIndex::default();
    let all = Selection {
        all: true,
        ..Default::default()
    };
    for slot in 0..1000 {
        index.add(&tenant, Channel::VehicleLocations, &all, slot);
        let one = Selection {
            vehicles: vec![format!("vehicle_{slot:03}").into()],
            ..Default::default()
        };
        index.add(&tenant, Channel::VehicleLocations, &one, 1000 + slot);
    }
    let keys = EntityKeys {
        vehicle: Some("vehicle_007".into()),
        trip: Some("trip_1".into()),
        driver: None,
    };
    c.bench_function("route_lookup_1001_of_2000", |b| {
        b.iter(|| {
            let mut n = 0usize;
            index.for_each("fleet_001", Channel::VehicleLocations, &keys, |slot| {
                n += slot & 1
            });
            black_box(n)
        })
    });
}

/// Publish-to-socket-write through one shard, end to end over loopback: one publish, and
/// the time until each of 10 subscribers has read it.
fn end_to_end(c: &mut Criterion) {
    use fleetcast::config::{ApiKeyConfig, Config};
    use std::net::TcpStream;
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = 1;
    cfg.limits.messages_per_second = 10_000_000;
    cfg.limits.location_update_interval_ms = 0;
    cfg.limits.new_connections_per_minute_per_ip = 1000;
    cfg.limits.new_connections_per_minute_per_user = 1000;
    for (key, role) in [
        ("bench-viewer-0123456789", Role::Viewer),
        ("bench-device-0123456789", Role::Device),
    ] {
        cfg.auth.api_keys.push(ApiKeyConfig {
            key: key.into(),
            key_sha256: None,
            user_id: key.into(),
            tenant: "fleet_001".into(),
            role,
            vehicles: vec!["*".into()],
            drivers: vec![],
            trips: vec![],
        });
    }
    let node = fleetcast::node::Node::start(cfg).unwrap();
    let url = |key: &str| {
        format!(
            "ws://{}/v1/streaming/websocket?api_key={key}",
            node.local_addr()
        )
    };
    let connect = |key: &str| {
        let stream = TcpStream::connect(node.local_addr()).unwrap();
        stream.set_nodelay(true).unwrap();
        tungstenite::client(url(key), stream).unwrap().0
    };
    let mut subs: Vec<_> = (0..10)
        .map(|_| {
            let mut ws = connect("bench-viewer-0123456789");
            ws.send(tungstenite::Message::text(
                r#"{"type":"subscribe","payload":{"channel":"vehicle_locations"}}"#,
            ))
            .unwrap();
            while !ws.read().unwrap().to_text().unwrap().contains("subscribed") {}
            ws
        })
        .collect();
    let mut device = connect("bench-device-0123456789");
    let msg = r#"{"type":"location_update","payload":{"vehicle_id":"v1","location":{"latitude":40.7,"longitude":-74.0}}}"#;
    c.bench_function("end_to_end_publish_to_10_subscribers", |b| {
        b.iter(|| {
            device.send(tungstenite::Message::text(msg)).unwrap();
            for ws in subs.iter_mut() {
                black_box(ws.read().unwrap());
            }
        })
    });
    drop(subs);
    node.shutdown();
}

criterion_group!(benches, decode_parse, fanout, route_lookup, end_to_end);
criterion_main!(benches);
