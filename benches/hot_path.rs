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
        timestamp: "2024-03-15T14:30:00.000Z".into(),
        ts_ms: 0,
        ack: false,
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
        vehicles: None,
        expires_at: None,
    };
    let mut group = c.benchmark_group("fanout_one_event");
    for n in [1usize, 100, 10_000] {
        let mut index = SubscriberIndex::default();
        let mut sessions: Vec<(Session, Outbox)> = (0..n)
            .map(|i| {
                let s = Session::new(
                    format!("c{i}").into(),
                    Scope::None,
                    Some(principal.clone()),
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
            b.iter(|| {
                index.for_each(&ev.tenant, ev.channel, &ev.keys, |slot| {
                    let (s, out) = &mut sessions[slot];
                    if let Verdict::Shared = s.verdict(&ev) {
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

criterion_group!(benches, decode_parse, fanout);
criterion_main!(benches);
